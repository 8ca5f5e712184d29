//! The CDN purge APIs Aisle speaks: Cloudflare, Fastly, CloudFront and plain HTTP PURGE/BAN
//! (Varnish, nginx), each a [`Provider`] built from the `[cdn.*]` tables of `gateway.toml`.
//!
//! Why it is shaped so: every provider does two separate things. [`Provider::batches`] is pure
//! (no I/O) and is where each API's limits live (items per request, one kind per request,
//! wildcard counts), so limits are unit-tested without a network. [`Provider::send`] does exactly
//! one API request (or, for the HTTP provider, one per configured host) and maps the answer to an
//! [`ProviderAnswer`] the same way everywhere ([`classify`]): 2xx done, 429 retry after `Retry-After`
//! (a second without one),
//! 5xx / network error / timeout retry, any other 4xx fatal. Retrying, pacing and persistence
//! belong to the queue and worker, not here. Providers are built from checked settings
//! ([`crate::config::cdn::CdnSettings`]: defaults applied, `${VAR}` expanded, every problem
//! already reported at its position by `aisle check`), so nothing here parses configuration.

pub mod cloudflare;
pub mod cloudfront;
pub mod fastly;
pub mod http;

pub use cloudflare::Cloudflare;
pub use cloudfront::CloudFront;
pub use fastly::Fastly;
pub use http::HttpPurge;

pub use crate::config::cdn::CdnConfig;

use super::{Batch, Kind, Plan, Provider, ProviderAnswer, SkipReason};
use crate::config::cdn::CdnSettings;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a `429` without `Retry-After` pauses its provider.
pub const THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// Every request to a CDN API gives up after this long (and is retried later).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a `[cdn]` table parsed on its own and builds every configured provider (see
/// [`from_settings`]). On error, the message lists every problem found, one per line.
pub fn build(cfg: &CdnConfig) -> Result<Vec<Arc<dyn Provider>>, String> {
    let settings = crate::config::cdn::check(cfg).map_err(|problems| {
        problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    from_settings(&settings)
}

/// Builds every configured provider, in the order cloudflare, fastly, cloudfront, http. Fails
/// only when an HTTP client cannot be created.
pub fn from_settings(cfg: &CdnSettings) -> Result<Vec<Arc<dyn Provider>>, String> {
    let mut out: Vec<Arc<dyn Provider>> = Vec::new();
    if let Some(c) = &cfg.cloudflare {
        out.push(Arc::new(Cloudflare::new(c)?));
    }
    if let Some(c) = &cfg.fastly {
        out.push(Arc::new(Fastly::new(c)?));
    }
    if let Some(c) = &cfg.cloudfront {
        out.push(Arc::new(CloudFront::new(c)?));
    }
    if let Some(c) = &cfg.http {
        out.push(Arc::new(HttpPurge::new(c)?));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

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

/// Keeps what `keep` accepts; the rest is logged and recorded in `plan` as
/// [`SkipReason::Invalid`] (the API would refuse it).
pub(crate) fn keep_valid(
    provider: &str,
    what: &str,
    kind: Kind,
    items: Vec<String>,
    keep: impl Fn(&str) -> bool,
    plan: &mut Plan,
) -> Vec<String> {
    let (ok, bad): (Vec<String>, Vec<String>) = items.into_iter().partition(|s| keep(s));
    if !bad.is_empty() {
        tracing::warn!(
            provider,
            dropped = ?bad,
            "{provider}: {} {what} not sent: the API would reject them (counted in \
             aisle_purge_skipped_total and /admin/purges)",
            bad.len()
        );
        plan.skip(kind, bad, SkipReason::Invalid);
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
        let mut after = retry_after(&reply.headers, SystemTime::now());
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // A 429 is always pacing: without `Retry-After`, hold off a second.
            after = after.or(Some(THROTTLE_PAUSE));
        }
        ProviderAnswer::Retry {
            after,
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
        let r = classify("x", "POST /", &reply(429, &[]), "", "");
        assert!(
            matches!(r, ProviderAnswer::Retry { after: Some(d), .. } if d == THROTTLE_PAUSE),
            "a 429 is pacing even without Retry-After: {r:?}"
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
    fn every_table_builds_its_provider_in_order() {
        let cfg: CdnConfig = toml::from_str(
            r#"
            [http]
            hosts = ["http://127.0.0.1:6081"]
            [cloudfront]
            distribution_id = "E1"
            access_key_id = "AK"
            secret_access_key = "SK"
            [fastly]
            service_id = "s1"
            token = "t"
            [cloudflare]
            zone_id = "z1"
            token = "t"
            "#,
        )
        .unwrap();
        let providers = build(&cfg).unwrap();
        let names: Vec<&str> = providers.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["cloudflare", "fastly", "cloudfront", "http"]);
    }

    #[test]
    fn build_reports_every_problem_one_per_line() {
        let cfg: CdnConfig =
            toml::from_str("[cloudflare]\nzone_id = \"\"\ntoken = \"t\"\n[http]\nhosts = []\n")
                .unwrap();
        let e = match build(&cfg) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e,
        };
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0].contains("[cdn.cloudflare] zone_id is empty"),
            "{e}"
        );
        assert!(lines[1].contains("[cdn.http] hosts is empty"), "{e}");
    }

    #[test]
    fn loopback_bases_skip_proxies() {
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
