//! `aisle replay`: what hit ratio would these rules reach on this traffic?
//!
//! A trace is a JSON-lines file, one request per line:
//!
//! ```json
//! {"timestamp": "2026-05-02T14:00:00.250Z", "method": "POST", "path": "/api/ai/recommendations",
//!  "query": "a=1", "headers": {"host": "api.example.com", "content-type": "application/json"},
//!  "body": {"query": {"type": "venue"}}}
//! ```
//!
//! - `timestamp` (required): an RFC 3339 string, or a number of unix seconds (fractions allowed)
//!   or unix milliseconds; numbers of 10^11 and more are milliseconds (10^11 seconds would be the
//!   year 5138). Lines are replayed in timestamp order (a stable sort, so ties keep file order).
//! - `path` (required, starts with `/`; a `?query` in it is used when `query` is absent).
//! - `method` (default `GET`), `query` (a string, with or without the leading `?`),
//!   `headers` (name to string, or to a list of strings), `body` (the JSON document itself; a
//!   string is taken as the raw body text and parsed as JSON, as the gateway does). Other fields
//!   are ignored, so captured traces with status or latency fields replay as they are.
//!
//! Each request is matched (`RuleSet::find`) and keyed exactly as the gateway keys it
//! (`key::primary`, then `key::hash`, with the host from the `host` header normalized as the gateway
//! normalizes it (no port, lowercase, no trailing dot) or `"replay"`, the path normalized likewise, and the namespace from `aisle-cache-namespace`). A trace has no peer addresses, so
//! every request is an untrusted client (its `Aisle-*` headers count only on rules with
//! `client_controls = true`) unless `--trusted` says they all come from `[server]
//! trusted_clients`. A simulated cache then says hit or miss from the trace's own clock: an
//! entry is stored at its miss with the rule's `ttl` (capped by `[cache] max_ttl`, shortened by
//! `Aisle-Cache-TTL`), and a later request with the same key is a hit while the entry is fresh.
//! Request directives are read by the gateway's own parser: `no-store` bypasses, `no-cache` and a
//! `max-age` the entry exceeds are misses that store again (unless the rule says
//! `client_revalidation = "ignore"`), `only-if-cached` never stores, and a request with
//! `Authorization` is a miss that does not store (whether the origin's answer allows sharing is
//! unknown), unless its rule says `authorization = "isolate"` (keyed per credential, as the
//! gateway keys it: an entry is shared among requests with the same credential) or `"share"`. There is no origin, so a rule without `ttl` (whose freshness would come from the
//! origin) uses `--default-ttl`, and the output says so.
//!
//! Background refreshes are modelled as the gateway runs them: a fresh hit past a rule's
//! `refresh_ahead` point (the proxy's own predicate, `policy::refresh_due`) and a hit on an entry
//! stale within the rule's `stale_while_revalidate` are hits that start one refresh per key, whose
//! answer replaces the entry `--origin-latency` later (default 50ms).
//!
//! The replay runs three times: as configured, without refresh-ahead and stale-while-revalidate
//! (expired entries are misses), and with every normalizer removed
//! ([`RuleSet::without_normalizers`]), so the table shows what each buys. It is a model of
//! the key design, not of the whole gateway: every origin answer is assumed storable, the cache is
//! unbounded (no evictions), the only invalidations are those of unsafe requests (a `POST`, `PUT`,
//! `PATCH` or `DELETE` that bypasses drops the stored variants of its URI, as the gateway does
//! after the origin's success), and the origin never fails. Bypassed requests (rules with `cache = false`, the default route,
//! methods other than GET/HEAD/POST, request `no-store`, POSTs whose body cannot be keyed) are
//! listed but left out of the ratios, which cover cacheable requests only.

use crate::admission::{self, Admission, BodyPlan, Bypass, KeyParts, Route, Terms};
use crate::config::Config;
use crate::key::{self, BadHost};
use crate::rules::RuleSet;
use crate::trust::Client;
use pingora::cache::key::{CacheHashKey, HashBinary};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// At most this many unparsable lines are reported one by one; the rest are counted.
const MAX_REPORTED_ERRORS: usize = 20;

/// Numeric timestamps at or above this are milliseconds, below it seconds.
const MS_THRESHOLD: f64 = 1e11;

/// One request of a trace.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    /// The body text, exactly as it would be sent.
    pub body: Option<String>,
    /// Unix milliseconds.
    pub at_ms: i64,
}

impl TraceRequest {
    /// The host the gateway routes and keys on ([`admission::host`]); `replay` without a `Host`.
    /// An error is what the gateway answers 400 for.
    pub fn host(&self) -> Result<Cow<'_, str>, BadHost> {
        match admission::host(&self.headers, None) {
            Err(BadHost::Missing) => Ok(Cow::Borrowed("replay")),
            host => host,
        }
    }

    /// The request head as it reaches the gateway: an HTTP/1.1 client frames a body with
    /// `Content-Length` unless the trace says it was sent chunked (`Transfer-Encoding`), so a
    /// trace line with a body and neither header gets the `Content-Length` of its text.
    pub fn framed_headers(&self) -> Cow<'_, http::HeaderMap> {
        let framed = self.headers.contains_key(http::header::CONTENT_LENGTH)
            || self.headers.contains_key(http::header::TRANSFER_ENCODING);
        match &self.body {
            Some(text) if !framed => {
                let mut headers = self.headers.clone();
                headers.insert(http::header::CONTENT_LENGTH, text.len().into());
                Cow::Owned(headers)
            }
            _ => Cow::Borrowed(&self.headers),
        }
    }
}

/// Parses one trace line (see the module comment for the format).
pub fn parse_line(text: &str) -> Result<TraceRequest, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err(
            "expected a JSON object like {\"timestamp\": 1767225600, \"method\": \"GET\", \"path\": \"/x\"}"
                .into(),
        );
    };
    let method = match obj.get("method") {
        None | Some(Value::Null) => http::Method::GET,
        Some(Value::String(m)) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("\"method\": {m:?} is not an HTTP method"))?,
        Some(other) => {
            return Err(format!(
                "\"method\" must be a string like \"GET\", not {other}"
            ))
        }
    };
    let (path, query_in_path) = match obj.get("path") {
        Some(Value::String(p)) if p.starts_with('/') => match p.split_once('?') {
            // Normalized as the gateway normalizes the target before routing.
            Some((path, query)) => (
                key::normalize_path(path).into_owned(),
                Some(query.to_string()),
            ),
            None => (key::normalize_path(p).into_owned(), None),
        },
        Some(Value::String(p)) => {
            return Err(format!("\"path\": {p:?} must start with '/'"));
        }
        None => return Err("\"path\" is missing; every request needs one, like \"/api/x\"".into()),
        Some(other) => {
            return Err(format!(
                "\"path\" must be a string like \"/api/x\", not {other}"
            ))
        }
    };
    let query = match obj.get("query") {
        None | Some(Value::Null) => query_in_path,
        Some(Value::String(q)) => Some(q.strip_prefix('?').unwrap_or(q).to_string()),
        Some(other) => {
            return Err(format!(
                "\"query\" must be a string like \"a=1&b=2\", not {other}"
            ))
        }
    };
    let mut headers = http::HeaderMap::new();
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let header = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("header name {name:?} is not valid"))?;
                let values: Vec<&Value> = match value {
                    Value::Array(items) => items.iter().collect(),
                    single => vec![single],
                };
                for v in values {
                    let Value::String(s) = v else {
                        return Err(format!(
                            "header {name:?} must be a string or a list of strings, not {v}"
                        ));
                    };
                    let v = http::HeaderValue::from_str(s).map_err(|_| {
                        format!("header {name:?} has a value that is not valid in HTTP: {s:?}")
                    })?;
                    headers.append(header.clone(), v);
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "\"headers\" must be an object like {{\"host\": \"api.example.com\"}}, not {other}"
            ))
        }
    }
    let body = match obj.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(raw)) => Some(raw.clone()),
        Some(doc) => Some(doc.to_string()),
    };
    let at_ms = match obj.get("timestamp") {
        Some(t) => parse_timestamp(t)?,
        None => return Err(
            "\"timestamp\" is missing; give unix seconds, unix milliseconds or an RFC 3339 time"
                .into(),
        ),
    };
    Ok(TraceRequest {
        method,
        path,
        query,
        headers,
        body,
        at_ms,
    })
}

/// Unix milliseconds from an RFC 3339 string or a number of seconds / milliseconds.
pub fn parse_timestamp(t: &Value) -> Result<i64, String> {
    match t {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if !f.is_finite() || f < 0.0 {
                return Err(format!("\"timestamp\": {n} is not a time after 1970"));
            }
            let ms = if f >= MS_THRESHOLD { f } else { f * 1000.0 };
            if ms > 1e15 {
                return Err(format!("\"timestamp\": {n} is too far in the future"));
            }
            Ok(ms.round() as i64)
        }
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
            .map(|d| d.timestamp_millis())
            .map_err(|e| {
                format!("\"timestamp\": {s:?} is not an RFC 3339 time like \"2026-05-02T14:00:00Z\" ({e})")
            }),
        other => Err(format!(
            "\"timestamp\" must be unix seconds, unix milliseconds or an RFC 3339 string, not {other}"
        )),
    }
}

/// How the simulated cache behaves where a trace cannot say.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Lifetime of entries of rules without `ttl` (their origin would decide).
    pub default_ttl: Duration,
    /// `[cache] max_ttl`: no entry lives longer.
    pub max_ttl: Duration,
    /// Whom the trace's requests come from (`--trusted`: `[server] trusted_clients`).
    pub client: Client,
    /// How long the origin takes to answer a background refresh (refresh-ahead or
    /// stale-while-revalidate): the refreshed entry replaces the old one this long after the
    /// request that started it (`--origin-latency`).
    pub origin_latency: Duration,
}

/// One cacheable rule's results.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleStats {
    pub name: String,
    /// The lifetime used for its entries.
    pub ttl: Duration,
    /// `false`: the rule has no `ttl`, `--default-ttl` was used.
    pub ttl_from_rule: bool,
    /// Cacheable requests this rule matched.
    pub requests: u64,
    /// Hits with the rules as configured.
    pub hits: u64,
    /// Of `hits`, those answered stale within the rule's `stale_while_revalidate`.
    pub stale_hits: u64,
    /// Hits without refresh-ahead and stale-while-revalidate (expired entries are misses).
    pub hits_plain: u64,
    /// Background refreshes started (refresh-ahead and stale-while-revalidate).
    pub refreshes: u64,
    /// Hits with every normalizer removed.
    pub hits_raw: u64,
    /// Distinct keys with and without normalizers.
    pub keys: u64,
    pub keys_raw: u64,
    /// `cost.per_request` of the rule, if it has one.
    pub per_request: Option<f64>,
    /// The rule's `refresh_ahead` and `stale_while_revalidate`.
    pub refresh_ahead: Option<f64>,
    pub stale_while_revalidate: Option<Duration>,
    /// Requests with `Authorization` that RFC 9111 §3.5 kept from the cache (the rule says
    /// `authorization = "rfc"`): neither answered from nor stored in it.
    pub authorized: u64,
}

/// What a replay found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every rule that can cache, in rule order.
    pub rules: Vec<RuleStats>,
    /// Requests left out of the ratios, by reason.
    pub bypassed: BTreeMap<String, u64>,
    /// First and last timestamp (unix ms).
    pub span_ms: Option<(i64, i64)>,
}

impl Report {
    pub fn cacheable(&self) -> u64 {
        self.rules.iter().map(|r| r.requests).sum()
    }
    pub fn hits(&self) -> u64 {
        self.rules.iter().map(|r| r.hits).sum()
    }
    pub fn hits_raw(&self) -> u64 {
        self.rules.iter().map(|r| r.hits_raw).sum()
    }
    /// Hits without refresh-ahead and stale-while-revalidate.
    pub fn hits_plain(&self) -> u64 {
        self.rules.iter().map(|r| r.hits_plain).sum()
    }
    pub fn bypassed_total(&self) -> u64 {
        self.bypassed.values().sum()
    }
}

/// What the gateway would do with one request, for one rule set.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not cached; the reason as the replay report lists it.
    Bypass(String),
    /// Not cached, and an unsafe method: the gateway drops every stored variant of the URI
    /// (`uri`: [`Route::uri`]) once the origin answers it with success (RFC 9111 §4.4), as
    /// the model assumes it does.
    Invalidate(String, u64),
    Cache {
        /// Index into `RuleSet::rules()`.
        rule: usize,
        key: HashBinary,
        /// [`Route::uri`]: the URI identity unsafe requests invalidate.
        uri: u64,
        ttl_ms: i64,
        /// The rule's `stale_while_revalidate` (ms; 0 without).
        swr_ms: i64,
        /// The rule's `refresh_ahead`.
        ahead: Option<f64>,
        /// Request directives: never use a stored entry older than this (ms); -1 (`no-cache`):
        /// never use one.
        max_age_ms: Option<i64>,
        /// Store the answer (false for requests with `Authorization` on an RFC rule: the origin
        /// would decide,
        /// and for `only-if-cached`, which the gateway answers 504 without asking the origin).
        store: bool,
        /// Whether a stored entry may answer (false with `Authorization`, as above).
        use_stored: bool,
    },
}

/// The admission the gateway makes for one trace request from `client`: `Ok((route, terms,
/// body))`, or the reason it bypasses. Every step is [`crate::admission`]'s, the code the proxy
/// runs.
pub fn admit(
    rules: &RuleSet,
    req: &TraceRequest,
    client: Client,
) -> Result<(Route, Terms, Option<Value>), Bypassed> {
    let host = req.host().map_err(Bypassed::BadHost)?;
    let Some(route) = admission::route(rules, &req.method, &host, &req.path) else {
        return Err(Bypassed::NoRoute);
    };
    let headers = req.framed_headers();
    let body = match admission::body_plan(&route.rule, &req.method, &headers) {
        BodyPlan::Skip => Ok(None),
        BodyPlan::Refuse(reason) => Err(reason),
        BodyPlan::Read(length) => {
            let text = req.body.as_deref().unwrap_or("").as_bytes();
            admission::parse_body(&text[..length.min(text.len())]).map(Some)
        }
    };
    let gate = body.as_ref().map(|_| ()).map_err(|r| *r);
    let parts = KeyParts {
        method: &req.method,
        host: &host,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &headers,
        body: body.as_ref().ok().and_then(Option::as_ref),
    };
    let admission = admission::admit(&route.rule, &req.method, &headers, gate, client)
        .unless_unkeyable(&route.rule, &parts.view(&route.params));
    match admission {
        Admission::Bypass(reason) => Err(Bypassed::Admission(route, reason)),
        Admission::Cache(terms) => Ok((route, terms, body.ok().flatten())),
    }
}

/// Why a trace request does not use the cache.
#[derive(Debug)]
pub enum Bypassed {
    /// No rule matches and there is no default route: the gateway answers 404.
    NoRoute,
    /// [`admission::admit`] said no.
    Admission(Route, Bypass),
    /// The `Host` is malformed: the gateway answers 400.
    BadHost(BadHost),
}

/// The cache key the gateway builds for an admitted trace request.
pub fn key_of(
    req: &TraceRequest,
    route: &Route,
    terms: &Terms,
    body: Option<&Value>,
) -> HashBinary {
    let headers = req.framed_headers();
    let host = req.host().unwrap_or_default();
    let parts = KeyParts {
        method: &req.method,
        host: &host,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &headers,
        body,
    };
    admission::cache_key(route, terms, &parts).primary_bin()
}

fn decide(rules: &RuleSet, req: &TraceRequest, settings: &Settings) -> Decision {
    let (route, terms, body) = match admit(rules, req, settings.client) {
        Ok(admitted) => admitted,
        Err(Bypassed::NoRoute) => {
            return Decision::Bypass(
                "no rule matches and there is no default upstream (404)".into(),
            )
        }
        Err(Bypassed::Admission(route, reason)) => {
            let reason = reason.describe(&route.rule.name, &req.method);
            // As the proxy's `response_filter`: not for body-keyed rules, whose POST is a query.
            if crate::policy::is_unsafe(&req.method) && !route.rule.needs_body {
                return Decision::Invalidate(reason, route.uri);
            }
            return Decision::Bypass(reason);
        }
        Err(Bypassed::BadHost(e)) => return Decision::Bypass(format!("{e} (400)")),
    };
    let rule = &route.rule;
    if rule.is_default {
        // Replay models rules, not origins: the default route's freshness comes from origin
        // headers a trace does not have.
        return Decision::Bypass("default route (no rule matches)".into());
    }
    let key = key_of(req, &route, &terms, body.as_ref());
    let mut ttl = rule
        .ttl
        .unwrap_or(settings.default_ttl)
        .min(settings.max_ttl);
    if let Some(short) = terms.ttl {
        ttl = ttl.min(short);
    }
    let directives = terms.directives;
    let max_age_ms = if directives.no_cache {
        Some(-1)
    } else {
        directives.max_age.map(|s| i64::from(s) * 1000)
    };
    Decision::Cache {
        rule: rules
            .rules()
            .iter()
            .position(|r| Arc::ptr_eq(r, rule))
            .expect("a matched rule is in its set"),
        key,
        uri: route.uri,
        ttl_ms: ttl.as_millis().min(i64::MAX as u128) as i64,
        swr_ms: rule
            .stale_while_revalidate
            .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64),
        ahead: rule.refresh_ahead,
        max_age_ms,
        store: !directives.authorization && !directives.only_if_cached,
        use_stored: !directives.authorization,
    }
}

/// One rule's counts in one simulation.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    hits: u64,
    /// Of `hits`, answered stale (stale-while-revalidate).
    stale_hits: u64,
    /// Background refreshes started.
    refreshes: u64,
    /// Distinct keys stored.
    keys: u64,
    /// Requests whose `Authorization` kept them from the cache.
    authorized: u64,
}

/// One simulated entry (unix ms).
#[derive(Debug, Clone, Copy)]
struct Entry {
    stored: i64,
    fresh_until: i64,
    /// Servable stale (stale-while-revalidate) until then.
    stale_until: i64,
    /// A background refresh under way: when its answer lands, and the lifetime it gets.
    refresh: Option<(i64, i64)>,
}

impl Entry {
    fn new(stored: i64, ttl_ms: i64, swr_ms: i64) -> Entry {
        let fresh_until = stored.saturating_add(ttl_ms);
        Entry {
            stored,
            fresh_until,
            stale_until: fresh_until.saturating_add(swr_ms),
            refresh: None,
        }
    }
}

/// Counts per rule for one rule set, indexed like `rules.rules()`, and the bypass reasons.
/// `background`: model refresh-ahead and stale-while-revalidate (else expired entries are
/// misses and nothing refreshes ahead).
///
/// The model of the gateway's background refreshes: a fresh hit past the rule's refresh point
/// ([`crate::policy::refresh_due`], the proxy's own predicate) and a hit on an entry stale
/// within `stale_while_revalidate` each start a refresh unless one is under way for the key;
/// its answer replaces the entry `origin_latency` later (stored then, with a full lifetime).
/// Requests in between are answered from the old entry (fresh, or stale within its window).
fn simulate(
    rules: &RuleSet,
    trace: &[TraceRequest],
    settings: &Settings,
    background: bool,
) -> (Vec<Counts>, BTreeMap<String, u64>) {
    let latency = settings.origin_latency.as_millis().min(i64::MAX as u128) as i64;
    // Each entry with the URI identity it was stored under (for unsafe-method invalidation).
    let mut cache: HashMap<HashBinary, (u64, Entry)> = HashMap::new();
    // Keys ever stored (an invalidated key stored again is still one key).
    let mut stored: std::collections::HashSet<HashBinary> = std::collections::HashSet::new();
    let mut per_rule = vec![Counts::default(); rules.rules().len()];
    let mut bypassed = BTreeMap::new();
    for req in trace {
        match decide(rules, req, settings) {
            Decision::Bypass(reason) => *bypassed.entry(reason).or_insert(0) += 1,
            Decision::Invalidate(reason, uri) => {
                *bypassed.entry(reason).or_insert(0) += 1;
                cache.retain(|_, (u, _)| *u != uri);
            }
            Decision::Cache {
                rule,
                key,
                uri,
                ttl_ms,
                swr_ms,
                ahead,
                max_age_ms,
                store,
                use_stored,
            } => {
                let now = req.at_ms;
                let stats = &mut per_rule[rule];
                stats.requests += 1;
                if !use_stored {
                    stats.authorized += 1;
                }
                let swr_ms = if background { swr_ms } else { 0 };
                let ahead = ahead.filter(|_| background);
                let entry = cache.get_mut(&key).map(|(_, e)| e);
                if let Some(e) = entry {
                    if let Some((lands, ttl)) = e.refresh.filter(|&(lands, _)| lands <= now) {
                        *e = Entry::new(lands, ttl, swr_ms);
                    }
                    let fresh =
                        now < e.fresh_until && max_age_ms.is_none_or(|max| now - e.stored <= max);
                    // The gateway serves stale only to requests without directives of their own.
                    let stale = !fresh && max_age_ms.is_none() && now < e.stale_until;
                    if use_stored && (fresh || stale) {
                        stats.hits += 1;
                        stats.stale_hits += u64::from(stale);
                        // As the proxy: refresh-ahead starts from GET hits only.
                        let due = stale
                            || (req.method == http::Method::GET
                                && ahead.is_some_and(|a| {
                                    crate::policy::refresh_due(e.stored, e.fresh_until, now, a)
                                }));
                        if due && e.refresh.is_none() {
                            e.refresh = Some((now.saturating_add(latency), ttl_ms));
                            stats.refreshes += 1;
                        }
                        continue;
                    }
                    if store {
                        *e = Entry::new(now, ttl_ms, swr_ms);
                    }
                } else if store {
                    cache.insert(key, (uri, Entry::new(now, ttl_ms, swr_ms)));
                    stats.keys += u64::from(stored.insert(key));
                }
            }
        }
    }
    (per_rule, bypassed)
}

/// Replays `trace` (in the order given; [`run`] sorts by time) against `rules`, with and
/// without normalizers.
pub fn replay(rules: &RuleSet, trace: &[TraceRequest], settings: &Settings) -> Report {
    let raw_rules = rules.without_normalizers();
    let (normalized, bypassed) = simulate(rules, trace, settings, true);
    let (plain, _) = simulate(rules, trace, settings, false);
    let (raw, _) = simulate(&raw_rules, trace, settings, true);
    let stats = rules
        .rules()
        .iter()
        .zip(normalized.iter().zip(&raw).zip(&plain))
        .filter(|(rule, _)| rule.cache)
        .map(|(rule, ((n, r), p))| RuleStats {
            name: rule.name.to_string(),
            ttl: rule
                .ttl
                .unwrap_or(settings.default_ttl)
                .min(settings.max_ttl),
            ttl_from_rule: rule.ttl.is_some(),
            requests: n.requests,
            hits: n.hits,
            stale_hits: n.stale_hits,
            hits_plain: p.hits,
            refreshes: n.refreshes,
            hits_raw: r.hits,
            keys: n.keys,
            keys_raw: r.keys,
            per_request: rule.cost.as_ref().map(|c| c.per_request),
            refresh_ahead: rule.refresh_ahead,
            stale_while_revalidate: rule.stale_while_revalidate,
            authorized: n.authorized,
        })
        .collect();
    let span_ms =
        trace
            .iter()
            .map(|r| r.at_ms)
            .fold(None, |acc: Option<(i64, i64)>, t| match acc {
                None => Some((t, t)),
                Some((a, b)) => Some((a.min(t), b.max(t))),
            });
    Report {
        rules: stats,
        bypassed,
        span_ms,
    }
}

fn ratio(hits: u64, requests: u64) -> String {
    if requests == 0 {
        "-".into()
    } else {
        format!("{:.1}%", hits as f64 * 100.0 / requests as f64)
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// The report as the table `aisle replay` prints: per rule, its lifetimes, requests, then hits,
/// hit ratio and distinct keys (entries) as modelled (refresh-ahead and stale-while-revalidate
/// included), the hits without those two, and the hits and keys without the normalizers.
pub fn render(report: &Report, settings: &Settings) -> String {
    const COLUMNS: usize = 13;
    let mut rows: Vec<[String; COLUMNS]> = Vec::new();
    let mut footnote = false;
    let ahead = |a: Option<f64>| a.map_or_else(|| "-".to_string(), |a| format!("{a}"));
    let swr = |d: Option<Duration>| {
        d.map_or_else(
            || "-".to_string(),
            |d| humantime::format_duration(d).to_string(),
        )
    };
    for r in &report.rules {
        let mut ttl = humantime::format_duration(r.ttl).to_string();
        if !r.ttl_from_rule {
            footnote = true;
            ttl.push('*');
        }
        rows.push([
            r.name.clone(),
            ttl,
            ahead(r.refresh_ahead),
            swr(r.stale_while_revalidate),
            r.requests.to_string(),
            r.hits.to_string(),
            ratio(r.hits, r.requests),
            r.keys.to_string(),
            r.hits_plain.to_string(),
            ratio(r.hits_plain, r.requests),
            r.hits_raw.to_string(),
            ratio(r.hits_raw, r.requests),
            r.keys_raw.to_string(),
        ]);
    }
    let keys: u64 = report.rules.iter().map(|r| r.keys).sum();
    let keys_raw: u64 = report.rules.iter().map(|r| r.keys_raw).sum();
    rows.push([
        "total (cacheable)".into(),
        String::new(),
        String::new(),
        String::new(),
        report.cacheable().to_string(),
        report.hits().to_string(),
        ratio(report.hits(), report.cacheable()),
        keys.to_string(),
        report.hits_plain().to_string(),
        ratio(report.hits_plain(), report.cacheable()),
        report.hits_raw().to_string(),
        ratio(report.hits_raw(), report.cacheable()),
        keys_raw.to_string(),
    ]);
    let header = [
        "rule",
        "ttl",
        "ahead",
        "swr",
        "requests",
        "hits",
        "hit ratio",
        "keys",
        "hits",
        "hit ratio",
        "hits",
        "hit ratio",
        "keys",
    ];
    // Columns that open a group (after a `|`).
    const GROUPS: [usize; 2] = [8, 10];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; COLUMNS]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            match i {
                0 => l.push_str(&format!("{cell:<w$}")),
                i if GROUPS.contains(&i) => l.push_str(&format!("  |  {cell:>w$}")),
                _ => l.push_str(&format!("  {cell:>w$}")),
            }
        }
        l.trim_end().to_string()
    };
    // Group labels over columns 5..=7, 8..=9 and 10..=12.
    let lead: usize = widths[..5].iter().sum::<usize>() + 2 * 5;
    let all_w = widths[5..8].iter().sum::<usize>() + 2 * 2;
    let plain_w = widths[8..10].iter().sum::<usize>() + 2;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:lead$}{:^all_w$}  |  {:^plain_w$}  |  without normalizers",
        "", "modelled", "no ahead/swr"
    );
    let _ = writeln!(out, "{}", line(header));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
    if footnote {
        let _ = writeln!(
            out,
            "* no ttl in the rule: its freshness would come from the origin, which a replay does not have; --default-ttl {} was used",
            humantime::format_duration(settings.default_ttl)
        );
    }
    if report.bypassed_total() > 0 {
        let _ = writeln!(
            out,
            "bypassed, not in the ratios: {} requests",
            report.bypassed_total()
        );
        for (reason, n) in &report.bypassed {
            let _ = writeln!(out, "  {n:>8}  {reason}");
        }
    }
    for r in report.rules.iter().filter(|r| r.authorized > 0) {
        let _ = writeln!(
            out,
            "{}: {} requests carried Authorization, which RFC 9111 keeps from a shared cache; authorization = \"isolate\" in the rule would share their answers per credential",
            r.name, r.authorized
        );
    }
    for r in &report.rules {
        if let Some(per_request) = r.per_request.filter(|p| *p > 0.0) {
            let _ = writeln!(
                out,
                "{}: {} origin calls saved, worth {:.2} at cost.per_request = {} (the token part of the cost needs the origin's answers)",
                r.name,
                r.hits,
                r.hits as f64 * per_request,
                per_request
            );
        }
    }
    out
}

/// Reads a trace file: the parsed requests (sorted by time) and the problems, each as
/// `file:line: problem`.
pub fn read_trace(path: &Path) -> Result<(Vec<TraceRequest>, Vec<String>), String> {
    let file = std::fs::File::open(path).map_err(|e| {
        format!(
            "cannot read the trace {}: {e}; write one with `aisle trace --out {}`",
            path.display(),
            path.display()
        )
    })?;
    let mut requests = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!(
                    "{}:{n}: cannot read this line: {e}",
                    path.display()
                ));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line) {
            Ok(r) => requests.push(r),
            Err(e) => problems.push(format!("{}:{n}: {e}", path.display())),
        }
    }
    requests.sort_by_key(|r| r.at_ms);
    Ok((requests, problems))
}

/// `aisle replay`: reads the trace, replays it against `config`'s rules, prints the table.
pub fn run(
    config: &Config,
    trace: &Path,
    default_ttl: Duration,
    client: Client,
    origin_latency: Duration,
) -> ExitCode {
    let (requests, problems) = match read_trace(trace) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aisle replay: {e}");
            return ExitCode::FAILURE;
        }
    };
    for p in problems.iter().take(MAX_REPORTED_ERRORS) {
        eprintln!("{p}");
    }
    if problems.len() > MAX_REPORTED_ERRORS {
        eprintln!(
            "{}: ... and {} more lines that could not be parsed",
            trace.display(),
            problems.len() - MAX_REPORTED_ERRORS
        );
    }
    if requests.is_empty() {
        eprintln!(
            "aisle replay: {} has no request that could be parsed; each line must be a JSON object with at least \"path\" and \"timestamp\"",
            trace.display()
        );
        return ExitCode::FAILURE;
    }
    let settings = Settings {
        default_ttl,
        max_ttl: config.cache.max_ttl,
        client,
        origin_latency,
    };
    let report = replay(&config.rules, &requests, &settings);
    let (from, to) = report.span_ms.expect("at least one request");
    println!(
        "aisle replay: {}: {} requests from {} to {} ({}), {} skipped as unparsable; {} cacheable",
        trace.display(),
        requests.len(),
        rfc3339(from),
        rfc3339(to),
        humantime::format_duration(Duration::from_secs(((to - from) / 1000) as u64)),
        problems.len(),
        report.cacheable()
    );
    let clients = match client {
        Client::Trusted => "trusted clients (--trusted): Aisle-* headers count",
        Client::Untrusted => {
            "untrusted clients: Aisle-* headers count only on client_controls rules"
        }
    };
    println!(
        "(simulated cache: unbounded, invalidated only by unsafe requests; refresh-ahead and stale-while-revalidate refreshes land {} after they start; {clients})\n",
        humantime::format_duration(origin_latency)
    );
    print!("{}", render(&report, &settings));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context};

    const RULES: &str = r#"
[tables.market]
map = { "new york" = "nyc", brooklyn = "nyc", nyc = "nyc" }
fallback = "state"

[[rule]]
name = "ai"
match = { method = "POST", path = "/ai" }
ttl = "10m"
vary = ["body./q", "body./city"]
normalize = { "body./q" = "text", "body./city" = "market" }

[[rule]]
name = "chat"
match = { method = "POST", path = "/chat" }
ttl = "1h"
body_key = { all = true, ignore = ["/user"] }

[[rule]]
name = "search"
match = { path = "/search" }
vary = ["query.location"]
normalize = { "query.location" = ["trim", "lowercase", "market"] }

[[rule]]
name = "write"
match = { method = "POST", path = "/search" }
cache = false
"#;

    fn rules() -> RuleSet {
        let ups = vec!["api".to_string()];
        let ctx = Context::with_upstreams(&ups);
        compile(&[(Path::new("r.toml"), RULES)], &ctx).unwrap()
    }

    const SETTINGS: Settings = Settings {
        default_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(86_400),
        client: Client::Untrusted,
        origin_latency: Duration::from_millis(50),
    };

    fn trace(lines: &[&str]) -> Vec<TraceRequest> {
        lines.iter().map(|l| parse_line(l).unwrap()).collect()
    }

    fn stats<'a>(r: &'a Report, name: &str) -> &'a RuleStats {
        r.rules.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn refresh_ahead_and_stale_while_revalidate_on_a_hand_made_trace() {
        let ups = vec!["api".to_string()];
        let ctx = Context::with_upstreams(&ups);
        let text = "[[rule]]\nname = \"t\"\nmatch = { path = \"/t\" }\nttl = \"10s\"\n\
                    refresh_ahead = 0.5\nstale_while_revalidate = \"5s\"\n";
        let rules = compile(&[(Path::new("r.toml"), text)], &ctx).unwrap();
        let at = |s: f64| format!(r#"{{"timestamp": {}, "path": "/t"}}"#, 1_700_000_000.0 + s);
        // Seconds from the start; the origin takes 1 s to answer a background refresh.
        let times = [0.0, 3.0, 6.0, 6.5, 12.0, 40.0, 52.0, 53.5];
        let lines: Vec<String> = times.iter().map(|&s| at(s)).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let settings = Settings {
            origin_latency: Duration::from_secs(1),
            ..SETTINGS
        };
        let report = replay(&rules, &trace(&lines), &settings);
        let t = stats(&report, "t");
        // 0 miss (fresh to 10, refresh point 5); 3 hit; 6 hit past the point: a refresh
        // lands at 7; 6.5 hit (one refresh at a time); 12 hit on the refreshed entry (stored at
        // 7, point 12): another refresh, landing at 13; 40 miss (the entry of 13 was servable
        // to 28); 52 stale hit (fresh to 50, stale to 55): a refresh lands at 53; 53.5 hit.
        assert_eq!(
            (t.requests, t.hits, t.stale_hits, t.refreshes),
            (8, 6, 1, 3)
        );
        // Without them: 0 miss, 3, 6, 6.5 hit, 12 miss, 40 miss, 52 miss, 53.5 hit.
        assert_eq!(t.hits_plain, 4);
        let table = render(&report, &settings);
        assert!(table.contains("0.5   5s"), "{table}");
    }

    #[test]
    fn unsafe_requests_invalidate_their_uri() {
        let lines = [
            r#"{"timestamp": 1700000000, "path": "/search", "query": "location=nyc"}"#,
            r#"{"timestamp": 1700000001, "path": "/search", "query": "location=nyc"}"#,
            r#"{"timestamp": 1700000002, "method": "POST", "path": "/search"}"#,
            r#"{"timestamp": 1700000003, "path": "/search", "query": "location=nyc"}"#,
            r#"{"timestamp": 1700000004, "path": "/search", "query": "location=nyc"}"#,
        ];
        let report = replay(&rules(), &trace(&lines), &SETTINGS);
        let search = stats(&report, "search");
        // miss, hit, (the POST drops every variant of /search), miss, hit.
        assert_eq!((search.requests, search.hits), (4, 2));
    }

    #[test]
    fn timestamps_in_three_forms() {
        let t = |v: Value| parse_timestamp(&v);
        assert_eq!(t(serde_json::json!(1_767_225_600)), Ok(1_767_225_600_000));
        assert_eq!(
            t(serde_json::json!(1_767_225_600.25)),
            Ok(1_767_225_600_250)
        );
        assert_eq!(
            t(serde_json::json!(1_767_225_600_250u64)),
            Ok(1_767_225_600_250)
        );
        assert_eq!(
            t(serde_json::json!("2026-01-01T00:00:00.250Z")),
            Ok(1_767_225_600_250)
        );
        assert_eq!(
            t(serde_json::json!("2026-01-01T01:00:00+01:00")),
            Ok(1_767_225_600_000)
        );
        assert!(t(serde_json::json!("yesterday"))
            .unwrap_err()
            .contains("RFC 3339"));
        assert!(t(serde_json::json!(-5)).is_err());
        assert!(t(serde_json::json!(true)).is_err());
    }

    #[test]
    fn line_parsing_and_its_errors() {
        let r = parse_line(
            r#"{"timestamp": 1, "method": "post", "path": "/a?x=1", "headers": {"Host": "h:8080", "x": ["1", "2"]}, "body": "{\"a\": 1}"}"#,
        )
        .unwrap();
        assert_eq!(r.method, http::Method::POST);
        assert_eq!((r.path.as_str(), r.query.as_deref()), ("/a", Some("x=1")));
        assert_eq!(r.headers.get_all("x").iter().count(), 2);
        assert_eq!(r.host().unwrap(), "h");
        assert_eq!(r.body.as_deref(), Some("{\"a\": 1}"));
        // An HTTP/1.1 client frames the body with its length.
        assert_eq!(r.framed_headers()["content-length"], "8");
        let r = parse_line(r#"{"timestamp": 1, "path": "/a", "query": "?y=2", "body": "nope"}"#)
            .unwrap();
        assert_eq!(
            (&r.method, r.query.as_deref(), r.body.as_deref()),
            (&http::Method::GET, Some("y=2"), Some("nope"))
        );
        assert_eq!(r.host().unwrap(), "replay");

        for (line, problem) in [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            (r#"{"timestamp": 1}"#, "\"path\" is missing"),
            (r#"{"timestamp": 1, "path": "a"}"#, "must start with '/'"),
            (r#"{"path": "/a"}"#, "\"timestamp\" is missing"),
            (
                r#"{"timestamp": 1, "path": "/a", "method": "G T"}"#,
                "not an HTTP method",
            ),
            (
                r#"{"timestamp": 1, "path": "/a", "headers": {"a b": "1"}}"#,
                "header name",
            ),
            (
                r#"{"timestamp": 1, "path": "/a", "headers": {"a": 1}}"#,
                "string or a list",
            ),
            (
                r#"{"timestamp": 1, "path": "/a", "query": 5}"#,
                "\"query\" must be a string",
            ),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(problem), "{line}: {e}");
        }
    }

    #[test]
    fn normalizers_and_ttls_decide_hits() {
        // t in seconds. Three spellings of one market and one question in two spellings.
        let lines = [
            r#"{"timestamp": 0, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "Best venues?", "city": "NYC", "request_id": "1"}}"#,
            r#"{"timestamp": 10, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "best  venues? ", "city": "Brooklyn, NY", "request_id": "2"}}"#,
            r#"{"timestamp": 20, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "Best venues?", "city": "NYC", "request_id": "3"}}"#,
            // 10m after the first store: expired, a miss that stores again.
            r#"{"timestamp": 600, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "Best venues?", "city": "NYC"}}"#,
            r#"{"timestamp": 601, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "Best venues?", "city": "NYC"}}"#,
        ];
        let report = replay(&rules(), &trace(&lines), &SETTINGS);
        let ai = stats(&report, "ai");
        assert_eq!((ai.requests, ai.hits, ai.keys), (5, 3, 1));
        // Without normalizers the second spelling is its own entry; the others still share.
        assert_eq!((ai.hits_raw, ai.keys_raw), (2, 2));
        assert!(ai.ttl_from_rule);
    }

    #[test]
    fn bodies_are_admitted_as_the_gateway_admits_them() {
        // The gateway keys a body only when it is declared JSON and its length is known before
        // reading it; so does replay, through the same admission code.
        let lines = [
            // JSON, but no Content-Type: the gateway bypasses it (not-json).
            r#"{"timestamp": 0, "method": "POST", "path": "/ai", "body": {"q": "a", "city": "NYC"}}"#,
            // Sent chunked: its length is unknown, so it bypasses (body-length-unknown).
            r#"{"timestamp": 1, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json", "transfer-encoding": "chunked"}, "body": {"q": "a", "city": "NYC"}}"#,
            // Declared JSON and framed by its length: keyed.
            r#"{"timestamp": 2, "method": "POST", "path": "/ai", "headers": {"content-type": "application/json"}, "body": {"q": "a", "city": "NYC"}}"#,
        ];
        let trace = trace(&lines);
        let set = rules();
        let reasons: Vec<_> = trace
            .iter()
            .map(|r| match admit(&set, r, Client::Untrusted) {
                Ok(_) => None,
                Err(Bypassed::Admission(_, reason)) => Some(reason),
                Err(Bypassed::NoRoute | Bypassed::BadHost(_)) => panic!("routed"),
            })
            .collect();
        assert_eq!(
            reasons,
            vec![Some(Bypass::NotJson), Some(Bypass::BodyLengthUnknown), None]
        );
    }

    #[test]
    fn control_headers_count_only_for_trusted_traces() {
        // A namespace is its own key space only when the trace is from trusted clients.
        let lines = [
            r#"{"timestamp": 0, "path": "/search", "query": "location=nyc"}"#,
            r#"{"timestamp": 1, "path": "/search", "query": "location=nyc", "headers": {"aisle-cache-namespace": "t"}}"#,
        ];
        let hits = |client: Client| {
            let settings = Settings { client, ..SETTINGS };
            stats(&replay(&rules(), &trace(&lines), &settings), "search").hits
        };
        assert_eq!(hits(Client::Untrusted), 1);
        assert_eq!(hits(Client::Trusted), 0);
    }

    #[test]
    fn chat_body_key_ignores_user_and_key_order() {
        let lines = [
            r#"{"timestamp": 0, "method": "POST", "path": "/chat", "headers": {"content-type": "application/json"}, "body": "{\"model\": \"m\", \"messages\": [\"hi\"], \"user\": \"a\"}"}"#,
            r#"{"timestamp": 1, "method": "POST", "path": "/chat", "headers": {"content-type": "application/json"}, "body": "{\"user\": \"b\", \"messages\": [\"hi\"], \"model\": \"m\"}"}"#,
            r#"{"timestamp": 2, "method": "POST", "path": "/chat", "headers": {"content-type": "application/json"}, "body": {"messages": ["hi"], "model": "other"}}"#,
        ];
        let report = replay(&rules(), &trace(&lines), &SETTINGS);
        let chat = stats(&report, "chat");
        assert_eq!((chat.requests, chat.hits, chat.hits_raw), (3, 1, 1));
    }

    #[test]
    fn rules_without_ttl_use_the_default_and_bypasses_are_counted() {
        let lines = [
            r#"{"timestamp": "2026-01-01T00:00:00Z", "path": "/search", "query": "location=NYC&utm=1"}"#,
            r#"{"timestamp": "2026-01-01T00:04:59Z", "path": "/search", "query": "location=%20new%20york"}"#,
            r#"{"timestamp": "2026-01-01T00:05:00Z", "method": "HEAD", "path": "/search", "query": "location=nyc"}"#,
            r#"{"timestamp": "2026-01-01T00:05:01Z", "path": "/search", "query": "location=nyc", "headers": {"cache-control": "no-store"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:02Z", "path": "/search", "query": "location=nyc", "headers": {"cache-control": "no-cache"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:03Z", "method": "POST", "path": "/search"}"#,
            r#"{"timestamp": "2026-01-01T00:05:04Z", "path": "/elsewhere"}"#,
            r#"{"timestamp": "2026-01-01T00:05:05Z", "method": "PUT", "path": "/ai"}"#,
            r#"{"timestamp": "2026-01-01T00:05:06Z", "method": "POST", "path": "/ai", "body": "not json"}"#,
            r#"{"timestamp": "2026-01-01T00:05:07Z", "method": "POST", "path": "/ai", "headers": {"content-type": "text/plain"}, "body": {"q": "x"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:08Z", "path": "/search", "query": "location=nyc", "headers": {"authorization": "Bearer t"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:09Z", "path": "/search", "query": "location=nyc", "headers": {"cache-control": "only-if-cached"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:10Z", "path": "/search", "query": "location=sf", "headers": {"cache-control": "only-if-cached"}}"#,
            r#"{"timestamp": "2026-01-01T00:05:11Z", "path": "/search", "query": "location=sf"}"#,
        ];
        let report = replay(&rules(), &trace(&lines), &SETTINGS);
        let search = stats(&report, "search");
        // 00:00 miss (stored for the default 5m), 04:59 hit, 05:00 expired: miss (HEAD keys as
        // GET), 05:02 no-cache: miss, stored again; 05:03 the POST drops /search's entries;
        // 05:08 Authorization: miss (nothing used or stored); 05:09 only-if-cached: miss (the
        // POST dropped the entry); 05:10 only-if-cached: miss, not stored, so 05:11 is a miss
        // too.
        assert_eq!((search.requests, search.hits, search.hits_raw), (8, 1, 0));
        assert!(!search.ttl_from_rule);
        assert_eq!(search.ttl, Duration::from_secs(300));
        assert_eq!(report.cacheable(), 8);
        let reasons: Vec<(&str, u64)> = report
            .bypassed
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("default route (no rule matches)", 1),
                ("request Cache-Control: no-store", 1),
                ("rule \"_default\": method PUT is not cached", 1),
                ("rule \"ai\": no JSON body to key on", 2),
                ("rule \"write\": cache = false", 1),
            ],
            "PUT /ai matches no rule (the ai rule is POST only), so it takes the default route"
        );
        assert!(
            report.rules.iter().all(|r| r.name != "write"),
            "cache = false rules are not in the table"
        );
        let table = render(&report, &SETTINGS);
        assert!(table.contains("--default-ttl 5m was used"), "{table}");
        assert!(table.contains("total (cacheable)"), "{table}");
    }

    /// Issue 13: a trace's `Authorization` on an `authorization = "isolate"` rule is shared
    /// per credential, as the gateway shares it; on an RFC rule it never hits.
    #[test]
    fn isolated_credentials_share_per_credential() {
        let text = RULES.replace(
            "body_key = { all = true, ignore = [\"/user\"] }",
            "body_key = { all = true, ignore = [\"/user\"] }\nauthorization = \"isolate\"",
        );
        let set = compile(
            &[(Path::new("r.toml"), &text)],
            &Context::with_upstreams(&["api".to_string()]),
        )
        .unwrap();
        let line = |t: u32, auth: &str| {
            format!(
                r#"{{"timestamp": {t}, "method": "POST", "path": "/chat", "headers": {{"content-type": "application/json", "authorization": "{auth}"}}, "body": {{"m": "x"}}}}"#
            )
        };
        let lines = [
            line(1, "Bearer a"),
            line(2, "Bearer a"),
            line(3, "Bearer b"),
            line(4, "Bearer b"),
            line(5, "Bearer a"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let chat = |set: &RuleSet| {
            let report = replay(set, &trace(&lines), &SETTINGS);
            let s = stats(&report, "chat");
            (s.requests, s.hits, s.keys)
        };
        assert_eq!(
            chat(&set),
            (5, 3, 2),
            "a misses, a hits, b misses, b hits, a hits"
        );
        assert_eq!(
            chat(&rules()),
            (5, 0, 0),
            "RFC 9111: nothing stored or used"
        );
        let report = replay(&rules(), &trace(&lines), &SETTINGS);
        assert_eq!(stats(&report, "chat").authorized, 5);
        assert!(
            render(&report, &SETTINGS).contains("chat: 5 requests carried Authorization"),
            "the report says why chat never hits"
        );
        let report = replay(&set, &trace(&lines), &SETTINGS);
        assert_eq!(stats(&report, "chat").authorized, 0);
    }

    #[test]
    fn without_normalizers_changes_nothing_else() {
        let set = rules();
        let raw = set.without_normalizers();
        assert_eq!(set.len(), raw.len());
        for (a, b) in set.rules().iter().zip(raw.rules()) {
            assert_eq!((&a.name, a.ttl, a.cache), (&b.name, b.ttl, b.cache));
            assert_eq!(
                (&a.body_key, a.needs_body, a.key_path),
                (&b.body_key, b.needs_body, b.key_path)
            );
            let sources = |r: &crate::rules::Rule| {
                r.vary.iter().map(|f| f.source.clone()).collect::<Vec<_>>()
            };
            assert_eq!(sources(a), sources(b));
            assert!(b.vary.iter().all(|f| f.normalizers.is_empty()));
        }
        assert!(set.rules()[0]
            .vary
            .iter()
            .all(|f| !f.normalizers.is_empty()));
        assert!(raw.default_route().is_some_and(|d| d.is_default));
    }

    #[test]
    fn run_exits_1_when_no_line_parses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/r.toml"), RULES).unwrap();
        let gateway = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n[upstreams.api]\nurl = \"http://127.0.0.1:3000\"\n";
        let config = Config::from_str(&dir.path().join("gateway.toml"), gateway).unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "nope\n{\"path\": \"/search\"}\n").unwrap();
        assert_eq!(
            run(
                &config,
                &bad,
                SETTINGS.default_ttl,
                Client::Untrusted,
                SETTINGS.origin_latency
            ),
            ExitCode::FAILURE
        );
        let good = dir.path().join("good.jsonl");
        std::fs::write(&good, "nope\n{\"timestamp\": 1, \"path\": \"/search\"}\n").unwrap();
        assert_eq!(
            run(
                &config,
                &good,
                SETTINGS.default_ttl,
                Client::Untrusted,
                SETTINGS.origin_latency
            ),
            ExitCode::SUCCESS
        );
    }

    /// The shipped configuration on a generated trace: every AI request is cacheable and keyed,
    /// and the normalizers are what make the difference on the rules that have them.
    #[test]
    fn shipped_rules_on_a_generated_trace() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = Config::load(&root.join("gateway.toml")).expect("the shipped config loads");
        let mut text = Vec::new();
        let opts = crate::tools::tracegen::Options {
            requests: 5000,
            ..Default::default()
        };
        crate::tools::tracegen::write_trace(&opts, &mut text).unwrap();
        let trace: Vec<TraceRequest> = String::from_utf8(text)
            .unwrap()
            .lines()
            .map(|l| parse_line(l).unwrap())
            .collect();
        let settings = Settings {
            max_ttl: config.cache.max_ttl,
            ..SETTINGS
        };
        let report = replay(&config.rules, &trace, &settings);
        assert_eq!(report.cacheable() + report.bypassed_total(), 5000);
        assert!(
            report
                .bypassed
                .keys()
                .all(|k| k.starts_with("default route") || k.contains("vendor-update")),
            "{:?}",
            report.bypassed
        );
        for name in ["ai-recommendations", "chat"] {
            let r = stats(&report, name);
            assert!(r.requests > 100 && r.hits > r.requests / 2, "{r:?}");
        }
        for name in ["ai-recommendations", "vendor-search", "weather"] {
            let r = stats(&report, name);
            assert!(r.hits > r.hits_raw && r.keys < r.keys_raw, "{r:?}");
        }
        // Chat keys on the canonical body: it has no normalizers to remove.
        let chat = stats(&report, "chat");
        assert_eq!((chat.hits, chat.keys), (chat.hits_raw, chat.keys_raw));
        assert!(report.hits() > report.hits_raw());
    }

    #[test]
    fn read_trace_reports_bad_lines_and_sorts_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            "{\"timestamp\": 20, \"path\": \"/b\"}\n\n{oops\n{\"timestamp\": 10, \"path\": \"/a\"}\n",
        )
        .unwrap();
        let (requests, problems) = read_trace(&path).unwrap();
        assert_eq!(
            requests.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["/a", "/b"]
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(&format!("{}:3: not valid JSON", path.display())),
            "{problems:?}"
        );
        let missing = read_trace(&dir.path().join("none.jsonl")).unwrap_err();
        assert!(missing.contains("cannot read the trace"), "{missing}");
    }
}
