//! The fleet fill lock as a value that releases itself.
//!
//! When both tiers miss, one instance takes a short Redis lock on the key and fetches from the
//! origin while the others poll Redis for its result. The lock used to be released by hand in
//! three places, and nothing released it when the upstream failed or the fill broke, so the
//! other instances waited out `lock_timeout`. A [`FillLock`] releases the lock when the last
//! holder drops it: the request's context holds it, and a fill that is being stored holds it
//! until its Redis write lands (so waiters find the entry, not a released lock and no entry).

use super::redis::RedisTier;
use std::sync::Arc;

/// This instance holds the fill lock of one key; dropping the last clone releases it.
#[derive(Clone)]
pub struct FillLock(Arc<Held>);

struct Held {
    redis: Arc<RedisTier>,
    key: u128,
}

impl FillLock {
    pub(crate) fn new(redis: Arc<RedisTier>, key: u128) -> Self {
        FillLock(Arc::new(Held { redis, key }))
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
