//! Plain HTTP purging for caches Aisle's operators run themselves (Varnish, nginx
//! `proxy_cache_purge`): every purge goes to every configured host.
//!
//! Conventions (the notes leave this to each cache's own VCL / config, so Aisle picks the
//! widespread ones and makes the names configurable):
//! - a URL `https://example.com/a?b` is purged with `PURGE /a?b` (`method`) sent to each host,
//!   with `Host: example.com`, the way `curl -X PURGE -H 'Host: ...'` is used against Varnish
//!   and nginx. A `404` answer counts as done: nginx's purge module says 404 when the URL was
//!   not cached, which is the state a purge wants;
//! - tags are purged with `BAN /` (`tag_method`) carrying the tags space-separated in `xkey`
//!   (`tag_header`), vmod-xkey's convention. A matching VCL is
//!   `if (req.method == "BAN") { set req.http.n-gone = xkey.purge(req.http.xkey); return (synth(200)); }`
//!   or, without the vmod, `ban("obj.http.xkey ~ " + ...)`;
//! - prefixes and hosts have no common convention and are not sent (each is counted as
//!   `unsupported` in `aisle_purge_skipped_total` and `/admin/purges`); soft purges are hard here.
//!
//! A batch succeeds only when every host accepted it; any host that must be retried makes the
//! whole batch a retry (purges are idempotent, so hosts that already purged lose nothing).

use super::{classify, client, dedup, excerpt, execute, keep_valid, valid_tag};
use crate::config::cdn::HttpSettings;
use crate::purge::{Batch, Kind, Plan, Provider, ProviderAnswer, PurgeJob, SkipReason};
use async_trait::async_trait;
use futures_util::future::join_all;
use std::time::Duration;

/// URLs per batch (each is one request per host).
pub const URLS_PER_BATCH: usize = 50;
/// Tags per tag-purge request.
pub const TAGS_PER_BATCH: usize = 100;

pub struct HttpPurge {
    hosts: Vec<String>,
    method: reqwest::Method,
    tag_method: reqwest::Method,
    tag_header: reqwest::header::HeaderName,
    rate: f64,
    client: reqwest::Client,
}

impl HttpPurge {
    pub fn new(cfg: &HttpSettings) -> Result<Self, String> {
        Ok(HttpPurge {
            // One client for all hosts; a loopback-only host list skips any proxy.
            client: client("http", cfg.hosts.iter().all(|h| super::is_loopback(h)))?,
            hosts: cfg.hosts.clone(),
            method: cfg.method.clone(),
            tag_method: cfg.tag_method.clone(),
            tag_header: cfg.tag_header.clone(),
            rate: cfg.rate,
        })
    }

    /// One request to one host; `Ok` when the cache accepted it.
    async fn one(
        &self,
        method: &reqwest::Method,
        host: &str,
        target: &str,
        host_header: Option<&str>,
        tags: Option<&str>,
    ) -> Result<(), ProviderAnswer> {
        let url = format!("{host}{target}");
        let what = format!("{method} {url}");
        let mut req = self.client.request(method.clone(), &url);
        if let Some(h) = host_header {
            req = req.header(reqwest::header::HOST, h);
        }
        if let Some(t) = tags {
            req = req.header(self.tag_header.clone(), t);
        }
        let reply = execute("http", &what, req).await?;
        let s = reply.status;
        if s.is_success() || (s == reqwest::StatusCode::NOT_FOUND && tags.is_none()) {
            return Ok(());
        }
        let hint = match s.as_u16() {
            405 | 501 => format!(
                "the cache does not accept {method}: allow it in its configuration (VCL / nginx \
                 proxy_cache_purge) or change [cdn.http] method / tag_method"
            ),
            401 | 403 => "the cache refused this client: allow the gateway's address in its \
                          purge ACL"
                .into(),
            _ => "the cache rejected the request; it will not be retried".into(),
        };
        Err(classify(
            "http",
            &what,
            &reply,
            &excerpt(&reply.body, 200),
            &hint,
        ))
    }

    /// Runs `requests` (target, Host header) against every host, hosts in parallel, each host's
    /// requests in order, stopping a host at its first failure.
    async fn fan_out(
        &self,
        method: &reqwest::Method,
        requests: &[(String, Option<String>)],
        tags: Option<&str>,
    ) -> Vec<Result<(), ProviderAnswer>> {
        join_all(self.hosts.iter().map(|host| async move {
            for (target, host_header) in requests {
                self.one(method, host, target, host_header.as_deref(), tags)
                    .await?;
            }
            Ok(())
        }))
        .await
    }
}

/// `https://example.com/a?b` -> (`/a?b`, `example.com`).
fn split_url(u: &str) -> Option<(String, String)> {
    let url = reqwest::Url::parse(u).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str()?),
        None => url.host_str()?.to_string(),
    };
    let mut target = url.path().to_string();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    Some((target, host))
}

#[async_trait]
impl Provider for HttpPurge {
    fn name(&self) -> &str {
        "http"
    }

    fn plan(&self, job: &PurgeJob) -> Plan {
        let mut plan = Plan::default();
        let urls = keep_valid(
            self.name(),
            "URLs",
            Kind::Urls,
            dedup(&job.urls),
            |u| split_url(u).is_some(),
            &mut plan,
        );
        plan.batches
            .extend(super::chunked(Kind::Urls, urls, URLS_PER_BATCH, false));
        let tags = keep_valid(
            self.name(),
            "tags",
            Kind::Tags,
            dedup(&job.tags),
            valid_tag,
            &mut plan,
        );
        plan.batches
            .extend(super::chunked(Kind::Tags, tags, TAGS_PER_BATCH, false));
        // A cache's PURGE / BAN interface has no prefix or whole-host purge here: counted.
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
            Kind::Urls => URLS_PER_BATCH,
            Kind::Tags => TAGS_PER_BATCH,
            _ => 1,
        }
    }

    fn fits(&self, batch: &Batch) -> bool {
        batch.items.len() <= self.merge_limit(batch.kind)
    }

    async fn send(&self, batch: &Batch, _idempotency: &str) -> ProviderAnswer {
        let results = match batch.kind {
            Kind::Urls => {
                let reqs: Vec<(String, Option<String>)> = batch
                    .items
                    .iter()
                    .filter_map(|u| split_url(u).map(|(t, h)| (t, Some(h))))
                    .collect();
                if reqs.is_empty() {
                    return ProviderAnswer::Done("http: no URL to purge".into());
                }
                self.fan_out(&self.method, &reqs, None).await
            }
            Kind::Tags => {
                if batch.items.is_empty() {
                    return ProviderAnswer::Done("http: no tag to purge".into());
                }
                let tags = batch.items.join(" ");
                self.fan_out(&self.tag_method, &[("/".to_string(), None)], Some(&tags))
                    .await
            }
            other => {
                return ProviderAnswer::Fatal(format!(
                    "http: {other:?} purges have no HTTP convention; this batch was not made by \
                     the http provider"
                ))
            }
        };
        combine(batch, self.hosts.len(), results)
    }
}

/// All hosts done -> Done; any retry -> Retry (after the longest `Retry-After`); else Fatal.
fn combine(
    batch: &Batch,
    hosts: usize,
    results: Vec<Result<(), ProviderAnswer>>,
) -> ProviderAnswer {
    let mut retry_after: Option<Duration> = None;
    let mut retry = Vec::new();
    let mut fatal = Vec::new();
    for r in results {
        match r {
            Ok(()) => {}
            Err(ProviderAnswer::Retry { after, detail }) => {
                retry_after = retry_after.max(after);
                retry.push(detail);
            }
            Err(ProviderAnswer::Fatal(d)) => fatal.push(d),
            Err(ProviderAnswer::Done(_)) => {}
        }
    }
    if !retry.is_empty() {
        retry.extend(fatal);
        return ProviderAnswer::Retry {
            after: retry_after,
            detail: retry.join("; "),
        };
    }
    if !fatal.is_empty() {
        return ProviderAnswer::Fatal(fatal.join("; "));
    }
    ProviderAnswer::Done(format!(
        "http: purged {} {} on {hosts} hosts",
        batch.items.len(),
        if batch.kind == Kind::Tags {
            "tags"
        } else {
            "URLs"
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HttpSettings {
        HttpSettings {
            hosts: vec![
                "http://127.0.0.1:6081".into(),
                "http://127.0.0.1:6082".into(),
            ],
            method: reqwest::Method::from_bytes(b"PURGE").unwrap(),
            tag_method: reqwest::Method::from_bytes(b"BAN").unwrap(),
            tag_header: reqwest::header::HeaderName::from_static("xkey"),
            rate: 50.0,
        }
    }

    #[test]
    fn batches_urls_and_tags_only() {
        let p = HttpPurge::new(&cfg()).unwrap();
        let job = PurgeJob {
            urls: (0..120).map(|i| format!("https://h/x/{i}")).collect(),
            tags: vec!["a".into(), "b c".into()],
            prefixes: vec!["h/x".into()],
            hosts: vec!["h".into()],
            soft: true,
            ..Default::default()
        };
        let shape: Vec<(Kind, usize, bool)> = p
            .batches(&job)
            .iter()
            .map(|b| (b.kind, b.items.len(), b.soft))
            .collect();
        assert_eq!(
            shape,
            [
                (Kind::Urls, 50, false),
                (Kind::Urls, 50, false),
                (Kind::Urls, 20, false),
                (Kind::Tags, 1, false),
            ]
        );
        assert_eq!(p.hosts, ["http://127.0.0.1:6081", "http://127.0.0.1:6082"]);
        let plan = p.plan(&job);
        let reasons: Vec<(Kind, &str, &str)> = plan
            .skipped
            .iter()
            .map(|s| (s.kind, s.item.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (Kind::Tags, "b c", "invalid"),
                (Kind::Prefixes, "h/x", "unsupported"),
                (Kind::Hosts, "h", "unsupported"),
            ]
        );
    }

    #[test]
    fn url_split_keeps_query_and_port() {
        assert_eq!(
            split_url("https://example.com:8443/a/b?c=d").unwrap(),
            ("/a/b?c=d".to_string(), "example.com:8443".to_string())
        );
        assert_eq!(
            split_url("http://example.com").unwrap(),
            ("/".to_string(), "example.com".to_string())
        );
        assert!(split_url("example.com/a").is_none());
    }

    #[test]
    fn combine_prefers_retry_then_fatal() {
        let b = Batch {
            kind: Kind::Urls,
            items: vec!["u".into()],
            soft: false,
        };
        let r = combine(
            &b,
            3,
            vec![
                Ok(()),
                Err(ProviderAnswer::Fatal("f".into())),
                Err(ProviderAnswer::Retry {
                    after: Some(Duration::from_secs(3)),
                    detail: "r".into(),
                }),
            ],
        );
        assert_eq!(
            r,
            ProviderAnswer::Retry {
                after: Some(Duration::from_secs(3)),
                detail: "r; f".into()
            }
        );
        let r = combine(&b, 2, vec![Ok(()), Err(ProviderAnswer::Fatal("f".into()))]);
        assert_eq!(r, ProviderAnswer::Fatal("f".into()));
        assert!(matches!(
            combine(&b, 2, vec![Ok(()), Ok(())]),
            ProviderAnswer::Done(_)
        ));
    }
}
