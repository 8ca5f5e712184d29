//! RFC 9111 behaviour on the default route (no rules): storage decisions,
//! freshness sources, Vary, conditional requests, request directives,
//! invalidation and Age.

use std::time::{Duration, SystemTime};

use crate::harness::*;

/// Origin answering every path with `cache_control` (if any) plus `extra`
/// headers; the body is `<path> #<n>` where n is the per-path request number.
fn origin_with(
    cache_control: Option<&'static str>,
    extra: &'static [(&'static str, &'static str)],
) -> Origin {
    Origin::start(move |req| {
        let mut r = OriginResponse::ok(format!("{} #{}", req.path, req.count));
        if let Some(cc) = cache_control {
            r = r.header("cache-control", cc);
        }
        for (k, v) in extra {
            r = r.header(k, v);
        }
        r
    })
}

async fn gateway_for(origin: &Origin) -> Gateway {
    Gateway::start(&config_for(&origin.url()), &[]).await
}

/// Two GETs; asserts the second went to the origin too.
async fn assert_not_stored(gw: &Gateway, origin: &Origin, path: &str) {
    let a = gw.get(path).await;
    assert_eq!(a.status, 200);
    assert!(
        !a.cache_status().contains("stored"),
        "{path}: first response claims to be stored: {:?}",
        a.cache_status()
    );
    let b = gw.get(path).await;
    assert_eq!(b.status, 200);
    assert!(
        !b.is_hit(),
        "{path}: second response is a hit: {:?}",
        b.cache_status()
    );
    assert_eq!(
        origin.count(path),
        2,
        "{path} must not be served from cache"
    );
    assert_ne!(a.body, b.body);
}

/// Two GETs; asserts the second was a hit replaying the first body.
async fn assert_stored(gw: &Gateway, origin: &Origin, path: &str) -> Resp {
    let a = gw.get(path).await;
    assert_eq!(a.status, 200);
    let cs = a.cache_status();
    assert!(
        cs.starts_with("aisle; fwd=uri-miss") && cs.contains("stored"),
        "{path}: expected a stored miss, got {cs:?}"
    );
    let b = gw.get(path).await;
    assert_eq!(b.status, 200);
    assert!(
        b.is_hit(),
        "{path}: expected a hit, got {:?}",
        b.cache_status()
    );
    assert_eq!(b.body, a.body);
    assert_eq!(origin.count(path), 1, "{path} must be served from cache");
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn no_store_is_not_stored() {
    let origin = origin_with(Some("no-store"), &[]);
    let gw = gateway_for(&origin).await;
    assert_not_stored(&gw, &origin, "/no-store").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn private_is_not_stored() {
    let origin = origin_with(Some("private, max-age=60"), &[]);
    let gw = gateway_for(&origin).await;
    assert_not_stored(&gw, &origin, "/private").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s_maxage_is_preferred_over_max_age() {
    let origin = Origin::start(|req| {
        let cc = if req.path == "/shared-longer" {
            "max-age=0, s-maxage=60"
        } else {
            "max-age=60, s-maxage=0"
        };
        OriginResponse::ok(format!("{} #{}", req.path, req.count)).header("cache-control", cc)
    });
    let gw = gateway_for(&origin).await;
    let hit = assert_stored(&gw, &origin, "/shared-longer").await;
    let ttl = hit.ttl().expect("ttl on hit");
    assert!(
        (55..=60).contains(&ttl),
        "ttl should come from s-maxage=60, got {ttl}"
    );

    // s-maxage=0 overrides max-age=60: never fresh for a shared cache.
    let a = gw.get("/shared-zero").await;
    assert_eq!(a.status, 200);
    let b = gw.get("/shared-zero").await;
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert_eq!(origin.count("/shared-zero"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn vary_star_is_not_stored() {
    let origin = origin_with(Some("max-age=60"), &[("vary", "*")]);
    let gw = gateway_for(&origin).await;
    assert_not_stored(&gw, &origin, "/vary-star").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn response_vary_separates_variants() {
    let origin = Origin::start(|req| {
        let lang = req.header("accept-language").unwrap_or_default();
        OriginResponse::ok(format!("lang={lang} #{}", req.count))
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Language")
    });
    let gw = gateway_for(&origin).await;
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];

    let a = gw.get_with("/greeting", &en).await;
    assert_eq!(a.text(), "lang=en #1");
    let b = gw.get_with("/greeting", &de).await;
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert!(b.cache_status().contains("fwd="));
    assert_eq!(b.text(), "lang=de #2");
    assert_eq!(origin.count("/greeting"), 2);

    let a2 = gw.get_with("/greeting", &en).await;
    assert!(a2.is_hit(), "Cache-Status {:?}", a2.cache_status());
    assert_eq!(a2.text(), "lang=en #1");
    let b2 = gw.get_with("/greeting", &de).await;
    assert!(b2.is_hit(), "Cache-Status {:?}", b2.cache_status());
    assert_eq!(b2.text(), "lang=de #2");
    assert_eq!(origin.count("/greeting"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn cdn_cache_control_is_preferred() {
    let origin = Origin::start(|req| {
        let r = OriginResponse::ok(format!("{} #{}", req.path, req.count));
        if req.path == "/cdn-allows" {
            r.header("cdn-cache-control", "max-age=60")
                .header("cache-control", "no-store")
        } else {
            r.header("cdn-cache-control", "no-store")
                .header("cache-control", "max-age=60")
        }
    });
    let gw = gateway_for(&origin).await;
    assert_stored(&gw, &origin, "/cdn-allows").await;
    assert_not_stored(&gw, &origin, "/cdn-forbids").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_no_cache_revalidates_with_etag() {
    let origin = Origin::start(|req| {
        if req.header("if-none-match").as_deref() == Some("\"v1\"") {
            OriginResponse::with_status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=60")
        } else {
            OriginResponse::ok(format!("payload #{}", req.count))
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=60")
        }
    });
    let gw = gateway_for(&origin).await;
    let first = gw.get("/doc").await;
    assert_eq!(first.text(), "payload #1");

    let r = gw.get_with("/doc", &[("cache-control", "no-cache")]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.cache_status().contains("fwd=request"),
        "Cache-Status {:?}",
        r.cache_status()
    );
    assert_eq!(origin.count("/doc"), 2, "no-cache must contact the origin");
    let upstream = origin.requests_for("/doc");
    assert_eq!(
        upstream[1].header("if-none-match").as_deref(),
        Some("\"v1\""),
        "revalidation must be conditional; origin saw headers {:?}",
        upstream[1].headers
    );
    assert_eq!(
        r.text(),
        "payload #1",
        "304 must be answered from the cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_no_store_bypasses() {
    let origin = origin_with(Some("max-age=60"), &[]);
    let gw = gateway_for(&origin).await;
    let ns = [("cache-control", "no-store")];

    let a = gw.get_with("/thing", &ns).await;
    assert_eq!(a.status, 200);
    assert!(
        a.cache_status().starts_with("aisle; fwd=bypass"),
        "Cache-Status {:?}",
        a.cache_status()
    );
    // Not stored by the no-store request.
    let b = gw.get("/thing").await;
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert_eq!(origin.count("/thing"), 2);
    let c = gw.get("/thing").await;
    assert!(c.is_hit(), "Cache-Status {:?}", c.cache_status());
    // Not served from the cache to a no-store request either.
    let d = gw.get_with("/thing", &ns).await;
    assert!(
        d.cache_status().starts_with("aisle; fwd=bypass"),
        "Cache-Status {:?}",
        d.cache_status()
    );
    assert_eq!(origin.count("/thing"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_if_cached() {
    let origin = origin_with(Some("max-age=60"), &[]);
    let gw = gateway_for(&origin).await;
    let oic = [("cache-control", "only-if-cached")];

    let cold = gw.get_with("/oic", &oic).await;
    assert_eq!(cold.status, 504, "Cache-Status {:?}", cold.cache_status());
    assert_eq!(
        origin.count("/oic"),
        0,
        "only-if-cached must not reach the origin"
    );

    let primed = gw.get("/oic").await;
    assert_eq!(primed.status, 200);
    let warm = gw.get_with("/oic", &oic).await;
    assert_eq!(warm.status, 200);
    assert!(warm.is_hit(), "Cache-Status {:?}", warm.cache_status());
    assert_eq!(warm.body, primed.body);
    assert_eq!(origin.count("/oic"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_conditional_request_answered_from_cache() {
    let origin = origin_with(Some("max-age=60"), &[("etag", "\"abc\"")]);
    let gw = gateway_for(&origin).await;
    let primed = gw.get("/etagged").await;
    assert_eq!(primed.status, 200);
    assert_eq!(origin.count("/etagged"), 1);

    let nm = gw
        .get_with("/etagged", &[("if-none-match", "\"abc\"")])
        .await;
    assert_eq!(nm.status, 304, "Cache-Status {:?}", nm.cache_status());
    assert!(nm.body.is_empty());
    assert_eq!(nm.header("etag").as_deref(), Some("\"abc\""));
    assert_eq!(origin.count("/etagged"), 1, "304 must come from the cache");

    let other = gw
        .get_with("/etagged", &[("if-none-match", "\"zzz\"")])
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body, primed.body);
    assert_eq!(origin.count("/etagged"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn head_after_get_is_a_hit_without_body() {
    let origin = origin_with(Some("max-age=60"), &[]);
    let gw = gateway_for(&origin).await;
    let primed = gw.get("/headed").await;
    assert_eq!(primed.status, 200);
    assert!(!primed.body.is_empty());

    let head = gw.request("HEAD", "/headed", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.is_hit(), "Cache-Status {:?}", head.cache_status());
    assert!(head.body.is_empty(), "HEAD must not carry a body");
    assert_eq!(origin.count("/headed"), 1);
    assert!(origin.requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_invalidates_cached_get() {
    let origin = Origin::start(|req| {
        if req.method == "POST" {
            OriginResponse::ok("posted")
        } else {
            OriginResponse::ok(format!("get #{}", req.count)).header("cache-control", "max-age=60")
        }
    });
    let gw = gateway_for(&origin).await;
    let a = gw.get("/resource").await;
    assert_eq!(a.text(), "get #1");
    let b = gw.get("/resource").await;
    assert!(b.is_hit(), "Cache-Status {:?}", b.cache_status());

    let post = gw.request("POST", "/resource", &[]).await;
    assert_eq!(post.status, 200);
    assert_eq!(post.text(), "posted");
    assert!(
        post.cache_status().starts_with("aisle; fwd=bypass"),
        "Cache-Status {:?}",
        post.cache_status()
    );
    assert_eq!(origin.count("/resource"), 2, "POST must reach the origin");

    let c = gw.get("/resource").await;
    assert!(
        !c.is_hit(),
        "GET after POST must miss, got {:?}",
        c.cache_status()
    );
    assert!(c.cache_status().contains("fwd="));
    let gets = origin
        .requests_for("/resource")
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(gets, 2);
    assert_eq!(c.text(), "get #3");
}

#[tokio::test(flavor = "multi_thread")]
async fn expires_is_honoured() {
    let origin = Origin::start(|req| {
        let now = SystemTime::now();
        let expires = if req.path == "/expires-future" {
            now + Duration::from_secs(60)
        } else {
            now - Duration::from_secs(60)
        };
        OriginResponse::ok(format!("{} #{}", req.path, req.count))
            .header("date", &http_date(now))
            .header("expires", &http_date(expires))
    });
    let gw = gateway_for(&origin).await;
    let hit = assert_stored(&gw, &origin, "/expires-future").await;
    let ttl = hit.ttl().expect("ttl");
    assert!((50..=60).contains(&ttl), "ttl from Expires, got {ttl}");

    let a = gw.get("/expires-past").await;
    assert_eq!(a.status, 200);
    let b = gw.get("/expires-past").await;
    assert!(!b.is_hit(), "Cache-Status {:?}", b.cache_status());
    assert_eq!(origin.count("/expires-past"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn age_from_origin_is_accounted_for() {
    let origin = origin_with(Some("max-age=3600"), &[("age", "100")]);
    let gw = gateway_for(&origin).await;
    let hit = assert_stored(&gw, &origin, "/aged").await;
    let ttl = hit.ttl().expect("ttl");
    assert!(
        (3490..=3500).contains(&ttl),
        "ttl should be about 3600-100, got {ttl} ({:?})",
        hit.cache_status()
    );
    let age = hit.age().expect("Age header on hit");
    assert!(
        (100..=110).contains(&age),
        "Age should be >= 100, got {age}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn age_grows_while_cached() {
    let origin = origin_with(Some("max-age=60"), &[]);
    let gw = gateway_for(&origin).await;
    let primed = gw.get("/ageing").await;
    assert_eq!(primed.status, 200);
    let gw = &gw;
    let aged = poll_until(
        Duration::from_secs(10),
        "a hit with Age >= 2",
        || async move {
            let r = gw.get("/ageing").await;
            assert!(r.is_hit(), "Cache-Status {:?}", r.cache_status());
            let age = r.age().expect("Age header on a hit");
            let ttl = r.ttl().expect("ttl on a hit");
            assert!(
                ttl <= 60 && ttl + age as i64 >= 57,
                "ttl {ttl} and Age {age} inconsistent with max-age=60"
            );
            (age >= 2).then_some(r)
        },
    )
    .await;
    assert!(aged.ttl().unwrap() <= 58);
    assert_eq!(origin.count("/ageing"), 1);
}
