//! Regions (issue 15): two regions on loopback, each with its own real `redis-server` and two
//! real gateways. An invalidation accepted in one region must reach both gateways of the other
//! through the relay (Redis Streams), be applied there once (by id, even when delivered again),
//! never be sent to the CDN by the receiving region, and survive the peer's Redis being down and
//! the forwarding gateway being killed.
//!
//! Everything is polled with a deadline; each wait prints how long it took.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::cdn::FakeCloudflare;
use crate::harness::redis::{connect, wait_plain_entry, wait_subscribed, RedisServer, SharedRedis};
use crate::harness::{
    assert_hit, assert_stored_miss, config_for, fetch, poll_until, Gateway, Origin, OriginResponse,
    Resp,
};
use serde_json::{json, Value};

const TOKEN: &str = "regions-admin-token-7f3a19";
const CF_ZONE: &str = "023e105f4ecef8ad9ca31a8372d0c353";
const CF_TOKEN: &str = "regions-cf-token-000111222333";
const ENV: &[(&str, &str)] = &[("AISLE_ADMIN_TOKEN", TOKEN), ("CF_TOKEN", CF_TOKEN)];

/// `/c/<kind>/<id>` is cached for 10 minutes and tagged `item:<id>`.
const RULES: &str = r#"
[[rule]]
name = "regional"
match = { method = "GET", path = "/c/:kind/:id" }
upstream = "api"
ttl = "600s"
tags = ["item:{path.id}"]
"#;

/// How long a relayed invalidation may take to show in the other region (the relay's own
/// target is well under a second; this covers a loaded test machine).
const REACH: Duration = Duration::from_secs(20);
/// How long queued invalidations may take to arrive once the peer's Redis is back (includes a
/// forwarding lease changing hands after its holder was killed: 5 s).
const CATCH_UP: Duration = Duration::from_secs(40);

const US: (&str, &str) = ("us-east", "us:");
const EU: (&str, &str) = ("eu-west", "eu:");

fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

/// gateway.toml of region `me` (on `own` Redis) with `peer` (on `peer_redis`); the same
/// Cloudflare fake in every region when `cdn` is given.
fn region_config(
    origin: &Origin,
    me: (&str, &str),
    own: &RedisServer,
    peer: (&str, &str),
    peer_redis: &RedisServer,
    cdn: Option<&FakeCloudflare>,
) -> String {
    let cdn = cdn.map_or(String::new(), |cf| {
        format!(
            "\n[cdn]\n[cdn.cloudflare]\nbase = \"{}\"\nzone_id = \"{CF_ZONE}\"\ntoken = \"${{CF_TOKEN}}\"\n",
            cf.base()
        )
    });
    format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n{cdn}{}\n[region]\nname = \"{}\"\n\
         [[region.peer]]\nname = \"{}\"\nredis = \"{}\"\nprefix = \"{}\"\n",
        config_for(&origin.url()),
        own.section(me.1),
        me.0,
        peer.0,
        peer_redis.url(),
        peer.1,
    )
}

async fn start_two(cfg: &str, region: &str) -> (Gateway, Gateway) {
    let rules = [("rules.toml", RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(cfg, &rules, ENV),
        Gateway::start_with_env(cfg, &rules, ENV)
    );
    wait_subscribed(&a, &format!("{region} 1")).await;
    wait_subscribed(&b, &format!("{region} 2")).await;
    (a, b)
}

/// `POST /admin/invalidate` on `gw`, which must be accepted; its answer.
async fn invalidate(gw: &Gateway, body: Value) -> Value {
    let (status, v) = gw
        .admin_json("POST", "/admin/invalidate", TOKEN, &body)
        .await;
    assert_eq!(status, 202, "POST /admin/invalidate {body}: {v}");
    assert!(v.is_object(), "a JSON answer: {v}");
    v
}

/// The region's fleet audit log (read from its Redis by `gw`).
async fn audit(gw: &Gateway) -> Vec<Value> {
    let (status, v) = gw
        .admin_json("GET", "/admin/audit", TOKEN, &Value::Null)
        .await;
    assert_eq!(status, 200, "GET /admin/audit: {v}");
    assert!(v.is_object(), "a JSON answer: {v}");
    v["records"].as_array().cloned().unwrap_or_default()
}

/// How many audit records each of `ids` has in the region `gw` belongs to.
async fn audit_counts(gw: &Gateway, ids: &[String]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = ids.iter().map(|i| (i.clone(), 0)).collect();
    for rec in audit(gw).await {
        if let Some(n) = rec["id"].as_str().and_then(|id| counts.get_mut(id)) {
            *n += 1;
        }
    }
    counts
}

async fn readyz(gw: &Gateway) -> Value {
    let r = fetch(gw.client(), "GET", &gw.admin_url("/readyz"), &[]).await;
    serde_json::from_slice(&r.body).expect("readyz JSON")
}

/// Sum of a metric over gateways.
async fn metric_sum(gws: &[&Gateway], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for gw in gws {
        sum += gw.metric(name, labels).await.unwrap_or(0.0);
    }
    sum
}

/// Polls `gw` until its answer for `path` is not `old` (a refill after the purge).
async fn wait_refilled(gw: &Gateway, name: &str, path: &str, old: &Resp) -> Duration {
    let start = Instant::now();
    poll_until(
        REACH,
        &format!("{name} to stop serving the purged {path}"),
        || async {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200, "GET {path} on {name}");
            (r.body != old.body).then_some(())
        },
    )
    .await;
    start.elapsed()
}

/// Which of `gws` forwards to `peer` (its `/readyz` says so), polled with a deadline.
async fn forwarder(gws: &[&Gateway], peer: &str) -> usize {
    poll_until(
        REACH,
        &format!("an instance forwarding to {peer}"),
        || async {
            for (i, gw) in gws.iter().enumerate() {
                if readyz(gw).await["region"]["peers"][peer]["forwarding"] == json!(true) {
                    return Some(i);
                }
            }
            None
        },
    )
    .await
}

/// A tag purge and a URL purge accepted in us-east reach both eu-west gateways; eu-west audits
/// them under the same ids with their origin region and sends nothing to the CDN, which gets
/// each purge exactly once (from us-east); a redelivered record is not applied again.
#[tokio::test(flavor = "multi_thread")]
async fn an_invalidation_reaches_the_other_regions_gateways_and_the_cdn_once() {
    let (us_redis, eu_redis) = (RedisServer::start(), RedisServer::start());
    let origin = origin();
    let cf = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let us_cfg = region_config(&origin, US, &us_redis, EU, &eu_redis, Some(&cf));
    let eu_cfg = region_config(&origin, EU, &eu_redis, US, &us_redis, Some(&cf));
    let ((a1, _a2), (b1, b2)) = tokio::join!(start_two(&us_cfg, "us"), start_two(&eu_cfg, "eu"));

    // Both eu-west gateways hold both answers (B1 filled them, B2 reads them from Redis).
    let mut old = Vec::new();
    for path in ["/c/tag/t1", "/c/url/u1"] {
        let r = b1.get(path).await;
        assert_stored_miss(&r, &format!("first GET {path} on eu-west 1"));
        wait_plain_entry(&eu_redis, EU.1, &r.body).await;
        assert_hit(&b2.get(path).await, &format!("GET {path} on eu-west 2"));
        assert_hit(&b1.get(path).await, &format!("GET {path} on eu-west 1"));
        old.push(r);
    }

    let started = Instant::now();
    let tag = invalidate(&a1, json!({"tags": ["item:t1"]})).await;
    let url = invalidate(&a1, json!({"urls": ["http://127.0.0.1/c/url/u1"]})).await;
    assert_eq!(tag["regions"], "queued", "{tag}");
    assert_eq!(url["regions"], "queued", "{url}");
    for (gw, name) in [(&b1, "eu-west 1"), (&b2, "eu-west 2")] {
        let t = wait_refilled(gw, name, "/c/tag/t1", &old[0]).await;
        let u = wait_refilled(gw, name, "/c/url/u1", &old[1]).await;
        println!("{name}: tag purge seen after {t:?}, URL purge after {u:?}");
    }
    println!(
        "both eu-west gateways saw both us-east purges {:?} after they were accepted",
        started.elapsed()
    );

    let ids: Vec<String> = [&tag, &url]
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_string())
        .collect();
    let records = poll_until(REACH, "eu-west's audit records of both", || async {
        let recs: Vec<Value> = audit(&b1)
            .await
            .into_iter()
            .filter(|r| ids.iter().any(|id| r["id"] == json!(id)))
            .collect();
        (recs.len() >= 2).then_some(recs)
    })
    .await;
    assert_eq!(records.len(), 2, "one eu-west record per id: {records:#?}");
    for r in &records {
        assert_eq!(r["region"], "us-east", "the origin region is audited: {r}");
        assert_eq!(r["cdn"], "none", "eu-west sends no CDN purge: {r}");
    }

    // The CDN (configured in both regions) gets each purge once: from us-east.
    poll_until(REACH, "Cloudflare to get both purges", || async {
        (!cf.accepted_tags().is_empty() && !cf.accepted_files().is_empty()).then_some(())
    })
    .await;
    assert_eq!(cf.accepted_tags(), ["item:t1"], "{:?}", cf.accepted());
    assert_eq!(
        cf.accepted_files(),
        ["http://127.0.0.1/c/url/u1"],
        "{:?}",
        cf.accepted()
    );
    assert!(cf.violations().is_empty(), "{:?}", cf.violations());

    // A record delivered again (as after a forwarder crashed between delivering and
    // acknowledging) is dropped by id: the refilled entry stays a hit on both.
    for gw in [&b1, &b2] {
        assert_hit(&gw.get("/c/tag/t1").await, "the refilled entry on eu-west");
    }
    let plan = json!({
        "tags": ["item:t1"], "told": ["item:t1"], "urls": [], "prefixes": [], "events": [],
        "soft": false, "source": "admin", "actor": "test", "cdn": false, "protection": null,
    });
    let mut con = connect(&eu_redis.url()).expect("connect eu-west redis");
    let _: String = ::redis::cmd("XADD")
        .arg(format!("{}region:in", EU.1))
        .arg("*")
        .arg(&[
            ("v", "1"),
            ("id", ids[0].as_str()),
            ("region", "us-east"),
            ("at", "1"),
            ("force", "0"),
            ("plan", plan.to_string().as_str()),
        ])
        .query(&mut con)
        .expect("XADD a redelivery");
    let dup = [("peer", "us-east")];
    poll_until(REACH, "eu-west to count the redelivery", || async {
        (metric_sum(&[&b1, &b2], "aisle_region_duplicates_total", &dup).await == 1.0).then_some(())
    })
    .await;
    for gw in [&b1, &b2] {
        assert_hit(
            &gw.get("/c/tag/t1").await,
            "after the redelivery, on eu-west",
        );
    }
    assert_eq!(audit_counts(&b1, &ids).await.values().sum::<usize>(), 2);
    let applied = metric_sum(&[&b1, &b2], "aisle_region_applied_total", &dup).await;
    assert_eq!(applied, 2.0, "two invalidations applied in eu-west");
    let ready = readyz(&b1).await;
    println!("eu-west 1 /readyz: {ready}");
    assert_eq!(ready["region"]["name"], "eu-west");
    assert_eq!(ready["region"]["peers"]["us-east"]["connected"], true);
    assert_eq!(
        cf.request_count(),
        2,
        "nothing more reached the CDN: {:?}",
        cf.accepted()
    );
}

/// With eu-west's Redis down, 50 invalidations accepted in us-east queue (half of them before
/// and half after the forwarding gateway is killed and started again); once eu-west's Redis is
/// back, every one is applied there exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn invalidations_queue_while_the_peer_is_down_and_arrive_once() {
    let us_redis = RedisServer::start();
    let mut eu_redis = RedisServer::start_aof();
    let origin = origin();
    let us_cfg = region_config(&origin, US, &us_redis, EU, &eu_redis, None);
    let eu_cfg = region_config(&origin, EU, &eu_redis, US, &us_redis, None);
    let ((a1, a2), (b1, b2)) = tokio::join!(start_two(&us_cfg, "us"), start_two(&eu_cfg, "eu"));
    let mut us = [a1, a2];
    let f = forwarder(&[&us[0], &us[1]], EU.0).await;
    println!("us-east {} forwards to eu-west", f + 1);

    eu_redis.kill();
    let mut ids = Vec::new();
    let other = 1 - f;
    for i in 0..25 {
        let v = invalidate(&us[other], json!({"tags": [format!("bulk:{i}")]})).await;
        assert_eq!(v["regions"], "queued", "us-east's Redis took it: {v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let backlog = [("peer", "eu-west")];
    us[f]
        .wait_metric("aisle_region_relay_backlog", &backlog, ">= 25", |v| {
            v >= 25.0
        })
        .await;
    let ready = readyz(&us[f]).await;
    println!("forwarder's /readyz with eu-west down: {ready}");
    assert_eq!(ready["region"]["peers"]["eu-west"]["connected"], false);

    // The forwarder dies with what it read pending; a new process takes its place.
    us[f].kill_now();
    for i in 25..50 {
        let v = invalidate(&us[other], json!({"tags": [format!("bulk:{i}")]})).await;
        assert_eq!(v["regions"], "queued", "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    us[f] = Gateway::start_with_env(&us_cfg, &[("rules.toml", RULES)], ENV).await;
    wait_subscribed(&us[f], "us restarted").await;
    let took_over = Instant::now();
    let f2 = forwarder(&[&us[0], &us[1]], EU.0).await;
    println!(
        "us-east {} forwards after the restart ({:?})",
        f2 + 1,
        took_over.elapsed()
    );
    us[f2]
        .wait_metric("aisle_region_relay_backlog", &backlog, "== 50", |v| {
            v == 50.0
        })
        .await;

    eu_redis.restart_keeping_data();
    let back = Instant::now();
    let counts = poll_until(CATCH_UP, "all 50 in eu-west's audit log", || async {
        let c = audit_counts(&b1, &ids).await;
        c.values().all(|&n| n >= 1).then_some(c)
    })
    .await;
    println!(
        "all 50 applied in eu-west {:?} after its Redis returned",
        back.elapsed()
    );
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let from_us = [("peer", "us-east")];
    poll_until(REACH, "eu-west's applied count to settle", || async {
        (metric_sum(&[&b1, &b2], "aisle_region_applied_total", &from_us).await == 50.0)
            .then_some(())
    })
    .await;
    us[f2]
        .wait_metric("aisle_region_relay_backlog", &backlog, "== 0", |v| v == 0.0)
        .await;
    let lag = metric_sum(
        &[&b1, &b2],
        "aisle_region_relay_lag_seconds_count",
        &from_us,
    )
    .await;
    assert_eq!(lag, 50.0, "every application is in the lag histogram");
    // Counted once more, later: still 50 records.
    let again = audit_counts(&b1, &ids).await;
    assert!(again.values().all(|&n| n == 1), "{again:?}");
    // The dead forwarder's consumer was emptied and removed: the group holds its holder only.
    let mut con = connect(&us_redis.url()).expect("connect us-east redis");
    let consumers: Vec<::redis::Value> = ::redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("{}region:out:eu-west", US.1))
        .arg("relay")
        .query(&mut con)
        .expect("XINFO CONSUMERS");
    assert_eq!(consumers.len(), 1, "{consumers:?}");
}

/// An invalidation accepted while the accepting region's own Redis is down waits in memory
/// (`"regions": "pending"`) and reaches the peer once that Redis is back, even though it
/// restarted empty (the stream, its group and the lease are made again).
#[tokio::test(flavor = "multi_thread")]
async fn an_invalidation_accepted_while_the_own_redis_is_down_is_relayed_when_it_returns() {
    let (mut us_redis, eu_redis) = (RedisServer::start(), RedisServer::start());
    let origin = origin();
    let us_cfg = region_config(&origin, US, &us_redis, EU, &eu_redis, None);
    let eu_cfg = region_config(&origin, EU, &eu_redis, US, &us_redis, None);
    let rules = [("rules.toml", RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(&us_cfg, &rules, ENV),
        Gateway::start_with_env(&eu_cfg, &rules, ENV)
    );
    wait_subscribed(&a, "us").await;
    wait_subscribed(&b, "eu").await;
    forwarder(&[&a], EU.0).await;
    let old = b.get("/c/tag/p1").await;
    assert_stored_miss(&old, "first GET on eu-west");
    assert_hit(&b.get("/c/tag/p1").await, "second GET on eu-west");

    us_redis.kill();
    let v = invalidate(&a, json!({"tags": ["item:p1"]})).await;
    assert_eq!(v["regions"], "pending", "us-east's Redis is down: {v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(readyz(&a).await["region"]["unsent"], 1);
    assert_hit(
        &b.get("/c/tag/p1").await,
        "eu-west before us-east's Redis returns",
    );

    us_redis.restart();
    let took = wait_refilled(&b, "eu-west", "/c/tag/p1", &old).await;
    println!("eu-west purged {took:?} after us-east's Redis returned");
    let counts = poll_until(REACH, "eu-west's audit record", || async {
        let c = audit_counts(&b, std::slice::from_ref(&id)).await;
        (c[&id] >= 1).then_some(c)
    })
    .await;
    assert_eq!(counts[&id], 1, "{counts:?}");
    assert_eq!(readyz(&a).await["region"]["unsent"], 0);
}

/// `POST /admin/warm` on `gw`: (status, JSON answer).
async fn post_warm(gw: &Gateway, job: &Value) -> (u16, Value) {
    gw.admin_json("POST", "/admin/warm", TOKEN, job).await
}

/// `GET /admin/jobs/{id}` on `gw` until the job is done; its status.
async fn warm_done(gw: &Gateway, id: &str) -> Value {
    poll_until(REACH, &format!("warm job {id} done"), || async {
        let r = fetch(
            gw.client(),
            "GET",
            &gw.admin_url(&format!("/admin/jobs/{id}")),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status == 200 && v["state"] == "done").then_some(v)
    })
    .await
}

/// Warm jobs target regions: a job posted in us-east with `"regions": ["eu-west"]` is written
/// into eu-west's Redis and run by eu-west's gateway (its origin sees each URL once, the next
/// eu-west client request is a hit) while us-east's origin sees nothing. An unknown region is
/// a 400 naming `regions[i]`; with eu-west's Redis down, a job for both regions still runs in
/// us-east and says eu-west is `"unavailable"`.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_job_runs_in_the_regions_it_names() {
    let us_redis = RedisServer::start();
    let mut eu_redis = RedisServer::start();
    let (us_origin, eu_origin) = (origin(), origin());
    let us_cfg = region_config(&us_origin, US, &us_redis, EU, &eu_redis, None);
    let eu_cfg = region_config(&eu_origin, EU, &eu_redis, US, &us_redis, None);
    let rules = [("rules.toml", RULES)];
    let (us, eu) = tokio::join!(
        Gateway::start_with_env(&us_cfg, &rules, ENV),
        Gateway::start_with_env(&eu_cfg, &rules, ENV)
    );
    let urls: Vec<String> = (1..=4).map(|i| format!("/c/warm/{i}")).collect();

    let started = Instant::now();
    let (status, answer) = post_warm(&us, &json!({"urls": urls, "regions": ["eu-west"]})).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.get("id").is_none(), "no job here: {answer}");
    let eu_id = answer["regions"]["eu-west"]
        .as_str()
        .unwrap_or_else(|| panic!("an id for eu-west: {answer}"))
        .to_string();
    assert_ne!(eu_id, "unavailable", "{answer}");
    let s = warm_done(&eu, &eu_id).await;
    println!(
        "eu-west ran the job posted in us-east in {:?}: {s}",
        started.elapsed()
    );
    assert_eq!(
        (s["total"].as_u64(), s["warmed"].as_u64()),
        (Some(4), Some(4)),
        "{s}"
    );
    assert_eq!(s["errors"].as_u64(), Some(0), "{s}");
    assert_eq!(s["from_region"], "us-east", "{s}");
    for u in &urls {
        assert_eq!(eu_origin.count(u), 1, "{u}: eu-west's origin saw it once");
        assert_hit(&eu.get(u).await, u);
    }
    assert_eq!(us_origin.total(), 0, "us-east's origin sees none of it");

    let (status, refused) =
        post_warm(&us, &json!({"urls": urls, "regions": ["eu-west", "mars"]})).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["field"], "regions[1]", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown region \"mars\""),
        "{refused}"
    );

    eu_redis.kill();
    let started = Instant::now();
    let (status, answer) = post_warm(
        &us,
        &json!({"urls": urls, "regions": ["us-east", "eu-west"]}),
    )
    .await;
    println!(
        "with eu-west's Redis down, answered in {:?}: {answer}",
        started.elapsed()
    );
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["regions"]["eu-west"], "unavailable", "{answer}");
    let us_id = answer["id"].as_str().expect("the job here").to_string();
    assert_eq!(answer["regions"]["us-east"], us_id.as_str(), "{answer}");
    let s = warm_done(&us, &us_id).await;
    assert_eq!(s["warmed"].as_u64(), Some(4), "{s}");
    for u in &urls {
        assert_eq!(us_origin.count(u), 1, "{u}: warmed in us-east");
        assert_hit(&us.get(u).await, u);
    }
    assert_eq!(eu_origin.total(), 4, "nothing more reached eu-west");
}
