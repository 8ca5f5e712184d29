//! Staleness: stale-while-revalidate, stale-if-error (origin- and
//! rule-driven), expiry refetch and 304 revalidation.

use std::time::Duration;

use crate::harness::fixtures;
use crate::harness::*;

/// How long the origin takes to answer a background refresh.
const REFRESH_DELAY: Duration = Duration::from_millis(1000);

async fn gateway_for(origin: &Origin) -> Gateway {
    Gateway::start(
        &config_for(&origin.url()),
        &[("stale.toml", fixtures::STALE_RULES)],
    )
    .await
}

/// Origin answering `version <n>`; every request after the first is slow.
fn versioned_origin(cache_control: Option<&'static str>) -> Origin {
    Origin::start(move |req| {
        let mut r = OriginResponse::ok(format!("version {}", req.count));
        if let Some(cc) = cache_control {
            r = r.header("cache-control", cc);
        }
        if req.count > 1 {
            r = r.delay(REFRESH_DELAY);
        }
        r
    })
}

fn version_of(r: &Resp) -> u64 {
    r.text()
        .strip_prefix("version ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {:?}", r.text()))
}

async fn exercise_swr(gw: &Gateway, origin: &Origin, path: &str, rule: &str) {
    let first = gw.get(path).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "version 1");

    // Hits until the entry goes stale; the first non-hit must be the old
    // body, served at once while the origin is asked in the background.
    let stale = poll_until(
        Duration::from_secs(10),
        "a stale-while-revalidate response",
        || async move {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200, "Cache-Status {:?}", r.cache_status());
            if r.is_hit() {
                assert_eq!(r.text(), "version 1");
                return None;
            }
            Some(r)
        },
    )
    .await;
    let cs = stale.cache_status();
    assert!(
        cs.contains("fwd=stale") && cs.contains("detail=stale-while-revalidate"),
        "expected a stale-while-revalidate response, got {cs:?} with body {:?}",
        stale.text()
    );
    assert_eq!(stale.text(), "version 1", "SWR must serve the old body");
    assert!(
        stale.elapsed < REFRESH_DELAY * 8 / 10,
        "stale response took {:?}: it waited for the origin",
        stale.elapsed
    );

    // The background refresh reaches the origin...
    poll_until(
        Duration::from_secs(10),
        "the background refresh to reach the origin",
        || async move { (origin.count(path) >= 2).then_some(()) },
    )
    .await;
    // ...and its result is served as a fresh hit.
    let refreshed = poll_until(
        Duration::from_secs(10),
        "a hit carrying the refreshed body",
        || async move {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200, "Cache-Status {:?}", r.cache_status());
            (r.is_hit() && version_of(&r) >= 2).then_some(r)
        },
    )
    .await;
    assert!(version_of(&refreshed) >= 2);

    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", rule), ("cache_status", "stale")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_rule_driven() {
    let origin = versioned_origin(None);
    let gw = gateway_for(&origin).await;
    exercise_swr(&gw, &origin, "/swr/rule", "swr").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_origin_driven() {
    let origin = versioned_origin(Some("max-age=2, stale-while-revalidate=60"));
    let gw = gateway_for(&origin).await;
    exercise_swr(&gw, &origin, "/swr/origin", "_default").await;
}

/// Poll until the gateway serves `old` stale; every response on the way must
/// be a 200 with the old body. Each poll uses a new connection, so that
/// connection reuse (tested separately) cannot interfere.
async fn wait_for_stale(gw: &Gateway, path: &str, old: &str, what: &str) -> Resp {
    poll_until(Duration::from_secs(10), what, || async move {
        let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
        assert_eq!(
            r.status,
            200,
            "expected the stale body, got {} {:?} with Cache-Status {:?}",
            r.status,
            r.text(),
            r.cache_status()
        );
        assert_eq!(r.text(), old);
        (!r.is_hit()).then_some(r)
    })
    .await
}

fn assert_stale_if_error(r: &Resp, old: &str) {
    let cs = r.cache_status();
    assert_eq!(r.status, 200, "Cache-Status {cs:?}");
    assert_eq!(r.text(), old);
    assert!(
        cs.contains("fwd=stale") && cs.contains("detail=stale-if-error"),
        "expected stale-if-error, got {cs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_origin_driven() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("old #{}", req.count))
            .header("cache-control", "max-age=1, stale-if-error=3600")
    });
    let gw = gateway_for(&origin).await;
    let path = "/sie/origin";
    let first = gw.get(path).await;
    assert_eq!(first.text(), "old #1");

    origin.set_down(true);
    let r = wait_for_stale(&gw, path, "old #1", "stale served over an origin 503").await;
    assert_stale_if_error(&r, "old #1");
    assert!(
        r.cache_status().contains("fwd-status=503"),
        "Cache-Status {:?}",
        r.cache_status()
    );
    assert!(origin.count(path) >= 2, "the origin must have been tried");

    origin.stop();
    origin.wait_stopped().await;
    for _ in 0..3 {
        let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
        assert_stale_if_error(&r, "old #1");
        assert!(
            !r.cache_status().contains("fwd-status"),
            "an unreachable origin has no status: {:?}",
            r.cache_status()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_rule_driven_origin_unreachable() {
    let origin = Origin::start(|req| OriginResponse::ok(format!("old #{}", req.count)));
    let gw = gateway_for(&origin).await;
    let path = "/sie/rule";
    let first = gw.get(path).await;
    assert_eq!(first.text(), "old #1");
    assert!(first.cache_status().contains("stored"));

    origin.stop();
    origin.wait_stopped().await;
    let r = wait_for_stale(&gw, path, "old #1", "stale served with the origin gone").await;
    assert_stale_if_error(&r, "old #1");
    assert!(
        !r.cache_status().contains("fwd-status"),
        "Cache-Status {:?}",
        r.cache_status()
    );
}

/// A stale-if-error response that advertises keep-alive must leave the
/// client connection usable for the next request.
#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_response_keeps_connection_reusable() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("old #{}", req.count))
            .header("cache-control", "max-age=1, stale-if-error=3600")
    });
    let gw = gateway_for(&origin).await;
    let path = "/sie/keepalive";
    assert_eq!(gw.get(path).await.text(), "old #1");
    origin.stop();
    origin.wait_stopped().await;
    let r = wait_for_stale(&gw, path, "old #1", "stale served with the origin gone").await;
    assert_stale_if_error(&r, "old #1");

    let addr = gw.listen();
    let host = addr.to_string();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(addr).expect("connect to the gateway");
        let first = conn.get(&host, path);
        let second = conn.get(&host, path);
        (first, second)
    })
    .await
    .expect("raw client task");
    let first = first.expect("first request on a new connection");
    assert_eq!(first.status, 200);
    assert_eq!(first.body, b"old #1");
    assert!(
        first
            .header("cache-status")
            .is_some_and(|cs| cs.contains("detail=stale-if-error")),
        "{first:?}"
    );
    let closing = first
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("close"));
    if !closing {
        let second = second.unwrap_or_else(|e| {
            panic!(
                "the stale-if-error response said `Connection: {}` but the next request on \
                 that connection failed: {e}",
                first.header("connection").unwrap_or("(none)")
            )
        });
        assert_eq!(second.status, 200);
        assert_eq!(second.body, b"old #1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_rule_driven_origin_503() {
    let origin = Origin::start(|req| OriginResponse::ok(format!("old #{}", req.count)));
    let gw = gateway_for(&origin).await;
    let path = "/sie/rule";
    let first = gw.get(path).await;
    assert_eq!(first.text(), "old #1");

    origin.set_down(true);
    let r = wait_for_stale(&gw, path, "old #1", "stale served over an origin 503").await;
    assert_stale_if_error(&r, "old #1");
    assert!(
        r.cache_status().contains("fwd-status=503"),
        "Cache-Status {:?}",
        r.cache_status()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_entry_is_refetched() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("version {}", req.count)).header("cache-control", "max-age=1")
    });
    let gw = gateway_for(&origin).await;
    let path = "/expiring";
    assert_eq!(gw.get(path).await.text(), "version 1");
    let gw = &gw;
    let r = poll_until(
        Duration::from_secs(10),
        "the entry to expire",
        || async move {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200);
            (!r.is_hit()).then_some(r)
        },
    )
    .await;
    let cs = r.cache_status();
    assert!(
        cs.contains("fwd=stale") && cs.contains("fwd-status=200"),
        "expected an expired refetch, got {cs:?}"
    );
    assert_eq!(r.text(), "version 2");
    assert_eq!(origin.count(path), 2);
    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", "_default"), ("cache_status", "expired")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_entry_is_revalidated_with_304() {
    let origin = Origin::start(|req| {
        if req.header("if-none-match").as_deref() == Some("\"v1\"") {
            OriginResponse::with_status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=1")
        } else {
            OriginResponse::ok(format!("payload #{}", req.count))
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=1")
        }
    });
    let gw = gateway_for(&origin).await;
    let path = "/revalidated";
    assert_eq!(gw.get(path).await.text(), "payload #1");
    let gw = &gw;
    let r = poll_until(
        Duration::from_secs(10),
        "the entry to expire",
        || async move {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200);
            (!r.is_hit()).then_some(r)
        },
    )
    .await;
    let cs = r.cache_status();
    assert!(
        cs.contains("fwd=stale") && cs.contains("fwd-status=304"),
        "expected a 304 revalidation, got {cs:?}"
    );
    assert_eq!(r.text(), "payload #1", "the cached body must be reused");
    let upstream = origin.requests_for(path);
    assert_eq!(upstream.len(), 2);
    assert_eq!(
        upstream[1].header("if-none-match").as_deref(),
        Some("\"v1\""),
        "revalidation must be conditional"
    );
    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", "_default"), ("cache_status", "revalidated")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
}
