//! Fleet coherence through Redis faults (issue 10, item 1), against two real `aisle` gateways
//! sharing a private `redis-server`: an invalidation accepted by one instance while Redis is
//! hung (SIGSTOP) or down (an append-only Redis killed and restarted) must still reach the other
//! instance once Redis is back, and the purged copy Redis kept must not be served again.
//!
//! What the other instance serves is polled with a deadline; every wait prints how long it took.

use std::time::{Duration, Instant};

use crate::harness::redis::{wait_plain_entry, wait_subscribed, RedisServer, SharedRedis};
use crate::harness::{assert_hit, assert_stored_miss, fetch_with_body, Gateway, Origin};
use crate::harness::{config_for, OriginResponse, Resp};
use serde_json::{json, Value};

const TOKEN: &str = "coherence-admin-token-51c0e7";
const ENV: &[(&str, &str)] = &[("AISLE_ADMIN_TOKEN", TOKEN)];

/// `/c/<kind>/<id>` is cached for 10 minutes and tagged `item:<id>`.
const RULES: &str = r#"
[[rule]]
name = "coherent"
match = { method = "GET", path = "/c/:kind/:id" }
upstream = "api"
ttl = "600s"
tags = ["item:{path.id}"]
"#;

/// How long the other instance may take to stop serving a purged answer once Redis is back.
const CONVERGE: Duration = Duration::from_secs(20);

/// GETs answer `<path> #<n>`, so every fill is recognisable.
fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

async fn start_pair(redis: &RedisServer, prefix: &str, origin: &Origin) -> (Gateway, Gateway) {
    let cfg = format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n{}",
        config_for(&origin.url()),
        redis.section(prefix)
    );
    let rules = [("rules.toml", RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(&cfg, &rules, ENV),
        Gateway::start_with_env(&cfg, &rules, ENV)
    );
    wait_subscribed(&a, "A").await;
    wait_subscribed(&b, "B").await;
    (a, b)
}

/// `POST /admin/invalidate` on `gw`, which must be accepted; the answer and how long it took.
async fn invalidate(gw: &Gateway, body: Value) -> (Value, Duration) {
    let r = fetch_with_body(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/invalidate"),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(
        r.status,
        202,
        "POST /admin/invalidate {body}: {:?}",
        r.text()
    );
    let v = serde_json::from_slice(&r.body).expect("a JSON answer");
    (v, r.elapsed)
}

/// Fills `path` on A (into Redis too) and reads it on B (a hit, from Redis, now also in B's
/// memory); the body both serve.
async fn fill_both(
    redis: &RedisServer,
    prefix: &str,
    a: &Gateway,
    b: &Gateway,
    path: &str,
) -> Resp {
    let r = a.get(path).await;
    assert_stored_miss(&r, &format!("first GET {path} on A"));
    wait_plain_entry(redis, prefix, &r.body).await;
    let rb = b.get(path).await;
    assert_hit(&rb, &format!("GET {path} on B (from Redis)"));
    assert_eq!(rb.body, r.body);
    r
}

/// Polls B until its answer for `path` is no longer `old`; `None` if it still was at the
/// deadline. Prints what B served last.
async fn wait_not_old(b: &Gateway, path: &str, old: &Resp, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let r = b.get(path).await;
        assert_eq!(r.status, 200, "GET {path} on B");
        if r.body != old.body {
            return Some(start.elapsed());
        }
        if start.elapsed() >= deadline {
            println!(
                "B still serves the purged answer for {path} after {deadline:?}: {:?} (Cache-Status: {})",
                r.text(),
                r.cache_status()
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 10 item 1: Redis hung (SIGSTOP) while A accepts a tag purge and a URL purge. B's
/// subscription never drops (the TCP connection stays open), so only a missed heartbeat or a
/// sequence gap tells it that it missed something; A must re-send what Redis did not take.
#[tokio::test(flavor = "multi_thread")]
async fn purges_accepted_while_redis_hangs_reach_the_other_instance() {
    let redis = RedisServer::start();
    let origin = origin();
    let prefix = "coh-stop:";
    let (a, b) = start_pair(&redis, prefix, &origin).await;
    let tagged = "/c/tag/t1";
    let url = "/c/url/u1";
    let kept = "/c/kept/k1";
    let old_tagged = fill_both(&redis, prefix, &a, &b, tagged).await;
    let old_url = fill_both(&redis, prefix, &a, &b, url).await;
    let old_kept = fill_both(&redis, prefix, &a, &b, kept).await;

    redis.pause();
    let paused = Instant::now();
    let (tag_answer, tag_took) = invalidate(&a, json!({"tags": ["item:t1"]})).await;
    let (url_answer, url_took) =
        invalidate(&a, json!({"urls": [format!("http://127.0.0.1{url}")]})).await;
    println!("during the stall: tag purge answered {tag_answer} in {tag_took:?}, URL purge {url_answer} in {url_took:?}");
    // A applies both at once, whatever Redis does.
    for (path, old) in [(tagged, &old_tagged), (url, &old_url)] {
        let r = a.get(path).await;
        assert_ne!(
            r.body, old.body,
            "A serves a fresh {path} right after its own purge"
        );
    }
    // The stall lasts 4 s; B keeps answering from memory meanwhile.
    while paused.elapsed() < Duration::from_secs(4) {
        assert_eq!(b.get(kept).await.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    redis.resume();
    println!("redis resumed after {:?}", paused.elapsed());

    let t = wait_not_old(&b, tagged, &old_tagged, CONVERGE).await;
    let u = wait_not_old(&b, url, &old_url, CONVERGE).await;
    println!(
        "after SIGCONT, B stopped serving the purged answers: tag purge {t:?}, URL purge {u:?}"
    );
    assert!(
        t.is_some() && u.is_some(),
        "B must stop serving answers A purged during the stall (tag {t:?}, url {u:?})"
    );
    assert_eq!(
        tag_answer["fleet"], "pending",
        "the 202 says the fleet could not be told yet: {tag_answer}"
    );
    // What was not purged is still served from the cache (possibly refilled from Redis after
    // B dropped its memory tier), and the original fill is what it serves.
    let r = b.get(kept).await;
    assert_eq!(r.body, old_kept.body, "an unpurged entry keeps its answer");
    let pending = a
        .wait_metric("aisle_invalidation_pending", &[], "== 0 once told", |v| {
            v == 0.0
        })
        .await;
    assert_eq!(pending, 0.0);
    let relayed = a.metric("aisle_invalidation_relayed_total", &[]).await;
    let mut resyncs = Vec::new();
    for reason in ["heartbeat", "sequence", "resubscribed"] {
        let n = b
            .metric("aisle_invalidation_resyncs_total", &[("reason", reason)])
            .await;
        resyncs.push((reason, n));
    }
    println!("A re-sent {relayed:?} writes; B resynced {resyncs:?}");
    // The stall kept B's subscription open: only its own missing heartbeat could tell it that
    // it might have missed something.
    assert!(
        resyncs[0].1.is_some_and(|n| n >= 1.0),
        "B resynced after missing its own heartbeat: {resyncs:?}"
    );
}

/// Issue 10 item 1: an append-only Redis killed while A accepts a URL purge, and restarted with
/// the entry it had persisted. B must not serve the purged copy it finds there.
#[tokio::test(flavor = "multi_thread")]
async fn a_url_purge_during_a_redis_restart_is_not_undone_by_its_aof() {
    let mut redis = RedisServer::start_aof();
    let origin = origin();
    let prefix = "coh-aof:";
    let (a, b) = start_pair(&redis, prefix, &origin).await;
    let url = "/c/url/aof";
    let r = a.get(url).await;
    assert_stored_miss(&r, "first GET on A");
    let key = wait_plain_entry(&redis, prefix, &r.body).await;

    redis.kill();
    let (answer, took) = invalidate(&a, json!({"urls": [format!("http://127.0.0.1{url}")]})).await;
    println!("with Redis down: URL purge answered {answer} in {took:?}");
    redis.restart_keeping_data();
    println!(
        "restarted Redis holds the purged entry (reloaded from its AOF): {}",
        redis.exists(&key)
    );
    let restarted = Instant::now();
    let u = wait_not_old(&b, url, &r, CONVERGE).await;
    println!("after the restart, B stopped serving the purged copy after {u:?}");
    assert!(
        u.is_some(),
        "B must not keep serving a copy purged while Redis was down"
    );
    // Once A has told the fleet, the purged copy is gone from Redis as well (the key may hold
    // a fresh fill by then).
    let old = r.body.clone();
    crate::harness::poll_until(CONVERGE, "the purged copy to leave Redis", || {
        let gone = redis
            .get_bytes(&key)
            .is_none_or(|v| !v.windows(old.len()).any(|w| w == &old[..]));
        async move { gone.then_some(()) }
    })
    .await;
    println!(
        "purged copy gone from Redis {:?} after its restart",
        restarted.elapsed()
    );
    assert_eq!(answer["fleet"], "pending", "{answer}");
}
