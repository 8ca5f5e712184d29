//! Request sources: `query.NAME`, `header.NAME`, `path.NAME`, `cookie.NAME` and `body./pointer`
//! (a field of the JSON body), and the tag templates built from them (`"vendor-type:{query.vendorType}"`).
//!
//! A source is parsed and checked once when rules load (a `path.` source must name a parameter of
//! the rule's pattern); extracting it from a request borrows from the request where it can.

use super::path::{PathParams, PathPattern};
use super::template::{split, Piece};
use std::borrow::Cow;

/// The parts of a request that rules look at.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub params: &'a PathParams,
    /// The request body parsed as JSON, for rules that key on it.
    pub body: Option<&'a serde_json::Value>,
}

/// Where a vary value or tag placeholder comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Query(Box<str>),
    /// Header names are stored lowercased.
    Header(http::HeaderName),
    /// Index of the parameter in the rule's path pattern.
    Path(usize, Box<str>),
    Cookie(Box<str>),
    /// RFC 6901 JSON pointer into the JSON request body.
    Body(Box<str>),
}

impl Source {
    /// Parses `kind.NAME` against the rule's path pattern.
    pub fn parse(s: &str, pattern: &PathPattern) -> Result<Self, String> {
        let Some((kind, name)) = s.split_once('.') else {
            return Err(format!(
                "unknown source {s:?}; expected query.NAME, header.NAME, path.NAME, cookie.NAME or body./pointer"
            ));
        };
        if name.is_empty() {
            return Err(format!("source {s:?} has no name after the '.'"));
        }
        match kind {
            "query" => Ok(Source::Query(name.into())),
            "header" => http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map(Source::Header)
                .map_err(|_| format!("source {s:?}: {name:?} is not a valid header name")),
            "path" => match pattern.param_index(name) {
                Some(i) => Ok(Source::Path(i, name.into())),
                None => Err(format!(
                    "source {s:?}: the path pattern {:?} has no :{name} parameter",
                    pattern.as_str()
                )),
            },
            "cookie" => Ok(Source::Cookie(name.into())),
            "body" => {
                if !name.starts_with('/') {
                    return Err(format!(
                        "source {s:?}: a body source is a JSON pointer starting with '/', like body./query/type"
                    ));
                }
                Ok(Source::Body(name.into()))
            }
            other => Err(format!(
                "unknown source kind {other:?} in {s:?}; expected query, header, path, cookie or body"
            )),
        }
    }

    /// The value of this source in a request; `None` when the request does not carry it.
    pub fn extract<'a>(&self, req: &RequestView<'a>) -> Option<Cow<'a, str>> {
        match self {
            Source::Query(name) => {
                let query = req.query?;
                let mut found: Option<Cow<'a, str>> = None;
                for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                    if k == **name {
                        found = Some(match found {
                            // Repeated parameters join as a comma list (`sorted_list` can sort it).
                            Some(prev) => Cow::Owned(format!("{prev},{v}")),
                            None => borrow_if_same(query, v),
                        });
                    }
                }
                found
            }
            Source::Header(name) => {
                let mut values = req.headers.get_all(name).iter();
                let first = values.next()?;
                let mut out = Cow::Borrowed(first.to_str().ok()?);
                for v in values {
                    let v = v.to_str().ok()?;
                    out = Cow::Owned(format!("{out}, {v}"));
                }
                Some(out)
            }
            Source::Path(index, _) => {
                let raw = req.params.get(req.path, *index)?;
                Some(percent_encoding::percent_decode_str(raw).decode_utf8_lossy())
            }
            Source::Cookie(name) => {
                for header in req.headers.get_all(http::header::COOKIE) {
                    let Ok(header) = header.to_str() else {
                        continue;
                    };
                    for pair in header.split(';') {
                        if let Some((k, v)) = pair.trim().split_once('=') {
                            if k == &**name {
                                return Some(Cow::Borrowed(v.trim_matches('"')));
                            }
                        }
                    }
                }
                None
            }
            Source::Body(pointer) => match req.body?.pointer(pointer)? {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(Cow::Borrowed(s.as_str())),
                serde_json::Value::Number(n) => Some(Cow::Owned(canonical_number(n))),
                serde_json::Value::Bool(b) => {
                    Some(Cow::Borrowed(if *b { "true" } else { "false" }))
                }
                other => Some(Cow::Owned(canonical(other))),
            },
        }
    }

    /// The source as written in rules (`query.location`).
    pub fn label(&self) -> String {
        match self {
            Source::Query(n) => format!("query.{n}"),
            Source::Header(n) => format!("header.{n}"),
            Source::Path(_, n) => format!("path.{n}"),
            Source::Cookie(n) => format!("cookie.{n}"),
            Source::Body(p) => format!("body.{p}"),
        }
    }
}

/// RFC 8785 (JCS) canonical JSON: object keys sorted, no insignificant whitespace, numbers in
/// their shortest form (`1.0` and `1` are the same), integers exactly ([`super::json`]).
pub(crate) fn canonical(v: &serde_json::Value) -> String {
    super::json::canonical(v)
}

fn canonical_number(n: &serde_json::Number) -> String {
    super::json::canonical_number(n)
}

/// Removes the value at an RFC 6901 pointer, if present (for `body_key.ignore`).
pub(crate) fn remove_pointer(v: &mut serde_json::Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    let target = if parent.is_empty() {
        Some(v)
    } else {
        v.pointer_mut(parent)
    };
    match target {
        Some(serde_json::Value::Object(map)) => {
            map.remove(&last);
        }
        Some(serde_json::Value::Array(items)) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// Keeps a decoded query value borrowed when decoding changed nothing.
fn borrow_if_same<'a>(query: &'a str, v: Cow<'_, str>) -> Cow<'a, str> {
    match v {
        Cow::Borrowed(b) => {
            // `form_urlencoded` borrows from the input when nothing was decoded.
            let base = query.as_ptr() as usize;
            let at = b.as_ptr() as usize;
            if at >= base && at + b.len() <= base + query.len() {
                let start = at - base;
                Cow::Borrowed(&query[start..start + b.len()])
            } else {
                Cow::Owned(b.to_string())
            }
        }
        Cow::Owned(o) => Cow::Owned(o),
    }
}

/// A tag template such as `"wedding:{path.id}"`.
#[derive(Debug, Clone)]
pub struct Template {
    pieces: Vec<Piece<Source>>,
}

impl Template {
    pub fn parse(s: &str, pattern: &PathPattern) -> Result<Self, String> {
        Ok(Template {
            pieces: split(s, |hole| Source::parse(hole, pattern))?,
        })
    }

    /// Renders the template; `value` resolves each source (already normalized by the caller).
    pub fn render<'r>(&self, mut value: impl FnMut(&Source) -> Option<Cow<'r, str>>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Hole(src) => {
                    if let Some(v) = value(src) {
                        out.push_str(&v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn pattern() -> PathPattern {
        PathPattern::parse("/api/weddings/:id/timeline").unwrap()
    }

    #[test]
    fn parse_sources() {
        let p = pattern();
        assert_eq!(
            Source::parse("query.location", &p).unwrap(),
            Source::Query("location".into())
        );
        assert_eq!(
            Source::parse("path.id", &p).unwrap(),
            Source::Path(0, "id".into())
        );
        assert!(Source::parse("path.nope", &p)
            .unwrap_err()
            .contains("no :nope"));
        assert!(Source::parse("form.x", &p)
            .unwrap_err()
            .contains("unknown source kind"));
        assert!(Source::parse("location", &p)
            .unwrap_err()
            .contains("unknown source"));
        assert!(Source::parse("header.bad header", &p)
            .unwrap_err()
            .contains("header name"));
        assert_eq!(
            Source::parse("body./query/type", &p).unwrap(),
            Source::Body("/query/type".into())
        );
        assert!(Source::parse("body.query", &p)
            .unwrap_err()
            .contains("JSON pointer"));
    }

    #[test]
    fn extract_values() {
        let p = pattern();
        let path = "/api/weddings/w%2042/timeline";
        let params = p.matches(path).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "acme".parse().unwrap());
        headers.insert("cookie", "a=1; session=\"abc\"; b=2".parse().unwrap());
        let body = serde_json::json!({"query": {"type": "venue", "n": 1.0, "tags": ["b", "a"]}, "x": null});
        let req = RequestView {
            path,
            query: Some("location=New%20York&type=a&type=b&empty="),
            headers: &headers,
            params: &params,
            body: Some(&body),
        };
        let get = |s: &str| {
            Source::parse(s, &p)
                .unwrap()
                .extract(&req)
                .map(|c| c.into_owned())
        };
        assert_eq!(get("query.location").as_deref(), Some("New York"));
        assert_eq!(get("query.type").as_deref(), Some("a,b"));
        assert_eq!(get("query.empty").as_deref(), Some(""));
        assert_eq!(get("query.missing"), None);
        assert_eq!(get("header.X-Tenant").as_deref(), Some("acme"));
        assert_eq!(get("header.x-missing"), None);
        assert_eq!(get("path.id").as_deref(), Some("w 42"));
        assert_eq!(get("cookie.session").as_deref(), Some("abc"));
        assert_eq!(get("cookie.none"), None);
        assert_eq!(get("body./query/type").as_deref(), Some("venue"));
        assert_eq!(
            get("body./query/n").as_deref(),
            Some("1"),
            "numbers are canonical"
        );
        assert_eq!(get("body./query/tags").as_deref(), Some("[\"b\",\"a\"]"));
        assert_eq!(get("body./x"), None, "null is absent");
        assert_eq!(get("body./missing"), None);
    }

    #[test]
    fn canonical_forms_and_pointer_removal() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1.0, "a": {"y": [1, 2], "x": "s"}, "user": "u1"}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1,"user":"u2"}"#).unwrap();
        assert_ne!(canonical(&a), canonical(&b));
        let (mut a, mut b) = (a, b);
        remove_pointer(&mut a, "/user");
        remove_pointer(&mut b, "/user");
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        remove_pointer(&mut a, "/a/y/0");
        remove_pointer(&mut a, "/nothing/here");
        assert_eq!(canonical(&a), r#"{"a":{"x":"s","y":[2]},"b":1}"#);
    }

    #[test]
    fn templates() {
        let p = pattern();
        let t = Template::parse("wedding:{path.id}:{query.x}", &p).unwrap();
        let out = t.render(|s| match s {
            Source::Path(..) => Some(Cow::Borrowed("42")),
            _ => None,
        });
        assert_eq!(out, "wedding:42:");
        assert!(Template::parse("a{path.id", &p).is_err());
        assert!(Template::parse("a}b", &p).is_err());
        assert!(Template::parse("a {path.id}", &p).is_err());
        assert!(Template::parse("x:{path.zzz}", &p)
            .unwrap_err()
            .contains("no :zzz"));
    }
}
