//! The memory tier's eviction against an LRU on the replay trace (issue 16: a new eviction
//! scheme must keep the hit ratio at least equal; measure).
//!
//! `cargo bench --bench hit_ratio` generates the synthetic wedding trace (`aisle trace`,
//! 100,000 requests over two hours, seed 42), keys every request as the gateway does with the
//! shipped rules (`tools::replay::admit` and `key_of`, the proxy's admission code), and plays
//! the keys through two stores of the same byte budget:
//! - **LRU**: pingora's own `lru::Manager` (what pingora's examples use), each entry charged
//!   its record's bytes and the index's share, as the segment store charges it;
//! - **segments**: `Segments`, the memory tier's store (FIFO segments per priority class in
//!   S3-FIFO's probation, main and ghost queues, a second chance in the main queue for entries
//!   hit since they were written), at the segment size the gateway picks for the budget.
//!
//! A request whose key is held is a hit; otherwise its answer is stored. Answers do not expire
//! here (both stores see the same stream, so only eviction differs), and their sizes are drawn
//! from the key (256 B to 16 KiB, most under 4 KiB), since the trace has no bodies. Budgets are
//! shares of the bytes of every distinct answer, from a twentieth to a quarter: below that
//! nothing fits, above it little is evicted.
//!
//! Run by `cargo test --benches` it is a smoke test: 20,000 requests, the same comparison.

use aisle::config::Config;
use aisle::storage::memory::segments::{Segments, HEAD, INDEX};
use aisle::tools::replay::{admit, key_of, parse_line};
use aisle::tools::tracegen::{generate, Options};
use aisle::trust::Client;
use pingora::cache::eviction::lru::Manager;
use pingora::cache::eviction::EvictionManager;
use pingora::cache::key::CompactCacheKey;
use pingora::cache::CacheEntryKey;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

/// What a record holds besides its body: the fixed part, a typical header and names
/// (`benches/memory_scale.rs`'s entry: about 320 bytes).
const ENTRY_BYTES: usize = 320;

/// The answer's body size for a key: 256 B to 16 KiB, log-uniform over seven doublings.
fn body_size(id: u128) -> usize {
    let h = (id as u64) ^ ((id >> 64) as u64);
    (256usize << (h % 7)) + (h >> 8) as usize % 256
}

fn key(id: u128) -> CacheEntryKey {
    CacheEntryKey::key_only(CompactCacheKey {
        primary: id.to_be_bytes(),
        variance: None,
        user_tag: "".into(),
    })
}

/// Hits of pingora's LRU over `ids` with `budget` bytes.
/// Each entry is charged what the store charges a record outside its segment too (`INDEX`),
/// so that both hold the same bytes per entry.
fn lru(ids: &[u128], budget: usize) -> usize {
    let lru = Manager::<16>::with_capacity(budget, 1024);
    let mut held = HashSet::new();
    let mut hits = 0;
    let never = SystemTime::UNIX_EPOCH;
    for &id in ids {
        let size = HEAD + ENTRY_BYTES + body_size(id) + INDEX;
        if held.contains(&id) {
            hits += 1;
            lru.access(&key(id), size, never);
            continue;
        }
        held.insert(id);
        for victim in lru.admit(key(id), size, never) {
            held.remove(&u128::from_be_bytes(victim.key().primary));
        }
    }
    hits
}

/// Hits of the segment store over `ids` with `budget` bytes, and the share of the budget its
/// live records held at the end.
fn segments(ids: &[u128], budget: usize) -> (usize, f64) {
    let store = Segments::for_budget(budget);
    let mut hits = 0;
    let mut body = vec![0u8; ENTRY_BYTES + (16 << 10) + 256];
    for &id in ids {
        if store.hit(id).is_some() {
            hits += 1;
            continue;
        }
        body.resize(ENTRY_BYTES + body_size(id), 0);
        store
            .insert(id, 0, 1, &[&body])
            .expect("an answer is smaller than the budget");
    }
    (hits, store.live_bytes() as f64 / budget as f64)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let requests = if full { 100_000 } else { 20_000 };
    let config = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml"))
        .unwrap_or_else(|d| panic!("gateway.toml must load: {d:?}"));
    let mut trace = generate(&Options {
        requests,
        seed: 42,
        ..Options::default()
    });
    trace.sort_by_key(|(at, _)| *at);
    let ids: Vec<u128> = trace
        .iter()
        .filter_map(|(_, line)| {
            let req = parse_line(line).expect("the generator writes valid lines");
            let (route, terms, body) = admit(&config.rules, &req, Client::Untrusted).ok()?;
            Some(u128::from_be_bytes(key_of(
                &req,
                &route,
                &terms,
                body.as_ref(),
            )))
        })
        .collect();
    let distinct: HashMap<u128, usize> = ids.iter().map(|&id| (id, body_size(id))).collect();
    let bytes: usize = distinct
        .values()
        .map(|b| HEAD + ENTRY_BYTES + b + INDEX)
        .sum();
    println!(
        "{} cacheable requests of {requests}, {} distinct keys, {:.1} MiB of answers; \
         at most {:.1}% can hit",
        ids.len(),
        distinct.len(),
        bytes as f64 / 1048576.0,
        100.0 * (ids.len() - distinct.len()) as f64 / ids.len() as f64
    );
    // Both stores' ratios differ between runs (pingora's LRU evicts from its shards in an
    // order that varies; the store's tables and ghost hash with a random seed): over ten runs
    // the LRU's moved by 1.8 points at the smallest budget, 0.8 and 0.14 at the others. So the
    // store must be within a point of the LRU at every budget (README "Stop 41": about 9
    // points above at 5%, 1.8 above at 10%, level at 25%; on this smoke run's shorter trace
    // about 3 above, 1.4 above and 0.2 below).
    let mut worse = Vec::new();
    for share in [5, 10, 25] {
        let budget = bytes * share / 100;
        let (l, (s, live)) = (lru(&ids, budget), segments(&ids, budget));
        let pct = |h: usize| 100.0 * h as f64 / ids.len() as f64;
        println!(
            "budget {share}% ({:.1} MiB): LRU {:.2}%, segments {:.2}% ({:+.2} points; live \
             records {:.1}% of the budget)",
            budget as f64 / 1048576.0,
            pct(l),
            pct(s),
            pct(s) - pct(l),
            100.0 * live
        );
        if pct(s) < pct(l) - 1.0 {
            worse.push(share);
        }
    }
    assert!(
        worse.is_empty(),
        "the segment store hits more than a point less than an LRU at budgets {worse:?} \
         (% of the answers' bytes)"
    );
}
