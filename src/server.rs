//! Wiring: a pingora `Server` with the proxy service, the admin service and the cache parts.
//!
//! Pingora wants its storage, eviction manager, lock and predictor as `&'static`; they are
//! created once per process here and leaked deliberately (they live as long as the server).

use crate::admin::Admin;
use crate::config::Config;
use crate::proxy::{CacheParts, Gateway};
use crate::storage::memory::{Eviction, MemoryStorage};
use pingora::apps::http_app::HttpServer;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::predictor::Predictor;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;
use std::sync::Arc;

/// Builds the cache parts for a memory budget.
fn cache_parts(config: &Config) -> CacheParts {
    let budget = config.cache.memory as usize;
    // Capacity hint: entries expected at ~4 KiB each, bounded so tiny test budgets stay tiny.
    let capacity = (budget / 4096).clamp(64, 1 << 20);
    let eviction: &'static Eviction =
        Box::leak(Box::new(Eviction::with_capacity(budget, capacity)));
    let storage: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(eviction)));
    let lock: &'static CacheKeyLockImpl =
        Box::leak(Box::new(CacheLock::new(config.cache.lock_timeout)));
    let predictor: &'static Predictor<16> = Box::leak(Box::new(Predictor::new(1024, None)));
    CacheParts {
        storage,
        eviction,
        lock,
        predictor,
    }
}

/// A server ready to run: the proxy on `listen`, admin on `admin_listen`.
pub fn build(config: Config) -> std::io::Result<Server> {
    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let config = Arc::new(config);
    let parts = cache_parts(&config);
    let gateway = Gateway::new(config.clone(), parts)?;
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "aisle proxy");
    proxy.add_tcp(&config.listen);
    let mut admin = Service::new("aisle admin".to_string(), HttpServer::new_app(Admin));
    admin.add_tcp(&config.admin_listen);
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    Ok(server)
}

/// Runs until SIGINT / SIGTERM.
pub fn run(config: Config) -> std::io::Result<()> {
    let server = build(config)?;
    server.run(RunArgs::default());
    Ok(())
}
