//! RFC 9111 decisions for a shared cache: may a request use the cache, may a response be stored,
//! for how long, and which headers the stored copy keeps.
//!
//! These are plain functions over headers so they can be tested without a proxy. Pingora's
//! `CacheControl` parser is reused; the rule's own settings (ttl, stale windows, Set-Cookie policy)
//! are layered on top here and nowhere else.

use crate::rules::source::combined;
use crate::rules::Rule;
use http::header::{self, HeaderName};
use pingora::cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora::cache::filters::calculate_expires_header_time;
use pingora::cache::key::HashBinary;
use pingora::cache::VarianceBuilder;
use pingora::cache::{CacheMeta, NoCacheReason, RespCacheable};
use pingora::http::ResponseHeader;
use smallvec::SmallVec;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the request's own `Cache-Control` / `Pragma` ask of the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    /// Neither use nor store.
    pub no_store: bool,
    /// Do not use a stored response without revalidating it (`no-cache`, `Pragma: no-cache`).
    pub no_cache: bool,
    /// Only accept a stored response at most this old.
    pub max_age: Option<u32>,
    /// Answer from the cache or with 504, never from the origin.
    pub only_if_cached: bool,
    /// The request carries `Authorization` (RFC 9111 §3.5).
    pub authorization: bool,
}

impl RequestDirectives {
    /// Reads a request's head (`Cache-Control`, `Pragma`, `Authorization`).
    pub fn parse(headers: &http::HeaderMap) -> Self {
        let mut d = RequestDirectives {
            authorization: headers.contains_key(http::header::AUTHORIZATION),
            ..RequestDirectives::default()
        };
        if let Some(cc) = cache_control(headers) {
            d.no_store = cc.no_store;
            d.no_cache = cc.no_cache;
            d.max_age = cc.parsed().max_age().ok().flatten();
            d.only_if_cached = cc.parsed().only_if_cached();
        } else if headers
            .get_all(http::header::PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
        {
            // RFC 9111 §5.4: Pragma counts only when Cache-Control is absent.
            d.no_cache = true;
        }
        d
    }

    /// Whether the request carries any cache directive at all (the common case is none).
    pub fn any(&self) -> bool {
        self.no_store || self.no_cache || self.max_age.is_some() || self.only_if_cached
    }
}

/// Whether a stored response may answer a request with `Authorization` (RFC 9111 §3.5).
pub fn serves_authorized(stored: &ResponseHeader) -> bool {
    response_cache_control(stored).is_some_and(|cc| cc.authorized)
}

/// Statuses RFC 9110 §15.1 makes heuristically cacheable: stored with explicit freshness, or
/// with heuristic freshness from `Last-Modified` (RFC 9111 §4.2.2).
fn heuristic_status(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses whose caching requirements this cache knows (RFC 9111 §5.2.2.3 `must-understand`):
/// the heuristically cacheable ones, the other redirects, and client and server errors with no
/// special caching rules.
fn understood_status(status: u16) -> bool {
    heuristic_status(status)
        || matches!(status, 302 | 303 | 307 | 400 | 403 | 500 | 502 | 503 | 504)
}

/// Whether a final status may be stored at all (RFC 9111 §3): any final status may, given
/// explicit freshness, except 206 (a part: entries here are whole answers; ranges are served
/// from those) and 304 (it only updates a stored answer, §4.3.4). 1xx are not final.
fn storable_status(status: u16) -> bool {
    (200..=999).contains(&status) && status != 206 && status != 304
}

/// Statuses a rule's `ttl` applies to; others keep the origin's own freshness (a rule's 30
/// minutes should not pin a 404 or a temporary redirect).
fn rule_ttl_status(status: u16) -> bool {
    matches!(status, 200 | 203 | 204 | 300 | 301 | 308)
}

/// The response's caching directives: `CDN-Cache-Control` (RFC 9213) when present and valid,
/// since a gateway is the CDN-like cache it targets; otherwise `Cache-Control`.
pub fn response_cache_control(resp: &ResponseHeader) -> Option<Arc<Directives>> {
    cdn_cache_control(&resp.headers)
        .map(|cc| Arc::new(Directives::new(cc)))
        .or_else(|| cache_control(&resp.headers))
}

/// A message's caching directives as pingora's parser reads them, with the answers the storing
/// decision ([`cacheability`]) asks of every proxied answer read out once, when the line is
/// parsed. Each of pingora's accessors is a lookup in its map of directives (a SipHash of the
/// name, about 250 instructions), and a remembered line ([`cache_control`]) was asked the same
/// questions again on every answer that sent it: three on a pass, a dozen on a miss (issue 16).
/// The answers are pingora's own accessors', so the two cannot disagree.
#[derive(Debug)]
pub struct Directives {
    cc: CacheControl,
    pub private: bool,
    pub no_store: bool,
    /// RFC 9111 §5.2.2.3.
    pub must_understand: bool,
    pub no_cache: bool,
    pub public: bool,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: no serving stale (RFC 9111 §4.2.4,
    /// §5.2.2.10).
    pub revalidate: bool,
    /// A directive that lets a shared cache store an answer to a request with `Authorization`
    /// (RFC 9111 §3.5).
    pub authorized: bool,
    /// `s-maxage`, else `max-age` (zero with `no-cache`), as pingora reads them.
    pub fresh: Option<Duration>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
}

impl Directives {
    fn new(cc: CacheControl) -> Self {
        Directives {
            private: cc.private(),
            no_store: cc.no_store(),
            must_understand: cc.has_key("must-understand"),
            no_cache: cc.no_cache(),
            public: cc.public(),
            revalidate: cc.must_revalidate() || cc.proxy_revalidate() || cc.has_key("s-maxage"),
            authorized: cc.allow_caching_authorized_req(),
            fresh: cc.fresh_duration(),
            stale_while_revalidate: cc.serve_stale_while_revalidate_duration(),
            stale_if_error: cc.serve_stale_if_error_duration(),
            cc,
        }
    }

    /// Pingora's parse, for what the summary does not answer.
    pub fn parsed(&self) -> &CacheControl {
        &self.cc
    }
}

/// Field lines longer than this are parsed every time rather than remembered.
const REMEMBERED_LINE: usize = 256;
/// Distinct lines a thread remembers; when full, it forgets them all and starts again.
const REMEMBERED_LINES: usize = 256;

thread_local! {
    /// `Cache-Control` lines parsed on this thread, by their bytes.
    static PARSED: RefCell<HashMap<Box<[u8]>, Arc<Directives>, ahash::RandomState>> =
        RefCell::new(HashMap::with_hasher(ahash::RandomState::new()));
}

/// A message's `Cache-Control`, as pingora's parser reads it (`None` when it has none).
///
/// An origin sends a handful of distinct lines (`no-store`, `public, max-age=3600`) over and
/// over, and the parser (a regex, then a map of owned directives) cost 4k instructions of every
/// proxied answer (issue 16, the `pass` profile). So a single line of at most
/// [`REMEMBERED_LINE`] bytes is parsed once per thread and its result shared; the memory is
/// bounded ([`REMEMBERED_LINES`] lines a thread, forgotten together when full), so a peer
/// sending endless distinct lines only costs the parse it always cost. Several lines are one
/// list (RFC 9110 §5.3) and are parsed together, as before.
fn cache_control(headers: &http::HeaderMap) -> Option<Arc<Directives>> {
    let mut lines = headers.get_all(http::header::CACHE_CONTROL).iter();
    let line = lines.next()?.as_bytes();
    let parse = || {
        CacheControl::from_headers_named("cache-control", headers)
            .map(|cc| Arc::new(Directives::new(cc)))
    };
    if lines.next().is_some() || line.len() > REMEMBERED_LINE {
        return parse();
    }
    PARSED.with(|parsed| {
        if let Some(cc) = parsed.borrow().get(line) {
            return Some(cc.clone());
        }
        let cc = parse()?;
        let mut parsed = parsed.borrow_mut();
        if parsed.len() >= REMEMBERED_LINES {
            parsed.clear();
        }
        parsed.insert(line.into(), cc.clone());
        Some(cc)
    })
}

/// `CDN-Cache-Control` read as RFC 9213 §2.1 says: a Structured Field Dictionary (RFC 8941)
/// whose delta-seconds directives are non-negative Integers and whose other known directives are
/// Booleans (`private` and `no-cache` may also name fields with a String or an inner list of
/// Strings). A field that does not parse, or holds a known directive of the wrong type (say
/// `max-age="10"` or `max-age=1.5`), is invalid as a whole, and the cache falls back to
/// `Cache-Control` (§2.2). Unknown directives are ignored, as in `Cache-Control`.
fn cdn_cache_control(headers: &http::HeaderMap) -> Option<CacheControl> {
    use sfv::{BareItem, ListEntry};
    const SECONDS: [&str; 4] = [
        "max-age",
        "s-maxage",
        "stale-while-revalidate",
        "stale-if-error",
    ];
    const FLAGS: [&str; 8] = [
        "no-store",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "no-transform",
        "immutable",
        "must-understand",
        "only-if-cached",
    ];
    static CDN_CACHE_CONTROL: http::HeaderName = http::HeaderName::from_static("cdn-cache-control");
    let mut lines = headers.get_all(&CDN_CACHE_CONTROL).iter().peekable();
    lines.peek()?;
    // Several field lines are one list (RFC 9110 §5.3).
    let joined: Vec<u8> = lines
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b", "[..]);
    let dict = sfv::Parser::parse_dictionary(&joined).ok()?;
    let mut out = String::new();
    for (name, entry) in &dict {
        let name = name.as_str();
        let text = match entry {
            ListEntry::Item(item) => match &item.bare_item {
                BareItem::Integer(n) if SECONDS.contains(&name) => {
                    if *n < 0 {
                        return None;
                    }
                    format!("{name}={n}")
                }
                _ if SECONDS.contains(&name) => return None,
                BareItem::Boolean(true) if FLAGS.contains(&name) => name.to_string(),
                BareItem::Boolean(false) if FLAGS.contains(&name) => continue,
                _ if FLAGS.contains(&name) => return None,
                BareItem::Boolean(true) if matches!(name, "private" | "no-cache") => {
                    name.to_string()
                }
                BareItem::Boolean(false) if matches!(name, "private" | "no-cache") => continue,
                BareItem::String(fields) if matches!(name, "private" | "no-cache") => {
                    format!("{name}=\"{}\"", fields.replace(['"', '\\'], ""))
                }
                _ if matches!(name, "private" | "no-cache") => return None,
                _ => continue,
            },
            ListEntry::InnerList(list) if matches!(name, "private" | "no-cache") => {
                let mut fields = Vec::new();
                for item in &list.items {
                    match &item.bare_item {
                        BareItem::String(f) | BareItem::Token(f) => {
                            fields.push(f.replace(['"', '\\'], ""))
                        }
                        _ => return None,
                    }
                }
                format!("{name}=\"{}\"", fields.join(", "))
            }
            ListEntry::InnerList(_) if SECONDS.contains(&name) || FLAGS.contains(&name) => {
                return None
            }
            ListEntry::InnerList(_) => continue,
        };
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&text);
    }
    let mut map = http::HeaderMap::new();
    // Even a field with no known directive (`CDN-Cache-Control: none`) targets this cache:
    // it means "no directives", not "fall back" (RFC 9213 §3.1).
    map.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_str(&out).ok()?,
    );
    CacheControl::from_headers_named("cache-control", &map)
}

/// What a delta-seconds value too large to represent counts as (RFC 9111 §1.2.2): 2^31
/// seconds, 68 years, so an answer that old is stale whatever its `max-age`.
pub const DELTA_SECONDS_OVERFLOW: u64 = 1 << 31;

/// RFC 9111 §1.2.2 `delta-seconds` (`1*DIGIT`): `None` when not one; values past 2^31,
/// however many digits they have, are 2^31.
pub fn delta_seconds(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(n.min(DELTA_SECONDS_OVERFLOW))
}

/// The upstream's `Age` in seconds (RFC 9111 §5.1): 0 when absent or not delta-seconds, at most
/// 2^31 ([`DELTA_SECONDS_OVERFLOW`]). `Age` is a singleton: of several values (field lines, or a
/// comma list on one line) the first counts, as §4.2.1 says of duplicated freshness
/// information. A value that is not `1*DIGIT` (negative, fractional, words) is ignored; a
/// `;parameter` after the digits is not part of the value.
pub fn upstream_age(resp: &ResponseHeader) -> u64 {
    let Some(first) = resp.headers.get(http::header::AGE) else {
        return 0;
    };
    let value = first.as_bytes();
    let value = value.split(|&b| b == b',').next().unwrap_or_default();
    let value = value.split(|&b| b == b';').next().unwrap_or_default();
    delta_seconds(value).unwrap_or(0)
}

/// The freshness lifetime `Expires` gives (RFC 9111 §4.2.1): `Expires - Date`, both on the
/// origin's clock, so a skewed clock cannot stretch it; without a valid `Date`, the time of
/// receipt. The caller takes `Age` off it, as for `max-age` (Varnish reads it the same way).
/// An invalid `Expires` is a time in the past (§5.3); more than one gives `None` (no freshness).
fn expires_lifetime(resp: &ResponseHeader, now: SystemTime) -> Option<Duration> {
    let expires = calculate_expires_header_time(resp)?;
    let date = resp
        .headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or_default())
}

/// The default longest heuristic freshness lifetime (RFC 9111 §4.2.2; `[cache] heuristic_max`),
/// as Squid and Traffic Server cap it; `[cache] max_ttl` caps it further.
pub const HEURISTIC_MAX: Duration = Duration::from_secs(86_400);

/// The configured caps on what a response's freshness can be.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// `[cache] max_ttl`: no lifetime (freshness, stale windows) is longer.
    pub max_ttl: Duration,
    /// `[cache] heuristic_max`: the longest heuristic freshness.
    pub heuristic_max: Duration,
    /// The `[[season]]` on at fill time (name, `ttl_multiplier`): the rule's TTL is
    /// [`Rule::ttl_in`] it. Only new fills see a season change; keys never do.
    pub season: Option<(&'a str, f64)>,
    /// The longest `serve_stale` of the configured `[[protection]]` windows: stored windows are
    /// this much longer than the entry's own (kept in [`STALE_HEADER`]), so that a window
    /// switched on later can serve it stale longer ([`stale_allowed`]). Not capped by
    /// `max_ttl`: the operator asked for exactly this much.
    pub serve_stale: Duration,
}

impl Limits<'static> {
    /// `max_ttl` with the default heuristic cap, outside every season, no protection window.
    pub fn new(max_ttl: Duration) -> Limits<'static> {
        Limits {
            max_ttl,
            heuristic_max: HEURISTIC_MAX,
            season: None,
            serve_stale: Duration::ZERO,
        }
    }
}

/// A stored-only field with the entry's own stale windows (`swr=60, sie=3600`) when the stored
/// ones include a protection window's `serve_stale`. Stored with the header so it survives
/// both tiers; never sent (the response filter removes it) and never taken from an origin.
pub const STALE_HEADER: &str = "aisle-stale";
/// [`STALE_HEADER`] as a header name, for the hit path (no parse per request).
pub const STALE_FIELD: http::HeaderName = http::HeaderName::from_static(STALE_HEADER);

/// Why a 5xx answer was not stored: request-specific for the predictor (see `server.rs`).
pub const ORIGIN_ERROR: &str = "origin-error";

/// Which stale window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    WhileRevalidate,
    IfError,
}

/// The entry's own window of `kind`, in seconds: from [`STALE_HEADER`], else the stored one.
fn own_window(meta: &CacheMeta, kind: Stale) -> u32 {
    let (name, stored) = match kind {
        Stale::WhileRevalidate => ("swr", meta.stale_while_revalidate_sec()),
        Stale::IfError => ("sie", meta.stale_if_error_sec()),
    };
    let Some(value) = meta.response_header().headers.get(STALE_FIELD) else {
        return stored;
    };
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .map_or(stored, |own: u32| own.min(stored))
}

/// Whether `meta` may be served stale (`kind`) at `now`: within its own window, or, while a
/// protection window is on (`extension`: its `serve_stale`), up to that much longer, never
/// past the window it was stored with.
pub fn stale_allowed(meta: &CacheMeta, kind: Stale, now: SystemTime, extension: Duration) -> bool {
    let stored = match kind {
        Stale::WhileRevalidate => meta.serve_stale_while_revalidate(now),
        Stale::IfError => meta.serve_stale_if_error(now),
    };
    if !stored {
        return false;
    }
    let stale_for = now.duration_since(meta.fresh_until()).unwrap_or_default();
    stale_for <= Duration::from_secs(own_window(meta, kind).into()).saturating_add(extension)
}

/// Refresh-ahead (a rule's `refresh_ahead`, the fraction `ahead`): whether a hit at `now_ms` on
/// an entry stored at `stored_ms` and fresh until `fresh_until_ms` (unix ms) is past its refresh
/// point, so it should start a background refresh. Only fresh entries are due (a stale one is
/// stale-while-revalidate's or a refetch's business). The one predicate the proxy
/// (`cache_hit_filter`) and `aisle replay` both use, so the replay predicts the gateway.
pub fn refresh_due(stored_ms: i64, fresh_until_ms: i64, now_ms: i64, ahead: f64) -> bool {
    let lifetime = fresh_until_ms.saturating_sub(stored_ms);
    if now_ms >= fresh_until_ms || lifetime <= 0 {
        return false;
    }
    let point = stored_ms.saturating_add((lifetime as f64 * ahead).ceil() as i64);
    now_ms >= point
}

/// Unix milliseconds of `t` (0 before 1970), for [`refresh_due`].
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// Heuristic freshness (RFC 9111 §4.2.2): 10% of the time since `Last-Modified` (on the origin's
/// clock: `Date`, or the time of receipt), at most `cap`. `None`
/// without a valid `Last-Modified`, or when it is not before `Date`.
fn heuristic_lifetime(resp: &ResponseHeader, now: SystemTime, cap: Duration) -> Option<Duration> {
    let date_of = |name: http::header::HeaderName| {
        let mut values = resp.headers.get_all(name).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        httpdate::parse_http_date(first.to_str().ok()?).ok()
    };
    let modified = date_of(http::header::LAST_MODIFIED)?;
    let date = date_of(http::header::DATE).unwrap_or(now);
    let since = date.duration_since(modified).ok()?;
    let lifetime = (since / 10).min(cap);
    (!lifetime.is_zero()).then_some(lifetime)
}

/// `t + d`, saturating: lifetimes come from origins, rules and clients, and a sum past what a
/// `SystemTime` holds must cap rather than panic. (Every lifetime is then capped by `max_ttl`.)
pub fn time_after(t: SystemTime, d: Duration) -> SystemTime {
    /// Year ~141,000: later than any lifetime needs, early enough to serialize anywhere.
    const FAR: Duration = Duration::from_secs(1 << 42);
    let far = (UNIX_EPOCH + FAR).max(t);
    t.checked_add(d).map_or(far, |end| end.min(far))
}

/// `Vary: *` can never be matched by a later request.
fn vary_star(resp: &ResponseHeader) -> bool {
    resp.headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*")
}

/// Decides whether `resp` may be stored under `rule`, and builds its `CacheMeta` if so.
///
/// A 5xx not stored says nothing lasting about the key: its reason is [`ORIGIN_ERROR`], which
/// the predictor ignores, or the key's lookups would be skipped and a stored answer could no
/// longer be served stale (a protection window switched on after the origin failed).
pub fn cacheability(
    rule: &Rule,
    resp: &ResponseHeader,
    authorization_present: bool,
    now: SystemTime,
    limits: Limits<'_>,
) -> RespCacheable {
    match decide(rule, resp, authorization_present, now, limits) {
        RespCacheable::Uncacheable(_) if resp.status.is_server_error() => {
            RespCacheable::Uncacheable(NoCacheReason::Custom(ORIGIN_ERROR))
        }
        decision => decision,
    }
}

fn decide(
    rule: &Rule,
    resp: &ResponseHeader,
    authorization_present: bool,
    now: SystemTime,
    limits: Limits<'_>,
) -> RespCacheable {
    use RespCacheable::Uncacheable;
    let max_ttl = limits.max_ttl;
    let status = resp.status.as_u16();
    if !storable_status(status) {
        // A 5xx says nothing lasting about the key: the predictor must not skip its lookups, or
        // a stored answer could no longer be served stale (a protection window switched on
        // after the origin failed) nor stored again once the origin recovers.
        let reason = if status >= 500 {
            ORIGIN_ERROR
        } else {
            "status"
        };
        return Uncacheable(NoCacheReason::Custom(reason));
    }
    if vary_star(resp) {
        return Uncacheable(NoCacheReason::Custom("vary-star"));
    }
    let has_set_cookie = resp.headers.contains_key(http::header::SET_COOKIE);
    if has_set_cookie && !rule.cache_set_cookie {
        return Uncacheable(NoCacheReason::Custom("set-cookie"));
    }
    let cc = response_cache_control(resp);
    // RFC 9111 §5.2.2.3: `must-understand` stores only statuses whose caching rules this cache
    // knows, and for those it overrides the `no-store` sent along for older caches.
    let must_understand = cc.as_ref().is_some_and(|cc| cc.must_understand);
    if must_understand && !understood_status(status) {
        return Uncacheable(NoCacheReason::Custom("must-understand"));
    }
    if cc
        .as_ref()
        .is_some_and(|cc| cc.private || (cc.no_store && !must_understand))
    {
        return Uncacheable(NoCacheReason::OriginNotCache);
    }
    // `authorization = "isolate"` / `"share"`: the credential is in the key, or the upstream's
    // own; §3.5 is for caches that cannot tell callers apart.
    if authorization_present
        && !rule.authorization.handles_authorization()
        && !cc.as_ref().is_some_and(|cc| cc.authorized)
    {
        return Uncacheable(NoCacheReason::Custom("authorization"));
    }

    let age = upstream_age(resp);
    let no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache);
    let explicit = cc
        .as_ref()
        .and_then(|cc| cc.fresh)
        // Every delta-seconds past 2^31 is 2^31 (pingora keeps up to 2^32 - 1), so an
        // overflowed Age is always at least the max-age it is compared with.
        .map(|d| d.min(Duration::from_secs(DELTA_SECONDS_OVERFLOW)))
        .or_else(|| expires_lifetime(resp, now));
    let lifetime = match explicit {
        Some(d) => Some(d),
        // Without explicit freshness only heuristically cacheable statuses, or any status
        // marked `public`, are stored, and only when `Last-Modified` allows a heuristic
        // (§4.2.2, §3): nothing gets a default TTL.
        None if heuristic_status(status) || cc.as_ref().is_some_and(|cc| cc.public) => {
            heuristic_lifetime(resp, now, limits.heuristic_max.min(max_ttl))
        }
        None => None,
    };
    let fresh_until = match rule.ttl_in(limits.season) {
        _ if no_cache => Some(now - Duration::from_secs(1)),
        Some(ttl) if rule_ttl_status(status) => Some(time_after(now, ttl)),
        _ => lifetime.map(|lifetime| {
            let remaining = lifetime.saturating_sub(Duration::from_secs(age));
            if remaining.is_zero() {
                now - Duration::from_secs(1)
            } else {
                time_after(now, remaining)
            }
        }),
    };
    let Some(fresh_until) = fresh_until else {
        // No freshness, explicit or heuristic: nothing gets a default TTL.
        return Uncacheable(NoCacheReason::Custom("no-freshness"));
    };
    let fresh_until = fresh_until.min(time_after(now, max_ttl));

    // RFC 9111 §4.2.4: these forbid serving the response stale; `s-maxage` carries
    // `proxy-revalidate` for shared caches (§5.2.2.10), and `no-cache` requires a validation
    // before every reuse (§5.2.2.4).
    let no_stale = no_cache || cc.as_ref().is_some_and(|cc| cc.revalidate);
    let window = |rule_value: Option<Duration>, origin: Option<Duration>| -> u32 {
        if no_stale {
            return 0;
        }
        rule_value
            .or(origin)
            .map_or(0, |d| d.min(max_ttl).as_secs().min(u32::MAX as u64) as u32)
    };
    let swr = window(
        rule.stale_while_revalidate,
        cc.as_ref().and_then(|cc| cc.stale_while_revalidate),
    );
    let sie = window(
        rule.stale_if_error,
        cc.as_ref().and_then(|cc| cc.stale_if_error),
    );

    let mut stored = resp.clone();
    if let Some(cc) = &cc {
        cc.parsed().strip_private_headers(&mut stored);
    }
    // A cookie is never replayed to another client, even when the rule allows storing.
    stored.remove_header(&http::header::SET_COOKIE);
    // Age is recomputed on every answer from cache.
    stored.remove_header(&http::header::AGE);
    strip_hop_by_hop(&mut stored);

    // Never the origin's (nor a 304's merged into the stored one): only this decision says
    // what the entry's own windows are.
    stored.remove_header(&STALE_FIELD);
    let extra = if no_stale {
        0
    } else {
        limits.serve_stale.as_secs().min(u32::MAX as u64) as u32
    };
    if extra > 0 {
        let own = format!("swr={swr}, sie={sie}");
        // Only digits, '=', ',' and spaces: always a valid field value.
        let _ = stored.insert_header(STALE_HEADER, own);
    }
    let (swr, sie) = (swr.saturating_add(extra), sie.saturating_add(extra));
    let mut meta = CacheMeta::new(fresh_until, now, swr, sie, stored);
    if age > 0 {
        // Not before 1970: pingora serializes the epoch as time since then (the Redis tier).
        let epoch = now
            .checked_sub(Duration::from_secs(age))
            .map_or(UNIX_EPOCH, |t| t.max(UNIX_EPOCH));
        meta.set_epoch_override(epoch);
    }
    RespCacheable::Cacheable(meta)
}

/// Gives a response without `Date` the time it was received (RFC 9110 §6.6.1: a recipient with
/// a clock adds it to what it caches or forwards), so a stored copy keeps that time on every hit
/// instead of the time of each answer.
pub fn ensure_date(resp: &mut ResponseHeader) {
    if resp.headers.get(http::header::DATE).is_none() {
        let now = httpdate::fmt_http_date(SystemTime::now());
        // An IMF-fixdate is always a valid field value.
        let _ = resp.insert_header(http::header::DATE, now);
    }
}

/// Hop-by-hop fields beyond those [`strip_connection_fields`] removes: they describe one
/// message's transfer, not the response (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 4] = [
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

/// Removes the hop-by-hop fields and every field `Connection` names (RFC 9110 §7.6.1): a
/// cache removes them before storing (RFC 9111 §3.1). Framing (`Transfer-Encoding`) goes too:
/// pingora frames every answer from storage itself.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    strip_connection_fields(resp);
    drop_fields(resp, |name| HOP_BY_HOP.contains(name));
}

/// Removes the fields `Connection` names and the connection-describing ones (`Connection`,
/// `Keep-Alive`, `Proxy-Connection`) before a response is forwarded (RFC 9110 §7.6.1). The
/// message's framing (`Transfer-Encoding`, `Content-Length`) stays: the body is still being
/// relayed under it.
pub fn strip_connection_fields(resp: &mut ResponseHeader) {
    // Read in one pass over the fields the answer has, instead of a removal by spelled name
    // (a parse and a lookup each) for every candidate present or not (issue 16: 3k of a `pass`
    // request's instructions). The names `Connection` lists are kept as the text they are
    // (compared ignoring case, as a parsed name would be), on the stack: nothing is parsed or
    // allocated for the `keep-alive` or `close` nearly every answer sends. `keep-alive` is not
    // kept: the field it names goes anyway. Each field's name is compared as a `HeaderName`
    // (a standard name is one byte), not spelled out, and only against what it could be.
    let mut named: SmallVec<[&str; 4]> = SmallVec::new();
    for value in resp.headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        named.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("keep-alive")),
        );
    }
    let doomed = doomed_fields(resp, |name| {
        CONNECTION_FIELDS.contains(name)
            || (!named.is_empty()
                && *name != header::CONTENT_LENGTH
                && *name != header::TRANSFER_ENCODING
                && named.iter().any(|t| t.eq_ignore_ascii_case(name.as_str())))
    });
    drop(named);
    for name in &doomed {
        resp.remove_header(name);
    }
}

/// The fields that describe the connection itself (RFC 9110 §7.6.1).
static CONNECTION_FIELDS: [HeaderName; 3] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes every field whose name `drop` picks, looking at each name the header has once.
fn drop_fields(resp: &mut ResponseHeader, drop: impl Fn(&http::HeaderName) -> bool) {
    for name in &doomed_fields(resp, drop) {
        resp.remove_header(name);
    }
}

/// The names of the fields `drop` picks, on the stack for the few a message drops.
fn doomed_fields(
    resp: &ResponseHeader,
    drop: impl Fn(&http::HeaderName) -> bool,
) -> SmallVec<[http::HeaderName; 4]> {
    resp.headers.keys().filter(|n| drop(n)).cloned().collect()
}

/// The stored answer's fields updated by a `304` (RFC 9111 §4.3.4, §3.2): every field the 304
/// carries replaces the stored one, except `Content-Length` (it describes the 304), the
/// connection's fields, and `Vary` (the stored variant was selected by the old one).
pub fn update_stored_fields(
    stored: &ResponseHeader,
    not_modified: &ResponseHeader,
) -> ResponseHeader {
    let mut out = stored.clone();
    let mut fresh = not_modified.clone();
    strip_hop_by_hop(&mut fresh);
    let mut replaced: Vec<&http::HeaderName> = Vec::new();
    for (name, value) in fresh.headers.iter() {
        if matches!(
            name.as_str(),
            "content-length" | "vary" | "content-range" | "content-encoding"
        ) {
            continue;
        }
        if replaced.contains(&name) {
            let _ = out.append_header(name.clone(), value.clone());
        } else {
            let _ = out.insert_header(name.clone(), value.clone());
            replaced.push(name);
        }
    }
    out
}

/// The header names of a response's `Vary` (lowercased), for the variance key.
pub fn vary_names(resp: &ResponseHeader) -> Vec<String> {
    let mut names: Vec<String> = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The variance key of a request against a stored response's `Vary` (RFC 9111 §4.1): for each
/// named header, all of the request's field lines combined as RFC 9110 §5.3 says (`Cookie` with
/// `; `, [`combined`]), so a second line cannot hide behind the first; and an absent header kept
/// apart from an empty one. `None` when the response has no `Vary`.
pub fn variance(resp: &ResponseHeader, req: &http::HeaderMap) -> Option<HashBinary> {
    let names = vary_names(resp);
    if names.is_empty() {
        return None;
    }
    let mut builder = VarianceBuilder::new();
    for name in names {
        let value = http::HeaderName::from_bytes(name.as_bytes())
            .ok()
            .and_then(|n| combined(req, &n).map(|v| normalize_list_value(&name, &v)))
            // No field value can contain NUL, so this marks "absent" apart from every value,
            // including the empty one.
            .unwrap_or_else(|| vec![0]);
        builder.add_owned_name_value(name, value);
    }
    builder.finalize()
}

/// Request fields whose values compare case-insensitively (content codings, language tags,
/// charsets: RFC 9110 §8.4.1, §8.5.1 and RFC 4647, and §12.5).
const CASE_INSENSITIVE_FIELDS: [&str; 3] = ["accept-encoding", "accept-language", "accept-charset"];

/// A request field value as stored variants compare it (RFC 9111 §4.1 allows normalizing): the
/// optional whitespace around list commas removed, and lowercased for the fields above. So
/// `gzip,deflate`, `gzip, deflate` and `GZIP , Deflate` select the same variant; the order of
/// the members still counts (it may carry preference).
fn normalize_list_value(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for (i, member) in value.split(|&b| b == b',').enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(member.trim_ascii());
    }
    if CASE_INSENSITIVE_FIELDS.contains(&name) {
        out.make_ascii_lowercase();
    }
    out
}

/// Response headers through which an origin tags its responses.
static TAG_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("surrogate-key"),
    HeaderName::from_static("cache-tag"),
    HeaderName::from_static("xkey"),
    HeaderName::from_static("cache-groups"),
];

/// RFC 9875 `Cache-Groups` / `Cache-Group-Invalidation`: a list of quoted strings.
pub fn cache_groups(resp: &ResponseHeader, name: &str) -> Vec<String> {
    resp.headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|g| g.trim().trim_matches('"').to_string())
        .filter(|g| !g.is_empty() && !g.contains(char::is_whitespace))
        .collect()
}

/// Tags the origin attached: `Surrogate-Key` and `xkey` (space separated), `Cache-Tag` (comma
/// separated), `Cache-Groups` (RFC 9875).
pub fn origin_tags(resp: &ResponseHeader) -> Vec<String> {
    let mut tags = Vec::new();
    // Most answers carry no tag field: one look at the names the answer has, rather than four
    // lookups by spelled name.
    if !resp.headers.keys().any(|n| TAG_HEADERS.contains(n)) {
        return tags;
    }
    for name in ["surrogate-key", "xkey"] {
        for v in resp
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            tags.extend(v.split_whitespace().map(str::to_string));
        }
    }
    for v in resp
        .headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        tags.extend(
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        );
    }
    tags.extend(cache_groups(resp, "cache-groups"));
    tags.sort();
    tags.dedup();
    tags
}

/// Removes the origin's tag headers (they are for the gateway, not for clients).
pub fn strip_tag_headers(resp: &mut ResponseHeader) {
    drop_fields(resp, |name| TAG_HEADERS.contains(name));
}

/// Methods whose success invalidates stored responses for the URI (RFC 9111 §4.4).
pub fn is_unsafe(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context};
    use std::path::Path;
    use std::sync::Arc;

    fn rule(extra: &str) -> Arc<Rule> {
        let ups = vec!["api".to_string()];
        let ctx = Context::with_upstreams(&ups);
        let text = format!("[[rule]]\nname = \"r\"\nmatch = {{ path = \"/r\" }}\n{extra}\n");
        compile(&[(Path::new("r.toml"), &text)], &ctx)
            .unwrap()
            .rules()[0]
            .clone()
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn stored(rule: &Rule, r: &ResponseHeader, auth: bool) -> Option<CacheMeta> {
        match cacheability(
            rule,
            r,
            auth,
            SystemTime::now(),
            Limits::new(Duration::from_secs(86_400)),
        ) {
            RespCacheable::Cacheable(m) => Some(m),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn origin_freshness() {
        let r = rule("");
        assert!(
            stored(&r, &resp(200, &[]), false).is_none(),
            "no default TTL"
        );
        let m = stored(&r, &resp(200, &[("cache-control", "max-age=60")]), false).unwrap();
        assert!((55..=60).contains(&m.fresh_sec()));
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "max-age=60, s-maxage=600")]),
            false,
        )
        .unwrap();
        assert!(m.fresh_sec() > 500, "s-maxage wins for a shared cache");
        assert!(stored(
            &r,
            &resp(200, &[("cache-control", "no-store, max-age=60")]),
            false
        )
        .is_none());
        assert!(stored(
            &r,
            &resp(200, &[("cache-control", "private, max-age=60")]),
            false
        )
        .is_none());
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "no-cache, max-age=60")]),
            false,
        )
        .unwrap();
        assert!(
            !m.is_fresh(SystemTime::now()),
            "no-cache is stored but always revalidated"
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let m = stored(&r, &resp(200, &[("expires", &later)]), false).unwrap();
        assert!(m.fresh_sec() > 100);
    }

    #[test]
    fn upstream_age_counts() {
        let r = rule("");
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "max-age=3600"), ("age", "100")]),
            false,
        )
        .unwrap();
        let left = m
            .fresh_until()
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((3490..=3500).contains(&left), "{left}");
        assert!(m.age() >= Duration::from_secs(100));
        assert!(m.response_header().headers.get("age").is_none());
    }

    #[test]
    fn an_age_too_large_to_represent_is_2_pow_31_and_stale() {
        // Issue 9, item 14: u64::MAX panicked (`now - age`); one more digit parsed as 0 (fresh).
        let r = rule("");
        for age in [
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999",
            "2147483648",
            "4000000000",
        ] {
            let m = stored(
                &r,
                &resp(200, &[("cache-control", "max-age=3600"), ("age", age)]),
                false,
            )
            .unwrap();
            assert!(!m.is_fresh(SystemTime::now()), "Age {age} is stale");
            assert!(m.epoch() >= UNIX_EPOCH, "Age {age}: epoch not before 1970");
            assert!(
                m.serialize().is_ok(),
                "Age {age}: the Redis tier can store it"
            );
        }
        assert_eq!(delta_seconds(b"18446744073709551615"), Some(1 << 31));
        assert_eq!(delta_seconds(b"18446744073709551616"), Some(1 << 31));
        assert_eq!(delta_seconds(b" 42 "), Some(42));
        assert_eq!(delta_seconds(b"0"), Some(0));
        for invalid in [&b""[..], b"-1", b"+5", b"1.5", b"1e3", b"12 34", b"\xff"] {
            assert_eq!(delta_seconds(invalid), None, "{invalid:?}");
        }
        // max-age is a delta-seconds too: 4294967295 is 2^31, which an Age of 2^31 uses up.
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("cache-control", "max-age=4294967295"),
                    ("age", "2200000000"),
                ],
            ),
            false,
        )
        .unwrap();
        assert!(!m.is_fresh(SystemTime::now()));
        // Not delta-seconds: ignored (RFC 9111 §4.2.3: 0 when not available), so still fresh.
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "max-age=3600"), ("age", "-5")]),
            false,
        )
        .unwrap();
        assert!(m.is_fresh(SystemTime::now()));
    }

    #[test]
    fn expires_counts_from_date_and_age_shortens_it() {
        let r = rule("");
        let now = SystemTime::now();
        let http = |t: SystemTime| httpdate::fmt_http_date(t);
        let left = |m: &CacheMeta| {
            m.fresh_until()
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs())
        };
        // An origin clock an hour ahead: 60 s of freshness, not an hour and a minute.
        let ahead = now + Duration::from_secs(3600);
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("date", &http(ahead)),
                    ("expires", &http(ahead + Duration::from_secs(60))),
                ],
            ),
            false,
        )
        .unwrap();
        assert!((55..=60).contains(&left(&m)), "{}", left(&m));
        // Age past the lifetime is stale, whatever Expires says (it was fresh for a day).
        let tomorrow = http(now + Duration::from_secs(86_400));
        for age in ["86401", "18446744073709551616"] {
            let m = stored(
                &r,
                &resp(200, &[("expires", &tomorrow), ("age", age)]),
                false,
            )
            .unwrap();
            assert!(!m.is_fresh(SystemTime::now()), "Age {age}");
        }
        // A cache relaying it (Date in the past by Age): still fresh until Expires.
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("date", &http(now - Duration::from_secs(100))),
                    ("age", "100"),
                    ("expires", &http(now + Duration::from_secs(120))),
                ],
            ),
            false,
        )
        .unwrap();
        assert!((115..=120).contains(&left(&m)), "{}", left(&m));
        // Invalid Expires is in the past; two are no freshness at all.
        let m = stored(&r, &resp(200, &[("expires", "0")]), false).unwrap();
        assert!(!m.is_fresh(SystemTime::now()));
        assert!(stored(
            &r,
            &resp(200, &[("expires", &tomorrow), ("expires", &tomorrow)]),
            false
        )
        .is_none());
    }

    #[test]
    fn lifetimes_past_the_end_of_time_saturate() {
        let now = SystemTime::now();
        assert_eq!(
            time_after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = time_after(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(time_after(now, Duration::from_secs(u64::MAX)), far);
        // A rule ttl and max_ttl of u64::MAX seconds panicked in `now + ttl`.
        let mut r = rule("");
        Arc::get_mut(&mut r).unwrap().ttl = Some(Duration::from_secs(u64::MAX));
        let m = match cacheability(&r, &resp(200, &[]), false, now, Limits::new(Duration::MAX)) {
            RespCacheable::Cacheable(m) => m,
            RespCacheable::Uncacheable(why) => panic!("cacheable: {why:?}"),
        };
        assert!(m.is_fresh(now + Duration::from_secs(86_400)));
        assert!(m.serialize().is_ok());
    }

    #[test]
    fn cdn_cache_control_is_preferred() {
        let r = rule("");
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=60"),
                ],
            ),
            false,
        );
        assert!(m.is_some());
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store"),
                ],
            ),
            false,
        );
        assert!(m.is_none());
    }

    /// Issue 14, `serve_stale`: stored windows include the longest protection extension, the
    /// entry's own ones are kept apart and rule outside a window; RFC prohibitions keep 0.
    #[test]
    fn protection_extends_stored_stale_windows() {
        let r = rule("ttl = \"1m\"\nstale_if_error = \"10s\"");
        let fill = |cc: &str, now: SystemTime| {
            let limits = Limits {
                serve_stale: Duration::from_secs(3600),
                ..Limits::new(Duration::from_secs(86_400))
            };
            let origin = resp(200, &[("cache-control", cc), (STALE_HEADER, "sie=99999")]);
            match cacheability(&r, &origin, false, now, limits) {
                RespCacheable::Cacheable(m) => m,
                RespCacheable::Uncacheable(why) => panic!("{why:?}"),
            }
        };
        let t0 = SystemTime::now();
        let m = fill("max-age=60", t0);
        assert_eq!(m.stale_if_error_sec(), 3610, "own 10s + 1h");
        assert_eq!(m.stale_while_revalidate_sec(), 3600, "own 0 + 1h");
        let header = m.response_header().headers.get(STALE_HEADER).unwrap();
        assert_eq!(header, "swr=0, sie=10", "the origin's value is never kept");
        let at = |secs: u64| t0 + Duration::from_secs(60 + secs);
        let hour = Duration::from_secs(3600);
        assert!(stale_allowed(&m, Stale::IfError, at(5), Duration::ZERO));
        assert!(
            !stale_allowed(&m, Stale::IfError, at(20), Duration::ZERO),
            "own window over"
        );
        assert!(
            stale_allowed(&m, Stale::IfError, at(20), hour),
            "a window is on"
        );
        assert!(
            !stale_allowed(&m, Stale::IfError, at(3700), hour),
            "past own + 1h"
        );
        assert!(!stale_allowed(
            &m,
            Stale::WhileRevalidate,
            at(1),
            Duration::ZERO
        ));
        assert!(stale_allowed(
            &m,
            Stale::WhileRevalidate,
            at(1),
            Duration::from_secs(60)
        ));
        // A longer window than the entry was stored with cannot stretch it further.
        assert!(!stale_allowed(&m, Stale::IfError, at(3700), hour * 2));
        for no_stale in [
            "max-age=60, must-revalidate",
            "no-cache",
            "max-age=60, s-maxage=60",
        ] {
            let m = fill(no_stale, t0);
            assert_eq!(m.stale_if_error_sec(), 0, "{no_stale}");
            assert_eq!(m.stale_while_revalidate_sec(), 0, "{no_stale}");
            assert!(m.response_header().headers.get(STALE_HEADER).is_none());
        }
        // Without a serve_stale window configured nothing changes, and no field is stored.
        let plain = stored(&r, &resp(200, &[(STALE_HEADER, "sie=99999")]), false).unwrap();
        assert_eq!(plain.stale_if_error_sec(), 10);
        assert!(plain.response_header().headers.get(STALE_HEADER).is_none());
    }

    /// Seasons change the rule's ttl at fill time; priorities give default stale windows that
    /// RFC 9111's prohibitions still override.
    #[test]
    fn seasons_and_priorities_at_fill_time() {
        let r = rule("ttl = \"1h\"\npriority = \"critical\"\nseason_ttl = { peak = \"10m\" }");
        let at = |season| {
            let limits = Limits {
                season,
                ..Limits::new(Duration::from_secs(86_400))
            };
            match cacheability(&r, &resp(200, &[]), false, SystemTime::now(), limits) {
                RespCacheable::Cacheable(m) => m,
                RespCacheable::Uncacheable(why) => panic!("{why:?}"),
            }
        };
        assert!((595..=600).contains(&at(Some(("peak", 0.5))).fresh_sec()));
        assert!((1795..=1800).contains(&at(Some(("winter", 0.5))).fresh_sec()));
        assert!((3595..=3600).contains(&at(None).fresh_sec()));
        assert_eq!(at(None).stale_if_error_sec(), 86_400, "critical default");
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "must-revalidate")]),
            false,
        )
        .unwrap();
        assert_eq!(
            m.stale_if_error_sec(),
            0,
            "must-revalidate still forbids it"
        );
        let normal = rule("ttl = \"1h\"");
        let m = stored(
            &normal,
            &resp(200, &[("cache-control", "stale-if-error=60")]),
            false,
        )
        .unwrap();
        assert_eq!(m.stale_if_error_sec(), 60, "normal: the origin's");
    }

    #[test]
    fn rule_ttl_overrides_freshness_not_privacy() {
        let r = rule("ttl = \"30m\"\nstale_while_revalidate = \"1m\"\nstale_if_error = \"1h\"");
        let m = stored(&r, &resp(200, &[("cache-control", "max-age=5")]), false).unwrap();
        assert!(m.fresh_sec() > 1700);
        assert_eq!(m.stale_while_revalidate_sec(), 60);
        assert_eq!(m.stale_if_error_sec(), 3600);
        assert!(
            stored(&r, &resp(200, &[]), false).is_some(),
            "the rule's ttl is explicit freshness"
        );
        assert!(stored(&r, &resp(200, &[("cache-control", "private")]), false).is_none());
        assert!(
            stored(&r, &resp(404, &[]), false).is_none(),
            "ttl applies to success statuses only"
        );
        // RFC 9111 §3: any final status with explicit freshness; the rule's ttl does not apply.
        let m = stored(&r, &resp(500, &[("cache-control", "max-age=60")]), false).unwrap();
        assert!((55..=60).contains(&m.fresh_sec()), "{}", m.fresh_sec());
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "must-revalidate")]),
            false,
        )
        .unwrap();
        assert_eq!(
            m.stale_if_error_sec(),
            0,
            "must-revalidate forbids serving stale"
        );
    }

    /// Issue 11: statuses, `must-understand`, heuristic freshness, stale prohibitions.
    #[test]
    fn statuses_must_understand_and_heuristics() {
        let r = rule("");
        for status in [299, 303, 400, 500, 502, 503, 504, 599] {
            assert!(
                stored(&r, &resp(status, &[("cache-control", "max-age=60")]), false).is_some(),
                "{status} with max-age"
            );
            assert!(
                stored(&r, &resp(status, &[]), false).is_none(),
                "{status} bare"
            );
        }
        for status in [206, 304] {
            assert!(stored(&r, &resp(status, &[("cache-control", "max-age=60")]), false).is_none());
        }
        let mu = [("cache-control", "max-age=60, must-understand, no-store")];
        assert!(
            stored(&r, &resp(200, &mu), false).is_some(),
            "understood: no-store overridden"
        );
        assert!(
            stored(&r, &resp(599, &mu), false).is_none(),
            "not understood"
        );
        let now = SystemTime::now();
        let lm = |ago: u64| httpdate::fmt_http_date(now - Duration::from_secs(ago));
        let date = httpdate::fmt_http_date(now);
        let m = stored(
            &r,
            &resp(200, &[("date", &date), ("last-modified", &lm(10_000))]),
            false,
        )
        .unwrap();
        assert!(
            (995..=1000).contains(&m.fresh_sec()),
            "10%: {}",
            m.fresh_sec()
        );
        let m = stored(
            &r,
            &resp(
                404,
                &[("date", &date), ("last-modified", &lm(1000 * 86_400))],
            ),
            false,
        )
        .unwrap();
        assert!(m.fresh_sec() <= 86_400 && m.fresh_sec() > 86_000, "capped");
        assert!(
            stored(
                &r,
                &resp(500, &[("date", &date), ("last-modified", &lm(10_000))]),
                false
            )
            .is_none(),
            "500 is not heuristically cacheable"
        );
        assert!(
            stored(
                &r,
                &resp(
                    500,
                    &[
                        ("cache-control", "public"),
                        ("date", &date),
                        ("last-modified", &lm(10_000))
                    ]
                ),
                false
            )
            .is_some(),
            "public makes any status heuristically cacheable"
        );
        assert!(
            stored(
                &r,
                &resp(200, &[("date", &date), ("last-modified", &date)]),
                false
            )
            .is_none(),
            "modified now: no heuristic lifetime"
        );
        for no_stale in [
            "max-age=60, no-cache, stale-if-error=60",
            "max-age=60, s-maxage=60, stale-if-error=60",
            "max-age=60, proxy-revalidate, stale-if-error=60",
        ] {
            let m = stored(&r, &resp(200, &[("cache-control", no_stale)]), false).unwrap();
            assert_eq!(m.stale_if_error_sec(), 0, "{no_stale}");
        }
        let m = stored(
            &r,
            &resp(200, &[("cache-control", "max-age=60, stale-if-error=60")]),
            false,
        )
        .unwrap();
        assert_eq!(m.stale_if_error_sec(), 60);
    }

    /// Issue 11: RFC 9110 §7.6.1: hop-by-hop fields and those `Connection` names are not stored.
    #[test]
    fn hop_by_hop_fields_are_not_stored() {
        let r = rule("");
        let m = stored(
            &r,
            &resp(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("connection", "x-hop, close"),
                    ("x-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("upgrade", "h2c"),
                    ("x-kept", "1"),
                ],
            ),
            false,
        )
        .unwrap();
        let h = &m.response_header().headers;
        for gone in ["connection", "x-hop", "keep-alive", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone} stored");
        }
        assert!(h.contains_key("x-kept"));
    }

    /// The fields `Connection` names are matched ignoring case, over several lines and lists;
    /// its own options name nothing; the framing stays whatever it names; a name that cannot be
    /// a field removes nothing.
    #[test]
    fn connection_names_fields_to_remove() {
        let mut r = resp(
            200,
            &[
                ("connection", "Keep-Alive, X-Hop, close"),
                ("connection", " x-other ,, Content-Length,bad name"),
                ("x-hop", "1"),
                ("X-Other", "2"),
                ("content-length", "3"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("x-kept", "4"),
                ("close", "5"),
            ],
        );
        strip_connection_fields(&mut r);
        let mut left: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-kept"]);
        let mut plain = resp(200, &[("connection", "close"), ("x-kept", "1")]);
        strip_connection_fields(&mut plain);
        assert_eq!(plain.headers.len(), 1);
        assert!(plain.headers.contains_key("x-kept"));
    }

    /// Issue 11: RFC 9213 structured parsing, RFC 9111 §5.1 `Age`, §4.1 normalized Vary.
    #[test]
    fn cdn_cache_control_age_and_vary_normalization() {
        let cdn = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("cdn-cache-control", v.parse().unwrap());
            cdn_cache_control(&h)
        };
        let cc = cdn("max-age=60, stale-if-error=5, must-revalidate").unwrap();
        assert_eq!(cc.max_age().unwrap(), Some(60));
        assert!(cc.must_revalidate());
        assert!(cdn("private").unwrap().private());
        assert!(cdn("no-cache=\"set-cookie\"")
            .unwrap()
            .no_cache_field_names()
            .is_some());
        assert!(cdn("none").is_some(), "valid, no known directive");
        for invalid in [
            "max-age=\"60\"",
            "max-age=1.5",
            "max-age=-1",
            "max-age=abc",
            "no-store=3",
            "max-age=60,,",
            "Max-Age=60",
            "max-age=(1 2)",
        ] {
            assert!(cdn(invalid).is_none(), "{invalid}");
        }
        let age = |lines: &[&str]| {
            let mut r = resp(200, &[]);
            for l in lines {
                r.append_header("age", *l).unwrap();
            }
            upstream_age(&r)
        };
        assert_eq!(age(&["-5"]), 0);
        assert_eq!(age(&["5.0"]), 0);
        assert_eq!(age(&["0, 7200"]), 0);
        assert_eq!(age(&["7200, 0"]), 7200);
        assert_eq!(age(&["7200", "0"]), 7200);
        assert_eq!(age(&["7200;foo=bar"]), 7200);
        assert_eq!(age(&["99999999999"]), DELTA_SECONDS_OVERFLOW);
        assert_eq!(
            normalize_list_value("accept-encoding", b"GZIP , deflate"),
            b"gzip,deflate"
        );
        assert_eq!(
            normalize_list_value("x-tenant", b"A, B"),
            b"A,B",
            "case kept"
        );
    }

    #[test]
    fn max_ttl_caps_lifetimes() {
        let r = rule("stale_if_error = \"30d\"");
        let m = match cacheability(
            &r,
            &resp(200, &[("cache-control", "max-age=31536000")]),
            false,
            SystemTime::now(),
            Limits::new(Duration::from_secs(3600)),
        ) {
            RespCacheable::Cacheable(m) => m,
            RespCacheable::Uncacheable(_) => panic!("cacheable"),
        };
        assert!(m.fresh_sec() <= 3600);
        assert_eq!(m.stale_if_error_sec(), 3600);
    }

    #[test]
    fn origin_stale_windows() {
        let r = rule("");
        let m = stored(
            &r,
            &resp(
                200,
                &[(
                    "cache-control",
                    "max-age=1, stale-while-revalidate=30, stale-if-error=3600",
                )],
            ),
            false,
        )
        .unwrap();
        assert_eq!(m.stale_while_revalidate_sec(), 30);
        assert_eq!(m.stale_if_error_sec(), 3600);
    }

    #[test]
    fn authorization_and_cookies() {
        let r = rule("");
        let cc = [("cache-control", "max-age=60")];
        assert!(stored(&r, &resp(200, &cc), true).is_none());
        assert!(stored(
            &r,
            &resp(200, &[("cache-control", "public, max-age=60")]),
            true
        )
        .is_some());
        assert!(stored(
            &r,
            &resp(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")]
            ),
            false
        )
        .is_none());
        let r = rule("cache_set_cookie = true");
        let m = stored(
            &r,
            &resp(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            ),
            false,
        )
        .unwrap();
        assert!(
            m.response_header().headers.get("set-cookie").is_none(),
            "never replayed"
        );
    }

    /// Issue 13: `authorization = "isolate"` (the credential is in the key) and `"share"` store
    /// an answer to a request with `Authorization`; `private` and `no-store` still win, and an
    /// isolated `x-api-key` leaves `Authorization` to RFC 9111 §3.5.
    #[test]
    fn authorization_modes() {
        let cc = [("cache-control", "max-age=60")];
        for mode in ["authorization = \"isolate\"", "authorization = \"share\""] {
            let text = if mode.contains("share") {
                // A share rule needs an upstream that sets its own credential.
                let ctx = Context {
                    upstreams: &["api".to_string()],
                    default_upstream: Some(0),
                    encryption: false,
                    upstream_credentials: &[true],
                    key_secret: None,
                };
                let text = format!("[[rule]]\nname = \"r\"\nmatch = {{ path = \"/r\" }}\n{mode}\n");
                let set = compile(&[(Path::new("r.toml"), &text)], &ctx).unwrap();
                set.rules()[0].clone()
            } else {
                rule(mode)
            };
            assert!(stored(&text, &resp(200, &cc), true).is_some(), "{mode}");
            for refused in ["private, max-age=60", "no-store"] {
                assert!(
                    stored(&text, &resp(200, &[("cache-control", refused)]), true).is_none(),
                    "{mode}: {refused}"
                );
            }
        }
        let api_key = rule("authorization = \"isolate\"\ncredential_header = \"x-api-key\"");
        assert!(stored(&api_key, &resp(200, &cc), true).is_none());
        assert!(stored(&api_key, &resp(200, &cc), false).is_some());
    }

    #[test]
    fn vary() {
        let r = rule("");
        assert!(stored(
            &r,
            &resp(200, &[("cache-control", "max-age=60"), ("vary", "*")]),
            false
        )
        .is_none());
        assert_eq!(
            vary_names(&resp(
                200,
                &[
                    ("vary", "Accept-Language, accept-encoding"),
                    ("vary", "X-A")
                ]
            )),
            vec!["accept-encoding", "accept-language", "x-a"]
        );
    }

    #[test]
    fn variance_uses_every_field_line_and_keeps_empty_apart() {
        let stored = resp(200, &[("vary", "Accept-Language"), ("vary", "cookie")]);
        let v = |lines: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, val) in lines {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    val.parse().unwrap(),
                );
            }
            variance(&stored, &h).expect("a Vary response has a variance")
        };
        let plain = v(&[]);
        // A second line is not hidden behind the first.
        assert_ne!(
            v(&[("accept-language", "en"), ("accept-language", "fr")]),
            v(&[("accept-language", "en")])
        );
        assert_eq!(
            v(&[("accept-language", "en"), ("accept-language", "fr")]),
            v(&[("accept-language", "en, fr")]),
            "RFC 9110 §5.3: the lines are one list"
        );
        // An empty header is not an absent one.
        assert_ne!(v(&[("accept-language", "")]), plain);
        assert_ne!(v(&[("cookie", ""), ("cookie", "session=X")]), plain);
        assert_ne!(
            v(&[("cookie", ""), ("cookie", "session=X")]),
            v(&[("cookie", "")])
        );
        assert_eq!(
            v(&[("cookie", "a=1"), ("cookie", "b=2")]),
            v(&[("cookie", "a=1; b=2")]),
            "Cookie lines join with '; '"
        );
        assert_eq!(v(&[("x-other", "1")]), plain, "unnamed headers do not vary");
        assert_eq!(variance(&resp(200, &[]), &http::HeaderMap::new()), None);
    }

    #[test]
    fn tags_from_the_origin() {
        let mut r = resp(
            200,
            &[
                ("surrogate-key", "vendor:1  vendors"),
                ("cache-tag", "a,b, c"),
                ("xkey", "x"),
                ("cache-groups", "\"g1\", \"g2\""),
            ],
        );
        assert_eq!(
            origin_tags(&r),
            vec!["a", "b", "c", "g1", "g2", "vendor:1", "vendors", "x"]
        );
        strip_tag_headers(&mut r);
        assert!(origin_tags(&r).is_empty());
        let inv = resp(200, &[("cache-group-invalidation", "\"g1\"")]);
        assert_eq!(cache_groups(&inv, "cache-group-invalidation"), vec!["g1"]);
    }

    #[test]
    fn request_directives() {
        use pingora::http::RequestHeader;
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        assert!(!RequestDirectives::parse(&req.headers).any());
        req.insert_header("pragma", "no-cache").unwrap();
        assert!(RequestDirectives::parse(&req.headers).no_cache);
        req.insert_header("cache-control", "max-age=5, only-if-cached")
            .unwrap();
        let d = RequestDirectives::parse(&req.headers);
        assert!(
            !d.no_cache,
            "Pragma is ignored when Cache-Control is present"
        );
        assert_eq!(d.max_age, Some(5));
        assert!(d.only_if_cached);
        req.insert_header("cache-control", "no-store").unwrap();
        assert!(RequestDirectives::parse(&req.headers).no_store);
        assert!(is_unsafe(&http::Method::POST) && !is_unsafe(&http::Method::GET));
        let mut authed = RequestHeader::build("GET", b"/", None).unwrap();
        authed.insert_header("authorization", "Bearer x").unwrap();
        let d = RequestDirectives::parse(&authed.headers);
        assert!(d.authorization && !d.any());
        assert!(!serves_authorized(&resp(
            200,
            &[("cache-control", "max-age=60")]
        )));
        assert!(serves_authorized(&resp(
            200,
            &[("cache-control", "public, max-age=60")]
        )));
        assert!(serves_authorized(&resp(
            200,
            &[("cache-control", "s-maxage=60")]
        )));
    }

    /// The summary's answers are pingora's accessors' own, for every directive `decide` reads,
    /// with and without values, in both fields that carry them.
    #[test]
    fn directives_answer_as_pingoras_accessors() {
        let lines = [
            "no-store",
            "private",
            "private=\"set-cookie\", max-age=60",
            "no-cache, public",
            "no-cache=\"x-a\", max-age=10",
            "public, max-age=3600, stale-while-revalidate=30, stale-if-error=600",
            "s-maxage=20, max-age=10, stale-while-revalidate=5",
            "must-revalidate, max-age=5, stale-if-error=9",
            "proxy-revalidate, stale-while-revalidate=9",
            "must-understand, no-store",
            "max-age=99999999999999999999",
            "",
        ];
        for line in lines {
            for field in ["cache-control", "cdn-cache-control"] {
                let mut resp = ResponseHeader::build(200, None).unwrap();
                resp.insert_header(field, line).unwrap();
                let cc = CacheControl::from_headers_named(field, &resp.headers);
                let Some(d) = response_cache_control(&resp) else {
                    assert!(
                        cc.is_none() || field == "cdn-cache-control",
                        "{field}: {line}"
                    );
                    continue;
                };
                let cc = d.parsed();
                let want = (
                    cc.private(),
                    cc.no_store(),
                    cc.has_key("must-understand"),
                    cc.no_cache(),
                    cc.public(),
                    cc.must_revalidate() || cc.proxy_revalidate() || cc.has_key("s-maxage"),
                    cc.allow_caching_authorized_req(),
                    cc.fresh_duration(),
                    cc.serve_stale_while_revalidate_duration(),
                    cc.serve_stale_if_error_duration(),
                );
                let got = (
                    d.private,
                    d.no_store,
                    d.must_understand,
                    d.no_cache,
                    d.public,
                    d.revalidate,
                    d.authorized,
                    d.fresh,
                    d.stale_while_revalidate,
                    d.stale_if_error,
                );
                assert_eq!(got, want, "{field}: {line}");
            }
        }
    }

    #[test]
    fn cache_control_lines_are_parsed_once_per_thread_and_as_before() {
        let map = |lines: &[&[u8]]| {
            let mut h = http::HeaderMap::new();
            for l in lines {
                h.append(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_bytes(l).unwrap(),
                );
            }
            h
        };
        let direct = |h: &http::HeaderMap| {
            CacheControl::from_headers_named("cache-control", h).map(|cc| format!("{cc:?}"))
        };
        let remembered =
            |h: &http::HeaderMap| cache_control(h).map(|cc| format!("{:?}", cc.parsed()));
        // Every line reads as the parser reads it, the first time and when remembered.
        let long = format!("max-age=60, x=\"{}\"", "a".repeat(REMEMBERED_LINE));
        let lines: [&[u8]; 9] = [
            b"no-store",
            b"public, max-age=3600",
            b"Public, MAX-AGE=10, s-maxage=\"20\"",
            b"private=\"set-cookie, x-a\", no-cache",
            b"max-age=60;stale-while-revalidate=30",
            b"",
            b",,,",
            b"max-age=99999999999999999999",
            long.as_bytes(),
        ];
        for line in lines {
            let h = map(&[line]);
            assert_eq!(remembered(&h), direct(&h), "{line:?}");
            assert_eq!(remembered(&h), direct(&h), "{line:?}, remembered");
        }
        // A line is parsed once: the second answer is the first one's result.
        let h = map(&[b"public, max-age=77"]);
        assert!(Arc::ptr_eq(
            &cache_control(&h).unwrap(),
            &cache_control(&h).unwrap()
        ));
        // A line longer than the bound is parsed anew each time.
        let h = map(&[long.as_bytes()]);
        assert!(!Arc::ptr_eq(
            &cache_control(&h).unwrap(),
            &cache_control(&h).unwrap()
        ));
        // Several lines are one list, read together, not as the first line remembered.
        let h = map(&[b"max-age=60", b"private"]);
        assert_eq!(remembered(&h), direct(&h));
        assert!(cache_control(&h).unwrap().private);
        assert!(!cache_control(&map(&[b"max-age=60"])).unwrap().private);
        assert!(cache_control(&http::HeaderMap::new()).is_none());
        // Endless distinct lines do not grow the thread's memory past its bound.
        for i in 0..3 * REMEMBERED_LINES {
            let line = format!("max-age={i}");
            let got = cache_control(&map(&[line.as_bytes()])).unwrap();
            assert_eq!(got.parsed().max_age().unwrap(), Some(i as u32));
            assert!(PARSED.with(|p| p.borrow().len()) <= REMEMBERED_LINES);
        }
    }

    #[test]
    fn refresh_due_past_the_fraction_of_a_fresh_lifetime() {
        // Stored at 1000, fresh for 2000 ms, refresh_ahead 0.5: the point is 2000.
        assert!(!refresh_due(1000, 3000, 1000, 0.5), "just stored");
        assert!(!refresh_due(1000, 3000, 1999, 0.5));
        assert!(refresh_due(1000, 3000, 2000, 0.5), "at the point");
        assert!(refresh_due(1000, 3000, 2999, 0.5));
        assert!(
            !refresh_due(1000, 3000, 3000, 0.5),
            "stale: not refresh-ahead's"
        );
        assert!(!refresh_due(1000, 1000, 1000, 0.5), "no lifetime");
        // 0.8 of 300 s.
        assert!(!refresh_due(0, 300_000, 239_999, 0.8));
        assert!(refresh_due(0, 300_000, 240_000, 0.8));
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
    }
}
