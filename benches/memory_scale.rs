//! The memory tier at a million entries (issue 16): per-entry overhead, RSS against the budget,
//! and whether what the tier charges covers what the process really grew by.
//!
//! `cargo bench --bench memory_scale` drives the library directly, not HTTP (a million requests
//! would measure the proxy, and `benches/memory_budget.rs` already does the HTTP-level check at
//! 64 MiB): a `MemoryStorage`, built for the budget exactly as `server.rs` builds it, is filled
//! as pingora fills it — `get_miss_handler`, one `write_body`, `finish` (the tier evicts as it
//! stores: pingora is given no eviction manager). Every entry is what a rule-matched API answer
//! stores: a length-prefixed primary key with its BLAKE3 override, a realistic `host/path`,
//! three tags, the rule's shared name, and a typical API answer's header (content type, cache
//! control, ETag, request id, Date, Vary, Content-Length). The process uses mimalloc, as the
//! `aisle` binary does, so size classes and RSS behave as in the gateway.
//!
//! Each measurement runs in a child process of its own (this binary re-run with
//! `MEMORY_SCALE_PHASE`), so one phase's freed pages do not hide the next one's growth. RSS is
//! `VmRSS` of /proc/self/status, read before the storage and its LRU are built (so their
//! preallocation counts) and after the fill.
//!
//! - **overhead**: a budget nothing is evicted from, `MEMORY_SCALE_ENTRIES` (1,000,000) entries;
//!   per-entry overhead = (RSS growth − Σ body − Σ header bytes (names + values)) / entries.
//!   Target ≤ 300 B.
//! - **budget**: `memory = 2GiB`, 1,000,000 entries of 1 KiB: RSS / budget (target ≤ 1.15),
//!   `MemoryStorage::bytes()` (what the tier charges) against the real growth, which must cover
//!   it (charged ≥ real: no uncounted part can push the process past the budget).
//!
//! - **eviction**: the same budget offered half as many entries again, so it evicts while full:
//!   RSS / budget and charged / real growth again.
//!
//! Run by `cargo test --benches` (no `--bench` argument) it is a smoke test: 60,000 entries, a
//! 64 MiB budget (so eviction runs), asserting that the budget holds and the growth is within
//! 1.25x of it (the charge is checked against the growth at a million entries only).

use aisle::key;
use aisle::rules::{Priority, StoredRule};
use aisle::storage::memory::MemoryStorage;
use aisle::storage::{EntryInfo, Names};
use bytes::Bytes;
use pingora::cache::storage::MissFinishType;
use pingora::cache::trace::Span;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::ResponseHeader;
use std::alloc::{GlobalAlloc, Layout};
use std::process::Command;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// mimalloc as `aisle` asks it (`aisle::alloc`), counting live heap bytes and allocations, so the figures can tell
/// what the entries requested from what the allocator made resident.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        LIVE_ALLOCS.fetch_add(1, Relaxed);
        unsafe { aisle::alloc::Allocator.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        LIVE_ALLOCS.fetch_add(1, Relaxed);
        unsafe { aisle::alloc::Allocator.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Relaxed);
        unsafe { aisle::alloc::Allocator.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        unsafe { aisle::alloc::Allocator.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const GIB: usize = 1 << 30;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Resident set size in bytes, from /proc/self/status.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

/// What one phase measured (printed by the child as one line, read by the parent).
#[derive(Debug, Default)]
struct Figures {
    entries: usize,
    filled: usize,
    evictions: u64,
    before: usize,
    after: usize,
    body: usize,
    header: usize,
    charged: usize,
    /// Live heap bytes requested (growth over the fill) and live allocations (growth).
    heap: usize,
    allocs: usize,
    secs: f64,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "FIGURES {} {} {} {} {} {} {} {} {} {} {}",
            self.entries,
            self.filled,
            self.evictions,
            self.before,
            self.after,
            self.body,
            self.header,
            self.charged,
            self.heap,
            self.allocs,
            self.secs
        )
    }

    fn parse(text: &str) -> Option<Figures> {
        let line = text.lines().find_map(|l| l.strip_prefix("FIGURES "))?;
        let v: Vec<&str> = line.split(' ').collect();
        let n = |i: usize| v.get(i).and_then(|s| s.parse::<usize>().ok());
        Some(Figures {
            entries: n(0)?,
            filled: n(1)?,
            evictions: n(2)? as u64,
            before: n(3)?,
            after: n(4)?,
            body: n(5)?,
            header: n(6)?,
            charged: n(7)?,
            heap: n(8)?,
            allocs: n(9)?,
            secs: v.get(10)?.parse().ok()?,
        })
    }

    fn growth(&self) -> usize {
        self.after.saturating_sub(self.before)
    }
}

/// The header a typical JSON API answer carries (values differ per entry, as they do).
fn header(i: usize, body: usize) -> ResponseHeader {
    let mut h = ResponseHeader::build(200, Some(8)).unwrap();
    let fields = [
        (
            "content-type",
            "application/json; charset=utf-8".to_string(),
        ),
        ("cache-control", "public, max-age=3600".to_string()),
        (
            "etag",
            format!("\"{:016x}\"", (i as u64).wrapping_mul(0x9e37_79b9)),
        ),
        (
            "x-request-id",
            format!("6f1c2a9e-0b7d-4e59-9a43-{:012x}", i as u64),
        ),
        ("date", "Fri, 04 Dec 2026 21:00:00 GMT".to_string()),
        ("vary", "Accept-Encoding".to_string()),
        ("content-length", body.to_string()),
    ];
    for (k, v) in fields {
        h.append_header(k, v).unwrap();
    }
    h
}

/// Header bytes as stored data: every field's name and value.
fn header_bytes(h: &ResponseHeader) -> usize {
    h.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

/// Entry `i` as a rule-matched API answer stores it: its key (a length-prefixed primary key
/// with its BLAKE3 override) and its meta with the entry's facts attached.
fn entry(i: usize, body: usize, rule: &Arc<StoredRule>) -> (CacheKey, CacheMeta) {
    let host = "api.weddings.example";
    let path = format!("/api/v2/vendors/{}/reviews", 100_000 + i);
    // A length-prefixed primary key as `key::primary` writes it (scheme, host, path, rule,
    // three normalized query fields).
    let mut primary = Vec::with_capacity(128);
    for part in [
        "https",
        host,
        &path,
        "vendor-reviews",
        "sort=recent",
        "lang=en",
        "page=1",
    ] {
        primary.extend_from_slice(&(part.len() as u32).to_be_bytes());
        primary.extend_from_slice(part.as_bytes());
    }
    let hash = key::hash(&primary);
    let mut cache_key = CacheKey::new(primary, Priority::Normal.tag());
    cache_key.set_primary_bin_override(hash);
    let now = SystemTime::now();
    let fresh_until = now + Duration::from_secs(3600);
    let mut meta = CacheMeta::new(fresh_until, now, 60, 300, header(i, body));
    let tags = EntryInfo::tags_from(
        vec![
            format!("vendor:{}", 100_000 + i),
            "vendors".into(),
            "city:nyc".into(),
        ],
        &[],
    )
    .unwrap();
    Arc::new(EntryInfo {
        uri: key::uri_id(host, &path),
        names: Names::new(&key::host_path(host, &path), &tags),
        rule: rule.clone(),
        tokens: 0,
    })
    .attach(&mut meta);
    (cache_key, meta)
}

/// Fills `entries` entries of `body` bytes into a tier with a budget of `budget` bytes.
fn fill(entries: usize, body: usize, budget: usize) -> Figures {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![b'x'; body]);
    // One copy for all entries, as a compiled rule's is.
    let rule = StoredRule::of("vendor-reviews", false, None);
    let span = Span::inactive().handle();
    let before = rss();
    let (heap_before, allocs_before) = (LIVE_BYTES.load(Relaxed), LIVE_ALLOCS.load(Relaxed));
    let storage: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(budget)));
    let mut figures = Figures {
        entries,
        before,
        ..Figures::default()
    };
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..entries {
            let (cache_key, meta) = entry(i, body, &rule);
            let mut miss = storage
                .get_miss_handler(&cache_key, &meta, &span)
                .await
                .unwrap();
            miss.write_body(payload.clone(), true).await.unwrap();
            let MissFinishType::Created(_) = miss.finish().await.unwrap() else {
                panic!("a memory fill creates its entry");
            };
            figures.filled += 1;
            figures.header += header_bytes(meta.response_header());
        }
    });
    figures.secs = started.elapsed().as_secs_f64();
    figures.after = rss();
    figures.heap = LIVE_BYTES.load(Relaxed).saturating_sub(heap_before);
    figures.allocs = LIVE_ALLOCS.load(Relaxed).saturating_sub(allocs_before);
    figures.evictions = storage.evictions();
    // Body and header bytes of the entries still held (each entry has the same sizes).
    let held = storage.len();
    figures.header = figures.header / entries.max(1) * held;
    figures.body = body * held;
    figures.charged = storage.bytes();
    figures.entries = held;
    figures
}

/// Runs one phase in a child process and reads its figures.
fn phase(name: &str, entries: usize, body: usize, budget: usize) -> Figures {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("MEMORY_SCALE_PHASE", name)
        .env("MEMORY_SCALE_ENTRIES", entries.to_string())
        .env("MEMORY_SCALE_BODY", body.to_string())
        .env("MEMORY_SCALE_BUDGET", budget.to_string())
        .output()
        .expect("run the phase");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "phase {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Figures::parse(&text).unwrap_or_else(|| panic!("phase {name} printed no figures: {text}"))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    if std::env::var_os("MEMORY_SCALE_PHASE").is_some() {
        let figures = fill(
            env_or("MEMORY_SCALE_ENTRIES", 0),
            env_or("MEMORY_SCALE_BODY", 1024),
            env_or("MEMORY_SCALE_BUDGET", GIB),
        );
        println!("{}", figures.line());
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let entries: usize = env_or(
        "MEMORY_SCALE_ENTRIES",
        if full { 1_000_000 } else { 60_000 },
    );
    // The smoke budget is small enough to evict (60,000 entries take about 140 MiB) and large
    // enough that the allocator's fixed costs (a partly used page per size class, the maps'
    // first tables) do not decide the comparison of charged and real bytes.
    let budget: usize = if full {
        env_or("MEMORY_SCALE_BUDGET", 2 * GIB)
    } else {
        64 << 20
    };

    // Overhead: nothing evicted (a budget of 4 KiB an entry, about three times what one takes,
    // and so a capacity hint of exactly `entries`: see `Segments::for_budget`).
    let o = phase("overhead", entries, 1024, entries * 4096);
    assert_eq!(o.evictions, 0, "the overhead phase must not evict");
    let overhead = (o.growth() as f64 - o.body as f64 - o.header as f64) / o.entries as f64;
    println!(
        "overhead: {} entries of 1 KiB in {:.1}s; RSS {:.1} -> {:.1} MiB (+{:.1} MiB); \
         bodies {:.1} MiB, headers {:.1} MiB ({} B each)",
        o.entries,
        o.secs,
        mib(o.before),
        mib(o.after),
        mib(o.growth()),
        mib(o.body),
        mib(o.header),
        o.header / o.entries.max(1),
    );
    println!(
        "  live heap requested: {:.0} B/entry in {:.1} allocations/entry; RSS growth {:.0} B/entry",
        o.heap as f64 / o.entries as f64,
        o.allocs as f64 / o.entries as f64,
        o.growth() as f64 / o.entries as f64
    );
    println!(
        "  per-entry overhead: {overhead:.0} B (target <= 300); charged {:.1} MiB = {:.0} B/entry, \
         charged/real growth {:.3}",
        mib(o.charged),
        o.charged as f64 / o.entries as f64,
        o.charged as f64 / o.growth() as f64
    );

    // Budget: entries of 1 KiB into `budget`.
    let b = phase("budget", entries, 1024, budget);
    println!(
        "budget {:.0} MiB: {} of {entries} entries held ({} evicted) in {:.1}s; RSS {:.1} MiB \
         (before {:.1}); charged {:.1} MiB; real growth {:.1} MiB",
        mib(budget),
        b.entries,
        b.evictions,
        b.secs,
        mib(b.after),
        mib(b.before),
        mib(b.charged),
        mib(b.growth())
    );
    println!(
        "  RSS/budget {:.3} (target <= 1.15); (RSS-before)/budget {:.3}; charged/budget {:.3}; \
         charged/real growth {:.3} (must be >= 1 at 1M entries)",
        b.after as f64 / budget as f64,
        b.growth() as f64 / budget as f64,
        b.charged as f64 / budget as f64,
        b.charged as f64 / b.growth() as f64
    );

    assert!(b.charged <= budget, "the tier holds more than its budget");
    if !full {
        assert!(b.evictions > 0, "the smoke budget is small enough to evict");
        // At 60,000 entries the allocator's own reservations (a few MiB whatever the tier
        // holds) are several percent of the growth, and the tier charges what it holds, not
        // what mimalloc keeps around it: charged/real growth was 0.94 here and 1.01 at a
        // million entries. So the smoke run checks the bound `cache.memory` documents (the
        // cache's share of RSS at most 1.25x the budget); the full run checks the charge.
        assert!(
            b.growth() <= budget / 4 * 5,
            "the tier grew the process by {} for a budget of {budget}",
            b.growth()
        );
        return;
    }
    assert!(
        b.charged >= b.growth(),
        "uncounted bytes: the tier charges {} but the process grew by {}",
        b.charged,
        b.growth()
    );

    // Under eviction: twice as many as the budget phase (which may evict nothing: 2 GiB holds
    // about 1.4 million), so the tier is full and evicting for the last part of the fill.
    let offered = 2 * entries;
    let e = phase("eviction", offered, 1024, budget);
    println!(
        "eviction at {:.0} MiB: {offered} offered, {} held, {} evicted; RSS/budget {:.3}; \
         charged/real growth {:.3} (must be >= 1)",
        mib(budget),
        e.entries,
        e.evictions,
        e.after as f64 / budget as f64,
        e.charged as f64 / e.growth() as f64
    );
    assert!(
        e.evictions > 0,
        "offered more than the budget holds, nothing was evicted"
    );
    assert!(e.charged <= budget, "the tier holds more than its budget");
    assert!(
        e.charged >= e.growth(),
        "uncounted bytes under eviction: the tier charges {} but the process grew by {}",
        e.charged,
        e.growth()
    );
}
