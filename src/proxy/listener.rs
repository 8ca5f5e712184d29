//! The proxy listener's own parts: connection limits and the TLS certificate that reloads.
//!
//! [`Limited`] wraps pingora's HTTP proxy app as a transport-level app, so every accepted
//! connection (after its TLS handshake, which `header_timeout` bounds, before any HTTP) takes a
//! slot of `[server]
//! max_connections` and of its client address's `max_connections_per_client` for as long as
//! it is open. Pingora 0.9.1 has no such limit, and its connection filter sees only the accept
//! (not the close), so it cannot count open connections. Beyond a limit an HTTP/1 client is
//! answered `503` with `Retry-After` (its request header is read first, within a short
//! deadline, so the answer is not lost to a reset); an HTTP/2 client (ALPN `h2`) is closed.
//! The limits are read from the live configuration on every accept, so a reload changes them.
//!
//! [`ReloadingCert`] is the TLS listener's certificate resolver: it serves the pair loaded at
//! start and, at most once a second during handshakes, looks at the files' modification times;
//! a changed pair is loaded (and checked, as `aisle check` does) and served from the next
//! handshake on. A pair that does not load is reported and the previous one kept, so a
//! certificate renewal that writes the cert before the key never breaks the listener.

use super::Shared;
use crate::config::tls::TlsFiles;
use async_trait::async_trait;
use bytes::Bytes;
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use pingora::apps::ServerApp;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};
use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// `aisle_connections_open`: client connections being served now.
static OPEN: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "aisle_connections_open",
        "Client connections open on the proxy listener (after the TLS handshake)"
    )
    .expect("register aisle_connections_open")
});

/// `aisle_connections_refused_total{limit}`: connections turned away by a limit (`limit` is
/// `max_connections` or `max_connections_per_client`: two values, whatever the clients).
static REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_connections_refused_total",
        "Client connections refused (503 or closed) because a [server] connection limit was reached",
        &["limit"]
    )
    .expect("register aisle_connections_refused_total")
});

/// Shows the listener's metrics (at 0) before the first connection.
pub fn register_metrics() {
    Lazy::force(&OPEN);
    for limit in ["max_connections", "max_connections_per_client"] {
        REFUSED.with_label_values(&[limit]);
    }
}

/// How long a refused HTTP/1 client has to send its request header before its `503`.
const REFUSAL_HEADER_WAIT: Duration = Duration::from_secs(2);

/// The open connections, in total and per client address.
#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One open connection's slots; given back on drop.
struct Slot<'a> {
    counts: &'a Mutex<Counts>,
    client: Option<IpAddr>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total -= 1;
        if let Some(ip) = self.client {
            if let Some(n) = c.per_client.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_client.remove(&ip);
                }
            }
        }
        OPEN.dec();
    }
}

/// A transport app that holds the connection limits around `inner`.
pub struct Limited<A> {
    inner: Arc<A>,
    live: Shared,
    counts: Mutex<Counts>,
}

impl<A> Limited<A> {
    pub fn new(inner: A, live: Shared) -> Self {
        register_metrics();
        Limited {
            inner: Arc::new(inner),
            live,
            counts: Mutex::default(),
        }
    }

    /// A slot for a connection from `client`, or the limit that refuses it.
    fn admit(&self, client: Option<IpAddr>) -> Result<Slot<'_>, &'static str> {
        let (max, per_client) = {
            let live = self.live.load();
            let l = &live.config.listener;
            (l.max_connections, l.max_connections_per_client)
        };
        let mut c = self.counts.lock();
        if max != 0 && c.total >= max {
            return Err("max_connections");
        }
        if let Some(ip) = client {
            let n = c.per_client.entry(ip).or_insert(0);
            if per_client != 0 && *n >= per_client {
                return Err("max_connections_per_client");
            }
            *n += 1;
        }
        c.total += 1;
        OPEN.inc();
        Ok(Slot {
            counts: &self.counts,
            client,
        })
    }
}

/// Answers a refused connection: `503` to an HTTP/1 client once its request header is in,
/// nothing (a close) to an HTTP/2 one.
async fn refuse(stream: Stream, limit: &str) {
    if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        return;
    }
    let mut session = ServerSession::new_http1(stream);
    session.set_keepalive(None);
    session.set_header_timeout(Some(REFUSAL_HEADER_WAIT), true);
    if !matches!(session.read_request().await, Ok(true)) {
        return;
    }
    let body = Bytes::from(format!(
        "503 Service Unavailable: the gateway's [server] {limit} is reached; retry shortly\n"
    ));
    let mut resp = ResponseHeader::build(503, Some(4)).expect("a 503 header");
    let _ = resp.insert_header("retry-after", "1");
    let _ = resp.insert_header("content-type", "text/plain; charset=utf-8");
    let _ = resp.insert_header("content-length", body.len().to_string());
    let _ = resp.insert_header("connection", "close");
    if session.write_response_header(Box::new(resp)).await.is_ok()
        && session.write_response_body(body, true).await.is_ok()
    {
        let _ = session.finish().await;
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Limited<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        match self.admit(client) {
            Ok(slot) => {
                let next = self.inner.process_new(stream, shutdown).await;
                drop(slot);
                next
            }
            Err(limit) => {
                REFUSED.with_label_values(&[limit]).inc();
                tracing::debug!(?client, limit, "connection refused by a limit");
                refuse(stream, limit).await;
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }

    /// A TLS handshake gets the header deadline too (pingora's fixed 60 s otherwise): it
    /// happens before a connection is counted, so it must not be a way to hold one for long.
    fn handshake_timeout(&self) -> Duration {
        self.live.load().config.listener.header_timeout
    }
}

/// How often, at most, the certificate files are looked at.
const CERT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The TLS listener's certificate, reloaded when its files change.
pub struct ReloadingCert {
    files: TlsFiles,
    current: arc_swap::ArcSwap<CertifiedKey>,
    /// When the files were last looked at, and their modification times then.
    checked: Mutex<(Instant, Option<(SystemTime, SystemTime)>)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn mtimes(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl ReloadingCert {
    /// Loads the pair now (an error says which file and why).
    pub fn new(files: TlsFiles) -> Result<Self, String> {
        let seen = mtimes(&files);
        let key = files.load()?;
        Ok(ReloadingCert {
            files,
            current: arc_swap::ArcSwap::new(key),
            checked: Mutex::new((Instant::now(), seen)),
        })
    }

    /// Loads the pair again if its files changed since they were last looked at (at most once
    /// per [`CERT_CHECK_EVERY`]; a handshake never waits for another one's check).
    fn refresh(&self) {
        let Some(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.0.elapsed() < CERT_CHECK_EVERY {
            return;
        }
        checked.0 = Instant::now();
        let now = mtimes(&self.files);
        if now.is_none() || now == checked.1 {
            return;
        }
        checked.1 = now;
        match self.files.load() {
            Ok(key) => {
                self.current.store(key);
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "[server] tls: the certificate files changed; serving the new pair"
                );
            }
            Err(e) => tracing::warn!(
                "[server] tls: the certificate files changed but do not load ({e}); still \
                 serving the previous pair"
            ),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current.load_full())
    }
}
