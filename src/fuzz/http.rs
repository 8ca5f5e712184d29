//! Fuzz targets for what origins and clients say about caching: `Cache-Control`,
//! `CDN-Cache-Control`, `Age`, `Expires`, `Date`, `Vary`, tag headers (through
//! [`policy::cacheability`] and friends), and a request's own directives and `Aisle-*` headers.

use super::{check, run};
use crate::admission::{self, Admission};
use crate::policy::{self, RequestDirectives};
use crate::rules::{compile, Context, Rule};
use crate::trust::Client;
use pingora::cache::{CacheMeta, RespCacheable};
use pingora::http::ResponseHeader;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn delta() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}",
        select(
            &[
                "0",
                "1",
                "60",
                "4294967295",
                "4294967296",
                "2147483647",
                "2147483648",
                "18446744073709551615",
                "18446744073709551616",
                "-1",
                "+5",
                "1.5",
                "\"60\"",
                "",
                " 5",
                "1e3",
                "0x10",
            ][..]
        )
        .prop_map(String::from),
    ]
}

fn directive() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(
            &[
                "no-store",
                "no-cache",
                "private",
                "public",
                "must-revalidate",
                "proxy-revalidate",
                "immutable",
                "no-transform",
                "no-cache=\"set-cookie\"",
                "private=\"x-a, set-cookie\"",
                "max-age",
                "s-maxage=",
                "=",
                "\"",
                "NO-STORE",
            ][..]
        )
        .prop_map(String::from),
        4 => (
            select(
                &[
                    "max-age",
                    "s-maxage",
                    "stale-while-revalidate",
                    "stale-if-error",
                    "MAX-AGE",
                    "max-stale",
                    "min-fresh",
                ][..]
            ),
            delta()
        )
            .prop_map(|(k, v)| format!("{k}={v}")),
        1 => "[ -~]{0,12}",
    ]
}

fn cache_control() -> impl Strategy<Value = String> {
    (
        vec(directive(), 0..5),
        select(&[", ", ",", " ", ";", ",,"][..]),
    )
        .prop_map(|(d, sep)| d.join(sep))
}

fn http_date() -> impl Strategy<Value = String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    prop_oneof![
        // Around now, then anywhere httpdate can spell (years 1970..=9999).
        (-100_000i64..100_000).prop_map(move |d| {
            let at = (now + d).max(0) as u64;
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(at))
        }),
        (0u64..=253_402_300_799)
            .prop_map(|s| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(s))),
        select(
            &[
                "0",
                "-1",
                "Thu, 01 Jan 1970 00:00:00 GMT",
                "Fri, 31 Dec 9999 23:59:59 GMT",
                "Sun, 06 Nov 1994 08:49:37 GMT",
                "Sunday, 06-Nov-94 08:49:37 GMT",
                "Sun Nov  6 08:49:37 1994",
                "Sat, 30 Feb 2030 00:00:00 GMT",
                "",
            ][..]
        )
        .prop_map(String::from),
    ]
}

const NAMES: &[&str] = &[
    "cache-control",
    "cdn-cache-control",
    "age",
    "expires",
    "date",
    "vary",
    "set-cookie",
    "pragma",
    "surrogate-key",
    "cache-tag",
    "xkey",
    "cache-groups",
    "authorization",
    "aisle-cache-ttl",
    "aisle-cache-namespace",
    "accept-language",
];

/// One header line: a plausible value for its name, or any bytes a header value may hold.
fn header() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let text =
        |name: &'static str, s: BoxedStrategy<String>| s.prop_map(move |v| (name, v.into_bytes()));
    prop_oneof![
        3 => text("cache-control", cache_control().boxed()),
        2 => text("cdn-cache-control", cache_control().boxed()),
        2 => text("age", delta().boxed()),
        2 => text("expires", http_date().boxed()),
        1 => text("date", http_date().boxed()),
        2 => text("vary", "[a-zA-Z*, -]{0,20}".boxed()),
        1 => text("set-cookie", Just("s=1".to_string()).boxed()),
        1 => text("pragma", select(&["no-cache", "NO-CACHE", "x"][..]).prop_map(String::from).boxed()),
        1 => text("surrogate-key", "[a-z: \\t]{0,16}".boxed()),
        1 => text("cache-tag", "[a-z:, ]{0,16}".boxed()),
        1 => text("cache-groups", "(\"[a-z ]{0,4}\"[, ]{0,2}){0,3}".boxed()),
        1 => text("aisle-cache-ttl", prop_oneof![delta(), "[0-9]{1,20}(s|m|h|d|y|ms|ns)".boxed()].boxed()),
        2 => (select(NAMES), vec(any::<u8>(), 0..24)),
    ]
}

fn headers_of(lines: &[(&'static str, Vec<u8>)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (name, value) in lines {
        // Bytes no HTTP parser would hand us (controls) are skipped, everything else is kept.
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            h.append(*name, v);
        }
    }
    h
}

fn rules() -> Vec<Arc<Rule>> {
    let ups = vec!["api".to_string()];
    let ctx = Context::with_upstreams(&ups);
    let text = r#"
[[rule]]
name = "origin"
match = { path = "/o" }
[[rule]]
name = "ttl"
match = { path = "/t" }
ttl = "30m"
stale_while_revalidate = "1m"
stale_if_error = "1d"
[[rule]]
name = "cookies"
match = { path = "/c" }
cache_set_cookie = true
"#;
    let set = compile(&[(Path::new("rules/h.toml"), text)], &ctx).unwrap();
    let mut rules: Vec<Arc<Rule>> = set.rules().to_vec();
    // A ttl no file could write (humantime stops earlier): the sums must still saturate.
    let mut huge = compile(&[(Path::new("rules/h.toml"), text)], &ctx)
        .unwrap()
        .rules()[1]
        .clone();
    Arc::get_mut(&mut huge).unwrap().ttl = Some(Duration::MAX);
    rules.push(huge);
    rules
}

#[test]
fn cacheability() {
    let rules = rules();
    let strategy = (
        select(
            &[
                200u16, 203, 204, 206, 301, 302, 304, 404, 410, 500, 501, 599,
            ][..],
        ),
        vec(header(), 0..8),
        0..rules.len(),
        any::<bool>(),
        select(&[0u64, 1, 3600, 86_400 * 365, u64::MAX][..]),
    );
    run(
        "cacheability",
        8.0,
        strategy,
        |(status, lines, rule, auth, max_ttl)| {
            let rule = &rules[rule];
            let mut resp = ResponseHeader::build(status, None).unwrap();
            for (name, value) in &lines {
                if let Ok(v) = http::HeaderValue::from_bytes(value) {
                    resp.append_header(*name, v).unwrap();
                }
            }
            let now = SystemTime::now();
            let max_ttl = Duration::from_secs(max_ttl);
            let age = policy::upstream_age(&resp);
            check(age <= policy::DELTA_SECONDS_OVERFLOW, || {
                format!("Age {age}")
            })?;
            let _ = policy::vary_names(&resp);
            let _ = policy::serves_authorized(&resp);
            let RespCacheable::Cacheable(meta) =
                policy::cacheability(rule, &resp, auth, now, policy::Limits::new(max_ttl))
            else {
                return Ok(());
            };
            check(
                meta.fresh_until() <= policy::time_after(now, max_ttl),
                || format!("fresh past max_ttl: {:?}", meta.fresh_until()),
            )?;
            let cap = max_ttl.as_secs().min(u64::from(u32::MAX));
            check(
                u64::from(meta.stale_while_revalidate_sec()) <= cap
                    && u64::from(meta.stale_if_error_sec()) <= cap,
                || "a stale window past max_ttl".into(),
            )?;
            let stored = meta.response_header();
            check(
                stored.headers.get("set-cookie").is_none() && stored.headers.get("age").is_none(),
                || "stored Set-Cookie or Age".into(),
            )?;
            check(meta.epoch() >= UNIX_EPOCH, || "epoch before 1970".into())?;
            // An Age of 2^31 outlives every max-age (delta-seconds stop at 2^31); only an Expires
            // more than 68 years after Date may outlive it (RFC 9111: fresh while lifetime > age).
            let expires = lines.iter().any(|(n, _)| *n == "expires");
            if age >= policy::DELTA_SECONDS_OVERFLOW && rule.ttl.is_none() && !expires {
                check(!meta.is_fresh(now + Duration::from_secs(1)), || {
                    "an Age of 2^31 left the answer fresh".to_string()
                })?;
            }
            // What the Redis tier stores must come back the same.
            let (internal, header) = meta
                .serialize()
                .map_err(|e| TestCaseError::fail(format!("serialize: {e}")))?;
            let back = CacheMeta::deserialize(&internal, &header)
                .map_err(|e| TestCaseError::fail(format!("deserialize: {e}")))?;
            check(
                back.fresh_until() == meta.fresh_until() && back.epoch() == meta.epoch(),
                || "meta changed through serialize".into(),
            )?;
            // Aisle-Cache-TTL (as the proxy applies it) only ever shortens the entry.
            if let Admission::Cache(terms) = admission::admit(
                rule,
                &http::Method::GET,
                &resp.headers,
                Ok(()),
                Client::Trusted,
            ) {
                if let Some(ttl) = terms.ttl {
                    let (before, mut meta) = (meta.fresh_until(), meta);
                    meta.expire_at(policy::time_after(now, ttl));
                    check(meta.fresh_until() <= before, || {
                        "Aisle-Cache-TTL lengthened an entry".into()
                    })?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn request_directives() {
    let rules = rules();
    let strategy = (
        vec(header(), 0..8),
        select(&["GET", "HEAD", "POST", "DELETE"][..]),
    );
    run("request_directives", 4.0, strategy, |(lines, method)| {
        let headers = headers_of(&lines);
        let d = RequestDirectives::parse(&headers);
        check(
            d.authorization == headers.contains_key("authorization"),
            || "authorization".into(),
        )?;
        let method: http::Method = method.parse().unwrap();
        for rule in &rules {
            match admission::admit(rule, &method, &headers, Ok(()), Client::Trusted) {
                Admission::Cache(terms) => {
                    check(!terms.directives.no_store, || "no-store admitted".into())?;
                    if let Some(ttl) = terms.ttl {
                        let _ = policy::time_after(SystemTime::now(), ttl);
                    }
                }
                Admission::Bypass(_) => {}
            }
        }
        Ok(())
    });
}

#[test]
fn vary_and_tags() {
    let strategy = vec(header(), 0..8);
    run("vary_and_tags", 4.0, strategy, |lines| {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (name, value) in &lines {
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                resp.append_header(*name, v).unwrap();
            }
        }
        let names = policy::vary_names(&resp);
        check(names.windows(2).all(|w| w[0] < w[1]), || {
            format!("not sorted and unique: {names:?}")
        })?;
        for n in &names {
            check(
                !n.is_empty() && !n.contains(',') && n.trim() == n && *n == n.to_ascii_lowercase(),
                || format!("vary name {n:?}"),
            )?;
        }
        for t in policy::origin_tags(&resp) {
            check(!t.is_empty() && t.trim() == t, || format!("tag {t:?}"))?;
        }
        for g in policy::cache_groups(&resp, "cache-groups") {
            check(!g.is_empty() && !g.contains(char::is_whitespace), || {
                format!("group {g:?}")
            })?;
        }
        policy::strip_tag_headers(&mut resp);
        check(policy::origin_tags(&resp).is_empty(), || {
            "tags survive stripping".into()
        })
    });
}
