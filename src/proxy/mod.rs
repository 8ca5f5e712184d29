//! The request phases: Aisle's implementation of pingora's `ProxyHttp`.
//!
//! Hooks appear below in the order pingora calls them; each does one job, delegates the
//! decision to the module that owns it, and leaves its findings in [`Ctx`]:
//!
//! | phase                    | job                                                   | decided in |
//! |--------------------------|-------------------------------------------------------|------------|
//! | `request_filter`         | check `Host`, normalize host and path; PURGE / webhooks; route; read a keyed body; answer a plain fresh memory hit | [`crate::key`], [`crate::control`], [`crate::admission::route`], [`body`], [`fresh_hit`] |
//! | `request_cache_filter`   | admit the request to the cache (or not); enable it    | [`crate::admission::admit`] |
//! | `cache_key_callback`     | build the key                                         | [`crate::admission::cache_key`] |
//! | `cache_miss`             | take the fleet fill lock; note `vary-miss`            | [`crate::storage::tiered`] |
//! | `cache_hit_filter`       | purge epochs; a stale entry served as it is when the quota is used up; the request's own directives | [`crate::storage::epochs`], [`quota`], [`crate::policy`] |
//! | `proxy_upstream_filter`  | `only-if-cached`: answer 504 instead of going upstream; take a token of the upstream's quota (429 without) | [`quota`] |
//! | `upstream_peer`          | an address of the rule's upstream (balance, health, `max_connections`) | [`upstream`] |
//! | `upstream_request_filter` | forwarding headers as seen; no `Aisle-*` upstream; the upstream's `host`, `set_headers`, `remove_headers` | [`forwarding`], [`crate::trust`] |
//! | `fail_to_connect`        | mark the upstream unreachable; retry on another address | [`upstream`] |
//! | `upstream_response_filter` | origin tags; upstream metrics                      | [`crate::policy`] |
//! | `response_cache_filter`  | RFC 9111 storability; attach the entry's facts        | [`crate::policy::cacheability`] |
//! | `cache_vary_filter`      | the response `Vary` variance key                      | [`crate::policy::variance`] |
//! | `should_serve_stale`     | stale-while-revalidate / stale-if-error: the entry's own windows, longer while a protection window's `serve_stale` is on | [`crate::policy::stale_allowed`] |
//! | `response_filter`        | `Cache-Status`; drop the stored-only `aisle-stale`; invalidate after unsafe success | [`cache_status::decide`], [`invalidate`] |
//! | `logging`                | metrics, the debug line                               | |

pub mod access;
pub mod cache_status;
pub mod listener;

mod body;
mod ctx;
mod forwarding;
pub mod fresh_hit;
mod invalidate;
pub mod quota;
mod upstream;

use ctx::Ahead;
pub use ctx::Ctx;
pub use upstream::Background as UpstreamHealth;

use crate::admission::{self, Admission};
use crate::config::{Config, Upstream};
use crate::control::{self, Replays};
use crate::invalidation::Invalidator;
use crate::key::{self, BadHost};
use crate::metrics::{metrics, CacheOutcome, RefreshResult};
use crate::policy;
use crate::storage::epochs::Verdict;
use crate::storage::memory::PartialHit;
use crate::storage::tiered::Tiered;
use crate::storage::{EntryInfo, Names};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use cache_status::{CacheStatus, Lookup, Observed, Phase};
use pingora::cache::key::HashBinary;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::predictor::Predictor;
use pingora::cache::{
    CacheKey, CacheMeta, CachePhase, ForcedFreshness, HitHandler, NoCacheReason, RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use upstream::Peers;

/// Long-lived pieces the cache needs as `&'static` (pingora's requirement).
pub struct CacheParts {
    pub storage: &'static Tiered,
    /// The in-process cache locks, by the fill age they allow: see [`fill_age_limit`].
    pub locks: &'static Locks,
    pub predictor: &'static Predictor<16>,
}

/// How long waiters follow one fill from `upstream` before they stop trusting it: the time its
/// upstream request may legitimately take (connect, then the answer's header), plus a second
/// so the fill's own timeout, not the lock's age, normally ends it. Never less than
/// `lock_timeout`.
pub fn fill_age_limit(config: &Config, upstream: &Upstream) -> Duration {
    (upstream.connect_timeout + upstream.read_timeout + Duration::from_secs(1))
        .max(config.cache.lock_timeout)
}

/// Pingora's in-process cache locks, one per fill age limit (an upstream's timeouts), made
/// when a configuration first needs that age and kept for the process (pingora wants them
/// `&'static`): a reload that changes an upstream's timeouts adds one, so their number is
/// bounded by the distinct timeouts ever configured.
#[derive(Default)]
pub struct Locks(parking_lot::Mutex<HashMap<Duration, &'static CacheKeyLockImpl>>);

impl Locks {
    fn for_age(&self, age: Duration) -> &'static CacheKeyLockImpl {
        *self
            .0
            .lock()
            .entry(age)
            .or_insert_with(|| Box::leak(Box::new(CacheLock::new(age))))
    }
}

/// What a reload replaces, whole: the configuration and what is built from its upstreams.
/// Each request takes the one in force when it starts ([`Ctx::live`]) and keeps it to its end,
/// so a reload never changes the rule, upstream or settings under a request in flight.
pub struct Live {
    pub config: Arc<Config>,
    peers: Peers,
    /// The cache lock of each upstream (indexed like `Config::upstreams`).
    locks: Vec<&'static CacheKeyLockImpl>,
}

impl Live {
    /// Resolves the upstreams' addresses (a blocking lookup: call it off the request path).
    pub fn new(config: Arc<Config>, locks: &Locks) -> std::io::Result<Live> {
        let peers = Peers::resolve(&config)?;
        let locks = config
            .upstreams
            .iter()
            .map(|u| locks.for_age(fill_age_limit(&config, u)))
            .collect();
        Ok(Live {
            config,
            peers,
            locks,
        })
    }
}

/// The configuration in force, swapped whole by a reload.
pub type Shared = Arc<ArcSwap<Live>>;

/// The gateway's proxy logic.
pub struct Gateway {
    live: Shared,
    cache: CacheParts,
    invalidator: Arc<Invalidator>,
    replays: Replays,
    /// Keys whose origin did not answer within `stale_after` and whose fill goes on in the
    /// background, with when that started: readers are served the stale entry meanwhile.
    refreshing: Refreshing,
    /// Refresh-aheads started here, by key and the stored version's creation time (unix ms):
    /// one background refresh per version at a time in this process.
    ahead: Refreshing<(u128, i64)>,
    /// The upstreams' request quotas (this instance's only until [`Gateway::with_quotas`]).
    quotas: Arc<quota::Quotas>,
    /// Warm jobs: which requests are theirs, and the popularity of clients' requests.
    warm: Option<Arc<crate::warm::Warmer>>,
}

/// Background fills started because the origin was slower than `stale_after`, by key.
struct Refreshing<K = u128>(parking_lot::Mutex<HashMap<K, Instant>>);

impl<K> Default for Refreshing<K> {
    fn default() -> Self {
        Refreshing(parking_lot::Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Copy> Refreshing<K> {
    /// Records a background fill of `key`; false if one is already running (`horizon`: how long
    /// one may run, after which it no longer counts and its record is dropped).
    fn start(&self, key: K, horizon: Duration) -> bool {
        let mut map = self.0.lock();
        map.retain(|_, at| at.elapsed() < horizon);
        if map.contains_key(&key) {
            return false;
        }
        map.insert(key, Instant::now());
        true
    }

    /// Whether a background fill of `key` runs (started within `horizon`).
    fn running(&self, key: K, horizon: Duration) -> bool {
        self.0
            .lock()
            .get(&key)
            .is_some_and(|at| at.elapsed() < horizon)
    }

    fn finish(&self, key: K) {
        self.0.lock().remove(&key);
    }
}

/// The user context of a refresh-ahead's background subrequest: the version it refreshes.
struct AheadRun {
    created_ms: i64,
}

/// The refresh-ahead a session runs, when it is one's background subrequest.
fn ahead_run(session: &Session) -> Option<&AheadRun> {
    let user = session.subrequest_ctx.as_ref()?.user_ctx()?;
    user.downcast_ref::<AheadRun>()
}

/// The key as a number, for [`Refreshing`].
fn key_id(key: &CacheKey) -> u128 {
    u128::from_be_bytes(pingora::cache::key::CacheHashKey::combined_bin(key))
}

impl Gateway {
    /// The gateway over the configuration `live` holds (and later reloads swap in).
    pub fn new(
        live: Shared,
        cache: CacheParts,
        invalidator: Arc<Invalidator>,
        replays: Replays,
    ) -> Self {
        Gateway {
            live,
            replays,
            invalidator,
            cache,
            refreshing: Refreshing::default(),
            ahead: Refreshing::default(),
            quotas: quota::Quotas::new(None).expect("no keyspace to claim without Redis"),
            warm: None,
        }
    }

    /// Warm jobs: their requests are recognised (`refresh` forces a refetch), clients'
    /// requests are counted for `top` jobs.
    pub fn with_warm(mut self, warm: Arc<crate::warm::Warmer>) -> Self {
        self.warm = Some(warm);
        self
    }

    /// The quotas to count requests in (shared through Redis when configured).
    pub fn with_quotas(mut self, quotas: Arc<quota::Quotas>) -> Self {
        self.quotas = quotas;
        self
    }

    /// The rule's upstream's `stale_after`, when this request may use it: a foreground request
    /// (not a background fill), on a rule not keyed on the body (a background fill replays the
    /// request without its body).
    fn stale_after(&self, session: &Session, ctx: &Ctx) -> Option<Duration> {
        let route = ctx.route.as_ref()?;
        if session.subrequest_ctx.is_some() || route.rule.needs_body {
            return None;
        }
        ctx.live.config.upstreams[route.rule.upstream].stale_after
    }

    /// How long a background fill for the rule's upstream may run.
    fn fill_horizon(&self, ctx: &Ctx) -> Duration {
        let u = &ctx.live.config.upstreams[ctx.rule().upstream];
        u.connect_timeout + u.read_timeout + Duration::from_secs(1)
    }

    /// A fresh hit past its rule's `refresh_ahead` point: start one background refresh of this
    /// version of the entry unless this process has one under way. The subrequest claims it
    /// fleet-wide before going upstream ([`Self::ahead_lookup`]); the client is answered from
    /// the entry now, whatever the refresh does.
    fn refresh_ahead(&self, session: &Session, ctx: &mut Ctx, meta: &CacheMeta) {
        ctx.cache.refresh_ahead = true;
        let created_ms = policy::unix_ms(meta.created());
        let id = (key_id(session.cache.cache_key()), created_ms);
        let metrics = &ctx.rule().metrics;
        if !self.ahead.start(id, self.fill_horizon(ctx)) {
            metrics.refresh_ahead(RefreshResult::Coalesced);
            return;
        }
        let Some(spawner) = session.subrequest_spawner.as_ref() else {
            self.ahead.finish(id);
            return;
        };
        spawner.spawn_background_subrequest(
            session.as_ref(),
            pingora::proxy::subrequest::Ctx::builder()
                .user_ctx(Box::new(AheadRun { created_ms }))
                .build(),
        );
        metrics.refresh_ahead(RefreshResult::Started);
    }

    /// The lookup of a refresh-ahead's subrequest: go upstream (force the entry expired) when
    /// the version it was started for is still the stored one and this instance wins the
    /// fleet's claim on it; otherwise end quietly with the stored entry (`None`).
    async fn ahead_lookup(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        meta: &CacheMeta,
        is_fresh: bool,
        run_created_ms: i64,
    ) -> Option<ForcedFreshness> {
        if !is_fresh {
            // Stale by now: refetched as any stale entry is.
            ctx.cache.ahead = Some(Ahead::Refreshing);
            return None;
        }
        let created_ms = policy::unix_ms(meta.created());
        let claimed = created_ms == run_created_ms
            && self
                .cache
                .storage
                .claim_refresh(
                    session.cache.cache_key(),
                    created_ms,
                    self.fill_horizon(ctx),
                )
                .await;
        if !claimed {
            // Replaced already (another instance's refresh landed), or claimed by another.
            ctx.cache.ahead = Some(Ahead::Coalesced);
            ctx.rule().metrics.refresh_ahead(RefreshResult::Coalesced);
            return None;
        }
        ctx.cache.ahead = Some(Ahead::Refreshing);
        Some(ForcedFreshness::ForceExpired)
    }

    /// Whether `meta` may be served stale now: its own window, or a protection window's
    /// `serve_stale` beyond it while one is on ([`policy::stale_allowed`]).
    fn stale_allowed(&self, meta: &CacheMeta, kind: policy::Stale) -> bool {
        let extension =
            (self.invalidator.protection()).map_or(Duration::ZERO, |p| p.active().serve_stale);
        policy::stale_allowed(meta, kind, SystemTime::now(), extension)
    }

    /// [`Self::stale_allowed`] for the session's entry (none: pingora's own check stands).
    fn stale_allowed_now(&self, session: &Session, kind: policy::Stale) -> bool {
        (session.cache.maybe_cache_meta()).is_none_or(|meta| self.stale_allowed(meta, kind))
    }

    /// What the phases observed, for `Cache-Status` and the outcome metric.
    fn observed(&self, session: &Session, ctx: &Ctx) -> Observed {
        let bypass = match &ctx.admission {
            Some(Admission::Cache(_)) => None,
            Some(Admission::Bypass(reason)) => Some(reason.detail()),
            None => Some(None),
        };
        let phase = match session.cache.phase() {
            CachePhase::Hit => Phase::Hit,
            CachePhase::Stale | CachePhase::StaleUpdating => Phase::Stale,
            CachePhase::Revalidated => Phase::Revalidated { stored: true },
            CachePhase::RevalidatedNoCache(_) => Phase::Revalidated { stored: false },
            CachePhase::Expired => Phase::Expired,
            _ => Phase::Other,
        };
        let ttl = matches!(phase, Phase::Hit | Phase::Stale | Phase::Revalidated { .. })
            .then(|| session.cache.maybe_cache_meta().map(seconds_left))
            .flatten();
        let key = if ctx.route.as_ref().is_some_and(|r| r.rule.needs_body) {
            session.cache.maybe_cache_key().map(|k| {
                let h = pingora::cache::key::CacheHashKey::primary_bin(k);
                format!("{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
            })
        } else {
            None
        };
        Observed {
            bypass,
            phase: Some(phase),
            lookup: ctx.cache.lookup,
            stale_error: ctx.cache.stale_error,
            stale_after: ctx.cache.stale_after,
            quota_exhausted: ctx.quota.exhausted,
            upstream_status: ctx.upstream.status,
            stored: ctx.cache.stored,
            ttl,
            key,
            refresh_ahead: ctx.cache.refresh_ahead,
            collapsed: ctx.cache.partial_hit
                || (session.cache.lock_duration().is_some() && !session.cache.upstream_used()),
        }
    }

    fn status(&self, session: &Session, ctx: &Ctx) -> (CacheStatus, CacheOutcome) {
        cache_status::decide(&self.observed(session, ctx))
    }

    /// What every answer's head gets (a hit's from either path): `Cache-Status`, with the
    /// protection windows on; the stored-only stale windows removed.
    fn finish_header(
        &self,
        resp: &mut ResponseHeader,
        answered: &mut (CacheStatus, CacheOutcome),
    ) -> Result<()> {
        resp.insert_header(&cache_status::HEADER, self.cache_status(answered))?;
        // Stored only (the entry's own stale windows), never sent.
        resp.remove_header(&policy::STALE_FIELD);
        Ok(())
    }

    /// An answer's `Cache-Status` value, naming the protection window in force: what
    /// [`Gateway::finish_header`] sets, and what the fresh-hit path's own writer sends.
    fn cache_status(&self, answered: &mut (CacheStatus, CacheOutcome)) -> String {
        if let Some(p) = self.invalidator.protection() {
            // Window names are `[A-Za-z0-9_-]` (checked at load): a valid sf-string.
            answered.0.protection = p.active().label.clone();
        }
        answered.0.to_header_value()
    }
}

/// Seconds of freshness left (negative once stale).
fn seconds_left(meta: &CacheMeta) -> i64 {
    seconds_until(meta.fresh_until(), SystemTime::now())
}

/// Seconds from `now` to `fresh_until` (negative once past).
fn seconds_until(fresh_until: SystemTime, now: SystemTime) -> i64 {
    match fresh_until.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64) - 1,
    }
}

/// Step 4 of admission for this request ([`admitted`], then the keyability check), as
/// `request_cache_filter` asks it (the fresh-hit path makes the check with its key hash).
fn admission_of(ctx: &Ctx, req: &RequestHeader) -> Admission {
    admitted(ctx, req).unless_unkeyable(ctx.rule(), &ctx.view(req, host_of(req)))
}

/// [`admission::admit`] for this request, before the keyability check.
fn admitted(ctx: &Ctx, req: &RequestHeader) -> Admission {
    let body = match ctx.body_refused {
        Some(reason) => Err(reason),
        None => Ok(()),
    };
    admission::admit(ctx.rule(), &req.method, &req.headers, body, ctx.peer.client)
}

/// The host rules match and keys contain: `Host`, which [`normalize_identity`] has checked and
/// put in normal form before any phase reads it.
fn host_of(req: &RequestHeader) -> &str {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// Checks the request's `Host` and puts its identity in normal form before anything reads it:
/// the normalized host ([`admission::host`]) replaces `Host`, and the normalized path
/// ([`key::normalize_path`]) replaces the target's path. Rules, keys, URI identities, purges and
/// the upstream request all read these, so the origin answers for exactly what the key names.
fn normalize_identity(req: &mut RequestHeader) -> std::result::Result<(), BadHost> {
    let authority = req.uri.authority().map(|a| a.as_str());
    // One look at `Host`, for both the normal form and whether it is already in it.
    let current = req.headers.get(http::header::HOST).map(|h| h.as_bytes());
    let host = admission::host_from(current, authority)?;
    if current != Some(host.as_bytes()) {
        let host = host.into_owned();
        // A normalized host is a valid header value; failing that, refuse it rather than key it.
        req.insert_header(http::header::HOST, host)
            .map_err(|_| BadHost::Name)?;
    }
    // A target that is not UTF-8 is forwarded byte for byte (pingora keeps the raw bytes) and
    // bypasses the cache (`admission::keyable`); rebuilding it would replace those bytes.
    if req.raw_path_is_utf8() {
        if let std::borrow::Cow::Owned(path) = key::normalize_path(req.uri.path()) {
            let target = match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri.clone().into_parts();
            if let Ok(pq) = target.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    req.set_uri(uri);
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(self.live.load_full())
    }

    /// No downstream modules: Aisle sends answers as origins encoded them (it neither
    /// compresses nor decompresses; pingora's default adds a compression module switched off).
    /// The fresh-hit path's HTTP/1 writer relies on it: it writes its head without the
    /// modules' header filter (`fresh_hit::field_lines`).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &Ctx) -> bool {
        // `stale_after` hands a slow fill to a background request (see `should_serve_stale`).
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // The answers made here other than a fresh hit are boxed: this future is moved into
        // pingora's box on every request, and a cold path's state held inline is bytes copied
        // on every hit (issue 16, README "Performance").
        if let Err(bad) = normalize_identity(session.req_header_mut()) {
            Box::pin(control::respond_json(
                session,
                400,
                serde_json::json!({ "error": bad.to_string() }).to_string(),
                "aisle; fwd=bypass; detail=bad-host",
            ))
            .await?;
            return Ok(true);
        }
        let live = ctx.live.clone();
        let config = &*live.config;
        let req = session.req_header();
        if req.method.as_str() == "PURGE" {
            Box::pin(control::purge(session, config, &self.invalidator)).await?;
            return Ok(true);
        }
        if req.uri.path().starts_with(control::WEBHOOK_PREFIX) {
            Box::pin(control::webhook(
                session,
                config,
                &self.invalidator,
                &self.replays,
            ))
            .await?;
            return Ok(true);
        }
        let Some(route) =
            admission::route(&config.rules, &req.method, host_of(req), req.uri.path())
        else {
            Box::pin(control::respond_json(
                session,
                404,
                "{\"error\":\"no rule matches this request and no default upstream is configured\"}".into(),
                "aisle; fwd=bypass; detail=no-route",
            ))
            .await?;
            return Ok(true);
        };
        let rule = route.rule.clone();
        ctx.route = Some(route);
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.peer = config.trust.peer(peer, &session.req_header().headers);
        if let Some(warm) = &self.warm {
            let value = session.req_header().headers.get(crate::warm::HEADER_NAME);
            ctx.warm = warm.mark(value.map(|v| v.as_bytes()));
        }
        match body::read(session, &rule).await? {
            Ok(body) => ctx.body = body.map(Arc::new),
            Err(reason) => ctx.body_refused = Some(reason),
        }
        Ok(fresh_hit::serve(self, session, ctx).await? == fresh_hit::Served::Yes)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // Decided already when the fresh-hit path looked at the request.
        let admission = match ctx.admission.take() {
            Some(admission) => admission,
            None => admission_of(ctx, session.req_header()),
        };
        let admitted = matches!(admission, Admission::Cache(_));
        ctx.admission = Some(admission);
        if admitted {
            let c = &self.cache;
            // No eviction manager: the memory tier evicts as it fills (`storage::memory`).
            session.cache.enable(
                c.storage,
                None,
                Some(c.predictor),
                Some(ctx.live.locks[ctx.rule().upstream]),
                None,
            );
            session
                .cache
                .set_max_file_size_bytes(ctx.live.config.cache.max_object as usize);
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let req = session.req_header();
        let terms = ctx
            .terms()
            .expect("the cache is enabled only for admitted requests");
        let parts = ctx.key_parts(req, host_of(req));
        Ok(match ctx.cache.key_hash {
            // Hashed already, from the same reading of the request (the fresh-hit path).
            Some(hash) => admission::cache_key_hashed(ctx.route(), terms, &parts, hash),
            None => admission::cache_key(ctx.route(), terms, &parts),
        })
    }

    fn cache_miss(&self, session: &mut Session, ctx: &mut Ctx) {
        session.cache.cache_miss();
        ctx.cache.fill_lock = self.cache.storage.take_fill_lock(session.cache.cache_key());
        if !matches!(ctx.cache.lookup, Lookup::Purged | Lookup::Refused) {
            ctx.cache.lookup = if self.cache.storage.has_uri(ctx.route().uri) {
                Lookup::VaryMiss
            } else {
                Lookup::UriMiss
            };
        }
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        ctx.cache.partial_hit = hit_handler.as_any().is::<PartialHit>();
        if ctx.warm == crate::warm::Mark::Refresh {
            // A warm job's `refresh`: refetch even a fresh entry (clients cannot ask this).
            ctx.cache.lookup = Lookup::Refused;
            return Ok(Some(ForcedFreshness::ForceMiss));
        }
        if let Some(run) = ahead_run(session) {
            let created_ms = run.created_ms;
            return Ok(self
                .ahead_lookup(session, ctx, meta, is_fresh, created_ms)
                .await);
        }
        // Every hit path (memory, a fill still streaming, Redis) attaches the entry's facts.
        if let Some(info) = EntryInfo::of(meta) {
            ctx.cache.hit_tokens = info.tokens;
            let epochs = &self.invalidator.epochs;
            if !epochs.is_empty() {
                match epochs.judge(meta.created(), info.tags(), info.host_path(), info.uri) {
                    Verdict::Valid => {}
                    Verdict::Gone => {
                        ctx.cache.lookup = Lookup::Purged;
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
        ctx.cache.lookup = if is_fresh {
            Lookup::Fresh
        } else {
            Lookup::Stale
        };
        let Some(terms) = ctx.terms() else {
            return Ok(None);
        };
        let directives = terms.directives;
        if directives.authorization && !policy::serves_authorized(meta.response_header()) {
            // RFC 9111 §3.5: a stored response is used for a request with Authorization only if
            // it says public, s-maxage or must-revalidate.
            ctx.cache.lookup = Lookup::Refused;
            return Ok(Some(ForcedFreshness::ForceMiss));
        }
        let stale_fallback = !is_fresh
            && !directives.any()
            && session.subrequest_ctx.is_none()
            && self.stale_allowed(meta, policy::Stale::IfError);
        if stale_fallback
            && self.stale_after(session, ctx).is_some()
            && self
                .refreshing
                .running(key_id(session.cache.cache_key()), self.fill_horizon(ctx))
        {
            // The origin already missed `stale_after` for this key and its fill goes on in the
            // background: answer from the stale entry now rather than queue behind that fill.
            ctx.cache.stale_after = true;
            metrics().stale_after.inc();
            return Ok(Some(ForcedFreshness::ForceFresh));
        }
        let upstream = ctx.rule().upstream;
        let probe_within = ctx.live.config.upstreams[upstream]
            .stale_after
            .unwrap_or(Duration::from_secs(1));
        if stale_fallback
            && ctx
                .live
                .peers
                .still_unreachable(upstream, probe_within)
                .await
        {
            // stale-if-error, served as a hit so that the client connection is kept (pingora
            // drops it after a failed upstream connection). See `upstream`.
            ctx.cache.stale_error = Some(None);
            return Ok(Some(ForcedFreshness::ForceFresh));
        }
        if !is_fresh && self.quotas.exhausted_for_stale(session, ctx).await {
            // The quota is used up: the entry, however old, rather than a 429.
            return Ok(Some(ForcedFreshness::ForceFresh));
        }
        if !is_fresh {
            return Ok(None);
        }
        let too_old = directives
            .max_age
            .is_some_and(|max| meta.age().as_secs() > u64::from(max));
        if directives.no_cache || too_old {
            ctx.cache.lookup = Lookup::Refused;
            return Ok(Some(ForcedFreshness::ForceExpired));
        }
        // A fresh GET hit: past the rule's refresh point, it also starts a background refresh
        // (not a HEAD: the refresh replays the request, and a HEAD brings back no body).
        if let Some(ahead) = ctx.rule().refresh_ahead {
            let now = policy::unix_ms(SystemTime::now());
            let (created, fresh_until) = (meta.created(), meta.fresh_until());
            if policy::refresh_due(
                policy::unix_ms(created),
                policy::unix_ms(fresh_until),
                now,
                ahead,
            ) && session.subrequest_ctx.is_none()
                && session.req_header().method == http::Method::GET
            {
                self.refresh_ahead(session, ctx, meta);
            }
        }
        Ok(None)
    }

    async fn proxy_upstream_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.terms().is_some_and(|t| t.directives.only_if_cached) {
            control::respond_json(
                session,
                504,
                "{\"error\":\"only-if-cached: no stored response\"}".into(),
                "aisle; fwd=miss; detail=only-if-cached",
            )
            .await?;
            return Ok(false);
        }
        if let CachePhase::Disabled(NoCacheReason::CacheLockRetryLimit) = session.cache.phase() {
            // This request waited behind fills that each failed (a hung or failing origin):
            // pingora would now send it upstream on its own, as it would every other waiter,
            // turning one stuck fill into one request per waiter. The fills already asked.
            metrics().fill_wait_gave_up.inc();
            control::respond_json(
                session,
                504,
                "{\"error\":\"the origin did not answer the fills this request waited for \
                 (each within the upstream's read_timeout); retry later\"}"
                    .into(),
                "aisle; fwd=miss; detail=fill-failed",
            )
            .await?;
            return Ok(false);
        }
        if let Err(seconds) = self.quotas.take(session, ctx).await {
            if ahead_run(session).is_some() {
                // A refresh-ahead is background work: it yields to clients' share of the quota.
                ctx.cache.ahead = Some(Ahead::Quota);
            }
            quota::answer(session, ctx, seconds).await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream.start = Some(Instant::now());
        let index = ctx.rule().upstream;
        ctx.upstream.picked = None;
        let key = || upstream::balance_key(session);
        let picked = match ctx.live.peers.pick(index, key, &ctx.upstream.tried) {
            Ok(picked) => picked,
            Err(why) => {
                ctx.upstream.no_address = Some(why);
                return Err(upstream::no_address_error(ctx.live.peers.name(index), why));
            }
        };
        let mut peer = ctx.live.peers.http_peer(index, &picked);
        ctx.upstream.picked = Some(picked);
        if let Some(after) = self.stale_after(session, ctx) {
            let stale_ok = session.cache.can_serve_stale_error()
                && self.stale_allowed(session.cache.cache_meta(), policy::Stale::IfError);
            if session.cache.enabled() && stale_ok {
                // A stale entry stands by: give the origin `stale_after` to answer; past it the
                // entry is served (`should_serve_stale`) and a background fill takes over.
                let o = &mut peer.options;
                o.read_timeout = o.read_timeout.map(|t| t.min(after));
                o.connection_timeout = o.connection_timeout.map(|t| t.min(after));
                o.total_connection_timeout = o.total_connection_timeout.map(|t| t.min(after));
                ctx.upstream.stale_after = Some(after);
            }
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let req = session.req_header();
        let authority;
        let host = match req.headers.get(http::header::HOST) {
            Some(field) => Some(field),
            None => {
                authority = req.uri.authority().and_then(|a| a.as_str().parse().ok());
                authority.as_ref()
            }
        };
        let seen = forwarding::Seen {
            peer: ctx.peer,
            proto: crate::key::SCHEME,
            host,
        };
        forwarding::rewrite(upstream_request, &seen);
        let (peers, index) = (&ctx.live.peers, ctx.rule().upstream);
        let (fields, host) = peers.fields(index, ctx.upstream.picked.as_ref());
        forwarding::for_upstream(upstream_request, fields, host);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(route) = &ctx.route {
            let retry = upstream::failed_connect(session, ctx, route.rule.upstream);
            if retry {
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.live.peers.set_unreachable(ctx.rule().upstream, false);
        ctx.upstream.status = Some(resp.status.as_u16());
        ctx.upstream.tags = policy::origin_tags(resp);
        ctx.upstream.age = policy::upstream_age(resp);
        if resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            // RFC 9110 §7.6.1: what describes the upstream connection is not forwarded (nor
            // stored); pingora writes this hop's own `Connection` and framing.
            policy::strip_connection_fields(resp);
        }
        policy::ensure_date(resp);
        if resp.status == http::StatusCode::NOT_MODIFIED {
            ctx.upstream.not_modified = Some(Box::new(resp.clone()));
        }
        if !ctx.rule().keep_tag_headers {
            policy::strip_tag_headers(resp);
        }
        let seconds = ctx.upstream.start.map(|s| s.elapsed().as_secs_f64());
        ctx.live.peers.observe(
            ctx.rule().upstream,
            ctx.upstream.picked.as_ref(),
            resp.status.as_str(),
            seconds,
        );
        Ok(())
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let req = session.req_header();
        let rule = ctx.rule();
        let decision = if req.method == http::Method::POST && !resp.status.is_success() {
            // Errors from costly POST endpoints are never cached.
            RespCacheable::Uncacheable(pingora::cache::NoCacheReason::Custom("post-status"))
        } else {
            let auth = req.headers.contains_key(http::header::AUTHORIZATION);
            let now = SystemTime::now();
            // After a 304, pingora's merge updates only a few fields; RFC 9111 §4.3.4 updates
            // every field the 304 carries.
            let merged = ctx
                .upstream
                .not_modified
                .as_deref()
                .map(|not_modified| policy::update_stored_fields(resp, not_modified));
            let resp = merged.as_ref().unwrap_or(resp);
            let limits = policy::Limits {
                max_ttl: ctx.live.config.cache.max_ttl,
                heuristic_max: ctx.live.config.cache.heuristic_max,
                season: ctx
                    .live
                    .config
                    .season_at(crate::clock::calendar_now_ms())
                    .map(|s| (s.name.as_str(), s.ttl_multiplier)),
                serve_stale: (ctx.live.config.protection.iter())
                    .map(|w| w.serve_stale)
                    .max()
                    .unwrap_or_default(),
            };
            policy::cacheability(rule, resp, auth, now, limits)
        };
        let RespCacheable::Cacheable(mut meta) = decision else {
            // Not storable: let other instances waiting on this fill stop waiting now.
            ctx.cache.fill_lock = None;
            return Ok(decision);
        };
        if let Some(ttl) = ctx.terms().and_then(|t| t.ttl) {
            // Aisle-Cache-TTL only ever shortens what the rule allows (saturating: the number
            // is the client's).
            meta.expire_at(policy::time_after(SystemTime::now(), ttl));
        }
        let host = host_of(req);
        let rendered = rule.render_tags(&ctx.view(req, host));
        let tags = match EntryInfo::tags_from(rendered, &ctx.upstream.tags) {
            Ok(tags) => tags,
            Err(too_many) => {
                // A tag dropped would be a purge that misses the entry: not stored instead.
                tracing::warn!(rule = %rule.name, tags = too_many.0, "not stored: more tags than an entry may carry");
                metrics().too_many_tags.inc();
                ctx.cache.fill_lock = None;
                return Ok(RespCacheable::Uncacheable(
                    pingora::cache::NoCacheReason::Custom("too-many-tags"),
                ));
            }
        };
        Arc::new(EntryInfo {
            uri: ctx.route().uri,
            names: Names::new(&key::host_path(host, req.uri.path()), &tags),
            rule: rule.stored.clone(),
            tokens: 0,
        })
        .attach(&mut meta);
        if let Some(lock) = &ctx.cache.fill_lock {
            // The fill keeps the fleet lock until its Redis write lands.
            meta.extensions_mut().insert(lock.clone());
        }
        ctx.cache.stored = true;
        Ok(RespCacheable::Cacheable(meta))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        policy::variance(meta.response_header(), &req.headers)
    }

    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        if session.subrequest_ctx.is_some() {
            // A background fill fetches; it has no client to serve stale to.
            return false;
        }
        // Pingora checked the stored windows, which include any `serve_stale` extension: the
        // entry's own window decides unless a protection window is on.
        let Some(e) = error else {
            // stale-while-revalidate, unless the request itself asked for a validated response.
            return ctx.cache.lookup != Lookup::Refused
                && self.stale_allowed_now(session, policy::Stale::WhileRevalidate);
        };
        if !self.stale_allowed_now(session, policy::Stale::IfError) {
            return false;
        }
        let status = match e.etype() {
            ErrorType::HTTPStatus(code) => Some(*code),
            _ => None,
        };
        let upstream_failed =
            *e.esource() == ErrorSource::Upstream || status.is_some_and(|c| c >= 500);
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::ConnectTimedout
        );
        if timed_out && ctx.upstream.stale_after.is_some() && session.cache.enabled() {
            // The origin missed `stale_after`: serve the entry, and let a background fill (with
            // the full read_timeout) fetch the answer; readers meanwhile get the stale entry.
            let key = key_id(session.cache.cache_key());
            if self.refreshing.start(key, self.fill_horizon(ctx)) {
                if let Some(spawner) = session.subrequest_spawner.as_ref() {
                    spawner.spawn_background_subrequest(
                        session.as_ref(),
                        pingora::proxy::subrequest::Ctx::builder().build(),
                    );
                } else {
                    self.refreshing.finish(key);
                }
            }
            ctx.cache.stale_after = true;
            metrics().stale_after.inc();
        }
        if upstream_failed {
            ctx.cache.stale_error = Some(status);
            if status.is_none() {
                // Pingora will not reuse the client connection after a failed upstream
                // connection or a timed-out answer; say so, or the client's next request on it
                // is reset. (Only the request that met the failure: later ones are answered as
                // hits while the upstream is unreachable or a background fill runs.)
                session.set_keepalive(None);
            }
        }
        upstream_failed
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // RFC 9111 §4.2.4, §5.2.2.2: a stored answer that may not be served stale
        // (`must-revalidate`, `no-cache`, `s-maxage`, or past its stale windows) while the origin
        // cannot be reached: 504, not the connection error's 502.
        let unreachable =
            *e.esource() == ErrorSource::Upstream && !matches!(e.etype(), ErrorType::HTTPStatus(_));
        // The lookup found a stored answer that needed validation (pingora has disabled the
        // cache by now): stale, or ruled out by the request's own `no-cache` / `max-age`.
        let stored = matches!(ctx.cache.lookup, Lookup::Stale | Lookup::Refused);
        if unreachable && stored {
            let sent = control::respond_json(
                session,
                504,
                "{\"error\":\"the origin cannot be reached and the stored answer may not be served stale\"}"
                    .into(),
                "aisle; fwd=stale; detail=revalidation-failed",
            )
            .await;
            if sent.is_ok() {
                return FailToProxy {
                    error_code: 504,
                    can_reuse_downstream: false,
                };
            }
        }
        // No address to send to, or a refused TLS handshake: say which.
        if let Some((code, body, status)) = upstream::failure_answer(ctx, e) {
            if control::respond_json(session, code, body, &status)
                .await
                .is_ok()
            {
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
        }
        // pingora's own answer otherwise.
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            if let Err(e) = session.respond_error(code).await {
                tracing::debug!("could not send the error answer: {e}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let mut answered = self.status(session, ctx);
        self.finish_header(resp, &mut answered)?;
        if ctx.upstream.age > 0 && !resp.headers.contains_key(http::header::AGE) {
            // A miss forwards the origin's Age (RFC 9111 §5.1); answers from storage carry
            // pingora's, which already includes it.
            resp.insert_header(http::header::AGE, ctx.upstream.age.to_string())?;
        }
        ctx.answered = Some(answered);
        let req = session.req_header();
        let success = (200..400).contains(&resp.status.as_u16());
        // RFC 9111 §4.4; except for body-keyed rules, where a POST is a query whose answer
        // is itself cached (it would otherwise evict the entry it just stored).
        let query_post = ctx.rule().needs_body;
        if success && ctx.upstream.status.is_some() && policy::is_unsafe(&req.method) && !query_post
        {
            let c = &self.cache;
            let uri = ctx.route().uri;
            let host = host_of(req);
            invalidate::after_unsafe(
                c.storage,
                &self.invalidator,
                &ctx.live.config,
                req,
                host,
                uri,
                resp,
            )
            .await;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // The request is over: a fleet fill lock it still holds is released now.
        ctx.cache.fill_lock = None;
        if session.subrequest_ctx.is_some() {
            // A background fill ended (stored or not): readers stop being served stale for it.
            if let Some(key) = session.cache.maybe_cache_key() {
                self.refreshing.finish(key_id(key));
            }
        }
        let Some(route) = ctx.route.as_ref() else {
            return;
        };
        let rule = &route.rule;
        let (status, outcome) = match ctx.answered.take() {
            Some(a) => a,
            None => self.status(session, ctx),
        };
        // A refresh whose entry was gone by its lookup (evicted) filled it as a miss.
        let ahead = (ctx.cache.ahead).or(ahead_run(session).map(|_| Ahead::Refreshing));
        match ahead {
            // A refresh-ahead is not a client request: counted as what it did, not as an answer.
            Some(ahead) => {
                let result = match ahead {
                    Ahead::Coalesced => None,
                    Ahead::Quota => Some(RefreshResult::Quota),
                    Ahead::Refreshing
                        if ctx.cache.stored
                            || matches!(session.cache.phase(), CachePhase::Revalidated) =>
                    {
                        Some(RefreshResult::Refreshed)
                    }
                    Ahead::Refreshing => Some(RefreshResult::Failed),
                };
                if let Some(result) = result {
                    rule.metrics.refresh_ahead(result);
                }
            }
            None => rule
                .metrics
                .observe(outcome, ctx.start.elapsed().as_secs_f64()),
        }
        if let (Some(warm), crate::warm::Mark::Client, Some(Admission::Cache(_))) =
            (&self.warm, ctx.warm, &ctx.admission)
        {
            // Popularity counts what a `top` warm job could store again: an answer the cache
            // held or took, not one the origin marked uncacheable (refetching it stores nothing).
            let held = ctx.cache.stored
                || matches!(
                    outcome,
                    CacheOutcome::Hit | CacheOutcome::Stale | CacheOutcome::Revalidated
                );
            let req = session.req_header();
            if held && req.method == http::Method::GET && session.subrequest_ctx.is_none() {
                let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
                warm.popular.record(host_of(req), path);
            }
        }
        if let (Some(cost), CacheOutcome::Hit | CacheOutcome::Stale) = (&rule.cost, outcome) {
            let tokens = ctx.cache.hit_tokens;
            let money = cost.per_request + tokens as f64 / 1000.0 * cost.per_1k_tokens;
            rule.metrics.saved(money, tokens);
        }
        if ctx.upstream.start.is_some() && ctx.upstream.status.is_none() {
            let picked = ctx.upstream.picked.as_ref();
            ctx.live.peers.observe(rule.upstream, picked, "error", None);
        }
        // Every request answered from another's fill, whether it waited on the cache lock or
        // joined the fill while it streamed (counting only lock waiters missed the latter).
        if session.cache.enabled() && status.collapsed {
            metrics().coalesced.inc();
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let key = session
                .cache
                .maybe_cache_key()
                .map(pingora::cache::key::CacheHashKey::primary_bin)
                .or(ctx.cache.key_hash)
                .map(hex::encode);
            tracing::debug!(
                rule = %rule.name,
                method = %session.req_header().method,
                // The path only: a query string may carry an API key or signature.
                path = %session.req_header().uri.path(),
                status = session.response_written().map_or(0, |r| r.status.as_u16()),
                cache_status = %status.to_header_value(),
                key = %key.as_deref().unwrap_or("-"),
                error = e.map(|e| e.to_string()),
                elapsed_ms = ctx.start.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }
        let live = &ctx.live;
        if live.config.log.access && session.subrequest_ctx.is_none() {
            let upstream = match ctx.upstream.start {
                Some(_) => live
                    .config
                    .upstreams
                    .get(rule.upstream)
                    .map_or("-", |u| u.name.as_str()),
                None => "-",
            };
            let time = chrono::DateTime::from_timestamp_millis(crate::clock::now_ms() as i64)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
            let line = access::AccessLine {
                time: &time,
                method: session.req_header().method.as_str(),
                path: session.req_header().uri.path(),
                rule: &rule.name,
                status: session.response_written().map_or(0, |r| r.status.as_u16()),
                cache_status: &status.to_header_value(),
                upstream,
                duration_ms: ctx.start.elapsed().as_secs_f64() * 1000.0,
                bytes: session.body_bytes_sent(),
            }
            .render(live.config.log.format);
            tracing::info!(target: access::TARGET, "{line}");
        }
    }
}
