//! Hot reload: one code path for every trigger (`SIGHUP`, `POST /admin/reload`, and file
//! changes when `[server] watch` is on: [`watch`]).
//!
//! A reload compiles the whole configuration again with the code `aisle check` uses
//! (`Config::load`). Any problem leaves the running configuration untouched: each is logged as
//! its `file:line:col` line and returned, and `aisle_config_reloads_total{result="error"}`
//! counts it. Otherwise the new configuration (rules, events, upstreams, webhooks, trust, admin
//! token) replaces the old one in one atomic swap (`arc-swap`): requests already running keep
//! the configuration they started with ([`crate::proxy::Ctx::live`]), later ones get the new.
//!
//! Settings that parts built once at start depend on (listeners, threads, the memory budget,
//! lock and entry lifetimes, Redis, the purge queue) keep their running value; a reload
//! that changes them says "needs restart" in its answer and log rather than applying half of
//! them. CDN providers (`[cdn]`) are rebuilt and swapped into the purge queue with the new
//! configuration (only adding `[cdn]` to a gateway started without one needs a restart).
//! Entries of changed rules are not served under the new definition because each rule's
//! generation is part of its keys (`Rule::generation`). The module sits in layer 7 beside
//! `proxy` and `admin`: it builds what the proxy runs on, and the admin endpoint calls it.

mod watch;
pub use watch::{Watch, DEBOUNCE};

use crate::clock::now_ms;
use crate::config::Config;
use crate::invalidation::audit::{Audit, AuditEntry};
use crate::metrics::reload_metrics;
use crate::proxy::{Live, Locks, Shared};
use crate::purge::queue::PurgeQueue;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// What a successful reload changed.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    /// Rule names new in this configuration.
    pub added: Vec<String>,
    /// Rule names gone from it.
    pub removed: Vec<String>,
    /// Rules whose definition changed (their entries are keyed anew when their generation did).
    pub changed: Vec<String>,
    /// Settings that changed but keep their running value until a restart.
    pub needs_restart: Vec<String>,
}

/// Reloads the configuration file the gateway was started with.
pub struct Reloader {
    path: PathBuf,
    live: Shared,
    locks: &'static Locks,
    /// One reload at a time, so two triggers at once cannot swap in the older of two files.
    running: tokio::sync::Mutex<()>,
    /// Where each reload is recorded (who, when, the new hash, what changed).
    audit: Arc<Audit>,
    /// The purge queue whose CDN providers a reload that changes `[cdn]` replaces.
    purge: Option<Arc<PurgeQueue>>,
    /// The protection windows a reload replaces.
    protection: Option<Arc<crate::invalidation::protection::Protection>>,
}

impl Reloader {
    pub fn new(path: PathBuf, live: Shared, locks: &'static Locks, audit: Arc<Audit>) -> Self {
        Reloader {
            path,
            live,
            locks,
            running: tokio::sync::Mutex::new(()),
            audit,
            purge: None,
            protection: None,
        }
    }

    /// Hands the protection windows over, so reloads replace them.
    pub fn with_protection(
        mut self,
        protection: Arc<crate::invalidation::protection::Protection>,
    ) -> Self {
        self.protection = Some(protection);
        self
    }

    /// Hands the purge queue over, so reloads swap its CDN providers.
    pub fn with_purge_queue(mut self, queue: Option<Arc<PurgeQueue>>) -> Self {
        self.purge = queue;
        self
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.load().config.clone()
    }

    /// Whether the files on disk are not the configuration in force: their hash differs, or
    /// they no longer compile (a reload then says why). What an edit leaves behind when it
    /// lands after the start-up read but before the file watch is set up, so that no event
    /// tells of it (`watch.rs`).
    pub async fn stale(&self) -> bool {
        let path = self.path.clone();
        let running = self.config().hash.clone();
        tokio::task::spawn_blocking(move || {
            Config::load(&path).map_or(true, |config| config.hash != running)
        })
        .await
        .unwrap_or(false)
    }

    /// Compiles the configuration file again and swaps it in; on any problem, changes nothing
    /// and returns every problem as a `file:line:col: message` line. `trigger` names what asked
    /// (`sighup`, `admin`) in the log.
    pub async fn reload(&self, trigger: &str) -> Result<Changes, Vec<String>> {
        let _one = self.running.lock().await;
        let old = self.live.load_full();
        let path = self.path.clone();
        let locks = self.locks;
        let running = old.config.clone();
        let has_queue = self.purge.is_some();
        // Reading files and resolving upstream names block: off the async threads.
        let built = tokio::task::spawn_blocking(move || {
            let mut config = Config::load(&path)
                .map_err(|diags| diags.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            let changes = compare(&running, &mut config);
            // New CDN providers, built before anything is swapped (secrets come from the
            // environment through `${VAR}`; nothing here logs them).
            let providers = if has_queue && running.cdn != config.cdn {
                let cdn = config.cdn.clone().unwrap_or_default();
                Some(
                    crate::purge::providers::from_settings(&cdn)
                        .map_err(|e| vec![format!("{}: {e}", path.display())])?,
                )
            } else {
                None
            };
            let live = Live::new(Arc::new(config), locks).map_err(|e| {
                vec![format!(
                    "{}: cannot resolve an upstream: {e}; fix [upstreams] or DNS, then reload again",
                    path.display()
                )]
            })?;
            Ok((live, changes, providers))
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("the reload task failed: {e}")]));
        let m = reload_metrics();
        match built {
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger, "reload: {e}");
                }
                tracing::error!(
                    trigger,
                    problems = errors.len(),
                    "reload refused: the running configuration stays in force; fix the problems above and reload again"
                );
                m.error.inc();
                Err(errors)
            }
            Ok((live, changes, providers)) => {
                let hash = live.config.hash.clone();
                self.live.store(Arc::new(live));
                if let Some(p) = &self.protection {
                    p.set_windows(self.live.load().config.protection.clone());
                }
                if let (Some(queue), Some(providers)) = (&self.purge, providers) {
                    if let Err(e) = queue.set_providers(providers) {
                        tracing::error!(
                            trigger,
                            "reload: the CDN providers stay as they were: {e}"
                        );
                    }
                }
                m.ok.inc();
                crate::metrics::set_config_hash(&hash);
                let at_ms = now_ms();
                self.audit.record(AuditEntry {
                    id: format!("reload-{at_ms:x}"),
                    at_ms,
                    source: "reload".to_string(),
                    actor: trigger.to_string(),
                    cdn: "none".to_string(),
                    reload: Some(serde_json::json!({
                        "hash": hash,
                        "added": changes.added,
                        "removed": changes.removed,
                        "changed": changes.changed,
                        "needs_restart": changes.needs_restart,
                    })),
                    ..AuditEntry::default()
                });
                tracing::info!(
                    trigger,
                    added = ?changes.added,
                    removed = ?changes.removed,
                    changed = ?changes.changed,
                    "configuration reloaded"
                );
                // What `aisle check` warns about (e.g. an `invalidate_on` name nothing fires).
                for w in &self.live.load().config.rules.warnings {
                    tracing::warn!(trigger, "reload: {w}");
                }
                for setting in &changes.needs_restart {
                    tracing::warn!(
                        trigger,
                        "reload: {setting} changed but needs a restart; the running value stays in force"
                    );
                }
                Ok(changes)
            }
        }
    }
}

/// Reloads on every `SIGHUP`, as nginx, Varnish and HAProxy do (pingora itself leaves the
/// signal to its default action, which ends the process).
pub struct Hangup(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for Hangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP ({e}); reload with POST /admin/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // The outcome is logged and counted by `reload`.
                    let _ = self.0.reload("sighup").await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Keeps the running value of a setting that cannot change live, noting it when it differs.
fn keep_running<T: PartialEq + Clone>(
    needs_restart: &mut Vec<String>,
    name: &str,
    running: &T,
    new: &mut T,
) {
    if differs(needs_restart, name, running != new) {
        *new = running.clone();
    }
}

/// Notes `name` as needing a restart when it `differs`; returns `differs`.
fn differs(needs_restart: &mut Vec<String>, name: &str, differs: bool) -> bool {
    if differs {
        needs_restart.push(name.to_string());
    }
    differs
}

/// What changed from `running` to `new`; settings that cannot change live are put back to
/// their running value in `new` and listed as needing a restart.
pub fn compare(running: &Config, new: &mut Config) -> Changes {
    let mut changes = Changes::default();
    let old_rules = running.rules.rules();
    let new_rules = new.rules.rules();
    for rule in new_rules {
        match old_rules.iter().find(|r| r.name == rule.name) {
            None => changes.added.push(rule.name.to_string()),
            Some(old) => {
                let upstream = |c: &Config, i: usize| c.upstreams[i].name.clone();
                if old.generation != rule.generation
                    || old.cost != rule.cost
                    || old.client_controls != rule.client_controls
                    || upstream(running, old.upstream) != upstream(new, rule.upstream)
                {
                    changes.changed.push(rule.name.to_string());
                }
            }
        }
    }
    for rule in old_rules {
        if !new_rules.iter().any(|r| r.name == rule.name) {
            changes.removed.push(rule.name.to_string());
        }
    }
    let need = &mut changes.needs_restart;
    keep_running(need, "[server] listen", &running.listen, &mut new.listen);
    keep_running(
        need,
        "[server] admin_listen",
        &running.admin_listen,
        &mut new.admin_listen,
    );
    keep_running(need, "[server] threads", &running.threads, &mut new.threads);
    keep_running(
        need,
        "[server] grace_period",
        &running.grace_period,
        &mut new.grace_period,
    );
    keep_running(
        need,
        "[server] upgrade_socket",
        &running.upgrade_socket,
        &mut new.upgrade_socket,
    );
    // The listener's protocol and timeouts are fixed when it is built (pingora's HTTP server
    // options and TLS settings); its connection limits are read live, and the certificate
    // files' contents are reloaded by the listener itself when they change.
    let (rl, nl) = (&running.listener, &mut new.listener);
    keep_running(need, "[server] tls", &rl.tls, &mut nl.tls);
    keep_running(need, "[server] h2c", &rl.h2c, &mut nl.h2c);
    keep_running(
        need,
        "[server] header_timeout",
        &rl.header_timeout,
        &mut nl.header_timeout,
    );
    keep_running(
        need,
        "[server] keepalive_timeout",
        &rl.keepalive_timeout,
        &mut nl.keepalive_timeout,
    );
    let (rc, nc) = (&running.cache, &mut new.cache);
    keep_running(need, "[cache] memory", &rc.memory, &mut nc.memory);
    keep_running(
        need,
        "[cache] lock_timeout",
        &rc.lock_timeout,
        &mut nc.lock_timeout,
    );
    // Purge epochs are kept for twice the max_ttl the invalidator started with: a longer
    // max_ttl live could let an entry outlive the purge that should have removed it.
    keep_running(need, "[cache] max_ttl", &rc.max_ttl, &mut nc.max_ttl);
    let redis_differs = match (&running.redis, &new.redis) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.url != b.url
                || a.cluster != b.cluster
                || a.prefix != b.prefix
                || a.timeout != b.timeout
                || a.keys != b.keys
        }
        _ => true,
    };
    if differs(need, "[redis]", redis_differs) {
        new.redis = running.redis.clone();
    }
    // The region relay's loops and peer connections are built at start (issue 15).
    keep_running(need, "[region]", &running.region, &mut new.region);
    if differs(
        need,
        "[purge]",
        format!("{:?}", running.purge) != format!("{:?}", new.purge),
    ) {
        new.purge = running.purge.clone();
    }
    // CDN providers are swapped live into the purge queue, which exists when the gateway
    // started with a [cdn] table; adding [cdn] to one started without needs a restart.
    if differs(need, "[cdn]", running.cdn.is_none() && new.cdn.is_some()) {
        new.cdn = running.cdn.clone();
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Writes `gateway.toml` and `rules/r.toml` into `dir` and loads them (also for
    /// `watch.rs`'s tests).
    pub(super) fn load(dir: &Path, gateway: &str, rules: &str) -> Config {
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        std::fs::write(dir.join("rules/r.toml"), rules).unwrap();
        std::fs::write(dir.join("gateway.toml"), gateway).unwrap();
        Config::load(&dir.join("gateway.toml")).unwrap()
    }

    pub(super) const GATEWAY: &str = "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[cache]\nrules_dir = \"rules\"\nmemory = \"1MiB\"\n[upstreams.api]\nurl = \"http://127.0.0.1:3\"\n";

    #[test]
    fn rules_added_removed_changed_and_restart_only_settings() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "[[rule]]\nname = \"same\"\nmatch = { path = \"/same\" }\n[[rule]]\nname = \"edited\"\nmatch = { path = \"/e\" }\n[[rule]]\nname = \"gone\"\nmatch = { path = \"/g\" }\n";
        let running = load(dir.path(), GATEWAY, rules);
        let edited = "[[rule]]\nname = \"same\"\nmatch = { path = \"/same\" }\n[[rule]]\nname = \"edited\"\nmatch = { path = \"/e\" }\nvary = [\"query.x\"]\n[[rule]]\nname = \"new\"\nmatch = { path = \"/n\" }\n";
        let gateway = GATEWAY
            .replace("127.0.0.1:1", "127.0.0.1:9")
            .replace("1MiB", "2MiB");
        let mut new = load(dir.path(), &gateway, edited);
        let changes = compare(&running, &mut new);
        assert_eq!(
            changes,
            Changes {
                added: vec!["new".into()],
                removed: vec!["gone".into()],
                changed: vec!["edited".into()],
                // The default upgrade socket is named after the listen port, so it moves too.
                needs_restart: vec![
                    "[server] listen".into(),
                    "[server] upgrade_socket".into(),
                    "[cache] memory".into()
                ],
            }
        );
        assert_eq!(new.listen, "127.0.0.1:1", "the running value stays");
        assert_eq!(new.cache.memory, running.cache.memory);
    }

    /// The listener's timeouts and protocols need a restart; its connection limits do not.
    #[test]
    fn listener_timeouts_need_a_restart_and_limits_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "[[rule]]\nname = \"same\"\nmatch = { path = \"/same\" }\n";
        let running = load(dir.path(), GATEWAY, rules);
        let gateway = GATEWAY.replace(
            "admin_listen = \"127.0.0.1:2\"\n",
            "admin_listen = \"127.0.0.1:2\"\nheader_timeout = \"3s\"\nkeepalive_timeout = \"5s\"\nh2c = true\nmax_connections = 7\nmax_connections_per_client = 3\n",
        );
        let mut new = load(dir.path(), &gateway, rules);
        let changes = compare(&running, &mut new);
        assert_eq!(
            changes.needs_restart,
            vec![
                "[server] h2c".to_string(),
                "[server] header_timeout".into(),
                "[server] keepalive_timeout".into(),
            ]
        );
        assert_eq!(new.listener.header_timeout, running.listener.header_timeout);
        assert!(!new.listener.h2c, "the running value stays");
        assert_eq!(new.listener.max_connections, 7, "limits apply live");
        assert_eq!(new.listener.max_connections_per_client, 3);
    }
}
