//! Upstream quotas (issue 14): two instances share one quota through a real Redis, only
//! requests that go upstream count (hits and cache-lock followers do not), an exhausted quota
//! serves what is stored however old (`on_exhausted = "stale"`) or answers 429 with
//! `Retry-After` (`"reject"`), and without Redis each instance allows its `fleet_size` share.

use crate::harness::redis::{RedisServer, SharedRedis};
use crate::harness::*;
use std::time::Duration;

/// `/q/:id` cached a minute; `/s/:id` cached one second (stale soon after, with no stale
/// window of its own).
const RULES: &str = r#"
[[rule]]
name = "quota-long"
match = { method = "GET", path = "/q/:id" }
upstream = "api"
ttl = "60s"

[[rule]]
name = "quota-short"
match = { method = "GET", path = "/s/:id" }
upstream = "api"
ttl = "1s"
"#;

/// Answers `<path> #<n>`; `/q/slow` after 300 ms (so followers queue on its cache lock).
fn origin() -> Origin {
    Origin::start(|req| {
        let resp = OriginResponse::ok(format!("{} #{}", req.path, req.count));
        if req.path == "/q/slow" {
            resp.delay(Duration::from_millis(300))
        } else {
            resp
        }
    })
}

/// gateway.toml for `origin` with `quota` on upstream `api`, then `tail` (a `[redis]` section).
fn config(origin: &Origin, quota: &str, tail: &str) -> String {
    format!("{}quota = {quota}\n{tail}", config_for(&origin.url()))
}

/// A 429 from the quota: `Retry-After` in whole seconds, at least 1, and the detail.
fn assert_quota_429(r: &Resp, what: &str) {
    assert_eq!(r.status, 429, "{what}: {} {}", r.cache_status(), r.text());
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After in seconds: {:?}", r.headers));
    assert!(after >= 1, "{what}: Retry-After {after}");
    assert!(
        r.cache_status().contains("detail=quota-exhausted"),
        "{what}: {}",
        r.cache_status()
    );
}

/// Two instances, one Redis, 10 per minute: 30 cold requests across both reach the origin
/// exactly 10 times; the 20 others are 429 with `Retry-After` (nothing is stored for them).
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_one_quota_through_redis() {
    let redis = RedisServer::start();
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 10, per = "1m", on_exhausted = "stale" }"#,
        &redis.section("quota-fleet:"),
    );
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(Gateway::start(&cfg, &rules), Gateway::start(&cfg, &rules));
    let (mut ok, mut rejected) = (0, 0);
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.get(&format!("/q/{i}")).await;
        if r.status == 200 {
            assert_eq!(r.text(), format!("/q/{i} #1"));
            ok += 1;
        } else {
            assert_quota_429(&r, &format!("/q/{i}"));
            rejected += 1;
        }
    }
    assert_eq!(
        origin.total(),
        10,
        "the origin saw {} requests for a fleet quota of 10",
        origin.total()
    );
    assert_eq!((ok, rejected), (10, 20));
    let rejections = a
        .metric(
            "aisle_upstream_quota_rejections_total",
            &[("upstream", "api")],
        )
        .await
        .unwrap_or(0.0)
        + b.metric(
            "aisle_upstream_quota_rejections_total",
            &[("upstream", "api")],
        )
        .await
        .unwrap_or(0.0);
    assert_eq!(rejections, 20.0);
    assert_eq!(
        a.metric("aisle_upstream_quota_remaining", &[("upstream", "api")])
            .await,
        Some(0.0)
    );
}

/// Hits, answers read from the other instance's fill through Redis and followers of a cache
/// lock take nothing: after one fill of `/q/hot`, 40 hits and one slow fill with 9 followers,
/// exactly 8 of 20 cold requests still go upstream (10 - hot - slow).
#[tokio::test(flavor = "multi_thread")]
async fn hits_and_coalesced_waiters_never_consume_quota() {
    let redis = RedisServer::start();
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 10, per = "1h" }"#,
        &redis.section("quota-hits:"),
    );
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(Gateway::start(&cfg, &rules), Gateway::start(&cfg, &rules));
    assert_eq!(a.get("/q/hot").await.status, 200);
    for i in 0..40 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.get("/q/hot").await;
        assert_eq!(r.text(), "/q/hot #1", "{}", r.cache_status());
    }
    assert_eq!(
        a.metric("aisle_upstream_quota_remaining", &[("upstream", "api")])
            .await,
        Some(9.0),
        "hits left the quota as the one fill did"
    );
    let slow: Vec<Resp> = futures_util::future::join_all((0..10).map(|_| a.get("/q/slow"))).await;
    for r in &slow {
        assert_eq!(r.text(), "/q/slow #1", "{}", r.cache_status());
    }
    assert_eq!(
        origin.count("/q/slow"),
        1,
        "one fill for ten concurrent requests"
    );
    let mut ok = 0;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.get(&format!("/q/cold{i}")).await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_quota_429(&r, &format!("/q/cold{i}"));
        }
    }
    assert_eq!(ok, 8, "10 - /q/hot - /q/slow");
    assert_eq!(origin.total(), 10);
}

/// Primes `/s/1` and `/s/2` (the rest of the quota), then polls `/s/1` until it is no longer a
/// fresh hit; returns that answer.
async fn exhaust_then_wait_stale(gw: &Gateway, origin: &Origin) -> Resp {
    let before = origin.total();
    assert_eq!(gw.get("/s/1").await.status, 200);
    assert_eq!(gw.get("/s/2").await.status, 200);
    assert_eq!(origin.total(), before + 2);
    poll_until(
        Duration::from_secs(10),
        "/s/1 no longer a fresh hit",
        || async move {
            let r = gw.get("/s/1").await;
            (!r.is_hit()).then_some(r)
        },
    )
    .await
}

/// `on_exhausted = "stale"`: an entry past its TTL and without any stale window is served as
/// it is, marked `quota-exhausted`; a request with nothing stored gets 429 + `Retry-After`.
#[tokio::test(flavor = "multi_thread")]
async fn exhausted_stale_serves_any_stored_entry_else_429() {
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 2, per = "1h", on_exhausted = "stale" }"#,
        "",
    );
    let gw = Gateway::start(&cfg, &[("r.toml", RULES)]).await;
    let stale = exhaust_then_wait_stale(&gw, &origin).await;
    assert_eq!(stale.status, 200, "{}", stale.cache_status());
    assert_eq!(stale.text(), "/s/1 #1");
    let cs = stale.cache_status();
    assert!(
        cs.contains("fwd=stale") && cs.contains("detail=quota-exhausted"),
        "{cs}"
    );
    // Served again (however old), still without asking the origin.
    let again = gw.get("/s/1").await;
    assert_eq!(again.text(), "/s/1 #1", "{}", again.cache_status());
    assert_quota_429(&gw.get("/s/3").await, "/s/3 (nothing stored)");
    assert_eq!(origin.total(), 2);
}

/// `on_exhausted = "reject"`: 429 at once, even for a stored (stale) entry; fresh hits are
/// still served.
#[tokio::test(flavor = "multi_thread")]
async fn exhausted_reject_answers_429_at_once() {
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 3, per = "1h", on_exhausted = "reject" }"#,
        "",
    );
    let gw = Gateway::start(&cfg, &[("r.toml", RULES)]).await;
    assert_eq!(gw.get("/q/kept").await.status, 200);
    let r = exhaust_then_wait_stale(&gw, &origin).await;
    assert_quota_429(&r, "/s/1 (stored, stale)");
    assert!(
        gw.get("/q/kept").await.is_hit(),
        "a fresh hit needs no quota"
    );
    assert_eq!(origin.total(), 3);
}

/// Without Redis each instance allows its share: 10 per hour over a fleet of 2 is 5 here.
#[tokio::test(flavor = "multi_thread")]
async fn without_redis_each_instance_allows_its_fleet_share() {
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 10, per = "1h", fleet_size = 2 }"#,
        "",
    );
    let gw = Gateway::start(&cfg, &[("r.toml", RULES)]).await;
    let mut ok = 0;
    for i in 0..10 {
        let r = gw.get(&format!("/q/{i}")).await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_quota_429(&r, &format!("/q/{i}"));
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(origin.total(), 5);
}

/// `aisle check` points at a bad quota with its position and what to write instead.
#[test]
fn a_bad_quota_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let cfg = config_for("http://127.0.0.1:9")
        .replace("{listen}", "127.0.0.1:0")
        .replace("{admin}", "127.0.0.1:0")
        + "quota = { requests = 0, per = \"1h\", on_exhausted = \"later\" }\n";
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = std::process::Command::new(crate::harness::aisle_bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let line = line_of(&cfg, "quota =");
    assert!(
        text.contains(&format!("gateway.toml:{line}:")),
        "no position line {line}: {text}"
    );
    assert!(text.contains("quota.requests must be at least 1"), "{text}");
    assert!(text.contains("\"reject\""), "{text}");
}

/// Redis goes away: each instance falls back to its share (10 per hour over a fleet of 2),
/// so the two together still send the origin at most the quota.
#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_each_instance_allows_its_fleet_share() {
    let mut redis = RedisServer::start();
    let origin = origin();
    let cfg = config(
        &origin,
        r#"{ requests = 10, per = "1h", fleet_size = 2 }"#,
        &redis.section("quota-down:"),
    );
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(Gateway::start(&cfg, &rules), Gateway::start(&cfg, &rules));
    redis.kill();
    for (name, gw) in [("A", &a), ("B", &b)] {
        let mut ok = 0;
        for i in 0..10 {
            let r = gw.get(&format!("/q/{name}{i}")).await;
            if r.status == 200 {
                ok += 1;
            } else {
                assert_quota_429(&r, &format!("/q/{name}{i}"));
            }
        }
        assert_eq!(ok, 5, "instance {name} without Redis");
    }
    assert_eq!(origin.total(), 10);
}
