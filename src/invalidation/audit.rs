//! The audit log and the live event stream of invalidations.
//!
//! Every invalidation (admin API, webhook, PURGE, unsafe request groups) is recorded with who
//! asked, what it named and, as the purge worker reports them, what each CDN answered. The log
//! is a bounded ring in memory; with Redis it is also kept in Redis so any instance of the fleet
//! can answer `GET /admin/audit` for all of them. Each record is also published to local
//! `GET /admin/events` subscribers (server-sent events), together with invalidations received
//! from other instances.
//!
//! In Redis (the `audit` keyspace): `{prefix}audit` (a list of entries, newest first, capped at
//! 10 000) and `{prefix}audit:cdn:<id>` (one invalidation's CDN answers, kept a week).

use crate::clock::now_ms;
use crate::purge::{AnswerSink, ProviderAnswer};
use crate::redis::{Keyspace, Redis};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Entries kept in memory (and in Redis).
const KEEP: usize = 10_000;
/// Records kept for Redis while it does not take them; beyond this the oldest is dropped (the
/// local log and stream still have it).
const UNSENT: usize = 10_000;
/// Records sent to Redis per round trip.
const FLUSH_BATCH: usize = 100;
/// How long Redis keeps one invalidation's CDN answers.
const ANSWERS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one CDN answered to one attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CdnAnswer {
    pub provider: String,
    pub attempt: u32,
    /// `done`, `retry` or `fatal`.
    pub outcome: String,
    pub detail: String,
    pub at_ms: u64,
}

/// One invalidation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct AuditEntry {
    pub id: String,
    pub at_ms: u64,
    /// `admin`, `webhook:<source>`, `purge-method`, `unsafe-request`, `reload` (the same on
    /// every instance's stream, whichever instance made it).
    pub source: String,
    /// The admin token's holder or the webhook delivery id, when known.
    #[serde(default)]
    pub actor: String,
    pub tags: Vec<String>,
    pub urls: Vec<String>,
    pub prefixes: Vec<String>,
    pub events: Vec<String>,
    pub soft: bool,
    /// `queued`, `none` (no CDN configured or not asked), `unavailable`.
    pub cdn: String,
    #[serde(default)]
    pub cdn_answers: Vec<CdnAnswer>,
    /// Set on the record of a refused webhook delivery (it invalidated nothing): why, from a
    /// fixed set (`bad-signature`, `stale-timestamp`, `too-large`, `malformed`, `unmapped`,
    /// `wrong-method`). Never the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Set on the record of a configuration reload (it invalidated nothing): the new
    /// configuration's `hash` and the rules `added`, `removed`, `changed`, and settings that
    /// `needs_restart`; `actor` says what triggered it (`sighup`, `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<serde_json::Value>,
    /// Set when a protection window changed what the invalidation did (`windows` on, whether
    /// it was `softened`, whether its CDN purge is `deferred`), or when it was `forced` past one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<serde_json::Value>,
    /// Set on the record of an invalidation relayed from another region (issue 15): the
    /// region that accepted it (the id is the one it was given there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Refusal records kept per webhook source per minute: a flood of forged deliveries must not
/// push real invalidations out of the bounded log (the metric still counts every one).
const REFUSALS_PER_MINUTE: u32 = 60;

/// The audit log and the event stream.
pub struct Audit {
    ring: Mutex<VecDeque<AuditEntry>>,
    /// Refusal records this minute, per source (only configured sources reach it).
    refusals: Mutex<std::collections::HashMap<String, (u64, u32)>>,
    events: broadcast::Sender<String>,
    redis: Option<Arc<RedisLog>>,
}

/// The fleet's copy of the log: the connection, the `audit` keyspace and the records Redis has
/// not taken yet.
struct RedisLog {
    redis: Arc<Redis>,
    keys: Keyspace,
    /// This process on the records channel (it ignores its own records there).
    sender: u64,
    /// (number, record JSON), oldest first, waiting for Redis.
    unsent: Mutex<VecDeque<(u64, String)>>,
    next: AtomicU64,
    /// One flush at a time, so records reach Redis in order.
    flushing: tokio::sync::Mutex<()>,
}

impl RedisLog {
    /// The list of entries.
    fn log_key(&self) -> &str {
        self.keys.root()
    }

    /// One invalidation's CDN answers.
    fn answers_key(&self, id: &str) -> String {
        self.keys.key(format_args!(":cdn:{id}"))
    }

    /// The pub/sub channel of records.
    fn channel(&self) -> String {
        self.keys.key(":records")
    }

    /// Queues a record for Redis (the list and the channel).
    fn push(&self, json: String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut unsent = self.unsent.lock();
        unsent.push_back((n, json));
        if unsent.len() > UNSENT {
            unsent.pop_front();
            tracing::warn!(
                "Redis has not taken the last {UNSENT} audit records; dropping the oldest from the \
                 fleet's log and event streams (this instance's own log keeps it)"
            );
        }
    }

    /// Sends the queued records, oldest first, until none is left or Redis fails (they stay).
    async fn flush(&self) {
        let _one = self.flushing.lock().await;
        loop {
            let batch: Vec<(u64, String)> = self
                .unsent
                .lock()
                .iter()
                .take(FLUSH_BATCH)
                .cloned()
                .collect();
            let Some(&(last, _)) = batch.last() else {
                return;
            };
            let channel = self.channel();
            let mut pipe = redis::pipe();
            for (_, json) in &batch {
                pipe.cmd("LPUSH").arg(self.log_key()).arg(json).ignore();
                pipe.cmd("PUBLISH")
                    .arg(&channel)
                    .arg(format!("{:016x} {json}", self.sender))
                    .ignore();
            }
            pipe.cmd("LTRIM")
                .arg(self.log_key())
                .arg(0)
                .arg(KEEP - 1)
                .ignore();
            let sent: Option<()> = self.redis.background_pipe("audit", &pipe).await;
            if sent.is_none() {
                return;
            }
            let mut unsent = self.unsent.lock();
            while unsent.front().is_some_and(|(n, _)| *n <= last) {
                unsent.pop_front();
            }
        }
    }
}

impl Audit {
    /// The log, kept in `redis` too when given. `Err`: the audit keyspace clashes with another
    /// domain's.
    pub fn new(redis: Option<Arc<Redis>>) -> Result<Self, String> {
        let (events, _) = broadcast::channel(1024);
        let redis = match redis {
            Some(redis) => Some(Arc::new(RedisLog {
                keys: redis.keyspace("audit log", "audit")?,
                redis,
                sender: {
                    use aes_gcm::aead::rand_core::RngCore;
                    aes_gcm::aead::OsRng.next_u64()
                },
                unsent: Mutex::new(VecDeque::new()),
                next: AtomicU64::new(0),
                flushing: tokio::sync::Mutex::new(()),
            })),
            None => None,
        };
        Ok(Audit {
            ring: Mutex::new(VecDeque::new()),
            refusals: Mutex::new(std::collections::HashMap::new()),
            events,
            redis,
        })
    }

    /// Records a refused webhook delivery of a configured `source` (`webhook:<name>`): when,
    /// from whom, why; at most [`REFUSALS_PER_MINUTE`] per source a minute.
    pub fn refused(&self, source: &str, reason: &'static str, actor: &str) {
        let at_ms = now_ms();
        {
            let minute = at_ms / 60_000;
            let mut seen = self.refusals.lock();
            let slot = seen.entry(source.to_string()).or_insert((minute, 0));
            if slot.0 != minute {
                *slot = (minute, 0);
            }
            if slot.1 >= REFUSALS_PER_MINUTE {
                return;
            }
            slot.1 += 1;
        }
        self.record(AuditEntry {
            id: format!("refused-{at_ms:x}"),
            at_ms,
            source: source.to_string(),
            actor: actor.to_string(),
            cdn: "none".to_string(),
            refused: Some(reason.to_string()),
            ..AuditEntry::default()
        });
    }

    /// Records an invalidation and publishes it to event-stream subscribers, here and (with
    /// Redis) on every other instance.
    pub fn record(&self, rec: AuditEntry) {
        let json = serde_json::to_string(&rec).unwrap_or_default();
        let _ = self.events.send(json.clone());
        {
            let mut ring = self.ring.lock();
            ring.push_back(rec);
            while ring.len() > KEEP {
                ring.pop_front();
            }
        }
        if let Some(log) = self.redis.clone() {
            log.push(json);
            tokio::spawn(async move { log.flush().await });
        }
    }

    /// Sends the records Redis has not taken yet (the fleet subscriber calls it while Redis
    /// answers).
    pub async fn flush(&self) {
        if let Some(log) = &self.redis {
            log.flush().await;
        }
    }

    /// Records waiting for Redis.
    pub fn unsent(&self) -> usize {
        self.redis.as_ref().map_or(0, |log| log.unsent.lock().len())
    }

    /// The pub/sub channel other instances publish their records on (with Redis).
    pub fn channel(&self) -> Option<String> {
        self.redis.as_ref().map(|log| log.channel())
    }

    /// Corrects a record's CDN status (the queue refused the job).
    pub fn set_cdn(&self, id: &str, cdn: &str) {
        if let Some(rec) = self.ring.lock().iter_mut().rev().find(|r| r.id == id) {
            rec.cdn = cdn.to_string();
        }
    }

    /// Publishes a record another instance made, as received on [`Self::channel`]
    /// (`<sender hex> <record JSON>`), to this instance's stream: the same JSON its own stream
    /// showed. Not recorded again (its instance put it in the fleet's log); this instance's own
    /// records, and anything that is not a record, are ignored.
    pub fn relay(&self, payload: &str) {
        let Some(log) = &self.redis else {
            return;
        };
        let Some((sender, json)) = payload.split_once(' ') else {
            return;
        };
        if u64::from_str_radix(sender, 16).map_or(true, |s| s == log.sender) {
            return;
        }
        if serde_json::from_str::<AuditEntry>(json).is_err() {
            tracing::debug!("ignoring a malformed audit record from another instance");
            return;
        }
        let _ = self.events.send(json.to_string());
    }

    /// A receiver of the live stream (JSON per invalidation).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Records at or after `since_ms`, oldest first (from Redis when configured, so every
    /// instance's invalidations and every worker's CDN answers are included).
    pub async fn since(&self, since_ms: u64) -> Vec<AuditEntry> {
        if let Some(log) = &self.redis {
            let raw: Option<Vec<String>> = log
                .redis
                .background(
                    "audit",
                    redis::cmd("LRANGE").arg(log.log_key()).arg(0).arg(KEEP - 1),
                )
                .await;
            if let Some(raw) = raw {
                let mut out: Vec<AuditEntry> = raw
                    .iter()
                    .filter_map(|j| serde_json::from_str::<AuditEntry>(j).ok())
                    .filter(|r| r.at_ms >= since_ms)
                    .collect();
                out.reverse();
                for rec in out.iter_mut().rev().take(200) {
                    let answers: Option<Vec<String>> = log
                        .redis
                        .background(
                            "audit",
                            redis::cmd("LRANGE")
                                .arg(log.answers_key(&rec.id))
                                .arg(0)
                                .arg(-1),
                        )
                        .await;
                    rec.cdn_answers = answers
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|j| serde_json::from_str(j).ok())
                        .collect();
                }
                return out;
            }
        }
        self.ring
            .lock()
            .iter()
            .filter(|r| r.at_ms >= since_ms)
            .cloned()
            .collect()
    }
}

impl AnswerSink for Audit {
    fn cdn_answer(&self, job_id: &str, provider: &str, attempt: u32, answer: &ProviderAnswer) {
        let (kind, detail) = match answer {
            ProviderAnswer::Done(d) => ("done", d.clone()),
            ProviderAnswer::Retry { detail, .. } => ("retry", detail.clone()),
            ProviderAnswer::Fatal(d) => ("fatal", d.clone()),
        };
        let answer = CdnAnswer {
            provider: provider.to_string(),
            attempt,
            outcome: kind.to_string(),
            detail,
            at_ms: now_ms(),
        };
        if let Some(rec) = self.ring.lock().iter_mut().rev().find(|r| r.id == job_id) {
            rec.cdn_answers.push(answer.clone());
        }
        if let Some(log) = self.redis.clone() {
            let key = log.answers_key(job_id);
            let json = serde_json::to_string(&answer).unwrap_or_default();
            tokio::spawn(async move {
                let mut pipe = redis::pipe();
                pipe.cmd("RPUSH").arg(&key).arg(json).ignore();
                pipe.cmd("EXPIRE")
                    .arg(&key)
                    .arg(ANSWERS_KEPT.as_secs())
                    .ignore();
                let _: Option<()> = log.redis.background_pipe("audit", &pipe).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 item 9: refused deliveries are recorded (source, reason, who), at most
    /// REFUSALS_PER_MINUTE per source a minute, so a flood cannot evict real records.
    #[test]
    fn refusals_are_recorded_and_bounded() {
        let audit = Audit::new(None).unwrap();
        let minute = now_ms() / 60_000;
        for _ in 0..REFUSALS_PER_MINUTE + 40 {
            audit.refused("webhook:tave", "bad-signature", "127.0.0.1:5000");
        }
        let same_minute = now_ms() / 60_000 == minute;
        audit.refused("webhook:stripe", "too-large", "127.0.0.1:5001");
        let ring = audit.ring.lock();
        let tave = ring.iter().filter(|r| r.source == "webhook:tave").count();
        if same_minute {
            assert_eq!(tave, REFUSALS_PER_MINUTE as usize);
        } else {
            // The loop straddled a minute: at most one window's worth in each.
            assert!(tave <= 2 * REFUSALS_PER_MINUTE as usize, "{tave}");
        }
        let last = ring.back().unwrap();
        assert_eq!(last.source, "webhook:stripe");
        assert_eq!(last.refused.as_deref(), Some("too-large"));
        assert_eq!(last.actor, "127.0.0.1:5001");
        assert!(last.tags.is_empty() && last.urls.is_empty() && last.events.is_empty());
    }

    #[tokio::test]
    async fn records_answers_and_streams() {
        let audit = Audit::new(None).unwrap();
        let mut rx = audit.subscribe();
        audit.record(AuditEntry {
            id: "j1".into(),
            at_ms: 10,
            tags: vec!["t".into()],
            ..Default::default()
        });
        audit.record(AuditEntry {
            id: "j2".into(),
            at_ms: 20,
            ..Default::default()
        });
        audit.cdn_answer(
            "j1",
            "cloudflare",
            1,
            &ProviderAnswer::Retry {
                after: None,
                detail: "500".into(),
            },
        );
        audit.cdn_answer("j1", "cloudflare", 2, &ProviderAnswer::Done("id-1".into()));
        let all = audit.since(0).await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].cdn_answers.len(), 2);
        assert_eq!(all[0].cdn_answers[1].outcome, "done");
        assert_eq!(audit.since(15).await.len(), 1);
        let first: AuditEntry = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(first.id, "j1");
    }
}
