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

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Largest request body the demo reads (the POST route ignores its content).
const MAX_BODY: usize = 64 * 1024;

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

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    tracing::debug!(method = %parts.method, uri = %parts.uri, origin_request = n, "demo origin");
    // Read (and discard) any body so the connection can be reused.
    if Limited::new(body, MAX_BODY).collect().await.is_err() {
        let body = json!({"error": "body too large"});
        return Ok(json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "no-store",
            body,
            n,
        ));
    }
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
    let mut resp = json_response(status, cache_control, body, n);
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
    Ok(resp)
}

/// Adds `served_at` and `origin_request` to `body` and wraps it as a JSON response.
fn json_response(
    status: StatusCode,
    cache_control: &'static str,
    mut body: Value,
    n: u64,
) -> Response<Full<Bytes>> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if let Value::Object(map) = &mut body {
        map.insert("served_at".into(), now_ms.into());
        map.insert("origin_request".into(), n.into());
    }
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(cache_control));
    resp
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

    #[test]
    fn query_decoding() {
        let pairs = [("a", "x y,z"), ("b", ""), ("c", "%zz"), ("", "e")];
        let expected = pairs.map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(parse_query("a=x+y%2Cz&b&c=%zz&=e"), expected);
    }
}
