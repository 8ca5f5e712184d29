//! The durable purge queue: where an accepted purge waits until every CDN has taken it.
//!
//! A job becomes one [`Item`] per (job, provider, batch), persisted before [`PurgeQueue::enqueue`]
//! returns, so a `202` is never lost. Two stores, one shape:
//!
//! * **Redis** (when configured): shared by the fleet and surviving restarts (as far as Redis'
//!   own persistence goes). Per provider, in one cluster slot (`{provider}` hash tag):
//!   `{prefix}purge:{p}:items` (hash id -> item JSON), `:queue` (zset id by `not_before_ms`),
//!   `:processing` (zset id by lease deadline), `:dead` (zset id by time of death) and `:pace`
//!   (the fleet-wide rate limiter's state, which a `Retry-After` also moves forward). Every transition is one Lua script, so an item is in
//!   exactly one of queue / processing / dead and is handed to exactly one instance. An instance
//!   that dies mid-send leaves its items in `:processing`; once their lease passes, the next claim
//!   by any instance puts them back in the queue (sent again: at-least-once, never lost).
//! * **A local append-only log** (`<dir>/queue.log`, JSON lines, fsynced on enqueue), replayed on
//!   start and compacted when everything in it is done. It is the store when there is no Redis,
//!   and the spill when Redis is configured but unreachable: items spilled there are sent by this
//!   instance directly. The directory belongs to one gateway process.
//!
//! Redis being down degrades, never corrupts: an enqueue spills to the file; a completion that
//! cannot reach Redis is remembered and applied when Redis answers again (and if this instance
//! dies first, the lease returns the item, so it is sent twice rather than lost). A reply lost
//! after Redis executed an enqueue can likewise leave an item in both stores: a purge sent twice
//! is harmless, a purge dropped is not. The sending, pacing and backoff live in
//! [`super::worker`].

use super::{AnswerSink, Batch, Provider, PurgeJob};
use crate::metrics::metrics;
use crate::storage::redis::RedisTier;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
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
    redis: Option<Arc<RedisTier>>,
    answers: Arc<dyn AnswerSink>,
    file: Arc<Mutex<FileLog>>,
    /// Redis transitions that could not be applied yet (Redis unreachable), oldest first.
    pending: Mutex<Vec<Transition>>,
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

#[derive(Debug, Clone)]
struct Transition {
    item: Item,
    finish: Finish,
}

pub(crate) use crate::clock::{ms_after, now_ms};

/// The fleet-wide pacing of a provider: (ms between sends, ms of burst allowance).
fn pacing(rate: f64) -> (u64, u64) {
    if !rate.is_finite() || rate <= 0.0 {
        return (0, 0);
    }
    let interval = (1000.0 / rate).floor() as u64;
    let burst = rate.max(1.0).floor() as u64;
    (interval, interval * burst.saturating_sub(1))
}

impl PurgeQueue {
    /// Opens the local queue (replaying what a previous run left) and wires the providers.
    pub fn new(
        cfg: QueueConfig,
        providers: Vec<Arc<dyn Provider>>,
        redis: Option<Arc<RedisTier>>,
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
            pending: Mutex::new(Vec::new()),
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
                stored = self.redis_enqueue(redis, name, &items).await;
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
            let k = RKeys::new(&redis.prefix, provider);
            let mut pipe = redis::pipe();
            pipe.cmd("ZCARD").arg(&k.queue);
            pipe.cmd("ZCARD").arg(&k.processing);
            pipe.cmd("ZCARD").arg(&k.dead);
            match redis
                .background_pipe::<(u64, u64, u64)>("purge_status", &pipe)
                .await
            {
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
                let k = RKeys::new(&redis.prefix, p.name());
                if let Some(items) = redis_dead(redis, &k).await {
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
                let k = RKeys::new(&redis.prefix, p.name());
                for item in redis_dead(redis, &k).await.unwrap_or_default() {
                    let item = revive(item);
                    let Ok(json) = serde_json::to_string(&item) else {
                        continue;
                    };
                    let cmd = redis::cmd("EVAL")
                        .arg(REVIVE)
                        .arg(3)
                        .arg(&k.dead)
                        .arg(&k.items)
                        .arg(&k.queue)
                        .arg(&item.id)
                        .arg(json)
                        .arg(now)
                        .clone();
                    if redis.background::<i64>("purge_revive", &cmd).await == Some(1) {
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
        let now = now_ms();
        let local_next = match self.file.lock().claim(provider, now) {
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
        if !self.flush_pending(redis).await {
            return Claim::Idle(local_next);
        }
        let (interval, burst) = pacing(self.rate(provider));
        let k = RKeys::new(&redis.prefix, provider);
        // Orphans (an id without its item) are dropped by the script; bounded retries.
        for _ in 0..8 {
            let cmd = redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(4)
                .arg(&k.queue)
                .arg(&k.processing)
                .arg(&k.items)
                .arg(&k.pace)
                .arg(now_ms())
                .arg(self.cfg.lease.as_millis() as u64)
                .arg(interval)
                .arg(burst)
                .clone();
            let Some((status, value)) = redis
                .background::<(i64, redis::Value)>("purge_claim", &cmd)
                .await
            else {
                return Claim::Idle(local_next);
            };
            match status {
                1 => {
                    let raw: String = redis::from_redis_value(value).unwrap_or_default();
                    match serde_json::from_str::<Item>(&raw) {
                        Ok(item) => {
                            return Claim::Item(Claimed {
                                item,
                                store: Store::Redis,
                            })
                        }
                        Err(e) => {
                            tracing::error!(
                                "unreadable purge item in redis ({e}); moved to the dead letters: {raw}"
                            );
                            self.redis_bury_raw(redis, &k, &raw).await;
                        }
                    }
                }
                2 => tracing::warn!("dropped a purge queue id without an item: {value:?}"),
                _ => {
                    let due: i64 = redis::from_redis_value(value).unwrap_or(-1);
                    let due = (due >= 0).then_some(due as u64);
                    let next = match (due, local_next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    return Claim::Idle(next);
                }
            }
        }
        Claim::Idle(local_next)
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
        let Some(redis) = &self.redis else {
            return;
        };
        let (_, burst) = pacing(self.rate(provider));
        let k = RKeys::new(&redis.prefix, provider);
        let cmd = redis::cmd("EVAL")
            .arg(PAUSE)
            .arg(1)
            .arg(&k.pace)
            .arg(until_ms + burst)
            .arg(now_ms())
            .clone();
        let _ = redis.background::<i64>("purge_pause", &cmd).await;
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
            Store::Redis => {
                let t = Transition {
                    item: claimed.item,
                    finish,
                };
                let applied = match &self.redis {
                    Some(redis) => self.flush_pending(redis).await && redis_apply(redis, &t).await,
                    None => false,
                };
                if !applied {
                    tracing::warn!(
                        "redis unavailable: the outcome of purge item {} is applied when it is back",
                        t.item.id
                    );
                    self.pending.lock().push(t);
                }
            }
        }
    }

    /// Applies the remembered Redis transitions; `false` while Redis still does not answer.
    async fn flush_pending(&self, redis: &RedisTier) -> bool {
        loop {
            let next = self.pending.lock().first().cloned();
            let Some(t) = next else {
                return true;
            };
            if !redis_apply(redis, &t).await {
                return false;
            }
            let mut pending = self.pending.lock();
            if let Some(i) = pending.iter().position(|p| p.item.id == t.item.id) {
                pending.remove(i);
            }
        }
    }

    async fn redis_enqueue(&self, redis: &RedisTier, provider: &str, items: &[Item]) -> bool {
        let k = RKeys::new(&redis.prefix, provider);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ENQUEUE).arg(2).arg(&k.items).arg(&k.queue);
        for item in items {
            let Ok(json) = serde_json::to_string(item) else {
                return false;
            };
            cmd.arg(&item.id).arg(json).arg(item.not_before_ms);
        }
        redis
            .background::<i64>("purge_enqueue", &cmd)
            .await
            .is_some()
    }

    async fn redis_bury_raw(&self, redis: &RedisTier, k: &RKeys, raw: &str) {
        // The id is unknown when the JSON does not parse; find it by value.
        let id_cmd = redis::cmd("HGETALL").arg(&k.items).clone();
        let all: HashMap<String, String> = redis
            .background("purge_bury", &id_cmd)
            .await
            .unwrap_or_default();
        for (id, v) in all {
            if v == raw {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("ZREM")
                    .arg(&k.processing)
                    .arg(&id)
                    .ignore()
                    .cmd("ZADD")
                    .arg(&k.dead)
                    .arg(now_ms())
                    .arg(&id)
                    .ignore();
                let _ = redis.background_pipe::<()>("purge_bury", &pipe).await;
            }
        }
    }
}

/// Reads a provider's dead letters from Redis. `None`: Redis unavailable.
async fn redis_dead(redis: &RedisTier, k: &RKeys) -> Option<Vec<Item>> {
    let ids: Vec<String> = redis
        .background(
            "purge_dead",
            redis::cmd("ZRANGE").arg(&k.dead).arg(0).arg(-1),
        )
        .await?;
    if ids.is_empty() {
        return Some(Vec::new());
    }
    let raws: Vec<Option<String>> = redis
        .background("purge_dead", redis::cmd("HMGET").arg(&k.items).arg(&ids))
        .await?;
    Some(
        raws.into_iter()
            .flatten()
            .filter_map(|raw| serde_json::from_str(&raw).ok())
            .collect(),
    )
}

/// Applies one transition of a leased item; `false` when Redis did not answer.
async fn redis_apply(redis: &RedisTier, t: &Transition) -> bool {
    let k = RKeys::new(&redis.prefix, &t.item.provider);
    let id = &t.item.id;
    match t.finish {
        Finish::Done => {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("ZREM")
                .arg(&k.processing)
                .arg(id)
                .ignore()
                .cmd("ZREM")
                .arg(&k.queue)
                .arg(id)
                .ignore()
                .cmd("HDEL")
                .arg(&k.items)
                .arg(id)
                .ignore();
            redis
                .background_pipe::<()>("purge_done", &pipe)
                .await
                .is_some()
        }
        Finish::Retry | Finish::Dead => {
            let Ok(json) = serde_json::to_string(&t.item) else {
                return true;
            };
            let (target, score) = if t.finish == Finish::Retry {
                (&k.queue, t.item.not_before_ms)
            } else {
                (&k.dead, now_ms())
            };
            let cmd = redis::cmd("EVAL")
                .arg(RESCHEDULE)
                .arg(3)
                .arg(&k.processing)
                .arg(&k.items)
                .arg(target)
                .arg(id)
                .arg(json)
                .arg(score)
                .clone();
            redis
                .background::<i64>("purge_reschedule", &cmd)
                .await
                .is_some()
        }
    }
}

/// One provider's Redis keys (one `{provider}` hash tag: one cluster slot, so scripts work).
struct RKeys {
    items: String,
    queue: String,
    processing: String,
    dead: String,
    pace: String,
}

impl RKeys {
    fn new(prefix: &str, provider: &str) -> Self {
        let base = format!("{prefix}purge:{{{provider}}}");
        RKeys {
            items: format!("{base}:items"),
            queue: format!("{base}:queue"),
            processing: format!("{base}:processing"),
            dead: format!("{base}:dead"),
            pace: format!("{base}:pace"),
        }
    }
}

/// KEYS: items, queue. ARGV: (id, json, not_before_ms)*. An id already stored is left alone,
/// so enqueueing a job twice does not duplicate it.
const ENQUEUE: &str = r"
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  end
  n = n + 1
end
return n
";

/// KEYS: queue, processing, items, pace. ARGV: now ms, lease ms, pacing interval ms, burst ms.
/// Returns {1, item json} (now leased to the caller), {0, next due ms or -1} (nothing due, or
/// the fleet's pace says wait), or {2, id} (an id without an item, dropped).
const CLAIM: &str = r"
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return {0, -1} end
local due = tonumber(first[2])
if due > now then return {0, due} end
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
if tat - now > burst then return {0, tat - burst} end
local id = first[1]
redis.call('ZREM', KEYS[1], id)
local item = redis.call('HGET', KEYS[3], id)
if not item then return {2, id} end
if interval > 0 then
  redis.call('SET', KEYS[4], tat + interval, 'PX', tat + interval - now + 1000)
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
return {1, item}
";

/// KEYS: pace. ARGV: the limiter's new earliest state, now. Moves the fleet's limiter forward
/// (never back), so claims wait until `ARGV[1] - burst`.
const PAUSE: &str = r"
local t = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if t < want then
  redis.call('SET', KEYS[1], want, 'PX', want - tonumber(ARGV[2]) + 1000)
end
return 1
";

/// KEYS: processing, items, target zset. ARGV: id, json, score. Only an item still leased moves
/// (one whose lease passed may already be another instance's).
const RESCHEDULE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  return 1
end
return 0
";

/// KEYS: dead, items, queue. ARGV: id, new json, now. Moves a dead letter back to the queue
/// unless another caller did already.
const REVIVE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
";

// ---------------------------------------------------------------------------------------------
// The local append-only log
// ---------------------------------------------------------------------------------------------

/// Where an item is, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogState {
    Queued,
    Dead,
}

/// One line of `queue.log`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LogLine {
    /// The item's current state (enqueue, retry, dead letter, revival).
    Put { state: LogState, item: Item },
    /// Delivered: forget it.
    Done { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight,
    Dead,
}

#[derive(Debug)]
struct Entry {
    item: Item,
    state: State,
    /// Order of first enqueue (FIFO among items due at the same time).
    seq: u64,
}

/// Records written before a rewrite is considered, and how many times the live count they
/// must exceed.
const COMPACT_MIN_RECORDS: u64 = 1024;
const COMPACT_RATIO: u64 = 4;

/// `queue.log`: the records on disk and the state they add up to.
struct FileLog {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file (a failed write is cut back to it).
    len: u64,
    records: u64,
    entries: HashMap<String, Entry>,
    seq: u64,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileLog {
    /// Opens (creating) `<dir>/queue.log`, replays it, drops a torn last line, and rewrites it
    /// with the live items only. Items that were in flight when the process stopped are queued.
    fn open(dir: &Path) -> io::Result<FileLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("queue.log");
        let mut text = String::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_string(&mut text)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = FileLog {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file: OpenOptions::new().create(true).append(true).open(&path)?,
            len: 0,
            records: 0,
            entries: HashMap::new(),
            seq: 0,
        };
        // Only newline-terminated records count: a torn tail was never acknowledged.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(
                "{}: dropping a torn last record ({} bytes)",
                path.display(),
                text.len() - whole
            );
        }
        for (n, line) in text[..whole].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<LogLine>(line) {
                Ok(r) => log.apply(r),
                Err(e) => tracing::warn!("{}:{}: unreadable record: {e}", path.display(), n + 1),
            }
            log.records += 1;
        }
        log.len = whole as u64;
        if whole < text.len() {
            log.file.set_len(log.len)?;
        }
        sync_dir(dir)?;
        if log.records > log.entries.len() as u64 {
            log.compact()?;
        }
        Ok(log)
    }

    fn apply(&mut self, r: LogLine) {
        match r {
            LogLine::Put { state, item } => {
                let state = match state {
                    LogState::Queued => State::Queued,
                    LogState::Dead => State::Dead,
                };
                let seq = match self.entries.get(&item.id) {
                    Some(e) => e.seq,
                    None => {
                        self.seq += 1;
                        self.seq
                    }
                };
                self.entries
                    .insert(item.id.clone(), Entry { item, state, seq });
            }
            LogLine::Done { id } => {
                self.entries.remove(&id);
            }
        }
    }

    /// Appends records (all or nothing: a failed write is cut back), optionally fsynced, then
    /// applies them. `Err`: nothing was recorded.
    fn append(&mut self, records: Vec<LogLine>, sync: bool) -> io::Result<()> {
        let mut buf = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let written =
            self.file.write_all(&buf).and_then(
                |()| {
                    if sync {
                        self.file.sync_data()
                    } else {
                        Ok(())
                    }
                },
            );
        if let Err(e) = written {
            if let Err(e2) = self.file.set_len(self.len) {
                tracing::error!(
                    "{}: could not cut a failed write: {e2}",
                    self.path.display()
                );
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.records += records.len() as u64;
        for r in records {
            self.apply(r);
        }
        Ok(())
    }

    /// Records new items, fsynced; ids already in the log (a job enqueued twice) are left as
    /// they are.
    fn enqueue(&mut self, items: Vec<Item>) -> io::Result<()> {
        let new: Vec<Item> = items
            .into_iter()
            .filter(|i| !self.entries.contains_key(&i.id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.put(new, LogState::Queued, true)
    }

    fn put(&mut self, items: Vec<Item>, state: LogState, sync: bool) -> io::Result<()> {
        let records = items
            .iter()
            .map(|item| LogLine::Put {
                state,
                item: item.clone(),
            })
            .collect();
        let r = self.append(records, sync);
        if r.is_err() {
            // Not recorded, but a claimed item must not get stuck in flight: keep the new
            // state in memory (a restart replays the older one: an extra send at worst).
            for item in items {
                if let Some(e) = self.entries.get_mut(&item.id) {
                    if e.state == State::InFlight {
                        e.state = match state {
                            LogState::Queued => State::Queued,
                            LogState::Dead => State::Dead,
                        };
                        e.item = item;
                    }
                }
            }
        }
        r
    }

    fn done(&mut self, id: &str) -> io::Result<()> {
        let r = self.append(vec![LogLine::Done { id: id.to_string() }], false);
        // Delivered either way; an unrecorded completion means one extra send after a restart.
        self.entries.remove(id);
        self.maybe_compact();
        r
    }

    /// The next queued item of `provider` due at `now` (marked in flight), or the earliest
    /// `not_before_ms` among its queued items.
    fn claim(&mut self, provider: &str, now: u64) -> Result<Item, Option<u64>> {
        let mut best: Option<(&String, u64, u64)> = None;
        let mut next: Option<u64> = None;
        for (id, e) in &self.entries {
            if e.state != State::Queued || e.item.provider != provider {
                continue;
            }
            let due = e.item.not_before_ms;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            if best.is_none_or(|(_, d, s)| (due, e.seq) < (d, s)) {
                best = Some((id, due, e.seq));
            }
        }
        let Some((id, _, _)) = best else {
            return Err(next);
        };
        let id = id.clone();
        let e = self.entries.get_mut(&id).expect("claimed entry exists");
        e.state = State::InFlight;
        Ok(e.item.clone())
    }

    /// (queued, in flight, dead) for `provider`.
    fn counts(&self, provider: &str) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for e in self
            .entries
            .values()
            .filter(|e| e.item.provider == provider)
        {
            match e.state {
                State::Queued => c.0 += 1,
                State::InFlight => c.1 += 1,
                State::Dead => c.2 += 1,
            }
        }
        c
    }

    fn dead(&self, provider: &str) -> Vec<Item> {
        let mut v: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.state == State::Dead && e.item.provider == provider)
            .collect();
        v.sort_by_key(|e| e.seq);
        v.into_iter().map(|e| e.item.clone()).collect()
    }

    fn providers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .values()
            .map(|e| e.item.provider.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn maybe_compact(&mut self) {
        let live = self.entries.len() as u64;
        let due = if live == 0 {
            self.records > 0
        } else {
            self.records >= COMPACT_MIN_RECORDS && self.records >= COMPACT_RATIO * live
        };
        if due {
            if let Err(e) = self.compact() {
                tracing::warn!("{}: compaction failed: {e}", self.path.display());
            }
        }
    }

    /// Empty when nothing is live; otherwise rewritten (temp file, fsync, rename) with one
    /// record per live item.
    fn compact(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            self.len = 0;
            self.records = 0;
            return Ok(());
        }
        let mut live: Vec<&Entry> = self.entries.values().collect();
        live.sort_by_key(|e| e.seq);
        let mut buf = Vec::new();
        for e in &live {
            let state = if e.state == State::Dead {
                LogState::Dead
            } else {
                LogState::Queued
            };
            serde_json::to_writer(
                &mut buf,
                &LogLine::Put {
                    state,
                    item: e.item.clone(),
                },
            )?;
            buf.push(b'\n');
        }
        let tmp = self.dir.join("queue.log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = buf.len() as u64;
        self.records = live.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::Kind;

    fn item(id: &str, provider: &str, not_before_ms: u64) -> Item {
        Item {
            id: id.into(),
            job: "job".into(),
            provider: provider.into(),
            batch: Batch {
                kind: Kind::Urls,
                items: vec![format!("https://example.com/{id}")],
                soft: false,
            },
            attempts: 0,
            not_before_ms,
            last_error: String::new(),
            created_ms: 1,
        }
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("queue.log"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn item_json_has_the_documented_fields() {
        let v = serde_json::to_value(item("j-cf-0", "cf", 5)).unwrap();
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
    fn log_replays_puts_and_dones_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(
                vec![item("a", "cf", 0), item("b", "cf", 0), item("c", "fa", 0)],
                LogState::Queued,
                true,
            )
            .unwrap();
            let claimed = log.claim("cf", 10).unwrap();
            assert_eq!(claimed.id, "a", "FIFO among items due");
            let mut retried = claimed;
            retried.attempts = 1;
            retried.not_before_ms = 500;
            log.put(vec![retried], LogState::Queued, false).unwrap();
            let b = log.claim("cf", 10).unwrap();
            assert_eq!(b.id, "b");
            log.put(vec![b], LogState::Dead, true).unwrap();
            assert_eq!(
                log.claim("cf", 10),
                Err(Some(500)),
                "a waits for its backoff"
            );
            log.done("c").unwrap();
        }
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 1));
        assert_eq!(log.counts("fa"), (0, 0, 0));
        assert_eq!(log.entries["a"].item.attempts, 1);
        assert_eq!(log.entries["a"].item.not_before_ms, 500);
        assert_eq!(log.dead("cf")[0].id, "b");
        assert_eq!(
            lines(dir.path()).len(),
            2,
            "compacted to the live items on open"
        );
    }

    #[test]
    fn in_flight_items_are_queued_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(vec![item("a", "cf", 0)], LogState::Queued, true)
                .unwrap();
            assert!(log.claim("cf", 1).is_ok());
            assert_eq!(log.counts("cf"), (0, 1, 0));
        }
        let mut log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 0));
        assert_eq!(log.claim("cf", 1).unwrap().id, "a");
    }

    #[test]
    fn enqueueing_an_item_again_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.enqueue(vec![item("a", "cf", 0)]).unwrap();
        assert!(log.claim("cf", 1).is_ok());
        log.enqueue(vec![item("a", "cf", 0), item("b", "cf", 0)])
            .unwrap();
        assert_eq!(log.counts("cf"), (1, 1, 0), "a stays in flight, b is new");
        assert_eq!(lines(dir.path()).len(), 2);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_later_appends_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(vec![item("a", "cf", 0)], LogState::Queued, true)
                .unwrap();
        }
        let path = dir.path().join("queue.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"put","state":"queued","item":{"id":"tor"#)
            .unwrap();
        drop(f);
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            assert_eq!(log.counts("cf"), (1, 0, 0));
            log.put(vec![item("b", "cf", 0)], LogState::Queued, true)
                .unwrap();
        }
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (2, 0, 0));
        for line in lines(dir.path()) {
            serde_json::from_str::<LogLine>(&line).expect("every line is a whole record");
        }
    }

    #[test]
    fn the_log_is_emptied_when_everything_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.put(
            vec![item("a", "cf", 0), item("b", "cf", 0)],
            LogState::Queued,
            true,
        )
        .unwrap();
        log.done("a").unwrap();
        assert_eq!(
            lines(dir.path()).len(),
            3,
            "b is still live: no compaction yet"
        );
        log.done("b").unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("queue.log"))
                .unwrap()
                .len(),
            0
        );
        log.put(vec![item("c", "cf", 0)], LogState::Queued, true)
            .unwrap();
        drop(log);
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(
            log.counts("cf"),
            (1, 0, 0),
            "appends after truncation are replayed"
        );
    }

    #[test]
    fn a_long_log_is_rewritten_with_the_live_items() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.put(vec![item("keep", "cf", 0)], LogState::Queued, true)
            .unwrap();
        for i in 0..COMPACT_MIN_RECORDS {
            let id = format!("t{i}");
            log.put(vec![item(&id, "cf", 0)], LogState::Queued, false)
                .unwrap();
            log.done(&id).unwrap();
        }
        assert!(
            log.records < COMPACT_MIN_RECORDS,
            "rewritten: {} records",
            log.records
        );
        drop(log);
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 0));
        assert!(log.entries.contains_key("keep"));
    }

    #[test]
    fn pacing_spaces_sends_by_the_rate() {
        assert_eq!(pacing(10.0), (100, 900));
        assert_eq!(pacing(0.5), (2000, 0));
        assert_eq!(pacing(f64::INFINITY), (0, 0));
        assert_eq!(pacing(0.0), (0, 0));
    }

    #[test]
    fn not_before_is_rounded_up() {
        let before = now_ms();
        let t = ms_after(Duration::from_micros(1500));
        assert!(t >= before + 2, "{t} vs {before}");
    }
}
