//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the authenticated `/admin/*` API
//! (invalidate, purge queue, audit log, live event stream, reload, warm jobs).
//!
//! Kept apart from the proxy listener so operational endpoints are never reachable through the
//! public port and never touch the cache. It is a small `HttpServerApp` rather than a `ServeHttp`
//! because `/admin/events` streams (server-sent events) for as long as the client listens.
//! Every `/admin/*` route needs `Authorization: Bearer <[admin] token>`, compared in constant time.

use crate::api_error::{self, Code};
use crate::control::bearer_ok;
use crate::invalidation::{Cdn, EventCall, Invalidator, Request};
use crate::reload::Reloader;
use crate::storage::redis::RedisTier;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Largest `/admin/invalidate` body accepted.
const MAX_BODY: usize = 1 << 20;
/// How often an idle event stream sends a comment, so proxies keep it open.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Serves the admin endpoints.
pub struct Admin {
    /// The shared tier, for `/readyz`.
    pub redis: Option<Arc<RedisTier>>,
    /// The configuration in force (read per request: a reload changes it) and `/admin/reload`.
    pub reloader: Arc<Reloader>,
    pub invalidator: Arc<Invalidator>,
    /// Warm jobs (`/admin/warm`, `/admin/jobs`).
    pub warmer: Option<Arc<crate::warm::Warmer>>,
}

/// An answer with a complete body.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// `Allow`, on a 405.
    allow: Option<&'static str>,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: format!("{body}\n").into_bytes(),
        allow: None,
    }
}

/// An error answer: the status goes with the code ([`api_error`]).
fn error(code: Code, message: impl std::fmt::Display) -> Reply {
    reply(code.status(), api_error::value(code, message, None))
}

/// An error answer naming the input at fault.
fn error_at(code: Code, message: impl std::fmt::Display, field: &str) -> Reply {
    reply(code.status(), api_error::value(code, message, Some(field)))
}

/// 405 with the methods the path takes.
fn wrong_method(allow: &'static str) -> Reply {
    Reply {
        allow: Some(allow),
        ..error(Code::MethodNotAllowed, format!("use {allow}"))
    }
}

/// The methods each admin path takes (the rest answer 405 with `Allow`).
fn admin_methods(path: &str) -> Option<&'static str> {
    Some(match path {
        "/admin/invalidate" | "/admin/purges/retry" | "/admin/reload" | "/admin/warm" => "POST",
        "/admin/purges" | "/admin/stats" | "/admin/audit" | "/admin/events" | "/admin/jobs" => {
            "GET"
        }
        p if p.starts_with("/admin/jobs/") => "GET",
        "/admin/protection" => "GET, POST",
        _ => return None,
    })
}

/// A JSON body parsed, or a 400 naming the input at fault.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], what: &str, hint: &str) -> Result<T, Reply> {
    api_error::parse_json(body).map_err(|(message, field)| {
        let message = format!("bad {what}: {message}{hint}");
        match field {
            Some(f) => error_at(Code::InvalidJson, message, &f),
            None => error(Code::InvalidJson, message),
        }
    })
}

/// The 401 of `/admin/*`: a wrong token, or none configured (then the API is disabled).
fn unauthorized(token: Option<&str>) -> Reply {
    match token {
        Some(_) => error(
            Code::Unauthorized,
            "missing or wrong admin token (Authorization: Bearer <[admin] token>)",
        ),
        None => error(
            Code::Unauthorized,
            "the admin API is disabled: the configuration has no [admin] token (the shipped gateway.toml reads AISLE_ADMIN_TOKEN; set it, at least 16 characters, and restart)",
        ),
    }
}

/// `POST /admin/invalidate` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(default)]
    events: Vec<EventBody>,
    #[serde(default)]
    soft: bool,
    /// Past protection windows (legal or privacy removal); audited as forced.
    #[serde(default)]
    force: bool,
}

/// `POST /admin/protection`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectBody {
    name: String,
    on: bool,
    #[serde(default, deserialize_with = "present")]
    until: Option<String>,
    #[serde(default, rename = "for", deserialize_with = "present")]
    r#for: Option<String>,
}

/// An optional string that, when given, is a string (`null` is refused, as the spec says).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    name: String,
    #[serde(default)]
    params: BTreeMap<String, Value>,
}

/// `since=` as unix milliseconds or an RFC 3339 time.
fn parse_since(query: Option<&str>) -> Result<u64, String> {
    let Some(v) = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "since")
            .map(|(_, v)| v.into_owned())
    }) else {
        return Ok(0);
    };
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(&v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|_| format!("since={v:?}: give unix milliseconds or an RFC 3339 time"))
}

async fn read_body(session: &mut ServerSession) -> Result<Bytes, Reply> {
    let too_large = || {
        error(
            Code::TooLarge,
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        session.set_keepalive(None);
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    session.set_keepalive(None);
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(error(
                    Code::BadRequest,
                    format!("cannot read the body: {e}"),
                ))
            }
        }
    }
}

impl Admin {
    /// `/readyz`: always 200 (the gateway serves without Redis); the body says how Redis is.
    fn readiness(&self) -> Value {
        let mut body = self.redis_readiness();
        if let Some(region) = self.invalidator.region() {
            body["region"] = region.readiness();
        }
        body
    }

    fn redis_readiness(&self) -> Value {
        match &self.redis {
            None => json!({"ready": true, "redis": "disabled"}),
            Some(r) => {
                let state = if r.circuit_open() {
                    "down"
                } else if r.connected() {
                    "up"
                } else {
                    "connecting"
                };
                json!({
                    "ready": true,
                    "redis": state,
                    "circuit": if r.circuit_open() { "open" } else { "closed" },
                    "subscribed": r.subscribed.load(Ordering::Acquire),
                })
            }
        }
    }

    /// Per rule: requests, hit ratio, origin requests saved, cost and tokens saved, bytes stored.
    fn stats(&self) -> Value {
        use crate::metrics::{metrics, CacheOutcome};
        let bytes = self.invalidator.storage.memory.bytes_by_rule();
        let m = metrics();
        let config = self.reloader.config();
        let rules = config
            .rules
            .rules()
            .iter()
            .chain(config.rules.default_route())
            .map(|rule| {
                let counts = rule.metrics.counts();
                let get = |o: CacheOutcome| counts.iter().find(|(x, _)| *x == o).map_or(0, |(_, n)| *n);
                let requests: u64 = counts.iter().map(|(_, n)| n).sum();
                let hits = get(CacheOutcome::Hit) + get(CacheOutcome::Stale);
                let cacheable = requests - get(CacheOutcome::Bypass);
                let name = &*rule.name;
                (
                    name.to_string(),
                    json!({
                        "requests": requests,
                        "hits": hits,
                        "misses": get(CacheOutcome::Miss) + get(CacheOutcome::Expired) + get(CacheOutcome::Revalidated),
                        "bypass": get(CacheOutcome::Bypass),
                        "hit_ratio": if cacheable == 0 { 0.0 } else { hits as f64 / cacheable as f64 },
                        "origin_requests_saved": hits,
                        "cost_saved": m.cost_saved.with_label_values(&[name]).get(),
                        "tokens_saved": m.tokens_saved.with_label_values(&[name]).get(),
                        "bytes_stored": bytes.get(name).copied().unwrap_or(0),
                    }),
                )
            })
            .collect::<serde_json::Map<String, Value>>();
        json!({ "rules": rules })
    }

    async fn invalidate(&self, session: &mut ServerSession) -> Reply {
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let parsed: InvalidateBody = match parse(&body, "invalidation request", "") {
            Ok(p) => p,
            Err(r) => return r,
        };
        let request = Request {
            tags: parsed.tags,
            urls: parsed.urls,
            prefixes: parsed.prefixes,
            events: parsed
                .events
                .into_iter()
                .map(|e| EventCall {
                    name: e.name,
                    params: e.params,
                })
                .collect(),
            soft: parsed.soft,
            source: "admin".into(),
            actor: "admin-token".into(),
            cdn: Cdn::Always,
            force: parsed.force,
        };
        match self
            .invalidator
            .plan(request, &self.reloader.config().rules)
        {
            Ok(plan) => {
                let summary = self.invalidator.execute(plan).await;
                reply(202, serde_json::to_value(summary).unwrap_or_default())
            }
            Err(e) => error_at(Code::InvalidField, &e.message, &e.field),
        }
    }

    /// `POST /admin/protection {"name": "...", "on": true, "until": "RFC 3339" | "for": "2h"}`:
    /// switches a protection window by hand, for the fleet.
    async fn protect(&self, session: &mut ServerSession) -> Reply {
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let parsed: ProtectBody = match parse(
            &body,
            "protection switch",
            "; send {\"name\": \"...\", \"on\": true} (optional \"until\" or \"for\")",
        ) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let until_ms = match (&parsed.until, &parsed.r#for) {
            (Some(_), Some(_)) => {
                return error_at(
                    Code::InvalidField,
                    "give \"until\" or \"for\", not both",
                    "for",
                )
            }
            (Some(t), None) => match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(t) => Some(t.timestamp_millis().max(0) as u64),
                Err(e) => {
                    return error_at(
                        Code::InvalidField,
                        format!("\"until\": {t:?} is not RFC 3339 ({e})"),
                        "until",
                    )
                }
            },
            (None, Some(d)) => match crate::units::parse_duration(d) {
                Ok(d) => Some(crate::clock::calendar_now_ms().saturating_add(d.as_millis() as u64)),
                Err(e) => return error_at(Code::InvalidField, format!("\"for\": {e}"), "for"),
            },
            (None, None) => None,
        };
        let Some(protection) = self.invalidator.protection() else {
            return error_at(
                Code::NotFound,
                "no protection windows: add [[protection]] to gateway.toml",
                "name",
            );
        };
        match protection
            .switch(&parsed.name, parsed.on, until_ms, "admin-token")
            .await
        {
            Ok(switch) => {
                self.invalidator
                    .audit
                    .record(crate::invalidation::audit::AuditEntry {
                        id: format!("protect-{:x}", switch.at_ms),
                        at_ms: switch.at_ms,
                        source: "protection".into(),
                        actor: "admin-token".into(),
                        cdn: "none".into(),
                        protection: Some(
                            json!({"switch": parsed.name, "on": parsed.on, "until_ms": until_ms}),
                        ),
                        ..Default::default()
                    });
                reply(
                    200,
                    json!({"name": parsed.name, "switch": switch, "status": protection.status()}),
                )
            }
            Err(e) if e.starts_with("no protection window") => error_at(Code::NotFound, e, "name"),
            Err(e) => error(Code::Unavailable, e),
        }
    }

    /// `POST /admin/warm`: starts a warm job (see `crate::warm`); `202 {"id": ...}`, with
    /// `"regions"`: the job's id per region.
    async fn warm(&self, session: &mut ServerSession) -> Reply {
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(warmer) = &self.warmer else {
            return error(Code::Unavailable, "warm jobs are not running");
        };
        let spec = match crate::config::warm::parse(&body) {
            Ok(s) => s,
            Err(e) => return error(Code::InvalidField, e),
        };
        match warmer.submit(spec, None).await {
            Ok(answer) => reply(202, answer),
            Err(e) if e.busy => error(Code::Busy, e.message),
            Err(e) => match e.field {
                Some(field) => error_at(Code::InvalidField, e.message, &field),
                None => error(Code::InvalidField, e.message),
            },
        }
    }

    async fn route(&self, session: &mut ServerSession) -> Reply {
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: crate::metrics::render().into_bytes(),
                allow: None,
            },
            ("GET", "/healthz") => Reply {
                status: 200,
                content_type: "text/plain",
                body: b"ok\n".to_vec(),
                allow: None,
            },
            ("GET", "/readyz") => reply(200, self.readiness()),
            (_, "/metrics" | "/healthz" | "/readyz") => wrong_method("GET"),
            (_, p) if p.starts_with("/admin/") => {
                let token = self.reloader.config().admin.token.clone();
                if !bearer_ok(&req.headers, token.as_deref()) {
                    return unauthorized(token.as_deref());
                }
                match (method.as_str(), p) {
                    ("POST", "/admin/invalidate") => self.invalidate(session).await,
                    ("GET", "/admin/purges") => match &self.invalidator.queue {
                        Some(q) => reply(
                            200,
                            serde_json::to_value(q.status().await).unwrap_or_default(),
                        ),
                        None => reply(
                            200,
                            json!({"configured": false, "depth": 0, "in_flight": 0, "dead_letters": 0}),
                        ),
                    },
                    ("POST", "/admin/purges/retry") => match &self.invalidator.queue {
                        Some(q) => reply(200, json!({"retried": q.retry_dead_letters().await})),
                        None => reply(200, json!({"retried": 0, "configured": false})),
                    },
                    ("GET", "/admin/stats") => reply(200, self.stats()),
                    ("GET", "/admin/protection") => match self.invalidator.protection() {
                        Some(p) => reply(200, p.status()),
                        None => reply(200, json!({"windows": []})),
                    },
                    ("POST", "/admin/protection") => self.protect(session).await,
                    ("POST", "/admin/reload") => match self.reloader.reload("admin").await {
                        Ok(changes) => reply(200, json!({ "reloaded": true, "changes": changes })),
                        Err(errors) => {
                            let n = errors.len();
                            let mut body = api_error::value(
                                Code::InvalidConfig,
                                format!(
                                    "the new configuration was refused ({n} problem{}); the running one stays in force",
                                    if n == 1 { "" } else { "s" }
                                ),
                                None,
                            );
                            body["errors"] = json!(errors);
                            reply(Code::InvalidConfig.status(), body)
                        }
                    },
                    ("GET", "/admin/audit") => match parse_since(query.as_deref()) {
                        Ok(since) => reply(
                            200,
                            json!({"records": self.invalidator.audit.since(since).await}),
                        ),
                        Err(e) => error_at(Code::BadRequest, e, "since"),
                    },
                    ("POST", "/admin/warm") => self.warm(session).await,
                    ("GET", "/admin/jobs") => match &self.warmer {
                        Some(w) => reply(200, w.list().await),
                        None => reply(200, json!({"jobs": [], "schedules": []})),
                    },
                    ("GET", p) if p.starts_with("/admin/jobs/") => {
                        let id = &p["/admin/jobs/".len()..];
                        // Ids are short and alphanumeric; anything else names no job (and never
                        // reaches a Redis key).
                        let valid = !id.is_empty()
                            && id.len() <= 64
                            && id.bytes().all(|b| b.is_ascii_alphanumeric());
                        match self.warmer.as_ref().filter(|_| valid) {
                            Some(w) => match w.status(id).await {
                                Some(s) => reply(200, s),
                                None => error(
                                    Code::NotFound,
                                    format!("no warm job {id:?} (jobs are kept: the last 100)"),
                                ),
                            },
                            None => error(Code::NotFound, format!("no warm job {id:?}")),
                        }
                    }
                    (_, p) => match admin_methods(p) {
                        Some(allow) => wrong_method(allow),
                        None => error(
                            Code::NotFound,
                            "no such admin endpoint; see docs/admin-api.yaml",
                        ),
                    },
                }
            }
            _ => error(
                Code::NotFound,
                "not found: try /metrics, /healthz, /readyz or /admin/*",
            ),
        }
    }

    /// Streams invalidations as server-sent events until the client goes away or shutdown.
    async fn events(&self, session: &mut ServerSession, shutdown: &ShutdownWatch) {
        let mut rx = self.invalidator.audit.subscribe();
        let mut resp = ResponseHeader::build(200, Some(4)).expect("static status");
        let _ = resp.insert_header(http::header::CONTENT_TYPE, "text/event-stream");
        let _ = resp.insert_header(http::header::CACHE_CONTROL, "no-cache");
        let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        session.set_keepalive(None);
        if session.write_response_header(Box::new(resp)).await.is_err() {
            return;
        }
        if session
            .write_response_body(Bytes::from_static(b": stream of invalidations\n\n"), false)
            .await
            .is_err()
        {
            return;
        }
        let mut shutdown = shutdown.clone();
        loop {
            let chunk = tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(json) => format!("event: invalidation\ndata: {json}\n\n"),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"),
                    Err(_) => return,
                },
                _ = tokio::time::sleep(SSE_KEEPALIVE) => ": keep-alive\n\n".to_string(),
                _ = shutdown.changed() => return,
            };
            if session
                .write_response_body(Bytes::from(chunk), false)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        let req = session.req_header();
        let is_events = req.method == http::Method::GET && req.uri.path() == "/admin/events";
        let authorized = bearer_ok(&req.headers, self.reloader.config().admin.token.as_deref());
        if is_events && authorized {
            self.events(&mut session, shutdown).await;
            return None;
        }
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let r = if is_events {
            unauthorized(self.reloader.config().admin.token.as_deref())
        } else {
            self.route(&mut session).await
        };
        let mut resp = ResponseHeader::build(r.status, Some(4)).ok()?;
        resp.insert_header(http::header::CONTENT_TYPE, r.content_type)
            .ok()?;
        resp.insert_header(http::header::CONTENT_LENGTH, r.body.len())
            .ok()?;
        if r.status == 401 {
            resp.insert_header(http::header::WWW_AUTHENTICATE, "Bearer")
                .ok()?;
        }
        if let Some(allow) = r.allow {
            resp.insert_header(http::header::ALLOW, allow).ok()?;
        }
        session.write_response_header(Box::new(resp)).await.ok()?;
        if !r.body.is_empty() {
            session
                .write_response_body(r.body.into(), true)
                .await
                .ok()?;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parameter() {
        assert_eq!(parse_since(None).unwrap(), 0);
        assert_eq!(
            parse_since(Some("since=1700000000000")).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_since(Some("x=1&since=2026-11-22T00:00:00Z")).unwrap(),
            1_795_305_600_000
        );
        assert!(parse_since(Some("since=yesterday")).is_err());
    }
}
