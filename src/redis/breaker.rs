//! The circuit breaker in front of Redis.
//!
//! Redis is an optimisation (every caller treats a failure as "Redis has nothing"), so when it
//! fails repeatedly the cheapest thing is to stop asking: after [`THRESHOLD`] consecutive
//! failures the circuit opens and every operation is skipped for [`COOLDOWN`]; then exactly one
//! caller probes, and its outcome closes or reopens the circuit. Time is the process's monotonic
//! clock ([`crate::clock::mono_ms`]), so a wall-clock step never holds the circuit open.

use crate::clock::mono_ms;
use crate::metrics::metrics;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Consecutive failures that open the circuit.
pub(super) const THRESHOLD: u32 = 3;
/// How long an open circuit skips Redis before letting one probe through.
pub(super) const COOLDOWN: Duration = Duration::from_millis(500);

/// Skips Redis after repeated failures; lets one probe through after a cooldown.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    failures: AtomicU32,
    /// [`mono_ms`] until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    /// Whether an operation may go to Redis now.
    pub(super) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if mono_ms() < until {
            return false;
        }
        // Half-open: exactly one caller probes.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::warn!("redis is reachable again; circuit closed");
            metrics().redis_circuit_open.set(0);
        }
    }

    /// Opens the circuit at once (there is no connection: nothing to probe until there is).
    pub(super) fn trip(&self) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.probing.store(false, Ordering::Release);
        let was = self
            .open_until
            .swap(mono_ms() + COOLDOWN.as_millis() as u64, Ordering::AcqRel);
        if was == 0 {
            tracing::warn!("no connection to redis; skipping it (circuit open)");
            metrics().redis_circuit_open.set(1);
        }
    }

    /// An operation [`Self::allow`]ed did not go to Redis after all (no connection): if it held
    /// the probe, another caller may probe.
    pub(super) fn skipped(&self) {
        self.probing.store(false, Ordering::Release);
    }

    pub(super) fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probing = self.probing.swap(false, Ordering::AcqRel);
        if n >= THRESHOLD || probing {
            let was = self
                .open_until
                .swap(mono_ms() + COOLDOWN.as_millis() as u64, Ordering::AcqRel);
            if was == 0 {
                tracing::warn!("redis failed {n} times in a row; skipping it (circuit open)");
                metrics().redis_circuit_open.set(1);
            }
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_and_probes() {
        let b = Breaker::default();
        for _ in 0..THRESHOLD {
            assert!(b.allow());
            b.failure();
        }
        assert!(b.is_open());
        assert!(!b.allow(), "open: Redis is skipped");
        // Pretend the cooldown passed (mono_ms is never below 1).
        b.open_until.store(1, Ordering::Release);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.failure();
        assert!(b.is_open() && !b.allow(), "a failed probe reopens");
        b.open_until.store(1, Ordering::Release);
        assert!(b.allow());
        b.success();
        assert!(!b.is_open() && b.allow() && b.allow());
    }
}
