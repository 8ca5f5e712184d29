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
//! A claim takes up to a request's worth of due items of one provider and joins those that fit
//! into one [`Batch`] ([`Claimed`]): 3000 queued single-tag purges go to Cloudflare as 30
//! requests of 100 tags, while each item keeps its own id, job (audit record) and outcome.
//!
//! Redis being down degrades, never corrupts: an enqueue spills to the file; a completion that
//! cannot reach Redis is remembered and applied when Redis answers again (and if this instance
//! dies first, the lease returns the item, so it is sent twice rather than lost). A reply lost
//! after Redis executed an enqueue can likewise leave an item in both stores: a purge sent twice
//! is harmless, a purge dropped is not. The sending, pacing and backoff live in
//! [`super::worker`].
//!
//! The provider set is swappable ([`PurgeQueue::set_providers`], called by a reload): items are
//! stored by provider name, so a provider whose settings changed keeps its queue (sent with the
//! new settings), and one that was removed keeps its items queued, shown in `/admin/purges` as
//! not configured, and sent if a provider of that name comes back. What a provider cannot send
//! is counted per provider ([`ProviderStatus::skipped`]) with the latest examples.

pub(crate) mod local;
mod redis;

use self::local::{FileLog, LogState};
use self::redis::RedisStore;
use super::{AnswerSink, Batch, Kind, Provider, PurgeJob, Skipped, SKIPPED_TOTAL};
use crate::clock::now_ms;
use crate::config::PurgeConfig;
use crate::metrics::metrics;
use crate::redis::Redis;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
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
    /// Failed attempts after which an item becomes a dead letter; `None`: no limit (only
    /// `give_up_after`). `429` / `Retry-After` answers are pacing and never count.
    pub max_attempts: Option<u32>,
    /// How long after its acceptance an item is still retried; past it, a failure makes it a
    /// dead letter.
    pub give_up_after: Duration,
    /// First retry delay (doubled per attempt, full jitter).
    pub backoff_base: Duration,
    /// Cap on the retry delay (a `Retry-After` may ask for longer and is honoured).
    pub backoff_max: Duration,
    /// How long a claimed Redis item belongs to the instance sending it; the worker renews it
    /// every third of it while the send lasts, so only a dead instance's lease runs out.
    pub lease: Duration,
    /// This instance's name on its Redis leases, stable across restarts so a restarted instance
    /// takes its own leased items back at once; empty: read from (or created in)
    /// `dir/instance-id`.
    pub instance: String,
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
            max_attempts: None,
            give_up_after: Duration::from_secs(86_400),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            lease: Duration::from_secs(15),
            instance: String::new(),
            send_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// The queue as `[purge]` configures it (the rest at its defaults).
    pub fn from_config(p: &PurgeConfig) -> Self {
        QueueConfig {
            max_attempts: p.max_attempts,
            give_up_after: p.give_up_after,
            backoff_base: p.backoff_base,
            backoff_max: p.backoff_max,
            lease: p.lease,
            instance: p.instance_id.clone().unwrap_or_default(),
            ..QueueConfig::new(&p.dir)
        }
    }
}

/// Most items one claim takes (a request's worth, whatever the provider's limit).
const MAX_CLAIM: usize = 1000;

/// The instance id persisted in `dir/instance-id`, created (random) on first use.
fn instance_id(dir: &std::path::Path) -> io::Result<String> {
    let path = dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use aes_gcm::aead::rand_core::RngCore;
    let mut bytes = [0u8; 8];
    aes_gcm::aead::OsRng.fill_bytes(&mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join("instance-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
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

/// How many skipped items each provider keeps as examples for `/admin/purges`.
const SKIPPED_EXAMPLES: usize = 20;

/// One item of an accepted purge a provider was not sent, as `/admin/purges` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedItem {
    pub job: String,
    pub kind: Kind,
    pub item: String,
    /// `unsupported`, `unmapped` or `invalid`.
    pub reason: &'static str,
    pub at_ms: u64,
}

/// What one provider was not sent since this instance started.
#[derive(Debug, Default)]
struct SkipLog {
    total: u64,
    recent: VecDeque<SkippedItem>,
}

/// Per-provider counts, as seen from this instance (Redis counts are the fleet's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProviderStatus {
    pub provider: String,
    /// `false` for a provider no longer in `[cdn]` whose items are still queued here.
    pub configured: bool,
    /// Waiting to be sent (including waiting for a retry).
    pub depth: u64,
    /// Claimed by a worker and being sent.
    pub in_flight: u64,
    pub dead_letters: u64,
    /// Of the above, how many are in this instance's local file (no Redis, or spilled).
    pub local: u64,
    /// Items of accepted purges this provider was not sent, since this instance started (its
    /// API has no such purge, a CloudFront tag without `tag_paths`, or one the API would
    /// refuse); `aisle_purge_skipped_total` counts them too.
    pub skipped: u64,
    /// The latest of those (at most 20), oldest first.
    pub skipped_recent: Vec<SkippedItem>,
}

/// What `/admin` shows about the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    /// `up`, `down` (counts are then the local file's only) or `disabled`.
    pub redis: &'static str,
    pub depth: u64,
    pub in_flight: u64,
    pub dead_letters: u64,
    /// Held by a protection window that defers CDN purges: `depth` waits for its end.
    pub held: bool,
    pub providers: Vec<ProviderStatus>,
}

/// The durable queue. Shared (`Arc`) by the admin API, the invalidation paths and the worker.
pub struct PurgeQueue {
    cfg: QueueConfig,
    /// The providers in force; a reload swaps the whole set ([`Self::set_providers`]).
    providers: ArcSwap<Vec<Arc<dyn Provider>>>,
    /// Bumped on every swap: the worker restarts its loops on the new set.
    generation: tokio::sync::watch::Sender<u64>,
    /// Providers no longer configured (removed by a reload, or named in the local file at
    /// start) whose items may still be queued.
    retired: Mutex<BTreeSet<String>>,
    skipped: Mutex<HashMap<String, SkipLog>>,
    redis: Option<RedisStore>,
    answers: Arc<dyn AnswerSink>,
    file: Arc<Mutex<FileLog>>,
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per provider: nothing is sent before this instant (a `Retry-After`), shared by the
    /// worker's loops of every provider set.
    paused: Mutex<HashMap<String, Arc<Mutex<Option<std::time::Instant>>>>>,
    /// Held while a protection window defers CDN purges: they stay queued, nothing is sent.
    held: std::sync::atomic::AtomicBool,
}

/// Which store a claimed item came from (and so where its outcome is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Redis,
    File,
}

/// Items a worker is sending as one request: `batch` joins their batches (deduplicated).
#[derive(Debug)]
pub(crate) struct Claimed {
    pub items: Vec<Item>,
    pub batch: Batch,
    pub store: Store,
}

impl Claimed {
    /// The idempotency key of this request: the item's id, or for joined items one derived
    /// from their ids (the same items joined again give the same key).
    pub fn key(&self) -> String {
        match self.items.as_slice() {
            [one] => one.id.clone(),
            many => {
                let mut h = blake3::Hasher::new();
                for i in many {
                    h.update(i.id.as_bytes());
                    h.update(b"\n");
                }
                format!("aisle-{}", &h.finalize().to_hex()[..32])
            }
        }
    }
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
    /// Claimed but not sent (it did not fit the request): back to the queue unchanged.
    Release,
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
        let mut cfg = cfg;
        if cfg.max_attempts == Some(0) {
            return Err(invalid(
                "purge queue: max_attempts must be at least 1".into(),
            ));
        }
        if cfg.lease < Duration::from_millis(300) {
            return Err(invalid(format!(
                "purge queue: the lease ({:?}) must be at least 300ms (it is renewed every third \
                 of it while a send lasts)",
                cfg.lease
            )));
        }
        unique_names(&providers).map_err(invalid)?;
        let file = FileLog::open(&cfg.dir)?;
        if cfg.instance.is_empty() {
            cfg.instance = instance_id(&cfg.dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "purge queue: cannot read or create {}: {e}; make the [purge] dir \
                         writable or set [purge] instance_id",
                        cfg.dir.join("instance-id").display()
                    ),
                )
            })?;
        }
        let redis = redis
            .map(|r| RedisStore::new(r, cfg.instance.clone()))
            .transpose()
            .map_err(io::Error::other)?;
        let mut retired = BTreeSet::new();
        for p in file.providers() {
            if !providers.iter().any(|c| c.name() == p) {
                tracing::warn!(
                    "the local purge queue holds items for provider {p:?}, which is not configured; they stay queued"
                );
                retired.insert(p);
            }
        }
        Ok(Arc::new(PurgeQueue {
            cfg,
            providers: ArcSwap::from_pointee(providers),
            generation: tokio::sync::watch::channel(0).0,
            retired: Mutex::new(retired),
            skipped: Mutex::default(),
            redis,
            answers,
            file: Arc::new(Mutex::new(file)),
            wake: Mutex::default(),
            held: std::sync::atomic::AtomicBool::new(false),
            paused: Mutex::default(),
        }))
    }

    /// Swaps in a new provider set (a reload changed `[cdn]`); the worker restarts its loops on
    /// it. Items already queued stay: they are stored by provider name, so a provider whose
    /// settings changed sends its backlog with the new settings, and the items of a removed
    /// provider wait (shown as not configured) until a provider of that name is configured
    /// again. Sends in flight finish with the provider they started with.
    pub fn set_providers(&self, providers: Vec<Arc<dyn Provider>>) -> Result<(), String> {
        unique_names(&providers)?;
        let old = self.providers.load_full();
        {
            let mut retired = self.retired.lock();
            for p in old.iter() {
                if !providers.iter().any(|n| n.name() == p.name()) {
                    retired.insert(p.name().to_string());
                }
            }
            for p in &providers {
                retired.remove(p.name());
            }
        }
        let names: Vec<&str> = providers.iter().map(|p| p.name()).collect();
        tracing::info!(providers = ?names, "CDN providers swapped in");
        self.providers.store(Arc::new(providers));
        self.generation.send_modify(|g| *g += 1);
        self.wake_all();
        Ok(())
    }

    /// Changes whenever [`Self::set_providers`] swaps the set.
    pub(crate) fn provider_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// The providers in force now.
    pub fn providers(&self) -> Arc<Vec<Arc<dyn Provider>>> {
        self.providers.load_full()
    }

    /// Where the worker reports each CDN answer.
    pub(crate) fn answers(&self) -> &dyn AnswerSink {
        &*self.answers
    }

    /// The notifier a provider's worker waits on (woken by local enqueues).
    pub(crate) fn waker(&self, provider: &str) -> Arc<Notify> {
        self.wake
            .lock()
            .entry(provider.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Where the worker keeps `provider`'s `Retry-After` pause.
    pub(crate) fn pause_of(&self, provider: &str) -> Arc<Mutex<Option<std::time::Instant>>> {
        self.paused
            .lock()
            .entry(provider.to_string())
            .or_default()
            .clone()
    }

    fn wake_all(&self) {
        for n in self.wake.lock().values() {
            n.notify_one();
        }
    }

    /// Counts what `provider` was not sent of job `job` and keeps the latest as examples.
    fn record_skipped(&self, provider: &str, job: &str, skipped: Vec<Skipped>) {
        if skipped.is_empty() {
            return;
        }
        let at_ms = now_ms();
        let mut all = self.skipped.lock();
        let log = all.entry(provider.to_string()).or_default();
        for s in skipped {
            SKIPPED_TOTAL
                .with_label_values(&[provider, s.reason.as_str()])
                .inc();
            log.total += 1;
            if log.recent.len() == SKIPPED_EXAMPLES {
                log.recent.pop_front();
            }
            log.recent.push_back(SkippedItem {
                job: job.to_string(),
                kind: s.kind,
                item: s.item,
                reason: s.reason.as_str(),
                at_ms,
            });
        }
    }

    /// Runs `f` on the local log off the async threads (it writes and fsyncs); an error once
    /// the log was handed over ([`Self::hand_over`]).
    async fn with_file<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut FileLog) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut log = file.lock();
            if log.handed_over {
                return Err(io::Error::other(
                    "the local purge queue was handed over to the upgraded process; send the purge again",
                ));
            }
            f(&mut log)
        })
        .await
        .map_err(|e| io::Error::other(format!("local purge queue task failed: {e}")))?
    }

    /// Holds (`true`) or releases the queue: while held, purges are accepted and kept but not
    /// sent (a protection window deferring CDN purges); on release every provider is woken.
    pub fn hold(&self, held: bool) {
        use std::sync::atomic::Ordering;
        if self.held.swap(held, Ordering::SeqCst) && !held {
            for n in self.wake.lock().values() {
                n.notify_one();
            }
        }
    }

    /// Whether the queue is held ([`Self::hold`]).
    pub fn held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops using the local log (after syncing it) so that the process taking over the
    /// directory (a graceful upgrade) reads everything this one wrote; later writes here fail
    /// and are answered as errors, never acknowledged and lost.
    pub fn hand_over(&self) {
        let mut log = self.file.lock();
        log.hand_over();
    }

    /// Persists one item per (job, provider, batch) before returning `Ok` (the number of items):
    /// after `Ok` the purge is never lost. Each provider's items go to Redis when it is configured
    /// and answers, else to the local file. `Err` only when neither could store them (items of
    /// other providers may be stored; enqueueing the job again does not duplicate them).
    pub async fn enqueue(&self, job: &PurgeJob) -> Result<usize, String> {
        let mut total = 0;
        for p in self.providers().iter() {
            let name = p.name();
            let plan = p.plan(job);
            self.record_skipped(name, &job.id, plan.skipped);
            let items: Vec<Item> = plan
                .batches
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
                    // The give-up horizon counts from here.
                    created_ms: if job.created_ms > 0 {
                        job.created_ms
                    } else {
                        now_ms()
                    },
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
            held: self.held(),
            ..QueueStatus::default()
        };
        for name in self.names() {
            let (ps, redis_up) = self.provider_status(&name).await;
            if !redis_up {
                st.redis = "down";
            }
            if !ps.configured && ps.depth + ps.in_flight + ps.dead_letters == 0 {
                continue;
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
        let (skipped, skipped_recent) = self
            .skipped
            .lock()
            .get(provider)
            .map(|l| (l.total, l.recent.iter().cloned().collect()))
            .unwrap_or_default();
        let mut ps = ProviderStatus {
            provider: provider.to_string(),
            configured: self.providers().iter().any(|p| p.name() == provider),
            depth,
            in_flight,
            dead_letters: dead,
            local: depth + in_flight + dead,
            skipped,
            skipped_recent,
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
        for name in self.names() {
            out.extend(self.file.lock().dead(&name));
            if let Some(redis) = &self.redis {
                if let Some(items) = redis.dead(&name).await {
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
        for p in self.providers().iter() {
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

    /// Takes the next request's worth of items due for `provider`: the local file's first, then
    /// Redis' (through the fleet-wide pacing), joined as far as the provider's API allows (the
    /// rest go straight back). Claimed Redis items are leased to this instance.
    pub(crate) async fn claim(&self, provider: &dyn Provider) -> Claim {
        let name = provider.name();
        let limit = |kind| provider.merge_limit(kind).clamp(1, MAX_CLAIM);
        let local = self
            .file
            .lock()
            .claim(name, now_ms(), |item: &Item| limit(item.batch.kind));
        let local_next = match local {
            Ok(items) => return Claim::Item(self.pack(provider, items, Store::File).await),
            Err(next) => next,
        };
        let Some(redis) = &self.redis else {
            return Claim::Idle(local_next);
        };
        let most = [Kind::Urls, Kind::Tags, Kind::Prefixes, Kind::Hosts]
            .into_iter()
            .map(limit)
            .max()
            .unwrap_or(1);
        match redis
            .claim(name, self.rate(name), self.cfg.lease, most)
            .await
        {
            Ok(items) => Claim::Item(self.pack(provider, items, Store::Redis).await),
            Err(redis_next) => Claim::Idle(match (redis_next, local_next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }),
        }
    }

    /// Joins `items` (oldest first) into one request: each joins when its kind and softness
    /// match the first's and the joined batch still [`Provider::fits`]; the others are released.
    async fn pack(&self, provider: &dyn Provider, items: Vec<Item>, store: Store) -> Claimed {
        let mut iter = items.into_iter();
        let first = iter.next().expect("a claim returns at least one item");
        let mut batch = first.batch.clone();
        let mut seen: HashSet<String> = batch.items.iter().cloned().collect();
        let mut taken = vec![first];
        let mut rest = Vec::new();
        for item in iter {
            if item.batch.kind != batch.kind || item.batch.soft != batch.soft {
                rest.push(item);
                continue;
            }
            let before = batch.items.len();
            for s in &item.batch.items {
                if !seen.contains(s) && !batch.items[before..].contains(s) {
                    batch.items.push(s.clone());
                }
            }
            if provider.fits(&batch) {
                seen.extend(batch.items[before..].iter().cloned());
                taken.push(item);
            } else {
                batch.items.truncate(before);
                rest.push(item);
            }
        }
        if !rest.is_empty() {
            self.finish(
                store,
                rest.into_iter().map(|i| (i, Finish::Release)).collect(),
            )
            .await;
        }
        Claimed {
            items: taken,
            batch,
            store,
        }
    }

    /// Renews the leases of `claimed` (Redis items) while its send lasts.
    pub(crate) async fn renew(&self, claimed: &Claimed) {
        if let (Store::Redis, Some(redis)) = (claimed.store, &self.redis) {
            redis.renew(&claimed.items, self.cfg.lease).await;
        }
    }

    /// The configured providers' names, then those of retired providers.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .providers()
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        for r in self.retired.lock().iter() {
            if !names.contains(r) {
                names.push(r.clone());
            }
        }
        names
    }

    fn rate(&self, provider: &str) -> f64 {
        self.providers()
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
    pub(crate) async fn finish(&self, store: Store, outcomes: Vec<(Item, Finish)>) {
        if outcomes.is_empty() {
            return;
        }
        match store {
            Store::File => {
                let r = self
                    .with_file(move |f| {
                        let mut result = Ok(());
                        for (item, finish) in outcomes {
                            let r = match finish {
                                Finish::Done => f.done(&item.id),
                                Finish::Retry => f.put(vec![item], LogState::Queued, false),
                                Finish::Dead => f.put(vec![item], LogState::Dead, true),
                                Finish::Release => {
                                    f.release(&item.id);
                                    Ok(())
                                }
                            };
                            result = result.and(r);
                        }
                        result
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!("local purge queue: could not record an outcome: {e}");
                }
            }
            Store::Redis => match &self.redis {
                Some(redis) => redis.finish(outcomes).await,
                None => tracing::error!(
                    "{} purge items came from redis, which is not configured; their outcome is \
                     dropped",
                    outcomes.len()
                ),
            },
        }
    }
}

/// Refuses two providers of one name (their items would share one queue).
fn unique_names(providers: &[Arc<dyn Provider>]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for p in providers {
        if !seen.insert(p.name()) {
            return Err(format!(
                "purge queue: two providers are named {:?}",
                p.name()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ms_after;

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
