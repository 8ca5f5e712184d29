//! The CDN purge APIs Aisle speaks: Cloudflare, Fastly, CloudFront and plain HTTP PURGE/BAN
//! (Varnish, nginx), each a [`Provider`] built from the `[cdn.*]` tables of `gateway.toml`.
//!
//! Why it is shaped so: every provider does two separate things. [`Provider::batches`] is pure
//! (no I/O) and is where each API's limits live (items per request, one kind per request,
//! wildcard counts), so limits are unit-tested without a network. [`Provider::send`] does exactly
//! one API request (or, for the HTTP provider, one per configured host) and maps the answer to an
//! [`ProviderAnswer`] the same way everywhere ([`classify`]): 2xx done, 429 retry after `Retry-After`,
//! 5xx / network error / timeout retry, any other 4xx fatal. Retrying, pacing and persistence
//! belong to the queue and worker, not here. Secrets and base URLs go through
//! [`crate::config::expand_env`] once, in [`build`]; every configuration problem is reported
//! with the table and key it is in and what to write instead.

pub mod cloudflare;
pub mod cloudfront;
pub mod fastly;
pub mod http;

pub use cloudflare::Cloudflare;
pub use cloudfront::CloudFront;
pub use fastly::Fastly;
pub use http::HttpPurge;

use super::{Batch, Kind, Provider, ProviderAnswer};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Every configuration problem of a provider at once: `prior` plus the message of each field that
/// failed to parse, one per line.
fn all_ok<'a>(
    prior: Vec<String>,
    fields: impl IntoIterator<Item = Option<&'a String>>,
) -> Result<(), String> {
    let mut errors = prior;
    errors.extend(fields.into_iter().flatten().cloned());
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// Every request to a CDN API gives up after this long (and is retried later).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[cdn]` table: which CDNs sit in front of the app. Absent tables are not used.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdnConfig {
    pub cloudflare: Option<CloudflareConfig>,
    pub fastly: Option<FastlyConfig>,
    pub cloudfront: Option<CloudFrontConfig>,
    pub http: Option<HttpConfig>,
}

/// `[cdn.cloudflare]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudflareConfig {
    #[serde(default = "cloudflare_base")]
    pub base: String,
    pub zone_id: String,
    /// API token with the zone's "Cache Purge" permission; usually `"${CF_API_TOKEN}"`.
    pub token: String,
    /// Requests per second.
    #[serde(default = "ten")]
    pub rate: f64,
    /// Items per request: 100, or up to 500 on Enterprise (URLs only; other kinds stay at 100).
    #[serde(default = "cloudflare_max_items")]
    pub max_items: usize,
}

/// `[cdn.fastly]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastlyConfig {
    #[serde(default = "fastly_base")]
    pub base: String,
    pub service_id: String,
    /// API token with `purge_select` scope; usually `"${FASTLY_TOKEN}"`.
    pub token: String,
    #[serde(default = "ten")]
    pub rate: f64,
}

/// `[cdn.cloudfront]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudFrontConfig {
    #[serde(default = "cloudfront_base")]
    pub base: String,
    pub distribution_id: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS); usually `"${AWS_SESSION_TOKEN}"`.
    #[serde(default)]
    pub session_token: Option<String>,
    #[serde(default = "cloudfront_region")]
    pub region: String,
    #[serde(default = "two")]
    pub rate: f64,
    /// Tag -> path patterns. A key ending in `*` matches every tag starting with the rest.
    #[serde(default)]
    pub tag_paths: BTreeMap<String, Vec<String>>,
}

/// `[cdn.http]`: Varnish / nginx purge endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Base URLs of the caches, each purged in turn: `["http://127.0.0.1:6081"]`.
    pub hosts: Vec<String>,
    /// Method for URL purges (`PURGE` for Varnish and nginx `proxy_cache_purge`).
    #[serde(default = "purge_method")]
    pub method: String,
    /// Method for tag purges, sent to `/` with the tags in `tag_header`.
    #[serde(default = "ban_method")]
    pub tag_method: String,
    /// Header carrying the space-separated tags of a tag purge (vmod-xkey's convention).
    #[serde(default = "xkey")]
    pub tag_header: String,
    #[serde(default = "fifty")]
    pub rate: f64,
}

fn cloudflare_base() -> String {
    "https://api.cloudflare.com".into()
}
fn fastly_base() -> String {
    "https://api.fastly.com".into()
}
fn cloudfront_base() -> String {
    "https://cloudfront.amazonaws.com".into()
}
fn cloudfront_region() -> String {
    "us-east-1".into()
}
fn cloudflare_max_items() -> usize {
    cloudflare::MAX_ITEMS
}
fn purge_method() -> String {
    "PURGE".into()
}
fn ban_method() -> String {
    "BAN".into()
}
fn xkey() -> String {
    "xkey".into()
}
fn ten() -> f64 {
    10.0
}
fn two() -> f64 {
    2.0
}
fn fifty() -> f64 {
    50.0
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for CloudflareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareConfig")
            .field("base", &self.base)
            .field("zone_id", &self.zone_id)
            .field("token", &REDACTED)
            .field("rate", &self.rate)
            .field("max_items", &self.max_items)
            .finish()
    }
}

impl fmt::Debug for FastlyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastlyConfig")
            .field("base", &self.base)
            .field("service_id", &self.service_id)
            .field("token", &REDACTED)
            .field("rate", &self.rate)
            .finish()
    }
}

impl fmt::Debug for CloudFrontConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudFrontConfig")
            .field("base", &self.base)
            .field("distribution_id", &self.distribution_id)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &REDACTED)
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| REDACTED),
            )
            .field("region", &self.region)
            .field("rate", &self.rate)
            .field("tag_paths", &self.tag_paths)
            .finish()
    }
}

/// Builds every configured provider, in the order cloudflare, fastly, cloudfront, http.
/// On error, the message lists every problem found, one per line.
pub fn build(cfg: &CdnConfig) -> Result<Vec<Arc<dyn Provider>>, String> {
    let mut out: Vec<Arc<dyn Provider>> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    if let Some(c) = &cfg.cloudflare {
        match Cloudflare::new(c) {
            Ok(p) => out.push(Arc::new(p)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(c) = &cfg.fastly {
        match Fastly::new(c) {
            Ok(p) => out.push(Arc::new(p)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(c) = &cfg.cloudfront {
        match CloudFront::new(c) {
            Ok(p) => out.push(Arc::new(p)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(c) = &cfg.http {
        match HttpPurge::new(c) {
            Ok(p) => out.push(Arc::new(p)),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

// ---------------------------------------------------------------------------
// Configuration checks shared by the providers
// ---------------------------------------------------------------------------

/// `${VAR}`-expanded, non-empty value of `[cdn.<table>] <key>`.
pub(crate) fn required(table: &str, key: &str, raw: &str, example: &str) -> Result<String, String> {
    let v = crate::config::expand_env(raw).map_err(|e| format!("[cdn.{table}] {key}: {e}"))?;
    let v = v.trim().to_string();
    if v.is_empty() {
        return Err(format!(
            "[cdn.{table}] {key} is empty; set it, e.g. {key} = {example:?}"
        ));
    }
    Ok(v)
}

/// A secret that goes into a header: non-empty and free of control characters.
pub(crate) fn secret(table: &str, key: &str, raw: &str, example: &str) -> Result<String, String> {
    let v = required(table, key, raw, example)?;
    if v.bytes().any(|b| b.is_ascii_control() || !b.is_ascii()) {
        return Err(format!(
            "[cdn.{table}] {key} contains control or non-ASCII characters (a stray newline in the \
             environment variable?); it cannot be sent in a header"
        ));
    }
    Ok(v)
}

/// An identifier that becomes one URL path segment (zone, service, distribution id).
pub(crate) fn identifier(
    table: &str,
    key: &str,
    raw: &str,
    example: &str,
) -> Result<String, String> {
    let v = required(table, key, raw, example)?;
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "[cdn.{table}] {key} = {v:?} is not an identifier (letters, digits, '-', '_'); copy \
             it from the provider's dashboard, e.g. {key} = {example:?}"
        ));
    }
    Ok(v)
}

/// An `http://` or `https://` URL without query or fragment, returned without a trailing `/`.
pub(crate) fn base_url(table: &str, key: &str, raw: &str, example: &str) -> Result<String, String> {
    let v = required(table, key, raw, example)?;
    let url = reqwest::Url::parse(&v).map_err(|e| {
        format!("[cdn.{table}] {key} = {v:?} is not a URL ({e}); write e.g. {key} = {example:?}")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "[cdn.{table}] {key} = {v:?} must be an http:// or https:// URL with a host, e.g. \
             {key} = {example:?}"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "[cdn.{table}] {key} = {v:?} must not have a query or fragment; write only scheme, \
             host and optional path, e.g. {key} = {example:?}"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

pub(crate) fn rate(table: &str, rate: f64) -> Result<f64, String> {
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(format!(
            "[cdn.{table}] rate = {rate} must be a positive number of requests per second, e.g. \
             rate = 10.0"
        ))
    }
}

/// The HTTP client of one provider: 10 s timeout, no redirects (a redirect from a purge API means
/// a wrong base URL, and following it would resend credentials); `no_proxy` for loopback bases.
pub(crate) fn client(table: &str, no_proxy: bool) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("aisle/", env!("CARGO_PKG_VERSION")));
    if no_proxy {
        b = b.no_proxy();
    }
    b.build()
        .map_err(|e| format!("[cdn.{table}]: cannot create the HTTP client: {e}"))
}

/// Whether `base`'s host is a loopback address or `localhost` (such a base never goes through a
/// proxy from the environment).
pub(crate) fn is_loopback(base: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

// ---------------------------------------------------------------------------
// Batching helpers
// ---------------------------------------------------------------------------

/// Items in first-seen order without duplicates.
pub(crate) fn dedup<'a>(items: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|s| seen.insert(s.as_str()))
        .cloned()
        .collect()
}

/// Splits `items` into batches of at most `max` (at least 1).
pub(crate) fn chunked(kind: Kind, items: Vec<String>, max: usize, soft: bool) -> Vec<Batch> {
    items
        .chunks(max.max(1))
        .map(|c| Batch {
            kind,
            items: c.to_vec(),
            soft,
        })
        .collect()
}

/// A tag every CDN accepts: 1..=1024 printable ASCII characters, no spaces (Cloudflare's
/// `Cache-Tag` rules; Fastly's surrogate keys are space-separated, so the same rule holds).
pub(crate) fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= 1024 && tag.bytes().all(|b| b.is_ascii_graphic())
}

/// Drops (and logs) what `keep` rejects.
pub(crate) fn keep_valid(
    provider: &str,
    what: &str,
    items: Vec<String>,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let (ok, bad): (Vec<String>, Vec<String>) = items.into_iter().partition(|s| keep(s));
    if !bad.is_empty() {
        tracing::warn!(
            provider,
            dropped = ?bad,
            "{provider}: dropped {} {what} the API would reject",
            bad.len()
        );
    }
    ok
}

// ---------------------------------------------------------------------------
// Sending and classifying answers
// ---------------------------------------------------------------------------

/// A complete answer from an API.
pub(crate) struct Reply {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

/// Sends a request and reads the whole answer; a transport failure is a `Retry` (or `Fatal` when
/// the request could not even be built).
pub(crate) async fn execute(
    provider: &str,
    what: &str,
    req: reqwest::RequestBuilder,
) -> Result<Reply, ProviderAnswer> {
    let resp = req.send().await.map_err(|e| transport(provider, what, e))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .text()
        .await
        .map_err(|e| transport(provider, what, e))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn transport(provider: &str, what: &str, e: reqwest::Error) -> ProviderAnswer {
    if e.is_builder() {
        return ProviderAnswer::Fatal(format!(
            "{provider}: could not build the request {what}: {e}; check the [cdn.{provider}] \
             settings"
        ));
    }
    let why = if e.is_timeout() {
        format!("timed out after {}s", REQUEST_TIMEOUT.as_secs())
    } else if e.is_connect() {
        format!("could not connect: {}", error_chain(&e))
    } else {
        error_chain(&e)
    };
    ProviderAnswer::Retry {
        after: None,
        detail: format!("{provider}: {what} failed: {why}; will retry"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut depth = 0;
    while let Some(inner) = cur {
        if depth >= 5 {
            break;
        }
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
        depth += 1;
    }
    s
}

/// The outcome of a non-2xx answer: 429 and 5xx retry (after `Retry-After` when given), any
/// other status is fatal. `detail` says what the API said; `hint` what to do about a fatal one.
pub(crate) fn classify(
    provider: &str,
    what: &str,
    reply: &Reply,
    detail: &str,
    hint: &str,
) -> ProviderAnswer {
    let status = reply.status;
    let said = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        ProviderAnswer::Retry {
            after: retry_after(&reply.headers, SystemTime::now()),
            detail: format!("{provider}: {what} answered HTTP {status}{said}; will retry"),
        }
    } else {
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!("; {hint}")
        };
        ProviderAnswer::Fatal(format!(
            "{provider}: {what} answered HTTP {status}{said}{hint}"
        ))
    }
}

/// `Retry-After` of an answer, if present and well-formed.
pub(crate) fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
}

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delay-seconds or an HTTP-date (a date in the
/// past means "now": zero). Anything else is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most `max` characters of an answer body, for messages.
pub(crate) fn excerpt(body: &str, max: usize) -> String {
    let body = body.trim();
    match body.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &body[..i]),
        None => body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("99999999999999999999999", now), None);
    }

    fn reply(status: u16, headers: &[(&str, &str)]) -> Reply {
        let mut h = reqwest::header::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Reply {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: h,
            body: String::new(),
        }
    }

    #[test]
    fn classify_statuses() {
        let r = classify("x", "POST /", &reply(429, &[("retry-after", "7")]), "", "");
        assert!(
            matches!(r, ProviderAnswer::Retry { after: Some(d), .. } if d == Duration::from_secs(7)),
            "{r:?}"
        );
        let r = classify("x", "POST /", &reply(503, &[]), "down", "");
        assert!(
            matches!(r, ProviderAnswer::Retry { after: None, .. }),
            "{r:?}"
        );
        let r = classify("x", "POST /", &reply(500, &[("retry-after", "3")]), "", "");
        assert!(
            matches!(r, ProviderAnswer::Retry { after: Some(d), .. } if d == Duration::from_secs(3)),
            "{r:?}"
        );
        for s in [400, 401, 403, 404, 301] {
            let r = classify("x", "POST /", &reply(s, &[]), "no", "fix it");
            match r {
                ProviderAnswer::Fatal(m) => {
                    assert!(m.contains("fix it") && m.contains("no"), "{m}")
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn empty_config_builds_nothing() {
        assert!(build(&CdnConfig::default()).unwrap().is_empty());
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_keys() {
        let cfg: CdnConfig = toml::from_str(
            r#"
            [cloudflare]
            zone_id = "z1"
            token = "t"
            [fastly]
            service_id = "s1"
            token = "t"
            [cloudfront]
            distribution_id = "E1"
            access_key_id = "AK"
            secret_access_key = "SK"
            tag_paths = { vendors = ["/api/vendors/*"], "wedding:*" = ["/api/weddings/*"] }
            [http]
            hosts = ["http://127.0.0.1:6081"]
            "#,
        )
        .unwrap();
        let cf = cfg.cloudflare.as_ref().unwrap();
        assert_eq!(cf.base, "https://api.cloudflare.com");
        assert_eq!((cf.rate, cf.max_items), (10.0, 100));
        assert_eq!(cfg.fastly.as_ref().unwrap().base, "https://api.fastly.com");
        let cfr = cfg.cloudfront.as_ref().unwrap();
        assert_eq!(cfr.region, "us-east-1");
        assert_eq!(cfr.rate, 2.0);
        assert_eq!(cfr.tag_paths.len(), 2);
        let h = cfg.http.as_ref().unwrap();
        assert_eq!((h.method.as_str(), h.tag_method.as_str()), ("PURGE", "BAN"));
        let providers = build(&cfg).unwrap();
        let names: Vec<&str> = providers.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["cloudflare", "fastly", "cloudfront", "http"]);

        let err =
            toml::from_str::<CdnConfig>("[cloudflare]\nzone_id = \"z\"\ntoken = \"t\"\nzone = 1\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `zone`"), "{err}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let cfg: CdnConfig = toml::from_str(
            "[cloudflare]\nzone_id = \"z\"\ntoken = \"sekrit-1\"\n[cloudfront]\ndistribution_id = \"E\"\naccess_key_id = \"AK\"\nsecret_access_key = \"sekrit-2\"\n",
        )
        .unwrap();
        let s = format!("{cfg:?}");
        assert!(!s.contains("sekrit"), "{s}");
    }

    fn cf(zone: &str, token: &str, base: &str) -> CdnConfig {
        CdnConfig {
            cloudflare: Some(CloudflareConfig {
                base: base.into(),
                zone_id: zone.into(),
                token: token.into(),
                rate: 10.0,
                max_items: 100,
            }),
            ..Default::default()
        }
    }

    fn build_err(cfg: &CdnConfig) -> String {
        match build(cfg) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e,
        }
    }

    #[test]
    fn config_errors_say_what_and_how() {
        let e = build_err(&cf("", "t", "https://api.cloudflare.com"));
        assert!(e.contains("[cdn.cloudflare] zone_id is empty"), "{e}");

        let e = build_err(&cf(
            "z",
            "${AISLE_TEST_SURELY_UNSET_VAR}",
            "https://api.cloudflare.com",
        ));
        assert!(
            e.contains("[cdn.cloudflare] token")
                && e.contains("AISLE_TEST_SURELY_UNSET_VAR is not set")
                && e.contains("export it"),
            "{e}"
        );

        let e = build_err(&cf("z", "t", "ftp://api.cloudflare.com"));
        assert!(e.contains("must be an http:// or https:// URL"), "{e}");
        let e = build_err(&cf("z", "t", "not a url"));
        assert!(e.contains("is not a URL"), "{e}");
        let e = build_err(&cf("z/../x", "t", "https://api.cloudflare.com"));
        assert!(e.contains("is not an identifier"), "{e}");
        let e = build_err(&cf("z", "line\nbreak", "https://api.cloudflare.com"));
        assert!(e.contains("control or non-ASCII"), "{e}");

        let mut bad_rate = cf("z", "t", "https://api.cloudflare.com");
        bad_rate.cloudflare.as_mut().unwrap().rate = 0.0;
        assert!(build_err(&bad_rate).contains("rate = 0 must be a positive number"));

        let mut too_many = cf("z", "t", "https://api.cloudflare.com");
        too_many.cloudflare.as_mut().unwrap().max_items = 1000;
        assert!(build_err(&too_many).contains("max_items = 1000"));

        // Every problem is reported, not just the first.
        let mut two = cf("", "t", "https://api.cloudflare.com");
        two.http = Some(HttpConfig {
            hosts: vec![],
            method: "PURGE".into(),
            tag_method: "BAN".into(),
            tag_header: "xkey".into(),
            rate: 50.0,
        });
        let e = build_err(&two);
        assert!(
            e.contains("zone_id is empty") && e.contains("[cdn.http] hosts"),
            "{e}"
        );
    }

    #[test]
    fn base_url_forms() {
        assert_eq!(
            base_url("t", "base", "http://127.0.0.1:8080/", "x").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("t", "base", "https://api.example.com/prefix/", "x").unwrap(),
            "https://api.example.com/prefix"
        );
        assert!(base_url("t", "base", "https://api.example.com/?a=b", "x").is_err());
        assert!(is_loopback("http://127.0.0.1:1"));
        assert!(is_loopback("http://[::1]:1"));
        assert!(is_loopback("http://localhost:1"));
        assert!(!is_loopback("https://api.cloudflare.com"));
    }

    #[test]
    fn chunking_and_dedup() {
        let items: Vec<String> = (0..5).map(|i| format!("t{}", i % 3)).collect();
        let d = dedup(&items);
        assert_eq!(d, ["t0", "t1", "t2"]);
        let b = chunked(
            Kind::Tags,
            (0..250).map(|i| i.to_string()).collect(),
            100,
            false,
        );
        assert_eq!(
            b.iter().map(|b| b.items.len()).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        assert!(valid_tag("wedding:42"));
        assert!(!valid_tag("has space"));
        assert!(!valid_tag(""));
        assert!(!valid_tag(&"x".repeat(1025)));
        assert!(!valid_tag("caf\u{e9}"));
    }

    #[test]
    fn excerpt_truncates_on_char_boundaries() {
        assert_eq!(excerpt("  short  ", 10), "short");
        assert_eq!(excerpt("\u{e9}\u{e9}\u{e9}", 2), "\u{e9}\u{e9}...");
    }
}
