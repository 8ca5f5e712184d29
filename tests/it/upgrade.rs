//! Zero-downtime upgrade (issue 12): `aisle run --upgrade` takes over the running process's
//! listening sockets (pingora's graceful upgrade, on `SIGQUIT`), the old process drains its
//! requests and streams in flight and exits, and clients see no refused or reset connection
//! and no truncated answer. The state directory (the durable purge queue) is handed over: a
//! purge accepted by the old process is delivered by the new one.

use crate::harness::cdn::FakeCloudflare;
use crate::harness::*;
use bytes::Bytes;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "upgrade-test-admin-token";
const CF_ZONE: &str = "0123456789abcdef0123456789abcdef";
const CF_TOKEN: &str = "upgrade-test-cloudflare-token";

fn config(origin_url: &str, cf_base: &str) -> String {
    format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"
grace_period = "6s"
upgrade_socket = "upgrade.sock"
watch = false

[cache]
memory = "16MiB"
max_object = "1MiB"
rules_dir = "rules"

[upstreams.api]
url = "{origin_url}"
connect_timeout = "2s"
read_timeout = "20s"

[admin]
token = "{TOKEN}"

[purge]
dir = "purge"
backoff_base = "100ms"
backoff_max = "500ms"

[cdn.cloudflare]
base = "{cf_base}"
zone_id = "{CF_ZONE}"
token = "${{CF_TOKEN}}"
"#
    )
}

/// Requests on fresh connections (and one keep-alive client) until `stop`, bounded to a
/// minute; returns (answered whole, failures).
fn client_loop(
    base: String,
    stop: Arc<AtomicBool>,
    fresh: bool,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20));
        if fresh {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder.build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut ok, mut failed) = (0u32, Vec::new());
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            n += 1;
            let path = format!("/item/{}", n % 7);
            match client.get(format!("{base}{path}")).send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(t) if t == format!("ok {path}") => ok += 1,
                    other => failed.push(format!("{path}: body {other:?}")),
                },
                Ok(r) => failed.push(format!("{path}: status {}", r.status())),
                Err(e) => failed.push(format!("{path}: {e:?}")),
            }
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_drops_no_connection_no_stream_and_no_purge() {
    let origin = StreamOrigin::start(|req| {
        if req.path == "/v1/stream" {
            StreamResponse::sse(vec![
                Step::Chunk(Bytes::from_static(b"data: first\n\n")),
                // Still streaming when the old process is told to hand over and drain.
                Step::Sleep(Duration::from_millis(3_000)),
                Step::Chunk(Bytes::from_static(b"data: second\n\n")),
                Step::Chunk(Bytes::from_static(b"data: [DONE]\n\n")),
            ])
        } else {
            StreamResponse::sse(vec![Step::Chunk(Bytes::from(format!("ok {}", req.path)))])
        }
    });
    let cf = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    // The CDN is down: a purge accepted before the upgrade waits in the durable queue.
    cf.set_down(true);
    let mut gw = Gateway::start_with_env(
        &config(&origin.url(), &cf.base()),
        &[],
        &[("CF_TOKEN", CF_TOKEN)],
    )
    .await;
    let auth = format!("Bearer {TOKEN}");
    let accepted = fetch_with_body(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/invalidate"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        json!({"tags": ["before-upgrade"]}).to_string(),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    poll_until(
        Duration::from_secs(10),
        "a refused delivery attempt",
        || async { (cf.refused_down() > 0).then_some(()) },
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = [true, true, true, false]
        .into_iter()
        .map(|fresh| client_loop(gw.url(""), stop.clone(), fresh))
        .collect();

    let (mut stream, mut got) = start_stream(&gw, "/v1/stream").await;

    let socket = gw.config_path().parent().unwrap().join("upgrade.sock");
    let started = Instant::now();
    let mut old = gw.upgrade(&socket).await;
    // The old process hands the state directory over when its shutdown starts, while it still
    // drains: the new process holds the lock (its pid in the file) before the old one exits.
    let lock = gw.config_path().parent().unwrap().join("purge/aisle.lock");
    let new_pid = gw.pid().to_string();
    poll_until(
        Duration::from_secs(20),
        "the new process to take the state directory",
        || async { (std::fs::read_to_string(&lock).unwrap_or_default() == new_pid).then_some(()) },
    )
    .await;
    assert!(
        old.running(),
        "the state directory was taken over only after the old process exited"
    );

    // The stream that started on the old process ends whole.
    read_rest(&mut stream, &mut got, started, "into the upgrade").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "data: first\n\ndata: second\n\ndata: [DONE]\n\n"
    );
    let status = old
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the old process exits after draining");
    assert!(status.success(), "the old process exits cleanly: {status}");
    let took = started.elapsed();

    // Only the new process is left, and it serves (the loops are still running).
    assert!(gw.running(), "the new process runs");
    let after = gw.get("/item/after").await;
    assert_eq!(after.status, 200);
    assert_eq!(after.text(), "ok /item/after");
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in loops {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "upgrade: old process exited {took:?} after SIGQUIT; {ok} requests answered, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed across the upgrade: {failed:?}");
    assert!(ok > 0);

    // The purge the old process accepted is delivered by the new one.
    cf.set_down(false);
    poll_until(
        Duration::from_secs(20),
        "the pre-upgrade purge to reach the CDN",
        || async {
            cf.accepted_tags()
                .contains(&"before-upgrade".to_string())
                .then_some(())
        },
    )
    .await;
}
