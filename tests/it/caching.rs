//! Rule-driven caching: keys, vary, normalizers, coalescing, sharing rules,
//! metrics and the default route. Every test runs the real `aisle` binary
//! against a real loopback origin.

use std::time::Duration;

use crate::harness::fixtures;
use crate::harness::*;

/// The origin every test here uses: the body names the path, the per-path
/// request number and the query, so a body served from cache is recognisable.
fn origin() -> Origin {
    Origin::start(|req| {
        let body = format!("{} #{} ?{}", req.path, req.count, req.query);
        match req.path.as_str() {
            "/api/slow" => OriginResponse::ok(body).delay(Duration::from_millis(500)),
            "/cookie/default" | "/cookie/allowed" => {
                OriginResponse::ok(body).header("set-cookie", "session=secret; Path=/")
            }
            "/rule/no-store" => OriginResponse::ok(body).header("cache-control", "no-store"),
            "/rule/private" => {
                OriginResponse::ok(body).header("cache-control", "private, max-age=600")
            }
            "/rule/uncached" => OriginResponse::ok(body).header("cache-control", "max-age=600"),
            "/plain/fresh" => OriginResponse::ok(body).header("cache-control", "max-age=60"),
            "/auth/default" => OriginResponse::ok(body).header("cache-control", "max-age=60"),
            "/auth/public" => {
                OriginResponse::ok(body).header("cache-control", "public, max-age=60")
            }
            "/auth/s-maxage" => OriginResponse::ok(body).header("cache-control", "s-maxage=60"),
            // Everything else (including /plain/no-freshness and the rule
            // paths) carries no cache headers at all.
            _ => OriginResponse::ok(body),
        }
    })
}

async fn setup() -> (Origin, Gateway) {
    let origin = origin();
    let gw = Gateway::start(
        &config_for(&origin.url()),
        &[("rules.toml", fixtures::CACHING_RULES)],
    )
    .await;
    (origin, gw)
}

fn assert_stored_miss(r: &Resp) {
    let cs = r.cache_status();
    assert!(
        cs.starts_with("aisle; fwd=uri-miss") && cs.contains("stored"),
        "expected a stored uri-miss, got Cache-Status {cs:?}"
    );
}

/// A stored miss where other variants of the URI may already exist.
fn assert_stored_forward(r: &Resp) {
    let cs = r.cache_status();
    assert!(
        (cs.starts_with("aisle; fwd=uri-miss") || cs.starts_with("aisle; fwd=vary-miss"))
            && cs.contains("stored"),
        "expected a stored miss, got Cache-Status {cs:?}"
    );
}

fn assert_hit(r: &Resp) {
    let cs = r.cache_status();
    assert!(is_hit(&cs), "expected a hit, got Cache-Status {cs:?}");
    assert!(
        r.ttl().is_some(),
        "hit without a ttl= parameter: Cache-Status {cs:?}"
    );
}

fn assert_not_hit(r: &Resp) {
    let cs = r.cache_status();
    assert!(
        cs.starts_with("aisle; ") && cs.contains("fwd="),
        "expected a forwarded response, got Cache-Status {cs:?}"
    );
}

const SEARCH: &str = "/api/vendors/search";

#[tokio::test(flavor = "multi_thread")]
async fn miss_then_hit() {
    let (origin, gw) = setup().await;
    let path = format!("{SEARCH}?location=nyc&vendorType=dj");

    let first = gw.get(&path).await;
    assert_eq!(first.status, 200);
    assert_stored_miss(&first);
    assert_eq!(origin.count(SEARCH), 1);

    let second = gw.get(&path).await;
    assert_eq!(second.status, 200);
    assert_hit(&second);
    assert_eq!(second.body, first.body, "hit must replay the stored body");
    assert_eq!(origin.count(SEARCH), 1, "a hit must not reach the origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn different_vary_value_is_a_separate_entry() {
    let (origin, gw) = setup().await;
    let nyc = format!("{SEARCH}?location=nyc&vendorType=dj");
    let la = format!("{SEARCH}?location=la&vendorType=dj");
    let florist = format!("{SEARCH}?location=nyc&vendorType=florist");

    let a = gw.get(&nyc).await;
    assert_stored_miss(&a);
    let b = gw.get(&la).await;
    assert_not_hit(&b);
    assert_eq!(
        origin.count(SEARCH),
        2,
        "a new location must reach the origin"
    );
    assert_ne!(a.body, b.body);
    let c = gw.get(&florist).await;
    assert_not_hit(&c);
    assert_eq!(
        origin.count(SEARCH),
        3,
        "a new vendorType must reach the origin"
    );

    // Each variant is served from its own entry.
    let a2 = gw.get(&nyc).await;
    assert_hit(&a2);
    assert_eq!(a2.body, a.body);
    let b2 = gw.get(&la).await;
    assert_hit(&b2);
    assert_eq!(b2.body, b.body);
    assert_eq!(origin.count(SEARCH), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn location_normalizer_and_table_share_an_entry() {
    let (origin, gw) = setup().await;
    let first = gw
        .get(&format!("{SEARCH}?location=NYC&vendorType=dj"))
        .await;
    assert_eq!(first.status, 200);
    assert_stored_miss(&first);

    for loc in ["nyc", "%20Brooklyn", "New%20York", "brooklyn%20%20"] {
        let r = gw
            .get(&format!("{SEARCH}?location={loc}&vendorType=dj"))
            .await;
        assert_eq!(r.status, 200);
        let cs = r.cache_status();
        assert!(
            is_hit(&cs),
            "location={loc} should normalise to the NYC entry, got Cache-Status {cs:?}"
        );
        assert_eq!(
            r.body, first.body,
            "location={loc} must replay the NYC body"
        );
    }
    assert_eq!(origin.count(SEARCH), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn table_state_fallback_and_budget_bucket() {
    let (origin, gw) = setup().await;

    // fallback = "state": "Austin, TX" and "Dallas, TX" both become "tx".
    let austin = gw.get(&format!("{SEARCH}?location=Austin,%20TX")).await;
    assert_stored_miss(&austin);
    let dallas = gw.get(&format!("{SEARCH}?location=Dallas,%20TX")).await;
    assert_hit(&dallas);
    assert_eq!(dallas.body, austin.body);
    assert_eq!(origin.count(SEARCH), 1);
    let chicago = gw.get(&format!("{SEARCH}?location=Chicago,%20IL")).await;
    assert_not_hit(&chicago);
    assert_eq!(origin.count(SEARCH), 2, "another state is another entry");

    // bucket:1000 — 1200 and 1800 share a bucket, 2500 does not.
    let b1 = gw.get(&format!("{SEARCH}?location=nyc&budget=1200")).await;
    assert_stored_forward(&b1);
    assert_eq!(origin.count(SEARCH), 3);
    let b2 = gw.get(&format!("{SEARCH}?location=nyc&budget=1800")).await;
    assert_hit(&b2);
    assert_eq!(b2.body, b1.body);
    let b3 = gw.get(&format!("{SEARCH}?location=nyc&budget=2500")).await;
    assert_not_hit(&b3);
    assert_eq!(origin.count(SEARCH), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn unkeyed_query_params_are_ignored() {
    let (origin, gw) = setup().await;
    let a = gw
        .get(&format!(
            "{SEARCH}?location=nyc&vendorType=dj&utm_source=newsletter"
        ))
        .await;
    assert_stored_miss(&a);
    let b = gw
        .get(&format!(
            "{SEARCH}?utm_source=twitter&location=nyc&vendorType=dj"
        ))
        .await;
    assert_hit(&b);
    assert_eq!(b.body, a.body);
    let c = gw
        .get(&format!("{SEARCH}?location=nyc&vendorType=dj"))
        .await;
    assert_hit(&c);
    assert_eq!(
        origin.count(SEARCH),
        1,
        "utm_source must not split the cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cold_requests_are_coalesced() {
    let (origin, gw) = setup().await;
    let url = gw.url("/api/slow");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = gw.client().clone();
        let url = url.clone();
        set.spawn(async move { fetch(&client, "GET", &url, &[]).await });
    }
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    let (mut hits, mut collapsed) = (0, 0);
    while let Some(res) = set.join_next().await {
        let r = res.expect("request task");
        assert_eq!(r.status, 200, "Cache-Status {:?}", r.cache_status());
        // RFC 9211 §2.6: a hit served from another request's fill says so.
        // (A request that reaches the gateway only after the fill ended is a plain hit.)
        let cs = r.cache_status();
        if r.is_hit() {
            hits += 1;
            collapsed += usize::from(cs.contains("; collapsed"));
        }
        statuses.push(cs);
        bodies.push(r.body);
    }
    assert_eq!(bodies.len(), 20);
    assert_eq!(
        hits,
        19,
        "every request but the fill's is answered from it; the origin was asked {} times; Cache-Status: {statuses:#?}",
        origin.count("/api/slow")
    );
    assert!(
        collapsed > 0,
        "20 requests within the origin's 500 ms: some joined the fill"
    );
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "all coalesced responses must carry the same body: {bodies:?}"
    );
    assert_eq!(
        origin.count("/api/slow"),
        1,
        "20 concurrent cold requests must reach the origin once"
    );
    // Every answer taken from the fill counts, whether it waited on the lock or joined the
    // fill as it streamed (issue 18 item 8: 5 were counted for 9 waiters).
    let want = collapsed as f64;
    gw.wait_metric(
        "aisle_coalesced_requests_total",
        &[],
        "one per collapsed answer",
        |v| v == want,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn authorized_response_is_not_shared_without_public() {
    let (origin, gw) = setup().await;
    let auth = [("authorization", "Bearer alice")];

    // max-age alone: not shareable.
    let a = gw.get_with("/auth/default", &auth).await;
    assert_eq!(a.status, 200);
    let b = gw.get("/auth/default").await;
    assert_eq!(b.status, 200);
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert_ne!(
        b.body, a.body,
        "alice's response leaked to an anonymous client"
    );
    assert_eq!(origin.count("/auth/default"), 2);

    // `public` and `s-maxage` make it shareable (control).
    for path in ["/auth/public", "/auth/s-maxage"] {
        let a = gw.get_with(path, &auth).await;
        assert_eq!(a.status, 200);
        let b = gw.get(path).await;
        assert!(
            b.is_hit(),
            "{path}: expected a hit, Cache-Status {:?}",
            b.cache_status()
        );
        assert_eq!(b.body, a.body);
        assert_eq!(origin.count(path), 1);
    }
}

/// RFC 9111 §3.5: an entry stored for anonymous clients is not used for a request with
/// Authorization unless it says public / s-maxage / must-revalidate.
#[tokio::test(flavor = "multi_thread")]
async fn stored_response_is_not_used_for_authorized_requests_without_public() {
    let (origin, gw) = setup().await;
    let auth = [("authorization", "Bearer alice")];
    assert_stored_miss(&gw.get("/auth/default").await);
    let a = gw.get_with("/auth/default", &auth).await;
    assert_eq!(a.status, 200);
    assert!(
        a.cache_status().contains("fwd=request"),
        "Cache-Status {:?}",
        a.cache_status()
    );
    assert_eq!(
        origin.count("/auth/default"),
        2,
        "the authorized request went to the origin"
    );
    assert_hit(&gw.get("/auth/default").await);
    assert_eq!(
        origin.count("/auth/default"),
        2,
        "the anonymous entry is still there"
    );

    // A public entry may answer an authorized request.
    assert_stored_miss(&gw.get("/auth/public").await);
    assert_hit(&gw.get_with("/auth/public", &auth).await);
    assert_eq!(origin.count("/auth/public"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn set_cookie_responses_not_stored_by_default() {
    let (origin, gw) = setup().await;
    let a = gw.get("/cookie/default").await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("set-cookie").is_some(),
        "the origin's Set-Cookie must reach the client on a miss"
    );
    let b = gw.get("/cookie/default").await;
    assert_eq!(b.status, 200);
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert_eq!(origin.count("/cookie/default"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_set_cookie_stores_but_never_replays_the_cookie() {
    let (origin, gw) = setup().await;
    let a = gw.get("/cookie/allowed").await;
    assert_eq!(a.status, 200);
    assert_stored_miss(&a);
    let b = gw.get("/cookie/allowed").await;
    assert_hit(&b);
    assert_eq!(b.body, a.body);
    assert_eq!(
        b.header("set-cookie"),
        None,
        "a cached Set-Cookie must never be replayed"
    );
    assert_eq!(origin.count("/cookie/allowed"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_no_store_and_private_win_over_rule_ttl() {
    let (origin, gw) = setup().await;
    for path in ["/rule/no-store", "/rule/private"] {
        let a = gw.get(path).await;
        assert_eq!(a.status, 200);
        assert!(
            !a.cache_status().contains("stored"),
            "{path}: Cache-Status {:?}",
            a.cache_status()
        );
        let b = gw.get(path).await;
        assert!(!b.is_hit(), "{path}: Cache-Status {:?}", b.cache_status());
        assert_eq!(origin.count(path), 2, "{path} must not be cached");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rule_cache_false_passes_through() {
    let (origin, gw) = setup().await;
    for expected in 1..=2 {
        let r = gw.get("/rule/uncached").await;
        assert_eq!(r.status, 200);
        let cs = r.cache_status();
        assert!(
            cs.starts_with("aisle; fwd=bypass"),
            "cache = false must bypass, got Cache-Status {cs:?}"
        );
        assert_eq!(origin.count("/rule/uncached"), expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_exported_and_count_hits() {
    let (_origin, gw) = setup().await;
    let path = format!("{SEARCH}?location=nyc&vendorType=photographer");
    assert_stored_miss(&gw.get(&path).await);
    assert_hit(&gw.get(&path).await);
    assert_hit(&gw.get(&path).await);

    let hits = gw
        .wait_metric(
            "aisle_requests_total",
            &[("rule", "vendor-search"), ("cache_status", "hit")],
            "== 2",
            |v| v >= 2.0,
        )
        .await;
    assert_eq!(hits, 2.0);
    let misses = gw
        .wait_metric(
            "aisle_requests_total",
            &[("rule", "vendor-search"), ("cache_status", "miss")],
            "== 1",
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(misses, 1.0);

    let text = gw.metrics().await;
    for name in [
        "aisle_requests_total",
        "aisle_request_duration_seconds",
        "aisle_upstream_requests_total",
        "aisle_upstream_duration_seconds",
        "aisle_cache_entries",
        "aisle_cache_bytes",
        "aisle_cache_evictions_total",
        "aisle_coalesced_requests_total",
    ] {
        assert!(text.contains(name), "metric {name} missing from:\n{text}");
    }
    let upstream_ok = metric_value(
        &text,
        "aisle_upstream_requests_total",
        &[("upstream", "api"), ("status", "200")],
    );
    assert_eq!(upstream_ok, Some(1.0), "metrics:\n{text}");
    let entries = metric_value(&text, "aisle_cache_entries", &[]).unwrap_or(0.0);
    assert!(entries >= 1.0, "aisle_cache_entries = {entries}");
    let bytes = metric_value(&text, "aisle_cache_bytes", &[]).unwrap_or(0.0);
    assert!(bytes > 0.0, "aisle_cache_bytes = {bytes}");
}

#[tokio::test(flavor = "multi_thread")]
async fn default_route_caches_only_with_explicit_freshness() {
    let (origin, gw) = setup().await;

    let a = gw.get("/plain/fresh").await;
    assert_eq!(a.status, 200);
    assert_stored_miss(&a);
    let b = gw.get("/plain/fresh").await;
    assert_hit(&b);
    assert_eq!(b.body, a.body);
    assert_eq!(origin.count("/plain/fresh"), 1);

    let c = gw.get("/plain/no-freshness").await;
    assert_eq!(c.status, 200);
    let d = gw.get("/plain/no-freshness").await;
    assert_eq!(d.status, 200);
    assert!(!d.is_hit(), "Cache-Status {:?}", d.cache_status());
    assert_eq!(origin.count("/plain/no-freshness"), 2);

    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", "_default"), ("cache_status", "hit")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_params_match_and_vary() {
    let (origin, gw) = setup().await;
    // The origin sends no freshness: only the `:id` rule's ttl makes these
    // cacheable, so hits prove the pattern matched.
    let one = gw.get("/api/items/abc/reviews").await;
    assert_stored_miss(&one);
    let two = gw.get("/api/items/xyz/reviews").await;
    assert_not_hit(&two);
    assert!(two.cache_status().contains("stored"));
    assert_ne!(one.body, two.body);
    assert_eq!(origin.total(), 2, "a different :id must reach the origin");

    let again_one = gw.get("/api/items/abc/reviews").await;
    assert_hit(&again_one);
    assert_eq!(again_one.body, one.body);
    let again_two = gw.get("/api/items/xyz/reviews").await;
    assert_hit(&again_two);
    assert_eq!(again_two.body, two.body);
    assert_eq!(origin.total(), 2);

    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", "item-reviews"), ("cache_status", "hit")],
        "== 2",
        |v| v >= 2.0,
    )
    .await;
}
