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

/// Rules for `stale_after`: stored for 1 s, then servable stale for an hour if the origin fails.
const STALE_AFTER_RULES: &str = r#"
[[rule]]
name = "stale-after"
match = { method = "GET", path = "/sa/*" }
upstream = "api"
ttl = "1s"
stale_if_error = "1h"
"#;

/// An origin that answers the first request for each path at once and hangs on every later
/// one (accepts, reads the request, never answers): a hung origin.
fn hangs_after_first() -> Origin {
    Origin::start(|req| {
        let r = OriginResponse::ok(format!("old #{}", req.count));
        if req.count > 1 {
            r.delay(Duration::from_secs(3600))
        } else {
            r
        }
    })
}

/// A gateway whose upstream has `read_timeout = 10s` and `stale_after = 500ms`.
async fn stale_after_gateway(origin: &Origin) -> Gateway {
    let cfg = config_for(&origin.url()).replace(
        "read_timeout = \"10s\"",
        "read_timeout = \"10s\"\nstale_after = \"500ms\"",
    );
    Gateway::start(&cfg, &[("rules.toml", STALE_AFTER_RULES)]).await
}

/// Polls (new connection each time) until the stored entry is no longer a fresh hit, and
/// returns that first non-hit answer.
async fn first_non_hit(gw: &Gateway, path: &str) -> Resp {
    poll_until(
        Duration::from_secs(20),
        "the entry to go stale",
        || async move {
            let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
            (!r.is_hit()).then_some(r)
        },
    )
    .await
}

fn assert_stale_after(r: &Resp, what: &str) {
    let cs = r.cache_status();
    assert_eq!(r.status, 200, "{what}: Cache-Status {cs:?}");
    assert_eq!(r.text(), "old #1", "{what}");
    assert!(
        cs.contains("fwd=stale") && cs.contains("detail=stale-after"),
        "{what}: expected a stale-after answer, got {cs:?}"
    );
}

/// Issue 10 item 7: with the origin accepting and never answering, a stale entry is served once
/// the origin has had `stale_after` (500 ms) to answer, not after `read_timeout` (10 s; before
/// the fix stale-if-error came only then), and while the fill goes on in the background
/// further requests get the stale entry at once rather than each waiting.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_origin_is_answered_stale_after_stale_after() {
    let origin = hangs_after_first();
    let gw = stale_after_gateway(&origin).await;
    let path = "/sa/hung";
    assert_eq!(gw.get(path).await.text(), "old #1");

    let r = first_non_hit(&gw, path).await;
    println!(
        "hung origin, read_timeout 10 s, stale_after 500 ms: first stale answer after {:.2?} ({:?})",
        r.elapsed,
        r.cache_status()
    );
    assert_stale_after(&r, "the request that found the entry stale");
    assert!(
        r.elapsed < Duration::from_secs(3),
        "answered after {:?}: stale_after is 500 ms, read_timeout 10 s",
        r.elapsed
    );

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = gw.url(path);
        set.spawn(async move { fetch(&client(), "GET", &url, &[]).await });
    }
    let mut slowest = Duration::ZERO;
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        assert_stale_after(&r, "a request while the background fill runs");
        slowest = slowest.max(r.elapsed);
    }
    println!("8 more requests during the background fill: slowest {slowest:.2?}");
    assert!(
        slowest < Duration::from_secs(2),
        "requests during the background fill must not wait for it: slowest {slowest:?}"
    );
    // The first fill, the request cut at stale_after, and the one background fill.
    let count = origin.count(path);
    assert!(
        count <= 3,
        "one background fill, not one origin request per client: {count}"
    );
    gw.wait_metric("aisle_stale_after_total", &[], ">= 9", |v| v >= 9.0)
        .await;
}

/// `n` requests for `path` on ONE keep-alive connection to the gateway (blocking client, in
/// `spawn_blocking`); each answer, or why the connection could not carry it.
async fn on_one_connection(
    gw: &Gateway,
    path: &'static str,
    n: usize,
) -> Vec<Result<RawResp, String>> {
    let addr = gw.listen();
    let host = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(addr).expect("connect to the gateway");
        let mut out = Vec::new();
        for i in 0..n {
            let r = conn
                .get(&host, path)
                .map_err(|e| format!("request {i}: {e}"));
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    })
    .await
    .expect("raw client task")
}

/// Issue 10 item 7: stale answers given because the origin hung keep the client connection. On
/// ONE keep-alive connection: hits until the entry goes stale, the request that waits out
/// `stale_after`, then requests during the background fill; 20 in all, every one answered.
#[tokio::test(flavor = "multi_thread")]
async fn stale_after_answers_keep_the_client_connection() {
    let origin = hangs_after_first();
    let gw = stale_after_gateway(&origin).await;
    let path = "/sa/keepalive";
    assert_eq!(gw.get(path).await.text(), "old #1");
    // The request that waits out stale_after meets pingora's upstream error path, which cannot
    // keep its connection: it must say so (`Connection: close`) rather than reset the next one.
    let first = first_non_hit(&gw, path).await;
    assert_stale_after(&first, "the request that found the entry stale");
    let connection = first.header("connection").unwrap_or_default();
    assert!(
        connection.eq_ignore_ascii_case("close"),
        "Connection: {connection:?}"
    );

    let answers = on_one_connection(&gw, path, 20).await;
    assert_all_stale(
        "hung origin, stale_after",
        &answers,
        b"old #1",
        &["detail=stale-after"],
    );
}

/// Every one of `answers` (requests on one keep-alive connection) arrived: 200, the stale
/// `body`, and a `Cache-Status` containing each of `says`.
fn assert_all_stale(what: &str, answers: &[Result<RawResp, String>], body: &[u8], says: &[&str]) {
    let answered = answers.iter().filter(|a| a.is_ok()).count();
    let n = answers.len();
    println!("{what}, one keep-alive connection: {answered}/{n} answered");
    for a in answers {
        let a = a
            .as_ref()
            .unwrap_or_else(|e| panic!("the connection must carry all {n} requests: {e}"));
        assert_eq!(a.status, 200);
        assert_eq!(a.body, body);
        let cs = a.header("cache-status").unwrap_or_default();
        assert!(says.iter().all(|s| cs.contains(s)), "{cs:?}");
    }
    assert_eq!(answered, n);
}

/// Issue 10 item 7: with the upstream refusing connections, stale-if-error answers keep the
/// client connection. Before the fix pingora closed it after every refused upstream connection
/// (2,968 new client connections in 10 s); now, once the gateway has seen the upstream refuse,
/// 20 requests on ONE keep-alive connection are all answered from the stale entry.
#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_over_a_refused_upstream_keeps_the_client_connection() {
    let origin = Origin::start(|req| OriginResponse::ok(format!("old #{}", req.count)));
    let gw = Gateway::start(
        &config_for(&origin.url()),
        &[("rules.toml", STALE_AFTER_RULES)],
    )
    .await;
    let path = "/sa/refused";
    assert_eq!(gw.get(path).await.text(), "old #1");
    origin.stop();
    origin.wait_stopped().await;
    let r = wait_for_stale(&gw, path, "old #1", "stale served with the origin refusing").await;
    assert_stale_if_error(&r, "old #1");

    let answers = on_one_connection(&gw, path, 20).await;
    assert_all_stale(
        "refused upstream, stale-if-error",
        &answers,
        b"old #1",
        &["fwd=stale", "detail=stale-if-error"],
    );
}

/// `stale_after` on a slow but live origin: the client is answered stale at `stale_after`, and
/// the fill goes on in the background until the origin answers, so the entry is refreshed
/// (the origin is not asked once per request, and the slow answer is not thrown away).
#[tokio::test(flavor = "multi_thread")]
async fn stale_after_lets_a_slow_fill_finish_in_the_background() {
    let origin = Origin::start(|req| {
        let r = OriginResponse::ok(format!("v{}", req.count));
        if req.count > 1 {
            r.delay(Duration::from_millis(1500))
        } else {
            r
        }
    });
    let gw = stale_after_gateway(&origin).await;
    let path = "/sa/slow";
    assert_eq!(gw.get(path).await.text(), "v1");
    let first = first_non_hit(&gw, path).await;
    assert_eq!(first.text(), "v1", "{:?}", first.cache_status());
    assert!(first.cache_status().contains("detail=stale-after"));
    let gw = &gw;
    let fresh = poll_until(
        Duration::from_secs(10),
        "the background fill to replace the entry",
        || async move {
            let r = fetch(&client(), "GET", &gw.url(path), &[]).await;
            assert_eq!(r.status, 200);
            (r.text() != "v1").then_some(r)
        },
    )
    .await;
    println!(
        "slow origin (1.5 s), stale_after 500 ms: refreshed to {:?}; {} origin requests",
        fresh.text(),
        origin.count(path)
    );
    assert!(fresh.is_hit(), "{:?}", fresh.cache_status());
    assert!(
        origin.count(path) <= 3,
        "the first fill, the request cut at stale_after, one background fill: {}",
        origin.count(path)
    );
}
