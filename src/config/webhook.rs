//! `[webhooks.NAME]` compiled: how a vendor signs ([`Scheme`]), the key and clock tolerance that
//! check it ([`Verifier`]), and how a delivery maps to events ([`Mapping`]).
//!
//! Only the settings live here; what a delivery *does* (checking its signature, finding its id,
//! mapping its body to events) is `invalidation::webhook`, which adds those methods to
//! [`Verifier`]. The split keeps `config` free of imports from the layers above it while the
//! proxy keeps calling `hook.verifier.verify(..)`.

use super::env::expand_env;
use super::raw::RawWebhook;
use crate::diag::{Diagnostic, SourceFile};
use crate::units::{parse_duration, parse_size};
use base64::Engine;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

/// `[webhooks.NAME]`: one vendor's signed deliveries.
pub struct WebhookConfig {
    pub verifier: Verifier,
    pub maps: Vec<Mapping>,
    /// Larger deliveries are refused with 413.
    pub max_body: usize,
    /// JSON pointer to the delivery id when the scheme has no id header.
    pub id_pointer: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("scheme", &self.verifier.scheme)
            .field("maps", &self.maps)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// How a vendor signs its deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// `X-Hub-Signature-256: sha256=<hex HMAC(secret, body)>`; delivery id `X-GitHub-Delivery`.
    Github,
    /// `Stripe-Signature: t=<unix>,v1=<hex HMAC(secret, "t.body")>`; delivery id: body `/id`.
    Stripe,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC(key, "id.ts.body")>`
    /// with the secret given as `whsec_<base64 key>`.
    StandardWebhooks,
    /// `<header>: [sha256=]<hex HMAC(secret, body)>`.
    HmacSha256 { header: http::HeaderName },
}

impl Scheme {
    pub(crate) fn parse(name: &str, header: Option<&str>) -> Result<Self, String> {
        match (name, header) {
            ("github", _) => Ok(Scheme::Github),
            ("stripe", _) => Ok(Scheme::Stripe),
            ("standard-webhooks", _) => Ok(Scheme::StandardWebhooks),
            ("hmac-sha256", Some(h)) => http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map(|header| Scheme::HmacSha256 { header })
                .map_err(|_| format!("{h:?} is not a valid header name")),
            ("hmac-sha256", None) => Err("signature = \"hmac-sha256\" needs header = \"X-Signature\" (the header carrying the hex HMAC)".into()),
            (other, _) => Err(format!(
                "unknown signature scheme {other:?}; expected github, stripe, standard-webhooks or hmac-sha256"
            )),
        }
    }
}

/// Checks one source's signatures.
pub struct Verifier {
    pub scheme: Scheme,
    /// The HMAC key (the secret, or for Standard Webhooks its decoded `whsec_` part).
    pub(crate) key: Vec<u8>,
    pub tolerance: Duration,
}

impl Verifier {
    /// `secret` as configured (for Standard Webhooks, `whsec_<base64>`).
    pub(crate) fn new(scheme: Scheme, secret: &str, tolerance: Duration) -> Result<Self, String> {
        let key = match scheme {
            Scheme::StandardWebhooks => {
                let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| {
                        "a standard-webhooks secret is whsec_<base64>; this one is not base64"
                            .to_string()
                    })?
            }
            _ => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        Ok(Verifier {
            scheme,
            key,
            tolerance,
        })
    }
}

/// One `[[webhooks.NAME.map]]`: when `type` (a JSON pointer) equals `when`, fire `event` with
/// `params` read by JSON pointers.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub type_pointer: String,
    pub when: String,
    pub event: String,
    pub params: BTreeMap<String, String>,
}

pub(super) fn compile(
    src: &SourceFile<'_>,
    raw: &Spanned<RawWebhook>,
    diags: &mut Vec<Diagnostic>,
) -> Option<WebhookConfig> {
    let w = raw.get_ref();
    let before = diags.len();
    let signature = w.signature.get_ref();
    let header = w.header.as_ref();
    let scheme = Scheme::parse(signature, header.map(|h| h.get_ref().as_str()))
        .map_err(|e| {
            // A bad header name is the header's fault; anything else is the scheme's.
            let at = match header {
                Some(h) if signature == "hmac-sha256" => h.span(),
                _ => w.signature.span(),
            };
            diags.push(src.at(at, e))
        })
        .ok();
    let secret = expand_env(w.secret.get_ref())
        .map_err(|e| diags.push(src.at(w.secret.span(), e)))
        .ok();
    let tolerance = match &w.tolerance {
        None => Duration::from_secs(300),
        Some(t) => parse_duration(t.get_ref()).unwrap_or_else(|e| {
            diags.push(src.at(t.span(), e));
            Duration::from_secs(300)
        }),
    };
    let max_body = match &w.max_body {
        None => 1 << 20,
        Some(m) => parse_size(m.get_ref()).unwrap_or_else(|e| {
            diags.push(src.at(m.span(), e));
            1 << 20
        }) as usize,
    };
    let mut maps = Vec::new();
    for m in &w.map {
        let r = m.get_ref();
        let pointers = std::iter::once(&r.type_pointer).chain(r.fire.params.values());
        let mut ok = true;
        for p in pointers.filter(|p| !p.get_ref().is_empty() && !p.get_ref().starts_with('/')) {
            diags.push(src.at(
                p.span(),
                format!(
                    "{:?} is not a JSON pointer; write it like \"/data/vendor_id\"",
                    p.get_ref()
                ),
            ));
            ok = false;
        }
        if !ok {
            continue;
        }
        maps.push(Mapping {
            type_pointer: r.type_pointer.get_ref().clone(),
            when: r.when.clone(),
            event: r.fire.event.get_ref().clone(),
            params: r
                .fire
                .params
                .iter()
                .map(|(name, p)| (name.clone(), p.get_ref().clone()))
                .collect(),
        });
    }
    let verifier = match (scheme, secret) {
        (Some(scheme), Some(secret)) => Verifier::new(scheme, &secret, tolerance)
            .map_err(|e| diags.push(src.at(w.secret.span(), e)))
            .ok(),
        _ => None,
    };
    if diags.len() > before {
        return None;
    }
    Some(WebhookConfig {
        verifier: verifier?,
        maps,
        max_body,
        id_pointer: w.id.clone().unwrap_or_else(|| "/id".to_string()),
    })
}
