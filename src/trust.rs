//! Whom the gateway believes: `[server] trusted_proxies` and `[server] trusted_clients`.
//!
//! Every client is a stranger by default. A request's forwarding headers (`X-Forwarded-*`,
//! `Forwarded`, `X-Real-IP`, `X-Original-URL`, `X-Rewrite-URL`, `X-Host`:
//! [`FORWARDING_HEADERS`]) are believed, and passed on to the origin, only when the connection
//! comes from a `trusted_proxies` network; the cache-control headers (`Aisle-Cache-TTL`, `Aisle-Cache-Namespace`, any future `Aisle-*`) are honoured only
//! for a client in a `trusted_clients` network (or on rules that say `client_controls = true`).
//!
//! The client is the connection's peer, or, when the peer is a trusted proxy, the nearest address
//! in `X-Forwarded-For` that is not itself a trusted proxy (nginx's `real_ip_recursive`). An
//! address that cannot be read ends the walk with an unknown, untrusted client.
//!
//! This module holds the compiled settings and these decisions (pure, table-tested); the proxy
//! rewrites headers with them (`proxy/forwarding.rs`) and admission reads [`Client`].

use http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// Request headers that say where a request came from or where it was meant to go. A client
/// can write any of them; the origin may believe them (reflect `X-Forwarded-Host` in links,
/// route by `X-Original-URL`), and none of them is in the cache key. Besides the standard and
/// the common ones, the de-facto family web frameworks read (Rails, Spring, Symfony, Django:
/// port, prefix, scheme, SSL flag, `X-Host`).
pub const FORWARDING_HEADERS: [&str; 13] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-host",
];

/// Whether `name` (lowercase, as `http` stores it) is one of [`FORWARDING_HEADERS`].
pub fn is_forwarding_header(name: &str) -> bool {
    (name.starts_with("x-") || name == "forwarded") && FORWARDING_HEADERS.contains(&name)
}

/// Request headers with this prefix control the cache (`Aisle-Cache-TTL`, ...); none of them is
/// ever sent upstream.
pub const CONTROL_PREFIX: &str = "aisle-";

/// Whether `name` (lowercase, as `http` stores it) is one of the gateway's control headers.
pub fn is_control_header(name: &str) -> bool {
    name.starts_with(CONTROL_PREFIX)
}

/// A list of networks (`["10.0.0.0/8", "192.0.2.7"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Networks(nets)
    }

    /// One entry as written in `gateway.toml`: a CIDR, or a bare address (a /32 or /128).
    pub fn parse_one(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                format!(
                    "{text:?} is not a network; write CIDRs like \"10.0.0.0/8\", \"192.0.2.7/32\" or \"2001:db8::/32\""
                )
            })
    }

    /// Whether `ip` is in one of the networks (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether a request's `Aisle-*` control headers are honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Client {
    /// From a `[server] trusted_clients` network.
    Trusted,
    /// Anyone else (the default; `aisle replay` assumes it unless told `--trusted`).
    #[default]
    Untrusted,
}

/// What is believed about one request's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peer {
    /// The connection's peer address (`None` for a Unix socket or an unknown peer).
    pub addr: Option<IpAddr>,
    /// The peer is a trusted proxy: its forwarding headers are kept and extended.
    pub proxy: bool,
    /// The client (the peer, or the one a trusted proxy names) is a trusted client.
    pub client: Client,
}

/// `[server] trusted_proxies` and `trusted_clients`, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub proxies: Networks,
    pub clients: Networks,
}

impl Trust {
    /// What is believed about a request from `peer` with these headers.
    pub fn peer(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Peer {
        let addr = peer.map(|ip| ip.to_canonical());
        let proxy = addr.is_some_and(|ip| self.proxies.contains(ip));
        let client = match self.client_addr(addr, proxy, headers) {
            Some(ip) if self.clients.contains(ip) => Client::Trusted,
            _ => Client::Untrusted,
        };
        Peer {
            addr,
            proxy,
            client,
        }
    }

    /// The client's address: the peer, or, behind trusted proxies, the rightmost
    /// `X-Forwarded-For` entry that is not a trusted proxy. `None`: unknown.
    fn client_addr(
        &self,
        peer: Option<IpAddr>,
        proxy: bool,
        headers: &HeaderMap,
    ) -> Option<IpAddr> {
        let peer = peer?;
        if !proxy {
            return Some(peer);
        }
        let mut client = peer;
        let mut entries = Vec::new();
        for line in headers.get_all("x-forwarded-for") {
            // A line that is not text is an entry that cannot be read.
            let Ok(line) = line.to_str() else {
                return None;
            };
            entries.extend(line.split(','));
        }
        for entry in entries.iter().rev() {
            if self.proxies.contains(client) {
                client = parse_node(entry)?;
            } else {
                break;
            }
        }
        Some(client)
    }
}

/// One `X-Forwarded-For` entry: `192.0.2.7`, `2001:db8::1`, `[2001:db8::1]`, or with a port.
fn parse_node(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_are_exactly_the_list() {
        for name in FORWARDING_HEADERS {
            assert!(is_forwarding_header(name), "{name}");
        }
        for name in [
            "x-forwarded",
            "x-forwarded-fo",
            "x-forwarded-for2",
            "x-request-id",
            "forwarded-for",
            "host",
            "",
        ] {
            assert!(!is_forwarding_header(name), "{name}");
        }
    }

    fn nets(list: &[&str]) -> Networks {
        Networks::new(
            list.iter()
                .map(|n| Networks::parse_one(n).unwrap())
                .collect(),
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn networks_parse_and_match() {
        assert_eq!(
            Networks::parse_one("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            Networks::parse_one("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(Networks::parse_one("::1").unwrap().to_string(), "::1/128");
        for bad in ["", "10.0.0.0/33", "localhost", "10.0.0", "10.0.0.0/8/8"] {
            let e = Networks::parse_one(bad).unwrap_err();
            assert!(e.contains("is not a network"), "{bad}: {e}");
        }
        let n = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(n.contains("10.9.9.9".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.0.0.1".parse().unwrap()),
            "mapped IPv4"
        );
        assert!(n.contains("2001:db8::5".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!Networks::default().contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn control_headers() {
        assert!(is_control_header("aisle-cache-ttl"));
        assert!(is_control_header("aisle-anything"));
        assert!(!is_control_header("x-aisle"));
    }

    #[test]
    fn nobody_is_trusted_by_default() {
        let t = Trust::default();
        let p = t.peer(
            ip("127.0.0.1"),
            &headers(&[("x-forwarded-for", "10.0.0.1")]),
        );
        assert_eq!(
            p,
            Peer {
                addr: ip("127.0.0.1"),
                proxy: false,
                client: Client::Untrusted
            }
        );
        assert_eq!(t.peer(None, &HeaderMap::new()).client, Client::Untrusted);
    }

    #[test]
    fn clients_are_the_peer_unless_a_trusted_proxy_names_them() {
        let t = Trust {
            proxies: nets(&["10.0.0.0/8"]),
            clients: nets(&["192.0.2.0/24"]),
        };
        let client = |peer: &str, h: &[(&str, &str)]| t.peer(ip(peer), &headers(h)).client;
        // Straight from a trusted client; an untrusted peer's X-Forwarded-For is not believed.
        assert_eq!(client("192.0.2.9", &[]), Client::Trusted);
        assert_eq!(
            client("198.51.100.1", &[("x-forwarded-for", "192.0.2.9")]),
            Client::Untrusted
        );
        // Behind trusted proxies: the rightmost entry that is not a proxy.
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "192.0.2.9")]),
            Client::Trusted
        );
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "192.0.2.9, 10.0.0.2")]),
            Client::Trusted
        );
        assert_eq!(
            client(
                "10.0.0.1",
                &[
                    ("x-forwarded-for", "192.0.2.9"),
                    ("x-forwarded-for", "10.0.0.2")
                ]
            ),
            Client::Trusted,
            "lines are one list"
        );
        // A client cannot claim trust by writing a trusted address to the left of its own.
        assert_eq!(
            client(
                "10.0.0.1",
                &[("x-forwarded-for", "192.0.2.9, 198.51.100.1")]
            ),
            Client::Untrusted
        );
        // Unreadable entries make the client unknown; ports and brackets are read.
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "nonsense")]),
            Client::Untrusted
        );
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "192.0.2.9:5555")]),
            Client::Trusted
        );
        assert_eq!(parse_node("[2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(parse_node("[2001:db8::1]:80"), ip("2001:db8::1"));
        assert_eq!(parse_node("unknown"), None);
        // Only proxies: the client is the leftmost proxy (none of them is a trusted client).
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "10.0.0.3")]),
            Client::Untrusted
        );
        let p = t.peer(ip("::ffff:10.0.0.1"), &HeaderMap::new());
        assert!(p.proxy && p.addr == ip("10.0.0.1"), "{p:?}");
    }
}
