//! Fuzz targets for byte formats: the canonical JSON a body key is built from, webhook signatures
//! (every scheme), the purge queue's log records, and the Redis entry record (plain and sealed,
//! with the meta's facts and the response header inside).

use super::{check, run};
use crate::admission;
use crate::config::webhook::{Scheme, Verifier};
use crate::purge::queue::local::{decode_log, encode_line, LogLine, LogState};
use crate::purge::queue::Item;
use crate::purge::{Batch, Kind};
use crate::rules::source::{canonical, remove_pointer};
use crate::storage::meta::{MetaFacts, Stamp};
use crate::storage::record::{DecodeError, Keys, Record};
use crate::storage::{EntryInfo, Names};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use pingora::http::ResponseHeader;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::Value;
use sha2::Sha256;
use std::time::Duration;

/// Any text, control characters, separators and all.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::string::string_regex(&format!("\\PC{{0,{max}}}")).unwrap(),
        1 => proptest::string::string_regex(&format!("(?s).{{0,{max}}}")).unwrap(),
        1 => vec(select(&["\n", "\r", "\"", "\\", "\u{2028}", "\u{0}", "é", "{", "}", ",", "~1", "/"][..]), 0..6)
            .prop_map(|v| v.concat()),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(
            &[
                0u64,
                1,
                9_007_199_254_740_992,
                9_007_199_254_740_993,
                u64::MAX
            ][..]
        )
        .prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        select(&[0.1, -0.0, 1e21, 1e-7, 5e-324, 1.7976931348623157e308][..])
            .prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        text(8).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((text(6), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

#[test]
fn json_canonical() {
    let strategy = (
        prop_oneof![
            3 => json().prop_map(Some),
            1 => vec(any::<u8>(), 0..64).prop_map(|b| admission::parse_body(&b).ok()),
            1 => "[\\[\\]{}\":,0-9.eE+-a-z ]{0,40}".prop_map(|s| admission::parse_body(s.as_bytes()).ok()),
        ],
        vec(text(6).prop_map(|p| format!("/{p}")), 0..3),
    );
    run("json_canonical", 4.0, strategy, |(value, pointers)| {
        let Some(value) = value else {
            return Ok(()); // not JSON: parse_body refused it, which is the property
        };
        let c = canonical(&value);
        check(!c.is_empty(), || {
            "an empty canonical form (distinct bodies would share a key)".into()
        })?;
        let back: Value = serde_json::from_str(&c)
            .map_err(|e| TestCaseError::fail(format!("canonical form is not JSON: {e}: {c}")))?;
        let again = canonical(&back);
        check(again == c, || format!("not a fixed point:\n{c}\n{again}"))?;
        // Spelling does not matter: the same document pretty-printed is one key.
        let pretty: Value = serde_json::from_str(&serde_json::to_string_pretty(&value).unwrap())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(canonical(&pretty) == c, || {
            "pretty-printing changed the canonical form".into()
        })?;
        let mut pruned = value.clone();
        for p in &pointers {
            let _ = pruned.pointer(p);
            remove_pointer(&mut pruned, p);
        }
        let _ = canonical(&pruned);
        Ok(())
    });
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

const NOW: i64 = 1_800_000_000;
const TOLERANCE: Duration = Duration::from_secs(300);
const SIG_HEADERS: &[&str] = &[
    "x-hub-signature-256",
    "stripe-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-signature",
    "x-github-delivery",
];

/// Values shaped like each scheme's, with random parts.
fn sig_value() -> impl Strategy<Value = Vec<u8>> {
    let hex = "[0-9a-fA-F]{0,66}";
    prop_oneof![
        hex.prop_map(|h| format!("sha256={h}").into_bytes()),
        hex.prop_map(String::into_bytes),
        ("-?[0-9]{0,20}", hex, hex)
            .prop_map(|(t, a, b)| format!("t={t},v1={a},v1={b},v0=x").into_bytes()),
        ("[A-Za-z0-9+/=]{0,50}", "[A-Za-z0-9+/=]{0,50}")
            .prop_map(|(a, b)| format!("v1,{a} v1,{b} v2,x").into_bytes()),
        "-?[0-9]{0,20}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..40),
    ]
}

fn scheme(i: usize) -> Scheme {
    match i {
        0 => Scheme::Github,
        1 => Scheme::Stripe,
        2 => Scheme::StandardWebhooks,
        _ => Scheme::parse("hmac-sha256", Some("X-Signature")).unwrap(),
    }
}

/// The headers a sender holding `key` would send, for `body` at time `ts`.
fn genuine(i: usize, key: &[u8], body: &[u8], ts: i64, id: &str) -> Vec<(&'static str, String)> {
    match i {
        0 => vec![(
            "x-hub-signature-256",
            format!("sha256={}", hex::encode(mac(key, &[body]))),
        )],
        1 => {
            let sig = hex::encode(mac(key, &[ts.to_string().as_bytes(), b".", body]));
            vec![("stripe-signature", format!("t={ts},v1={sig}"))]
        }
        2 => {
            let sig = mac(
                key,
                &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body],
            );
            let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
            vec![
                ("webhook-id", id.to_string()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", format!("v1,{b64}")),
            ]
        }
        _ => vec![("x-signature", hex::encode(mac(key, &[body])))],
    }
}

#[test]
fn webhook_settings() {
    let strategy = (
        prop_oneof![
            select(
                &[
                    "github",
                    "stripe",
                    "standard-webhooks",
                    "hmac-sha256",
                    "md5"
                ][..]
            )
            .prop_map(String::from),
            text(12),
        ],
        proptest::option::of(text(12)),
        text(24),
    );
    run(
        "webhook_settings",
        1.0,
        strategy,
        |(name, header, secret)| {
            // What `[webhooks.NAME]` says: any scheme name, header name and secret is accepted or
            // refused with a message, never a panic; a standard-webhooks secret must be base64.
            match Scheme::parse(&name, header.as_deref()) {
                Ok(scheme) => {
                    if let Ok(v) = Verifier::new(scheme.clone(), &secret, TOLERANCE) {
                        check(!v.key.is_empty(), || {
                            "an empty HMAC key was accepted".into()
                        })?;
                        check(
                            v.verify(&http::HeaderMap::new(), b"{}", NOW).is_err(),
                            || "a delivery without headers verified".into(),
                        )?;
                    }
                }
                Err(e) => check(!e.is_empty(), || "an empty error".into())?,
            }
            Ok(())
        },
    );
}

#[test]
fn webhook_signatures() {
    let strategy = (
        0usize..4,
        vec(any::<u8>(), 1..24),
        vec(any::<u8>(), 0..64),
        vec((select(SIG_HEADERS), sig_value()), 0..6),
        -1000i64..1000,
        "[a-z0-9_]{1,12}",
        (any::<Index>(), any::<u8>()),
    );
    run(
        "webhook_signatures",
        4.0,
        strategy,
        |(i, key, body, noise, skew, id, (at, flip))| {
            let secret = match i {
                2 => format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(&key)
                ),
                _ => String::from_utf8_lossy(&key).into_owned(),
            };
            let Ok(verifier) = Verifier::new(scheme(i), &secret, TOLERANCE) else {
                return Ok(());
            };
            // What the verifier keys its HMAC with (the secret's bytes, or the decoded whsec_).
            let hmac_key: Vec<u8> = match i {
                2 => key.clone(),
                _ => secret.as_bytes().to_vec(),
            };
            let mut forged = http::HeaderMap::new();
            for (name, value) in &noise {
                if let Ok(v) = http::HeaderValue::from_bytes(value) {
                    forged.append(*name, v);
                }
            }
            let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let _ = verifier.delivery_id(&forged, &body_json, "/id");
            check(verifier.verify(&forged, &body, NOW).is_err(), || {
                "random headers verified without the secret".into()
            })?;
            // The genuine signature verifies (within the tolerance), followed by any noise.
            let ts = NOW + skew;
            let mut real = http::HeaderMap::new();
            for (name, value) in genuine(i, &hmac_key, &body, ts, &id) {
                real.append(name, value.parse().unwrap());
            }
            for (name, value) in &noise {
                if let (false, Ok(v)) = (
                    real.contains_key(*name),
                    http::HeaderValue::from_bytes(value),
                ) {
                    real.append(*name, v);
                }
            }
            let timed = matches!(i, 1 | 2);
            let outcome = verifier.verify(&real, &body, NOW);
            if timed && skew.unsigned_abs() > TOLERANCE.as_secs() {
                check(outcome.is_err(), || {
                    format!("a timestamp {skew} s off verified")
                })?;
                return Ok(());
            }
            check(outcome.is_ok(), || {
                format!("a genuine delivery was refused: {outcome:?}")
            })?;
            // Any change to the body, or a signature made with another secret, fails.
            let mut tampered = body.clone();
            if tampered.is_empty() {
                tampered.push(flip);
            } else {
                let at = at.index(tampered.len());
                tampered[at] ^= flip.max(1);
            }
            check(verifier.verify(&real, &tampered, NOW).is_err(), || {
                "a tampered body verified".into()
            })?;
            // (Appending zero bytes would not do: HMAC pads its key with zeros.)
            let mut other_key = hmac_key.clone();
            let last = other_key.len() - 1;
            other_key[last] ^= flip.max(1);
            let mut wrong = http::HeaderMap::new();
            for (name, value) in genuine(i, &other_key, &body, ts, &id) {
                wrong.append(name, value.parse().unwrap());
            }
            check(verifier.verify(&wrong, &body, NOW).is_err(), || {
                "a signature made with another secret verified".into()
            })
        },
    );
}

fn item() -> impl Strategy<Value = Item> {
    (
        (text(12), text(8), text(8)),
        (
            select(&[Kind::Tags, Kind::Urls, Kind::Prefixes, Kind::Hosts][..]),
            vec(text(16), 0..4),
            any::<bool>(),
        ),
        (any::<u32>(), any::<u64>(), text(16), any::<u64>()),
    )
        .prop_map(
            |(
                (id, job, provider),
                (kind, items, soft),
                (attempts, not_before_ms, last_error, created_ms),
            )| Item {
                id,
                job,
                provider,
                batch: Batch { kind, items, soft },
                attempts,
                not_before_ms,
                last_error,
                created_ms,
            },
        )
}

fn log_line() -> impl Strategy<Value = LogLine> {
    prop_oneof![
        (item(), any::<bool>()).prop_map(|(item, dead)| LogLine::Put {
            state: if dead {
                LogState::Dead
            } else {
                LogState::Queued
            },
            item,
        }),
        text(12).prop_map(|id| LogLine::Done { id }),
    ]
}

#[test]
fn purge_queue_log() {
    let strategy = (
        vec(log_line(), 0..5),
        any::<Index>(),
        vec(any::<u8>(), 0..96),
        vec((any::<Index>(), any::<u8>()), 0..4),
    );
    run(
        "purge_queue_log",
        4.0,
        strategy,
        |(records, cut, garbage, flips)| {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for r in &records {
                encode_line(&mut bytes, r).map_err(|e| TestCaseError::fail(e.to_string()))?;
                ends.push(bytes.len());
            }
            // Round trip: every record back, in order, and the whole file counted.
            let (decoded, whole) = decode_log(&bytes);
            check(whole == bytes.len(), || {
                format!("whole {whole} of {}", bytes.len())
            })?;
            let back: Vec<&LogLine> = decoded.iter().filter_map(|r| r.as_ref().ok()).collect();
            check(
                back.len() == records.len() && back.iter().zip(&records).all(|(a, b)| *a == b),
                || format!("round trip lost records: {decoded:?}"),
            )?;
            // A torn tail (a crash mid-write) drops exactly the records not yet whole.
            let at = cut.index(bytes.len() + 1);
            let (torn, whole) = decode_log(&bytes[..at]);
            let kept = ends.iter().filter(|e| **e <= at).count();
            check(
                whole <= at && torn.len() == kept && torn.iter().all(|r| r.is_ok()),
                || format!("cut at {at}: {} records, {kept} expected", torn.len()),
            )?;
            // Random and damaged bytes never panic, and never claim more than they hold.
            let (_, whole) = decode_log(&garbage);
            check(whole <= garbage.len(), || "whole past the end".into())?;
            let mut damaged = bytes.clone();
            for (at, b) in flips {
                if !damaged.is_empty() {
                    let i = at.index(damaged.len());
                    damaged[i] ^= b;
                }
            }
            let (_, whole) = decode_log(&damaged);
            check(whole <= damaged.len(), || "whole past the end".into())
        },
    );
}

/// Facts of any values, and a header of 0 to 6 fields drawn from standard and custom names,
/// with visible-ASCII values (what a `HeaderValue` may hold), some sensitive.
fn facts_and_header() -> impl Strategy<Value = (MetaFacts, ResponseHeader)> {
    let names = select(vec![
        "content-type",
        "vary",
        "x-vendor",
        "etag",
        "set-cookie",
        "x-a-b",
    ]);
    (
        (
            any::<[i64; 3]>(),
            any::<(u32, u32)>(),
            any::<Option<[u8; 16]>>(),
        ),
        // A stored answer is final: an interim status (1xx) is refused when decoded.
        (200u16..1000, 0u8..5, option::of("[ -~]{0,12}")),
        vec((names, "[!-~][ -~]{0,20}", any::<bool>()), 0..6),
    )
        .prop_map(
            |((times, (swr, sie), variance), (status, v, reason), fields)| {
                let facts = MetaFacts {
                    fresh_until: Stamp::from_nanos(times[0]),
                    confirmed: Stamp::from_nanos(times[1]),
                    epoch: Stamp::from_nanos(times[2]),
                    swr,
                    sie,
                    variance,
                };
                let mut h = ResponseHeader::build(status, None).expect("a status in 200..1000");
                h.set_version(
                    [
                        http::Version::HTTP_09,
                        http::Version::HTTP_10,
                        http::Version::HTTP_11,
                        http::Version::HTTP_2,
                        http::Version::HTTP_3,
                    ][v as usize],
                );
                for (name, value, sensitive) in fields {
                    let mut value = http::HeaderValue::from_str(&value).expect("visible ASCII");
                    value.set_sensitive(sensitive);
                    h.append_header(name, value).expect("a valid field");
                }
                if let Some(r) = reason.filter(|r| !r.is_empty()) {
                    h.set_reason_phrase(Some(&r)).expect("visible ASCII");
                }
                (facts, h)
            },
        )
}

/// Whether what a decoded record would put on the wire as it is (the reason phrase; names and
/// values are `HeaderName`s and `HeaderValue`s, checked when made) has no line break or other
/// control character but the tab: a record from a shared Redis cannot split an answer.
fn writable(rec: &Record) -> Result<(), TestCaseError> {
    let reason = rec.header.get_reason_phrase().unwrap_or("");
    check(
        reason
            .bytes()
            .all(|c| c == b'\t' || (c >= 0x20 && c != 0x7f)),
        || format!("a decoded record's reason phrase {reason:?} has a control character"),
    )
}

fn record() -> impl Strategy<Value = Record> {
    (
        facts_and_header(),
        (any::<u64>(), text(24), text(8), vec(text(12), 0..4)),
        (any::<bool>(), any::<u64>(), vec(any::<u8>(), 0..64)),
    )
        .prop_map(
            |((meta, header), (uri, host_path, rule, tags), (encrypt, tokens, body))| Record {
                meta,
                header,
                info: EntryInfo {
                    uri,
                    names: Names::new(&host_path, &tags),
                    rule: crate::rules::StoredRule::decoded(&rule, encrypt),
                    tokens,
                },
                body: Bytes::from(body),
            },
        )
}

#[test]
fn redis_record() {
    let keys = Keys::new([7; 32], &[[9; 32]]);
    let other = Keys::new([8; 32], &[]);
    let strategy = (
        record(),
        "[a-z:0-9]{0,16}",
        vec((any::<Index>(), any::<u8>()), 1..4),
        any::<Index>(),
        vec(any::<u8>(), 0..128),
    );
    run(
        "redis_record",
        4.0,
        strategy,
        |(r, storage_key, flips, cut, garbage)| {
            let sk = storage_key.as_bytes();
            let raw = r.encode(sk, Some(&keys));
            let back = Record::decode(Bytes::from(raw.clone()), sk, Some(&keys))
                .map_err(|e| TestCaseError::fail(format!("round trip: {e:?}")))?;
            check(back == r, || "round trip changed the record".into())?;
            let _ = back.into_meta();
            if r.info.encrypt() {
                // Another storage key (a record moved), another instance's keys: never opens.
                if sk != b"moved" {
                    check(
                        Record::decode(Bytes::from(raw.clone()), b"moved", Some(&keys)).is_err(),
                        || "a moved sealed record opened".into(),
                    )?;
                }
                check(
                    Record::decode(Bytes::from(raw.clone()), sk, Some(&other))
                        == Err(DecodeError::UnknownKey),
                    || "opened with keys it was not sealed with".into(),
                )?;
                // Tampered: any change to the sealed bytes is refused. (One that turns the envelope
                // byte to "plain" is plain garbage: the key id is no record magic.)
                let mut tampered = raw.clone();
                for (at, b) in &flips {
                    let i = at.index(tampered.len());
                    tampered[i] ^= (*b).max(1);
                }
                if tampered != raw && tampered[0] == raw[0] {
                    let decoded = Record::decode(Bytes::from(tampered), sk, Some(&keys));
                    check(decoded.is_err(), || {
                        format!("a tampered sealed record decoded: {decoded:?}")
                    })?;
                }
                let at = cut.index(raw.len());
                check(
                    Record::decode(Bytes::copy_from_slice(&raw[..at]), sk, Some(&keys)).is_err(),
                    || "a truncated sealed record decoded".into(),
                )?;
            }
            // Random and mutated bytes never panic (nor does the meta inside).
            for bytes in [
                garbage.clone(),
                [&[0u8][..], &garbage].concat(),
                [&b"\x00AIS3"[..], &garbage].concat(),
                [&b"\x00AIS4"[..], &garbage].concat(),
            ] {
                if let Ok(rec) = Record::decode(Bytes::from(bytes), sk, Some(&keys)) {
                    writable(&rec)?;
                    let _ = rec.into_meta();
                }
            }
            let mut mutated = r.encode(sk, None);
            for (at, b) in &flips {
                let i = at.index(mutated.len());
                mutated[i] ^= b;
            }
            let at = cut.index(mutated.len() + 1);
            if let Ok(rec) = Record::decode(Bytes::copy_from_slice(&mutated[..at]), sk, None) {
                writable(&rec)?;
                let _ = rec.into_meta();
            }
            Ok(())
        },
    );
}
