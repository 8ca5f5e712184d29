//! Region relay lag: how long an invalidation accepted in one region takes to be applied in
//! another, under a burst (issue 15's target: p99 < 500 ms on loopback, the seed's sync target).
//!
//! `cargo bench --bench region_relay` starts two private `redis-server`s on free loopback ports
//! (one per region) and one real `aisle` gateway per region (`us-east` and `eu-west`, each the
//! other's peer), sends a burst of 1000 tag invalidations to us-east's admin API as fast as one
//! connection at a time allows, waits until eu-west has applied all of them, and reads both
//! regions' audit logs: an invalidation's lag is eu-west's record time (applied) minus
//! us-east's (accepted), both on this machine's one clock.
//!
//! Run by `cargo test` (no `--bench` argument) it sends 20, as a smoke test.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, wait_for, Proc, DEADLINE};

const TOKEN: &str = "region-relay-bench-token-0123";

fn redis(dir: &std::path::Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let data = dir.join(format!("redis-{name}"));
    std::fs::create_dir_all(&data).unwrap();
    let proc = Proc(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&data)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)"),
    );
    wait_for("redis-server", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, port)
}

/// One HTTP/1.1 request on a fresh connection; (status, body).
fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The gateway of region `me`, peer `peer` (on `peer_redis`); its admin port.
fn gateway(
    dir: &std::path::Path,
    me: &str,
    own_redis: u16,
    peer: &str,
    peer_redis: u16,
) -> (Proc, u16) {
    let (port, admin) = (free_port(), free_port());
    let rules = dir.join(format!("rules-{me}"));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("rules.toml"),
        "[[rule]]\nname = \"bench\"\nmatch = { path = \"/b/:id\" }\nttl = \"60s\"\ntags = [\"bench:{path.id}\"]\n",
    )
    .unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 1\n\
         [cache]\nrules_dir = {rules:?}\n\
         [upstreams.api]\nurl = \"http://127.0.0.1:{}\"\n\
         [admin]\ntoken = \"{TOKEN}\"\n\
         [purge]\ndir = \"state-{me}\"\n\
         [redis]\nurl = \"redis://127.0.0.1:{own_redis}\"\ntimeout = \"250ms\"\n\
         [region]\nname = \"{me}\"\n\
         [[region.peer]]\nname = \"{peer}\"\nredis = \"redis://127.0.0.1:{peer_redis}\"\n",
        free_port()
    );
    let path = dir.join(format!("{me}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("{me}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_aisle"))
        .args(["run", "--config", path.to_str().unwrap()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start aisle");
    let proc = Proc(child);
    wait_for(&format!("gateway {me} (log: {})", log.display()), || {
        TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && request(admin, "GET", "/readyz", "")
                .1
                .contains("\"subscribed\":true")
    });
    (proc, admin)
}

/// `/readyz`'s `region` object.
fn region_state(admin: u16) -> Value {
    let (_, body) = request(admin, "GET", "/readyz", "");
    serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["region"].clone()
}

/// id -> record time (ms) of the region's audit log.
fn audit_times(admin: u16) -> HashMap<String, u64> {
    let (status, body) = request(admin, "GET", "/admin/audit", "");
    assert_eq!(status, 200, "GET /admin/audit: {body}");
    let v: Value = serde_json::from_str(&body).expect("audit JSON");
    v["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["id"].as_str()?.to_string(), r["at_ms"].as_u64()?)))
        .collect()
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 1000 } else { 20 };
    let dir = tempfile::tempdir().unwrap();
    let (_us_redis, us_port) = redis(dir.path(), "us");
    let (_eu_redis, eu_port) = redis(dir.path(), "eu");
    let (_us, us) = gateway(dir.path(), "us-east", us_port, "eu-west", eu_port);
    let (_eu, eu) = gateway(dir.path(), "eu-west", eu_port, "us-east", us_port);
    wait_for("us-east to forward and eu-west to apply", || {
        region_state(us)["peers"]["eu-west"]["forwarding"] == json!(true)
            && region_state(eu)["applying"] == json!(true)
    });

    let start = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (status, body) = request(
            us,
            "POST",
            "/admin/invalidate",
            &json!({ "tags": [format!("bench:{i}")] }).to_string(),
        );
        assert_eq!(status, 202, "invalidate: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["regions"], "queued", "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let sent = start.elapsed();

    let deadline = Instant::now() + DEADLINE * 3;
    let applied = loop {
        let t = audit_times(eu);
        if ids.iter().all(|id| t.contains_key(id)) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "eu-west applied only {} of {n}",
            ids.iter().filter(|id| t.contains_key(*id)).count()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let all_in = start.elapsed();
    let accepted = audit_times(us);
    let mut lags: Vec<u64> = ids
        .iter()
        .map(|id| applied[id].saturating_sub(accepted[id]))
        .collect();
    lags.sort_unstable();
    println!(
        "region relay: a burst of {n} tag invalidations to us-east ({:.0}/s), applied in eu-west \
         (one gateway and one redis-server per region, loopback)",
        n as f64 / sent.as_secs_f64()
    );
    println!(
        "  relay lag (accepted in us-east -> applied in eu-west), ms: p50 {}  p99 {}  max {}",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1]
    );
    println!(
        "  burst sent in {:.0} ms; all applied {:.0} ms after the first was sent",
        sent.as_secs_f64() * 1e3,
        all_in.as_secs_f64() * 1e3
    );
}
