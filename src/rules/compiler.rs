//! The load-time half of the rules: `rules/*.toml` -> [`RuleSet`], with every problem reported
//! as `file:line:col: message`.
//!
//! Files are parsed into serde structs that keep positions (`Spanned`), tables first (a rule may
//! name a table from any file), then rules in file-name order (duplicate names and rules an
//! earlier one shadows are refused), then `[[event]]`s. A rule that fails is reported whole and
//! the others are still checked, so one `aisle check` run shows every problem.

use super::events::{EventDef, ParamTemplate};
use super::host::HostMatch;
use super::matcher::{RuleSet, ALL_METHODS, METHODS};
use super::normalize::{put, Fallback, Normalizer, Table};
use super::path::PathPattern;
use super::source::{Source, Template};
use super::{
    Authorization, ClientRevalidation, Cost, CredentialKey, Priority, Rule, SeasonTtl,
    SeasonTtlEntry, StoredRule, VaryField, DEFAULT_ROUTE,
};
use crate::diag::{Diagnostic, SourceFile};
use crate::metrics::RuleMetrics;
use crate::units::parse_duration;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// What rules need to know about the gateway config.
pub struct Context<'a> {
    /// Upstream names, in index order.
    pub upstreams: &'a [String],
    /// Index of the upstream unmatched requests go to.
    pub default_upstream: Option<usize>,
    /// Whether `[redis] encryption_key` is set (`encrypt = true` needs it).
    pub encryption: bool,
    /// Per upstream (index order): does it set its own credential (`set_headers`)?
    /// `authorization = "share"` needs it. Missing entries count as no.
    pub upstream_credentials: &'a [bool],
    /// `[cache] key_secret`, derived; `None`: a random per-process key
    /// ([`CredentialKey::process_random`]), with a warning when a rule isolates credentials.
    pub key_secret: Option<&'a CredentialKey>,
}

impl<'a> Context<'a> {
    /// The plainest gateway: `upstreams`, the first of them the default; no encryption key, no
    /// upstream credentials, no `key_secret` (tests, benchmarks, `aisle replay`'s own checks).
    pub fn with_upstreams(upstreams: &'a [String]) -> Self {
        Context {
            upstreams,
            default_upstream: Some(0),
            encryption: false,
            upstream_credentials: &[],
            key_secret: None,
        }
    }
}

/// Loads and compiles every `*.toml` in `dir`, in file-name order.
/// Compiles every `*.toml` file of `dir`, in name order; also returns a BLAKE3 digest of their
/// names and texts (the configuration's identity, `aisle_config_info{hash}`).
pub(crate) fn load_dir(
    dir: &Path,
    ctx: &Context<'_>,
) -> Result<(RuleSet, blake3::Hash), Vec<Diagnostic>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            return Err(vec![Diagnostic {
                file: dir.to_path_buf(),
                line: 0,
                col: 0,
                message: format!("cannot read the rules directory: {e}; check [cache] rules_dir"),
            }])
        }
    };
    files.sort();
    let mut texts = Vec::new();
    let mut diags = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(t) => texts.push((f, t)),
            Err(e) => diags.push(Diagnostic {
                file: f.clone(),
                line: 0,
                col: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let sources: Vec<(&Path, &str)> = texts
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    let mut digest = blake3::Hasher::new();
    for (p, t) in &sources {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        for part in [name.as_bytes(), t.as_bytes()] {
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part);
        }
    }
    let digest = digest.finalize();
    match compile(&sources, ctx) {
        Ok(set) if diags.is_empty() => Ok((set, digest)),
        Ok(_) => Err(diags),
        Err(mut more) => {
            diags.append(&mut more);
            Err(diags)
        }
    }
}

/// Compiles rules files given as (path, text), in the order given.
pub fn compile(files: &[(&Path, &str)], ctx: &Context<'_>) -> Result<RuleSet, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut parsed = Vec::new();
    for (path, text) in files {
        let src = SourceFile::new(path, text);
        match toml::from_str::<RawFile>(text) {
            Ok(raw) => parsed.push((src, raw)),
            Err(e) => diags.push(src.toml_error(&e)),
        }
    }

    // Tables first: a rule may name a table defined in any file.
    let mut tables: HashMap<String, Arc<Table>> = HashMap::new();
    let mut table_origin: HashMap<String, String> = HashMap::new();
    for (src, raw) in &parsed {
        for (name, t) in &raw.tables {
            let (line, _) = position(src, t.span());
            if let Some(prev) = table_origin.get(name) {
                diags.push(src.at(
                    t.span(),
                    format!("table {name:?} is already defined at {prev}"),
                ));
                continue;
            }
            let fallback = match &t.get_ref().fallback {
                None => Fallback::Keep,
                Some(f) => match Fallback::parse(f.get_ref()) {
                    Ok(f) => f,
                    Err(e) => {
                        diags.push(src.at(f.span(), e));
                        continue;
                    }
                },
            };
            let map = t.get_ref().map.iter().map(|(k, v)| (k.clone(), v.clone()));
            tables.insert(name.clone(), Arc::new(Table::new(name, map, fallback)));
            table_origin.insert(name.clone(), format!("{}:{line}", src.path.display()));
        }
    }

    let mut rules: Vec<Arc<Rule>> = Vec::new();
    let mut spans: Vec<(usize, std::ops::Range<usize>)> = Vec::new(); // (file index, name span)
    for (file_index, (src, raw)) in parsed.iter().enumerate() {
        for r in &raw.rule {
            match compile_rule(src, r, &tables, ctx) {
                Ok(rule) => {
                    if let Some(prev) = rules.iter().find(|p| p.name == rule.name) {
                        diags.push(src.at(
                            r.name.span(),
                            format!(
                                "duplicate rule name {:?}; it is already used at {}",
                                rule.name, prev.origin
                            ),
                        ));
                        continue;
                    }
                    if let Some(prev) = rules.iter().find(|p| shadows(p, &rule)) {
                        diags.push(src.at(
                            r.name.span(),
                            format!(
                                "rule {:?} can never match: it is shadowed by rule {:?} at {}, which comes first and matches every request this one would; move it earlier or narrow the earlier rule",
                                rule.name, prev.name, prev.origin
                            ),
                        ));
                        continue;
                    }
                    rules.push(Arc::new(rule));
                    spans.push((file_index, r.name.span()));
                }
                Err(mut e) => diags.append(&mut e),
            }
        }
    }
    let mut events: HashMap<String, EventDef> = HashMap::new();
    for (src, raw) in &parsed {
        for ev in &raw.event {
            let name = ev.name.get_ref().trim();
            let (line, _) = position(src, ev.name.span());
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                diags.push(src.at(
                    ev.name.span(),
                    "an event name must be non-empty, without spaces",
                ));
                continue;
            }
            if let Some(prev) = events.get(name) {
                diags.push(src.at(
                    ev.name.span(),
                    format!(
                        "duplicate event name {name:?}; it is already defined at {}",
                        prev.origin
                    ),
                ));
                continue;
            }
            let mut invalidates = Vec::new();
            for t in &ev.invalidates {
                match ParamTemplate::parse(t.get_ref()) {
                    Ok(t) => invalidates.push(t),
                    Err(e) => diags.push(src.at(t.span(), e)),
                }
            }
            events.insert(
                name.to_string(),
                EventDef {
                    name: name.to_string(),
                    invalidates,
                    cdn: ev.cdn,
                    origin: format!("{}:{line}", src.path.display()),
                },
            );
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let warnings = unfired_names(&parsed, &events);
    let default = ctx.default_upstream.map(|upstream| {
        Arc::new(Rule {
            name: DEFAULT_ROUTE.into(),
            origin: "(default route)".into(),
            methods: ALL_METHODS,
            host: None,
            path: PathPattern::parse("/*").expect("static pattern"),
            upstream,
            cache: true,
            ttl: None,
            season_ttl: None,
            priority: Priority::Normal,
            stale_while_revalidate: None,
            stale_if_error: None,
            refresh_ahead: None,
            vary: Vec::new(),
            tags: Vec::new(),
            invalidate_on: Vec::new(),
            cache_set_cookie: false,
            encrypt: false,
            keep_tag_headers: false,
            body_key: None,
            needs_body: false,
            cost: None,
            is_default: true,
            key_path: true,
            client_controls: false,
            client_revalidation: ClientRevalidation::Honour,
            authorization: Authorization::Rfc,
            generation: {
                let mut h = blake3::Hasher::new();
                put(&mut h, b"default route");
                put(&mut h, ctx.upstreams[upstream].as_bytes());
                finish(&h)
            },
            metrics: RuleMetrics::new(DEFAULT_ROUTE),
            stored: StoredRule::of(DEFAULT_ROUTE, false, None),
        })
    });
    Ok(RuleSet {
        rules,
        default,
        events,
        warnings,
    })
}

/// A warning for each `invalidate_on` name that no `[[event]]` can ever invalidate (its
/// `invalidates` templates cannot render it; webhook mappings fire events too, so none can
/// either): the rule's entries then wait out their ttl however often the name is "fired".
fn unfired_names(
    parsed: &[(SourceFile<'_>, RawFile)],
    events: &HashMap<String, EventDef>,
) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    for (src, raw) in parsed {
        for r in &raw.rule {
            for spanned in &r.invalidate_on {
                let name = spanned.get_ref().as_str();
                let fired = events
                    .values()
                    .any(|e| e.invalidates.iter().any(|t| t.could_render(name)));
                if !fired {
                    warnings.push(src.at(
                        spanned.span(),
                        format!(
                            "warning: invalidate_on name {name:?} of rule {:?} is never invalidated: no [[event]] lists it in `invalidates` (events, fired by the admin API or a webhook mapping, purge what they list); add [[event]] name = {name:?} invalidates = [{name:?}] to a rules file, or remove the name",
                            r.name.get_ref()
                        ),
                    ));
                }
            }
        }
    }
    warnings
}

fn position(src: &SourceFile<'_>, span: std::ops::Range<usize>) -> (usize, usize) {
    let d = src.at(span, "");
    (d.line, d.col)
}

fn shadows(earlier: &Rule, later: &Rule) -> bool {
    let methods_covered = later.methods & !earlier.methods == 0;
    let host_covered = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a.covers(b),
    };
    methods_covered && host_covered && earlier.path.covers(&later.path)
}

fn duration(
    src: &SourceFile<'_>,
    field: &Option<Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Duration> {
    let f = field.as_ref()?;
    match parse_duration(f.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            diags.push(src.at(f.span(), e));
            None
        }
    }
}

fn compile_rule(
    src: &SourceFile<'_>,
    r: &RawRule,
    tables: &HashMap<String, Arc<Table>>,
    ctx: &Context<'_>,
) -> Result<Rule, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let name = r.name.get_ref().trim();
    if name.is_empty() {
        diags.push(src.at(r.name.span(), "a rule needs a non-empty name"));
    }
    let (line, _) = position(src, r.name.span());
    let origin = format!("{}:{line}", src.path.display());

    let m = r.matcher.get_ref();
    let path = match PathPattern::parse(m.path.get_ref()) {
        Ok(p) => Some(p),
        Err(e) => {
            diags.push(src.at(m.path.span(), e));
            None
        }
    };
    let mut methods = 0u16;
    match &m.method {
        None => methods = 1 | 2,
        Some(list) => {
            for item in list.get_ref().items() {
                let upper = item.to_ascii_uppercase();
                if upper == "*" {
                    methods = ALL_METHODS;
                } else if let Some((_, bit)) = METHODS.iter().find(|(n, _)| *n == upper) {
                    methods |= bit;
                    if *bit == 1 {
                        methods |= 2; // HEAD is answered from GET entries.
                    }
                } else {
                    diags.push(src.at(
                        list.span(),
                        format!("unknown method {item:?}; expected one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS or \"*\""),
                    ));
                }
            }
        }
    }
    let host = match &m.host {
        None => None,
        Some(h) => match HostMatch::parse(h.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                diags.push(src.at(h.span(), e));
                None
            }
        },
    };
    let upstream = match &r.upstream {
        Some(u) => match ctx.upstreams.iter().position(|n| n == u.get_ref()) {
            Some(i) => Some(i),
            None => {
                diags.push(src.at(
                    u.span(),
                    format!(
                        "unknown upstream {:?}; defined upstreams: {}",
                        u.get_ref(),
                        ctx.upstreams.join(", ")
                    ),
                ));
                None
            }
        },
        None => match ctx.default_upstream {
            Some(i) => Some(i),
            None => {
                diags.push(src.at(
                    r.name.span(),
                    "this rule names no upstream and there is no default; add upstream = \"NAME\" or [server] default_upstream",
                ));
                None
            }
        },
    };
    let ttl = duration(src, &r.ttl, &mut diags);
    let swr = duration(src, &r.stale_while_revalidate, &mut diags);
    let sie = duration(src, &r.stale_if_error, &mut diags);
    let priority = match &r.priority {
        None => Priority::Normal,
        Some(p) => Priority::parse(p.get_ref()).unwrap_or_else(|| {
            diags.push(src.at(
                p.span(),
                format!(
                    "priority = {:?}: write \"critical\", \"high\", \"normal\" or \"low\"",
                    p.get_ref()
                ),
            ));
            Priority::Normal
        }),
    };
    // The class's default when the rule sets none (a rule's explicit value wins).
    let sie = sie.or(if r.stale_if_error.is_none() {
        priority.default_stale_if_error()
    } else {
        None
    });
    let season_ttl = r.season_ttl.as_ref().map(|map| {
        let mut out = SeasonTtl::default();
        for (name, value) in map {
            let Some(ttl) = duration(src, &Some(value.clone()), &mut diags) else {
                continue;
            };
            if name.get_ref() == "off" {
                out.off = Some(ttl);
            } else {
                out.seasons.push(SeasonTtlEntry {
                    season: name.get_ref().as_str().into(),
                    ttl,
                    at: src.at(name.span(), ""),
                });
            }
        }
        out
    });

    let mut vary = Vec::new();
    let mut tags = Vec::new();
    if let Some(pattern) = &path {
        for v in &r.vary {
            match Source::parse(v.get_ref(), pattern) {
                Ok(source) => {
                    if vary.iter().any(|f: &VaryField| f.source == source) {
                        diags.push(src.at(
                            v.span(),
                            format!("{:?} is listed twice in vary", v.get_ref()),
                        ));
                    } else {
                        vary.push(VaryField {
                            source,
                            normalizers: Vec::new(),
                        });
                    }
                }
                Err(e) => diags.push(src.at(v.span(), e)),
            }
        }
        for (key, steps) in &r.normalize {
            let Some(field) = Source::parse(key, pattern)
                .ok()
                .and_then(|s| vary.iter_mut().find(|f| f.source == s))
            else {
                diags.push(src.at(
                    steps.span(),
                    format!("normalize names {key:?}, which is not in this rule's vary list"),
                ));
                continue;
            };
            for step in steps.get_ref().items() {
                match Normalizer::parse(step, tables) {
                    Ok(n) => field.normalizers.push(n),
                    Err(e) => diags.push(src.at(steps.span(), e)),
                }
            }
        }
        for t in &r.tags {
            match Template::parse(t.get_ref(), pattern) {
                Ok(t) => tags.push(t),
                Err(e) => diags.push(src.at(t.span(), e)),
            }
        }
    }
    let mut invalidate_on: Vec<Box<str>> = Vec::new();
    for e in &r.invalidate_on {
        let ev = e.get_ref();
        if ev.is_empty()
            || ev
                .chars()
                .any(|c| c.is_whitespace() || c == '{' || c == '}')
        {
            diags.push(src.at(
                e.span(),
                format!("event name {ev:?} must be non-empty, without spaces or braces"),
            ));
        } else {
            invalidate_on.push(ev.as_str().into());
        }
    }

    let encrypt = match &r.encrypt {
        Some(e) if *e.get_ref() && !ctx.encryption => {
            diags.push(src.at(
                e.span(),
                "encrypt = true needs [redis] encryption_key = \"${AISLE_CACHE_KEY}\" (32 bytes, base64) in gateway.toml",
            ));
            false
        }
        Some(e) => *e.get_ref(),
        None => false,
    };
    let body_key = match &r.body_key {
        Some(bk) if bk.get_ref().all => {
            for p in &bk.get_ref().ignore {
                if !p.get_ref().starts_with('/') {
                    diags.push(src.at(
                        p.span(),
                        format!(
                            "body_key.ignore: {:?} is not a JSON pointer; write it like \"/user\"",
                            p.get_ref()
                        ),
                    ));
                }
            }
            Some(
                bk.get_ref()
                    .ignore
                    .iter()
                    .map(|p| p.get_ref().clone())
                    .collect(),
            )
        }
        Some(bk) => {
            diags.push(src.at(bk.span(), "body_key needs all = true (key on the whole body, minus ignore = [...]); to key on single fields use vary = [\"body./field\"]"));
            None
        }
        None => None,
    };
    if let Some(t) = r.cost.as_ref().and_then(|c| c.tokens.as_ref()) {
        if !t.get_ref().starts_with('/') {
            diags.push(src.at(t.span(), format!("cost.tokens {:?} is not a JSON pointer into the response; write it like \"/usage/total_tokens\"", t.get_ref())));
        }
    }
    let cost = r.cost.as_ref().map(|c| Cost {
        per_request: c.per_request.unwrap_or(0.0),
        tokens: c.tokens.as_ref().map(|t| t.get_ref().clone()),
        per_1k_tokens: c.per_1k_tokens.unwrap_or(0.0),
    });
    let client_revalidation = client_revalidation(src, r, &mut diags);
    let authorization = authorization(src, r, ctx, upstream, &mut diags);
    let keyed_on_body =
        body_key.is_some() || vary.iter().any(|f| matches!(f.source, Source::Body(_)));
    let refresh_ahead = refresh_ahead(src, r, keyed_on_body, &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    let path = path.expect("checked above");
    let needs_body = keyed_on_body;
    let key_path = !path.determined_by(|i| {
        vary.iter()
            .any(|f| matches!(f.source, Source::Path(p, _) if p == i))
    });
    let upstream = upstream.expect("checked above");
    let generation = {
        let mut h = blake3::Hasher::new();
        put(&mut h, &methods.to_le_bytes());
        put(
            &mut h,
            m.host.as_ref().map_or("", |h| h.get_ref()).as_bytes(),
        );
        put(&mut h, m.path.get_ref().as_bytes());
        put(&mut h, ctx.upstreams[upstream].as_bytes());
        for d in [ttl, swr, sie] {
            put(&mut h, format!("{:?}", d.map(|d| d.as_millis())).as_bytes());
        }
        // Not in the generation: `refresh_ahead` changes when a hit refreshes an entry, never
        // what the entry holds, so turning it on keeps the stored entries.
        // The rule's own season TTLs, as written; never the active season nor the seasons'
        // multipliers, so a season starting or ending does not empty the cache. The priority
        // travels in the key's user_tag: a changed priority starts afresh like any rule change.
        if let Some(st) = &season_ttl {
            put(&mut h, b"season_ttl");
            put(
                &mut h,
                format!("{:?}", st.off.map(|d| d.as_millis())).as_bytes(),
            );
            for e in &st.seasons {
                put(&mut h, e.season.as_bytes());
                put(&mut h, &e.ttl.as_millis().to_le_bytes());
            }
        }
        if priority != Priority::Normal {
            put(&mut h, priority.name().as_bytes());
        }
        for (written, field) in r.vary.iter().zip(&vary) {
            put(&mut h, written.get_ref().as_bytes());
            put(&mut h, &(field.normalizers.len() as u64).to_le_bytes());
            for n in &field.normalizers {
                n.fingerprint(&mut h);
            }
        }
        put(&mut h, b"tags");
        for t in &r.tags {
            put(&mut h, t.get_ref().as_bytes());
        }
        put(&mut h, b"invalidate_on");
        for e in &invalidate_on {
            put(&mut h, e.as_bytes());
        }
        let flags = [
            r.cache.unwrap_or(true),
            r.cache_set_cookie.unwrap_or(false),
            encrypt,
            r.keep_tag_headers.unwrap_or(false),
            key_path,
            needs_body,
        ];
        put(&mut h, &flags.map(u8::from));
        put(&mut h, format!("{body_key:?}").as_bytes());
        put(&mut h, format!("{client_revalidation:?}").as_bytes());
        // The mode and the credential header, never the secret: rotating key_secret changes
        // the isolated keys themselves.
        match &authorization {
            Authorization::Rfc => {}
            Authorization::Isolate { header, .. } => {
                put(&mut h, b"isolate");
                put(&mut h, header.as_str().as_bytes());
            }
            Authorization::Share => put(&mut h, b"share"),
        }
        finish(&h)
    };
    let stored = StoredRule::of(name, encrypt, cost.as_ref());
    Ok(Rule {
        key_path,
        generation,
        name: name.into(),
        origin,
        methods,
        host,
        path,
        upstream,
        cache: r.cache.unwrap_or(true),
        ttl,
        season_ttl,
        priority,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        refresh_ahead,
        vary,
        tags,
        invalidate_on,
        cache_set_cookie: r.cache_set_cookie.unwrap_or(false),
        encrypt,
        keep_tag_headers: r.keep_tag_headers.unwrap_or(false),
        needs_body,
        body_key,
        cost,
        is_default: false,
        client_controls: r.client_controls.unwrap_or(false),
        client_revalidation,
        authorization,
        metrics: RuleMetrics::new(name),
        stored,
    })
}

/// `refresh_ahead = 0.8`: a fraction strictly between 0 and 1, on a rule whose background
/// refresh can replay the request (not keyed on the body: pingora's background subrequests
/// carry no body).
fn refresh_ahead(
    src: &SourceFile<'_>,
    r: &RawRule,
    keyed_on_body: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<f64> {
    let v = r.refresh_ahead.as_ref()?;
    let x = *v.get_ref();
    if !(x > 0.0 && x < 1.0) {
        diags.push(src.at(
            v.span(),
            format!(
                "refresh_ahead = {x}: write a fraction of the entry's freshness lifetime between 0 and 1 (exclusive), e.g. 0.8"
            ),
        ));
        return None;
    }
    if keyed_on_body {
        diags.push(src.at(
            v.span(),
            "refresh_ahead on a rule keyed on the request body: a background refresh replays the request without its body, so it could not refresh this entry",
        ));
        return None;
    }
    if r.cache == Some(false) {
        diags.push(src.at(v.span(), "refresh_ahead on a rule with cache = false"));
        return None;
    }
    Some(x)
}

/// `authorization = "rfc" | "isolate" | "share"` and `credential_header`.
fn authorization(
    src: &SourceFile<'_>,
    r: &RawRule,
    ctx: &Context<'_>,
    upstream: Option<usize>,
    diags: &mut Vec<Diagnostic>,
) -> Authorization {
    let mode = r.authorization.as_ref().map(|v| (v, v.get_ref().as_str()));
    if let Some(h) = &r.credential_header {
        if !matches!(mode, Some((_, "isolate"))) {
            diags.push(src.at(
                h.span(),
                "credential_header names the header isolate keys on; it needs authorization = \"isolate\" in this rule",
            ));
        }
    }
    match mode {
        None | Some((_, "rfc")) => Authorization::Rfc,
        Some((_, "isolate")) => {
            let header = match &r.credential_header {
                None => http::header::AUTHORIZATION,
                Some(h) => match http::HeaderName::from_bytes(h.get_ref().trim().as_bytes()) {
                    Ok(name) => name,
                    Err(_) => {
                        diags.push(src.at(
                            h.span(),
                            format!("credential_header {:?} is not a header name; write it like \"x-api-key\"", h.get_ref()),
                        ));
                        http::header::AUTHORIZATION
                    }
                },
            };
            let key = ctx
                .key_secret
                .cloned()
                .unwrap_or_else(CredentialKey::process_random);
            Authorization::Isolate {
                header,
                key: Arc::new(key),
            }
        }
        Some((v, "share")) => {
            let credentialed =
                upstream.is_some_and(|u| ctx.upstream_credentials.get(u).copied() == Some(true));
            if let (false, Some(u)) = (credentialed, upstream) {
                let name = &ctx.upstreams[u];
                diags.push(src.at(
                    v.span(),
                    format!(
                        "authorization = \"share\" gives every caller the answer fetched with one caller's credential; \
                         it is allowed only when the upstream sets its own: add set_headers = {{ authorization = \"Bearer ${{VENDOR_KEY}}\" }} \
                         to [upstreams.{name}] in gateway.toml, or use authorization = \"isolate\" (shared per credential)"
                    ),
                ));
            }
            Authorization::Share
        }
        Some((v, other)) => {
            diags.push(src.at(
                v.span(),
                format!("authorization {other:?} is not known; write \"rfc\" (RFC 9111: answers to requests with Authorization are not shared unless they say public, the default), \"isolate\" (shared only among callers with the same credential) or \"share\" (shared by all; the upstream must set its own credential)"),
            ));
            Authorization::Rfc
        }
    }
}

/// The first 64 bits of a generation hash.
fn finish(h: &blake3::Hasher) -> u64 {
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 of 32 bytes"))
}

fn client_revalidation(
    src: &SourceFile<'_>,
    r: &RawRule,
    diags: &mut Vec<Diagnostic>,
) -> ClientRevalidation {
    match r
        .client_revalidation
        .as_ref()
        .map(|v| (v, v.get_ref().as_str()))
    {
        None | Some((_, "honour")) => ClientRevalidation::Honour,
        Some((_, "ignore")) => ClientRevalidation::Ignore,
        Some((v, other)) => {
            diags.push(src.at(
                v.span(),
                format!("client_revalidation {other:?} is not known; write \"honour\" (a client's no-cache / max-age refetch, the default) or \"ignore\" (the shared entry answers while fresh)"),
            ));
            ClientRevalidation::Honour
        }
    }
}

// What the rules files say, as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    event: Vec<RawEvent>,
    #[serde(default)]
    tables: BTreeMap<String, Spanned<RawTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    name: Spanned<String>,
    invalidates: Vec<Spanned<String>>,
    #[serde(default)]
    cdn: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    map: BTreeMap<String, String>,
    fallback: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matcher: Spanned<RawMatch>,
    upstream: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    season_ttl: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    priority: Option<Spanned<String>>,
    #[serde(default)]
    vary: Vec<Spanned<String>>,
    #[serde(default)]
    normalize: BTreeMap<String, Spanned<OneOrMany>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    invalidate_on: Vec<Spanned<String>>,
    stale_while_revalidate: Option<Spanned<String>>,
    stale_if_error: Option<Spanned<String>>,
    refresh_ahead: Option<Spanned<f64>>,
    cache: Option<bool>,
    cache_set_cookie: Option<bool>,
    encrypt: Option<Spanned<bool>>,
    keep_tag_headers: Option<bool>,
    body_key: Option<Spanned<RawBodyKey>>,
    cost: Option<RawCost>,
    client_controls: Option<bool>,
    client_revalidation: Option<Spanned<String>>,
    authorization: Option<Spanned<String>>,
    credential_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBodyKey {
    all: bool,
    #[serde(default)]
    ignore: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCost {
    per_request: Option<f64>,
    tokens: Option<Spanned<String>>,
    per_1k_tokens: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    method: Option<Spanned<OneOrMany>>,
    path: Spanned<String>,
    host: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn ctx() -> Context<'static> {
        static UPS: once_cell::sync::Lazy<Vec<String>> =
            once_cell::sync::Lazy::new(|| vec!["api".to_string(), "ai".to_string()]);
        Context::with_upstreams(&UPS)
    }

    pub(crate) fn compile_one(text: &str) -> Result<RuleSet, Vec<Diagnostic>> {
        compile(&[(Path::new("rules/a.toml"), text)], &ctx())
    }

    fn errors(text: &str) -> Vec<String> {
        compile_one(text)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn priority_and_season_ttl() {
        let set = compile_one(
            "[[rule]]\nname = \"v\"\nmatch = { path = \"/v\" }\nttl = \"30m\"\npriority = \"critical\"\nseason_ttl = { peak = \"10m\", off = \"1h\" }\n\
             [[rule]]\nname = \"w\"\nmatch = { path = \"/w\" }\nttl = \"30m\"\npriority = \"high\"\nstale_if_error = \"5m\"\n\
             [[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nttl = \"30m\"\n",
        )
        .unwrap();
        let [v, w, x] = set.rules() else {
            panic!("three rules")
        };
        let min = |m: u64| Some(Duration::from_secs(m * 60));
        assert_eq!(v.priority, Priority::Critical);
        assert_eq!(v.ttl_in(Some(("peak", 0.5))), min(10), "season_ttl wins");
        assert_eq!(
            v.ttl_in(Some(("winter", 2.0))),
            min(60),
            "not named: ttl x 2"
        );
        assert_eq!(v.ttl_in(None), min(60), "off");
        assert_eq!(x.ttl_in(Some(("peak", 0.5))), min(15), "ttl x multiplier");
        assert_eq!(x.ttl_in(None), min(30));
        assert_eq!(
            v.stale_if_error,
            Some(Duration::from_secs(86_400)),
            "critical default"
        );
        assert_eq!(w.stale_if_error, min(5), "the rule's own value wins");
        assert_eq!(x.stale_if_error, None, "normal: the origin's");
        assert_eq!(x.priority, Priority::Normal);
        let at = &v.season_ttl.as_ref().unwrap().seasons[0].at;
        assert_eq!((at.line, at.col), (6, 16), "where `peak` is written");
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\npriority = \"urgent\"\nseason_ttl = { peak = \"soon\" }\n");
        assert!(
            e.iter()
                .any(|e| e
                    .starts_with("rules/a.toml:4:12: priority = \"urgent\": write \"critical\"")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("rules/a.toml:5:23: bad duration")),
            "{e:?}"
        );
    }

    #[test]
    fn refresh_ahead_is_a_fraction_on_a_rule_without_a_body_key() {
        let set = compile_one(
            "[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nttl = \"5m\"\nrefresh_ahead = 0.8\n",
        )
        .unwrap();
        assert_eq!(set.rules()[0].refresh_ahead, Some(0.8));
        for bad in ["1.5", "1", "0", "-0.2", "nan"] {
            let e = errors(&format!(
                "[[rule]]\nname = \"a\"\nmatch = {{ path = \"/a\" }}\nrefresh_ahead = {bad}\n"
            ));
            assert!(
                e[0].starts_with("rules/a.toml:4:17: refresh_ahead =")
                    && e[0].contains("between 0 and 1"),
                "{bad}: {e:?}"
            );
        }
        let e = errors(
            "[[rule]]\nname = \"a\"\nmatch = { method = \"POST\", path = \"/a\" }\nvary = [\"body./q\"]\nrefresh_ahead = 0.5\n",
        );
        assert!(
            e[0].starts_with("rules/a.toml:5:17:") && e[0].contains("keyed on the request body"),
            "{e:?}"
        );
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nttl = \"soon\"\n");
        assert!(e[0].starts_with("rules/a.toml:4:7: bad duration"), "{e:?}");
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\ncolour = 1\n");
        assert!(
            e[0].starts_with("rules/a.toml:4:1:") && e[0].contains("unknown field `colour`"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nupstream = \"nope\"\n");
        assert!(
            e[0].starts_with("rules/a.toml:4:") && e[0].contains("unknown upstream \"nope\""),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"a/b\" }\n");
        assert!(
            e[0].starts_with("rules/a.toml:3:") && e[0].contains("start with '/'"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nvary = [\"form.x\"]\n");
        assert!(
            e[0].starts_with("rules/a.toml:4:") && e[0].contains("unknown source kind"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\n[[rule]]\nname = \"a\"\nmatch = { path = \"/b\" }\n");
        assert!(
            e[0].starts_with("rules/a.toml:5:") && e[0].contains("duplicate rule name"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"all\"\nmatch = { path = \"/api/*\" }\n[[rule]]\nname = \"one\"\nmatch = { path = \"/api/x\" }\n");
        assert!(
            e[0].starts_with("rules/a.toml:5:") && e[0].contains("shadowed by rule \"all\""),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nvary = [\"query.x\"]\nnormalize = { \"query.x\" = \"city\" }\n");
        assert!(
            e[0].starts_with("rules/a.toml:5:") && e[0].contains("unknown normalizer"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nnormalize = { \"query.x\" = \"trim\" }\n");
        assert!(e[0].contains("not in this rule's vary list"), "{e:?}");
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\", method = \"FETCH\" }\n");
        assert!(e[0].contains("unknown method"), "{e:?}");
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\", method = \"POST\" }\nbody_key = { all = true, ignore = [\"/ok\", \"user\"] }\n");
        assert!(
            e[0].starts_with("rules/a.toml:4:43:")
                && e[0].contains("\"user\" is not a JSON pointer"),
            "{e:?}"
        );
        let e = errors("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\ncost = { per_1k_tokens = 0.5, tokens = \"usage\" }\n");
        assert!(
            e[0].starts_with("rules/a.toml:4:40:") && e[0].contains("cost.tokens"),
            "{e:?}"
        );
    }

    #[test]
    fn client_settings() {
        let set = compile_one(
            "[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nclient_controls = true\nclient_revalidation = \"ignore\"\n[[rule]]\nname = \"b\"\nmatch = { path = \"/b\" }\n",
        )
        .unwrap();
        let (a, b) = (&set.rules()[0], &set.rules()[1]);
        assert!(a.client_controls && a.client_revalidation == ClientRevalidation::Ignore);
        assert!(!b.client_controls && b.client_revalidation == ClientRevalidation::Honour);
        let e = errors(
            "[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\nclient_revalidation = \"never\"\n",
        );
        assert!(
            e[0].starts_with("rules/a.toml:4:23:")
                && e[0].contains("\"honour\"")
                && e[0].contains("\"ignore\""),
            "{e:?}"
        );
    }

    #[test]
    fn events_compile() {
        let set = compile_one(
            "[[event]]\nname = \"availability_changed\"\ninvalidates = [\"availability_change\", \"vendor:{vendorId}\"]\ncdn = true\n",
        )
        .unwrap();
        let ev = set.event("availability_changed").unwrap();
        assert!(ev.cdn);
        let params = serde_json::from_str(r#"{"vendorId": "v1"}"#).unwrap();
        assert_eq!(
            ev.tags(&params).unwrap(),
            vec!["availability_change", "vendor:v1"]
        );
        let e = errors("[[event]]\nname = \"x\"\ninvalidates = [\"a{b\"]\n[[event]]\nname = \"x\"\ninvalidates = []\n");
        assert!(
            e.iter()
                .any(|d| d.starts_with("rules/a.toml:3:") && d.contains("closing")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|d| d.starts_with("rules/a.toml:5:") && d.contains("duplicate event")),
            "{e:?}"
        );
    }

    #[test]
    fn narrower_methods_or_hosts_do_not_shadow() {
        compile_one(
            r#"
[[rule]]
name = "get-only"
match = { method = "GET", path = "/api/*" }
[[rule]]
name = "post"
match = { method = "POST", path = "/api/x" }
[[rule]]
name = "host"
match = { host = "a.example.com", path = "/other" }
[[rule]]
name = "any-host"
match = { path = "/other" }
"#,
        )
        .unwrap();
    }

    #[test]
    fn a_rule_without_upstream_needs_a_default() {
        let ups = vec!["a".to_string(), "b".to_string()];
        let ctx = Context {
            upstreams: &ups,
            default_upstream: None,
            encryption: false,
            upstream_credentials: &[],
            key_secret: None,
        };
        let err = compile(
            &[(
                Path::new("r.toml"),
                "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\n",
            )],
            &ctx,
        )
        .unwrap_err();
        assert!(err[0].message.contains("no upstream"));
    }

    /// Issue 13: `authorization` and `credential_header` are checked with positions; `share`
    /// needs an upstream that sets its own credential; the mode is part of the generation.
    #[test]
    fn authorization_settings() {
        let base = "[[rule]]\nname = \"a\"\nmatch = { path = \"/a\" }\n";
        let set = compile_one(&format!(
            "{base}authorization = \"isolate\"\ncredential_header = \"X-Api-Key\"\n"
        ))
        .unwrap();
        match &set.rules()[0].authorization {
            Authorization::Isolate { header, .. } => assert_eq!(header.as_str(), "x-api-key"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            compile_one(base).unwrap().rules()[0].authorization,
            Authorization::Rfc
        ));
        let e = errors(&format!("{base}authorization = \"share\"\n"));
        assert!(
            e[0].starts_with("rules/a.toml:4:17: authorization = \"share\""),
            "{e:?}"
        );
        assert!(
            e[0].contains("[upstreams.api]") && e[0].contains("set_headers"),
            "{e:?}"
        );
        let shared = compile(
            &[(
                Path::new("rules/a.toml"),
                &format!("{base}authorization = \"share\"\n"),
            )],
            &Context {
                upstream_credentials: &[true],
                ..ctx()
            },
        )
        .unwrap();
        assert!(matches!(
            shared.rules()[0].authorization,
            Authorization::Share
        ));
        let e = errors(&format!("{base}authorization = \"nope\"\n"));
        assert!(
            e[0].starts_with("rules/a.toml:4:17: authorization \"nope\" is not known"),
            "{e:?}"
        );
        let e = errors(&format!("{base}credential_header = \"x-api-key\"\n"));
        assert!(
            e[0].starts_with("rules/a.toml:4:21: credential_header"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{base}authorization = \"isolate\"\ncredential_header = \"x api\"\n"
        ));
        assert!(e[0].contains("is not a header name"), "{e:?}");
        let generation =
            |extra: &str| compile_one(&format!("{base}{extra}")).unwrap().rules()[0].generation;
        let g = generation("");
        assert_ne!(g, generation("authorization = \"isolate\"\n"));
        assert_ne!(
            generation("authorization = \"isolate\"\n"),
            generation("authorization = \"isolate\"\ncredential_header = \"x-api-key\"\n")
        );
        assert_eq!(g, generation("authorization = \"rfc\"\n"));
    }

    /// Issue 12: a rule's generation changes with what decides its keys and entries (so a
    /// reload does not serve old entries under a new definition), not with where it is
    /// written or what it costs (so an unchanged rule keeps hitting).
    #[test]
    fn generation_follows_key_relevant_settings_only() {
        let generation = |text: &str| {
            let text = format!("[tables.m]\nmap = {{ a = \"x\" }}\n{text}");
            compile_one(&text).unwrap().rules()[0].generation
        };
        let base = "[[rule]]\nname = \"r\"\nmatch = { path = \"/r\" }\nvary = [\"query.q\"]\nnormalize = { \"query.q\" = \"m\" }\nttl = \"1m\"\n";
        let g = generation(base);
        assert_eq!(g, generation(base), "deterministic");
        assert_eq!(g, generation(&format!("\n\n# moved\n{base}")), "position");
        assert_eq!(
            g,
            generation(&format!("{base}cost = {{ per_request = 0.5 }}\n")),
            "cost"
        );
        for changed in [
            base.replace("ttl = \"1m\"", "ttl = \"2m\""),
            base.replace("[\"query.q\"]", "[\"query.q\", \"query.z\"]"),
            base.replace("\"m\" }", "[\"m\", \"lowercase\"] }"),
            format!("{base}cache = false\n"),
            format!("{base}tags = [\"t\"]\n"),
            format!("{base}upstream = \"ai\"\n"),
        ] {
            assert_ne!(g, generation(&changed), "{changed}");
        }
        // A table's contents count, not only its name.
        let other_table = format!("[tables.m]\nmap = {{ a = \"y\" }}\n{base}");
        assert_ne!(g, compile_one(&other_table).unwrap().rules()[0].generation);
    }
}
