//! Admission: which rule serves a request, and does it use the cache, on what terms?
//!
//! The gateway (`proxy`) and `aisle replay` both call these functions, so a replay's
//! prediction is made by the very code that serves and the two cannot drift apart. The steps
//! follow the request:
//!
//! 1. [`route`]: the host as keyed, the matched rule with its path parameters, the URI identity.
//! 2. [`body_plan`]: for rules that key on the JSON body, whether to read it and how much; what
//!    cannot be keyed (not JSON, too large, length unknown) is refused before reading.
//! 3. [`parse_body`]: what counts as a keyable body.
//! 4. [`admit`]: the rule's `cache` switch, the method, the body, the request's directives, and
//!    the per-request lifetime (`Aisle-Cache-TTL`) and key namespace (`Aisle-Cache-Namespace`),
//!    giving either a [`Bypass`] (its `Cache-Status` detail) or the [`Terms`] of caching.
//! 5. [`cache_key`]: the key, built by [`crate::key`] from the route and terms.
//!
//! Reading the body itself is the caller's job (the proxy reads the socket, replay the trace);
//! everything decided about it is decided here.

use crate::key::{self, KeyInput};
use crate::policy::RequestDirectives;
use crate::rules::path::PathParams;
use crate::rules::source::RequestView;
use crate::rules::{Rule, RuleSet};
use http::{HeaderMap, Method};
use pingora::cache::CacheKey;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body read to build a key: pingora replays at most this much of a body it has
/// already read (its retry buffer) when it forwards the request upstream.
pub const MAX_KEYED_BODY: usize = 64 * 1024;

/// The rule a request matched, and what the key and invalidation need from its head.
#[derive(Debug, Clone)]
pub struct Route {
    pub rule: Arc<Rule>,
    pub params: PathParams,
    /// [`key::uri_id`] of the request's host and path.
    pub uri: u64,
}

/// The host rules match and keys contain: the `Host` header (else the request target's
/// authority, `uri_host`) without its port, so instances of a fleet listening on different ports
/// share keys.
pub fn host<'a>(headers: &'a HeaderMap, uri_host: Option<&'a str>) -> &'a str {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(uri_host)
        .unwrap_or("");
    strip_port(host)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: keep the brackets, drop what follows them.
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Step 1: the matching rule (or the default route). `None`: nothing can serve the request.
pub fn route(rules: &RuleSet, method: &Method, host: &str, path: &str) -> Option<Route> {
    let m = rules.find(method, host, path)?;
    Some(Route {
        rule: m.rule.clone(),
        params: m.params,
        uri: key::uri_id(host, path),
    })
}

/// Why a request does not use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bypass {
    /// The rule says `cache = false`.
    RuleOff,
    /// The method is not cached by this rule (GET and HEAD are; POST only on body-keyed rules).
    Method,
    /// The request said `Cache-Control: no-store`.
    NoStore,
    /// A body-keyed rule, and the body is not JSON (or not declared as JSON).
    NotJson,
    /// A body-keyed rule, and the body is larger than [`MAX_KEYED_BODY`].
    BodyTooLarge,
    /// A body-keyed rule, and the body's length is not known before reading it (chunked).
    BodyLengthUnknown,
}

impl Bypass {
    /// The `Cache-Status` `detail` this bypass is reported with, if any.
    pub fn detail(self) -> Option<&'static str> {
        match self {
            Bypass::RuleOff | Bypass::Method | Bypass::NoStore => None,
            Bypass::NotJson => Some("not-json"),
            Bypass::BodyTooLarge => Some("body-too-large"),
            Bypass::BodyLengthUnknown => Some("body-length-unknown"),
        }
    }

    /// A sentence for people (the replay report).
    pub fn describe(self, rule: &str, method: &Method) -> String {
        match self {
            Bypass::RuleOff => format!("rule {rule:?}: cache = false"),
            Bypass::Method => format!("rule {rule:?}: method {method} is not cached"),
            Bypass::NoStore => "request Cache-Control: no-store".into(),
            Bypass::NotJson => format!("rule {rule:?}: no JSON body to key on"),
            Bypass::BodyTooLarge => {
                format!("rule {rule:?}: body larger than {MAX_KEYED_BODY} bytes")
            }
            Bypass::BodyLengthUnknown => {
                format!("rule {rule:?}: body of unknown length (chunked)")
            }
        }
    }
}

fn method_cached(rule: &Rule, method: &Method) -> bool {
    match *method {
        Method::GET | Method::HEAD => true,
        Method::POST => rule.needs_body,
        _ => false,
    }
}

/// Step 2: whether the body must be read to build the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// The rule does not key on the body (or the request bypasses anyway): do not read it.
    Skip,
    /// Read exactly this many bytes (the declared `Content-Length`), then [`parse_body`].
    Read(usize),
    /// The body cannot be keyed: bypass without reading it.
    Refuse(Bypass),
}

/// Step 2: decides from the head alone whether the body is read for the key.
pub fn body_plan(rule: &Rule, method: &Method, headers: &HeaderMap) -> BodyPlan {
    if !rule.needs_body || !rule.cache || !method_cached(rule, method) {
        return BodyPlan::Skip;
    }
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    if !json {
        return BodyPlan::Refuse(Bypass::NotJson);
    }
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) if n <= MAX_KEYED_BODY => BodyPlan::Read(n),
        Some(_) => BodyPlan::Refuse(Bypass::BodyTooLarge),
        // Without a length the body might outgrow what can be replayed upstream.
        None => BodyPlan::Refuse(Bypass::BodyLengthUnknown),
    }
}

/// Step 3: a body read under [`BodyPlan::Read`], as the JSON document the key is built from.
pub fn parse_body(bytes: &[u8]) -> Result<serde_json::Value, Bypass> {
    serde_json::from_slice(bytes).map_err(|_| Bypass::NotJson)
}

/// The terms on which a request uses the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terms {
    /// The request's own cache directives (RFC 9111 §5.2.1).
    pub directives: RequestDirectives,
    /// `Aisle-Cache-TTL`: a shorter lifetime for the entry this request stores.
    pub ttl: Option<Duration>,
    /// `Aisle-Cache-Namespace`: a separate key space (e.g. per tenant). Owned, so the proxy can
    /// keep the terms across phases; it allocates only when the header is sent.
    pub namespace: Option<Box<str>>,
}

/// What [`admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Bypass(Bypass),
    Cache(Terms),
}

/// Step 4: does the request use the cache? `body` is what steps 2 and 3 gave for body-keyed
/// rules: `Ok(())` when a JSON body is at hand, `Err(reason)` when it could not be keyed
/// (ignored for rules that do not key on the body).
pub fn admit(
    rule: &Rule,
    method: &Method,
    headers: &HeaderMap,
    body: Result<(), Bypass>,
) -> Admission {
    if !rule.cache {
        return Admission::Bypass(Bypass::RuleOff);
    }
    if !method_cached(rule, method) {
        return Admission::Bypass(Bypass::Method);
    }
    if rule.needs_body {
        if let Err(reason) = body {
            return Admission::Bypass(reason);
        }
    }
    let directives = RequestDirectives::parse(headers);
    if directives.no_store {
        return Admission::Bypass(Bypass::NoStore);
    }
    Admission::Cache(Terms {
        directives,
        ttl: request_ttl(headers),
        namespace: headers
            .get("aisle-cache-namespace")
            .and_then(|v| v.to_str().ok())
            .map(Box::from),
    })
}

/// `Aisle-Cache-TTL: 5m` (or a number of seconds): a shorter lifetime for this entry.
fn request_ttl(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("aisle-cache-ttl")?.to_str().ok()?;
    crate::units::parse_duration(v)
        .ok()
        .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
}

/// The parts of a request a key is built from, besides the route and terms.
pub struct KeyParts<'a> {
    pub method: &'a Method,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: Option<&'a serde_json::Value>,
}

impl<'a> KeyParts<'a> {
    /// What rule sources (vary fields, tag templates) read from this request.
    pub fn view(&self, params: &'a PathParams) -> RequestView<'a> {
        RequestView {
            path: self.path,
            query: self.query,
            headers: self.headers,
            params,
            body: self.body,
        }
    }
}

/// Step 5: the cache key of an admitted request.
pub fn cache_key(route: &Route, terms: &Terms, parts: &KeyParts<'_>) -> CacheKey {
    let input = KeyInput {
        host: parts.host,
        method: parts.method,
        view: parts.view(&route.params),
        namespace: terms.namespace.as_deref(),
    };
    key::cache_key(&route.rule, &input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context};
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
[[rule]]
name = "ai"
match = { method = "POST", path = "/ai" }
vary = ["body./q"]
[[rule]]
name = "off"
match = { path = "/off" }
cache = false
[[rule]]
name = "get"
match = { path = "/get" }
"#,
            )],
            &ctx,
        )
        .unwrap()
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

    fn rule(set: &RuleSet, path: &str, method: &Method) -> Arc<Rule> {
        route(set, method, "h", path).unwrap().rule
    }

    #[test]
    fn hosts_without_ports() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("["), "[");
    }

    #[test]
    fn a_json_body_needs_its_content_type_and_length() {
        let set = rules();
        let ai = rule(&set, "/ai", &Method::POST);
        let plan = |h: &[(&str, &str)]| body_plan(&ai, &Method::POST, &headers(h));
        assert_eq!(
            plan(&[("content-length", "2")]),
            BodyPlan::Refuse(Bypass::NotJson)
        );
        assert_eq!(
            plan(&[("content-type", "application/json")]),
            BodyPlan::Refuse(Bypass::BodyLengthUnknown)
        );
        assert_eq!(
            plan(&[
                ("content-type", "application/json"),
                ("content-length", "70000")
            ]),
            BodyPlan::Refuse(Bypass::BodyTooLarge)
        );
        assert_eq!(
            plan(&[
                ("content-type", "application/json"),
                ("content-length", "7")
            ]),
            BodyPlan::Read(7)
        );
        assert_eq!(parse_body(b"{\"q\":1}").unwrap()["q"], 1);
        assert_eq!(parse_body(b"{nope"), Err(Bypass::NotJson));
        // A rule that does not key on the body never reads it.
        let get = rule(&set, "/get", &Method::GET);
        assert_eq!(body_plan(&get, &Method::GET, &headers(&[])), BodyPlan::Skip);
    }

    #[test]
    fn admission_order_and_terms() {
        let set = rules();
        let none = headers(&[]);
        let off = rule(&set, "/off", &Method::GET);
        assert_eq!(
            admit(&off, &Method::GET, &none, Ok(())),
            Admission::Bypass(Bypass::RuleOff)
        );
        let get = rule(&set, "/get", &Method::GET);
        assert_eq!(
            admit(&get, &Method::PUT, &none, Ok(())),
            Admission::Bypass(Bypass::Method)
        );
        let ai = rule(&set, "/ai", &Method::POST);
        assert_eq!(
            admit(&ai, &Method::POST, &none, Err(Bypass::BodyTooLarge)),
            Admission::Bypass(Bypass::BodyTooLarge)
        );
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(
            admit(&get, &Method::GET, &no_store, Ok(())),
            Admission::Bypass(Bypass::NoStore)
        );
        let h = headers(&[("aisle-cache-ttl", "90"), ("aisle-cache-namespace", "t1")]);
        let Admission::Cache(terms) = admit(&get, &Method::HEAD, &h, Ok(())) else {
            panic!("HEAD of a cached rule is admitted");
        };
        assert_eq!(terms.ttl, Some(Duration::from_secs(90)));
        assert_eq!(terms.namespace.as_deref(), Some("t1"));
        assert_eq!(Bypass::NotJson.detail(), Some("not-json"));
        assert_eq!(Bypass::RuleOff.detail(), None);
    }
}
