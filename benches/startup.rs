//! Start-up and reload times with a realistic configuration (issue 16: start < 200 ms, reload
//! < 50 ms).
//!
//! `cargo bench --bench startup` writes a `gateway.toml` with `[cache] memory = "2GiB"` (a
//! budget sized for a million 1 KiB entries), four upstreams on loopback and **100 rules** in
//! ten rules files: each rule has a path parameter, three normalized query fields in its key
//! (`trim`/`lowercase`, `bucket:1000`, `lowercase`), two tags (one from a parameter) and an
//! `invalidate_on` event, as the shipped rules do. Then it measures, against the release `aisle`
//! binary (`AISLE_BIN`, else the one cargo built for this bench):
//!
//! - **start**: from `spawn` to the first answered request (a `GET` through a rule to the
//!   in-process loopback origin, answered 200), polled without sleeping; the median of 5 fresh
//!   processes.
//! - **reload**: the wall time of `POST /admin/reload` (token from `AISLE_ADMIN_TOKEN`, set for
//!   the child) of the same 100 rules, until its 200 answer; the median of 10.
//!
//! The figures are wall times on a shared 2-core machine, so the medians matter, not the
//! extremes. Run by `cargo test --benches` (no `--bench` argument) it is a smoke test: one
//! start and one reload, which must both succeed.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, Proc, DEADLINE};

const RULES: usize = 100;
const FILES: usize = 10;
const UPSTREAMS: usize = 4;
const TOKEN: &str = "startup-bench-token";

/// A loopback origin: every request gets a small cacheable JSON answer.
fn origin() -> u16 {
    support::origin(|_| {
        let body = b"{\"ok\":true}";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: public, max-age=60\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        [head.as_bytes(), body].concat()
    })
}

/// The configuration: 2 GiB of memory, `UPSTREAMS` upstreams (all on the loopback origin's
/// port: addresses are what start-up resolves), `RULES` rules in `FILES` files.
fn write_config(dir: &Path, port: u16, admin: u16, origin: u16) -> PathBuf {
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nwatch = false\n\n\
         [admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n\n\
         [cache]\nmemory = \"2GiB\"\nmax_object = \"1MiB\"\nrules_dir = \"rules\"\n\n"
    );
    for u in 0..UPSTREAMS {
        config.push_str(&format!(
            "[upstreams.svc{u}]\nurl = \"http://127.0.0.1:{origin}\"\nconnect_timeout = \"2s\"\nread_timeout = \"10s\"\n\n"
        ));
    }
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for f in 0..FILES {
        let mut text = String::new();
        for r in (f * RULES / FILES)..((f + 1) * RULES / FILES) {
            text.push_str(&format!(
                r#"[[rule]]
name = "service-{r}-items"
match = {{ method = "GET", path = "/api/service{r}/items/:id" }}
upstream = "svc{u}"
ttl = "10m"
vary = ["path.id", "query.location", "query.budget", "query.kind"]
normalize = {{ "query.location" = ["trim", "lowercase"], "query.budget" = "bucket:1000", "query.kind" = "lowercase" }}
tags = ["service-{r}", "item:{{path.id}}"]
invalidate_on = ["service_{r}_update"]
stale_while_revalidate = "1m"
stale_if_error = "1h"

[[event]]
name = "service_{r}_update"
invalidates = ["service_{r}_update"]

"#,
                u = r % UPSTREAMS
            ));
        }
        std::fs::write(rules.join(format!("{f:02}-services.toml")), text).unwrap();
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// One request on a fresh connection; the status, or `None` when nothing answered. The answer
/// is read to its `Content-Length` (the admin listener keeps connections open).
fn request(port: u16, head: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    s.write_all(head.as_bytes()).ok()?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status = line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let mut length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(status)
}

fn get(port: u16) -> Option<u16> {
    request(
        port,
        "GET /api/service42/items/7?location=%20NYC&budget=5400&kind=Venue HTTP/1.1\r\n\
         Host: bench.example\r\nConnection: close\r\n\r\n",
    )
}

fn reload(admin: u16) -> Option<u16> {
    request(
        admin,
        &format!(
            "POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// Starts the gateway; returns it and the time from spawn to its first answered request.
fn start(bin: &Path, dir: &Path, config: &Path, port: u16) -> (Proc, Duration) {
    let started = Instant::now();
    let child = Command::new(bin)
        .args(["run", "--config", config.to_str().unwrap()])
        .current_dir(dir)
        .env("AISLE_LOG", "warn")
        .env("AISLE_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("aisle.log")).unwrap())
        .spawn()
        .expect("start aisle");
    let mut proc = Proc(child);
    // Polled as fast as the connection attempts go: a sleep here would be the resolution.
    loop {
        if let Some(status) = get(port) {
            assert_eq!(status, 200, "the first request through a rule");
            return (proc, started.elapsed());
        }
        if let Ok(Some(exit)) = proc.0.try_wait() {
            let log = std::fs::read_to_string(dir.join("aisle.log")).unwrap_or_default();
            panic!("aisle exited ({exit}) before answering:\n{log}");
        }
        assert!(
            started.elapsed() < DEADLINE,
            "aisle did not answer within {DEADLINE:?}"
        );
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = support::aisle_bin();
    let (starts, reloads) = if full { (5, 10) } else { (1, 1) };
    let origin = origin();
    let tmp = std::env::temp_dir().join(format!("aisle-startup-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = write_config(&tmp, port, admin, origin);
    let check = Command::new(&bin)
        .args(["check", "--config", config.to_str().unwrap()])
        .env("AISLE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("aisle check");
    assert!(
        check.status.success(),
        "aisle check refused the bench's configuration:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    println!("binary: {}", bin.display());
    println!(
        "config: {RULES} rules in {FILES} files, {UPSTREAMS} upstreams, memory 2GiB ({})",
        String::from_utf8_lossy(&check.stdout).trim()
    );

    let mut start_times = Vec::new();
    let mut last = None;
    for _ in 0..starts {
        // The previous process is gone (killed and reaped) before the next binds the ports.
        drop(last.take());
        let (gw, took) = start(&bin, &tmp, &config, port);
        start_times.push(took);
        last = Some(gw);
    }
    let gw = last.expect("one start");
    support::wait_for("the admin listener", || {
        request(
            admin,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .is_some()
    });
    let mut reload_times = Vec::new();
    for _ in 0..reloads {
        let t = Instant::now();
        let status = reload(admin);
        reload_times.push(t.elapsed());
        assert_eq!(status, Some(200), "POST /admin/reload");
    }
    // Still serving after the reloads.
    assert_eq!(get(port), Some(200));
    drop(gw);
    let show = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "start (spawn -> first answered request): median {:.1} ms of {starts} (target < 200): {}",
        ms(median(start_times.clone())),
        show(&start_times)
    );
    println!(
        "reload (POST /admin/reload, {RULES} rules): median {:.1} ms of {reloads} (target < 50): {}",
        ms(median(reload_times.clone())),
        show(&reload_times)
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
