//! Rules: which requests are cached, and how.
//!
//! `rules/*.toml` files are read in file-name order, parsed with positions kept, checked (unknown
//! keys, bad durations, unknown upstreams, bad patterns and sources, duplicate names, rules an
//! earlier one shadows) and compiled into a [`RuleSet`]. Matching is a scan of precompiled rules
//! (method bitmask, then host, then path segments) with no allocation; the first match wins.
//! A request no rule matches falls to the default route (the default upstream, RFC 9111 only).
//!
//! Shaped so: load time and request time are apart. `compiler` turns text into rules and
//! reports every problem at its position; `matcher` is all that runs per request. This file
//! holds the [`Rule`] both sides share; the pieces a rule is made of (path and host patterns,
//! vary sources, normalizers, tag and event templates) each have their own module.

mod compiler;
pub mod events;
mod host;
pub mod json;
mod matcher;
pub mod normalize;
pub mod path;
pub mod source;
pub(crate) mod template;

pub(crate) use compiler::load_dir;
pub use compiler::{compile, Context};
pub use matcher::{Matched, RuleSet};

use crate::metrics::RuleMetrics;
use host::HostMatch;
use normalize::Normalizer;
use path::PathPattern;
use source::{RequestView, Source, Template, Unkeyable};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// The name the default route reports in metrics and logs.
pub(crate) const DEFAULT_ROUTE: &str = "_default";

/// One vary entry: where the value comes from and how it is normalized.
#[derive(Debug, Clone)]
pub struct VaryField {
    pub source: Source,
    pub normalizers: Vec<Normalizer>,
}

impl VaryField {
    /// The normalized value of this field in a request (`None`: the request lacks it).
    pub fn value<'a>(&'a self, req: &RequestView<'a>) -> Option<Cow<'a, str>> {
        let raw = self.source.extract(req)?;
        Some(normalize::apply_all(&self.normalizers, raw))
    }

    /// The normalized value of this field as a key component ([`Source::keyed`]).
    pub fn keyed_value<'a>(
        &'a self,
        req: &RequestView<'a>,
    ) -> Result<Option<Cow<'a, str>>, Unkeyable> {
        let Some(raw) = self.source.keyed(req)? else {
            return Ok(None);
        };
        Ok(Some(normalize::apply_all(&self.normalizers, raw)))
    }
}

/// Every string of up to `len` pieces from `alphabet`, for the exhaustive checks of the rules'
/// text handling (decoding, folding, trimming) against the forms they replaced.
#[cfg(test)]
pub(crate) fn every_string<T: std::fmt::Display>(alphabet: &[T], len: usize) -> Vec<String> {
    let mut all = vec![String::new()];
    let mut last = vec![String::new()];
    for _ in 0..len {
        last = last
            .iter()
            .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
            .collect();
        all.extend(last.iter().cloned());
    }
    all
}

/// What one origin request of a rule costs (`cost = { ... }`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// Currency units per origin request.
    pub per_request: f64,
    /// JSON pointer to the token count in the stored response.
    pub tokens: Option<String>,
    /// Currency units per 1000 tokens.
    pub per_1k_tokens: f64,
}

/// Whether a client's own `Cache-Control: no-cache` / `max-age` (or `Pragma: no-cache`) may
/// force a refetch of a shared entry (`client_revalidation = "honour" | "ignore"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientRevalidation {
    /// RFC 9111 §5.2.1: the request's directives rule out stored answers they do not accept.
    #[default]
    Honour,
    /// As CDNs do: the shared entry answers while fresh, whatever the client asks (`no-store`,
    /// `only-if-cached` and `Authorization` still count).
    Ignore,
}

/// What a request's credential (`Authorization`, or `credential_header`) does to caching
/// (`authorization = "rfc" | "isolate" | "share"`).
#[derive(Debug, Clone, Default)]
pub enum Authorization {
    /// RFC 9111 §3.5: a request with `Authorization` stores and uses only answers that say
    /// `public`, `s-maxage` or `must-revalidate`.
    #[default]
    Rfc,
    /// The credential is part of the key as a keyed hash ([`CredentialKey`]), never raw: an
    /// answer is shared only among callers presenting the same credential, so it is storable.
    Isolate {
        /// The request header that carries the credential (`authorization` by default).
        header: http::HeaderName,
        key: std::sync::Arc<CredentialKey>,
    },
    /// Shared whatever credential the caller sends (the upstream sets its own credential).
    Share,
}

impl Authorization {
    /// Whether the request's `Authorization` header is taken care of by this mode, so RFC 9111
    /// §3.5 no longer applies to it (an isolated `x-api-key` leaves `Authorization` to §3.5).
    pub fn handles_authorization(&self) -> bool {
        match self {
            Authorization::Rfc => false,
            Authorization::Isolate { header, .. } => header == http::header::AUTHORIZATION,
            Authorization::Share => true,
        }
    }
}

/// The gateway secret credentials are hashed with before they go into a key (BLAKE3 in keyed
/// mode, a MAC): a key, a Redis record or a log line never holds a credential, and without the
/// secret nobody can test a guessed credential against a key.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialKey([u8; 32]);

impl CredentialKey {
    /// Derives the key from `[cache] key_secret` as configured (any length; checked by config).
    pub fn from_secret(secret: &[u8]) -> Self {
        CredentialKey(blake3::derive_key("aisle 2026 cache key_secret", secret))
    }

    /// A random key made once per process, for when no `key_secret` is configured: stable
    /// across reloads, not shared with other instances or kept across restarts.
    pub fn process_random() -> Self {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        CredentialKey(*KEY.get_or_init(|| {
            use aes_gcm::aead::rand_core::RngCore;
            let mut bytes = [0u8; 32];
            aes_gcm::aead::OsRng.fill_bytes(&mut bytes);
            bytes
        }))
    }

    /// The credential's keyed hash, as the key holds it.
    pub fn digest(&self, credential: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, credential).as_bytes()
    }
}

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKey(<redacted>)")
    }
}

/// `priority`: the order the memory tier evicts in (low first; critical only when nothing else
/// is left) and the default `stale_if_error` (critical 24h, high 1h). Ordered low to critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl Priority {
    /// Every class, in eviction order (low first).
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];

    /// As written in a rule.
    pub fn parse(text: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == text)
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Eviction class, 0 (low, evicted first) to 3 (critical).
    pub fn class(self) -> usize {
        self as usize
    }

    /// The cache key's `user_tag`, which carries the class to the eviction manager (pingora
    /// hands it only the key). Not part of the key's hash; empty for normal, so normal keys
    /// are as before.
    pub fn tag(self) -> &'static str {
        match self {
            Priority::Low => "l",
            Priority::Normal => "",
            Priority::High => "h",
            Priority::Critical => "c",
        }
    }

    /// The class a key's `user_tag` names (normal for anything else).
    pub fn from_tag(tag: &str) -> Priority {
        match tag {
            "l" => Priority::Low,
            "h" => Priority::High,
            "c" => Priority::Critical,
            _ => Priority::Normal,
        }
    }

    /// `stale_if_error` when the rule does not set one: what the class may serve while the
    /// origin fails.
    pub fn default_stale_if_error(self) -> Option<Duration> {
        match self {
            Priority::Critical => Some(Duration::from_secs(86_400)),
            Priority::High => Some(Duration::from_secs(3_600)),
            Priority::Normal | Priority::Low => None,
        }
    }
}

/// One `season_ttl` entry: the rule's TTL while a named `[[season]]` is on.
#[derive(Debug, Clone, PartialEq)]
pub struct SeasonTtlEntry {
    pub season: Box<str>,
    pub ttl: Duration,
    /// Where it was written (message empty), for the configuration's check of the name.
    pub at: crate::diag::Diagnostic,
}

/// `season_ttl = { peak = "10m", off = "1h" }`: the rule's TTL per season, overriding
/// `ttl x ttl_multiplier`; `off` applies outside every season.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeasonTtl {
    pub seasons: Vec<SeasonTtlEntry>,
    pub off: Option<Duration>,
}

/// What every entry stored under a rule keeps of it: the rule's name (per-rule bytes in
/// `/admin/stats`), whether shared tiers seal its entries, and where its answers' token count
/// is. Built once when the rule is compiled ([`StoredRule::of`]) and shared by reference, so a
/// stored entry holds one pointer rather than its own copies of the name and the pointer
/// (issue 16: per-entry overhead at a million entries).
#[derive(Debug, PartialEq, Eq, Default)]
pub struct StoredRule {
    pub name: Box<str>,
    /// Rule `encrypt = true`: sealed when written to a shared tier.
    pub encrypt: bool,
    /// Rule `cost.tokens`: a JSON pointer to the answer's token count.
    pub tokens_at: Option<Box<str>>,
    /// One copy for all of the rule's entries (the compiled rule's), so not charged to them;
    /// false for a copy decoded from a shared tier's record, which is the entry's own.
    pub shared: bool,
}

impl StoredRule {
    /// The shared facts of a compiled rule named `name`.
    pub fn of(name: &str, encrypt: bool, cost: Option<&Cost>) -> Arc<StoredRule> {
        Arc::new(StoredRule {
            name: name.into(),
            encrypt,
            tokens_at: cost.and_then(|c| c.tokens.as_deref()).map(Box::from),
            shared: true,
        })
    }

    /// An entry's own copy, as a shared tier's record states it (records carry no token
    /// pointer: the count was read when the answer was stored).
    pub fn decoded(name: &str, encrypt: bool) -> Arc<StoredRule> {
        Arc::new(StoredRule {
            name: name.into(),
            encrypt,
            tokens_at: None,
            shared: false,
        })
    }
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: Box<str>,
    /// Where the rule was written, for messages: `rules/vendors.toml:3`.
    pub origin: String,
    methods: u16,
    host: Option<HostMatch>,
    pub path: PathPattern,
    /// Index into the configuration's upstreams (`Config::upstreams`), in name order.
    pub upstream: usize,
    /// `cache = false`: proxy only.
    pub cache: bool,
    pub ttl: Option<Duration>,
    /// `season_ttl`: TTLs by season, which win over `ttl` (see [`Rule::ttl_in`]).
    pub season_ttl: Option<SeasonTtl>,
    /// `priority`: eviction order in the memory tier and default stale windows.
    pub priority: Priority,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// `refresh_ahead`: past this fraction of an entry's freshness lifetime, a fresh hit starts
    /// one background refresh (the predicate is `policy::refresh_due`); in (0, 1).
    pub refresh_ahead: Option<f64>,
    pub vary: Vec<VaryField>,
    pub tags: Vec<Template>,
    pub invalidate_on: Vec<Box<str>>,
    pub cache_set_cookie: bool,
    /// Seal entries with AES-256-GCM in the shared tier.
    pub encrypt: bool,
    /// Pass the origin's `Surrogate-Key` / `Cache-Tag` / `xkey` / `Cache-Groups` headers on to
    /// clients (e.g. a downstream CDN) instead of removing them.
    pub keep_tag_headers: bool,
    /// `body_key = { all = true, ignore = [...] }`: key on the whole JSON body in canonical form
    /// minus these pointers.
    pub body_key: Option<Vec<String>>,
    /// The request body must be read (and parsed as JSON) to build the key.
    pub needs_body: bool,
    /// What one origin request costs, for the savings counters.
    pub cost: Option<Cost>,
    /// The default route keys on the full query string (RFC 9111: the key is the URI).
    pub is_default: bool,
    /// Whether the raw request path goes into the key. It is left out only when the pattern has
    /// no wildcard and every `:param` is in `vary`: then the (normalized) vary values determine
    /// the path, and a normalizer on `path.id` can make `/items/ABC` and `/items/abc` share.
    pub key_path: bool,
    /// `client_controls = true`: honour `Aisle-*` control headers from any client, not only
    /// from `[server] trusted_clients`.
    pub client_controls: bool,
    /// `client_revalidation`: may a client's `no-cache` / `max-age` force a refetch?
    pub client_revalidation: ClientRevalidation,
    /// `authorization`: what the request's credential does to caching.
    pub authorization: Authorization,
    /// A hash of everything that decides this rule's keys and what its entries hold (match,
    /// upstream, lifetimes, vary and normalizers with their tables, tags, body key, ...), not
    /// of its name's position or its cost. Part of every key: after a reload that changed
    /// the rule, its old entries are no longer found, while an unchanged rule's still are.
    pub generation: u64,
    pub metrics: RuleMetrics,
    /// What its stored entries keep of it, built from `name`, `encrypt` and `cost` when the
    /// rule is compiled.
    pub stored: Arc<StoredRule>,
}

impl Rule {
    /// The rule's TTL for a fill now, given the active season (name, `ttl_multiplier`) or
    /// `None` outside every season: `season_ttl` for that season (or `off`) when written, else
    /// `ttl` times the season's multiplier. `None`: the origin's freshness decides.
    pub fn ttl_in(&self, season: Option<(&str, f64)>) -> Option<Duration> {
        let named = self.season_ttl.as_ref().and_then(|s| match season {
            Some((name, _)) => s.seasons.iter().find(|e| &*e.season == name).map(|e| e.ttl),
            None => s.off,
        });
        named.or_else(|| {
            let ttl = self.ttl?;
            Some(match season {
                // Saturating: a huge ttl times 2 stays huge (max_ttl caps it afterwards).
                Some((_, m)) if m != 1.0 => {
                    Duration::try_from_secs_f64(ttl.as_secs_f64() * m).unwrap_or(Duration::MAX)
                }
                _ => ttl,
            })
        })
    }

    /// Renders the entry's tags: the `tags` templates (vary values normalized as in the key) and
    /// the `invalidate_on` event names, each in its canonical form ([`template::tag_key`]:
    /// escaped, at most [`template::MAX_TAG_LEN`] bytes), as purges name them.
    pub fn render_tags(&self, req: &RequestView<'_>) -> Vec<String> {
        let mut out = Vec::with_capacity(self.tags.len() + self.invalidate_on.len());
        for t in &self.tags {
            let rendered = t.render(|src| {
                match self.vary.iter().find(|v| &v.source == src) {
                    Some(field) => field.value(req),
                    None => src.extract(req),
                }
                .map(|c| Cow::Owned(c.into_owned()))
            });
            out.push(match template::tag_key(&rendered) {
                Cow::Borrowed(_) => rendered,
                Cow::Owned(key) => key,
            });
        }
        out.extend(
            self.invalidate_on
                .iter()
                .map(|e| template::tag_key(e).into_owned()),
        );
        out
    }

    /// The same rule with every normalizer removed, so vary values are keyed as requests write
    /// them (`body_key` canonical JSON and its `ignore` list stay). For `aisle replay`, which
    /// shows what the normalizers buy on a trace.
    pub fn without_normalizers(&self) -> Rule {
        Rule {
            name: self.name.clone(),
            origin: self.origin.clone(),
            methods: self.methods,
            host: self.host.clone(),
            path: self.path.clone(),
            upstream: self.upstream,
            cache: self.cache,
            ttl: self.ttl,
            season_ttl: self.season_ttl.clone(),
            priority: self.priority,
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
            refresh_ahead: self.refresh_ahead,
            vary: self
                .vary
                .iter()
                .map(|f| VaryField {
                    source: f.source.clone(),
                    normalizers: Vec::new(),
                })
                .collect(),
            tags: self.tags.clone(),
            invalidate_on: self.invalidate_on.clone(),
            cache_set_cookie: self.cache_set_cookie,
            encrypt: self.encrypt,
            keep_tag_headers: self.keep_tag_headers,
            body_key: self.body_key.clone(),
            needs_body: self.needs_body,
            cost: self.cost.clone(),
            is_default: self.is_default,
            key_path: self.key_path,
            client_controls: self.client_controls,
            client_revalidation: self.client_revalidation,
            authorization: self.authorization.clone(),
            generation: self.generation,
            metrics: RuleMetrics::new(&self.name),
            stored: self.stored.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compiler::tests::compile_one;
    use super::path::PathParams;
    use super::*;

    #[test]
    fn tags_render_with_normalized_values() {
        let set = compile_one(
            r#"
[tables.market]
map = { brooklyn = "nyc" }
fallback = "state"
[[rule]]
name = "s"
match = { path = "/s" }
vary = ["query.location"]
normalize = { "query.location" = ["trim", "market"] }
tags = ["market:{query.location}", "raw:{query.other}"]
invalidate_on = ["vendor_update"]
"#,
        )
        .unwrap();
        let rule = &set.rules()[0];
        let headers = http::HeaderMap::new();
        let params = PathParams::default();
        let req = RequestView {
            path: "/s",
            query: Some("location=Brooklyn%2C%20NY&other=X"),
            headers: &headers,
            params: &params,
            body: None,
        };
        assert_eq!(
            rule.render_tags(&req),
            vec!["market:nyc", "raw:X", "vendor_update"]
        );
    }

    /// Issue 9 item 10: a tag rendered from a request value with spaces, commas or non-ASCII is
    /// escaped (so it can be named in a space-separated purge), and a huge value is cut.
    #[test]
    fn tags_render_escaped_and_capped() {
        let set = compile_one(
            r#"
[[rule]]
name = "s"
match = { path = "/s" }
vary = ["query.vendorType"]
tags = ["vendor-type:{query.vendorType}", "city:{query.city}", "big:{query.big}"]
"#,
        )
        .unwrap();
        let rule = &set.rules()[0];
        let headers = http::HeaderMap::new();
        let params = PathParams::default();
        let big = "x".repeat(100_000);
        let query = format!("vendorType=wedding%20planner&city=Z%C3%BCrich,CH&big={big}");
        let req = RequestView {
            path: "/s",
            query: Some(&query),
            headers: &headers,
            params: &params,
            body: None,
        };
        let tags = rule.render_tags(&req);
        assert_eq!(tags[0], "vendor-type:wedding%20planner");
        assert_eq!(tags[1], "city:Z%C3%BCrich%2CCH");
        assert_eq!(tags[2].len(), template::MAX_TAG_LEN);
        assert_eq!(
            tags[2],
            template::tag_key(&format!("big:{big}")),
            "a purge naming the whole value finds the cut tag"
        );
        assert_eq!(
            tags[0],
            template::tag_key("vendor-type:wedding planner"),
            "and one naming the raw value finds the escaped one"
        );
    }
}
