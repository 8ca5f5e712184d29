//! The purge queue's Redis store: shared by the fleet, surviving restarts (as far as Redis' own
//! persistence goes).
//!
//! Per provider, in one cluster slot (the `{provider}` hash tag), under the `purge:` keyspace:
//! `{prefix}purge:{p}:items` (hash id -> item JSON), `:queue` (zset id by `not_before_ms`),
//! `:processing` (zset id by lease deadline), `:dead` (zset id by time of death) and `:pace` (the
//! fleet-wide rate limiter's state, which a `Retry-After` also moves forward). Every transition
//! is one Lua script (the `.lua` files beside this one), so an item is in exactly one of queue /
//! processing / dead and is handed to exactly one instance. An instance that dies mid-send
//! leaves its items in `:processing`; once their lease passes, the next claim by any instance
//! puts them back in the queue (sent again: at-least-once, never lost).
//!
//! A completion that cannot reach Redis is kept here ([`RedisStore::finish`]) and applied,
//! oldest first, before anything else once Redis answers again.

use super::{Finish, Item};
use crate::clock::now_ms;
use crate::redis::{Keyspace, Redis};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const ENQUEUE: &str = include_str!("enqueue.lua");
const CLAIM: &str = include_str!("claim.lua");
const PAUSE: &str = include_str!("pause.lua");
const RESCHEDULE: &str = include_str!("reschedule.lua");
const REVIVE: &str = include_str!("revive.lua");

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

/// The queue's keys in Redis, and the transitions Redis has not taken yet.
pub(super) struct RedisStore {
    redis: Arc<Redis>,
    keys: Keyspace,
    /// Transitions that could not be applied yet (Redis unreachable), oldest first.
    pending: Mutex<Vec<Transition>>,
}

/// One provider's Redis keys (one `{provider}` hash tag: one cluster slot, so scripts work).
struct ProviderKeys {
    items: String,
    queue: String,
    processing: String,
    dead: String,
    pace: String,
}

impl RedisStore {
    /// The store on `redis`. `Err`: its keyspace clashes with another domain's.
    pub(super) fn new(redis: Arc<Redis>) -> Result<Self, String> {
        Ok(RedisStore {
            keys: redis.keyspace("purge queue", "purge:")?,
            redis,
            pending: Mutex::new(Vec::new()),
        })
    }

    fn keys(&self, provider: &str) -> ProviderKeys {
        let key = |part: &str| self.keys.key(format_args!("{{{provider}}}:{part}"));
        ProviderKeys {
            items: key("items"),
            queue: key("queue"),
            processing: key("processing"),
            dead: key("dead"),
            pace: key("pace"),
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
        self.redis
            .background::<i64>("purge_enqueue", &cmd)
            .await
            .is_some()
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

    /// Leases the next item due for `provider` (sending at `rate` per second across the fleet)
    /// for `lease`. `Err`: nothing to send now, with the earliest unix ms something may be,
    /// when known.
    pub(super) async fn claim(
        &self,
        provider: &str,
        rate: f64,
        lease: Duration,
    ) -> Result<Item, Option<u64>> {
        if !self.flush_pending().await {
            return Err(None);
        }
        let (interval, burst) = pacing(rate);
        let k = self.keys(provider);
        for _ in 0..CLAIM_TRIES {
            let cmd = redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(4)
                .arg(&k.queue)
                .arg(&k.processing)
                .arg(&k.items)
                .arg(&k.pace)
                .arg(now_ms())
                .arg(lease.as_millis() as u64)
                .arg(interval)
                .arg(burst)
                .clone();
            let Some((status, value)) = self
                .redis
                .background::<(i64, redis::Value)>("purge_claim", &cmd)
                .await
            else {
                return Err(None);
            };
            match status {
                1 => {
                    let raw: String = redis::from_redis_value(value).unwrap_or_default();
                    match serde_json::from_str::<Item>(&raw) {
                        Ok(item) => return Ok(item),
                        Err(e) => {
                            tracing::error!(
                                "unreadable purge item in redis ({e}); moved to the dead letters: {raw}"
                            );
                            self.bury_raw(&k, &raw).await;
                        }
                    }
                }
                2 => tracing::warn!("dropped a purge queue id without an item: {value:?}"),
                _ => {
                    let due: i64 = redis::from_redis_value(value).unwrap_or(-1);
                    return Err((due >= 0).then_some(due as u64));
                }
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

    /// Records how a leased item's attempt ended: now, or (Redis unreachable) once Redis
    /// answers again, before anything else.
    pub(super) async fn finish(&self, item: Item, finish: Finish) {
        let t = Transition { item, finish };
        if self.flush_pending().await && self.apply(&t).await {
            return;
        }
        tracing::warn!(
            "redis unavailable: the outcome of purge item {} is applied when it is back",
            t.item.id
        );
        self.pending.lock().push(t);
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
                    .ignore();
                self.redis
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
                self.redis
                    .background::<i64>("purge_reschedule", &cmd)
                    .await
                    .is_some()
            }
        }
    }

    /// Moves a leased item whose JSON does not parse to the dead letters.
    async fn bury_raw(&self, k: &ProviderKeys, raw: &str) {
        // The id is unknown when the JSON does not parse; find it by value.
        let id_cmd = redis::cmd("HGETALL").arg(&k.items).clone();
        let all: HashMap<String, String> = self
            .redis
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
                let _ = self.redis.background_pipe::<()>("purge_bury", &pipe).await;
            }
        }
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
        let store = RedisStore::new(Arc::new(redis)).unwrap();
        let k = store.keys("cloudflare");
        assert_eq!(k.items, "aisle:purge:{cloudflare}:items");
        assert_eq!(k.queue, "aisle:purge:{cloudflare}:queue");
        assert_eq!(k.processing, "aisle:purge:{cloudflare}:processing");
        assert_eq!(k.dead, "aisle:purge:{cloudflare}:dead");
        assert_eq!(k.pace, "aisle:purge:{cloudflare}:pace");
    }

    #[test]
    fn scripts_are_loaded_and_their_contract_is_written_down() {
        for script in [ENQUEUE, CLAIM, PAUSE, RESCHEDULE, REVIVE] {
            assert!(
                script.starts_with("-- ") && script.contains("KEYS"),
                "{script}"
            );
            assert!(script.contains("redis.call"), "{script}");
        }
    }
}
