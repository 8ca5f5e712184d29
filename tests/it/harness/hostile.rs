//! An origin that behaves like common web frameworks, for the attack suite (issue 9): the
//! details an attacker uses to make one client's request change what others are served.
//!
//! - the first repeated query parameter wins (`?l=Paris&l=Boston` answers for Paris);
//! - the first repeated JSON key wins (`{"m":"A","m":"B"}` answers for A);
//! - repeated header lines are joined with `, ` (as RFC 9110 §5.3 combines them);
//! - `Host` (or `X-Forwarded-Host`, which frameworks prefer when present) is reflected in
//!   redirects and links; `X-Forwarded-Proto`, `Forwarded`, `X-Original-URL` and
//!   `X-Rewrite-URL` are reflected in the answer, as routing middleware would act on them.
//!
//! Every answer is `public, max-age=300` (cacheable by any rule or the default route), carries
//! `Vary: Accept-Language` under `/i18n/`, and says which request it answers (`n`).

use super::{Origin, OriginRequest, OriginResponse};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::{json, Map, Value};

/// All lines of a header, joined with `, ` (absent: `None`; an empty line stays `""`).
pub fn joined(req: &OriginRequest, name: &str) -> Option<String> {
    let lines: Vec<String> = req
        .headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!lines.is_empty()).then(|| lines.join(", "))
}

/// The first value of each query parameter.
pub fn first_params(query: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        out.entry(k.into_owned())
            .or_insert(Value::String(v.into_owned()));
    }
    out
}

/// A JSON document where, in every object, the first of repeated keys wins.
pub fn first_key_wins(body: &[u8]) -> Option<Value> {
    struct First;
    impl<'de> Visitor<'de> for First {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(k) = map.next_key::<String>()? {
                let v = map.next_value_seed(FirstSeed)?;
                out.entry(k).or_insert(v);
            }
            Ok(Value::Object(out))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element_seed(FirstSeed)? {
                out.push(v);
            }
            Ok(Value::Array(out))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(json!(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(json!(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(json!(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
    }
    struct FirstSeed;
    impl<'de> serde::de::DeserializeSeed<'de> for FirstSeed {
        type Value = Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(First)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_any(First).ok()
}

/// The framework-like origin.
pub fn framework_origin() -> Origin {
    Origin::start(|req| {
        let host = joined(&req, "x-forwarded-host")
            .or_else(|| joined(&req, "host"))
            .unwrap_or_default();
        let proto = joined(&req, "x-forwarded-proto").unwrap_or_else(|| "http".into());
        let routed = joined(&req, "x-original-url")
            .or_else(|| joined(&req, "x-rewrite-url"))
            .unwrap_or_else(|| req.path.clone());
        let mut resp = if req.path.ends_with("/home") {
            OriginResponse::with_status(301).header("location", &format!("{proto}://{host}/home"))
        } else {
            let answer = json!({
                "n": req.count,
                "method": req.method,
                "path": req.path,
                "routed": routed,
                "link": format!("{proto}://{host}/next"),
                "forwarded": joined(&req, "forwarded"),
                "x_forwarded_for": joined(&req, "x-forwarded-for"),
                "accept_language": joined(&req, "accept-language"),
                "cookie": joined(&req, "cookie"),
                "query": first_params(&req.query),
                "body": first_key_wins(&req.body),
                "aisle_headers": req.headers.keys().filter(|k| k.as_str().starts_with("aisle-")).map(|k| k.as_str().to_string()).collect::<Vec<_>>(),
            });
            OriginResponse::ok(answer.to_string()).header("content-type", "application/json")
        };
        resp = resp.header("cache-control", "public, max-age=300");
        if req.path.starts_with("/i18n/") {
            resp = resp.header("vary", "Accept-Language");
        }
        resp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_and_parameter_win() {
        let v = first_key_wins(br#"{"m":"A","m":"B","o":{"x":1,"x":2}}"#).unwrap();
        assert_eq!(v, json!({"m": "A", "o": {"x": 1}}));
        let q = first_params("l=Paris&l=Boston&x=1");
        assert_eq!(q["l"], "Paris");
    }
}
