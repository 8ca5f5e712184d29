//! The headers that tell the origin where a request came from, rewritten for the upstream.
//!
//! A client's own forwarding headers ([`trust::FORWARDING_HEADERS`]: `X-Forwarded-*`,
//! `Forwarded`, `X-Real-IP`, `X-Original-URL`, `X-Rewrite-URL`, `X-Host`) are not in the cache
//! key, and an origin that believes them (links built from `X-Forwarded-Host`, routing by
//! `X-Original-URL`) would have one client's answer cached for everyone. So they are removed, unless the connection comes from
//! `[server] trusted_proxies` ([`crate::trust`]), and the gateway says what it saw itself:
//!
//! - `X-Forwarded-For`: the peer, appended to a trusted proxy's list;
//! - `X-Forwarded-Proto`, `X-Forwarded-Host`: a trusted proxy's, else the scheme and `Host`
//!   the gateway received;
//! - `Forwarded` (RFC 7239): one element `for=...;host=...;proto=...`, appended to a trusted
//!   proxy's.
//!
//! `Aisle-*` control headers are for the gateway alone and never go upstream, from anyone.
//!
//! Then the upstream's own settings ([`for_upstream`]): `remove_headers` are dropped,
//! `set_headers` (a vendor's credential, say) replace whatever the client sent, and `Host`
//! becomes the upstream's (`host`, or the address's own for https, where a vendor's virtual
//! host and certificate expect it).

use crate::config::Upstream;
use crate::trust::{self, Peer};
use http::header::{HeaderName, HeaderValue};
use pingora::http::{CaseHeaderName, RequestHeader};
use smallvec::SmallVec;
use std::net::IpAddr;

/// What the gateway itself saw of the request.
pub struct Seen<'a> {
    pub peer: Peer,
    /// `http` or `https`: the listener's scheme.
    pub proto: &'static str,
    /// The `Host` field (or the request target's authority) as received: `X-Forwarded-Host`
    /// shares its bytes rather than copying them.
    pub host: Option<&'a HeaderValue>,
}

/// A field the gateway sets, with the spelling it is sent in: a request relayed keeps its own
/// fields' spelling, and pingora stores the spelling of a custom name by copying it on every
/// insert (pingora-http patch 5 takes a static one; issue 16). Spelled as nginx spells them.
type Field = (HeaderName, &'static str);

static X_FORWARDED_FOR: Field = (
    HeaderName::from_static("x-forwarded-for"),
    "X-Forwarded-For",
);
static X_FORWARDED_PROTO: Field = (
    HeaderName::from_static("x-forwarded-proto"),
    "X-Forwarded-Proto",
);
static X_FORWARDED_HOST: Field = (
    HeaderName::from_static("x-forwarded-host"),
    "X-Forwarded-Host",
);
static FORWARDED: Field = (http::header::FORWARDED, "Forwarded");

/// Rewrites the upstream request's forwarding and control headers.
pub fn rewrite(req: &mut RequestHeader, seen: &Seen<'_>) {
    // One pass over the fields the request has, rather than a removal (two map lookups by
    // name) for each of the thirteen forwarding names whether present or not: that was most
    // of this function's cost on every proxied request (issue 16, the `pass` profile).
    let from_proxy = seen.peer.proxy;
    let dropped: SmallVec<[HeaderName; 4]> = req
        .headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            trust::is_control_header(name) || (!from_proxy && trust::is_forwarding_header(name))
        })
        .cloned()
        .collect();
    for name in dropped {
        req.remove_header(&name);
    }

    // The peer's address, spelled once for both headers below.
    let peer = seen.peer.addr.map(addr_text);
    // A client's forwarding fields were all removed above: only a trusted proxy's can be
    // extended or kept, so only then are they looked up (four lookups a proxied request).
    let prior = |req: &RequestHeader, field: &Field| {
        if from_proxy {
            joined(req, &field.0)
        } else {
            None
        }
    };
    let absent =
        |req: &RequestHeader, field: &Field| !from_proxy || !req.headers.contains_key(&field.0);
    // This hop's `Forwarded` element, spelled before the peer's text goes to X-Forwarded-For.
    let element = forwarded_element(seen, peer.as_deref());
    // X-Forwarded-For: a trusted proxy's list, then the peer.
    if let Some(peer) = peer {
        match prior(req, &X_FORWARDED_FOR) {
            Some(list) => set(req, &X_FORWARDED_FOR, format!("{list}, {peer}")),
            None => set(req, &X_FORWARDED_FOR, peer),
        }
    }
    // X-Forwarded-Proto / -Host: a trusted proxy's own, else what the gateway saw.
    if absent(req, &X_FORWARDED_PROTO) {
        let value = HeaderValue::from_static(seen.proto);
        let _ = req.insert_header(named(&X_FORWARDED_PROTO), value);
    }
    if absent(req, &X_FORWARDED_HOST) {
        if let Some(host) = seen.host {
            let _ = req.insert_header(named(&X_FORWARDED_HOST), host.clone());
        }
    }
    // Forwarded: a trusted proxy's elements, then this hop's.
    let value = match prior(req, &FORWARDED) {
        Some(list) => format!("{list}, {element}"),
        None => element,
    };
    set(req, &FORWARDED, value);
}

/// A field's name and spelling, as `insert_header` takes them.
fn named(field: &Field) -> Field {
    (field.0.clone(), field.1)
}

/// What every request to one upstream carries, in the form it is sent, built once with the
/// upstream's pool rather than on each request: each `set_headers` value was parsed and copied
/// and its name copied again into the case map, on every proxied request (issue 16). The
/// upstream's health check sends the same fields ([`UpstreamFields::set_on`]).
pub struct UpstreamFields {
    remove: Vec<HeaderName>,
    /// `set_headers`: name, spelling as configured, value (sensitive: pingora's debug log of
    /// the upstream request hides a credential).
    set: Vec<(HeaderName, CaseHeaderName, HeaderValue)>,
    /// `host`, if configured.
    host: Option<HeaderValue>,
    /// Per configured address, its `Host` for https.
    address_hosts: Vec<Option<HeaderValue>>,
}

impl UpstreamFields {
    pub fn of(upstream: &Upstream) -> Self {
        // Checked at load: valid header values, a host name, `host:port`.
        let value = |text: &str| HeaderValue::from_str(text).ok();
        UpstreamFields {
            remove: upstream.remove_headers.clone(),
            set: upstream
                .set_headers
                .iter()
                .filter_map(|h| {
                    let mut v = value(h.value.expose())?;
                    v.set_sensitive(true);
                    let spelling = CaseHeaderName::new(h.spelling.clone());
                    Some((h.name.clone(), spelling, v))
                })
                .collect(),
            host: upstream.host.as_deref().and_then(value),
            address_hosts: upstream
                .addresses
                .iter()
                .map(|a| value(&a.host_header))
                .collect(),
        }
    }

    /// Sets `set_headers` on `req` (replacing what it had), values and spellings shared: what
    /// every request and the health check's request carry.
    pub fn set_on(&self, req: &mut RequestHeader) {
        for (name, spelling, value) in &self.set {
            let _ = req.insert_header((name.clone(), spelling), value.clone());
        }
    }

    /// The `Host` a request sent to configured address `address` carries: `host`, else the
    /// address's own for https, else `None` (the client's).
    pub fn host(&self, tls: bool, address: Option<usize>) -> Option<&HeaderValue> {
        if let Some(h) = &self.host {
            return Some(h);
        }
        match (tls, address) {
            (true, Some(a)) => self.address_hosts.get(a)?.as_ref(),
            _ => None,
        }
    }
}

/// Applies the upstream's `remove_headers`, `set_headers` and `Host` (`host`: `None` keeps the
/// client's). Nothing is parsed or copied: values and spellings are shared with `fields`.
pub fn for_upstream(req: &mut RequestHeader, fields: &UpstreamFields, host: Option<&HeaderValue>) {
    for name in &fields.remove {
        req.remove_header(name);
    }
    fields.set_on(req);
    if let Some(host) = host {
        let _ = req.insert_header(http::header::HOST, host.clone());
    }
}

/// An address as `Display` spells it; an IPv4 address without the formatting machinery, which
/// cost 1.3k instructions a time (issue 16: it was spelled twice on every proxied request).
fn addr_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => {
            let mut out = String::with_capacity(15);
            let mut num = itoa::Buffer::new();
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(num.format(octet));
            }
            out
        }
        IpAddr::V6(ip) => ip.to_string(),
    }
}

/// One RFC 7239 element for this hop: `for=192.0.2.7;host=example.com;proto=http`; `peer` is
/// the peer's address as [`addr_text`] spells it.
fn forwarded_element(seen: &Seen<'_>, peer: Option<&str>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("for=");
    match peer {
        // RFC 7239 §6: an IPv6 node (the only spelling with colons) is bracketed, and so must
        // be quoted.
        Some(peer) if peer.contains(':') => {
            out.push_str("\"[");
            out.push_str(peer);
            out.push_str("]\"");
        }
        Some(peer) => out.push_str(peer),
        None => out.push_str("unknown"),
    }
    if let Some(host) = seen.host.and_then(|h| h.to_str().ok()) {
        out.push_str(";host=");
        push_value(&mut out, host);
    }
    out.push_str(";proto=");
    out.push_str(seen.proto);
    out
}

/// Appends an RFC 7239 value: a token as it is, anything else as a quoted-string.
fn push_value(out: &mut String, v: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !v.is_empty() && v.chars().all(tchar) {
        out.push_str(v);
        return;
    }
    out.reserve(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Every line of a header, joined with `, ` (RFC 9110 §5.3); `None` when absent or not text.
fn joined(req: &RequestHeader, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in req.headers.get_all(name) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        out = Some(match out {
            Some(prev) => format!("{prev}, {v}"),
            None => v.to_string(),
        });
    }
    out
}

/// Replaces every line of `field` with one value, which becomes the value's buffer (checked,
/// not copied; skipped if not a valid header value, which cannot happen for values built from
/// a received header and an address).
fn set(req: &mut RequestHeader, field: &Field, value: String) {
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        let _ = req.insert_header(named(field), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::Client;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    fn header(req: &RequestHeader, name: &str) -> Option<String> {
        let lines: Vec<_> = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        (!lines.is_empty()).then(|| lines.join(" | "))
    }

    fn peer(addr: &str, proxy: bool) -> Peer {
        Peer {
            addr: Some(addr.parse().unwrap()),
            proxy,
            client: Client::Untrusted,
        }
    }

    const CLIENT_SAYS: &[(&str, &str)] = &[
        ("host", "api.example.com"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "10.9.9.9"),
        ("x-real-ip", "10.9.9.9"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("forwarded", "for=10.9.9.9;host=evil.example"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/evil"),
        ("x-host", "evil.example"),
        ("aisle-cache-ttl", "0"),
        ("aisle-cache-namespace", "other-tenant"),
        ("aisle-future-control", "x"),
        ("accept", "application/json"),
    ];

    #[test]
    fn an_untrusted_clients_forwarding_headers_are_replaced() {
        let mut req = request(CLIENT_SAYS);
        let seen = Seen {
            peer: peer("192.0.2.7", false),
            proto: "http",
            host: Some(&HeaderValue::from_static("api.example.com")),
        };
        rewrite(&mut req, &seen);
        assert_eq!(
            header(&req, "x-forwarded-for").as_deref(),
            Some("192.0.2.7")
        );
        assert_eq!(header(&req, "x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            header(&req, "x-forwarded-host").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            header(&req, "forwarded").as_deref(),
            Some("for=192.0.2.7;host=api.example.com;proto=http")
        );
        for gone in [
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-host",
        ] {
            assert_eq!(header(&req, gone), None, "{gone}");
        }
        assert!(
            !req.headers.keys().any(|k| k.as_str().starts_with("aisle-")),
            "control headers never go upstream"
        );
        assert_eq!(header(&req, "accept").as_deref(), Some("application/json"));
        assert_eq!(header(&req, "host").as_deref(), Some("api.example.com"));
    }

    /// Sent upstream in the spelling nginx uses, from a request that keeps its fields' case (as
    /// pingora parses every request).
    #[test]
    fn the_fields_set_are_sent_spelled_as_proxies_spell_them() {
        let mut req = RequestHeader::build("GET", b"/x", Some(1)).unwrap();
        req.append_header("host", "api.example.com").unwrap();
        let seen = Seen {
            peer: peer("192.0.2.7", false),
            proto: "http",
            host: Some(&HeaderValue::from_static("api.example.com")),
        };
        rewrite(&mut req, &seen);
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "host: api.example.com\r\n\
             X-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: api.example.com\r\n\
             Forwarded: for=192.0.2.7;host=api.example.com;proto=http\r\n"
        );
    }

    #[test]
    fn a_trusted_proxys_headers_are_kept_and_extended() {
        let mut req = request(CLIENT_SAYS);
        req.append_header("x-forwarded-for", "10.9.9.10").unwrap();
        let seen = Seen {
            peer: peer("10.0.0.1", true),
            proto: "http",
            host: Some(&HeaderValue::from_static("api.example.com")),
        };
        rewrite(&mut req, &seen);
        assert_eq!(
            header(&req, "x-forwarded-for").as_deref(),
            Some("10.9.9.9, 10.9.9.10, 10.0.0.1"),
            "lines joined, the peer appended"
        );
        assert_eq!(header(&req, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(
            header(&req, "x-forwarded-host").as_deref(),
            Some("evil.example")
        );
        assert_eq!(header(&req, "x-original-url").as_deref(), Some("/admin"));
        assert_eq!(header(&req, "x-real-ip").as_deref(), Some("10.9.9.9"));
        assert_eq!(header(&req, "x-forwarded-prefix").as_deref(), Some("/evil"));
        assert_eq!(
            header(&req, "forwarded").as_deref(),
            Some("for=10.9.9.9;host=evil.example, for=10.0.0.1;host=api.example.com;proto=http")
        );
        assert!(!req.headers.keys().any(|k| k.as_str().starts_with("aisle-")));
    }

    fn element(seen: &Seen<'_>) -> String {
        forwarded_element(seen, seen.peer.addr.map(addr_text).as_deref())
    }

    /// The peer is spelled as `Display` spells it, for every kind of address.
    #[test]
    fn addresses_are_spelled_as_display_spells_them() {
        for addr in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.254",
            "255.255.255.255",
            "1.22.133.9",
            "::1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(addr_text(ip), ip.to_string());
            assert_eq!(addr_text(ip), addr);
        }
    }

    #[test]
    fn forwarded_values_are_quoted_where_rfc_7239_says() {
        let hosts = [
            HeaderValue::from_static("h.example:8080"),
            HeaderValue::from_static("a\"b\\c"),
        ];
        let seen = |addr: &str, host: usize| Seen {
            peer: peer(addr, false),
            proto: "http",
            host: Some(&hosts[host]),
        };
        assert_eq!(
            element(&seen("2001:db8::1", 0)),
            "for=\"[2001:db8::1]\";host=\"h.example:8080\";proto=http"
        );
        assert_eq!(
            element(&seen("::ffff:192.0.2.1", 1)),
            "for=\"[::ffff:192.0.2.1]\";host=\"a\\\"b\\\\c\";proto=http"
        );
        let unknown = Seen {
            peer: Peer::default(),
            proto: "https",
            host: None,
        };
        assert_eq!(element(&unknown), "for=unknown;proto=https");
        // Without a peer address there is nothing to add to X-Forwarded-For.
        let mut req = request(&[("x-forwarded-for", "10.9.9.9")]);
        rewrite(&mut req, &unknown);
        assert_eq!(header(&req, "x-forwarded-for"), None);
        assert_eq!(header(&req, "x-forwarded-host"), None);
    }

    /// The upstream `api` of a configuration.
    fn upstream(toml: &str) -> Upstream {
        crate::config::load_text(toml).upstreams[0].clone()
    }

    /// `set_headers` and `host` are built once with the pool: each request shares their values
    /// and spellings (no parse, no copy), a credential is sensitive, and a name is sent as the
    /// configuration spells it.
    #[test]
    fn an_upstreams_fields_are_shared_with_each_request_and_sent_as_written() {
        std::env::set_var("AISLE_TEST_FORWARDING_KEY", "sk-test-0f9e8d");
        let u = upstream(
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n\
             [upstreams.api]\nurl = \"https://127.0.0.1:8443\"\nhost = \"vendor.example\"\n\
             set_headers = { \"X-API-Key\" = \"${AISLE_TEST_FORWARDING_KEY}\" }\n\
             remove_headers = [\"cookie\"]\n",
        );
        let fields = UpstreamFields::of(&u);
        let host = fields.host(true, Some(0));
        assert_eq!(host.map(|h| h.as_bytes()), Some(&b"vendor.example"[..]));
        let mut req = request(&[
            ("host", "api.example.com"),
            ("cookie", "a=1"),
            ("x-api-key", "the client's"),
        ]);
        for_upstream(&mut req, &fields, host);
        let (_, _, key) = &fields.set[0];
        let sent = req.headers.get("x-api-key").unwrap();
        assert_eq!(sent, "sk-test-0f9e8d");
        assert!(sent.is_sensitive(), "a credential is never printed");
        assert_eq!(
            sent.as_bytes().as_ptr(),
            key.as_bytes().as_ptr(),
            "the value is the pool's, not parsed and copied again"
        );
        assert_eq!(
            req.headers.get("host").unwrap().as_bytes().as_ptr(),
            host.unwrap().as_bytes().as_ptr()
        );
        assert!(req.headers.get("cookie").is_none());
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("X-API-Key: sk-test-0f9e8d\r\n"), "{wire}");
        // An https upstream without `host` sends the picked address's own; http, the client's.
        let bare = UpstreamFields::of(&upstream(
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n[upstreams.api]\nurl = \"https://127.0.0.1:8443\"\n",
        ));
        assert_eq!(
            bare.host(true, Some(0)).map(|h| h.as_bytes()),
            Some(&b"127.0.0.1:8443"[..])
        );
        assert!(bare.host(true, None).is_none() && bare.host(false, Some(0)).is_none());
    }
}
