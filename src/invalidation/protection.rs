//! Protection windows at run time ("Saturday mode", issue 14): which are on now, and the switch
//! operators flip by hand.
//!
//! A window is on when its schedule says so ([`crate::config::protection::Schedule`], on the
//! calendar clock [`crate::clock::calendar_now_ms`]) unless a manual switch says otherwise: `on`
//! or `off`, until a given instant or until switched back. Switches are kept in Redis (a hash,
//! one field per window), so they reach every instance within a tick and survive restarts; an
//! instance without Redis keeps them in memory. Every second a tick reads the switches and
//! computes the [`Active`] snapshot the hot path reads with one atomic load: the `Cache-Status`
//! parameter, whether purges are softened and whether CDN purges wait (the purge queue is
//! held). `aisle_protection_active{name}` shows it.

use crate::clock::{calendar_now_ms, now_ms};
use crate::config::protection::{CdnPurges, HardPurges, ProtectionWindow};
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
    /// A window that softens hard purges is on.
    pub soften: bool,
    /// A window that defers CDN purges is on.
    pub defer_cdn: bool,
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
    active: ArcSwap<Active>,
    redis: Option<(Arc<Redis>, Keyspace)>,
    queue: Option<Arc<PurgeQueue>>,
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
            active: ArcSwap::from_pointee(Active::default()),
            redis,
            queue,
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
                    "hard_purges": match w.hard_purges { HardPurges::Soften => "soften", HardPurges::Apply => "apply" },
                    "cdn_purges": match w.cdn_purges { CdnPurges::Defer => "defer", CdnPurges::Send => "send" },
                })
            })
            .collect();
        serde_json::json!({ "now_ms": now, "windows": windows })
    }

    /// Recomputes [`Active`] at the calendar's now; holds or releases the purge queue.
    pub fn refresh(&self) {
        let now = calendar_now_ms();
        let switches = self.switches.lock().clone();
        let mut active = Active::default();
        for w in self.windows.load().iter() {
            let on = is_on(w, switches.get(&w.name), now);
            ACTIVE.with_label_values(&[&w.name]).set(i64::from(on));
            if on {
                active.names.push(w.name.clone());
                active.soften |= w.hard_purges == HardPurges::Soften;
                active.defer_cdn |= w.cdn_purges == CdnPurges::Defer;
                active.serve_stale = active.serve_stale.max(w.serve_stale);
            }
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
        self.switches
            .lock()
            .insert(name.to_string(), switch.clone());
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
        let all: Option<BTreeMap<String, String>> = redis
            .background(
                "protection",
                redis::cmd("HGETALL").arg(keys.key("switches")),
            )
            .await;
        if let Some(all) = all {
            let parsed: BTreeMap<String, Switch> = all
                .into_iter()
                .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                .collect();
            *self.switches.lock() = parsed;
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
}
