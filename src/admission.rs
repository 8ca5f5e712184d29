//! Admission: which rule serves a request, and does it use the cache, on what terms?
//!
//! The gateway (`proxy`) and `aisle replay` both call these functions, so a replay's
//! prediction is made by the very code that serves and the two cannot drift apart. The steps
//! follow the request:
//!
//! 0. [`host`]: the request's host, checked and normalized ([`key::normalize_host`]); a
//!    malformed `Host` is answered 400 by the caller and goes nowhere.
//! 1. [`route`]: the matched rule with its path parameters, the URI identity.
//! 2. [`body_plan`]: for rules that key on the JSON body, whether to read it and how much; what
//!    cannot be keyed (not JSON, too large, length unknown) is refused before reading.
//! 3. [`parse_body`]: what counts as a keyable body (JSON, no key repeated in an object, no
//!    integer beyond 64 bits: [`crate::rules::json::check`]).
//! 4. [`admit`]: the rule's `cache` switch, the method, a body on a GET the key ignores, the
//!    body, the request's directives (unless the rule ignores a client's revalidation), and, for
//!    trusted clients or rules with `client_controls`, the per-request lifetime
//!    (`Aisle-Cache-TTL`) and key namespace (`Aisle-Cache-Namespace`), giving either a
//!    [`Bypass`] (its `Cache-Status` detail) or the [`Terms`] of caching.
//!    Then [`Admission::unless_unkeyable`]: a request whose keyed values the origin could read
//!    differently from the key ([`keyable`]: repeated, or not UTF-8) bypasses after all.
//! 5. [`cache_key`]: the key, built by [`crate::key`] from the route and terms.
//!    [`keyed_hash`] makes the keyability check of step 4 and gives the key's hash in one
//!    reading of the keyed values (the fresh-hit path, which wants the hash of every plain
//!    request): the same checks in the same order, through the same reader.
//!
//! Reading the body itself is the caller's job (the proxy reads the socket, replay the trace);
//! everything decided about it is decided here.

use crate::key::{self, BadHost, KeyInput};
use crate::policy::RequestDirectives;
use crate::rules::json::{self, UnkeyableBody};
use crate::rules::path::PathParams;
use crate::rules::source::{RequestView, Unkeyable};
use crate::rules::{Authorization, ClientRevalidation, Rule, RuleSet};
use crate::trust::Client;
use http::{HeaderMap, Method};
use pingora::cache::key::HashBinary;
use pingora::cache::CacheKey;
use std::borrow::Cow;
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

/// Step 0: the host rules match, keys and URI identities contain, and the upstream receives:
/// the `Host` header (else the request target's authority, `uri_authority`, as HTTP/2 sends it)
/// normalized by [`key::normalize_host`] (lowercase, no trailing dot, no port). The port is
/// checked, then dropped: instances of a fleet listening on different ports share keys, and the
/// gateway forwards this same value as `Host`, so an origin never answers for a port (or a
/// spelling) the key does not name. An error is a `400 Bad Request`.
pub fn host<'a>(
    headers: &'a HeaderMap,
    uri_authority: Option<&'a str>,
) -> Result<Cow<'a, str>, BadHost> {
    host_from(
        headers.get(http::header::HOST).map(|h| h.as_bytes()),
        uri_authority,
    )
}

/// [`host`] from the `Host` field's bytes (`None`: no `Host`), for a caller that has looked
/// the field up already.
pub fn host_from<'a>(
    field: Option<&'a [u8]>,
    uri_authority: Option<&'a str>,
) -> Result<Cow<'a, str>, BadHost> {
    let text = match field {
        Some(h) => h,
        None => uri_authority.ok_or(BadHost::Missing)?.as_bytes(),
    };
    key::normalize_host(text)
}

/// Step 1: the matching rule (or the default route). `None`: nothing can serve the request.
/// `host` comes from [`host`]; `path` is normalized ([`key::normalize_path`]) by the caller, once,
/// since the path parameters are positions in it and the key reads them from the same text (a
/// target that is not UTF-8 cannot be rewritten; it reaches here as U+FFFD and bypasses).
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
    /// A keyed query parameter or cookie (or an isolated credential header) is given more than
    /// once: origins differ on which one counts, so no key can be right for all of them.
    RepeatedParam,
    /// A keyed value (or the request target) is not UTF-8 once percent-decoded: decoding it
    /// lossily would give different requests one key.
    BadEncoding,
    /// A body-keyed rule, and a key is repeated within one JSON object: the key would take one
    /// value, the origin perhaps the other.
    DuplicateKey,
    /// A body-keyed rule, and an integer in the body is beyond 64 bits (it cannot be keyed
    /// exactly).
    IntegerTooLarge,
    /// A GET or HEAD with a body, on a rule that does not key on the body: the origin may
    /// answer by the body the key ignores.
    BodyOnGet,
}

impl Bypass {
    /// The `Cache-Status` `detail` this bypass is reported with, if any.
    pub fn detail(self) -> Option<&'static str> {
        match self {
            Bypass::RuleOff | Bypass::Method | Bypass::NoStore => None,
            Bypass::NotJson => Some("not-json"),
            Bypass::BodyTooLarge => Some("body-too-large"),
            Bypass::BodyLengthUnknown => Some("body-length-unknown"),
            Bypass::RepeatedParam => Some("repeated-param"),
            Bypass::BadEncoding => Some("bad-encoding"),
            Bypass::DuplicateKey => Some("duplicate-key"),
            Bypass::IntegerTooLarge => Some("integer-too-large"),
            Bypass::BodyOnGet => Some("body-on-get"),
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
            Bypass::RepeatedParam => {
                format!("rule {rule:?}: a keyed query parameter, cookie or credential is repeated")
            }
            Bypass::BadEncoding => {
                format!("rule {rule:?}: a keyed value is not UTF-8 once decoded")
            }
            Bypass::DuplicateKey => format!("rule {rule:?}: a JSON key repeated in one object"),
            Bypass::IntegerTooLarge => {
                format!("rule {rule:?}: a JSON integer beyond 64 bits")
            }
            Bypass::BodyOnGet => format!("rule {rule:?}: {method} with a body"),
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
    let value = serde_json::from_slice(bytes).map_err(|_| Bypass::NotJson)?;
    json::check(bytes).map_err(|e| match e {
        UnkeyableBody::DuplicateKey => Bypass::DuplicateKey,
        UnkeyableBody::LargeInteger => Bypass::IntegerTooLarge,
    })?;
    Ok(value)
}

/// Whether a request carries a body (`Content-Length` other than 0, or `Transfer-Encoding`).
fn carries_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().map_or(true, |v| v.trim() != "0"))
}

/// The terms on which a request uses the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terms {
    /// The request's own cache directives (RFC 9111 §5.2.1).
    pub directives: RequestDirectives,
    /// `Aisle-Cache-TTL`: a shorter lifetime for the entry this request stores (only from a
    /// trusted client, or on a rule with `client_controls`).
    pub ttl: Option<Duration>,
    /// `Aisle-Cache-Namespace`: a separate key space (e.g. per tenant), on the same terms.
    /// Owned, so the proxy can keep the terms across phases; it allocates only when honoured.
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
/// (ignored for rules that do not key on the body). `client` says whether the request's
/// `Aisle-*` control headers may count ([`crate::trust`]).
pub fn admit(
    rule: &Rule,
    method: &Method,
    headers: &HeaderMap,
    body: Result<(), Bypass>,
    client: Client,
) -> Admission {
    if !rule.cache {
        return Admission::Bypass(Bypass::RuleOff);
    }
    if !method_cached(rule, method) {
        return Admission::Bypass(Bypass::Method);
    }
    if !rule.needs_body && matches!(*method, Method::GET | Method::HEAD) && carries_body(headers) {
        // Forwarded with its body, never stored or answered from the cache.
        return Admission::Bypass(Bypass::BodyOnGet);
    }
    if rule.needs_body {
        if let Err(reason) = body {
            return Admission::Bypass(reason);
        }
    }
    let mut directives = RequestDirectives::parse(headers);
    if directives.no_store {
        return Admission::Bypass(Bypass::NoStore);
    }
    if rule.authorization.handles_authorization() {
        // `authorization = "isolate"` (the credential is in the key) or `"share"` (the upstream
        // sets its own): RFC 9111 §3.5 no longer keeps the answer from this cache.
        directives.authorization = false;
    }
    if rule.client_revalidation == ClientRevalidation::Ignore {
        // A shared entry is not refetched because one client asked (as CDNs do).
        directives.no_cache = false;
        directives.max_age = None;
    }
    let controls = client == Client::Trusted || rule.client_controls;
    Admission::Cache(Terms {
        directives,
        ttl: controls.then(|| request_ttl(headers)).flatten(),
        namespace: controls
            .then(|| headers.get("aisle-cache-namespace"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(Box::from),
    })
}

impl Admission {
    /// Step 4, last: an admitted request whose keyed values are not [`keyable`] bypasses after
    /// all (its reason is the `Cache-Status` detail).
    pub fn unless_unkeyable(self, rule: &Rule, view: &RequestView<'_>) -> Admission {
        match self {
            Admission::Cache(_) => match keyable(rule, view) {
                Ok(()) => self,
                Err(reason) => Admission::Bypass(reason),
            },
            bypass => bypass,
        }
    }
}

/// Whether the key can name what the origin will answer for: every keyed value reads one way
/// only ([`crate::rules::source::Source::keyed`]), and the target was UTF-8 (a target that is
/// not reaches the rules as U+FFFD, which would fold different targets into one key).
pub fn keyable(rule: &Rule, view: &RequestView<'_>) -> Result<(), Bypass> {
    target_keyable(rule, view)?;
    for field in &rule.vary {
        field.source.keyed(view).map_err(unkeyable)?;
    }
    Ok(())
}

/// The part of [`keyable`] that is not a keyed value: the target is UTF-8, and an isolated
/// credential is given once.
fn target_keyable(rule: &Rule, view: &RequestView<'_>) -> Result<(), Bypass> {
    // An ASCII text (nearly every target) holds no U+FFFD: checked a word at a time first.
    let lossy = |s: &str| !s.is_ascii() && s.contains(char::REPLACEMENT_CHARACTER);
    if lossy(view.path) || view.query.is_some_and(lossy) {
        return Err(Bypass::BadEncoding);
    }
    if let Authorization::Isolate { header, .. } = &rule.authorization {
        // Two credentials: which one the origin checks is its choice, so no key is right.
        if view.headers.get_all(header).iter().nth(1).is_some() {
            return Err(Bypass::RepeatedParam);
        }
    }
    Ok(())
}

/// The bypass a keyed value that cannot be keyed causes.
fn unkeyable(e: Unkeyable) -> Bypass {
    match e {
        Unkeyable::Repeated => Bypass::RepeatedParam,
        Unkeyable::BadEncoding => Bypass::BadEncoding,
    }
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
    key::cache_key(&route.rule, &key_input(route, terms, parts))
}

/// [`cache_key`] for a request whose hash [`keyed_hash`] gave: the same key, not hashed again
/// (issue 16: the second BLAKE3 hash of every miss and pass request).
pub fn cache_key_hashed(
    route: &Route,
    terms: &Terms,
    parts: &KeyParts<'_>,
    hash: HashBinary,
) -> CacheKey {
    key::cache_key_hashed(&route.rule, &key_input(route, terms, parts), hash)
}

/// [`Admission::unless_unkeyable`] and the key's hash in one reading of the keyed values, for
/// a caller that wants the hash of every admitted request (the fresh-hit path): `Err` is the
/// bypass [`keyable`] would give, found by the same checks in the same order (the target, then
/// each keyed value through [`crate::rules::source::Source::keyed`], which [`key::checked_hash`]
/// reads them with); `Ok` is the hash [`cache_key`]'s key is stored under before any `Vary`
/// variance, what a fresh hit looks up, computed without building the key (no allocation).
pub fn keyed_hash(
    route: &Route,
    terms: &Terms,
    parts: &KeyParts<'_>,
) -> Result<HashBinary, Bypass> {
    let input = key_input(route, terms, parts);
    target_keyable(&route.rule, &input.view)?;
    let (hash, keyed) = key::checked_hash(&route.rule, &input);
    keyed.map_err(unkeyable)?;
    Ok(hash)
}

fn key_input<'a>(route: &'a Route, terms: &'a Terms, parts: &'a KeyParts<'a>) -> KeyInput<'a> {
    KeyInput {
        host: parts.host,
        method: parts.method,
        view: parts.view(&route.params),
        namespace: terms.namespace.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context};
    use pingora::cache::key::CacheHashKey;
    use std::path::Path;

    fn rules() -> RuleSet {
        let ups = vec!["api".to_string()];
        let ctx = Context::with_upstreams(&ups);
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
[[rule]]
name = "controlled"
match = { path = "/controlled" }
client_controls = true
[[rule]]
name = "shared"
match = { path = "/shared" }
client_revalidation = "ignore"
[[rule]]
name = "get-body"
match = { path = "/search" }
vary = ["body./q"]
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
    fn hosts_are_checked_and_normalized() {
        let host_of = |h: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::HOST,
                http::HeaderValue::from_bytes(h).unwrap(),
            );
            host(&headers, None).map(Cow::into_owned)
        };
        assert_eq!(host_of(b"api.example.com:8080").unwrap(), "api.example.com");
        assert_eq!(host_of(b"API.Example.com").unwrap(), "api.example.com");
        assert_eq!(host_of(b"private.test.").unwrap(), "private.test");
        assert_eq!(host_of(b"private.test.:80").unwrap(), "private.test");
        assert_eq!(host_of(b"[::1]:8080").unwrap(), "[::1]");
        assert_eq!(host_of(b"[0:0::1]").unwrap(), "[::1]");
        assert_eq!(host_of(b"localhost:").unwrap(), "localhost");
        // Malformed: never a key, a rule match or an upstream Host.
        assert_eq!(host_of(b"["), Err(BadHost::Ipv6));
        assert_eq!(host_of(b"[::1"), Err(BadHost::Ipv6));
        assert_eq!(host_of(b"[::1]x"), Err(BadHost::Ipv6));
        assert_eq!(host_of(b"[nope]"), Err(BadHost::Ipv6));
        assert_eq!(host_of(b"localhost:x"), Err(BadHost::Port));
        assert_eq!(host_of(b"localhost:\"><script>"), Err(BadHost::Port));
        assert_eq!(host_of(b"localhost:65536"), Err(BadHost::Port));
        assert_eq!(host_of(b"localhost:0"), Err(BadHost::Port));
        assert_eq!(host_of(b"a<b"), Err(BadHost::Name));
        assert_eq!(host_of(b"a..b"), Err(BadHost::Name));
        assert_eq!(host_of(b"\xc3\xa9.test"), Err(BadHost::Name));
        assert_eq!(host_of(b""), Err(BadHost::Empty));
        assert_eq!(host_of(b"."), Err(BadHost::Empty));
        assert_eq!(host(&HeaderMap::new(), None), Err(BadHost::Missing));
        // HTTP/2: the authority of the target.
        assert_eq!(
            host(&HeaderMap::new(), Some("H.test:443")).unwrap(),
            "h.test"
        );
    }

    #[test]
    fn ambiguous_keyed_values_bypass() {
        let set = compile(
            &[(
                Path::new("r.toml"),
                r#"
[[rule]]
name = "s"
match = { path = "/s/:id" }
vary = ["query.location", "path.id", "header.x-tenant", "cookie.session"]
"#,
            )],
            &Context::with_upstreams(&["api".to_string()]),
        )
        .unwrap();
        let check = |path: &str, query: &str, h: &[(&str, &[u8])]| {
            let mut headers = HeaderMap::new();
            for (k, v) in h {
                headers.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let m = set.find(&Method::GET, "h", path).unwrap();
            let view = RequestView {
                path,
                query: Some(query),
                headers: &headers,
                params: &m.params,
                body: None,
            };
            let admitted = admit(m.rule, &Method::GET, &headers, Ok(()), Client::Untrusted);
            let reason = match admitted.unless_unkeyable(m.rule, &view) {
                Admission::Cache(_) => None,
                Admission::Bypass(reason) => Some(reason),
            };
            // The fresh-hit path's one reading of the values gives the same bypass, and when
            // it gives none, the key's hash.
            let Admission::Cache(terms) =
                admit(m.rule, &Method::GET, &headers, Ok(()), Client::Untrusted)
            else {
                panic!("admitted before the keyability check");
            };
            let r = route(&set, &Method::GET, "h", path).unwrap();
            let parts = KeyParts {
                method: &Method::GET,
                host: "h",
                path,
                query: Some(query),
                headers: &headers,
                body: None,
            };
            match keyed_hash(&r, &terms, &parts) {
                Ok(hash) => {
                    assert_eq!(reason, None, "{path}?{query}");
                    let key = cache_key(&r, &terms, &parts);
                    assert_eq!(hash, key.primary_bin(), "{path}?{query}");
                    // The phases' key, stored under that hash, is the same key.
                    let hashed = cache_key_hashed(&r, &terms, &parts, hash);
                    assert_eq!(hashed.primary_key(), key.primary_key());
                    assert_eq!(hashed.combined_bin(), key.combined_bin());
                }
                Err(bypass) => assert_eq!(Some(bypass), reason, "{path}?{query}"),
            }
            reason
        };
        // The first reason found, in the same order: the target, then the values in `vary` order.
        assert_eq!(
            check("/s/\u{FFFD}", "location=a&location=b", &[]),
            Some(Bypass::BadEncoding)
        );
        assert_eq!(
            check(
                "/s/1",
                "location=%FF",
                &[("cookie", b"session=a; session=b")]
            ),
            Some(Bypass::BadEncoding)
        );
        assert_eq!(
            check("/s/1", "location=a&location=b", &[("x-tenant", b"\xff")]),
            Some(Bypass::RepeatedParam)
        );
        assert_eq!(check("/s/1", "location=Paris", &[]), None);
        assert_eq!(
            check("/s/1", "location=Paris&location=Boston", &[]),
            Some(Bypass::RepeatedParam)
        );
        assert_eq!(check("/s/1", "location=Paris,Boston", &[]), None);
        // An unkeyed parameter may repeat.
        assert_eq!(check("/s/1", "utm=a&utm=b", &[]), None);
        assert_eq!(
            check("/s/1", "location=%FF", &[]),
            Some(Bypass::BadEncoding)
        );
        assert_eq!(check("/s/%FE", "", &[]), Some(Bypass::BadEncoding));
        assert_eq!(check("/s/\u{FFFD}", "", &[]), Some(Bypass::BadEncoding));
        assert_eq!(
            check("/s/1", "", &[("x-tenant", b"\xff")]),
            Some(Bypass::BadEncoding)
        );
        assert_eq!(
            check("/s/1", "", &[("x-tenant", b"a"), ("x-tenant", b"b")]),
            None
        );
        assert_eq!(
            check("/s/1", "", &[("cookie", b"session=a; session=b")]),
            Some(Bypass::RepeatedParam)
        );
        assert_eq!(
            check(
                "/s/1",
                "",
                &[("cookie", b"session=a"), ("cookie", b"session=b")]
            ),
            Some(Bypass::RepeatedParam)
        );
        assert_eq!(Bypass::RepeatedParam.detail(), Some("repeated-param"));
        assert_eq!(Bypass::BadEncoding.detail(), Some("bad-encoding"));
    }

    /// Issue 13: under `authorization = "isolate"` a request's `Authorization` no longer rules
    /// the cache out (it is in the key); two of them bypass; an isolated `x-api-key` leaves
    /// `Authorization` to RFC 9111 §3.5.
    #[test]
    fn isolated_credentials_are_admitted() {
        let set = compile(
            &[(
                Path::new("r.toml"),
                r#"
[[rule]]
name = "chat"
match = { method = "POST", path = "/chat" }
vary = ["body./q"]
authorization = "isolate"
[[rule]]
name = "messages"
match = { method = "POST", path = "/messages" }
vary = ["body./q"]
authorization = "isolate"
credential_header = "x-api-key"
"#,
            )],
            &Context::with_upstreams(&["api".to_string()]),
        )
        .unwrap();
        let check = |path: &str, h: &[(&str, &str)]| {
            let headers = headers(h);
            let m = set.find(&Method::POST, "h", path).unwrap();
            let view = RequestView {
                path,
                query: None,
                headers: &headers,
                params: &m.params,
                body: None,
            };
            admit(m.rule, &Method::POST, &headers, Ok(()), Client::Untrusted)
                .unless_unkeyable(m.rule, &view)
        };
        let Admission::Cache(terms) = check("/chat", &[("authorization", "Bearer a")]) else {
            panic!("an isolated credential is cached");
        };
        assert!(!terms.directives.authorization);
        assert_eq!(
            check(
                "/chat",
                &[("authorization", "Bearer a"), ("authorization", "Bearer b")]
            ),
            Admission::Bypass(Bypass::RepeatedParam)
        );
        let Admission::Cache(terms) =
            check("/messages", &[("x-api-key", "a"), ("authorization", "b")])
        else {
            panic!("cached");
        };
        assert!(terms.directives.authorization, "left to RFC 9111 §3.5");
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
            admit(&off, &Method::GET, &none, Ok(()), Client::Untrusted),
            Admission::Bypass(Bypass::RuleOff)
        );
        let get = rule(&set, "/get", &Method::GET);
        assert_eq!(
            admit(&get, &Method::PUT, &none, Ok(()), Client::Untrusted),
            Admission::Bypass(Bypass::Method)
        );
        let ai = rule(&set, "/ai", &Method::POST);
        assert_eq!(
            admit(
                &ai,
                &Method::POST,
                &none,
                Err(Bypass::BodyTooLarge),
                Client::Untrusted
            ),
            Admission::Bypass(Bypass::BodyTooLarge)
        );
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(
            admit(&get, &Method::GET, &no_store, Ok(()), Client::Untrusted),
            Admission::Bypass(Bypass::NoStore)
        );
        let h = headers(&[("aisle-cache-ttl", "90"), ("aisle-cache-namespace", "t1")]);
        let Admission::Cache(terms) = admit(&get, &Method::HEAD, &h, Ok(()), Client::Trusted)
        else {
            panic!("HEAD of a cached rule is admitted");
        };
        assert_eq!(terms.ttl, Some(Duration::from_secs(90)));
        assert_eq!(terms.namespace.as_deref(), Some("t1"));
        assert_eq!(Bypass::NotJson.detail(), Some("not-json"));
        assert_eq!(Bypass::RuleOff.detail(), None);
    }

    #[test]
    fn json_bodies_with_repeated_keys_or_huge_integers_are_not_keyed() {
        assert_eq!(
            parse_body(br#"{"messages":["A"],"messages":["B"]}"#),
            Err(Bypass::DuplicateKey)
        );
        assert_eq!(
            parse_body(br#"{"m":[{"role":"user","role":"system"}]}"#),
            Err(Bypass::DuplicateKey)
        );
        assert_eq!(
            parse_body(br#"{"seed":18446744073709551616}"#),
            Err(Bypass::IntegerTooLarge)
        );
        assert_eq!(parse_body(br#"{"m":"A","m""#), Err(Bypass::NotJson));
        assert_eq!(Bypass::DuplicateKey.detail(), Some("duplicate-key"));
        assert_eq!(Bypass::IntegerTooLarge.detail(), Some("integer-too-large"));
        // Integers past 2^53 are keyed exactly.
        let set = rules();
        let ai = route(&set, &Method::POST, "h", "/ai").unwrap();
        let key = |body: &[u8]| {
            let body = parse_body(body).unwrap();
            let h = headers(&[]);
            let parts = KeyParts {
                method: &Method::POST,
                host: "h",
                path: "/ai",
                query: None,
                headers: &h,
                body: Some(&body),
            };
            use pingora::cache::key::CacheHashKey;
            cache_key(&ai, &Terms::default(), &parts).primary_bin()
        };
        assert_ne!(
            key(br#"{"q":9007199254740993}"#),
            key(br#"{"q":9007199254740992}"#)
        );
        assert_eq!(key(br#"{"q":1.0}"#), key(br#"{"q":1}"#));
    }

    #[test]
    fn a_get_with_a_body_the_key_ignores_bypasses() {
        let set = rules();
        let get = rule(&set, "/get", &Method::GET);
        let admit_get =
            |m: &Method, h: &[(&str, &str)]| admit(&get, m, &headers(h), Ok(()), Client::Untrusted);
        let fat = Admission::Bypass(Bypass::BodyOnGet);
        assert_eq!(admit_get(&Method::GET, &[("content-length", "5")]), fat);
        assert_eq!(admit_get(&Method::HEAD, &[("content-length", "5")]), fat);
        assert_eq!(
            admit_get(&Method::GET, &[("transfer-encoding", "chunked")]),
            fat
        );
        assert_eq!(admit_get(&Method::GET, &[("content-length", "x")]), fat);
        assert!(matches!(
            admit_get(&Method::GET, &[("content-length", "0")]),
            Admission::Cache(_)
        ));
        assert_eq!(Bypass::BodyOnGet.detail(), Some("body-on-get"));
        // A rule that keys on the body keys a GET's body too.
        let keyed = rule(&set, "/search", &Method::GET);
        let h = headers(&[
            ("content-length", "9"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(body_plan(&keyed, &Method::GET, &h), BodyPlan::Read(9));
        assert!(matches!(
            admit(&keyed, &Method::GET, &h, Ok(()), Client::Untrusted),
            Admission::Cache(_)
        ));
    }

    #[test]
    fn control_headers_count_only_from_trusted_clients_or_by_rule() {
        let set = rules();
        let h = headers(&[("aisle-cache-ttl", "0"), ("aisle-cache-namespace", "t2")]);
        let terms = |path: &str, client: Client| {
            let r = rule(&set, path, &Method::GET);
            match admit(&r, &Method::GET, &h, Ok(()), client) {
                Admission::Cache(t) => (t.ttl, t.namespace),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(terms("/get", Client::Untrusted), (None, None));
        let honoured = (Some(Duration::ZERO), Some("t2".into()));
        assert_eq!(terms("/get", Client::Trusted), honoured);
        assert_eq!(terms("/controlled", Client::Untrusted), honoured);
    }

    #[test]
    fn client_revalidation_ignore_keeps_the_shared_entry() {
        let set = rules();
        let directives = |path: &str, h: &[(&str, &str)]| {
            let r = rule(&set, path, &Method::GET);
            match admit(&r, &Method::GET, &headers(h), Ok(()), Client::Trusted) {
                Admission::Cache(t) => t.directives,
                other => panic!("{other:?}"),
            }
        };
        for h in [
            &[("cache-control", "no-cache")][..],
            &[("cache-control", "max-age=0")][..],
            &[("pragma", "no-cache")][..],
        ] {
            assert!(directives("/get", h).any(), "honoured by default: {h:?}");
            assert!(!directives("/shared", h).any(), "ignored: {h:?}");
        }
        // no-store (privacy), only-if-cached and Authorization still count.
        let r = rule(&set, "/shared", &Method::GET);
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(
            admit(&r, &Method::GET, &no_store, Ok(()), Client::Untrusted),
            Admission::Bypass(Bypass::NoStore)
        );
        let d = directives(
            "/shared",
            &[("cache-control", "only-if-cached"), ("authorization", "x")],
        );
        assert!(d.only_if_cached && d.authorization);
    }
}
