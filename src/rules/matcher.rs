//! The request-time half of the rules: [`RuleSet::find`], the first rule whose method set,
//! host pattern and path pattern all match, else the default route.
//!
//! Nothing here parses or allocates per request (a method is one bit of a mask, hosts compare
//! case-insensitively in place, path parameters are byte ranges); everything that can be decided
//! once is decided by [`super::compiler`].

use super::events::EventDef;
use super::path::PathParams;
use super::Rule;
use std::collections::HashMap;
use std::sync::Arc;

pub(super) const METHODS: [(&str, u16); 7] = [
    ("GET", 1),
    ("HEAD", 2),
    ("POST", 4),
    ("PUT", 8),
    ("DELETE", 16),
    ("PATCH", 32),
    ("OPTIONS", 64),
];
const OTHER_METHOD: u16 = 128;
pub(super) const ALL_METHODS: u16 = u16::MAX;

/// The bit a request method tests against a rule's method set.
fn method_bit(method: &http::Method) -> u16 {
    let m = method.as_str();
    METHODS
        .iter()
        .find(|(name, _)| *name == m)
        .map_or(OTHER_METHOD, |(_, bit)| *bit)
}

/// The compiled rules of one configuration.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub(super) rules: Vec<Arc<Rule>>,
    pub(super) default: Option<Arc<Rule>>,
    pub(super) events: HashMap<String, EventDef>,
    /// What `aisle check` warns about without refusing the configuration (an `invalidate_on`
    /// name no event can fire), each with its position.
    pub warnings: Vec<crate::diag::Diagnostic>,
}

/// A matched rule and the path parameters it captured.
pub struct Matched<'a> {
    pub rule: &'a Arc<Rule>,
    pub params: PathParams,
}

impl RuleSet {
    /// The first rule matching the request, else the default route (if there is one).
    pub fn find(&self, method: &http::Method, host: &str, path: &str) -> Option<Matched<'_>> {
        let bit = method_bit(method);
        for rule in &self.rules {
            if let Some(params) = matches(rule, bit, host, path) {
                return Some(Matched { rule, params });
            }
        }
        self.default.as_ref().map(|rule| Matched {
            rule,
            params: PathParams::default(),
        })
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    pub fn default_route(&self) -> Option<&Arc<Rule>> {
        self.default.as_ref()
    }

    /// The `[[event]]` called `name`.
    pub fn event(&self, name: &str) -> Option<&EventDef> {
        self.events.get(name)
    }

    /// Every defined event.
    pub fn events(&self) -> impl Iterator<Item = &EventDef> {
        self.events.values()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The same rules with every normalizer removed ([`Rule::without_normalizers`]).
    pub fn without_normalizers(&self) -> RuleSet {
        let strip = |r: &Arc<Rule>| Arc::new(r.without_normalizers());
        RuleSet {
            rules: self.rules.iter().map(strip).collect(),
            default: self.default.as_ref().map(strip),
            events: self.events.clone(),
            warnings: Vec::new(),
        }
    }
}

/// Whether `rule` matches, with the path parameters it captured.
fn matches(rule: &Rule, method_bit: u16, host: &str, path: &str) -> Option<PathParams> {
    if rule.methods & method_bit == 0 {
        return None;
    }
    if let Some(h) = &rule.host {
        if !h.matches(host) {
            return None;
        }
    }
    rule.path.matches(path)
}

#[cfg(test)]
mod tests {
    use crate::rules::compiler::tests::compile_one;
    use crate::rules::{compile, Context};
    use std::path::Path;
    use std::time::Duration;

    const SPEC: &str = r#"
[[rule]]
name = "vendor-search"
match = { method = "GET", path = "/api/vendors/search" }
upstream = "api"
ttl = "30m"
vary = ["query.location", "query.vendorType", "query.budget"]
tags = ["vendors", "vendor-type:{query.vendorType}"]
invalidate_on = ["vendor_update", "availability_change"]
stale_while_revalidate = "1m"
stale_if_error = "1h"

[[rule]]
name = "wedding-timeline"
match = { method = "GET", path = "/api/weddings/:id/timeline" }
upstream = "api"
ttl = "5m"
vary = ["path.id"]
tags = ["wedding:{path.id}"]
"#;

    #[test]
    fn spec_example_compiles_and_matches() {
        let set = compile_one(SPEC).unwrap();
        assert_eq!(set.len(), 2);
        let get = http::Method::GET;
        let m = set.find(&get, "x", "/api/weddings/42/timeline").unwrap();
        assert_eq!(&*m.rule.name, "wedding-timeline");
        assert_eq!(m.params.get("/api/weddings/42/timeline", 0), Some("42"));
        assert_eq!(
            &*set
                .find(&http::Method::HEAD, "x", "/api/vendors/search")
                .unwrap()
                .rule
                .name,
            "vendor-search"
        );
        let fallback = set
            .find(&http::Method::POST, "x", "/api/vendors/search")
            .unwrap();
        assert!(
            fallback.rule.is_default,
            "POST is not in the rule's methods"
        );
        let r = &set.rules()[0];
        assert_eq!(r.ttl, Some(Duration::from_secs(1800)));
        assert_eq!(r.stale_if_error, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn first_match_wins_and_hosts() {
        let set = compile_one(
            r#"
[[rule]]
name = "a"
match = { path = "/api/vendors/search", host = "*.example.com" }
[[rule]]
name = "b"
match = { path = "/api/vendors/:id", method = ["GET", "POST"] }
"#,
        )
        .unwrap();
        let get = http::Method::GET;
        assert_eq!(
            &*set
                .find(&get, "API.example.com", "/api/vendors/search")
                .unwrap()
                .rule
                .name,
            "a"
        );
        assert_eq!(
            &*set
                .find(&get, "other.org", "/api/vendors/search")
                .unwrap()
                .rule
                .name,
            "b"
        );
        assert_eq!(
            &*set
                .find(&http::Method::POST, "x", "/api/vendors/7")
                .unwrap()
                .rule
                .name,
            "b"
        );
    }

    #[test]
    fn no_default_means_no_fallback() {
        let ups = vec!["a".to_string(), "b".to_string()];
        let ctx = Context {
            upstreams: &ups,
            default_upstream: None,
            encryption: false,
            upstream_credentials: &[],
            key_secret: None,
        };
        let set = compile(
            &[(
                Path::new("r.toml"),
                "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nupstream = \"a\"\n",
            )],
            &ctx,
        )
        .unwrap();
        assert!(set.find(&http::Method::GET, "h", "/y").is_none());
    }
}
