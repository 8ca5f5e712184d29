//! Cache keys: the one place a key gets built.
//!
//! A key is scheme, host, method, route (rule name and path) and the rule's vary values, each
//! component length-prefixed so that no two different requests can frame to the same bytes
//! (a path-only key was a cross-tenant poisoning CVE in pingora). The default route, which has
//! no vary list, keys on the full query string instead: RFC 9111's key is the URI.
//!
//! The primary bytes are hashed once here (BLAKE3) and handed to pingora as an override, so later
//! phases reuse the hash instead of rehashing the key.

use crate::rules::source::{canonical, remove_pointer, RequestView};
use crate::rules::Rule;
use pingora::cache::key::HashBinary;
use pingora::cache::CacheKey;

/// Bumped when the key layout changes, so old entries (e.g. in a shared tier) are not misread.
const KEY_VERSION: &[u8] = b"aisle/1";

/// The scheme of the proxy listener: part of every key and URI identity, spelled only here.
pub const SCHEME: &str = "http";

/// The request parts a key is made of.
pub struct KeyInput<'a> {
    pub host: &'a str,
    pub method: &'a http::Method,
    pub view: RequestView<'a>,
    /// `Aisle-Cache-Namespace`: a separate key space (e.g. per tenant).
    pub namespace: Option<&'a str>,
}

/// Builds the primary key bytes for a request matched to `rule`.
pub fn primary(rule: &Rule, input: &KeyInput<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + input.view.path.len());
    push(&mut out, KEY_VERSION);
    push(&mut out, SCHEME.as_bytes());
    push_lowercase(&mut out, input.host.as_bytes());
    // HEAD is answered from GET entries (pingora turns HEAD into GET upstream).
    let method = if input.method == http::Method::HEAD {
        http::Method::GET.as_str()
    } else {
        input.method.as_str()
    };
    push(&mut out, method.as_bytes());
    push(&mut out, rule.name.as_bytes());
    if rule.key_path {
        push(&mut out, input.view.path.as_bytes());
    }
    match input.namespace {
        Some(ns) => {
            out.push(1);
            push(&mut out, ns.as_bytes());
        }
        None => out.push(0),
    }
    if let Some(ignore) = &rule.body_key {
        match input.view.body {
            Some(body) => {
                let mut body = body.clone();
                for pointer in ignore {
                    remove_pointer(&mut body, pointer);
                }
                out.push(1);
                push(&mut out, canonical(&body).as_bytes());
            }
            None => out.push(0),
        }
    }
    if rule.is_default {
        push(&mut out, input.view.query.unwrap_or("").as_bytes());
    } else {
        for field in &rule.vary {
            match field.value(&input.view) {
                Some(v) => {
                    out.push(1);
                    push(&mut out, v.as_bytes());
                }
                None => out.push(0),
            }
        }
    }
    out
}

/// The 128-bit hash a key is stored under: BLAKE3 (collision-resistant, so keys cannot be forged
/// to collide, and the same on every instance of a fleet).
pub fn hash(primary: &[u8]) -> HashBinary {
    let full = blake3::hash(primary);
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_bytes()[..16]);
    out
}

/// The pingora cache key for a request matched to `rule`.
pub fn cache_key(rule: &Rule, input: &KeyInput<'_>) -> CacheKey {
    let primary = primary(rule, input);
    let hash = hash(&primary);
    let mut key = CacheKey::new(primary, "");
    key.set_primary_bin_override(hash);
    key
}

/// Identity of a stored URI (scheme, host, path), shared by all its variants. Used to find every
/// variant of a URI, e.g. to invalidate it after a successful unsafe request (RFC 9111 §4.4).
pub fn uri_id(host: &str, path: &str) -> u64 {
    static STATE: ahash::RandomState = ahash::RandomState::with_seeds(
        0x6169_736c_6531,
        0x7572_6900,
        0x0bad_5eed,
        0x1234_5678_9abc_def0,
    );
    let mut lower_host = [0u8; 256];
    let host = host.as_bytes();
    let host: &[u8] = if host.len() <= lower_host.len() {
        for (d, s) in lower_host.iter_mut().zip(host) {
            *d = s.to_ascii_lowercase();
        }
        &lower_host[..host.len()]
    } else {
        host
    };
    STATE.hash_one((SCHEME.as_bytes(), host, path.as_bytes()))
}

fn push(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn push_lowercase(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend(bytes.iter().map(u8::to_ascii_lowercase));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context, RuleSet};
    use http::HeaderMap;
    use std::path::Path;

    fn rules() -> RuleSet {
        let ups = vec!["api".to_string()];
        let ctx = Context {
            upstreams: &ups,
            default_upstream: Some(0),
            encryption: false,
        };
        compile(
            &[(
                Path::new("r.toml"),
                r#"
[tables.market]
map = { "new york" = "nyc", brooklyn = "nyc" }
fallback = "state"
[[rule]]
name = "search"
match = { path = "/api/vendors/search" }
vary = ["query.location", "query.type", "header.x-tenant"]
normalize = { "query.location" = ["trim", "market"] }
[[rule]]
name = "timeline"
match = { path = "/api/weddings/:id/timeline" }
vary = ["path.id"]
normalize = { "path.id" = "lowercase" }
[[rule]]
name = "items"
match = { path = "/items/:id" }
"#,
            )],
            &ctx,
        )
        .unwrap()
    }

    fn key(
        set: &RuleSet,
        method: &str,
        host: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let uri: http::Uri = uri.parse().unwrap();
        let method: http::Method = method.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = set.find(&method, host, uri.path()).unwrap();
        let input = KeyInput {
            host,
            method: &method,
            view: RequestView {
                path: uri.path(),
                query: uri.query(),
                headers: &h,
                params: &m.params,
                body: None,
            },
            namespace: None,
        };
        primary(m.rule, &input)
    }

    #[test]
    fn unkeyed_query_parameters_are_ignored() {
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=nyc&type=venue",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?type=venue&utm_source=mail&location=nyc",
            &[],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn normalized_values_share_a_key() {
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=New%20York",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=%20brooklyn",
            &[],
        );
        let c = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=Austin,%20TX",
            &[],
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_component_separates() {
        let s = rules();
        let base = key(&s, "GET", "h", "/api/vendors/search?location=nyc", &[]);
        assert_ne!(
            base,
            key(&s, "GET", "other", "/api/vendors/search?location=nyc", &[]),
            "host"
        );
        assert_ne!(
            base,
            key(&s, "GET", "h", "/api/vendors/search?location=sf", &[]),
            "vary value"
        );
        assert_ne!(
            base,
            key(
                &s,
                "GET",
                "h",
                "/api/vendors/search?location=nyc",
                &[("x-tenant", "a")]
            ),
            "header"
        );
        assert_ne!(
            base,
            key(&s, "GET", "h", "/api/vendors/search", &[]),
            "absent vs present"
        );
        assert_eq!(
            base,
            key(&s, "HEAD", "h", "/api/vendors/search?location=nyc", &[]),
            "HEAD reads GET entries"
        );
        assert_eq!(
            base,
            key(&s, "GET", "H", "/api/vendors/search?location=nyc", &[]),
            "host is case-insensitive"
        );
        // Absent and empty differ.
        assert_ne!(
            key(&s, "GET", "h", "/api/vendors/search?type=", &[]),
            key(&s, "GET", "h", "/api/vendors/search", &[])
        );
        assert_ne!(
            key(&s, "GET", "h", "/api/weddings/1/timeline", &[]),
            key(&s, "GET", "h", "/api/weddings/2/timeline", &[])
        );
    }

    #[test]
    fn path_is_keyed_unless_vary_determines_it() {
        let s = rules();
        // Every parameter is varied (and normalized): the normalized value decides.
        assert_eq!(
            key(&s, "GET", "h", "/api/weddings/W-1/timeline", &[]),
            key(&s, "GET", "h", "/api/weddings/w-1/timeline", &[])
        );
        // A parameter not in vary: the raw path still separates entries.
        assert_ne!(
            key(&s, "GET", "h", "/items/1", &[]),
            key(&s, "GET", "h", "/items/2", &[])
        );
    }

    #[test]
    fn framing_is_unambiguous() {
        // Values that would collide if concatenated without lengths.
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=ab&type=c",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=a&type=bc",
            &[],
        );
        assert_ne!(a, b);
    }

    #[test]
    fn default_route_keys_on_the_whole_query() {
        let s = rules();
        assert_ne!(
            key(&s, "GET", "h", "/other?a=1", &[]),
            key(&s, "GET", "h", "/other?a=2", &[])
        );
        assert_eq!(
            key(&s, "GET", "h", "/other?a=1", &[]),
            key(&s, "GET", "h", "/other?a=1", &[])
        );
    }

    #[test]
    fn uri_ids() {
        assert_eq!(uri_id("H", "/a"), uri_id("h", "/a"));
        assert_ne!(uri_id("h", "/a"), uri_id("h", "/b"));
        assert_ne!(uri_id("h", "/a"), uri_id("g", "/a"));
    }
}
