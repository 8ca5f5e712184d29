//! Warm jobs (issue 15): `POST /admin/warm` fills the cache through the gateway's own listener
//! (URL lists, a rule's grid, the most requested keys), skips what is fresh unless `refresh`,
//! keeps to `concurrency`, warms CDN fronts, survives the death of its instance (Redis), runs on
//! one instance of a fleet, starts on a `[[warm]]` schedule, and `aisle warm` drives it all.
//! Real binary, real Redis, loopback origins; every wait is a bounded poll.

use crate::harness::redis::{RedisServer, SharedRedis};
use crate::harness::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "warm-test-admin-token-41c7a9";

/// `/w/:id` cached a minute (tagged `warmset`); the vendor search keyed on two query values.
const RULES: &str = r#"
[[rule]]
name = "warm-items"
match = { method = "GET", path = "/w/:id" }
upstream = "api"
ttl = "60s"
tags = ["warmset"]

[[rule]]
name = "vendor-search"
match = { method = "GET", path = "/api/vendors/search" }
upstream = "api"
ttl = "30m"
vary = ["query.location", "query.vendorType"]
"#;

fn config(origin: &Origin, tail: &str) -> String {
    format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n{tail}",
        config_for(&origin.url())
    )
}

async fn start(cfg: &str, env: &[(&str, &str)]) -> Gateway {
    let mut all = vec![("AISLE_ADMIN_TOKEN", TOKEN)];
    all.extend_from_slice(env);
    Gateway::start_with_env(cfg, &[("rules.toml", RULES)], &all).await
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    gw.admin_json(method, path, TOKEN, &body.unwrap_or(Value::Null))
        .await
}

async fn post_job(gw: &Gateway, job: Value) -> String {
    let (status, v) = admin(gw, "POST", "/admin/warm", Some(job.clone())).await;
    assert_eq!(status, 202, "POST /admin/warm {job}: {v}");
    v["id"].as_str().expect("an id").to_string()
}

/// Polls `/admin/jobs/{id}` until the job is done.
async fn wait_done(gw: &Gateway, id: &str, within: Duration) -> Value {
    poll_until(within, &format!("warm job {id} done"), || async {
        let (status, v) = admin(gw, "GET", &format!("/admin/jobs/{id}"), None).await;
        (status == 200 && v["state"] == "done").then_some(v)
    })
    .await
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// Answers `<path>?<query> #<count>`; `/w/fail*` answers 500.
fn origin() -> Origin {
    Origin::start(|req| {
        if req.path.starts_with("/w/fail") {
            return OriginResponse::with_status(500).body("broken");
        }
        if req.path.starts_with("/w/nostore") {
            return OriginResponse::ok("mine alone").header("cache-control", "no-store");
        }
        OriginResponse::ok(format!("{}?{} #{}", req.path, req.query, req.count))
    })
}

/// A URL job fills the cache: the origin sees each URL once, the next client request is a hit.
/// The same job again skips every URL (already fresh) without asking the origin; with
/// `refresh: true` it refetches each one.
#[tokio::test(flavor = "multi_thread")]
async fn urls_job_warms_then_skips_fresh_entries_then_refreshes() {
    let origin = origin();
    let gw = start(&config(&origin, ""), &[]).await;
    let urls: Vec<String> = (1..=5).map(|i| format!("/w/{i}")).collect();
    let id = post_job(&gw, json!({ "urls": urls })).await;
    let s = wait_done(&gw, &id, Duration::from_secs(20)).await;
    println!("first job: {s}");
    assert_eq!(
        (n(&s, "total"), n(&s, "done"), n(&s, "warmed")),
        (5, 5, 5),
        "{s}"
    );
    assert_eq!((n(&s, "skipped"), n(&s, "errors")), (0, 0), "{s}");
    assert_eq!(s["eta_seconds"], json!(0.0));
    for u in &urls {
        assert_eq!(origin.count(u), 1, "{u} fetched once");
        assert_hit(&gw.get(u).await, u);
    }
    let again = post_job(&gw, json!({ "urls": urls })).await;
    let s = wait_done(&gw, &again, Duration::from_secs(20)).await;
    println!("second job: {s}");
    assert_eq!((n(&s, "skipped"), n(&s, "warmed")), (5, 0), "{s}");
    assert_eq!(origin.total(), 5, "a fresh entry is not fetched again");
    // Refreshed at 20 requests a second: 5 requests are at least 4 x 50 ms apart end to end.
    let refresh = post_job(&gw, json!({ "urls": urls, "refresh": true, "rate": 20 })).await;
    let s = wait_done(&gw, &refresh, Duration::from_secs(20)).await;
    assert_eq!((n(&s, "warmed"), n(&s, "skipped")), (5, 0), "{s}");
    let took = n(&s, "finished_ms") - n(&s, "started_ms");
    println!("refresh job at rate 20/s: 5 requests in {took} ms");
    assert!(took >= 200, "rate 20/s: 5 requests took {took} ms");
    for u in &urls {
        assert_eq!(origin.count(u), 2, "{u} refetched by refresh");
        // The refreshed entry is what clients get.
        assert_eq!(gw.get(u).await.text(), format!("{u}? #2"));
    }
    // The secret header that forces the refetch never reaches the origin.
    assert!(origin
        .requests()
        .iter()
        .all(|r| r.header("aisle-warm").is_none()));
    // A client cannot force a refetch with a header of its own.
    let r = gw
        .get_with("/w/1", &[("aisle-warm", "guess;refresh")])
        .await;
    assert_hit(&r, "a client's Aisle-Warm changes nothing");
    let m = gw
        .metric("aisle_warm_requests_total", &[("result", "warmed")])
        .await;
    assert_eq!(m, Some(10.0));
}

/// A grid job renders every combination through the rule (2 x 3 = 6 searches, each counted at
/// the origin) and never has more than `concurrency` requests at the origin at once, measured
/// from the origin's arrival times: with a fixed delay D, requests in flight never exceed N
/// exactly when no D-long window holds more than N arrivals.
#[tokio::test(flavor = "multi_thread")]
async fn grid_job_renders_every_combination_within_its_concurrency() {
    const DELAY: Duration = Duration::from_millis(150);
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = arrivals.clone();
    let origin = Origin::start(move |req| {
        seen.lock().unwrap().push(Instant::now());
        OriginResponse::ok(format!("{}?{}", req.path, req.query)).delay(DELAY)
    });
    let gw = start(&config(&origin, ""), &[]).await;
    let id = post_job(
        &gw,
        json!({
            "rule": "vendor-search",
            "grid": {"query.location": ["NYC", "LA"], "query.vendorType": ["florist", "dj", "venue"]},
            "concurrency": 2
        }),
    )
    .await;
    let s = wait_done(&gw, &id, Duration::from_secs(30)).await;
    println!("grid job: {s}");
    assert_eq!((n(&s, "total"), n(&s, "warmed")), (6, 6), "{s}");
    let mut queries: Vec<String> = origin.requests().iter().map(|r| r.query.clone()).collect();
    queries.sort();
    let mut expected = Vec::new();
    for l in ["LA", "NYC"] {
        for t in ["dj", "florist", "venue"] {
            expected.push(format!("location={l}&vendorType={t}"));
        }
    }
    expected.sort();
    assert_eq!(queries, expected);
    let times = arrivals.lock().unwrap().clone();
    let max_in_flight = times
        .iter()
        .map(|a| {
            times
                .iter()
                .filter(|b| **b >= *a && **b < *a + DELAY)
                .count()
        })
        .max()
        .unwrap_or(0);
    println!("grid job: at most {max_in_flight} requests at the origin at once (concurrency 2)");
    assert!(max_in_flight <= 2, "{max_in_flight} in flight");
    assert_eq!(max_in_flight, 2, "the job does use its concurrency");
    // Every combination answers from cache now.
    assert_hit(
        &gw.get("/api/vendors/search?vendorType=dj&location=LA")
            .await,
        "a warmed search",
    );
}

/// `{"top": K}` warms the K most requested keys of recent traffic: after clients' traffic and a
/// purge of all of it, the job fetches exactly the three most requested again. A URL requested
/// more often whose answers the origin marks `no-store` is not counted: warming it would store
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn top_job_warms_the_most_requested_after_a_purge() {
    let origin = origin();
    let gw = start(&config(&origin, ""), &[]).await;
    for (path, times) in [
        ("/w/nostore", 9),
        ("/w/a", 6),
        ("/w/b", 5),
        ("/w/c", 4),
        ("/w/d", 1),
        ("/w/e", 1),
    ] {
        for _ in 0..times {
            gw.get(path).await;
        }
    }
    let (status, v) = admin(
        &gw,
        "POST",
        "/admin/invalidate",
        Some(json!({"tags": ["warmset"]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let before = origin.total();
    let id = post_job(&gw, json!({"top": 3, "since": "1h"})).await;
    let s = wait_done(&gw, &id, Duration::from_secs(20)).await;
    println!("top job: {s}");
    assert_eq!((n(&s, "total"), n(&s, "warmed")), (3, 3), "{s}");
    assert_eq!(origin.total(), before + 3);
    for p in ["/w/a", "/w/b", "/w/c"] {
        assert_eq!(origin.count(p), 2, "{p} warmed after the purge");
        assert_hit(&gw.get(p).await, p);
    }
    assert_eq!(origin.count("/w/d"), 1, "not among the top 3");
    assert_eq!(origin.count("/w/nostore"), 9, "uncacheable: not counted");
}

/// `warm_via`: each URL is also requested through every CDN front, with a report per front.
#[tokio::test(flavor = "multi_thread")]
async fn warm_via_requests_each_url_through_every_front() {
    let origin = origin();
    let front_a = Origin::start(|_| OriginResponse::ok("edge a"));
    let front_b = Origin::start(|req| {
        if req.path == "/w/2" {
            OriginResponse::with_status(503)
        } else {
            OriginResponse::ok("edge b")
        }
    });
    let gw = start(&config(&origin, ""), &[]).await;
    let id = post_job(
        &gw,
        json!({"urls": ["/w/1", "/w/2", "/w/3"], "warm_via": [front_a.url(), front_b.url()]}),
    )
    .await;
    let s = wait_done(&gw, &id, Duration::from_secs(20)).await;
    println!("warm_via job: {}", s["fronts"]);
    for p in ["/w/1", "/w/2", "/w/3"] {
        assert_eq!(
            (front_a.count(p), front_b.count(p)),
            (1, 1),
            "{p} through both fronts"
        );
    }
    let fronts = s["fronts"].as_array().expect("fronts");
    assert_eq!(fronts[0]["front"], json!(front_a.url()));
    assert_eq!((n(&fronts[0], "ok"), n(&fronts[0], "errors")), (3, 0));
    assert_eq!((n(&fronts[1], "ok"), n(&fronts[1], "errors")), (2, 1));
    // The secret stays home: fronts get plain requests.
    assert!(front_a
        .requests()
        .iter()
        .all(|r| r.header("aisle-warm").is_none()));
}

/// Malformed jobs are refused with the reason and start nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_jobs_are_refused_and_start_nothing() {
    let origin = origin();
    let gw = start(&config(&origin, ""), &[]).await;
    let auth = format!("Bearer {TOKEN}");
    let r = fetch_with_body(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/warm"),
        &[("authorization", &auth)],
        "{\"urls\": [",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("bad warm job"), "{}", r.text());
    for (job, says) in [
        (
            json!({"rule": "no-such-rule", "grid": {"query.x": ["1"]}}),
            "unknown rule",
        ),
        (
            json!({"urls": ["/w/1"], "regions": ["eu-west"]}),
            "\"regions\" needs [region]",
        ),
        (
            json!({"rule": "vendor-search", "grid": {"query.location": ["a"]}, "concurrency": 0}),
            "concurrency",
        ),
        (json!({"urls": ["/w/1"], "top": 3}), "only one"),
        (json!({"urls": ["ftp://x/y"]}), "neither a path"),
    ] {
        let (status, v) = admin(&gw, "POST", "/admin/warm", Some(job.clone())).await;
        assert_eq!(status, 400, "{job}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(says),
            "{job}: {v}"
        );
        assert_eq!(v["error"]["code"], "invalid_field", "{job}: {v}");
    }
    for id in ["nope", "..%2f..%2fx", "w1%7Bx%7D"] {
        let (status, _) = admin(&gw, "GET", &format!("/admin/jobs/{id}"), None).await;
        assert_eq!(status, 404, "{id}");
    }
    let r = fetch(gw.client(), "POST", &gw.admin_url("/admin/warm"), &[]).await;
    assert_eq!(r.status, 401, "the admin token is required");
    let (_, list) = admin(&gw, "GET", "/admin/jobs", None).await;
    assert_eq!(list["jobs"], json!([]), "nothing started");
    assert_eq!(origin.total(), 0);
}

/// Durable: the instance running a job dies (SIGKILL) midway; a new instance on the same Redis
/// takes the job over once its lease lapses and finishes it, each URL fetched at most twice.
/// With two instances up, a job runs on one of them only.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_survives_its_instance_and_runs_on_one() {
    let redis = RedisServer::start();
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("{} #{}", req.path, req.count)).delay(Duration::from_millis(100))
    });
    let cfg = config(&origin, &redis.section("warm-durable:"));
    let mut a = start(&cfg, &[]).await;
    let urls: Vec<String> = (0..30).map(|i| format!("/w/d{i}")).collect();
    let id = post_job(&a, json!({"urls": urls, "concurrency": 2})).await;
    poll_until(
        Duration::from_secs(20),
        "the job to be a third done",
        || async {
            let (_, v) = admin(&a, "GET", &format!("/admin/jobs/{id}"), None).await;
            (v["done"].as_u64().unwrap_or(0) >= 10).then_some(())
        },
    )
    .await;
    a.kill_now();
    let fetched_before = origin.total();
    assert!(
        fetched_before < 30,
        "killed before the end ({fetched_before} fetched)"
    );
    let b = start(&cfg, &[]).await;
    let s = wait_done(&b, &id, Duration::from_secs(30)).await;
    println!(
        "taken over: {s}; origin saw {} requests for 30 URLs",
        origin.total()
    );
    assert_eq!((n(&s, "total"), n(&s, "done")), (30, 30), "{s}");
    assert_eq!(n(&s, "errors"), 0, "{s}");
    for u in &urls {
        let c = origin.count(u);
        assert!((1..=2).contains(&c), "{u} fetched {c} times");
    }
    assert!(
        origin.total() <= 30 + 2,
        "at most `concurrency` URLs fetched twice"
    );

    // Two instances on one Redis: the job runs on the one it was posted to only, and the
    // other shows its progress from Redis.
    let c = start(&cfg, &[]).await;
    let more: Vec<String> = (0..8).map(|i| format!("/w/e{i}")).collect();
    let id = post_job(&b, json!({"urls": more})).await;
    let s = wait_done(&c, &id, Duration::from_secs(20)).await;
    assert_eq!(n(&s, "warmed"), 8, "{s}");
    let mut sent = 0.0;
    for r in ["warmed", "skipped", "error"] {
        sent += c
            .metric("aisle_warm_requests_total", &[("result", r)])
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(sent, 0.0, "the idle instance sent nothing");
    for u in &more {
        assert_eq!(origin.count(u), 1, "{u}");
    }
}

/// `[[warm]]` with the calendar clock faked to just before 05:00: the job starts once at
/// 05:00, and `/admin/jobs` shows the schedule and its next run (the next day).
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_job_runs_once_when_due() {
    let origin = origin();
    let cfg = config(
        &origin,
        "\n[[warm]]\nname = \"morning\"\nschedule = \"daily 05:00\"\ntz = \"UTC\"\njob = { urls = [\"/w/s1\", \"/w/s2\"] }\n",
    );
    let gw = start(&cfg, &[("AISLE_FAKE_NOW", "2026-06-01T04:59:57Z")]).await;
    let (_, list) = admin(&gw, "GET", "/admin/jobs", None).await;
    assert_eq!(list["schedules"][0]["name"], "morning", "{list}");
    assert_eq!(
        list["schedules"][0]["next_run"], "2026-06-01T05:00:00Z",
        "{list}"
    );
    let job = poll_until(
        Duration::from_secs(15),
        "the scheduled job done",
        || async {
            let (_, v) = admin(&gw, "GET", "/admin/jobs", None).await;
            v["jobs"]
                .as_array()?
                .iter()
                .find(|j| j["schedule"] == "morning" && j["state"] == "done")
                .cloned()
        },
    )
    .await;
    println!("scheduled job: {job}");
    assert_eq!(n(&job, "warmed"), 2);
    let (_, list) = admin(&gw, "GET", "/admin/jobs", None).await;
    assert_eq!(
        list["schedules"][0]["next_run"], "2026-06-02T05:00:00Z",
        "{list}"
    );
    assert_eq!(list["schedules"][0]["last_job"], job["id"]);
    let started = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["schedule"] == "morning")
        .count();
    assert_eq!(started, 1, "one run per due time: {list}");
    assert_eq!((origin.count("/w/s1"), origin.count("/w/s2")), (1, 1));
}

/// `aisle warm` starts a job, follows it and exits 0 when every request succeeded, 1 when the
/// origin failed some.
#[tokio::test(flavor = "multi_thread")]
async fn the_warm_command_reports_and_fails_on_errors() {
    let origin = origin();
    let gw = start(&config(&origin, ""), &[]).await;
    let config_path = gw.config_path().display().to_string();
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(crate::harness::aisle_bin())
                .arg("warm")
                .args(&args)
                .env("AISLE_ADMIN_TOKEN", TOKEN)
                .stdin(Stdio::null())
                .output()
                .expect("run aisle warm")
        })
        .await
        .expect("join")
    };
    let ok = run(vec![
        "--config".into(),
        config_path.clone(),
        "--url".into(),
        "/w/c1".into(),
        "--url".into(),
        "/w/c2".into(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&ok.stderr);
    println!("aisle warm (ok): {stderr}");
    assert_eq!(ok.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("2/2"), "{stderr}");
    assert_eq!(origin.count("/w/c1"), 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, json!({"urls": ["/w/c3", "/w/fail1"]}).to_string()).unwrap();
    let failed = run(vec![
        "--config".into(),
        config_path,
        "--file".into(),
        file.display().to_string(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    println!("aisle warm (one failing URL): {stderr}");
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 error"), "{stderr}");
}

/// While a protection window is on, a job pauses (state `paused`, nothing sent); when the
/// window ends it goes on and finishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_pauses_while_a_protection_window_is_on() {
    let origin = origin();
    let cfg = config(&origin, "\n[[protection]]\nname = \"freeze\"\n");
    let gw = start(&cfg, &[]).await;
    let switch = |on: bool| json!({"name": "freeze", "on": on});
    let (status, v) = admin(&gw, "POST", "/admin/protection", Some(switch(true))).await;
    assert_eq!(status, 200, "{v}");
    gw.wait_metric("aisle_protection_active", &[], "== 1", |v| v == 1.0)
        .await;
    let id = post_job(&gw, json!({"urls": ["/w/p1", "/w/p2"]})).await;
    poll_until(Duration::from_secs(10), "the job paused", || async {
        let (_, v) = admin(&gw, "GET", &format!("/admin/jobs/{id}"), None).await;
        (v["state"] == "paused").then_some(())
    })
    .await;
    assert_eq!(origin.total(), 0, "nothing is sent during the window");
    let (status, v) = admin(&gw, "POST", "/admin/protection", Some(switch(false))).await;
    assert_eq!(status, 200, "{v}");
    let s = wait_done(&gw, &id, Duration::from_secs(20)).await;
    assert_eq!(n(&s, "warmed"), 2, "{s}");
}

/// Popularity is fleet-wide through Redis: clients' traffic on one instance, once its minute is
/// flushed to Redis (polled, at most a minute), makes a `top` job on another instance warm the
/// most requested keys.
#[tokio::test(flavor = "multi_thread")]
async fn top_is_fleet_wide_through_redis() {
    let redis = RedisServer::start();
    let origin = origin();
    let cfg = config(&origin, &redis.section("warm-pop:"));
    let (a, b) = tokio::join!(start(&cfg, &[]), start(&cfg, &[]));
    for (path, times) in [("/w/x", 3), ("/w/y", 2), ("/w/z", 1)] {
        for _ in 0..times {
            a.get(path).await;
        }
    }
    let started = Instant::now();
    poll_until(
        Duration::from_secs(75),
        "A's minute of popularity in Redis",
        || async { (!redis.keys("warm-pop:warm:pop:*").is_empty()).then_some(()) },
    )
    .await;
    println!(
        "popularity reached Redis {:?} after the traffic",
        started.elapsed()
    );
    let (status, v) = admin(
        &b,
        "POST",
        "/admin/invalidate",
        Some(json!({"tags": ["warmset"]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = post_job(&b, json!({"top": 2})).await;
    let s = wait_done(&b, &id, Duration::from_secs(20)).await;
    assert_eq!((n(&s, "total"), n(&s, "warmed")), (2, 2), "{s}");
    assert_eq!(
        (
            origin.count("/w/x"),
            origin.count("/w/y"),
            origin.count("/w/z")
        ),
        (2, 2, 1)
    );
}

/// What fuzzing `POST /admin/warm` against `docs/admin-api.yaml` found: a `top` job looking back
/// further than popularity is kept (`"since": "100y"`) read one Redis hour after another back
/// to 1970 while the admin request waited; it is answered at once now. A rate too small for the
/// pacer to wait (`1e-300`) panicked the job's task and left the job `running` for ever; it is
/// refused. `null` for an option is refused rather than read as absent.
#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_jobs_are_answered_at_once_or_refused() {
    let redis = RedisServer::start();
    let origin = origin();
    let gw = start(&config(&origin, &redis.section("warm-fuzzed:")), &[]).await;
    let asked = Instant::now();
    let (status, v) = tokio::time::timeout(
        Duration::from_secs(10),
        admin(
            &gw,
            "POST",
            "/admin/warm",
            Some(json!({"top": 5, "since": "100y"})),
        ),
    )
    .await
    .expect("a top job reaching back 100 years is answered within 10 s");
    assert_eq!(status, 202, "{v}");
    println!("top job with since=100y answered in {:?}", asked.elapsed());
    for (job, says) in [
        (json!({"urls": ["/w/1"], "rate": 1e-300}), "at least 0.001"),
        (json!({"urls": null, "top": 5}), "null"),
    ] {
        let (status, v) = admin(&gw, "POST", "/admin/warm", Some(job.clone())).await;
        assert_eq!(status, 400, "{job}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(says),
            "{job}: {v}"
        );
    }
    let (_, list) = admin(&gw, "GET", "/admin/jobs", None).await;
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(1), "{list}");
}
