//! `[cdn.*]`: which CDN purge APIs sit in front of the app, as written ([`CdnConfig`]) and as
//! checked ([`CdnSettings`]).
//!
//! Why it is shaped so: the tables are read with the position of every value kept, and
//! `check` reports each problem on its own, at the key or value it is about, saying what to
//! write instead (`gateway.toml:14:11: [cdn.cloudflare] zone_id is empty; ...`). Secrets and base
//! URLs go through `${VAR}` expansion here, once. `purge::providers` builds its API clients from
//! the checked [`CdnSettings`] and never sees raw text; [`CdnConfig`] is also parsed on its own
//! (a `[cdn]` table without the rest of `gateway.toml`) by `purge::providers::build`, so its
//! spans are relative to whatever text it came from.

use super::env::expand_env;
use super::secret::redact_url;
use super::secret::Secret;
use crate::diag::Problem;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// Cloudflare's per-request limit for every kind (and for URLs below Enterprise).
pub(crate) const CLOUDFLARE_MAX_ITEMS: usize = 100;
/// Cloudflare Enterprise's per-request limit for URLs.
pub(crate) const CLOUDFLARE_MAX_ITEMS_ENTERPRISE: usize = 500;

// ---------------------------------------------------------------------------------------------
// As written
// ---------------------------------------------------------------------------------------------

/// The `[cdn]` table: which CDNs sit in front of the app. Absent tables are not used.
// Not `Spanned` itself: toml cannot span a table that only exists through dotted headers
// (`[cdn.cloudflare]` without `[cdn]`); the values inside carry the positions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdnConfig {
    pub cloudflare: Option<CloudflareConfig>,
    pub fastly: Option<FastlyConfig>,
    pub cloudfront: Option<CloudFrontConfig>,
    pub http: Option<HttpConfig>,
}

/// `[cdn.cloudflare]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudflareConfig {
    pub base: Option<Spanned<String>>,
    pub zone_id: Spanned<String>,
    /// API token with the zone's "Cache Purge" permission; usually `"${CF_API_TOKEN}"`.
    pub token: Spanned<Secret>,
    /// Requests per second.
    pub rate: Option<Spanned<f64>>,
    /// Items per request: 100, or up to 500 on Enterprise (URLs only; other kinds stay at 100).
    pub max_items: Option<Spanned<usize>>,
}

/// `[cdn.fastly]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastlyConfig {
    pub base: Option<Spanned<String>>,
    pub service_id: Spanned<String>,
    /// API token with `purge_select` scope; usually `"${FASTLY_TOKEN}"`.
    pub token: Spanned<Secret>,
    pub rate: Option<Spanned<f64>>,
    /// The service's public hostnames (`["www.example.com"]`): a URL purge is sent for the
    /// URL's path and query on each. Unset: on the purged URL's own host.
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[cdn.cloudfront]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudFrontConfig {
    pub base: Option<Spanned<String>>,
    pub distribution_id: Spanned<String>,
    pub access_key_id: Spanned<String>,
    pub secret_access_key: Spanned<Secret>,
    /// For temporary credentials (STS); usually `"${AWS_SESSION_TOKEN}"`.
    pub session_token: Option<Spanned<Secret>>,
    pub region: Option<Spanned<String>>,
    pub rate: Option<Spanned<f64>>,
    /// Tag -> path patterns. A key ending in `*` matches every tag starting with the rest.
    #[serde(default)]
    pub tag_paths: BTreeMap<Spanned<String>, Spanned<Vec<Spanned<String>>>>,
}

/// `[cdn.http]`: Varnish / nginx purge endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Base URLs of the caches, each purged in turn: `["http://127.0.0.1:6081"]`.
    pub hosts: Spanned<Vec<Spanned<String>>>,
    /// Method for URL purges (`PURGE` for Varnish and nginx `proxy_cache_purge`).
    pub method: Option<Spanned<String>>,
    /// Method for tag purges, sent to `/` with the tags in `tag_header`.
    pub tag_method: Option<Spanned<String>>,
    /// Header carrying the space-separated tags of a tag purge (vmod-xkey's convention).
    pub tag_header: Option<Spanned<String>>,
    pub rate: Option<Spanned<f64>>,
}

// ---------------------------------------------------------------------------------------------
// Checked
// ---------------------------------------------------------------------------------------------

/// Every configured CDN, checked: defaults applied, `${VAR}`s expanded, URLs normalized.
/// Comparable (secrets included, though `Debug` redacts them), so a reload can tell whether the
/// providers must be rebuilt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CdnSettings {
    pub cloudflare: Option<CloudflareSettings>,
    pub fastly: Option<FastlySettings>,
    pub cloudfront: Option<CloudFrontSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudflareSettings {
    /// Without a trailing `/`.
    pub base: String,
    pub zone_id: String,
    pub token: Secret,
    pub rate: f64,
    /// URLs per request (other kinds: `CLOUDFLARE_MAX_ITEMS`).
    pub max_urls: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FastlySettings {
    pub base: String,
    pub service_id: String,
    pub token: Secret,
    pub rate: f64,
    /// Lowercase hostnames (with an optional `:port`) URL purges are sent for; empty: each
    /// URL's own host.
    pub hosts: Vec<String>,
}

/// A `tag_paths` key: one tag, or every tag starting with a prefix (`"wedding:*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagKey {
    Exact(String),
    Prefix(String),
}

impl TagKey {
    pub(crate) fn matches(&self, tag: &str) -> bool {
        match self {
            TagKey::Exact(t) => t == tag,
            TagKey::Prefix(p) => tag.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudFrontSettings {
    pub base: String,
    pub distribution_id: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub region: String,
    pub rate: f64,
    /// In key order.
    pub tag_paths: Vec<(TagKey, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Without a trailing `/`.
    pub hosts: Vec<String>,
    pub method: http::Method,
    pub tag_method: http::Method,
    pub tag_header: http::HeaderName,
    pub rate: f64,
}

/// Checks every configured table. Each problem is reported on its own, at the value it is
/// about (or at the key, for a bad `tag_paths` key).
pub(crate) fn check(raw: &CdnConfig) -> Result<CdnSettings, Vec<Problem>> {
    let mut p = Problems::default();
    let settings = CdnSettings {
        cloudflare: raw.cloudflare.as_ref().and_then(|c| cloudflare(c, &mut p)),
        fastly: raw.fastly.as_ref().and_then(|c| fastly(c, &mut p)),
        cloudfront: raw.cloudfront.as_ref().and_then(|c| cloudfront(c, &mut p)),
        http: raw.http.as_ref().and_then(|c| http_purge(c, &mut p)),
    };
    if p.0.is_empty() {
        Ok(settings)
    } else {
        Err(p.0)
    }
}

/// Problems found so far; a check that fails records its problem and yields `None`.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn ok<T>(&mut self, r: Result<T, Problem>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }
}

fn problem(at: &Spanned<impl Sized>, message: String) -> Problem {
    Problem {
        span: at.span(),
        message,
    }
}

fn cloudflare(c: &CloudflareConfig, p: &mut Problems) -> Option<CloudflareSettings> {
    let t = "cloudflare";
    let base = p.ok(base_or(t, &c.base, "https://api.cloudflare.com"));
    let zone_id = p.ok(identifier(
        t,
        "zone_id",
        &c.zone_id,
        "023e105f4ecef8ad9ca31a8372d0c353",
    ));
    let token = p.ok(secret(t, "token", &c.token, "${CF_API_TOKEN}"));
    let rate = p.ok(rate(t, &c.rate, 10.0));
    let max_urls = p.ok(match &c.max_items {
        None => Ok(CLOUDFLARE_MAX_ITEMS),
        Some(m) if (1..=CLOUDFLARE_MAX_ITEMS_ENTERPRISE).contains(m.get_ref()) => Ok(*m.get_ref()),
        Some(m) => Err(problem(
            m,
            format!(
                "[cdn.cloudflare] max_items = {} is outside 1..={CLOUDFLARE_MAX_ITEMS_ENTERPRISE}; \
                 use 100 (500 only on an Enterprise plan)",
                m.get_ref()
            ),
        )),
    });
    Some(CloudflareSettings {
        base: base?,
        zone_id: zone_id?,
        token: token?.into(),
        rate: rate?,
        max_urls: max_urls?,
    })
}

fn fastly(c: &FastlyConfig, p: &mut Problems) -> Option<FastlySettings> {
    let t = "fastly";
    let base = p.ok(base_or(t, &c.base, "https://api.fastly.com"));
    let service_id = p.ok(identifier(
        t,
        "service_id",
        &c.service_id,
        "SU1Z0isxPaozGVKXdv0eY",
    ));
    let token = p.ok(secret(t, "token", &c.token, "${FASTLY_TOKEN}"));
    let rate = p.ok(rate(t, &c.rate, 10.0));
    let hosts = p.ok(fastly_hosts(c));
    Some(FastlySettings {
        base: base?,
        service_id: service_id?,
        token: token?.into(),
        rate: rate?,
        hosts: hosts?,
    })
}

/// `[cdn.fastly] hosts`: bare hostnames (an optional `:port`), lowercased; each problem at its
/// value (the first one is reported).
fn fastly_hosts(c: &FastlyConfig) -> Result<Vec<String>, Problem> {
    let Some(hosts) = &c.hosts else {
        return Ok(Vec::new());
    };
    if hosts.get_ref().is_empty() {
        return Err(problem(
            hosts,
            "[cdn.fastly] hosts is empty; list the service's public hostnames, e.g. hosts = \
             [\"www.example.com\"], or leave hosts out to purge each URL on its own host"
                .to_string(),
        ));
    }
    let mut out = Vec::new();
    for (i, h) in hosts.get_ref().iter().enumerate() {
        let v = expand_env(h.get_ref())
            .map_err(|e| problem(h, format!("[cdn.fastly] hosts[{i}]: {e}")))?;
        let v = v.trim().to_ascii_lowercase();
        let (name, port) = match v.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (v.as_str(), None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
        if !name_ok || !port_ok {
            return Err(problem(
                h,
                format!(
                    "[cdn.fastly] hosts[{i}] = {:?} is not a hostname; write the name clients \
                     use, without scheme or path, e.g. \"www.example.com\"",
                    h.get_ref()
                ),
            ));
        }
        out.push(v);
    }
    Ok(out)
}

/// A CloudFront path: starts with `/`, printable ASCII, `*` only as the last character.
pub(crate) fn is_cloudfront_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 4000
        && path.bytes().all(|b| b.is_ascii_graphic())
        && !path[..path.len() - 1].contains('*')
}

fn cloudfront(c: &CloudFrontConfig, p: &mut Problems) -> Option<CloudFrontSettings> {
    let t = "cloudfront";
    let base = p.ok(base_or(t, &c.base, "https://cloudfront.amazonaws.com"));
    let dist = p.ok(identifier(
        t,
        "distribution_id",
        &c.distribution_id,
        "EDFDVBD6EXAMPLE",
    ));
    let akid = p.ok(secret(
        t,
        "access_key_id",
        &c.access_key_id,
        "${AWS_ACCESS_KEY_ID}",
    ));
    let sk = p.ok(secret(
        t,
        "secret_access_key",
        &c.secret_access_key,
        "${AWS_SECRET_ACCESS_KEY}",
    ));
    let token = p.ok(match &c.session_token {
        None => Ok(None),
        Some(raw) => expand_env(raw.get_ref().expose())
            .map_err(|e| problem(raw, format!("[cdn.{t}] session_token: {e}")))
            .map(|v| {
                Some(v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .map(Secret::from)
            }),
    });
    let region = p.ok(match &c.region {
        None => Ok("us-east-1".to_string()),
        Some(r) => required(t, "region", r, "us-east-1").and_then(|v| {
            if v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                Ok(v)
            } else {
                Err(problem(
                    r,
                    format!(
                        "[cdn.{t}] region = {v:?} is not an AWS region name; CloudFront's API is \
                         signed for region = \"us-east-1\""
                    ),
                ))
            }
        }),
    });
    let rate = p.ok(rate(t, &c.rate, 2.0));
    let mut tag_paths = Vec::new();
    let before = p.0.len();
    for (key, paths) in &c.tag_paths {
        let name = key.get_ref();
        let stem = name.strip_suffix('*').unwrap_or(name);
        if name.is_empty() || stem.contains('*') {
            p.0.push(problem(
                key,
                format!(
                    "[cdn.{t}] tag_paths key {name:?}: write a tag (\"vendors\") or a tag prefix \
                     ending in * (\"wedding:*\"); '*' is allowed only at the end"
                ),
            ));
            continue;
        }
        if paths.get_ref().is_empty() {
            p.0.push(problem(
                paths,
                format!(
                    "[cdn.{t}] tag_paths.{name:?} is empty; list the paths it invalidates, e.g. \
                     [\"/api/vendors/*\"]"
                ),
            ));
        }
        for path in paths.get_ref() {
            if !is_cloudfront_path(path.get_ref()) {
                p.0.push(problem(
                    path,
                    format!(
                        "[cdn.{t}] tag_paths.{name:?}: {:?} is not a CloudFront path; a path \
                         starts with '/', has no spaces, and may end in '*' (\"/api/vendors/*\")",
                        path.get_ref()
                    ),
                ));
            }
        }
        let k = if name.ends_with('*') {
            TagKey::Prefix(stem.to_string())
        } else {
            TagKey::Exact(name.clone())
        };
        let paths = paths.get_ref().iter().map(|s| s.get_ref().clone());
        tag_paths.push((k, paths.collect()));
    }
    if p.0.len() > before {
        return None;
    }
    Some(CloudFrontSettings {
        base: base?,
        distribution_id: dist?,
        access_key_id: akid?,
        secret_access_key: sk?.into(),
        session_token: token?,
        region: region?,
        rate: rate?,
        tag_paths,
    })
}

fn method(
    key: &str,
    raw: &Option<Spanned<String>>,
    default: http::Method,
) -> Result<http::Method, Problem> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let v = raw.get_ref();
    let m = v.trim();
    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(problem(
            raw,
            format!(
                "[cdn.http] {key} = {v:?} is not an HTTP method; write it in capitals, e.g. \
                 {key} = \"PURGE\" or \"BAN\""
            ),
        ));
    }
    http::Method::from_bytes(m.as_bytes())
        .map_err(|e| problem(raw, format!("[cdn.http] {key} = {v:?}: {e}")))
}

fn http_purge(c: &HttpConfig, p: &mut Problems) -> Option<HttpSettings> {
    let t = "http";
    let before = p.0.len();
    if c.hosts.get_ref().is_empty() {
        p.0.push(problem(
            &c.hosts,
            "[cdn.http] hosts is empty; list the caches to purge, e.g. hosts = \
             [\"http://127.0.0.1:6081\"]"
                .to_string(),
        ));
    }
    let mut hosts = Vec::new();
    for (i, h) in c.hosts.get_ref().iter().enumerate() {
        if let Some(u) = p.ok(base_url(
            t,
            &format!("hosts[{i}]"),
            h,
            "http://127.0.0.1:6081",
        )) {
            hosts.push(u);
        }
    }
    let m = p.ok(method(
        "method",
        &c.method,
        http::Method::from_bytes(b"PURGE").expect("static"),
    ));
    let tm = p.ok(method(
        "tag_method",
        &c.tag_method,
        http::Method::from_bytes(b"BAN").expect("static"),
    ));
    let th = p.ok(match &c.tag_header {
        None => Ok(http::HeaderName::from_static("xkey")),
        Some(h) => http::HeaderName::from_bytes(h.get_ref().trim().as_bytes()).map_err(|_| {
            problem(
                h,
                format!(
                    "[cdn.http] tag_header = {:?} is not a header name; e.g. tag_header = \"xkey\"",
                    h.get_ref()
                ),
            )
        }),
    });
    let r = p.ok(rate(t, &c.rate, 50.0));
    if p.0.len() > before {
        return None;
    }
    Some(HttpSettings {
        hosts,
        method: m?,
        tag_method: tm?,
        tag_header: th?,
        rate: r?,
    })
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tables
// ---------------------------------------------------------------------------------------------

/// `${VAR}`-expanded, non-empty value of `[cdn.<table>] <key>`.
fn required(
    table: &str,
    key: &str,
    raw: &Spanned<impl AsRef<str>>,
    example: &str,
) -> Result<String, Problem> {
    let v = expand_env(raw.get_ref().as_ref())
        .map_err(|e| problem(raw, format!("[cdn.{table}] {key}: {e}")))?;
    let v = v.trim().to_string();
    if v.is_empty() {
        return Err(problem(
            raw,
            format!("[cdn.{table}] {key} is empty; set it, e.g. {key} = {example:?}"),
        ));
    }
    Ok(v)
}

/// A secret that goes into a header: non-empty and free of control characters.
fn secret(
    table: &str,
    key: &str,
    raw: &Spanned<impl AsRef<str>>,
    example: &str,
) -> Result<String, Problem> {
    let v = required(table, key, raw, example)?;
    if v.bytes().any(|b| b.is_ascii_control() || !b.is_ascii()) {
        return Err(problem(
            raw,
            format!(
                "[cdn.{table}] {key} contains control or non-ASCII characters (a stray newline in \
                 the environment variable?); it cannot be sent in a header"
            ),
        ));
    }
    Ok(v)
}

/// An identifier that becomes one URL path segment (zone, service, distribution id).
fn identifier(
    table: &str,
    key: &str,
    raw: &Spanned<String>,
    example: &str,
) -> Result<String, Problem> {
    let v = required(table, key, raw, example)?;
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(problem(
            raw,
            format!(
                "[cdn.{table}] {key} = {v:?} is not an identifier (letters, digits, '-', '_'); \
                 copy it from the provider's dashboard, e.g. {key} = {example:?}"
            ),
        ));
    }
    Ok(v)
}

/// `base` as written, else the provider's public API.
fn base_or(table: &str, raw: &Option<Spanned<String>>, default: &str) -> Result<String, Problem> {
    match raw {
        None => Ok(default.to_string()),
        Some(raw) => base_url(table, "base", raw, default),
    }
}

/// An `http://` or `https://` URL without query or fragment, returned without a trailing `/`.
fn base_url(
    table: &str,
    key: &str,
    raw: &Spanned<String>,
    example: &str,
) -> Result<String, Problem> {
    let raw_value = required(table, key, raw, example)?;
    // Messages show the URL without its userinfo: it may hold an expanded `${VAR}` password.
    let v = redact_url(&raw_value);
    let url = reqwest::Url::parse(&raw_value).map_err(|e| {
        problem(
            raw,
            format!(
                "[cdn.{table}] {key} = {v:?} is not a URL ({e}); write e.g. {key} = {example:?}"
            ),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(problem(
            raw,
            format!(
                "[cdn.{table}] {key} = {v:?} must be an http:// or https:// URL with a host, e.g. \
                 {key} = {example:?}"
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem(
            raw,
            format!(
                "[cdn.{table}] {key} = {v:?} must not have a query or fragment; write only \
                 scheme, host and optional path, e.g. {key} = {example:?}"
            ),
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn rate(table: &str, raw: &Option<Spanned<f64>>, default: f64) -> Result<f64, Problem> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let rate = *raw.get_ref();
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(problem(
            raw,
            format!(
                "[cdn.{table}] rate = {rate} must be a positive number of requests per second, \
                 e.g. rate = 10.0"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems of a `[cdn]` table, as (line, col, message) in `text`.
    fn problems(text: &str) -> Vec<(usize, usize, String)> {
        let cfg: CdnConfig = toml::from_str(text).expect("valid TOML");
        let file = crate::diag::SourceFile::new(std::path::Path::new("cdn.toml"), text);
        match check(&cfg) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(ps) => ps
                .into_iter()
                .map(|p| {
                    let d = file.problem(p);
                    (d.line, d.col, d.message)
                })
                .collect(),
        }
    }

    fn one(text: &str) -> String {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        p[0].2.clone()
    }

    fn settings(text: &str) -> CdnSettings {
        check(&toml::from_str(text).expect("valid TOML")).expect("no problems")
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_refused() {
        let s = settings(
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
            hosts = ["http://127.0.0.1:6081/"]
            "#,
        );
        let cf = s.cloudflare.as_ref().unwrap();
        assert_eq!(cf.base, "https://api.cloudflare.com");
        assert_eq!((cf.rate, cf.max_urls), (10.0, 100));
        assert_eq!(s.fastly.as_ref().unwrap().base, "https://api.fastly.com");
        let cfr = s.cloudfront.as_ref().unwrap();
        assert_eq!((cfr.region.as_str(), cfr.rate), ("us-east-1", 2.0));
        assert_eq!(
            cfr.tag_paths,
            [
                (
                    TagKey::Exact("vendors".into()),
                    vec!["/api/vendors/*".into()]
                ),
                (
                    TagKey::Prefix("wedding:".into()),
                    vec!["/api/weddings/*".into()]
                ),
            ]
        );
        let h = s.http.as_ref().unwrap();
        assert_eq!((h.method.as_str(), h.tag_method.as_str()), ("PURGE", "BAN"));
        assert_eq!((h.tag_header.as_str(), h.rate), ("xkey", 50.0));
        assert_eq!(h.hosts, ["http://127.0.0.1:6081"], "trailing '/' dropped");

        let err =
            toml::from_str::<CdnConfig>("[cloudflare]\nzone_id = \"z\"\ntoken = \"t\"\nzone = 1\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `zone`"), "{err}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let text = "[cloudflare]\nzone_id = \"z\"\ntoken = \"sekrit-1\"\n[cloudfront]\ndistribution_id = \"E\"\naccess_key_id = \"AK\"\nsecret_access_key = \"sekrit-2\"\nsession_token = \"sekrit-3\"\n";
        let raw: CdnConfig = toml::from_str(text).unwrap();
        let s = format!("{raw:?} {:?}", check(&raw).unwrap());
        assert!(!s.contains("sekrit"), "{s}");
    }

    fn cf(zone: &str, token: &str, base: &str) -> String {
        format!("[cloudflare]\nzone_id = {zone:?}\ntoken = {token:?}\nbase = {base:?}\n")
    }

    #[test]
    fn problems_say_what_and_how() {
        let ok = "https://api.cloudflare.com";
        let e = one(&cf("", "t", ok));
        assert!(e.contains("[cdn.cloudflare] zone_id is empty"), "{e}");
        let e = one(&cf("z", "${AISLE_TEST_SURELY_UNSET_VAR}", ok));
        assert!(
            e.contains("[cdn.cloudflare] token")
                && e.contains("AISLE_TEST_SURELY_UNSET_VAR is not set")
                && e.contains("export it"),
            "{e}"
        );
        let e = one(&cf("z", "t", "ftp://api.cloudflare.com"));
        assert!(e.contains("must be an http:// or https:// URL"), "{e}");
        assert!(one(&cf("z", "t", "not a url")).contains("is not a URL"));
        assert!(one(&cf("z", "t", "https://x/?a=b")).contains("must not have a query"));
        assert!(one(&cf("z/../x", "t", ok)).contains("is not an identifier"));
        assert!(one(&cf("z", "line\nbreak", ok)).contains("control or non-ASCII"));
        let e = one(&format!("{}rate = 0\n", cf("z", "t", ok)));
        assert!(e.contains("rate = 0 must be a positive number"), "{e}");
        let e = one(&format!("{}max_items = 1000\n", cf("z", "t", ok)));
        assert!(e.contains("max_items = 1000"), "{e}");
        let e = one("[cloudfront]\ndistribution_id = \"E\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\nregion = \"US East\"\n");
        assert!(e.contains("not an AWS region name"), "{e}");
    }

    #[test]
    fn each_problem_is_its_own_line_at_its_value() {
        let text =
            "[cloudflare]\nzone_id = \"\"\ntoken = \"t\"\nrate = -1.0\n\n[http]\nhosts = []\n";
        assert_eq!(
            problems(text)
                .iter()
                .map(|(l, c, _)| (*l, *c))
                .collect::<Vec<_>>(),
            [(2, 11), (4, 8), (7, 9)]
        );
    }

    #[test]
    fn tag_paths_are_checked_at_each_key_and_path() {
        let text = r#"[cloudfront]
distribution_id = "E1"
access_key_id = "AK"
secret_access_key = "SK"
[cloudfront.tag_paths]
"a*b" = ["/x"]
ok = ["api/x", "/a*/b"]
empty = []
"#;
        let p = problems(text);
        let at = |needle: &str| {
            p.iter()
                .find(|(_, _, m)| m.contains(needle))
                .map(|(l, c, _)| (*l, *c))
                .unwrap_or_else(|| panic!("no {needle:?} in {p:?}"))
        };
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(at("key \"a*b\""), (6, 1));
        assert_eq!(at("\"api/x\" is not a CloudFront path"), (7, 7));
        assert_eq!(at("\"/a*/b\" is not a CloudFront path"), (7, 16));
        assert_eq!(at("tag_paths.\"empty\" is empty"), (8, 9));
    }

    #[test]
    fn http_problems() {
        let text = "[http]\nhosts = [\"http://127.0.0.1:6081\", \"unix:/var/run/varnish\"]\nmethod = \"purge\"\ntag_header = \"bad header\"\n";
        let p = problems(text);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].2.contains("hosts[1]") && (p[0].0, p[0].1) == (2, 35),
            "{p:?}"
        );
        assert!(
            p[1].2.contains("method = \"purge\"") && (p[1].0, p[1].1) == (3, 10),
            "{p:?}"
        );
        assert!(
            p[2].2.contains("tag_header = \"bad header\"") && (p[2].0, p[2].1) == (4, 14),
            "{p:?}"
        );
    }

    #[test]
    fn fastly_hosts_are_hostnames() {
        let base = "[fastly]\nservice_id = \"s\"\ntoken = \"t\"\n";
        let s = settings(&format!(
            "{base}hosts = [\"WWW.Example.com\", \"example.com:8443\"]\n"
        ));
        assert_eq!(
            s.fastly.unwrap().hosts,
            ["www.example.com", "example.com:8443"]
        );
        assert!(settings(base).fastly.unwrap().hosts.is_empty());
        let p = problems(&format!(
            "{base}hosts = [\"ok.example\", \"https://www.example.com/\"]\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].2.contains("hosts[1]") && p[0].2.contains("is not a hostname"),
            "{p:?}"
        );
        assert_eq!((p[0].0, p[0].1), (4, 24));
        assert!(one(&format!("{base}hosts = []\n")).contains("hosts is empty"));
    }

    #[test]
    fn base_urls_are_normalized() {
        let s = settings("[fastly]\nservice_id = \"s\"\ntoken = \"t\"\nbase = \"https://api.example.com/prefix/\"\n");
        assert_eq!(s.fastly.unwrap().base, "https://api.example.com/prefix");
        let s = settings(
            "[fastly]\nservice_id = \"s\"\ntoken = \"t\"\nbase = \"http://127.0.0.1:8080/\"\n",
        );
        assert_eq!(s.fastly.unwrap().base, "http://127.0.0.1:8080");
    }
}
