//! The shared Redis tier: one Redis (or Redis Cluster) behind every gateway instance.
//!
//! This module is the only place that speaks Redis. It offers a few narrow operations (read an
//! entry, write one, delete, the fleet fill lock, publish an invalidation), each bounded by the
//! configured per-operation `timeout` and guarded by a circuit breaker: after a few consecutive
//! failures Redis is skipped entirely until a probe succeeds, so an outage costs each request at
//! most one timeout, and then nothing. Callers treat every failure as "Redis has nothing".
//!
//! Keys (all under `prefix`; the `{...}` hash tag keeps an entry and its fill lock in one
//! cluster slot):
//!   `{prefix}{<key hash>}:e`  an entry ([`super::record`]), expiring with its last servable moment
//!   `{prefix}{<key hash>}:l`  a fill lock: an instance is fetching this key from the origin
//!   `{prefix}u:<uri id>`      the set of entry keys stored for one URI (to invalidate all variants)
//!   `{prefix}inv`             the pub/sub channel of invalidations

use super::record::Keys;
use crate::config::RedisConfig;
use crate::metrics::metrics;
use parking_lot::Mutex;
use redis::{Cmd, FromRedisValue, Pipeline};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Consecutive failures that open the circuit.
const BREAKER_THRESHOLD: u32 = 3;
/// How long an open circuit skips Redis before letting one probe through.
const BREAKER_COOLDOWN: Duration = Duration::from_millis(500);
/// Budget for writes made off the request path (a fill's entry can be megabytes).
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to one Redis or to a cluster; both multiplex and reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// One command or a pipeline.
#[derive(Clone, Copy)]
enum Query<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
}

impl Conn {
    async fn query<T: FromRedisValue>(&mut self, q: Query<'_>) -> redis::RedisResult<T> {
        match (self, q) {
            (Conn::Single(c), Query::Cmd(cmd)) => cmd.query_async(c).await,
            (Conn::Cluster(c), Query::Cmd(cmd)) => cmd.query_async(c).await,
            (Conn::Single(c), Query::Pipe(p)) => p.query_async(c).await,
            (Conn::Cluster(c), Query::Pipe(p)) => p.query_async(c).await,
        }
    }
}

enum Client {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// Skips Redis after repeated failures; lets one probe through after a cooldown.
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    epoch: Instant,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_ms() < until {
            return false;
        }
        // Half-open: exactly one caller probes.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::warn!("redis is reachable again; circuit closed");
            metrics().redis_circuit_open.set(0);
        }
    }

    fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probing = self.probing.swap(false, Ordering::AcqRel);
        if n >= BREAKER_THRESHOLD || probing {
            let was = self.open_until.swap(
                self.now_ms() + BREAKER_COOLDOWN.as_millis() as u64,
                Ordering::AcqRel,
            );
            if was == 0 {
                tracing::warn!("redis failed {n} times in a row; skipping it (circuit open)");
                metrics().redis_circuit_open.set(1);
            }
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

/// The Redis tier's connection, breaker and key layout.
pub struct RedisTier {
    client: Client,
    conn: Mutex<Option<Conn>>,
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
    pub prefix: String,
    timeout: Duration,
    /// A random id for this process, so it can ignore its own broadcasts.
    pub instance: u64,
    pub keys: Option<Keys>,
    /// URL the pub/sub subscriber connects to (the single server, or the first cluster node).
    pub subscribe_url: String,
    /// Whether the invalidation subscription is currently up.
    pub subscribed: AtomicBool,
}

fn op_result<T>(
    tier: &RedisTier,
    op: &'static str,
    start: Instant,
    r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
) -> Option<T> {
    let m = metrics();
    m.redis_duration
        .with_label_values(&[op])
        .observe(start.elapsed().as_secs_f64());
    match r {
        Ok(Ok(v)) => {
            tier.breaker.success();
            Some(v)
        }
        Ok(Err(e)) => {
            tracing::debug!("redis {op} failed: {e}");
            m.redis_errors.with_label_values(&[op]).inc();
            tier.breaker.failure();
            None
        }
        Err(_) => {
            tracing::debug!("redis {op} timed out after {:?}", tier.timeout);
            m.redis_errors.with_label_values(&[op]).inc();
            tier.breaker.failure();
            None
        }
    }
}

impl RedisTier {
    pub fn new(cfg: &RedisConfig) -> Result<Self, String> {
        let (client, subscribe_url) = if cfg.cluster.is_empty() {
            let c = redis::Client::open(cfg.url.as_str())
                .map_err(|e| format!("bad redis url {:?}: {e}", cfg.url))?;
            (Client::Single(c), cfg.url.clone())
        } else {
            let c =
                redis::cluster::ClusterClientBuilder::new(cfg.cluster.iter().map(String::as_str))
                    .connection_timeout(cfg.timeout.max(Duration::from_millis(200)))
                    .response_timeout(BACKGROUND_TIMEOUT)
                    .retries(1)
                    .build()
                    .map_err(|e| format!("bad redis cluster nodes: {e}"))?;
            (Client::Cluster(Box::new(c)), cfg.cluster[0].clone())
        };
        Ok(RedisTier {
            client,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker {
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                probing: AtomicBool::new(false),
                epoch: Instant::now(),
            },
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            instance: rand_u64(),
            keys: cfg.keys.as_ref().map(|(cur, prev)| Keys::new(*cur, prev)),
            subscribe_url,
            subscribed: AtomicBool::new(false),
        })
    }

    /// Another connection (the subscriber's) reached Redis: close the circuit without waiting
    /// for request traffic to probe.
    pub fn mark_reachable(&self) {
        self.breaker.success();
    }

    /// Whether the circuit breaker is currently skipping Redis.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Whether the last operation reached Redis (for `/readyz`).
    pub fn connected(&self) -> bool {
        self.conn.lock().is_some() && !self.breaker.is_open()
    }

    async fn connection(&self) -> Option<Conn> {
        if let Some(c) = self.conn.lock().clone() {
            return Some(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.conn.lock().clone() {
            return Some(c);
        }
        let start = Instant::now();
        let budget = self.timeout.max(Duration::from_millis(200));
        let made = match &self.client {
            Client::Single(c) => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(budget))
                    .set_response_timeout(Some(BACKGROUND_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(200));
                tokio::time::timeout(budget, c.get_connection_manager_with_config(cfg))
                    .await
                    .map(|r| r.map(Conn::Single))
            }
            Client::Cluster(c) => tokio::time::timeout(budget, c.get_async_connection())
                .await
                .map(|r| r.map(Conn::Cluster)),
        };
        let conn = op_result(self, "connect", start, made)?;
        *self.conn.lock() = Some(conn.clone());
        Some(conn)
    }

    /// Runs one command or pipeline within `budget`, through the breaker, with metrics.
    async fn exec<T: FromRedisValue>(
        &self,
        op: &'static str,
        q: Query<'_>,
        budget: Duration,
    ) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let mut conn = self.connection().await?;
        let start = Instant::now();
        let r = tokio::time::timeout(budget, conn.query(q)).await;
        op_result(self, op, start, r)
    }

    async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
        budget: Duration,
    ) -> Option<T> {
        self.exec(op, Query::Cmd(cmd), budget).await
    }

    async fn run_pipe<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &Pipeline,
        budget: Duration,
    ) -> Option<T> {
        self.exec(op, Query::Pipe(pipe), budget).await
    }

    /// Runs a command off the request path (background budget), through the breaker. For other
    /// modules that keep state in Redis (the purge queue). `None`: Redis unavailable.
    pub async fn background<T: FromRedisValue>(&self, op: &'static str, cmd: &Cmd) -> Option<T> {
        self.run(op, cmd, BACKGROUND_TIMEOUT).await
    }

    /// [`Self::background`] for a pipeline (use `redis::pipe().atomic()` for MULTI/EXEC).
    pub async fn background_pipe<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &Pipeline,
    ) -> Option<T> {
        self.run_pipe(op, pipe, BACKGROUND_TIMEOUT).await
    }

    fn slot(&self, key: u128) -> String {
        format!("{}{{{key:032x}}}", self.prefix)
    }

    /// The Redis key of an entry.
    pub fn entry_key(&self, key: u128) -> String {
        format!("{}:e", self.slot(key))
    }

    fn lock_key(&self, key: u128) -> String {
        format!("{}:l", self.slot(key))
    }

    fn uri_key(&self, uri: u64) -> String {
        format!("{}u:{uri:016x}", self.prefix)
    }

    /// The pub/sub channel of invalidations.
    pub fn channel(&self) -> String {
        format!("{}inv", self.prefix)
    }

    /// Reads an entry. `None`: absent or Redis unavailable.
    pub async fn get(&self, key: u128) -> Option<Vec<u8>> {
        self.run::<Option<Vec<u8>>>(
            "get",
            redis::cmd("GET").arg(self.entry_key(key)),
            self.timeout,
        )
        .await
        .flatten()
    }

    /// Reads an entry and whether its fill lock is held, in one round trip (same slot).
    pub async fn get_with_lock(&self, key: u128) -> Option<(Option<Vec<u8>>, bool)> {
        let (entry, lock): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .run(
                "get",
                redis::cmd("MGET")
                    .arg(self.entry_key(key))
                    .arg(self.lock_key(key)),
                self.timeout,
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
        let r: Option<Option<String>> = self.run("lock", &cmd, self.timeout).await;
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
        let _: Option<i64> = self.run("unlock", &cmd, BACKGROUND_TIMEOUT).await;
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
            .run_pipe::<()>("set", &pipe, BACKGROUND_TIMEOUT)
            .await
            .is_some();
        if written {
            // Separate keys (and, on a cluster, separate slots): a second round trip.
            let mut idx = redis::pipe();
            idx.cmd("SADD").arg(&uri_key).arg(&entry).ignore();
            idx.cmd("PEXPIRE").arg(&uri_key).arg(ms).arg("GT").ignore();
            idx.cmd("PEXPIRE").arg(&uri_key).arg(ms).arg("NX").ignore();
            let _ = self.run_pipe::<()>("index", &idx, BACKGROUND_TIMEOUT).await;
        }
        written
    }

    /// Deletes an entry.
    pub async fn delete(&self, key: u128) {
        let _: Option<i64> = self
            .run(
                "del",
                redis::cmd("DEL").arg(self.entry_key(key)),
                BACKGROUND_TIMEOUT,
            )
            .await;
    }

    /// Deletes every stored variant of a URI.
    pub async fn delete_uri(&self, uri: u64) {
        let uri_key = self.uri_key(uri);
        let members: Option<Vec<String>> = self
            .run(
                "smembers",
                redis::cmd("SMEMBERS").arg(&uri_key),
                BACKGROUND_TIMEOUT,
            )
            .await;
        for m in members.unwrap_or_default() {
            let _: Option<i64> = self
                .run("del", redis::cmd("DEL").arg(m), BACKGROUND_TIMEOUT)
                .await;
        }
        let _: Option<i64> = self
            .run("del", redis::cmd("DEL").arg(uri_key), BACKGROUND_TIMEOUT)
            .await;
    }

    /// Broadcasts an invalidation to every instance.
    pub async fn publish(&self, message: &Message) {
        let _: Option<i64> = self
            .run(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(self.channel())
                    .arg(message.encode(self.instance)),
                BACKGROUND_TIMEOUT,
            )
            .await;
    }

    fn epochs_key(&self) -> String {
        format!("{}epochs", self.prefix)
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
            .arg(self.epochs_key())
            .arg(field)
            .arg(at_ms)
            .arg(u8::from(soft))
            .clone();
        let _: Option<i64> = self.run("epoch", &cmd, BACKGROUND_TIMEOUT).await;
    }

    /// Every recorded epoch: (field, unix ms, soft).
    pub async fn load_epochs(&self) -> Option<Vec<(String, u64, bool)>> {
        let all: std::collections::HashMap<String, String> = self
            .run(
                "epochs",
                redis::cmd("HGETALL").arg(self.epochs_key()),
                BACKGROUND_TIMEOUT,
            )
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
                        .run(
                            "epoch",
                            redis::cmd("HDEL").arg(self.epochs_key()).arg(field),
                            BACKGROUND_TIMEOUT,
                        )
                        .await;
                }
            }
        }
    }

    /// A plain client for the pub/sub subscriber.
    pub fn subscriber_client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.subscribe_url.as_str())
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
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

    #[test]
    fn breaker_opens_and_probes() {
        let b = Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        };
        for _ in 0..BREAKER_THRESHOLD {
            assert!(b.allow());
            b.failure();
        }
        assert!(b.is_open());
        assert!(!b.allow(), "open: Redis is skipped");
        // Pretend the cooldown passed.
        b.open_until.store(1, Ordering::Release);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.failure();
        assert!(b.is_open() && !b.allow(), "a failed probe reopens");
        b.open_until.store(1, Ordering::Release);
        assert!(b.allow());
        b.success();
        assert!(!b.is_open() && b.allow() && b.allow());
    }
}
