//! Shared test harness: real loopback origins (hyper) and the real `aisle`
//! binary started with a config written into a temporary directory.
//!
//! Nothing here sleeps as a means of synchronisation: every wait is a poll
//! with a deadline (`poll_until`), with only a short pause between polls.

pub mod cdn;
pub mod fixtures;
pub mod hostile;
pub mod redis;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

/// Pause between two polls of `poll_until`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Poll `f` until it yields `Some`, or panic once `timeout` has elapsed.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The `aisle` binary the tests run: cargo's build of this package, or the one
/// `AISLE_TEST_BIN` names (`scripts/build-pgo.sh` runs the suite against its profile-guided
/// build, so the binary shipped is the binary tested).
pub fn aisle_bin() -> PathBuf {
    std::env::var_os("AISLE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_aisle")))
}

/// A free loopback port (bound then released; collisions are retried by the
/// gateway start-up code).
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// `http://127.0.0.1:PORT` where nothing listens: an upstream or CDN API that refuses
/// connections. The port stays bound, without `listen`, until the test process ends, so a
/// connection to it is refused and no other test's origin can be handed it. (Released at once,
/// as it once was, another test's origin could take the port and receive this test's traffic.)
pub fn closed_url() -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an inet address")
        .port();
    // Held for the life of the test process: a few sockets at most.
    std::mem::forget(socket);
    format!("http://127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------
// Origin
// ---------------------------------------------------------------------------

/// A request as received by the origin.
#[derive(Clone, Debug)]
pub struct OriginRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// 1-based number of this request among all requests for `path`.
    pub count: usize,
}

impl OriginRequest {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// What the origin answers.
#[derive(Clone, Debug)]
pub struct OriginResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Option<Duration>,
}

impl OriginResponse {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        OriginResponse {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            delay: None,
        }
    }

    pub fn with_status(status: u16) -> Self {
        OriginResponse {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: None,
        }
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

type Handler = dyn Fn(OriginRequest) -> OriginResponse + Send + Sync + 'static;

struct OriginState {
    handler: Box<Handler>,
    total: AtomicUsize,
    per_path: Mutex<HashMap<String, usize>>,
    log: Mutex<Vec<OriginRequest>>,
    down: AtomicBool,
}

/// A real HTTP/1.1 origin on 127.0.0.1:0, run on the test's tokio runtime.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    stop_tx: watch::Sender<bool>,
}

impl Origin {
    /// Start an origin; must be called inside a tokio runtime.
    pub fn start<F>(handler: F) -> Origin
    where
        F: Fn(OriginRequest) -> OriginResponse + Send + Sync + 'static,
    {
        Origin::start_dated(handler, true)
    }

    /// An origin that sends no `Date` of its own (hyper adds one otherwise), as an origin
    /// without a clock does (RFC 9110 §6.6.1).
    pub fn start_undated<F>(handler: F) -> Origin
    where
        F: Fn(OriginRequest) -> OriginResponse + Send + Sync + 'static,
    {
        Origin::start_dated(handler, false)
    }

    fn start_dated<F>(handler: F, auto_date: bool) -> Origin
    where
        F: Fn(OriginRequest) -> OriginResponse + Send + Sync + 'static,
    {
        let std_listener = StdTcpListener::bind("127.0.0.1:0").expect("bind origin");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("origin addr");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let state = Arc::new(OriginState {
            handler: Box::new(handler),
            total: AtomicUsize::new(0),
            per_path: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let accept_state = state.clone();
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let st = accept_state.clone();
                        let mut conn_stop = stop_rx.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(st.clone(), req));
                            let conn = http1::Builder::new()
                                .auto_date_header(auto_date)
                                .serve_connection(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                // Stopped (or origin dropped): drop the connection.
                                _ = conn_stop.wait_for(|s| *s) => {}
                            }
                        });
                    }
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            // `listener` is dropped here: new connections are refused.
        });
        Origin {
            addr,
            state,
            stop_tx,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (any method) for `path`.
    pub fn count(&self, path: &str) -> usize {
        *self.state.per_path.lock().unwrap().get(path).unwrap_or(&0)
    }

    /// Requests received so far, all paths.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// All received requests, in arrival order.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn requests_for(&self, path: &str) -> Vec<OriginRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// While down, every request is answered `503` (and still counted).
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Stop entirely: close the listener (connections are refused) and drop
    /// every open connection.
    pub fn stop(&self) {
        let _ = self.stop_tx.send(true);
    }

    /// Poll until the listener is gone (a connect is refused).
    pub async fn wait_stopped(&self) {
        let addr = self.addr;
        poll_until(
            Duration::from_secs(5),
            "origin listener closed",
            || async move {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .is_err()
                    .then_some(())
            },
        )
        .await
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
    }
}

async fn handle(
    state: Arc<OriginState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let count = {
        let mut per_path = state.per_path.lock().unwrap();
        let c = per_path.entry(path.clone()).or_insert(0);
        *c += 1;
        *c
    };
    state.total.fetch_add(1, Ordering::SeqCst);
    let oreq = OriginRequest {
        method: parts.method.to_string(),
        path,
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers.clone(),
        body,
        count,
    };
    state.log.lock().unwrap().push(oreq.clone());
    let resp = if state.down.load(Ordering::SeqCst) {
        OriginResponse::with_status(503).body("origin is down")
    } else {
        (state.handler)(oreq)
    };
    if let Some(d) = resp.delay {
        tokio::time::sleep(d).await;
    }
    let mut builder = Response::builder().status(resp.status);
    for (k, v) in &resp.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    Ok(builder
        .body(Full::new(resp.body))
        .expect("valid origin response"))
}

// ---------------------------------------------------------------------------
// Client-side response
// ---------------------------------------------------------------------------

/// A fully read response from the gateway.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The `Cache-Status` header, or "" when absent.
    /// The `Cache-Status` field, checked to be a valid RFC 9211 value (an RFC 8941 List) on
    /// every read, so no test can pass on a malformed one.
    pub fn cache_status(&self) -> String {
        let value = self.header("cache-status").unwrap_or_default();
        assert_valid_cache_status(&value);
        value
    }

    pub fn is_hit(&self) -> bool {
        is_hit(&self.cache_status())
    }

    pub fn ttl(&self) -> Option<i64> {
        cache_status_param(&self.cache_status(), "ttl").and_then(|v| v.parse().ok())
    }

    pub fn age(&self) -> Option<u64> {
        self.header("age").and_then(|v| v.trim().parse().ok())
    }
}

/// `aisle; hit...`
/// Asserts a fresh hit (200, `hit`, a `ttl=`); `what` names the step in the failure message.
pub fn assert_hit(r: &Resp, what: &str) {
    let cs = r.cache_status();
    assert_eq!(r.status, 200, "{what}: status (Cache-Status {cs:?})");
    assert!(
        is_hit(&cs),
        "{what}: expected a hit, got Cache-Status {cs:?}"
    );
    assert!(
        r.ttl().is_some(),
        "{what}: hit without ttl= (Cache-Status {cs:?})"
    );
}

/// Asserts a 200 that went to the origin and was stored.
pub fn assert_stored_miss(r: &Resp, what: &str) {
    let cs = r.cache_status();
    assert_eq!(r.status, 200, "{what}: status (Cache-Status {cs:?})");
    assert!(
        cs.starts_with("aisle; fwd=") && cs.contains("stored"),
        "{what}: expected a stored miss, got Cache-Status {cs:?}"
    );
}

/// Asserts the answer to a GET of an entry that was hard-purged by tag or prefix.
pub fn assert_purged(r: &Resp, what: &str) {
    let cs = r.cache_status();
    assert_eq!(r.status, 200, "{what}: status (Cache-Status {cs:?})");
    assert!(
        cs.contains("fwd=miss") && cs.contains("detail=purged"),
        "{what}: expected `fwd=miss ... detail=purged`, got Cache-Status {cs:?}"
    );
}

/// Panics unless `value` (when present) parses strictly as a Structured Field List (RFC 9211
/// §2: `Cache-Status` is a List of cache names with parameters).
pub fn assert_valid_cache_status(value: &str) {
    if value.is_empty() {
        return;
    }
    if let Err(e) = sfv::Parser::parse_list(value.as_bytes()) {
        panic!("Cache-Status {value:?} is not a valid Structured Field List: {e}");
    }
}

pub fn is_hit(cache_status: &str) -> bool {
    cache_status.starts_with("aisle; hit")
}

/// Value of `name=VALUE` in a Cache-Status entry.
pub fn cache_status_param(cache_status: &str, name: &str) -> Option<String> {
    cache_status.split(';').find_map(|p| {
        let p = p.trim();
        let (k, v) = p.split_once('=')?;
        (k == name).then(|| v.trim_matches('"').to_string())
    })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Send a request and read the whole body.
pub async fn fetch(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Resp {
    fetch_with_body(client, method, url, headers, Bytes::new()).await
}

/// Send a request with a body (reqwest sets `Content-Length`) and read the whole answer.
pub async fn fetch_with_body(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let body: Bytes = body.into();
    let mut rb = client.request(method.clone(), url);
    if !body.is_empty() {
        rb = rb.body(body);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let started = Instant::now();
    let resp = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e:?}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: reading body failed: {e}"));
    Resp {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------

/// The real `aisle` binary, run with a config in a temporary directory.
pub struct Gateway {
    child: Child,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    client: reqwest::Client,
    /// The extra environment the process was started with (an upgrade passes it on).
    env: Vec<(String, String)>,
}

/// The process a graceful upgrade replaced ([`Gateway::upgrade`]); killed on drop if it still
/// runs (it is this harness's own child).
pub struct Replaced {
    child: Child,
}

impl Replaced {
    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the process to exit; `None` if it still runs at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout).await
    }
}

/// Waits (bounded) for `child` to exit; `None` if it still runs at the deadline.
async fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Starts a streamed GET of `path` (status 200 asserted) and reads its first chunk.
pub async fn start_stream(gw: &Gateway, path: &str) -> (reqwest::Response, Vec<u8>) {
    let mut resp = gw
        .client()
        .get(gw.url(path))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("stream starts");
    assert_eq!(resp.status().as_u16(), 200);
    let first = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("a first chunk")
        .to_vec();
    (resp, first)
}

/// Reads the rest of a streamed answer into `got`, panicking (with what was read and how long
/// after `since`) if the stream is cut.
pub async fn read_rest(
    resp: &mut reqwest::Response,
    got: &mut Vec<u8>,
    since: Instant,
    when: &str,
) {
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return,
            Err(e) => panic!(
                "the stream was cut {:?} {when}, having received {:?}: {e}",
                since.elapsed(),
                String::from_utf8_lossy(got)
            ),
        }
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const START_ATTEMPTS: usize = 3;

impl Gateway {
    /// Write `gateway.toml` (with `{listen}` / `{admin}` replaced by free
    /// loopback addresses) and `rules/<name>` files, start `aisle run`, and
    /// wait until `/healthz` answers 200.
    pub async fn start(config: &str, rules: &[(&str, &str)]) -> Gateway {
        Gateway::start_with_env(config, rules, &[]).await
    }

    /// Like [`Gateway::start`], with extra environment variables for the
    /// `aisle` process (the rest of the environment is inherited).
    pub async fn start_with_env(
        config: &str,
        rules: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut last_logs = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::tempdir().expect("tempdir");
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            while admin == listen {
                admin = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            }
            let text = config
                .replace("{listen}", &listen.to_string())
                .replace("{admin}", &admin.to_string());
            let config_path = dir.path().join("gateway.toml");
            std::fs::write(&config_path, text).expect("write gateway.toml");
            let rules_dir = dir.path().join("rules");
            std::fs::create_dir_all(&rules_dir).expect("mkdir rules");
            for (name, contents) in rules {
                std::fs::write(rules_dir.join(name), contents).expect("write rule file");
            }
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let child = spawn_aisle(dir.path(), &config_path, &env, false);
            let mut gw = Gateway {
                child,
                dir,
                config_path,
                listen,
                admin,
                client: client(),
                env,
            };
            match gw.wait_ready(Duration::from_secs(10)).await {
                Ok(()) => return gw,
                Err(reason) => {
                    gw.kill();
                    last_logs = format!("{reason}\n{}", gw.logs());
                    let port_clash = last_logs.to_lowercase().contains("in use");
                    if !port_clash || attempt == START_ATTEMPTS {
                        // `gw`'s Drop prints the logs while unwinding.
                        panic!("gateway failed to start (attempt {attempt}): {reason}");
                    }
                }
            }
        }
        panic!("gateway failed to start: {last_logs}");
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let health = self.admin_url("/healthz");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("aisle exited early with {status}"));
            }
            // Pingora retries a busy port rather than exiting: treat its
            // warning as a port clash (the caller retries with new ports).
            if self.logs().contains(" is in use") {
                return Err("a listen port is in use".to_string());
            }
            let healthy = match self
                .client
                .get(&health)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16() == 200,
                Err(_) => false,
            };
            if healthy
                && TcpStream::connect_timeout(&self.listen, Duration::from_millis(500)).is_ok()
                && !self.logs().contains(" is in use")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "aisle not healthy within {timeout:?} (GET {health} != 200 or {} not accepting)",
                    self.listen
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Graceful upgrade, as an operator does it: starts `aisle run --upgrade` on this gateway's
    /// config and environment, waits (bounded) until it listens on `socket` for the listeners,
    /// then sends the running process `SIGQUIT`. From then on this `Gateway` is the new
    /// process; the old one is returned, to watch it drain and exit.
    pub async fn upgrade(&mut self, socket: &Path) -> Replaced {
        let _ = std::fs::remove_file(socket);
        let new = spawn_aisle(self.dir.path(), &self.config_path, &self.env, true);
        let old = std::mem::replace(&mut self.child, new);
        let mut replaced = Replaced { child: old };
        poll_until(
            Duration::from_secs(10),
            "the new process to listen on the upgrade socket",
            || async { socket.exists().then_some(()) },
        )
        .await;
        let status = Command::new("kill")
            .arg("-QUIT")
            .arg(replaced.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -QUIT {}", replaced.child.id());
        if let Ok(Some(s)) = replaced.child.try_wait() {
            panic!("the old process had exited before the upgrade: {s}");
        }
        replaced
    }

    /// Sends `SIGTERM` (graceful shutdown) to this gateway's own process.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.child.id());
    }

    /// Sends signal `name` (`HUP`, `TERM`, ...) to this gateway's own process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.child.id());
    }

    /// Whether the process has a handler installed for signal number `signum` (Linux:
    /// `SigCgt` in `/proc/<pid>/status`), so a test can wait for it instead of sleeping.
    pub fn catches_signal(&self, signum: u32) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (signum - 1)) != 0)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id of this gateway's (current) process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Rewrites (or creates) the rules file `name` beside this gateway's `gateway.toml`.
    pub fn write_rules(&self, name: &str, contents: &str) {
        std::fs::write(self.dir.path().join("rules").join(name), contents)
            .expect("write rule file");
    }

    /// Rewrites this gateway's `gateway.toml` with `edit` applied to its current text.
    pub fn edit_config(&self, edit: impl FnOnce(&str) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read gateway.toml");
        std::fs::write(&self.config_path, edit(&text)).expect("write gateway.toml");
    }

    /// Waits (bounded) for the process to exit; `None` if it is still running at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout).await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills this gateway's process at once (`SIGKILL`), as a crash would.
    pub fn kill_now(&mut self) {
        self.kill();
    }

    /// stdout + stderr of the gateway so far.
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "----- aisle stdout -----\n{}\n----- aisle stderr -----\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// The `gateway.toml` this gateway runs (its rules are in `rules/` beside it).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The proxy listener's address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// `method path` on the admin listener with `Authorization: Bearer token` and a JSON body
    /// (none when `Null`): the status and the answer as JSON (`Null` when it is not JSON).
    pub async fn admin_json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {token}");
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let r = fetch_with_body(
            &self.client,
            method,
            &self.admin_url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            text,
        )
        .await;
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (r.status, v)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        fetch(&self.client, method, &self.url(path), headers).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request("GET", path, headers).await
    }

    /// Prometheus text from `GET {admin}/metrics`.
    pub async fn metrics(&self) -> String {
        let r = fetch(&self.client, "GET", &self.admin_url("/metrics"), &[]).await;
        assert_eq!(r.status, 200, "GET /metrics status");
        r.text()
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Poll the metrics endpoint until `name{labels}` satisfies `pred`.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        what: &str,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let pred = &pred;
        poll_until(
            Duration::from_secs(10),
            &format!("metric {name}{labels:?} {what}"),
            || async move { self.metric(name, labels).await.filter(|v| pred(*v)) },
        )
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "===== gateway logs ({}) =====\n{}",
                self.config_path.display(),
                self.logs()
            );
        }
    }
}

/// Starts `aisle run` (with `--upgrade` when `upgrade`) in `dir`, appending its output to
/// `stdout.log` / `stderr.log` there (an upgraded process writes after the one it replaced).
fn spawn_aisle(dir: &Path, config_path: &Path, env: &[(String, String)], upgrade: bool) -> Child {
    let log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .expect("open log")
    };
    let mut cmd = Command::new(aisle_bin());
    cmd.arg("run").arg("--config").arg(config_path);
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log("stdout.log"))
        .stderr(log("stderr.log"))
        .spawn()
        .expect("spawn aisle")
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 connection (to check connection reuse precisely)
// ---------------------------------------------------------------------------

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive TCP connection speaking HTTP/1.1 by hand (blocking IO:
/// use from `spawn_blocking`). Every read has a 5 s timeout.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<RawConn> {
        RawConn::from_stream(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    }

    /// A connection made otherwise (e.g. from a chosen local address), set up as `connect`'s.
    pub fn from_stream(stream: TcpStream) -> std::io::Result<RawConn> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Send `GET path` and read one response (Content-Length framed).
    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<RawResp> {
        use std::io::{Error, ErrorKind, Read, Write};
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stream.write_all(req.as_bytes())?;
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed before a response",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("bad head {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no content-length"))?;
        self.buf.drain(..head_end + 4);
        while self.buf.len() < len {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "closed mid-body"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Ok(RawResp {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Parse Prometheus text: sum the samples of metric `name` whose label set
/// contains every pair in `labels`. `None` when no sample matched.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let parsed = parse_labels(label_text);
        let all = labels
            .iter()
            .all(|(k, v)| parsed.iter().any(|(pk, pv)| pk == k && pv == v));
        if !all {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((key, val));
        rest = &after[end..];
    }
    out
}

/// 1-based line number of the first line containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not found in:\n{text}"))
        + 1
}

/// IMF-fixdate (RFC 9110 HTTP-date) for `t`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{weekday}, {day:02} {} {year} {hh:02}:{mm:02}:{ss:02} GMT",
        MONTHS[(month - 1) as usize]
    )
}

/// `config` (a gateway.toml of [`config_for`]'s shape) with the file watcher off (`watch =
/// false`), for tests whose own writes must not reload the gateway: a test that reloads by
/// another trigger, or counts reloads by one.
pub fn without_watch(config: &str) -> String {
    let off = config.replacen("[server]\n", "[server]\nwatch = false\n", 1);
    assert!(
        off.contains("watch = false"),
        "no [server] table in {config}"
    );
    off
}

/// A minimal gateway.toml for one upstream `api` pointing at `origin_url`.
pub fn config_for(origin_url: &str) -> String {
    config_with_cache(origin_url, "64MiB", "8MiB")
}

pub fn config_with_cache(origin_url: &str, memory: &str, max_object: &str) -> String {
    format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"

[cache]
memory = "{memory}"
max_object = "{max_object}"
rules_dir = "rules"

[upstreams.api]
url = "{origin_url}"
connect_timeout = "2s"
read_timeout = "10s"
"#
    )
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn http_date_formats_known_instant() {
        // 1994-11-06T08:49:37Z, the RFC example.
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn metric_value_sums_matching_samples() {
        let text = "# HELP x y\n\
            aisle_requests_total{rule=\"a\",cache_status=\"hit\"} 2\n\
            aisle_requests_total{rule=\"b\",cache_status=\"hit\"} 3\n\
            aisle_requests_total{rule=\"a\",cache_status=\"miss\"} 1\n\
            aisle_cache_bytes 1024\n";
        assert_eq!(
            metric_value(text, "aisle_requests_total", &[("cache_status", "hit")]),
            Some(5.0)
        );
        assert_eq!(
            metric_value(
                text,
                "aisle_requests_total",
                &[("rule", "a"), ("cache_status", "miss")]
            ),
            Some(1.0)
        );
        assert_eq!(metric_value(text, "aisle_cache_bytes", &[]), Some(1024.0));
        assert_eq!(metric_value(text, "aisle_cache_entries", &[]), None);
    }

    #[test]
    fn cache_status_params() {
        let cs = "aisle; hit; ttl=42";
        assert!(is_hit(cs));
        assert_eq!(cache_status_param(cs, "ttl").as_deref(), Some("42"));
        assert!(!is_hit("aisle; fwd=uri-miss; stored"));
    }
}

// ---------------------------------------------------------------------------
// POST bodies, raw requests and a streaming (server-sent events) origin
// ---------------------------------------------------------------------------

/// `POST url` with `body` (reqwest sets `Content-Length`) and `headers`; reads
/// the whole answer.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    fetch_with_body(client, "POST", url, headers, body).await
}

/// `POST {gateway}{path}` with a JSON body (`Content-Type: application/json`
/// plus `headers`).
pub async fn post_json(
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    post(gw.client(), &gw.url(path), &all, body).await
}

/// Send `request` (raw bytes, which should say `Connection: close`) on a new
/// connection to `addr` and read the answer until the server closes it
/// (everything bounded by `timeout`). Chunked answers are decoded.
pub async fn raw_request(addr: SocketAddr, request: &[u8], timeout: Duration) -> RawResp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.write_all(request).await.expect("write raw request");
        let mut buf = Vec::new();
        // Until EOF; a reset after a complete answer is fine too.
        let _ = stream.read_to_end(&mut buf).await;
        buf
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| panic!("raw request to {addr}: no complete answer within {timeout:?}"));
    parse_raw_response(&buf)
}

/// Parse one HTTP/1.1 response (Content-Length, chunked, or close-delimited).
pub fn parse_raw_response(buf: &[u8]) -> RawResp {
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &buf[head_end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            decode_chunked(rest).unwrap_or_else(|e| panic!("bad chunked body: {e}"))
        } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            assert!(
                rest.len() >= len,
                "body shorter ({}) than Content-Length {len}",
                rest.len()
            );
            rest[..len].to_vec()
        } else {
            rest.to_vec()
        };
    RawResp {
        status,
        headers,
        body,
    }
}

/// Decode a complete chunked body (error if the final chunk is missing).
pub fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not terminated")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk shorter than its size".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A one-shot signal the test controls: origin scripts wait on it.
#[derive(Clone)]
pub struct Gate {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Let every waiter (present and future) through.
    pub fn open(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_open(&self) -> bool {
        *self.tx.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// One step of a streaming origin's answer.
#[derive(Clone)]
pub enum Step {
    /// Write these bytes as one chunk and flush.
    Chunk(Bytes),
    /// Wait until the gate is opened.
    Wait(Gate),
    /// Pause (simulates a slow upstream).
    Sleep(Duration),
    /// Close the connection at once, without the final chunk.
    Abort,
}

/// A streamed answer: status, headers, then the steps; after the last step
/// (unless it aborted) the final `0` chunk ends the body.
#[derive(Clone)]
pub struct StreamResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub steps: Vec<Step>,
}

impl StreamResponse {
    /// 200 `text/event-stream`, chunked.
    pub fn sse(steps: Vec<Step>) -> StreamResponse {
        StreamResponse {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            steps,
        }
    }
}

type StreamHandler = dyn Fn(OriginRequest) -> StreamResponse + Send + Sync + 'static;

struct StreamOriginState {
    handler: Box<StreamHandler>,
    log: Mutex<Vec<OriginRequest>>,
    /// Chunks written so far, per request (index = arrival order).
    sent: Mutex<Vec<usize>>,
}

/// A hand-written HTTP/1.1 origin on 127.0.0.1:0 whose answers are chunked
/// streams written step by step (keep-alive; `Content-Length` request bodies).
pub struct StreamOrigin {
    addr: SocketAddr,
    state: Arc<StreamOriginState>,
    stop_tx: watch::Sender<bool>,
}

impl StreamOrigin {
    pub fn start<F>(handler: F) -> StreamOrigin
    where
        F: Fn(OriginRequest) -> StreamResponse + Send + Sync + 'static,
    {
        let std_listener = StdTcpListener::bind("127.0.0.1:0").expect("bind stream origin");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("stream origin addr");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let state = Arc::new(StreamOriginState {
            handler: Box::new(handler),
            log: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let accept_state = state.clone();
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let st = accept_state.clone();
                        let mut conn_stop = stop_rx.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = serve_stream_conn(st, stream) => {}
                                _ = conn_stop.wait_for(|s| *s) => {}
                            }
                        });
                    }
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        });
        StreamOrigin {
            addr,
            state,
            stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far, all paths.
    pub fn total(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<OriginRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// Chunks written so far for the `i`-th request (0-based, arrival order).
    pub fn chunks_sent(&self, i: usize) -> usize {
        self.state.sent.lock().unwrap().get(i).copied().unwrap_or(0)
    }
}

impl Drop for StreamOrigin {
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
    }
}

async fn serve_stream_conn(state: Arc<StreamOriginState>, mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let mut headers = http::HeaderMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.trim().as_bytes()),
                    http::HeaderValue::from_str(v.trim()),
                ) {
                    headers.append(k, v);
                }
            }
        }
        let len: usize = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = Bytes::from(buf.drain(..len).collect::<Vec<u8>>());
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let (index, req) = {
            let mut log = state.log.lock().unwrap();
            let count = log.iter().filter(|r| r.path == path).count() + 1;
            let req = OriginRequest {
                method,
                path,
                query,
                headers,
                body,
                count,
            };
            log.push(req.clone());
            state.sent.lock().unwrap().push(0);
            (log.len() - 1, req)
        };
        let resp = (state.handler)(req);
        let mut out = format!("HTTP/1.1 {} X\r\n", resp.status);
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("transfer-encoding: chunked\r\n\r\n");
        if stream.write_all(out.as_bytes()).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        for step in resp.steps {
            match step {
                Step::Chunk(data) => {
                    let mut c = format!("{:x}\r\n", data.len()).into_bytes();
                    c.extend_from_slice(&data);
                    c.extend_from_slice(b"\r\n");
                    if stream.write_all(&c).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                    state.sent.lock().unwrap()[index] += 1;
                }
                Step::Wait(gate) => gate.wait().await,
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Abort => {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
        }
        if stream.write_all(b"0\r\n\r\n").await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// Read `resp`'s body into `buf` until it contains `needle`; panics if the
/// body ends or errors first, or after `timeout`.
pub async fn read_until_contains(
    resp: &mut reqwest::Response,
    buf: &mut Vec<u8>,
    needle: &[u8],
    timeout: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => panic!(
                "{what}: {:?} not received within {timeout:?}; got so far {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            Ok(Ok(None)) => panic!(
                "{what}: body ended before {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
            Ok(Err(e)) => panic!(
                "{what}: body error before {:?}: {e}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Read the rest of `resp`'s body into `buf` (bounded by `timeout`):
/// `Ok(())` at a clean end, `Err(reason)` when the body errors.
pub async fn read_to_end(
    resp: &mut reqwest::Response,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => return Err(format!("body not finished within {timeout:?}")),
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(format!("body error: {e}")),
        }
    }
}
