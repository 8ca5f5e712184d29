//! The listener (issue 13): downstream limits (header deadline, keep-alive timeout, connection
//! limits) against slow and greedy clients, and TLS / HTTP/2 (ALPN and h2c) with the cache
//! features working the same on HTTP/2: misses, hits, coalescing, SSE replay, `Cache-Status`.
//!
//! Real binary, real loopback origins, real TCP clients; test certificates are made here with
//! `rcgen` (a CA and a leaf for 127.0.0.1), and the HTTP/2 client is reqwest (h2 by ALPN, or
//! prior knowledge for h2c). Every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::fixtures;
use crate::harness::*;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rule]]
name = "all"
match = { method = "GET", path = "/*" }
upstream = "api"
ttl = "5m"
"#;

/// `config_for(origin)` with `extra` lines added to `[server]`.
fn config(origin_url: &str, extra: &str) -> String {
    config_for(origin_url).replace(
        "admin_listen = \"{admin}\"\n",
        &format!("admin_listen = \"{{admin}}\"\n{extra}\n"),
    )
}

/// An origin that answers `"answer #<n>"` for every request, after `delay`.
fn counting_origin(delay: Duration) -> Origin {
    Origin::start(move |req| OriginResponse::ok(format!("answer #{}", req.count)).delay(delay))
}

// ---------------------------------------------------------------------------
// Downstream limits
// ---------------------------------------------------------------------------

/// What one slow client saw: when the gateway closed its connection (from its connect), or
/// `None` if it was still open at the test's bound.
async fn slow_client(addr: SocketAddr, i: usize, bound: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let t0 = Instant::now();
    if s.write_all(b"GET /slow HTTP/1.1\r\nHost: gateway\r\n")
        .await
        .is_err()
    {
        return Some(t0.elapsed());
    }
    let mut buf = [0u8; 1024];
    while t0.elapsed() < bound {
        // One header line every 200 ms, never the blank line that ends the header; an EOF,
        // an error or an answer (a refusal's 503) in between means the gateway let go.
        let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        if read.is_ok() {
            return Some(t0.elapsed());
        }
        let line = format!("X-Slow-{i}: {}\r\n", t0.elapsed().as_millis());
        if s.write_all(line.as_bytes()).await.is_err() {
            return Some(t0.elapsed());
        }
    }
    None
}

/// Issue 13: "600 slow clients that send one header line every 40 s block all service".
/// Here 600 clients each send a header line every 200 ms and never finish; the gateway allows
/// 300 connections and a 1 s header deadline. They take every slot (the rest are refused), a
/// normal client is served within the deadline plus a margin, and every slow connection is
/// closed by the gateway within the deadline (or the refusal's 2 s wait) plus a margin.
/// Without the deadline (pingora's per-read timeout only) the slots stay taken and the normal
/// client is refused until the test gives up.
#[tokio::test(flavor = "multi_thread")]
async fn slowloris_clients_are_cut_at_the_header_deadline_and_service_continues() {
    const CLIENTS: usize = 600;
    const BOUND: Duration = Duration::from_secs(8);
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(
            &origin.url(),
            "header_timeout = \"1s\"\nmax_connections = 300",
        ),
        &[("rules.toml", RULES)],
    )
    .await;
    let addr = gw.listen();
    let started = Instant::now();
    let mut attack = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        attack.spawn(slow_client(addr, i, BOUND));
    }
    // The slow clients fill the gateway: every slot is taken and the rest are refused.
    gw.wait_metric(
        "aisle_connections_refused_total",
        &[("limit", "max_connections")],
        "to count refusals",
        |n| n >= 1.0,
    )
    .await;
    // A normal client is served while the attack goes on (refused while the slots are
    // taken, served once the deadline frees them).
    let served = poll_until(
        Duration::from_secs(6),
        "a normal request to be served during the attack",
        || async {
            let r = raw_request(
                addr,
                b"GET /normal HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
                Duration::from_secs(5),
            )
            .await;
            (r.status == 200).then(|| started.elapsed())
        },
    )
    .await;
    eprintln!("a normal request was served {served:?} into the attack");
    let mut still_open = 0;
    let mut slowest = Duration::ZERO;
    while let Some(r) = attack.join_next().await {
        match r.expect("slow client task") {
            Some(closed) => slowest = slowest.max(closed),
            None => still_open += 1,
        }
    }
    assert_eq!(
        still_open, 0,
        "slow connections still open after {BOUND:?} (header_timeout is 1 s)"
    );
    // 1 s for those that got a slot, 2 s for the refused ones; the rest is margin for a busy
    // machine.
    assert!(
        slowest < Duration::from_secs(6),
        "the slowest slow connection was closed after {slowest:?}"
    );
    gw.wait_metric("aisle_connections_open", &[], "to be 0", |n| n == 0.0)
        .await;
}

/// The client address of the per-client limit test's connections: 127.0.0.2, not the
/// harness's 127.0.0.1. The harness's readiness probe (a connect and a close on the proxy
/// port) is taken and counted whenever pingora gets to it, which can be after the test has
/// begun; from another address it can never hold one of this client's slots.
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A kept-alive connection to `addr` from [`CLIENT`] (the harness's [`RawConn`]).
async fn connect_from_client(addr: SocketAddr) -> RawConn {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(CLIENT, 0))
        .expect("bind 127.0.0.2 (any 127/8 address is loopback on Linux)");
    let stream = socket.connect(addr).await.expect("connect");
    RawConn::from_stream(stream.into_std().expect("a std stream")).expect("set up the connection")
}

/// `GET /limited` on `conn` (blocking reads, so off the async threads); the connection is
/// handed back with the answer.
async fn get_limited(mut conn: RawConn) -> (RawConn, RawResp) {
    tokio::task::spawn_blocking(move || {
        let answer = conn.get("gateway", "/limited").expect("an answer");
        (conn, answer)
    })
    .await
    .expect("request task")
}

/// A connection from [`CLIENT`] that holds a slot: a keep-alive request on it was served
/// (`200`), and the gateway keeps it counted while it waits for the next one. A `503` means a
/// slot given back a moment ago was not free yet: tried again, bounded.
async fn held_connection(addr: SocketAddr) -> RawConn {
    poll_until(
        Duration::from_secs(10),
        "a connection to hold a slot (a 200 on it)",
        || async {
            let (conn, answer) = get_limited(connect_from_client(addr).await).await;
            match answer.status {
                200 => Some(conn),
                503 => None,
                _ => panic!("a connection to hold a slot: {answer:?}"),
            }
        },
    )
    .await
}

/// One request from [`CLIENT`] on a new connection, which is then closed.
async fn request_from_client(addr: SocketAddr) -> RawResp {
    get_limited(connect_from_client(addr).await).await.1
}

/// `max_connections_per_client`: a client address holding its connections gets `503` with
/// `Retry-After` on the next one (counted), and is served again once one closes or the limit
/// is raised by a reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_beyond_its_connection_limit_gets_503_and_is_counted() {
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(&origin.url(), "max_connections_per_client = 2"),
        &[("rules.toml", RULES)],
    )
    .await;
    let addr = gw.listen();
    let first = held_connection(addr).await;
    let _second = held_connection(addr).await;
    let fetched = origin.total();
    let refused = request_from_client(addr).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        String::from_utf8_lossy(&refused.body).contains("max_connections_per_client"),
        "the 503 says which limit: {:?}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(
        gw.metric(
            "aisle_connections_refused_total",
            &[("limit", "max_connections_per_client")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        origin.total(),
        fetched,
        "a refused request never reaches the origin"
    );
    // Other clients are not limited by this one's connections.
    let other = raw_request(
        addr,
        b"GET /limited HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(other.status, 200, "a request from 127.0.0.1: {other:?}");

    drop(first);
    let served = poll_until(
        Duration::from_secs(5),
        "a request once a connection closed",
        || async {
            let r = request_from_client(addr).await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&served.body), "answer #1");

    // The limits are read live: with a third connection held, raising the limit in
    // gateway.toml (reloaded by the file watch) lets the next one in without a restart.
    let _third = held_connection(addr).await;
    let before = request_from_client(addr).await;
    assert_eq!(before.status, 503, "{before:?}");
    gw.edit_config(|text| {
        text.replace(
            "max_connections_per_client = 2",
            "max_connections_per_client = 3",
        )
    });
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        "to count the file watch's reload",
        |n| n >= 1.0,
    )
    .await;
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let r = request_from_client(addr).await;
        if r.status == 200 {
            return;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a third connection is not served after the reload; the last answer: {last:?}");
}

/// `keepalive_timeout`: an idle keep-alive connection is closed by the gateway after it (here
/// 1 s; pingora's fixed 60 s before).
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(&origin.url(), "keepalive_timeout = \"1s\""),
        &[("rules.toml", RULES)],
    )
    .await;
    let mut s = TcpStream::connect(gw.listen()).await.expect("connect");
    s.write_all(b"GET /kept HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.ends_with(b"answer #1") {
            let n = s.read(&mut chunk).await.expect("read the answer");
            assert!(n > 0, "closed before the answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the answer within 5 s");
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection was not closed within 5 s: {closed:?}"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(800),
        "closed after {:?}, before the keep-alive timeout",
        idle.elapsed()
    );
}

/// On a kept-alive connection the header deadline starts at the next request's first byte: a
/// second request trickled line by line is cut after `header_timeout` (1 s), though the
/// keep-alive timeout (30 s) is far off.
#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_request_on_a_kept_alive_connection_is_cut_at_the_header_deadline() {
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(
            &origin.url(),
            "header_timeout = \"1s\"\nkeepalive_timeout = \"30s\"",
        ),
        &[("rules.toml", RULES)],
    )
    .await;
    let mut s = TcpStream::connect(gw.listen()).await.expect("connect");
    s.write_all(b"GET /first HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.ends_with(b"answer #1") {
            let n = s.read(&mut chunk).await.expect("read the answer");
            assert!(n > 0, "closed before the answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the answer within 5 s");
    // Idle for longer than the header deadline: the keep-alive wait is not the header's.
    let idle = Instant::now();
    let early = tokio::time::timeout(Duration::from_millis(1500), s.read(&mut chunk)).await;
    assert!(
        early.is_err(),
        "closed while idle after {:?}",
        idle.elapsed()
    );
    let started = Instant::now();
    s.write_all(b"GET /second HTTP/1.1\r\n")
        .await
        .expect("write");
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the trickled request was not cut within 5 s"
        );
        let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await;
        if read.is_ok() {
            break started.elapsed();
        }
        let _ = s.write_all(b"X-Slow: a\r\n").await;
    };
    assert!(
        closed_after >= Duration::from_millis(800),
        "cut after {closed_after:?}, before the header deadline"
    );
    assert_eq!(origin.count("/second"), 0);
}

// ---------------------------------------------------------------------------
// TLS and HTTP/2
// ---------------------------------------------------------------------------

/// A CA and a leaf certificate for 127.0.0.1 / localhost that it signed.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn test_pki(name: &str) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("Aisle test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("leaf params");
    let cert = leaf.signed_by(&key, &issuer).expect("leaf cert");
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the pair where `[server] tls` points.
fn install(pki: &TestPki, dir: &Path) {
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem).expect("write cert");
    std::fs::write(dir.join("key.pem"), &pki.key_pem).expect("write key");
}

/// `[server] tls` lines for a pair in `dir`.
fn tls_lines(dir: &Path) -> String {
    format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
}

/// A client that trusts only `ca_pem`; `h2`: HTTP/2 only (by ALPN), else HTTP/1.1 only.
fn https_client(ca_pem: &str, h2: bool) -> reqwest::Client {
    https_client_with(ca_pem, h2, reqwest::Client::builder())
}

/// Like [`https_client`], with a TLS handshake for every request (no kept connections).
fn https_client_fresh(ca_pem: &str) -> reqwest::Client {
    https_client_with(
        ca_pem,
        false,
        reqwest::Client::builder().pool_max_idle_per_host(0),
    )
}

fn https_client_with(ca_pem: &str, h2: bool, b: reqwest::ClientBuilder) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA pem");
    let b = b
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10));
    let b = if h2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().expect("https client")
}

fn https_url(gw: &Gateway, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", gw.listen().port())
}

/// `n` concurrent GETs of `url` on one client (over HTTP/2: streams of one connection).
async fn concurrent(client: &reqwest::Client, url: &str, n: usize) -> Vec<reqwest::Response> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let c = client.clone();
        let u = url.to_string();
        set.spawn(async move { c.get(&u).send().await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("task").expect("request"));
    }
    out
}

fn cache_status(r: &reqwest::Response) -> String {
    let v = r
        .headers()
        .get("cache-status")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    assert_valid_cache_status(&v);
    v
}

/// Misses, hits and coalescing over HTTP/2 (`client` speaks h2 only): 10 concurrent streams
/// for one key on a 1 s origin make one origin request, and a later request is a hit.
async fn cache_works_over_h2(client: &reqwest::Client, url: &str, origin: &Origin, path: &str) {
    let answers = concurrent(client, url, 10).await;
    let mut misses = 0;
    for r in answers {
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status().as_u16(), 200);
        let cs = cache_status(&r);
        if !is_hit(&cs) {
            misses += 1;
        }
        assert_eq!(r.text().await.expect("body"), "answer #1");
    }
    assert!(misses >= 1, "the first of them is a miss");
    assert_eq!(origin.count(path), 1, "10 concurrent streams, one fill");
    let hit = client.get(url).send().await.expect("hit");
    assert_eq!(hit.version(), reqwest::Version::HTTP_2);
    let cs = cache_status(&hit);
    assert!(is_hit(&cs), "a later request is a hit: {cs:?}");
    assert_eq!(hit.text().await.expect("body"), "answer #1");
    assert_eq!(origin.count(path), 1);
}

/// `h2c = true`: HTTP/2 with prior knowledge on plain TCP; HTTP/1.1 still works there.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_misses_hits_and_coalesces() {
    let origin = counting_origin(Duration::from_secs(1));
    let gw = Gateway::start(
        &config(&origin.url(), "h2c = true"),
        &[("rules.toml", RULES)],
    )
    .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("h2c client");
    cache_works_over_h2(&h2, &gw.url("/h2c/one"), &origin, "/h2c/one").await;
    let h1 = gw.get("/h2c/one").await;
    assert!(
        h1.is_hit(),
        "HTTP/1.1 on the h2c listener: {:?}",
        h1.cache_status()
    );
    assert_eq!(h1.text(), "answer #1");
}

/// `tls`: HTTPS with HTTP/2 by ALPN (misses, hits, coalescing) and HTTP/1.1 by ALPN; a client
/// that does not trust the CA is refused by its own TLS check.
#[tokio::test(flavor = "multi_thread")]
async fn https_serves_h2_and_http1_by_alpn() {
    let pki = test_pki("A");
    let dir = tempfile::tempdir().expect("tempdir");
    install(&pki, dir.path());
    let origin = counting_origin(Duration::from_secs(1));
    let gw = Gateway::start(
        &config(&origin.url(), &tls_lines(dir.path())),
        &[("rules.toml", RULES)],
    )
    .await;
    assert!(
        gw.logs()
            .contains(&format!("proxy on https://{}", gw.listen())),
        "the start line says https: {}",
        gw.logs()
    );
    let h2 = https_client(&pki.ca_pem, true);
    cache_works_over_h2(&h2, &https_url(&gw, "/tls/one"), &origin, "/tls/one").await;
    let h1 = https_client(&pki.ca_pem, false)
        .get(https_url(&gw, "/tls/one"))
        .send()
        .await
        .expect("HTTP/1.1 over TLS");
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert!(is_hit(&cache_status(&h1)));
    let stranger = https_client(&test_pki("B").ca_pem, true)
        .get(https_url(&gw, "/tls/one"))
        .send()
        .await;
    assert!(
        stranger.is_err(),
        "a client not trusting the CA: {stranger:?}"
    );
    // Plain HTTP on the TLS port is not served.
    assert!(gw.client().get(gw.url("/tls/one")).send().await.is_err());
}

/// Server-sent events over HTTP/2 (TLS): a miss is relayed as the origin produces it (events
/// arrive while the origin is held before the next), a second stream for the same body joins
/// that one fill, and a hit replays the same bytes without the origin.
#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_coalesces_and_replays_over_h2() {
    let pki = test_pki("SSE");
    let dir = tempfile::tempdir().expect("tempdir");
    install(&pki, dir.path());
    let event = |i: usize| Bytes::from(format!("id: {i}\ndata: {{\"delta\":\"token-{i}\"}}\n\n"));
    let done = Bytes::from_static(b"data: [DONE]\n\n");
    let gate = Gate::new();
    let steps = vec![
        Step::Chunk(event(1)),
        Step::Chunk(event(2)),
        Step::Wait(gate.clone()),
        Step::Chunk(event(3)),
        Step::Sleep(Duration::from_millis(20)),
        Step::Chunk(event(4)),
        Step::Chunk(done.clone()),
    ];
    let whole: Vec<u8> = [event(1), event(2), event(3), event(4), done].concat();
    let origin = StreamOrigin::start(move |_| StreamResponse::sse(steps.clone()));
    let cfg = format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"
{}

[cache]
memory = "64MiB"
max_object = "8MiB"
rules_dir = "rules"

[upstreams.openai]
url = "{}"
connect_timeout = "2s"
read_timeout = "10s"
"#,
        tls_lines(dir.path()),
        origin.url()
    );
    let gw = Gateway::start(&cfg, &[("rules.toml", fixtures::CHAT_RULES)]).await;
    let client = https_client(&pki.ca_pem, true);
    let body = r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"h2"}]}"#;
    let post = || {
        client
            .post(https_url(&gw, "/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(body)
            .send()
    };
    const READ: Duration = Duration::from_secs(10);
    let mut miss = post().await.expect("miss");
    assert_eq!(miss.version(), reqwest::Version::HTTP_2);
    let cs = cache_status(&miss);
    assert!(!is_hit(&cs), "first: a miss, got {cs:?}");
    assert!(miss
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")));
    let mut buf = Vec::new();
    read_until_contains(&mut miss, &mut buf, &event(2), READ, "events 1 and 2").await;
    assert!(!gate.is_open());
    assert_eq!(origin.chunks_sent(0), 2, "relayed as it arrived");

    // A second stream on the same connection joins the fill in progress.
    let mut joined = post().await.expect("joined");
    let cs = cache_status(&joined);
    assert!(is_hit(&cs), "second: joins the fill as a hit, got {cs:?}");
    let mut joined_buf = Vec::new();
    read_until_contains(&mut joined, &mut joined_buf, &event(2), READ, "joined").await;

    gate.open();
    read_to_end(&mut miss, &mut buf, READ)
        .await
        .expect("miss to end");
    read_to_end(&mut joined, &mut joined_buf, READ)
        .await
        .expect("joined to end");
    assert_eq!(buf, whole, "the miss relays the whole stream");
    assert_eq!(joined_buf, whole, "the joined stream gets the same bytes");

    let hit = post().await.expect("hit");
    let cs = cache_status(&hit);
    assert!(is_hit(&cs), "third: a hit, got {cs:?}");
    assert_eq!(hit.bytes().await.expect("hit body").as_ref(), &whole[..]);
    assert_eq!(origin.total(), 1, "one origin stream for all three");
}

/// Beyond `max_connections` an HTTP/2 client (ALPN `h2`) is closed (a connection-level
/// refusal has no stream to answer `503` on), counted, and served once a slot is free.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_beyond_max_connections_is_closed_and_counted() {
    let pki = test_pki("limit");
    let dir = tempfile::tempdir().expect("tempdir");
    install(&pki, dir.path());
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(
            &origin.url(),
            &format!("{}\nmax_connections = 1", tls_lines(dir.path())),
        ),
        &[("rules.toml", RULES)],
    )
    .await;
    let url = https_url(&gw, "/one");
    // The first client keeps its HTTP/2 connection open (reqwest's pool).
    let first = https_client(&pki.ca_pem, true);
    assert_eq!(first.get(&url).send().await.expect("first").status(), 200);
    gw.wait_metric("aisle_connections_open", &[], "to be 1", |n| n == 1.0)
        .await;
    let second = https_client(&pki.ca_pem, true).get(&url).send().await;
    assert!(
        second.is_err(),
        "a second connection is refused: {second:?}"
    );
    assert_eq!(
        gw.metric(
            "aisle_connections_refused_total",
            &[("limit", "max_connections")]
        )
        .await,
        Some(1.0)
    );
    drop(first);
    poll_until(
        Duration::from_secs(10),
        "a new connection once the first closed",
        || async {
            let r = https_client(&pki.ca_pem, true).get(&url).send().await;
            r.ok().filter(|r| r.status() == 200).map(|_| ())
        },
    )
    .await;
}

/// A TLS handshake that never completes (a client that connects to the HTTPS port and sends
/// nothing) is closed at the header deadline, not pingora's fixed 60 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_tls_handshake_is_closed_at_the_header_deadline() {
    let pki = test_pki("stall");
    let dir = tempfile::tempdir().expect("tempdir");
    install(&pki, dir.path());
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(
            &origin.url(),
            &format!("{}\nheader_timeout = \"1s\"", tls_lines(dir.path())),
        ),
        &[("rules.toml", RULES)],
    )
    .await;
    let mut s = TcpStream::connect(gw.listen()).await.expect("connect");
    let started = Instant::now();
    let mut chunk = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS client was not closed within 5 s: {closed:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed after {:?}, before the deadline",
        started.elapsed()
    );
    // Clients that do complete the handshake are served.
    let ok = https_client(&pki.ca_pem, true)
        .get(https_url(&gw, "/after"))
        .send()
        .await
        .expect("https");
    assert_eq!(ok.status().as_u16(), 200);
}

/// "Certificates reload with the config": new files under the configured paths are served
/// from the next handshakes on, without a restart; a pair that does not load is refused and
/// the previous one kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let old = test_pki("old");
    let new = test_pki("new");
    let dir = tempfile::tempdir().expect("tempdir");
    install(&old, dir.path());
    let origin = counting_origin(Duration::ZERO);
    let gw = Gateway::start(
        &config(&origin.url(), &tls_lines(dir.path())),
        &[("rules.toml", RULES)],
    )
    .await;
    let url = https_url(&gw, "/cert");
    let trusts_old = https_client_fresh(&old.ca_pem);
    let trusts_new = https_client_fresh(&new.ca_pem);
    assert_eq!(
        trusts_old.get(&url).send().await.expect("old").status(),
        200
    );
    assert!(trusts_new.get(&url).send().await.is_err());

    // A half-written renewal (the new cert, the old key) does not load: the old pair stays.
    std::fs::write(dir.path().join("cert.pem"), &new.cert_pem).expect("write cert");
    poll_until(
        Duration::from_secs(10),
        "the gateway to report the mismatched pair",
        || async {
            // The files are looked at during handshakes.
            let _ = trusts_old.get(&url).send().await;
            gw.logs().contains("do not load").then_some(())
        },
    )
    .await;
    assert_eq!(
        trusts_old
            .get(&url)
            .send()
            .await
            .expect("old kept")
            .status(),
        200
    );

    install(&new, dir.path());
    poll_until(
        Duration::from_secs(10),
        "the renewed certificate to be served",
        || async {
            match trusts_new.get(&url).send().await {
                Ok(r) => (r.status() == 200).then_some(()),
                Err(_) => None,
            }
        },
    )
    .await;
    // A new client (no TLS session to resume) that trusts only the old CA is refused now.
    let stale = https_client_fresh(&old.ca_pem).get(&url).send().await;
    assert!(
        stale.is_err(),
        "the old certificate is still served: {stale:?}"
    );
}
