//! Invalidation: turning "these tags / URLs / prefixes / events changed" into cache state, on
//! every instance, in Redis and at the CDNs, with a record of who asked.
//!
//! Every entry point (admin API, signed webhooks, `PURGE`, `Cache-Group-Invalidation` on unsafe
//! responses) builds an [`Request`]; [`Invalidator::plan`] validates it completely (events exist
//! and have their parameters, URLs parse) so a malformed request changes nothing, and
//! [`Invalidator::execute`] applies it: tag and prefix purges as epochs ([`epochs`]) shared
//! through Redis, URL purges by deleting every variant, a broadcast to the fleet, a durable CDN
//! purge job, an audit record and a live event. What Redis does not take waits in the fleet
//! outbox ([`crate::storage::redis::outbox`]) until the [`relay`] gets it through; the 202 answer
//! says which (`fleet`).

pub mod audit;
pub mod protection;
pub mod region;
pub mod relay;
pub mod subscriber;
pub mod webhook;

use crate::clock::now_ms;
use crate::key;
use crate::metrics::metrics;
use crate::purge::queue::PurgeQueue;
use crate::purge::PurgeJob;
use crate::rules::template::{escape_tag, tag_key};
use crate::rules::RuleSet;
use crate::storage::epochs::{Epoch, Epochs};
use crate::storage::redis::{Message, RedisTier};
use crate::storage::tiered::Tiered;
use audit::{Audit, AuditEntry};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Whether an invalidation also purges the CDNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cdn {
    /// Yes (admin API, PURGE).
    Always,
    /// Only for events declared with `cdn = true` (webhooks).
    EventsOnly,
    /// No (gateway-internal invalidations).
    Never,
}

/// One event to fire.
#[derive(Debug, Clone, PartialEq)]
pub struct EventCall {
    pub name: String,
    pub params: BTreeMap<String, Value>,
}

/// What someone asked to invalidate.
#[derive(Debug, Clone)]
pub struct Request {
    pub tags: Vec<String>,
    /// Absolute URLs (`https://host/path`).
    pub urls: Vec<String>,
    /// `host/path` prefixes (a scheme, if given, is ignored; the host is case-insensitive and
    /// its port ignored, the path is case-sensitive).
    pub prefixes: Vec<String>,
    pub events: Vec<EventCall>,
    pub soft: bool,
    pub source: String,
    pub actor: String,
    pub cdn: Cdn,
    /// Past any protection window (legal or privacy removal): applied as asked, and audited
    /// as forced.
    pub force: bool,
}

/// A validated request (kept as JSON while a protection window defers it, and relayed as JSON
/// to other regions).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Tags as entries carry them ([`tag_key`]).
    tags: Vec<String>,
    /// The same tags as the CDNs and the audit log are told (see [`tag_forms`]).
    told: Vec<String>,
    /// (original URL, host, path)
    urls: Vec<(String, String, String)>,
    prefixes: Vec<String>,
    events: Vec<String>,
    soft: bool,
    source: String,
    actor: String,
    cdn: bool,
    /// What protection windows did to it (for the answer and the audit record).
    protection: Option<Value>,
    /// A window defers it: [`Invalidator::execute`] keeps it instead of applying it.
    #[serde(default)]
    defer: bool,
    /// Set when another region accepted it ([`region`]): applied here under its id, never
    /// sent to the CDNs or relayed again.
    #[serde(default)]
    relayed: Option<region::Relayed>,
}

/// What an invalidation did.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Summary {
    pub id: String,
    pub tags: usize,
    pub urls: usize,
    pub prefixes: usize,
    /// `queued`, `none` or `unavailable`; `deferred` while a protection window keeps the purge.
    pub cdn: String,
    /// Whether the other instances have been told: `told` (Redis took every write), `pending`
    /// (some wait in the outbox and are re-sent when Redis answers), `lost` (the outbox was
    /// full), `none` (no Redis: no fleet), or `deferred` (kept until no deferring protection
    /// window is on; see [`protection`]).
    pub fleet: String,
    /// Set when a protection window changed what this did, or it was forced past one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protection: Option<Value>,
    /// With `[region]`: whether the other regions will get it: `queued` (every peer's outbound
    /// stream took it), `pending` (waits in memory for this region's Redis), `lost` (that
    /// memory queue was full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<String>,
}

/// Applies invalidations.
pub struct Invalidator {
    pub storage: &'static Tiered,
    pub epochs: Arc<Epochs>,
    pub redis: Option<Arc<RedisTier>>,
    pub queue: Option<Arc<PurgeQueue>>,
    pub audit: Arc<Audit>,
    seq: AtomicU64,
    /// How long purge epochs are kept: no entry outlives twice `[cache] max_ttl`.
    retention: std::time::Duration,
    /// Unix ms of the last pruning of old epochs.
    pruned_at: AtomicU64,
    /// Protection windows: while one is on, tag and prefix purges are softened.
    protection: Option<Arc<protection::Protection>>,
    /// `[region]`: where accepted invalidations are queued for the other regions.
    region: Option<Arc<region::Region>>,
}

/// The `source` label of `aisle_invalidations_total`: one of a fixed set, whatever the
/// request's `source` text says (`webhook:<name>` counts as `webhook`).
fn source_label(source: &str) -> &'static str {
    match source.split(':').next().unwrap_or("") {
        "admin" => "admin",
        "webhook" => "webhook",
        "purge-method" => "purge-method",
        "unsafe-request" => "unsafe-request",
        "region" => "region",
        _ => "other",
    }
}

/// Why a request cannot be planned: the message, and the input at fault as the admin API's
/// JSON names it (`tags[1]`, `events[0].name`, `events[0].params`, `urls[0]`, `prefixes[2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub field: String,
    pub message: String,
}

impl PlanError {
    fn at(field: String, message: String) -> Self {
        PlanError { field, message }
    }
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Longest tag sent to a CDN: Cloudflare and Fastly take tags of up to 1,024 bytes.
const CDN_TAG_LEN: usize = 1024;

/// The two forms of a tag someone purges: the key entries carry it under
/// ([`tag_key`]: escaped, cut to 256 bytes), and what the CDNs and the audit log are told (the
/// escaped tag, or the key when the escaped tag is too long for a CDN).
///
/// Any non-empty text is a tag: a raw value (`vendor-type:wedding planner`, in JSON) and its
/// rendered form (`vendor-type:wedding%20planner`, in a space-separated `Surrogate-Key`) both
/// name the entries a rule rendered from `wedding planner`.
fn tag_forms(t: &str) -> Result<(String, String), String> {
    if t.is_empty() {
        return Err("a tag must not be empty".to_string());
    }
    let escaped = escape_tag(t);
    let key = tag_key(&escaped).into_owned();
    let told = if escaped.len() <= CDN_TAG_LEN {
        escaped.into_owned()
    } else {
        key.clone()
    };
    Ok((key, told))
}

/// `https://Host.:8443/a/%62?x` -> ("host", "/a/b"): the host and path as keys and URI
/// identities hold them ([`key::normalize_host`], [`key::normalize_path`]).
fn url_parts(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let authority = uri.authority().ok_or_else(|| {
        format!("{url:?} must be absolute (https://host/path) so the host is known")
    })?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: a URL to purge has no user info (user@)"));
    }
    let host =
        key::normalize_host(authority.as_str().as_bytes()).map_err(|e| format!("{url:?}: {e}"))?;
    Ok((
        host.into_owned(),
        key::normalize_path(uri.path()).into_owned(),
    ))
}

impl Invalidator {
    pub fn new(
        storage: &'static Tiered,
        epochs: Arc<Epochs>,
        redis: Option<Arc<RedisTier>>,
        queue: Option<Arc<PurgeQueue>>,
        audit: Arc<Audit>,
        max_ttl: std::time::Duration,
    ) -> Self {
        Invalidator {
            storage,
            epochs,
            redis,
            queue,
            audit,
            seq: AtomicU64::new(0),
            retention: max_ttl * 2,
            pruned_at: AtomicU64::new(now_ms()),
            protection: None,
            region: None,
        }
    }

    /// Relays what this invalidator accepts to the other regions of `region`.
    pub fn with_region(mut self, region: Arc<region::Region>) -> Self {
        self.region = Some(region);
        self
    }

    /// The region relay, with `[region]`.
    pub fn region(&self) -> Option<&Arc<region::Region>> {
        self.region.as_ref()
    }

    /// The protection windows, when configured at start (`None` only in tests).
    pub fn protection(&self) -> Option<&Arc<protection::Protection>> {
        self.protection.as_ref()
    }

    /// The protection windows this invalidator obeys.
    pub fn with_protection(mut self, protection: Arc<protection::Protection>) -> Self {
        self.protection = Some(protection);
        self
    }

    /// Forgets epochs no entry can be old enough to need, at most once a minute.
    pub fn prune(&self, now: u64) {
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 60_000
            || self
                .pruned_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.epochs.prune(self.retention);
        if let Some(redis) = self.redis.clone() {
            let cutoff = now.saturating_sub(self.retention.as_millis() as u64);
            tokio::spawn(async move { redis.prune_epochs(cutoff).await });
        }
    }

    /// Checks everything a request names; an error says what is wrong, and which input
    /// (`tags[1]`, `events[0].params`), and nothing is applied.
    pub fn plan(&self, req: Request, rules: &RuleSet) -> Result<Plan, PlanError> {
        let mut tags = Vec::new();
        let mut told = Vec::new();
        let mut add = |t: &str| -> Result<(), String> {
            let (key, cdn) = tag_forms(t)?;
            tags.push(key);
            told.push(cdn);
            Ok(())
        };
        for (i, t) in req.tags.iter().enumerate() {
            add(t).map_err(|e| PlanError::at(format!("tags[{i}]"), e))?;
        }
        let mut cdn = req.cdn == Cdn::Always;
        let mut events = Vec::new();
        for (i, call) in req.events.iter().enumerate() {
            let def = rules.event(&call.name).ok_or_else(|| {
                PlanError::at(
                    format!("events[{i}].name"),
                    format!(
                        "unknown event {:?}; define it with [[event]] in a rules file",
                        call.name
                    ),
                )
            })?;
            let params = || format!("events[{i}].params");
            for t in def
                .tags(&call.params)
                .map_err(|e| PlanError::at(params(), e))?
            {
                add(&t).map_err(|e| PlanError::at(params(), e))?;
            }
            cdn |= req.cdn == Cdn::EventsOnly && def.cdn;
            events.push(call.name.clone());
        }
        let mut urls = Vec::new();
        for (i, u) in req.urls.iter().enumerate() {
            let (host, path) = url_parts(u).map_err(|e| PlanError::at(format!("urls[{i}]"), e))?;
            urls.push((u.clone(), host, path));
        }
        let mut prefixes = Vec::new();
        for (i, p) in req.prefixes.iter().enumerate() {
            // The host normalized, the path normalized but case-sensitive: as entries store it.
            prefixes.push(
                key::normalize_prefix(p).map_err(|e| PlanError::at(format!("prefixes[{i}]"), e))?,
            );
        }
        tags.sort();
        tags.dedup();
        told.sort();
        told.dedup();
        let mut plan = Plan {
            tags,
            told,
            urls,
            prefixes,
            events,
            soft: req.soft,
            source: req.source,
            actor: req.actor,
            cdn,
            protection: None,
            defer: false,
            relayed: None,
        };
        self.protect(&mut plan, req.force);
        Ok(plan)
    }

    /// What the protection windows on now do to `plan` (soften it, defer it, or note that it
    /// was forced past them).
    fn protect(&self, plan: &mut Plan, force: bool) {
        let (tags, prefixes, cdn) = (&plan.tags, &plan.prefixes, plan.cdn);
        let mut soft = plan.soft;
        let mut defer = false;
        let active = self.protection.as_ref().map(|p| p.active().clone());
        let protection = match active.filter(|a| a.any()) {
            None => None,
            Some(_) if force => Some(serde_json::json!({ "forced": true })),
            Some(a) if a.defer_purges => {
                // Kept as asked (not softened) and applied when no deferring window is on.
                defer = true;
                Some(serde_json::json!({
                    "windows": a.names,
                    "softened": false,
                    "deferred": a.defer_cdn && cdn,
                    "deferred_purge": true,
                }))
            }
            Some(a) => {
                // Tag and prefix purges mark answers stale instead of removing them; a URL
                // purge names one answer deliberately and stays as asked.
                let softened = a.soften && !soft && (!tags.is_empty() || !prefixes.is_empty());
                soft |= a.soften;
                Some(serde_json::json!({
                    "windows": a.names,
                    "softened": softened,
                    "deferred": a.defer_cdn && cdn,
                }))
            }
        };
        plan.soft = soft;
        plan.defer = defer;
        plan.protection = protection;
    }

    /// Applies an invalidation another region accepted (see [`region`]) to this region's
    /// fleet, under the id it was given there: epochs, deletes and broadcasts as for any
    /// invalidation, this region's protection windows obeyed, but never a CDN purge (the
    /// accepting region sends those, once per provider) and never relayed again.
    pub async fn apply_relayed(&self, mut plan: Plan, relayed: region::Relayed) -> Summary {
        plan.cdn = false;
        plan.defer = false;
        plan.protection = None;
        let force = relayed.force;
        plan.relayed = Some(relayed);
        self.protect(&mut plan, force);
        self.execute(plan).await
    }

    fn next_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let instance = self.redis.as_ref().map_or(0, |r| r.instance);
        format!("inv-{:x}-{instance:04x}-{n}", now_ms())
    }

    /// Applies a plan everywhere (or keeps it, while a window defers it).
    pub async fn execute(&self, mut plan: Plan) -> Summary {
        let id = match &plan.relayed {
            Some(r) => r.id.clone(),
            None => self.next_id(),
        };
        if plan.defer {
            match self.defer(&id, &mut plan).await {
                Some(summary) => return summary,
                None => plan.defer = false,
            }
        }
        let mark = self.redis.as_ref().map(|r| r.outbox.mark());
        let at_ms = now_ms();
        self.prune(at_ms);
        let epoch = Epoch {
            at_ms,
            soft: plan.soft,
        };
        let m = metrics();
        for tag in &plan.tags {
            self.epochs.purge_tag(tag, epoch);
        }
        for p in &plan.prefixes {
            self.epochs.purge_prefix(p, epoch);
        }
        for (_, host, path) in &plan.urls {
            self.storage.invalidate_uri(key::uri_id(host, path)).await;
        }
        if let Some(redis) = &self.redis {
            for tag in &plan.tags {
                redis
                    .save_epoch(&format!("t:{tag}"), at_ms, plan.soft)
                    .await;
                redis
                    .publish(&Message::Tag {
                        tag: tag.clone(),
                        at_ms,
                        soft: plan.soft,
                    })
                    .await;
            }
            for p in &plan.prefixes {
                redis.save_epoch(&format!("p:{p}"), at_ms, plan.soft).await;
                redis
                    .publish(&Message::Prefix {
                        prefix: p.clone(),
                        at_ms,
                        soft: plan.soft,
                    })
                    .await;
            }
        }
        let source_label = match plan.relayed {
            Some(_) => "region",
            None => source_label(&plan.source),
        };
        // What the other regions are sent: the plan as applied here, without this region's
        // protection notes (theirs apply there). RFC 9111 §4.4 invalidations stay in the
        // region the unsafe request went through, as they stay in the cache it passed.
        let relay = match (&self.region, &plan.relayed) {
            (Some(region), None) if plan.source != "unsafe-request" => {
                let mut copy = plan.clone();
                copy.protection = None;
                copy.defer = false;
                copy.cdn = false;
                let force = plan
                    .protection
                    .as_ref()
                    .is_some_and(|p| p["forced"] == Value::Bool(true));
                Some((region, copy, force))
            }
            _ => None,
        };
        let origin_region = plan.relayed.as_ref().map(|r| r.region.clone());
        for (kind, n) in [
            ("tag", plan.tags.len()),
            ("url", plan.urls.len()),
            ("prefix", plan.prefixes.len()),
        ] {
            if n > 0 {
                m.invalidations
                    .with_label_values(&[source_label, kind])
                    .inc_by(n as u64);
            }
        }
        let job = match (&self.queue, plan.cdn) {
            (Some(queue), true) => Some((
                queue,
                PurgeJob {
                    id: id.clone(),
                    tags: plan.told.clone(),
                    urls: plan.urls.iter().map(|(u, _, _)| u.clone()).collect(),
                    prefixes: plan.prefixes.clone(),
                    hosts: Vec::new(),
                    soft: plan.soft,
                    source: plan.source.clone(),
                    created_ms: at_ms,
                },
            )),
            _ => None,
        };
        let mut summary = Summary {
            id: id.clone(),
            tags: plan.tags.len(),
            urls: plan.urls.len(),
            prefixes: plan.prefixes.len(),
            cdn: if job.is_some() { "queued" } else { "none" }.to_string(),
            fleet: match (&self.redis, mark) {
                (Some(redis), Some(mark)) => redis.outbox.since(mark).as_str(),
                _ => "none",
            }
            .to_string(),
            protection: plan.protection.clone(),
            regions: None,
        };
        if summary.fleet != "told" && summary.fleet != "none" {
            tracing::warn!(
                "invalidation {id} is applied here, but Redis did not take it: the other \
                 instances are {} (aisle_invalidation_pending)",
                if summary.fleet == "lost" {
                    "not all going to learn of it"
                } else {
                    "told once Redis answers"
                }
            );
        }
        // Recorded before the job is queued, so the worker's first answer finds its record.
        self.audit.record(AuditEntry {
            id: id.clone(),
            at_ms,
            source: plan.source,
            actor: plan.actor,
            tags: plan.told,
            urls: plan.urls.into_iter().map(|(u, _, _)| u).collect(),
            prefixes: plan.prefixes,
            events: plan.events,
            soft: plan.soft,
            cdn: summary.cdn.clone(),
            cdn_answers: Vec::new(),
            refused: None,
            reload: None,
            protection: plan.protection,
            region: origin_region,
        });
        if let Some((queue, job)) = job {
            if let Err(e) = queue.enqueue(&job).await {
                tracing::error!("purge {id} could not be queued for the CDNs: {e}");
                summary.cdn = "unavailable".to_string();
                self.audit.set_cdn(&id, "unavailable");
            }
        }
        if let Some((region, copy, force)) = relay {
            summary.regions = Some(region.enqueue(&id, at_ms, &copy, force).await.to_string());
        }
        // Every epoch above is at or before this millisecond: answer once it is over.
        crate::clock::leave_this_ms().await;
        summary
    }
}

impl Invalidator {
    /// Keeps a deferred plan durably; answers and audits that. `None`: no store took it, so
    /// it is applied now (a purge is never lost to a window).
    async fn defer(&self, id: &str, plan: &mut Plan) -> Option<Summary> {
        let p = self.protection.as_ref()?;
        let mut kept_as = plan.protection.clone().unwrap_or(Value::Null);
        let stored = Plan {
            defer: false,
            protection: Some(
                serde_json::json!({ "deferred_id": id, "applied_after": kept_as["windows"] }),
            ),
            tags: plan.tags.clone(),
            told: plan.told.clone(),
            urls: plan.urls.clone(),
            prefixes: plan.prefixes.clone(),
            events: plan.events.clone(),
            soft: plan.soft,
            source: plan.source.clone(),
            actor: plan.actor.clone(),
            cdn: plan.cdn,
            relayed: plan.relayed.clone(),
        };
        let json = serde_json::to_string(&stored).ok()?;
        let store = match p.defer(&json).await {
            Ok(store) => store,
            Err(e) => {
                tracing::error!("invalidation {id} could not be deferred ({e}); applying it now");
                if let Some(v) = plan.protection.as_mut() {
                    v["deferred_purge"] = Value::Bool(false);
                    v["error"] = Value::from(e);
                }
                return None;
            }
        };
        kept_as["store"] = Value::from(store);
        let at_ms = now_ms();
        let cdn = if plan.cdn { "deferred" } else { "none" };
        self.audit.record(AuditEntry {
            id: id.to_string(),
            at_ms,
            source: plan.source.clone(),
            actor: plan.actor.clone(),
            tags: plan.told.clone(),
            urls: plan.urls.iter().map(|(u, _, _)| u.clone()).collect(),
            prefixes: plan.prefixes.clone(),
            events: plan.events.clone(),
            soft: plan.soft,
            cdn: cdn.to_string(),
            cdn_answers: Vec::new(),
            refused: None,
            reload: None,
            protection: Some(kept_as.clone()),
            region: plan.relayed.as_ref().map(|r| r.region.clone()),
        });
        Some(Summary {
            id: id.to_string(),
            tags: plan.tags.len(),
            urls: plan.urls.len(),
            prefixes: plan.prefixes.len(),
            cdn: cdn.to_string(),
            fleet: "deferred".to_string(),
            protection: Some(kept_as),
            regions: None,
        })
    }
}

/// Loads the fleet's purge epochs from Redis (at start and after a lost subscription, when
/// broadcasts may have been missed).
pub async fn load_epochs(redis: &RedisTier, epochs: &Epochs) {
    let Some(all) = redis.load_epochs().await else {
        return;
    };
    for (field, at_ms, soft) in all {
        apply_epoch(epochs, &field, Epoch { at_ms, soft });
    }
}

/// Applies one fleet epoch field (`t:<tag>`, `p:<prefix>`, `u:<uri hex>`) locally.
pub fn apply_epoch(epochs: &Epochs, field: &str, epoch: Epoch) {
    if let Some(tag) = field.strip_prefix("t:") {
        epochs.purge_tag(tag, epoch);
    } else if let Some(p) = field.strip_prefix("p:") {
        epochs.purge_prefix(p, epoch);
    } else if let Some(u) = field
        .strip_prefix("u:")
        .and_then(|u| u64::from_str_radix(u, 16).ok())
    {
        epochs.purge_uri(u, epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_need_a_host() {
        assert_eq!(
            url_parts("https://API.example.com:8443/a/b?x=1").unwrap(),
            ("api.example.com".into(), "/a/b".into())
        );
        // Normalized as keys are: trailing dot, escapes of unreserved characters; the path
        // keeps its case.
        assert_eq!(
            url_parts("http://Localhost.:8080/API/weddings/4%32/x").unwrap(),
            ("localhost".into(), "/API/weddings/42/x".into())
        );
        assert!(url_parts("http://a@h/x").is_err());
        assert!(url_parts("/a/b").unwrap_err().contains("absolute"));
    }

    /// A purge answers only after its millisecond is over, so an entry created by a request sent
    /// after the answer (a refill) is never judged purged by it, while everything created up to
    /// the purge still is. Without the wait, most of these purges and refills share a millisecond.
    #[tokio::test]
    async fn a_refill_after_the_answer_is_not_judged_purged() {
        use crate::storage::epochs::Verdict;
        use crate::storage::memory::MemoryStorage;
        use std::time::{Duration, SystemTime};
        let memory: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(1 << 20)));
        let epochs = Arc::new(Epochs::default());
        let wait = Duration::from_secs(1);
        let storage: &'static Tiered = Box::leak(Box::new(Tiered::new(
            memory,
            epochs.clone(),
            None,
            true,
            wait,
            wait,
        )));
        let audit = Arc::new(Audit::new(None).expect("an audit log without Redis"));
        let inv = Invalidator::new(storage, epochs.clone(), None, None, audit, wait);
        let rules = RuleSet::default();
        let uri = key::uri_id("h", "/a");
        for round in 0..50 {
            let before = SystemTime::now();
            let request = Request {
                tags: vec!["t".into()],
                urls: vec!["http://h/a".into()],
                prefixes: Vec::new(),
                events: Vec::new(),
                soft: false,
                source: "admin".into(),
                actor: "test".into(),
                cdn: Cdn::Never,
                force: false,
            };
            inv.execute(inv.plan(request, &rules).expect("a valid purge"))
                .await;
            assert!(
                matches!(epochs.judge(before, ["t"], "h/a", uri), Verdict::Gone),
                "round {round}: an entry created before the purge is purged"
            );
            let refill = SystemTime::now();
            assert!(
                matches!(epochs.judge(refill, ["t"], "h/a", uri), Verdict::Valid),
                "round {round}: a refill after the answer is kept"
            );
        }
    }

    /// Issue 9 item 13: metric labels come from a fixed set.
    #[test]
    fn invalidation_source_labels_are_bounded() {
        assert_eq!(source_label("webhook:tave"), "webhook");
        assert_eq!(source_label("admin"), "admin");
        assert_eq!(source_label("purge-method"), "purge-method");
        assert_eq!(source_label("unsafe-request"), "unsafe-request");
        assert_eq!(source_label("anything else:x"), "other");
    }

    /// Issue 9 item 10: a purge may name a tag by its raw value or its rendered form; both reach
    /// the key an entry carries. Long tags are cut for entries, and kept whole for CDNs up to
    /// their 1,024-byte limit.
    #[test]
    fn purged_tags_take_the_form_entries_carry() {
        let (raw, told) = tag_forms("vendor-type:wedding planner").unwrap();
        assert_eq!(raw, "vendor-type:wedding%20planner");
        assert_eq!(told, raw);
        assert_eq!(
            tag_forms("vendor-type:wedding%20planner").unwrap().0,
            raw,
            "the rendered form, as a space-separated Surrogate-Key names it"
        );
        assert_eq!(tag_forms("vendor:v-1").unwrap().0, "vendor:v-1");
        assert!(tag_forms("").unwrap_err().contains("empty"));
        let mid = format!("t:{}", "x".repeat(500));
        let (key, told) = tag_forms(&mid).unwrap();
        assert_eq!(key.len(), crate::rules::template::MAX_TAG_LEN);
        assert_eq!(told, mid, "the CDN is told the tag the origin sent it");
        let huge = format!("t:{}", "x".repeat(5000));
        let (key, told) = tag_forms(&huge).unwrap();
        assert_eq!(told, key, "too long for any CDN: the cut form");
    }
}
