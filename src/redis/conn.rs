//! The shared connection: one multiplexed connection to a single Redis or a
//! cluster, made and remade in the background, behind the breaker and the time budgets.
//!
//! Every operation goes through [`Redis::request`] (the configured `timeout`: the request path
//! waits for it) or [`Redis::background`] (a longer budget for writes off the request path, where
//! a fill's entry can be megabytes). Both count into the `redis` metrics and the breaker, and
//! both answer `None` for "Redis unavailable" so callers need no error handling of their own.
//!
//! The connection is made, and remade after it drops, by one background connector task (capped
//! exponential backoff), never by an operation: while there is no connection every operation
//! answers `None` at once, so a Redis that is down or that accepts connections and never answers
//! costs requests nothing (it used to cost the requests that happened to make the attempt up to
//! the connect budget each, and queued the others behind them). The only wait is at start: the
//! first operations of a process wait for the connector's first attempt for at most their own
//! budget (once: after one of them gave up, none waits), so a reachable Redis is used from the
//! first request on. The connector starts with the
//! first operation (or [`Redis::start_connecting`]), on the caller's runtime.
//!
//! That runtime is usually a background service's (the invalidation subscriber starts it), and
//! a multiplexed connection's reads and writes run in a task of the runtime that made it. So
//! every thread that runs operations also gets a connection of its own, made in the background
//! on its runtime once the shared one is up ([`Link::local`]): a request's command and its reply
//! are then handled on the request's own thread. Through the shared connection each one woke
//! another thread and back; with the gateway on one core, a fifth of its time went to that
//! thread and a third to switching (issue 16, Redis-only benchmark: 33k to 43k requests/s).
//! Until a thread's own connection is ready, and if it cannot be made, the thread uses the
//! shared one. The shared connection stays the one whose state counts: own connections are
//! valid only for its generation, and are dropped with it.
//!
//! A connection's task batches: woken by a command, it yields once before writing, so every
//! request ready on the thread queues its command first and they leave in one write
//! ([`Batching`]; issue 16: from 0.9 writes a Redis hit to about 0.05).

use super::breaker::Breaker;
use super::keyspace::{Keyspace, Registry};
use crate::config::RedisConfig;
use crate::metrics::metrics;
use parking_lot::Mutex;
use redis::{Cmd, FromRedisValue, Pipeline};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// Budget for operations made off the request path.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest budget for making the connection itself (a tiny request `timeout` cannot connect).
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// The connector's first and longest pause between two failed attempts.
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A connection to one Redis or to a cluster; both multiplex (a cluster connection also
/// follows the cluster by itself). A single connection that drops is remade by the connector.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
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

/// What the connector and the operations share.
struct Link {
    client: Client,
    /// Budget of one connection attempt.
    connect_timeout: Duration,
    /// The connection while there is one, with its generation (so a failure clears only the
    /// connection it happened on).
    conn: Mutex<Option<(u64, Conn)>>,
    generation: AtomicU64,
    /// Wakes the connector when the connection drops.
    lost: tokio::sync::Notify,
    /// Set once the connector's first attempt has ended (connected or not).
    first_attempt: tokio::sync::watch::Sender<bool>,
    /// Set once an operation gave up waiting for the first attempt.
    first_wait_over: AtomicBool,
    /// Open while there is no connection, and after repeated failures.
    breaker: Breaker,
    /// Each thread's own connection, for the shared one's generation (see the module's
    /// comment). At most one entry per thread that ran an operation.
    /// aHash: looked up on every Redis command (SipHash was 0.14k instructions of each).
    locals: Mutex<HashMap<ThreadId, Local, ahash::RandomState>>,
}

/// A thread's own connection.
enum Local {
    /// Being made, for the shared connection's generation `.0`.
    Connecting(u64),
    Ready(u64, Conn),
    /// Could not be made for generation `.0`: the thread uses the shared connection until the
    /// next generation.
    Failed(u64),
}

/// The process's connection to Redis, shared (`Arc`) by every domain that keeps state there.
pub struct Redis {
    link: Arc<Link>,
    connector: AtomicBool,
    /// Per-operation budget on the request path.
    timeout: Duration,
    /// URL the pub/sub subscriber connects to (the single server, or the first cluster node).
    subscribe_url: String,
    /// The configured prefix and the domains' tags under it (the prefix is read nowhere else).
    keyspaces: Registry,
}

impl Redis {
    /// A client for `[redis]`; nothing is connected until the first operation.
    pub fn new(cfg: &RedisConfig) -> Result<Self, String> {
        let (client, subscribe_url) = if cfg.cluster.is_empty() {
            let c = redis::Client::open(cfg.url.as_str()).map_err(|e| {
                format!(
                    "[redis] url {:?} is not usable: {e}; give redis://host:port",
                    cfg.url
                )
            })?;
            (Client::Single(c), cfg.url.clone())
        } else {
            let c =
                redis::cluster::ClusterClientBuilder::new(cfg.cluster.iter().map(String::as_str))
                    .connection_timeout(cfg.timeout.max(MIN_CONNECT_TIMEOUT))
                    .response_timeout(BACKGROUND_TIMEOUT)
                    .retries(1)
                    .build()
                    .map_err(|e| {
                        format!(
                    "[redis] cluster nodes are not usable: {e}; give redis://host:port for each"
                )
                    })?;
            (Client::Cluster(Box::new(c)), cfg.cluster[0].clone())
        };
        Ok(Redis {
            link: Arc::new(Link {
                client,
                connect_timeout: cfg.timeout.max(BACKGROUND_TIMEOUT),
                conn: Mutex::new(None),
                generation: AtomicU64::new(0),
                lost: tokio::sync::Notify::new(),
                first_attempt: tokio::sync::watch::channel(false).0,
                first_wait_over: AtomicBool::new(false),
                breaker: Breaker::default(),
                locals: Mutex::default(),
            }),
            connector: AtomicBool::new(false),
            timeout: cfg.timeout,
            subscribe_url,
            keyspaces: Registry::new(cfg.prefix.clone()),
        })
    }

    /// Claims the keys starting with `tag` (under the prefix) for `domain`. `Err` when another
    /// domain's tag overlaps it: a bug in Aisle, reported at startup.
    pub fn keyspace(&self, domain: &'static str, tag: &'static str) -> Result<Keyspace, String> {
        self.keyspaces.register(domain, tag)
    }

    /// Another connection (the subscriber's) reached Redis: close the circuit without waiting
    /// for request traffic to probe.
    pub fn mark_reachable(&self) {
        self.link.breaker.success();
    }

    /// Whether the circuit breaker is currently skipping Redis.
    pub fn circuit_open(&self) -> bool {
        self.link.breaker.is_open()
    }

    /// Whether there is a connection and the breaker lets operations use it (for `/readyz`).
    pub fn connected(&self) -> bool {
        self.link.conn.lock().is_some() && !self.link.breaker.is_open()
    }

    /// Starts the background connector (once; later calls do nothing). Needs a Tokio runtime:
    /// the connector and the connection's own task run on the caller's.
    pub fn start_connecting(&self) {
        if self.connector.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(connector(Arc::downgrade(&self.link)));
    }

    /// A plain client for a pub/sub subscriber (which needs a connection of its own).
    pub fn subscriber_client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.subscribe_url.as_str())
    }

    /// Runs a command on the request path (the configured `timeout`), through the breaker.
    /// `None`: Redis unavailable.
    pub(crate) async fn request<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Option<T> {
        self.exec(op, Query::Cmd(cmd), self.timeout).await
    }

    /// Runs a command off the request path (a longer budget), through the breaker. `None`:
    /// Redis unavailable.
    pub(crate) async fn background<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Option<T> {
        self.exec(op, Query::Cmd(cmd), BACKGROUND_TIMEOUT).await
    }

    /// [`Self::background`] for a pipeline (use `redis::pipe().atomic()` for MULTI/EXEC).
    pub(crate) async fn background_pipe<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &Pipeline,
    ) -> Option<T> {
        self.exec(op, Query::Pipe(pipe), BACKGROUND_TIMEOUT).await
    }

    /// The connection, if there is one now. At start only, waits (within `budget`) for the
    /// connector's first attempt.
    async fn connection(&self, budget: Duration) -> Option<(u64, Conn)> {
        if let Some(c) = self.link.conn.lock().clone() {
            return Some(c);
        }
        self.start_connecting();
        let mut first = self.link.first_attempt.subscribe();
        let waits =
            !*first.borrow_and_update() && !self.link.first_wait_over.load(Ordering::Acquire);
        if waits
            && tokio::time::timeout(budget, first.wait_for(|done| *done))
                .await
                .is_err()
        {
            // The first attempt is slow (a Redis that does not answer): nobody waits again.
            self.link.first_wait_over.store(true, Ordering::Release);
        }
        self.link.conn.lock().clone()
    }

    /// Runs one command or pipeline within `budget`, through the breaker, with metrics.
    async fn exec<T: FromRedisValue>(
        &self,
        op: &'static str,
        q: Query<'_>,
        budget: Duration,
    ) -> Option<T> {
        if !self.link.breaker.allow() {
            return None;
        }
        self.run(op, q, budget).await
    }

    /// Runs a command even while the breaker skips Redis (a heartbeat, whose point is to find
    /// out whether Redis answers), within `budget`. Its outcome still counts for the breaker.
    pub(crate) async fn unguarded<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
        budget: Duration,
    ) -> Option<T> {
        self.run(op, Query::Cmd(cmd), budget).await
    }

    async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        q: Query<'_>,
        budget: Duration,
    ) -> Option<T> {
        let Some((generation, shared)) = self.connection(budget).await else {
            // Not an error of this operation: the connector is at it. The breaker's probe slot
            // is given back.
            self.link.breaker.skipped();
            return None;
        };
        // Read before the query: the task may be resumed on another thread of the runtime.
        let thread = std::thread::current().id();
        let local = Link::local(&self.link, thread, generation);
        let own = local.is_some();
        let mut conn = local.unwrap_or(shared);
        let start = Instant::now();
        let r = tokio::time::timeout(budget, conn.query(q)).await;
        if let Ok(Err(e)) = &r {
            if e.is_unrecoverable_error() || e.is_connection_dropped() {
                if own {
                    // This thread's connection alone (Redis may have closed it as idle): the
                    // next operation makes another. If Redis itself is gone, the shared
                    // connection's users find out and drop it.
                    self.link.forget_local(thread, generation);
                } else {
                    self.link.drop_connection(generation);
                }
            }
        }
        self.settle(op, start, budget, r)
    }

    /// Records an operation's duration and outcome (metrics, breaker); its value if it worked.
    fn settle<T>(
        &self,
        op: &'static str,
        start: Instant,
        budget: Duration,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let m = metrics();
        m.redis_duration
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        match r {
            Ok(Ok(v)) => {
                self.link.breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                tracing::debug!("redis {op} failed: {e}");
                m.redis_errors.with_label_values(&[op]).inc();
                self.link.breaker.failure();
                None
            }
            Err(_) => {
                tracing::debug!("redis {op} timed out after {budget:?}");
                m.redis_errors.with_label_values(&[op]).inc();
                self.link.breaker.failure();
                None
            }
        }
    }
}

impl Link {
    /// `thread`'s (the caller's) own connection for the shared connection's `generation`, if it
    /// is ready. When the thread has none yet for this generation, one is started in the
    /// background on the thread's runtime (the caller uses the shared connection meanwhile).
    fn local(link: &Arc<Link>, thread: ThreadId, generation: u64) -> Option<Conn> {
        let mut locals = link.locals.lock();
        match locals.get(&thread) {
            Some(Local::Ready(g, c)) if *g == generation => return Some(c.clone()),
            Some(Local::Connecting(g) | Local::Failed(g)) if *g == generation => return None,
            _ => {}
        }
        locals.insert(thread, Local::Connecting(generation));
        drop(locals);
        let link = Arc::downgrade(link);
        tokio::spawn(async move {
            let Some(l) = link.upgrade() else {
                return;
            };
            let made = l.connect().await;
            let mut locals = l.locals.lock();
            // Still wanted: the shared connection was not remade (or lost) meanwhile.
            if matches!(locals.get(&thread), Some(Local::Connecting(g)) if *g == generation) {
                let local = match made {
                    Ok(c) => Local::Ready(generation, c),
                    Err(e) => {
                        tracing::debug!(
                            "a thread's own redis connection failed: {e}; it uses the shared one"
                        );
                        Local::Failed(generation)
                    }
                };
                locals.insert(thread, local);
            }
        });
        None
    }

    /// Forgets `thread`'s own connection of `generation` (it broke).
    fn forget_local(&self, thread: ThreadId, generation: u64) {
        let mut locals = self.locals.lock();
        if matches!(locals.get(&thread), Some(Local::Ready(g, _)) if *g == generation) {
            locals.remove(&thread);
        }
    }

    /// Forgets connection `generation` (if it is still the current one), and every thread's
    /// own connection with it, and wakes the connector.
    fn drop_connection(&self, generation: u64) {
        let mut conn = self.conn.lock();
        if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            *conn = None;
            self.locals.lock().clear();
            self.breaker.trip();
            tracing::warn!("lost the connection to redis; reconnecting in the background");
            self.lost.notify_one();
        }
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        let budget = self.connect_timeout;
        let made = match &self.client {
            Client::Single(c) => tokio::time::timeout(budget, connect_single(c, budget))
                .await
                .map(|r| r.map(Conn::Single)),
            Client::Cluster(c) => tokio::time::timeout(budget, c.get_async_connection())
                .await
                .map(|r| r.map(Conn::Cluster)),
        };
        made.unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connection attempt timed out",
            )))
        })
    }
}

/// A multiplexed connection to one Redis whose task batches commands ([`Batching`]). A TCP
/// address is connected here, as the client would (its default socket settings), so that the
/// connection's task can be wrapped before it is spawned; any other address is left to the
/// client.
async fn connect_single(
    client: &redis::Client,
    budget: Duration,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(budget))
        .set_response_timeout(None);
    let info = client.get_connection_info();
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        return client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await;
    };
    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
    let (conn, driver) =
        redis::aio::MultiplexedConnection::new_with_config(info.redis_settings(), stream, cfg)
            .await?;
    tokio::spawn(Batching::new(driver));
    Ok(conn)
}

/// A connection's task, made to let the thread's other ready requests queue their commands
/// before it writes. Woken by a request's command, the task would otherwise run right after
/// that request (tokio runs the task a task wakes next) and write that one command on its own:
/// a `writev` and a wake-up of `redis-server` for nearly every Redis hit (issue 16, 0.9 a hit,
/// counted with `perf stat`). Each time it is woken it first yields once (`yield_now`: it runs
/// again after the tasks already ready on the thread), then does its work, so the commands
/// queued meanwhile leave in one write and their replies are read together.
struct Batching<F> {
    driver: std::pin::Pin<Box<F>>,
    yielded: bool,
}

impl<F: std::future::Future<Output = ()>> Batching<F> {
    fn new(driver: F) -> Self {
        Batching {
            driver: Box::pin(driver),
            yielded: false,
        }
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Batching<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if !self.yielded {
            self.yielded = true;
            let yield_now = std::pin::pin!(tokio::task::yield_now());
            if yield_now.poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
        }
        self.yielded = false;
        self.driver.as_mut().poll(cx)
    }
}

/// The one task that makes the connection: at start, and whenever it drops, with capped
/// exponential backoff between failed attempts. Ends when the [`Redis`] is dropped.
async fn connector(link: Weak<Link>) {
    let mut retry = RETRY_START;
    let mut failures = 0u64;
    loop {
        let Some(l) = link.upgrade() else {
            return;
        };
        if l.conn.lock().is_some() {
            // A drop between the check and here is still seen: `notify_one` stores a permit.
            // Woken at least every second to notice that the `Redis` is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), l.lost.notified()).await;
            continue;
        }
        let start = Instant::now();
        let made = l.connect().await;
        let m = metrics();
        m.redis_duration
            .with_label_values(&["connect"])
            .observe(start.elapsed().as_secs_f64());
        match made {
            Ok(c) => {
                let generation = l.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *l.conn.lock() = Some((generation, c));
                l.breaker.success();
                if failures > 0 {
                    tracing::warn!("connected to redis after {failures} failed attempts");
                }
                failures = 0;
                retry = RETRY_START;
                l.first_attempt.send_replace(true);
                continue;
            }
            Err(e) => {
                m.redis_errors.with_label_values(&["connect"]).inc();
                l.breaker.trip();
                if failures == 0 {
                    tracing::warn!(
                        "cannot connect to redis: {e}; requests skip it while the connector \
                         retries in the background (check [redis] url and that Redis runs)"
                    );
                } else {
                    tracing::debug!("redis connection attempt {failures} failed: {e}");
                }
                failures += 1;
                l.first_attempt.send_replace(true);
            }
        }
        drop(l);
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A private `redis-server` on a free loopback port (never 6379), ended when dropped.
    struct Server {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Server {
        fn start() -> Server {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free loopback port")
                    .port();
                let dir = tempfile::tempdir().expect("a directory for redis-server");
                let mut child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server (apt-get install redis-server)");
                let up = Instant::now() + Duration::from_secs(5);
                while Instant::now() < up {
                    let ping = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                    if ping.is_ok() {
                        return Server {
                            child,
                            port,
                            _dir: dir,
                        };
                    }
                    if child.try_wait().ok().flatten().is_some() {
                        break; // the port was taken meanwhile: another one
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
                assert!(Instant::now() < deadline, "redis-server did not start");
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn client_id(redis: &Redis, rt: &tokio::runtime::Runtime) -> Option<i64> {
        rt.block_on(redis.request("client_id", redis::cmd("CLIENT").arg("ID")))
    }

    /// Polls (within 10 s) until `CLIENT ID` on this thread names a connection other than
    /// `shared`: the thread's own.
    fn own_id(redis: &Redis, rt: &tokio::runtime::Runtime, shared: i64) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(id) = client_id(redis, rt).filter(|&id| id != shared) {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no connection of this thread's own within 10 s"
            );
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(10)).await });
        }
    }

    /// A thread's commands go over a connection of its own, made on its runtime, rather than
    /// over the shared one whose task runs on the thread that started the connector (issue 16:
    /// the cross-thread wake-ups cost a fifth of a Redis hit). And when Redis closes every
    /// connection, operations come back on new ones.
    #[test]
    fn each_thread_gets_its_own_connection_and_gets_it_back() {
        let server = Server::start();
        let redis = Arc::new(
            Redis::new(&RedisConfig {
                url: format!("redis://127.0.0.1:{}", server.port),
                cluster: Vec::new(),
                prefix: "t:".into(),
                timeout: Duration::from_secs(2),
                keys: None,
            })
            .unwrap(),
        );
        // The connector runs on a runtime of its own thread, as on a background service's.
        let background = tokio::runtime::Runtime::new().unwrap();
        let _guard = background.enter();
        redis.start_connecting();
        let shared = background
            .block_on(redis.request::<i64>("client_id", redis::cmd("CLIENT").arg("ID")))
            .expect("the shared connection answers");

        let threads: Vec<_> = (0..2)
            .map(|_| {
                let redis = redis.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let own = own_id(&redis, &rt, shared);
                    // It stays this thread's.
                    assert_eq!(client_id(&redis, &rt), Some(own));
                    own
                })
            })
            .collect();
        let ids: Vec<i64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_ne!(ids[0], ids[1], "two threads share one connection");

        // Redis closes every connection: the next operations fail or skip Redis, then new
        // connections (shared and own) answer again.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let own = own_id(&redis, &rt, shared);
        let mut admin = redis::Client::open(format!("redis://127.0.0.1:{}", server.port))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query(&mut admin)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let again = loop {
            if let Some(id) = client_id(&redis, &rt).filter(|&id| id != own && id != shared) {
                break id;
            }
            assert!(
                Instant::now() < deadline,
                "no connection came back within 20 s"
            );
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        };
        assert!(again > own, "a new connection has a later id");
    }

    /// Write system calls made so far by the calling thread (`syscw` of its `/proc` io file:
    /// `writev`, which the connection's codec writes with, counts).
    fn thread_writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("a syscw line")
    }

    /// Requests that are ready on a thread together send their commands in one write: the
    /// connection's task waits for them (issue 16: without it, each request's command was a
    /// write of its own, 0.9 a Redis hit). One worker thread runs the requests and the
    /// connection's task, as a gateway worker does.
    #[test]
    fn commands_ready_together_leave_in_one_write() {
        const REQUESTS: usize = 64;
        let server = Server::start();
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", server.port)).expect("a client");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let writes = rt.block_on(async move {
            // Spawned, so that everything below runs on the one worker thread.
            tokio::spawn(async move {
                let conn = connect_single(&client, Duration::from_secs(5))
                    .await
                    .expect("a connection");
                let _: Option<Vec<u8>> = redis::cmd("GET")
                    .arg("warm")
                    .query_async(&mut conn.clone())
                    .await
                    .expect("a reply");
                let before = thread_writes();
                let requests: Vec<_> = (0..REQUESTS)
                    .map(|i| {
                        let mut conn = conn.clone();
                        tokio::spawn(async move {
                            let v: Option<Vec<u8>> = redis::cmd("GET")
                                .arg(format!("key-{i}"))
                                .query_async(&mut conn)
                                .await
                                .expect("a reply");
                            v
                        })
                    })
                    .collect();
                for r in requests {
                    assert_eq!(r.await.expect("the request"), None);
                }
                thread_writes() - before
            })
            .await
            .expect("the test task")
        });
        assert!(
            writes <= 4,
            "{REQUESTS} commands ready together took {writes} writes"
        );
    }
}
