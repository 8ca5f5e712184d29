//! Fleet coherence: applying other instances' invalidations to this instance's memory tier.
//!
//! A pingora background service subscribes to the Redis invalidation channel and drops the local
//! copies named in each message (an entry, or every variant of a URI), recording how long the
//! broadcast took. Whenever this instance cannot prove it has heard every message, it drops its
//! whole memory tier and reloads the fleet's purge epochs from Redis (a resync):
//! - after a (re)subscription: a lost subscription (Redis restart, network cut) cannot tell what
//!   it missed;
//! - after a gap in another instance's sequence numbers (each broadcast carries one; heartbeats
//!   carry the latest), which a message lost on its way leaves;
//! - when its OWN heartbeat, published every [`HEARTBEAT`], has not come back for
//!   [`HEARTBEAT_MISSES`] intervals: a hung Redis (SIGSTOP, a stalled network) keeps the TCP
//!   connection open, so the subscription never drops while messages are lost. It subscribes
//!   again, which resyncs once Redis answers.
//!
//! Resyncs are counted in `aisle_invalidation_resyncs_total{reason}`.
//!
//! The same subscription carries the other instances' audit records (their own channel, see
//! [`crate::invalidation::audit`]), which go to this instance's `/admin/events` stream as they
//! are; while subscribed it also re-sends the records of its own that Redis did not take.

use super::load_epochs;
use crate::clock::now_ms;
use crate::invalidation::audit::Audit;
use crate::metrics::{fleet_metrics, metrics};
use crate::storage::epochs::{Epoch, Epochs};
use crate::storage::memory::MemoryStorage;
use crate::storage::redis::{Envelope, Message, RedisTier};
use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often each instance publishes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Intervals without this instance's own heartbeat coming back before the subscription is
/// treated as lost.
pub const HEARTBEAT_MISSES: u32 = 3;
/// Senders tracked for sequence numbers; a sender not heard of for [`SENDER_FORGET`] is
/// forgotten (restarted instances get new ids), and beyond this many the longest silent is.
const MAX_SENDERS: usize = 4096;
const SENDER_FORGET: Duration = Duration::from_secs(60);

/// Where each sender's sequence stands, as this subscription has heard it.
#[derive(Default)]
struct Sequences {
    /// sender -> (latest sequence number, when last heard from)
    senders: HashMap<u64, (u64, Instant)>,
}

impl Sequences {
    /// Whether `seq` from `sender` shows that a message was missed. Broadcasts count up by one;
    /// a heartbeat repeats the latest; a lower number is a re-sent message (harmless).
    fn gap(&mut self, sender: u64, seq: u64, heartbeat: bool) -> bool {
        let now = Instant::now();
        if !self.senders.contains_key(&sender) && self.senders.len() >= MAX_SENDERS {
            self.senders
                .retain(|_, (_, seen)| now.duration_since(*seen) < SENDER_FORGET);
            if self.senders.len() >= MAX_SENDERS {
                if let Some(oldest) = self
                    .senders
                    .iter()
                    .min_by_key(|(_, (_, seen))| *seen)
                    .map(|(s, _)| *s)
                {
                    self.senders.remove(&oldest);
                }
            }
        }
        let expected = |last: u64| if heartbeat { last } else { last + 1 };
        match self.senders.get_mut(&sender) {
            // The first heard of since subscribing: nothing to compare with.
            None => {
                self.senders.insert(sender, (seq, now));
                false
            }
            Some((last, seen)) => {
                *seen = now;
                let gap = seq > expected(*last);
                if seq > *last {
                    *last = seq;
                }
                gap
            }
        }
    }
}

/// Subscribes to invalidations and applies them locally.
pub struct Subscriber {
    pub redis: Arc<RedisTier>,
    pub memory: &'static MemoryStorage,
    pub epochs: Arc<Epochs>,
    pub audit: Arc<Audit>,
}

impl Subscriber {
    /// Applies one broadcast. `true`: it shows a message was missed (resync).
    fn apply(
        &self,
        payload: &str,
        seqs: &Mutex<Sequences>,
        own_heartbeat: &Mutex<Instant>,
    ) -> bool {
        let Some(Envelope {
            sender,
            sent_ms,
            seq,
            msg,
        }) = Envelope::decode(payload)
        else {
            tracing::debug!("ignoring a malformed invalidation message");
            return false;
        };
        if sender == self.redis.instance {
            if msg == Message::Heartbeat {
                *own_heartbeat.lock() = Instant::now();
            }
            return false;
        }
        let heartbeat = msg == Message::Heartbeat;
        let gap = seq.is_some_and(|n| seqs.lock().gap(sender, n, heartbeat));
        match msg {
            Message::Heartbeat => return gap,
            Message::Key(k) => {
                self.memory.purge_id(k);
            }
            Message::Uri(u) => {
                // Dated when first sent: a re-sent purge does not cover later fills.
                self.epochs.purge_uri(
                    u,
                    Epoch {
                        at_ms: sent_ms,
                        soft: false,
                    },
                );
                self.memory.purge_uri(u);
            }
            Message::Tag { tag, at_ms, soft } => {
                self.epochs.purge_tag(&tag, Epoch { at_ms, soft });
            }
            Message::Prefix {
                prefix,
                at_ms,
                soft,
            } => {
                self.epochs.purge_prefix(&prefix, Epoch { at_ms, soft });
            }
        }
        let lag = now_ms().saturating_sub(sent_ms) as f64 / 1000.0;
        metrics().broadcast_lag.observe(lag);
        gap
    }

    /// Drops the memory tier and reloads the fleet's epochs: this instance may have missed
    /// invalidations.
    async fn resync(&self, reason: &'static str) {
        let dropped = self.memory.clear();
        load_epochs(&self.redis, &self.epochs).await;
        fleet_metrics().resyncs.with_label_values(&[reason]).inc();
        tracing::warn!(
            "may have missed invalidations ({reason}): dropped {dropped} memory entries and reloaded the purge epochs"
        );
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let client = self.redis.subscriber_client()?;
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(self.redis.channel()).await?;
            if let Some(records) = self.audit.channel() {
                pubsub.subscribe(records).await?;
            }
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
        self.redis.redis().start_connecting();
        // Published every HEARTBEAT, whether or not the subscription is up.
        let beat = {
            let redis = self.redis.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEARTBEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    redis.heartbeat().await;
                }
            })
        };
        self.run(&mut shutdown).await;
        beat.abort();
    }
}

impl Subscriber {
    async fn run(&self, shutdown: &mut ShutdownWatch) {
        let mut retry = RETRY_START;
        let mut first = true;
        let mut reason = "resubscribed";
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    retry = RETRY_START;
                    if first {
                        // Nothing cached yet that could have missed anything.
                        self.memory.clear();
                        load_epochs(&self.redis, &self.epochs).await;
                        first = false;
                    } else {
                        self.resync(reason).await;
                    }
                    reason = "resubscribed";
                    self.redis.subscribed.store(true, Ordering::Release);
                    self.redis.mark_reachable();
                    metrics().redis_subscribed.set(1);
                    let seqs = Mutex::new(Sequences::default());
                    let own_heartbeat = Mutex::new(Instant::now());
                    let deaf_after = HEARTBEAT * HEARTBEAT_MISSES + HEARTBEAT / 2;
                    let mut check = tokio::time::interval(HEARTBEAT / 2);
                    let records = self.audit.channel();
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(m) => match m.get_payload::<String>() {
                                    Ok(p) if records.as_deref() == Some(m.get_channel_name()) => {
                                        self.audit.relay(&p);
                                    }
                                    Ok(p) => {
                                        if self.apply(&p, &seqs, &own_heartbeat) {
                                            self.resync("sequence").await;
                                        }
                                    }
                                    Err(e) => tracing::debug!("bad invalidation payload: {e}"),
                                },
                                None => break,
                            },
                            _ = check.tick() => {
                                if self.audit.unsent() > 0 {
                                    let audit = self.audit.clone();
                                    tokio::spawn(async move { audit.flush().await });
                                }
                                let silent = own_heartbeat.lock().elapsed();
                                if silent > deaf_after {
                                    tracing::warn!("this instance's own heartbeat has not come back for {silent:?}: treating the invalidation subscription as lost");
                                    reason = "heartbeat";
                                    break;
                                }
                            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_gaps_are_seen_and_resends_are_not() {
        let mut s = Sequences::default();
        assert!(!s.gap(1, 5, false), "first heard of: nothing to compare");
        assert!(!s.gap(1, 6, false));
        assert!(!s.gap(1, 6, true), "a heartbeat repeats the latest");
        assert!(s.gap(1, 8, false), "7 was missed");
        assert!(!s.gap(1, 7, false), "a late or re-sent message is no gap");
        assert!(!s.gap(1, 9, false));
        assert!(s.gap(1, 10, true), "the heartbeat says 10 was sent: missed");
        assert!(!s.gap(2, 1, false), "senders are separate");
        assert!(!s.gap(1, 11, false));
    }

    #[test]
    fn tracked_senders_are_bounded() {
        let mut s = Sequences::default();
        for sender in 0..(MAX_SENDERS as u64 + 10) {
            s.gap(sender, 1, false);
        }
        assert!(s.senders.len() <= MAX_SENDERS);
    }
}
