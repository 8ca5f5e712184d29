//! Requests addressed to the gateway itself on the proxy listener: vendor webhooks
//! (`POST /_aisle/webhooks/{source}`) and Varnish-style `PURGE`.
//!
//! They are answered here, before rule matching, and never reach an upstream or the cache.
//! Every check happens before anything is invalidated, so a delivery with a bad signature,
//! malformed JSON or a missing parameter changes nothing.

use crate::api_error::{self, Code};
use crate::config::Config;
use crate::invalidation::webhook::{map_delivery, Rejection};
use crate::invalidation::{Cdn, EventCall, Invalidator, Request};
use crate::metrics::metrics;
use crate::redis::{Keyspace, Redis};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// Path prefix of webhook deliveries.
pub const WEBHOOK_PREFIX: &str = "/_aisle/webhooks/";
/// How long a delivery id is remembered to drop replays.
const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Writes a small JSON answer.
pub async fn respond_json(
    session: &mut Session,
    status: u16,
    body: String,
    cache_status: &str,
) -> Result<()> {
    respond_json_with(session, status, body, cache_status, &[]).await
}

/// [`respond_json`] with fields of the caller's own (`Allow` on a 405).
async fn respond_json_with(
    session: &mut Session,
    status: u16,
    body: String,
    cache_status: &str,
    fields: &[(http::HeaderName, &'static str)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + fields.len()))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header("cache-status", cache_status)?;
    if status == 401 {
        resp.insert_header(http::header::WWW_AUTHENTICATE, "Bearer")?;
    }
    for (name, value) in fields {
        resp.insert_header(name, *value)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// The error body ([`crate::api_error`]), with no single input at fault.
fn error_json(code: Code, message: impl std::fmt::Display) -> String {
    api_error::body(code, message, None)
}

/// `Authorization: Bearer <token>` compared in constant time; false when no token is configured.
pub fn bearer_ok(headers: &http::HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else { return false };
    let Some(given) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

/// Remembers webhook deliveries for the replay window (24 h), in Redis for the fleet when
/// configured, else locally. A delivery is remembered by its replay key
/// ([`crate::invalidation::webhook`]'s `replay_key`: the hex SHA-256 of what its signature
/// covers), so keys have a fixed size whatever a delivery carries.
///
/// In Redis (the `webhook:` keyspace): `{prefix}webhook:<source>:<replay key>`, expiring after
/// the replay window.
pub struct Replays {
    redis: Option<(Arc<Redis>, Keyspace)>,
    local: Mutex<HashMap<String, Instant>>,
}

impl Replays {
    /// Replay ids on the shared Redis connection, when Redis is configured. Fails (at start)
    /// if the `webhook:` keyspace overlaps another domain's.
    pub fn new(redis: Option<Arc<Redis>>) -> Result<Self, String> {
        let redis = match redis {
            Some(redis) => {
                let keys = redis.keyspace("webhook replays", "webhook:")?;
                Some((redis, keys))
            }
            None => None,
        };
        Ok(Replays {
            redis,
            local: Mutex::new(HashMap::new()),
        })
    }

    /// Claims `id`: true the first time, false for a replay.
    async fn claim(&self, id: &str) -> bool {
        if let Some((redis, keys)) = &self.redis {
            let cmd = redis::cmd("SET")
                .arg(keys.key(id))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(REPLAY_WINDOW.as_secs())
                .clone();
            if let Some(r) = redis.background::<Option<String>>("webhook", &cmd).await {
                return r.is_some();
            }
        }
        let mut local = self.local.lock();
        let now = Instant::now();
        if local.len() > 100_000 {
            local.retain(|_, at| now.duration_since(*at) < REPLAY_WINDOW);
        }
        match local.get(id) {
            Some(at) if now.duration_since(*at) < REPLAY_WINDOW => false,
            _ => {
                local.insert(id.to_string(), now);
                true
            }
        }
    }

    /// Forgets a claim whose delivery was refused, so the vendor's retry is processed.
    async fn release(&self, id: &str) {
        self.local.lock().remove(id);
        if let Some((redis, keys)) = &self.redis {
            let _: Option<i64> = redis
                .background("webhook", redis::cmd("DEL").arg(keys.key(id)))
                .await;
        }
    }
}

/// Counts a delivery in `aisle_webhooks_total`. The `source` label is a configured webhook name
/// or `unknown`, never the path a client sent: every label value is bounded by configuration.
fn count_webhook(source: Option<&str>, outcome: &'static str) {
    metrics()
        .webhooks
        .with_label_values(&[source.unwrap_or("unknown"), outcome])
        .inc()
}

/// Reads the request body, refusing more than `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Bytes>> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// Handles a webhook delivery; answers it in every case.
pub async fn webhook(
    session: &mut Session,
    config: &Config,
    invalidator: &Invalidator,
    replays: &Replays,
) -> Result<()> {
    let path = session.req_header().uri.path().to_string();
    let source = path
        .trim_start_matches(WEBHOOK_PREFIX)
        .trim_end_matches('/')
        .to_string();
    const CS: &str = "aisle; fwd=bypass; detail=webhook";
    let Some((name, hook)) = config.webhooks.get_key_value(&source) else {
        count_webhook(None, "unknown_source");
        return respond_json(
            session,
            404,
            error_json(
                Code::NotFound,
                format!(
                "no webhook source {source:?} is configured; deliveries go to /_aisle/webhooks/<name of a [webhooks.<name>] table>"
            ),
            ),
            CS,
        )
        .await;
    };
    let source = name.as_str();
    let count = |outcome: &'static str| count_webhook(Some(source), outcome);
    let peer = session
        .client_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // A refused delivery invalidates nothing, but is counted and audited (without its body).
    let refuse = |outcome: &'static str, reason: &'static str| {
        count(outcome);
        invalidator
            .audit
            .refused(&format!("webhook:{source}"), reason, &peer);
    };
    if session.req_header().method != http::Method::POST {
        refuse("error", "wrong-method");
        return respond_json_with(
            session,
            405,
            error_json(Code::MethodNotAllowed, "webhooks are delivered with POST"),
            CS,
            &[(http::header::ALLOW, "POST")],
        )
        .await;
    }
    let Some(body) = read_body(session, hook.max_body).await? else {
        refuse("too_large", "too-large");
        session.set_keepalive(None);
        return respond_json(
            session,
            413,
            error_json(
                Code::TooLarge,
                format!("the delivery is larger than {} bytes", hook.max_body),
            ),
            CS,
        )
        .await;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    if let Err(rejection) = hook
        .verifier
        .verify(&session.req_header().headers, &body, now)
    {
        tracing::warn!(source, "webhook refused: {rejection}");
        let (code, msg, reason) = match rejection {
            Rejection::StaleTimestamp { .. } => {
                (Code::StaleTimestamp, "stale timestamp", "stale-timestamp")
            }
            _ => (
                Code::BadSignature,
                "bad or missing signature",
                "bad-signature",
            ),
        };
        refuse("bad_signature", reason);
        return respond_json(session, 401, error_json(code, msg), CS).await;
    }
    let json = match serde_json::from_slice::<serde_json::Value>(&body) {
        // Every supported vendor sends an object; anything else maps to nothing and is refused
        // rather than accepted as a delivery that fired no event (found by the OpenAPI fuzzer).
        Ok(v) if !v.is_object() => {
            refuse("malformed", "malformed");
            return respond_json(
                session,
                400,
                error_json(Code::InvalidJson, "the delivery must be a JSON object"),
                CS,
            )
            .await;
        }
        Ok(v) => v,
        Err(e) => {
            refuse("malformed", "malformed");
            return respond_json(
                session,
                400,
                error_json(Code::InvalidJson, format!("the body is not JSON: {e}")),
                CS,
            )
            .await;
        }
    };
    let headers = &session.req_header().headers;
    let delivery = hook.verifier.delivery_id(headers, &json, &hook.id_pointer);
    // Replays are recognised by what the signature covers, never by an unsigned header.
    let claim = format!("{source}:{}", hook.verifier.replay_key(headers, &body));
    if !replays.claim(&claim).await {
        count("duplicate");
        return respond_json(
            session,
            202,
            serde_json::json!({"duplicate": true}).to_string(),
            CS,
        )
        .await;
    }
    let fired = match map_delivery(&hook.maps, &json) {
        Ok(f) => f,
        Err(e) => {
            replays.release(&claim).await;
            refuse("malformed", "unmapped");
            return respond_json(session, 400, error_json(Code::InvalidField, e), CS).await;
        }
    };
    let request = Request {
        tags: Vec::new(),
        urls: Vec::new(),
        prefixes: Vec::new(),
        events: fired
            .into_iter()
            .map(|(name, params)| EventCall { name, params })
            .collect(),
        soft: false,
        source: format!("webhook:{source}"),
        actor: delivery.unwrap_or_default(),
        cdn: Cdn::EventsOnly,
        force: false,
    };
    let fired_n = request.events.len();
    let plan = match invalidator.plan(request, &config.rules) {
        Ok(p) => p,
        Err(e) => {
            replays.release(&claim).await;
            refuse("malformed", "unmapped");
            return respond_json(session, 400, error_json(Code::InvalidField, e), CS).await;
        }
    };
    let summary = invalidator.execute(plan).await;
    count("accepted");
    let body = serde_json::json!({
        "id": summary.id, "fired": fired_n, "tags": summary.tags, "cdn": summary.cdn,
        "fleet": summary.fleet,
    });
    respond_json(session, 202, body.to_string(), CS).await
}

/// Handles `PURGE <url>` (every variant of the URI) or `PURGE` with `Surrogate-Key: t1 t2`
/// (tags), allowed from `[admin] purge_allow` networks or with the admin token.
pub async fn purge(
    session: &mut Session,
    config: &Config,
    invalidator: &Invalidator,
) -> Result<()> {
    const CS: &str = "aisle; fwd=bypass; detail=purge";
    let req = session.req_header();
    let from_allowed = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .is_some_and(|a| {
            config
                .admin
                .purge_allow
                .iter()
                .any(|net| net.contains(&a.ip()))
        });
    if !from_allowed && !bearer_ok(&req.headers, config.admin.token.as_deref()) {
        return respond_json(
            session,
            401,
            error_json(
                Code::Unauthorized,
                "PURGE needs the admin token or a client address in [admin] purge_allow",
            ),
            CS,
        )
        .await;
    }
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    let soft = header("fastly-soft-purge") == Some("1");
    let tags: Vec<String> = header("surrogate-key")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let urls = if tags.is_empty() {
        // The host and path as the entries were keyed: normalized (the proxy has already put
        // `Host` in normal form; checking again keeps this independent of that order).
        let authority = req.uri.authority().map(|a| a.as_str());
        let host = match crate::admission::host(&req.headers, authority) {
            Ok(host) => host,
            Err(bad) => {
                return respond_json(session, 400, error_json(Code::BadRequest, bad), CS).await
            }
        };
        vec![format!(
            "http://{host}{}",
            crate::key::normalize_path(req.uri.path())
        )]
    } else {
        Vec::new()
    };
    let request = Request {
        tags,
        urls,
        prefixes: Vec::new(),
        events: Vec::new(),
        soft,
        source: "purge-method".into(),
        actor: if from_allowed {
            "allowed-network".into()
        } else {
            "token".into()
        },
        cdn: Cdn::Always,
        force: false,
    };
    match invalidator.plan(request, &config.rules) {
        Ok(plan) => {
            let summary = invalidator.execute(plan).await;
            respond_json(
                session,
                200,
                serde_json::to_string(&summary).unwrap_or_default(),
                CS,
            )
            .await
        }
        Err(e) => {
            // The tags came from `Surrogate-Key`; a URL purge's only input is the request line.
            let field = e.field.starts_with("tags").then_some("Surrogate-Key");
            respond_json(
                session,
                400,
                api_error::body(Code::InvalidField, &e.message, field),
                CS,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 13: an unconfigured source is counted as `unknown`, never under the name a
    /// client put in the path.
    #[test]
    fn webhook_counts_are_labelled_with_configured_names_only() {
        let unknown = || {
            metrics()
                .webhooks
                .with_label_values(&["unknown", "unknown_source"])
                .get()
        };
        let before = unknown();
        count_webhook(None, "unknown_source");
        assert!(unknown() > before);
        let families = prometheus::gather();
        let webhooks = families
            .iter()
            .find(|f| f.name() == "aisle_webhooks_total")
            .expect("registered");
        for m in webhooks.get_metric() {
            for l in m.get_label() {
                assert!(
                    l.name() != "source" || l.value() == "unknown",
                    "unexpected source label {:?}",
                    l.value()
                );
            }
        }
    }
}
