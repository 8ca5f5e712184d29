//! Upstreams as pingora sees them: addresses resolved once at start, the peer handed to pingora
//! per request, and the per-upstream request metrics.

use crate::config::{Config, Upstream};
use crate::metrics::metrics;
use pingora::upstreams::peer::HttpPeer;
use std::net::{SocketAddr, ToSocketAddrs};

/// A resolved upstream, ready to hand to pingora.
pub struct Peer {
    address: SocketAddr,
    upstream: Upstream,
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
