//! The entries domain of the shared Redis: cached entries, their fleet fill locks, the URI
//! index, the invalidation channel and the purge epochs the fleet shares.
//!
//! [`RedisTier`] offers a few narrow operations (read an entry, write one, delete, the fill lock,
//! publish an invalidation, keep an epoch), each on the shared connection ([`crate::redis::Redis`])
//! and so bounded by its time budgets and guarded by its circuit breaker. Callers treat every
//! failure as "Redis has nothing".
//!
//! Keys (each group a keyspace registered with the connection; the `{...}` hash tag keeps an
//! entry and its fill lock in one cluster slot):
//!   `{prefix}{<key hash>}:e`  an entry ([`super::record`]), expiring with its last servable moment
//!   `{prefix}{<key hash>}:l`  a fill lock: an instance is fetching this key from the origin
//!   `{prefix}u:<uri id>`      the set of entry keys stored for one URI (to invalidate all variants)
//!   `{prefix}inv`             the pub/sub channel of invalidations ([`Message`])
//!   `{prefix}epochs`          tag and prefix purge epochs (`t:<tag>` / `p:<prefix>` -> `<ms>:<soft>`)

use super::record::Keys;
use crate::clock::now_ms;
use crate::config::RedisConfig;
use crate::redis::{Keyspace, Redis};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Entries and their fill locks: `{<key hash>}:e` / `:l` (the tag opens the cluster hash tag).
const ENTRIES: (&str, &str) = ("entries", "{");
/// The set of entry keys per URI.
const URIS: (&str, &str) = ("entry uri index", "u:");
/// The pub/sub channel of invalidations (its root name is the channel).
const CHANNEL: (&str, &str) = ("invalidation channel", "inv");
/// The fleet's purge epochs (one hash, its root key).
const EPOCHS: (&str, &str) = ("purge epochs", "epochs");

/// Cached entries, fill locks, invalidation broadcasts and epochs, on the shared connection.
pub struct RedisTier {
    redis: Arc<Redis>,
    entries: Keyspace,
    uris: Keyspace,
    channel: Keyspace,
    epochs: Keyspace,
    /// A random id for this process, so it can ignore its own broadcasts.
    pub instance: u64,
    pub keys: Option<Keys>,
    /// Whether the invalidation subscription is currently up.
    pub subscribed: AtomicBool,
}

impl RedisTier {
    /// The entries domain on `redis`, with `[redis]`'s encryption keys. `Err`: its keyspaces
    /// clash with another domain's.
    pub fn new(redis: Arc<Redis>, cfg: &RedisConfig) -> Result<Self, String> {
        let claim = |(domain, tag): (&'static str, &'static str)| redis.keyspace(domain, tag);
        Ok(RedisTier {
            entries: claim(ENTRIES)?,
            uris: claim(URIS)?,
            channel: claim(CHANNEL)?,
            epochs: claim(EPOCHS)?,
            redis: redis.clone(),
            instance: rand_u64(),
            keys: cfg.keys.as_ref().map(|(cur, prev)| Keys::new(*cur, prev)),
            subscribed: AtomicBool::new(false),
        })
    }

    /// The shared connection (for other domains that ride on this one's).
    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// Another connection (the subscriber's) reached Redis: close the circuit without waiting
    /// for request traffic to probe.
    pub fn mark_reachable(&self) {
        self.redis.mark_reachable();
    }

    /// Whether the circuit breaker is currently skipping Redis.
    pub fn circuit_open(&self) -> bool {
        self.redis.circuit_open()
    }

    /// Whether the last operation reached Redis (for `/readyz`).
    pub fn connected(&self) -> bool {
        self.redis.connected()
    }

    fn slot(&self, key: u128) -> String {
        self.entries.key(format_args!("{key:032x}}}"))
    }

    /// The Redis key of an entry.
    pub fn entry_key(&self, key: u128) -> String {
        format!("{}:e", self.slot(key))
    }

    fn lock_key(&self, key: u128) -> String {
        format!("{}:l", self.slot(key))
    }

    fn uri_key(&self, uri: u64) -> String {
        self.uris.key(format_args!("{uri:016x}"))
    }

    /// The pub/sub channel of invalidations.
    pub fn channel(&self) -> String {
        self.channel.root().to_string()
    }

    /// Reads an entry. `None`: absent or Redis unavailable.
    pub async fn get(&self, key: u128) -> Option<Vec<u8>> {
        self.redis
            .request::<Option<Vec<u8>>>("get", redis::cmd("GET").arg(self.entry_key(key)))
            .await
            .flatten()
    }

    /// Reads an entry and whether its fill lock is held, in one round trip (same slot).
    pub async fn get_with_lock(&self, key: u128) -> Option<(Option<Vec<u8>>, bool)> {
        let (entry, lock): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .redis
            .request(
                "get",
                redis::cmd("MGET")
                    .arg(self.entry_key(key))
                    .arg(self.lock_key(key)),
            )
            .await?;
        Some((entry, lock.is_some()))
    }

    /// Tries to take the fleet fill lock for `key`. `Some(true)`: ours; `Some(false)`: another
    /// instance is filling; `None`: Redis unavailable.
    pub async fn try_lock(&self, key: u128, ttl: Duration) -> Option<bool> {
        let cmd = redis::cmd("SET")
            .arg(self.lock_key(key))
            .arg(self.instance.to_string())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .clone();
        let r: Option<Option<String>> = self.redis.request("lock", &cmd).await;
        r.map(|v| v.is_some())
    }

    /// Releases this instance's fill lock, if it still holds it (it also expires by itself).
    pub async fn unlock(&self, key: u128) {
        const COMPARE_AND_DELETE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let cmd = redis::cmd("EVAL")
            .arg(COMPARE_AND_DELETE)
            .arg(1)
            .arg(self.lock_key(key))
            .arg(self.instance.to_string())
            .clone();
        let _: Option<i64> = self.redis.background("unlock", &cmd).await;
    }

    /// Extends this instance's fill lock to `ttl` from now, if it still holds it (the holder's
    /// heartbeat while its fill is alive). `Some(false)`: the lock is gone or another's.
    pub async fn renew_lock(&self, key: u128, ttl: Duration) -> Option<bool> {
        const COMPARE_AND_PEXPIRE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
        let cmd = redis::cmd("EVAL")
            .arg(COMPARE_AND_PEXPIRE)
            .arg(1)
            .arg(self.lock_key(key))
            .arg(self.instance.to_string())
            .arg(ttl.as_millis().max(1) as u64)
            .clone();
        let renewed: Option<i64> = self.redis.background("lock", &cmd).await;
        renewed.map(|n| n == 1)
    }

    /// Writes an entry that stays servable for `ttl`, indexes it under its URI, and releases its
    /// fill lock, in one pipeline (off the request path).
    pub async fn put(&self, key: u128, uri: u64, value: Vec<u8>, ttl: Duration) -> bool {
        let ms = ttl.as_millis().max(1) as u64;
        let entry = self.entry_key(key);
        let uri_key = self.uri_key(uri);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&entry)
            .arg(value)
            .arg("PX")
            .arg(ms)
            .ignore();
        pipe.cmd("DEL").arg(self.lock_key(key)).ignore();
        let written = self
            .redis
            .background_pipe::<()>("set", &pipe)
            .await
            .is_some();
        if written {
            // Separate keys (and, on a cluster, separate slots): a second round trip.
            let mut idx = redis::pipe();
            idx.cmd("SADD").arg(&uri_key).arg(&entry).ignore();
            idx.cmd("PEXPIRE").arg(&uri_key).arg(ms).arg("GT").ignore();
            idx.cmd("PEXPIRE").arg(&uri_key).arg(ms).arg("NX").ignore();
            let _ = self.redis.background_pipe::<()>("index", &idx).await;
        }
        written
    }

    /// Deletes an entry.
    pub async fn delete(&self, key: u128) {
        let _: Option<i64> = self
            .redis
            .background("del", redis::cmd("DEL").arg(self.entry_key(key)))
            .await;
    }

    /// Deletes every stored variant of a URI.
    pub async fn delete_uri(&self, uri: u64) {
        let uri_key = self.uri_key(uri);
        let members: Option<Vec<String>> = self
            .redis
            .background("smembers", redis::cmd("SMEMBERS").arg(&uri_key))
            .await;
        for m in members.unwrap_or_default() {
            let _: Option<i64> = self.redis.background("del", redis::cmd("DEL").arg(m)).await;
        }
        let _: Option<i64> = self
            .redis
            .background("del", redis::cmd("DEL").arg(uri_key))
            .await;
    }

    /// Broadcasts an invalidation to every instance.
    pub async fn publish(&self, message: &Message) {
        let _: Option<i64> = self
            .redis
            .background(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(self.channel.root())
                    .arg(message.encode(self.instance)),
            )
            .await;
    }

    /// Records a tag or prefix purge epoch for the fleet (`field` = `t:<tag>` / `p:<prefix>`,
    /// value `<unix ms>:<0|1 soft>`), keeping the later one.
    pub async fn save_epoch(&self, field: &str, at_ms: u64, soft: bool) {
        const KEEP_LATER: &str = "local v = redis.call('HGET', KEYS[1], ARGV[1]); \
            if v and tonumber(string.match(v, '^(%d+)')) > tonumber(ARGV[2]) then return 0 end; \
            redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3]); return 1";
        let cmd = redis::cmd("EVAL")
            .arg(KEEP_LATER)
            .arg(1)
            .arg(self.epochs.root())
            .arg(field)
            .arg(at_ms)
            .arg(u8::from(soft))
            .clone();
        let _: Option<i64> = self.redis.background("epoch", &cmd).await;
    }

    /// Every recorded epoch: (field, unix ms, soft).
    pub async fn load_epochs(&self) -> Option<Vec<(String, u64, bool)>> {
        let all: std::collections::HashMap<String, String> = self
            .redis
            .background("epochs", redis::cmd("HGETALL").arg(self.epochs.root()))
            .await?;
        Some(
            all.into_iter()
                .filter_map(|(field, v)| {
                    let (ms, soft) = v.split_once(':')?;
                    Some((field, ms.parse().ok()?, soft == "1"))
                })
                .collect(),
        )
    }

    /// Forgets epochs older than `cutoff_ms` (no entry that old can still be served).
    pub async fn prune_epochs(&self, cutoff_ms: u64) {
        if let Some(all) = self.load_epochs().await {
            for (field, ms, _) in all {
                if ms < cutoff_ms {
                    let _: Option<i64> = self
                        .redis
                        .background(
                            "epoch",
                            redis::cmd("HDEL").arg(self.epochs.root()).arg(field),
                        )
                        .await;
                }
            }
        }
    }

    /// A plain client for the pub/sub subscriber.
    pub fn subscriber_client(&self) -> redis::RedisResult<redis::Client> {
        self.redis.subscriber_client()
    }
}

/// An invalidation broadcast between instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Drop this entry (combined key hash).
    Key(u128),
    /// Drop every variant of this URI.
    Uri(u64),
    /// A tag was purged at `at_ms` (unix ms).
    Tag { tag: String, at_ms: u64, soft: bool },
    /// Every URI starting with `prefix` (`host/path`) was purged at `at_ms`.
    Prefix {
        prefix: String,
        at_ms: u64,
        soft: bool,
    },
}

impl Message {
    /// `<instance> <sent at, unix ms> k <key> | u <uri> | t <at> <0|1> <tag> | p <at> <0|1> <prefix>`
    pub fn encode(&self, instance: u64) -> String {
        let now = now_ms();
        match self {
            Message::Key(k) => format!("{instance:016x} {now} k {k:032x}"),
            Message::Uri(u) => format!("{instance:016x} {now} u {u:016x}"),
            Message::Tag { tag, at_ms, soft } => {
                format!("{instance:016x} {now} t {at_ms} {} {tag}", u8::from(*soft))
            }
            Message::Prefix {
                prefix,
                at_ms,
                soft,
            } => {
                format!(
                    "{instance:016x} {now} p {at_ms} {} {prefix}",
                    u8::from(*soft)
                )
            }
        }
    }

    /// Parses a broadcast: (sender, sent at unix ms, message).
    pub fn decode(s: &str) -> Option<(u64, u128, Message)> {
        let mut parts = s.splitn(4, ' ');
        let sender = u64::from_str_radix(parts.next()?, 16).ok()?;
        let sent: u128 = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let rest = parts.next()?;
        let epoch = |rest: &str| -> Option<(u64, bool, String)> {
            let mut p = rest.splitn(3, ' ');
            let at_ms = p.next()?.parse().ok()?;
            let soft = p.next()? == "1";
            let name = p.next()?;
            (!name.is_empty()).then(|| (at_ms, soft, name.to_string()))
        };
        let msg = match kind {
            "k" => Message::Key(u128::from_str_radix(rest, 16).ok()?),
            "u" => Message::Uri(u64::from_str_radix(rest, 16).ok()?),
            "t" => {
                let (at_ms, soft, tag) = epoch(rest)?;
                Message::Tag { tag, at_ms, soft }
            }
            "p" => {
                let (at_ms, soft, prefix) = epoch(rest)?;
                Message::Prefix {
                    prefix,
                    at_ms,
                    soft,
                }
            }
            _ => return None,
        };
        Some((sender, sent, msg))
    }
}

fn rand_u64() -> u64 {
    use aes_gcm::aead::rand_core::RngCore;
    aes_gcm::aead::OsRng.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Key(0xabc_u128 << 64 | 7),
            Message::Uri(42),
            Message::Tag {
                tag: "vendor:v-1".into(),
                at_ms: 1234,
                soft: true,
            },
            Message::Prefix {
                prefix: "h.example/api/".into(),
                at_ms: 99,
                soft: false,
            },
        ] {
            let (sender, sent, back) = Message::decode(&m.encode(99)).unwrap();
            assert_eq!((sender, back), (99, m));
            assert!(sent > 0);
        }
        assert!(Message::decode("zz 1 k 1").is_none());
        assert!(Message::decode("1 1 x 1").is_none());
    }
}
