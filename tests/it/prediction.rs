//! Prediction = reality (issue 15): `aisle replay`'s hit ratio for a trace is what the real
//! gateway measures when the same trace is sent to it, against the demo origin
//! (`aisle::tools::demo::serve`), refresh-ahead and stale-while-revalidate included.
//!
//! A 20,000-request synthetic trace (`aisle::tools::tracegen`, seed 42, over 40 minutes) is
//! compressed 60 times in time (40 s), and the shipped rules' durations alike (`ttl = "5m"`
//! becomes 5 s, the 1 m stale windows 1 s: stored stale windows are whole seconds, so 60 is the
//! largest factor that keeps them). Rules without a `ttl` get the replay's `--default-ttl` (5 m)
//! so both sides use one lifetime. Requests are sent at their compressed times (the trace's
//! timing is the input, so pacing by the clock is the point here, not a synchronisation), each
//! on its own task so a slow answer never delays the next. The gateway's ratio counts
//! `Cache-Status` answers from storage (`hit`, and `fwd=stale` within a stale window) over the
//! requests that did not bypass; the replay is run on the same compressed trace and rules.

use crate::harness::*;
use aisle::config::Config;
use aisle::tools::replay::{parse_line, replay, Settings, TraceRequest};
use aisle::tools::tracegen::{generate, Options};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time compression of the trace and of the rules' durations.
const FACTOR: u32 = 60;

/// The shipped rules with every duration divided by [`FACTOR`] (written in ms), and a `ttl` of
/// `default_ttl` on rules without one.
fn scaled_rules(default_ttl: Duration) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let mut out = String::new();
            for line in text.lines() {
                let scaled = ["ttl", "stale_while_revalidate", "stale_if_error"]
                    .iter()
                    .find_map(|field| {
                        let rest = line.strip_prefix(field)?.trim_start().strip_prefix('=')?;
                        let value = rest.trim().trim_matches('"');
                        let d = aisle::units::parse_duration(value).ok()?;
                        Some(format!("{field} = \"{}ms\"", (d / FACTOR).as_millis()))
                    });
                out.push_str(scaled.as_deref().unwrap_or(line));
                out.push('\n');
                if line.starts_with("[[rule]]") {
                    // Placeholder replaced below for rules that have no ttl of their own.
                    out.push_str("#TTL?\n");
                }
            }
            // A rule block without a `ttl` line gets the default one.
            let blocks: Vec<String> = out
                .split("#TTL?\n")
                .enumerate()
                .map(|(i, block)| {
                    let has_ttl = block.lines().any(|l| l.starts_with("ttl ="));
                    let cacheable = !block.lines().any(|l| l.starts_with("cache = false"));
                    if i > 0 && !has_ttl && cacheable {
                        format!(
                            "ttl = \"{}ms\"\n{block}",
                            (default_ttl / FACTOR).as_millis()
                        )
                    } else {
                        block.to_string()
                    }
                })
                .collect();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, blocks.concat())
        })
        .collect()
}

/// What the gateway answered one trace request.
enum Answer {
    /// From storage (`true`) or not.
    Cacheable(bool),
    Bypassed,
    /// No answer (counted, reported, and not from storage).
    Failed,
}

/// Sends one trace request.
async fn send(client: &reqwest::Client, base: &str, req: &TraceRequest) -> Answer {
    let mut url = format!("{base}{}", req.path);
    if let Some(q) = &req.query {
        url.push('?');
        url.push_str(q);
    }
    let method = reqwest::Method::from_bytes(req.method.as_str().as_bytes()).unwrap();
    let mut builder = client.request(method, &url);
    for (name, value) in &req.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    if let Some(body) = &req.body {
        builder = builder.body(body.clone());
    }
    let resp = match builder.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{} {url}: {e}", req.method);
            return Answer::Failed;
        }
    };
    let status = resp
        .headers()
        .get("cache-status")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    // Read the whole answer (a streamed chat answer too) so the connection is reusable.
    let _ = resp.bytes().await;
    if status.contains("fwd=bypass") {
        return Answer::Bypassed;
    }
    // Answered from storage: a hit, or stale within the stale-while-revalidate window (an
    // expired entry refetched says `fwd=stale` too, with the origin's `fwd-status`).
    Answer::Cacheable(is_hit(&status) || status.contains("detail=stale-while-revalidate"))
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_predicts_the_gateways_hit_ratio() {
    // The demo origin on a runtime of its own, so the 20,000 client tasks never delay it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let demo = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::select! {
                _ = aisle::tools::demo::serve(listener) => {}
                _ = stopped => {}
            }
        });
    });

    let default_ttl = Duration::from_secs(300);
    let rules = scaled_rules(default_ttl);
    let rules: Vec<(&str, &str)> = rules
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let config = format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"

[cache]
memory = "256MiB"
rules_dir = "rules"
key_secret = "prediction-test-key-secret"

[upstreams.api]
url = "{origin}"
read_timeout = "5s"

[upstreams.ai]
url = "{origin}"
read_timeout = "5s"
"#
    );
    let gw = Gateway::start(&config, &rules).await;

    // The trace, compressed: request i is sent at (t_i - t_0) / FACTOR after the start.
    let opts = Options {
        requests: 20_000,
        seed: 42,
        duration: Duration::from_secs(40 * 60),
        ..Options::default()
    };
    let mut trace: Vec<TraceRequest> = generate(&opts)
        .into_iter()
        .map(|(_, line)| parse_line(&line).expect("the generator writes valid lines"))
        .collect();
    trace.sort_by_key(|r| r.at_ms);
    let t0 = trace[0].at_ms;
    for r in &mut trace {
        r.at_ms = t0 + (r.at_ms - t0) / i64::from(FACTOR);
    }

    // The prediction, from the same rules the gateway loaded.
    let loaded = Config::load(gw.config_path()).expect("the test config loads");
    let settings = Settings {
        default_ttl: default_ttl / FACTOR,
        max_ttl: loaded.cache.max_ttl,
        client: aisle::trust::Client::Untrusted,
        origin_latency: Duration::from_millis(5),
    };
    let report = replay(&loaded.rules, &trace, &settings);
    let predicted = report.hits() as f64 / report.cacheable() as f64;

    // Reality.
    let client = Arc::new(
        reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    let base = Arc::new(gw.url(""));
    let start = tokio::time::Instant::now();
    let begun = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut late = Duration::ZERO;
    for req in trace.iter().cloned() {
        let at = start + Duration::from_millis((req.at_ms - t0) as u64);
        tokio::time::sleep_until(at).await;
        late = late.max(tokio::time::Instant::now() - at);
        let (client, base) = (client.clone(), base.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let answer = send(&client, &base, &req).await;
            (answer, t.elapsed())
        });
    }
    let (mut cacheable, mut hits, mut failed) = (0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    while let Some(answer) = tasks.join_next().await {
        let (answer, took) = answer.expect("request task");
        slowest = slowest.max(took);
        match answer {
            Answer::Cacheable(hit) => {
                cacheable += 1;
                hits += u64::from(hit);
            }
            Answer::Bypassed => {}
            Answer::Failed => {
                cacheable += 1;
                failed += 1;
            }
        }
    }
    let _ = stop.send(());
    demo.join().unwrap();
    let measured = hits as f64 / cacheable as f64;
    println!(
        "{} requests in {:?} (latest send {late:?} behind its time, slowest answer {slowest:?}, {failed} without an answer): gateway {hits}/{cacheable} = {:.2}%, replay {}/{} = {:.2}% ({:.2}% without refresh-ahead and stale-while-revalidate)",
        trace.len(),
        begun.elapsed(),
        measured * 100.0,
        report.hits(),
        report.cacheable(),
        predicted * 100.0,
        report.hits_plain() as f64 * 100.0 / report.cacheable() as f64
    );
    // Per rule, for the record (the gateway's counts include pingora's own stale-while-revalidate
    // background requests, which are not client answers).
    let metrics = gw.metrics().await;
    for r in report.rules.iter().filter(|r| r.requests > 0) {
        let m = |status: &str| {
            metric_value(
                &metrics,
                "aisle_requests_total",
                &[("rule", r.name.as_str()), ("cache_status", status)],
            )
            .unwrap_or(0.0)
        };
        let served = m("hit") + m("stale");
        let all = served + m("miss") + m("expired") + m("revalidated");
        println!(
            "  {:<20} replay {:>5}/{:<5} (stale {:>4})  gateway {:>5}/{:<5} (stale {:>4})",
            r.name,
            r.hits,
            r.requests,
            r.stale_hits,
            served,
            all,
            m("stale")
        );
    }
    assert!(failed <= 20, "{failed} requests got no answer within 30 s");
    assert_eq!(
        cacheable,
        report.cacheable(),
        "the same requests use the cache on both sides"
    );
    assert!(
        (measured - predicted).abs() <= 0.01,
        "the gateway measured {:.2}%, the replay predicted {:.2}%",
        measured * 100.0,
        predicted * 100.0
    );
}
