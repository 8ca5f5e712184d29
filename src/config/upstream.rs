//! `[upstreams.NAME]`: one vendor or origin as the gateway reaches it, compiled and checked.
//!
//! An upstream is a pool of addresses (`url` or `urls`) with how to pick one (`balance`), how to
//! tell a dead one (`health_check`), how often names are looked up again (`resolve_every`), what
//! the request carries there (`host`, `set_headers`, `remove_headers`) and how TLS is checked
//! (`ca_file`, `client_cert` / `client_key`). Everything that can be wrong is found here, at
//! load, with a position: PEM files are read and parsed now, so `aisle check` reports a missing or
//! unreadable certificate and a reload with one keeps the running configuration.
//!
//! `quota` caps what the gateway sends this upstream (a vendor's rate limit or paid plan):
//! `requests` per `per`, at most `burst` at once, counted fleet-wide through Redis (or per
//! instance, the limit divided by `fleet_size`, without it); see `crate::proxy::quota`.
//!
//! `set_headers` values are [`Secret`]s (a vendor's API key, expanded from `${VAR}`): their
//! `Debug` is `<redacted>` and no diagnostic quotes them.

use super::env::expand_env;
use super::raw::RawUpstream;
use super::secret::{redact_url, Secret};
use crate::diag::{Diagnostic, SourceFile};
use crate::units::parse_duration;
use http::HeaderName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub tls: bool,
    /// `host:port` of the first address (what single-origin tools such as `aisle demo` use).
    pub address: String,
    /// Every configured address, in the order written.
    pub addresses: Vec<Address>,
    /// `host`: the `Host` sent upstream. `None`: the address's host for https, the client's
    /// `Host` for http.
    pub host: Option<String>,
    /// Added to (replacing) every upstream request's headers.
    pub set_headers: Vec<SetHeader>,
    /// Never forwarded upstream.
    pub remove_headers: Vec<HeaderName>,
    /// `ca_file`: the trust roots for this upstream's certificates (DER), replacing the system's.
    pub ca: Option<Arc<Vec<Vec<u8>>>>,
    /// `client_cert` + `client_key`: the certificate chain (DER, leaf first) and key (DER) the
    /// gateway presents (mTLS).
    pub client_cert: Option<Arc<ClientCert>>,
    pub balance: Balance,
    pub health_check: Option<HealthCheck>,
    /// `resolve_every`: names looked up again this often. `None`: once, at load.
    pub resolve_every: Option<Duration>,
    /// Connection failures retried on another address (idempotent requests and body-keyed POSTs).
    pub retries: u32,
    /// Connections kept idle per address at most (pingora's pool is per process, see README).
    pub max_connections: Option<u32>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// With a stale entry to fall back on: how long to wait for this upstream's answer before
    /// serving the entry stale and letting the fill go on in the background. `None`: wait for
    /// the answer (or `read_timeout`).
    pub stale_after: Option<Duration>,
    /// `quota`: how many requests may go to this upstream (misses only). `None`: no limit.
    pub quota: Option<Quota>,
}

/// `quota = { requests = 1000, per = "1h", burst = 50, on_exhausted = "stale", fleet_size = 3 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    requests: Spanned<u64>,
    per: Spanned<String>,
    burst: Option<Spanned<u64>>,
    on_exhausted: Option<Spanned<String>>,
    fleet_size: Option<Spanned<u32>>,
}

/// An upstream's request quota: a rate (`requests` per `per`) with a bucket of `burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub requests: u64,
    pub per: Duration,
    /// How many may go at once after a quiet spell (default: `requests`, a whole period's worth).
    pub burst: u64,
    pub on_exhausted: OnExhausted,
    /// How many instances share the quota: without Redis (absent or down) each instance allows
    /// `requests / fleet_size` per `per` (and `burst / fleet_size`, at least 1). Default 1.
    pub fleet_size: u32,
}

/// `on_exhausted`: what a miss gets once the quota is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExhausted {
    /// Any stored entry, however old (`Cache-Status` detail `quota-exhausted`); else 429.
    Stale,
    /// 429 with `Retry-After`, at once.
    Reject,
}

/// Checks `quota`; `None` after pushing its problems to `diags`.
fn compile_quota(
    src: &SourceFile,
    name: &str,
    q: &Spanned<RawQuota>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Quota> {
    let before = diags.len();
    let r = q.get_ref();
    let at_least_one = |n: u64,
                        span: std::ops::Range<usize>,
                        what: &str,
                        diags: &mut Vec<Diagnostic>| {
        if n == 0 {
            diags.push(src.at(
                span,
                format!("upstreams.{name}.quota.{what} must be at least 1 (remove the quota for no limit)"),
            ));
        }
    };
    let requests = *r.requests.get_ref();
    at_least_one(requests, r.requests.span(), "requests", diags);
    let per = match parse_duration(r.per.get_ref()) {
        Ok(d) if d < Duration::from_millis(1) => {
            diags.push(src.at(
                r.per.span(),
                format!("upstreams.{name}.quota.per must be at least 1ms; write it like \"1h\" or \"1m\""),
            ));
            d
        }
        Ok(d) => d,
        Err(e) => {
            diags.push(src.at(r.per.span(), format!("upstreams.{name}.quota.per: {e}")));
            Duration::ZERO
        }
    };
    let burst = match &r.burst {
        Some(b) => {
            at_least_one(*b.get_ref(), b.span(), "burst", diags);
            *b.get_ref()
        }
        None => requests,
    };
    let on_exhausted = match r.on_exhausted.as_ref().map(|o| (o, o.get_ref().as_str())) {
        None | Some((_, "stale")) => OnExhausted::Stale,
        Some((_, "reject")) => OnExhausted::Reject,
        Some((o, other)) => {
            diags.push(src.at(
                o.span(),
                format!(
                    "upstreams.{name}.quota.on_exhausted = {other:?} is not a choice; write \
                     \"stale\" (serve what is stored, else 429) or \"reject\" (429)"
                ),
            ));
            OnExhausted::Stale
        }
    };
    let fleet_size = match &r.fleet_size {
        Some(f) => {
            at_least_one(u64::from(*f.get_ref()), f.span(), "fleet_size", diags);
            *f.get_ref()
        }
        None => 1,
    };
    if diags.len() > before {
        return None;
    }
    Some(Quota {
        requests,
        per,
        burst,
        on_exhausted,
        fleet_size,
    })
}

/// One configured address: resolved to one or more socket addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `host:port`, as looked up.
    pub authority: String,
    /// The host name: SNI, certificate checks and the default https `Host`.
    pub host: String,
    /// `Host` for https: the host, with the port unless it is the default.
    pub host_header: String,
}

/// One `set_headers` field.
#[derive(Debug, Clone)]
pub struct SetHeader {
    pub name: HeaderName,
    /// The name as the configuration spells it, which is how it is sent: some vendors' APIs
    /// read `X-API-Key` and not `x-api-key`, though names are case-insensitive (RFC 9110
    /// §5.1), and nginx's `proxy_set_header` sends a name as written too.
    pub spelling: String,
    pub value: Secret,
}

/// A client certificate chain and its key, DER. The key is never printed.
pub struct ClientCert {
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientCert({} certificates, key <redacted>)",
            self.chain.len()
        )
    }
}

/// `balance`: how a request picks an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// The address with the fewest requests in flight from this process.
    LeastConn,
    /// Consistent (ketama) hashing on the cache key: one key, one address while it is healthy.
    Hash,
}

/// `health_check`: pingora's `HttpHealthCheck`, run in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// Compiles one `[upstreams.NAME]`; `None` after pushing its problems to `diags`.
pub(super) fn compile(
    src: &SourceFile,
    base: &Path,
    name: &str,
    u: &Spanned<RawUpstream>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Upstream> {
    let before = diags.len();
    let r = u.get_ref();
    let dur = |f: &Option<Spanned<String>>, default: Duration, diags: &mut Vec<Diagnostic>| match f
    {
        None => default,
        Some(s) => parse_duration(s.get_ref()).unwrap_or_else(|e| {
            diags.push(src.at(s.span(), e));
            default
        }),
    };
    let urls: Vec<&Spanned<String>> = match (&r.url, &r.urls) {
        (Some(url), None) => vec![url],
        (None, Some(urls)) if !urls.get_ref().is_empty() => urls.get_ref().iter().collect(),
        (None, Some(urls)) => {
            diags.push(src.at(
                urls.span(),
                format!("upstreams.{name}.urls is empty; give at least one address"),
            ));
            return None;
        }
        (Some(url), Some(_)) => {
            diags.push(src.at(
                url.span(),
                format!("upstreams.{name} has both url and urls; keep one (urls for several)"),
            ));
            return None;
        }
        (None, None) => {
            diags.push(src.at(
                u.span(),
                format!("upstreams.{name} has no url; add url = \"https://host\" or urls = [...]"),
            ));
            return None;
        }
    };
    let mut tls = None;
    let mut addresses = Vec::new();
    for url in urls {
        let expanded = match expand_env(url.get_ref()) {
            Ok(v) => v,
            Err(e) => {
                diags.push(src.at(url.span(), e));
                continue;
            }
        };
        match parse_url(&expanded) {
            Ok((t, address)) => {
                if tls.is_some_and(|was| was != t) {
                    diags.push(src.at(
                        url.span(),
                        format!(
                            "upstreams.{name}: every url of one upstream must use the same \
                             scheme (all http:// or all https://)"
                        ),
                    ));
                }
                tls = Some(t);
                addresses.push(address);
            }
            Err(e) => diags.push(src.at(url.span(), e)),
        }
    }
    let tls = tls.unwrap_or(false);

    let read_timeout = dur(&r.read_timeout, Duration::from_secs(30), diags);
    let connect_timeout = dur(&r.connect_timeout, Duration::from_secs(2), diags);
    let stale_after = r.stale_after.as_ref().and_then(|s| {
        let after = match parse_duration(s.get_ref()) {
            Ok(after) => after,
            Err(e) => {
                diags.push(src.at(s.span(), e));
                return None;
            }
        };
        if after.is_zero() || after >= read_timeout {
            diags.push(src.at(
                s.span(),
                format!(
                    "upstreams.{name}.stale_after must be more than 0 and less than its \
                     read_timeout ({read_timeout:?}), or it never takes effect; shorten it or \
                     remove it"
                ),
            ));
            return None;
        }
        Some(after)
    });

    let host = r.host.as_ref().and_then(|h| {
        let v = h.get_ref().trim();
        if v.is_empty() || http::HeaderValue::from_str(v).is_err() || v.contains(['/', ' ']) {
            diags.push(src.at(
                h.span(),
                format!("upstreams.{name}.host {v:?} is not a host name; write it like \"api.example.com\""),
            ));
            return None;
        }
        Some(v.to_ascii_lowercase())
    });
    let mut set_headers = Vec::new();
    for (k, v) in r.set_headers.iter().flatten() {
        let Ok(header) = HeaderName::from_bytes(k.as_bytes()) else {
            diags.push(src.at(
                v.span(),
                format!("upstreams.{name}.set_headers: {k:?} is not a header name"),
            ));
            continue;
        };
        if matches!(
            header.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection"
        ) {
            diags.push(src.at(
                v.span(),
                format!(
                    "upstreams.{name}.set_headers: {k} is set by the gateway itself{}",
                    if header == http::header::HOST {
                        "; use upstreams.NAME.host"
                    } else {
                        ""
                    }
                ),
            ));
            continue;
        }
        // The value is a secret: the messages name the header, never the value.
        let value = match expand_env(v.get_ref()) {
            Ok(value) => value,
            Err(e) => {
                diags.push(src.at(v.span(), format!("upstreams.{name}.set_headers.{k}: {e}")));
                continue;
            }
        };
        if http::HeaderValue::from_str(&value).is_err() {
            diags.push(src.at(
                v.span(),
                format!(
                    "upstreams.{name}.set_headers.{k}: the value (shown nowhere: it may be a \
                     secret) has characters a header cannot carry, such as a line break"
                ),
            ));
            continue;
        }
        set_headers.push(SetHeader {
            name: header,
            spelling: k.clone(),
            value: Secret::from(value),
        });
    }
    let mut remove_headers = Vec::new();
    for h in r.remove_headers.iter().flatten() {
        match HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => remove_headers.push(n),
            Err(_) => diags.push(src.at(
                h.span(),
                format!(
                    "upstreams.{name}.remove_headers: {:?} is not a header name",
                    h.get_ref()
                ),
            )),
        }
    }

    let tls_only = |f: &Option<Spanned<String>>, what: &str, diags: &mut Vec<Diagnostic>| {
        if let (Some(f), false) = (f, tls) {
            diags.push(src.at(
                f.span(),
                format!(
                    "upstreams.{name}.{what} applies to https upstreams only; this one is http://"
                ),
            ));
        }
    };
    tls_only(&r.ca_file, "ca_file", diags);
    tls_only(&r.client_cert, "client_cert", diags);
    let ca = r.ca_file.as_ref().and_then(|f| {
        let path = base.join(f.get_ref());
        let certs = read_certs(&path)
            .map_err(|e| diags.push(src.at(f.span(), e)))
            .ok()?;
        Some(Arc::new(certs))
    });
    let client_cert = match (&r.client_cert, &r.client_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let chain = read_certs(&base.join(c.get_ref()))
                .map_err(|e| diags.push(src.at(c.span(), e)))
                .ok();
            let key = read_key(&base.join(k.get_ref()))
                .map_err(|e| diags.push(src.at(k.span(), e)))
                .ok();
            match (chain, key) {
                (Some(chain), Some(key)) => Some(Arc::new(ClientCert { chain, key })),
                _ => None,
            }
        }
        (Some(f), None) | (None, Some(f)) => {
            diags.push(src.at(
                f.span(),
                format!("upstreams.{name}: client_cert and client_key go together; give both"),
            ));
            None
        }
    };

    let balance = match r.balance.as_ref().map(|b| (b, b.get_ref().as_str())) {
        None | Some((_, "round_robin")) => Balance::RoundRobin,
        Some((_, "least_conn")) => Balance::LeastConn,
        Some((_, "hash")) => Balance::Hash,
        Some((b, other)) => {
            diags.push(src.at(
                b.span(),
                format!(
                    "upstreams.{name}.balance = {other:?} is not a balance; write \
                     \"round_robin\", \"least_conn\" or \"hash\""
                ),
            ));
            Balance::RoundRobin
        }
    };
    let health_check = r.health_check.as_ref().map(|hc| {
        let h = hc.get_ref();
        let path = h
            .path
            .as_ref()
            .map_or("/".to_string(), |p| p.get_ref().clone());
        if !path.starts_with('/') || http::Uri::try_from(path.as_str()).is_err() {
            let span = h.path.as_ref().map_or(hc.span(), |p| p.span());
            diags.push(src.at(
                span,
                format!(
                    "upstreams.{name}.health_check.path {path:?} must be a path starting with /"
                ),
            ));
        }
        let count = |f: &Option<Spanned<u32>>, default: u32, diags: &mut Vec<Diagnostic>| match f {
            None => default,
            Some(n) if *n.get_ref() == 0 => {
                diags.push(src.at(n.span(), "must be at least 1"));
                default
            }
            Some(n) => *n.get_ref(),
        };
        HealthCheck {
            path,
            interval: dur(&h.interval, Duration::from_secs(5), diags)
                .max(Duration::from_millis(10)),
            timeout: dur(&h.timeout, Duration::from_secs(1), diags),
            unhealthy_after: count(&h.unhealthy_after, 3, diags),
            healthy_after: count(&h.healthy_after, 2, diags),
        }
    });
    let resolve_every = r
        .resolve_every
        .as_ref()
        .and_then(|s| match parse_duration(s.get_ref()) {
            Ok(d) if d.is_zero() => {
                diags.push(src.at(
                    s.span(),
                    "resolve_every must be more than 0 (or removed: resolve once)",
                ));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                diags.push(src.at(s.span(), e));
                None
            }
        });
    let retries = r.retries.as_ref().map_or(0, |n| *n.get_ref());
    let max_connections = r.max_connections.as_ref().and_then(|n| match *n.get_ref() {
        0 => {
            diags.push(src.at(n.span(), "max_connections must be at least 1"));
            None
        }
        n => Some(n),
    });
    let quota = r
        .quota
        .as_ref()
        .and_then(|q| compile_quota(src, name, q, diags));
    if diags.len() > before || addresses.is_empty() {
        return None;
    }
    Some(Upstream {
        name: name.to_string(),
        tls,
        address: addresses[0].authority.clone(),
        addresses,
        host,
        set_headers,
        remove_headers,
        ca,
        client_cert,
        balance,
        health_check,
        resolve_every,
        retries,
        max_connections,
        connect_timeout,
        read_timeout,
        stale_after,
        quota,
    })
}

/// Every certificate of a PEM file (DER), or what is wrong with it.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (DER); the message never shows the file's content.
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&text).map_err(|_| {
        format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })?;
    Ok(key.secret_der().to_vec())
}

/// `http://host[:port]` or `https://host[:port]` -> (tls, the address).
pub(super) fn parse_url(raw: &str) -> Result<(bool, Address), String> {
    // Messages show the URL without its userinfo: it may hold an expanded `${VAR}` password.
    let url = &redact_url(raw);
    let uri: http::Uri = raw.parse().map_err(|e| {
        format!("bad upstream url {url:?}: {e}; write it like \"http://127.0.0.1:3000\"")
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "upstream url {url:?} must start with http:// or https://"
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("upstream url {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "upstream url {url:?} has a path; Aisle forwards the request's own path, so give only scheme, host and port"
        ));
    }
    let default_port = if tls { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
    let bracketed = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let host_header = if port == default_port {
        bracketed.clone()
    } else {
        format!("{bracketed}:{port}")
    };
    Ok((
        tls,
        Address {
            authority: format!("{bracketed}:{port}"),
            host,
            host_header,
        },
    ))
}
