//! The purge worker: drains the durable queue ([`super::queue`]) into the CDNs.
//!
//! A pingora background service with one loop per provider, so a slow or failing CDN never holds
//! up another. Each loop paces its provider to `rate()` with a local token bucket (and, for items
//! in Redis, the fleet-wide limiter inside the claim script), keeps up to `concurrency` requests
//! in flight, each carrying as many queued items as the API takes in one request, renews their
//! Redis leases while the request lasts, and turns the answer into a queue transition for every
//! item: `Done` forgets it; `Retry` with a `Retry-After` (every 429) is pacing, not a failure: the
//! provider pauses until then, here and (through Redis) on every instance, and resumes at its
//! rate, one request at a time (the bucket saves nothing up during a pause), and the item's
//! attempts are not consumed; any other `Retry` counts a failed attempt and puts the item back
//! after capped exponential backoff with full jitter. An item is given up (dead letter) when
//! refused (`Fatal`), or when it still fails `give_up_after` after its acceptance (or after an
//! opt-in `max_attempts` failures): an outage shorter than the horizon loses nothing. Every
//! attempt is reported to [`super::AnswerSink`] for each item's job and counted in the metrics.
//! The state lives in the queue, never here: a worker can be stopped or killed at any point and
//! the next one (here or on another instance) picks up where it left. That is also how a reload
//! that swaps the providers ([`PurgeQueue::set_providers`]) is taken in: the loops of the old
//! set are told to stop (their sends in flight finish, with the provider they started with) and
//! loops on the new set start at once.

use super::queue::{Claim, Claimed, Finish, Item, PurgeQueue, QueueConfig};
use super::{Provider, ProviderAnswer};
use crate::clock::{ms_after, now_ms};
use crate::metrics::metrics;
use async_trait::async_trait;
use futures_util::FutureExt;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Drains a [`PurgeQueue`] for every provider until shutdown.
pub struct PurgeWorker {
    queue: Arc<PurgeQueue>,
}

impl PurgeWorker {
    pub fn new(queue: Arc<PurgeQueue>) -> Self {
        PurgeWorker { queue }
    }
}

#[async_trait]
impl BackgroundService for PurgeWorker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.queue.provider_changes();
        // Every provider loop, of the set in force and of replaced sets finishing their sends
        // in flight. Owned here: dropping this future (a crash) ends them all.
        let mut loops: JoinSet<()> = JoinSet::new();
        loop {
            changes.borrow_and_update();
            // Dropping (or sending on) `stop` tells this set's loops to end.
            let (stop, stopped) = tokio::sync::watch::channel(false);
            for p in self.queue.providers().iter() {
                loops.spawn(drain(self.queue.clone(), p.clone(), stopped.clone()));
            }
            let swapped = loop {
                while let Some(r) = loops.try_join_next() {
                    if let Err(e) = r {
                        tracing::error!("a purge worker loop failed: {e}");
                    }
                }
                if stopping(&shutdown) {
                    break false;
                }
                tokio::select! {
                    _ = shutdown.changed() => {}
                    r = changes.changed() => break r.is_ok(),
                }
            };
            let _ = stop.send(true);
            if !swapped {
                break;
            }
        }
        while let Some(r) = loops.join_next().await {
            if let Err(e) = r {
                tracing::error!("a purge worker loop failed: {e}");
            }
        }
    }
}

/// The retry delay after `attempt` failures: full jitter over `base * 2^(attempt-1)`, capped at
/// `max`. `unit` is a random number in `[0, 1)`.
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    exp.min(max).mul_f64(unit.clamp(0.0, 1.0))
}

/// A random number in `[0, 1)`.
fn unit_random() -> f64 {
    use aes_gcm::aead::rand_core::RngCore;
    (aes_gcm::aead::OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Paces one provider: `rate` tokens per second, up to one second's worth saved up.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        let capacity = rate.max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity.min(1.0),
            last: now,
        }
    }

    fn unlimited(&self) -> bool {
        !self.rate.is_finite() || self.rate <= 0.0
    }

    /// Nothing before `until`, then one request, then the rate: a pause saves nothing up, so
    /// the end of a `Retry-After` is not a burst.
    fn hold_until(&mut self, until: Instant) {
        if until > self.last {
            self.last = until;
            self.tokens = self.capacity.min(1.0);
        }
    }

    fn refill(&mut self, now: Instant) {
        // Never moves `last` back: during a hold it lies in the future.
        if now > self.last {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
            self.last = now;
        }
    }

    /// How long until a token is available.
    fn wait(&mut self, now: Instant) -> Duration {
        if self.unlimited() {
            return self.last.saturating_duration_since(now);
        }
        let held = self.last.saturating_duration_since(now);
        self.refill(now);
        if self.tokens >= 1.0 {
            held
        } else {
            held + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    fn take(&mut self, now: Instant) {
        if !self.unlimited() {
            self.refill(now);
            self.tokens -= 1.0;
        }
    }
}

/// How long a busy worker goes without refreshing its provider's gauges.
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// How often a held queue (a protection window deferring CDN purges) looks again.
const HELD_POLL: Duration = Duration::from_millis(500);

fn stopping(shutdown: &ShutdownWatch) -> bool {
    // A dropped sender can never say "stop" again: treat it as stop.
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// One provider's loop: claim within the pace, send, record; until shutdown.
async fn drain(queue: Arc<PurgeQueue>, provider: Arc<dyn Provider>, mut shutdown: ShutdownWatch) {
    let name = provider.name().to_string();
    let cfg = queue.config().clone();
    let rate = provider.rate();
    if rate.is_nan() || rate <= 0.0 {
        tracing::warn!("purge provider {name} has rate {rate}: sending unpaced");
    }
    let wake = queue.waker(&name);
    let mut bucket = Bucket::new(rate, Instant::now());
    // Set by a `Retry-After`: nothing is sent to this provider before it.
    // (Kept by the queue per provider name, so loops restarted by a reload keep the pause.)
    let paused_until = queue.pause_of(&name);
    let mut sends: JoinSet<()> = JoinSet::new();
    let mut gauges_at: Option<Instant> = None;
    let concurrency = cfg.concurrency.max(1);

    while !stopping(&shutdown) {
        while let Some(r) = sends.try_join_next() {
            if let Err(e) = r {
                tracing::error!("purge send task for {name} failed: {e}");
            }
        }
        if gauges_at.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            queue.provider_status(&name).await;
            gauges_at = Some(Instant::now());
        }
        if sends.len() >= concurrency {
            tokio::select! {
                _ = sends.join_next() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if queue.held() {
            // A protection window defers CDN purges: keep them queued, look again soon.
            idle(&mut sends, &mut shutdown, Some(&wake), HELD_POLL).await;
            continue;
        }
        let now = Instant::now();
        if let Some(until) = *paused_until.lock() {
            bucket.hold_until(until);
        }
        let wait = bucket.wait(now);
        if !wait.is_zero() {
            idle(&mut sends, &mut shutdown, None, wait).await;
            continue;
        }
        match queue.claim(&*provider).await {
            Claim::Item(claimed) => {
                bucket.take(Instant::now());
                sends.spawn(attempt(
                    queue.clone(),
                    provider.clone(),
                    claimed,
                    paused_until.clone(),
                ));
            }
            Claim::Idle(next_due) => {
                let until_due = next_due.map_or(cfg.poll_interval, |due| {
                    Duration::from_millis(due.saturating_sub(now_ms()))
                });
                let wait = cfg
                    .poll_interval
                    .min(until_due)
                    .max(Duration::from_millis(1));
                idle(&mut sends, &mut shutdown, Some(&wake), wait).await;
            }
        }
    }

    // Let the sends in flight finish (their outcomes recorded); past the grace, dropping the set
    // aborts them and their items come back (the file on restart, Redis after the lease).
    let grace = tokio::time::timeout(cfg.shutdown_grace, async {
        while sends.join_next().await.is_some() {}
    })
    .await;
    if grace.is_err() {
        tracing::warn!(
            "purge worker for {name}: {} sends still in flight at shutdown; they will be retried",
            sends.len()
        );
    }
}

/// Waits for `wait`, a wake-up, a finished send, or shutdown, whichever comes first.
async fn idle(
    sends: &mut JoinSet<()>,
    shutdown: &mut ShutdownWatch,
    wake: Option<&tokio::sync::Notify>,
    wait: Duration,
) {
    let woken = async {
        match wake {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    let finished = async {
        if sends.is_empty() {
            std::future::pending::<()>().await;
        } else {
            let _ = sends.join_next().await;
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = woken => {}
        _ = finished => {}
        _ = shutdown.changed() => {}
    }
}

/// When a pause of `after` from `now` ends. `after` is the CDN's `Retry-After`: one past what an
/// `Instant` holds pauses for a century instead of panicking the send.
fn pause_end(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// What becomes of one item after an answer: its updated state and the queue transition. A
/// `Retry` with `after` is pacing and consumes no attempt.
fn decide(
    cfg: &QueueConfig,
    item: &mut Item,
    answer: &ProviderAnswer,
    now: u64,
    unit: f64,
) -> Finish {
    match answer {
        ProviderAnswer::Done(_) => Finish::Done,
        ProviderAnswer::Fatal(detail) => {
            item.attempts = item.attempts.saturating_add(1);
            item.last_error = detail.clone();
            Finish::Dead
        }
        ProviderAnswer::Retry { after, detail } => {
            item.last_error = detail.clone();
            if after.is_none() {
                item.attempts = item.attempts.saturating_add(1);
            }
            let horizon = item
                .created_ms
                .saturating_add(cfg.give_up_after.as_millis() as u64);
            let too_many = after.is_none() && cfg.max_attempts.is_some_and(|m| item.attempts >= m);
            if now >= horizon || too_many {
                return Finish::Dead;
            }
            let delay = match after {
                Some(after) => *after,
                None => backoff(item.attempts, cfg.backoff_base, cfg.backoff_max, unit),
            };
            // One last try at the horizon rather than a wait past it.
            item.not_before_ms = now
                .saturating_add(delay.as_millis() as u64)
                .max(now + 1)
                .min(horizon.max(now + 1));
            Finish::Retry
        }
    }
}

/// One request carrying the claimed items: send (renewing their leases meanwhile), report the
/// answer for each item's job, count, and record each item's outcome in the queue.
async fn attempt(
    queue: Arc<PurgeQueue>,
    provider: Arc<dyn Provider>,
    claimed: Claimed,
    paused_until: Arc<Mutex<Option<Instant>>>,
) {
    let cfg = queue.config();
    let name = provider.name();
    let key = claimed.key();
    let m = metrics();
    m.purge_batch_items
        .with_label_values(&[name])
        .observe(claimed.items.len() as f64);
    let send = AssertUnwindSafe(provider.send(&claimed.batch, &key)).catch_unwind();
    let send = tokio::time::timeout(cfg.send_timeout, send);
    let renew = async {
        let every = (cfg.lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            queue.renew(&claimed).await;
        }
    };
    let answer = tokio::select! {
        sent = send => match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => ProviderAnswer::Retry {
                after: None,
                detail: "the provider panicked".into(),
            },
            Err(_) => ProviderAnswer::Retry {
                after: None,
                detail: format!("no answer within {:?}", cfg.send_timeout),
            },
        },
        _ = renew => unreachable!("renewing never ends"),
    };
    if let ProviderAnswer::Retry {
        after: Some(after), ..
    } = &answer
    {
        // Before anything else: the other instances should hold off as soon as possible.
        queue.pause_fleet(name, ms_after(*after)).await;
        let until = pause_end(Instant::now(), *after);
        let mut p = paused_until.lock();
        if p.is_none_or(|t| t < until) {
            *p = Some(until);
        }
    }
    let outcome = match &answer {
        ProviderAnswer::Done(_) => "done",
        ProviderAnswer::Retry { after: Some(_), .. } => {
            m.purge_throttled.with_label_values(&[name]).inc();
            "retry"
        }
        ProviderAnswer::Retry { .. } => "retry",
        ProviderAnswer::Fatal(_) => "fatal",
    };
    m.purge_requests.with_label_values(&[name, outcome]).inc();
    let now = now_ms();
    // One jitter draw per request: items that failed together are retried together (and so
    // keep sharing one request).
    let unit = unit_random();
    let Claimed { items, store, .. } = claimed;
    let mut outcomes = Vec::with_capacity(items.len());
    for mut item in items {
        let n = item.attempts.saturating_add(1);
        let reported = std::panic::catch_unwind(AssertUnwindSafe(|| {
            queue.answers().cdn_answer(&item.job, name, n, &answer)
        }));
        if reported.is_err() {
            tracing::error!("reporting the answer to purge item {} panicked", item.id);
        }
        let finish = decide(cfg, &mut item, &answer, now, unit);
        match finish {
            Finish::Done if item.created_ms > 0 => {
                let secs = now.saturating_sub(item.created_ms) as f64 / 1000.0;
                m.purge_latency.with_label_values(&[name]).observe(secs);
            }
            Finish::Dead => tracing::warn!(
                "purge item {} given up after {} failed attempts ({}); moved to the dead letters",
                item.id,
                item.attempts,
                item.last_error
            ),
            _ => {}
        }
        outcomes.push((item, finish));
    }
    queue.finish(store, outcomes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(300);
        let top = |a| backoff(a, base, max, 1.0);
        assert_eq!(top(1), Duration::from_millis(500));
        assert_eq!(top(2), Duration::from_secs(1));
        assert_eq!(top(4), Duration::from_secs(4));
        assert_eq!(top(10), Duration::from_secs(256));
        assert_eq!(top(11), max);
        assert_eq!(top(u32::MAX), max, "no overflow");
        assert_eq!(backoff(3, base, max, 0.0), Duration::ZERO);
        assert_eq!(backoff(3, base, max, 0.5), Duration::from_secs(1));
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u), "{u}");
            assert!(backoff(5, base, max, u) < Duration::from_secs(8));
        }
    }

    #[test]
    fn a_retry_after_past_the_end_of_time_pauses_without_panicking() {
        let now = Instant::now();
        assert_eq!(
            pause_end(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let after = crate::purge::providers::parse_retry_after(
            "18446744073709551615",
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert!(pause_end(now, after) > now + Duration::from_secs(365 * 86_400));
    }

    fn item(created_ms: u64) -> Item {
        Item {
            id: "j-cf-0".into(),
            job: "j".into(),
            provider: "cf".into(),
            batch: crate::purge::Batch {
                kind: crate::purge::Kind::Tags,
                items: vec!["t".into()],
                soft: false,
            },
            attempts: 0,
            not_before_ms: 0,
            last_error: String::new(),
            created_ms,
        }
    }

    #[test]
    fn failures_retry_until_the_horizon_and_pacing_consumes_no_attempt() {
        let mut cfg = QueueConfig::new("/nonexistent");
        cfg.give_up_after = Duration::from_secs(60);
        let t0 = 1_000_000;
        let fail = ProviderAnswer::Retry {
            after: None,
            detail: "503".into(),
        };
        let mut it = item(t0);
        for i in 1..=100u64 {
            let now = t0 + i * 100;
            assert_eq!(decide(&cfg, &mut it, &fail, now, 0.5), Finish::Retry, "{i}");
            assert!(it.not_before_ms > now && it.not_before_ms <= t0 + 60_000);
        }
        assert_eq!(it.attempts, 100, "no max_attempts by default");
        assert_eq!(decide(&cfg, &mut it, &fail, t0 + 60_000, 0.5), Finish::Dead);

        let throttle = ProviderAnswer::Retry {
            after: Some(Duration::from_secs(2)),
            detail: "429".into(),
        };
        cfg.max_attempts = Some(1);
        let mut it = item(t0);
        for _ in 0..10 {
            assert_eq!(decide(&cfg, &mut it, &throttle, t0, 0.5), Finish::Retry);
        }
        assert_eq!(it.attempts, 0, "a 429 is pacing");
        assert_eq!(it.not_before_ms, t0 + 2_000, "retried when the CDN said");
        assert_eq!(
            decide(&cfg, &mut it, &fail, t0, 0.5),
            Finish::Dead,
            "an opted-in max_attempts still counts failures"
        );
        let mut it = item(t0);
        let fatal = ProviderAnswer::Fatal("400".into());
        assert_eq!(decide(&cfg, &mut it, &fatal, t0, 0.5), Finish::Dead);
    }

    #[test]
    fn a_pause_ends_with_one_request_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, t0);
        // Idle long enough to save up a burst, then a pause of 2 s.
        let later = t0 + Duration::from_secs(5);
        b.hold_until(later + Duration::from_secs(2));
        assert_eq!(b.wait(later), Duration::from_secs(2));
        let end = later + Duration::from_secs(2);
        assert_eq!(b.wait(end), Duration::ZERO);
        b.take(end);
        let w = b.wait(end);
        assert!(
            w > Duration::from_millis(99) && w <= Duration::from_millis(100),
            "the second request waits for the rate, no burst: {w:?}"
        );
    }

    #[test]
    fn bucket_paces_to_the_rate_after_a_one_second_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, t0);
        // Starts with one token: a fresh worker does not burst.
        assert_eq!(b.wait(t0), Duration::ZERO);
        b.take(t0);
        let w = b.wait(t0);
        assert!(
            w > Duration::from_millis(99) && w <= Duration::from_millis(100),
            "{w:?}"
        );
        // A long idle saves up at most one second's worth.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.wait(later), Duration::ZERO);
            b.take(later);
        }
        assert!(b.wait(later) > Duration::ZERO);

        let mut slow = Bucket::new(0.5, t0);
        slow.take(t0);
        let w = slow.wait(t0);
        assert!(
            w > Duration::from_millis(1999) && w <= Duration::from_secs(2),
            "{w:?}"
        );

        let mut free = Bucket::new(f64::INFINITY, t0);
        for _ in 0..100 {
            assert_eq!(free.wait(t0), Duration::ZERO);
            free.take(t0);
        }
    }
}
