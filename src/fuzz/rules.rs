//! Fuzz targets for the rules: rules files as near-TOML text and as structured random rules
//! (compiler and matcher), path patterns, every normalizer, and the key builder's framing.

use super::{check, run};
use crate::admission;
use crate::key::{self, KeyInput};
use crate::rules::normalize::{Fallback, Normalizer, Table};
use crate::rules::path::{PathPattern, MAX_PARAMS};
use crate::rules::source::RequestView;
use crate::rules::{compile, Context, RuleSet};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

static UPSTREAMS: LazyLock<Vec<String>> = LazyLock::new(|| vec!["api".into(), "ai".into()]);

fn ctx(encryption: bool) -> Context<'static> {
    Context {
        upstreams: &UPSTREAMS,
        default_upstream: Some(0),
        encryption,
        upstream_credentials: &[],
        key_secret: None,
    }
}

/// Lines rules files are made of, right and wrong, for the text target. Rule names come from a
/// small set: every compiled rule registers metric series for its name.
const LINES: &[&str] = &[
    "[[rule]]",
    "[[rule]]",
    "[[rule]]",
    "name = \"r1\"",
    "name = \"r2\"",
    "name = \"r3\"",
    "name = \"\"",
    "name = \" \"",
    "match = { path = \"/a/:id\" }",
    "match = { path = \"/a/:id/*\", host = \"*.example.com\" }",
    "match = { path = \"/*\" }",
    "match = { path = \"/\" }",
    "match = { path = \"/b/:x/:y\", method = [\"GET\", \"post\", \"*\"] }",
    "match = { path = \"/c\", method = \"PATCH\", host = \"API.example.com\" }",
    "match = { path = \"/c/:é\" }",
    "match = { path = \"a\" }",
    "match = { path = \"/a/*/b\" }",
    "match = { path = \"/d?x=1\" }",
    "match = { path = \"/e/:a/:b/:c/:d/:e/:f/:g/:h/:i\" }",
    "match.path = \"/m/:id\"",
    "match = { method = \"BREW\", path = \"/f\" }",
    "match = { host = \"*.\", path = \"/g\" }",
    "upstream = \"api\"",
    "upstream = \"ai\"",
    "upstream = \"nope\"",
    "ttl = \"5m\"",
    "ttl = \"0s\"",
    "ttl = \"1h 30m\"",
    "ttl = \"584942417355y\"",
    "ttl = \"99999999999999999999999s\"",
    "ttl = \"soon\"",
    "ttl = 5",
    "vary = [\"query.q\", \"header.x-a\", \"path.id\", \"cookie.c\", \"body./a/b\"]",
    "vary = [\"query.q\", \"query.q\"]",
    "vary = [\"path.x\", \"path.y\", \"header.bad header\", \"form.x\", \"body.x\", \"query.\"]",
    "vary = [\"header.X-Tenant\"]",
    "normalize = { \"query.q\" = [\"trim\", \"lowercase\", \"market\", \"season\", \"text\"] }",
    "normalize = { \"query.q\" = \"bucket:0.1\", \"path.id\" = \"uppercase\" }",
    "normalize = { \"body./a/b\" = [\"sorted_list\", \"bucket:1e308\"], \"header.x-a\" = \"bucket:0\" }",
    "normalize = { \"query.zz\" = \"lowercase\", \"query.q\" = \"nope\" }",
    "tags = [\"t:{query.q}\", \"{path.id}\", \"plain\"]",
    "tags = [\"{\", \"}\", \"a {path.id}\", \"{nope.x}\", \"{path.zz}\"]",
    "invalidate_on = [\"e1\", \"e2\"]",
    "invalidate_on = [\"bad event\", \"\", \"{x}\"]",
    "stale_while_revalidate = \"1m\"",
    "stale_if_error = \"999999999999d\"",
    "cache = false",
    "cache_set_cookie = true",
    "encrypt = true",
    "keep_tag_headers = true",
    "body_key = { all = true, ignore = [\"/user\", \"/a~1b\", \"x\"] }",
    "body_key = { all = false }",
    "cost = { per_request = 0.1, tokens = \"/usage/t\", per_1k_tokens = 1e308 }",
    "cost = { tokens = \"usage\" }",
    "unknown_key = 1",
    "[[event]]",
    "name = \"e1\"",
    "name = \"e 2\"",
    "invalidates = [\"v:{id}\", \"{ bad }\", \"plain\", \"{}\"]",
    "cdn = true",
    "[tables.market]",
    "[tables.other]",
    "map = { \"new york\" = \"nyc\", \"a, b\" = \"c\", \"\" = \"empty\" }",
    "fallback = \"state\"",
    "fallback = \"drop\"",
    "fallback = \"nope\"",
    "[tables.market.map]",
    "\"la\" = \"los-angeles\"",
    "",
    "# a comment",
    "[rule]",
    "x = \"\"\"",
    "'''",
    "\"\\u00e9\" = 1",
    "a.b.c = [1, [2, \"3\"], {x = 1}]",
];

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => select(LINES).prop_map(String::from),
        1 => "\\PC{0,12}",
        1 => "[\\[\\]{}=\",.:/*a-z0-9 #'\\\\-]{0,24}",
    ]
}

/// Inserts `(position, text)` edits at character boundaries.
fn mutate(mut text: String, edits: Vec<(Index, String)>) -> String {
    for (at, insert) in edits {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        text.insert_str(*at.get(&bounds), &insert);
    }
    text
}

/// Requests to try against a compiled set.
fn request() -> impl Strategy<Value = (String, String, String, Option<String>)> {
    (
        select(&["GET", "HEAD", "POST", "PUT", "PATCH", "BREW"][..]).prop_map(String::from),
        prop_oneof![
            select(&["", "x", "api.example.com", "A.EXAMPLE.COM", "é.example.co"][..])
                .prop_map(String::from),
            "\\PC{0,10}",
        ],
        prop_oneof![
            select(&["/", "/a/1", "/a/1/x", "/b/1/2", "/c", "/c/é", "/m/%FF", "/e/1/2"][..])
                .prop_map(String::from),
            "/[a-e0-9/%é]{0,12}",
        ],
        proptest::option::of("[a-z=&%,é]{0,16}"),
    )
}

/// Runs a compiled set on requests: matching, keys, tags and admission must not panic, and a
/// matched (non-default) rule's pattern matches the path.
fn exercise(
    set: &RuleSet,
    requests: &[(String, String, String, Option<String>)],
) -> Result<(), TestCaseError> {
    let body = serde_json::json!({"a": {"b": "x"}, "user": 1});
    for (method, host, path, query) in requests {
        let method: http::Method = method.parse().unwrap_or(http::Method::GET);
        let Some(m) = set.find(&method, host, path) else {
            continue;
        };
        if !m.rule.is_default {
            check(m.rule.path.matches(path).is_some(), || {
                format!(
                    "rule {} matched {path:?} but its pattern does not",
                    m.rule.name
                )
            })?;
        }
        let mut headers = http::HeaderMap::new();
        headers.insert("x-a", http::HeaderValue::from_static("V"));
        headers.insert("cookie", http::HeaderValue::from_static("c=1; d=2"));
        headers.insert(
            "aisle-cache-ttl",
            http::HeaderValue::from_static("99999999999999999s"),
        );
        let view = RequestView {
            path,
            query: query.as_deref(),
            headers: &headers,
            params: &m.params,
            body: Some(&body),
        };
        let input = KeyInput {
            host,
            method: &method,
            view,
            namespace: None,
        };
        let first = key::primary(m.rule, &input);
        check(first == key::primary(m.rule, &input), || {
            "a key is not deterministic".into()
        })?;
        let _ = m.rule.render_tags(&input.view);
        let _ = admission::admit(
            m.rule,
            &method,
            &headers,
            Ok(()),
            crate::trust::Client::Trusted,
        );
        let _ = admission::route(set, &method, host, path);
    }
    Ok(())
}

#[test]
fn rules_text() {
    let strategy = (
        vec(line(), 0..40),
        vec((any::<Index>(), "\\PC{0,3}"), 0..3),
        any::<Index>(),
        any::<bool>(),
        vec(request(), 0..4),
    );
    run(
        "rules_text",
        1.0,
        strategy,
        |(lines, edits, split, encryption, requests)| {
            let text = mutate(lines.join("\n"), edits);
            // Sometimes two files: tables are shared across files, names must not repeat.
            let bounds: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let cut = *split.get(&bounds);
            let (a, b) = text.split_at(cut);
            let files = [
                (Path::new("rules/a.toml"), a),
                (Path::new("rules/b.toml"), b),
            ];
            match compile(&files, &ctx(encryption)) {
                Ok(set) => exercise(&set, &requests),
                Err(diags) => {
                    check(!diags.is_empty(), || "an error without diagnostics".into())?;
                    for d in &diags {
                        let shown = d.to_string();
                        check(shown.starts_with("rules/"), || {
                            format!("no file in {shown:?}")
                        })?;
                        let lines = text.lines().count() + 1;
                        check(d.line <= lines, || {
                            format!("line {} of {lines}: {shown}", d.line)
                        })?;
                    }
                    Ok(())
                }
            }
        },
    );
}

fn array<T: Into<toml::Value>>(items: impl IntoIterator<Item = T>) -> toml::Value {
    toml::Value::Array(items.into_iter().map(Into::into).collect())
}

/// One random rule, as TOML.
fn rule_toml() -> impl Strategy<Value = toml::Table> {
    let segment = prop_oneof![
        select(&["a", "b", "c", ""][..]).prop_map(String::from),
        select(&[":id", ":x"][..]).prop_map(String::from),
    ];
    (
        select(&["r0", "r1", "r2", "r3", "r4"][..]),
        proptest::option::of(vec(
            select(&["GET", "HEAD", "POST", "PUT", "DELETE", "*"][..]),
            1..3,
        )),
        proptest::option::of(select(
            &["api.example.com", "*.example.com", "X.example.com"][..],
        )),
        (vec(segment, 0..4), any::<bool>()),
        vec(
            select(
                &[
                    "query.q",
                    "query.r",
                    "header.x-a",
                    "cookie.c",
                    "path.id",
                    "path.x",
                    "body./a",
                    "body./b/0",
                ][..],
            ),
            0..4,
        ),
        vec(
            select(
                &[
                    "lowercase",
                    "uppercase",
                    "trim",
                    "sorted_list",
                    "season",
                    "text",
                    "market",
                    "bucket:1000",
                    "bucket:0.1",
                ][..],
            ),
            0..3,
        ),
        vec(
            select(&["t", "t:{query.q}", "{path.id}", "{header.x-a}:{cookie.c}"][..]),
            0..3,
        ),
        proptest::option::of(select(&["5m", "0s", "1h", "292277026596y"][..])),
        proptest::option::of(any::<bool>()),
        proptest::option::of(vec(select(&["/user", "/a", "/b/0"][..]), 0..2)),
    )
        .prop_map(
            |(name, methods, host, (segments, wildcard), vary, norms, tags, ttl, cache, body)| {
                let mut path = String::new();
                let mut seen = Vec::new();
                for s in segments {
                    if s.starts_with(':') && seen.contains(&s) {
                        continue;
                    }
                    seen.push(s.clone());
                    path.push('/');
                    path.push_str(&s);
                }
                if wildcard || path.is_empty() {
                    path.push_str("/*");
                }
                let mut m = toml::Table::new();
                m.insert("path".into(), path.into());
                if let Some(ms) = methods {
                    m.insert("method".into(), array(ms));
                }
                if let Some(h) = host {
                    m.insert("host".into(), h.into());
                }
                let mut t = toml::Table::new();
                t.insert("name".into(), name.into());
                t.insert("match".into(), m.into());
                let mut vary = vary;
                vary.dedup();
                let mut unique = Vec::new();
                for v in vary {
                    if !unique.contains(&v) {
                        unique.push(v);
                    }
                }
                if let (Some(first), false) = (unique.first(), norms.is_empty()) {
                    let mut n = toml::Table::new();
                    n.insert(first.to_string(), array(norms));
                    t.insert("normalize".into(), n.into());
                }
                t.insert("vary".into(), array(unique));
                t.insert("tags".into(), array(tags));
                if let Some(ttl) = ttl {
                    t.insert("ttl".into(), ttl.into());
                }
                if let Some(c) = cache {
                    t.insert("cache".into(), c.into());
                }
                if let Some(ignore) = body {
                    let mut bk = toml::Table::new();
                    bk.insert("all".into(), true.into());
                    bk.insert("ignore".into(), array(ignore));
                    t.insert("body_key".into(), bk.into());
                }
                t
            },
        )
}

#[test]
fn rules_structured() {
    let strategy = (vec(rule_toml(), 0..6), vec(request(), 1..8));
    run("rules_structured", 1.0, strategy, |(rules, requests)| {
        let mut file = toml::Table::new();
        let mut market = toml::Table::new();
        let mut map = toml::Table::new();
        map.insert("new york".into(), "nyc".into());
        market.insert("map".into(), map.into());
        market.insert("fallback".into(), "state".into());
        let mut tables = toml::Table::new();
        tables.insert("market".into(), market.into());
        file.insert("tables".into(), tables.into());
        file.insert("rule".into(), array(rules));
        let text = toml::to_string(&file).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match compile(&[(Path::new("rules/s.toml"), &text)], &ctx(false)) {
            Ok(set) => exercise(&set, &requests),
            Err(diags) => {
                // Only what the generator can get wrong on purpose: names, shadowing, sources.
                for d in &diags {
                    let ok = [
                        "duplicate rule name",
                        "shadowed",
                        "no :",
                        "normalize names",
                        "bad duration",
                    ]
                    .iter()
                    .any(|m| d.message.contains(m));
                    check(ok, || {
                        format!("unexpected diagnostic for generated rules: {d}\n{text}")
                    })?;
                }
                Ok(())
            }
        }
    });
}

fn pattern_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (
            vec(select(&["a", "b", "", ":x", ":y", ":x1", "*", "é", "a:b", "%2F", ":"][..]), 0..5),
            any::<bool>(),
        )
            .prop_map(|(segs, rooted)| {
                let body = segs.join("/");
                if rooted { format!("/{body}") } else { body }
            }),
        1 => "\\PC{0,10}",
    ]
}

fn path_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (vec(select(&["a", "b", "", "é", "x", "%2F", "*", ":x"][..]), 0..6), any::<bool>())
            .prop_map(|(segs, rooted)| {
                let body = segs.join("/");
                if rooted { format!("/{body}") } else { body }
            }),
        1 => "\\PC{0,10}",
    ]
}

#[test]
fn path_patterns() {
    let strategy = (pattern_text(), pattern_text(), vec(path_text(), 1..6));
    run("path_patterns", 4.0, strategy, |(a, b, paths)| {
        let (Ok(pa), pb) = (PathPattern::parse(&a), PathPattern::parse(&b)) else {
            return Ok(());
        };
        check(pa.covers(&pa), || format!("{a:?} does not cover itself"))?;
        let _ = pa.determined_by(|i| i % 2 == 0);
        for path in &paths {
            if let Some(params) = pa.matches(path) {
                for i in 0..MAX_PARAMS {
                    if let Some(v) = params.get(path, i) {
                        check(!v.is_empty() && !v.contains('/'), || {
                            format!("{a:?} on {path:?}: parameter {i} is {v:?}")
                        })?;
                    }
                }
            }
            if let Ok(pb) = &pb {
                if pa.covers(pb) && pb.matches(path).is_some() {
                    check(pa.matches(path).is_some(), || {
                        format!("{a:?} covers {b:?}, which matches {path:?}, but {a:?} does not")
                    })?;
                }
            }
        }
        Ok(())
    });
}

fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\PC{0,16}",
        2 => "[0-9]{4}-[0-9]{2}(-[0-9]{2}(T[0-9:]{0,8}Z?)?)?[é ]?",
        2 => "[ ,a-zA-Zé0-9.\\t-]{0,12}",
        2 => "[ +-]?[0-9]{0,7}(\\.[0-9]{0,4})?(e[+-]?[0-9]{1,3})?",
        1 => select(&["inf", "-inf", "NaN", "infinity", "1e308", "-0", "1.7976931348623157e308", "İ", "ǅ", "ΑΣ", "ß", "ŉ"][..])
            .prop_map(String::from),
    ]
}

fn bucket_width() -> impl Strategy<Value = f64> {
    prop_oneof![
        select(&[0.1, 0.5, 1.0, 3.0, 7.3, 1000.0, 1e-300, 1e300, 0.01, 1e15][..]),
        (1e-6f64..1e9),
    ]
}

#[test]
fn normalizers() {
    let strategy = (
        0usize..10,
        value_text(),
        bucket_width(),
        vec(("[a-zA-Z ,é]{0,8}", "[a-z ,]{0,6}"), 0..4),
        0usize..3,
    );
    run(
        "normalizers",
        8.0,
        strategy,
        |(which, value, width, map, fallback)| {
            let fallback = [Fallback::State, Fallback::Keep, Fallback::Drop][fallback];
            let (step, idempotent) = match which {
                0 => (Normalizer::Lowercase, true),
                1 => (Normalizer::Uppercase, true),
                2 => (Normalizer::Trim, true),
                3 => (Normalizer::SortedList, true),
                4 => (Normalizer::Bucket(width), true),
                5 => (Normalizer::Season, true),
                6 => (Normalizer::Text, true),
                // Without a map a table only folds (and cuts at the last comma): a fixed point.
                7 => (
                    Normalizer::Table(Arc::new(Table::new("t", [], fallback))),
                    true,
                ),
                // With one, its values may be keys again: only "no panic".
                8 => (
                    Normalizer::Table(Arc::new(Table::new("t", map, fallback))),
                    false,
                ),
                _ => {
                    let name = format!("bucket:{width}");
                    match Normalizer::parse(&name, &HashMap::new()) {
                        Ok(n) => (n, true),
                        Err(_) => return Ok(()),
                    }
                }
            };
            let once = step.apply(Cow::Borrowed(&value)).into_owned();
            let twice = step.apply(Cow::Borrowed(&once)).into_owned();
            if idempotent {
                check(once == twice, || {
                    format!("{step:?} is not idempotent: {value:?} -> {once:?} -> {twice:?}")
                })?;
            }
            Ok(())
        },
    );
}

/// A request for the key target, from small alphabets so that collisions are likely.
#[derive(Debug, Clone)]
struct KeyRequest {
    method: &'static str,
    host: String,
    path: String,
    query: Option<String>,
    headers: Vec<(&'static str, String)>,
    namespace: Option<String>,
    body: Option<serde_json::Value>,
}

fn key_request() -> impl Strategy<Value = KeyRequest> {
    let small = "[ab,=&%;\" 2F]{0,3}";
    (
        select(&["GET", "HEAD", "POST"][..]),
        "[aAbB.:]{0,3}",
        prop_oneof![
            ("[ab%2,é]{1,3}", "[ab/]{0,3}").prop_map(|(id, rest)| format!("/k/{id}/{rest}")),
            "[ab%2,é]{1,3}".prop_map(|id| format!("/p/{id}")),
            Just("/body".to_string()),
        ],
        proptest::option::of(
            vec((select(&["a", "b", "c"][..]), small), 0..3).prop_map(|kv| {
                kv.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            }),
        ),
        vec(
            (
                select(&["x-h", "cookie"][..]),
                prop_oneof!["[ab, ]{0,3}", "[cd]=[ab;\"]{0,2}(; c=[ab]{0,2})?"],
            ),
            0..3,
        ),
        proptest::option::of("[a\\x00]{0,2}"),
        proptest::option::of(
            (
                proptest::option::of("[ab,]{0,2}"),
                proptest::option::of(0i64..3),
            )
                .prop_map(|(j, ignored)| {
                    let mut o = serde_json::Map::new();
                    if let Some(j) = j {
                        o.insert("j".into(), j.into());
                    }
                    if let Some(i) = ignored {
                        o.insert("ignored".into(), i.into());
                    }
                    serde_json::Value::Object(o)
                }),
        ),
    )
        .prop_map(
            |(method, host, path, query, headers, namespace, body)| KeyRequest {
                method,
                host,
                path,
                query,
                headers,
                namespace,
                body,
            },
        )
}

const KEY_RULES: &str = r#"
[[rule]]
name = "k"
match = { method = ["GET", "POST"], path = "/k/:id/*" }
vary = ["query.a", "query.b", "header.x-h", "cookie.c", "path.id", "body./j"]
[[rule]]
name = "p"
match = { path = "/p/:id" }
vary = ["path.id", "query.a"]
[[rule]]
name = "body"
match = { method = "POST", path = "/body" }
body_key = { all = true, ignore = ["/ignored"] }
"#;

/// Everything a key must tell apart, computed from the rule's own extraction (the framing is
/// what is under test), plus the primary key bytes.
fn keyed(set: &RuleSet, r: &KeyRequest) -> Option<(Vec<String>, Vec<u8>)> {
    let method: http::Method = r.method.parse().ok()?;
    let (path, query) = (r.path.as_str(), r.query.as_deref());
    let m = set.find(&method, &r.host, path)?;
    let mut headers = http::HeaderMap::new();
    for (k, v) in &r.headers {
        headers.append(*k, http::HeaderValue::from_str(v).ok()?);
    }
    let view = RequestView {
        path,
        query,
        headers: &headers,
        params: &m.params,
        body: r.body.as_ref(),
    };
    // The fresh-hit path's one reading of the values (`key::checked_hash`, through
    // `admission::keyed_hash`) refuses the first value `keyable` refuses, in the same order,
    // and hashes what `key::primary` writes.
    let checked = KeyInput {
        host: &r.host,
        method: &method,
        view: RequestView {
            path,
            query,
            headers: &headers,
            params: &m.params,
            body: r.body.as_ref(),
        },
        namespace: r.namespace.as_deref(),
    };
    let (hash, found) = key::checked_hash(m.rule, &checked);
    let first = m
        .rule
        .vary
        .iter()
        .find_map(|f| f.source.keyed(&checked.view).err());
    assert_eq!(found.err(), first, "{r:?}");
    assert_eq!(hash, key::hash(&key::primary(m.rule, &checked)), "{r:?}");
    // What the gateway would not key (a keyed value repeated or not UTF-8) bypasses the cache:
    // its key is never used, so it is left out of the property, as admission leaves it out.
    crate::admission::keyable(m.rule, &view).ok()?;
    let mut parts = vec![
        m.rule.name.to_string(),
        r.host.to_ascii_lowercase(),
        if method == http::Method::HEAD {
            "GET".into()
        } else {
            method.to_string()
        },
        format!("{:?}", r.namespace),
    ];
    if m.rule.key_path {
        parts.push(path.to_string());
    }
    if m.rule.is_default {
        parts.push(query.unwrap_or("").to_string());
    }
    for field in &m.rule.vary {
        parts.push(format!("{:?}", field.value(&view)));
    }
    if m.rule.body_key.is_some() {
        let mut body = r.body.clone();
        if let Some(b) = body.as_mut() {
            crate::rules::source::remove_pointer(b, "/ignored");
        }
        parts.push(format!(
            "{:?}",
            body.map(|b| crate::rules::source::canonical(&b))
        ));
    }
    let input = KeyInput {
        host: &r.host,
        method: &method,
        view,
        namespace: r.namespace.as_deref(),
    };
    Some((parts, key::primary(m.rule, &input)))
}

#[test]
fn key_builder() {
    let set = compile(&[(Path::new("rules/k.toml"), KEY_RULES)], &ctx(false)).unwrap();
    let strategy = (key_request(), key_request(), any::<bool>());
    run("key_builder", 4.0, strategy, |(a, b, same)| {
        // Half the time the second request is the first with one part changed.
        let b = if same {
            KeyRequest {
                query: b.query.clone(),
                ..a.clone()
            }
        } else {
            b
        };
        let (Some((pa, ka)), Some((pb, kb))) = (keyed(&set, &a), keyed(&set, &b)) else {
            return Ok(());
        };
        // The direction that matters: one key never serves two different keyed requests.
        // (Equal parts giving different keys would only cost hits; repeated query parameters
        // may be keyed apart from their comma join.)
        check(ka != kb || pa == pb, || {
            format!("two requests share a key but differ in keyed parts:\n{pa:?}\n{pb:?}")
        })
    });
}
