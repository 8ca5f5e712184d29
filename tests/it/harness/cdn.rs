//! Loopback stand-ins for the CDN purge APIs (Cloudflare, Fastly, CloudFront), for driving the
//! real providers in tests.
//!
//! No machine here reaches the real services, so each fake checks every request the way the
//! real API does (method, path, credentials, content type, body shape, limits and, for
//! CloudFront, a SigV4 signature recomputed with `aws-sigv4` from the known test credentials)
//! and answers with the real API's status and error shape. Anything a correct client would never
//! send is also recorded in `violations()`, so a test asserts `violations().is_empty()` instead
//! of trusting the client. Requests with well-formed but wrong credentials are refused the
//! same way and counted in `auth_failures()` rather than as violations: they are what a
//! misconfigured gateway sends, and tests provoke them on purpose.
//!
//! Each fake can be told to fail its next N valid requests (`fail_next`: 500, `throttle_next`:
//! 429 with `Retry-After`), to be down (`set_down`: 503 to every valid request, an outage), to
//! enforce a request rate (`enforce_rate`: a token bucket with a small burst, as the real APIs
//! have; a request that finds it empty gets a 429, counted in `rate_limited()`), or to hold requests unanswered (`hold`, then `release_held`),
//! and records what it accepted with the time of each request. The servers are hyper HTTP/1.1 on
//! 127.0.0.1:0, spawned on the test's tokio runtime and stopped when the fake is dropped.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
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

// ---------------------------------------------------------------------------
// The shared server and bookkeeping
// ---------------------------------------------------------------------------

/// A request as the fake received it.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An answer from a fake.
pub struct FakeResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl FakeResponse {
    fn new(status: u16, content_type: &str, body: String) -> Self {
        FakeResponse {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// A failure the test asked for.
#[derive(Clone, Debug)]
enum Injected {
    Status(u16),
    Throttle(String),
    /// CloudFront only: a 400 with this error code.
    Code(u16, &'static str),
}

/// A request rate a fake enforces: the least spacing between two valid requests, and when the
/// last one allowed came.
/// A token bucket: `burst` tokens, refilled at `per_second`; a request takes one.
struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

/// Bookkeeping every fake shares.
struct Common {
    requests: Mutex<Vec<FakeRequest>>,
    violations: Mutex<Vec<String>>,
    auth_failures: AtomicUsize,
    injected: Mutex<VecDeque<Injected>>,
    /// An outage: every valid request gets a 503.
    down: AtomicBool,
    refused_down: AtomicUsize,
    rate: Mutex<Option<RateLimit>>,
    rate_limited: AtomicUsize,
    /// Requests wait while this says true.
    hold: watch::Sender<bool>,
    held: AtomicUsize,
    /// What held requests get when released: 0 = handled as usual, else this status (and
    /// nothing is accepted).
    release_status: AtomicU16,
    /// When each valid request reached the decision (accepted or failed), with its status.
    answered: Mutex<Vec<(Instant, u16)>>,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            requests: Mutex::default(),
            violations: Mutex::default(),
            auth_failures: AtomicUsize::new(0),
            injected: Mutex::default(),
            down: AtomicBool::new(false),
            refused_down: AtomicUsize::new(0),
            rate: Mutex::new(None),
            rate_limited: AtomicUsize::new(0),
            hold: watch::channel(false).0,
            held: AtomicUsize::new(0),
            release_status: AtomicU16::new(0),
            answered: Mutex::default(),
        }
    }
}

impl Common {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
    /// The failure a valid request gets, in order: an outage (503), a request sooner than the
    /// enforced rate (429), then the injected ones; `None`: accept it.
    fn next_injected(&self) -> Option<Injected> {
        let now = Instant::now();
        let fail = if self.down.load(Ordering::SeqCst) {
            self.refused_down.fetch_add(1, Ordering::SeqCst);
            Some(Injected::Status(503))
        } else {
            let mut rate = self.rate.lock().unwrap();
            let limited = rate.as_mut().is_some_and(|r| {
                let refill = r.last.map_or(r.burst, |l| {
                    now.duration_since(l).as_secs_f64() * r.per_second
                });
                r.tokens = (r.tokens + refill).min(r.burst);
                r.last = Some(now);
                let early = r.tokens < 1.0;
                if !early {
                    r.tokens -= 1.0;
                }
                early
            });
            drop(rate);
            if limited {
                self.rate_limited.fetch_add(1, Ordering::SeqCst);
                Some(Injected::Throttle("1".into()))
            } else {
                self.injected.lock().unwrap().pop_front()
            }
        };
        let status = match &fail {
            None => 200,
            Some(Injected::Status(s)) | Some(Injected::Code(s, _)) => *s,
            Some(Injected::Throttle(_)) => 429,
        };
        self.answered.lock().unwrap().push((now, status));
        fail
    }
    fn inject(&self, n: usize, what: Injected) {
        let mut q = self.injected.lock().unwrap();
        for _ in 0..n {
            q.push_back(what.clone());
        }
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static;

/// Runs `handler` behind a hyper server on 127.0.0.1:0 until `stop` is sent (or dropped).
fn serve(common: Arc<Common>, handler: Arc<Handler>) -> (SocketAddr, watch::Sender<bool>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake CDN");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let addr = std_listener.local_addr().expect("fake CDN addr");
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut stop = stop_rx.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (common, handler) = (common.clone(), handler.clone());
                    let mut conn_stop = stop_rx.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            handle(common.clone(), handler.clone(), req)
                        });
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                        tokio::select! {
                            _ = conn => {}
                            _ = conn_stop.wait_for(|s| *s) => {}
                        }
                    });
                }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    });
    (addr, stop_tx)
}

async fn handle(
    common: Arc<Common>,
    handler: Arc<Handler>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let freq = FakeRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    };
    common.requests.lock().unwrap().push(freq.clone());
    let mut hold = common.hold.subscribe();
    if *hold.borrow_and_update() {
        common.held.fetch_add(1, Ordering::SeqCst);
        let _ = hold.wait_for(|h| !*h).await;
        let status = common.release_status.load(Ordering::SeqCst);
        if status != 0 {
            return Ok(Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"released unanswered")))
                .expect("valid fake response"));
        }
    }
    let resp = handler(&freq);
    let mut b = Response::builder().status(resp.status);
    for (k, v) in &resp.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    Ok(b.body(Full::new(Bytes::from(resp.body)))
        .expect("valid fake response"))
}

/// What every fake offers: failure injection and the request log.
macro_rules! common_api {
    () => {
        /// `http://127.0.0.1:PORT`, the provider's `base`.
        pub fn base(&self) -> String {
            format!("http://{}", self.addr)
        }
        /// Requests received so far, valid or not.
        pub fn request_count(&self) -> usize {
            self.common.requests.lock().unwrap().len()
        }
        /// What a correct client would never have sent.
        pub fn violations(&self) -> Vec<String> {
            self.common.violations.lock().unwrap().clone()
        }
        /// Well-formed requests refused for their credentials.
        pub fn auth_failures(&self) -> usize {
            self.common.auth_failures.load(Ordering::SeqCst)
        }
        /// The next `n` valid requests get a 500.
        pub fn fail_next(&self, n: usize) {
            self.fail_next_with(n, 500);
        }
        /// The next `n` valid requests get `status`.
        pub fn fail_next_with(&self, n: usize, status: u16) {
            self.common.inject(n, Injected::Status(status));
        }
        /// The next `n` valid requests get a 429 with `Retry-After: retry_after`.
        pub fn throttle_next(&self, n: usize, retry_after: &str) {
            self.common
                .inject(n, Injected::Throttle(retry_after.to_string()));
        }
        /// An outage: while `down`, every valid request gets a 503.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn set_down(&self, down: bool) {
            self.common.down.store(down, Ordering::SeqCst);
        }
        /// Valid requests refused by an outage so far.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn refused_down(&self) -> usize {
            self.common.refused_down.load(Ordering::SeqCst)
        }
        /// From now on valid requests take a token from a bucket of `burst` tokens refilled at
        /// `per_second`, as the real APIs' token buckets do; one that finds none gets a 429 with
        /// `Retry-After: 1`. A small burst absorbs the jitter of arrival times under load (a
        /// request sent on time can arrive after the next one's share of the interval) while any
        /// sustained excess over the rate is still refused.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn enforce_rate(&self, per_second: f64, burst: u32) {
            *self.common.rate.lock().unwrap() = Some(RateLimit {
                per_second,
                burst: f64::from(burst),
                tokens: f64::from(burst),
                last: None,
            });
        }
        /// Requests refused by the enforced rate.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn rate_limited(&self) -> usize {
            self.common.rate_limited.load(Ordering::SeqCst)
        }
        /// When each valid request was decided, and its status, in order.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn answered(&self) -> Vec<(std::time::Instant, u16)> {
            self.common.answered.lock().unwrap().clone()
        }
        /// Requests arriving from now on wait unanswered until [`Self::release_held`].
        #[allow(dead_code)] // not every fake's tests use it
        pub fn hold(&self) {
            self.common.release_status.store(0, Ordering::SeqCst);
            self.common.hold.send_replace(true);
        }
        /// Requests that waited (or wait) in a hold.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn held(&self) -> usize {
            self.common.held.load(Ordering::SeqCst)
        }
        /// Ends the hold: the waiting requests get `status` (nothing accepted), or are handled
        /// as usual when `status` is `None`.
        #[allow(dead_code)] // not every fake's tests use it
        pub fn release_held(&self, status: Option<u16>) {
            self.common
                .release_status
                .store(status.unwrap_or(0), Ordering::SeqCst);
            self.common.hold.send_replace(false);
        }
    };
}

fn path_segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

fn printable_no_space(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

// ---------------------------------------------------------------------------
// Cloudflare
// ---------------------------------------------------------------------------

pub const CLOUDFLARE_MAX_ITEMS: usize = 100;

#[derive(Default)]
struct CloudflareState {
    /// (field, items) of each accepted purge, in order.
    accepted: Vec<(String, Vec<String>)>,
    ids: Vec<String>,
}

/// `POST /client/v4/zones/{zone}/purge_cache`, `Authorization: Bearer {token}`.
pub struct FakeCloudflare {
    addr: SocketAddr,
    common: Arc<Common>,
    state: Arc<Mutex<CloudflareState>>,
    _stop: watch::Sender<bool>,
}

fn cf_answer(status: u16, code: u32, message: &str) -> FakeResponse {
    FakeResponse::new(
        status,
        "application/json",
        serde_json::json!({
            "success": false,
            "errors": [{"code": code, "message": message}],
            "messages": [],
            "result": null
        })
        .to_string(),
    )
}

impl FakeCloudflare {
    pub fn start(zone: &str, token: &str) -> FakeCloudflare {
        let common = Arc::new(Common::default());
        let state = Arc::new(Mutex::new(CloudflareState::default()));
        let (c, s) = (common.clone(), state.clone());
        let (zone, token) = (zone.to_string(), token.to_string());
        let handler: Arc<Handler> =
            Arc::new(move |req: &FakeRequest| cloudflare_handle(&c, &s, &zone, &token, req));
        let (addr, stop) = serve(common.clone(), handler);
        FakeCloudflare {
            addr,
            common,
            state,
            _stop: stop,
        }
    }

    common_api!();

    /// Accepted purges as (field, items), in order.
    pub fn accepted(&self) -> Vec<(String, Vec<String>)> {
        self.state.lock().unwrap().accepted.clone()
    }
    fn accepted_of(&self, field: &str) -> Vec<String> {
        self.accepted()
            .into_iter()
            .filter(|(f, _)| f == field)
            .flat_map(|(_, i)| i)
            .collect()
    }
    pub fn accepted_tags(&self) -> Vec<String> {
        self.accepted_of("tags")
    }
    pub fn accepted_files(&self) -> Vec<String> {
        self.accepted_of("files")
    }
    pub fn accepted_prefixes(&self) -> Vec<String> {
        self.accepted_of("prefixes")
    }
    pub fn accepted_hosts(&self) -> Vec<String> {
        self.accepted_of("hosts")
    }
    /// The purge ids handed out, in order.
    pub fn purge_ids(&self) -> Vec<String> {
        self.state.lock().unwrap().ids.clone()
    }
}

fn cloudflare_handle(
    common: &Common,
    state: &Mutex<CloudflareState>,
    zone: &str,
    token: &str,
    req: &FakeRequest,
) -> FakeResponse {
    let seg = path_segments(&req.path);
    let shape_ok =
        seg.len() == 5 && seg[..3] == ["client", "v4", "zones"] && seg[4] == "purge_cache";
    if !shape_ok {
        common.violation(format!(
            "cloudflare: unknown endpoint {} {}",
            req.method, req.path
        ));
        return cf_answer(404, 7000, "No route for that URI");
    }
    if req.method != "POST" {
        common.violation(format!("cloudflare: {} instead of POST", req.method));
        return cf_answer(405, 10405, "Method not allowed for this endpoint");
    }
    match req.header("authorization") {
        None => {
            common.violation("cloudflare: no Authorization header".into());
            return cf_answer(400, 10000, "Authentication error");
        }
        Some(a) => match a.strip_prefix("Bearer ") {
            None => {
                common.violation(format!(
                    "cloudflare: Authorization is not a Bearer token: {a:?}"
                ));
                return cf_answer(400, 6111, "Invalid format for Authorization header");
            }
            Some(t) if t != token => {
                common.auth_failures.fetch_add(1, Ordering::SeqCst);
                return cf_answer(403, 10000, "Authentication error");
            }
            Some(_) => {}
        },
    }
    if seg[3] != zone {
        common.auth_failures.fetch_add(1, Ordering::SeqCst);
        return cf_answer(
            404,
            7003,
            "Could not route to /zones/purge_cache, perhaps your object identifier is invalid?",
        );
    }
    let ct = req.header("content-type").unwrap_or("");
    if !ct.starts_with("application/json") {
        common.violation(format!(
            "cloudflare: Content-Type {ct:?}, not application/json"
        ));
        return cf_answer(400, 6003, "Invalid request headers");
    }
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            common.violation(format!("cloudflare: body is not JSON: {e}"));
            return cf_answer(400, 6007, "Malformed JSON in request body");
        }
    };
    let Some(obj) = body.as_object() else {
        common.violation("cloudflare: body is not a JSON object".into());
        return cf_answer(400, 6007, "Malformed JSON in request body");
    };
    const KINDS: [&str; 5] = ["files", "tags", "hosts", "prefixes", "purge_everything"];
    let keys: Vec<&String> = obj.keys().collect();
    if keys.len() != 1 || !KINDS.contains(&keys[0].as_str()) {
        common.violation(format!(
            "cloudflare: body must have exactly one of {KINDS:?}, has {keys:?}"
        ));
        return cf_answer(
            400,
            1012,
            "Request must contain one of \"purge_everything\", \"files\", \"tags\", \"hosts\" or \"prefixes\"",
        );
    }
    let field = keys[0].clone();
    let value = &obj[&field];
    let items: Vec<String> = if field == "purge_everything" {
        if value != &serde_json::Value::Bool(true) {
            common.violation(format!("cloudflare: purge_everything = {value}"));
            return cf_answer(400, 1012, "purge_everything must be true");
        }
        Vec::new()
    } else {
        let Some(arr) = value.as_array() else {
            common.violation(format!("cloudflare: {field} is not an array"));
            return cf_answer(400, 1012, "Invalid purge request");
        };
        let mut items = Vec::new();
        for v in arr {
            let s = match (field.as_str(), v) {
                (_, serde_json::Value::String(s)) => s.clone(),
                ("files", serde_json::Value::Object(o)) => {
                    match o.get("url").and_then(|u| u.as_str()) {
                        Some(u) => u.to_string(),
                        None => {
                            common.violation(format!("cloudflare: file object without url: {v}"));
                            return cf_answer(400, 1012, "Invalid purge request");
                        }
                    }
                }
                _ => {
                    common.violation(format!("cloudflare: {field} item is not a string: {v}"));
                    return cf_answer(400, 1012, "Invalid purge request");
                }
            };
            items.push(s);
        }
        if items.is_empty() {
            common.violation(format!("cloudflare: empty {field} list"));
            return cf_answer(400, 1012, "Invalid purge request");
        }
        if items.len() > CLOUDFLARE_MAX_ITEMS {
            common.violation(format!(
                "cloudflare: {} {field} in one request (limit {CLOUDFLARE_MAX_ITEMS})",
                items.len()
            ));
            return cf_answer(
                400,
                1014,
                &format!("Only {CLOUDFLARE_MAX_ITEMS} items may be purged per request"),
            );
        }
        for it in &items {
            let ok = match field.as_str() {
                "files" => url_is_http(it),
                "tags" => printable_no_space(it) && it.len() <= 1024,
                "hosts" => printable_no_space(it) && !it.contains('/'),
                "prefixes" => printable_no_space(it) && !it.contains("://"),
                _ => true,
            };
            if !ok {
                common.violation(format!("cloudflare: invalid {field} item {it:?}"));
                return cf_answer(400, 1012, &format!("Invalid {field} item"));
            }
        }
        items
    };
    match common.next_injected() {
        Some(Injected::Status(s)) => return cf_answer(s, 10001, "Internal error"),
        Some(Injected::Throttle(ra)) => {
            return cf_answer(
                429,
                971,
                "Please wait and consider throttling your request speed",
            )
            .header("retry-after", &ra)
        }
        Some(Injected::Code(s, code)) => return cf_answer(s, 1000, code),
        None => {}
    }
    let mut st = state.lock().unwrap();
    let id = format!("{:032x}", st.ids.len() + 0xcf00);
    st.ids.push(id.clone());
    st.accepted.push((field, items));
    FakeResponse::new(
        200,
        "application/json",
        serde_json::json!({"success": true, "errors": [], "messages": [], "result": {"id": id}})
            .to_string(),
    )
}

fn url_is_http(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://"))
        && u.split("://").nth(1).is_some_and(|rest| !rest.is_empty())
        && printable_no_space(u)
}

// ---------------------------------------------------------------------------
// Fastly
// ---------------------------------------------------------------------------

pub const FASTLY_MAX_KEYS: usize = 256;

#[derive(Default)]
struct FastlyState {
    /// (keys, soft) of each accepted purge, in order.
    accepted: Vec<(Vec<String>, bool)>,
    /// (`host/path?query`, soft) of each accepted URL purge, in order.
    accepted_urls: Vec<(String, bool)>,
    next_id: usize,
}

/// `POST /service/{id}/purge` (`Surrogate-Key` header or `{"surrogate_keys": [...]}`),
/// `POST /service/{id}/purge/{key}` and the URL purge `POST /purge/{host}/{path}?{query}`
/// (no body), with `Fastly-Key` (the service has authenticated purging on, so a URL purge
/// without the key is refused too).
pub struct FakeFastly {
    addr: SocketAddr,
    common: Arc<Common>,
    state: Arc<Mutex<FastlyState>>,
    _stop: watch::Sender<bool>,
}

fn fastly_error(status: u16, msg: &str, detail: &str) -> FakeResponse {
    FakeResponse::new(
        status,
        "application/json",
        serde_json::json!({"msg": msg, "detail": detail}).to_string(),
    )
}

impl FakeFastly {
    pub fn start(service_id: &str, token: &str) -> FakeFastly {
        let common = Arc::new(Common::default());
        let state = Arc::new(Mutex::new(FastlyState::default()));
        let (c, s) = (common.clone(), state.clone());
        let (service, token) = (service_id.to_string(), token.to_string());
        let handler: Arc<Handler> =
            Arc::new(move |req: &FakeRequest| fastly_handle(&c, &s, &service, &token, req));
        let (addr, stop) = serve(common.clone(), handler);
        FakeFastly {
            addr,
            common,
            state,
            _stop: stop,
        }
    }

    common_api!();

    /// Accepted purges as (keys, soft), in order.
    pub fn accepted(&self) -> Vec<(Vec<String>, bool)> {
        self.state.lock().unwrap().accepted.clone()
    }
    pub fn soft_keys(&self) -> Vec<String> {
        self.accepted()
            .into_iter()
            .filter(|(_, s)| *s)
            .flat_map(|(k, _)| k)
            .collect()
    }
    pub fn hard_keys(&self) -> Vec<String> {
        self.accepted()
            .into_iter()
            .filter(|(_, s)| !*s)
            .flat_map(|(k, _)| k)
            .collect()
    }
    /// Accepted URL purges as (`host/path?query`, soft), in order.
    pub fn accepted_urls(&self) -> Vec<(String, bool)> {
        self.state.lock().unwrap().accepted_urls.clone()
    }
}

/// A hostname as Fastly's URL purge takes it: labels of letters, digits and '-', an optional
/// port.
fn fastly_host(h: &str) -> bool {
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
}

/// `POST /purge/{host}/{path}`: Fastly's "Purge a URL".
fn fastly_url_purge(
    common: &Common,
    state: &Mutex<FastlyState>,
    token: &str,
    req: &FakeRequest,
) -> FakeResponse {
    if req.method != "POST" {
        common.violation(format!(
            "fastly: {} {} instead of POST",
            req.method, req.path
        ));
        return fastly_error(405, "Method not allowed", "Use POST");
    }
    match req.header("fastly-key") {
        None => {
            common.violation("fastly: URL purge without Fastly-Key".into());
            return fastly_error(401, "Provided credentials are missing or invalid", "");
        }
        Some(k) if k != token => {
            common.auth_failures.fetch_add(1, Ordering::SeqCst);
            return fastly_error(401, "Provided credentials are missing or invalid", "");
        }
        Some(_) => {}
    }
    let rest = &req.path["/purge/".len()..];
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if !fastly_host(host) {
        common.violation(format!(
            "fastly: URL purge of {rest:?}: {host:?} is not a hostname"
        ));
        return fastly_error(400, "Bad request", "Invalid URL");
    }
    if !req.body.is_empty() {
        common.violation(format!(
            "fastly: URL purge with a body of {} bytes",
            req.body.len()
        ));
    }
    let soft = match req.header("fastly-soft-purge") {
        None => false,
        Some("1") => true,
        Some(v) => {
            common.violation(format!(
                "fastly: Fastly-Soft-Purge: {v:?} (only \"1\" is meaningful)"
            ));
            return fastly_error(400, "Bad request", "Fastly-Soft-Purge must be 1");
        }
    };
    match common.next_injected() {
        Some(Injected::Status(s)) => return fastly_error(s, "Internal Server Error", ""),
        Some(Injected::Throttle(ra)) => {
            return fastly_error(429, "Too many requests", "Rate limit exceeded")
                .header("retry-after", &ra)
        }
        Some(Injected::Code(s, code)) => return fastly_error(s, code, ""),
        None => {}
    }
    let target = match &req.query {
        Some(q) => format!("{host}{path}?{q}"),
        None => format!("{host}{path}"),
    };
    let mut st = state.lock().unwrap();
    st.next_id += 1;
    let id = format!("108-1391560174-{:06}", st.next_id);
    st.accepted_urls.push((target, soft));
    FakeResponse::new(
        200,
        "application/json",
        serde_json::json!({"status": "ok", "id": id}).to_string(),
    )
}

fn fastly_handle(
    common: &Common,
    state: &Mutex<FastlyState>,
    service: &str,
    token: &str,
    req: &FakeRequest,
) -> FakeResponse {
    if req.path.starts_with("/purge/") {
        return fastly_url_purge(common, state, token, req);
    }
    let seg = path_segments(&req.path);
    let single = match seg.as_slice() {
        ["service", _, "purge"] => None,
        ["service", _, "purge", key] => Some(key.to_string()),
        _ => {
            common.violation(format!(
                "fastly: unknown endpoint {} {}",
                req.method, req.path
            ));
            return fastly_error(404, "Record not found", "Unknown endpoint");
        }
    };
    if req.method != "POST" {
        common.violation(format!("fastly: {} instead of POST", req.method));
        return fastly_error(405, "Method not allowed", "Use POST");
    }
    match req.header("fastly-key") {
        None => {
            common.violation("fastly: no Fastly-Key header".into());
            return fastly_error(401, "Provided credentials are missing or invalid", "");
        }
        Some(k) if k != token => {
            common.auth_failures.fetch_add(1, Ordering::SeqCst);
            return fastly_error(401, "Provided credentials are missing or invalid", "");
        }
        Some(_) => {}
    }
    if seg[1] != service {
        common.auth_failures.fetch_add(1, Ordering::SeqCst);
        return fastly_error(404, "Record not found", "Cannot find service");
    }
    let soft = match req.header("fastly-soft-purge") {
        None => false,
        Some("1") => true,
        Some(v) => {
            common.violation(format!(
                "fastly: Fastly-Soft-Purge: {v:?} (only \"1\" is meaningful)"
            ));
            return fastly_error(400, "Bad request", "Fastly-Soft-Purge must be 1");
        }
    };
    let keys: Vec<String> = if let Some(k) = single {
        vec![k]
    } else if let Some(h) = req.header("surrogate-key") {
        if h.contains("  ") || h.starts_with(' ') || h.ends_with(' ') {
            common.violation(format!("fastly: Surrogate-Key with stray spaces: {h:?}"));
        }
        h.split(' ')
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect()
    } else if req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
    {
        let v: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&req.body)
            .ok()
            .and_then(|v| v.get("surrogate_keys").cloned())
            .and_then(|k| serde_json::from_value(k).ok());
        match v {
            Some(k) => k,
            None => {
                common.violation("fastly: JSON body without a surrogate_keys string list".into());
                return fastly_error(
                    400,
                    "Bad request",
                    "surrogate_keys must be a list of strings",
                );
            }
        }
    } else {
        common.violation("fastly: batch purge without Surrogate-Key header or JSON body".into());
        return fastly_error(400, "Bad request", "No surrogate keys given");
    };
    if keys.is_empty() {
        common.violation("fastly: no keys in a batch purge".into());
        return fastly_error(400, "Bad request", "No surrogate keys given");
    }
    if keys.len() > FASTLY_MAX_KEYS {
        common.violation(format!(
            "fastly: {} keys in one request (limit {FASTLY_MAX_KEYS})",
            keys.len()
        ));
        return fastly_error(
            400,
            "Bad request",
            &format!("A maximum of {FASTLY_MAX_KEYS} surrogate keys may be purged at once"),
        );
    }
    if let Some(bad) = keys
        .iter()
        .find(|k| !printable_no_space(k) || k.len() > 1024)
    {
        common.violation(format!("fastly: invalid surrogate key {bad:?}"));
        return fastly_error(400, "Bad request", "Invalid surrogate key");
    }
    match common.next_injected() {
        Some(Injected::Status(s)) => return fastly_error(s, "Internal Server Error", ""),
        Some(Injected::Throttle(ra)) => {
            return fastly_error(429, "Too many requests", "Rate limit exceeded")
                .header("retry-after", &ra)
        }
        Some(Injected::Code(s, code)) => return fastly_error(s, code, ""),
        None => {}
    }
    let mut st = state.lock().unwrap();
    let mut answer = serde_json::Map::new();
    for k in &keys {
        st.next_id += 1;
        answer.insert(
            k.clone(),
            serde_json::Value::String(format!("108-1391560174-{:06}", st.next_id)),
        );
    }
    st.accepted.push((keys, soft));
    FakeResponse::new(
        200,
        "application/json",
        serde_json::Value::Object(answer).to_string(),
    )
}

// ---------------------------------------------------------------------------
// CloudFront
// ---------------------------------------------------------------------------

pub const CLOUDFRONT_MAX_PATHS: usize = 3000;
pub const CLOUDFRONT_MAX_WILDCARDS: usize = 15;
pub const CLOUDFRONT_XMLNS: &str = "http://cloudfront.amazonaws.com/doc/2020-05-31/";
/// How far `X-Amz-Date` may be from the fake's clock (AWS allows 5 minutes).
const MAX_SKEW: Duration = Duration::from_secs(300);

/// One invalidation CloudFront created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub id: String,
    pub caller_reference: String,
    pub paths: Vec<String>,
}

#[derive(Default)]
struct CloudFrontState {
    invalidations: Vec<Invalidation>,
    by_reference: HashMap<String, usize>,
    /// Requests answered with an existing invalidation (idempotent retries).
    replays: usize,
}

/// `POST /2020-05-31/distribution/{id}/invalidation`, SigV4-signed for `cloudfront`.
pub struct FakeCloudFront {
    addr: SocketAddr,
    common: Arc<Common>,
    state: Arc<Mutex<CloudFrontState>>,
    _stop: watch::Sender<bool>,
}

struct CloudFrontKeys {
    distribution_id: String,
    access_key_id: String,
    secret_access_key: String,
    region: String,
}

fn cf_error(status: u16, code: &str, message: &str) -> FakeResponse {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    FakeResponse::new(
        status,
        "text/xml",
        format!(
            "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"{CLOUDFRONT_XMLNS}\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{}</Message></Error><RequestId>fake-request</RequestId></ErrorResponse>",
            xml_escape(message)
        ),
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl FakeCloudFront {
    pub fn start(
        distribution_id: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> FakeCloudFront {
        let common = Arc::new(Common::default());
        let state = Arc::new(Mutex::new(CloudFrontState::default()));
        let keys = Arc::new(CloudFrontKeys {
            distribution_id: distribution_id.into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            region: "us-east-1".into(),
        });
        let (c, s) = (common.clone(), state.clone());
        let handler: Arc<Handler> =
            Arc::new(move |req: &FakeRequest| cloudfront_handle(&c, &s, &keys, req));
        let (addr, stop) = serve(common.clone(), handler);
        FakeCloudFront {
            addr,
            common,
            state,
            _stop: stop,
        }
    }

    common_api!();

    /// The next `n` valid requests get a 400 `TooManyInvalidationsInProgress`.
    pub fn too_many_in_progress_next(&self, n: usize) {
        self.common
            .inject(n, Injected::Code(400, "TooManyInvalidationsInProgress"));
    }

    /// Invalidations created, each once however often it was re-sent.
    pub fn invalidations(&self) -> Vec<Invalidation> {
        self.state.lock().unwrap().invalidations.clone()
    }
    /// Paths of every invalidation created, in order.
    pub fn accepted_paths(&self) -> Vec<String> {
        self.invalidations()
            .into_iter()
            .flat_map(|i| i.paths)
            .collect()
    }
    /// Re-sent batches answered with their existing invalidation.
    pub fn replays(&self) -> usize {
        self.state.lock().unwrap().replays
    }
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=.., SignedHeaders=.., Signature=..`.
struct AuthHeader {
    access_key_id: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
}

fn parse_authorization(v: &str) -> Option<AuthHeader> {
    let rest = v.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut cred = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, val) = part.trim().split_once('=')?;
        match k {
            "Credential" => cred = Some(val),
            "SignedHeaders" => signed = Some(val),
            "Signature" => sig = Some(val),
            _ => return None,
        }
    }
    let c: Vec<&str> = cred?.split('/').collect();
    if c.len() != 5 || c[4] != "aws4_request" {
        return None;
    }
    let signature = sig?.to_string();
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(AuthHeader {
        access_key_id: c[0].into(),
        date: c[1].into(),
        region: c[2].into(),
        service: c[3].into(),
        signed_headers: signed?.split(';').map(str::to_string).collect(),
        signature,
    })
}

/// `20231114T221320Z` -> a time.
fn parse_amz_date(v: &str) -> Option<SystemTime> {
    let t = chrono::NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%SZ").ok()?;
    let secs = u64::try_from(t.and_utc().timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Recomputes the request's signature with `aws-sigv4` from the headers it claims to have signed.
fn expected_signature(
    keys: &CloudFrontKeys,
    req: &FakeRequest,
    auth: &AuthHeader,
    at: SystemTime,
) -> Result<String, String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let host = req.header("host").ok_or("no Host header")?;
    let url = match &req.query {
        Some(q) => format!("http://{host}{}?{q}", req.path),
        None => format!("http://{host}{}", req.path),
    };
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for name in &auth.signed_headers {
        let v = req
            .header(name)
            .ok_or_else(|| format!("signed header {name} is not in the request"))?;
        headers.push((name.as_str(), v));
    }
    let token = req.header("x-amz-security-token").map(str::to_string);
    let identity = aws_credential_types::Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.clone(),
        token,
        None,
        "fake-cloudfront",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&keys.region)
        .name("cloudfront")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        &req.method,
        &url,
        headers.into_iter(),
        SignableBody::Bytes(&req.body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, signature) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    // The recomputed header must sign exactly the same header list.
    let recomputed = instructions
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let want_list = format!("SignedHeaders={},", auth.signed_headers.join(";"));
    if !recomputed.contains(&want_list) {
        return Err(format!(
            "the request signs {:?} but a canonical signature covers another header set ({recomputed})",
            auth.signed_headers
        ));
    }
    Ok(signature)
}

fn cloudfront_handle(
    common: &Common,
    state: &Mutex<CloudFrontState>,
    keys: &CloudFrontKeys,
    req: &FakeRequest,
) -> FakeResponse {
    let seg = path_segments(&req.path);
    if !(seg.len() == 4
        && seg[0] == "2020-05-31"
        && seg[1] == "distribution"
        && seg[3] == "invalidation")
    {
        common.violation(format!(
            "cloudfront: unknown endpoint {} {}",
            req.method, req.path
        ));
        return cf_error(
            404,
            "NoSuchResource",
            "The specified resource does not exist",
        );
    }
    if req.method != "POST" {
        common.violation(format!("cloudfront: {} instead of POST", req.method));
        return cf_error(
            405,
            "MethodNotAllowed",
            "Use POST to create an invalidation",
        );
    }

    // --- SigV4 ---
    let Some(auth_value) = req.header("authorization") else {
        common.violation("cloudfront: request is not signed (no Authorization)".into());
        return cf_error(
            403,
            "MissingAuthenticationToken",
            "Missing Authentication Token",
        );
    };
    let Some(auth) = parse_authorization(auth_value) else {
        common.violation(format!(
            "cloudfront: malformed SigV4 Authorization {auth_value:?}"
        ));
        return cf_error(
            400,
            "IncompleteSignature",
            "Authorization header is malformed",
        );
    };
    let Some(amz_date) = req.header("x-amz-date") else {
        common.violation("cloudfront: no X-Amz-Date header".into());
        return cf_error(400, "IncompleteSignature", "X-Amz-Date is required");
    };
    let Some(at) = parse_amz_date(amz_date) else {
        common.violation(format!(
            "cloudfront: X-Amz-Date {amz_date:?} is not yyyyMMddTHHmmssZ"
        ));
        return cf_error(400, "IncompleteSignature", "Invalid X-Amz-Date");
    };
    if !amz_date.starts_with(&auth.date) {
        common.violation("cloudfront: credential scope date differs from X-Amz-Date".into());
        return cf_error(
            403,
            "SignatureDoesNotMatch",
            "Credential scope date mismatch",
        );
    }
    let now = SystemTime::now();
    let skew = now.duration_since(at).unwrap_or_else(|e| e.duration());
    if skew > MAX_SKEW {
        common.violation(format!("cloudfront: X-Amz-Date is {skew:?} off"));
        return cf_error(
            403,
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large",
        );
    }
    if auth.service != "cloudfront" || auth.region != keys.region {
        common.violation(format!(
            "cloudfront: credential scoped to {}/{}, not {}/cloudfront",
            auth.region, auth.service, keys.region
        ));
        return cf_error(
            403,
            "SignatureDoesNotMatch",
            "Credential should be scoped to correct service: 'cloudfront'",
        );
    }
    for required in ["host", "x-amz-date"] {
        if !auth.signed_headers.iter().any(|h| h == required) {
            common.violation(format!("cloudfront: {required} is not signed"));
            return cf_error(
                403,
                "SignatureDoesNotMatch",
                "Host and X-Amz-Date must be signed",
            );
        }
    }
    if auth.access_key_id != keys.access_key_id {
        common.auth_failures.fetch_add(1, Ordering::SeqCst);
        return cf_error(
            403,
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        );
    }
    match expected_signature(keys, req, &auth, at) {
        Ok(sig) if sig == auth.signature => {}
        Ok(_) => {
            common.auth_failures.fetch_add(1, Ordering::SeqCst);
            return cf_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.");
        }
        Err(e) => {
            common.violation(format!("cloudfront: cannot verify the signature: {e}"));
            return cf_error(403, "SignatureDoesNotMatch", &e);
        }
    }
    if seg[2] != keys.distribution_id {
        common.auth_failures.fetch_add(1, Ordering::SeqCst);
        return cf_error(
            404,
            "NoSuchDistribution",
            "The specified distribution does not exist.",
        );
    }

    // --- Body ---
    let ct = req.header("content-type").unwrap_or("");
    if !(ct.starts_with("application/xml") || ct.starts_with("text/xml")) {
        common.violation(format!("cloudfront: Content-Type {ct:?}, not XML"));
        return cf_error(415, "UnsupportedMediaType", "Content-Type must be XML");
    }
    let text = match std::str::from_utf8(&req.body) {
        Ok(t) => t,
        Err(_) => {
            common.violation("cloudfront: body is not UTF-8".into());
            return cf_error(400, "MalformedXML", "Body is not UTF-8");
        }
    };
    let (reference, paths) = match parse_batch(text) {
        Ok(v) => v,
        Err((code, msg)) => {
            common.violation(format!("cloudfront: {code}: {msg}"));
            let status = if code == "BatchTooLarge" { 413 } else { 400 };
            return cf_error(status, code, &msg);
        }
    };
    match common.next_injected() {
        Some(Injected::Status(s)) => {
            return cf_error(s, "ServiceUnavailable", "CloudFront is unavailable")
        }
        Some(Injected::Throttle(ra)) => {
            return cf_error(429, "Throttling", "Rate exceeded").header("retry-after", &ra)
        }
        Some(Injected::Code(s, code)) => return cf_error(s, code, "Injected by the test"),
        None => {}
    }
    let mut st = state.lock().unwrap();
    let inv = match st.by_reference.get(&reference).copied() {
        Some(i) => {
            let existing = st.invalidations[i].clone();
            if existing.paths != paths {
                common.violation(format!(
                    "cloudfront: CallerReference {reference:?} reused for different paths"
                ));
                return cf_error(
                    409,
                    "InvalidationBatchAlreadyExists",
                    "CallerReference was used for another batch",
                );
            }
            st.replays += 1;
            existing
        }
        None => {
            let id = format!("I{:013}", st.invalidations.len() + 1);
            let inv = Invalidation {
                id,
                caller_reference: reference.clone(),
                paths,
            };
            let index = st.invalidations.len();
            st.by_reference.insert(reference, index);
            st.invalidations.push(inv.clone());
            inv
        }
    };
    let host = req.header("host").unwrap_or("cloudfront.amazonaws.com");
    let items: String = inv
        .paths
        .iter()
        .map(|p| format!("<Path>{}</Path>", xml_escape(p)))
        .collect();
    FakeResponse::new(
        201,
        "text/xml",
        format!(
            "<?xml version=\"1.0\"?>\n<Invalidation xmlns=\"{CLOUDFRONT_XMLNS}\"><Id>{}</Id><Status>InProgress</Status><CreateTime>2026-01-01T00:00:00.000Z</CreateTime><InvalidationBatch><Paths><Quantity>{}</Quantity><Items>{items}</Items></Paths><CallerReference>{}</CallerReference></InvalidationBatch></Invalidation>",
            inv.id,
            inv.paths.len(),
            xml_escape(&inv.caller_reference)
        ),
    )
    .header(
        "location",
        &format!(
            "http://{host}/2020-05-31/distribution/{}/invalidation/{}",
            keys.distribution_id, inv.id
        ),
    )
}

/// Checks an `InvalidationBatch` document as CloudFront does; (CallerReference, paths) or
/// (error code, message).
pub fn parse_batch(text: &str) -> Result<(String, Vec<String>), (&'static str, String)> {
    let doc = roxmltree::Document::parse(text)
        .map_err(|e| ("MalformedXML", format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "InvalidationBatch"
        || root.tag_name().namespace() != Some(CLOUDFRONT_XMLNS)
    {
        return Err((
            "MalformedXML",
            format!(
                "root is {:?} in {:?}, not InvalidationBatch in {CLOUDFRONT_XMLNS}",
                root.tag_name().name(),
                root.tag_name().namespace()
            ),
        ));
    }
    let children: Vec<roxmltree::Node> = root.children().filter(|n| n.is_element()).collect();
    let names: Vec<&str> = children.iter().map(|n| n.tag_name().name()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    if sorted != ["CallerReference", "Paths"] {
        return Err((
            "MalformedXML",
            format!(
                "InvalidationBatch must hold CallerReference and Paths once each, holds {names:?}"
            ),
        ));
    }
    let child = |name: &str| children.iter().find(|n| n.has_tag_name(name)).copied();
    let reference = child("CallerReference")
        .and_then(|n| n.text())
        .unwrap_or("")
        .to_string();
    if reference.trim().is_empty() {
        return Err(("InvalidArgument", "CallerReference is empty".into()));
    }
    let paths_node = child("Paths").expect("checked above");
    let elems: Vec<roxmltree::Node> = paths_node.children().filter(|n| n.is_element()).collect();
    let quantity = elems
        .iter()
        .find(|n| n.has_tag_name("Quantity"))
        .and_then(|n| n.text())
        .and_then(|t| t.trim().parse::<usize>().ok())
        .ok_or((
            "MalformedXML",
            "Paths/Quantity is missing or not a number".to_string(),
        ))?;
    let items = elems.iter().find(|n| n.has_tag_name("Items"));
    let mut paths = Vec::new();
    if let Some(items) = items {
        for n in items.children().filter(|n| n.is_element()) {
            if !n.has_tag_name("Path") {
                return Err((
                    "MalformedXML",
                    format!("Items holds <{}>, not <Path>", n.tag_name().name()),
                ));
            }
            paths.push(n.text().unwrap_or("").to_string());
        }
    }
    if quantity != paths.len() {
        return Err((
            "InconsistentQuantities",
            format!(
                "Quantity is {quantity} but {} paths are listed",
                paths.len()
            ),
        ));
    }
    if paths.is_empty() {
        return Err((
            "InvalidArgument",
            "an invalidation needs at least one path".into(),
        ));
    }
    for p in &paths {
        let ok = p.starts_with('/')
            && p.bytes().all(|b| b.is_ascii_graphic())
            && !p[..p.len() - 1].contains('*');
        if !ok {
            return Err(("InvalidArgument", format!("invalid path {p:?}")));
        }
    }
    let wildcards = paths.iter().filter(|p| p.ends_with('*')).count();
    let plain = paths.len() - wildcards;
    if plain > CLOUDFRONT_MAX_PATHS || wildcards > CLOUDFRONT_MAX_WILDCARDS {
        return Err((
            "BatchTooLarge",
            format!(
                "{plain} paths and {wildcards} wildcard paths (limits {CLOUDFRONT_MAX_PATHS} and \
                 {CLOUDFRONT_MAX_WILDCARDS})"
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = paths.iter().find(|p| !seen.insert(p.as_str())) {
        return Err(("InvalidArgument", format!("path {dup:?} is listed twice")));
    }
    Ok((reference, paths))
}
