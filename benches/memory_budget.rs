//! Does `[cache] memory` bound the gateway's memory? (issue 10 item 3)
//!
//! `cargo bench --bench memory_budget` starts a loopback origin in-process and, for each body
//! size (100 B, 1 KiB, 16 KiB, 64 KiB), a fresh release `aisle` with `memory = 64MiB`; it fills
//! the cache through real HTTP traffic (4 keep-alive clients, every request a distinct URL) to
//! three times the budget, lets the process settle, and prints per size: the budget,
//! `aisle_cache_bytes`, entries, evictions, the process's RSS (`VmRSS` of /proc/<pid>/status)
//! and RSS/budget. The base is the RSS of the same binary after the same kind of traffic with
//! nothing stored (`no-store` answers); `(RSS - base) / budget` is what the budget should bound
//! (target: at most 1.25).
//!
//! Environment: `MEMORY_BUDGET_MIB` (default 64), `MEMORY_BUDGET_SIZES` (comma-separated body
//! sizes in bytes), `MEMORY_BUDGET_FILL` (how many budgets of traffic, default 3) and `AISLE_BIN`
//! (another binary to measure, e.g. a build of an older commit).
//!
//! Run by `cargo test --benches` (no `--bench` argument) it is a smoke test: a 4 MiB budget,
//! 1 KiB bodies.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{free_port, wait_for, Client, Proc};

const CLIENTS: usize = 4;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The origin: `GET /<size>/<anything>` answers `size` bytes, cacheable for an hour, with the
/// headers a typical API answer has; `GET /nostore/<size>/...` the same with `no-store`.
fn origin() -> u16 {
    support::origin(answer)
}

fn answer(path: &str) -> Vec<u8> {
    let (cc, rest) = match path.strip_prefix("/nostore") {
        Some(rest) => ("no-store", rest),
        None => ("public, max-age=3600", path),
    };
    let size: usize = rest
        .trim_start_matches('/')
        .split('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: {cc}\r\n\
         ETag: \"{:016x}\"\r\nX-Request-Id: 6f1c2a9e-0b7d-4e59-9a43-{:012x}\r\n\
         Date: Fri, 04 Dec 2026 21:00:00 GMT\r\nContent-Length: {size}\r\n\r\n",
        path.len() * 7919,
        path.len()
    );
    let mut out = head.into_bytes();
    out.resize(out.len() + size, b'x');
    out
}

struct Gateway {
    proc: Proc,
    port: u16,
    admin: u16,
}

impl Gateway {
    fn start(bin: &PathBuf, dir: &std::path::Path, memory_mib: usize, origin: u16) -> Gateway {
        let (port, admin) = (free_port(), free_port());
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [cache]\nmemory = \"{memory_mib}MiB\"\nmax_object = \"1MiB\"\nrules_dir = \"rules\"\n\
             [upstreams.api]\nurl = \"http://127.0.0.1:{origin}\"\n"
        );
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config", path.to_str().unwrap()])
            .current_dir(dir)
            .env("AISLE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("aisle.log")).unwrap())
            .spawn()
            .expect("start aisle");
        let gw = Gateway {
            proc: Proc(child),
            port,
            admin,
        };
        wait_for("the gateway", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() && gw.metrics().is_some()
        });
        gw
    }

    fn metrics(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(out)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().expect("GET /metrics");
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Resident set size in bytes, from /proc/<pid>/status.
    fn rss(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.0.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .expect("VmRSS in /proc/<pid>/status")
            * 1024
    }

    /// Sends `requests` GETs of `/<prefix><size>/<i>` over `CLIENTS` keep-alive connections.
    fn traffic(&self, prefix: &str, size: usize, requests: usize) {
        let next = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (next, port, prefix) = (next.clone(), self.port, prefix.to_string());
                std::thread::spawn(move || {
                    let mut c = Client::new(port, "budget.bench");
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            return;
                        }
                        let support::Reply { status, body, .. } =
                            c.send("GET", &format!("{prefix}{size}/{i}"));
                        assert_eq!((status, body.len()), (200, size), "GET {prefix}{size}/{i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread");
        }
    }

    /// RSS once it stops moving: the highest of a few readings 200 ms apart after the load.
    fn settled_rss(&self) -> usize {
        let mut rss = self.rss();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(200));
            rss = rss.max(self.rss());
        }
        rss
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = support::aisle_bin();
    let budget_mib = env_or("MEMORY_BUDGET_MIB", if full { 64 } else { 4 });
    let fill: usize = env_or("MEMORY_BUDGET_FILL", 3);
    let sizes: Vec<usize> = std::env::var("MEMORY_BUDGET_SIZES")
        .unwrap_or_else(|_| {
            if full {
                "100,1024,16384,65536".into()
            } else {
                "1024".into()
            }
        })
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let budget = budget_mib * 1024 * 1024;
    let origin = origin();
    let tmp = std::env::temp_dir().join(format!("aisle-memory-budget-{}", std::process::id()));
    println!("binary: {}", bin.display());
    println!(
        "{:>8} {:>8} {:>12} {:>9} {:>10} {:>9} {:>9} {:>10} {:>14}",
        "body",
        "budget",
        "cache_bytes",
        "entries",
        "evictions",
        "base",
        "RSS",
        "RSS/budget",
        "(RSS-base)/bgt"
    );
    for size in sizes {
        let dir = tmp.join(size.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let gw = Gateway::start(&bin, &dir, budget_mib, origin);
        // Enough traffic to fill the budget `fill` times over, counting at least 512 bytes an
        // answer (a small answer's header and bookkeeping).
        let requests = fill * budget / size.max(512);
        // The base: the same traffic pattern (connections, pools, buffers) storing nothing.
        gw.traffic("/nostore/", size, (requests / 10).clamp(100, 20_000));
        let base = gw.settled_rss();
        let started = Instant::now();
        gw.traffic("/", size, requests);
        let took = started.elapsed();
        let rss = gw.settled_rss();
        let bytes = gw.metric("aisle_cache_bytes");
        let entries = gw.metric("aisle_cache_entries");
        let evictions = gw.metric("aisle_cache_evictions_total");
        println!(
            "{:>8} {:>7}M {:>11.1}M {:>9} {:>10} {:>8.1}M {:>8.1}M {:>10.2} {:>14.2}   ({requests} requests in {:.1}s)",
            size,
            budget_mib,
            mib(bytes),
            entries,
            evictions,
            mib(base as f64),
            mib(rss as f64),
            rss as f64 / budget as f64,
            (rss as f64 - base as f64) / budget as f64,
            took.as_secs_f64()
        );
        drop(gw);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
