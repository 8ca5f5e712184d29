//! RFC 9111 §4.4: a successful unsafe request invalidates what is stored for its URI, for a
//! same-host `Location` / `Content-Location`, and for the groups the origin names in
//! `Cache-Group-Invalidation`.

use crate::config::Config;
use crate::invalidation::{Cdn, Invalidator, Request};
use crate::key;
use crate::policy;
use crate::storage::tiered::Tiered;
use pingora::http::{RequestHeader, ResponseHeader};

/// Drops every variant of the request's URI (`uri`, its [`key::uri_id`]) and of the same-host
/// URIs the response points at, on every instance.
pub async fn after_unsafe(
    storage: &Tiered,
    invalidator: &Invalidator,
    config: &Config,
    req: &RequestHeader,
    host: &str,
    uri: u64,
    resp: &ResponseHeader,
) {
    invalidator.prune(crate::clock::now_ms());
    let mut removed = storage.invalidate_uri(uri).await;
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(target) = target.parse::<http::Uri>() else {
            continue;
        };
        // Compared in normal form, as `host` is (case, trailing dot and port do not matter).
        let same_host = target
            .authority()
            .is_none_or(|a| key::normalize_host(a.as_str().as_bytes()).is_ok_and(|h| h == host));
        if same_host && target.path().starts_with('/') {
            removed += storage
                .invalidate_uri(key::uri_id(host, target.path()))
                .await;
        }
    }
    let groups = policy::cache_groups(resp, "cache-group-invalidation");
    if !groups.is_empty() {
        let request = Request {
            tags: groups,
            urls: Vec::new(),
            prefixes: Vec::new(),
            events: Vec::new(),
            soft: false,
            source: "unsafe-request".into(),
            actor: req.uri.to_string(),
            cdn: Cdn::Never,
            force: false,
        };
        match invalidator.plan(request, &config.rules) {
            Ok(plan) => {
                invalidator.execute(plan).await;
            }
            Err(e) => tracing::warn!("ignoring Cache-Group-Invalidation from the origin: {e}"),
        }
    }
    // The answer to the unsafe request goes out after the purge's millisecond (see
    // `clock::leave_this_ms`), so the client's next request refills rather than re-purges.
    crate::clock::leave_this_ms().await;
    tracing::debug!(uri = %req.uri, removed, "invalidated after unsafe request");
}
