//! Reading a JSON request body for the key, as admission plans it.
//!
//! [`crate::admission::body_plan`] decides from the head whether to read and how much; this
//! reads exactly that with pingora's retry buffer enabled (so pingora forwards the same bytes
//! upstream), and [`crate::admission::parse_body`] says whether it can be keyed.

use crate::admission::{self, BodyPlan, Bypass};
use crate::rules::Rule;
use pingora::proxy::Session;
use pingora::Result;

/// `Ok(Some(body))`: keyable; `Ok(None)`: not needed; `Err(reason)` inside: bypass.
pub async fn read(
    session: &mut Session,
    rule: &Rule,
) -> Result<std::result::Result<Option<serde_json::Value>, Bypass>> {
    let req = session.req_header();
    let length = match admission::body_plan(rule, &req.method, &req.headers) {
        BodyPlan::Skip => return Ok(Ok(None)),
        BodyPlan::Refuse(reason) => return Ok(Err(reason)),
        BodyPlan::Read(length) => length,
    };
    // Boxed: only a rule keyed on the body reads it, and the read's state held inline in
    // `request_filter`'s future would be copied on every request (issue 16).
    Box::pin(read_body(session, length)).await
}

/// Reads the whole request body (`length` expected) and parses it.
async fn read_body(
    session: &mut Session,
    length: usize,
) -> Result<std::result::Result<Option<serde_json::Value>, Bypass>> {
    session.as_mut().enable_retry_buffering();
    let mut body = Vec::with_capacity(length);
    while let Some(chunk) = session.read_request_body().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(admission::parse_body(&body).map(Some))
}
