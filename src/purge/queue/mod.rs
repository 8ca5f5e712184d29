//! The durable purge queue: where an accepted purge waits until every CDN has taken it.
//!
//! A job becomes one [`Item`] per (job, provider, batch), persisted before [`PurgeQueue::enqueue`]
//! returns, so a `202` is never lost. Two stores, one shape, and this facade choosing between
//! them:
//!
//! * **Redis** (`redis.rs`, when configured): shared by the fleet, each item leased to exactly one
//!   instance at a time, paced fleet-wide.
//! * **A local append-only log** (`local.rs`): the store when there is no Redis, and the spill when
//!   Redis is configured but unreachable: items spilled there are sent by this instance directly.
//!
//! Redis being down degrades, never corrupts: an enqueue spills to the file; a completion that
//! cannot reach Redis is remembered and applied when Redis answers again (and if this instance
//! dies first, the lease returns the item, so it is sent twice rather than lost). A reply lost
//! after Redis executed an enqueue can likewise leave an item in both stores: a purge sent twice
//! is harmless, a purge dropped is not. The sending, pacing and backoff live in
//! [`super::worker`].

pub(crate) mod local;
mod redis;

use self::local::{FileLog, LogState};
use self::redis::RedisStore;
use super::{AnswerSink, Batch, Provider, PurgeJob};
use crate::clock::now_ms;
use crate::metrics::metrics;
use crate::redis::Redis;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How the queue stores, retries and sends.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Directory of the local queue (`queue.log`): the store without Redis, the spill with it.
    pub dir: PathBuf,
    /// Failed attempts after which an item becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay (doubled per attempt, full jitter).
    pub backoff_base: Duration,
    /// Cap on the retry delay (a `Retry-After` may ask for longer and is honoured).
    pub backoff_max: Duration,
    /// How long a claimed Redis item belongs to the instance sending it; past it, a crashed
    /// instance's item goes back to the queue. Must exceed `send_timeout`.
    pub lease: Duration,
    /// Longest wait for a CDN's answer; no answer counts as a retryable failure.
    pub send_timeout: Duration,
    /// How often an idle worker looks for items enqueued by other instances.
    pub poll_interval: Duration,
    /// Sends in flight at once per provider (within its rate).
    pub concurrency: usize,
    /// On shutdown, how long sends in flight may take to finish.
    pub shutdown_grace: Duration,
}

impl QueueConfig {
    /// The defaults, with the local queue in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        QueueConfig {
            dir: dir.into(),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            send_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// One batch of one job for one provider, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// `<job id>-<provider>-<n>`: also the idempotency key sent to the CDN on every attempt.
    pub id: String,
    pub job: String,
    pub provider: String,
    pub batch: Batch,
    /// Attempts made so far.
    pub attempts: u32,
    /// Unix milliseconds before which the item is not sent (backoff, `Retry-After`).
    pub not_before_ms: u64,
    #[serde(default)]
    pub last_error: String,
    /// The job's `created_ms` (for the enqueue-to-done latency).
    #[serde(default)]
    pub created_ms: u64,
}

/// Per-provider counts, as seen from this instance (Redis counts are the fleet's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProviderStatus {
    pub provider: String,
    /// Waiting to be sent (including waiting for a retry).
    pub depth: u64,
    /// Claimed by a worker and being sent.
    pub in_flight: u64,
    pub dead_letters: u64,
    /// Of the above, how many are in this instance's local file (no Redis, or spilled).
    pub local: u64,
}

/// What `/admin` shows about the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    /// `up`, `down` (counts are then the local file's only) or `disabled`.
    pub redis: &'static str,
    pub depth: u64,
    pub in_flight: u64,
    pub dead_letters: u64,
    pub providers: Vec<ProviderStatus>,
}

/// The durable queue. Shared (`Arc`) by the admin API, the invalidation paths and the worker.
pub struct PurgeQueue {
    cfg: QueueConfig,
    providers: Vec<Arc<dyn Provider>>,
    redis: Option<RedisStore>,
    answers: Arc<dyn AnswerSink>,
    file: Arc<Mutex<FileLog>>,
    wake: HashMap<String, Arc<Notify>>,
}

/// Which store a claimed item came from (and so where its outcome is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Redis,
    File,
}

/// An item a worker is sending.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub item: Item,
    pub store: Store,
}

/// What a claim found.
#[derive(Debug)]
pub(crate) enum Claim {
    Item(Claimed),
    /// Nothing to send now; the earliest unix ms something may be (when known).
    Idle(Option<u64>),
}

/// How an attempt ended for the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Delivered: forget the item.
    Done,
    /// Back to the queue, with the item's updated attempts / `not_before_ms` / `last_error`.
    Retry,
    /// To the dead letters.
    Dead,
}

impl PurgeQueue {
    /// Opens the local queue (replaying what a previous run left), claims the queue's keyspace
    /// on `redis` and wires the providers; `answers` hears every CDN answer.
    pub fn new(
        cfg: QueueConfig,
        providers: Vec<Arc<dyn Provider>>,
        redis: Option<Arc<Redis>>,
        answers: Arc<dyn AnswerSink>,
    ) -> io::Result<Arc<Self>> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if cfg.max_attempts == 0 {
            return Err(invalid(
                "purge queue: max_attempts must be at least 1".into(),
            ));
        }
        if cfg.lease <= cfg.send_timeout {
            return Err(invalid(format!(
                "purge queue: the lease ({:?}) must exceed the send timeout ({:?})",
                cfg.lease, cfg.send_timeout
            )));
        }
        let mut wake = HashMap::new();
        for p in &providers {
            if wake
                .insert(p.name().to_string(), Arc::new(Notify::new()))
                .is_some()
            {
                return Err(invalid(format!(
                    "purge queue: two providers are named {:?}",
                    p.name()
                )));
            }
        }
        let redis = redis
            .map(RedisStore::new)
            .transpose()
            .map_err(io::Error::other)?;
        let file = FileLog::open(&cfg.dir)?;
        for p in file.providers() {
            if !wake.contains_key(&p) {
                tracing::warn!(
                    "the local purge queue holds items for provider {p:?}, which is not configured; they stay queued"
                );
            }
        }
        Ok(Arc::new(PurgeQueue {
            cfg,
            providers,
            redis,
            answers,
            file: Arc::new(Mutex::new(file)),
            wake,
        }))
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    pub fn providers(&self) -> &[Arc<dyn Provider>] {
        &self.providers
    }

    /// Where the worker reports each CDN answer.
    pub(crate) fn answers(&self) -> &dyn AnswerSink {
        &*self.answers
    }

    /// The notifier a provider's worker waits on (woken by local enqueues).
    pub(crate) fn waker(&self, provider: &str) -> Arc<Notify> {
        self.wake
            .get(provider)
            .cloned()
            .unwrap_or_else(|| Arc::new(Notify::new()))
    }

    fn wake_all(&self) {
        for n in self.wake.values() {
            n.notify_one();
        }
    }

    /// Runs `f` on the local log off the async threads (it writes and fsyncs).
    async fn with_file<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut FileLog) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&mut file.lock()))
            .await
            .map_err(|e| io::Error::other(format!("local purge queue task failed: {e}")))?
    }

    /// Persists one item per (job, provider, batch) before returning `Ok` (the number of items):
    /// after `Ok` the purge is never lost. Each provider's items go to Redis when it is configured
    /// and answers, else to the local file. `Err` only when neither could store them (items of
    /// other providers may be stored; enqueueing the job again does not duplicate them).
    pub async fn enqueue(&self, job: &PurgeJob) -> Result<usize, String> {
        let mut total = 0;
        for p in &self.providers {
            let name = p.name();
            let items: Vec<Item> = p
                .batches(job)
                .into_iter()
                .enumerate()
                .map(|(n, batch)| Item {
                    id: format!("{}-{}-{}", job.id, name, n),
                    job: job.id.clone(),
                    provider: name.to_string(),
                    batch,
                    attempts: 0,
                    not_before_ms: 0,
                    last_error: String::new(),
                    created_ms: job.created_ms,
                })
                .collect();
            if items.is_empty() {
                continue;
            }
            let n = items.len();
            let mut stored = false;
            if let Some(redis) = &self.redis {
                stored = redis.enqueue(name, &items).await;
                if !stored {
                    tracing::warn!(
                        "redis unavailable: purge job {} for {name} spilled to the local queue",
                        job.id
                    );
                }
            }
            if !stored {
                let items = items.clone();
                self.with_file(move |f| f.enqueue(items))
                    .await
                    .map_err(|e| {
                        format!(
                            "could not queue purge job {} for {name}: redis {}, local queue: {e}",
                            job.id,
                            if self.redis.is_some() {
                                "unavailable"
                            } else {
                                "not configured"
                            }
                        )
                    })?;
            }
            total += n;
            self.waker(name).notify_one();
        }
        Ok(total)
    }

    /// Counts per provider; also refreshes the queue gauges.
    pub async fn status(&self) -> QueueStatus {
        let mut st = QueueStatus {
            redis: if self.redis.is_some() {
                "up"
            } else {
                "disabled"
            },
            ..QueueStatus::default()
        };
        for p in &self.providers {
            let (ps, redis_up) = self.provider_status(p.name()).await;
            if !redis_up {
                st.redis = "down";
            }
            st.depth += ps.depth;
            st.in_flight += ps.in_flight;
            st.dead_letters += ps.dead_letters;
            st.providers.push(ps);
        }
        st
    }

    /// One provider's counts (and whether Redis answered), setting its gauges.
    pub(crate) async fn provider_status(&self, provider: &str) -> (ProviderStatus, bool) {
        let (depth, in_flight, dead) = self.file.lock().counts(provider);
        let mut ps = ProviderStatus {
            provider: provider.to_string(),
            depth,
            in_flight,
            dead_letters: dead,
            local: depth + in_flight + dead,
        };
        let mut redis_up = true;
        if let Some(redis) = &self.redis {
            match redis.counts(provider).await {
                Some((q, p, d)) => {
                    ps.depth += q;
                    ps.in_flight += p;
                    ps.dead_letters += d;
                }
                None => redis_up = false,
            }
        }
        let m = metrics();
        m.purge_queue_depth
            .with_label_values(&[provider])
            .set(ps.depth as i64);
        m.purge_dead_letters
            .with_label_values(&[provider])
            .set(ps.dead_letters as i64);
        (ps, redis_up)
    }

    /// Every dead letter (Redis' and the local file's), for inspection.
    pub async fn dead_letters(&self) -> Vec<Item> {
        let mut out = Vec::new();
        for p in &self.providers {
            out.extend(self.file.lock().dead(p.name()));
            if let Some(redis) = &self.redis {
                if let Some(items) = redis.dead(p.name()).await {
                    out.extend(items);
                }
            }
        }
        out
    }

    /// Moves every dead letter back to the queue, due now, with its attempts reset. Returns how
    /// many moved (dead letters in an unreachable Redis stay where they are).
    pub async fn retry_dead_letters(&self) -> usize {
        let mut moved = 0;
        let now = now_ms();
        for p in &self.providers {
            let revive = |mut item: Item| {
                item.attempts = 0;
                item.not_before_ms = now;
                item
            };
            let local: Vec<Item> = self
                .file
                .lock()
                .dead(p.name())
                .into_iter()
                .map(revive)
                .collect();
            if !local.is_empty() {
                let n = local.len();
                match self
                    .with_file(move |f| f.put(local, LogState::Queued, true))
                    .await
                {
                    Ok(()) => moved += n,
                    Err(e) => tracing::warn!("could not revive local dead letters: {e}"),
                }
            }
            if let Some(redis) = &self.redis {
                for item in redis.dead(p.name()).await.unwrap_or_default() {
                    if redis.revive(&revive(item), now).await {
                        moved += 1;
                    }
                }
            }
            self.provider_status(p.name()).await;
        }
        self.wake_all();
        moved
    }

    /// Takes the next item due for `provider`: the local file's first, then Redis' (through the
    /// fleet-wide pacing). Claimed Redis items are leased to this instance.
    pub(crate) async fn claim(&self, provider: &str) -> Claim {
        let local_next = match self.file.lock().claim(provider, now_ms()) {
            Ok(item) => {
                return Claim::Item(Claimed {
                    item,
                    store: Store::File,
                })
            }
            Err(next) => next,
        };
        let Some(redis) = &self.redis else {
            return Claim::Idle(local_next);
        };
        match redis
            .claim(provider, self.rate(provider), self.cfg.lease)
            .await
        {
            Ok(item) => Claim::Item(Claimed {
                item,
                store: Store::Redis,
            }),
            Err(redis_next) => Claim::Idle(match (redis_next, local_next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }),
        }
    }

    fn rate(&self, provider: &str) -> f64 {
        self.providers
            .iter()
            .find(|p| p.name() == provider)
            .map_or(f64::INFINITY, |p| p.rate())
    }

    /// Tells the fleet that `provider` asked for no request before `until_ms` (a 429's
    /// `Retry-After`): the claim script's limiter then holds every instance's claims until then.
    pub(crate) async fn pause_fleet(&self, provider: &str, until_ms: u64) {
        if let Some(redis) = &self.redis {
            redis.pause(provider, self.rate(provider), until_ms).await;
        }
    }

    /// Records how an attempt ended. Never fails: a store that cannot be written now is
    /// written later (Redis) or falls back to replaying an older state (the file) after a
    /// restart, which means an extra send, never a lost purge.
    pub(crate) async fn finish(&self, claimed: Claimed, finish: Finish) {
        match claimed.store {
            Store::File => {
                let item = claimed.item;
                let r = self
                    .with_file(move |f| match finish {
                        Finish::Done => f.done(&item.id),
                        Finish::Retry => f.put(vec![item], LogState::Queued, false),
                        Finish::Dead => f.put(vec![item], LogState::Dead, true),
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!("local purge queue: could not record an outcome: {e}");
                }
            }
            Store::Redis => match &self.redis {
                Some(redis) => redis.finish(claimed.item, finish).await,
                None => tracing::error!(
                    "purge item {} came from redis, which is not configured; its outcome is dropped",
                    claimed.item.id
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ms_after;
    use crate::purge::Kind;

    #[test]
    fn item_json_has_the_documented_fields() {
        let item = Item {
            id: "j-cf-0".into(),
            job: "j".into(),
            provider: "cf".into(),
            batch: Batch {
                kind: Kind::Urls,
                items: vec!["https://example.com/a".into()],
                soft: false,
            },
            attempts: 0,
            not_before_ms: 5,
            last_error: String::new(),
            created_ms: 1,
        };
        let v = serde_json::to_value(item).unwrap();
        for field in [
            "id",
            "job",
            "provider",
            "batch",
            "attempts",
            "not_before_ms",
            "last_error",
        ] {
            assert!(v.get(field).is_some(), "missing {field}: {v}");
        }
        assert_eq!(v["batch"]["kind"], "urls");
    }

    #[test]
    fn not_before_is_rounded_up() {
        let before = now_ms();
        let t = ms_after(Duration::from_micros(1500));
        assert!(t >= before + 2, "{t} vs {before}");
    }
}
