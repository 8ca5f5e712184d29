//! Warm jobs as written: what a job asks for (checked and expanded into the requests it sends)
//! and the `[[warm]]` tables that schedule jobs.
//!
//! A job is JSON (`POST /admin/warm`, `aisle warm`, a `[[warm]]` table's `job`) naming exactly
//! one source of URLs — a list, a rule and a grid of values rendered through the rule's path and
//! query (and a body template for body-keyed rules), or the most requested keys of recent traffic
//! — plus how to send them. Everything is checked here, before a job exists, so a bad job is a
//! 400 that starts nothing; the expansion is bounded ([`MAX_TARGETS`]) so no job can hold more
//! than a fixed amount of memory. The expanded [`Target`]s are plain data (serde), so a job's
//! work list can be stored in Redis and resumed by another instance.

use crate::diag::{Diagnostic, SourceFile};
use crate::rules::source::Source;
use crate::rules::RuleSet;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use toml::Spanned;

/// Most requests one job may send to the gateway (URLs, grid combinations, `top`).
pub const MAX_TARGETS: usize = 10_000;
/// Most CDN fronts a job may also warm.
pub const MAX_FRONTS: usize = 16;
/// Most requests of one job in flight at once.
pub const MAX_CONCURRENCY: usize = 64;
/// Default requests in flight.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The largest `top` (the popularity tracker keeps this many candidates).
pub const MAX_TOP: usize = 1000;
/// The lowest `rate`: one request every 1000 s (a rate's interval must be a time the pacer
/// can wait; `1e-300` once panicked the job's task and left it "running" for ever).
pub const MIN_RATE: f64 = 0.001;

/// The job as the client sent it (`deny_unknown_fields`: a misspelt option is a 400, not a
/// silently different job).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub urls: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub rule: Option<String>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub grid: Option<BTreeMap<String, Vec<Value>>>,
    /// The JSON body template of a body-keyed rule; `body./pointer` grid values are set in it.
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub body: Option<Value>,
    /// The `Host` of the rendered requests (default: the rule's host pattern when it is a plain
    /// name, else the listener's address).
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub host: Option<String>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub top: Option<usize>,
    /// How far back `top` looks (`24h`; default 24h).
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub since: Option<String>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub concurrency: Option<usize>,
    /// Requests per second (all fronts included), unlimited when absent.
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate: Option<f64>,
    #[serde(default)]
    pub refresh: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_via: Vec<String>,
    /// The regions the job runs in (`[region] name` or a `[[region.peer]]` name); empty: here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// An optional field that, when given, has a value: `null` is refused rather than read as
/// absent, so `{"urls": null, "top": 5}` is not silently a `top` job (and the job's JSON means
/// what `docs/admin-api.yaml` says it means).
fn given<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// One request a job sends to the gateway's own listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Which source of URLs a job uses (for the listing).
pub fn kind(spec: &JobSpec) -> &'static str {
    if spec.urls.is_some() {
        "urls"
    } else if spec.rule.is_some() {
        "grid"
    } else {
        "top"
    }
}

/// Parses a job body: JSON, then [`check`]. Errors read as a client can act on them.
pub fn parse(body: &[u8]) -> Result<JobSpec, String> {
    let spec: JobSpec = serde_json::from_slice(body).map_err(|e| {
        format!(
            "bad warm job: {e}; send {{\"urls\": [...]}}, {{\"rule\": \"...\", \"grid\": {{...}}}} \
             or {{\"top\": N}} (options: concurrency, rate, refresh, warm_via, regions)"
        )
    })?;
    check_options(&spec)?;
    Ok(spec)
}

/// The options every job kind shares, and that exactly one kind is given.
pub fn check_options(spec: &JobSpec) -> Result<(), String> {
    let kinds = [spec.urls.is_some(), spec.rule.is_some(), spec.top.is_some()];
    match kinds.iter().filter(|k| **k).count() {
        1 => {}
        0 => {
            return Err(
                "a warm job needs one of \"urls\", \"rule\" (with \"grid\") or \"top\"".into(),
            )
        }
        _ => return Err("give only one of \"urls\", \"rule\" and \"top\" per job".into()),
    }
    if spec.rule.is_some() != spec.grid.is_some() {
        return Err(
            "\"rule\" and \"grid\" go together: the grid's values are rendered through the rule"
                .into(),
        );
    }
    if spec.rule.is_none() && (spec.body.is_some() || spec.host.is_some()) {
        return Err("\"body\" and \"host\" belong to a rule job".into());
    }
    if spec.top.is_none() && spec.since.is_some() {
        return Err("\"since\" belongs to a \"top\" job".into());
    }
    if let Some(c) = spec.concurrency {
        if c == 0 || c > MAX_CONCURRENCY {
            return Err(format!(
                "\"concurrency\" must be 1..={MAX_CONCURRENCY}, not {c}"
            ));
        }
    }
    if let Some(r) = spec.rate {
        if !(r.is_finite() && r >= MIN_RATE) {
            return Err(format!(
                "\"rate\" must be a number of requests per second, at least {MIN_RATE}, not {r}"
            ));
        }
    }
    if let Some(top) = spec.top {
        if top == 0 || top > MAX_TOP {
            return Err(format!("\"top\" must be 1..={}, not {top}", MAX_TOP));
        }
    }
    if let Some(since) = &spec.since {
        crate::units::parse_duration(since).map_err(|e| format!("\"since\": {e}"))?;
    }
    if spec.warm_via.len() > MAX_FRONTS {
        return Err(format!("at most {MAX_FRONTS} \"warm_via\" fronts per job"));
    }
    for front in &spec.warm_via {
        let ok = front.parse::<http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some()
                && u.path() == "/"
                && u.query().is_none()
                && !front.ends_with('/')
        });
        if !ok {
            return Err(format!(
                "\"warm_via\": {front:?} is not a base URL like \"https://cdn.example.com\" (scheme and host, no path)"
            ));
        }
    }
    if let Some(urls) = &spec.urls {
        if urls.is_empty() {
            return Err("\"urls\" is empty".into());
        }
        if urls.len() > MAX_TARGETS {
            return Err(format!(
                "at most {MAX_TARGETS} URLs per job, not {}",
                urls.len()
            ));
        }
    }
    Ok(())
}

/// Checks `regions` against this gateway's `[region]`. `Err((message, field))`: `regions`
/// without `[region]`, an empty list, or a name (`regions[i]`) that is neither this region nor a
/// peer, or is listed twice.
pub fn check_regions(
    spec: &JobSpec,
    region: Option<&crate::config::region::RegionConfig>,
) -> Result<(), (String, String)> {
    if spec.regions.is_empty() {
        return Ok(());
    }
    let Some(region) = region else {
        return Err((
            "\"regions\" needs [region] in the configuration (this gateway knows no other region); leave it out to warm here".into(),
            "regions".into(),
        ));
    };
    let known: Vec<&str> = std::iter::once(region.name.as_str())
        .chain(region.peers.iter().map(|p| p.name.as_str()))
        .collect();
    for (i, name) in spec.regions.iter().enumerate() {
        if !known.contains(&name.as_str()) {
            let shown: String = name.chars().take(64).collect();
            return Err((
                format!(
                    "unknown region {shown:?}: this gateway knows {}",
                    known
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!("regions[{i}]"),
            ));
        }
        if spec.regions[..i].contains(name) {
            return Err((
                format!("region {name:?} is listed twice"),
                format!("regions[{i}]"),
            ));
        }
    }
    Ok(())
}

/// One URL of a `urls` job: a path (`/a?b`) or an absolute `http(s)://host/path` whose host
/// becomes the `Host` of the request to the gateway.
fn url_target(url: &str) -> Result<Target, String> {
    let bad = || format!("\"urls\": {url:?} is neither a path (\"/api/...\") nor an http(s) URL");
    if url.starts_with('/') {
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        if uri.authority().is_some() {
            return Err(bad());
        }
        return Ok(Target {
            method: "GET".into(),
            path: url.to_string(),
            host: None,
            body: None,
        });
    }
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad());
    }
    let host = uri.authority().ok_or_else(bad)?.to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Ok(Target {
        method: "GET".into(),
        path,
        host: Some(host),
        body: None,
    })
}

/// Renders every combination of the grid through the rule. `Err`: an unknown rule, a grid key
/// the rule does not read, a rendered request another rule would answer, too many
/// combinations.
fn grid_targets(spec: &JobSpec, rules: &RuleSet) -> Result<Vec<Target>, String> {
    let name = spec.rule.as_deref().unwrap_or_default();
    let grid = spec.grid.as_ref().expect("checked: a rule job has a grid");
    let rule = rules
        .rules()
        .iter()
        .find(|r| &*r.name == name)
        .ok_or_else(|| format!("unknown rule {name:?}: no [[rule]] of that name is loaded"))?;
    let mut combos: usize = 1;
    let mut axes: Vec<(Source, &str, Vec<String>)> = Vec::new();
    for (key, values) in grid {
        let source = Source::parse(key, &rule.path).map_err(|e| format!("\"grid\": {e}"))?;
        if matches!(source, Source::Body(_)) && spec.body.is_none() {
            return Err(format!(
                "\"grid\": {key:?} needs a \"body\" template to set it in"
            ));
        }
        if values.is_empty() {
            return Err(format!("\"grid\": {key:?} has no values"));
        }
        let values = values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Err(format!(
                    "\"grid\": {key:?}: {other} is not a string, number or boolean"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        combos = combos.saturating_mul(values.len());
        if combos > MAX_TARGETS {
            return Err(format!("the grid has more than {MAX_TARGETS} combinations"));
        }
        axes.push((source, key.as_str(), values));
    }
    let method = if rule.needs_body { "POST" } else { "GET" };
    let host = spec.host.clone();
    let mut out = Vec::with_capacity(combos);
    let mut index = vec![0usize; axes.len()];
    loop {
        let mut path_params: BTreeMap<&str, &str> = BTreeMap::new();
        let mut query = form_urlencoded::Serializer::new(String::new());
        let mut has_query = false;
        let mut headers_ok = true;
        let mut body = spec.body.clone();
        for (axis, (source, key, values)) in axes.iter().enumerate() {
            let value = values[index[axis]].as_str();
            match source {
                Source::Query(q) => {
                    query.append_pair(q, value);
                    has_query = true;
                }
                Source::Path(_, name) => {
                    path_params.insert(name, value);
                }
                Source::Body(pointer) => {
                    let b = body.as_mut().expect("checked above");
                    set_pointer(b, pointer, Value::String(value.to_string()))
                        .map_err(|e| format!("\"grid\": {key:?}: {e}"))?;
                }
                Source::Header(_) | Source::Cookie(_) => headers_ok = false,
            }
        }
        if !headers_ok {
            return Err("\"grid\": header and cookie values cannot be warmed (a warm request carries no client headers); use query, path or body values".into());
        }
        let mut path = render_path(rule.path.as_str(), &path_params)?;
        if has_query {
            path.push('?');
            path.push_str(&query.finish());
        }
        let target = Target {
            method: method.into(),
            path,
            host: host.clone(),
            body: body.map(|b| b.to_string()),
        };
        let check_host = target.host.as_deref().unwrap_or("");
        let path_only = target.path.split('?').next().unwrap_or("");
        let method_v: http::Method = method.parse().expect("static method");
        match rules.find(&method_v, check_host, path_only) {
            Some(m) if &*m.rule.name == name => {}
            Some(m) => {
                return Err(format!(
                    "rule {name:?}: the rendered request {method} {} is answered by rule {:?} (give \"host\", or grid values that reach this rule)",
                    target.path, m.rule.name
                ))
            }
            None => {
                return Err(format!(
                    "rule {name:?}: the rendered request {method} {} matches no rule (a rule with a host pattern needs \"host\")",
                    target.path
                ))
            }
        }
        out.push(target);
        // The next combination, last axis fastest.
        let mut axis = axes.len();
        loop {
            if axis == 0 {
                return Ok(out);
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < axes[axis].2.len() {
                break;
            }
            index[axis] = 0;
        }
    }
}

/// The rule's path pattern with each `:param` replaced by its (percent-encoded) grid value.
fn render_path(pattern: &str, params: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::new();
    for segment in pattern.split('/').skip(1) {
        out.push('/');
        if let Some(name) = segment.strip_prefix(':') {
            let value = params.get(name).ok_or_else(|| {
                format!("\"grid\" has no values for \"path.{name}\", which the rule's path {pattern:?} needs")
            })?;
            out.extend(percent_encoding::utf8_percent_encode(value, SEGMENT));
        } else if segment == "*" {
            return Err(format!(
                "the rule's path {pattern:?} ends in '*': warm its URLs with a \"urls\" job"
            ));
        } else {
            out.push_str(segment);
        }
    }
    Ok(out)
}

/// Characters escaped in a path segment value.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Sets `pointer` (RFC 6901) in `doc`, creating objects on the way.
fn set_pointer(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let mut at = doc;
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let Value::Object(map) = at else {
            return Err(format!(
                "{pointer:?} goes through a value that is not an object"
            ));
        };
        if last {
            map.insert(part.clone(), value);
            return Ok(());
        }
        at = map
            .entry(part.clone())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    Err(format!("{pointer:?} names the whole body"))
}

/// Expands a checked job into its requests (`top` jobs come from [`super::popular`]).
pub fn targets(spec: &JobSpec, rules: &RuleSet) -> Result<Vec<Target>, String> {
    if let Some(urls) = &spec.urls {
        return urls.iter().map(|u| url_target(u)).collect();
    }
    if spec.rule.is_some() {
        return grid_targets(spec, rules);
    }
    Ok(Vec::new())
}

/// `[[warm]]` as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWarm {
    name: Spanned<String>,
    schedule: Spanned<String>,
    tz: Option<Spanned<String>>,
    job: Spanned<toml::Value>,
}

/// A compiled `[[warm]]`: a job started at each time of its schedule, in its zone.
#[derive(Debug, Clone)]
pub struct WarmSchedule {
    pub name: String,
    /// As written (`daily 05:00` or a cron expression).
    pub schedule: String,
    cron: croner::Cron,
    pub tz: Tz,
    pub job: JobSpec,
}

impl WarmSchedule {
    /// The latest due time at or before `at_ms` (unix ms), if any within the last year.
    pub fn due_at_or_before(&self, at_ms: u64) -> Option<u64> {
        let t = chrono::DateTime::from_timestamp_millis(at_ms as i64)?.with_timezone(&self.tz);
        let prev = self.cron.find_previous_occurrence(&t, true).ok()?;
        Some(prev.timestamp_millis().max(0) as u64)
    }

    /// The next due time after `at_ms`.
    pub fn next_after(&self, at_ms: u64) -> Option<u64> {
        let t = chrono::DateTime::from_timestamp_millis(at_ms as i64)?.with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&t, false).ok()?;
        Some(next.timestamp_millis().max(0) as u64)
    }
}

/// `daily HH:MM` as a cron expression, or the text itself (a 5- or 6-field cron expression).
fn cron_of(text: &str) -> Result<croner::Cron, String> {
    use std::str::FromStr;
    let t = text.trim();
    let expr = match t.strip_prefix("daily ") {
        Some(hm) => {
            let bad = || {
                format!("schedule {text:?}: write \"daily HH:MM\" (24-hour), e.g. \"daily 05:00\"")
            };
            let (h, m) = hm.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            format!("{m} {h} * * *")
        }
        None => t.to_string(),
    };
    croner::Cron::from_str(&expr).map_err(|e| {
        format!("schedule {text:?} is neither \"daily HH:MM\" nor a cron expression (minute hour day month weekday): {e}")
    })
}

/// Compiles the `[[warm]]` tables (the rules, once loaded, check rule jobs); problems go to
/// `diags` at their position.
pub(super) fn compile(
    src: &SourceFile,
    raw: &[Spanned<RawWarm>],
    rules: Option<&RuleSet>,
    region: Option<&crate::config::region::RegionConfig>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<WarmSchedule> {
    let mut out: Vec<WarmSchedule> = Vec::new();
    for table in raw {
        let w = table.get_ref();
        let name = w.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            diags.push(src.at(
                w.name.span(),
                format!("warm job name {name:?} must be letters, digits, '-' or '_'"),
            ));
            continue;
        }
        if out.iter().any(|o| o.name == name) {
            diags.push(src.at(
                w.name.span(),
                format!("a [[warm]] job named {name:?} is defined twice; names must differ"),
            ));
            continue;
        }
        let cron = match cron_of(w.schedule.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                diags.push(src.at(w.schedule.span(), e));
                None
            }
        };
        let tz = super::protection::time_zone(src, &w.tz, diags);
        let job = match JobSpec::deserialize(w.job.get_ref().clone()) {
            Ok(job) => match check_options(&job) {
                Ok(()) => Some(job),
                Err(e) => {
                    diags.push(src.at(w.job.span(), format!("[[warm]] {name}: job: {e}")));
                    None
                }
            },
            Err(e) => {
                diags.push(src.at(w.job.span(), format!("[[warm]] {name}: job: {e}")));
                None
            }
        };
        if let Some(job) = &job {
            if let Err((e, field)) = check_regions(job, region) {
                diags.push(src.at(w.job.span(), format!("[[warm]] {name}: job: {field}: {e}")));
            }
        }
        if let (Some(job), Some(rules)) = (&job, rules) {
            if let Err(e) = targets(job, rules) {
                diags.push(src.at(w.job.span(), format!("[[warm]] {name}: job: {e}")));
            }
        }
        if let (Some(cron), Some(tz), Some(job)) = (cron, tz, job) {
            out.push(WarmSchedule {
                name,
                schedule: w.schedule.get_ref().clone(),
                cron,
                tz,
                job,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exactly_one_kind_and_sane_options() {
        assert!(parse(br#"{"urls": ["/a"]}"#).is_ok());
        let e = parse(br#"{}"#).unwrap_err();
        assert!(e.contains("needs one of"), "{e}");
        let e = parse(br#"{"urls": ["/a"], "top": 3}"#).unwrap_err();
        assert!(e.contains("only one"), "{e}");
        let e = parse(br#"{"urls": ["/a"], "concurrency": 0}"#).unwrap_err();
        assert!(e.contains("concurrency"), "{e}");
        let e = parse(br#"{"urls": ["/a"], "regionz": ["eu"]}"#).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e =
            parse(br#"{"urls": ["/a"], "warm_via": ["https://cdn.example.com/x"]}"#).unwrap_err();
        assert!(e.contains("warm_via"), "{e}");
        let e = parse(b"{not json").unwrap_err();
        assert!(e.starts_with("bad warm job"), "{e}");
        let e = parse(br#"{"rule": "x"}"#).unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }

    /// Found by fuzzing `POST /admin/warm` against `docs/admin-api.yaml`.
    #[test]
    fn null_is_not_absent_and_rates_have_a_floor() {
        let e = parse(br#"{"urls": null, "top": 5}"#).unwrap_err();
        assert!(e.contains("invalid type: null"), "{e}");
        let e = parse(br#"{"urls": ["/a"], "body": null}"#).unwrap_err();
        assert!(e.contains("belong to a rule job"), "{e}");
        let e = parse(br#"{"urls": ["/a"], "rate": 1e-300}"#).unwrap_err();
        assert!(e.contains("at least 0.001"), "{e}");
        assert!(parse(br#"{"urls": ["/a"], "rate": 0.001}"#).is_ok());
    }

    #[test]
    fn urls_are_paths_or_absolute() {
        let t = url_target("/a/b?c=1").unwrap();
        assert_eq!((t.path.as_str(), t.host), ("/a/b?c=1", None));
        let t = url_target("https://shop.example.com/x?y").unwrap();
        assert_eq!(t.path, "/x?y");
        assert_eq!(t.host.as_deref(), Some("shop.example.com"));
        assert!(url_target("ftp://x/y").is_err());
        assert!(url_target("relative").is_err());
    }

    #[test]
    fn paths_render_with_escaped_values() {
        let mut p = BTreeMap::new();
        p.insert("id", "a b/c");
        assert_eq!(render_path("/w/:id/t", &p).unwrap(), "/w/a%20b%2Fc/t");
        assert!(render_path("/w/:other", &p).is_err());
        assert!(render_path("/static/*", &p).is_err());
    }

    #[test]
    fn schedules_are_daily_times_or_cron() {
        let c = cron_of("daily 05:00").unwrap();
        let w = WarmSchedule {
            name: "x".into(),
            schedule: "daily 05:00".into(),
            cron: c,
            tz: "America/New_York".parse().unwrap(),
            job: JobSpec::default(),
        };
        // 2026-06-01 08:59:59 UTC is 04:59:59 in New York (EDT).
        let before = 1_780_304_399_000u64;
        assert_eq!(w.next_after(before), Some(before + 1_000));
        assert_eq!(w.due_at_or_before(before + 1_000), Some(before + 1_000));
        assert!(w.due_at_or_before(before).unwrap() < before);
        assert!(cron_of("*/5 * * * *").is_ok());
        assert!(cron_of("daily 25:00").unwrap_err().contains("daily HH:MM"));
        assert!(cron_of("whenever").is_err());
    }

    /// `[[warm]]` problems are reported where they are written; a good table loads.
    #[test]
    fn warm_tables_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(
            dir.path().join("rules/r.toml"),
            "[[rule]]\nname = \"search\"\nmatch = { method = \"GET\", path = \"/s\" }\nupstream = \"api\"\nvary = [\"query.q\"]\n",
        )
        .unwrap();
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n[upstreams.api]\nurl = \"http://127.0.0.1:3000\"\n";
        let load = |warm: &str| {
            let path = dir.path().join("gateway.toml");
            std::fs::write(&path, format!("{base}{warm}")).unwrap();
            crate::config::Config::load(&path)
        };
        let ok = load("[[warm]]\nname = \"m\"\nschedule = \"daily 05:00\"\ntz = \"Europe/Paris\"\njob = { rule = \"search\", grid = { \"query.q\" = [\"a\", \"b\"] } }\n").unwrap();
        assert_eq!(ok.warm[0].name, "m");
        let errors = |warm: &str| -> Vec<String> {
            load(warm)
                .unwrap_err()
                .iter()
                .map(|d| d.to_string())
                .collect()
        };
        let e =
            errors("[[warm]]\nname = \"m\"\nschedule = \"at dawn\"\njob = { urls = [\"/a\"] }\n");
        assert!(
            e[0].contains("gateway.toml:8:12:") && e[0].contains("cron"),
            "{e:?}"
        );
        let e = errors("[[warm]]\nname = \"m\"\nschedule = \"daily 05:00\"\njob = { rule = \"nope\", grid = { \"query.q\" = [\"a\"] } }\n");
        assert!(
            e[0].contains("gateway.toml:9:7:") && e[0].contains("unknown rule"),
            "{e:?}"
        );
        let e = errors("[[warm]]\nname = \"m\"\nschedule = \"daily 05:00\"\njob = { urls = [\"/a\"], regions = [\"eu-west\"] }\n");
        assert!(
            e[0].contains("gateway.toml:9:7:")
                && e[0].contains("regions: \"regions\" needs [region]"),
            "{e:?}"
        );
        let e = errors("[[warm]]\nname = \"m\"\nschedule = \"daily 05:00\"\ntz = \"Mars/Base\"\njob = { urls = [\"/a\"], color = 1 }\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().any(|m| m.contains("unknown time zone")), "{e:?}");
        assert!(
            e.iter().any(|m| m.contains("unknown field `color`")),
            "{e:?}"
        );
    }

    #[test]
    fn regions_name_this_region_or_a_peer() {
        use crate::config::region::{PeerConfig, RegionConfig};
        let region = RegionConfig {
            name: "us-east".into(),
            peers: vec![PeerConfig {
                name: "eu-west".into(),
                redis: crate::config::RedisConfig {
                    url: "redis://127.0.0.1:2".into(),
                    cluster: Vec::new(),
                    prefix: "eu:".into(),
                    timeout: std::time::Duration::from_millis(50),
                    keys: None,
                },
            }],
        };
        let job =
            |r: Value| parse(json!({"urls": ["/a"], "regions": r}).to_string().as_bytes()).unwrap();
        assert!(check_regions(&job(json!(["us-east", "eu-west"])), Some(&region)).is_ok());
        assert!(check_regions(&parse(br#"{"urls": ["/a"]}"#).unwrap(), None).is_ok());
        let (e, field) =
            check_regions(&job(json!(["eu-west", "mars"])), Some(&region)).unwrap_err();
        assert_eq!(field, "regions[1]");
        assert!(
            e.contains("unknown region \"mars\"") && e.contains("\"eu-west\""),
            "{e}"
        );
        let (e, field) =
            check_regions(&job(json!(["eu-west", "eu-west"])), Some(&region)).unwrap_err();
        assert_eq!(field, "regions[1]");
        assert!(e.contains("twice"), "{e}");
        let (e, field) = check_regions(&job(json!(["eu-west"])), None).unwrap_err();
        assert_eq!(field, "regions");
        assert!(e.contains("[region]"), "{e}");
    }

    #[test]
    fn pointers_build_objects() {
        let mut doc = json!({"model": "m"});
        set_pointer(&mut doc, "/query/type", json!("dj")).unwrap();
        assert_eq!(doc, json!({"model": "m", "query": {"type": "dj"}}));
        let mut doc = json!({"a": 1});
        assert!(set_pointer(&mut doc, "/a/b", json!(2)).is_err());
    }
}
