//! The purge queue's Redis store: shared by the fleet, surviving restarts (as far as Redis' own
//! persistence goes).
//!
//! Per provider, in one cluster slot (the `{provider}` hash tag), under the `purge:` keyspace:
//! `{prefix}purge:{p}:items` (hash id -> item JSON), `:queue` (zset id by `not_before_ms`),
//! `:processing` (zset id by lease deadline), `:owner` (hash id -> the leasing instance's id),
//! `:dead` (zset id by time of death) and `:pace` (the fleet-wide rate limiter's state, which a
//! `Retry-After` also moves forward). Every transition is one Lua script (the `.lua` files beside
//! this one), so an item is in exactly one of queue / processing / dead and is handed to exactly
//! one instance. Leases are short and renewed while the send lasts ([`RedisStore::renew`]); an
//! instance that dies mid-send leaves its items in `:processing`: once their lease passes, the
//! next claim by any instance puts them back in the queue, and a restarted instance (same
//! instance id) takes its own back at once (sent again: at-least-once, never lost).
//!
//! A completion that cannot reach Redis is kept here ([`RedisStore::finish`]) and applied,
//! oldest first, before anything else once Redis answers again.
//!
//! Redis without persistence loses the queue when it restarts. To notice, the store keeps, per
//! provider, a `purge:{p}:generation` marker (a random value set once, in the provider's slot)
//! and the items this instance enqueued and has not seen finished (bounded). When the marker is
//! gone or changed, Redis lost its data: the items still on record are enqueued again, counted
//! in `aisle_purge_lost_total{outcome="requeued"}`, and the reset is logged as an error (items
//! other instances enqueued are theirs to re-enqueue). Items that left Redis under an unchanged
//! marker were finished by another instance and are forgotten.

use super::{Finish, Item};
use crate::clock::now_ms;
use crate::redis::{Keyspace, Redis};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENQUEUE: &str = include_str!("enqueue.lua");
const CLAIM: &str = include_str!("claim.lua");
const PAUSE: &str = include_str!("pause.lua");
const RESCHEDULE: &str = include_str!("reschedule.lua");
const REVIVE: &str = include_str!("revive.lua");
const RENEW: &str = include_str!("renew.lua");
const RECLAIM: &str = include_str!("reclaim.lua");

/// Items of one provider this instance keeps on record until it sees them finished.
const MAX_OUTSTANDING: usize = 100_000;
/// How often a provider's record is checked against the generation marker.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Claims tried in a row when the script drops orphans (an id without its item).
const CLAIM_TRIES: usize = 8;

/// The fleet-wide pacing of a provider: (ms between sends, ms of burst allowance).
fn pacing(rate: f64) -> (u64, u64) {
    if !rate.is_finite() || rate <= 0.0 {
        return (0, 0);
    }
    let interval = (1000.0 / rate).floor() as u64;
    let burst = rate.max(1.0).floor() as u64;
    (interval, interval * burst.saturating_sub(1))
}

/// A leased item's outcome, as Redis must record it.
#[derive(Debug, Clone)]
struct Transition {
    item: Item,
    finish: Finish,
}

/// What this instance knows of one provider's Redis queue.
#[derive(Default)]
struct Watch {
    /// Whether this instance took back its own leases since it started.
    reclaimed: bool,
    /// The generation marker last seen, and when it was checked.
    generation: Option<String>,
    checked: Option<Instant>,
    /// Items enqueued here and not yet seen finished (to re-enqueue if Redis loses them).
    outstanding: HashMap<String, Item>,
}

/// The queue's keys in Redis, and the transitions Redis has not taken yet.
pub(super) struct RedisStore {
    redis: Arc<Redis>,
    keys: Keyspace,
    /// This instance's id on its leases.
    instance: String,
    /// Transitions that could not be applied yet (Redis unreachable), oldest first.
    pending: Mutex<Vec<Transition>>,
    watch: Mutex<HashMap<String, Watch>>,
}

/// One provider's Redis keys (one `{provider}` hash tag: one cluster slot, so scripts work).
struct ProviderKeys {
    items: String,
    queue: String,
    processing: String,
    owner: String,
    dead: String,
    pace: String,
    /// The provider's generation marker (in its slot, so the check is one atomic pipeline).
    generation: String,
}

impl RedisStore {
    /// The store on `redis`. `Err`: its keyspace clashes with another domain's.
    pub(super) fn new(redis: Arc<Redis>, instance: String) -> Result<Self, String> {
        Ok(RedisStore {
            keys: redis.keyspace("purge queue", "purge:")?,
            redis,
            instance,
            pending: Mutex::new(Vec::new()),
            watch: Mutex::new(HashMap::new()),
        })
    }

    fn keys(&self, provider: &str) -> ProviderKeys {
        let key = |part: &str| self.keys.key(format_args!("{{{provider}}}:{part}"));
        ProviderKeys {
            items: key("items"),
            queue: key("queue"),
            processing: key("processing"),
            owner: key("owner"),
            dead: key("dead"),
            pace: key("pace"),
            generation: key("generation"),
        }
    }

    /// Stores a provider's new items (ids already stored are left alone). `false`: Redis did
    /// not take them.
    pub(super) async fn enqueue(&self, provider: &str, items: &[Item]) -> bool {
        let k = self.keys(provider);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ENQUEUE).arg(2).arg(&k.items).arg(&k.queue);
        for item in items {
            let Ok(json) = serde_json::to_string(item) else {
                return false;
            };
            cmd.arg(&item.id).arg(json).arg(item.not_before_ms);
        }
        let stored = self
            .redis
            .background::<i64>("purge_enqueue", &cmd)
            .await
            .is_some();
        if stored {
            let mut watch = self.watch.lock();
            let w = watch.entry(provider.to_string()).or_default();
            for item in items {
                if w.outstanding.len() >= MAX_OUTSTANDING {
                    tracing::warn!(
                        "purge queue: over {MAX_OUTSTANDING} items of {provider} on record; \
                         newer ones cannot be re-enqueued if Redis loses its data"
                    );
                    break;
                }
                w.outstanding.insert(item.id.clone(), item.clone());
            }
        }
        stored
    }

    /// Takes back this instance's own leases (left by its previous run) once per start, then
    /// checks, every [`CHECK_EVERY`], that Redis still holds the queue this instance wrote to.
    /// `false`: Redis did not answer.
    async fn watch(&self, provider: &str, k: &ProviderKeys) -> bool {
        let (reclaimed, due) = {
            let mut watch = self.watch.lock();
            let w = watch.entry(provider.to_string()).or_default();
            (
                w.reclaimed,
                w.checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY),
            )
        };
        if !reclaimed {
            let cmd = redis::cmd("EVAL")
                .arg(RECLAIM)
                .arg(3)
                .arg(&k.processing)
                .arg(&k.owner)
                .arg(&k.queue)
                .arg(&self.instance)
                .arg(now_ms())
                .clone();
            let Some(n) = self.redis.background::<i64>("purge_reclaim", &cmd).await else {
                return false;
            };
            if n > 0 {
                tracing::info!(
                    "purge queue: took back {n} {provider} items this instance ({}) was sending \
                     when it stopped",
                    self.instance
                );
            }
            self.watch
                .lock()
                .entry(provider.to_string())
                .or_default()
                .reclaimed = true;
        }
        if due {
            return self.check_generation(provider, k).await;
        }
        true
    }

    /// Compares the generation marker with the one last seen; re-enqueues this instance's
    /// outstanding items when Redis lost them, forgets those another instance finished.
    async fn check_generation(&self, provider: &str, k: &ProviderKeys) -> bool {
        let fresh = {
            use aes_gcm::aead::rand_core::RngCore;
            format!("{:016x}", aes_gcm::aead::OsRng.next_u64())
        };
        let ids: Vec<String> = self
            .watch
            .lock()
            .get(provider)
            .map(|w| w.outstanding.keys().cloned().collect())
            .unwrap_or_default();
        // The marker is created when missing, then read; with the items on record, atomically.
        let gen_key = &k.generation;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(gen_key)
            .arg(&fresh)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(gen_key);
        let reply: Option<(Option<String>, Vec<Option<String>>)> = if ids.is_empty() {
            self.redis
                .background_pipe::<(Option<String>,)>("purge_generation", &pipe)
                .await
                .map(|(g,)| (g, Vec::new()))
        } else {
            pipe.cmd("HMGET").arg(&k.items).arg(&ids);
            self.redis.background_pipe("purge_generation", &pipe).await
        };
        let Some((Some(current), present)) = reply else {
            return false;
        };
        let (reset, lost) = {
            let mut watch = self.watch.lock();
            let w = watch.entry(provider.to_string()).or_default();
            let reset = w.generation.as_ref().is_some_and(|seen| *seen != current);
            w.checked = Some(Instant::now());
            w.generation = Some(current);
            let mut lost = Vec::new();
            if reset {
                lost = w.outstanding.values().cloned().collect();
            } else {
                for (id, p) in ids.iter().zip(&present) {
                    if p.is_none() {
                        w.outstanding.remove(id);
                    }
                }
            }
            (reset, lost)
        };
        if reset {
            self.reset_detected(provider, lost).await;
        }
        true
    }

    /// Redis lost the queue (restarted without persistence, or flushed): enqueue again what
    /// this instance has on record, count and log it.
    async fn reset_detected(&self, provider: &str, lost: Vec<Item>) {
        let n = lost.len();
        tracing::error!(
            "purge queue: redis lost the {provider} queue (restarted without persistence, or \
             flushed); re-enqueueing the {n} items this instance had on record. Items other \
             instances enqueued are re-enqueued by them (an instance that is gone cannot). Run \
             redis with appendonly yes (appendfsync everysec or always)"
        );
        let m = crate::metrics::metrics();
        m.purge_queue_resets.inc();
        if lost.is_empty() {
            return;
        }
        let mut items = lost;
        for item in &mut items {
            item.not_before_ms = 0;
        }
        if self.enqueue(provider, &items).await {
            m.purge_lost
                .with_label_values(&[provider, "requeued"])
                .inc_by(n as u64);
        } else {
            m.purge_lost
                .with_label_values(&[provider, "unrecovered"])
                .inc_by(n as u64);
            tracing::error!(
                "purge queue: could not re-enqueue {n} {provider} items redis lost; they stay \
                 on record and are tried again at the next check"
            );
            if let Some(w) = self.watch.lock().get_mut(provider) {
                w.generation = Some(String::new());
            }
        }
    }

    /// Renews the leases of `items` (all of one provider) for another `lease`.
    pub(super) async fn renew(&self, items: &[Item], lease: Duration) {
        let Some(first) = items.first() else {
            return;
        };
        let k = self.keys(&first.provider);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW)
            .arg(2)
            .arg(&k.processing)
            .arg(&k.owner)
            .arg(now_ms() + lease.as_millis() as u64)
            .arg(&self.instance);
        for item in items {
            cmd.arg(&item.id);
        }
        let _ = self.redis.background::<i64>("purge_renew", &cmd).await;
    }

    /// (queued, in flight, dead) for `provider`, fleet-wide. `None`: Redis unavailable.
    pub(super) async fn counts(&self, provider: &str) -> Option<(u64, u64, u64)> {
        let k = self.keys(provider);
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(&k.queue);
        pipe.cmd("ZCARD").arg(&k.processing);
        pipe.cmd("ZCARD").arg(&k.dead);
        self.redis.background_pipe("purge_status", &pipe).await
    }

    /// A provider's dead letters. `None`: Redis unavailable.
    pub(super) async fn dead(&self, provider: &str) -> Option<Vec<Item>> {
        let k = self.keys(provider);
        let ids: Vec<String> = self
            .redis
            .background(
                "purge_dead",
                redis::cmd("ZRANGE").arg(&k.dead).arg(0).arg(-1),
            )
            .await?;
        if ids.is_empty() {
            return Some(Vec::new());
        }
        let raws: Vec<Option<String>> = self
            .redis
            .background("purge_dead", redis::cmd("HMGET").arg(&k.items).arg(&ids))
            .await?;
        Some(
            raws.into_iter()
                .flatten()
                .filter_map(|raw| serde_json::from_str(&raw).ok())
                .collect(),
        )
    }

    /// Moves a dead letter back to the queue as `item` (already reset), due at `now`. `true`
    /// when it moved (not when another caller moved it first, or Redis did not answer).
    pub(super) async fn revive(&self, item: &Item, now: u64) -> bool {
        let k = self.keys(&item.provider);
        let Ok(json) = serde_json::to_string(item) else {
            return false;
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
        self.redis.background::<i64>("purge_revive", &cmd).await == Some(1)
    }

    /// Leases up to `most` items due for `provider`, oldest first, as one request (sending at
    /// `rate` requests per second across the fleet) for `lease`. `Err`: nothing to send now,
    /// with the earliest unix ms something may be, when known.
    pub(super) async fn claim(
        &self,
        provider: &str,
        rate: f64,
        lease: Duration,
        most: usize,
    ) -> Result<Vec<Item>, Option<u64>> {
        if !self.flush_pending().await {
            return Err(None);
        }
        let (interval, burst) = pacing(rate);
        let k = self.keys(provider);
        if !self.watch(provider, &k).await {
            return Err(None);
        }
        for _ in 0..CLAIM_TRIES {
            let cmd = redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(5)
                .arg(&k.queue)
                .arg(&k.processing)
                .arg(&k.items)
                .arg(&k.pace)
                .arg(&k.owner)
                .arg(now_ms())
                .arg(lease.as_millis() as u64)
                .arg(interval)
                .arg(burst)
                .arg(most.max(1))
                .arg(&self.instance)
                .clone();
            let Some(reply) = self
                .redis
                .background::<Vec<redis::Value>>("purge_claim", &cmd)
                .await
            else {
                return Err(None);
            };
            let int = |v: Option<&redis::Value>| -> i64 {
                v.and_then(|v| redis::from_redis_value(v.clone()).ok())
                    .unwrap_or(-1)
            };
            if int(reply.first()) != 1 {
                let due = int(reply.get(1));
                return Err((due >= 0).then_some(due as u64));
            }
            let orphans = int(reply.get(1));
            if orphans > 0 {
                tracing::warn!("dropped {orphans} purge queue ids without an item");
            }
            let mut items = Vec::new();
            for pair in reply[2.min(reply.len())..].chunks(2) {
                let [id, raw] = pair else { continue };
                let id: String = redis::from_redis_value(id.clone()).unwrap_or_default();
                let raw: String = redis::from_redis_value(raw.clone()).unwrap_or_default();
                match serde_json::from_str::<Item>(&raw) {
                    Ok(item) => items.push(item),
                    Err(e) => {
                        tracing::error!(
                            "unreadable purge item {id} in redis ({e}); moved to the dead letters: {raw}"
                        );
                        self.bury(&k, &id).await;
                    }
                }
            }
            if !items.is_empty() {
                return Ok(items);
            }
        }
        Err(None)
    }

    /// Holds every instance's claims for `provider` (sending at `rate`) until `until_ms`.
    pub(super) async fn pause(&self, provider: &str, rate: f64, until_ms: u64) {
        let (_, burst) = pacing(rate);
        let k = self.keys(provider);
        let cmd = redis::cmd("EVAL")
            .arg(PAUSE)
            .arg(1)
            .arg(&k.pace)
            .arg(until_ms + burst)
            .arg(now_ms())
            .clone();
        let _ = self.redis.background::<i64>("purge_pause", &cmd).await;
    }

    /// Records how leased items' attempt ended: now, or (Redis unreachable) once Redis answers
    /// again, before anything else.
    pub(super) async fn finish(&self, outcomes: Vec<(Item, Finish)>) {
        {
            let mut watch = self.watch.lock();
            for (item, finish) in &outcomes {
                if matches!(finish, Finish::Done | Finish::Dead) {
                    if let Some(w) = watch.get_mut(&item.provider) {
                        w.outstanding.remove(&item.id);
                    }
                }
            }
        }
        let mut flushed = self.flush_pending().await;
        for (item, finish) in outcomes {
            let t = Transition { item, finish };
            if flushed && self.apply(&t).await {
                continue;
            }
            flushed = false;
            tracing::warn!(
                "redis unavailable: the outcome of purge item {} is applied when it is back",
                t.item.id
            );
            self.pending.lock().push(t);
        }
    }

    /// Applies the remembered transitions; `false` while Redis still does not answer.
    async fn flush_pending(&self) -> bool {
        loop {
            let next = self.pending.lock().first().cloned();
            let Some(t) = next else {
                return true;
            };
            if !self.apply(&t).await {
                return false;
            }
            let mut pending = self.pending.lock();
            if let Some(i) = pending.iter().position(|p| p.item.id == t.item.id) {
                pending.remove(i);
            }
        }
    }

    /// Applies one transition of a leased item; `false` when Redis did not answer.
    async fn apply(&self, t: &Transition) -> bool {
        let k = self.keys(&t.item.provider);
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
                    .ignore()
                    .cmd("HDEL")
                    .arg(&k.owner)
                    .arg(id)
                    .ignore();
                self.redis
                    .background_pipe::<()>("purge_done", &pipe)
                    .await
                    .is_some()
            }
            Finish::Retry | Finish::Release | Finish::Dead => {
                let Ok(json) = serde_json::to_string(&t.item) else {
                    return true;
                };
                let (target, score) = if t.finish == Finish::Dead {
                    (&k.dead, now_ms())
                } else {
                    (&k.queue, t.item.not_before_ms)
                };
                let cmd = redis::cmd("EVAL")
                    .arg(RESCHEDULE)
                    .arg(4)
                    .arg(&k.processing)
                    .arg(&k.items)
                    .arg(target)
                    .arg(&k.owner)
                    .arg(id)
                    .arg(json)
                    .arg(score)
                    .arg(&self.instance)
                    .clone();
                self.redis
                    .background::<i64>("purge_reschedule", &cmd)
                    .await
                    .is_some()
            }
        }
    }

    /// Moves a leased item whose JSON does not parse to the dead letters.
    async fn bury(&self, k: &ProviderKeys, id: &str) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(&k.processing)
            .arg(id)
            .ignore()
            .cmd("HDEL")
            .arg(&k.owner)
            .arg(id)
            .ignore()
            .cmd("ZADD")
            .arg(&k.dead)
            .arg(now_ms())
            .arg(id)
            .ignore();
        let _ = self.redis.background_pipe::<()>("purge_bury", &pipe).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;

    #[test]
    fn pacing_spaces_sends_by_the_rate() {
        assert_eq!(pacing(10.0), (100, 900));
        assert_eq!(pacing(0.5), (2000, 0));
        assert_eq!(pacing(f64::INFINITY), (0, 0));
        assert_eq!(pacing(0.0), (0, 0));
    }

    #[test]
    fn keys_keep_their_names_and_one_slot_per_provider() {
        // Nothing connects until the first operation.
        let redis = Redis::new(&RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            cluster: Vec::new(),
            prefix: "aisle:".into(),
            timeout: Duration::from_millis(50),
            keys: None,
        })
        .unwrap();
        let store = RedisStore::new(Arc::new(redis), "i1".into()).unwrap();
        let k = store.keys("cloudflare");
        assert_eq!(k.items, "aisle:purge:{cloudflare}:items");
        assert_eq!(k.queue, "aisle:purge:{cloudflare}:queue");
        assert_eq!(k.processing, "aisle:purge:{cloudflare}:processing");
        assert_eq!(k.dead, "aisle:purge:{cloudflare}:dead");
        assert_eq!(k.owner, "aisle:purge:{cloudflare}:owner");
        assert_eq!(k.generation, "aisle:purge:{cloudflare}:generation");
        assert_eq!(k.pace, "aisle:purge:{cloudflare}:pace");
    }

    #[test]
    fn scripts_are_loaded_and_their_contract_is_written_down() {
        for script in [ENQUEUE, CLAIM, PAUSE, RESCHEDULE, REVIVE, RENEW, RECLAIM] {
            assert!(
                script.starts_with("-- ") && script.contains("KEYS"),
                "{script}"
            );
            assert!(script.contains("redis.call"), "{script}");
        }
    }
}
