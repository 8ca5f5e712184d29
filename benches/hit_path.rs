//! What a fresh memory hit costs Aisle, in allocations and time (issue 16).
//!
//! `cargo bench --bench hit_path` runs the decisions the fresh-hit path makes for one request
//! (`aisle::proxy::fresh_hit`: route, admission, eligibility, the key's hash, the memory
//! lookup, freshness, purge epochs, refresh-ahead) against a memory tier holding the entry,
//! under a global allocator that counts allocations on the calling thread. It prints, per
//! case, the allocations of those decisions (target: 0) and of the answer's head handed to
//! pingora's HTTP/1 writer (`fresh_hit::http1_head`: the header it decides by, which its write
//! takes by value, and the field lines with `Age` and `Cache-Status`), and the time per
//! decision.
//!
//! Cases: the default route and the plain rule of `benches/compare-rules/` (what `compare.sh`
//! requests; their decisions must allocate nothing), and a realistic rule (path parameter,
//! three normalized query fields, tags) as in `benches/compare-rules-on/`, whose request spells
//! three of its keyed values otherwise than the key does (an escape, a capital, a number to
//! bucket: at most one buffer each; the trim and the lookup table borrow); each with no purge
//! epochs and with unrelated purges recorded (the epoch check then runs).
//!
//! Run by `cargo test --benches` it checks the counts only (a few iterations): an allocation
//! added to the decisions fails it. It first checks vendored pingora-http's patch 4 the same
//! way: the fields a gateway adds to pingora's copy of a request for the upstream cost no more
//! allocations than adding them to the parsed request (no map of the copy grows), and patch 5:
//! added with their static spellings, they allocate nothing.

use aisle::admission::{self, Admission, KeyParts};
use aisle::proxy::cache_status::{self, Lookup, Observed, Phase};
use aisle::proxy::fresh_hit;
use aisle::rules::{compile, Context, RuleSet};
use aisle::storage::epochs::Epochs;
use aisle::storage::memory::MemoryStorage;
use aisle::storage::{EntryInfo, Names};
use aisle::trust::Client;
use bytes::Bytes;
use pingora::cache::CacheMeta;
use pingora::http::{RequestHeader, ResponseHeader};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Counts allocations made on the current thread (the thread-local is const-initialised, so
/// reading it never allocates).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// The rule of `benches/compare-rules/`: path and one query field, as they are.
const PLAIN: &str = r#"
[[rule]]
name = "bench"
match = { method = "GET", path = "/bench/*" }
vary = ["query.v"]
"#;

/// A realistic rule, modelled on `benches/compare-rules-on/`'s `vendor-search` but matched on this
/// bench's path (a path parameter, three normalized query fields, tags).
const RULES: &str = r#"
[tables.market]
map = { "new york" = "nyc", brooklyn = "nyc", manhattan = "nyc" }
fallback = "state"

[[rule]]
name = "vendor-search"
match = { method = "GET", path = "/bench/:size/:id" }
vary = ["path.id", "query.location", "query.type", "query.budget"]
normalize = { "query.location" = ["trim", "market"], "query.type" = "lowercase", "query.budget" = "bucket:1000" }
tags = ["vendor:{path.id}", "size:{path.size}"]
"#;

fn rules(text: &str) -> RuleSet {
    let ups = vec!["origin".to_string()];
    let ctx = Context::with_upstreams(&ups);
    compile(&[(Path::new("bench.toml"), text)], &ctx).expect("bench rules compile")
}

fn request(target: &str) -> RequestHeader {
    let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
    req.insert_header("host", "127.0.0.1").unwrap();
    req.insert_header("user-agent", "wrk").unwrap();
    req
}

/// The stored answer: the headers a typical API answer has, a 1 KiB body.
fn stored_answer() -> (ResponseHeader, Bytes) {
    let mut h = ResponseHeader::build(200, None).unwrap();
    for (k, v) in [
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("cache-control", "public, max-age=3600"),
        ("date", "Sat, 05 Dec 2026 12:00:00 GMT"),
        ("etag", "\"5f2a-1024\""),
        ("last-modified", "Sat, 05 Dec 2026 11:00:00 GMT"),
    ] {
        h.insert_header(k, v).unwrap();
    }
    (h, Bytes::from(vec![b'a'; 1024]))
}

struct Case {
    name: &'static str,
    rules: RuleSet,
    req: RequestHeader,
    /// The most the decisions may allocate: nothing for keys read as they are; one buffer for
    /// each keyed value the request spells otherwise than the key does (decoded, recased,
    /// bucketed). Trimming and a lookup table's hit borrow.
    allocations: f64,
}

struct Figures {
    decide_allocs: f64,
    head_allocs: f64,
    ns: f64,
}

/// Runs `f` `n` times: allocations per run, nanoseconds per run, and the last result (kept
/// from the optimiser with `black_box`; dropping the others is counted with them).
fn measure<T>(n: u32, mut f: impl FnMut() -> T) -> (f64, f64, T) {
    let before = allocations();
    let start = Instant::now();
    let mut last = black_box(f());
    for _ in 1..n {
        last = black_box(f());
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    ((allocations() - before) as f64 / f64::from(n), ns, last)
}

/// Stores the case's entry, then runs the fresh-hit decisions `n` times.
fn run(case: &Case, epochs: &Epochs, n: u32) -> Figures {
    let memory = MemoryStorage::new(64 << 20);
    let req = &case.req;
    let host = "127.0.0.1";
    let path = req.uri.path();
    let parts = KeyParts {
        method: &req.method,
        host,
        path,
        query: req.uri.query(),
        headers: &req.headers,
        body: None,
    };
    // What the fresh-hit path decides before its lookup: the route, then the admission (its
    // keyability check is made with the key hash, in `fresh_hit::find`, as the proxy makes it).
    let admit = || {
        let route = admission::route(&case.rules, &req.method, host, path).expect("a route");
        let admitted = admission::admit(
            &route.rule,
            &req.method,
            &req.headers,
            Ok(()),
            Client::default(),
        );
        (route, admitted)
    };
    let (route, admitted) = admit();
    let Admission::Cache(terms) = &admitted else {
        panic!("{}: not admitted: {admitted:?}", case.name);
    };
    let (header, body) = stored_answer();
    let now = SystemTime::now();
    let meta = CacheMeta::new(now + Duration::from_secs(3600), now, 0, 0, header);
    let key = admission::cache_key(&route, terms, &parts);
    let info = EntryInfo {
        uri: route.uri,
        names: Names::new(
            &aisle::key::host_path(host, path),
            &["vendor:k17", "size:1k"],
        ),
        rule: route.rule.stored.clone(),
        ..EntryInfo::default()
    };
    memory.promote(&key, &meta, body, Arc::new(info));

    let decide = || {
        let (route, admitted) = admit();
        let (terms, head) = fresh_hit::eligible(req, &route.rule, &admitted).expect("eligible");
        fresh_hit::find(
            &memory,
            epochs,
            &route,
            terms,
            &parts,
            head,
            SystemTime::now(),
        )
    };
    // Once outside the count: lazily initialised statics (metrics, tables) are not per hit.
    let hit = decide().expect("a fresh hit");
    drop(hit);

    let (decide_allocs, ns, last) = measure(n, decide);
    let hit = last.expect("a fresh hit");
    let (head_allocs, _, _) = measure(n, || {
        let (status, _) = cache_status::decide(&Observed {
            phase: Some(Phase::Hit),
            lookup: Lookup::Fresh,
            ttl: Some(hit.ttl),
            ..Observed::default()
        });
        // As an HTTP/1 answer is handed to pingora's writer (`write_response_header_fields`).
        let (resp, lines) =
            fresh_hit::http1_head(req, &hit.stored, hit.age, &status.to_header_value());
        (Box::new(resp), lines)
    });
    Figures {
        decide_allocs,
        head_allocs,
        ns,
    }
}

/// A request as pingora's HTTP/1 reader builds it (a hint of the fields it parsed, names as
/// the client spelled them).
fn parsed_request() -> RequestHeader {
    let fields = [
        ("Host", "127.0.0.1:17480"),
        ("User-Agent", "wrk"),
        ("Accept", "*/*"),
    ];
    let mut req = RequestHeader::build("GET", b"/pass/k1", Some(fields.len())).unwrap();
    for (name, value) in fields {
        req.append_header(name, value).unwrap();
    }
    req
}

/// The fields a gateway adds upstream (the four forwarding fields and four more: vendored
/// pingora-http's headroom is eight), as it spells them.
const PROXY_FIELDS: [(&str, &str); 8] = [
    ("x-forwarded-for", "X-Forwarded-For"),
    ("x-forwarded-proto", "X-Forwarded-Proto"),
    ("x-forwarded-host", "X-Forwarded-Host"),
    ("forwarded", "Forwarded"),
    ("via", "Via"),
    ("x-request-id", "X-Request-Id"),
    ("traceparent", "Traceparent"),
    ("x-vendor-key", "X-Vendor-Key"),
];

/// Allocations made adding [`PROXY_FIELDS`] to `req`, by name alone or (`spelled`) with their
/// static spelling (pingora-http patch 5).
fn proxy_fields_allocs(req: &mut RequestHeader, spelled: bool) -> u64 {
    let before = allocations();
    for (name, spelling) in PROXY_FIELDS {
        let name = http::HeaderName::from_static(name);
        let value = http::HeaderValue::from_static("v");
        if spelled {
            req.insert_header((name, spelling), value).unwrap();
        } else {
            req.insert_header(name, value).unwrap();
        }
    }
    allocations() - before
}

fn main() {
    // Vendored pingora-http patch 4: pingora clones the client's request for the upstream; the
    // copy takes the gateway's fields with no more allocations than the parsed request itself
    // (each custom name's spelling), where a copy of exactly its fields grew both its maps.
    let (parsed, cloned) = (
        proxy_fields_allocs(&mut parsed_request(), false),
        proxy_fields_allocs(&mut parsed_request().clone(), false),
    );
    println!(
        "a proxied request's added fields: {parsed} allocations into the parsed request, {cloned} into pingora's copy of it"
    );
    assert_eq!(
        cloned, parsed,
        "the upstream copy of a request grew its maps (vendor/pingora-http PATCHES.md, patch 4)"
    );
    // Patch 5: with their static spellings (as `proxy::forwarding` sets its fields), the names
    // are not copied: nothing is allocated.
    let spelled = proxy_fields_allocs(&mut parsed_request().clone(), true);
    println!("the same fields with static spellings: {spelled} allocations");
    assert_eq!(
        spelled, 0,
        "a field's static spelling was copied (vendor/pingora-http PATCHES.md, patch 5)"
    );
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 1_000_000 } else { 100 };
    let cases = [
        Case {
            name: "default route",
            rules: rules(""),
            req: request("/bench/1k/k17?v=1"),
            allocations: 0.0,
        },
        Case {
            name: "plain rule",
            rules: rules(PLAIN),
            req: request("/bench/1k/k17?v=1"),
            allocations: 0.0,
        },
        Case {
            name: "rules on",
            // `%20Brooklyn` decoded (then trimmed, and found in the market table),
            // `Photographer` lowercased, `5400` bucketed.
            allocations: 3.0,
            rules: rules(RULES),
            req: request(
                "/bench/1k/k17?location=%20Brooklyn&type=Photographer&budget=5400&utm_source=mail",
            ),
        },
    ];
    let purged = Epochs::default();
    let past = aisle::storage::epochs::Epoch {
        at_ms: aisle::clock::now_ms() - 60_000,
        soft: false,
    };
    purged.purge_tag("vendor:other", past);
    purged.purge_prefix("example.com/other/", past);
    println!("fresh memory hit, per request ({n} iterations):");
    println!(
        "{:<16} {:<14} {:>16} {:>18} {:>12}",
        "case", "epochs", "decision allocs", "head allocs", "decision ns"
    );
    let mut over = Vec::new();
    for case in &cases {
        for (label, epochs) in [("none", &Epochs::default()), ("unrelated", &purged)] {
            let f = run(case, epochs, n);
            println!(
                "{:<16} {:<14} {:>16.2} {:>18.2} {:>12.0}",
                case.name, label, f.decide_allocs, f.head_allocs, f.ns
            );
            if f.decide_allocs > case.allocations {
                over.push(format!(
                    "{} ({label} epochs): {} allocations, at most {}",
                    case.name, f.decide_allocs, case.allocations
                ));
            }
        }
    }
    assert!(
        over.is_empty(),
        "the fresh-hit decisions allocated more than their bound (see the table above): {}",
        over.join("; ")
    );
}
