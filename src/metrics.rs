//! Prometheus metrics.
//!
//! All metrics live in the process-wide default registry so `/metrics` is one `gather()`. Label
//! sets known at load time (rule x cache status) are resolved into counter handles once, when a
//! rule is compiled, so the request path increments an atomic instead of hashing label values.

use once_cell::sync::Lazy;
use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};

/// How a request was answered, as counted in `aisle_requests_total{cache_status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served fresh from cache.
    Hit,
    /// Served stale from cache (stale-while-revalidate or stale-if-error).
    Stale,
    /// Nothing usable was stored; forwarded.
    Miss,
    /// A stored entry was stale and was refetched in full.
    Expired,
    /// A stored entry was stale and the origin confirmed it (304).
    Revalidated,
    /// Not eligible for caching (rule, method, request directives); forwarded.
    Bypass,
}

impl CacheOutcome {
    pub const ALL: [CacheOutcome; 6] = [
        CacheOutcome::Hit,
        CacheOutcome::Stale,
        CacheOutcome::Miss,
        CacheOutcome::Expired,
        CacheOutcome::Revalidated,
        CacheOutcome::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Expired => "expired",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::Bypass => "bypass",
        }
    }
}

pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// 1 healthy, 0 not, per upstream address (addresses come from config and DNS only).
    pub upstream_health: IntGaugeVec,
    /// Requests per upstream address, by result (`answered`, `connect_error`, `error`).
    pub upstream_address_requests: IntCounterVec,
    pub upstream_address_duration: HistogramVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub evictions: IntCounter,
    /// Responses not stored because they carried more tags than an entry may hold.
    pub too_many_tags: IntCounter,
    pub coalesced: IntCounter,
    pub tier_hits_memory: IntCounter,
    pub tier_hits_redis: IntCounter,
    pub redis_errors: IntCounterVec,
    pub redis_duration: HistogramVec,
    pub redis_circuit_open: IntGauge,
    pub redis_subscribed: IntGauge,
    pub redis_undecryptable: IntCounterVec,
    pub broadcast_lag: Histogram,
    /// CDN purge attempts, by provider and outcome (done, retry, fatal).
    pub purge_requests: IntCounterVec,
    /// Purge items waiting per provider (as this instance sees the queue).
    pub purge_queue_depth: IntGaugeVec,
    /// Purge items given up on per provider, until retried.
    pub purge_dead_letters: IntGaugeVec,
    /// From a purge job's acceptance to a CDN's confirmation, per provider.
    pub purge_latency: HistogramVec,
    // -- purge queue outages (issue 10 items 4 and 5) --
    /// Times this instance found the Redis purge queue gone (Redis restarted without
    /// persistence, or flushed).
    pub purge_queue_resets: IntCounter,
    /// Purge items Redis lost, by provider and what this instance could do (`requeued` from its
    /// own record, `unrecovered`).
    pub purge_lost: IntCounterVec,
    /// CDN answers that were pacing (`429` / `Retry-After`), not failures, by provider.
    pub purge_throttled: IntCounterVec,
    /// Items per CDN request (queued purges joined into one request), by provider.
    pub purge_batch_items: HistogramVec,
    pub invalidations: IntCounterVec,
    pub webhooks: IntCounterVec,
    pub saved_requests: IntCounterVec,
    pub cost_saved: prometheus::CounterVec,
    pub tokens_saved: IntCounterVec,
    // -- fills on slow and hung origins (issue 10, items 2 and 7) --
    /// Requests answered 504 after every fill they waited behind failed, instead of each going
    /// upstream on its own.
    pub fill_wait_gave_up: IntCounter,
    /// Stale answers given because the origin had not answered within the upstream's
    /// `stale_after` (the fill goes on in the background).
    pub stale_after: IntCounter,
}

static METRICS: Lazy<Metrics> = Lazy::new(|| {
    Metrics {
    requests: register_int_counter_vec!(
        "aisle_requests_total",
        "Requests answered, by rule and cache status",
        &["rule", "cache_status"]
    )
    .expect("register aisle_requests_total"),
    request_duration: register_histogram_vec!(
        "aisle_request_duration_seconds",
        "Time from request to the end of the response, by rule and cache status",
        &["rule", "cache_status"],
        vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0
        ]
    )
    .expect("register aisle_request_duration_seconds"),
    upstream_requests: register_int_counter_vec!(
        "aisle_upstream_requests_total",
        "Requests sent to upstreams, by upstream and response status (error: no response)",
        &["upstream", "status"]
    )
    .expect("register aisle_upstream_requests_total"),
    upstream_duration: register_histogram_vec!(
        "aisle_upstream_duration_seconds",
        "Time from sending a request upstream to its response header, by upstream",
        &["upstream"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("register aisle_upstream_duration_seconds"),
    upstream_health: register_int_gauge_vec!(
        "aisle_upstream_health",
        "1 when an upstream address passes its health check (or has none), 0 when it does not",
        &["upstream", "address"]
    )
    .expect("register aisle_upstream_health"),
    upstream_address_requests: register_int_counter_vec!(
        "aisle_upstream_address_requests_total",
        "Requests sent to each upstream address, by result (answered, connect_error, error)",
        &["upstream", "address", "result"]
    )
    .expect("register aisle_upstream_address_requests_total"),
    upstream_address_duration: register_histogram_vec!(
        "aisle_upstream_address_duration_seconds",
        "Time from sending a request to an upstream address to its response header",
        &["upstream", "address"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("register aisle_upstream_address_duration_seconds"),
    cache_entries: register_int_gauge!("aisle_cache_entries", "Entries in the memory tier")
        .expect("register aisle_cache_entries"),
    cache_bytes: register_int_gauge!("aisle_cache_bytes", "Bytes held by the memory tier")
        .expect("register aisle_cache_bytes"),
    evictions: register_int_counter!(
        "aisle_cache_evictions_total",
        "Entries evicted from the memory tier to stay within its budget"
    )
    .expect("register aisle_cache_evictions_total"),
    too_many_tags: register_int_counter!(
        "aisle_too_many_tags_total",
        "Responses not stored because their rule and origin tags together exceeded 256 (a tag dropped would be a purge that misses the entry)"
    )
    .expect("register aisle_too_many_tags_total"),
    coalesced: register_int_counter!(
        "aisle_coalesced_requests_total",
        "Requests that waited for another request's fill of the same key instead of going upstream"
    )
    .expect("register aisle_coalesced_requests_total"),
    tier_hits_memory: TIER_HITS.with_label_values(&["memory"]),
    tier_hits_redis: TIER_HITS.with_label_values(&["redis"]),
    redis_errors: register_int_counter_vec!(
        "aisle_redis_errors_total",
        "Redis operations that failed or timed out, by operation",
        &["op"]
    )
    .expect("register aisle_redis_errors_total"),
    redis_duration: register_histogram_vec!(
        "aisle_redis_duration_seconds",
        "Redis operation latency, by operation",
        &["op"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
    )
    .expect("register aisle_redis_duration_seconds"),
    redis_circuit_open: register_int_gauge!(
        "aisle_redis_circuit_open",
        "1 while the circuit breaker skips Redis after repeated failures"
    )
    .expect("register aisle_redis_circuit_open"),
    redis_subscribed: register_int_gauge!(
        "aisle_redis_subscribed",
        "1 while this instance receives the fleet's invalidation broadcasts"
    )
    .expect("register aisle_redis_subscribed"),
    redis_undecryptable: register_int_counter_vec!(
        "aisle_redis_unusable_entries_total",
        "Entries read from Redis that could not be used (tampered, unknown key, malformed) and were treated as misses",
        &["reason"]
    )
    .expect("register aisle_redis_unusable_entries_total"),
    broadcast_lag: register_histogram!(
        "aisle_invalidation_broadcast_lag_seconds",
        "Time from an invalidation on one instance to its application on this one",
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    )
    .expect("register aisle_invalidation_broadcast_lag_seconds"),
    purge_requests: register_int_counter_vec!(
        "aisle_purge_requests_total",
        "CDN purge requests, by provider and outcome (done, retry, fatal)",
        &["provider", "outcome"]
    )
    .expect("register aisle_purge_requests_total"),
    purge_queue_depth: register_int_gauge_vec!(
        "aisle_purge_queue_depth",
        "Purge items waiting to be sent, by provider",
        &["provider"]
    )
    .expect("register aisle_purge_queue_depth"),
    purge_dead_letters: register_int_gauge_vec!(
        "aisle_purge_dead_letters",
        "Purge items given up on (refused, or still failing after give_up_after or max_attempts), by provider",
        &["provider"]
    )
    .expect("register aisle_purge_dead_letters"),
    purge_latency: register_histogram_vec!(
        "aisle_purge_latency_seconds",
        "Time from a purge job's acceptance to the CDN's confirmation, by provider",
        &["provider"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]
    )
    .expect("register aisle_purge_latency_seconds"),
    // -- purge queue outages (issue 10 items 4 and 5) --
    purge_queue_resets: register_int_counter!(
        "aisle_purge_queue_resets_total",
        "Times the Redis purge queue was found gone (Redis restarted without persistence, or flushed)"
    )
    .expect("register aisle_purge_queue_resets_total"),
    purge_lost: register_int_counter_vec!(
        "aisle_purge_lost_total",
        "Purge items Redis lost, by provider and outcome (requeued from this instance's record, unrecovered)",
        &["provider", "outcome"]
    )
    .expect("register aisle_purge_lost_total"),
    purge_throttled: register_int_counter_vec!(
        "aisle_purge_throttled_total",
        "CDN answers that asked the gateway to slow down (429, Retry-After): pacing, not failures",
        &["provider"]
    )
    .expect("register aisle_purge_throttled_total"),
    purge_batch_items: register_histogram_vec!(
        "aisle_purge_batch_items",
        "Queued purge items joined into one CDN request, by provider",
        &["provider"],
        vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 256.0, 1000.0]
    )
    .expect("register aisle_purge_batch_items"),
    invalidations: register_int_counter_vec!(
        "aisle_invalidations_total",
        "Things invalidated, by who asked (admin, webhook, purge, unsafe) and kind (tag, url, prefix)",
        &["source", "kind"]
    )
    .expect("register aisle_invalidations_total"),
    webhooks: register_int_counter_vec!(
        "aisle_webhooks_total",
        "Webhook deliveries, by source and outcome (accepted, duplicate, bad_signature, malformed, too_large, unknown_source, error)",
        &["source", "outcome"]
    )
    .expect("register aisle_webhooks_total"),
    saved_requests: register_int_counter_vec!(
        "aisle_origin_requests_saved_total",
        "Requests answered from cache instead of the origin, by rule",
        &["rule"]
    )
    .expect("register aisle_origin_requests_saved_total"),
    cost_saved: prometheus::register_counter_vec!(
        "aisle_cost_saved_total",
        "Origin cost avoided by cache hits, in the currency units of the rule's cost",
        &["rule"]
    )
    .expect("register aisle_cost_saved_total"),
    tokens_saved: register_int_counter_vec!(
        "aisle_tokens_saved_total",
        "Tokens not spent thanks to cache hits (from the stored response's token count)",
        &["rule"]
    )
    .expect("register aisle_tokens_saved_total"),
    // -- fills on slow and hung origins (issue 10, items 2 and 7) --
    fill_wait_gave_up: register_int_counter!(
        "aisle_fill_wait_gave_up_total",
        "Requests answered 504 because every fill they waited behind failed (they do not each go upstream)"
    )
    .expect("register aisle_fill_wait_gave_up_total"),
    stale_after: register_int_counter!(
        "aisle_stale_after_total",
        "Stale answers given because the origin had not answered within stale_after (the fill continues in the background)"
    )
    .expect("register aisle_stale_after_total"),
}
});

static TIER_HITS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_tier_hits_total",
        "Lookups answered by a cache tier",
        &["tier"]
    )
    .expect("register aisle_tier_hits_total")
});

/// Purge epochs this instance keeps, by kind: `tag`, `prefix`, `uri` (exact), and
/// `uri_folded` (1 when older URI purges were folded into fixed buckets: memory stays bounded).
pub static PURGE_EPOCHS: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "aisle_purge_epochs",
        "Purge epochs kept by this instance, by kind (tag, prefix, uri; uri_folded is 1 once old URI purges share fixed buckets)",
        &["kind"]
    )
    .expect("register aisle_purge_epochs")
});

/// `aisle_config_info{hash} 1`: which configuration is running (the `hash` of
/// [`set_config_hash`]); one series at a time, like a `build_info`.
static CONFIG_INFO: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "aisle_config_info",
        "The running configuration: 1 for the hash of gateway.toml and the rules files in force",
        &["hash"]
    )
    .expect("register aisle_config_info")
});

/// Says which configuration runs now (at start and after every successful reload); the
/// previous hash's series is removed, so reloads cannot grow the metric.
pub fn set_config_hash(hash: &str) {
    CONFIG_INFO.reset();
    CONFIG_INFO.with_label_values(&[hash]).set(1);
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Fleet coherence: what waits to be told to the other instances, and how often this instance
/// re-synchronised because it could not prove it had heard everything.
pub struct FleetMetrics {
    /// Invalidation writes (epochs, URI deletions, broadcasts) waiting for Redis.
    pub pending: IntGauge,
    /// Invalidation writes dropped because the outbox was full.
    pub dropped: IntCounter,
    /// Writes the relay got through to Redis after a failure.
    pub relayed: IntCounter,
    /// Times the memory tier was dropped and the epochs reloaded, by reason: `resubscribed`
    /// (the subscription was lost), `heartbeat` (this instance's own heartbeat did not come
    /// back), `sequence` (a gap in another instance's sequence numbers).
    pub resyncs: IntCounterVec,
}

/// The fixed `reason` label values of `aisle_invalidation_resyncs_total`.
pub const RESYNC_REASONS: [&str; 3] = ["resubscribed", "heartbeat", "sequence"];

static FLEET: Lazy<FleetMetrics> = Lazy::new(|| {
    let resyncs = register_int_counter_vec!(
        "aisle_invalidation_resyncs_total",
        "Times this instance dropped its memory tier and reloaded purge epochs because it may have missed invalidations, by reason (resubscribed, heartbeat, sequence)",
        &["reason"]
    )
    .expect("register aisle_invalidation_resyncs_total");
    for r in RESYNC_REASONS {
        resyncs.with_label_values(&[r]);
    }
    FleetMetrics {
        pending: register_int_gauge!(
            "aisle_invalidation_pending",
            "Invalidation writes (epochs, URI deletions, broadcasts) this instance could not get to Redis yet; re-sent when it answers"
        )
        .expect("register aisle_invalidation_pending"),
        dropped: register_int_counter!(
            "aisle_invalidation_outbox_dropped_total",
            "Invalidation writes dropped because the fleet outbox was full (other instances may not learn of them)"
        )
        .expect("register aisle_invalidation_outbox_dropped_total"),
        relayed: register_int_counter!(
            "aisle_invalidation_relayed_total",
            "Invalidation writes re-sent to Redis from the fleet outbox"
        )
        .expect("register aisle_invalidation_relayed_total"),
        resyncs,
    }
});

/// The fleet coherence metrics.
pub fn fleet_metrics() -> &'static FleetMetrics {
    &FLEET
}

/// Per-rule handles, resolved once when the rule is compiled.
#[derive(Debug)]
pub struct RuleMetrics {
    requests: [IntCounter; 6],
    duration: [Histogram; 6],
    saved: IntCounter,
    refresh_ahead: [IntCounter; 5],
    rule: Box<str>,
}

impl RuleMetrics {
    pub fn new(rule: &str) -> Self {
        let m = metrics();
        // The savings series exist (at 0) from the start, like the request counters: a counter
        // that appears only at its first increment loses that increment to `rate()` and
        // `increase()` in Prometheus (the first sample has nothing before it to differ from).
        m.cost_saved.with_label_values(&[rule]);
        m.tokens_saved.with_label_values(&[rule]);
        RuleMetrics {
            saved: m.saved_requests.with_label_values(&[rule]),
            refresh_ahead: RefreshResult::ALL
                .map(|r| REFRESH_AHEAD.with_label_values(&[rule, r.as_str()])),
            rule: rule.into(),
            requests: CacheOutcome::ALL.map(|o| m.requests.with_label_values(&[rule, o.as_str()])),
            duration: CacheOutcome::ALL
                .map(|o| m.request_duration.with_label_values(&[rule, o.as_str()])),
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, outcome: CacheOutcome, seconds: f64) {
        let i = outcome as usize;
        self.requests[i].inc();
        self.duration[i].observe(seconds);
        if matches!(outcome, CacheOutcome::Hit | CacheOutcome::Stale) {
            self.saved.inc();
        }
    }

    /// Counts what a hit saved (rules with `cost`).
    pub fn saved(&self, cost: f64, tokens: u64) {
        let m = metrics();
        m.cost_saved.with_label_values(&[&self.rule]).inc_by(cost);
        m.tokens_saved
            .with_label_values(&[&self.rule])
            .inc_by(tokens);
    }

    /// Counts one step of a refresh-ahead (`aisle_refresh_ahead_total`).
    pub fn refresh_ahead(&self, result: RefreshResult) {
        self.refresh_ahead[result as usize].inc();
    }

    /// Requests answered, by outcome.
    pub fn counts(&self) -> [(CacheOutcome, u64); 6] {
        CacheOutcome::ALL.map(|o| (o, self.requests[o as usize].get()))
    }
}

/// What became of a refresh-ahead (a rule's `refresh_ahead`), as counted in
/// `aisle_refresh_ahead_total{rule,result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshResult {
    /// A hit past the refresh point started a background refresh on this instance.
    Started,
    /// A hit past the refresh point found one already under way (here or, through Redis, on
    /// another instance), or the entry already replaced.
    Coalesced,
    /// The refresh stored a new entry (or the origin confirmed the old one: 304).
    Refreshed,
    /// The refresh got no storable answer; the entry stays until it expires.
    Failed,
    /// The upstream's quota had no room for background work: the refresh was skipped.
    Quota,
}

impl RefreshResult {
    pub const ALL: [RefreshResult; 5] = [
        RefreshResult::Started,
        RefreshResult::Coalesced,
        RefreshResult::Refreshed,
        RefreshResult::Failed,
        RefreshResult::Quota,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Started => "started",
            RefreshResult::Coalesced => "coalesced",
            RefreshResult::Refreshed => "refreshed",
            RefreshResult::Failed => "failed",
            RefreshResult::Quota => "quota",
        }
    }
}

static REFRESH_AHEAD: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_refresh_ahead_total",
        "Refresh-ahead of entries past their rule's refresh_ahead point, by rule and result (started, coalesced, refreshed, failed, quota)",
        &["rule", "result"]
    )
    .expect("register aisle_refresh_ahead_total")
});

/// The text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        tracing::warn!("encoding metrics failed: {e}");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Hot reload (issue 12): how many reloads were applied and how many were refused.
pub struct ReloadMetrics {
    /// `aisle_config_reloads_total{result="ok"}`: a new configuration was swapped in.
    pub ok: IntCounter,
    /// `aisle_config_reloads_total{result="error"}`: refused; the running one stays in force.
    pub error: IntCounter,
}

static RELOAD: Lazy<ReloadMetrics> = Lazy::new(|| {
    let reloads = register_int_counter_vec!(
        "aisle_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /admin/reload) by result: ok (swapped in) or error (refused, the running configuration stays in force)",
        &["result"]
    )
    .expect("register aisle_config_reloads_total");
    ReloadMetrics {
        ok: reloads.with_label_values(&["ok"]),
        error: reloads.with_label_values(&["error"]),
    }
});

/// The reload metrics (registered at first use; the server touches them at start so both
/// results show as 0 before any reload).
pub fn reload_metrics() -> &'static ReloadMetrics {
    &RELOAD
}

/// The region relay (issue 15). Every `peer` label value is a `[[region.peer]]` name from the
/// configuration, or `other` for a record from a region this one does not list.
pub struct RegionMetrics {
    /// `aisle_region_relay_lag_seconds{peer}`: from acceptance in `peer` to application here,
    /// measured by this (receiving) region from the record's acceptance time.
    pub lag: HistogramVec,
    /// `aisle_region_relay_backlog{peer}`: invalidations accepted here waiting for `peer`.
    pub backlog: IntGaugeVec,
    /// `aisle_region_relayed_total{peer}`: invalidations this instance delivered to `peer`.
    pub relayed: IntCounterVec,
    /// `aisle_region_applied_total{peer}`: invalidations from `peer` applied to this fleet.
    pub applied: IntCounterVec,
    /// `aisle_region_duplicates_total{peer}`: redeliveries from `peer` found already applied.
    pub duplicates: IntCounterVec,
    /// `aisle_region_malformed_total`: inbound records that could not be read (dropped, logged).
    pub malformed: IntCounter,
}

static REGION: Lazy<RegionMetrics> = Lazy::new(|| {
    RegionMetrics {
    lag: register_histogram_vec!(
        "aisle_region_relay_lag_seconds",
        "Time from an invalidation's acceptance in another region (peer) to its application to this region's fleet, measured here from the relayed record's acceptance time",
        &["peer"],
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
    )
    .expect("register aisle_region_relay_lag_seconds"),
    backlog: register_int_gauge_vec!(
        "aisle_region_relay_backlog",
        "Invalidations accepted in this region still waiting to be delivered to the peer region",
        &["peer"]
    )
    .expect("register aisle_region_relay_backlog"),
    relayed: register_int_counter_vec!(
        "aisle_region_relayed_total",
        "Invalidations this instance delivered to the peer region's inbound stream",
        &["peer"]
    )
    .expect("register aisle_region_relayed_total"),
    applied: register_int_counter_vec!(
        "aisle_region_applied_total",
        "Invalidations relayed from the peer region and applied to this region's fleet",
        &["peer"]
    )
    .expect("register aisle_region_applied_total"),
    duplicates: register_int_counter_vec!(
        "aisle_region_duplicates_total",
        "Redelivered invalidations from the peer region that were already applied here (skipped)",
        &["peer"]
    )
    .expect("register aisle_region_duplicates_total"),
    malformed: register_int_counter!(
        "aisle_region_malformed_total",
        "Inbound relay records that could not be read (dropped and logged)"
    )
    .expect("register aisle_region_malformed_total"),
}
});

/// The region relay metrics.
pub fn region_metrics() -> &'static RegionMetrics {
    &REGION
}
