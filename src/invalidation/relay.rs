//! The relay: gets the invalidation writes Redis missed through to it, in order, once it answers.
//!
//! A pingora background service. Each pass takes the oldest op of the fleet outbox
//! ([`crate::storage::redis::outbox`]) and applies it (an epoch saved with its original time, a
//! URI's variants deleted, a broadcast re-published dated when it was first sent); on success the
//! op is forgotten and the next one follows at once, on failure the relay backs off (capped) and
//! tries the same op again. Oldest first, so an epoch is in Redis before the broadcast that
//! tells the others to look. At start it applies the epochs a previous process left in the
//! outbox to this instance, so a restart does not serve what it had purged either.

use super::apply_epoch;
use crate::metrics::fleet_metrics;
use crate::storage::epochs::{Epoch, Epochs};
use crate::storage::redis::outbox::Op;
use crate::storage::redis::RedisTier;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// Pause when nothing waits (the outbox is only filled when Redis failed, so this is the
/// longest a write recorded while Redis was failing waits for a retry once it works).
const IDLE: Duration = Duration::from_millis(200);
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Re-sends the outbox to Redis.
pub struct Relay {
    pub redis: Arc<RedisTier>,
    pub epochs: Arc<Epochs>,
}

#[async_trait]
impl BackgroundService for Relay {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.redis.redis().start_connecting();
        let outbox = &self.redis.outbox;
        fleet_metrics().pending.set(outbox.len() as i64);
        for op in outbox.ops() {
            if let Op::Epoch { field, at_ms, soft } = op {
                apply_epoch(&self.epochs, &field, Epoch { at_ms, soft });
            }
        }
        let mut retry = RETRY_START;
        loop {
            outbox.sync();
            let wait = match outbox.front() {
                None => IDLE,
                Some((id, op)) => {
                    if self.redis.apply(&op).await {
                        outbox.done(id);
                        fleet_metrics().relayed.inc();
                        retry = RETRY_START;
                        if outbox.is_empty() {
                            tracing::warn!("every invalidation that waited for Redis has reached it; the fleet is told");
                        }
                        continue;
                    }
                    let w = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {
                    outbox.sync();
                    return;
                }
            }
        }
    }
}
