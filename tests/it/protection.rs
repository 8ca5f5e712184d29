//! Protection windows ("Saturday mode", issue 14): a scheduled window on the calendar clock
//! (`AISLE_FAKE_NOW`, test-only) marks answers and softens purges, a forced purge goes through;
//! a manual switch on one instance reaches the other through Redis, and a CDN purge accepted
//! during the window waits in the durable queue and is delivered once after it ends, even when
//! the instance that accepted it was killed; a hard purge accepted during a deferring window is
//! kept and applied once after it ends by a surviving instance.

use crate::harness::cdn::FakeCloudflare;
use crate::harness::redis::{RedisServer, SharedRedis};
use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TOKEN: &str = "protection-test-admin-token";
const CF_ZONE: &str = "0123456789abcdef0123456789abcdef";
const CF_TOKEN: &str = "protection-test-cloudflare-token";

/// `/v/:id` cached a minute, tagged `vendor:<id>`, served stale while revalidating.
const RULES: &str = r#"
[[rule]]
name = "vendor"
match = { method = "GET", path = "/v/:id" }
upstream = "api"
ttl = "60s"
stale_while_revalidate = "10m"
tags = ["vendor:{path.id}"]
"#;

fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Value) -> (u16, Value) {
    let r = fetch_with_body(
        gw.client(),
        method,
        &gw.admin_url(path),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    )
    .await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// Switches the `freeze` window on through A for `duration` and waits until B has it on too;
/// returns the instant taken before the switch was sent (the window ends no earlier than
/// `duration` after it).
async fn switch_for(a: &Gateway, b: &Gateway, duration: &str) -> Instant {
    let switched = Instant::now();
    let (status, v) = admin(
        a,
        "POST",
        "/admin/protection",
        json!({"name": "freeze", "on": true, "for": duration}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    b.wait_metric(
        "aisle_protection_active",
        &[("name", "freeze")],
        "== 1 on B (switched on A)",
        |v| v == 1.0,
    )
    .await;
    switched
}

/// A Saturday morning in New York (2027-06-12 is a Saturday) on the calendar clock: the
/// scheduled window is on; answers say so, a tag purge only marks the answer stale (it is served
/// while revalidating), and a forced purge removes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_window_marks_answers_and_softens_purges() {
    let origin = origin();
    let config = format!(
        "{}\n[admin]\ntoken = \"{TOKEN}\"\n\n[[protection]]\nname = \"wedding-day\"\nwhen = {{ days = [\"sat\"], from = \"07:00\", to = \"23:59\", tz = \"America/New_York\" }}\n",
        config_for(&origin.url())
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_FAKE_NOW", "2027-06-12T10:00:00-04:00")],
    )
    .await;
    gw.wait_metric(
        "aisle_protection_active",
        &[("name", "wedding-day")],
        "== 1",
        |v| v == 1.0,
    )
    .await;
    let first = gw.get("/v/1").await;
    assert!(
        first.cache_status().contains("protection=\"wedding-day\""),
        "{}",
        first.cache_status()
    );
    assert!(gw.get("/v/1").await.is_hit());

    let (status, v) = admin(
        &gw,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:1"]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["protection"]["softened"], json!(true), "{v}");
    assert_eq!(v["protection"]["windows"], json!(["wedding-day"]), "{v}");
    // Softened: the stored answer is still served (stale, revalidated in the background).
    let after = gw.get("/v/1").await;
    assert_eq!(after.text(), "/v/1 #1", "{}", after.cache_status());
    assert!(
        after.cache_status().contains("fwd=stale"),
        "{}",
        after.cache_status()
    );

    // Forced (legal removal): applied as asked, whatever the window.
    let (status, v) = admin(
        &gw,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:2"], "force": true}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["protection"], json!({"forced": true}), "{v}");
    gw.get("/v/2").await;
    admin(
        &gw,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:2"], "force": true}),
    )
    .await;
    let removed = gw.get("/v/2").await;
    assert_eq!(
        removed.text(),
        "/v/2 #2",
        "a forced purge removes the answer"
    );
    assert!(!removed.is_hit());
}

/// The same config on a Friday: the window is off and answers carry no protection parameter.
#[tokio::test(flavor = "multi_thread")]
async fn outside_its_schedule_a_window_changes_nothing() {
    let origin = origin();
    let config = format!(
        "{}\n[admin]\ntoken = \"{TOKEN}\"\n\n[[protection]]\nname = \"wedding-day\"\nwhen = {{ days = [\"sat\"], tz = \"America/New_York\" }}\n",
        config_for(&origin.url())
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_FAKE_NOW", "2027-06-11T10:00:00-04:00")],
    )
    .await;
    let r = gw.get("/v/1").await;
    assert!(
        !r.cache_status().contains("protection"),
        "{}",
        r.cache_status()
    );
    let (_, v) = admin(
        &gw,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:1"]}),
    )
    .await;
    assert!(v.get("protection").is_none(), "{v}");
    assert_eq!(
        gw.metric("aisle_protection_active", &[("name", "wedding-day")])
            .await,
        Some(0.0)
    );
}

/// Two instances on one Redis. A switches the window on for a few seconds; B sees it, accepts
/// a CDN purge (deferred) and is killed; nothing reaches the CDN while the window is on, and A
/// delivers the purge exactly once after it ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_switch_reaches_the_fleet_and_cdn_purges_wait_for_the_end() {
    let redis = RedisServer::start();
    let origin = origin();
    let cf = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let config = format!(
        "{}\n[admin]\ntoken = \"{TOKEN}\"\n{}\n[purge]\nbackoff_base = \"100ms\"\nbackoff_max = \"500ms\"\n\n[cdn.cloudflare]\nbase = \"{}\"\nzone_id = \"{CF_ZONE}\"\ntoken = \"${{CF_TOKEN}}\"\n\n[[protection]]\nname = \"freeze\"\ncdn_purges = \"defer\"\n",
        config_for(&origin.url()),
        redis.section("prot:"),
        cf.base()
    );
    let env = [("CF_TOKEN", CF_TOKEN)];
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(&config, &rules, &env),
        Gateway::start_with_env(&config, &rules, &env)
    );
    let mut b = b;

    let switched = switch_for(&a, &b, "6s").await;
    let (status, v) = admin(
        &b,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:7"]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["cdn"], json!("queued"), "{v}");
    assert_eq!(v["protection"]["deferred"], json!(true), "{v}");
    let (_, q) = admin(&b, "GET", "/admin/purges", Value::Null).await;
    assert_eq!(
        q["held"],
        json!(true),
        "/admin/purges says the queue waits: {q}"
    );
    // The instance that accepted it dies; the purge is in the fleet's queue.
    b.kill_now();
    // The surviving instance accepts one too: its own worker must hold it as well.
    let (status, v) = admin(
        &a,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:8"]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["protection"]["deferred"], json!(true), "{v}");

    poll_until(
        Duration::from_secs(30),
        "both deferred purges to reach the CDN",
        || async {
            let tags = cf.accepted_tags();
            (tags.iter().any(|t| t == "vendor:7") && tags.iter().any(|t| t == "vendor:8"))
                .then_some(())
        },
    )
    .await;
    // Nothing was sent while the window was on: the first CDN request came after its end.
    let first = cf.answered().first().expect("an answered request").0;
    let after = first.duration_since(switched);
    println!("deferred CDN purge delivered {after:?} after the switch (a 6 s window)");
    assert!(
        after >= Duration::from_secs(6),
        "sent {after:?} into a 6 s window"
    );
    // Once: the queue is empty and nothing more arrives.
    poll_until(
        Duration::from_secs(10),
        "A's purge queue to drain",
        || async {
            let (_, q) = admin(&a, "GET", "/admin/purges", Value::Null).await;
            (q["depth"] == json!(0) && q["in_flight"] == json!(0)).then_some(())
        },
    )
    .await;
    let tags = cf.accepted_tags();
    for tag in ["vendor:7", "vendor:8"] {
        assert_eq!(
            tags.iter().filter(|t| t.as_str() == tag).count(),
            1,
            "{tag} once: {tags:?}"
        );
    }
}

/// Two instances on one Redis, a window that defers hard purges switched on by hand for 4 s. A
/// tag purge accepted on B is kept (202, `deferred_purge`), the answer stays a hit on both while
/// the window is on; B is killed; after the window ends A applies it: a miss on A, fetched anew
/// exactly once, and one application in the audit log.
#[tokio::test(flavor = "multi_thread")]
async fn deferred_purges_are_applied_once_after_the_window_by_a_survivor() {
    let redis = RedisServer::start();
    let origin = origin();
    let config = format!(
        "{}\n[admin]\ntoken = \"{TOKEN}\"\n{}\n[[protection]]\nname = \"freeze\"\nhard_purges = \"defer\"\ncdn_purges = \"send\"\n",
        config_for(&origin.url()),
        redis.section("defer:"),
    );
    let rules = [("r.toml", RULES)];
    let (a, b) = tokio::join!(
        Gateway::start(&config, &rules),
        Gateway::start(&config, &rules)
    );
    let mut b = b;
    a.get("/v/3").await;
    assert!(a.get("/v/3").await.is_hit());
    b.get("/v/3").await;
    assert!(b.get("/v/3").await.is_hit());
    let fetched = origin.count("/v/3");

    let switched = switch_for(&a, &b, "4s").await;
    let (status, v) = admin(
        &b,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:3"]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["protection"]["deferred_purge"], json!(true), "{v}");
    assert_eq!(v["protection"]["windows"], json!(["freeze"]), "{v}");
    assert_eq!(v["protection"]["store"], json!("redis"), "{v}");
    let id = v["id"].as_str().expect("an id").to_string();
    // Kept, not applied: still a hit on both while the window is on.
    assert!(a.get("/v/3").await.is_hit(), "a hit on A during the window");
    assert!(b.get("/v/3").await.is_hit(), "a hit on B during the window");
    assert!(
        switched.elapsed() < Duration::from_secs(4),
        "the checks above ran inside the window ({:?}); the machine is too slow for this test",
        switched.elapsed()
    );
    assert_eq!(origin.count("/v/3"), fetched);
    b.kill_now();

    // A applies it once the window is over: the audit log shows the application.
    let applied = |records: &Value| -> Vec<Value> {
        records["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["protection"]["deferred_id"] == json!(id))
            .cloned()
            .collect()
    };
    poll_until(
        Duration::from_secs(30),
        "A to apply the deferred purge",
        || async {
            let (_, records) = admin(&a, "GET", "/admin/audit", Value::Null).await;
            (!applied(&records).is_empty()).then_some(())
        },
    )
    .await;
    println!(
        "deferred purge applied {:?} after the switch (a 4 s window)",
        switched.elapsed()
    );
    assert!(switched.elapsed() >= Duration::from_secs(4));
    let r = a.get("/v/3").await;
    assert!(!r.is_hit(), "purged on A: {}", r.cache_status());
    assert_eq!(origin.count("/v/3"), fetched + 1, "fetched anew once");
    assert!(a.get("/v/3").await.is_hit());
    poll_until(
        Duration::from_secs(10),
        "no purge deferred any more",
        || async {
            let (_, s) = admin(&a, "GET", "/admin/protection", Value::Null).await;
            (s["deferred_purges"] == json!(0)).then_some(())
        },
    )
    .await;
    let (_, records) = admin(&a, "GET", "/admin/audit", Value::Null).await;
    assert_eq!(applied(&records).len(), 1, "applied once: {records}");
    assert_eq!(origin.count("/v/3"), fetched + 1);
}

/// Without Redis a deferred purge is kept in `deferred.log` in `[purge] dir` and applied by the
/// same instance when the window ends.
#[tokio::test(flavor = "multi_thread")]
async fn without_redis_deferred_purges_wait_in_a_local_file() {
    let origin = origin();
    let config = format!(
        "{}\n[admin]\ntoken = \"{TOKEN}\"\n\n[[protection]]\nname = \"freeze\"\nhard_purges = \"defer\"\n",
        config_for(&origin.url())
    );
    let gw = Gateway::start(&config, &[("r.toml", RULES)]).await;
    gw.get("/v/4").await;
    assert!(gw.get("/v/4").await.is_hit());
    let switched = Instant::now();
    let (status, v) = admin(
        &gw,
        "POST",
        "/admin/protection",
        json!({"name": "freeze", "on": true, "for": "3s"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = admin(
        &gw,
        "POST",
        "/admin/invalidate",
        json!({"tags": ["vendor:4"]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["protection"]["deferred_purge"], json!(true), "{v}");
    assert_eq!(v["protection"]["store"], json!("local"), "{v}");
    assert!(gw.get("/v/4").await.is_hit(), "kept, not applied");
    assert!(
        switched.elapsed() < Duration::from_secs(3),
        "checked inside the window"
    );
    assert_eq!(origin.count("/v/4"), 1);
    poll_until(
        Duration::from_secs(20),
        "the deferred purge to be applied",
        || async {
            let (_, s) = admin(&gw, "GET", "/admin/protection", Value::Null).await;
            let (_, a) = admin(&gw, "GET", "/admin/audit", Value::Null).await;
            let applied = a["records"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["protection"]["deferred_id"] == v["id"]);
            (applied && s["deferred_purges"] == json!(0)).then_some(())
        },
    )
    .await;
    assert!(switched.elapsed() >= Duration::from_secs(3));
    let r = gw.get("/v/4").await;
    assert!(!r.is_hit(), "purged after the window: {}", r.cache_status());
    assert_eq!(origin.count("/v/4"), 2);
}
