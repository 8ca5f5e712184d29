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
