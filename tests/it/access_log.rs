//! `[log] access = true`: one line per request on stderr, in logfmt or JSON, with rule, status,
//! `Cache-Status`, upstream, duration and bytes, and never a query string, header or body.

use std::time::Duration;

use crate::harness::{config_for, fixtures, poll_until, Gateway, Origin, OriginResponse};

const SECRET: &str = "sekret-4d1f93";

fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} body #{}", req.path, req.count)))
}

async fn start(origin: &Origin, log: &str) -> Gateway {
    Gateway::start(
        &format!("{}\n{log}", config_for(&origin.url())),
        &[("rules.toml", fixtures::INVALIDATION_RULES)],
    )
    .await
}

/// The gateway's stderr lines that mention `needle`, once there are `n` of them.
async fn lines_with(gw: &Gateway, needle: &str, n: usize) -> Vec<String> {
    poll_until(
        Duration::from_secs(10),
        &format!("{n} access lines with {needle:?}"),
        || async move {
            let lines: Vec<String> = gw
                .logs()
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect();
            (lines.len() >= n).then_some(lines)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_lines_without_credentials() {
    let origin = origin();
    let gw = start(&origin, "[log]\naccess = true\nformat = \"json\"\n").await;
    let path = "/api/vendors/j1";
    let q = format!("{path}?api_key={SECRET}");
    let cookie = format!("session={SECRET}");
    gw.get_with(&q, &[("cookie", &cookie)]).await;
    gw.get_with(&q, &[("cookie", &cookie)]).await;
    let lines = lines_with(&gw, path, 2).await;
    let rec: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l:?}")))
        .collect();
    assert_eq!(rec[0]["rule"], "vendor", "{}", rec[0]);
    assert_eq!(rec[0]["status"], 200);
    assert_eq!(rec[0]["method"], "GET");
    assert_eq!(rec[0]["path"], path);
    assert_eq!(
        rec[0]["upstream"], "api",
        "the miss went upstream: {}",
        rec[0]
    );
    assert_eq!(rec[1]["upstream"], "-", "the hit did not: {}", rec[1]);
    let bytes = format!("{path} body #1").len();
    assert_eq!(rec[0]["bytes"], bytes, "{}", rec[0]);
    assert_eq!(rec[1]["bytes"], bytes, "{}", rec[1]);
    assert!(
        rec[0]["cache_status"].as_str().unwrap().contains("miss"),
        "{}",
        rec[0]
    );
    assert!(
        rec[1]["cache_status"].as_str().unwrap().contains("hit"),
        "{}",
        rec[1]
    );
    assert!(rec[0]["duration_ms"].as_f64().is_some(), "{}", rec[0]);
    assert!(
        !gw.logs().contains(SECRET),
        "a credential in the logs:\n{}",
        gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_by_default_and_off_unless_asked() {
    let origin = origin();
    let gw = start(&origin, "[log]\naccess = true\n").await;
    let path = "/api/vendors/l1";
    gw.get(path).await;
    let lines = lines_with(&gw, path, 1).await;
    let line = &lines[0];
    assert!(line.starts_with("time="), "{line:?}");
    for field in [
        "method=GET",
        &format!("path={path}"),
        "rule=vendor",
        "status=200",
        "cache_status=\"aisle;",
        "upstream=api",
        "duration_ms=",
        "bytes=",
    ] {
        assert!(line.contains(field), "{field} in {line:?}");
    }

    let quiet = start(&origin, "").await;
    quiet.get("/api/vendors/q1").await;
    assert_eq!(quiet.get("/api/vendors/q1").await.status, 200);
    assert!(
        !quiet.logs().contains("/api/vendors/q1"),
        "no access line without [log] access:\n{}",
        quiet.logs()
    );
}
