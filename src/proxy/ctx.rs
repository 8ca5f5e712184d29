//! Per-request state shared by the phases, grouped by what it is about.
//!
//! [`Ctx`] holds the configuration in force when the request started ([`Live`]), the route (which rule, its parameters, the URI identity), the admission (did
//! the request use the cache, on what terms), the cache outcome (one [`Lookup`] value plus what
//! the response phases add), and what the upstream said. Each phase writes only its own part.

use super::cache_status::{CacheStatus, Lookup};
use super::Live;
use crate::admission::{Admission, Bypass, KeyParts, Route, Terms};
use crate::metrics::CacheOutcome;
use crate::rules::source::RequestView;
use crate::rules::Rule;
use crate::storage::fill_lock::FillLock;
use crate::trust::Peer;
use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Instant;

/// What the cache did for this request, as the phases learn it.
#[derive(Default)]
pub struct CacheCtx {
    pub lookup: Lookup,
    /// The response was admitted to storage.
    pub stored: bool,
    /// Serving stale because the upstream failed: `Some(status)` (`None` inside: no response).
    pub stale_error: Option<Option<u16>>,
    /// Answered stale because the origin had not answered within the upstream's `stale_after`.
    pub stale_after: bool,
    /// Tokens recorded with the stored response this request was answered from.
    pub hit_tokens: u64,
    /// The hit read a fill still in progress (another request's), chunk by chunk.
    pub partial_hit: bool,
    /// This instance's fleet fill lock for the key, released when the request ends (or handed
    /// to the fill that stores the answer).
    pub fill_lock: Option<FillLock>,
    /// The hit was past its rule's `refresh_ahead` point (`Cache-Status: hit; detail=refresh-ahead`).
    pub refresh_ahead: bool,
    /// This request is a refresh-ahead's background subrequest, and how it went so far.
    pub ahead: Option<Ahead>,
    /// The key hash the fresh-hit path computed ([`crate::admission::keyed_hash`], for every
    /// request it may answer): the cache phases' key is stored under it rather than hashed
    /// again, and the debug line shows it when a fresh hit left the phases no key.
    pub key_hash: Option<pingora::cache::key::HashBinary>,
}

/// A refresh-ahead subrequest's progress, for `aisle_refresh_ahead_total` when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Claimed: it refreshes the entry (stored or revalidated: `refreshed`, else `failed`).
    Refreshing,
    /// Another instance claimed it, or the entry was replaced already (counted).
    Coalesced,
    /// The upstream's quota kept it from the origin.
    Quota,
}

/// What the upstream said, when the request went there.
#[derive(Default)]
pub struct UpstreamCtx {
    pub start: Option<Instant>,
    pub status: Option<u16>,
    /// The upstream request was cut to `stale_after`, a stale entry standing by.
    pub stale_after: Option<std::time::Duration>,
    /// Tags the origin sent (`Surrogate-Key`, `Cache-Tag`, `xkey`, `Cache-Groups`).
    pub tags: Vec<String>,
    /// The origin's `Age` (RFC 9111 §5.1), forwarded on a miss.
    pub age: u64,
    /// A `304` that revalidated the stored answer: its fields update the stored ones
    /// (RFC 9111 §4.3.4) when `response_cache_filter` sees pingora's partial merge.
    pub not_modified: Option<Box<pingora::http::ResponseHeader>>,
    /// The address this attempt goes to (its in-flight count is held while this lives).
    pub picked: Option<super::upstream::Picked>,
    /// Addresses whose connection failed for this request (a retry picks another).
    pub tried: Vec<std::net::SocketAddr>,
    /// Why no address could be picked, when none could.
    pub no_address: Option<super::upstream::NoAddress>,
}

/// Per-request state shared by the phases.
pub struct Ctx {
    pub start: Instant,
    /// The configuration in force when the request started, kept to its end (a reload swaps
    /// in a new one for later requests only).
    pub live: Arc<Live>,
    /// Set by `request_filter`; `None` only for requests answered there (PURGE, webhooks, 404).
    pub route: Option<Route>,
    /// Who sent the request and what is believed of it (`[server] trusted_*`), set with `route`.
    pub peer: Peer,
    /// The request body parsed as JSON (rules that key on the body).
    pub body: Option<Arc<serde_json::Value>>,
    /// Why the body could not be keyed, when it could not.
    pub body_refused: Option<Bypass>,
    /// Set by `request_cache_filter`.
    pub admission: Option<Admission>,
    pub cache: CacheCtx,
    pub upstream: UpstreamCtx,
    /// What the upstream's quota decided (see [`super::quota`]).
    pub quota: super::quota::QuotaCtx,
    /// What `Cache-Status` said and what metrics count (set in `response_filter`).
    pub answered: Option<(CacheStatus, CacheOutcome)>,
    /// Whether a warm job sent this request (`Aisle-Warm` with the process's secret).
    pub warm: crate::warm::Mark,
}

impl Ctx {
    pub fn new(live: Arc<Live>) -> Self {
        Ctx {
            start: Instant::now(),
            live,
            route: None,
            peer: Peer::default(),
            body: None,
            body_refused: None,
            admission: None,
            cache: CacheCtx::default(),
            upstream: UpstreamCtx::default(),
            quota: Default::default(),
            answered: None,
            warm: Default::default(),
        }
    }

    pub fn route(&self) -> &Route {
        self.route
            .as_ref()
            .expect("a route is set in request_filter before any later phase")
    }

    pub fn rule(&self) -> &Rule {
        &self.route().rule
    }

    /// The terms of an admitted request (`None`: it bypasses the cache).
    pub fn terms(&self) -> Option<&Terms> {
        match &self.admission {
            Some(Admission::Cache(terms)) => Some(terms),
            _ => None,
        }
    }

    /// The request parts keys and tag templates are built from.
    pub fn key_parts<'a>(&'a self, req: &'a RequestHeader, host: &'a str) -> KeyParts<'a> {
        KeyParts {
            method: &req.method,
            host,
            path: req.uri.path(),
            query: req.uri.query(),
            headers: &req.headers,
            body: self.body.as_deref(),
        }
    }

    /// What rule sources read from this request.
    pub fn view<'a>(&'a self, req: &'a RequestHeader, host: &'a str) -> RequestView<'a> {
        self.key_parts(req, host).view(&self.route().params)
    }
}
