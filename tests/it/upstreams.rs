//! Upstreams one can put in front of real vendors (issue 13): the `Host` and headers the origin
//! sees, HTTPS origins checked against a CA made here with `rcgen` (and mTLS), several
//! addresses with health checks, retries and balancing, and DNS re-resolution through a hosts
//! file the test controls (`AISLE_HOSTS_FILE`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_rustls::rustls;

use crate::harness::*;

/// Every GET goes upstream and is cached for a minute (unless the origin says `no-store`).
const RULES: &str = r#"
[[rule]]
name = "everything"
match = { method = "GET", path = "/*" }
upstream = "api"
ttl = "60s"
"#;

fn config(upstream: &str) -> String {
    format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"

[cache]
memory = "16MiB"
rules_dir = "rules"

[upstreams.api]
connect_timeout = "1s"
read_timeout = "5s"
{upstream}
"#
    )
}

fn uncached(body: &str) -> OriginResponse {
    OriginResponse::ok(body.to_string()).header("cache-control", "no-store")
}

#[tokio::test]
async fn host_set_headers_and_remove_headers_are_what_the_origin_sees() {
    let origin = Origin::start(|_| uncached("ok"));
    let secret = "sk-test-9f8e7d6c5b4a";
    let upstream = format!(
        "url = \"{}\"\nhost = \"api.vendor.example\"\n\
         set_headers = {{ \"x-api-key\" = \"${{AISLE_TEST_VENDOR_KEY}}\", \"x-vendor-plan\" = \"gold\" }}\n\
         remove_headers = [\"cookie\", \"x-debug\"]\n",
        origin.url()
    );
    let gw = Gateway::start_with_env(
        &config(&upstream),
        &[("r.toml", RULES)],
        &[("AISLE_TEST_VENDOR_KEY", secret), ("RUST_LOG", "debug")],
    )
    .await;
    let r = gw
        .get_with(
            "/weather?city=lisbon",
            &[
                ("host", "gateway.example"),
                ("x-api-key", "the-clients-own"),
                ("cookie", "session=abc"),
                ("x-debug", "1"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = origin.requests_for("/weather");
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.header("host").as_deref(), Some("api.vendor.example"));
    assert_eq!(
        req.header("x-api-key").as_deref(),
        Some(secret),
        "set_headers replaces"
    );
    assert_eq!(req.header("x-vendor-plan").as_deref(), Some("gold"));
    assert_eq!(req.header("cookie"), None, "remove_headers");
    assert_eq!(req.header("x-debug"), None, "remove_headers");
    assert_eq!(req.header("accept").as_deref(), Some("application/json"));
    assert_eq!(
        req.header("x-forwarded-host").as_deref(),
        Some("gateway.example"),
        "the client's Host is still told in X-Forwarded-Host"
    );
    // The key is a secret: never in the logs, even at debug level.
    assert!(!gw.logs().contains(secret), "the secret was logged");
}

#[tokio::test]
async fn an_http_upstream_without_host_gets_the_clients_host() {
    let origin = Origin::start(|_| uncached("ok"));
    let gw = Gateway::start(
        &config(&format!("url = \"{}\"\n", origin.url())),
        &[("r.toml", RULES)],
    )
    .await;
    let r = gw.get_with("/a", &[("host", "gateway.example")]).await;
    assert_eq!(r.status, 200);
    let seen = origin.requests_for("/a");
    assert_eq!(seen[0].header("host").as_deref(), Some("gateway.example"));
}

// ---------------------------------------------------------------------------
// HTTPS origins
// ---------------------------------------------------------------------------

/// A CA made here, and what it signs.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DER) and its key (PKCS#8 DER), signed by this CA.
    fn sign(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>, String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (
            cert.der().to_vec(),
            key.serialize_der(),
            cert.pem(),
            key.serialize_pem(),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a TLS origin received: (path, headers).
type Seen = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// An HTTPS origin on 127.0.0.1 with `cert`; with `client_ca`, it requires a client
/// certificate signed by that CA. Stops when the returned sender is dropped.
async fn tls_origin(
    cert: (Vec<u8>, Vec<u8>),
    client_ca: Option<&TestCa>,
) -> (SocketAddr, Seen, tokio::sync::watch::Sender<bool>) {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.1.into());
    let server = builder.with_single_cert(vec![cert.0.into()], key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    let acceptor = acceptor.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            log.lock().unwrap().push((req.uri().path().to_string(), headers));
                            async {
                                Ok::<_, std::convert::Infallible>(
                                    Response::builder()
                                        .header("cache-control", "no-store")
                                        .body(Full::new(Bytes::from_static(b"secure")))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
                _ = stop.changed() => break,
            }
        }
    });
    (addr, seen, stop_tx)
}

/// Writes `files` into a fresh directory; returns it (kept alive by the caller).
fn write_files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[tokio::test]
async fn an_https_origin_is_reached_with_ca_file_and_refused_with_another_ca() {
    let ca = TestCa::new("Aisle test vendor CA");
    let other = TestCa::new("Someone else's CA");
    let (der, key, _, _) = ca.sign(&["127.0.0.1"]);
    let (addr, seen, _stop) = tls_origin((der, key), None).await;
    let certs = write_files(&[("vendor-ca.pem", &ca.pem()), ("other-ca.pem", &other.pem())]);
    let upstream = |ca_file: &str| {
        format!(
            "url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n",
            addr.port(),
            certs.path().join(ca_file).display()
        )
    };

    let gw = Gateway::start(&config(&upstream("vendor-ca.pem")), &[("r.toml", RULES)]).await;
    let r = gw.get("/forecast").await;
    assert_eq!(r.status, 200, "{} / {}", r.cache_status(), r.text());
    assert_eq!(r.text(), "secure");
    let host = seen.lock().unwrap()[0].1.get("host").cloned();
    assert_eq!(
        host.as_deref(),
        Some(format!("127.0.0.1:{}", addr.port()).as_str()),
        "https: the url's host is sent as Host"
    );
    drop(gw);

    let gw = Gateway::start(&config(&upstream("other-ca.pem")), &[("r.toml", RULES)]).await;
    let before = seen.lock().unwrap().len();
    let r = gw.get("/forecast").await;
    assert_eq!(r.status, 502, "a certificate from another CA is refused");
    let status = r.cache_status();
    assert!(
        status.contains("detail=upstream-tls"),
        "Cache-Status: {status}"
    );
    assert!(r.text().contains("certificate"), "body: {}", r.text());
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "no request reached the origin"
    );
}

#[tokio::test]
async fn an_origin_that_requires_a_client_certificate_gets_client_cert() {
    let ca = TestCa::new("Aisle test mTLS CA");
    let (der, key, _, _) = ca.sign(&["127.0.0.1"]);
    let (addr, seen, _stop) = tls_origin((der, key), Some(&ca)).await;
    let (_, _, client_pem, client_key_pem) = ca.sign(&["gateway.client"]);
    let certs = write_files(&[
        ("ca.pem", &ca.pem()),
        ("gw.pem", &client_pem),
        ("gw.key", &client_key_pem),
    ]);
    let base = format!(
        "url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n",
        addr.port(),
        certs.path().join("ca.pem").display()
    );

    let gw = Gateway::start(&config(&base), &[("r.toml", RULES)]).await;
    let r = gw.get("/without-cert").await;
    assert_eq!(
        r.status, 502,
        "no client certificate: refused by the origin"
    );
    drop(gw);

    let with_cert = format!(
        "{base}client_cert = \"{}\"\nclient_key = \"{}\"\n",
        certs.path().join("gw.pem").display(),
        certs.path().join("gw.key").display()
    );
    let gw = Gateway::start(&config(&with_cert), &[("r.toml", RULES)]).await;
    let r = gw.get("/with-cert").await;
    assert_eq!(r.status, 200, "{} / {}", r.cache_status(), r.text());
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(paths, ["/with-cert"]);
}

// ---------------------------------------------------------------------------
// Several addresses
// ---------------------------------------------------------------------------

fn health_labels(addr: SocketAddr) -> [(&'static str, String); 2] {
    [
        ("upstream", "api".to_string()),
        ("address", addr.to_string()),
    ]
}

async fn health(gw: &Gateway, addr: SocketAddr) -> Option<f64> {
    let [(a, av), (b, bv)] = health_labels(addr);
    gw.metric("aisle_upstream_health", &[(a, &av), (b, &bv)])
        .await
}

#[tokio::test]
async fn a_killed_address_gets_no_traffic_within_the_health_check_interval() {
    let a = Origin::start(|_| uncached("a"));
    let b = Origin::start(|_| uncached("b"));
    let interval = Duration::from_millis(500);
    let timeout = Duration::from_millis(200);
    let upstream = format!(
        "urls = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\n\
         health_check = {{ path = \"/health\", interval = \"500ms\", timeout = \"200ms\", unhealthy_after = 1, healthy_after = 1 }}\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await;
    for i in 0..6 {
        let r = gw.get(&format!("/before/{i}")).await;
        assert_eq!(r.status, 200);
    }
    assert!(
        a.count("/health") + b.count("/health") <= 8,
        "health checks are paced"
    );
    let served = |o: &Origin| {
        o.requests()
            .iter()
            .filter(|r| r.path.starts_with("/before"))
            .count()
    };
    assert_eq!((served(&a), served(&b)), (3, 3), "round robin over both");
    assert_eq!(health(&gw, b.addr()).await, Some(1.0));

    b.stop();
    b.wait_stopped().await;
    let stopped = Instant::now();
    poll_until(
        Duration::from_secs(5),
        "the killed address marked unhealthy",
        || async { (health(&gw, b.addr()).await == Some(0.0)).then_some(()) },
    )
    .await;
    let took = stopped.elapsed();
    // One interval until the next check, its timeout, the 50 ms the service ticks at, and
    // slack for a loaded machine (the metric is polled every 50 ms).
    assert!(
        took <= interval + timeout + Duration::from_millis(800),
        "marked unhealthy after {took:?}"
    );
    for i in 0..10 {
        let r = gw.get(&format!("/after/{i}")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.cache_status());
        assert_eq!(r.text(), "a");
    }
    assert_eq!(health(&gw, a.addr()).await, Some(1.0));
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_address() {
    let a = Origin::start(|_| uncached("a"));
    let dead = closed_url();
    // No health check: only the retry keeps requests from failing.
    let upstream = format!("urls = [\"{}\", \"{dead}\"]\nretries = 1\n", a.url());
    let gw = Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await;
    for i in 0..8 {
        let r = gw.get(&format!("/r/{i}")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.cache_status());
    }
    assert_eq!(a.total(), 8);
    let failed = gw
        .metric(
            "aisle_upstream_address_requests_total",
            &[("upstream", "api"), ("result", "connect_error")],
        )
        .await
        .unwrap_or(0.0);
    assert!(
        failed >= 1.0,
        "the dead address was tried (and counted): {failed}"
    );
}

#[tokio::test]
async fn all_addresses_unhealthy_serves_stale_if_allowed_else_502_saying_so() {
    let a = Origin::start(|req| {
        if req.path.starts_with("/kept") {
            OriginResponse::ok("kept").header("cache-control", "max-age=1, stale-if-error=600")
        } else {
            uncached("a")
        }
    });
    let upstream = format!(
        "urls = [\"{}\"]\n\
         health_check = {{ path = \"/health\", interval = \"200ms\", timeout = \"200ms\", unhealthy_after = 1, healthy_after = 1 }}\n",
        a.url()
    );
    // `/kept` keeps the origin's own freshness (no rule ttl): one second, then stale-if-error.
    let rules = format!(
        "[[rule]]\nname = \"kept\"\nmatch = {{ method = \"GET\", path = \"/kept\" }}\nupstream = \"api\"\n{RULES}"
    );
    let gw = Gateway::start(&config(&upstream), &[("r.toml", &rules)]).await;
    assert_eq!(gw.get("/kept").await.status, 200);
    a.stop();
    a.wait_stopped().await;
    poll_until(
        Duration::from_secs(5),
        "the only address unhealthy",
        || async { (health(&gw, a.addr()).await == Some(0.0)).then_some(()) },
    )
    .await;
    // Hits until the entry's max-age (1 s) passes, then stale-if-error answers.
    let r = poll_until(Duration::from_secs(5), "the entry served stale", || async {
        let r = gw.get("/kept").await;
        assert_eq!(r.status, 200, "{}", r.cache_status());
        assert_eq!(r.text(), "kept");
        r.cache_status()
            .contains("detail=stale-if-error")
            .then_some(r)
    })
    .await;
    assert!(
        r.cache_status().contains("fwd=stale"),
        "{}",
        r.cache_status()
    );
    let r = gw.get("/never-cached").await;
    assert_eq!(r.status, 502);
    let status = r.cache_status();
    assert!(
        status.contains("detail=no-healthy-upstream"),
        "Cache-Status: {status}"
    );
}

#[tokio::test]
async fn hash_balancing_keeps_one_key_on_one_address() {
    let a = Origin::start(|_| uncached("a"));
    let b = Origin::start(|_| uncached("b"));
    let upstream = format!(
        "urls = [\"{}\", \"{}\"]\nbalance = \"hash\"\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await;
    // The ring depends on the origins' ports, which differ per run: with 8 keys, all of them
    // fell on one address in about 1 run in 128 (CI saw it). 32 keys leave one in 2^31.
    let mut answers = std::collections::HashSet::new();
    for i in 1..=32 {
        let path = format!("/k/{i}");
        let first = gw.get(&path).await.text();
        for _ in 0..3 {
            assert_eq!(gw.get(&path).await.text(), first, "{path} moved");
        }
        answers.insert(first);
    }
    assert_eq!(answers.len(), 2, "32 keys spread over both addresses");
}

#[tokio::test]
async fn least_conn_sends_new_requests_to_the_idle_address() {
    // `/hold` takes 1.5 s wherever it goes; the rest is answered at once.
    let answer = |name: &'static str| {
        move |req: OriginRequest| {
            let r = uncached(name);
            if req.path == "/hold" {
                r.delay(Duration::from_millis(1500))
            } else {
                r
            }
        }
    };
    let slow = Origin::start(answer("slow"));
    let fast = Origin::start(answer("fast"));
    let upstream = format!(
        "urls = [\"{}\", \"{}\"]\nbalance = \"least_conn\"\nmax_connections = 4\n",
        slow.url(),
        fast.url()
    );
    let gw = Arc::new(Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await);
    // Find which address a held request went to, then keep it busy.
    let hold = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.get("/hold").await })
    };
    poll_until(
        Duration::from_secs(5),
        "the held request at an origin",
        || async { (slow.count("/hold") + fast.count("/hold") == 1).then_some(()) },
    )
    .await;
    let busy_is_slow = slow.count("/hold") == 1;
    for i in 0..4 {
        let r = gw.get(&format!("/n/{i}")).await;
        let idle = if busy_is_slow { "fast" } else { "slow" };
        assert_eq!(r.text(), idle, "request {i} went to the busy address");
    }
    let _ = hold.await;
}

// ---------------------------------------------------------------------------
// DNS re-resolution
// ---------------------------------------------------------------------------

/// A plain HTTP origin answering `body` on `ip:port`.
async fn origin_on(
    ip: &str,
    port: u16,
    body: &'static str,
) -> Option<tokio::sync::watch::Sender<bool>> {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.ok()?;
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    tokio::spawn(async move {
                        let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("cache-control", "no-store")
                                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                                    .unwrap(),
                            )
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                    });
                }
                _ = stop.changed() => break,
            }
        }
    });
    Some(stop_tx)
}

#[tokio::test]
async fn resolve_every_picks_up_a_changed_address_from_the_hosts_file() {
    // Two origins on one port, at two loopback addresses; the name points at one, then the other.
    let (port, _first, _second) = loop {
        let port = free_port();
        let Some(first) = origin_on("127.0.0.1", port, "first").await else {
            continue;
        };
        let Some(second) = origin_on("127.0.0.2", port, "second").await else {
            continue;
        };
        break (port, first, second);
    };
    let hosts = write_files(&[("hosts", "127.0.0.1 vendor.aisle.test\n")]);
    let hosts_file = hosts.path().join("hosts");
    let upstream =
        format!("url = \"http://vendor.aisle.test:{port}\"\nresolve_every = \"200ms\"\n");
    let gw = Gateway::start_with_env(
        &config(&upstream),
        &[("r.toml", RULES)],
        &[("AISLE_HOSTS_FILE", hosts_file.to_str().unwrap())],
    )
    .await;
    assert_eq!(gw.get("/where").await.text(), "first");
    std::fs::write(&hosts_file, "127.0.0.2 vendor.aisle.test\n").unwrap();
    poll_until(
        Duration::from_secs(5),
        "requests going to the new address",
        || async { (gw.get("/where").await.text() == "second").then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            gw.get("/where").await.text(),
            "second",
            "the old address is gone"
        );
    }
    // Its metric series go with it (a name whose addresses keep changing must not grow the
    // metrics without bound); the new address's are there.
    let (old, new) = (
        format!("address=\"127.0.0.1:{port}\""),
        format!("address=\"127.0.0.2:{port}\""),
    );
    let address_series = |text: &str, address: &str| {
        text.lines()
            .filter(|l| l.starts_with("aisle_upstream_") && l.contains(address))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let text = gw.metrics().await;
    for series in [
        "aisle_upstream_address_requests_total{",
        "aisle_upstream_address_duration_seconds_count{",
        "aisle_upstream_health{",
    ] {
        assert!(
            address_series(&text, &new)
                .iter()
                .any(|l| l.starts_with(series)),
            "{series} for the new address:\n{text}"
        );
    }
    assert_eq!(
        address_series(&text, &old),
        Vec::<String>::new(),
        "no series of the address that left"
    );
}

#[tokio::test]
async fn a_reload_rebuilds_the_pool_with_its_new_headers_and_addresses() {
    let a = Origin::start(|_| uncached("a"));
    let b = Origin::start(|_| uncached("b"));
    let upstream = format!(
        "url = \"{}\"\nset_headers = {{ \"x-plan\" = \"one\" }}\n\
         health_check = {{ path = \"/health\", interval = \"200ms\" }}\n",
        a.url()
    );
    let gw = Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await;
    assert_eq!(gw.get("/p").await.text(), "a");
    assert_eq!(
        a.requests_for("/p")[0].header("x-plan").as_deref(),
        Some("one")
    );
    let (a_url, b_url) = (a.url(), b.url());
    gw.edit_config(|text| {
        text.replace(&format!("url = \"{a_url}\""), &format!("url = \"{b_url}\""))
            .replace("\"one\"", "\"two\"")
    });
    // The file watcher reloads (the shipped default); the new pool answers and is checked.
    poll_until(Duration::from_secs(10), "the reloaded upstream", || async {
        (gw.get("/p").await.text() == "b").then_some(())
    })
    .await;
    assert_eq!(
        b.requests_for("/p")[0].header("x-plan").as_deref(),
        Some("two")
    );
    poll_until(
        Duration::from_secs(5),
        "the new pool's health checks",
        || async { (b.count("/health") > 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn only_requests_that_may_be_sent_twice_are_retried() {
    let a = Origin::start(|_| uncached("a"));
    let dead = closed_url();
    let upstream = format!("urls = [\"{}\", \"{dead}\"]\nretries = 1\n", a.url());
    let rules = r#"
[[rule]]
name = "submit"
match = { method = "POST", path = "/submit" }
upstream = "api"

[[rule]]
name = "query"
match = { method = "POST", path = "/query" }
upstream = "api"
ttl = "60s"
vary = ["body./q"]
"#;
    let gw = Gateway::start(&config(&upstream), &[("r.toml", rules)]).await;
    // Round robin alternates, so two requests of a kind meet the dead address once.
    let mut refused = 0;
    for i in 0..2 {
        let r = fetch_with_body(gw.client(), "POST", &gw.url("/submit"), &[], format!("{i}")).await;
        if r.status == 502 {
            refused += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert_eq!(refused, 1, "a plain POST is not sent again");
    for i in 0..2 {
        let body = format!("{{\"q\":\"{i}\"}}");
        let headers = [("content-type", "application/json")];
        let r = fetch_with_body(gw.client(), "POST", &gw.url("/query"), &headers, body).await;
        assert_eq!(
            r.status,
            200,
            "a body-keyed POST (a query) is retried: {}",
            r.cache_status()
        );
    }
    assert_eq!(a.count("/query"), 2);
}

#[tokio::test]
async fn max_connections_answers_503_when_every_address_is_busy() {
    let a = Origin::start(|req| {
        let r = uncached("a");
        if req.path == "/hold" {
            r.delay(Duration::from_millis(1500))
        } else {
            r
        }
    });
    let upstream = format!("url = \"{}\"\nmax_connections = 1\n", a.url());
    let gw = Arc::new(Gateway::start(&config(&upstream), &[("r.toml", RULES)]).await);
    let hold = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.get("/hold").await })
    };
    poll_until(
        Duration::from_secs(5),
        "the held request at the origin",
        || async { (a.count("/hold") == 1).then_some(()) },
    )
    .await;
    let r = gw.get("/other").await;
    assert_eq!(r.status, 503);
    assert!(
        r.cache_status().contains("detail=upstream-busy"),
        "{}",
        r.cache_status()
    );
    assert_eq!(hold.await.unwrap().status, 200);
    assert_eq!(gw.get("/other").await.status, 200, "free again");
}
