//! Upstreams as pingora sees them: addresses resolved once at start, the peer handed to pingora
//! per request, the per-upstream request metrics, and whether the last connection attempt
//! failed.
//!
//! That last fact exists for keep-alive: pingora closes the client connection after any failed
//! upstream connection, even when it answers from a stale entry. Once a connection to an
//! upstream has failed, a request with a stale entry to fall back on first probes the upstream
//! (a TCP connect) and, if it is still unreachable, is answered from the entry as a hit, on the
//! ordinary path that keeps the client connection.

use crate::config::{Config, Upstream};
use crate::metrics::metrics;
use pingora::upstreams::peer::HttpPeer;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A resolved upstream, ready to hand to pingora.
pub struct Peer {
    address: SocketAddr,
    upstream: Upstream,
    /// The last connection attempt failed, and no answer or probe has succeeded since.
    unreachable: AtomicBool,
}

/// The configured upstreams, indexed like `Config::upstreams` (and `Rule::upstream`).
pub struct Peers(Vec<Peer>);

impl Peers {
    /// Resolves every upstream's address once.
    pub fn resolve(config: &Config) -> std::io::Result<Self> {
        let mut peers = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            let address = u.address.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::other(format!(
                    "upstream {}: {} resolves to no address",
                    u.name, u.address
                ))
            })?;
            peers.push(Peer {
                address,
                upstream: u.clone(),
                unreachable: AtomicBool::new(false),
            });
        }
        Ok(Peers(peers))
    }

    /// The upstream's name (metric label).
    pub fn name(&self, index: usize) -> &str {
        &self.0[index].upstream.name
    }

    /// The peer pingora connects to for upstream `index`.
    pub fn http_peer(&self, index: usize) -> HttpPeer {
        let peer = &self.0[index];
        let u = &peer.upstream;
        let mut p = HttpPeer::new(peer.address, u.tls, u.sni.clone());
        p.options.connection_timeout = Some(u.connect_timeout);
        p.options.total_connection_timeout = Some(u.connect_timeout);
        p.options.read_timeout = Some(u.read_timeout);
        p.options.write_timeout = Some(u.read_timeout);
        p
    }

    /// Records whether upstream `index` could be reached (a failed connect, or an answer).
    pub fn set_unreachable(&self, index: usize, unreachable: bool) {
        let flag = &self.0[index].unreachable;
        if flag.load(Ordering::Relaxed) != unreachable {
            flag.store(unreachable, Ordering::Relaxed);
        }
    }

    /// Whether the last connection to upstream `index` failed and it is still unreachable now: a
    /// TCP connect within `within` (at most its connect_timeout). A successful probe clears the
    /// mark. `false` without probing when no connection has failed.
    pub async fn still_unreachable(&self, index: usize, within: Duration) -> bool {
        let peer = &self.0[index];
        if !peer.unreachable.load(Ordering::Relaxed) {
            return false;
        }
        let within = within.min(peer.upstream.connect_timeout);
        let probe = tokio::net::TcpStream::connect(peer.address);
        match tokio::time::timeout(within, probe).await {
            Ok(Ok(_)) => {
                self.set_unreachable(index, false);
                false
            }
            _ => true,
        }
    }

    /// Counts an upstream answer (`status` = its code, or "error" when none came) and how long
    /// the upstream took.
    pub fn observe(&self, index: usize, status: &str, seconds: Option<f64>) {
        let name = self.name(index);
        let m = metrics();
        m.upstream_requests.with_label_values(&[name, status]).inc();
        if let Some(s) = seconds {
            m.upstream_duration.with_label_values(&[name]).observe(s);
        }
    }
}
