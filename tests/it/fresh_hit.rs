//! The fresh-hit path (`src/proxy/fresh_hit.rs`) answers plain fresh memory hits without
//! pingora's cache phases: it must answer exactly what those phases answer, count what they
//! count, and leave every other request (ranges, conditionals, request directives, HEAD's
//! and GET's differences, purged entries) to them.

use crate::harness::redis::*;
use crate::harness::*;

/// An origin whose answers carry the fields a typical API answer has, cacheable for 10 min.
fn origin() -> Origin {
    Origin::start(|req| {
        OriginResponse::ok(format!("{} #{} {}", req.path, req.count, "x".repeat(900)))
            .header(
                "cache-control",
                "public, max-age=600, stale-while-revalidate=30",
            )
            .header("content-type", "application/json")
            .header("etag", "\"v1\"")
            .header("last-modified", "Sat, 05 Dec 2026 11:00:00 GMT")
            .header("x-vendor", "venues")
    })
}

/// The answer's fields, without `Age` and `Cache-Status`'s `ttl` (which move with the clock):
/// name and value, in the order sent.
fn fields(r: &Resp) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| k.as_str() != "age")
        .map(|(k, v)| {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            let v = if k.as_str() == "cache-status" {
                v.split("; ")
                    .filter(|p| !p.starts_with("ttl="))
                    .collect::<Vec<_>>()
                    .join("; ")
            } else {
                v
            };
            (k.as_str().to_string(), v)
        })
        .collect()
}

fn assert_close(a: Option<u64>, b: Option<u64>, what: &str) {
    let (a, b) = (a.expect(what), b.expect(what));
    assert!(a.abs_diff(b) <= 1, "{what}: {a} vs {b}");
}

/// A plain GET hit (the fresh-hit path) and the same hit taken through pingora's phases (a
/// conditional that does not match sends it there, and is answered in full) are the same
/// answer: status, every field in order, body; `Age` and `ttl` within the second they are
/// read in. HEAD gets the same fields and no body. Both count as memory hits.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_hit_answers_as_the_cache_phases_do() {
    let origin = origin();
    let gw = Gateway::start(&config_for(&origin.url()), &[]).await;
    let miss = gw.get("/v1/venues/7?city=paris").await;
    assert_stored_miss(&miss, "first GET");
    let before = gw
        .metric("aisle_tier_hits_total", &[("tier", "memory")])
        .await
        .unwrap_or(0.0);

    let fast = gw.get("/v1/venues/7?city=paris").await;
    let phases = gw
        .get_with("/v1/venues/7?city=paris", &[("if-none-match", "\"other\"")])
        .await;
    let head = gw.request("HEAD", "/v1/venues/7?city=paris", &[]).await;
    assert_hit(&fast, "plain GET");
    assert_hit(&phases, "GET with a conditional that does not match");
    assert_eq!(fast.status, phases.status);
    assert_eq!(fast.body, miss.body, "the stored body");
    assert_eq!(fast.body, phases.body);
    assert_eq!(
        fields(&fast),
        fields(&phases),
        "the same fields, in the same order"
    );
    assert_close(fast.age(), phases.age(), "Age");
    assert!(fast.ttl().unwrap().abs_diff(phases.ttl().unwrap()) <= 1);
    assert!(
        fast.header("aisle-stale").is_none(),
        "stored-only field sent"
    );
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD answered with a body");
    assert_eq!(fields(&head), fields(&fast), "HEAD's fields");
    assert_eq!(origin.count("/v1/venues/7"), 1);

    let after = gw
        .wait_metric(
            "aisle_tier_hits_total",
            &[("tier", "memory")],
            "counts the three hits",
            |v| v >= before + 3.0,
        )
        .await;
    assert_eq!(after, before + 3.0);
}

/// What the fresh-hit path leaves to the phases still gets their answer: a range, a matching
/// conditional, a request's own `no-cache`, a purged entry.
#[tokio::test(flavor = "multi_thread")]
async fn the_phases_still_answer_ranges_conditionals_directives_and_purges() {
    let origin = origin();
    let config = config_for(&origin.url()) + "\n[admin]\npurge_allow = [\"127.0.0.1/32\"]\n";
    let gw = Gateway::start(&config, &[]).await;
    let path = "/v1/venues/8";
    assert_stored_miss(&gw.get(path).await, "first GET");
    assert_hit(&gw.get(path).await, "plain GET");

    let part = gw.get_with(path, &[("range", "bytes=0-3")]).await;
    assert_eq!(part.status, 206, "a range of a stored answer");
    assert_eq!(&part.body[..], b"/v1/");

    let not_modified = gw.get_with(path, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, 304, "a matching conditional");
    assert!(not_modified.body.is_empty());
    assert_eq!(origin.count(path), 1);

    let refused = gw.get_with(path, &[("cache-control", "no-cache")]).await;
    assert!(
        !refused.is_hit(),
        "no-cache answered from the cache: {:?}",
        refused.cache_status()
    );
    assert_eq!(origin.count(path), 2, "no-cache goes to the origin");

    let purge = gw.request("PURGE", path, &[]).await;
    assert_eq!(purge.status, 200, "PURGE: {}", purge.text());
    let after = gw.get(path).await;
    assert!(
        !after.is_hit(),
        "a purged entry served: {:?}",
        after.cache_status()
    );
    assert_eq!(origin.count(path), 3);
}

/// A head's lines as sent (names spelled as sent), without `Age`'s value and `Cache-Status`'s
/// `ttl`, which move with the clock.
fn wire_lines(r: &RawResp) -> Vec<(String, String)> {
    r.headers
        .iter()
        .map(|(k, v)| {
            let k = k.clone();
            let v = match k.to_ascii_lowercase().as_str() {
                "age" => "(age)".to_string(),
                "cache-status" => v
                    .split("; ")
                    .filter(|p| !p.starts_with("ttl="))
                    .collect::<Vec<_>>()
                    .join("; "),
                _ => v.clone(),
            };
            (k, v)
        })
        .collect()
}

/// An origin whose answers carry their own `Age`, `Cache-Status` and `Accept-Ranges` (which a
/// hit replaces) and a repeated field.
fn rich_origin() -> Origin {
    Origin::start(|req| {
        OriginResponse::ok(format!("{} #{}", req.path, req.count))
            .header(
                "cache-control",
                "public, max-age=600, stale-while-revalidate=30",
            )
            .header("x-vendor", "venues")
            .header("age", "40")
            .header("cache-status", "upstream-cdn; hit")
            .header("accept-ranges", "none")
            .header("x-vendor", "caterers")
            .header("etag", "\"v1\"")
    })
}

/// Asks `path` of `gw` over raw HTTP/1.1 until it is a hit (a Redis-only gateway stores the
/// entry after answering), then once more through the cache phases (a conditional that does
/// not match), and checks that both heads are the same, line for line in the order sent.
async fn heads_match_line_for_line(gw: &Gateway, path: &str) {
    let ask = |extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n")
    };
    let timeout = std::time::Duration::from_secs(10);
    let deadline = std::time::Instant::now() + timeout;
    let is_hit = |r: &RawResp| {
        r.header("cache-status")
            .is_some_and(|v| v.starts_with("aisle; hit"))
    };
    let fast = loop {
        let r = raw_request(gw.listen(), ask("").as_bytes(), timeout).await;
        if is_hit(&r) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never became a hit: {:?}",
            r.headers
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let phases = raw_request(
        gw.listen(),
        ask("If-None-Match: \"other\"\r\n").as_bytes(),
        timeout,
    )
    .await;
    assert!(is_hit(&phases), "{:?}", phases.headers);
    assert_eq!((fast.status, &fast.body), (phases.status, &phases.body));
    assert_eq!(
        wire_lines(&fast),
        wire_lines(&phases),
        "the same lines in the same order"
    );
    let count = |name: &str| {
        fast.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    };
    for (name, n) in [
        ("age", 1),
        ("cache-status", 1),
        ("accept-ranges", 1),
        ("connection", 1),
        ("date", 1),
        ("x-vendor", 2),
        ("aisle-stale", 0),
    ] {
        assert_eq!(count(name), n, "{name} lines in {:?}", fast.headers);
    }
    let names: Vec<&str> = fast.headers.iter().map(|(k, _)| k.as_str()).collect();
    for titled in [
        "Age",
        "Date",
        "Content-Length",
        "Cache-Control",
        "Accept-Ranges",
        "Connection",
    ] {
        assert!(
            names.contains(&titled),
            "{titled} spelled otherwise in {names:?}"
        );
    }
    assert!(
        names.contains(&"x-vendor") && names.contains(&"etag"),
        "{names:?}"
    );
    assert_eq!(fast.header("accept-ranges"), Some("bytes"));
    assert_eq!(fast.header("connection"), Some("close"));
    // The entry's age, which counts the origin's 40 s (RFC 9111 §4.2.3), not the stored field.
    let age: u64 = fast.header("age").unwrap().parse().unwrap();
    assert!((40..40 + 30).contains(&age), "age {age}");
}

/// Over HTTP/1 the fresh-hit path writes a memory entry's fields itself instead of building a
/// map of them (vendored pingora-core, patch 7). Its head is the phases' head line for line,
/// in the order sent: the fields a hit sets (`Age`, `Accept-Ranges`, `Cache-Status`) in the
/// place of the stored ones, repeated fields kept, the stored-only field left out, the
/// writer's own `Connection` once, and every name spelled as pingora spells it (`Age`,
/// `Content-Length`: titled; others as stored).
#[tokio::test(flavor = "multi_thread")]
async fn over_http1_a_fresh_hit_head_is_the_phases_head_line_for_line() {
    let origin = rich_origin();
    let gw = Gateway::start(&config_for(&origin.url()), &[]).await;
    heads_match_line_for_line(&gw, "/v1/venues/9?city=rome").await;
    assert_eq!(
        origin.count("/v1/venues/9"),
        1,
        "every answer after the first was a hit"
    );
}

/// The same from Redis alone (`cache.memory = "0"`): a record's decoded header is written as
/// lines without inserting into it, and matches the phases' head line for line.
#[tokio::test(flavor = "multi_thread")]
async fn over_http1_a_redis_only_fresh_hit_head_is_the_phases_head_line_for_line() {
    let redis = RedisServer::start();
    let origin = rich_origin();
    let config = format!(
        "{}{}",
        config_with_cache(&origin.url(), "0", "8MiB"),
        redis.section("t-lines:")
    );
    let gw = Gateway::start(&config, &[]).await;
    heads_match_line_for_line(&gw, "/v1/venues/10?city=oslo").await;
}
