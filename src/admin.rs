//! The admin listener: `/metrics` (Prometheus text) and `/healthz`.
//!
//! Kept apart from the proxy listener so operational endpoints are never reachable through the
//! public port and never touch the cache. Later admin routes (`/admin/*`) land here.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

/// Serves the admin endpoints.
pub struct Admin;

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        match (req.method.as_str(), req.uri.path()) {
            ("GET", "/metrics") => reply(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render().into_bytes(),
            ),
            ("GET", "/healthz") => reply(200, "text/plain", b"ok\n".to_vec()),
            (_, "/metrics" | "/healthz") => {
                reply(405, "text/plain", b"method not allowed\n".to_vec())
            }
            _ => reply(
                404,
                "text/plain",
                b"not found: try /metrics or /healthz\n".to_vec(),
            ),
        }
    }
}
