//! The operator CLI (`aisle purge`, `stats`, `purges`, `events`) against a running gateway: the
//! real binary on both sides, found through `--config gateway.toml` or `--admin URL`, with the
//! exit codes scripts test (0 done, 1 refused, 2 usage, 3 unreachable).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{
    assert_hit, assert_purged, assert_stored_miss, closed_url, config_for, fixtures, without_watch,
    Gateway, Origin, OriginResponse,
};
use serde_json::Value;

const TOKEN: &str = "cli-test-admin-token-5e81d0b7";

/// An `aisle` run: exit code, stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("--json output is JSON ({e}): {:?}", self.stdout))
    }
}

/// Runs `aisle <args>` with `env`, off the async runtime (the origin serves on it meanwhile).
async fn aisle(args: &[&str], env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(crate::harness::aisle_bin())
            .args(&args)
            .env_remove("AISLE_ADMIN_TOKEN")
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .expect("run aisle");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

async fn start(origin: &Origin) -> Gateway {
    start_with(&config_for(&origin.url())).await
}

/// [`start`] on `config` (a [`config_for`] edited), with the admin token.
async fn start_with(config: &str) -> Gateway {
    Gateway::start_with_env(
        &format!("{config}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n"),
        &[("rules.toml", fixtures::INVALIDATION_RULES)],
        &[("AISLE_ADMIN_TOKEN", TOKEN)],
    )
    .await
}

fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

fn config_arg(gw: &Gateway) -> String {
    gw.config_path().display().to_string()
}

/// `aisle stats` and `aisle purge` (tag, URL, prefix, event) through `--config`, with the token
/// from `AISLE_ADMIN_TOKEN`: the table and JSON show the rule's traffic, each purge removes what
/// it names, and the next request is a purged miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_purges_through_the_config() {
    let origin = origin();
    let gw = start(&origin).await;
    let env = [("AISLE_ADMIN_TOKEN", TOKEN)];
    let cfg = config_arg(&gw);
    for path in ["/api/vendors/a1", "/api/vendors/a2", "/api/vendors/a3"] {
        gw.get(path).await;
        assert_hit(&gw.get(path).await, path);
    }

    let stats = aisle(&["stats", "--config", &cfg, "--json"], &env).await;
    assert_eq!(stats.code, Some(0), "stats --json: {}", stats.stderr);
    let vendor = &stats.json()["rules"]["vendor"];
    assert_eq!(vendor["requests"], 6, "vendor stats: {vendor}");
    assert_eq!(vendor["hits"], 3, "vendor stats: {vendor}");

    let table = aisle(&["stats", "--config", &cfg], &env).await;
    assert_eq!(table.code, Some(0), "stats: {}", table.stderr);
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("vendor "))
        .unwrap_or_else(|| panic!("a `vendor` row in:\n{}", table.stdout));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..4], ["6", "3", "50.0%"], "row {row:?}");
    assert!(table.stdout.starts_with("RULE"), "{}", table.stdout);

    let purge = aisle(
        &["purge", "--config", &cfg, "--tag", "vendor:a1", "--json"],
        &env,
    )
    .await;
    assert_eq!(purge.code, Some(0), "purge --tag: {}", purge.stderr);
    assert_eq!(purge.json()["tags"], 1, "{}", purge.stdout);
    assert_purged(&gw.get("/api/vendors/a1").await, "a1 after purge --tag");
    assert_hit(&gw.get("/api/vendors/a2").await, "a2 after a1's purge");

    let url = gw.url("/api/vendors/a2");
    let purge = aisle(&["purge", "--config", &cfg, "--url", &url], &env).await;
    assert_eq!(purge.code, Some(0), "purge --url: {}", purge.stderr);
    assert!(
        purge.stdout.starts_with("invalidation ") && purge.stdout.contains("1 urls"),
        "human answer: {:?}",
        purge.stdout
    );
    let r = gw.get("/api/vendors/a2").await;
    assert_stored_miss(&r, "a2 after purge --url");
    assert_eq!(origin.count("/api/vendors/a2"), 2, "a2 went to the origin");

    let purge = aisle(
        &[
            "purge",
            "--config",
            &cfg,
            "--event",
            "availability_changed",
            "vendorId=a3",
        ],
        &env,
    )
    .await;
    assert_eq!(purge.code, Some(0), "purge --event: {}", purge.stderr);
    assert_purged(&gw.get("/api/vendors/a3").await, "a3 after purge --event");

    gw.get("/api/kept/x").await;
    assert_hit(&gw.get("/api/kept/x").await, "kept/x");
    let purge = aisle(
        &[
            "purge",
            "--config",
            &cfg,
            "--prefix",
            "127.0.0.1/api/kept/",
            "--soft",
        ],
        &env,
    )
    .await;
    assert_eq!(purge.code, Some(0), "purge --prefix: {}", purge.stderr);
    assert!(
        purge.stdout.contains("1 prefixes (soft)"),
        "{:?}",
        purge.stdout
    );

    // Usage errors are 2, and send nothing.
    let none = aisle(&["purge", "--config", &cfg], &env).await;
    assert_eq!(
        none.code,
        Some(2),
        "purge without a target: {}",
        none.stderr
    );
    assert!(none.stderr.contains("nothing to purge"), "{}", none.stderr);
    let stray = aisle(&["purge", "--config", &cfg, "--tag", "t", "k=v"], &env).await;
    // `--tag` takes several values, so `k=v` is a tag here, not a stray parameter.
    assert_eq!(stray.code, Some(0), "{}", stray.stderr);

    // A refusal (exit 1) prints the error body's message and the input at fault.
    let unknown = aisle(
        &["purge", "--config", &cfg, "--event", "no_such_event"],
        &env,
    )
    .await;
    assert_eq!(unknown.code, Some(1), "unknown event: {}", unknown.stderr);
    assert!(
        unknown.stderr.contains("unknown event \"no_such_event\"")
            && unknown.stderr.contains("(field: events[0].name)"),
        "{:?}",
        unknown.stderr
    );
}

/// `aisle purges` and `--retry` answer with the queue; `aisle events` prints one line per
/// invalidation as it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_queue_and_event_stream() {
    let origin = origin();
    let gw = start(&origin).await;
    let admin = gw.admin_url("");
    let env = [("AISLE_ADMIN_TOKEN", TOKEN)];

    let q = aisle(&["purges", "--admin", &admin, "--json"], &env).await;
    assert_eq!(q.code, Some(0), "purges: {}", q.stderr);
    assert_eq!(q.json()["dead_letters"], 0, "{}", q.stdout);
    let q = aisle(&["purges", "--admin", &admin, "--retry"], &env).await;
    assert_eq!(q.code, Some(0), "purges --retry: {}", q.stderr);
    assert!(
        q.stdout.contains("retried 0 dead letters") && q.stdout.contains("dead letters 0"),
        "{:?}",
        q.stdout
    );

    let mut child = Command::new(crate::harness::aisle_bin())
        .args(["events", "--admin", &admin])
        .env("AISLE_ADMIN_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aisle events");
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((true, line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send((false, line));
        }
    });
    let wait_line = |what: &str, pred: &dyn Fn(bool, &str) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((is_out, line)) if pred(is_out, &line) => return line,
                Ok((_, line)) => seen.push(line),
                Err(_) => panic!("{what}: not seen within 10 s; lines: {seen:?}"),
            }
        }
    };
    wait_line("aisle events subscribed", &|out, l| {
        !out && l.contains("following invalidations")
    });
    let purge = aisle(
        &[
            "purge",
            "--admin",
            &admin,
            "--tag",
            "cli-event-tag",
            "--soft",
        ],
        &env,
    )
    .await;
    assert_eq!(purge.code, Some(0), "purge: {}", purge.stderr);
    let line = wait_line("the invalidation's line", &|out, l| {
        out && l.contains("cli-event-tag")
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.contains(" admin ") && line.contains("tags=cli-event-tag") && line.contains(" soft"),
        "event line {line:?}"
    );
}

/// A wrong token is refused with exit 1 and says how to give the right one; a token file wins
/// over the environment; no gateway at the address is exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_and_unreachable_gateway() {
    let origin = origin();
    let gw = start(&origin).await;
    let cfg = config_arg(&gw);
    gw.get("/api/vendors/a1").await;

    let wrong = aisle(
        &["purge", "--config", &cfg, "--tag", "vendor:a1"],
        &[("AISLE_ADMIN_TOKEN", "not-the-token-at-all-0000")],
    )
    .await;
    assert_eq!(wrong.code, Some(1), "wrong token: {}", wrong.stderr);
    assert!(
        wrong.stderr.contains("refused the admin token")
            && wrong.stderr.contains("AISLE_ADMIN_TOKEN"),
        "{}",
        wrong.stderr
    );
    assert_hit(&gw.get("/api/vendors/a1").await, "a1 after a refused purge");

    // Without AISLE_ADMIN_TOKEN the config's `${AISLE_ADMIN_TOKEN}` cannot be expanded: usage.
    let unset = aisle(&["stats", "--config", &cfg], &[]).await;
    assert_eq!(unset.code, Some(2), "{}", unset.stderr);
    assert!(
        unset.stderr.contains("AISLE_ADMIN_TOKEN"),
        "{}",
        unset.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let from_file = aisle(
        &[
            "stats",
            "--config",
            &cfg,
            "--token-file",
            &file.display().to_string(),
        ],
        &[("AISLE_ADMIN_TOKEN", "not-the-token-at-all-0000")],
    )
    .await;
    assert_eq!(from_file.code, Some(0), "token file: {}", from_file.stderr);

    let closed = closed_url();
    for args in [
        vec!["stats", "--admin", &closed],
        vec!["purges", "--admin", &closed],
        vec!["purge", "--admin", &closed, "--tag", "x"],
        vec!["events", "--admin", &closed],
    ] {
        let r = aisle(&args, &[("AISLE_ADMIN_TOKEN", TOKEN)]).await;
        assert_eq!(r.code, Some(3), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("cannot reach"), "{args:?}: {}", r.stderr);
    }
    let missing = aisle(
        &[
            "stats",
            "--config",
            &Path::new("/nonexistent/gw.toml").display().to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(missing.code, Some(2), "{}", missing.stderr);
}

/// `aisle reload` against a running gateway: a good edit reloads (exit 0, the change named), a
/// broken one is refused (exit 1, each `file:line:col` problem printed) and the old rules keep
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_good_edit_and_refuses_a_broken_one() {
    let origin = origin();
    // The file watcher off: it would apply the edit on its own first (a race this test lost
    // on a loaded machine: `aisle reload` then found no change to report).
    let gw = start_with(&without_watch(&config_for(&origin.url()))).await;
    let config = config_arg(&gw);
    let env = [("AISLE_ADMIN_TOKEN", TOKEN)];
    let rules = gw.config_path().parent().unwrap().join("rules/rules.toml");
    let extra = "\n[[rule]]\nname = \"added-by-reload\"\nmatch = { path = \"/added/*\" }\nupstream = \"api\"\nttl = \"60s\"\n";
    // First: the rules end with a catch-all that would shadow it.
    let good = format!("{extra}{}", fixtures::INVALIDATION_RULES);
    std::fs::write(&rules, &good).unwrap();
    let ok = aisle(&["reload", "--config", &config], &env).await;
    assert_eq!(ok.code, Some(0), "{} {}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("added-by-reload"), "{}", ok.stdout);
    assert_stored_miss(&gw.get("/added/x").await, "the reloaded rule caches");

    std::fs::write(&rules, format!("{good}\n[[rule]\nname = \"broken\n")).unwrap();
    let refused = aisle(&["reload", "--config", &config], &env).await;
    assert_eq!(
        refused.code,
        Some(1),
        "{} {}",
        refused.stdout,
        refused.stderr
    );
    let out = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        out.contains("rules.toml:"),
        "the problem with its position: {out}"
    );
    assert_hit(&gw.get("/added/x").await, "the running rules keep serving");
}

/// `aisle protect on NAME --for D` switches a protection window for the fleet, `aisle protect`
/// shows it, `off` ends it early; an unknown window is refused (exit 1) with the names known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_switches_a_window() {
    let origin = origin();
    let config = format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n\n[[protection]]\nname = \"wedding-day\"\n",
        config_for(&origin.url())
    );
    let env = [("AISLE_ADMIN_TOKEN", TOKEN)];
    let gw = Gateway::start_with_env(&config, &[], &env).await;
    let admin = gw.admin_url("");

    let on = aisle(
        &[
            "protect",
            "on",
            "wedding-day",
            "--for",
            "1h",
            "--admin",
            &admin,
        ],
        &env,
    )
    .await;
    assert_eq!(on.code, Some(0), "{}", on.stderr);
    assert!(
        on.stdout.contains("wedding-day  yes") && on.stdout.contains("on by admin-token until"),
        "{:?}",
        on.stdout
    );
    let shown = aisle(&["protect", "--admin", &admin, "--json"], &env).await;
    assert_eq!(shown.json()["windows"][0]["on"], true, "{}", shown.stdout);
    gw.wait_metric(
        "aisle_protection_active",
        &[("name", "wedding-day")],
        "== 1",
        |v| v == 1.0,
    )
    .await;

    let off = aisle(&["protect", "off", "wedding-day", "--admin", &admin], &env).await;
    assert_eq!(off.code, Some(0), "{}", off.stderr);
    let shown = aisle(&["protect", "--admin", &admin, "--json"], &env).await;
    assert_eq!(shown.json()["windows"][0]["on"], false, "{}", shown.stdout);

    let unknown = aisle(&["protect", "on", "gala", "--admin", &admin], &env).await;
    assert_eq!(unknown.code, Some(1), "{}", unknown.stdout);
    assert!(
        unknown
            .stderr
            .contains("no protection window named \"gala\"")
            && unknown.stderr.contains("wedding-day"),
        "{}",
        unknown.stderr
    );
    let usage = aisle(&["protect", "on", "--admin", &admin], &env).await;
    assert_eq!(usage.code, Some(2), "{}", usage.stderr);
}
