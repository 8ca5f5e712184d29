//! JSON request bodies as keys see them: the canonical form, and what cannot be keyed.
//!
//! [`canonical`] is RFC 8785 (JCS) with one change: integers are written exactly. JCS writes
//! every number as an IEEE double, so `9007199254740993` and `9007199254740992` (2^53 + 1 and
//! 2^53) would share a key while the origin, reading integers as integers, answers each its own
//! way. Everything else is JCS: keys sorted by UTF-16 code units, no whitespace, strings escaped
//! as JCS says, other numbers in their shortest round-trip form (`1.0` is `1`).
//!
//! [`check`] reads the raw bytes of a document serde_json has already accepted, for what the
//! parsed value hides:
//! - a key repeated in one object (`{"messages":[A],"messages":[B]}`, at any depth): the parsed
//!   value keeps the last, many origins the first, so one key would stand for two answers;
//! - an integer the parsed value cannot hold exactly (beyond 64 bits: serde_json makes it a
//!   double, so `18446744073709551616` and `18446744073709551617` would share a key).
//!
//! Either makes the body unkeyable (admission bypasses the cache for it). Numbers with a
//! fraction or an exponent are keyed by their double value, as JCS says: origins read them as
//! doubles (JavaScript, Python's `json`, Go), so two spellings of one double are one question.
//! A scan of the bytes was chosen over serde_json's `arbitrary_precision` feature: that feature
//! changes `Value` for every crate in the build (numbers become strings inside), and serde_jcs
//! would still write them as doubles.

use serde_json::{Number, Value};
use std::collections::HashSet;

/// Why a JSON body cannot be keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnkeyableBody {
    /// A key is repeated within one object.
    DuplicateKey,
    /// An integer beyond 64 bits, which the parsed value holds only as a double.
    LargeInteger,
}

/// The canonical text of a JSON value (JCS with exact integers).
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write(&mut out, v);
    out
}

/// The canonical text of a number: integers exactly, others as JCS writes a double.
pub fn canonical_number(n: &Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    serde_jcs::to_string(&f).unwrap_or_else(|_| n.to_string())
}

fn write(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&canonical_number(n)),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 §3.2.3: sorted by UTF-16 code units, not by UTF-8 bytes.
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                write(out, v);
            }
            out.push('}');
        }
    }
}

/// RFC 8785 §3.2.2.2 string escaping, which is serde_json's: `"` `\` and the control
/// characters (the short forms where JSON has them, else `\u00xx` in lowercase hex).
fn write_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Finds what makes a body unkeyable. `bytes` must be a document serde_json accepted (the
/// scan relies on it being well formed, and never panics on anything).
pub fn check(bytes: &[u8]) -> Result<(), UnkeyableBody> {
    enum Frame {
        Object {
            keys: HashSet<Box<str>>,
            expect_key: bool,
        },
        Array,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'{' => {
                stack.push(Frame::Object {
                    keys: HashSet::new(),
                    expect_key: true,
                });
                i += 1;
            }
            b'[' => {
                stack.push(Frame::Array);
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' | b':' => {
                if let Some(Frame::Object { expect_key, .. }) = stack.last_mut() {
                    *expect_key = b == b',';
                }
                i += 1;
            }
            b'"' => {
                let end = string_end(bytes, i);
                if let Some(Frame::Object {
                    keys,
                    expect_key: true,
                }) = stack.last_mut()
                {
                    if !keys.insert(decode_key(&bytes[i..end])) {
                        return Err(UnkeyableBody::DuplicateKey);
                    }
                }
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while bytes
                    .get(i)
                    .is_some_and(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    i += 1;
                }
                if !exact(&bytes[start..i]) {
                    return Err(UnkeyableBody::LargeInteger);
                }
            }
            // Whitespace and the letters of true, false, null.
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index just past the string starting with the quote at `start` (the end of the input if
/// it is not closed).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// A key as the parsed value has it (escapes decoded: `"a"` and `"\u0061"` are one key).
fn decode_key(quoted: &[u8]) -> Box<str> {
    if !quoted.contains(&b'\\') {
        let inner = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(&[]);
        return String::from_utf8_lossy(inner).into();
    }
    serde_json::from_slice::<String>(quoted)
        .map(String::into_boxed_str)
        // Not reachable for a document serde_json accepted; keep the raw text distinct.
        .unwrap_or_else(|_| String::from_utf8_lossy(quoted).into())
}

/// Whether the number written as `literal` is keyed as what it says: integers must fit 64 bits
/// (signed or not); numbers with a fraction or exponent are doubles by design.
fn exact(literal: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(literal) else {
        return false;
    };
    text.contains(['.', 'e', 'E']) || text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn canonical_is_jcs_with_exact_integers() {
        // Where JCS and this agree: everything but integers past 2^53.
        for doc in [
            r#"{"b": 1.0, "a": {"y": [1, 2.5, -0.0, 1e21, 1e-7, 123456789.125], "x": "s\u0001\n\"\\/é😀"}}"#,
            r#"{"\u20ac": 1, "\ud83d\ude00": 2, "a": null, "Z": true, "": false}"#,
            r#"[0.1, 100, -3, 9007199254740992, 4.35, 1.7976931348623157e308, 5e-324]"#,
            r#""\u007f\u001f\b\f\t\r""#,
        ] {
            let v = parse(doc);
            assert_eq!(canonical(&v), serde_jcs::to_string(&v).unwrap(), "{doc}");
        }
        assert_eq!(
            canonical(&parse(r#"{"b":1.0,"a":[1e2,0.50]}"#)),
            r#"{"a":[100,0.5],"b":1}"#
        );
        // Where JCS goes through a double and this does not.
        let a = parse("9007199254740993");
        let b = parse("9007199254740992");
        assert_eq!(
            serde_jcs::to_string(&a).unwrap(),
            serde_jcs::to_string(&b).unwrap()
        );
        assert_eq!(canonical(&a), "9007199254740993");
        assert_eq!(canonical(&b), "9007199254740992");
        assert_eq!(
            canonical(&parse("18446744073709551615")),
            "18446744073709551615"
        );
        assert_eq!(
            canonical(&parse("-9223372036854775808")),
            "-9223372036854775808"
        );
        // An integral double and the same integer are one value.
        assert_eq!(canonical(&parse("9007199254740992.0")), "9007199254740992");
        assert_eq!(canonical(&parse("5.0")), canonical(&parse("5")));
    }

    #[test]
    fn duplicate_keys_at_any_depth() {
        let dup = Err(UnkeyableBody::DuplicateKey);
        assert_eq!(check(br#"{"messages":["A"],"messages":["B"]}"#), dup);
        assert_eq!(check(br#"{"a":{"b":[{"c":1,"d":2,"c":3}]}}"#), dup);
        assert_eq!(check(br#"{"a":1,"\u0061":2}"#), dup, "escapes decoded");
        assert_eq!(check(br#"[{"a":1},{"a":2}]"#), Ok(()), "different objects");
        assert_eq!(check(br#"{"a":{"a":{"a":1}}}"#), Ok(()), "different depths");
        assert_eq!(
            check(br#"{"a":"a","b":["a","a"],"c":{"a":"b"}}"#),
            Ok(()),
            "values are not keys"
        );
        assert_eq!(check(br#"{"k\"":1,"k":2,"x\\":{"y":"}{,:"}}"#), Ok(()));
        assert_eq!(check(br#"{"k\"":1,"k\"":2}"#), dup);
    }

    #[test]
    fn integers_must_fit_64_bits() {
        let large = Err(UnkeyableBody::LargeInteger);
        for ok in [
            "0",
            "-0",
            "1",
            "-1",
            "9007199254740993",
            "18446744073709551615",
            "-9223372036854775808",
            "1.0",
            "1e2",
            "0.1000000000000000000001",
            "1e23",
            "99999999999999999999999.5",
        ] {
            assert_eq!(check(ok.as_bytes()), Ok(()), "{ok}");
            assert_eq!(
                check(format!("{{\"n\":[{ok}]}}").as_bytes()),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000000",
        ] {
            assert_eq!(check(bad.as_bytes()), large, "{bad}");
            assert_eq!(
                check(format!("{{\"a\":{{\"n\":{bad}}}}}").as_bytes()),
                large,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_scan_never_panics_on_fragments() {
        for junk in [
            "\"", "\"\\", "{\"a", "{\"a\":", "-", "[1e", "}}]]", "{\"\\u12",
        ] {
            let _ = check(junk.as_bytes());
        }
    }
}
