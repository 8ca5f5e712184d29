//! Fastly's purge API: `POST {base}/service/{service_id}/purge` with `Fastly-Key` and the
//! surrogate keys space-separated in `Surrogate-Key` (at most 256 per request), plus
//! `Fastly-Soft-Purge: 1` for a soft purge (content marked stale instead of removed).
//!
//! Shaped so: Fastly is the only provider with a soft purge, so its batches keep the job's `soft`
//! flag. Only tags are sent. Fastly purges a single URL with `PURGE <the URL itself>`, a request
//! that goes to the site's own hostname and only reaches Fastly when that hostname resolves to
//! Fastly from where the gateway runs (it often does not: the gateway is usually behind Fastly,
//! on a private network). URL, prefix and host purges are therefore not sent to Fastly; tag the
//! origin's responses with `Surrogate-Key` and invalidate by tag. Besides the 256-key limit a
//! batch is kept under 8 KiB of header, the request-line limit common proxies enforce, so long
//! keys never make a request that some hop would refuse.

use super::{classify, client, dedup, excerpt, execute, keep_valid, valid_tag};
use crate::config::cdn::FastlySettings;
use crate::purge::{Batch, Kind, Provider, ProviderAnswer, PurgeJob};
use async_trait::async_trait;

/// Fastly's limit of surrogate keys per batch purge.
pub const MAX_KEYS: usize = 256;
/// Longest `Surrogate-Key` header value a batch produces.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

pub struct Fastly {
    endpoint: String,
    service_id: String,
    token: String,
    rate: f64,
    client: reqwest::Client,
}

impl Fastly {
    pub fn new(cfg: &FastlySettings) -> Result<Self, String> {
        Ok(Fastly {
            endpoint: format!("{}/service/{}/purge", cfg.base, cfg.service_id),
            client: client("fastly", super::is_loopback(&cfg.base))?,
            service_id: cfg.service_id.clone(),
            token: cfg.token.expose().to_string(),
            rate: cfg.rate,
        })
    }
}

/// Splits keys into groups of at most [`MAX_KEYS`] whose space-joined length stays within
/// [`MAX_HEADER_BYTES`].
fn groups(keys: Vec<String>, soft: bool) -> Vec<Batch> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut len = 0usize;
    for k in keys {
        let sep = usize::from(!cur.is_empty());
        if !cur.is_empty() && (cur.len() == MAX_KEYS || len + sep + k.len() > MAX_HEADER_BYTES) {
            out.push(std::mem::take(&mut cur));
            len = 0;
        }
        len += usize::from(!cur.is_empty()) + k.len();
        cur.push(k);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter()
        .map(|items| Batch {
            kind: Kind::Tags,
            items,
            soft,
        })
        .collect()
}

#[async_trait]
impl Provider for Fastly {
    fn name(&self) -> &str {
        "fastly"
    }

    fn batches(&self, job: &PurgeJob) -> Vec<Batch> {
        let skipped = job.urls.len() + job.prefixes.len() + job.hosts.len();
        if skipped > 0 {
            tracing::debug!(
                job = %job.id,
                skipped,
                "fastly: URL, prefix and host purges are not sent to Fastly (tags only)"
            );
        }
        let keys = keep_valid(self.name(), "surrogate keys", dedup(&job.tags), |k| {
            valid_tag(k) && k.len() <= MAX_HEADER_BYTES
        });
        groups(keys, job.soft)
    }

    fn rate(&self) -> f64 {
        self.rate
    }

    fn merge_limit(&self, _kind: Kind) -> usize {
        MAX_KEYS
    }

    fn fits(&self, batch: &Batch) -> bool {
        let header = batch.items.iter().map(|k| k.len() + 1).sum::<usize>();
        batch.kind == Kind::Tags
            && batch.items.len() <= MAX_KEYS
            && header.saturating_sub(1) <= MAX_HEADER_BYTES
    }

    async fn send(&self, batch: &Batch, _idempotency: &str) -> ProviderAnswer {
        if batch.kind != Kind::Tags {
            return ProviderAnswer::Fatal(format!(
                "fastly: cannot purge {:?} through the Fastly API (only surrogate keys); this \
                 batch was not made by the Fastly provider",
                batch.kind
            ));
        }
        if batch.items.is_empty() {
            return ProviderAnswer::Done("fastly: empty batch, nothing sent".into());
        }
        let what = format!("POST {}", self.endpoint);
        let mut req = self
            .client
            .post(&self.endpoint)
            .header("Fastly-Key", &self.token)
            .header(reqwest::header::ACCEPT, "application/json")
            .header("Surrogate-Key", batch.items.join(" "));
        if batch.soft {
            req = req.header("Fastly-Soft-Purge", "1");
        }
        let reply = match execute("fastly", &what, req).await {
            Ok(r) => r,
            Err(o) => return o,
        };
        let answer: Option<serde_json::Value> = serde_json::from_str(&reply.body).ok();
        if reply.status.is_success() {
            // `{"key": "purge id", ...}`
            let ids: Vec<String> = answer
                .as_ref()
                .and_then(|a| a.as_object())
                .map(|m| {
                    m.iter()
                        .take(5)
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            let more = batch.items.len().saturating_sub(ids.len());
            return ProviderAnswer::Done(format!(
                "fastly {}purge of {} keys: {}{}",
                if batch.soft { "soft " } else { "" },
                batch.items.len(),
                ids.join(", "),
                if more > 0 && !ids.is_empty() {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        // Fastly errors: `{"msg": "...", "detail": "..."}`.
        let said = answer
            .as_ref()
            .map(|a| {
                [a.get("msg"), a.get("detail")]
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(": ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| excerpt(&reply.body, 300));
        let hint = match reply.status.as_u16() {
            401 | 403 => format!(
                "check [cdn.fastly] token: it must be an API token with the purge_select scope \
                 on service {}",
                self.service_id
            ),
            404 => format!(
                "check [cdn.fastly] service_id = {:?} and base",
                self.service_id
            ),
            _ => "Fastly rejected the request as sent; it will not be retried".into(),
        };
        classify("fastly", &what, &reply, &said, &hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Fastly {
        Fastly::new(&FastlySettings {
            base: "https://api.fastly.com".into(),
            service_id: "svc".into(),
            token: "tok".into(),
            rate: 10.0,
        })
        .unwrap()
    }

    #[test]
    fn tags_only_at_most_256_and_soft_kept() {
        let job = PurgeJob {
            tags: (0..600).map(|i| format!("k{i}")).collect(),
            urls: vec!["https://example.com/a".into()],
            prefixes: vec!["example.com/a".into()],
            hosts: vec!["example.com".into()],
            soft: true,
            ..Default::default()
        };
        let b = provider().batches(&job);
        assert_eq!(
            b.iter().map(|b| b.items.len()).collect::<Vec<_>>(),
            [256, 256, 88]
        );
        assert!(b.iter().all(|b| b.kind == Kind::Tags && b.soft));
        let hard = provider().batches(&PurgeJob { soft: false, ..job });
        assert!(hard.iter().all(|b| !b.soft));
    }

    #[test]
    fn header_stays_small_with_long_keys() {
        let job = PurgeJob {
            tags: (0..40).map(|i| format!("{i:0>1000}")).collect(),
            ..Default::default()
        };
        let b = provider().batches(&job);
        assert!(b.len() >= 5, "{}", b.len());
        for batch in &b {
            assert!(batch.items.join(" ").len() <= MAX_HEADER_BYTES);
        }
        assert_eq!(b.iter().map(|b| b.items.len()).sum::<usize>(), 40);
    }

    #[test]
    fn keys_with_spaces_are_dropped() {
        let job = PurgeJob {
            tags: vec!["a b".into(), "ok".into(), "ok".into()],
            ..Default::default()
        };
        let b = provider().batches(&job);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].items, ["ok"]);
    }
}
