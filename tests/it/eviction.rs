//! A small memory budget forces evictions; the cache stays within it.

use crate::harness::*;

const BODY_SIZE: usize = 8 * 1024;
const KEYS: usize = 200;
const BUDGET: f64 = 256.0 * 1024.0;

#[tokio::test(flavor = "multi_thread")]
async fn small_cache_evicts_and_stays_within_budget() {
    let origin = Origin::start(|req| {
        let mut body = format!("{} #{} ", req.path, req.count).into_bytes();
        body.resize(BODY_SIZE, b'x');
        OriginResponse::ok(body).header("cache-control", "max-age=600")
    });
    let config = config_with_cache(&origin.url(), "256KiB", "64KiB");
    let gw = Gateway::start(&config, &[]).await;

    for i in 0..KEYS {
        let r = gw.get(&format!("/obj/{i}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), BODY_SIZE);
        let cs = r.cache_status();
        assert!(
            cs.starts_with("aisle; fwd=uri-miss") && cs.contains("stored"),
            "/obj/{i}: expected a stored miss, got {cs:?}"
        );
    }
    assert_eq!(origin.total(), KEYS);

    // Control: the most recent key is still cached.
    let last = format!("/obj/{}", KEYS - 1);
    let r = gw.get(&last).await;
    assert!(
        r.is_hit(),
        "{last}: most recent key should be a hit, got {:?}",
        r.cache_status()
    );
    assert_eq!(origin.count(&last), 1);

    let evictions = gw
        .wait_metric("aisle_cache_evictions_total", &[], "> 0", |v| v > 0.0)
        .await;
    assert!(evictions > 0.0);
    let text = gw.metrics().await;
    let bytes = metric_value(&text, "aisle_cache_bytes", &[])
        .unwrap_or_else(|| panic!("aisle_cache_bytes missing:\n{text}"));
    assert!(
        bytes > 0.0 && bytes <= BUDGET,
        "aisle_cache_bytes = {bytes}, budget {BUDGET}"
    );
    let entries = metric_value(&text, "aisle_cache_entries", &[])
        .unwrap_or_else(|| panic!("aisle_cache_entries missing:\n{text}"));
    assert!(
        entries >= 1.0 && entries < KEYS as f64,
        "aisle_cache_entries = {entries}"
    );

    // The first key was evicted long ago.
    let first = gw.get("/obj/0").await;
    assert_eq!(first.status, 200);
    assert!(
        !first.is_hit(),
        "/obj/0 should have been evicted, got {:?}",
        first.cache_status()
    );
    assert_eq!(origin.count("/obj/0"), 2);
}

/// The pid of the `aisle` process running `gw` (found by its config path: the harness starts
/// each gateway with its own), for its resident set size.
fn gateway_pid(gw: &Gateway) -> u32 {
    let config = gw.config_path().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&config))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no process runs {config}"))
}

/// Resident set size of a process in bytes (`VmRSS` of /proc/<pid>/status).
fn rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024.0
}

/// Sends `n` GETs of `{prefix}{i}` over four concurrent clients, checking each answer.
async fn traffic(gw: &Gateway, prefix: &str, n: usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let next = &next;
    let client = |_| async move {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                return;
            }
            let r = gw.get(&format!("{prefix}{i}")).await;
            assert_eq!((r.status, r.body.len()), (200, 1024), "{prefix}{i}");
        }
    };
    futures_util::future::join_all((0..4).map(client)).await;
}

/// Issue 10 item 3: `cache.memory` bounds the process's memory, not only the metric. With
/// 1 KiB answers the entries used to keep pingora's 4 KiB header read buffer alive: a 4 MiB
/// budget grew the process by about 5.5 times the budget while `aisle_cache_bytes` said 4 MiB.
/// Fills a 4 MiB budget twice over and checks the growth of RSS over an empty-cache base.
#[tokio::test(flavor = "multi_thread")]
async fn the_memory_budget_bounds_the_resident_set() {
    const BUDGET: f64 = 4.0 * 1024.0 * 1024.0;
    let origin = Origin::start(|req| {
        let cc = if req.path.starts_with("/nostore/") {
            "no-store"
        } else {
            "public, max-age=3600"
        };
        OriginResponse::ok(vec![b'x'; 1024]).header("cache-control", cc)
    });
    // mimalloc returns freed pages to the system after a delay (10 ms by default), so how
    // many freed pages RSS still counted at the moment of each reading varied by 3 MiB between
    // runs of one build, as much as the budget is. Returned at once, RSS is what is in use.
    // One worker thread: with several, entries filled on one thread and evicted on another
    // leave each thread's pages partly used, a few MiB that depend on scheduling (2.28x the
    // budget once under the whole suite's load), which is not what this test measures.
    let config = config_with_cache(&origin.url(), "4MiB", "1MiB")
        .replace("[cache]", "threads = 1\n\n[cache]");
    let gw = Gateway::start_with_env(&config, &[], &[("MIMALLOC_PURGE_DELAY", "0")]).await;
    let pid = gateway_pid(&gw);
    // The base: the same kind of traffic with nothing stored (connections, pools, buffers).
    traffic(&gw, "/nostore/", 1000).await;
    let base = rss(pid);
    traffic(&gw, "/fill/", 8192).await;
    let grown = rss(pid) - base;
    let bytes = gw.metric("aisle_cache_bytes", &[]).await.unwrap_or(0.0);
    let entries = gw.metric("aisle_cache_entries", &[]).await.unwrap_or(0.0);
    eprintln!(
        "budget 4 MiB, 1 KiB bodies: aisle_cache_bytes {:.2} MiB, {entries} entries, RSS grew {:.2} MiB ({:.2}x the budget) over a base of {:.1} MiB",
        bytes / 1048576.0,
        grown / 1048576.0,
        grown / BUDGET,
        base / 1048576.0
    );
    // Pingora's LRU evicts each admission back under the limit as seen by that admission, so
    // concurrent fills may leave it over by about one entry each until the next admission.
    assert!(
        bytes <= BUDGET + 4.0 * 8192.0,
        "aisle_cache_bytes {bytes} over the budget"
    );
    // The bound tells a bounded tier from the regression this guards (entries pinning their
    // 4 KiB read buffers: 5.5x). At a 4 MiB budget the allocator's partly used pages are a
    // large share of the growth and vary from run to run: 0.7x to 1.6x measured on the build
    // before issue 16's smaller entries, 1.05x to 1.6x after them (2.28x once under the whole
    // suite's load, with four worker threads), so 1.6x was too close to tell them apart. Stop
    // 33's machine: 1.41x to 1.51x alone, 1.54x to 1.79x beside six busy loops, and 2.60x once
    // under the whole suite in CI; 3x still tells any of these from 5.5x.
    assert!(
        grown <= 3.0 * BUDGET,
        "RSS grew {:.2}x the 4 MiB budget filling it with 1 KiB answers (allowed: 3x)",
        grown / BUDGET
    );
}
