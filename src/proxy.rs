//! The request phases: Aisle's implementation of pingora's `ProxyHttp`.
//!
//! Each hook does one job and leaves its findings in [`Ctx`] for later phases:
//!
//! | phase                    | job                                                           |
//! |--------------------------|---------------------------------------------------------------|
//! | `request_filter`         | match a rule (404 when nothing can serve the request)         |
//! | `request_cache_filter`   | decide whether the cache is used at all; enable it            |
//! | `cache_key_callback`     | build the key ([`crate::key`])                                |
//! | `cache_hit_filter`       | apply the request's `no-cache` / `max-age` to a found entry  |
//! | `cache_miss`             | note whether other variants of the URI exist (`vary-miss`)    |
//! | `proxy_upstream_filter`  | `only-if-cached`: answer 504 instead of going upstream        |
//! | `upstream_peer`          | pick the rule's upstream                                      |
//! | `response_cache_filter`  | RFC 9111 storability ([`crate::policy`]), attach tags         |
//! | `cache_vary_filter`      | the response `Vary` variance key                              |
//! | `should_serve_stale`     | stale-while-revalidate / stale-if-error                       |
//! | `response_filter`        | `Cache-Status`; invalidate the URI after unsafe success       |
//! | `logging`                | metrics                                                       |

use crate::cache_status::{CacheStatus, Fwd};
use crate::config::{Config, Upstream};
use crate::control::{self, Replays};
use crate::invalidation::epochs::Verdict;
use crate::invalidation::{Cdn, Invalidator, Request};
use crate::key::{self, KeyInput};
use crate::metrics::{metrics, Outcome};
use crate::policy::{self, RequestDirectives};
use crate::rules::path::PathParams;
use crate::rules::source::RequestView;
use crate::rules::Rule;
use crate::storage::memory::{BodyHit, Eviction};
use crate::storage::tiered::Tiered;
use crate::storage::EntryInfo;
use async_trait::async_trait;
use pingora::cache::key::HashBinary;
use pingora::cache::lock::CacheKeyLockImpl;
use pingora::cache::predictor::Predictor;
use pingora::cache::{
    CacheKey, CacheMeta, CachePhase, ForcedFreshness, HitHandler, RespCacheable, VarianceBuilder,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The scheme of the proxy listener, part of every key.
const SCHEME: &str = "http";

/// Long-lived pieces the cache needs as `&'static` (pingora's requirement).
pub struct CacheParts {
    pub storage: &'static Tiered,
    pub eviction: &'static Eviction,
    pub lock: &'static CacheKeyLockImpl,
    pub predictor: &'static Predictor<16>,
}

/// A resolved upstream, ready to hand to pingora.
struct Peer {
    name: String,
    address: SocketAddr,
    upstream: Upstream,
}

/// The gateway's proxy logic.
pub struct Gateway {
    config: Arc<Config>,
    peers: Vec<Peer>,
    cache: CacheParts,
    invalidator: Arc<Invalidator>,
    replays: Replays,
}

impl Gateway {
    /// Resolves upstream addresses once, at start.
    pub fn new(
        config: Arc<Config>,
        cache: CacheParts,
        invalidator: Arc<Invalidator>,
    ) -> std::io::Result<Self> {
        use std::net::ToSocketAddrs;
        let mut peers = Vec::new();
        for u in &config.upstreams {
            let address = u.address.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::other(format!(
                    "upstream {}: {} resolves to no address",
                    u.name, u.address
                ))
            })?;
            peers.push(Peer {
                name: u.name.clone(),
                address,
                upstream: u.clone(),
            });
        }
        Ok(Gateway {
            replays: Replays::new(invalidator.redis.clone()),
            invalidator,
            config,
            peers,
            cache,
        })
    }
}

/// What one lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    None,
    Miss,
    Fresh,
    Stale,
}

/// Per-request state shared by the phases.
pub struct Ctx {
    start: Instant,
    rule: Option<Arc<Rule>>,
    params: PathParams,
    uri: u64,
    directives: RequestDirectives,
    cache_enabled: bool,
    lookup: Lookup,
    /// The request's own directives made a stored entry unusable.
    forced_by_request: bool,
    /// What `Cache-Status` says and what metrics count, once known (set in `response_filter`).
    answered: Option<(CacheStatus, Outcome)>,
    stored: bool,
    vary_miss: bool,
    /// Serving stale because the upstream failed: `Some(status)` (`None` inside: no response).
    stale_error: Option<Option<u16>>,
    upstream_status: Option<u16>,
    upstream_start: Option<Instant>,
    /// Tags the origin sent (`Surrogate-Key`, `Cache-Tag`, `xkey`, `Cache-Groups`).
    origin_tags: Vec<String>,
    /// The entry found was hard-purged (a tag or prefix purge after it was stored).
    purged: bool,
    /// The request body parsed as JSON (rules that key on the body).
    body: Option<Arc<serde_json::Value>>,
    /// Why a body-keyed request bypasses the cache (not JSON, too large, ...).
    body_bypass: Option<&'static str>,
    /// Tokens recorded in the stored response this request was answered from.
    hit_tokens: u64,
}

/// The request's host name, without a port: rules match it and keys contain it. The port is
/// left out so that instances of a fleet listening on different ports share keys.
fn host_of(req: &RequestHeader) -> &str {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
        .unwrap_or("");
    strip_port(host)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

impl Ctx {
    fn rule(&self) -> &Rule {
        self.rule
            .as_deref()
            .expect("a rule is matched in request_filter")
    }

    fn view<'a>(&'a self, req: &'a RequestHeader) -> RequestView<'a> {
        RequestView {
            path: req.uri.path(),
            query: req.uri.query(),
            headers: &req.headers,
            params: &self.params,
            body: self.body.as_deref(),
        }
    }
}

/// Largest request body read to build a key: pingora replays at most this much of a body it has
/// already read (its retry buffer) when it forwards the request upstream.
const MAX_KEYED_BODY: usize = 64 * 1024;

/// Reads a JSON request body once, for the key; pingora forwards the same bytes upstream.
/// `Err(reason)` (nothing read, or not JSON): the request bypasses the cache, proxied untouched.
async fn read_json_body(
    session: &mut Session,
) -> Result<std::result::Result<serde_json::Value, &'static str>> {
    let req = session.req_header();
    let json = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    if !json {
        return Ok(Err("not-json"));
    }
    let length = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) if n <= MAX_KEYED_BODY => {}
        Some(_) => return Ok(Err("body-too-large")),
        // Without a length the body might outgrow what can be replayed: leave it unread.
        None => return Ok(Err("body-length-unknown")),
    }
    session.as_mut().enable_retry_buffering();
    let mut body = Vec::with_capacity(length.unwrap_or(0));
    while let Some(chunk) = session.read_request_body().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body).map_err(|_| "not-json"))
}

/// `Aisle-Cache-TTL: 5m`: a shorter lifetime for this entry.
fn request_ttl(req: &RequestHeader) -> Option<std::time::Duration> {
    let v = req.headers.get("aisle-cache-ttl")?.to_str().ok()?;
    crate::units::parse_duration(v)
        .or_else(|_| {
            v.trim()
                .parse::<u64>()
                .map(std::time::Duration::from_secs)
                .map_err(|e| e.to_string())
        })
        .ok()
}

impl Gateway {
    /// What `Cache-Status` says, and the outcome counted in metrics.
    fn status(&self, session: &Session, ctx: &Ctx) -> (CacheStatus, Outcome) {
        let mut s = CacheStatus::default();
        if !ctx.cache_enabled {
            s.fwd = Some(Fwd::Bypass);
            s.detail = ctx.body_bypass;
            return (s, Outcome::Bypass);
        }
        if ctx.rule.as_ref().is_some_and(|r| r.needs_body) {
            s.key = session.cache.maybe_cache_key().map(|k| {
                let h = pingora::cache::key::CacheHashKey::primary_bin(k);
                format!("{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
            });
        }
        let ttl = |session: &Session| {
            session.cache.maybe_cache_meta().map(|m| {
                let now = SystemTime::now();
                match m.fresh_until().duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64) - 1,
                }
            })
        };
        let fwd_stale = if ctx.forced_by_request {
            Fwd::Request
        } else {
            Fwd::Stale
        };
        let outcome = match session.cache.phase() {
            CachePhase::Hit => {
                s.hit = true;
                s.ttl = ttl(session);
                Outcome::Hit
            }
            CachePhase::Stale | CachePhase::StaleUpdating => {
                s.fwd = Some(Fwd::Stale);
                s.ttl = ttl(session);
                match ctx.stale_error {
                    Some(code) => {
                        s.fwd_status = code;
                        s.detail = Some("stale-if-error");
                    }
                    None => s.detail = Some("stale-while-revalidate"),
                }
                Outcome::Stale
            }
            CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => {
                s.fwd = Some(fwd_stale);
                s.fwd_status = Some(304);
                s.ttl = ttl(session);
                s.stored = matches!(session.cache.phase(), CachePhase::Revalidated);
                Outcome::Revalidated
            }
            CachePhase::Expired => {
                s.fwd = Some(fwd_stale);
                s.fwd_status = ctx.upstream_status;
                s.stored = ctx.stored;
                Outcome::Expired
            }
            _ if ctx.lookup == Lookup::Stale => {
                // Found stale, refetched, and the new response could not be stored.
                s.fwd = Some(fwd_stale);
                s.fwd_status = ctx.upstream_status;
                Outcome::Expired
            }
            _ => {
                s.fwd = Some(if ctx.purged {
                    s.detail = Some("purged");
                    Fwd::Miss
                } else if ctx.forced_by_request {
                    Fwd::Request
                } else if ctx.vary_miss {
                    Fwd::VaryMiss
                } else {
                    Fwd::UriMiss
                });
                s.stored = ctx.stored;
                Outcome::Miss
            }
        };
        (s, outcome)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            rule: None,
            params: PathParams::default(),
            uri: 0,
            directives: RequestDirectives::default(),
            cache_enabled: false,
            lookup: Lookup::None,
            forced_by_request: false,
            answered: None,
            stored: false,
            vary_miss: false,
            stale_error: None,
            upstream_status: None,
            upstream_start: None,
            origin_tags: Vec::new(),
            purged: false,
            body: None,
            body_bypass: None,
            hit_tokens: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        if req.method.as_str() == "PURGE" {
            control::purge(session, &self.config, &self.invalidator).await?;
            return Ok(true);
        }
        if req.uri.path().starts_with(control::WEBHOOK_PREFIX) {
            control::webhook(session, &self.config, &self.invalidator, &self.replays).await?;
            return Ok(true);
        }
        let host = host_of(req);
        let path = req.uri.path();
        match self.config.rules.find(&req.method, host, path) {
            Some(m) => {
                ctx.uri = key::uri_id(SCHEME, host, path);
                ctx.params = m.params;
                ctx.rule = Some(m.rule.clone());
                if m.rule.needs_body && m.rule.cache {
                    match read_json_body(session).await? {
                        Ok(body) => ctx.body = Some(Arc::new(body)),
                        Err(reason) => ctx.body_bypass = Some(reason),
                    }
                }
                Ok(false)
            }
            None => {
                control::respond_json(
                    session,
                    404,
                    "{\"error\":\"no rule matches this request and no default upstream is configured\"}".into(),
                    "aisle; fwd=bypass; detail=no-route",
                )
                .await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let req = session.req_header();
        let rule = ctx.rule();
        let method_ok = match req.method {
            http::Method::GET | http::Method::HEAD => true,
            http::Method::POST => rule.needs_body,
            _ => false,
        };
        if !method_ok || !rule.cache || (rule.needs_body && ctx.body.is_none()) {
            return Ok(());
        }
        ctx.directives = RequestDirectives::parse(req);
        if ctx.directives.no_store {
            return Ok(());
        }
        let c = &self.cache;
        session.cache.enable(
            c.storage,
            Some(c.eviction),
            Some(c.predictor),
            Some(c.lock),
            None,
        );
        session
            .cache
            .set_max_file_size_bytes(self.config.cache.max_object as usize);
        ctx.cache_enabled = true;
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let req = session.req_header();
        let input = KeyInput {
            scheme: SCHEME,
            host: host_of(req),
            method: &req.method,
            view: ctx.view(req),
            namespace: req
                .headers
                .get("aisle-cache-namespace")
                .and_then(|v| v.to_str().ok()),
        };
        Ok(key::cache_key(ctx.rule(), &input))
    }

    fn cache_miss(&self, session: &mut Session, ctx: &mut Ctx) {
        session.cache.cache_miss();
        ctx.lookup = Lookup::Miss;
        ctx.vary_miss = self.cache.storage.has_uri(ctx.uri);
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        if let Some(pointer) = ctx
            .rule
            .as_ref()
            .and_then(|r| r.cost.as_ref())
            .and_then(|c| c.tokens.as_deref())
        {
            if let Some(hit) = hit_handler.as_any().downcast_ref::<BodyHit>() {
                ctx.hit_tokens = serde_json::from_slice::<serde_json::Value>(hit.body())
                    .ok()
                    .and_then(|v| v.pointer(pointer).and_then(serde_json::Value::as_u64))
                    .unwrap_or(0);
            }
        }
        let epochs = &self.invalidator.epochs;
        if !epochs.is_empty() {
            if let Some(hit) = hit_handler.as_any().downcast_ref::<BodyHit>() {
                let info = hit.info();
                let tags = info.tags.iter().map(|t| &**t);
                match epochs.judge(meta.created(), tags, &info.host_path, info.uri) {
                    Verdict::Valid => {}
                    Verdict::Gone => {
                        ctx.purged = true;
                        return Ok(Some(ForcedFreshness::ForceMiss));
                    }
                    Verdict::Stale(at) => {
                        return Ok(Some(ForcedFreshness::ForceExpiredServeStale {
                            expired_at: Some(at),
                        }))
                    }
                }
            }
        }
        ctx.lookup = if is_fresh {
            Lookup::Fresh
        } else {
            Lookup::Stale
        };
        if ctx.directives.authorization && !policy::serves_authorized(meta.response_header()) {
            // RFC 9111 §3.5: a stored response is used for a request with Authorization only if
            // it says public, s-maxage or must-revalidate.
            ctx.forced_by_request = true;
            return Ok(Some(ForcedFreshness::ForceMiss));
        }
        if !is_fresh || !ctx.directives.any() {
            return Ok(None);
        }
        let too_old = ctx
            .directives
            .max_age
            .is_some_and(|max| meta.age().as_secs() > u64::from(max));
        if ctx.directives.no_cache || too_old {
            ctx.forced_by_request = true;
            return Ok(Some(ForcedFreshness::ForceExpired));
        }
        Ok(None)
    }

    async fn proxy_upstream_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.directives.only_if_cached {
            control::respond_json(
                session,
                504,
                "{\"error\":\"only-if-cached: no stored response\"}".into(),
                "aisle; fwd=miss; detail=only-if-cached",
            )
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let peer = &self.peers[ctx.rule().upstream];
        let u = &peer.upstream;
        let mut p = HttpPeer::new(peer.address, u.tls, u.sni.clone());
        p.options.connection_timeout = Some(u.connect_timeout);
        p.options.total_connection_timeout = Some(u.connect_timeout);
        p.options.read_timeout = Some(u.read_timeout);
        p.options.write_timeout = Some(u.read_timeout);
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(p))
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.origin_tags = policy::origin_tags(resp);
        if !ctx.rule().keep_tag_headers {
            policy::strip_tag_headers(resp);
        }
        let peer = &self.peers[ctx.rule().upstream];
        let m = metrics();
        m.upstream_requests
            .with_label_values(&[peer.name.as_str(), resp.status.as_str()])
            .inc();
        if let Some(start) = ctx.upstream_start {
            m.upstream_duration
                .with_label_values(&[peer.name.as_str()])
                .observe(start.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let req = session.req_header();
        let auth = req.headers.contains_key(http::header::AUTHORIZATION);
        let rule = ctx.rule();
        if req.method == http::Method::POST && !resp.status.is_success() {
            // Errors from costly POST endpoints are never cached.
            return Ok(RespCacheable::Uncacheable(
                pingora::cache::NoCacheReason::Custom("post-status"),
            ));
        }
        let decision = policy::cacheability(
            rule,
            resp,
            auth,
            SystemTime::now(),
            self.config.cache.max_ttl,
        );
        Ok(match decision {
            RespCacheable::Cacheable(mut meta) => {
                if let Some(ttl) = request_ttl(req) {
                    // Aisle-Cache-TTL only ever shortens what the rule allows.
                    meta.expire_at(SystemTime::now() + ttl);
                }
                let mut tags = rule.render_tags(&ctx.view(req));
                tags.extend(ctx.origin_tags.iter().cloned());
                meta.extensions_mut().insert(EntryInfo {
                    uri: ctx.uri,
                    host_path: format!("{}{}", host_of(req), req.uri.path()).into_boxed_str(),
                    tags: tags.into_iter().map(String::into_boxed_str).collect(),
                    encrypt: rule.encrypt,
                    rule: Arc::from(&*rule.name),
                });
                ctx.stored = true;
                RespCacheable::Cacheable(meta)
            }
            other => {
                // Let other instances waiting on this fill stop waiting.
                self.cache.storage.abandon_fill(session.cache.cache_key());
                other
            }
        })
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        let names = policy::vary_names(meta.response_header());
        if names.is_empty() {
            return None;
        }
        let mut builder = VarianceBuilder::new();
        for name in &names {
            let value = req
                .headers
                .get(name.as_str())
                .map_or(&b""[..], |v| v.as_bytes());
            builder.add_value(name, value);
        }
        builder.finalize()
    }

    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        match error {
            // stale-while-revalidate (the entry's window is checked by pingora), unless the
            // request itself asked for a validated response.
            None => !ctx.forced_by_request,
            Some(e) => {
                let status = match e.etype() {
                    ErrorType::HTTPStatus(code) => Some(*code),
                    _ => None,
                };
                let upstream_failed =
                    *e.esource() == ErrorSource::Upstream || status.is_some_and(|c| c >= 500);
                if upstream_failed {
                    ctx.stale_error = Some(status);
                    if status.is_none() {
                        // Pingora will not reuse the client connection after a failed upstream
                        // connection; say so, or the client's next request on it is reset.
                        session.set_keepalive(None);
                    }
                }
                upstream_failed
            }
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let answered = self.status(session, ctx);
        resp.insert_header("cache-status", answered.0.to_header_value())?;
        ctx.answered = Some(answered);
        let req = session.req_header();
        let success = (200..400).contains(&resp.status.as_u16());
        // RFC 9111 §4.4; except for body-keyed rules, where a POST is a query whose answer
        // is itself cached (it would otherwise evict the entry it just stored).
        let query_post = ctx.rule.as_ref().is_some_and(|r| r.needs_body);
        if success && ctx.upstream_status.is_some() && policy::is_unsafe(&req.method) && !query_post
        {
            self.invalidate_after_unsafe(req, resp, ctx).await;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let Some(rule) = ctx.rule.as_deref() else {
            return;
        };
        let (status, outcome) = match ctx.answered.take() {
            Some(a) => a,
            None => self.status(session, ctx),
        };
        rule.metrics
            .observe(outcome, ctx.start.elapsed().as_secs_f64());
        if let (Some(cost), Outcome::Hit | Outcome::Stale) = (&rule.cost, outcome) {
            let money = cost.per_request + ctx.hit_tokens as f64 / 1000.0 * cost.per_1k_tokens;
            rule.metrics.saved(money, ctx.hit_tokens);
        }
        if ctx.upstream_start.is_some() && ctx.upstream_status.is_none() {
            metrics()
                .upstream_requests
                .with_label_values(&[self.peers[rule.upstream].name.as_str(), "error"])
                .inc();
        }
        if session.cache.enabled()
            && session.cache.lock_duration().is_some()
            && !session.cache.upstream_used()
        {
            metrics().coalesced.inc();
        }
        tracing::debug!(
            rule = %rule.name,
            method = %session.req_header().method,
            uri = %session.req_header().uri,
            status = session.response_written().map_or(0, |r| r.status.as_u16()),
            cache_status = %status.to_header_value(),
            error = e.map(|e| e.to_string()),
            elapsed_ms = ctx.start.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}

impl Gateway {
    /// RFC 9111 §4.4: after a successful unsafe request, drop what is stored for its URI and
    /// for same-host `Location` / `Content-Location`.
    async fn invalidate_after_unsafe(&self, req: &RequestHeader, resp: &ResponseHeader, ctx: &Ctx) {
        let host = host_of(req);
        self.invalidator
            .prune(crate::invalidation::epochs::now_ms());
        let mut removed = self.cache.storage.invalidate_uri(ctx.uri).await;
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = target.parse::<http::Uri>() else {
                continue;
            };
            let same_host = uri.host().is_none_or(|h| h.eq_ignore_ascii_case(host));
            if same_host && uri.path().starts_with('/') {
                removed += self
                    .cache
                    .storage
                    .invalidate_uri(key::uri_id(SCHEME, host, uri.path()))
                    .await;
            }
        }
        let groups = policy::cache_groups(resp, "cache-group-invalidation");
        if !groups.is_empty() {
            let request = Request {
                tags: groups,
                urls: Vec::new(),
                prefixes: Vec::new(),
                events: Vec::new(),
                soft: false,
                source: "unsafe-request".into(),
                actor: req.uri.to_string(),
                cdn: Cdn::Never,
            };
            match self.invalidator.plan(request, &self.config.rules) {
                Ok(plan) => {
                    self.invalidator.execute(plan).await;
                }
                Err(e) => tracing::warn!("ignoring Cache-Group-Invalidation from the origin: {e}"),
            }
        }
        tracing::debug!(uri = %req.uri, removed, "invalidated after unsafe request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_without_ports() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }
}
