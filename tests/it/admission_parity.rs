//! `aisle replay` and the gateway make the same admission decision and build the same key for
//! every request of a trace (issue 8: replay used to re-implement admission, and a JSON body
//! without `Content-Type`, or one sent chunked, was keyable in replay but bypassed by the
//! gateway).
//!
//! The shipped `gateway.toml` and `rules/` run in the real binary in front of a loopback origin;
//! each trace request is sent on a raw connection exactly as the trace frames it, and the
//! gateway's answer (`Cache-Status`) and its debug line (`key=`) are compared with what
//! `aisle::tools::replay::admit` and `key_of` say for the same line.

use aisle::config::Config;
use aisle::tools::replay::{admit, key_of, parse_line, Bypassed, TraceRequest};
use aisle::tools::tracegen::{generate, Options};
use aisle::trust::Client;
use std::path::Path;
use std::time::Duration;

use crate::harness::{cache_status_param, poll_until, Gateway, Origin, OriginResponse};

/// Lines a generator would not write: the framings and directives admission must judge alike.
const EDGE_CASES: &[&str] = &[
    // JSON, but not declared as JSON.
    r#"{"timestamp": 1, "method": "POST", "path": "/api/ai/recommendations", "headers": {"host": "127.0.0.1:8080"}, "body": {"query": {"type": "venue", "content": "x"}}}"#,
    // Declared JSON, sent chunked: its length is unknown before reading it.
    r#"{"timestamp": 2, "method": "POST", "path": "/api/ai/recommendations", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "transfer-encoding": "chunked"}, "body": {"query": {"type": "venue", "content": "x"}}}"#,
    // Declared JSON, not JSON.
    r#"{"timestamp": 3, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json"}, "body": "{nope"}"#,
    // Keyed, with a namespace and a shorter lifetime.
    r#"{"timestamp": 4, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "aisle-cache-namespace": "tenant-a", "aisle-cache-ttl": "30"}, "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}"#,
    // Method not cached, request no-store, a rule's GET with a port in Host, HEAD as GET.
    r#"{"timestamp": 5, "method": "DELETE", "path": "/api/vendors/search", "headers": {"host": "127.0.0.1:8080"}}"#,
    r#"{"timestamp": 6, "path": "/api/vendors/search", "query": "location=NYC", "headers": {"host": "127.0.0.1:8080", "cache-control": "no-store"}}"#,
    r#"{"timestamp": 7, "path": "/api/vendors/search", "query": "location=Brooklyn&vendorType=dj", "headers": {"host": "127.0.0.1:9999"}}"#,
    r#"{"timestamp": 8, "method": "HEAD", "path": "/api/vendors/search", "query": "location=nyc&vendorType=dj", "headers": {"host": "127.0.0.1"}}"#,
    // The default route: keyed on the whole query.
    r#"{"timestamp": 9, "path": "/not/a/rule", "query": "b=2&a=1", "headers": {"host": "127.0.0.1:8080"}}"#,
    // Identity (issue 9): a repeated keyed parameter and a keyed value that is not UTF-8 bypass;
    // host case, trailing dot and escapes of unreserved characters are normalized alike.
    r#"{"timestamp": 10, "path": "/api/vendors/search", "query": "location=Paris&location=Boston", "headers": {"host": "127.0.0.1:8080"}}"#,
    r#"{"timestamp": 11, "path": "/api/weddings/%FF/timeline", "headers": {"host": "127.0.0.1:8080"}}"#,
    r#"{"timestamp": 12, "path": "/api/weddings/4%32/timeline", "headers": {"host": "LocalHost.:8080"}}"#,
    r#"{"timestamp": 13, "path": "/api/vendors/search", "query": "location=%FE", "headers": {"host": "127.0.0.1"}}"#,
    // A repeated JSON key, an integer beyond 64 bits, integers past 2^53 (keyed exactly).
    r#"{"timestamp": 20, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json"}, "body": "{\"model\":\"m\",\"messages\":[],\"messages\":[1]}"}"#,
    r#"{"timestamp": 21, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json"}, "body": "{\"model\":\"m\",\"seed\":18446744073709551616}"}"#,
    r#"{"timestamp": 22, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json"}, "body": "{\"model\":\"m\",\"seed\":9007199254740993}"}"#,
    // A GET with a body its rule does not key on; a client's no-cache on a rule that ignores it.
    r#"{"timestamp": 23, "path": "/api/vendors/search", "query": "location=nyc", "headers": {"host": "127.0.0.1:8080"}, "body": "{\"location\":\"boston\"}"}"#,
    r#"{"timestamp": 24, "path": "/api/weather", "query": "city=nyc&date=2027-07-01", "headers": {"host": "127.0.0.1:8080", "cache-control": "no-cache"}}"#,
    // Credentials (issue 13): isolated chat calls with and without an API key, a repeated one
    // (bypasses), Anthropic's x-api-key, and Authorization on a rule that leaves it to RFC 9111
    // (cached, keyed without it, the answer decides).
    r#"{"timestamp": 30, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "authorization": "Bearer sk-parity-a"}, "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}"#,
    r#"{"timestamp": 31, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "authorization": "Bearer sk-parity-b"}, "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}"#,
    r#"{"timestamp": 32, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json"}, "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}"#,
    r#"{"timestamp": 33, "method": "POST", "path": "/v1/chat/completions", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "authorization": ["Bearer sk-parity-a", "Bearer sk-parity-b"]}, "body": {"model": "m", "messages": []}}"#,
    r#"{"timestamp": 34, "method": "POST", "path": "/v1/messages", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "x-api-key": "sk-ant-parity", "anthropic-version": "2023-06-01"}, "body": {"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}}"#,
    r#"{"timestamp": 35, "method": "POST", "path": "/v1/embeddings", "headers": {"host": "127.0.0.1:8080", "content-type": "application/json", "authorization": "Bearer sk-parity-a"}, "body": {"model": "e", "input": "wedding"}}"#,
    r#"{"timestamp": 36, "path": "/api/vendors/search", "query": "location=nyc", "headers": {"host": "127.0.0.1:8080", "authorization": "Bearer sk-parity-a"}}"#,
];

/// The request as bytes on the wire: the trace's headers, the body framed as the trace says.
fn wire(req: &TraceRequest) -> Vec<u8> {
    let target = match &req.query {
        Some(q) => format!("{}?{q}", req.path),
        None => req.path.clone(),
    };
    let mut out = format!("{} {target} HTTP/1.1\r\n", req.method).into_bytes();
    let headers = req.framed_headers();
    if !headers.contains_key("host") {
        out.extend_from_slice(b"host: replay\r\n");
    }
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    let body = req.body.as_deref().unwrap_or("").as_bytes();
    if headers.contains_key("transfer-encoding") {
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
    } else {
        out.extend_from_slice(body);
    }
    out
}

/// The keys of the gateway's per-request debug lines, in order.
fn logged_keys(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains(" request ") || l.ends_with(" request"))
        .filter_map(|l| {
            let at = l.rfind(" key=")? + 5;
            Some(l[at..].split(' ').next().unwrap_or("").to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_gateway_admit_and_key_every_request_alike() {
    let origin = Origin::start(|_| {
        OriginResponse::ok("{\"ok\":true}")
            .header("content-type", "application/json")
            .header("cache-control", "max-age=60")
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("gateway.toml")).unwrap();
    let config = shipped
        .replace("127.0.0.1:8080", "{listen}")
        .replace("127.0.0.1:9180", "{admin}")
        .replace("http://127.0.0.1:3000", &origin.url())
        // Both sides hash API keys with one secret (unset, each process would make its own).
        .replace(
            "${AISLE_KEY_SECRET:-}",
            "admission-parity-secret-0123456789",
        );
    let mut rules = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(root.join("rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in &names {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        rules.push((name, std::fs::read_to_string(path).unwrap()));
    }
    let rules: Vec<(&str, &str)> = rules
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let gw =
        Gateway::start_with_env(&config, &rules, &[("AISLE_LOG", "warn,aisle::proxy=debug")]).await;
    let loaded = Config::load(gw.config_path()).expect("the gateway's own config loads");

    let generated = generate(&Options {
        requests: 400,
        seed: 8,
        ..Options::default()
    });
    let lines: Vec<String> = generated
        .into_iter()
        .map(|(_, l)| l)
        .chain(EDGE_CASES.iter().map(|l| l.to_string()))
        .collect();
    let (mut cached, mut bypassed) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        let req = parse_line(line).unwrap_or_else(|e| panic!("line {i}: {e}"));
        let cs = cache_status_of(gw.listen(), &wire(&req)).await;
        let logged = poll_until(Duration::from_secs(5), "the request's debug line", || {
            let keys = logged_keys(&gw.logs());
            async move { (keys.len() > i).then(|| keys[i].clone()) }
        })
        .await;
        let what = format!(
            "line {i} ({} {}): {line}\ngateway: {cs}",
            req.method, req.path
        );
        // The gateway has no [server] trusted_clients: every request is an untrusted client.
        match admit(&loaded.rules, &req, Client::Untrusted) {
            Ok((route, terms, body)) => {
                cached += 1;
                assert!(
                    !cs.contains("fwd=bypass"),
                    "replay caches, gateway bypassed: {what}"
                );
                let key = hex_of(&key_of(&req, &route, &terms, body.as_ref()));
                assert_eq!(logged, key, "keys differ: {what}");
            }
            Err(Bypassed::Admission(_, reason)) => {
                bypassed += 1;
                assert!(
                    cs.starts_with("aisle; fwd=bypass"),
                    "replay bypasses: {what}"
                );
                assert_eq!(
                    cache_status_param(&cs, "detail").as_deref(),
                    reason.detail(),
                    "bypass reasons differ: {what}"
                );
                assert_eq!(logged, "-", "a bypassed request has no key: {what}");
            }
            Err(Bypassed::NoRoute) => panic!("the shipped config has a default route: {what}"),
            // Answered 400 before routing, without a debug line to compare keys with.
            Err(Bypassed::BadHost(e)) => panic!("every trace host is valid, not {e}: {what}"),
        }
    }
    println!(
        "{} requests: {cached} keyed alike, {bypassed} bypassed alike",
        lines.len()
    );
    assert!(
        cached > 300 && bypassed >= 5,
        "{cached} cached, {bypassed} bypassed"
    );
}

/// Sends `request` on a new connection and returns the answer's `Cache-Status` (the head is all
/// this test reads, so HEAD answers and bodies of any framing are alike).
async fn cache_status_of(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s");
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("cache-status")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default()
}

fn hex_of(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}
