//! Refresh-ahead (issue 15): a fresh hit past the rule's `refresh_ahead` point answers from the
//! cache at once (`Cache-Status: aisle; hit; ...; detail=refresh-ahead`) and starts one
//! background refresh, whatever the number of hits past the point and the number of gateways
//! sharing the Redis tier; the refreshed entry then replaces the old one (a small `Age`), and
//! `aisle_refresh_ahead_total{rule,result}` counts it.
//!
//! Entries live 2 s with `refresh_ahead = 0.5`; the origin answers a refresh (every request but
//! the first) after 600 ms, so an answer that came faster did not wait for it. Waiting for an
//! entry to age past its point is a poll of the clock with a deadline: polling the gateway
//! would itself start the refresh.

use crate::harness::redis::{RedisServer, SharedRedis};
use crate::harness::*;
use std::time::{Duration, Instant};

const RULES: &str = r#"
[[rule]]
name = "ahead"
match = { method = "GET", path = "/ra/:id" }
upstream = "api"
vary = ["path.id"]
ttl = "2s"
refresh_ahead = 0.5
"#;

/// The origin's delay for a refresh: hits that come back faster did not wait for it.
const REFRESH_DELAY: Duration = Duration::from_millis(600);

/// Answers `<path> #<n>`, the first request at once and later ones after [`REFRESH_DELAY`].
fn origin() -> Origin {
    Origin::start(|req| {
        let resp = OriginResponse::ok(format!("{} #{}", req.path, req.count));
        if req.count > 1 {
            resp.delay(REFRESH_DELAY)
        } else {
            resp
        }
    })
}

/// Waits (polling the clock, bounded) until `since + after`.
async fn wait_until(since: Instant, after: Duration) {
    poll_until(Duration::from_secs(5), "the entry to age", || async move {
        (since.elapsed() >= after).then_some(())
    })
    .await;
}

/// `aisle_refresh_ahead_total{rule="ahead",result}` on `gw` (0 when absent).
async fn refreshes(gw: &Gateway, result: &str) -> f64 {
    gw.metric(
        "aisle_refresh_ahead_total",
        &[("rule", "ahead"), ("result", result)],
    )
    .await
    .unwrap_or(0.0)
}

/// 20 concurrent hits past the point: all answered from the cache before the origin's delay,
/// one refresh at the origin, and the next hit is on the refreshed entry.
#[tokio::test(flavor = "multi_thread")]
async fn hits_past_the_point_answer_at_once_and_refresh_once() {
    let origin = origin();
    let gw = Gateway::start(&config_for(&origin.url()), &[("r.toml", RULES)]).await;
    let first = gw.get("/ra/a").await;
    assert_stored_miss(&first, "first request");
    let stored = Instant::now();
    let early = gw.get("/ra/a").await;
    assert_hit(&early, "before the point");
    assert!(
        !early.cache_status().contains("refresh-ahead"),
        "{}",
        early.cache_status()
    );
    wait_until(stored, Duration::from_millis(1100)).await;
    let hits = futures_util::future::join_all((0..20).map(|_| gw.get("/ra/a"))).await;
    for (i, r) in hits.iter().enumerate() {
        assert_hit(r, &format!("hit {i} past the point"));
        assert_eq!(r.text(), "/ra/a #1", "hit {i}: the stored answer");
        assert!(
            r.cache_status().contains("detail=refresh-ahead"),
            "hit {i}: {}",
            r.cache_status()
        );
        assert!(
            !r.cache_status().contains("fwd=stale"),
            "{}",
            r.cache_status()
        );
        assert!(
            r.elapsed < REFRESH_DELAY,
            "hit {i} took {:?}: it waited for the refresh",
            r.elapsed
        );
    }
    let slowest = hits.iter().map(|r| r.elapsed).max().unwrap();
    println!("20 hits past the refresh point answered within {slowest:?} (the refresh takes {REFRESH_DELAY:?})");
    gw.wait_metric(
        "aisle_refresh_ahead_total",
        &[("rule", "ahead"), ("result", "refreshed")],
        "one refresh",
        |v| v >= 1.0,
    )
    .await;
    let after = gw.get("/ra/a").await;
    assert_hit(&after, "after the refresh");
    assert_eq!(
        after.text(),
        "/ra/a #2",
        "the refreshed entry replaced the old one"
    );
    assert_eq!(
        after.age().unwrap_or(0),
        0,
        "a fresh entry's Age: {:?}",
        after.headers
    );
    assert!(
        !after.cache_status().contains("refresh-ahead"),
        "the new entry is before its point: {}",
        after.cache_status()
    );
    assert_eq!(origin.count("/ra/a"), 2, "one refresh at the origin");
    assert_eq!(refreshes(&gw, "started").await, 1.0);
    assert_eq!(refreshes(&gw, "refreshed").await, 1.0);
    assert_eq!(refreshes(&gw, "failed").await, 0.0);
    assert_eq!(
        refreshes(&gw, "coalesced").await,
        19.0,
        "the other 19 hits found the refresh under way"
    );
    // A refresh is not a client request: the rule's requests are the 24 answered above.
    let answered = gw
        .metric("aisle_requests_total", &[("rule", "ahead")])
        .await
        .unwrap_or(0.0);
    assert_eq!(answered, 23.0);
}

/// Two gateways on one Redis, both holding the entry: hits past the point on both start one
/// refresh each in-process, and the fleet claim lets one of them reach the origin.
#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_on_one_redis_refresh_once() {
    let redis = RedisServer::start();
    let origin = origin();
    let cfg = format!(
        "{}{}",
        config_for(&origin.url()),
        redis.section("ahead-fleet:")
    );
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(Gateway::start(&cfg, &rules), Gateway::start(&cfg, &rules));
    assert_stored_miss(&a.get("/ra/f").await, "filled on A");
    let stored = Instant::now();
    // B reads it from Redis into its memory tier (the same stored version).
    let on_b = poll_until(Duration::from_secs(5), "B to find A's entry", || async {
        let r = b.get("/ra/f").await;
        r.is_hit().then_some(r)
    })
    .await;
    assert_eq!(on_b.text(), "/ra/f #1");
    wait_until(stored, Duration::from_millis(1100)).await;
    let (on_a, on_b) = tokio::join!(
        futures_util::future::join_all((0..10).map(|_| a.get("/ra/f"))),
        futures_util::future::join_all((0..10).map(|_| b.get("/ra/f")))
    );
    for r in on_a.iter().chain(&on_b) {
        assert_hit(r, "past the point");
        assert!(r.elapsed < REFRESH_DELAY, "waited {:?}", r.elapsed);
    }
    poll_until(
        Duration::from_secs(10),
        "one refresh in the fleet",
        || async {
            let done = refreshes(&a, "refreshed").await + refreshes(&b, "refreshed").await;
            (done >= 1.0).then_some(())
        },
    )
    .await;
    let started = (
        refreshes(&a, "started").await,
        refreshes(&b, "started").await,
    );
    assert_eq!(started, (1.0, 1.0), "each instance started one refresh");
    // The instance that lost the claim ends its refresh as coalesced: wait for both to end.
    poll_until(Duration::from_secs(10), "both refreshes to end", || async {
        let ended = refreshes(&a, "refreshed").await
            + refreshes(&b, "refreshed").await
            + refreshes(&a, "failed").await
            + refreshes(&b, "failed").await;
        let coalesced = refreshes(&a, "coalesced").await + refreshes(&b, "coalesced").await;
        // 9 in-process coalesced hits on each, plus the claim the loser did not get.
        (ended == 1.0 && coalesced >= 19.0).then_some(())
    })
    .await;
    assert_eq!(
        origin.count("/ra/f"),
        2,
        "one refresh between the two gateways"
    );
    for (name, gw) in [("A", &a), ("B", &b)] {
        let r = poll_until(Duration::from_secs(5), "the refreshed entry", || async {
            let r = gw.get("/ra/f").await;
            (r.text() == "/ra/f #2").then_some(r)
        })
        .await;
        assert_hit(&r, &format!("{name} after the refresh"));
    }
    assert_eq!(origin.count("/ra/f"), 2);
}

/// A refresh is background work: with the upstream's quota down to the share kept for clients,
/// the refresh is skipped (counted `quota`), the origin sees nothing, and hits go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_yields_to_the_quota() {
    let origin = origin();
    // Burst 2: the fill takes one, and background work keeps burst / 2 = 1 for clients.
    let cfg = format!(
        "{}quota = {{ requests = 2, per = \"1h\" }}\n",
        config_for(&origin.url())
    );
    let gw = Gateway::start(&cfg, &[("r.toml", RULES)]).await;
    assert_stored_miss(&gw.get("/ra/q").await, "first request");
    let stored = Instant::now();
    wait_until(stored, Duration::from_millis(1100)).await;
    let r = gw.get("/ra/q").await;
    assert_hit(&r, "past the point");
    assert!(r.cache_status().contains("detail=refresh-ahead"));
    gw.wait_metric(
        "aisle_refresh_ahead_total",
        &[("rule", "ahead"), ("result", "quota")],
        "the refresh skipped for the quota",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(refreshes(&gw, "refreshed").await, 0.0);
    assert_eq!(refreshes(&gw, "failed").await, 0.0);
    assert_eq!(
        origin.count("/ra/q"),
        1,
        "the refresh never reached the origin"
    );
    assert_hit(&gw.get("/ra/q").await, "still answered from the entry");
}
