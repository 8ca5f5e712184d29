//! Hot reload (issue 12): `SIGHUP` and `POST /admin/reload` pick up a rules edit through one
//! code path; a broken edit keeps the running configuration serving and reports its problems
//! as `file:line:col`; entries of an unchanged rule stay hits while a changed rule's old
//! entries are not served under its new definition; reloads under load fail no request.

use std::time::{Duration, Instant};

use crate::harness::*;

const TOKEN: &str = "reload-test-token";
const SIGHUP: u32 = 1;
/// Five times the watcher's debounce (200 ms): long enough that a pending reload would show.
const DEBOUNCE_TIMES_5: Duration = Duration::from_millis(1000);

/// The tests that count reloads by one trigger turn the file watcher off (`watch = false`), so
/// their own writes do not reload too (and an ignored setting would show as extra reloads).
fn config(origin_url: &str) -> String {
    without_watch(&watched_config(origin_url))
}

/// The file watcher on (its default).
fn watched_config(origin_url: &str) -> String {
    format!("{}\n[admin]\ntoken = \"{TOKEN}\"\n", config_for(origin_url))
}

/// A rule named `name` on `path`, cached for a minute, plus `extra` lines.
fn rule(name: &str, path: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nmatch = {{ path = \"{path}\" }}\nupstream = \"api\"\nttl = \"60s\"\n{extra}"
    )
}

/// Before: `kept` (never edited) and `edited` (keyed on `query.v`, gains a normalizer later).
fn rules_v1() -> String {
    format!(
        "{}{}",
        rule("kept", "/kept", ""),
        rule("edited", "/edited", "vary = [\"query.v\"]\n")
    )
}

/// After: `kept` unchanged; `edited` lowercases `query.v` (for `v=abc` the key bytes are the
/// same as before: only the rule's generation tells the old entry from the new definition);
/// a new `fresh` rule.
fn rules_v2() -> String {
    format!(
        "{}{}{}",
        rule("kept", "/kept", ""),
        rule(
            "edited",
            "/edited",
            "vary = [\"query.v\"]\nnormalize = { \"query.v\" = \"lowercase\" }\n"
        ),
        rule("fresh", "/fresh", "")
    )
}

/// The body names the path and the per-path request number, so a cached body is recognisable.
fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

async fn start() -> (Origin, Gateway) {
    let origin = origin();
    let gw = Gateway::start(&config(&origin.url()), &[("r.toml", &rules_v1())]).await;
    (origin, gw)
}

async fn admin_reload(gw: &Gateway) -> Resp {
    fetch(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/reload"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await
}

async fn reloads(gw: &Gateway, result: &str) -> f64 {
    gw.metric("aisle_config_reloads_total", &[("result", result)])
        .await
        .unwrap_or(0.0)
}

/// Stores `/kept` and `/edited` and checks both hit; `/fresh` (no rule yet) is not cached.
async fn warm(gw: &Gateway) {
    for path in ["/kept", "/edited?v=abc"] {
        assert_stored_miss(&gw.get(path).await, path);
        assert_hit(&gw.get(path).await, path);
    }
    gw.get("/fresh").await;
    let again = gw.get("/fresh").await;
    assert!(!again.is_hit(), "no rule caches /fresh yet: {again:?}");
}

/// After v2 is in force: `kept` still hits its old entry, `edited` misses (its definition
/// changed), `fresh` starts caching.
async fn check_v2(gw: &Gateway, origin: &Origin) {
    let kept = gw.get("/kept").await;
    assert_hit(&kept, "/kept after the reload (rule unchanged)");
    assert_eq!(
        kept.text(),
        "/kept #1",
        "the entry stored before the reload"
    );
    let edited = gw.get("/edited?v=abc").await;
    assert!(
        !edited.is_hit(),
        "/edited changed its normalizers: the entry stored under the old definition must not be served, got {:?} {:?}",
        edited.cache_status(),
        edited.text()
    );
    println!(
        "/edited after the reload: {:?} {:?}",
        edited.cache_status(),
        edited.text()
    );
    assert_eq!(edited.text(), "/edited #2", "fetched anew");
    assert_hit(&gw.get("/edited?v=abc").await, "/edited again under v2");
    let before = origin.count("/fresh");
    assert_stored_miss(&gw.get("/fresh").await, "/fresh under the new rule");
    assert_hit(&gw.get("/fresh").await, "/fresh under the new rule");
    assert_eq!(origin.count("/fresh"), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_rules_and_does_not_kill() {
    let (origin, mut gw) = start().await;
    warm(&gw).await;
    poll_until(Duration::from_secs(10), "a SIGHUP handler", || async {
        gw.catches_signal(SIGHUP).then_some(())
    })
    .await;
    gw.write_rules("r.toml", &rules_v2());
    gw.signal("HUP");
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
    assert!(gw.running(), "SIGHUP must not end the process");
    check_v2(&gw, &origin).await;
    assert!(gw.running());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reload_reports_changes_and_refuses_a_broken_edit() {
    let (origin, gw) = start().await;
    warm(&gw).await;

    let anonymous = fetch(gw.client(), "POST", &gw.admin_url("/admin/reload"), &[]).await;
    assert_eq!(anonymous.status, 401, "the admin token is needed");

    // A restart-only setting changed in the same edit is reported, not applied.
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace("memory = \"64MiB\"", "memory = \"32MiB\""),
    )
    .unwrap();
    gw.write_rules("r.toml", &rules_v2());
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    println!("reload answer: {body}");
    let changes = &body["changes"];
    assert_eq!(changes["added"], serde_json::json!(["fresh"]));
    // The reload is audited (who, what changed, the new configuration's hash), and
    // `aisle_config_info` names that hash, one series at a time.
    let audit = fetch(
        gw.client(),
        "GET",
        &gw.admin_url("/admin/audit?since=0"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    let records: serde_json::Value = serde_json::from_slice(&audit.body).unwrap();
    let reload = records["records"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["source"] == "reload"))
        .unwrap_or_else(|| panic!("no reload record: {records}"))
        .clone();
    assert_eq!(reload["actor"], "admin", "{reload}");
    assert_eq!(
        reload["reload"]["added"],
        serde_json::json!(["fresh"]),
        "{reload}"
    );
    let hash = reload["reload"]["hash"].as_str().expect("hash").to_string();
    assert_eq!(hash.len(), 16, "{hash}");
    let metrics = gw.metrics().await;
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("aisle_config_info{"))
        .collect();
    assert_eq!(
        info,
        [format!("aisle_config_info{{hash=\"{hash}\"}} 1").as_str()]
    );
    assert_eq!(changes["changed"], serde_json::json!(["edited"]));
    assert_eq!(changes["removed"], serde_json::json!([]));
    assert_eq!(
        changes["needs_restart"],
        serde_json::json!(["[cache] memory"])
    );
    assert_eq!(reloads(&gw, "ok").await, 1.0);
    check_v2(&gw, &origin).await;

    // Broken TOML: refused with file:line:col, and v2 keeps serving (hits stay hits).
    let broken = format!(
        "{}[[rule]]\nname = \"half\nmatch = {{ path = \"/h\" }}\n",
        rules_v2()
    );
    let broken_line = broken.lines().count() - 1;
    gw.write_rules("r.toml", &broken);
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    println!("broken reload answer: {body}");
    let errors = body["errors"].as_array().expect("errors list");
    assert!(!errors.is_empty());
    let first = errors[0].as_str().unwrap();
    let file = gw.config_path().parent().unwrap().join("rules/r.toml");
    assert!(
        first.starts_with(&format!("{}:{broken_line}:", file.display())),
        "expected {}:{broken_line}:col: ..., got {first}",
        file.display()
    );
    assert_eq!(reloads(&gw, "error").await, 1.0);
    assert!(
        gw.logs().contains(first),
        "the problem is logged as its file:line:col line"
    );
    assert_hit(&gw.get("/kept").await, "/kept after a refused reload");
    assert_hit(&gw.get("/fresh").await, "/fresh after a refused reload");

    // The same through SIGHUP: refused, counted, the process lives on.
    poll_until(Duration::from_secs(10), "a SIGHUP handler", || async {
        gw.catches_signal(SIGHUP).then_some(())
    })
    .await;
    gw.signal("HUP");
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "error")],
        ">= 2",
        |v| v >= 2.0,
    )
    .await;
    assert_hit(&gw.get("/kept").await, "/kept after a refused SIGHUP");
}

/// A bounded client loop runs while the rules are reloaded back and forth (by both
/// triggers): every request is answered 200 with its path's body.
#[tokio::test(flavor = "multi_thread")]
async fn reloads_under_load_fail_no_request() {
    let (_origin, gw) = start().await;
    warm(&gw).await;
    poll_until(Duration::from_secs(10), "a SIGHUP handler", || async {
        gw.catches_signal(SIGHUP).then_some(())
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let client = client();
        let stop = stop.clone();
        let paths = ["/kept", "/edited?v=abc", "/fresh"];
        let base = gw.url("");
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = c;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let path = paths[i % paths.len()];
                i += 1;
                match client.get(format!("{base}{path}")).send().await {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(t) if path.starts_with(t.split(' ').next().unwrap_or("-")) => ok += 1,
                        other => failed.push(format!("{path}: body {other:?}")),
                    },
                    Ok(r) => failed.push(format!("{path}: status {}", r.status())),
                    Err(e) => failed.push(format!("{path}: {e}")),
                }
            }
            (ok, failed)
        }));
    }
    let rounds = 10;
    for round in 0..rounds {
        let rules = if round % 2 == 0 {
            rules_v2()
        } else {
            rules_v1()
        };
        gw.write_rules("r.toml", &rules);
        if round % 4 == 3 {
            let want = reloads(&gw, "ok").await + 1.0;
            gw.signal("HUP");
            gw.wait_metric(
                "aisle_config_reloads_total",
                &[("result", "ok")],
                "one more",
                |v| v >= want,
            )
            .await;
        } else {
            let r = admin_reload(&gw).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "requests across {rounds} reloads: {ok} ok, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 0);
    assert_eq!(reloads(&gw, "ok").await, rounds as f64);
    assert_eq!(reloads(&gw, "error").await, 0.0);
}

/// `[server] watch` (the default): a saved rules edit is picked up without a signal or a call,
/// a burst of writes (an editor's save, a `git checkout`) is one reload, a broken save keeps
/// the running rules serving, and an edit of `gateway.toml` itself is picked up too.
#[tokio::test(flavor = "multi_thread")]
async fn the_file_watcher_reloads_on_edits() {
    let origin = origin();
    let gw = Gateway::start(&watched_config(&origin.url()), &[("r.toml", &rules_v1())]).await;
    warm(&gw).await;
    // The watcher starts with the process; a first edit may land before it watches, so the
    // edit is repeated (bounded) until a reload shows.
    let deadline = Instant::now() + Duration::from_secs(20);
    'edit: loop {
        assert!(Instant::now() < deadline, "no reload after editing r.toml");
        gw.write_rules("r.toml", &rules_v2());
        let retry = Instant::now() + Duration::from_secs(2);
        while Instant::now() < retry {
            if reloads(&gw, "ok").await >= 1.0 {
                break 'edit;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    check_v2(&gw, &origin).await;

    // A burst: 10 saves 50 ms apart (less than the debounce) end in one reload, perhaps two on
    // a loaded machine; reloading per write would be 10.
    let before = reloads(&gw, "ok").await;
    for i in 0..10 {
        let rules = if i % 2 == 0 { rules_v1() } else { rules_v2() };
        gw.write_rules("r.toml", &rules);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        "the burst's reload",
        |v| v > before,
    )
    .await;
    // Quiet for several debounce periods: nothing else is pending.
    let mut settled = before;
    let quiet = Instant::now() + DEBOUNCE_TIMES_5;
    while Instant::now() < quiet {
        settled = settled.max(reloads(&gw, "ok").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let burst = settled - before;
    println!("10 writes 50 ms apart: {burst} reload(s)");
    assert!(
        (1.0..=2.0).contains(&burst),
        "{burst} reloads for one burst"
    );

    // A broken save is refused: counted, and the running rules keep serving.
    gw.write_rules("r.toml", "[[rule]]\nname = \"broken\"\nmatch = { path = ");
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "error")],
        ">= 1",
        |v| v >= 1.0,
    )
    .await;
    assert_hit(&gw.get("/kept").await, "/kept after a refused save");
    let ok = reloads(&gw, "ok").await;
    gw.write_rules("r.toml", &rules_v2());
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        "the repaired save's reload",
        |v| v > ok,
    )
    .await;

    // gateway.toml itself: a new admin token is in force after the save.
    let ok = reloads(&gw, "ok").await;
    gw.edit_config(|text| text.replace(TOKEN, "rotated-admin-token-0001"));
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        "the gateway.toml reload",
        |v| v > ok,
    )
    .await;
    let old = admin_reload(&gw).await;
    assert_eq!(old.status, 401, "the old token after rotation");
}
