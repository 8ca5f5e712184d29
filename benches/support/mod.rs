//! What the process-level benchmarks (`fleet`, `memory_budget`) share: child processes that end
//! with the benchmark, free loopback ports, bounded waits, and a minimal keep-alive HTTP/1.1
//! client (no client library, so the client costs the same in every run and never pools).

// Each benchmark compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long anything the benchmark starts may take to come up.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ready` until it holds, panicking after [`DEADLINE`].
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what} did not come up within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One answer: status, `Cache-Status`, body.
pub struct Reply {
    pub status: u16,
    pub cache_status: String,
    pub body: Vec<u8>,
}

/// One keep-alive HTTP/1.1 connection to `127.0.0.1:port`, reopened when the server closes it.
pub struct Client {
    reader: BufReader<TcpStream>,
    port: u16,
    host: &'static str,
}

impl Client {
    pub fn new(port: u16, host: &'static str) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            reader: BufReader::new(s),
            port,
            host,
        }
    }

    /// Sends a bodiless request and reads the whole answer (`Content-Length` framed).
    pub fn send(&mut self, method: &str, path: &str) -> Reply {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.host
        );
        if self.reader.get_mut().write_all(req.as_bytes()).is_err() {
            *self = Client::new(self.port, self.host);
            self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        }
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (mut len, mut cache_status, mut close) = (0usize, String::new(), false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "cache-status" => cache_status = v.trim().to_string(),
                "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        if close {
            *self = Client::new(self.port, self.host);
        }
        Reply {
            status,
            cache_status,
            body,
        }
    }
}

/// A loopback origin in this process (a thread per connection): each request's head is read
/// (the benchmarks send origins no bodies) and `answer(path)` is written back whole, a complete
/// HTTP/1.1 response. Returns its port.
pub fn origin(answer: fn(&str) -> Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream, answer));
        }
    });
    port
}

fn serve(stream: TcpStream, answer: fn(&str) -> Vec<u8>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
        }
        if reader.get_mut().write_all(&answer(&path)).is_err() {
            return;
        }
    }
}

/// The `aisle` binary to measure: `AISLE_BIN` (another build, e.g. an older commit's), else the
/// one cargo built for this benchmark; absolute, since gateways run in directories of their own.
pub fn aisle_bin() -> std::path::PathBuf {
    let bin = std::env::var_os("AISLE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_aisle")));
    std::fs::canonicalize(&bin).unwrap_or(bin)
}
