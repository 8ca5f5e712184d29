//! Wiring: a pingora `Server` with the proxy service, the admin service and the cache parts.
//!
//! Pingora wants its storage, eviction manager, lock and predictor as `&'static`; they are
//! created once per process here and leaked deliberately (they live as long as the server).

use crate::admin::Admin;
use crate::config::Config;
use crate::control::Replays;
use crate::invalidation::audit::Audit;
use crate::invalidation::protection::{Protection, Ticker};
use crate::invalidation::relay::Relay;
use crate::invalidation::subscriber::Subscriber;
use crate::invalidation::Invalidator;
use crate::proxy::listener::{Limited, ReloadingCert};
use crate::proxy::quota::Quotas;
use crate::proxy::{CacheParts, Gateway, Live, Locks, Shared, UpstreamHealth};
use crate::purge::queue::{PurgeQueue, QueueConfig};
use crate::purge::worker::PurgeWorker;
use crate::redis::Redis;
use crate::reload::{Hangup, Reloader, Watch};
use crate::statedir::DirLock;
use crate::storage::epochs::Epochs;
use crate::storage::memory::MemoryStorage;
use crate::storage::redis::RedisTier;
use crate::storage::tiered::Tiered;
use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::cache::predictor::Predictor;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::server::{RunArgs, Server};
use pingora::services::background::BackgroundService;
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

pub use crate::proxy::fill_age_limit;

/// Builds the cache parts for a memory budget and the optional Redis tier.
fn cache_parts(
    config: &Config,
    redis: Option<Arc<RedisTier>>,
    epochs: Arc<Epochs>,
) -> (CacheParts, &'static MemoryStorage) {
    let budget = config.cache.memory as usize;
    let memory: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(budget)));
    let storage: &'static Tiered = Box::leak(Box::new(Tiered::new(
        memory,
        epochs,
        redis,
        budget > 0,
        config.cache.lock_timeout,
        config
            .upstreams
            .iter()
            .map(|u| fill_age_limit(config, u))
            .max()
            .unwrap_or(config.cache.lock_timeout),
    )));
    // The in-process cache locks, one per fill age (an upstream's timeouts): a fill's request
    // is alive until its upstream answers or times out (a fill that dies releases the lock at
    // once), so waiters follow it that long and no longer. Reloads add ages as needed.
    let locks: &'static Locks = Box::leak(Box::default());
    // The predictor remembers keys whose responses were not storable, to skip their lookups. A
    // response refused only because *its request* had Authorization says nothing about the key,
    // nor does an origin error.
    fn request_specific(reason: &'static str) -> bool {
        matches!(
            reason,
            "authorization" | "post-status" | crate::policy::ORIGIN_ERROR
        )
    }
    let predictor: &'static Predictor<16> =
        Box::leak(Box::new(Predictor::new(1024, Some(request_specific))));
    (
        CacheParts {
            storage,
            locks,
            predictor,
        },
        memory,
    )
}

/// How long a new process waits for the state directory: a fresh start (another process holds
/// it: a configuration mistake, reported), and an upgrade (the old process releases it when its
/// shutdown starts, pingora's fixed 5 s after it handed its listeners over).
const START_LOCK_WAIT: Duration = Duration::from_secs(2);
const UPGRADE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// A server ready to run: the proxy on `listen`, admin on `admin_listen`. With `upgrade`, it
/// first takes over the listening sockets of the running process (pingora's graceful upgrade;
/// that process is then sent `SIGQUIT`).
pub fn build(config: Config, upgrade: bool) -> std::io::Result<Server> {
    let conf = ServerConf {
        threads: config.threads,
        upgrade_sock: config.upgrade_socket.to_string_lossy().into_owned(),
        // SIGTERM: listeners close at once, requests and streams in flight get the grace period
        // (pingora waits all of it, rounded up to seconds), then what remains is cut.
        grace_period_seconds: Some(config.grace_period.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    // Subscribed before anything runs, so the upgrade phases are seen.
    let phases = server.watch_execution_phase();
    server.bootstrap();
    let config = Arc::new(config);
    // The purge queue and the fleet outbox live in `[purge] dir`: one process at a time.
    let dir_lock = if config.redis.is_some() || config.cdn.is_some() {
        let wait = if upgrade {
            UPGRADE_LOCK_WAIT
        } else {
            START_LOCK_WAIT
        };
        Some(DirLock::acquire(&config.purge.dir, wait).map_err(std::io::Error::other)?)
    } else {
        None
    };
    // One connection for every domain that keeps state in Redis; each claims its keyspace on it
    // as it is built, so an overlap stops the start here.
    let shared = match &config.redis {
        Some(r) => Some(Arc::new(Redis::new(r).map_err(std::io::Error::other)?)),
        None => None,
    };
    let redis = match (&shared, &config.redis) {
        (Some(shared), Some(r)) => Some(Arc::new(
            RedisTier::new(shared.clone(), r)
                .map_err(std::io::Error::other)?
                .with_outbox(&config.purge.dir)?,
        )),
        _ => None,
    };
    let epochs = Arc::new(Epochs::default());
    let (parts, memory) = cache_parts(&config, redis.clone(), epochs.clone());
    let audit = Arc::new(Audit::new(shared.clone()).map_err(std::io::Error::other)?);
    let queue = match &config.cdn {
        Some(cdn) => {
            let providers =
                crate::purge::providers::from_settings(cdn).map_err(std::io::Error::other)?;
            let qcfg = QueueConfig::from_config(&config.purge);
            let queue = PurgeQueue::new(qcfg, providers, shared.clone(), audit.clone())?;
            server.add_service(pingora::services::background::background_service(
                "aisle purge worker",
                PurgeWorker::new(queue.clone()),
            ));
            Some(queue)
        }
        None => None,
    };
    server.add_service(pingora::services::background::background_service(
        "aisle state hand-over",
        Handover {
            phases: parking_lot::Mutex::new(Some(phases)),
            lock: parking_lot::Mutex::new(dir_lock),
            queue: queue.clone(),
            redis: redis.clone(),
        },
    ));
    // Protection windows: their switches are shared through Redis; one tick a second decides
    // what is on (and holds the purge queue while CDN purges are deferred).
    let protection = Protection::new(
        config.protection.clone(),
        shared.clone(),
        queue.clone(),
        Some(config.purge.dir.clone()),
    )
    .map_err(std::io::Error::other)?;
    server.add_service(pingora::services::background::background_service(
        "aisle protection windows",
        Ticker(protection.clone()),
    ));
    let invalidator = Invalidator::new(
        parts.storage,
        epochs.clone(),
        redis.clone(),
        queue.clone(),
        audit.clone(),
        config.cache.max_ttl,
    )
    .with_protection(protection.clone());
    // `[region]` (issue 15): accepted invalidations are relayed to the other regions, and
    // theirs applied here (`[region]` needs `[redis]`, checked at load).
    let region = match (&config.region, &redis) {
        (Some(cfg), Some(tier)) => Some(Arc::new(
            crate::invalidation::region::Region::new(cfg, tier.redis().clone(), tier.instance)
                .map_err(std::io::Error::other)?,
        )),
        _ => None,
    };
    let invalidator = Arc::new(match &region {
        Some(r) => invalidator.with_region(r.clone()),
        None => invalidator,
    });
    let region_peers = region.as_ref().map(|r| r.peer_redis()).unwrap_or_default();
    if let Some(region) = region {
        server.add_service(pingora::services::background::background_service(
            "aisle region relay",
            crate::invalidation::region::RegionRelay {
                region,
                invalidator: invalidator.clone(),
            },
        ));
    }
    server.add_service(pingora::services::background::background_service(
        "aisle deferred purges",
        crate::invalidation::protection::Deferrals(invalidator.clone()),
    ));
    let replays = Replays::new(shared.clone()).map_err(std::io::Error::other)?;
    let locks = parts.locks;
    let live: Shared = Arc::new(ArcSwap::from_pointee(Live::new(config.clone(), locks)?));
    crate::metrics::set_config_hash(&config.hash);
    let reloader = Arc::new(
        Reloader::new(config.path.clone(), live.clone(), locks, audit.clone())
            .with_purge_queue(queue)
            .with_protection(protection),
    );
    // Both results show as 0 before the first reload.
    let _ = crate::metrics::reload_metrics();
    server.add_service(pingora::services::background::background_service(
        "aisle reload on SIGHUP",
        Hangup(reloader.clone()),
    ));
    server.add_service(pingora::services::background::background_service(
        "aisle reload on file changes",
        Watch(reloader.clone()),
    ));
    // Upstream health checks and DNS re-resolution, on the pools of the configuration in force.
    server.add_service(pingora::services::background::background_service(
        "aisle upstream health",
        UpstreamHealth(live.clone()),
    ));
    let quotas = Quotas::new(shared.clone()).map_err(std::io::Error::other)?;
    // Warm jobs (issue 15): requests to this gateway's own listener; durable through Redis.
    let warmer = crate::warm::Warmer::new(
        live.clone(),
        shared.clone(),
        invalidator.protection().cloned(),
        region_peers,
    )
    .map_err(std::io::Error::other)?;
    server.add_service(pingora::services::background::background_service(
        "aisle warm jobs",
        crate::warm::Tick(warmer.clone()),
    ));
    let gateway = Gateway::new(live.clone(), parts, invalidator.clone(), replays)
        .with_quotas(quotas)
        .with_warm(warmer.clone());
    let proxy = listener(&server, gateway, live, &config)?;
    if let Some(redis) = &redis {
        let subscriber = Subscriber {
            redis: redis.clone(),
            memory,
            epochs: epochs.clone(),
            audit,
        };
        server.add_service(pingora::services::background::background_service(
            "aisle invalidation subscriber",
            subscriber,
        ));
        server.add_service(pingora::services::background::background_service(
            "aisle invalidation relay",
            Relay {
                redis: redis.clone(),
                epochs: epochs.clone(),
            },
        ));
    }
    let mut admin = Service::new(
        "aisle admin".to_string(),
        Admin {
            redis,
            reloader,
            invalidator,
            warmer: Some(warmer),
        },
    );
    admin.add_tcp(&config.admin_listen);
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    Ok(server)
}

/// The proxy service on `[server] listen`: HTTP/1.1 (and HTTP/2 with `h2c`) on plain TCP, or
/// HTTPS with HTTP/2 and HTTP/1.1 by ALPN when `tls` is set; the header deadline and keep-alive
/// timeout go to pingora's HTTP server options, the connection limits wrap the app.
fn listener(
    server: &Server,
    gateway: Gateway,
    live: Shared,
    config: &Config,
) -> std::io::Result<Service<Limited<pingora::proxy::HttpProxy<Gateway>>>> {
    let l = &config.listener;
    let mut proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    let mut options = HttpServerOptions::default();
    options.h2c = l.h2c && l.tls.is_none();
    options.header_timeout = Some(l.header_timeout);
    options.h1_keepalive_timeout = Some(l.keepalive_timeout.as_secs());
    // An idle HTTP/2 connection is closed after the same time as an idle HTTP/1 one (after
    // 1 s with keep-alive off: HTTP/2 has no request-per-connection mode).
    options.h2_idle_timeout = Some(l.keepalive_timeout.max(Duration::from_secs(1)));
    proxy.server_options = Some(options);
    let mut service = Service::new("aisle proxy".to_string(), Limited::new(proxy, live));
    match &l.tls {
        None => service.add_tcp(&config.listen),
        Some(files) => {
            let resolver = ReloadingCert::new(files.clone()).map_err(std::io::Error::other)?;
            let mut tls = TlsSettings::intermediate("", "").map_err(std::io::Error::other)?;
            tls.set_cert_resolver(Arc::new(resolver));
            tls.enable_h2();
            service.add_tls_with_settings(&config.listen, None, tls);
        }
    }
    Ok(service)
}

/// Runs until SIGINT / SIGTERM / SIGQUIT (hand-over to an upgraded process); SIGHUP reloads
/// the configuration.
pub fn run(config: Config, upgrade: bool) -> std::io::Result<()> {
    let server = build(config, upgrade)?;
    server.run(RunArgs::default());
    Ok(())
}

/// Hands the state directory to the upgraded process: once this process has sent its
/// listeners away (`SIGQUIT`) and its shutdown starts, the purge queue's log and the fleet
/// outbox are synced and closed and the directory lock released, so the new process (waiting
/// on the lock) replays everything this one wrote. On a plain `SIGTERM` nothing is handed over:
/// the lock goes with the process.
struct Handover {
    phases: parking_lot::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
    lock: parking_lot::Mutex<Option<DirLock>>,
    queue: Option<Arc<PurgeQueue>>,
    redis: Option<Arc<RedisTier>>,
}

#[async_trait::async_trait]
impl BackgroundService for Handover {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().take() else {
            return;
        };
        let mut upgrading = false;
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulUpgradeCloseTimeout) => upgrading = true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = shutdown.changed() => break,
            }
        }
        if !upgrading {
            return;
        }
        if let Some(queue) = &self.queue {
            queue.hand_over();
        }
        if let Some(redis) = &self.redis {
            redis.outbox.hand_over();
        }
        if let Some(lock) = self.lock.lock().take() {
            tracing::info!(
                "upgrade: the state directory ({}) is handed to the new process",
                lock.path().display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;
    use std::time::Duration;

    /// Every domain that keeps state in Redis claims its keyspace on one connection without a
    /// clash (nothing connects: building them touches no network).
    #[test]
    fn every_redis_domain_gets_its_own_keyspace() {
        let cfg = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            cluster: Vec::new(),
            prefix: "aisle:".into(),
            timeout: Duration::from_millis(50),
            keys: None,
        };
        let shared = Arc::new(Redis::new(&cfg).unwrap());
        let tier = Arc::new(RedisTier::new(shared.clone(), &cfg).unwrap());
        let audit = Arc::new(Audit::new(Some(shared.clone())).unwrap());
        let dir = tempfile::tempdir().unwrap();
        PurgeQueue::new(
            QueueConfig::new(dir.path()),
            Vec::new(),
            Some(shared.clone()),
            audit,
        )
        .unwrap();
        Replays::new(Some(shared.clone())).unwrap();
        crate::warm::store::Store::new(shared.clone()).unwrap();
        crate::warm::popular::Popular::new(Some(shared.clone())).unwrap();
        let region = crate::config::region::RegionConfig {
            name: "us-east".into(),
            peers: vec![crate::config::region::PeerConfig {
                name: "eu-west".into(),
                redis: RedisConfig {
                    url: "redis://127.0.0.1:2".into(),
                    ..cfg.clone()
                },
            }],
        };
        crate::invalidation::region::Region::new(&region, shared.clone(), 1).unwrap();
        // The on-Redis names stay what they were before the keyspaces were registered.
        assert_eq!(tier.entry_key(0xab), format!("aisle:{{{:032x}}}:e", 0xab));
        assert_eq!(tier.channel(), "aisle:inv");
        // A second gateway part registering the same domains again is fine.
        RedisTier::new(shared.clone(), &cfg).unwrap();
        Audit::new(Some(shared)).unwrap();
    }
}
