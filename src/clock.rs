//! Time, in one place.
//!
//! Two clocks, each for its own job: wall-clock unix milliseconds ([`now_ms`], [`ms_after`],
//! [`millis`]) for anything shared across instances or restarts (purge epochs, queue deadlines,
//! audit records), and a process-local monotonic counter ([`mono_ms`]) for cheap rate limits on
//! the hit path (LRU promotion, the Redis breaker), which must not jump when NTP steps the wall
//! clock. Everything that needs "now" calls these, so a test clock can later be injected here
//! alone.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (0 before 1970, which only a broken clock reports).
pub fn now_ms() -> u64 {
    millis(SystemTime::now())
}

/// Returns once the wall clock has left the millisecond it reads now (at most about 1 ms;
/// bounded at 5 ms in case the clock is stepped back meanwhile).
///
/// A purge recorded at millisecond `m` judges entries created in `m` as purged, since they may
/// come from a fill that was already in flight. A purge that answers only after `m` is over
/// guarantees that nothing requested after its answer is created in `m`, so a refill right
/// after a purge is never mistaken for the fill it replaced.
pub async fn leave_this_ms() {
    let this = now_ms();
    let give_up = Instant::now() + Duration::from_millis(5);
    while now_ms() <= this && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_micros(250)).await;
    }
}

/// Unix milliseconds of `t`, saturating at 0 before 1970 and at `u64::MAX` far in the future.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Unix milliseconds on the calendar clock: what protection windows (and other date-driven
/// policy) are judged by. It is the wall clock, unless `AISLE_FAKE_NOW` (RFC 3339, e.g.
/// `2027-06-12T10:59:58-04:00`; test-only, documented in DEVELOPERS.md) sets where it started:
/// it then runs from there at the real pace. Only the calendar moves: purge epochs, leases and
/// freshness stay on the real clock, so a fake date cannot make cached entries look purged.
pub fn calendar_now_ms() -> u64 {
    static OFFSET_MS: OnceLock<i64> = OnceLock::new();
    let offset = *OFFSET_MS.get_or_init(|| {
        let Ok(text) = std::env::var("AISLE_FAKE_NOW") else {
            return 0;
        };
        match chrono::DateTime::parse_from_rfc3339(text.trim()) {
            Ok(t) => {
                tracing::warn!("AISLE_FAKE_NOW={text}: the calendar clock is faked (tests only)");
                t.timestamp_millis() - now_ms() as i64
            }
            Err(e) => {
                tracing::error!("AISLE_FAKE_NOW={text:?} is not RFC 3339 ({e}); ignored");
                0
            }
        }
    });
    (now_ms() as i64).saturating_add(offset).max(0) as u64
}

/// Unix milliseconds at `delay` from now, rounded up (so a "not before" is never early).
pub fn ms_after(delay: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_add(delay)
        .as_nanos()
        .div_ceil(1_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Milliseconds since this process first asked, plus one (so 0 can mean "never").
/// Monotonic: never goes back, whatever the wall clock does.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_helpers_agree() {
        let a = now_ms();
        let b = ms_after(Duration::from_millis(1500));
        assert!(b >= a + 1500 && b < a + 60_000, "{a} {b}");
        assert_eq!(millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(millis(UNIX_EPOCH + Duration::from_millis(42)), 42);
    }

    #[test]
    fn monotonic_clock_never_goes_back_and_is_never_zero() {
        let a = mono_ms();
        let b = mono_ms();
        assert!(a >= 1 && b >= a);
    }
}
