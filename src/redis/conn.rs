//! The shared connection: one multiplexed, self-reconnecting connection to a single Redis or a
//! cluster, behind the breaker and the time budgets.
//!
//! Every operation goes through [`Redis::request`] (the configured `timeout`: the request path
//! waits for it) or [`Redis::background`] (a longer budget for writes off the request path, where
//! a fill's entry can be megabytes). Both count into the `redis` metrics and the breaker, and
//! both answer `None` for "Redis unavailable" so callers need no error handling of their own.
//! The connection is made on first use, not at construction, so a gateway starts while Redis is
//! down.

use super::breaker::Breaker;
use super::keyspace::{Keyspace, Registry};
use crate::config::RedisConfig;
use crate::metrics::metrics;
use parking_lot::Mutex;
use redis::{Cmd, FromRedisValue, Pipeline};
use std::time::{Duration, Instant};

/// Budget for operations made off the request path.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest budget for making the connection itself (a tiny request `timeout` cannot connect).
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

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

/// The process's connection to Redis, shared (`Arc`) by every domain that keeps state there.
pub struct Redis {
    client: Client,
    conn: Mutex<Option<Conn>>,
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
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
            client,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::default(),
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

    async fn connection(&self) -> Option<Conn> {
        if let Some(c) = self.conn.lock().clone() {
            return Some(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.conn.lock().clone() {
            return Some(c);
        }
        let start = Instant::now();
        let budget = self.timeout.max(MIN_CONNECT_TIMEOUT);
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
        let conn = self.settle("connect", start, budget, made)?;
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
                self.breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                tracing::debug!("redis {op} failed: {e}");
                m.redis_errors.with_label_values(&[op]).inc();
                self.breaker.failure();
                None
            }
            Err(_) => {
                tracing::debug!("redis {op} timed out after {budget:?}");
                m.redis_errors.with_label_values(&[op]).inc();
                self.breaker.failure();
                None
            }
        }
    }
}
