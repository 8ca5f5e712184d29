//! Fleet coherence: applying other instances' invalidations to this instance's memory tier.
//!
//! A pingora background service subscribes to the Redis invalidation channel and drops the local
//! copies named in each message (an entry, or every variant of a URI), recording how long the
//! broadcast took. A subscription that was lost (Redis restart, network cut) cannot tell what it
//! missed, so every (re)subscription starts by dropping the whole memory tier and reloading the
//! fleet's tag and prefix purge epochs from Redis.

use super::load_epochs;
use crate::invalidation::audit::Audit;
use crate::metrics::metrics;
use crate::storage::epochs::{Epoch, Epochs};
use crate::storage::memory::MemoryStorage;
use crate::storage::redis::{Message, RedisTier};
use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Subscribes to invalidations and applies them locally.
pub struct Subscriber {
    pub redis: Arc<RedisTier>,
    pub memory: &'static MemoryStorage,
    pub epochs: Arc<Epochs>,
    pub audit: Arc<Audit>,
}

impl Subscriber {
    fn apply(&self, payload: &str) {
        let Some((sender, sent_ms, msg)) = Message::decode(payload) else {
            tracing::debug!("ignoring a malformed invalidation message");
            return;
        };
        if sender == self.redis.instance {
            return;
        }
        match msg {
            Message::Key(k) => {
                self.memory.purge_id(k);
            }
            Message::Uri(u) => {
                let at_ms = u64::try_from(sent_ms).unwrap_or(u64::MAX);
                self.epochs.purge_uri(u, Epoch { at_ms, soft: false });
                self.memory.purge_uri(u);
            }
            Message::Tag { tag, at_ms, soft } => {
                self.epochs.purge_tag(&tag, Epoch { at_ms, soft });
                self.audit
                    .relay(serde_json::json!({"source": "fleet", "tags": [tag], "soft": soft, "at_ms": at_ms}).to_string());
            }
            Message::Prefix {
                prefix,
                at_ms,
                soft,
            } => {
                self.epochs.purge_prefix(&prefix, Epoch { at_ms, soft });
                self.audit.relay(
                    serde_json::json!({"source": "fleet", "prefixes": [prefix], "soft": soft, "at_ms": at_ms}).to_string(),
                );
            }
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let lag = now_ms.saturating_sub(sent_ms) as f64 / 1000.0;
        metrics().broadcast_lag.observe(lag);
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let client = self.redis.subscriber_client()?;
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(self.redis.channel()).await?;
            Ok(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "subscribe timed out",
            ))),
        }
    }
}

#[async_trait]
impl BackgroundService for Subscriber {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut retry = RETRY_START;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    retry = RETRY_START;
                    let dropped = self.memory.clear();
                    load_epochs(&self.redis, &self.epochs).await;
                    if dropped > 0 {
                        tracing::warn!("subscribed to invalidations again; dropped {dropped} memory entries that may have missed some");
                    }
                    self.redis.subscribed.store(true, Ordering::Release);
                    self.redis.mark_reachable();
                    metrics().redis_subscribed.set(1);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(m) => match m.get_payload::<String>() {
                                    Ok(p) => self.apply(&p),
                                    Err(e) => tracing::debug!("bad invalidation payload: {e}"),
                                },
                                None => break,
                            },
                            _ = shutdown.changed() => return,
                        }
                    }
                    self.redis.subscribed.store(false, Ordering::Release);
                    metrics().redis_subscribed.set(0);
                    tracing::warn!("lost the invalidation subscription; the memory tier will be dropped on reconnect");
                }
                Err(e) => tracing::debug!("cannot subscribe to invalidations yet: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.changed() => return,
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}
