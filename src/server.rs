//! Wiring: a pingora `Server` with the proxy service, the admin service and the cache parts.
//!
//! Pingora wants its storage, eviction manager, lock and predictor as `&'static`; they are
//! created once per process here and leaked deliberately (they live as long as the server).

use crate::admin::Admin;
use crate::config::Config;
use crate::control::Replays;
use crate::invalidation::audit::Audit;
use crate::invalidation::relay::Relay;
use crate::invalidation::subscriber::Subscriber;
use crate::invalidation::Invalidator;
use crate::proxy::{CacheParts, Gateway, Live, Locks, Shared};
use crate::purge::queue::{PurgeQueue, QueueConfig};
use crate::purge::worker::PurgeWorker;
use crate::redis::Redis;
use crate::reload::{Hangup, Reloader};
use crate::storage::epochs::Epochs;
use crate::storage::memory::{Eviction, MemoryStorage};
use crate::storage::redis::RedisTier;
use crate::storage::tiered::Tiered;
use arc_swap::ArcSwap;
use pingora::cache::predictor::Predictor;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;
use std::sync::Arc;

pub use crate::proxy::fill_age_limit;

/// Builds the cache parts for a memory budget and the optional Redis tier.
fn cache_parts(
    config: &Config,
    redis: Option<Arc<RedisTier>>,
    epochs: Arc<Epochs>,
) -> (CacheParts, &'static MemoryStorage) {
    let budget = config.cache.memory as usize;
    // Capacity hint: entries expected at ~4 KiB each, bounded so tiny test budgets stay tiny.
    let capacity = (budget / 4096).clamp(64, 1 << 20);
    let eviction: &'static Eviction =
        Box::leak(Box::new(Eviction::with_capacity(budget, capacity)));
    let memory: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(eviction)));
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
    // response refused only because *its request* had Authorization says nothing about the key.
    fn request_specific(reason: &'static str) -> bool {
        matches!(reason, "authorization" | "post-status")
    }
    let predictor: &'static Predictor<16> =
        Box::leak(Box::new(Predictor::new(1024, Some(request_specific))));
    (
        CacheParts {
            storage,
            eviction,
            locks,
            predictor,
        },
        memory,
    )
}

/// A server ready to run: the proxy on `listen`, admin on `admin_listen`.
pub fn build(config: Config) -> std::io::Result<Server> {
    let conf = ServerConf {
        threads: config.threads,
        // SIGTERM: listeners close at once, requests and streams in flight get the grace period
        // (pingora waits all of it, rounded up to seconds), then what remains is cut.
        grace_period_seconds: Some(config.grace_period.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let config = Arc::new(config);
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
    let invalidator = Arc::new(Invalidator::new(
        parts.storage,
        epochs.clone(),
        redis.clone(),
        queue.clone(),
        audit.clone(),
        config.cache.max_ttl,
    ));
    let replays = Replays::new(shared.clone()).map_err(std::io::Error::other)?;
    let locks = parts.locks;
    let live: Shared = Arc::new(ArcSwap::from_pointee(Live::new(config.clone(), locks)?));
    crate::metrics::set_config_hash(&config.hash);
    let reloader = Arc::new(
        Reloader::new(config.path.clone(), live.clone(), locks, audit.clone())
            .with_purge_queue(queue),
    );
    // Both results show as 0 before the first reload.
    let _ = crate::metrics::reload_metrics();
    server.add_service(pingora::services::background::background_service(
        "aisle reload on SIGHUP",
        Hangup(reloader.clone()),
    ));
    let gateway = Gateway::new(live, parts, invalidator.clone(), replays);
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "aisle proxy");
    proxy.add_tcp(&config.listen);
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
        },
    );
    admin.add_tcp(&config.admin_listen);
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    Ok(server)
}

/// Runs until SIGINT / SIGTERM; SIGHUP reloads the configuration.
pub fn run(config: Config) -> std::io::Result<()> {
    let server = build(config)?;
    server.run(RunArgs::default());
    Ok(())
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
        // The on-Redis names stay what they were before the keyspaces were registered.
        assert_eq!(tier.entry_key(0xab), format!("aisle:{{{:032x}}}:e", 0xab));
        assert_eq!(tier.channel(), "aisle:inv");
        // A second gateway part registering the same domains again is fine.
        RedisTier::new(shared.clone(), &cfg).unwrap();
        Audit::new(Some(shared)).unwrap();
    }
}
