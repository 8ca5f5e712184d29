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
//!   `{prefix}{<key hash>}:r<ms>` a refresh-ahead claim on the version stored at `<ms>`
//!   `{prefix}u:<uri id>`      the set of entry keys stored for one URI (to invalidate all variants)
//!   `{prefix}inv`             the pub/sub channel of invalidations ([`Message`])
//!   `{prefix}epochs`          tag, prefix and URI purge epochs (`t:<tag>` / `p:<prefix>` /
//!                             `u:<uri hex>` -> `<ms>:<soft>`)
//!
//! The writes that tell the fleet about an invalidation (an epoch, a URI's deletion, its
//! broadcast) are never just dropped when Redis fails: they wait in the [`outbox`] until the
//! relay gets them through. Broadcasts carry a per-sender sequence number, and every instance
//! publishes a heartbeat with its latest one, so a subscriber can tell it missed something
//! (see [`Envelope`]).

pub mod outbox;

use super::record::Keys;
use crate::clock::now_ms;
use crate::config::RedisConfig;
use crate::redis::{Keyspace, Redis};
use outbox::{Op, Outbox};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Budget of a heartbeat (it must not hold up broadcasts behind it for long).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Invalidation writes Redis has not taken yet.
    pub outbox: Outbox,
    /// The sequence number of this instance's last broadcast; held while one is sent, so the
    /// channel carries them in order.
    seq: tokio::sync::Mutex<u64>,
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
            outbox: Outbox::memory(),
            seq: tokio::sync::Mutex::new(0),
        })
    }

    /// The same, with its outbox kept in `dir` (see [`outbox`]).
    pub fn with_outbox(mut self, dir: &std::path::Path) -> std::io::Result<Self> {
        self.outbox = Outbox::open(dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot open the fleet outbox in {}: {e}; make [purge] dir writable",
                    dir.display()
                ),
            )
        })?;
        Ok(self)
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

    /// `{root}<32 hex digits>}{suffix}`, the key hash in the hash tag the root opens. Built
    /// directly rather than through two `format!`s: an entry's key is made on every Redis read
    /// (2% of a Redis hit in a profile, issue 16).
    fn slot_key(&self, key: u128, suffix: &str) -> String {
        let root = self.entries.root();
        let mut hex = [0u8; 32];
        hex::encode_to_slice(key.to_be_bytes(), &mut hex).expect("32 hex digits for 16 bytes");
        let mut out = String::with_capacity(root.len() + hex.len() + 1 + suffix.len());
        out.push_str(root);
        out.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
        out.push('}');
        out.push_str(suffix);
        out
    }

    /// The Redis key of an entry.
    pub fn entry_key(&self, key: u128) -> String {
        self.slot_key(key, ":e")
    }

    fn lock_key(&self, key: u128) -> String {
        self.slot_key(key, ":l")
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

    /// Claims the refresh-ahead of the version of `key` stored at `created_ms` for this
    /// instance, for `lease` (never released: a refreshed entry is a new version with a claim
    /// of its own, and a failed refresh is not retried before the lease ends). `Some(true)`:
    /// ours; `Some(false)`: another instance's; `None`: Redis unavailable.
    pub async fn try_refresh(&self, key: u128, created_ms: i64, lease: Duration) -> Option<bool> {
        let cmd = redis::cmd("SET")
            .arg(self.slot_key(key, &format!(":r{created_ms}")))
            .arg(self.instance.to_string())
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis().max(1) as u64)
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

    /// Deletes every stored variant of a URI; kept in the outbox if Redis did not take it.
    pub async fn delete_uri(&self, uri: u64) -> bool {
        self.keep_unless(self.try_delete_uri(uri).await, Op::DeleteUri(uri))
    }

    async fn try_delete_uri(&self, uri: u64) -> bool {
        let uri_key = self.uri_key(uri);
        let Some(members) = self
            .redis
            .background::<Vec<String>>("smembers", redis::cmd("SMEMBERS").arg(&uri_key))
            .await
        else {
            return false;
        };
        let mut del = redis::cmd("DEL");
        del.arg(&uri_key);
        // Entries and the index may sit in different cluster slots: one DEL each.
        let mut ok = true;
        for m in members {
            ok &= self
                .redis
                .background::<i64>("del", redis::cmd("DEL").arg(m))
                .await
                .is_some();
        }
        ok && self.redis.background::<i64>("del", &del).await.is_some()
    }

    /// Broadcasts an invalidation to every instance. A purge's broadcast (URI, tag, prefix)
    /// that fails waits in the outbox, dated now; an entry's (`Key`) does not: the sequence gap
    /// its loss leaves makes the others drop their memory tier anyway.
    pub async fn publish(&self, message: &Message) -> bool {
        let sent_ms = now_ms();
        let ok = self.send(message, sent_ms).await;
        match message {
            Message::Key(_) | Message::Heartbeat => ok,
            _ => self.keep_unless(
                ok,
                Op::Publish {
                    sent_ms,
                    msg: message.clone(),
                },
            ),
        }
    }

    /// Publishes `message` dated `sent_ms` with this instance's next sequence number.
    async fn send(&self, message: &Message, sent_ms: u64) -> bool {
        let mut seq = self.seq.lock().await;
        *seq += 1;
        let payload = Envelope {
            sender: self.instance,
            sent_ms,
            seq: Some(*seq),
            msg: message.clone(),
        }
        .encode();
        self.redis
            .background::<i64>(
                "publish",
                redis::cmd("PUBLISH").arg(self.channel.root()).arg(payload),
            )
            .await
            .is_some()
    }

    /// Publishes this instance's heartbeat: its latest sequence number, after every broadcast
    /// that number covers. It goes to Redis even while the breaker skips it, since it is the
    /// subscriber's proof that the channel works.
    pub async fn heartbeat(&self) -> bool {
        let seq = self.seq.lock().await;
        let payload = Envelope {
            sender: self.instance,
            sent_ms: now_ms(),
            seq: Some(*seq),
            msg: Message::Heartbeat,
        }
        .encode();
        self.redis
            .unguarded::<i64>(
                "heartbeat",
                redis::cmd("PUBLISH").arg(self.channel.root()).arg(payload),
                HEARTBEAT_TIMEOUT,
            )
            .await
            .is_some()
    }

    /// Records a purge epoch for the fleet (`field` = `t:<tag>` / `p:<prefix>` / `u:<uri>`,
    /// value `<unix ms>:<0|1 soft>`), keeping the later one; kept in the outbox if Redis did
    /// not take it.
    pub async fn save_epoch(&self, field: &str, at_ms: u64, soft: bool) -> bool {
        let ok = self.try_save_epoch(field, at_ms, soft).await;
        self.keep_unless(
            ok,
            Op::Epoch {
                field: field.to_string(),
                at_ms,
                soft,
            },
        )
    }

    async fn try_save_epoch(&self, field: &str, at_ms: u64, soft: bool) -> bool {
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
        self.redis.background::<i64>("epoch", &cmd).await.is_some()
    }

    /// `ok`, or else `op` recorded in the outbox (and `false`).
    fn keep_unless(&self, ok: bool, op: Op) -> bool {
        if !ok {
            self.outbox.push(op);
        }
        ok
    }

    /// Applies one op of the outbox (for the relay); `false`: Redis did not take it (it stays
    /// in the outbox, which this does not touch).
    pub async fn apply(&self, op: &Op) -> bool {
        match op {
            Op::Epoch { field, at_ms, soft } => self.try_save_epoch(field, *at_ms, *soft).await,
            Op::DeleteUri(uri) => self.try_delete_uri(*uri).await,
            Op::Publish { sent_ms, msg } => self.send(msg, *sent_ms).await,
        }
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
    /// Drop every variant of this URI (purged when the message was first sent).
    Uri(u64),
    /// A tag was purged at `at_ms` (unix ms).
    Tag { tag: String, at_ms: u64, soft: bool },
    /// Every URI starting with `prefix` (`host/path`) was purged at `at_ms`.
    Prefix {
        prefix: String,
        at_ms: u64,
        soft: bool,
    },
    /// The sender is alive and its latest broadcast has the envelope's sequence number.
    Heartbeat,
}

impl Message {
    /// `k <key>` | `u <uri>` | `t <at> <0|1> <tag>` | `p <at> <0|1> <prefix>` | `h -`
    pub fn body(&self) -> String {
        match self {
            Message::Key(k) => format!("k {k:032x}"),
            Message::Uri(u) => format!("u {u:016x}"),
            Message::Tag { tag, at_ms, soft } => format!("t {at_ms} {} {tag}", u8::from(*soft)),
            Message::Prefix {
                prefix,
                at_ms,
                soft,
            } => format!("p {at_ms} {} {prefix}", u8::from(*soft)),
            Message::Heartbeat => "h -".to_string(),
        }
    }

    /// Parses [`Self::body`].
    pub fn parse_body(s: &str) -> Option<Message> {
        let (kind, rest) = s.split_once(' ')?;
        let epoch = |rest: &str| -> Option<(u64, bool, String)> {
            let mut p = rest.splitn(3, ' ');
            let at_ms = p.next()?.parse().ok()?;
            let soft = p.next()? == "1";
            let name = p.next()?;
            (!name.is_empty()).then(|| (at_ms, soft, name.to_string()))
        };
        Some(match kind {
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
            "h" => Message::Heartbeat,
            _ => return None,
        })
    }
}

/// A broadcast as it travels: who sent it, when (first: a re-sent purge keeps its original
/// time), its place in the sender's sequence, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub sender: u64,
    /// Unix ms.
    pub sent_ms: u64,
    /// The sender's sequence number: one more per broadcast; a heartbeat repeats the latest.
    /// `None` from instances older than sequence numbers.
    pub seq: Option<u64>,
    pub msg: Message,
}

impl Envelope {
    /// `<sender hex> <sent ms> <seq> <body>`.
    pub fn encode(&self) -> String {
        format!(
            "{:016x} {} {} {}",
            self.sender,
            self.sent_ms,
            self.seq.unwrap_or(0),
            self.msg.body()
        )
    }

    /// Parses a broadcast, including the older form without a sequence number
    /// (`<sender> <sent> <body>`).
    pub fn decode(s: &str) -> Option<Envelope> {
        let (sender, rest) = s.split_once(' ')?;
        let sender = u64::from_str_radix(sender, 16).ok()?;
        let (sent, rest) = rest.split_once(' ')?;
        let sent_ms = sent.parse().ok()?;
        let (seq, body) = match rest.split_once(' ') {
            Some((n, body)) if n.bytes().all(|b| b.is_ascii_digit()) => {
                (Some(n.parse().ok()?), body)
            }
            _ => (None, rest),
        };
        Some(Envelope {
            sender,
            sent_ms,
            seq,
            msg: Message::parse_body(body)?,
        })
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
            Message::Heartbeat,
        ] {
            let e = Envelope {
                sender: 99,
                sent_ms: 1_700_000_000_000,
                seq: Some(7),
                msg: m,
            };
            assert_eq!(Envelope::decode(&e.encode()), Some(e));
        }
        assert!(Envelope::decode("zz 1 1 k 1").is_none());
        assert!(Envelope::decode("1 1 1 x 1").is_none());
        // The form before sequence numbers is still understood.
        let old = Envelope::decode("0000000000000063 5 u 000000000000002a").unwrap();
        assert_eq!((old.sender, old.seq, old.msg), (99, None, Message::Uri(42)));
    }
}
