//! Monitoring, tested for real (issue 17): a real `prometheus` server on loopback scrapes a
//! running gateway's admin `/metrics` every second and loads `deploy/prometheus/alerts.yml`;
//! after known traffic (4 misses, 12 hits, 2 bypasses on a rule costing 0.25 a request) its
//! HTTP API gives the expected hit ratio and saved cost, from the recording rules and from the
//! main queries of `deploy/grafana/aisle.json`. Every dashboard expression names only metrics
//! of the live scrape (or recorded by alerts.yml) and is evaluated by Prometheus; `promtool`
//! checks the scrape's naming, checks the rules and runs their unit tests.
//!
//! `prometheus` and `promtool` come from Debian's `prometheus` package, which
//! `scripts/test.sh` installs; without them this test fails and says so (it never skips).

use crate::harness::redis::RedisServer;
use crate::harness::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "monitoring-admin-token-0123456789";
const WEBHOOK_SECRET: &str = "monitoring-webhook-secret-0123456789";
/// The `priced` rule's cost per request (a power of two: sums of it are exact in binary).
const COST: f64 = 0.25;
const PATHS: usize = 4;
const HITS_PER_PATH: usize = 3;
const BYPASSES: usize = 2;

const RULES: &str = r#"
[[rule]]
name = "priced"
match = { path = "/priced/:id" }
upstream = "api"
ttl = "10m"
cost = { per_request = 0.25 }
tags = ["priced"]

[[rule]]
name = "limited"
match = { path = "/limited/:id" }
upstream = "limited"
ttl = "10m"

[[event]]
name = "priced_changed"
invalidates = ["priced"]
cdn = true
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name` must be installed: the test fails (it does not skip) with how to install it.
fn require_tool(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` is not installed: the monitoring test needs Debian's `prometheus` package \
         (it ships `prometheus` and `promtool`): `sudo apt-get install -y prometheus`, or run \
         scripts/test.sh, which installs it"
    );
}

/// Runs `promtool args...` (in `dir`, with `stdin`), returning its output; panics unless it
/// succeeds.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn promtool: {e}"));
    let mut input = child.stdin.take().expect("promtool stdin");
    if let Some(text) = stdin {
        input
            .write_all(text.as_bytes())
            .expect("write promtool stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// A `prometheus` server of this test's own: a free loopback port, its own data directory,
/// ended by its pid when dropped.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    client: reqwest::Client,
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second and evaluates `rules` every second.
    async fn start(target: &str, rules: &Path) -> Prometheus {
        let mut last = String::new();
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir for prometheus");
            let config = format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: aisle\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display()
            );
            std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn prometheus: {e}"));
            let mut p = Prometheus {
                child,
                dir,
                url: format!("http://127.0.0.1:{port}"),
                client: client(),
            };
            match p.wait_ready(Duration::from_secs(20)).await {
                Ok(()) => return p,
                Err(e) => last = format!("{e}\n{}", p.log()),
            }
            // Dropping `p` ends the process; a clash on the port is retried on another.
            if !last.contains("address already in use") {
                break;
            }
        }
        panic!("prometheus did not start: {last}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("prometheus exited with {status}"));
            }
            let ready = self
                .client
                .get(format!("{}/-/ready", self.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("prometheus not ready within {timeout:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `POST /api/v1/query` (at `time`, seconds, when given): the vector's samples as
    /// (labels, value), or Prometheus's error.
    async fn query(&self, expr: &str, time: Option<&str>) -> Result<Vec<Sample>, String> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("query", expr);
        if let Some(t) = time {
            form.append_pair("time", t);
        }
        let resp = self
            .client
            .post(format!("{}/api/v1/query", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.finish())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("query {expr}: {e}"))?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("query {expr}: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("query {expr}: {body}"));
        }
        let data = &body["data"];
        let samples = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({ "metric": {}, "value": data["result"] })],
            other => return Err(format!("query {expr}: result type {other:?}")),
        };
        Ok(samples
            .iter()
            .map(|s| Sample {
                labels: s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            })
            .collect())
    }

    /// The one sample of `expr` whose `label` is `value` (None while there is none).
    async fn value_where(&self, expr: &str, label: &str, value: &str) -> Option<Sample> {
        self.query(expr, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .find(|s| s.labels.get(label).map(String::as_str) == Some(value))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== prometheus log =====\n{}", self.log());
        }
    }
}

#[derive(Debug, Clone)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The metric names a PromQL expression reads: identifiers outside label matchers, range
/// brackets and `by`/`on`/... label lists that are not functions, keywords or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 19] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
    ];
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    // Its label list, when it has one (`group_left` may have none).
                    if j < chars.len() && chars[j] == '(' {
                        while j < chars.len() && chars[j] != ')' {
                            j += 1;
                        }
                        i = j + 1;
                    }
                } else if j < chars.len() && chars[j] == '(' {
                    // A function (or an aggregation: `sum (...)`).
                } else if !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_of_an_expression() {
    let expr =
        "sum by (rule, le) (rate(aisle_a_bucket{cache_status=~\"hit|stale\",x=\"{a}\"}[5m]))\n \
                / on (rule) group_left aisle:b:rate5m > 0.5 and bool aisle_c offset 1m * 3600";
    let got: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(got, ["aisle:b:rate5m", "aisle_a_bucket", "aisle_c"]);
    // As Prometheus prints rules back (`/api/v1/rules`): no space before label lists.
    let printed = "histogram_quantile(0.99, sum by(rule, le) (rate(aisle_d_bucket[5m]))) > on(rule) group_left() max without(instance) (aisle_e)";
    let got: Vec<String> = metric_names(printed).into_iter().collect();
    assert_eq!(got, ["aisle_d_bucket", "aisle_e"]);
}

/// Sample names of a text exposition (histograms as their `_bucket`, `_sum`, `_count`).
fn scrape_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The names alerts.yml records (`- record: NAME`).
fn recorded_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every query of the dashboard: (panel title, expression), panels' targets and the template
/// variables' `label_values(selector, label)` selectors.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _label)| sel.trim().to_string())
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(selector, label): {q}",
                    v["name"]
                )
            });
        out.push((
            format!("variable ${}", v["name"].as_str().unwrap_or("?")),
            inner,
        ));
    }
    out
}

/// Grafana's variables as the test selects them: the `priced` rule, every instance, a 5 m
/// rate interval and range.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "5m")
        .replace("$rule", "priced")
        .replace("$instance", ".*")
}

fn panel_expr(dashboard: &[(String, String)], title: &str) -> String {
    let found: Vec<&String> = dashboard
        .iter()
        .filter(|(t, _)| t == title)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "the dashboard has one query in panel {title:?}"
    );
    substitute(found[0])
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_gateway_and_the_rules_and_dashboard_give_the_expected_values() {
    require_tool("prometheus");
    require_tool("promtool");
    let started = Instant::now();
    let deploy = repo().join("deploy/prometheus");
    let alerts_path = deploy.join("alerts.yml");
    let alerts = std::fs::read_to_string(&alerts_path).expect("read alerts.yml");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/aisle.json"))
            .expect("read deploy/grafana/aisle.json"),
    )
    .expect("deploy/grafana/aisle.json is JSON");

    // The rules on their own: they load, and their unit tests pass.
    let checked = promtool(&["check", "rules", "alerts.yml"], &deploy, None);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"], &deploy, None);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // A gateway with everything the dashboard shows: Redis, a quota, a CDN, a webhook, a
    // protection window.
    let redis = RedisServer::start();
    let origin = Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)));
    let cdn = Origin::start(|_| OriginResponse::ok(""));
    // Upstream `limited` (the same origin) has a quota of one request.
    let base = format!(
        "{}\n[upstreams.limited]\nurl = \"{}\"\n",
        config_for(&origin.url()),
        origin.url()
    );
    let config = format!(
        r#"{base}quota = {{ requests = 1, per = "1h", burst = 1, on_exhausted = "reject" }}
[redis]
url = "{redis}"
[admin]
token = "${{AISLE_ADMIN_TOKEN}}"
[purge]
dir = "purge-queue"
[cdn.http]
hosts = ["{cdn}"]
method = "PURGE"
[webhooks.vendor]
secret = "${{MON_WEBHOOK_SECRET}}"
signature = "github"
[[webhooks.vendor.map]]
type = "/event"
when = "changed"
fire = {{ event = "priced_changed" }}
[[protection]]
name = "wedding-day"
serve_stale = "1h"
"#,
        redis = redis.url(),
        cdn = cdn.url(),
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("monitoring.toml", RULES)],
        &[
            ("AISLE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("MON_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
    .await;

    let prom = Prometheus::start(&gw.admin_url("").replace("http://", ""), &alerts_path).await;
    // The counters must be scraped at 0 before the traffic: a rate needs a sample before the
    // increase it measures.
    poll_until(
        Duration::from_secs(15),
        "a first scrape of the gateway",
        || prom.value_where("aisle_cost_saved_total{job=\"aisle\"}", "rule", "priced"),
    )
    .await;

    // Known traffic on the priced rule: each path once from the origin, then from cache.
    for p in 0..PATHS {
        let path = format!("/priced/{p}");
        assert_stored_miss(&gw.get(&path).await, &path);
        for _ in 0..HITS_PER_PATH {
            assert_hit(&gw.get(&path).await, &path);
        }
    }
    for _ in 0..BYPASSES {
        let r = gw
            .get_with("/priced/0", &[("cache-control", "no-store")])
            .await;
        assert!(r.cache_status().contains("bypass"), "{}", r.cache_status());
    }
    let hits = (PATHS * HITS_PER_PATH) as f64;
    let cacheable = (PATHS * (HITS_PER_PATH + 1)) as f64;
    let expected_ratio = hits / cacheable;
    let expected_cost = hits * COST;

    // The rest of what the dashboard shows: a quota used up, a forged webhook, a CDN purge.
    assert_eq!(gw.get("/limited/1").await.status, 200);
    assert_eq!(gw.get("/limited/2").await.status, 429);
    let forged = post(
        gw.client(),
        &gw.url("/_aisle/webhooks/vendor"),
        &[
            ("content-type", "application/json"),
            ("x-hub-signature-256", "sha256=00"),
        ],
        r#"{"event":"changed"}"#,
    )
    .await;
    assert_eq!(forged.status, 401, "{}", forged.text());
    let purge = post(
        gw.client(),
        &gw.admin_url("/admin/invalidate"),
        &[
            ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("content-type", "application/json"),
        ],
        r#"{"tags":["priced"]}"#,
    )
    .await;
    assert_eq!(purge.status, 202, "{}", purge.text());
    gw.wait_metric(
        "aisle_purge_requests_total",
        &[("outcome", "done")],
        "a CDN purge confirmed",
        |v| v >= 1.0,
    )
    .await;

    // The scrape: promtool finds nothing to say about its names, types and help.
    let scrape = gw.metrics().await;
    let lint = promtool(&["check", "metrics"], &deploy, Some(&scrape));
    assert!(lint.trim().is_empty(), "promtool check metrics:\n{lint}");
    let exported = scrape_names(&scrape);
    let recorded = recorded_names(&alerts);
    assert!(recorded.contains("aisle:hit_ratio:rate5m"), "{recorded:?}");

    // Prometheus has scraped the final counts.
    let final_cost = poll_until(
        Duration::from_secs(15),
        "the final counts scraped",
        || async {
            let cost = prom
                .value_where("aisle_cost_saved_total", "rule", "priced")
                .await?;
            let hit = prom
                .value_where(
                    "aisle_requests_total{cache_status=\"hit\"}",
                    "rule",
                    "priced",
                )
                .await?;
            (close(cost.value, expected_cost) && close(hit.value, hits)).then_some(cost)
        },
    )
    .await;

    // Every rule of alerts.yml evaluates without error.
    let rules: Value = prom
        .client
        .get(format!("{}/api/v1/rules", prom.url))
        .send()
        .await
        .expect("GET /api/v1/rules")
        .json()
        .await
        .expect("rules JSON");
    let mut loaded = 0;
    for g in rules["data"]["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().expect("rules") {
            loaded += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
            // And reads only metrics the gateway exports (or that alerts.yml records).
            let query = r["query"].as_str().expect("rule query");
            for n in metric_names(query) {
                assert!(
                    exported.contains(&n) || recorded.contains(&n),
                    "rule {}: {n} is neither in the gateway's scrape nor recorded",
                    r["name"]
                );
            }
        }
    }
    assert_eq!(
        loaded,
        alerts.matches("- record:").count() + alerts.matches("- alert:").count(),
        "Prometheus loaded every rule of alerts.yml"
    );

    // The recording rules: the hit ratio exactly (to 1e-9: every series of the ratio is sampled
    // at the same instants, so rate()'s extrapolation cancels out), the saved cost per request
    // saved exactly, and the saved cost rate as 3.0 over 5 minutes: rate() extrapolates to the
    // end of its window by up to 1.1 scrape intervals, which is within 25% once Prometheus has
    // about 5 s of samples (until then this keeps polling).
    let (ratio, cost_rate) = poll_until(
        Duration::from_secs(30),
        "the recording rules to give the hit ratio and saved cost",
        || async {
            let ratio = prom
                .value_where("aisle:hit_ratio:rate5m", "rule", "priced")
                .await?;
            let cost = prom
                .value_where("aisle:cost_saved:rate5m", "rule", "priced")
                .await?;
            // One query, so both come from the same evaluation of the rules.
            let per_request = prom
                .value_where(
                    "aisle:cost_saved:rate5m / aisle:origin_requests_saved:rate5m",
                    "rule",
                    "priced",
                )
                .await?;
            (close(ratio.value, expected_ratio)
                && close(per_request.value, COST)
                && cost.value * 300.0 >= expected_cost * (1.0 - 1e-9)
                && cost.value * 300.0 <= expected_cost * 1.25)
                .then_some((ratio.value, cost.value))
        },
    )
    .await;

    // The dashboard: every expression names exported or recorded metrics only, and Prometheus
    // evaluates it.
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} dashboard queries", queries.len());
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for n in &names {
            assert!(
                exported.contains(n) || recorded.contains(n),
                "panel {title:?}: {n} is neither in the gateway's scrape nor recorded by alerts.yml"
            );
        }
        prom.query(&substitute(expr), None)
            .await
            .unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
    }
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        vars.contains(&"rule") && vars.contains(&"instance"),
        "{vars:?}"
    );
    // Each panel: a unique id, the data source variable, and `$instance` in every query (the
    // rule panels `$rule` too), so the variables filter everything shown.
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id repeated"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("instance=~\"$instance\""), "{title}: {expr}");
            let per_rule = [
                "aisle_requests_total",
                "aisle_request_duration",
                "_saved_total",
            ];
            if per_rule.iter().any(|m| expr.contains(m)) {
                assert!(expr.contains("rule=~\"$rule\""), "{title}: {expr}");
            }
        }
    }

    // Its main queries give the expected values: hit ratio (by rule, and overall for the
    // selected rule), and the saved cost and requests over the range, evaluated at the last
    // sample (so nothing is extrapolated).
    let by_rule = prom
        .query(&panel_expr(&queries, "Hit ratio by rule"), None)
        .await
        .expect("hit ratio by rule");
    let priced: Vec<&Sample> = by_rule
        .iter()
        .filter(|s| s.labels.get("rule").map(String::as_str) == Some("priced"))
        .collect();
    assert!(
        priced.len() == 1 && close(priced[0].value, expected_ratio),
        "Hit ratio by rule: {by_rule:?}, expected {expected_ratio} for priced"
    );
    let overall = prom
        .query(&panel_expr(&queries, "Hit ratio"), None)
        .await
        .expect("hit ratio");
    assert!(
        overall.len() == 1 && close(overall[0].value, expected_ratio),
        "Hit ratio: {overall:?}"
    );
    let stamp = prom
        .query("timestamp(aisle_cost_saved_total{rule=\"priced\"})", None)
        .await
        .expect("timestamp")
        .first()
        .map(|s| format!("{:.3}", s.value))
        .expect("a cost sample");
    let at_last_sample = |title: &'static str| {
        let expr = panel_expr(&queries, title);
        let prom = &prom;
        let stamp = stamp.clone();
        async move {
            let got = prom
                .query(&expr, Some(&stamp))
                .await
                .unwrap_or_else(|e| panic!("{title}: {e}"));
            assert_eq!(got.len(), 1, "{title}: {got:?}");
            got[0].value
        }
    };
    let cost_saved = at_last_sample("Cost saved").await;
    assert!(
        close(cost_saved, expected_cost),
        "Cost saved {cost_saved}, expected {expected_cost}"
    );
    let requests_saved = at_last_sample("Origin requests saved").await;
    assert!(
        close(requests_saved, hits),
        "Origin requests saved {requests_saved}, expected {hits}"
    );

    println!(
        "monitoring: {} dashboard queries checked against {} exported and {} recorded names; \
         aisle:hit_ratio:rate5m{{rule=\"priced\"}} = {ratio} (expected {expected_ratio}), \
         aisle:cost_saved:rate5m = {cost_rate:.6}/s, dashboard cost saved = {cost_saved} \
         (expected {expected_cost}; scraped {}), requests saved = {requests_saved}; {:.1} s",
        queries.len(),
        exported.len(),
        recorded.len(),
        final_cost.value,
        started.elapsed().as_secs_f64()
    );
}
