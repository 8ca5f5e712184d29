//! Redis fixtures for the shared-tier tests: a private `redis-server` per
//! test (or a private three-node Redis Cluster), helpers to look inside it,
//! and the scenarios that `redis_tier.rs` and `redis_cluster.rs` both run.
//!
//! Every server is started by the test on a free loopback port with no
//! persistence, in its own temporary directory, and killed by its handle when
//! the fixture is dropped. Readiness is a `PING` poll with a deadline.

use std::collections::HashSet;
use std::fs::File;
use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::{assert_hit, assert_stored_miss};
use super::{free_port, poll_until, Gateway, Origin, OriginResponse, Resp, POLL_INTERVAL};

/// Per-operation Redis budget the test gateways use. Larger than the 50 ms
/// default so that a loaded CI machine running debug builds does not open
/// the circuit breaker by accident; speed is measured by the benchmarks.
pub const TEST_REDIS_TIMEOUT: &str = "250ms";

/// How long a `redis-server` may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a cluster may take to form (`cluster_state:ok` on every node).
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Low-level helpers
// ---------------------------------------------------------------------------

/// A synchronous connection with 2 s connect / read / write timeouts.
pub fn connect(url: &str) -> ::redis::RedisResult<::redis::Connection> {
    let con = ::redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(2)))?;
    con.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(con)
}

fn ping(url: &str) -> bool {
    connect(url)
        .and_then(|mut c| ::redis::cmd("PING").query::<String>(&mut c))
        .map(|p| p == "PONG")
        .unwrap_or(false)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---------------------------------------------------------------------------
// One redis-server
// ---------------------------------------------------------------------------

/// A `redis-server` process owned by the test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Start a standalone server on a free loopback port and wait for `PING`.
    pub fn start() -> RedisServer {
        Self::start_with(&[], |_| true)
    }

    /// Start with extra arguments, on a port accepted by `port_ok`
    /// (retrying with another port when the server cannot bind).
    fn start_with(extra: &[String], port_ok: impl Fn(u16) -> bool) -> RedisServer {
        let mut last = String::new();
        for _attempt in 0..5 {
            let port = (0..1000)
                .map(|_| free_port())
                .find(|&p| p != 6379 && port_ok(p))
                .expect("a free loopback port for redis-server");
            let mut server = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().expect("tempdir for redis"),
                extra: extra.to_vec(),
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => {
                    last = e;
                    server.kill();
                }
            }
        }
        panic!("could not start redis-server: {last}");
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("redis log file");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    tail(&self.log_path())
                ));
            }
            if ping(&url) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}:\n{}",
                    self.port,
                    tail(&self.log_path())
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Start a standalone server that persists every write to an append-only file in its own
    /// temporary directory (`appendfsync always`), so [`Self::restart_keeping_data`] brings
    /// back exactly what it held when it was killed.
    pub fn start_aof() -> RedisServer {
        let extra = ["--appendonly", "yes", "--appendfsync", "always"].map(String::from);
        Self::start_with(&extra, |_| true)
    }

    /// Start a standalone server on `port` (where a test made the gateway expect one), retrying
    /// until the deadline while the port is still held by what was there before.
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir for redis"),
            extra: Vec::new(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis start on {port} retry: {e}");
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(e) => panic!("redis-server on port {port} failed: {e}"),
            }
        }
    }

    /// The server's process id (to stop it; see [`Self::pause`]).
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Freezes the server (SIGSTOP to its own pid): its socket stays open and connections stay
    /// up, but nothing is answered, as a hung Redis behaves. [`Self::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Starts a killed server again on the same port and directory, so an append-only file
    /// ([`Self::start_aof`]) is reloaded; waits for `PING`.
    pub fn restart_keeping_data(&mut self) {
        self.restart();
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kill the server (by its handle) and reap it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill (if running) and start again on the same port and directory (empty unless it
    /// persists: [`Self::start_aof`]); wait for `PING`.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old listener can linger for a moment; retry until the deadline.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis restart retry: {e}");
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(e) => panic!("redis restart on port {} failed: {e}", self.port),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "===== redis-server :{} log (tail) =====\n{}",
                self.port,
                tail(&self.log_path())
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A Redis Cluster
// ---------------------------------------------------------------------------

/// `n` cluster-enabled `redis-server`s joined by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A port `p` such that `p` and the cluster bus port `p + 10000` are free.
fn cluster_port_ok(p: u16) -> bool {
    p < 55_000 && StdTcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        assert!(n >= 3, "a cluster needs at least 3 masters");
        let mut last = String::new();
        for attempt in 1..=3 {
            let nodes: Vec<RedisServer> = (0..n)
                .map(|_| {
                    // nodes.conf goes into the node's own --dir.
                    let extra: Vec<String> = [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    RedisServer::start_with(&extra, cluster_port_ok)
                })
                .collect();
            let cluster = RedisCluster { nodes };
            match cluster.create() {
                Ok(()) => return cluster,
                Err(e) => {
                    eprintln!("cluster attempt {attempt} failed: {e}");
                    last = e;
                }
            }
        }
        panic!("could not form a redis cluster: {last}");
    }

    fn create(&self) -> Result<(), String> {
        let dir = self.nodes[0].dir.path();
        let out = dir.join("cluster-create.log");
        let log = File::create(&out).expect("cluster create log");
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        let mut child = cmd
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn redis-cli: {e}"))?;
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-cli --cluster create did not finish within {CLUSTER_TIMEOUT:?}:\n{}",
                    tail(&out)
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        if !status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({status}):\n{}",
                tail(&out)
            ));
        }
        // Every node must see the whole cluster and every slot served.
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let infos: Vec<String> = self
                .nodes
                .iter()
                .map(|node| {
                    connect(&node.url())
                        .and_then(|mut c| ::redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                        .unwrap_or_default()
                })
                .collect();
            let ok = infos.iter().all(|i| {
                i.contains("cluster_state:ok")
                    && i.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                    && i.contains("cluster_slots_assigned:16384")
            });
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "cluster not ok within {CLUSTER_TIMEOUT:?}: {infos:#?}"
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

// ---------------------------------------------------------------------------
// What the scenarios need from "a Redis": its [redis] section and its nodes
// ---------------------------------------------------------------------------

/// A Redis deployment a gateway can be pointed at and a test can inspect.
pub trait SharedRedis {
    /// The `[redis]` table (appended as the last table of gateway.toml, so
    /// callers may append more `key = value` lines to it).
    fn section(&self, prefix: &str) -> String;

    /// `redis://` URLs of every (master) node.
    fn node_urls(&self) -> Vec<String>;

    /// Keys matching `pattern`, from every node.
    fn keys(&self, pattern: &str) -> Vec<String> {
        let mut all = Vec::new();
        for url in self.node_urls() {
            let mut con = connect(&url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
            let keys: Vec<String> = ::redis::cmd("KEYS")
                .arg(pattern)
                .query(&mut con)
                .unwrap_or_else(|e| panic!("KEYS {pattern} on {url}: {e}"));
            all.extend(keys);
        }
        all.sort();
        all
    }

    /// A connection to the node that holds `key`, if any node holds it. (A
    /// cluster node that does not own the key's slot answers `MOVED`.)
    fn owner(&self, key: &str) -> Option<::redis::Connection> {
        self.node_urls().into_iter().find_map(|url| {
            let mut con = connect(&url).ok()?;
            let n: i64 = ::redis::cmd("EXISTS").arg(key).query(&mut con).ok()?;
            (n == 1).then_some(con)
        })
    }

    fn exists(&self, key: &str) -> bool {
        self.owner(key).is_some()
    }

    fn get_bytes(&self, key: &str) -> Option<Vec<u8>> {
        let mut con = self.owner(key)?;
        ::redis::cmd("GET").arg(key).query(&mut con).ok()?
    }

    fn pttl(&self, key: &str) -> Option<i64> {
        let mut con = self.owner(key)?;
        ::redis::cmd("PTTL").arg(key).query(&mut con).ok()
    }

    fn smembers(&self, key: &str) -> Vec<String> {
        match self.owner(key) {
            Some(mut con) => ::redis::cmd("SMEMBERS")
                .arg(key)
                .query(&mut con)
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Replace a string value (TTL kept).
    fn set_bytes(&self, key: &str, value: &[u8]) {
        let mut con = self.owner(key).expect("key to replace exists");
        let _: () = ::redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("KEEPTTL")
            .query(&mut con)
            .expect("SET KEEPTTL");
    }

    /// Overwrite one byte of a string value in place (TTL kept).
    fn set_byte(&self, key: &str, offset: usize, byte: u8) {
        let mut con = self.owner(key).expect("key to tamper with exists");
        let _: i64 = ::redis::cmd("SETRANGE")
            .arg(key)
            .arg(offset)
            .arg(vec![byte])
            .query(&mut con)
            .expect("SETRANGE");
    }
}

impl SharedRedis for RedisServer {
    fn section(&self, prefix: &str) -> String {
        format!(
            "\n[redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\ntimeout = \"{TEST_REDIS_TIMEOUT}\"\n",
            self.url()
        )
    }

    fn node_urls(&self) -> Vec<String> {
        vec![self.url()]
    }
}

impl SharedRedis for RedisCluster {
    fn section(&self, prefix: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!(
            "\n[redis]\ncluster = [{}]\nprefix = \"{prefix}\"\ntimeout = \"{TEST_REDIS_TIMEOUT}\"\n",
            nodes.join(", ")
        )
    }

    fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

// ---------------------------------------------------------------------------
// Gateway / origin set-up shared by the scenarios
// ---------------------------------------------------------------------------

/// Servable lifetime of a `/r/*` entry in Redis, in ms: the `shared` rule's ttl (60 s) plus
/// its longer stale window (30 s), see [`SHARED_TIER_RULES`](super::fixtures::SHARED_TIER_RULES).
pub const SERVABLE_MS: i64 = 90_000;

/// GETs answer `<path> #<n> <padding>` (so every fill is recognisable);
/// `/r/slow*` answers after 500 ms; other methods answer 200 `done`.
pub fn origin() -> Origin {
    Origin::start(|req| {
        if req.method != "GET" {
            return OriginResponse::ok(format!("{} {} done", req.method, req.path));
        }
        let body = format!(
            "{} #{} {}",
            req.path,
            req.count,
            "shared-tier-body ".repeat(4)
        );
        let resp = OriginResponse::ok(body);
        if req.path.starts_with("/r/slow") {
            resp.delay(Duration::from_millis(500))
        } else {
            resp
        }
    })
}

/// gateway.toml for `origin_url` with `redis_section` appended.
pub fn gateway_config(origin_url: &str, redis_section: &str) -> String {
    format!("{}{}", super::config_for(origin_url), redis_section)
}

/// Poll until the instance reports its invalidation subscription is up.
/// Subscribing drops the memory tier, so scenarios wait for it first.
pub async fn wait_subscribed(gw: &Gateway, name: &str) {
    gw.wait_metric(
        "aisle_redis_subscribed",
        &[],
        &format!("== 1 on gateway {name}"),
        |v| v == 1.0,
    )
    .await;
}

/// Two gateways sharing `redis` (under `prefix`) and `origin`, both subscribed.
pub async fn start_pair(
    redis: &dyn SharedRedis,
    prefix: &str,
    origin: &Origin,
) -> (Gateway, Gateway) {
    let cfg = gateway_config(&origin.url(), &redis.section(prefix));
    let rules = [("rules.toml", super::fixtures::SHARED_TIER_RULES)];
    let (a, b) = tokio::join!(Gateway::start(&cfg, &rules), Gateway::start(&cfg, &rules));
    wait_subscribed(&a, "A").await;
    wait_subscribed(&b, "B").await;
    (a, b)
}

/// `{prefix}{<32 lowercase hex>}:e`
pub fn assert_entry_key_shape(key: &str, prefix: &str) {
    let hex = key
        .strip_prefix(prefix)
        .and_then(|k| k.strip_prefix('{'))
        .and_then(|k| k.strip_suffix("}:e"))
        .unwrap_or_else(|| panic!("entry key {key:?} is not {prefix}{{<hex>}}:e"));
    assert!(
        hex.len() == 32 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "entry key {key:?}: hash tag is not 32 lowercase hex digits"
    );
}

/// Poll Redis until an entry under `prefix` holds a plain record ending in
/// `body` (the fill is written in the background); returns its key.
pub async fn wait_plain_entry(redis: &dyn SharedRedis, prefix: &str, body: &[u8]) -> String {
    let pattern = format!("{prefix}*:e");
    poll_until(
        Duration::from_secs(5),
        &format!(
            "a plain {pattern} entry ending with {:?}",
            String::from_utf8_lossy(body)
        ),
        || {
            let pattern = pattern.clone();
            async move {
                redis.keys(&pattern).into_iter().find(|k| {
                    redis
                        .get_bytes(k)
                        .is_some_and(|v| v.first() == Some(&0x00) && v.ends_with(body))
                })
            }
        },
    )
    .await
}

/// Poll Redis until an entry under `prefix` that is not in `known` appears.
pub async fn wait_new_entry(
    redis: &dyn SharedRedis,
    prefix: &str,
    known: &HashSet<String>,
) -> String {
    let pattern = format!("{prefix}*:e");
    poll_until(
        Duration::from_secs(5),
        &format!("a new {pattern} entry (known: {known:?})"),
        || {
            let pattern = pattern.clone();
            async move {
                redis
                    .keys(&pattern)
                    .into_iter()
                    .find(|k| !known.contains(k))
            }
        },
    )
    .await
}

/// Poll `gw` with GETs of `path` until one is forwarded (`fwd=`); returns
/// that response and how long it took.
pub async fn poll_until_miss(
    gw: &Gateway,
    path: &str,
    timeout: Duration,
    what: &str,
) -> (Resp, Duration) {
    let start = Instant::now();
    let r = poll_until(timeout, what, || async move {
        let r = gw.get(path).await;
        assert_eq!(r.status, 200, "{what}: GET {path} status");
        r.cache_status().contains("fwd=").then_some(r)
    })
    .await;
    (r, start.elapsed())
}

/// `GET {admin}/readyz` parsed as JSON (asserting 200).
pub async fn readyz(gw: &Gateway) -> serde_json::Value {
    let r = super::fetch(gw.client(), "GET", &gw.admin_url("/readyz"), &[]).await;
    assert_eq!(r.status, 200, "GET /readyz status, body {:?}", r.text());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/readyz body {:?} is not JSON: {e}", r.text()))
}

pub async fn healthz_status(gw: &Gateway) -> u16 {
    super::fetch(gw.client(), "GET", &gw.admin_url("/healthz"), &[])
        .await
        .status
}

// ---------------------------------------------------------------------------
// Scenarios (single server and cluster)
// ---------------------------------------------------------------------------

/// A fills, B hits from Redis; the Redis entry's key, TTL and bytes are as
/// specified.
pub async fn scenario_shared_fill(redis: &dyn SharedRedis) {
    let origin = origin();
    let prefix = "t-share:";
    let (a, b) = start_pair(redis, prefix, &origin).await;
    let path = "/r/share";
    let applied = "aisle_invalidation_broadcast_lag_seconds_count";
    let applied_before = b.metric(applied, &[]).await.unwrap_or(0.0);

    let r = a.get(path).await;
    assert_stored_miss(&r, "first GET on A");
    assert_eq!(origin.count(path), 1);

    let key = wait_plain_entry(redis, prefix, &r.body).await;
    assert_entry_key_shape(&key, prefix);
    // A's fill tells the fleet to drop its copies of the key once the write is in. Through a
    // Redis Cluster that message can reach B after B has read and promoted the entry, and then
    // drop the copy the check below expects: so B reads only once the message has arrived.
    b.wait_metric(
        applied,
        &[],
        &format!("> {applied_before} on B (A's fill announced)"),
        |v| v > applied_before,
    )
    .await;

    let rb = b.get(path).await;
    assert_hit(&rb, "GET on B after A's fill");
    assert_eq!(rb.body, r.body, "B serves A's fill");
    assert_eq!(origin.count(path), 1, "B did not go to the origin");
    let redis_hits = b
        .metric("aisle_tier_hits_total", &[("tier", "redis")])
        .await
        .unwrap_or(0.0);
    assert!(redis_hits >= 1.0, "B's redis tier hits = {redis_hits}");

    // B promoted the entry: its next hit is from memory.
    let before = b
        .metric("aisle_tier_hits_total", &[("tier", "memory")])
        .await
        .unwrap_or(0.0);
    assert_hit(&b.get(path).await, "second GET on B");
    let after = b
        .metric("aisle_tier_hits_total", &[("tier", "memory")])
        .await
        .unwrap_or(0.0);
    assert!(after > before, "B's memory tier hits {before} -> {after}");
    assert_eq!(
        b.metric("aisle_tier_hits_total", &[("tier", "redis")])
            .await,
        Some(redis_hits),
        "B's second hit did not read Redis again"
    );
    assert_eq!(origin.count(path), 1);

    // TTL = remaining freshness (60 s) + longer stale window (30 s).
    let pttl = redis.pttl(&key).expect("entry has a PTTL");
    println!("entry {key}: PTTL {pttl} ms (expected just under {SERVABLE_MS})");
    assert!(
        (SERVABLE_MS - 5_000..=SERVABLE_MS).contains(&pttl),
        "PTTL {pttl} ms is not freshness + stale window ({SERVABLE_MS} ms)"
    );

    // A plain record: 0x00, body verbatim at the end.
    let raw = redis.get_bytes(&key).expect("entry bytes");
    assert_eq!(raw[0], 0x00, "plain record marker");
    assert!(raw.ends_with(&r.body), "plain record ends with the body");

    // The URI's set names the entry.
    let sets = redis.keys(&format!("{prefix}u:*"));
    assert_eq!(sets.len(), 1, "one URI set: {sets:?}");
    let id = sets[0].strip_prefix(&format!("{prefix}u:")).unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "URI set key {:?} is not {prefix}u:<16 hex>",
        sets[0]
    );
    let members = redis.smembers(&sets[0]);
    assert!(
        members.contains(&key),
        "URI set {} = {members:?} lacks {key}",
        sets[0]
    );

    // The fill lock was released with the fill.
    let lock_pattern = format!("{prefix}*:l");
    poll_until(Duration::from_secs(3), "no fill lock left", || {
        let lock_pattern = lock_pattern.clone();
        async move { redis.keys(&lock_pattern).is_empty().then_some(()) }
    })
    .await;

    // Nothing outside the prefix.
    let foreign: Vec<String> = redis
        .keys("*")
        .into_iter()
        .filter(|k| !k.starts_with(prefix))
        .collect();
    assert!(foreign.is_empty(), "keys outside {prefix:?}: {foreign:?}");
}

/// An unsafe request through B invalidates A's memory copy (pub/sub) and
/// the Redis entry.
pub async fn scenario_invalidation(redis: &dyn SharedRedis) {
    let origin = origin();
    let prefix = "t-inv:";
    let (a, b) = start_pair(redis, prefix, &origin).await;
    let path = "/r/inv";

    let r = a.get(path).await;
    assert_stored_miss(&r, "first GET on A");
    let key = wait_plain_entry(redis, prefix, &r.body).await;
    assert_hit(&b.get(path).await, "GET on B (from redis)");
    assert_hit(&a.get(path).await, "second GET on A (memory)");
    assert_eq!(origin.count(path), 1);

    let lag_metric = "aisle_invalidation_broadcast_lag_seconds_count";
    let lag_before = a.metric(lag_metric, &[]).await.unwrap_or(0.0);

    let started = std::time::Instant::now();
    let p = b.request("POST", path, &[]).await;
    assert_eq!(p.status, 200, "POST via B");
    assert_eq!(origin.count(path), 2, "the POST reached the origin");

    let k = key.clone();
    poll_until(
        Duration::from_secs(2),
        "the Redis entry to be deleted after the POST",
        || {
            let k = k.clone();
            async move { (!redis.exists(&k)).then_some(()) }
        },
    )
    .await;

    let (ra, _) = poll_until_miss(
        &a,
        path,
        Duration::from_secs(2),
        "A to miss after the POST via B",
    )
    .await;
    let lag = started.elapsed();
    println!("invalidation via B reached A after {lag:?} (POST sent -> A forwards)");
    assert_eq!(origin.count(path), 3, "A's miss went to the origin");
    assert_ne!(ra.body, r.body, "A serves a fresh copy");

    let lag_after = a
        .wait_metric(lag_metric, &[], "to count the broadcast", |v| {
            v > lag_before
        })
        .await;
    assert!(lag_after >= 1.0);
}

/// A new fill on A replaces B's older memory copy (the fill is broadcast).
pub async fn scenario_refill_replaces_peer_copy(redis: &dyn SharedRedis) {
    let origin = origin();
    let prefix = "t-refill:";
    let (a, b) = start_pair(redis, prefix, &origin).await;
    let path = "/r/refill";

    let r1 = a.get(path).await;
    assert_stored_miss(&r1, "first GET on A");
    wait_plain_entry(redis, prefix, &r1.body).await;
    assert_hit(&b.get(path).await, "GET on B (from redis)");
    assert_hit(&b.get(path).await, "GET on B (memory)");

    // Force A to fetch again: a request no-cache revalidates; the origin
    // answers a new 200 (no validators), which replaces the entry.
    let r2 = a.get_with(path, &[("cache-control", "no-cache")]).await;
    assert_eq!(r2.status, 200);
    assert_eq!(origin.count(path), 2, "no-cache went to the origin");
    assert_ne!(r2.body, r1.body);
    wait_plain_entry(redis, prefix, &r2.body).await;

    let started = Instant::now();
    let (b_ref, old_body) = (&b, &r1.body);
    let rb = poll_until(
        Duration::from_secs(2),
        "B to serve A's new fill",
        || async move {
            let rb = b_ref.get(path).await;
            assert_eq!(rb.status, 200);
            (rb.body != *old_body).then_some(rb)
        },
    )
    .await;
    println!("B dropped its old copy after {:?}", started.elapsed());
    assert_eq!(rb.body, r2.body, "B serves A's new fill, from Redis");
    assert_eq!(origin.count(path), 2, "B did not go to the origin");
}

/// 20 concurrent cold GETs, 10 per gateway, reach a slow origin once.
pub async fn scenario_fleet_collapsing(redis: &dyn SharedRedis) {
    let origin = origin();
    let prefix = "t-collapse:";
    let (a, b) = start_pair(redis, prefix, &origin).await;
    let path = "/r/slow-collapse";

    let started = Instant::now();
    let futs = (0..20).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        gw.get(path)
    });
    let results = futures_util::future::join_all(futs).await;
    println!(
        "20 concurrent cold GETs over two gateways took {:?}; Cache-Status: {:?}",
        started.elapsed(),
        results.iter().map(Resp::cache_status).collect::<Vec<_>>()
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i} status ({})", r.cache_status());
        assert_eq!(r.body, results[0].body, "request {i} body");
    }
    assert_eq!(
        origin.count(path),
        1,
        "the origin saw {} requests for one key across the fleet",
        origin.count(path)
    );
}
