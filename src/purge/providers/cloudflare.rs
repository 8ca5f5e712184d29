//! Cloudflare's purge API: `POST {base}/client/v4/zones/{zone_id}/purge_cache` with a Bearer
//! token and a JSON body naming exactly one kind (`files`, `tags`, `hosts` or `prefixes`).
//!
//! Shaped by the API's rules: one kind per request (so one [`Batch`] kind per request), at most
//! 100 items per request (`max_items` may raise URL batches to 500 on Enterprise; the other kinds
//! stay at 100), and success is the JSON `success: true`, not just a 2xx. Cloudflare has no soft
//! purge, so batches are never soft. Items Cloudflare would reject (tags with spaces, URLs
//! without a scheme, prefixes with one) are dropped and logged, so one bad item does not fail
//! the other 99.

use super::{chunked, classify, client, dedup, excerpt, execute, keep_valid, valid_tag};
use crate::config::cdn::{
    CloudflareSettings, CLOUDFLARE_MAX_ITEMS, CLOUDFLARE_MAX_ITEMS_ENTERPRISE,
};
use crate::purge::{Batch, Kind, Plan, Provider, ProviderAnswer, PurgeJob};
use async_trait::async_trait;

/// Cloudflare's per-request limit for every kind (and for URLs below Enterprise); the settings
/// check owns the number, since `max_items` is checked against it.
pub const MAX_ITEMS: usize = CLOUDFLARE_MAX_ITEMS;
/// Enterprise's per-request limit for URLs.
pub const MAX_ITEMS_ENTERPRISE: usize = CLOUDFLARE_MAX_ITEMS_ENTERPRISE;

pub struct Cloudflare {
    endpoint: String,
    zone_id: String,
    bearer: String,
    rate: f64,
    max_urls: usize,
    client: reqwest::Client,
}

impl Cloudflare {
    pub fn new(cfg: &CloudflareSettings) -> Result<Self, String> {
        Ok(Cloudflare {
            endpoint: format!("{}/client/v4/zones/{}/purge_cache", cfg.base, cfg.zone_id),
            client: client("cloudflare", super::is_loopback(&cfg.base))?,
            zone_id: cfg.zone_id.clone(),
            bearer: format!("Bearer {}", cfg.token.expose()),
            rate: cfg.rate,
            max_urls: cfg.max_urls,
        })
    }
}

impl Cloudflare {
    /// Items of `kind` one request may name.
    fn limit(&self, kind: Kind) -> usize {
        match kind {
            Kind::Urls => self.max_urls,
            _ => MAX_ITEMS,
        }
    }
}

fn is_http_url(u: &str) -> bool {
    reqwest::Url::parse(u)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .unwrap_or(false)
}

/// `host` or `host/path`: no scheme, no spaces.
fn is_bare(p: &str) -> bool {
    !p.is_empty() && !p.contains("://") && p.bytes().all(|b| b.is_ascii_graphic())
}

fn field(kind: Kind) -> &'static str {
    match kind {
        Kind::Tags => "tags",
        Kind::Urls => "files",
        Kind::Prefixes => "prefixes",
        Kind::Hosts => "hosts",
    }
}

#[async_trait]
impl Provider for Cloudflare {
    fn name(&self) -> &str {
        "cloudflare"
    }

    fn plan(&self, job: &PurgeJob) -> Plan {
        let n = self.name();
        let mut plan = Plan::default();
        let urls = keep_valid(
            n,
            "URLs",
            Kind::Urls,
            dedup(&job.urls),
            is_http_url,
            &mut plan,
        );
        plan.batches
            .extend(chunked(Kind::Urls, urls, self.max_urls, false));
        let tags = keep_valid(
            n,
            "tags",
            Kind::Tags,
            dedup(&job.tags),
            valid_tag,
            &mut plan,
        );
        plan.batches
            .extend(chunked(Kind::Tags, tags, MAX_ITEMS, false));
        let hosts = keep_valid(
            n,
            "hosts",
            Kind::Hosts,
            dedup(&job.hosts),
            |h| is_bare(h) && !h.contains('/'),
            &mut plan,
        );
        plan.batches
            .extend(chunked(Kind::Hosts, hosts, MAX_ITEMS, false));
        let prefixes = keep_valid(
            n,
            "prefixes",
            Kind::Prefixes,
            dedup(&job.prefixes),
            is_bare,
            &mut plan,
        );
        plan.batches
            .extend(chunked(Kind::Prefixes, prefixes, MAX_ITEMS, false));
        plan
    }

    fn rate(&self) -> f64 {
        self.rate
    }

    fn merge_limit(&self, kind: Kind) -> usize {
        self.limit(kind)
    }

    fn fits(&self, batch: &Batch) -> bool {
        batch.items.len() <= self.limit(batch.kind) && !batch.soft
    }

    async fn send(&self, batch: &Batch, _idempotency: &str) -> ProviderAnswer {
        if batch.items.is_empty() {
            return ProviderAnswer::Done("cloudflare: empty batch, nothing sent".into());
        }
        let key = field(batch.kind);
        let body = serde_json::json!({ key: batch.items });
        let what = format!("POST {}", self.endpoint);
        let req = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        let reply = match execute("cloudflare", &what, req).await {
            Ok(r) => r,
            Err(o) => return o,
        };
        let answer: Option<serde_json::Value> = serde_json::from_str(&reply.body).ok();
        let success = answer
            .as_ref()
            .and_then(|a| a.get("success"))
            .and_then(|s| s.as_bool());
        let errors = answer
            .as_ref()
            .map(api_errors)
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| excerpt(&reply.body, 300));
        if reply.status.is_success() {
            return match success {
                Some(true) => {
                    let id = answer
                        .as_ref()
                        .and_then(|a| a.pointer("/result/id"))
                        .and_then(|i| i.as_str())
                        .unwrap_or("?");
                    ProviderAnswer::Done(format!(
                        "cloudflare purge {id}: {} {key}",
                        batch.items.len()
                    ))
                }
                Some(false) => ProviderAnswer::Fatal(format!(
                    "cloudflare: {what} answered success=false: {errors}"
                )),
                None => ProviderAnswer::Retry {
                    after: None,
                    detail: format!(
                        "cloudflare: {what} answered HTTP {} without a JSON `success` field ({}); \
                         will retry",
                        reply.status,
                        excerpt(&reply.body, 200)
                    ),
                },
            };
        }
        let hint = match reply.status.as_u16() {
            401 | 403 => format!(
                "check [cdn.cloudflare] token: it must be a valid API token with the Zone > Cache \
                 Purge permission on zone {}",
                self.zone_id
            ),
            404 => format!(
                "check [cdn.cloudflare] zone_id = {:?} (the zone's id from its Overview page) and \
                 base",
                self.zone_id
            ),
            _ => "Cloudflare rejected the request as sent; it will not be retried".into(),
        };
        classify("cloudflare", &what, &reply, &errors, &hint)
    }
}

/// `errors[{code, message}]` as `message (code N); ...`.
fn api_errors(answer: &serde_json::Value) -> String {
    answer
        .get("errors")
        .and_then(|e| e.as_array())
        .map(|errs| {
            errs.iter()
                .map(|e| {
                    let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("?");
                    match e.get("code") {
                        Some(c) => format!("{msg} (code {c})"),
                        None => msg.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(max_urls: usize) -> Cloudflare {
        Cloudflare::new(&CloudflareSettings {
            base: "https://api.cloudflare.com".into(),
            zone_id: "zone1".into(),
            token: "tok".into(),
            rate: 10.0,
            max_urls,
        })
        .unwrap()
    }

    fn job() -> PurgeJob {
        PurgeJob {
            id: "j1".into(),
            tags: (0..250).map(|i| format!("tag{i}")).collect(),
            urls: (0..150)
                .map(|i| format!("https://example.com/p/{i}"))
                .collect(),
            prefixes: vec!["example.com/api/".into()],
            hosts: vec!["example.com".into()],
            soft: true,
            ..Default::default()
        }
    }

    #[test]
    fn one_kind_per_request_within_limits_never_soft() {
        let b = provider(100).batches(&job());
        let shape: Vec<(Kind, usize)> = b.iter().map(|b| (b.kind, b.items.len())).collect();
        assert_eq!(
            shape,
            [
                (Kind::Urls, 100),
                (Kind::Urls, 50),
                (Kind::Tags, 100),
                (Kind::Tags, 100),
                (Kind::Tags, 50),
                (Kind::Hosts, 1),
                (Kind::Prefixes, 1),
            ]
        );
        assert!(b.iter().all(|b| !b.soft), "Cloudflare has no soft purge");
        // Every tag is sent exactly once.
        let tags: Vec<&String> = b
            .iter()
            .filter(|b| b.kind == Kind::Tags)
            .flat_map(|b| &b.items)
            .collect();
        assert_eq!(tags.len(), 250);
    }

    #[test]
    fn enterprise_raises_only_url_batches() {
        let b = provider(500).batches(&job());
        let urls: Vec<usize> = b
            .iter()
            .filter(|b| b.kind == Kind::Urls)
            .map(|b| b.items.len())
            .collect();
        assert_eq!(urls, [150]);
        assert!(b
            .iter()
            .filter(|b| b.kind != Kind::Urls)
            .all(|b| b.items.len() <= MAX_ITEMS));
    }

    #[test]
    fn drops_what_cloudflare_rejects_and_duplicates() {
        let j = PurgeJob {
            tags: vec!["ok".into(), "has space".into(), "ok".into(), String::new()],
            urls: vec!["/no/scheme".into(), "https://h/x".into()],
            prefixes: vec!["https://h/p".into(), "h/p".into()],
            hosts: vec!["h".into(), "h/x".into()],
            ..Default::default()
        };
        let b = provider(100).batches(&j);
        let items: Vec<(Kind, Vec<String>)> = b.into_iter().map(|b| (b.kind, b.items)).collect();
        assert_eq!(
            items,
            [
                (Kind::Urls, vec!["https://h/x".to_string()]),
                (Kind::Tags, vec!["ok".to_string()]),
                (Kind::Hosts, vec!["h".to_string()]),
                (Kind::Prefixes, vec!["h/p".to_string()]),
            ]
        );
        assert!(provider(100).batches(&PurgeJob::default()).is_empty());
    }

    #[test]
    fn error_list_is_readable() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#,
        )
        .unwrap();
        assert_eq!(api_errors(&v), "Authentication error (code 10000)");
    }
}
