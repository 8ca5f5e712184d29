//! Named events (`[[event]]` in rules files): what an event invalidates, given its parameters.
//!
//! ```toml
//! [[event]]
//! name = "availability_changed"
//! invalidates = ["availability_change", "vendor:{vendorId}"]
//! cdn = true
//! ```
//! Templates are compiled at load time; firing an event renders them with the event's
//! parameters (from the admin API or a webhook mapping) into tags. A parameter a template needs
//! but the event lacks is an error, so a malformed event invalidates nothing.
//!
//! It lives with the rules (not in `invalidation/`) because it is compiled from rules files and
//! is pure: `invalidation` reads the compiled [`EventDef`]s from the [`super::RuleSet`].

use super::template::{escape_tag, split, Piece};
use serde_json::Value;
use std::collections::BTreeMap;

/// A compiled tag template over event parameters, e.g. `vendor:{vendorId}`.
#[derive(Debug, Clone)]
pub struct ParamTemplate {
    source: Box<str>,
    pieces: Vec<Piece<Box<str>>>,
}

impl ParamTemplate {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let pieces = split(s, |name| {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{{{name}}} is not a parameter name (letters, digits, '_')"
                ));
            }
            Ok(name.into())
        })?;
        Ok(ParamTemplate {
            source: s.into(),
            pieces,
        })
    }

    /// Whether some parameters could render `tag` (a `{hole}` stands for any non-empty value):
    /// whether firing this template's event can ever invalidate an `invalidate_on` name.
    pub(crate) fn could_render(&self, tag: &str) -> bool {
        fn fits(pieces: &[Piece<Box<str>>], s: &str) -> bool {
            match pieces.split_first() {
                None => s.is_empty(),
                Some((Piece::Text(t), rest)) => s.strip_prefix(&**t).is_some_and(|r| fits(rest, r)),
                Some((Piece::Hole(_), rest)) => (1..=s.len())
                    .filter(|&i| s.is_char_boundary(i))
                    .any(|i| fits(rest, &s[i..])),
            }
        }
        fits(&self.pieces, tag)
    }

    /// Renders with `params`; names the missing parameter otherwise.
    pub(crate) fn render(&self, params: &BTreeMap<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Hole(name) => match params.get(&**name) {
                    // Spaces and the like are escaped in the tag (`tag_key`), as when a rule
                    // renders the same value from a request.
                    Some(Value::String(s)) if !s.is_empty() => out.push_str(s),
                    Some(Value::Number(n)) => out.push_str(&n.to_string()),
                    Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
                    Some(other) => {
                        return Err(format!(
                            "parameter {name:?} of {:?} must be a non-empty string, a number or a boolean, not {other}",
                            self.source
                        ))
                    }
                    None => {
                        return Err(format!("parameter {name:?} is missing (needed by {:?})", self.source))
                    }
                },
            }
        }
        Ok(out)
    }
}

/// A compiled `[[event]]`.
#[derive(Debug, Clone)]
pub struct EventDef {
    pub name: String,
    pub invalidates: Vec<ParamTemplate>,
    /// Also purge the CDNs.
    pub cdn: bool,
    /// Where it was defined, for messages.
    pub origin: String,
}

impl EventDef {
    /// The tags this event invalidates with these parameters, escaped
    /// ([`super::template::escape_tag`]) as rules render request values; the invalidator cuts
    /// long ones to the form entries carry.
    pub(crate) fn tags(&self, params: &BTreeMap<String, Value>) -> Result<Vec<String>, String> {
        self.invalidates
            .iter()
            .map(|t| {
                t.render(params)
                    .map(|tag| escape_tag(&tag).into_owned())
                    .map_err(|e| format!("event {:?}: {e}", self.name))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn renders_tags_from_params() {
        let ev = EventDef {
            name: "availability_changed".into(),
            invalidates: vec![
                ParamTemplate::parse("availability_change").unwrap(),
                ParamTemplate::parse("vendor:{vendorId}").unwrap(),
            ],
            cdn: true,
            origin: "x".into(),
        };
        assert_eq!(
            ev.tags(&params(json!({"vendorId": "v-7"}))).unwrap(),
            vec!["availability_change", "vendor:v-7"]
        );
        assert_eq!(
            ev.tags(&params(json!({"vendorId": 7}))).unwrap()[1],
            "vendor:7"
        );
        assert!(ev
            .tags(&params(json!({})))
            .unwrap_err()
            .contains("\"vendorId\" is missing"));
        assert_eq!(
            ev.tags(&params(json!({"vendorId": "wedding planner"})))
                .unwrap()[1],
            "vendor:wedding%20planner",
            "a value with a space renders escaped, as a rule renders it from a request"
        );
        assert!(ev.tags(&params(json!({"vendorId": ""}))).is_err());
        assert!(ev.tags(&params(json!({"vendorId": {"x": 1}}))).is_err());
    }

    #[test]
    fn what_a_template_can_render() {
        let t = |s: &str| ParamTemplate::parse(s).unwrap();
        assert!(t("vendor_update").could_render("vendor_update"));
        assert!(!t("vendor_update").could_render("vendor_updates"));
        assert!(t("vendor:{id}").could_render("vendor:v1"));
        assert!(!t("vendor:{id}").could_render("vendor:"));
        assert!(t("{kind}_change").could_render("availability_change"));
        assert!(t("{a}{b}").could_render("xy"));
        assert!(!t("{a}{b}").could_render("x"));
    }

    #[test]
    fn bad_templates() {
        assert!(ParamTemplate::parse("a{b").is_err());
        assert!(ParamTemplate::parse("a}").is_err());
        assert!(ParamTemplate::parse("a{b-c}").is_err());
        assert!(ParamTemplate::parse("a b").is_err());
        assert!(ParamTemplate::parse("").is_err());
    }
}
