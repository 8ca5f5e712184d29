//! The admin API as a contract (issue 17): `docs/admin-api.yaml` checked against a live gateway
//! (real Redis, real `aisle`) by a schema-driven fuzzer, `schemathesis` from PyPI, with every
//! check it has: no 5xx, every status, content type, header and body as the spec says, bodies
//! the spec calls invalid refused, and authentication enforced on every admin route.
//!
//! `scripts/test.sh` installs the pinned schemathesis in a venv under `~/.cache/aisle/`;
//! `AISLE_SCHEMATHESIS` names another executable. Each run is bounded in examples per operation
//! and in time (the process is killed past its deadline), and uses a fixed seed so a failure
//! reproduces (`scripts/test.sh` is CI; exploring with fresh seeds is a manual run).

use crate::harness::redis::{RedisServer, SharedRedis};
use crate::harness::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOKEN: &str = "openapi-test-admin-token-7c1d";
const TAVE_SECRET: &str = "openapi-test-tave-secret-0b3e";
/// The schemathesis release the test is written against (and `scripts/test.sh` installs).
const VERSION: &str = "4.32.5";
const SEED: &str = "20261205";
/// Longest one fuzzer run may take before it is killed and the test fails (each takes about
/// 5 s on an idle machine; the margin is for a machine busy with other tests).
const RUN_DEADLINE: Duration = Duration::from_secs(90);

const RULES: &str = r#"
[[event]]
name = "availability_changed"
invalidates = ["availability_change", "vendor:{vendorId}"]

[[rule]]
name = "vendor"
match = { method = "GET", path = "/api/vendors/:id" }
upstream = "api"
ttl = "60s"
tags = ["vendor:{path.id}"]
"#;

fn spec() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-api.yaml")
}

/// The pinned schemathesis, or a clear way to get it.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("AISLE_SCHEMATHESIS") {
        return p.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(format!(".cache/aisle/schemathesis-{VERSION}"));
    let bin = venv.join("bin/schemathesis");
    assert!(
        bin.is_file(),
        "schemathesis {VERSION} is not installed at {}: run scripts/test.sh (it installs it), or \
         python3 -m venv {} && {}/bin/pip install schemathesis=={VERSION} \
         (or set AISLE_SCHEMATHESIS to an executable)",
        bin.display(),
        venv.display(),
        venv.display()
    );
    bin
}

/// What one fuzzer run said.
struct Run {
    ok: bool,
    output: String,
}

impl Run {
    /// The `N generated, N passed` line of the summary.
    fn cases(&self) -> String {
        let mut lines = self.output.lines();
        lines.find(|l| l.trim() == "Test cases:");
        lines.next().unwrap_or("").trim().to_string()
    }

    /// The run's failures, or all of its output when it has no failure section.
    fn failures(&self) -> &str {
        self.output
            .find("FAILURES")
            .map_or(&self.output, |at| &self.output[at..])
    }
}

/// Runs `schemathesis run <spec> <args>` in `dir`, killed past [`RUN_DEADLINE`], with the hooks
/// beside this file (`hooks.py`): one signs `tave` deliveries (`sign_webhooks.py`), one points
/// warm jobs' CDN fronts at `front`, the test's loopback origin (`warm_fronts.py`).
async fn fuzz(dir: &Path, front: &str, args: &[&str]) -> Run {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemathesis.toml");
    let mut cmd = tokio::process::Command::new(schemathesis());
    cmd.arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(spec())
        .args([
            "--seed",
            SEED,
            "--request-timeout",
            "15",
            "--generation-database",
            "none",
            // One worker: Hypothesis, under schemathesis, is not made for threads (two workers
            // once failed with an internal "inconsistent results" error on a busy machine).
            "--workers",
            "1",
        ])
        .args(args)
        .current_dir(dir)
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/openapi"),
        )
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("AISLE_FUZZ_WEBHOOK_SECRET", TAVE_SECRET)
        .env("AISLE_FUZZ_FRONT", front)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(RUN_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis {args:?} ran past {RUN_DEADLINE:?}"))
        .expect("schemathesis starts");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Run {
        ok: out.status.success(),
        output,
    }
}

/// The `/admin/*` paths the spec describes (its `paths:` keys, two spaces in), templates such as
/// `/admin/jobs/{id}` as written.
fn spec_admin_paths() -> BTreeSet<String> {
    let text = std::fs::read_to_string(spec()).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("  /admin/"))
        .filter_map(|l| l.strip_suffix(':'))
        .map(|p| format!("/admin/{p}"))
        .collect()
}

/// The spec path a request's path is an instance of (`/admin/jobs/w1` of `/admin/jobs/{id}`),
/// or the path itself.
fn template_of(path: &str, documented: &BTreeSet<String>) -> String {
    documented
        .iter()
        .find(|t| match t.split_once('{') {
            Some((prefix, _)) => path.starts_with(prefix),
            None => *t == path,
        })
        .cloned()
        .unwrap_or_else(|| path.to_string())
}

/// The origin's address as a front's base URL with `scheme`.
fn front_base(scheme: &str, origin: &Origin) -> String {
    let url = origin.url();
    format!("{scheme}{}", &url[url.find("://").unwrap()..])
}

async fn start() -> (RedisServer, Origin, Gateway) {
    let redis = RedisServer::start();
    let origin = Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)));
    let config = format!(
        r#"{}
[admin]
token = "${{AISLE_ADMIN_TOKEN}}"

[purge]
dir = "purge-queue"

[webhooks.tave]
secret = "${{TAVE_SECRET}}"
signature = "github"
max_body = "1KiB"
[[webhooks.tave.map]]
type = "/event"
when = "availability_changed"
fire = {{ event = "availability_changed", params = {{ vendorId = "/data/vendor_id" }} }}

[[protection]]
name = "wedding-day"
hard_purges = "soften"
{}"#,
        config_for(&origin.url()),
        redis.section("openapi:")
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_ADMIN_TOKEN", TOKEN), ("TAVE_SECRET", TAVE_SECRET)],
    )
    .await;
    (redis, origin, gw)
}

/// Every documented operation against the live gateway, with the token: no 5xx, every answer
/// as documented, invalid input refused, and (`ignored_auth`) no admin route answering without
/// the token; then without the token, where every admin route must answer 401 with the error
/// body; then the webhook endpoint on the proxy listener. `PURGE`, which OpenAPI 3.1 cannot
/// list as an operation, is checked here against its `x-aisle-purge` description.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_gateway_keeps_the_openapi_contract() {
    let st = schemathesis();
    let (_redis, origin, gw) = start().await;
    let front = origin.url();
    let dir = tempfile::tempdir().unwrap();
    let admin = gw.admin_url("");
    let admin = admin.trim_end_matches('/');
    let auth = format!("Authorization: Bearer {TOKEN}");
    eprintln!("fuzzing with {}", st.display());

    // 1. With the token. `/admin/events` streams until the client leaves, so it is left to
    // the runs below and to the check at the end.
    let with_token_har = dir.path().join("with-token.har");
    let with_token = fuzz(
        dir.path(),
        &front,
        &[
            "--url",
            admin,
            "-H",
            &auth,
            "--checks",
            "all",
            "--exclude-tag",
            "webhooks",
            "--exclude-path",
            "/admin/events",
            "--max-examples",
            "60",
            "--report",
            "har",
            "--report-har-path",
            with_token_har.to_str().unwrap(),
        ],
    )
    .await;
    println!("openapi with the token: {}", with_token.cases());
    assert!(
        with_token.ok,
        "the admin listener broke its contract (with the token):\n{}",
        with_token.failures()
    );

    // The fuzzer started warm jobs of every kind (the examples, at least), and every CDN front
    // a job was given is the loopback origin (`warm_fronts.py`): nothing left the machine.
    let bearer = format!("Bearer {TOKEN}");
    let jobs: Value = gw
        .client()
        .get(gw.admin_url("/admin/jobs"))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = jobs["jobs"].as_array().expect("a job list").clone();
    let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
    for job in &jobs {
        let text = |f: &str| job[f].as_str().unwrap_or("?").to_string();
        let key = (text("kind"), text("state"));
        *by.entry(key).or_default() += 1;
        for front in job["fronts"].as_array().unwrap() {
            let url = front["front"].as_str().unwrap().to_ascii_lowercase();
            assert!(
                url.starts_with(&front_base("http", &origin))
                    || url.starts_with(&front_base("https", &origin)),
                "a warm job's front left loopback: {job}"
            );
        }
    }
    println!("openapi: warm jobs the fuzzer started (kind, state): {by:?}");
    // The stateful phase followed the spec's link from a started job to its progress, so
    // `JobStatus` was checked against live answers, not only the refusals of unknown ids.
    let har: Value =
        serde_json::from_slice(&std::fs::read(&with_token_har).expect("HAR report")).unwrap();
    let statuses = har["log"]["entries"]
        .as_array()
        .expect("HAR entries")
        .iter()
        .filter(|e| {
            e["request"]["method"] == "GET"
                && e["request"]["url"]
                    .as_str()
                    .is_some_and(|u| u.contains("/admin/jobs/"))
                && e["response"]["status"] == 200
        })
        .count();
    println!("openapi: {statuses} warm job statuses (200) checked against JobStatus");
    assert!(statuses >= 1, "no GET /admin/jobs/{{id}} answered 200");
    for kind in ["urls", "grid", "top"] {
        assert!(
            jobs.iter().any(|j| j["kind"] == kind),
            "no {kind} job started: {by:?}"
        );
    }

    // 2. Without the token: every admin route, `/admin/events` included, answers 401 with the
    // error body; the recorded exchanges (HAR) show it for each request sent.
    let har = dir.path().join("no-token.har");
    let without = fuzz(
        dir.path(),
        &front,
        &[
            "--url",
            admin,
            "--checks",
            "all",
            "--include-tag",
            "admin",
            "--max-examples",
            "15",
            "--report",
            "har",
            "--report-har-path",
            har.to_str().unwrap(),
        ],
    )
    .await;
    println!("openapi without a token: {}", without.cases());
    assert!(
        without.ok,
        "the admin listener broke its contract (without a token):\n{}",
        without.failures()
    );
    let har: Value = serde_json::from_slice(&std::fs::read(&har).expect("HAR report")).unwrap();
    let documented = spec_admin_paths();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for entry in har["log"]["entries"].as_array().expect("HAR entries") {
        let url = entry["request"]["url"].as_str().unwrap();
        let path = url
            .strip_prefix(admin)
            .unwrap_or(url)
            .split('?')
            .next()
            .unwrap()
            .to_string();
        let status = entry["response"]["status"].as_u64();
        let text = entry["response"]["content"]["text"].as_str().unwrap_or("");
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        assert_eq!(status, Some(401), "{path} without the token: {text}");
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "{path} without the token: {text}"
        );
        *seen.entry(template_of(&path, &documented)).or_default() += 1;
    }
    assert!(documented.len() >= 8, "{documented:?}");
    for path in &documented {
        assert!(
            seen.contains_key(path),
            "{path} was not tried without the token: {seen:?}"
        );
    }
    println!(
        "openapi: {} requests without the token, all 401 unauthorized, on {} admin routes",
        seen.values().sum::<usize>(),
        seen.len()
    );

    // 3. The webhook endpoint, on the proxy listener.
    let proxy = gw.url("");
    let webhooks = fuzz(
        dir.path(),
        &front,
        &[
            "--url",
            proxy.trim_end_matches('/'),
            "--checks",
            "all",
            "--include-tag",
            "webhooks",
            // No stateful phase: the spec's one link (a warm job to its progress) is an admin
            // route, outside this run.
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
        ],
    )
    .await;
    println!("openapi webhooks: {}", webhooks.cases());
    assert!(
        webhooks.ok,
        "the webhook endpoint broke its contract:\n{}",
        webhooks.failures()
    );
    // The hook signed the `tave` deliveries, so more than the signature check was fuzzed.
    let count = |outcome: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "aisle_webhooks_total",
                &[("source", "tave"), ("outcome", outcome)],
            )
            .await
            .unwrap_or(0.0)
        }
    };
    let (accepted, malformed, duplicate) = (
        count("accepted").await,
        count("malformed").await,
        count("duplicate").await,
    );
    println!(
        "openapi webhooks: signed deliveries accepted {accepted}, refused as malformed {malformed}, duplicates {duplicate}"
    );
    assert!(
        accepted >= 1.0 && malformed >= 1.0,
        "the signing hook did not take"
    );

    // 4. `PURGE` as `x-aisle-purge` says, and the event stream's opening.
    let r = gw.request("PURGE", "/api/vendors/a1", &[]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let r = gw
        .request(
            "PURGE",
            "/api/vendors/a1",
            &[("authorization", &bearer), ("surrogate-key", "vendor:a1 x")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    for key in ["id", "tags", "urls", "prefixes", "cdn", "fleet"] {
        assert!(v.get(key).is_some(), "PURGE answer without {key}: {v}");
    }
    assert_eq!(v["tags"], 2, "{v}");
    let events = gw
        .client()
        .get(gw.admin_url("/admin/events"))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(
        events.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
}

/// The spec names every admin route the code serves (and the code every route the spec
/// names): a route added to `src/admin.rs` without its description fails here. A route the
/// code matches by prefix (`"/admin/jobs/"`) is a spec path with a parameter after that prefix
/// (`/admin/jobs/{id}`).
#[test]
fn the_spec_lists_every_admin_route() {
    let code = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin.rs"))
        .unwrap();
    let mut routes = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("\"/admin/") {
        let tail = &rest[at + 1..];
        let end = tail.find('"').unwrap();
        let route = &tail[..end];
        if route.len() > "/admin/".len() && !route.contains(' ') {
            routes.insert(route.to_string());
        }
        rest = &tail[end..];
    }
    let documented = spec_admin_paths()
        .into_iter()
        .map(|p| match p.split_once('{') {
            Some((prefix, _)) => prefix.to_string(),
            None => p,
        })
        .collect::<BTreeSet<_>>();
    assert_eq!(routes, documented);
}
