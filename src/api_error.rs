//! The one error body of the gateway's own HTTP answers (the admin API, webhooks, `PURGE`):
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`.
//!
//! A leaf so that every listener that answers for itself builds errors the same way, and a
//! fixed set of codes ([`Code`]) so that clients (the CLI, scripts, the OpenAPI contract in
//! `docs/admin-api.yaml`) can branch on `code` while `message` stays free text for people.
//! Each code carries its HTTP status, so a code and its status cannot disagree. `field` names
//! the one input at fault (`tags[2]`, `events[0].params`, `until`) and is left out when no
//! single input is.

use serde_json::{json, Value};

/// What went wrong, from a fixed set (documented in `docs/admin-api.yaml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// A missing or wrong admin token, or no token configured (401).
    Unauthorized,
    /// A webhook delivery whose signature does not verify (401).
    BadSignature,
    /// A webhook delivery signed too long ago (401).
    StaleTimestamp,
    /// No such endpoint, or nothing of that name configured (404).
    NotFound,
    /// The endpoint exists but not for this method (405, with `Allow`).
    MethodNotAllowed,
    /// The body is not the JSON the endpoint takes (400).
    InvalidJson,
    /// The JSON is well formed but a value in it is refused (400).
    InvalidField,
    /// A query parameter or header is refused (400).
    BadRequest,
    /// The body is larger than the endpoint takes (413).
    TooLarge,
    /// A new configuration was refused; the running one stays (422).
    InvalidConfig,
    /// A dependency (Redis) did not answer, or the feature is not running (503).
    Unavailable,
    /// Too much of this is running already (429: 8 warm jobs per instance).
    Busy,
}

impl Code {
    /// The code as clients see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unauthorized => "unauthorized",
            Code::BadSignature => "bad_signature",
            Code::StaleTimestamp => "stale_timestamp",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::InvalidJson => "invalid_json",
            Code::InvalidField => "invalid_field",
            Code::BadRequest => "bad_request",
            Code::TooLarge => "too_large",
            Code::InvalidConfig => "invalid_config",
            Code::Unavailable => "unavailable",
            Code::Busy => "busy",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            Code::Unauthorized | Code::BadSignature | Code::StaleTimestamp => 401,
            Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::InvalidJson | Code::InvalidField | Code::BadRequest => 400,
            Code::TooLarge => 413,
            Code::InvalidConfig => 422,
            Code::Unavailable => 503,
            Code::Busy => 429,
        }
    }

    /// Every code, for tests and the spec's enum.
    pub const ALL: [Code; 12] = [
        Code::Unauthorized,
        Code::BadSignature,
        Code::StaleTimestamp,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::InvalidJson,
        Code::InvalidField,
        Code::BadRequest,
        Code::TooLarge,
        Code::InvalidConfig,
        Code::Unavailable,
        Code::Busy,
    ];
}

/// The error body as a JSON value (`field` left out when `None`).
pub fn value(code: Code, message: impl std::fmt::Display, field: Option<&str>) -> Value {
    let mut error = json!({ "code": code.as_str(), "message": message.to_string() });
    if let Some(field) = field {
        error["field"] = Value::from(field);
    }
    json!({ "error": error })
}

/// The error body as text.
pub fn body(code: Code, message: impl std::fmt::Display, field: Option<&str>) -> String {
    value(code, message, field).to_string()
}

/// Parses a JSON body into `T`; a refusal is the error body's parts: `invalid_json` with the
/// input at fault (`tags`, `events[0].name`, an unknown field's name) when there is one.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, (String, Option<String>)> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // Text that is not JSON at all names no field; `.` is the top level (an unknown or
        // missing field's name is then in the message).
        let field = if inner.is_syntax() || inner.is_eof() {
            None
        } else if path == "." || path.contains('?') {
            unknown_field(&inner)
        } else {
            Some(path)
        };
        // A field can only be named by a non-empty name (`{"": 1}` is refused without one).
        (inner.to_string(), field.filter(|f| !f.is_empty()))
    })?;
    // Trailing text after the value is refused, as `serde_json::from_slice` does.
    de.end().map_err(|e| (e.to_string(), None))?;
    Ok(parsed)
}

/// The field a `deny_unknown_fields` or missing-field error names at the top level.
fn unknown_field(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    ["unknown field `", "missing field `"]
        .iter()
        .find_map(|lead| {
            let rest = &text[text.find(lead)? + lead.len()..];
            Some(rest[..rest.find('`')?].to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_codes() {
        let v = value(
            Code::InvalidField,
            "a tag must not be empty",
            Some("tags[1]"),
        );
        assert_eq!(
            v,
            json!({"error": {"code": "invalid_field", "message": "a tag must not be empty", "field": "tags[1]"}})
        );
        let v = value(Code::NotFound, "no such endpoint", None);
        assert!(v["error"].get("field").is_none());
        let mut seen = std::collections::BTreeSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "{c:?} spelled twice");
            assert!((400..600).contains(&c.status()));
        }
    }

    #[test]
    fn field_from_serde_errors() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct B {
            name: String,
            #[serde(default)]
            tags: Vec<String>,
        }
        let field = |text: &str| parse_json::<B>(text.as_bytes()).unwrap_err().1;
        assert_eq!(field(r#"{"name": "a", "nme": 1}"#).as_deref(), Some("nme"));
        assert_eq!(field("{}").as_deref(), Some("name"));
        assert_eq!(
            field(r#"{"name": "a", "tags": "x"}"#).as_deref(),
            Some("tags")
        );
        assert_eq!(
            field(r#"{"name": "a", "tags": ["x", 1]}"#).as_deref(),
            Some("tags[1]")
        );
        assert_eq!(field("{"), None);
        assert_eq!(field(r#"{"": null}"#), None, "an empty name names nothing");
        assert_eq!(field(r#"{"name": "a", "tags": ["x""#), None);
        assert_eq!(field(r#"{"name": "a"} x"#), None);
        assert!(parse_json::<B>(br#"{"name": "a"}"#).is_ok());
    }
}
