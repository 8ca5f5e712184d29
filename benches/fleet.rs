//! Shared-tier latency: what a Redis hit costs over a memory hit, and how long an invalidation
//! takes to reach another instance.
//!
//! `cargo bench --bench fleet` starts a private `redis-server` on a free loopback port, the demo
//! origin in-process, and three real `aisle` gateways on the repository's `rules/`:
//!   A: memory tier + Redis;  B: memory tier + Redis (the other instance);  R: Redis only (memory = 0).
//! It then measures, with one keep-alive client and requests in sequence:
//!   * memory hit latency (A, a key in A's memory),
//!   * Redis hit latency (R: every hit is read from Redis),
//!   * invalidation reach: a POST through B, then A polled until it no longer serves the old
//!     entry (time from B's answer to A's first miss).
//!
//! Run by `cargo test` (no `--bench` argument) it does a few iterations only, as a smoke test.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, wait_for, Client, Proc};

fn gateway(
    dir: &std::path::Path,
    name: &str,
    memory: &str,
    redis_port: u16,
    origin: u16,
) -> (Proc, u16) {
    let (port, admin) = (free_port(), free_port());
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nthreads = 1\ndefault_upstream = \"api\"\n\
         [cache]\nmemory = \"{memory}\"\nrules_dir = {rules:?}\n\
         [upstreams.api]\nurl = \"http://127.0.0.1:{origin}\"\n\
         [upstreams.ai]\nurl = \"http://127.0.0.1:{origin}\"\n\
         [redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\nprefix = \"fleet:\"\ntimeout = \"50ms\"\n\
         [purge]\ndir = \"state-{name}\"\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_aisle"))
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("start aisle");
    let log = dir.join(format!("{name}.log"));
    let proc = Proc(child);
    wait_for(&format!("gateway {name} (log: {})", log.display()), || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
            return false;
        };
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"subscribed\":true")
    });
    (proc, port)
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 5000 } else { 20 };
    let rounds = if full { 300 } else { 5 };
    let dir = tempfile::tempdir().unwrap();

    let redis_port = free_port();
    let _redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)"),
    );
    wait_for("redis-server", || {
        TcpStream::connect(("127.0.0.1", redis_port)).is_ok()
    });

    let origin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = origin_listener.local_addr().unwrap().port();
    origin_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(origin_listener).unwrap();
            let _ = aisle::tools::demo::serve(l).await;
        });
    });

    let (_a, a) = gateway(dir.path(), "a", "64MiB", redis_port, origin);
    let (_b, b) = gateway(dir.path(), "b", "64MiB", redis_port, origin);
    let (_r, r) = gateway(dir.path(), "r", "0", redis_port, origin);
    let (mut ca, mut cb, mut cr) = (
        Client::new(a, "fleet.bench"),
        Client::new(b, "fleet.bench"),
        Client::new(r, "fleet.bench"),
    );

    let path = "/api/vendors/v-bench";
    assert_eq!(ca.send("GET", path).status, 200);
    wait_for("the fill to reach Redis", || {
        cr.send("GET", path).cache_status.contains("hit")
    });

    let measure = |c: &mut Client, expect: &str| {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let support::Reply {
                status,
                cache_status: cs,
                ..
            } = c.send("GET", path);
            v.push(t.elapsed());
            assert!(
                status == 200 && cs.contains(expect),
                "unexpected answer {status} {cs}"
            );
        }
        percentiles(v)
    };
    let (mem50, mem99) = measure(&mut ca, "hit");
    let (red50, red99) = measure(&mut cr, "hit");

    let mut reach = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        wait_for("A to cache the entry again", || {
            ca.send("GET", path).cache_status.contains("hit")
        });
        assert_eq!(cb.send("POST", path).status, 200);
        let t = Instant::now();
        wait_for("the invalidation to reach A", || {
            !ca.send("GET", path).cache_status.contains("hit")
        });
        reach.push(t.elapsed());
    }
    let (reach50, reach99) = percentiles(reach);

    println!("fleet: {n} sequential requests per tier, {rounds} invalidations (microseconds)");
    println!("  memory hit            p50 {mem50:8.0}  p99 {mem99:8.0}");
    println!("  redis hit             p50 {red50:8.0}  p99 {red99:8.0}");
    println!(
        "  redis - memory        p50 {:8.0}  p99 {:8.0}",
        red50 - mem50,
        red99 - mem99
    );
    println!("  invalidation reach    p50 {reach50:8.0}  p99 {reach99:8.0}   (B answers the POST -> A misses)");
}
