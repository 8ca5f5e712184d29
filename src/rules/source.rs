//! Request sources: `query.NAME`, `header.NAME`, `path.NAME`, `cookie.NAME` and `body./pointer`
//! (a field of the JSON body), and the tag templates built from them (`"vendor-type:{query.vendorType}"`).
//!
//! A source is parsed and checked once when rules load (a `path.` source must name a parameter of
//! the rule's pattern); extracting it from a request borrows from the request where it can.
//!
//! A keyed value must mean to the key what it means to the origin. [`Source::keyed`] therefore
//! refuses ([`Unkeyable`]) what an origin could read another way: a query parameter or cookie
//! given more than once (frameworks differ on whether the first, the last or all of them count)
//! and bytes that are not UTF-8 once decoded (`%FF` and `%FE` would both become U+FFFD). A header
//! is all of its field lines combined as RFC 9110 §5.3 says ([`combined`]); an empty header is
//! `Some("")`, never absent.

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

/// Why a request's value for a source cannot be keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unkeyable {
    /// The query parameter or cookie is given more than once.
    Repeated,
    /// The value is not UTF-8 once percent-decoded (or the header is not UTF-8).
    BadEncoding,
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

    /// The value of this source in a request for a tag template; `None` when the request does
    /// not carry it. Lenient where [`Source::keyed`] refuses: repeated values are joined as a
    /// comma list and bytes that are not UTF-8 become U+FFFD.
    pub fn extract<'a>(&self, req: &RequestView<'a>) -> Option<Cow<'a, str>> {
        self.read(req, false).unwrap_or(None)
    }

    /// The value of this source as a key component: `Ok(None)` when the request does not carry
    /// it, an error when the origin could read it differently from the key.
    pub fn keyed<'a>(&self, req: &RequestView<'a>) -> Result<Option<Cow<'a, str>>, Unkeyable> {
        self.read(req, true)
    }

    fn read<'a>(
        &self,
        req: &RequestView<'a>,
        strict: bool,
    ) -> Result<Option<Cow<'a, str>>, Unkeyable> {
        match self {
            Source::Query(name) => {
                let Some(query) = req.query else {
                    return Ok(None);
                };
                let mut found: Option<Cow<'a, str>> = None;
                for (k, v) in query_pairs(query) {
                    if decode_component(k, false)? != **name {
                        continue;
                    }
                    let v = decode_component(v, strict)?;
                    found = Some(match found {
                        None => v,
                        Some(_) if strict => return Err(Unkeyable::Repeated),
                        // For tags: repeated parameters join as a comma list.
                        Some(prev) => Cow::Owned(format!("{prev},{v}")),
                    });
                }
                Ok(found)
            }
            Source::Header(name) => match combined(req.headers, name) {
                None => Ok(None),
                Some(Cow::Borrowed(b)) => match std::str::from_utf8(b) {
                    Ok(s) => Ok(Some(Cow::Borrowed(s))),
                    Err(_) if strict => Err(Unkeyable::BadEncoding),
                    Err(_) => Ok(Some(String::from_utf8_lossy(b))),
                },
                Some(Cow::Owned(b)) => match String::from_utf8(b) {
                    Ok(s) => Ok(Some(Cow::Owned(s))),
                    Err(_) if strict => Err(Unkeyable::BadEncoding),
                    Err(e) => Ok(Some(Cow::Owned(
                        String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    ))),
                },
            },
            Source::Path(index, _) => {
                let Some(raw) = req.params.get(req.path, *index) else {
                    return Ok(None);
                };
                let decoded = percent_encoding::percent_decode_str(raw);
                if strict {
                    decoded
                        .decode_utf8()
                        .map(Some)
                        .map_err(|_| Unkeyable::BadEncoding)
                } else {
                    Ok(Some(decoded.decode_utf8_lossy()))
                }
            }
            Source::Cookie(name) => {
                let mut found: Option<&'a str> = None;
                for line in req.headers.get_all(http::header::COOKIE) {
                    let Ok(line) = std::str::from_utf8(line.as_bytes()) else {
                        if strict {
                            return Err(Unkeyable::BadEncoding);
                        }
                        continue;
                    };
                    for pair in line.split(';') {
                        if let Some((k, v)) = pair.trim().split_once('=') {
                            if k.trim_end() == &**name {
                                if found.is_some() {
                                    if strict {
                                        return Err(Unkeyable::Repeated);
                                    }
                                    // For tags: the first one, as most frameworks read it.
                                    continue;
                                }
                                found = Some(v.trim().trim_matches('"'));
                            }
                        }
                    }
                }
                Ok(found.map(Cow::Borrowed))
            }
            Source::Body(pointer) => {
                let Some(value) = req.body.and_then(|b| b.pointer(pointer)) else {
                    return Ok(None);
                };
                Ok(match value {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(Cow::Borrowed(s.as_str())),
                    serde_json::Value::Number(n) => Some(Cow::Owned(canonical_number(n))),
                    serde_json::Value::Bool(b) => {
                        Some(Cow::Borrowed(if *b { "true" } else { "false" }))
                    }
                    other => Some(Cow::Owned(canonical(other))),
                })
            }
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

/// All field lines of a header as one value, in order: joined with `, ` (RFC 9110 §5.3), or with
/// `; ` for `Cookie` (RFC 6265 §5.4, RFC 9113 §8.2.3). `None` when the header is absent; an empty
/// line stays an empty value. Borrows when there is one line.
pub fn combined<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
) -> Option<Cow<'a, [u8]>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let separator: &[u8] = if name == http::header::COOKIE {
        b"; "
    } else {
        b", "
    };
    let mut out = first.as_bytes().to_vec();
    for line in std::iter::once(second).chain(lines) {
        out.extend_from_slice(separator);
        out.extend_from_slice(line.as_bytes());
    }
    Some(Cow::Owned(out))
}

/// The `name=value` pairs of a query string, undecoded, as `application/x-www-form-urlencoded`
/// splits them (the WHATWG URL standard, and every common framework): on `&`, empty pairs
/// skipped, a pair without `=` has an empty value.
///
/// One byte loop finds both separators: every keyed query field reads the query (for the
/// keyability check and the key: once for a plain request, [`crate::admission::keyed_hash`],
/// else twice), and `str::split` and `split_once` cost a
/// searcher's setup each, which outweighed the few bytes of a typical query (issue 16: 1.2k
/// instructions of a hit through a rule with three query fields).
fn query_pairs(query: &str) -> QueryPairs<'_> {
    QueryPairs { rest: query }
}

struct QueryPairs<'a> {
    rest: &'a str,
}

impl<'a> Iterator for QueryPairs<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.rest.is_empty() {
            let bytes = self.rest.as_bytes();
            let mut eq = None;
            let mut end = bytes.len();
            for (i, &b) in bytes.iter().enumerate() {
                if b == b'&' {
                    end = i;
                    break;
                }
                if b == b'=' && eq.is_none() {
                    eq = Some(i);
                }
            }
            // `&` and `=` are ASCII: the cuts fall on character boundaries.
            let pair = &self.rest[..end];
            self.rest = self.rest.get(end + 1..).unwrap_or("");
            if pair.is_empty() {
                continue;
            }
            return Some(match eq {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, ""),
            });
        }
        None
    }
}

/// A query name or value decoded (`+` is a space, then percent-decoding). `strict`: bytes that
/// are not UTF-8 are an error rather than U+FFFD. A component with neither (nearly all) is
/// borrowed as it is, found in one pass over its bytes; any other is decoded into one buffer of
/// its own length (issue 16: replacing `+` first, then decoding into a growing buffer, was three
/// allocations of a realistic rule's hit).
fn decode_component(raw: &str, strict: bool) -> Result<Cow<'_, str>, Unkeyable> {
    if !raw.bytes().any(|b| b == b'+' || b == b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    // A literal `+` is a space; one an escape spells (`%2B`) is a plus, so the escapes are
    // decoded between the literal ones.
    let mut bytes = Vec::with_capacity(raw.len());
    for (i, part) in raw.split('+').enumerate() {
        if i > 0 {
            bytes.push(b' ');
        }
        bytes.extend(percent_encoding::percent_decode_str(part));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Cow::Owned(text)),
        Err(_) if strict => Err(Unkeyable::BadEncoding),
        Err(e) => Ok(Cow::Owned(
            String::from_utf8_lossy(e.as_bytes()).into_owned(),
        )),
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

    /// The byte scanner splits as `split('&')` and `split_once('=')` do (the reference it
    /// replaced), on queries built from the separators, escapes and multi-byte characters.
    #[test]
    fn query_pairs_split_as_the_reference_does() {
        fn reference(q: &str) -> Vec<(&str, &str)> {
            q.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                .collect()
        }
        let pieces = ["&", "=", "a", "bc", "%41", "+", "é", "&&", "==", ""];
        let mut checked = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    for d in pieces {
                        let q = format!("{a}{b}{c}{d}");
                        assert_eq!(query_pairs(&q).collect::<Vec<_>>(), reference(&q), "{q:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 10_000);
        assert_eq!(
            query_pairs("x=1&y&=z&&w=a=b").collect::<Vec<_>>(),
            [("x", "1"), ("y", ""), ("", "z"), ("w", "a=b")]
        );
    }

    #[test]
    fn components_decode_plus_and_escapes_only_when_present() {
        assert!(matches!(
            decode_component("plain", true),
            Ok(Cow::Borrowed("plain"))
        ));
        assert_eq!(decode_component("a+b", true).unwrap(), "a b");
        assert_eq!(decode_component("a%2Bb+c", true).unwrap(), "a+b c");
        assert_eq!(decode_component("%FF", true), Err(Unkeyable::BadEncoding));
        assert_eq!(decode_component("%FF", false).unwrap(), "\u{FFFD}");
        // The same text as replacing `+` and then decoding, on every component of up to five
        // characters from pluses, escapes (whole, cut short, not hex, not UTF-8) and text.
        let reference = |raw: &str, strict: bool| {
            let spaced = raw.replace('+', " ");
            let decoded = percent_encoding::percent_decode_str(&spaced);
            if strict {
                decoded.decode_utf8().map(Cow::into_owned).ok()
            } else {
                Some(decoded.decode_utf8_lossy().into_owned())
            }
        };
        let alphabet = ["a", "+", "%", "2", "B", "F", "z", "é", "%C3", "%A9"];
        let all = crate::rules::every_string(&alphabet, 5);
        assert_eq!(all.len(), 111_111);
        for raw in &all {
            for strict in [true, false] {
                let got = decode_component(raw, strict).ok().map(Cow::into_owned);
                assert_eq!(got, reference(raw, strict), "{raw:?} strict={strict}");
            }
        }
    }

    #[test]
    fn keyed_values_read_one_way_only() {
        let p = pattern();
        let path = "/api/weddings/w%FF/timeline";
        let params = p.matches(path).unwrap();
        let mut headers = HeaderMap::new();
        headers.append("accept-language", "en".parse().unwrap());
        headers.append("accept-language", "fr".parse().unwrap());
        headers.append("x-empty", "".parse().unwrap());
        headers.append("cookie", "".parse().unwrap());
        headers.append("cookie", "session=X; a=1; a=2".parse().unwrap());
        headers.append(
            "x-latin",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        let req = RequestView {
            path,
            query: Some("t=a&t=b&one=%41+b&bad=%FF&c%61t=x&flag"),
            headers: &headers,
            params: &params,
            body: None,
        };
        let keyed = |s: &str| {
            Source::parse(s, &p)
                .unwrap()
                .keyed(&req)
                .map(|v| v.map(Cow::into_owned))
        };
        let lenient = |s: &str| {
            Source::parse(s, &p)
                .unwrap()
                .extract(&req)
                .map(Cow::into_owned)
        };
        assert_eq!(keyed("query.t"), Err(Unkeyable::Repeated));
        assert_eq!(lenient("query.t").as_deref(), Some("a,b"), "tags join them");
        assert_eq!(keyed("query.one"), Ok(Some("A b".into())));
        assert_eq!(
            keyed("query.cat"),
            Ok(Some("x".into())),
            "names are decoded"
        );
        assert_eq!(keyed("query.flag"), Ok(Some("".into())));
        assert_eq!(keyed("query.bad"), Err(Unkeyable::BadEncoding));
        assert_eq!(lenient("query.bad").as_deref(), Some("\u{FFFD}"));
        assert_eq!(keyed("path.id"), Err(Unkeyable::BadEncoding));
        // Every field line, combined as RFC 9110 §5.3 says; empty is not absent.
        assert_eq!(keyed("header.accept-language"), Ok(Some("en, fr".into())));
        assert_eq!(keyed("header.x-empty"), Ok(Some("".into())));
        assert_eq!(keyed("header.x-missing"), Ok(None));
        assert_eq!(
            keyed("header.cookie"),
            Ok(Some("; session=X; a=1; a=2".into()))
        );
        assert_eq!(keyed("header.x-latin"), Err(Unkeyable::BadEncoding));
        // Cookies from every line; a repeated name is ambiguous.
        assert_eq!(keyed("cookie.session"), Ok(Some("X".into())));
        assert_eq!(keyed("cookie.a"), Err(Unkeyable::Repeated));
        assert_eq!(lenient("cookie.a").as_deref(), Some("1"));
        assert_eq!(keyed("cookie.none"), Ok(None));
    }

    #[test]
    fn combined_field_lines() {
        let mut h = HeaderMap::new();
        assert_eq!(combined(&h, &http::header::ACCEPT_LANGUAGE), None);
        h.append("accept-language", "".parse().unwrap());
        assert_eq!(
            combined(&h, &http::header::ACCEPT_LANGUAGE).as_deref(),
            Some(&b""[..])
        );
        h.append("accept-language", "de".parse().unwrap());
        assert_eq!(
            combined(&h, &http::header::ACCEPT_LANGUAGE).as_deref(),
            Some(&b", de"[..])
        );
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        assert_eq!(
            combined(&h, &http::header::COOKIE).as_deref(),
            Some(&b"a=1; b=2"[..])
        );
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
