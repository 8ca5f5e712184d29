//! Regions (issue 15): invalidations accepted in this region reach every other region's fleet
//! through a durable relay on Redis Streams, and those of other regions are applied here.
//!
//! Each region runs its own gateways and its own Redis; a region knows its peers' Redis
//! (`[[region.peer]]`). The path of one invalidation accepted here, on this region's Redis
//! (`R`) and a peer's (`P`), all keys in the `region:` keyspace:
//!
//! 1. [`Invalidator::execute`] applies it here and XADDs one record (id, this region's name,
//!    acceptance time, the plan as JSON) to `R:region:out:<peer>` for every peer. A record
//!    Redis does not take waits in memory (bounded) and is added when Redis answers.
//! 2. One instance of this region per peer holds the forwarding lease
//!    (`R:region:lease:out:<peer>`, SET NX PX, renewed): it reads the outbound stream through
//!    the consumer group `relay` (XREADGROUP; what it read and did not deliver stays pending),
//!    XADDs the records to the peer's inbound stream `P:region:in`, then XACKs and XDELs them,
//!    so the stream's length is the peer's backlog. A new lease holder (after a crash, a
//!    restart, a partition) first XAUTOCLAIMs every pending record, so nothing read by a dead
//!    forwarder is lost; a record delivered but not acknowledged before a crash is delivered
//!    again, and the receiver drops it by id.
//! 3. In the peer, one instance holds the applying lease (`P:region:lease:in`) and reads the
//!    inbound stream through the group `apply`; each record not yet applied (`P:region:applied:
//!    <id>`, kept 7 days) goes through [`Invalidator::apply_relayed`]: this fleet's epochs,
//!    deletes and broadcasts, its audit log (saying the origin region), never its CDNs (the
//!    accepting region purges those, once per provider) and never back to the relay (no loop).
//!
//! Streams are polled (every [`IDLE`] while empty) rather than read with `BLOCK`: the shared
//! connection is multiplexed, and a blocking read would hold up every request behind it.
//! Every loop here is bounded and backs off while a Redis fails; nothing from another region
//! can panic the process (a record that does not parse is counted and dropped), and metric
//! labels are configured peer names or `other`.

use super::{Invalidator, Plan};
use crate::clock::{mono_ms, now_ms};
use crate::config::region::RegionConfig;
use crate::metrics::region_metrics;
use crate::redis::{Keyspace, Redis};
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::Value;
use serde_json::json;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The region relay's keys, in this region's Redis and in each peer's.
const KEYSPACE: (&str, &str) = ("region relay", "region:");
/// Consumer groups: forwarders on an outbound stream, appliers on the inbound one.
const FORWARD_GROUP: &str = "relay";
const APPLY_GROUP: &str = "apply";
/// Pause while a stream is empty (the polling interval; see the module comment).
const IDLE: Duration = Duration::from_millis(20);
/// Records read, delivered or applied per round.
const BATCH: usize = 100;
/// A lease lasts this long unless renewed; it is renewed every [`RENEW`].
const LEASE: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);
/// How often an instance without a lease looks whether it can take it, and refreshes the
/// backlog and peer state it shows.
const STANDBY: Duration = Duration::from_millis(500);
/// Backoff while a Redis fails.
const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Records kept in memory while this region's Redis does not take them.
const UNSENT: usize = 10_000;
/// How long an applied id is remembered (a redelivery later than that is applied again).
const APPLIED_TTL_SECS: u64 = 7 * 24 * 3600;
/// Streams are capped (approximately) at this many records, so a region that never reads
/// cannot fill its peer's Redis.
const MAX_STREAM: u64 = 1_000_000;
/// The record format's version.
const VERSION: &str = "1";

/// A record's fields, in order.
type Fields = Vec<(String, String)>;

/// Where a relayed invalidation came from (carried in its [`Plan`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Relayed {
    /// The id the accepting region gave it (its audit records and this region's share it).
    pub id: String,
    /// The accepting region.
    pub region: String,
    /// When it was accepted there (Unix ms).
    pub accepted_ms: u64,
    /// It was forced past protection windows there (so it is here too).
    #[serde(default)]
    pub force: bool,
}

/// What `/readyz` and the metrics show of one peer, as this instance sees it.
#[derive(Default)]
struct PeerState {
    /// This instance holds the forwarding lease for the peer.
    forwarding: AtomicBool,
    /// Records waiting for the peer (the outbound stream's length), -1 until known.
    backlog: AtomicI64,
    /// Last delivery to the peer by any instance of this region (Unix ms, 0: none known).
    last_success_ms: AtomicU64,
}

struct Peer {
    name: String,
    /// The peer region's Redis.
    redis: Arc<Redis>,
    /// The `region:` keyspace in the peer's Redis.
    remote: Keyspace,
    state: PeerState,
}

/// This region and its peers: the outbound queue on the accepting side, the state shown.
pub struct Region {
    pub name: String,
    redis: Arc<Redis>,
    keys: Keyspace,
    /// This process's id (the lease holder's value and its consumer name).
    instance: String,
    peers: Vec<Peer>,
    /// (peer index, record fields) Redis did not take yet, oldest first.
    unsent: Mutex<VecDeque<(usize, Fields)>>,
    /// One flush of `unsent` at a time, so records keep their order.
    flushing: tokio::sync::Mutex<()>,
    /// This instance holds the applying lease.
    applying: AtomicBool,
}

impl Region {
    /// The relay for `cfg` on this region's Redis (`redis`). `Err`: a peer's Redis URL is not
    /// usable, or a keyspace clash (a bug, reported at start).
    pub fn new(cfg: &RegionConfig, redis: Arc<Redis>, instance: u64) -> Result<Self, String> {
        let keys = redis.keyspace(KEYSPACE.0, KEYSPACE.1)?;
        let mut peers = Vec::new();
        let m = region_metrics();
        for p in &cfg.peers {
            let pr = Arc::new(
                Redis::new(&p.redis).map_err(|e| format!("[[region.peer]] {:?}: {e}", p.name))?,
            );
            let remote = pr.keyspace(KEYSPACE.0, KEYSPACE.1)?;
            // Every label value exists from the start (dashboards see 0, not nothing).
            m.backlog.with_label_values(&[&p.name]).set(0);
            m.relayed.with_label_values(&[&p.name]);
            m.applied.with_label_values(&[&p.name]);
            m.duplicates.with_label_values(&[&p.name]);
            m.lag.with_label_values(&[&p.name]);
            let state = PeerState::default();
            state.backlog.store(-1, Ordering::Relaxed);
            peers.push(Peer {
                name: p.name.clone(),
                redis: pr,
                remote,
                state,
            });
        }
        Ok(Region {
            name: cfg.name.clone(),
            redis,
            keys,
            instance: format!("{instance:016x}"),
            peers,
            unsent: Mutex::new(VecDeque::new()),
            flushing: tokio::sync::Mutex::new(()),
            applying: AtomicBool::new(false),
        })
    }

    fn out_key(&self, peer: &Peer) -> String {
        self.keys.key(format_args!("out:{}", peer.name))
    }

    fn lease_key(&self, what: &str) -> String {
        self.keys.key(format_args!("lease:{what}"))
    }

    fn in_key(&self) -> String {
        self.keys.key("in")
    }

    fn applied_key(&self, id: &str) -> String {
        self.keys.key(format_args!("applied:{id}"))
    }

    fn status_key(&self) -> String {
        self.keys.key("status")
    }

    /// Queues an invalidation applied here for every peer; says whether the other regions
    /// will get it (`queued`, `pending`, `lost`: see [`super::Summary::regions`]).
    pub(super) async fn enqueue(
        &self,
        id: &str,
        at_ms: u64,
        plan: &Plan,
        force: bool,
    ) -> &'static str {
        let Ok(plan) = serde_json::to_string(plan) else {
            return "lost";
        };
        let fields = vec![
            ("v".to_string(), VERSION.to_string()),
            ("id".to_string(), id.to_string()),
            ("region".to_string(), self.name.clone()),
            ("at".to_string(), at_ms.to_string()),
            ("force".to_string(), (force as u8).to_string()),
            ("plan".to_string(), plan),
        ];
        // While records wait, this one waits behind them (the watch loop flushes them in
        // order, off the request path), so a peer gets them in order.
        let mut outcome = "queued";
        for (i, peer) in self.peers.iter().enumerate() {
            let waiting = !self.unsent.lock().is_empty();
            if waiting || !self.add(&self.out_key(peer), &fields, false).await {
                let kept = self.keep(i, fields.clone());
                if outcome != "lost" {
                    outcome = kept;
                }
            }
        }
        outcome
    }

    /// XADD `fields` to `stream` in this region's Redis.
    async fn add(&self, stream: &str, fields: &[(String, String)], background: bool) -> bool {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAX_STREAM)
            .arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let r: Option<Value> = if background {
            self.redis.background("region", &cmd).await
        } else {
            self.redis.request("region", &cmd).await
        };
        r.is_some()
    }

    /// Keeps a record Redis did not take; `pending`, or `lost` when memory is full.
    fn keep(&self, peer: usize, fields: Fields) -> &'static str {
        let mut unsent = self.unsent.lock();
        if unsent.len() >= UNSENT {
            tracing::error!(
                "region relay: {UNSENT} invalidations already wait for this region's Redis; \
                 one for region {:?} is dropped (that region keeps serving what it purges)",
                self.peers[peer].name
            );
            return "lost";
        }
        unsent.push_back((peer, fields));
        "pending"
    }

    /// Adds the records Redis did not take, oldest first, until one fails.
    async fn flush(&self) {
        if self.unsent.lock().is_empty() {
            return;
        }
        let _one = self.flushing.lock().await;
        loop {
            let Some((peer, fields)) = self.unsent.lock().front().cloned() else {
                return;
            };
            if !self
                .add(&self.out_key(&self.peers[peer]), &fields, true)
                .await
            {
                return;
            }
            self.unsent.lock().pop_front();
        }
    }

    /// Each peer's name and Redis client (warm jobs aimed at a peer region are written into its
    /// warm-job store through the same connection the relay uses).
    pub fn peer_redis(&self) -> Vec<(String, Arc<Redis>)> {
        self.peers
            .iter()
            .map(|p| (p.name.clone(), p.redis.clone()))
            .collect()
    }

    /// `/readyz`'s `region` object: this region, each peer's state as this instance sees it.
    pub fn readiness(&self) -> serde_json::Value {
        let mut peers = serde_json::Map::new();
        for p in &self.peers {
            let backlog = p.state.backlog.load(Ordering::Relaxed);
            let last = p.state.last_success_ms.load(Ordering::Relaxed);
            peers.insert(
                p.name.clone(),
                json!({
                    "connected": p.redis.connected(),
                    "forwarding": p.state.forwarding.load(Ordering::Relaxed),
                    "backlog": (backlog >= 0).then_some(backlog),
                    "last_success_ms": (last > 0).then_some(last),
                }),
            );
        }
        json!({
            "name": self.name,
            "applying": self.applying.load(Ordering::Relaxed),
            "unsent": self.unsent.lock().len(),
            "peers": peers,
        })
    }

    /// The label of a record's origin region: a configured peer, or `other`.
    fn label<'a>(&'a self, region: &str) -> &'a str {
        self.peers
            .iter()
            .find(|p| p.name == region)
            .map_or("other", |p| p.name.as_str())
    }
}

/// Takes or renews the lease `key` for `me`: 1 if held now, 0 if another instance holds it.
const LEASE_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives up the lease `key` if `me` holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Creates a consumer group (and its stream) if it does not exist; never an error.
const GROUP_SCRIPT: &str = r#"
local ok = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"#;

/// A lease held while renewed in time: the holder acts only while [`Lease::held`] says so.
struct Lease {
    key: String,
    /// Monotonic ms until which the lease is surely ours (0: not held).
    until: u64,
    /// Monotonic ms of the last attempt.
    checked: u64,
}

impl Lease {
    fn new(key: String) -> Self {
        Lease {
            key,
            until: 0,
            checked: 0,
        }
    }

    /// Whether this instance holds the lease, renewing it (or trying to take it) at most
    /// every [`RENEW`] while held, every [`STANDBY`] while not.
    async fn held(&mut self, redis: &Redis, me: &str) -> bool {
        let now = mono_ms();
        let every = if self.until > now { RENEW } else { STANDBY };
        if now.saturating_sub(self.checked) < every.as_millis() as u64 && self.checked > 0 {
            return self.until > now;
        }
        self.checked = now;
        let got: Option<i64> = redis
            .background(
                "region",
                redis::cmd("EVAL")
                    .arg(LEASE_SCRIPT)
                    .arg(1)
                    .arg(&self.key)
                    .arg(me)
                    .arg(LEASE.as_millis() as u64),
            )
            .await;
        self.until = match got {
            // Kept a margin short of its expiry in Redis, so two holders never overlap.
            Some(1) => now + LEASE.as_millis() as u64 - RENEW.as_millis() as u64,
            Some(_) => 0,
            // Not renewed: held until the last renewal runs out, no longer.
            None => self.until,
        };
        self.until > mono_ms()
    }

    async fn release(&mut self, redis: &Redis, me: &str) {
        if self.until > mono_ms() {
            let _: Option<i64> = redis
                .background(
                    "region",
                    redis::cmd("EVAL")
                        .arg(RELEASE_SCRIPT)
                        .arg(1)
                        .arg(&self.key)
                        .arg(me),
                )
                .await;
        }
        self.until = 0;
    }
}

/// One stream record: its stream id and its fields.
type Record = (String, HashMap<String, String>);

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Records from an `[id, [field, value, ...]]` list (entries whose data is gone are skipped).
fn records(list: &Value) -> Vec<Record> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(pair) = item else { continue };
        let (Some(id), Some(Value::Array(kv))) = (pair.first().and_then(text), pair.get(1)) else {
            continue;
        };
        let mut fields = HashMap::new();
        for c in kv.chunks(2) {
            if let (Some(k), Some(v)) = (c.first().and_then(text), c.get(1).and_then(text)) {
                fields.insert(k, v);
            }
        }
        out.push((id, fields));
    }
    out
}

/// The records of an XREADGROUP answer on one stream (`Nil`: none).
fn read_reply(v: &Value) -> Vec<Record> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    streams
        .iter()
        .filter_map(|s| match s {
            Value::Array(pair) => pair.get(1).map(records),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Reads one consumer group on `stream` in `redis`: first what this consumer read and did not
/// acknowledge (`0`), else new records (`>`). `None`: Redis failed (or the group is gone).
async fn read_group(redis: &Redis, stream: &str, group: &str, me: &str) -> Option<Vec<Record>> {
    for from in ["0", ">"] {
        let v: Value = redis
            .background(
                "region",
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(me)
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(from),
            )
            .await?;
        let got = read_reply(&v);
        if !got.is_empty() {
            return Some(got);
        }
    }
    Some(Vec::new())
}

/// Makes sure the group exists on `stream`.
async fn ensure_group(redis: &Redis, stream: &str, group: &str) -> bool {
    let r: Option<i64> = redis
        .background(
            "region",
            redis::cmd("EVAL")
                .arg(GROUP_SCRIPT)
                .arg(1)
                .arg(stream)
                .arg(group),
        )
        .await;
    r.is_some()
}

/// Takes over every record pending in the group (read by a consumer that did not acknowledge
/// it: a crashed or replaced lease holder), so this consumer delivers them. Only the lease
/// holder calls it.
async fn claim_pending(redis: &Redis, stream: &str, group: &str, me: &str) -> bool {
    let mut cursor = "0-0".to_string();
    // Bounded: each round claims up to BATCH records, and the stream is capped.
    for _ in 0..(MAX_STREAM as usize / BATCH + 1) {
        let v: Option<Value> = redis
            .background(
                "region",
                redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(group)
                    .arg(me)
                    .arg(0)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(BATCH),
            )
            .await;
        let Some(Value::Array(parts)) = v else {
            return false;
        };
        let Some(next) = parts.first().and_then(text) else {
            return false;
        };
        if next == "0-0" {
            forget_consumers(redis, stream, group, me).await;
            return true;
        }
        cursor = next;
    }
    true
}

/// Removes the group's other consumers that hold nothing (earlier lease holders, one per
/// process that ever held it), so a group does not grow with every restart.
async fn forget_consumers(redis: &Redis, stream: &str, group: &str, me: &str) {
    let v: Option<Value> = redis
        .background(
            "region",
            redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group),
        )
        .await;
    let Some(Value::Array(consumers)) = v else {
        return;
    };
    for c in consumers.iter().take(1000) {
        let fields: HashMap<String, String> = match c {
            Value::Array(kv) => kv
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect(),
            Value::Map(kv) => kv
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
            _ => continue,
        };
        let (Some(name), Some(pending)) = (fields.get("name"), fields.get("pending")) else {
            continue;
        };
        if name != me && pending == "0" {
            let _: Option<i64> = redis
                .background(
                    "region",
                    redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(stream)
                        .arg(group)
                        .arg(name),
                )
                .await;
        }
    }
}

/// Acknowledges and deletes `ids` from `stream` (so its length is what still waits).
fn ack_pipe(pipe: &mut redis::Pipeline, stream: &str, group: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    pipe.cmd("XACK").arg(stream).arg(group).arg(ids).ignore();
    pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
}

/// The region relay's background work: forwarding to each peer, applying what peers relayed
/// here, flushing records Redis did not take, and the state `/readyz` and the metrics show.
pub struct RegionRelay {
    pub region: Arc<Region>,
    pub invalidator: Arc<Invalidator>,
}

#[async_trait]
impl BackgroundService for RegionRelay {
    async fn start(&self, shutdown: ShutdownWatch) {
        let r = &self.region;
        r.redis.start_connecting();
        let mut tasks = Vec::new();
        for i in 0..r.peers.len() {
            tasks.push(tokio::spawn(forward(r.clone(), i, shutdown.clone())));
        }
        tasks.push(tokio::spawn(apply(
            r.clone(),
            self.invalidator.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(watch(r.clone(), shutdown)));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// [`pause`] for `Some(d)`; with `None` (more work waiting) only looks at the shutdown.
async fn pause_then(wait: Option<Duration>, shutdown: &mut ShutdownWatch) -> bool {
    match wait {
        Some(d) => pause(d, shutdown).await,
        None => *shutdown.borrow(),
    }
}

/// Waits `d`, or less when shutting down; `true` when the loop should end.
async fn pause(d: Duration, shutdown: &mut ShutdownWatch) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

/// Flushes unsent records and refreshes each peer's backlog, last success and connection
/// state (a ping to the peer's Redis).
async fn watch(r: Arc<Region>, mut shutdown: ShutdownWatch) {
    let m = region_metrics();
    loop {
        r.flush().await;
        let status: Option<HashMap<String, u64>> = r
            .redis
            .background("region", redis::cmd("HGETALL").arg(r.status_key()))
            .await;
        for p in &r.peers {
            let len: Option<i64> = r
                .redis
                .background("region", redis::cmd("XLEN").arg(r.out_key(p)))
                .await;
            if let Some(len) = len {
                p.state.backlog.store(len, Ordering::Relaxed);
                m.backlog.with_label_values(&[&p.name]).set(len);
            }
            if let Some(at) = status.as_ref().and_then(|s| s.get(&p.name)) {
                p.state.last_success_ms.fetch_max(*at, Ordering::Relaxed);
            }
            // Keeps `connected` true to life on every instance, forwarding or not (a forwarder
            // with nothing to send would otherwise not find out).
            let _: Option<String> = p.redis.background("region", &redis::cmd("PING")).await;
        }
        if pause(STANDBY, &mut shutdown).await {
            return;
        }
    }
}

/// Forwards this region's records to peer `i` while this instance holds its lease.
async fn forward(r: Arc<Region>, i: usize, mut shutdown: ShutdownWatch) {
    let p = &r.peers[i];
    let m = region_metrics();
    let relayed = m.relayed.with_label_values(&[&p.name]);
    let stream = r.out_key(p);
    let target = p.remote.key("in");
    let mut lease = Lease::new(r.lease_key(&format!("out:{}", p.name)));
    let mut ready = false;
    let mut retry = RETRY_START;
    loop {
        if !lease.held(&r.redis, &r.instance).await {
            if p.state.forwarding.swap(false, Ordering::Relaxed) {
                tracing::warn!("region relay: no longer forwarding to {:?}", p.name);
            }
            ready = false;
            if pause(STANDBY, &mut shutdown).await {
                return;
            }
            continue;
        }
        if !p.state.forwarding.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "region relay: this instance forwards to region {:?}",
                p.name
            );
        }
        // After taking the lease: the group exists and every pending record is this
        // consumer's (what a crashed holder had read is delivered, not lost).
        if !ready {
            ready = ensure_group(&r.redis, &stream, FORWARD_GROUP).await
                && claim_pending(&r.redis, &stream, FORWARD_GROUP, &r.instance).await;
        }
        let batch = if ready {
            read_group(&r.redis, &stream, FORWARD_GROUP, &r.instance).await
        } else {
            None
        };
        let mut failed = batch.is_none();
        let wait = match batch {
            None => {
                ready = false;
                None
            }
            Some(batch) if batch.is_empty() => Some(IDLE),
            Some(batch) => {
                let mut pipe = redis::pipe();
                for (_, fields) in &batch {
                    let c = pipe
                        .cmd("XADD")
                        .arg(&target)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(MAX_STREAM)
                        .arg("*");
                    for (k, v) in fields {
                        c.arg(k).arg(v);
                    }
                    c.ignore();
                }
                let delivered: Option<()> = p.redis.background_pipe("region", &pipe).await;
                if delivered.is_none() {
                    failed = true;
                } else {
                    let ids: Vec<String> = batch.into_iter().map(|(id, _)| id).collect();
                    let now = now_ms();
                    p.state.last_success_ms.fetch_max(now, Ordering::Relaxed);
                    relayed.inc_by(ids.len() as u64);
                    let mut done = redis::pipe();
                    ack_pipe(&mut done, &stream, FORWARD_GROUP, &ids);
                    done.cmd("HSET")
                        .arg(r.status_key())
                        .arg(&p.name)
                        .arg(now)
                        .ignore();
                    done.cmd("XLEN").arg(&stream);
                    // Not acknowledged (this region's Redis failed): delivered again later
                    // and dropped there by id.
                    let len: Option<(i64,)> = r.redis.background_pipe("region", &done).await;
                    if let Some((len,)) = len {
                        p.state.backlog.store(len, Ordering::Relaxed);
                        m.backlog.with_label_values(&[&p.name]).set(len);
                    }
                }
                None
            }
        };
        let wait = if failed {
            let w = retry;
            retry = (retry * 2).min(RETRY_MAX);
            Some(w)
        } else {
            if wait.is_none() {
                retry = RETRY_START;
            }
            wait
        };
        if pause_then(wait, &mut shutdown).await {
            break;
        }
    }
    lease.release(&r.redis, &r.instance).await;
    p.state.forwarding.store(false, Ordering::Relaxed);
}

/// Applies what peers relayed to this region while this instance holds the applying lease.
async fn apply(r: Arc<Region>, inv: Arc<Invalidator>, mut shutdown: ShutdownWatch) {
    let stream = r.in_key();
    let mut lease = Lease::new(r.lease_key("in"));
    let mut ready = false;
    let mut retry = RETRY_START;
    loop {
        if !lease.held(&r.redis, &r.instance).await {
            r.applying.store(false, Ordering::Relaxed);
            ready = false;
            if pause(STANDBY, &mut shutdown).await {
                return;
            }
            continue;
        }
        r.applying.store(true, Ordering::Relaxed);
        if !ready {
            ready = ensure_group(&r.redis, &stream, APPLY_GROUP).await
                && claim_pending(&r.redis, &stream, APPLY_GROUP, &r.instance).await;
        }
        let batch = if ready {
            read_group(&r.redis, &stream, APPLY_GROUP, &r.instance).await
        } else {
            None
        };
        let wait = match batch {
            None => {
                ready = false;
                let w = retry;
                retry = (retry * 2).min(RETRY_MAX);
                Some(w)
            }
            Some(batch) if batch.is_empty() => Some(IDLE),
            Some(batch) => {
                if apply_batch(&r, &inv, &stream, batch).await {
                    retry = RETRY_START;
                    None
                } else {
                    let w = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    Some(w)
                }
            }
        };
        if pause_then(wait, &mut shutdown).await {
            break;
        }
    }
    lease.release(&r.redis, &r.instance).await;
    r.applying.store(false, Ordering::Relaxed);
}

/// A record's relayed invalidation, or why it cannot be read.
fn parse(fields: &HashMap<String, String>) -> Result<(Plan, Relayed), String> {
    let get = |k: &str| {
        fields
            .get(k)
            .ok_or_else(|| format!("the record has no {k:?} field"))
    };
    let v = get("v")?;
    if v != VERSION {
        return Err(format!("record version {v:?} is not {VERSION:?}"));
    }
    let id = get("id")?.clone();
    let region = get("region")?.clone();
    let accepted_ms = get("at")?
        .parse()
        .map_err(|_| "the \"at\" field is not a time".to_string())?;
    let force = fields.get("force").is_some_and(|f| f == "1");
    let plan: Plan = serde_json::from_str(get("plan")?).map_err(|e| format!("plan: {e}"))?;
    Ok((
        plan,
        Relayed {
            id,
            region,
            accepted_ms,
            force,
        },
    ))
}

/// Applies one batch (skipping ids already applied) and acknowledges it. `false`: this
/// region's Redis failed before anything was applied (the batch is read again).
async fn apply_batch(r: &Region, inv: &Invalidator, stream: &str, batch: Vec<Record>) -> bool {
    let m = region_metrics();
    let mut parsed = Vec::with_capacity(batch.len());
    let mut ids = Vec::with_capacity(batch.len());
    for (sid, fields) in batch {
        ids.push(sid.clone());
        match parse(&fields) {
            Ok(p) => parsed.push(p),
            Err(e) => {
                m.malformed.inc();
                tracing::warn!("region relay: dropped inbound record {sid}: {e}");
            }
        }
    }
    // Which ids were applied before (a redelivery after a forwarder's crash).
    let mut seen_pipe = redis::pipe();
    for (_, rel) in &parsed {
        seen_pipe.cmd("EXISTS").arg(r.applied_key(&rel.id));
    }
    let seen: Vec<bool> = if parsed.is_empty() {
        Vec::new()
    } else {
        match r.redis.background_pipe("region", &seen_pipe).await {
            Some(v) => v,
            None => return false,
        }
    };
    let mut done = redis::pipe();
    let mut in_batch = HashSet::new();
    let mut fresh = Vec::new();
    for ((plan, rel), seen) in parsed.into_iter().zip(seen) {
        if seen || !in_batch.insert(rel.id.clone()) {
            m.duplicates
                .with_label_values(&[r.label(&rel.region)])
                .inc();
            continue;
        }
        fresh.push((plan, rel));
    }
    // A batch's invalidations are applied together (their Redis writes share the multiplexed
    // connection's pipeline): order between them does not matter, each purges by its own
    // application time.
    let applied = futures_util::future::join_all(fresh.into_iter().map(|(plan, rel)| async move {
        let (id, region, accepted) = (rel.id.clone(), rel.region.clone(), rel.accepted_ms);
        let summary = inv.apply_relayed(plan, rel).await;
        tracing::debug!("region relay: applied {id} from {region}: {summary:?}");
        (id, region, accepted, now_ms())
    }))
    .await;
    for (id, region, accepted, at) in applied {
        let label = r.label(&region);
        done.cmd("SET")
            .arg(r.applied_key(&id))
            .arg(1)
            .arg("EX")
            .arg(APPLIED_TTL_SECS)
            .ignore();
        m.applied.with_label_values(&[label]).inc();
        m.lag
            .with_label_values(&[label])
            .observe(at.saturating_sub(accepted) as f64 / 1000.0);
    }
    ack_pipe(&mut done, stream, APPLY_GROUP, &ids);
    // If this fails, the batch stays pending and is read again; what was applied is not
    // marked, so it is applied once more (at least once, never lost).
    let _: Option<()> = r.redis.background_pipe("region", &done).await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stream_replies_are_read_whatever_they_hold() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("id"), bulk("x"), bulk("v"), bulk("1")]),
                ]),
                // A deleted entry's data is nil; an odd field list keeps its pairs.
                Value::Array(vec![bulk("2-0"), Value::Nil]),
                Value::Array(vec![bulk("3-0"), Value::Array(vec![bulk("lonely")])]),
                Value::Int(7),
            ]),
        ])]);
        let got = read_reply(&reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(got[0].1["id"], "x");
        assert!(got[1].1.is_empty());
        assert!(read_reply(&Value::Nil).is_empty());
        assert!(read_reply(&Value::Int(3)).is_empty());
    }

    #[test]
    fn malformed_records_are_refused_with_a_reason() {
        let mut f = HashMap::new();
        assert!(parse(&f).err().unwrap().contains("\"v\""));
        f.insert("v".into(), "9".into());
        assert!(parse(&f).err().unwrap().contains("version"));
        f.insert("v".into(), VERSION.into());
        f.insert("id".into(), "inv-1".into());
        f.insert("region".into(), "us-east".into());
        f.insert("at".into(), "soon".into());
        assert!(parse(&f).err().unwrap().contains("time"));
        f.insert("at".into(), "5".into());
        f.insert("plan".into(), "{".into());
        assert!(parse(&f).err().unwrap().starts_with("plan"));
    }
}
