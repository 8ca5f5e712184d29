//! The fleet fill lock as a value that releases itself, and keeps itself alive while held.
//!
//! When both tiers miss, one instance takes a short Redis lock on the key and fetches from the
//! origin while the others poll Redis for its result. The lock used to be released by hand in
//! three places, and nothing released it when the upstream failed or the fill broke, so the
//! other instances waited out `lock_timeout`. A [`FillLock`] releases the lock when the last
//! holder drops it: the request's context holds it, and a fill that is being stored holds it
//! until its Redis write lands (so waiters find the entry, not a released lock and no entry).
//!
//! The lock's lease in Redis is short (`lock_timeout`), and a heartbeat renews it every third of
//! the lease for as long as the value is held: an origin slower than the lease keeps its
//! waiters on other instances waiting (issue 10 item 2: they used to fetch for themselves once
//! the lease ran out), while a holder that dies stops renewing and frees the key within one
//! lease. The heartbeat stops with the value, or after `max_life` (no fill is waited for longer).

use super::redis::RedisTier;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// This instance holds the fill lock of one key; dropping the last clone releases it.
#[derive(Clone)]
pub struct FillLock(Arc<Held>);

struct Held {
    redis: Arc<RedisTier>,
    key: u128,
    /// Dropped with the lock: stops the heartbeat.
    _heartbeat: Option<oneshot::Sender<()>>,
}

impl FillLock {
    /// A lock just taken with lease `lease`; renewed every `lease / 3` for at most `max_life`.
    pub(crate) fn new(
        redis: Arc<RedisTier>,
        key: u128,
        lease: Duration,
        max_life: Duration,
    ) -> Self {
        let heartbeat = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (stop, mut stopped) = oneshot::channel::<()>();
            let redis = redis.clone();
            let period = (lease / 3).max(Duration::from_millis(10));
            runtime.spawn(async move {
                let until = tokio::time::Instant::now() + max_life;
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(period) => {}
                    }
                    if tokio::time::Instant::now() >= until {
                        return;
                    }
                    // Lost (expired and taken by another instance): nothing left to renew.
                    // Redis unavailable (`None`): try again next period.
                    if redis.renew_lock(key, lease).await == Some(false) {
                        return;
                    }
                }
            });
            stop
        });
        FillLock(Arc::new(Held {
            redis,
            key,
            _heartbeat: heartbeat,
        }))
    }

    /// The key hash this lock is for.
    pub fn key(&self) -> u128 {
        self.0.key
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Compare-and-delete: a lock that already expired and was taken by another instance is
        // left alone. Off the request path; outside a runtime (shutdown) the lock simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (redis, key) = (self.redis.clone(), self.key);
            runtime.spawn(async move { redis.unlock(key).await });
        }
    }
}
