//! CDN purging: every invalidation also reaches the CDNs in front of the app, through a durable,
//! retried queue.
//!
//! The shape: an invalidation becomes one [`PurgeJob`] (tags, URLs, prefixes, hosts, soft or
//! hard). Each configured [`Provider`] (Cloudflare, Fastly, CloudFront, plain HTTP PURGE/BAN)
//! splits a job into request-sized [`Batch`]es its API accepts and answers each with a
//! [`ProviderAnswer`]. The queue ([`queue`]) persists one item per (job, provider, batch) before
//! the job is acknowledged, so an accepted purge survives a gateway restart or a CDN outage; the
//! worker ([`worker`]) coalesces queued items of one provider into requests as large as its API
//! takes ([`Provider::merge_limit`], [`Provider::fits`]), paces them, retries with capped backoff
//! and jitter (a `429` / `Retry-After` is pacing, not a failure) and moves an item to the dead
//! letters only after `give_up_after` (or an opt-in `max_attempts`).
//!
//! Nothing is accepted and dropped: what a provider cannot send (a kind its API cannot express,
//! a CloudFront tag without a `tag_paths` entry, an item the API would reject) comes back from
//! [`Provider::plan`] as [`Skipped`], and the queue counts it (`aisle_purge_skipped_total`) and
//! shows the latest ones per provider in `/admin/purges`. The provider set itself can change
//! while the gateway runs (a reload swaps it in the queue; the worker restarts its loops).

pub mod providers;
pub mod queue;
pub mod worker;

use async_trait::async_trait;
use once_cell::sync::Lazy;
use prometheus::{register_int_counter_vec, IntCounterVec};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One invalidation, as the CDNs should see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeJob {
    /// Unique id (also the invalidation's id in the admin API and the audit log).
    pub id: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Absolute URLs (`https://host/path?query`).
    #[serde(default)]
    pub urls: Vec<String>,
    /// `host/path/prefix` (Cloudflare's form), no scheme.
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Mark stale instead of removing, where the provider can (Fastly).
    #[serde(default)]
    pub soft: bool,
    /// Who asked: `admin`, `webhook:tave`, `purge-method`, ...
    #[serde(default)]
    pub source: String,
    /// Unix milliseconds when the job was accepted.
    #[serde(default)]
    pub created_ms: u64,
}

/// What a batch names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tags,
    Urls,
    Prefixes,
    Hosts,
}

/// One API request's worth of a job, for one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub kind: Kind,
    pub items: Vec<String>,
    pub soft: bool,
}

/// Why a provider did not send part of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipReason {
    /// The API has no such purge (Fastly and plain HTTP caches: prefixes, hosts).
    Unsupported,
    /// A CloudFront tag without a `[cdn.cloudfront] tag_paths` entry.
    Unmapped,
    /// The API would refuse the item (a tag with a space, a URL that is not absolute http(s)).
    Invalid,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Unsupported => "unsupported",
            SkipReason::Unmapped => "unmapped",
            SkipReason::Invalid => "invalid",
        }
    }
}

/// One item of a job a provider did not send, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub kind: Kind,
    pub item: String,
    pub reason: SkipReason,
}

/// What a provider makes of a job: the batches to send and what it cannot send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub batches: Vec<Batch>,
    pub skipped: Vec<Skipped>,
}

impl Plan {
    /// Records `items` of `kind` as not sent for `reason`.
    pub(crate) fn skip(
        &mut self,
        kind: Kind,
        items: impl IntoIterator<Item = String>,
        reason: SkipReason,
    ) {
        self.skipped
            .extend(items.into_iter().map(|item| Skipped { kind, item, reason }));
    }
}

/// `aisle_purge_skipped_total{provider, reason}`: items of accepted purges a CDN was not sent
/// (registered here, at first use, so the purge layer owns its counter).
pub(crate) static SKIPPED_TOTAL: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_purge_skipped_total",
        "Items of accepted purges not sent to a CDN, by provider and reason: unsupported (the API has no such purge), unmapped (a CloudFront tag without tag_paths), invalid (the API would refuse it)",
        &["provider", "reason"]
    )
    .expect("register aisle_purge_skipped_total")
});

/// What a provider answered to one batch (named apart from [`crate::metrics::Outcome`], a
/// cache lookup's outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderAnswer {
    /// Accepted; the detail is what the API said (e.g. its purge or invalidation id).
    Done(String),
    /// Try again later (5xx, 429, network error); `after` from `Retry-After` when given (a 429
    /// always has one). A `Retry` with `after` is pacing: it pauses the provider and does not
    /// count as a failed attempt.
    Retry {
        after: Option<Duration>,
        detail: String,
    },
    /// Will never succeed as sent (4xx other than 429: bad credentials, bad request).
    Fatal(String),
}

/// A CDN's purge API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Stable name: `cloudflare`, `fastly`, `cloudfront`, `http`.
    fn name(&self) -> &str;
    /// Splits a job into request-sized batches this API accepts (CloudFront maps tags to
    /// configured path patterns) and lists every item it cannot send ([`Plan::skipped`]): the
    /// queue counts and shows those, so nothing is dropped unseen.
    fn plan(&self, job: &PurgeJob) -> Plan;
    /// The batches of [`Self::plan`].
    fn batches(&self, job: &PurgeJob) -> Vec<Batch> {
        self.plan(job).batches
    }
    /// Requests per second this provider's API allows (the worker paces to it).
    fn rate(&self) -> f64;
    /// At most how many queued batches of `kind` one request may join (the worker claims up to
    /// this many items at once and keeps those that [`Self::fits`] together). 1: no coalescing.
    fn merge_limit(&self, _kind: Kind) -> usize {
        1
    }
    /// Whether `batch` (batches of several jobs joined) is still one request the API accepts.
    fn fits(&self, batch: &Batch) -> bool {
        batch.items.len() <= 1
    }
    /// Sends one batch. `idempotency` is the same on every retry of this batch (CloudFront's
    /// `CallerReference`).
    async fn send(&self, batch: &Batch, idempotency: &str) -> ProviderAnswer;
}

/// Where the worker reports what each CDN answered (the audit log implements it).
pub trait AnswerSink: Send + Sync {
    fn cdn_answer(&self, job_id: &str, provider: &str, attempt: u32, answer: &ProviderAnswer);
}
