//! A tiny wedding-planning API that plays the origin behind Aisle in the demo.
//!
//! It exists so the gateway can be shown working end to end with no outside
//! service: every route answers deterministic JSON computed from its inputs,
//! with the `Cache-Control` (and, for vendor details, `ETag`) headers that the
//! rules in `rules/` are written against. Each body also carries `served_at`
//! (unix ms) and `origin_request` (a global counter), so a user can see at a
//! glance whether a response came from the origin or from the cache. It is
//! deliberately plain hyper 1.x and std only: no framework, no state beyond the
//! counter.
//!
//! Two AI routes play the paid APIs that `rules/ai.toml` caches:
//! `POST /api/ai/recommendations` (the planner's assistant) and an OpenAI-style
//! `POST /v1/chat/completions`. Both answer from the JSON body, deterministically,
//! with `usage.total_tokens` (what the gateway's cost counters read) and without
//! `Cache-Control` (the rules set the TTL). With `"stream": true` the chat route
//! answers `text/event-stream`, one `data:` event per body frame spread over about
//! a second and ending with `data: [DONE]`, the way OpenAI streams, so streaming
//! through the gateway can be watched.
//!
//! The demo also owns what `aisle demo` prints and its admin token: the shipped `gateway.toml`
//! reads the token from `AISLE_ADMIN_TOKEN` (`${AISLE_ADMIN_TOKEN:-}`); when it is unset the demo
//! makes one up ([`admin_token`]) before the config is read, and prints it with the line to
//! export it, so the admin API and `aisle purge` work in the demo with no setup, while a real
//! deployment never gets a token it did not choose.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The environment variable the shipped config reads its admin token from.
pub const TOKEN_VAR: &str = "AISLE_ADMIN_TOKEN";

/// Where the demo's admin token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `AISLE_ADMIN_TOKEN` was set.
    Environment,
    /// It was unset: a random one was made and put in this process's environment.
    Generated,
}

/// Makes sure `AISLE_ADMIN_TOKEN` is set for the config about to be read: kept when set, else a
/// random 32-hex-digit token (128 bits). Call before any thread is started (it sets the
/// process environment).
pub fn admin_token() -> TokenSource {
    if std::env::var(TOKEN_VAR).is_ok_and(|t| !t.is_empty()) {
        return TokenSource::Environment;
    }
    use aes_gcm::aead::rand_core::RngCore;
    let mut bytes = [0u8; 16];
    aes_gcm::aead::OsRng.fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::env::set_var(TOKEN_VAR, token);
    TokenSource::Generated
}

/// What `aisle demo` prints before serving: where everything listens, the admin token, and
/// commands to try.
pub fn banner(config: &crate::config::Config, origin: &str, token: TokenSource) -> String {
    let p = &config.listen;
    let a = &config.admin_listen;
    let mut out = format!(
        "aisle demo: origin on http://{origin}, gateway on http://{p}, admin on http://{a}\n"
    );
    match (&config.admin.token, token) {
        (None, _) => out.push_str(
            "admin API disabled: the config has no [admin] token (/admin/* answers 401)\n",
        ),
        (Some(t), TokenSource::Generated) => out.push_str(&format!(
            "admin token (generated, {TOKEN_VAR} was unset): {t}\n  \
             export {TOKEN_VAR}={t}   # in the terminal you run curl or aisle purge from\n"
        )),
        (Some(_), TokenSource::Environment) => {
            out.push_str(&format!("admin token: ${TOKEN_VAR}\n"))
        }
    }
    out.push_str("\nTry (watch the cache-status header and origin_request in the body):\n");
    for line in [
        format!("curl -si 'http://{p}/api/vendors/search?location=NYC&vendorType=photographer&budget=5000'   # miss, stored"),
        format!("curl -si 'http://{p}/api/vendors/search?location=nyc&vendorType=photographer&budget=5400&utm_source=x'   # hit: same market, budget bucket; utm ignored"),
        format!("curl -si 'http://{p}/api/vendors/search?location=Austin,%20TX&vendorType=photographer&budget=5000'   # vary miss: another market (austin)"),
        format!("curl -si 'http://{p}/api/weddings/w-42/timeline'"),
        format!("curl -si 'http://{p}/api/weather?city=Brooklyn&date=2027-07-14'"),
        format!("curl -si -X POST -H 'content-type: application/json' 'http://{p}/api/ai/recommendations' -d '{{\"request_id\":\"r1\",\"query\":{{\"type\":\"venue\",\"content\":\"Best venues?\"}},\"weddingContext\":{{\"location\":{{\"city\":\"NYC\"}},\"weddingDate\":\"2026-09-19\"}}}}'   # run twice: the second is a hit"),
        format!("curl -sN -X POST -H 'content-type: application/json' 'http://{p}/v1/chat/completions' -d '{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":true}}'   # streamed, then replayed"),
        format!("curl -s -X POST -H \"Authorization: Bearer ${TOKEN_VAR}\" 'http://{a}/admin/invalidate' -d '{{\"events\":[{{\"name\":\"vendor_update\",\"params\":{{}}}}]}}'   # purge every vendor entry"),
        format!("curl -si -X PURGE 'http://{p}/api/weddings/w-42/timeline'   # from loopback (purge_allow): no token needed"),
        format!("curl -s 'http://{a}/metrics' | grep aisle_requests_total"),
    ] {
        out.push_str("  ");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Largest request body the demo reads.
const MAX_BODY: usize = 64 * 1024;

/// What every route answers with: a whole body, or (streamed chat) frames over time.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Events of a streamed chat answer are this far apart (about a second in all).
const STREAM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(150);

/// Serves the demo origin on `listener` until the task is dropped/aborted.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    // Connections live in a JoinSet so that dropping `serve` ends them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) if is_per_connection(&e) => continue,
                    Err(e) => return Err(e),
                };
                conns.spawn(async move {
                    let conn = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(handle));
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "demo origin connection error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Number of requests the demo origin has answered (for the demo's printed stats).
pub fn requests_served() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let n = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    tracing::debug!(method = %parts.method, uri = %parts.uri, origin_request = n, "demo origin");
    // Read the whole body (the AI routes answer from it; reading it also lets the connection
    // be reused).
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let body =
                json!({"error": format!("the request body is larger than {MAX_BODY} bytes")});
            return Ok(
                json_response(StatusCode::PAYLOAD_TOO_LARGE, Some("no-store"), body, n)
                    .map(|b| b.boxed_unsync()),
            );
        }
    };
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let q = |name: &str| query.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v);
    let path: Vec<&str> = parts
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let method = match parts.method.as_str() {
        "HEAD" => "GET",
        m => m,
    };

    use StatusCode as S;
    if let ("POST", ["api", "ai", "recommendations"] | ["v1", "chat", "completions"]) =
        (method, path.as_slice())
    {
        let Some(request) = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
        else {
            let body = json!({"error": "the request body must be a JSON object"});
            let resp = json_response(S::BAD_REQUEST, Some("no-store"), body, n);
            return Ok(resp.map(|b| b.boxed_unsync()));
        };
        if path[0] == "v1" {
            if request["stream"] == Value::Bool(true) {
                return Ok(chat_stream(&request, n));
            }
            let body = chat_completion(&request);
            return Ok(json_response(S::OK, None, body, n).map(|b| b.boxed_unsync()));
        }
        let body = recommendations(&request);
        return Ok(json_response(S::OK, None, body, n).map(|b| b.boxed_unsync()));
    }
    let (status, cache_control, body, etag) = match (method, path.as_slice()) {
        ("GET", ["api", "vendors", "search"]) => {
            let body = vendor_search(q("location"), q("vendorType"), q("budget"));
            (S::OK, "public, max-age=60", body, None)
        }
        ("GET", ["api", "vendors", id]) if valid_id(id) => {
            let etag = format!("\"v-{id}-1\"");
            (S::OK, "public, max-age=120", vendor_details(id), Some(etag))
        }
        ("GET", ["api", "weddings", id, "timeline"]) if valid_id(id) => {
            (S::OK, "max-age=30", timeline(id), None)
        }
        ("GET", ["api", "weather"]) => {
            let body = weather(q("city"), q("date"));
            (S::OK, "public, max-age=300", body, None)
        }
        ("POST", ["api", "vendors", id]) if valid_id(id) => {
            (S::OK, "no-store", json!({"updated": true, "id": id}), None)
        }
        _ => (
            S::NOT_FOUND,
            "no-store",
            json!({"error": "not found"}),
            None,
        ),
    };
    let mut resp = json_response(status, Some(cache_control), body, n);
    if let Some(etag) = etag {
        let inm = parts
            .headers
            .get(IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok());
        if inm.is_some_and(|v| etag_matches(v, &etag)) {
            *resp.status_mut() = S::NOT_MODIFIED;
            *resp.body_mut() = Full::default();
            resp.headers_mut().remove(CONTENT_TYPE);
        }
        // Ids are restricted to [A-Za-z0-9_-], so the tag is always a valid header value.
        let etag = HeaderValue::from_str(&etag).expect("valid etag");
        resp.headers_mut().insert(ETAG, etag);
    }
    Ok(resp.map(|b| b.boxed_unsync()))
}

use crate::clock::now_ms;

/// Adds `served_at` and `origin_request` to `body` and wraps it as a JSON response
/// (`cache_control: None`: no `Cache-Control` header).
fn json_response(
    status: StatusCode,
    cache_control: Option<&'static str>,
    mut body: Value,
    n: u64,
) -> Response<Full<Bytes>> {
    stamp(&mut body, n);
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(cc) = cache_control {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static(cc));
    }
    resp
}

/// Adds `served_at` (unix ms) and `origin_request` to a JSON object.
fn stamp(body: &mut Value, n: u64) {
    if let Value::Object(map) = body {
        map.insert("served_at".into(), now_ms().into());
        map.insert("origin_request".into(), n.into());
    }
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `W/` is ignored.
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// Splits a query string into decoded pairs (`+` is a space, `%XX` a byte).
fn parse_query(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
        let (b, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
        while i < b.len() {
            match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                (b'+', ..) => out.push(b' '),
                (c, ..) => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// FNV-1a: a stable hash, so the same inputs give the same content on every run.
fn seed(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0xff]))
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

fn pick<'a>(items: &[&'a str], s: u64) -> &'a str {
    items[(s % items.len() as u64) as usize]
}

const ADJECTIVES: &[&str] = &[
    "Golden", "Willow", "Harbor", "Magnolia", "Silver", "Juniper", "Cedar", "Rosewood",
];
const NOUNS: &[&str] = &[
    "Hour", "Lane", "Studio", "Bloom", "House", "& Co.", "Gardens", "Atelier",
];
#[rustfmt::skip]
const VENDOR_TYPES: &[&str] = &["photographer", "florist", "venue", "caterer", "dj", "planner"];

fn vendor_search(location: &str, vendor_type: &str, budget: &str) -> Value {
    let s = seed(&[location, vendor_type, budget]);
    let budget_cap: u64 = budget.trim().parse().unwrap_or(5000);
    let vendors: Vec<Value> = (0..3 + s % 3)
        .map(|i| {
            let v = s.rotate_left(7 * i as u32 + 3) ^ i;
            let kind = match vendor_type {
                "" => pick(VENDOR_TYPES, v >> 24),
                t => t,
            };
            json!({
                "id": format!("{}", 100 + v % 900),
                "name": format!("{} {}", pick(ADJECTIVES, v >> 8), pick(NOUNS, v >> 16)),
                "vendorType": kind,
                "location": location,
                "price": budget_cap / 2 + (v >> 32) % (budget_cap / 2 + 1),
                "rating": 3.5 + ((v >> 40) % 16) as f64 / 10.0,
            })
        })
        .collect();
    let query = json!({"location": location, "vendorType": vendor_type, "budget": budget});
    json!({"query": query, "vendors": vendors})
}

fn vendor_details(id: &str) -> Value {
    let s = seed(&[id]);
    let dates = ["2025-05-17", "2025-06-21", "2025-09-13", "2025-10-11"];
    let open: Vec<&str> = (0..dates.len())
        .filter(|i| (s >> (48 + i)) & 1 == 1)
        .map(|i| dates[i])
        .collect();
    json!({
        "id": id,
        "name": format!("{} {}", pick(ADJECTIVES, s), pick(NOUNS, s >> 8)),
        "vendorType": pick(VENDOR_TYPES, s >> 16),
        "priceRange": {"min": 1000 + (s >> 24) % 20 * 100, "max": 3000 + (s >> 32) % 60 * 100},
        "rating": 3.5 + ((s >> 40) % 16) as f64 / 10.0,
        "availability": open,
    })
}

fn timeline(id: &str) -> Value {
    const STEPS: &[(&str, u64)] = &[
        ("Hair & makeup", 180),
        ("First look", 45),
        ("Ceremony", 40),
        ("Cocktail hour", 60),
        ("Reception", 240),
    ];
    let start = 10 * 60 + seed(&[id]) % 5 * 30; // minutes after midnight
    let items: Vec<Value> = STEPS
        .iter()
        .scan(start, |t, &(what, minutes)| {
            let at = *t;
            *t += minutes;
            let time = format!("{:02}:{:02}", at / 60, at % 60);
            Some(json!({"time": time, "item": what, "minutes": minutes}))
        })
        .collect();
    json!({"weddingId": id, "items": items})
}

fn weather(city: &str, date: &str) -> Value {
    let s = seed(&[city, date]);
    // Rough seasonal curve by month (1..=12) when the date is ISO `YYYY-MM-DD`.
    let month: u64 = date
        .get(5..7)
        .and_then(|m| m.parse().ok())
        .filter(|m| (1..=12).contains(m))
        .unwrap_or(6);
    let base = [40, 44, 52, 61, 70, 79, 84, 82, 75, 63, 52, 43][(month - 1) as usize] as i64;
    let high = base + (s % 11) as i64 - 5;
    json!({
        "city": city,
        "date": date,
        "forecast": {
            "condition": pick(&["sunny", "partly cloudy", "cloudy", "light rain"], s >> 8),
            "highF": high,
            "lowF": high - 10 - (s >> 16) as i64 % 8,
            "precipitationChance": (s >> 24) % 10 * 10,
        },
    })
}

/// A rough token count: about four characters a token, at least one.
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// `POST /api/ai/recommendations`: a few recommendations for the question in its context.
fn recommendations(req: &Value) -> Value {
    let text = |p: &str| req.pointer(p).and_then(Value::as_str).unwrap_or("");
    let kind = text("/query/type");
    let content = text("/query/content");
    let city = text("/weddingContext/location/city");
    let date = text("/weddingContext/weddingDate");
    let budget = req
        .pointer("/weddingContext/budgetRange")
        .map(Value::to_string)
        .unwrap_or_default();
    let s = seed(&[kind, content, city, date, &budget]);
    let items: Vec<Value> = (0..3 + s % 3)
        .map(|i| {
            let v = s.rotate_left(9 * i as u32 + 5) ^ i;
            json!({
                "name": format!("{} {}", pick(ADJECTIVES, v >> 8), pick(NOUNS, v >> 16)),
                "vendorType": match kind { "" | "overview" | "budget" | "timeline" => pick(VENDOR_TYPES, v >> 24), t => t },
                "why": format!("Popular with couples in {} for {}.", city.trim(), pick(&["spring", "summer", "fall", "winter"], v >> 32)),
                "score": 0.6 + ((v >> 40) % 40) as f64 / 100.0,
            })
        })
        .collect();
    let prompt_tokens = 60 + tokens(content) + tokens(city);
    let completion_tokens = tokens(&Value::from(items.clone()).to_string());
    json!({
        "query": {"type": kind, "content": content},
        "recommendations": items,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

const ANSWER_OPENINGS: &[&str] = &[
    "Happy to help!",
    "Here is a suggestion.",
    "Great question.",
    "Congratulations on the wedding!",
];
const ANSWER_LINES: &[&str] = &[
    "start with what matters most to the two of you",
    "keep it short and personal",
    "book the key vendors six to nine months ahead",
    "share the plan with your planner early",
    "leave buffer time between events",
    "ask for references and read the contract closely",
];

/// The answer text the chat route gives for a request (deterministic: the same messages and
/// model give the same words, streamed or not).
fn chat_answer(req: &Value) -> (String, Vec<String>, u64) {
    let model = req["model"].as_str().unwrap_or("demo-model");
    let messages = req["messages"].to_string();
    let s = seed(&[model, &messages]);
    let mut pieces = vec![pick(ANSWER_OPENINGS, s).to_string()];
    // Four different lines, in the table's order from a seeded start.
    let first = (s.rotate_left(7) % ANSWER_LINES.len() as u64) as usize;
    for i in 0..4 {
        let line = ANSWER_LINES[(first + i) % ANSWER_LINES.len()];
        pieces.push(format!(" {line}{}", if i == 3 { "." } else { ";" }));
    }
    (pieces.concat(), pieces, tokens(&messages))
}

fn chat_id(req: &Value) -> String {
    format!("chatcmpl-{:016x}", seed(&[&req["messages"].to_string()]))
}

/// `POST /v1/chat/completions` without streaming: an OpenAI-style completion object.
fn chat_completion(req: &Value) -> Value {
    let (content, _, prompt_tokens) = chat_answer(req);
    let completion_tokens = tokens(&content);
    json!({
        "id": chat_id(req),
        "object": "chat.completion",
        "created": now_ms() / 1000,
        "model": req["model"].as_str().unwrap_or("demo-model"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

/// The `data:` events of a streamed answer, OpenAI style: a role chunk, the content in pieces,
/// a `finish_reason` chunk, a usage chunk when `stream_options.include_usage` is set, then
/// `[DONE]`.
fn chat_events(req: &Value, n: u64) -> Vec<Bytes> {
    let (content, pieces, prompt_tokens) = chat_answer(req);
    let completion_tokens = tokens(&content);
    let model = req["model"].as_str().unwrap_or("demo-model");
    let id = chat_id(req);
    let created = now_ms() / 1000;
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        });
        stamp(&mut c, n);
        c
    };
    let mut chunks = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
    )];
    for piece in pieces {
        chunks.push(chunk(
            json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]),
        ));
    }
    chunks.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ));
    if req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)) {
        let mut usage = chunk(json!([]));
        usage["usage"] = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        chunks.push(usage);
    }
    chunks
        .into_iter()
        .map(|c| Bytes::from(format!("data: {c}\n\n")))
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect()
}

/// The body of a streamed answer: one frame per event, [`STREAM_INTERVAL`] apart (the first at
/// once). Each frame is written to the connection as it is produced.
fn event_stream(events: Vec<Bytes>) -> Body {
    let stream = futures_util::stream::unfold(
        (events.into_iter(), true),
        |(mut events, first)| async move {
            let event = events.next()?;
            if !first {
                tokio::time::sleep(STREAM_INTERVAL).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(event)), (events, false)))
        },
    );
    StreamBody::new(stream).boxed_unsync()
}

fn chat_stream(req: &Value, n: u64) -> Response<Body> {
    let mut resp = Response::new(event_stream(chat_events(req, n)));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::SocketAddr, time::Duration};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Status, raw head (lowercased) and body of one response.
    struct Reply(u16, String, String);

    impl Reply {
        fn has(&self, header_line: &str) -> bool {
            self.1.lines().any(|l| l == header_line)
        }
        fn json(&self) -> Value {
            serde_json::from_str(&self.2).expect("json body")
        }
    }

    async fn start() -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        (
            listener.local_addr().unwrap(),
            tokio::spawn(serve(listener)),
        )
    }

    /// Sends `line` (e.g. `GET /x`) as HTTP/1.1 with `Connection: close` plus the `extra`
    /// header lines (and a small body for POST), then reads to EOF, all within a deadline.
    async fn request(addr: SocketAddr, line: &str, extra: &str) -> Reply {
        let body = if line.starts_with("POST") { "{}" } else { "" };
        exchange(addr, line, extra, body).await
    }

    /// POSTs `body` as JSON to `path`; a chunked answer is de-chunked.
    async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
        let line = format!("POST {path}");
        let r = exchange(addr, &line, "Content-Type: application/json\r\n", body).await;
        if !r.has("transfer-encoding: chunked") {
            return r;
        }
        let (mut rest, mut out) = (r.2.as_str(), String::new());
        // Every chunk consumes input, so this ends within rest.len() rounds.
        for _ in 0..r.2.len() {
            let (size, after) = rest.split_once("\r\n").expect("chunk size line");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        Reply(r.0, r.1, out)
    }

    async fn exchange(addr: SocketAddr, line: &str, extra: &str, body: &str) -> Reply {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let len = body.len();
            let req = format!("{line} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n")
                + &format!("Content-Length: {len}\r\n{extra}\r\n{body}");
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        };
        let deadline = Duration::from_secs(10);
        let raw = tokio::time::timeout(deadline, exchange)
            .await
            .expect("answered in time");
        let (head, body) = raw.split_once("\r\n\r\n").expect("complete response head");
        let status = head[9..12].parse().expect("status code");
        Reply(status, head.to_ascii_lowercase(), body.to_string())
    }

    fn without_stamps(mut v: Value) -> Value {
        let map = v.as_object_mut().unwrap();
        assert!(map.remove("served_at").is_some() && map.remove("origin_request").is_some());
        v
    }

    #[tokio::test]
    async fn vendor_search_is_deterministic_and_counted() {
        let (addr, server) = start().await;
        let line =
            "GET /api/vendors/search?location=New+York%2C%20NY&vendorType=florist&budget=3000";
        let (a, b) = (request(addr, line, "").await, request(addr, line, "").await);
        assert_eq!(a.0, 200);
        assert!(a.has("content-type: application/json"));
        assert!(a.has("cache-control: public, max-age=60"));
        let (ja, jb) = (a.json(), b.json());
        assert!(jb["origin_request"].as_u64() > ja["origin_request"].as_u64());
        assert!(requests_served() >= 2);
        assert_eq!(ja["query"]["location"], "New York, NY");
        let count = ja["vendors"].as_array().unwrap().len();
        assert!((3..=5).contains(&count), "{count} vendors");
        assert_eq!(without_stamps(ja), without_stamps(jb));
        server.abort();
    }

    #[tokio::test]
    async fn vendor_details_etag_and_304() {
        let (addr, server) = start().await;
        let full = request(addr, "GET /api/vendors/42", "").await;
        assert_eq!(full.0, 200);
        assert!(full.has("etag: \"v-42-1\""));
        assert!(full.has("cache-control: public, max-age=120"));
        assert_eq!(full.json()["id"], "42");

        for inm in ["\"v-42-1\"", "W/\"v-42-1\"", "\"x\", \"v-42-1\"", "*"] {
            let r = request(
                addr,
                "GET /api/vendors/42",
                &format!("If-None-Match: {inm}\r\n"),
            )
            .await;
            assert_eq!(r.0, 304, "If-None-Match: {inm}");
            assert!(r.has("etag: \"v-42-1\"") && r.2.is_empty());
        }
        let miss = request(addr, "GET /api/vendors/42", "If-None-Match: \"v-41-1\"\r\n").await;
        assert_eq!(miss.0, 200);
        server.abort();
    }

    #[tokio::test]
    async fn other_routes() {
        let (addr, server) = start().await;
        let t = request(addr, "GET /api/weddings/w7/timeline", "").await;
        assert!(t.0 == 200 && t.has("cache-control: max-age=30"));
        assert_eq!(t.json()["items"].as_array().unwrap().len(), 5);

        let w = request(addr, "GET /api/weather?city=Austin&date=2025-10-04", "").await;
        assert!(w.0 == 200 && w.has("cache-control: public, max-age=300"));
        assert_eq!(w.json()["city"], "Austin");

        let p = request(addr, "POST /api/vendors/42", "").await;
        assert_eq!((p.0, p.json()["updated"].as_bool()), (200, Some(true)));

        for line in [
            "GET /nope",
            "DELETE /api/vendors/42",
            "GET /api/vendors/a%22b",
        ] {
            let nf = request(addr, line, "").await;
            assert!(nf.0 == 404 && nf.has("cache-control: no-store"), "{line}");
            assert_eq!(nf.json()["error"], "not found");
        }
        server.abort();
    }

    const AI_BODY: &str = r#"{"request_id": "r1", "session": "s1", "query": {"type": "venue", "content": "Best venues?"}, "weddingContext": {"location": {"city": "NYC"}, "weddingDate": "2026-09-19", "budgetRange": {"min": 20000, "max": 35000}}}"#;

    #[tokio::test]
    async fn ai_recommendations_answer_from_the_body() {
        let (addr, server) = start().await;
        let a = post(addr, "/api/ai/recommendations", AI_BODY).await;
        assert_eq!(a.0, 200);
        assert!(a.has("content-type: application/json"));
        assert!(
            !a.1.contains("cache-control"),
            "the rule sets the ttl: {}",
            a.1
        );
        let ja = a.json();
        let recs = ja["recommendations"].as_array().unwrap();
        assert!((3..=5).contains(&recs.len()), "{ja}");
        assert!(recs.iter().all(|r| r["vendorType"] == "venue"), "{ja}");
        let usage = &ja["usage"];
        let total = usage["total_tokens"].as_u64().unwrap();
        assert!(total > 0);
        assert_eq!(
            total,
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        // Volatile fields do not change the answer; the question does.
        let b = post(
            addr,
            "/api/ai/recommendations",
            &AI_BODY.replace("r1", "r2"),
        )
        .await;
        assert_eq!(without_stamps(ja.clone()), without_stamps(b.json()));
        let other = AI_BODY.replace("Best venues?", "Which venues can host 150 guests?");
        let c = post(addr, "/api/ai/recommendations", &other).await;
        assert_ne!(
            without_stamps(ja)["usage"],
            without_stamps(c.json())["usage"]
        );

        for bad in ["not json", "[1, 2]"] {
            let r = post(addr, "/api/ai/recommendations", bad).await;
            assert!(r.0 == 400 && r.has("cache-control: no-store"), "{bad}");
            assert!(r.json()["error"].as_str().unwrap().contains("JSON object"));
        }
        server.abort();
    }

    const CHAT: &str = r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Suggest a rain plan."}], "user": "u1"}"#;

    #[tokio::test]
    async fn chat_completions_plain_and_streamed() {
        let (addr, server) = start().await;
        let plain = post(addr, "/v1/chat/completions", CHAT).await;
        assert_eq!(plain.0, 200);
        assert!(plain.has("content-type: application/json") && !plain.1.contains("cache-control"));
        let plain = plain.json();
        assert_eq!(plain["object"], "chat.completion");
        assert_eq!(plain["model"], "gpt-4o-mini");
        let content = plain["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!content.is_empty());
        assert_eq!(plain["choices"][0]["finish_reason"], "stop");
        let total = plain["usage"]["total_tokens"].as_u64().unwrap();
        assert!(total > 0);

        let streamed_body = CHAT.replace(
            "\"user\": \"u1\"",
            "\"stream\": true, \"stream_options\": {\"include_usage\": true}",
        );
        let streamed = post(addr, "/v1/chat/completions", &streamed_body).await;
        assert_eq!(streamed.0, 200);
        assert!(
            streamed.has("content-type: text/event-stream"),
            "{}",
            streamed.1
        );
        assert!(streamed.has("transfer-encoding: chunked"));
        let events: Vec<&str> = streamed.2.split_terminator("\n\n").collect();
        assert!(streamed.2.ends_with("data: [DONE]\n\n"), "{}", streamed.2);
        assert!(events.iter().all(|e| e.starts_with("data: ")), "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
            .collect();
        assert!(chunks.len() >= 5, "{chunks:?}");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        // The pieces add up to the plain answer, and the usage chunk to its usage.
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, content);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"].as_u64(), Some(total));
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn streamed_answers_are_one_frame_per_event_about_a_second_in_all() {
        let req =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
        let events = chat_events(&req, 1);
        assert!(!events.iter().any(|e| e.starts_with(b"data: {\"usage")));
        let mut body = event_stream(events.clone());
        let start = tokio::time::Instant::now();
        let (mut frames, mut times) = (Vec::new(), Vec::new());
        for _ in 0..=events.len() {
            match body.frame().await {
                Some(Ok(frame)) => {
                    frames.push(frame.into_data().expect("a data frame"));
                    times.push(start.elapsed());
                }
                Some(Err(never)) => match never {},
                None => break,
            }
        }
        assert_eq!(frames, events, "one frame per event, in order");
        assert_eq!(times[0], Duration::ZERO, "the first event at once");
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], STREAM_INTERVAL);
        }
        let total = *times.last().unwrap();
        assert!(
            (Duration::from_millis(800)..=Duration::from_millis(1500)).contains(&total),
            "{total:?}"
        );
    }

    #[test]
    fn query_decoding() {
        let pairs = [("a", "x y,z"), ("b", ""), ("c", "%zz"), ("", "e")];
        let expected = pairs.map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(parse_query("a=x+y%2Cz&b&c=%zz&=e"), expected);
    }
}
