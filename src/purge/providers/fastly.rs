//! Fastly's purge API, two endpoints, both with `Fastly-Key` (and `Fastly-Soft-Purge: 1` for a
//! soft purge: content marked stale instead of removed):
//! - surrogate keys: `POST {base}/service/{service_id}/purge` with the keys space-separated in
//!   `Surrogate-Key` (at most 256 per request);
//! - one URL: `POST {base}/purge/{host}{path}?{query}` ("Purge a URL"; the API call, not a
//!   `PURGE` sent to the site's own hostname, which would only reach Fastly where that name
//!   resolves to Fastly, and the gateway usually sits behind Fastly on a private network).
//!
//! Shaped so: Fastly is the only provider with a soft purge, so its batches keep the job's `soft`
//! flag. A URL purge names the object as Fastly caches it, by the hostname clients use: the
//! purged URL's own host, or, when `[cdn.fastly] hosts` lists the service's public hostnames
//! (the gateway sees another `Host` when Fastly overrides it), the URL's path and query on each
//! of those. The API takes one URL per request, so URL batches hold one item. Fastly has no
//! prefix or whole-host purge: those are returned as `unsupported` in the [`Plan`], and the
//! queue counts and shows them; tag the origin's responses with `Surrogate-Key` and invalidate
//! by tag instead. Besides the 256-key limit a key batch is kept under 8 KiB of header, the
//! request-line limit common proxies enforce, so long keys never make a request that some hop
//! would refuse.

use super::{classify, client, dedup, excerpt, execute, keep_valid, valid_tag};
use crate::config::cdn::FastlySettings;
use crate::purge::{Batch, Kind, Plan, Provider, ProviderAnswer, PurgeJob, SkipReason};
use async_trait::async_trait;

/// Fastly's limit of surrogate keys per batch purge.
pub const MAX_KEYS: usize = 256;
/// Longest `Surrogate-Key` header value a batch produces.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

pub struct Fastly {
    endpoint: String,
    /// `{base}/purge/`: a URL purge appends `{host}{path}?{query}`.
    url_endpoint: String,
    /// The service's public hostnames for URL purges; empty: each URL's own host.
    hosts: Vec<String>,
    service_id: String,
    token: String,
    rate: f64,
    client: reqwest::Client,
}

impl Fastly {
    pub fn new(cfg: &FastlySettings) -> Result<Self, String> {
        Ok(Fastly {
            endpoint: format!("{}/service/{}/purge", cfg.base, cfg.service_id),
            url_endpoint: format!("{}/purge/", cfg.base),
            hosts: cfg.hosts.clone(),
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

    fn plan(&self, job: &PurgeJob) -> Plan {
        let mut plan = Plan::default();
        let keys = keep_valid(
            self.name(),
            "surrogate keys",
            Kind::Tags,
            dedup(&job.tags),
            |k| valid_tag(k) && k.len() <= MAX_HEADER_BYTES,
            &mut plan,
        );
        plan.batches = groups(keys, job.soft);
        let urls = keep_valid(
            self.name(),
            "URLs",
            Kind::Urls,
            dedup(&job.urls),
            |u| cached_url(u, "").is_some(),
            &mut plan,
        );
        let mut seen = std::collections::HashSet::new();
        for u in &urls {
            let targets: Vec<String> = if self.hosts.is_empty() {
                cached_url(u, "").into_iter().collect()
            } else {
                self.hosts.iter().filter_map(|h| cached_url(u, h)).collect()
            };
            for t in targets {
                if seen.insert(t.clone()) {
                    plan.batches.push(Batch {
                        kind: Kind::Urls,
                        items: vec![t],
                        soft: job.soft,
                    });
                }
            }
        }
        let unsupported = job.prefixes.len() + job.hosts.len();
        if unsupported > 0 {
            tracing::warn!(
                job = %job.id,
                prefixes = ?job.prefixes,
                hosts = ?job.hosts,
                "fastly: Fastly has no prefix or host purge; {unsupported} items not sent \
                 (counted in aisle_purge_skipped_total and /admin/purges); purge by surrogate key"
            );
        }
        plan.skip(
            Kind::Prefixes,
            dedup(&job.prefixes),
            SkipReason::Unsupported,
        );
        plan.skip(Kind::Hosts, dedup(&job.hosts), SkipReason::Unsupported);
        plan
    }

    fn rate(&self) -> f64 {
        self.rate
    }

    fn merge_limit(&self, kind: Kind) -> usize {
        match kind {
            Kind::Tags => MAX_KEYS,
            _ => 1,
        }
    }

    fn fits(&self, batch: &Batch) -> bool {
        match batch.kind {
            Kind::Tags => {
                let header = batch.items.iter().map(|k| k.len() + 1).sum::<usize>();
                batch.items.len() <= MAX_KEYS && header.saturating_sub(1) <= MAX_HEADER_BYTES
            }
            Kind::Urls => batch.items.len() <= 1,
            _ => false,
        }
    }

    async fn send(&self, batch: &Batch, _idempotency: &str) -> ProviderAnswer {
        match batch.kind {
            Kind::Tags => {}
            Kind::Urls => return self.send_urls(batch).await,
            other => {
                return ProviderAnswer::Fatal(format!(
                    "fastly: cannot purge {other:?} through the Fastly API (only surrogate keys \
                     and single URLs); this batch was not made by the Fastly provider"
                ))
            }
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
        self.refused(&what, &reply, answer.as_ref())
    }
}

impl Fastly {
    /// Purges each URL of `batch` (one, as planned) with `POST {base}/purge/{host}{path}`.
    async fn send_urls(&self, batch: &Batch) -> ProviderAnswer {
        let mut ids = Vec::new();
        for target in &batch.items {
            let endpoint = format!("{}{target}", self.url_endpoint);
            let what = format!("POST {endpoint}");
            let mut req = self
                .client
                .post(&endpoint)
                .header("Fastly-Key", &self.token)
                .header(reqwest::header::ACCEPT, "application/json");
            if batch.soft {
                req = req.header("Fastly-Soft-Purge", "1");
            }
            let reply = match execute("fastly", &what, req).await {
                Ok(r) => r,
                Err(o) => return o,
            };
            let answer: Option<serde_json::Value> = serde_json::from_str(&reply.body).ok();
            if !reply.status.is_success() {
                return self.refused(&what, &reply, answer.as_ref());
            }
            // `{"status": "ok", "id": "108-1391560174-974124"}`
            let id = answer
                .as_ref()
                .and_then(|a| a.get("id"))
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            ids.push(format!("{target}={id}"));
        }
        if ids.is_empty() {
            return ProviderAnswer::Done("fastly: empty batch, nothing sent".into());
        }
        ProviderAnswer::Done(format!(
            "fastly {}URL purge: {}",
            if batch.soft { "soft " } else { "" },
            ids.join(", ")
        ))
    }

    /// The outcome of a non-2xx Fastly answer (`{"msg": "...", "detail": "..."}`).
    fn refused(
        &self,
        what: &str,
        reply: &super::Reply,
        answer: Option<&serde_json::Value>,
    ) -> ProviderAnswer {
        let said = answer
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
        classify("fastly", what, reply, &said, &hint)
    }
}

/// `host[:port]/path?query` of an absolute http(s) URL, as Fastly's "Purge a URL" names the
/// cached object, with `host` (a configured public hostname) in place of the URL's own when
/// not empty. `None` for anything else.
pub(crate) fn cached_url(url: &str, host: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    let mut out = if host.is_empty() {
        let h = u.host_str()?;
        match u.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        }
    } else {
        host.to_string()
    };
    out.push_str(u.path());
    if let Some(q) = u.query() {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::{SkipReason, Skipped};

    fn with_hosts(hosts: &[&str]) -> Fastly {
        Fastly::new(&FastlySettings {
            base: "https://api.fastly.com".into(),
            service_id: "svc".into(),
            token: "tok".into(),
            rate: 10.0,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        })
        .unwrap()
    }

    fn provider() -> Fastly {
        with_hosts(&[])
    }

    #[test]
    fn keys_at_most_256_and_soft_kept() {
        let job = PurgeJob {
            tags: (0..600).map(|i| format!("k{i}")).collect(),
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
    fn urls_are_sent_one_per_request_prefixes_and_hosts_are_counted() {
        let job = PurgeJob {
            tags: vec!["k".into()],
            urls: vec![
                "https://example.com/a?x=1".into(),
                "http://example.com:8080/b".into(),
                "https://example.com/a?x=1".into(),
                "not a url".into(),
            ],
            prefixes: vec!["example.com/a".into()],
            hosts: vec!["example.com".into()],
            soft: true,
            ..Default::default()
        };
        let plan = provider().plan(&job);
        let shape: Vec<(Kind, Vec<String>, bool)> = plan
            .batches
            .iter()
            .map(|b| (b.kind, b.items.clone(), b.soft))
            .collect();
        assert_eq!(
            shape,
            [
                (Kind::Tags, vec!["k".to_string()], true),
                (Kind::Urls, vec!["example.com/a?x=1".to_string()], true),
                (Kind::Urls, vec!["example.com:8080/b".to_string()], true),
            ]
        );
        let skipped = |kind, item: &str, reason| Skipped {
            kind,
            item: item.to_string(),
            reason,
        };
        assert_eq!(
            plan.skipped,
            [
                skipped(Kind::Urls, "not a url", SkipReason::Invalid),
                skipped(Kind::Prefixes, "example.com/a", SkipReason::Unsupported),
                skipped(Kind::Hosts, "example.com", SkipReason::Unsupported),
            ]
        );
        let p = provider();
        assert!(p.fits(&plan.batches[1]));
        let two = Batch {
            kind: Kind::Urls,
            items: vec!["a/1".into(), "a/2".into()],
            soft: false,
        };
        assert!(!p.fits(&two), "the URL API takes one URL per request");
        assert_eq!(p.merge_limit(Kind::Urls), 1);
    }

    #[test]
    fn configured_hosts_replace_the_urls_own() {
        let p = with_hosts(&["www.example.com", "example.com"]);
        let job = PurgeJob {
            urls: vec!["http://origin.internal:8080/api/x?y=1".into()],
            ..Default::default()
        };
        let items: Vec<String> = p.batches(&job).into_iter().flat_map(|b| b.items).collect();
        assert_eq!(
            items,
            ["www.example.com/api/x?y=1", "example.com/api/x?y=1"]
        );
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
    fn keys_with_spaces_are_counted_not_sent() {
        let job = PurgeJob {
            tags: vec!["a b".into(), "ok".into(), "ok".into()],
            ..Default::default()
        };
        let plan = provider().plan(&job);
        assert_eq!(plan.batches.len(), 1);
        assert_eq!(plan.batches[0].items, ["ok"]);
        assert_eq!(plan.skipped.len(), 1);
        assert_eq!(plan.skipped[0].reason, SkipReason::Invalid);
    }
}
