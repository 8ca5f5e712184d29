//! AWS CloudFront's CreateInvalidation: `POST {base}/2020-05-31/distribution/{id}/invalidation`
//! with an XML `InvalidationBatch`, signed with SigV4 (service `cloudfront`) by `aws-sigv4`.
//!
//! CloudFront knows only paths, so every batch's items are distribution paths: URLs become their
//! path (and query, when present), `host/path` prefixes become `/path*`, a host purge becomes
//! `/*` (a distribution is one site; nothing narrower is faithful), and tags become the path
//! patterns configured in `tag_paths` (a key ending in `*` matches every tag with that prefix;
//! unmapped tags are logged and skipped). Batches keep the job's kinds apart so the audit trail
//! says what was purged; paths are deduplicated and those a wildcard of the same job already
//! covers are left out (CloudFront bills per path). A batch holds at most 3,000 plain paths and
//! 15 wildcard paths, CloudFront's in-progress limits; `TooManyInvalidationsInProgress` and
//! throttling answers (400s) are retried rather than treated as fatal. The batch's idempotency
//! key is the `CallerReference`, so a retry of a batch CloudFront already accepted returns the
//! existing invalidation instead of creating a second one.

use super::{classify, client, dedup, excerpt, execute};
use crate::config::cdn::{is_cloudfront_path as valid_path, CloudFrontSettings, TagKey};
use crate::purge::{Batch, Kind, Plan, Provider, ProviderAnswer, PurgeJob, SkipReason};
use async_trait::async_trait;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use std::time::SystemTime;

/// Plain (non-wildcard) paths per request.
pub const MAX_PATHS: usize = 3000;
/// Wildcard paths per request.
pub const MAX_WILDCARDS: usize = 15;
/// The API version in the path and the XML namespace.
pub const XMLNS: &str = "http://cloudfront.amazonaws.com/doc/2020-05-31/";
const CONTENT_TYPE: &str = "application/xml";

/// Error codes CloudFront answers with a 4xx that clear up by themselves.
const RETRYABLE_CODES: &[&str] = &[
    "TooManyInvalidationsInProgress",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
];

pub struct CloudFront {
    endpoint: String,
    distribution_id: String,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    region: String,
    rate: f64,
    tag_paths: Vec<(TagKey, Vec<String>)>,
    client: reqwest::Client,
}

fn is_wildcard(p: &str) -> bool {
    p.ends_with('*')
}

impl CloudFront {
    pub fn new(cfg: &CloudFrontSettings) -> Result<Self, String> {
        Ok(CloudFront {
            endpoint: format!(
                "{}/2020-05-31/distribution/{}/invalidation",
                cfg.base, cfg.distribution_id
            ),
            client: client("cloudfront", super::is_loopback(&cfg.base))?,
            distribution_id: cfg.distribution_id.clone(),
            access_key_id: cfg.access_key_id.clone(),
            secret_access_key: cfg.secret_access_key.expose().to_string(),
            session_token: cfg.session_token.as_ref().map(|t| t.expose().to_string()),
            region: cfg.region.clone(),
            rate: cfg.rate,
            tag_paths: cfg.tag_paths.clone(),
        })
    }

    /// The configured path patterns of one tag (every matching key's, in key order).
    fn tag_to_paths(&self, tag: &str) -> Vec<String> {
        self.tag_paths
            .iter()
            .filter(|(k, _)| k.matches(tag))
            .flat_map(|(_, paths)| paths.iter().cloned())
            .collect()
    }

    /// The SigV4 headers (`authorization`, `x-amz-date`, maybe `x-amz-security-token`) for a
    /// POST of `body` to the endpoint at `now`.
    fn sign_headers(&self, body: &[u8], now: SystemTime) -> Result<Vec<(String, String)>, String> {
        sigv4_headers(
            &SigV4 {
                access_key_id: &self.access_key_id,
                secret_access_key: &self.secret_access_key,
                session_token: self.session_token.as_deref(),
                region: &self.region,
            },
            "POST",
            &self.endpoint,
            &[("content-type", CONTENT_TYPE)],
            body,
            now,
        )
    }
}

/// Credentials and scope of a SigV4 signature for CloudFront.
struct SigV4<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: Option<&'a str>,
    region: &'a str,
}

/// Signs a request for service `cloudfront` with `aws-sigv4` and returns the headers to add.
fn sigv4_headers(
    creds: &SigV4<'_>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let identity = Credentials::new(
        creds.access_key_id,
        creds.secret_access_key,
        creds.session_token.map(str::to_string),
        None,
        "aisle-config",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(creds.region)
        .name("cloudfront")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("SigV4 signing parameters: {e}"))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("SigV4: the request cannot be signed: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("SigV4 signing failed: {e}"))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The path (and query) of an absolute URL, `*` escaped so it is never a wildcard.
fn url_path(u: &str) -> Option<String> {
    let url = reqwest::Url::parse(u).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let mut p = url.path().replace('*', "%2A");
    if let Some(q) = url.query() {
        p.push('?');
        p.push_str(&q.replace('*', "%2A"));
    }
    Some(p)
}

/// `host/path/prefix` -> `/path/prefix*`; a bare host -> `/*`.
fn prefix_path(prefix: &str) -> Option<String> {
    if prefix.contains("://") || prefix.is_empty() {
        return None;
    }
    let path = match prefix.find('/') {
        Some(i) => &prefix[i..],
        None => "/",
    };
    let path = path.trim_end_matches('*');
    Some(format!("{path}*"))
}

/// Splits one kind's paths into batches of at most [`MAX_WILDCARDS`] wildcards and
/// [`MAX_PATHS`] plain paths each.
fn pack(kind: Kind, paths: Vec<String>) -> Vec<Batch> {
    let (wild, plain): (Vec<String>, Vec<String>) = paths.into_iter().partition(|p| is_wildcard(p));
    let mut wild = wild.into_iter();
    let mut plain = plain.into_iter();
    let mut out = Vec::new();
    loop {
        let mut items: Vec<String> = wild.by_ref().take(MAX_WILDCARDS).collect();
        items.extend(plain.by_ref().take(MAX_PATHS));
        if items.is_empty() {
            return out;
        }
        out.push(Batch {
            kind,
            items,
            soft: false,
        });
    }
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// The `InvalidationBatch` document.
pub fn invalidation_xml(caller_reference: &str, paths: &[String]) -> String {
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<InvalidationBatch xmlns=\"{XMLNS}\"><CallerReference>{}</CallerReference><Paths><Quantity>{}</Quantity><Items>",
        xml_escape(caller_reference),
        paths.len()
    );
    for p in paths {
        x.push_str("<Path>");
        x.push_str(&xml_escape(p));
        x.push_str("</Path>");
    }
    x.push_str("</Items></Paths></InvalidationBatch>");
    x
}

/// The text of the first element named `name` in an XML document.
fn xml_text(doc: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(doc).ok()?;
    let text = doc
        .descendants()
        .find(|n| n.has_tag_name(name))?
        .text()?
        .trim()
        .to_string();
    Some(text)
}

#[async_trait]
impl Provider for CloudFront {
    fn name(&self) -> &str {
        "cloudfront"
    }

    fn plan(&self, job: &PurgeJob) -> Plan {
        let mut plan = Plan::default();
        // A host purge is the whole distribution; it covers everything else in the job.
        if !job.hosts.is_empty() {
            plan.batches = pack(Kind::Hosts, vec!["/*".to_string()]);
            return plan;
        }
        let mut groups: Vec<(Kind, Vec<String>)> = Vec::new();
        let mut bad_urls = Vec::new();
        let mut urls = Vec::new();
        for u in dedup(&job.urls) {
            match url_path(&u) {
                Some(p) if valid_path(&p) => urls.push(p),
                _ => bad_urls.push(u),
            }
        }
        groups.push((Kind::Urls, urls));
        let mut bad_prefixes = Vec::new();
        let mut prefixes = Vec::new();
        for pre in dedup(&job.prefixes) {
            match prefix_path(&pre) {
                Some(p) if valid_path(&p) => prefixes.push(p),
                _ => bad_prefixes.push(pre),
            }
        }
        groups.push((Kind::Prefixes, prefixes));
        let mut unmapped = Vec::new();
        let mut tag_paths = Vec::new();
        for tag in dedup(&job.tags) {
            let paths = self.tag_to_paths(&tag);
            if paths.is_empty() {
                unmapped.push(tag);
            }
            tag_paths.extend(paths);
        }
        if !bad_urls.is_empty() || !bad_prefixes.is_empty() {
            tracing::warn!(
                job = %job.id,
                urls = ?bad_urls,
                prefixes = ?bad_prefixes,
                "cloudfront: URLs or prefixes that make no CloudFront path were not sent \
                 (counted in aisle_purge_skipped_total and /admin/purges)"
            );
        }
        plan.skip(Kind::Urls, bad_urls, SkipReason::Invalid);
        plan.skip(Kind::Prefixes, bad_prefixes, SkipReason::Invalid);
        if !unmapped.is_empty() {
            tracing::warn!(
                job = %job.id,
                tags = ?unmapped,
                "cloudfront: tags without a [cdn.cloudfront] tag_paths entry were not invalidated \
                 (counted in aisle_purge_skipped_total and /admin/purges); map them in tag_paths"
            );
            plan.skip(Kind::Tags, unmapped, SkipReason::Unmapped);
        }
        groups.push((
            Kind::Tags,
            tag_paths.into_iter().filter(|p| valid_path(p)).collect(),
        ));

        // Deduplicate across kinds and leave out paths a wildcard of this job already covers.
        let all: Vec<String> = groups.iter().flat_map(|(_, p)| p.iter().cloned()).collect();
        let wildcards: Vec<&str> = all
            .iter()
            .filter(|p| is_wildcard(p))
            .map(|p| p.as_str())
            .collect();
        let covered = |p: &str| {
            wildcards
                .iter()
                .any(|w| *w != p && p.starts_with(&w[..w.len() - 1]))
        };
        let mut seen = std::collections::HashSet::new();
        for (kind, paths) in groups {
            let keep: Vec<String> = paths
                .into_iter()
                .filter(|p| !covered(p) && seen.insert(p.clone()))
                .collect();
            plan.batches.extend(pack(kind, keep));
        }
        plan
    }

    fn rate(&self) -> f64 {
        self.rate
    }

    fn merge_limit(&self, _kind: Kind) -> usize {
        MAX_PATHS + MAX_WILDCARDS
    }

    fn fits(&self, batch: &Batch) -> bool {
        let wild = batch.items.iter().filter(|p| is_wildcard(p)).count();
        wild <= MAX_WILDCARDS && batch.items.len() - wild <= MAX_PATHS
    }

    async fn send(&self, batch: &Batch, idempotency: &str) -> ProviderAnswer {
        if batch.items.is_empty() {
            return ProviderAnswer::Done("cloudfront: empty batch, nothing sent".into());
        }
        // CloudFront needs a non-empty CallerReference; without one, derive a stable one from
        // the paths so retries stay idempotent.
        let reference = if idempotency.is_empty() {
            let mut h = blake3::Hasher::new();
            for p in &batch.items {
                h.update(p.as_bytes());
                h.update(b"\n");
            }
            format!("aisle-{}", &h.finalize().to_hex()[..32])
        } else {
            idempotency.to_string()
        };
        let body = invalidation_xml(&reference, &batch.items);
        let signed = match self.sign_headers(body.as_bytes(), SystemTime::now()) {
            Ok(h) => h,
            Err(e) => {
                return ProviderAnswer::Fatal(format!(
                    "cloudfront: {e}; check [cdn.cloudfront] access_key_id, secret_access_key \
                     and region"
                ))
            }
        };
        let what = format!("POST {}", self.endpoint);
        let mut req = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body);
        for (k, v) in &signed {
            req = req.header(k.as_str(), v.as_str());
        }
        let reply = match execute("cloudfront", &what, req).await {
            Ok(r) => r,
            Err(o) => return o,
        };
        if reply.status.is_success() {
            let id = xml_text(&reply.body, "Id").unwrap_or_else(|| "?".into());
            let status = xml_text(&reply.body, "Status").unwrap_or_else(|| "?".into());
            return ProviderAnswer::Done(format!(
                "cloudfront invalidation {id} ({status}): {} paths, CallerReference {reference}",
                batch.items.len()
            ));
        }
        let code = xml_text(&reply.body, "Code").unwrap_or_default();
        let message = xml_text(&reply.body, "Message").unwrap_or_default();
        let said = if code.is_empty() {
            excerpt(&reply.body, 300)
        } else {
            format!("{code}: {message}")
        };
        if reply.status.is_client_error() && RETRYABLE_CODES.contains(&code.as_str()) {
            return ProviderAnswer::Retry {
                after: super::retry_after(&reply.headers, SystemTime::now()),
                detail: format!(
                    "cloudfront: {what} answered HTTP {} {said}; will retry",
                    reply.status
                ),
            };
        }
        let hint = match (reply.status.as_u16(), code.as_str()) {
            (_, "SignatureDoesNotMatch") => {
                "check [cdn.cloudfront] secret_access_key: it does not match access_key_id".into()
            }
            (_, "InvalidClientTokenId") | (_, "UnrecognizedClientException") => {
                "check [cdn.cloudfront] access_key_id: AWS does not know it".into()
            }
            (_, "RequestTimeTooSkewed") | (_, "SignatureExpired") => {
                "this machine's clock is off by more than 5 minutes; fix its time (NTP)".into()
            }
            (_, "NoSuchDistribution") | (404, _) => format!(
                "check [cdn.cloudfront] distribution_id = {:?}",
                self.distribution_id
            ),
            (401 | 403, _) => format!(
                "check [cdn.cloudfront] credentials: the IAM identity needs \
                 cloudfront:CreateInvalidation on distribution {}",
                self.distribution_id
            ),
            _ => "CloudFront rejected the request as sent; it will not be retried".into(),
        };
        classify("cloudfront", &what, &reply, &said, &hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(tag_paths: &[(&str, &[&str])]) -> CloudFront {
        CloudFront::new(&CloudFrontSettings {
            base: "https://cloudfront.amazonaws.com".into(),
            distribution_id: "EDFDVBD6EXAMPLE".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            region: "us-east-1".into(),
            rate: 2.0,
            tag_paths: tag_paths
                .iter()
                .map(|(k, v)| {
                    let key = match k.strip_suffix('*') {
                        Some(stem) => TagKey::Prefix(stem.to_string()),
                        None => TagKey::Exact(k.to_string()),
                    };
                    (key, v.iter().map(|s| s.to_string()).collect())
                })
                .collect(),
        })
        .unwrap()
    }

    fn items(b: &[Batch]) -> Vec<(Kind, Vec<String>)> {
        b.iter().map(|b| (b.kind, b.items.clone())).collect()
    }

    #[test]
    fn tags_map_through_tag_paths_exact_and_prefix() {
        let p = provider(&[
            ("vendors", &["/api/vendors/*"]),
            ("wedding:*", &["/api/weddings/*"]),
            ("exact", &["/a", "/b"]),
        ]);
        let job = PurgeJob {
            tags: vec![
                "vendors".into(),
                "wedding:42".into(),
                "wedding:43".into(),
                "exact".into(),
                "unknown".into(),
                "vendors-x".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            items(&p.batches(&job)),
            [(
                Kind::Tags,
                vec![
                    "/api/vendors/*".to_string(),
                    "/api/weddings/*".to_string(),
                    "/a".to_string(),
                    "/b".to_string()
                ]
            )]
        );
        let none = PurgeJob {
            tags: vec!["unknown".into()],
            ..Default::default()
        };
        assert!(p.batches(&none).is_empty());
        // Not sent, but never unseen: every unmapped tag comes back as skipped.
        let plan = p.plan(&job);
        let unmapped: Vec<(&str, crate::purge::SkipReason)> = plan
            .skipped
            .iter()
            .map(|s| (s.item.as_str(), s.reason))
            .collect();
        assert_eq!(
            unmapped,
            [
                ("unknown", crate::purge::SkipReason::Unmapped),
                ("vendors-x", crate::purge::SkipReason::Unmapped)
            ]
        );
    }

    #[test]
    fn urls_prefixes_and_hosts_become_paths() {
        let p = provider(&[]);
        let job = PurgeJob {
            urls: vec![
                "https://example.com/api/a".into(),
                "https://example.com/api/search?q=1".into(),
                "https://example.com/star*".into(),
                "not a url".into(),
            ],
            prefixes: vec!["example.com/img/".into(), "example.com".into()],
            ..Default::default()
        };
        // "/*" from the bare-host prefix covers every other path of the job.
        assert_eq!(
            items(&p.batches(&job)),
            [(Kind::Prefixes, vec!["/*".to_string()])]
        );
        let job = PurgeJob {
            prefixes: vec!["example.com/img/".into()],
            ..job
        };
        assert_eq!(
            items(&p.batches(&job)),
            [
                (
                    Kind::Urls,
                    vec![
                        "/api/a".to_string(),
                        "/api/search?q=1".to_string(),
                        "/star%2A".to_string()
                    ]
                ),
                (Kind::Prefixes, vec!["/img/*".to_string()]),
            ]
        );
        let hosts = PurgeJob {
            hosts: vec!["example.com".into()],
            ..job
        };
        assert_eq!(
            items(&p.batches(&hosts)),
            [(Kind::Hosts, vec!["/*".to_string()])]
        );
    }

    #[test]
    fn wildcard_covers_and_dedups_across_kinds() {
        let p = provider(&[("vendors", &["/api/vendors/*", "/api/vendors/list"])]);
        let job = PurgeJob {
            tags: vec!["vendors".into()],
            urls: vec![
                "https://h/api/vendors/7".into(),
                "https://h/api/other".into(),
            ],
            prefixes: vec!["h/api/vendors/".into()],
            ..Default::default()
        };
        assert_eq!(
            items(&p.batches(&job)),
            [
                (Kind::Urls, vec!["/api/other".to_string()]),
                (Kind::Prefixes, vec!["/api/vendors/*".to_string()]),
            ]
        );
    }

    #[test]
    fn at_most_3000_paths_and_15_wildcards_per_batch() {
        let p = provider(&[]);
        let job = PurgeJob {
            urls: (0..6500).map(|i| format!("https://h/item/{i}")).collect(),
            prefixes: (0..40).map(|i| format!("h/dir{i}/")).collect(),
            ..Default::default()
        };
        let b = p.batches(&job);
        let shape: Vec<(Kind, usize, usize)> = b
            .iter()
            .map(|b| {
                let w = b.items.iter().filter(|p| is_wildcard(p)).count();
                (b.kind, b.items.len() - w, w)
            })
            .collect();
        assert_eq!(
            shape,
            [
                (Kind::Urls, 3000, 0),
                (Kind::Urls, 3000, 0),
                (Kind::Urls, 500, 0),
                (Kind::Prefixes, 0, 15),
                (Kind::Prefixes, 0, 15),
                (Kind::Prefixes, 0, 10),
            ]
        );
        assert!(b.iter().all(|b| !b.soft));
    }

    #[test]
    fn xml_body_is_escaped_and_counted() {
        let x = invalidation_xml("ref&1", &["/a?x=1&y=<2>".to_string(), "/b*".to_string()]);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "InvalidationBatch");
        assert_eq!(root.tag_name().namespace(), Some(XMLNS));
        assert_eq!(xml_text(&x, "CallerReference").unwrap(), "ref&1");
        assert_eq!(xml_text(&x, "Quantity").unwrap(), "2");
        let paths: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("Path"))
            .filter_map(|n| n.text())
            .collect();
        assert_eq!(paths, ["/a?x=1&y=<2>", "/b*"]);
    }

    #[test]
    fn signs_with_sigv4_for_cloudfront() {
        let p = provider(&[]);
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let h = p.sign_headers(b"<x/>", now).unwrap();
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {n} in {h:?}"))
        };
        assert_eq!(get("x-amz-date"), "20231114T221320Z");
        let auth = get("authorization");
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/cloudfront/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
            ),
            "{auth}"
        );
        // Deterministic for the same input, different for another secret.
        assert_eq!(p.sign_headers(b"<x/>", now).unwrap(), h);
        let other = sigv4_headers(
            &SigV4 {
                access_key_id: "AKIDEXAMPLE",
                secret_access_key: "wrong",
                session_token: None,
                region: "us-east-1",
            },
            "POST",
            &p.endpoint,
            &[("content-type", CONTENT_TYPE)],
            b"<x/>",
            now,
        )
        .unwrap();
        assert_ne!(other, h);
    }
}
