//! Protection windows' `serve_stale` (issue 14): while a window is on, cached answers are served
//! stale past their own stale-if-error window (up to `serve_stale` more); with the window off the
//! entry's own window rules again, and RFC 9111's prohibitions (`must-revalidate`) always do. The
//! extension survives the Redis tier: an instance that only finds the entry in Redis serves it
//! stale too.

use crate::harness::redis::{wait_plain_entry, RedisServer, SharedRedis};
use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "protection-stale-test-admin-token";

/// Cached a second, stale-if-error for one more second; the window adds an hour.
const RULES: &str = r#"
[[rule]]
name = "vendor"
match = { method = "GET", path = "/ps/:id" }
upstream = "api"
stale_if_error = "1s"
"#;

/// `max-age=1`, and `must-revalidate` under `/ps/mr-*`.
fn origin() -> Origin {
    Origin::start(|req| {
        let cc = if req.path.starts_with("/ps/mr-") {
            "max-age=1, must-revalidate"
        } else {
            "max-age=1"
        };
        OriginResponse::ok(format!("old {} #{}", req.path, req.count)).header("cache-control", cc)
    })
}

fn config(origin: &Origin, extra: &str) -> String {
    format!(
        "{}{extra}\n[admin]\ntoken = \"{TOKEN}\"\n\n[[protection]]\nname = \"event\"\nserve_stale = \"1h\"\n",
        config_for(&origin.url())
    )
}

async fn switch(gw: &Gateway, on: bool) {
    let r = fetch_with_body(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/protection"),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        json!({"name": "event", "on": on}).to_string(),
    )
    .await;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    assert_eq!(r.status, 200, "switching the window: {v}");
}

async fn wait_window(gw: &Gateway, on: bool) {
    let want = if on { 1.0 } else { 0.0 };
    gw.wait_metric(
        "aisle_protection_active",
        &[("name", "event")],
        "the switch",
        |v| v == want,
    )
    .await;
}

/// Polls (fresh connections) until `path` is no longer answered 200 from the cache: the entry's
/// own stale window is over. Every 200 on the way is the stored body.
async fn wait_own_window_over(gw: &Gateway, path: &str, old: &str) -> Resp {
    poll_until(
        Duration::from_secs(15),
        "the own window to pass",
        || async move {
            let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
            if r.status == 200 {
                assert_eq!(r.text(), old, "{}", r.cache_status());
                return None;
            }
            Some(r)
        },
    )
    .await
}

fn assert_extended_stale(r: &Resp, old: &str) {
    let cs = r.cache_status();
    assert_eq!(
        r.status, 200,
        "the window's serve_stale: Cache-Status {cs:?}"
    );
    assert_eq!(r.text(), old);
    for want in ["fwd=stale", "protection=\"event\""] {
        assert!(cs.contains(want), "missing {want} in {cs:?}");
    }
    // The window lengthens both windows: served while revalidating (in the background, which
    // fails) or over the error.
    assert!(
        cs.contains("detail=stale-while-revalidate") || cs.contains("detail=stale-if-error"),
        "{cs:?}"
    );
    assert_eq!(r.header("aisle-stale"), None, "a stored-only field");
}

/// Past the entry's own stale-if-error window, the origin failing: an error with the window off,
/// the stored answer with it on (over an origin 503 and over an unreachable origin), never a
/// `must-revalidate` one.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_serves_stale_past_the_entrys_own_window() {
    let origin = origin();
    let gw = Gateway::start(&config(&origin, ""), &[("r.toml", RULES)]).await;
    let (path, old) = ("/ps/1", "old /ps/1 #1");
    let (mr, mr_old) = ("/ps/mr-1", "old /ps/mr-1 #1");
    let first = gw.get(path).await;
    assert_eq!(first.text(), old);
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    assert_eq!(first.header("aisle-stale"), None, "a stored-only field");
    assert_eq!(gw.get(mr).await.text(), mr_old);

    origin.set_down(true);
    let err = wait_own_window_over(&gw, path, old).await;
    assert!(
        err.status >= 500,
        "window off: {} {:?}",
        err.status,
        err.text()
    );

    switch(&gw, true).await;
    wait_window(&gw, true).await;
    let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
    assert_extended_stale(&r, old);
    // RFC 9111 §4.2.4: must-revalidate is never served stale, window or not.
    let r = wait_own_window_over(&gw, mr, mr_old).await;
    assert!(
        r.status >= 500,
        "must-revalidate: {} {}",
        r.status,
        r.cache_status()
    );

    switch(&gw, false).await;
    wait_window(&gw, false).await;
    let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
    assert!(
        r.status >= 500,
        "window off again: {} {}",
        r.status,
        r.cache_status()
    );

    // An unreachable origin: the same, through the connection-failure paths.
    origin.stop();
    origin.wait_stopped().await;
    let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
    assert!(
        matches!(r.status, 502 | 504),
        "window off, origin gone: {} {}",
        r.status,
        r.cache_status()
    );
    switch(&gw, true).await;
    wait_window(&gw, true).await;
    for _ in 0..2 {
        let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
        assert_extended_stale(&r, old);
    }
}

/// The entry's own windows travel with it through Redis: an instance that finds it only in the
/// Redis tier serves it stale while the (fleet-wide) window is on, and not once it is off.
#[tokio::test(flavor = "multi_thread")]
async fn the_extension_survives_the_redis_tier() {
    let redis = RedisServer::start();
    let origin = origin();
    let config = config(&origin, &format!("\n{}", redis.section("pstale:")));
    let rules = [("r.toml", RULES)];
    let a = Gateway::start(&config, &rules).await;
    let (path, old) = ("/ps/2", "old /ps/2 #1");
    assert_eq!(a.get(path).await.text(), old);
    wait_plain_entry(&redis, "pstale:", old.as_bytes()).await;
    let b = Gateway::start(&config, &rules).await;
    origin.set_down(true);
    // B has never seen the entry: its memory misses, Redis has it.
    let err = wait_own_window_over(&b, path, old).await;
    assert!(
        err.status >= 500,
        "window off: {} {}",
        err.status,
        err.cache_status()
    );
    switch(&a, true).await;
    wait_window(&b, true).await;
    // B's metric and its snapshot are updated by one tick, the metric first: poll briefly.
    let r = poll_until(Duration::from_secs(3), "B serving stale", || async {
        let r = fetch(&client(), "GET", &b.url(path), &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_extended_stale(&r, old);
}
