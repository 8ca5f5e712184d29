//! Signed vendor webhooks: verifying a delivery and mapping it to events.
//!
//! Each `[webhooks.NAME]` names a signature scheme (GitHub, Stripe, Standard Webhooks, or a plain
//! HMAC-SHA256 header), a secret from the environment, and a list of mappings from the JSON body
//! (`type` pointer == `when`) to an event with parameters taken by JSON pointers. Verification is
//! over the raw body bytes, in constant time (`hmac`'s `verify_slice`), with the scheme's
//! timestamp tolerance. Nothing here has side effects: the proxy decides what to do with the
//! verdict, so a bad delivery can never invalidate anything.
//!
//! The settings these work on ([`Scheme`], [`Verifier`]'s key and tolerance, [`Mapping`]) are
//! compiled from `gateway.toml` in `config::webhook`; this module adds the behaviour (the
//! `Verifier` methods below), so configuration never imports from invalidation.

use crate::config::webhook::{Mapping, Scheme, Verifier};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::BTreeMap;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery was refused (all answered 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    MissingSignature(&'static str),
    Malformed(String),
    BadSignature,
    StaleTimestamp { age_secs: i64 },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::MissingSignature(h) => write!(f, "missing signature header {h}"),
            Rejection::Malformed(m) => write!(f, "malformed signature: {m}"),
            Rejection::BadSignature => write!(f, "signature does not match the body"),
            Rejection::StaleTimestamp { age_secs } => {
                write!(
                    f,
                    "timestamp is {age_secs} s away from now, outside the tolerance"
                )
            }
        }
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &'static str) -> Result<&'a str, Rejection> {
    headers
        .get(name)
        .ok_or(Rejection::MissingSignature(name))?
        .to_str()
        .map_err(|_| Rejection::Malformed(format!("{name} is not ASCII")))
}

impl Verifier {
    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    fn check_time(&self, ts: i64, now: i64) -> Result<(), Rejection> {
        // Saturating: `ts` is the sender's (`t=-9223372036854775808` overflowed).
        let age = now.saturating_sub(ts);
        if age.unsigned_abs() > self.tolerance.as_secs() {
            return Err(Rejection::StaleTimestamp { age_secs: age });
        }
        Ok(())
    }

    /// Verifies a delivery's signature over the raw `body`; `now` is unix seconds.
    pub(crate) fn verify(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), Rejection> {
        match &self.scheme {
            Scheme::Github => {
                let v = header(headers, "x-hub-signature-256")?;
                let hex_sig = v
                    .strip_prefix("sha256=")
                    .ok_or_else(|| Rejection::Malformed("expected sha256=<hex>".into()))?;
                let sig =
                    hex::decode(hex_sig).map_err(|_| Rejection::Malformed("not hex".into()))?;
                let mut mac = self.mac();
                mac.update(body);
                mac.verify_slice(&sig).map_err(|_| Rejection::BadSignature)
            }
            Scheme::HmacSha256 { header: name } => {
                let v = headers
                    .get(name)
                    .ok_or(Rejection::MissingSignature(
                        "the configured signature header",
                    ))?
                    .to_str()
                    .map_err(|_| Rejection::Malformed("not ASCII".into()))?;
                let hex_sig = v.strip_prefix("sha256=").unwrap_or(v);
                let sig = hex::decode(hex_sig.trim())
                    .map_err(|_| Rejection::Malformed("not hex".into()))?;
                let mut mac = self.mac();
                mac.update(body);
                mac.verify_slice(&sig).map_err(|_| Rejection::BadSignature)
            }
            Scheme::Stripe => {
                let v = header(headers, "stripe-signature")?;
                let mut ts = None;
                let mut sigs = Vec::new();
                for part in v.split(',') {
                    match part.trim().split_once('=') {
                        Some(("t", t)) => ts = t.parse::<i64>().ok(),
                        Some(("v1", s)) => sigs.push(s),
                        _ => {}
                    }
                }
                let ts = ts.ok_or_else(|| Rejection::Malformed("no t=<timestamp>".into()))?;
                if sigs.is_empty() {
                    return Err(Rejection::Malformed("no v1=<signature>".into()));
                }
                self.check_time(ts, now)?;
                let mut mac = self.mac();
                mac.update(ts.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                any_matches(mac, sigs.iter().filter_map(|s| hex::decode(s).ok()))
            }
            Scheme::StandardWebhooks => {
                let id = header(headers, "webhook-id")?;
                let ts_raw = header(headers, "webhook-timestamp")?;
                let sig_header = header(headers, "webhook-signature")?;
                let ts: i64 = ts_raw.trim().parse().map_err(|_| {
                    Rejection::Malformed("webhook-timestamp is not a number".into())
                })?;
                self.check_time(ts, now)?;
                let mut mac = self.mac();
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(ts_raw.trim().as_bytes());
                mac.update(b".");
                mac.update(body);
                let sigs = sig_header
                    .split_whitespace()
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
                any_matches(mac, sigs)
            }
        }
    }

    /// What a delivery is remembered by to drop replays: a digest of what its signature covers,
    /// so nothing an attacker can change without the secret makes a replay look new.
    ///
    /// - GitHub and `hmac-sha256` sign the body only: the digest of the body. Their delivery
    ///   headers (`X-GitHub-Delivery`) are not signed and play no part.
    /// - Stripe signs `"<t>.<body>"`: the digest of the body. The timestamp is left out because
    ///   Stripe's retries re-sign the same event with a new one; a replay within the tolerance
    ///   has the same body.
    /// - Standard Webhooks signs `"<id>.<ts>.<body>"`: the digest of the id and the body (the
    ///   id is the scheme's idempotency key; its retries keep it and re-sign with a new
    ///   timestamp).
    ///
    /// So a vendor that sends two byte-identical bodies within the replay window (24 h) has the
    /// second dropped: deliveries should carry an event id or a timestamp in the body, as the
    /// vendors' own payloads do. Call only after [`Verifier::verify`] accepted the delivery.
    pub(crate) fn replay_key(&self, headers: &http::HeaderMap, body: &[u8]) -> String {
        use sha2::Digest;
        let mut d = Sha256::new();
        match &self.scheme {
            Scheme::StandardWebhooks => {
                let id = headers.get("webhook-id").map_or(&b""[..], |v| v.as_bytes());
                d.update(b"standard-webhooks\0");
                d.update((id.len() as u64).to_be_bytes());
                d.update(id);
            }
            Scheme::Github | Scheme::HmacSha256 { .. } | Scheme::Stripe => d.update(b"body\0"),
        }
        d.update(body);
        hex::encode(d.finalize())
    }

    /// The delivery's id as the vendor names it, for the audit log (`actor`): not used to drop
    /// replays (see [`Verifier::replay_key`]), since some schemes do not sign it.
    pub(crate) fn delivery_id(
        &self,
        headers: &http::HeaderMap,
        body: &Value,
        id_pointer: &str,
    ) -> Option<String> {
        let from_header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match self.scheme {
            Scheme::Github => from_header("x-github-delivery"),
            Scheme::StandardWebhooks => from_header("webhook-id"),
            _ => None,
        }
        .or_else(|| match body.pointer(id_pointer)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    }
}

/// Constant-time comparison of the MAC against each candidate signature.
fn any_matches(
    mac: HmacSha256,
    candidates: impl Iterator<Item = Vec<u8>>,
) -> Result<(), Rejection> {
    let mut ok = false;
    for sig in candidates {
        ok |= mac.clone().verify_slice(&sig).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// An event to fire: its name and parameters.
pub(crate) type Fired = (String, BTreeMap<String, Value>);

/// The events a delivery fires. An error when a mapped delivery lacks a parameter (the delivery
/// is then refused whole).
pub(crate) fn map_delivery(maps: &[Mapping], body: &Value) -> Result<Vec<Fired>, String> {
    let mut fired = Vec::new();
    for m in maps {
        let matches = match body.pointer(&m.type_pointer) {
            Some(Value::String(s)) => *s == m.when,
            _ => false,
        };
        if !matches {
            continue;
        }
        let mut params = BTreeMap::new();
        for (name, pointer) in &m.params {
            let v = body.pointer(pointer).ok_or_else(|| {
                format!(
                    "the delivery has no {pointer} (parameter {name:?} of event {:?})",
                    m.event
                )
            })?;
            params.insert(name.clone(), v.clone());
        }
        fired.push((m.event.clone(), params));
    }
    Ok(fired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
        let mut m = HmacSha256::new_from_slice(key).unwrap();
        for p in parts {
            m.update(p);
        }
        hex::encode(m.finalize().into_bytes())
    }

    fn headers(pairs: &[(&str, String)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const BODY: &[u8] = br#"{"event":"availability_changed","data":{"vendor_id":"v9"}}"#;
    const NOW: i64 = 1_800_000_000;
    const TOL: Duration = Duration::from_secs(300);

    #[test]
    fn github() {
        let v = Verifier::new(Scheme::Github, "s3cret", TOL).unwrap();
        let good = format!("sha256={}", hmac_hex(b"s3cret", &[BODY]));
        assert_eq!(
            v.verify(
                &headers(&[("x-hub-signature-256", good.clone())]),
                BODY,
                NOW
            ),
            Ok(())
        );
        let tampered = br#"{"event":"availability_changed","data":{"vendor_id":"v0"}}"#;
        assert_eq!(
            v.verify(&headers(&[("x-hub-signature-256", good)]), tampered, NOW),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            v.verify(&headers(&[]), BODY, NOW),
            Err(Rejection::MissingSignature(_))
        ));
        assert!(matches!(
            v.verify(
                &headers(&[("x-hub-signature-256", "sha1=00".into())]),
                BODY,
                NOW
            ),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn stripe_with_tolerance() {
        let v = Verifier::new(Scheme::Stripe, "whsec_x", TOL).unwrap();
        let t = NOW - 10;
        let sig = hmac_hex(b"whsec_x", &[t.to_string().as_bytes(), b".", BODY]);
        let h = headers(&[("stripe-signature", format!("t={t},v1=deadbeef,v1={sig}"))]);
        assert_eq!(v.verify(&h, BODY, NOW), Ok(()), "any v1 may match");
        assert!(matches!(
            v.verify(&h, BODY, NOW + 600),
            Err(Rejection::StaleTimestamp { .. })
        ));
        let h = headers(&[("stripe-signature", format!("t={},v1={sig}", t + 1))]);
        assert_eq!(
            v.verify(&h, BODY, NOW),
            Err(Rejection::BadSignature),
            "the timestamp is signed"
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_stale_not_a_panic() {
        let v = Verifier::new(Scheme::Stripe, "whsec_x", TOL).unwrap();
        for t in [i64::MIN, i64::MAX] {
            let h = headers(&[("stripe-signature", format!("t={t},v1=00"))]);
            assert!(matches!(
                v.verify(&h, BODY, NOW),
                Err(Rejection::StaleTimestamp { .. })
            ));
        }
        assert!(v.check_time(i64::MAX, i64::MIN).is_err());
    }

    #[test]
    fn standard_webhooks() {
        let key = b"0123456789abcdef0123456789abcdef";
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        let v = Verifier::new(Scheme::StandardWebhooks, &secret, TOL).unwrap();
        let ts = NOW.to_string();
        let mut m = HmacSha256::new_from_slice(key).unwrap();
        m.update(b"msg_1.");
        m.update(ts.as_bytes());
        m.update(b".");
        m.update(BODY);
        let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", ts.clone()),
            ("webhook-signature", format!("v1,AAAA v1,{sig}")),
        ]);
        assert_eq!(v.verify(&h, BODY, NOW), Ok(()));
        assert_eq!(
            v.delivery_id(&h, &json!({}), "/id").as_deref(),
            Some("msg_1")
        );
        assert!(matches!(
            v.verify(&h, BODY, NOW - 301),
            Err(Rejection::StaleTimestamp { .. })
        ));
        let h2 = headers(&[
            ("webhook-id", "msg_2".into()),
            ("webhook-timestamp", ts),
            ("webhook-signature", format!("v1,{sig}")),
        ]);
        assert_eq!(
            v.verify(&h2, BODY, NOW),
            Err(Rejection::BadSignature),
            "the id is signed"
        );
        assert!(Verifier::new(Scheme::StandardWebhooks, "whsec_***", TOL).is_err());
    }

    #[test]
    fn plain_hmac_header() {
        let scheme = Scheme::parse("hmac-sha256", Some("X-Signature")).unwrap();
        let v = Verifier::new(scheme, "k", TOL).unwrap();
        let sig = hmac_hex(b"k", &[BODY]);
        assert_eq!(
            v.verify(&headers(&[("x-signature", sig.clone())]), BODY, NOW),
            Ok(())
        );
        assert_eq!(
            v.verify(
                &headers(&[("x-signature", format!("sha256={sig}"))]),
                BODY,
                NOW
            ),
            Ok(())
        );
        assert!(Scheme::parse("hmac-sha256", None).is_err());
        assert!(Scheme::parse("md5", None).is_err());
    }

    /// Issue 9 item 11: a replay is recognised by what is signed. A GitHub body replayed with
    /// a new (unsigned) `X-GitHub-Delivery` is the same delivery; a plain HMAC delivery without
    /// any id is recognised too; a Standard Webhooks id is part of the key because it is signed.
    #[test]
    fn replays_are_keyed_on_the_signed_content() {
        let gh = Verifier::new(Scheme::Github, "s3cret", TOL).unwrap();
        let sig = format!("sha256={}", hmac_hex(b"s3cret", &[BODY]));
        let first = headers(&[
            ("x-hub-signature-256", sig.clone()),
            ("x-github-delivery", "d-1".into()),
        ]);
        let replay = headers(&[
            ("x-hub-signature-256", sig),
            ("x-github-delivery", "d-2".into()),
        ]);
        assert_eq!(gh.verify(&replay, BODY, NOW), Ok(()), "the replay verifies");
        assert_eq!(gh.replay_key(&first, BODY), gh.replay_key(&replay, BODY));
        let other = br#"{"event":"availability_changed","data":{"vendor_id":"v8"}}"#;
        assert_ne!(gh.replay_key(&first, BODY), gh.replay_key(&first, other));
        assert_eq!(gh.replay_key(&first, BODY).len(), 64, "a fixed-size key");

        let plain = Verifier::new(
            Scheme::parse("hmac-sha256", Some("X-Sig")).unwrap(),
            "k",
            TOL,
        )
        .unwrap();
        let none = headers(&[]);
        assert_eq!(plain.replay_key(&none, BODY), plain.replay_key(&none, BODY));

        let stripe = Verifier::new(Scheme::Stripe, "whsec_x", TOL).unwrap();
        let at = |t: i64| {
            let sig = hmac_hex(b"whsec_x", &[t.to_string().as_bytes(), b".", BODY]);
            headers(&[("stripe-signature", format!("t={t},v1={sig}"))])
        };
        assert_eq!(
            stripe.replay_key(&at(NOW), BODY),
            stripe.replay_key(&at(NOW - 30), BODY),
            "a re-signed retry of the same event is the same delivery"
        );

        let sw = Verifier::new(
            Scheme::StandardWebhooks,
            &format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(b"key")
            ),
            TOL,
        )
        .unwrap();
        let with_id = |id: &str| headers(&[("webhook-id", id.to_string())]);
        assert_eq!(
            sw.replay_key(&with_id("msg_1"), BODY),
            sw.replay_key(&with_id("msg_1"), BODY)
        );
        assert_ne!(
            sw.replay_key(&with_id("msg_1"), BODY),
            sw.replay_key(&with_id("msg_2"), BODY),
            "a signed id tells two messages apart"
        );
    }

    #[test]
    fn mapping() {
        let maps = vec![Mapping {
            type_pointer: "/event".into(),
            when: "availability_changed".into(),
            event: "availability_changed".into(),
            params: BTreeMap::from([("vendorId".to_string(), "/data/vendor_id".to_string())]),
        }];
        let body: Value = serde_json::from_slice(BODY).unwrap();
        let fired = map_delivery(&maps, &body).unwrap();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].1["vendorId"], json!("v9"));
        assert!(map_delivery(&maps, &json!({"event": "other"}))
            .unwrap()
            .is_empty());
        assert!(map_delivery(&maps, &json!({"event": "availability_changed"})).is_err());
    }
}
