//! Protection windows at run time ("Saturday mode", issue 14): which are on now, and the switch
//! operators flip by hand.
//!
//! A window is on when its schedule says so ([`crate::config::protection::Schedule`], on the
//! calendar clock [`crate::clock::calendar_now_ms`]) unless a manual switch says otherwise: `on`
//! or `off`, until a given instant or until switched back. Switches are kept in Redis (a hash,
//! one field per window), so they reach every instance within a tick and survive restarts; an
//! instance without Redis keeps them in memory. Every second a tick reads the switches and
//! computes the [`Active`] snapshot the hot path reads with one atomic load: the `Cache-Status`
//! parameter, whether purges are softened or deferred and whether CDN purges wait (the purge
//! queue is held). `aisle_protection_active{name}` shows it.
//!
//! Deferred purges (`hard_purges = "defer"`) are kept durably in the order they were accepted:
//! with Redis, a list in the protection keyspace (`{prefix}protection:deferred`), so any
//! instance can apply them when the last deferring window ends, also when the one that accepted
//! them has died; without Redis, or when Redis does not take one, a JSON-lines file in `[purge]
//! dir` (`deferred.log`, fsynced before the 202), applied by this instance (also after a
//! restart). [`Deferrals`] applies them, in order, once no deferring window is on: under a short
//! Redis lock (one instance at a time), each item is read, run through
//! [`Invalidator::execute`] and only then removed (at-least-once: a crash mid-way re-applies
//! one purge, which is harmless, rather than losing it).

use crate::clock::{calendar_now_ms, now_ms};
use crate::config::protection::{CdnPurges, HardPurges, ProtectionWindow};
use crate::invalidation::{Invalidator, Plan};
use crate::purge::queue::PurgeQueue;
use crate::redis::{Keyspace, Redis};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{register_int_gauge_vec, IntGaugeVec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `aisle_protection_active{name}`: 1 while the window is on (names come from the config only).
static ACTIVE: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "aisle_protection_active",
        "1 while the protection window is on (by its schedule or switched by hand)",
        &["name"]
    )
    .expect("register aisle_protection_active")
});

/// `aisle_protection_deferred_purges`: purges kept until no deferring window is on.
static DEFERRED: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "aisle_protection_deferred_purges",
        "Purges accepted while a hard_purges = \"defer\" window was on, not applied yet"
    )
    .expect("register aisle_protection_deferred_purges")
});

/// The local file of deferred purges in `[purge] dir`.
pub const DEFERRED_FILE: &str = "deferred.log";

/// How long the applying instance's Redis lock lasts (renewed after each purge applied).
const LOCK_MS: u64 = 30_000;

/// A manual switch of one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub on: bool,
    /// Unix ms after which the switch no longer counts (the schedule rules again).
    #[serde(default)]
    pub until_ms: Option<u64>,
    /// Who flipped it and when.
    pub actor: String,
    pub at_ms: u64,
}

/// What is in force now.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Active {
    /// Names of the windows on, in config order.
    pub names: Vec<String>,
    /// The same names joined by `,` (the `Cache-Status` parameter), made once per change so
    /// answers only clone an `Arc`.
    pub label: Option<Arc<str>>,
    /// A window that softens hard purges is on.
    pub soften: bool,
    /// A window that defers CDN purges is on.
    pub defer_cdn: bool,
    /// A window that defers hard purges is on.
    pub defer_purges: bool,
    /// The longest `serve_stale` of the windows on: stale answers may be served this much past
    /// an entry's own stale windows (zero: not at all).
    pub serve_stale: Duration,
}

impl Active {
    pub fn any(&self) -> bool {
        !self.names.is_empty()
    }
}

/// The windows, their switches and what is active.
pub struct Protection {
    windows: ArcSwap<Vec<ProtectionWindow>>,
    switches: Mutex<BTreeMap<String, Switch>>,
    /// Counts this instance's own switches (changed under the `switches` lock), so a tick's read
    /// of Redis that began before one does not put the older state back ([`Protection::install`]).
    switched: AtomicU64,
    active: ArcSwap<Active>,
    redis: Option<(Arc<Redis>, Keyspace)>,
    queue: Option<Arc<PurgeQueue>>,
    /// `[purge] dir`: where deferred purges go without Redis (`None`: in tests only).
    dir: Option<PathBuf>,
    /// Serializes this instance's writes to the local file.
    file: Mutex<()>,
    /// Deferred purges known now (Redis list + local file), for the status and the gauge.
    deferred: AtomicI64,
}

/// Whether `name` is on at `now` (unix ms): a switch in force decides, else the schedule.
fn is_on(w: &ProtectionWindow, switch: Option<&Switch>, now: u64) -> bool {
    match switch.filter(|s| s.until_ms.is_none_or(|u| now < u)) {
        Some(s) => s.on,
        None => w.schedule.as_ref().is_some_and(|s| s.active_at(now)),
    }
}

impl Protection {
    /// `redis`: where switches are shared (`None`: this instance only); `queue`: held while a
    /// window defers CDN purges. `Err`: the keyspace clashes with another domain's.
    pub fn new(
        windows: Vec<ProtectionWindow>,
        redis: Option<Arc<Redis>>,
        queue: Option<Arc<PurgeQueue>>,
        dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, String> {
        let redis = match redis {
            Some(r) => {
                let keys = r.keyspace("protection switches", "protection")?;
                Some((r, keys))
            }
            None => None,
        };
        let p = Arc::new(Protection {
            windows: ArcSwap::from_pointee(windows),
            switches: Mutex::new(BTreeMap::new()),
            switched: AtomicU64::new(0),
            active: ArcSwap::from_pointee(Active::default()),
            redis,
            queue,
            dir,
            file: Mutex::new(()),
            deferred: AtomicI64::new(0),
        });
        p.refresh();
        Ok(p)
    }

    /// What is in force now (one atomic load: the hot path reads this).
    pub fn active(&self) -> arc_swap::Guard<Arc<Active>> {
        self.active.load()
    }

    /// The windows of a reloaded configuration.
    pub fn set_windows(&self, windows: Vec<ProtectionWindow>) {
        self.windows.store(Arc::new(windows));
        self.refresh();
    }

    /// The windows and their state, for `GET /admin/protection`.
    pub fn status(&self) -> serde_json::Value {
        let now = calendar_now_ms();
        let switches = self.switches.lock().clone();
        let windows: Vec<serde_json::Value> = self
            .windows
            .load()
            .iter()
            .map(|w| {
                serde_json::json!({
                    "name": w.name,
                    "on": is_on(w, switches.get(&w.name), now),
                    "scheduled": w.schedule.as_ref().is_some_and(|s| s.active_at(now)),
                    "switch": switches.get(&w.name),
                    "hard_purges": match w.hard_purges { HardPurges::Soften => "soften", HardPurges::Apply => "apply", HardPurges::Defer => "defer" },
                    "cdn_purges": match w.cdn_purges { CdnPurges::Defer => "defer", CdnPurges::Send => "send" },
                })
            })
            .collect();
        serde_json::json!({
            "now_ms": now,
            "windows": windows,
            "deferred_purges": self.deferred.load(Ordering::Relaxed),
        })
    }

    /// Recomputes [`Active`] at the calendar's now; holds or releases the purge queue.
    /// Holds the switches' lock throughout, so two refreshes (the tick's and a switch's) cannot
    /// cross: one computed from the switches before a change never lands after one computed
    /// from them after it.
    pub fn refresh(&self) {
        let now = calendar_now_ms();
        let switches = self.switches.lock();
        let mut active = Active::default();
        let windows = self.windows.load();
        for w in windows.iter() {
            let on = is_on(w, switches.get(&w.name), now);
            if on {
                active.names.push(w.name.clone());
                active.soften |= w.hard_purges == HardPurges::Soften;
                active.defer_cdn |= w.cdn_purges == CdnPurges::Defer;
                active.defer_purges |= w.hard_purges == HardPurges::Defer;
                active.serve_stale = active.serve_stale.max(w.serve_stale);
            }
        }
        if active.any() {
            active.label = Some(Arc::from(active.names.join(",")));
        }
        if let Some(q) = &self.queue {
            q.hold(active.defer_cdn);
        }
        if **self.active.load() != active {
            if active.names != self.active.load().names {
                tracing::warn!(on = ?active.names, "protection windows changed");
            }
            self.active.store(Arc::new(active));
        }
        // Shown last: once the gauge says a window is on, answers and purges already obey it.
        for w in windows.iter() {
            let on = self.active.load().names.contains(&w.name);
            ACTIVE.with_label_values(&[&w.name]).set(i64::from(on));
        }
    }

    /// Switches window `name` on or off by hand (until `until_ms`, if given), for the fleet.
    /// `Err` names what is wrong: an unknown window, or Redis not taking it (nothing changed).
    pub async fn switch(
        &self,
        name: &str,
        on: bool,
        until_ms: Option<u64>,
        actor: &str,
    ) -> Result<Switch, String> {
        if !self.windows.load().iter().any(|w| w.name == name) {
            let known: Vec<String> = self.windows.load().iter().map(|w| w.name.clone()).collect();
            return Err(format!(
                "no protection window named {name:?}; configured: {known:?} ([[protection]] in gateway.toml)"
            ));
        }
        let switch = Switch {
            on,
            until_ms,
            actor: actor.to_string(),
            at_ms: now_ms(),
        };
        if let Some((redis, keys)) = &self.redis {
            let json = serde_json::to_string(&switch).unwrap_or_default();
            let stored: Option<i64> = redis
                .background(
                    "protection",
                    redis::cmd("HSET")
                        .arg(keys.key("switches"))
                        .arg(name)
                        .arg(json),
                )
                .await;
            if stored.is_none() {
                return Err(
                    "Redis did not take the switch, so the fleet would not see it; nothing changed: retry when Redis answers"
                        .to_string(),
                );
            }
        }
        {
            let mut switches = self.switches.lock();
            switches.insert(name.to_string(), switch.clone());
            self.switched.fetch_add(1, Ordering::Relaxed);
        }
        self.refresh();
        Ok(switch)
    }

    /// Reads the fleet's switches from Redis (a tick; no Redis: nothing to read).
    async fn sync(&self) {
        let Some((redis, keys)) = &self.redis else {
            return;
        };
        if self.windows.load().is_empty() {
            // No window configured: nothing to read (no Redis traffic for a feature not used).
            return;
        }
        let started = self.switched.load(Ordering::Relaxed);
        let all: Option<BTreeMap<String, String>> = redis
            .background(
                "protection",
                redis::cmd("HGETALL").arg(keys.key("switches")),
            )
            .await;
        if let Some(all) = all {
            let parsed = all
                .into_iter()
                .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                .collect();
            self.install(started, parsed);
        }
    }

    /// Takes the fleet's switches as read from Redis by a read that began when `switched` was
    /// `started`. A switch made here since is newer than that read (it was written to Redis
    /// before it was taken here), so the read is dropped and the next tick reads again: without
    /// this, a tick in flight during `POST /admin/protection` switched the window back off on
    /// the instance that switched it, for a second (stop 31's CI failure).
    fn install(&self, started: u64, read: BTreeMap<String, Switch>) {
        let mut switches = self.switches.lock();
        if self.switched.load(Ordering::Relaxed) == started {
            *switches = read;
        }
    }
}

impl Protection {
    /// Whether any configured window defers hard purges (else no Redis traffic for them).
    fn defers(&self) -> bool {
        self.windows
            .load()
            .iter()
            .any(|w| w.hard_purges == HardPurges::Defer)
    }

    fn file_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(DEFERRED_FILE))
    }

    fn set_count(&self, n: i64) {
        self.deferred.store(n, Ordering::Relaxed);
        DEFERRED.set(n);
    }

    /// Keeps one plan (JSON) durably until no deferring window is on. `Ok`: where (`redis` or
    /// `local`); `Err`: neither took it (the caller applies it now rather than lose it).
    pub async fn defer(&self, plan: &str) -> Result<&'static str, String> {
        if let Some((redis, keys)) = &self.redis {
            let n: Option<i64> = redis
                .background(
                    "protection",
                    redis::cmd("RPUSH").arg(keys.key("deferred")).arg(plan),
                )
                .await;
            if n.is_some() {
                self.deferred.fetch_add(1, Ordering::Relaxed);
                DEFERRED.inc();
                return Ok("redis");
            }
            tracing::warn!("Redis did not take a deferred purge; keeping it in [purge] dir");
        }
        let path = self
            .file_path()
            .ok_or("no [purge] dir for deferred purges")?;
        let _guard = self.file.lock();
        append_line(&path, plan).map_err(|e| format!("{}: {e}", path.display()))?;
        self.deferred.fetch_add(1, Ordering::Relaxed);
        DEFERRED.inc();
        Ok("local")
    }

    /// Counts the deferred purges (a tick, when a window defers them).
    async fn count(&self) {
        let mut n = 0;
        if let Some((redis, keys)) = &self.redis {
            let len: Option<i64> = redis
                .background("protection", redis::cmd("LLEN").arg(keys.key("deferred")))
                .await;
            match len {
                Some(len) => n += len,
                None => return,
            }
        }
        if let Some(path) = self.file_path() {
            let _guard = self.file.lock();
            n += read_lines(&path).map_or(0, |l| l.len() as i64);
        }
        self.set_count(n);
    }

    /// Applies the deferred purges, in order, once: the fleet's (under a Redis lock) first, then
    /// this instance's file.
    async fn apply_deferred(&self, inv: &Invalidator) {
        if let Some((redis, keys)) = &self.redis {
            let lock = keys.key("deferred-lock");
            let token = format!("{}-{}", std::process::id(), now_ms());
            let got: Option<Option<String>> = redis
                .background(
                    "protection",
                    redis::cmd("SET")
                        .arg(&lock)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(LOCK_MS),
                )
                .await;
            if let Some(Some(_)) = got {
                let list = keys.key("deferred");
                loop {
                    if self.active().defer_purges {
                        break;
                    }
                    let item: Option<Option<String>> = redis
                        .background("protection", redis::cmd("LINDEX").arg(&list).arg(0))
                        .await;
                    let Some(Some(item)) = item else { break };
                    apply_one(inv, &item).await;
                    let _: Option<Option<String>> = redis
                        .background("protection", redis::cmd("LPOP").arg(&list))
                        .await;
                    let _: Option<i64> = redis
                        .background("protection", redis::cmd("PEXPIRE").arg(&lock).arg(LOCK_MS))
                        .await;
                }
                let _: Option<i64> = redis
                    .background("protection", redis::cmd("DEL").arg(&lock))
                    .await;
            }
        }
        if let Some(path) = self.file_path() {
            let lines = {
                let _guard = self.file.lock();
                read_lines(&path).unwrap_or_default()
            };
            if lines.is_empty() {
                return;
            }
            for line in &lines {
                apply_one(inv, line).await;
            }
            let _guard = self.file.lock();
            if let Err(e) = drop_first(&path, lines.len()) {
                tracing::error!(
                    "deferred purges in {} were applied but not removed: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Runs one kept plan through the normal execute path.
async fn apply_one(inv: &Invalidator, item: &str) {
    match serde_json::from_str::<Plan>(item) {
        Ok(plan) => {
            let s = inv.execute(plan).await;
            tracing::warn!(id = %s.id, "deferred purge applied (no deferring window is on)");
        }
        Err(e) => tracing::error!("a deferred purge is unreadable and skipped: {e}: {item}"),
    }
}

/// Appends one line and fsyncs it.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        // `[purge] dir` exists only once something needed it (no CDN configured: not yet).
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_all()
}

/// The file's lines (none when it does not exist).
fn read_lines(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Removes the first `n` lines (applied), keeping any appended since (write, fsync, rename).
fn drop_first(path: &Path, n: usize) -> std::io::Result<()> {
    let rest: Vec<String> = read_lines(path)?.into_iter().skip(n).collect();
    if rest.is_empty() {
        return std::fs::remove_file(path);
    }
    let tmp = path.with_extension("log.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        for l in &rest {
            f.write_all(format!("{l}\n").as_bytes())?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Every second: counts the deferred purges and applies them once no deferring window is on.
pub struct Deferrals(pub Arc<Invalidator>);

#[async_trait]
impl BackgroundService for Deferrals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // The first round looks whatever the windows: purges kept before a restart or a reload
        // that removed the deferring window are still applied. Later rounds touch Redis only
        // while a window defers purges or some are known to be kept.
        let mut first = true;
        loop {
            if let Some(p) = self.0.protection() {
                let local = p.file_path().is_some_and(|f| f.exists());
                if first || local || p.defers() || p.deferred.load(Ordering::Relaxed) > 0 {
                    p.count().await;
                    if p.deferred.load(Ordering::Relaxed) > 0 && !p.active().defer_purges {
                        p.apply_deferred(&self.0).await;
                        p.count().await;
                    }
                }
            }
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The tick: every second, the fleet's switches and the schedule decide what is active.
pub struct Ticker(pub Arc<Protection>);

/// How often what is active is recomputed (a window's start or end is seen within this).
pub const TICK: Duration = Duration::from_secs(1);

#[async_trait]
impl BackgroundService for Ticker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            self.0.sync().await;
            self.0.refresh();
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::protection::{CdnPurges, HardPurges};

    fn window(name: &str, hard: HardPurges, cdn: CdnPurges) -> ProtectionWindow {
        ProtectionWindow {
            name: name.into(),
            schedule: None,
            serve_stale: Duration::from_secs(if name == "a" { 60 } else { 3600 }),
            hard_purges: hard,
            cdn_purges: cdn,
        }
    }

    #[tokio::test]
    async fn switches_decide_until_they_expire() {
        let p = Protection::new(
            vec![
                window("a", HardPurges::Soften, CdnPurges::Send),
                window("b", HardPurges::Apply, CdnPurges::Defer),
            ],
            None,
            None,
            None,
        )
        .unwrap();
        assert!(!p.active().any(), "no schedule, no switch: off");
        p.switch("a", true, None, "test").await.unwrap();
        let a = p.active();
        assert_eq!(a.names, vec!["a"]);
        assert!(a.soften && !a.defer_cdn);
        p.switch("b", true, Some(calendar_now_ms() + 60_000), "test")
            .await
            .unwrap();
        let both = p.active();
        assert!(both.soften && both.defer_cdn);
        assert_eq!(both.serve_stale, Duration::from_secs(3600), "the longest");
        // An expired switch no longer counts.
        p.switch("b", true, Some(calendar_now_ms().saturating_sub(1)), "test")
            .await
            .unwrap();
        assert_eq!(p.active().names, vec!["a"]);
        assert_eq!(p.active().serve_stale, Duration::from_secs(60));
        let err = p.switch("nope", true, None, "test").await.unwrap_err();
        assert!(err.contains("no protection window named \"nope\""), "{err}");
    }

    /// A tick's read of the fleet's switches that began before a switch made here does not undo
    /// it; one that began after it is taken (another instance may have switched since).
    #[tokio::test]
    async fn a_read_begun_before_a_switch_does_not_undo_it() {
        let p = Protection::new(
            vec![window("a", HardPurges::Soften, CdnPurges::Defer)],
            None,
            None,
            None,
        )
        .unwrap();
        let started = p.switched.load(Ordering::Relaxed);
        p.switch("a", true, None, "test").await.unwrap();
        // The read began before the switch: Redis did not hold it yet.
        p.install(started, BTreeMap::new());
        p.refresh();
        assert_eq!(p.active().names, vec!["a"], "the switch stays on");
        // A read begun after it is the fleet's word: here another instance switched it off.
        let started = p.switched.load(Ordering::Relaxed);
        let mut off = p.switches.lock().clone();
        off.get_mut("a").unwrap().on = false;
        p.install(started, off);
        p.refresh();
        assert!(!p.active().any(), "the fleet's later switch is taken");
    }

    /// Deferred purges kept in the local file come back in the order they were accepted, and
    /// removing the applied ones keeps those appended meanwhile.
    #[tokio::test]
    async fn the_local_file_keeps_deferred_purges_in_order() {
        let dir = std::env::temp_dir().join(format!("aisle-deferred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Protection::new(
            vec![window("d", HardPurges::Defer, CdnPurges::Send)],
            None,
            None,
            Some(dir.clone()),
        )
        .unwrap();
        for i in 0..3 {
            assert_eq!(p.defer(&format!("{{\"n\":{i}}}")).await.unwrap(), "local");
        }
        let path = dir.join(DEFERRED_FILE);
        let lines = read_lines(&path).unwrap();
        assert_eq!(lines, vec!["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]);
        // Two applied; one more arrives before they are removed.
        p.defer("{\"n\":3}").await.unwrap();
        drop_first(&path, 2).unwrap();
        assert_eq!(read_lines(&path).unwrap(), vec!["{\"n\":2}", "{\"n\":3}"]);
        p.count().await;
        assert_eq!(p.status()["deferred_purges"], serde_json::json!(2));
        drop_first(&path, 2).unwrap();
        assert!(!path.exists(), "all applied: the file is gone");
        p.count().await;
        assert_eq!(p.status()["deferred_purges"], serde_json::json!(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
