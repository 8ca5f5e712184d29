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

// ---------------------------------------------------------------------------
// Issue 11: conformance, each test written from the RFC clause it names.
// ---------------------------------------------------------------------------

/// An origin whose answer per path is given by `answer(path, n)` (n = that path's request
/// number, from 1).
fn scripted(answer: fn(&str, usize) -> OriginResponse) -> Origin {
    Origin::start(move |req| answer(&req.path, req.count))
}

/// Two GETs of `path`: whether the second was answered from storage (origin asked once).
async fn reused(gw: &Gateway, origin: &Origin, path: &str, headers: &[(&str, &str)]) -> bool {
    let a = gw.get_with(path, headers).await;
    let b = gw.get_with(path, headers).await;
    assert_eq!(a.status, b.status, "{path}: same status both times");
    let from_cache = origin.count(path) == 1;
    if from_cache {
        assert_eq!(a.body, b.body, "{path}: a reuse replays the stored body");
        assert!(b.is_hit(), "{path}: {:?}", b.cache_status());
    }
    from_cache
}

/// RFC 9111 §3: any final status may be stored when the response has explicit freshness; not
/// only the heuristically cacheable ones. Without freshness, a 500 is not stored.
#[tokio::test(flavor = "multi_thread")]
async fn any_final_status_with_explicit_freshness_is_stored() {
    let origin = scripted(|path, n| {
        let status: u16 = path.trim_start_matches("/s/").parse().unwrap_or(200);
        let r = OriginResponse::with_status(status).body(format!("{path} #{n}"));
        if path.ends_with("/plain") {
            return OriginResponse::with_status(500).body(format!("{path} #{n}"));
        }
        r.header("cache-control", "max-age=3600")
    });
    let gw = gateway_for(&origin).await;
    for status in [299, 303, 400, 500, 502, 503, 504, 599] {
        let path = format!("/s/{status}");
        assert!(
            reused(&gw, &origin, &path, &[]).await,
            "{status} with max-age=3600 is reusable while fresh"
        );
    }
    assert!(
        !reused(&gw, &origin, "/s/500/plain", &[]).await,
        "a 500 without freshness is not stored"
    );
}

/// RFC 9111 §5.2.2.3 `must-understand`: stored only when the cache understands the status,
/// and then the `no-store` beside it (for older caches) is overridden.
#[tokio::test(flavor = "multi_thread")]
async fn must_understand_stores_only_understood_statuses() {
    let origin = scripted(|path, n| {
        let status = if path == "/mu/599" { 599 } else { 200 };
        OriginResponse::with_status(status)
            .body(format!("{path} #{n}"))
            .header("cache-control", "max-age=3600, must-understand, no-store")
    });
    let gw = gateway_for(&origin).await;
    assert!(
        reused(&gw, &origin, "/mu/200", &[]).await,
        "200 is understood"
    );
    assert!(
        !reused(&gw, &origin, "/mu/599", &[]).await,
        "599 is not understood: no-store holds"
    );
}

/// RFC 9111 §4.2.2: a heuristically cacheable status with `Last-Modified` and no explicit
/// freshness gets 10% of the time since modification, capped at a day; a status that is not
/// heuristically cacheable gets none, nor does a response without `Last-Modified`.
#[tokio::test(flavor = "multi_thread")]
async fn heuristic_freshness_from_last_modified() {
    let origin = scripted(|path, n| {
        let now = SystemTime::now();
        let body = format!("{path} #{n}");
        match path {
            "/h/old" => OriginResponse::ok(body)
                .header("date", &http_date(now))
                .header(
                    "last-modified",
                    &http_date(now - Duration::from_secs(100 * 86_400)),
                ),
            "/h/recent" => OriginResponse::ok(body)
                .header("date", &http_date(now))
                .header("last-modified", &http_date(now - Duration::from_secs(1000))),
            "/h/500" => OriginResponse::with_status(500)
                .body(body)
                .header("date", &http_date(now))
                .header(
                    "last-modified",
                    &http_date(now - Duration::from_secs(100 * 86_400)),
                ),
            _ => OriginResponse::ok(body).header("date", &http_date(now)),
        }
    });
    let gw = gateway_for(&origin).await;
    assert!(reused(&gw, &origin, "/h/old", &[]).await);
    let ttl = gw.get("/h/old").await.ttl().expect("a ttl");
    assert!(
        (86_000..=86_400).contains(&ttl),
        "10% of 100 days, capped at one day: ttl={ttl}"
    );
    assert!(reused(&gw, &origin, "/h/recent", &[]).await);
    let ttl = gw.get("/h/recent").await.ttl().expect("a ttl");
    assert!((90..=100).contains(&ttl), "10% of 1000 s: ttl={ttl}");
    assert!(
        !reused(&gw, &origin, "/h/500", &[]).await,
        "500 is not heuristic"
    );
    assert!(
        !reused(&gw, &origin, "/h/none", &[]).await,
        "no Last-Modified, no freshness"
    );
    // `[cache] heuristic_max` sets the cap.
    let config =
        config_for(&origin.url()).replace("[cache]\n", "[cache]\nheuristic_max = \"60s\"\n");
    let capped = Gateway::start(&config, &[]).await;
    capped.get("/h/old").await;
    let ttl = capped.get("/h/old").await.ttl().expect("a ttl");
    assert!((50..=60).contains(&ttl), "capped at 60 s: ttl={ttl}");
}

/// RFC 9213 §2.1-2.2: `CDN-Cache-Control` is a Structured Field Dictionary; a value that does
/// not parse as one, or a directive of the wrong type, invalidates the field and the cache falls
/// back to `Cache-Control`.
#[tokio::test(flavor = "multi_thread")]
async fn cdn_cache_control_is_a_structured_dictionary() {
    let origin = scripted(|path, n| {
        let (cdn, cc) = match path {
            "/cdn/valid" => ("max-age=3600", "no-store"),
            "/cdn/quoted" => ("max-age=\"3600\"", "no-store"),
            "/cdn/decimal" => ("max-age=1.5", "max-age=3600"),
            "/cdn/token" => ("max-age=abc", "max-age=3600"),
            "/cdn/unparsable" => ("max-age=3600, ,", "no-store"),
            _ => ("none", "max-age=3600"),
        };
        OriginResponse::ok(format!("{path} #{n}"))
            .header("cdn-cache-control", cdn)
            .header("cache-control", cc)
    });
    let gw = gateway_for(&origin).await;
    assert!(
        reused(&gw, &origin, "/cdn/valid", &[]).await,
        "a valid CDN-Cache-Control wins over Cache-Control"
    );
    assert!(
        !reused(&gw, &origin, "/cdn/quoted", &[]).await,
        "max-age as a String is invalid: Cache-Control's no-store applies"
    );
    assert!(
        reused(&gw, &origin, "/cdn/decimal", &[]).await,
        "max-age as a Decimal is invalid: Cache-Control's max-age applies"
    );
    assert!(reused(&gw, &origin, "/cdn/token", &[]).await);
    assert!(!reused(&gw, &origin, "/cdn/unparsable", &[]).await);
    assert!(
        !reused(&gw, &origin, "/cdn/none", &[]).await,
        "a valid field with no known directive still targets this cache (RFC 9213 §3.1)"
    );
}

/// RFC 9111 §5.1: `Age` is delta-seconds; what is not is ignored (negative, fractional,
/// words), and of several values the first counts.
#[tokio::test(flavor = "multi_thread")]
async fn age_values_are_parsed_as_the_rfc_says() {
    let origin = scripted(|path, n| {
        let r = OriginResponse::ok(format!("{path} #{n}")).header("cache-control", "max-age=3600");
        match path {
            "/age/negative" => r.header("age", "-7200"),
            "/age/float" => r.header("age", "7200.0"),
            "/age/words" => r.header("age", "old"),
            "/age/prefix" => r.header("age", "0, 7200"),
            "/age/suffix" => r.header("age", "7200, 0"),
            "/age/two-lines-fresh-first" => r.header("age", "0").header("age", "7200"),
            "/age/two-lines-old-first" => r.header("age", "7200").header("age", "0"),
            "/age/parameter" => r.header("age", "7200;foo=bar"),
            _ => r.header("age", "2147483648"),
        }
    });
    let gw = gateway_for(&origin).await;
    for fresh in [
        "/age/negative",
        "/age/float",
        "/age/words",
        "/age/prefix",
        "/age/two-lines-fresh-first",
    ] {
        assert!(reused(&gw, &origin, fresh, &[]).await, "{fresh}: fresh");
    }
    for stale in [
        "/age/suffix",
        "/age/two-lines-old-first",
        "/age/parameter",
        "/age/huge",
    ] {
        assert!(!reused(&gw, &origin, stale, &[]).await, "{stale}: stale");
    }
}

/// RFC 9111 §4.2.4, §5.2.2.4: a response stored with `no-cache` must be validated before every
/// reuse, so it is never served stale, even with `stale-if-error` and the origin failing.
#[tokio::test(flavor = "multi_thread")]
async fn no_cache_is_never_served_stale_on_error() {
    let origin = scripted(|path, n| {
        OriginResponse::ok(format!("{path} #{n}")).header(
            "cache-control",
            "max-age=3600, no-cache, stale-if-error=600",
        )
    });
    let gw = gateway_for(&origin).await;
    let first = gw.get("/nc").await;
    assert_eq!(first.status, 200);
    origin.set_down(true);
    let second = gw.get("/nc").await;
    assert_ne!(
        (second.status, second.body.clone()),
        (200, first.body.clone()),
        "served stale despite no-cache: {:?}",
        second.cache_status()
    );
}

/// RFC 9111 §4.1: stored variants are matched on normalized values: whitespace around list
/// commas, and case where the field is case-insensitive (`Accept-Encoding`).
#[tokio::test(flavor = "multi_thread")]
async fn vary_matches_normalized_values() {
    let origin = scripted(|path, n| {
        OriginResponse::ok(format!("{path} #{n}"))
            .header("cache-control", "max-age=3600")
            .header("vary", "Accept-Encoding")
    });
    let gw = gateway_for(&origin).await;
    let a = gw
        .get_with("/vary", &[("accept-encoding", "gzip, deflate")])
        .await;
    let b = gw
        .get_with("/vary", &[("accept-encoding", "GZIP,deflate")])
        .await;
    assert_eq!(a.body, b.body, "{:?}", b.cache_status());
    assert_eq!(origin.count("/vary"), 1);
    let c = gw
        .get_with("/vary", &[("accept-encoding", "deflate, gzip")])
        .await;
    assert_eq!(origin.count("/vary"), 2, "another order is another variant");
    assert_ne!(c.body, a.body);
}

/// RFC 9111 §5.1, §4.2.3: the origin's `Age` is forwarded on the miss, and an answer from
/// storage adds its resident time to it.
#[tokio::test(flavor = "multi_thread")]
async fn the_origins_age_is_forwarded_and_grows_in_storage() {
    let origin = scripted(|path, n| {
        OriginResponse::ok(format!("{path} #{n}"))
            .header("cache-control", "max-age=3600")
            .header(
                "age",
                if path.ends_with("7200") {
                    "7200"
                } else {
                    "100"
                },
            )
    });
    let gw = gateway_for(&origin).await;
    let miss = gw.get("/aged").await;
    assert_eq!(miss.age(), Some(100), "miss: {:?}", miss.headers);
    let hit = gw.get("/aged").await;
    assert!(hit.is_hit());
    assert!(hit.age().is_some_and(|a| a >= 100), "hit: {:?}", hit.age());
    // Older than its max-age: stored already stale, and the client still learns its age.
    let old = gw.get("/aged/7200").await;
    assert_eq!(old.age(), Some(7200), "{:?}", old.headers);
}

/// RFC 9110 §7.6.1: fields named in `Connection` (and `Keep-Alive`) describe the upstream
/// connection: neither forwarded nor stored.
#[tokio::test(flavor = "multi_thread")]
async fn connection_listed_fields_are_neither_forwarded_nor_stored() {
    let origin = scripted(|path, n| {
        OriginResponse::ok(format!("{path} #{n}"))
            .header("cache-control", "max-age=3600")
            .header("connection", "x-hop")
            .header("x-hop", "secret")
            .header("x-kept", "yes")
    });
    let gw = gateway_for(&origin).await;
    for what in ["miss", "hit"] {
        let r = gw.get("/hop").await;
        assert_eq!(r.header("x-hop"), None, "{what}: {:?}", r.headers);
        assert_eq!(r.header("x-kept").as_deref(), Some("yes"), "{what}");
    }
    assert_eq!(origin.count("/hop"), 1);
}

/// RFC 9111 §4.3.4: a 304 that revalidates a stored answer updates every stored field it
/// carries, extension fields included; `Content-Length` is not taken from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_304_updates_the_stored_fields() {
    let origin = Origin::start(|req| {
        if req.header("if-none-match").as_deref() == Some("\"v1\"") {
            return OriginResponse::with_status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=3600")
                .header("test-header", "updated")
                .header("x-content-foo", "updated");
        }
        OriginResponse::ok(format!("{} #{}", req.path, req.count))
            // Stored already stale (Age = max-age), so the next request revalidates.
            .header("cache-control", "max-age=1")
            .header("age", "1")
            .header("etag", "\"v1\"")
            .header("test-header", "original")
            .header("x-content-foo", "original")
    });
    let gw = gateway_for(&origin).await;
    let first = gw.get("/reval").await;
    assert_eq!(first.header("test-header").as_deref(), Some("original"));
    let revalidated = gw.get("/reval").await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.body, first.body, "the stored body, revalidated");
    assert_eq!(origin.count("/reval"), 2, "one revalidation");
    let hit = gw.get("/reval").await;
    assert!(hit.is_hit(), "{:?}", hit.cache_status());
    for r in [&revalidated, &hit] {
        assert_eq!(r.header("test-header").as_deref(), Some("updated"));
        assert_eq!(r.header("x-content-foo").as_deref(), Some("updated"));
    }
    assert_eq!(hit.body, first.body);
}

/// RFC 9110 §14: a stored complete answer serves byte ranges: one range, a suffix range, and an
/// unsatisfiable range (416).
#[tokio::test(flavor = "multi_thread")]
async fn ranges_are_served_from_a_stored_answer() {
    let origin = scripted(|_path, _n| {
        OriginResponse::ok("0123456789").header("cache-control", "max-age=3600")
    });
    let gw = gateway_for(&origin).await;
    assert_eq!(gw.get("/r").await.body, "0123456789");
    let part = gw.get_with("/r", &[("range", "bytes=2-4")]).await;
    assert_eq!(part.status, 206, "{:?}", part.headers);
    assert_eq!(part.body, "234");
    assert_eq!(
        part.header("content-range").as_deref(),
        Some("bytes 2-4/10")
    );
    let suffix = gw.get_with("/r", &[("range", "bytes=-3")]).await;
    assert_eq!((suffix.status, suffix.body.as_ref()), (206, &b"789"[..]));
    let multi = gw.get_with("/r", &[("range", "bytes=0-1,8-9")]).await;
    assert_eq!(multi.status, 206);
    let ctype = multi.header("content-type").unwrap_or_default();
    assert!(ctype.starts_with("multipart/byteranges"), "{ctype}");
    let text = multi.text();
    assert!(
        text.contains("\r\n\r\n01\r\n") && text.contains("\r\n\r\n89\r\n"),
        "{text:?}"
    );
    let beyond = gw.get_with("/r", &[("range", "bytes=20-30")]).await;
    assert_eq!(beyond.status, 416);
    assert_eq!(origin.count("/r"), 1, "every range from storage");
}

/// A stored answer that came chunked (no `Content-Length`) is complete once stored: hits state
/// its length and serve ranges from it.
#[tokio::test(flavor = "multi_thread")]
async fn ranges_are_served_from_a_stored_chunked_answer() {
    let origin = StreamOrigin::start(|_req| StreamResponse {
        status: 200,
        headers: vec![
            ("cache-control".into(), "max-age=3600".into()),
            ("content-type".into(), "text/plain".into()),
        ],
        steps: vec![
            Step::Chunk(bytes::Bytes::from_static(b"01234")),
            Step::Chunk(bytes::Bytes::from_static(b"56789")),
        ],
    });
    let gw = Gateway::start(&config_for(&origin.url()), &[]).await;
    assert_eq!(gw.get("/chunked").await.body, "0123456789");
    let whole = gw.get("/chunked").await;
    assert!(whole.is_hit());
    assert_eq!(whole.header("content-length").as_deref(), Some("10"));
    let part = gw.get_with("/chunked", &[("range", "bytes=3-5")]).await;
    assert_eq!((part.status, part.body.as_ref()), (206, &b"345"[..]));
    assert_eq!(origin.total(), 1);
}

/// RFC 9111 §5.2.2.2 (`must-revalidate`) and §4.2.4: a stored answer that may not be served
/// stale, with the origin unreachable, gets `504`, not the stale answer nor a `502`.
#[tokio::test(flavor = "multi_thread")]
async fn must_revalidate_with_the_origin_unreachable_is_504() {
    let origin = scripted(|path, n| {
        OriginResponse::ok(format!("{path} #{n}"))
            // Stored already stale (Age = max-age); stale-if-error is overruled.
            .header(
                "cache-control",
                "max-age=1, must-revalidate, stale-if-error=600",
            )
            .header("age", "1")
    });
    let gw = gateway_for(&origin).await;
    assert_eq!(gw.get("/mr").await.status, 200);
    origin.stop();
    origin.wait_stopped().await;
    let r = gw.get("/mr").await;
    assert_eq!(r.status, 504, "{:?} {:?}", r.cache_status(), r.body);
}

/// RFC 9110 §9.3.3 allows storing a POST answer whose `Content-Location` names the request
/// URI as that URI's GET answer; Aisle does not (a decision: README, RFC section): POST answers
/// are cached only by body-keyed rules, under their own keys, and a POST to a URI invalidates
/// it (§4.4).
#[tokio::test(flavor = "multi_thread")]
async fn a_post_answer_with_content_location_is_not_the_gets_answer() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("{} {} #{}", req.method, req.path, req.count))
            .header("cache-control", "max-age=3600")
            .header("content-location", &req.path)
    });
    let gw = gateway_for(&origin).await;
    let post = gw.request("POST", "/cl", &[]).await;
    assert_eq!(post.status, 200);
    let get = gw.get("/cl").await;
    assert!(
        get.text().starts_with("GET"),
        "the GET went to the origin: {}",
        get.text()
    );
}

/// RFC 9110 §6.6.1, RFC 9111 §4 and §4.3.4: the origin's `Date` reaches the client on a miss, a
/// hit serves the stored `Date` (its `Age` says how old it is), and a 304 carrying `Date`
/// replaces the stored one.
#[tokio::test(flavor = "multi_thread")]
async fn the_stored_date_is_served() {
    let generated = http_date(SystemTime::now() - Duration::from_secs(20));
    let validated = http_date(SystemTime::now() - Duration::from_secs(5));
    let (generated_at, validated_at) = (generated.clone(), validated.clone());
    let origin = Origin::start(move |req| {
        if req.header("if-none-match").as_deref() == Some("\"v1\"") {
            return OriginResponse::with_status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=3600")
                .header("date", &validated_at);
        }
        let r = OriginResponse::ok(format!("{} #{}", req.path, req.count))
            .header("date", &generated_at)
            .header("etag", "\"v1\"");
        if req.path == "/revalidated" {
            // Stored already stale (Age = max-age), so the next request revalidates.
            r.header("cache-control", "max-age=1").header("age", "1")
        } else {
            r.header("cache-control", "max-age=3600")
        }
    });
    let gw = gateway_for(&origin).await;

    let miss = gw.get("/dated").await;
    assert_eq!(miss.header("date"), Some(generated.clone()), "miss");
    let hit = gw.get("/dated").await;
    assert!(hit.is_hit(), "{:?}", hit.cache_status());
    assert_eq!(hit.header("date"), Some(generated.clone()), "hit");
    // Age counts resident time plus the origin's `Age`, not the distance from the origin's
    // clock (README: apparent age is not used, so a slow origin clock does not age answers).
    let age = hit.age().expect("Age on a hit");
    assert!(age < 20, "Age {age} must not come from the origin's Date");

    let first = gw.get("/revalidated").await;
    assert_eq!(first.header("date"), Some(generated.clone()));
    let revalidated = gw.get("/revalidated").await;
    assert_eq!(origin.count("/revalidated"), 2, "one revalidation");
    let hit = gw.get("/revalidated").await;
    assert!(hit.is_hit(), "{:?}", hit.cache_status());
    for r in [&revalidated, &hit] {
        assert_eq!(r.header("date"), Some(validated.clone()), "the 304's Date");
    }
}

/// RFC 9110 §6.6.1: a response without `Date` gets the time it was received, and that is the
/// `Date` it is served with from storage, not the time of each hit.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_without_date_is_stored_with_its_receipt_time() {
    let origin = Origin::start_undated(|req| {
        OriginResponse::ok(format!("{} #{}", req.path, req.count))
            .header("cache-control", "max-age=3600")
    });
    let gw = gateway_for(&origin).await;
    let miss = gw.get("/undated").await;
    let received = miss.header("date").expect("a Date is added");
    // Wait (bounded) until the clock shows another second, so a Date made per answer differs.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while http_date(SystemTime::now()) == received {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock did not move"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = gw.get("/undated").await;
    assert!(hit.is_hit(), "{:?}", hit.cache_status());
    assert_eq!(hit.header("date"), Some(received));
}

/// RFC 9110 §6.6.1: an answer the gateway makes itself (here the error for an unreachable
/// origin) carries the time it was sent, not a placeholder.
#[tokio::test(flavor = "multi_thread")]
async fn an_error_answer_carries_the_current_date() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config_for(&nowhere), &[]).await;
    let r = gw.get("/down").await;
    assert!(r.status >= 500, "{}", r.status);
    let date = r.header("date").expect("a Date on every answer");
    let sent = httpdate::parse_http_date(&date).expect("an HTTP-date");
    let skew = SystemTime::now()
        .duration_since(sent)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(5), "Date {date} is {skew:?} off");
}
