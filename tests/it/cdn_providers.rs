//! The real CDN purge providers (built from config by `purge::providers::build`) against loopback
//! fakes that check every request as the real APIs would (`harness::cdn`): what reaches each API,
//! in how many requests, and how each kind of answer becomes a `ProviderAnswer`.

use std::sync::Arc;
use std::time::Duration;

use aisle::purge::providers::{build, CdnConfig};
use aisle::purge::{Batch, Kind, Provider, ProviderAnswer, PurgeJob};

use crate::harness::cdn::*;
use crate::harness::{closed_url, Origin, OriginResponse};

const CF_ZONE: &str = "023e105f4ecef8ad9ca31a8372d0c353";
const CF_TOKEN: &str = "cf-test-token";
const FASTLY_SERVICE: &str = "SU1Z0isxPaozGVKXdv0eY";
const FASTLY_TOKEN: &str = "fastly-test-token";
const DIST: &str = "EDFDVBD6EXAMPLE";
const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// The single provider a config builds.
fn provider(toml_text: &str) -> Arc<dyn Provider> {
    let cfg: CdnConfig = toml::from_str(toml_text).expect("valid [cdn] config");
    let mut v = build(&cfg).unwrap_or_else(|e| panic!("build failed: {e}"));
    assert_eq!(v.len(), 1, "one provider expected");
    v.pop().unwrap()
}

fn cloudflare(base: &str, token: &str, zone: &str) -> Arc<dyn Provider> {
    provider(&format!(
        "[cloudflare]\nbase = {base:?}\nzone_id = {zone:?}\ntoken = {token:?}\n"
    ))
}

fn fastly(base: &str, token: &str) -> Arc<dyn Provider> {
    provider(&format!(
        "[fastly]\nbase = {base:?}\nservice_id = {FASTLY_SERVICE:?}\ntoken = {token:?}\n"
    ))
}

fn cloudfront(base: &str, akid: &str, secret: &str) -> Arc<dyn Provider> {
    provider(&format!(
        r#"[cloudfront]
base = {base:?}
distribution_id = {DIST:?}
access_key_id = {akid:?}
secret_access_key = {secret:?}
tag_paths = {{ vendors = ["/api/vendors/*"], "wedding:*" = ["/api/weddings/*"], menu = ["/api/menu"] }}
"#
    ))
}

/// Sends every batch of `job` once, in order, with idempotency keys `{id}-{n}`.
async fn run(p: &dyn Provider, job: &PurgeJob) -> Vec<(Batch, ProviderAnswer)> {
    let mut out = Vec::new();
    for (i, b) in p.batches(job).into_iter().enumerate() {
        let o = p.send(&b, &format!("{}-{i}", job.id)).await;
        out.push((b, o));
    }
    out
}

fn assert_all_done(results: &[(Batch, ProviderAnswer)]) {
    for (b, o) in results {
        assert!(
            matches!(o, ProviderAnswer::Done(_)),
            "{:?} batch of {} -> {o:?}",
            b.kind,
            b.items.len()
        );
    }
}

fn one_batch(kind: Kind, items: &[&str], soft: bool) -> Batch {
    Batch {
        kind,
        items: items.iter().map(|s| s.to_string()).collect(),
        soft,
    }
}

fn retry_after(o: &ProviderAnswer) -> Option<Duration> {
    match o {
        ProviderAnswer::Retry { after, .. } => *after,
        other => panic!("expected Retry, got {other:?}"),
    }
}

fn fatal(o: &ProviderAnswer) -> &str {
    match o {
        ProviderAnswer::Fatal(m) => m,
        other => panic!("expected Fatal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Cloudflare
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cloudflare_purges_each_kind_in_requests_of_at_most_100() {
    let fake = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let p = cloudflare(&fake.base(), CF_TOKEN, CF_ZONE);
    let tags: Vec<String> = (0..250).map(|i| format!("vendor:{i}")).collect();
    let job = PurgeJob {
        id: "job-1".into(),
        tags: tags.clone(),
        urls: vec![
            "https://shop.example.com/api/a".into(),
            "https://shop.example.com/api/b?x=1".into(),
        ],
        prefixes: vec!["shop.example.com/api/vendors/".into()],
        hosts: vec!["img.example.com".into()],
        soft: true,
        ..Default::default()
    };
    let results = run(p.as_ref(), &job).await;
    assert_all_done(&results);
    // 250 tags -> 3 requests, plus one each for files, hosts and prefixes.
    assert_eq!(fake.request_count(), 6);
    assert_eq!(fake.accepted_tags(), tags);
    assert_eq!(fake.accepted_files(), job.urls);
    assert_eq!(fake.accepted_prefixes(), job.prefixes);
    assert_eq!(fake.accepted_hosts(), job.hosts);
    // The Done detail carries the API's purge id.
    for ((_, o), id) in results.iter().zip(fake.purge_ids()) {
        assert!(
            matches!(o, ProviderAnswer::Done(d) if d.contains(&id)),
            "{o:?} lacks {id}"
        );
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    assert_eq!(fake.auth_failures(), 0);
}

#[tokio::test]
async fn cloudflare_retries_500_and_429_and_gives_up_on_credentials() {
    let fake = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let p = cloudflare(&fake.base(), CF_TOKEN, CF_ZONE);
    let batch = one_batch(Kind::Tags, &["vendors"], false);

    fake.fail_next(1);
    assert_eq!(retry_after(&p.send(&batch, "k").await), None);
    fake.throttle_next(1, "7");
    assert_eq!(
        retry_after(&p.send(&batch, "k").await),
        Some(Duration::from_secs(7))
    );
    assert!(matches!(p.send(&batch, "k").await, ProviderAnswer::Done(_)));
    assert_eq!(fake.accepted_tags(), ["vendors"]);

    let wrong_token = cloudflare(&fake.base(), "not-the-token", CF_ZONE);
    let m = fatal(&wrong_token.send(&batch, "k").await).to_string();
    assert!(m.contains("403") && m.contains("token"), "{m}");
    let wrong_zone = cloudflare(&fake.base(), CF_TOKEN, "0000");
    let m = fatal(&wrong_zone.send(&batch, "k").await).to_string();
    assert!(m.contains("404") && m.contains("zone_id"), "{m}");

    assert_eq!(fake.auth_failures(), 2);
    assert_eq!(fake.request_count(), 5);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn cloudflare_fake_rejects_what_the_api_rejects() {
    // The fake's own checks must bite, or every "no violations" above proves nothing.
    let fake = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let client = crate::harness::client();
    let url = format!("{}/client/v4/zones/{CF_ZONE}/purge_cache", fake.base());
    let too_many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    for body in [
        serde_json::json!({ "tags": too_many }),
        serde_json::json!({ "tags": ["a"], "files": ["https://h/a"] }),
        serde_json::json!({ "tags": ["has space"] }),
    ] {
        let r = client
            .post(&url)
            .header("authorization", format!("Bearer {CF_TOKEN}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["success"], false);
    }
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn cloudflare_token_comes_from_the_environment() {
    let fake = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    // The process environment is shared by every test of this binary: the variable's name is
    // this test's own (nothing else reads or sets it), and std serialises environment access
    // (including the reads of a `Command` spawning a gateway elsewhere).
    std::env::set_var("AISLE_CDN_TEST_CF_TOKEN", CF_TOKEN);
    let p = cloudflare(&fake.base(), "${AISLE_CDN_TEST_CF_TOKEN}", CF_ZONE);
    let o = p
        .send(&one_batch(Kind::Urls, &["https://h/x"], false), "k")
        .await;
    assert!(matches!(o, ProviderAnswer::Done(_)), "{o:?}");
    assert_eq!(fake.auth_failures(), 0);

    let cfg: CdnConfig = toml::from_str(&format!(
        "[cloudflare]\nbase = {:?}\nzone_id = \"z\"\ntoken = \"${{AISLE_CDN_TEST_UNSET_VAR}}\"\n",
        fake.base()
    ))
    .unwrap();
    let e = build(&cfg).err().expect("an unset variable is an error");
    assert!(e.contains("AISLE_CDN_TEST_UNSET_VAR is not set"), "{e}");
}

// ---------------------------------------------------------------------------
// Fastly
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fastly_purges_keys_256_at_a_time_soft_when_asked() {
    let fake = FakeFastly::start(FASTLY_SERVICE, FASTLY_TOKEN);
    let p = fastly(&fake.base(), FASTLY_TOKEN);
    let keys: Vec<String> = (0..600).map(|i| format!("wedding:{i}")).collect();
    let soft = PurgeJob {
        id: "soft".into(),
        tags: keys.clone(),
        urls: vec!["https://shop.example.com/a".into()],
        soft: true,
        ..Default::default()
    };
    let results = run(p.as_ref(), &soft).await;
    assert_all_done(&results);
    assert_eq!(
        fake.request_count(),
        4,
        "three key batches and one URL purge"
    );
    assert_eq!(fake.soft_keys(), keys);
    assert_eq!(
        fake.accepted_urls(),
        [("shop.example.com/a".to_string(), true)]
    );
    assert!(fake.hard_keys().is_empty());
    // The Done detail names Fastly's purge ids.
    assert!(
        matches!(&results[0].1, ProviderAnswer::Done(d) if d.contains("108-1391560174-")),
        "{:?}",
        results[0].1
    );

    let hard = PurgeJob {
        id: "hard".into(),
        tags: vec!["vendors".into()],
        ..Default::default()
    };
    assert_all_done(&run(p.as_ref(), &hard).await);
    assert_eq!(fake.hard_keys(), ["vendors"]);

    assert_eq!(fake.request_count(), 5);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

/// Issue 18 item 4: URL purges reach Fastly's "Purge a URL" API (`POST /purge/{host}{path}`,
/// one URL a request, with `Fastly-Key`), on the configured public hostnames when `hosts` is
/// set; prefix and host purges, which Fastly cannot do, are returned as skipped, not dropped.
#[tokio::test]
async fn fastly_purges_urls_on_the_configured_hosts() {
    let fake = FakeFastly::start(FASTLY_SERVICE, FASTLY_TOKEN);
    let own = fastly(&fake.base(), FASTLY_TOKEN);
    let job = PurgeJob {
        id: "urls".into(),
        urls: vec![
            "https://shop.example.com/api/items/7?lang=en".into(),
            "http://shop.example.com:8080/b".into(),
        ],
        prefixes: vec!["shop.example.com/api/".into()],
        ..Default::default()
    };
    let results = run(own.as_ref(), &job).await;
    assert_all_done(&results);
    assert_eq!(
        fake.accepted_urls(),
        [
            ("shop.example.com/api/items/7?lang=en".to_string(), false),
            ("shop.example.com:8080/b".to_string(), false)
        ]
    );
    assert!(
        matches!(&results[0].1, ProviderAnswer::Done(d) if d.contains("108-1391560174-")),
        "the Done detail names Fastly's purge id: {:?}",
        results[0].1
    );
    let skipped: Vec<(Kind, String)> = own
        .plan(&job)
        .skipped
        .into_iter()
        .map(|s| (s.kind, s.item))
        .collect();
    assert_eq!(
        skipped,
        [(Kind::Prefixes, "shop.example.com/api/".to_string())]
    );

    // The gateway sees the origin's host; Fastly caches under the public ones.
    let public = provider(&format!(
        "[fastly]\nbase = {:?}\nservice_id = {FASTLY_SERVICE:?}\ntoken = {FASTLY_TOKEN:?}\n\
         hosts = [\"www.example.com\", \"example.com\"]\n",
        fake.base()
    ));
    let job = PurgeJob {
        id: "public".into(),
        urls: vec!["http://origin.internal:8080/menu".into()],
        soft: true,
        ..Default::default()
    };
    assert_all_done(&run(public.as_ref(), &job).await);
    assert_eq!(
        fake.accepted_urls()[2..],
        [
            ("www.example.com/menu".to_string(), true),
            ("example.com/menu".to_string(), true)
        ]
    );
    assert_eq!(fake.request_count(), 4, "one request per URL and host");

    // A wrong token is refused and says what to check.
    let wrong = fastly(&fake.base(), "wrong");
    let batch = one_batch(Kind::Urls, &["shop.example.com/x"], false);
    let m = fatal(&wrong.send(&batch, "k").await).to_string();
    assert!(m.contains("401") && m.contains("[cdn.fastly] token"), "{m}");
    assert_eq!(fake.auth_failures(), 1);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn fastly_retries_500_and_429_with_a_date_and_gives_up_on_a_bad_key() {
    let fake = FakeFastly::start(FASTLY_SERVICE, FASTLY_TOKEN);
    let p = fastly(&fake.base(), FASTLY_TOKEN);
    let batch = one_batch(Kind::Tags, &["a", "b"], true);

    fake.fail_next(1);
    assert_eq!(retry_after(&p.send(&batch, "k").await), None);
    let at = std::time::SystemTime::now() + Duration::from_secs(30);
    fake.throttle_next(1, &httpdate::fmt_http_date(at));
    let after = retry_after(&p.send(&batch, "k").await).expect("Retry-After date parsed");
    assert!(
        after > Duration::from_secs(25) && after <= Duration::from_secs(30),
        "{after:?}"
    );
    fake.fail_next_with(1, 503);
    assert_eq!(retry_after(&p.send(&batch, "k").await), None);
    assert!(matches!(p.send(&batch, "k").await, ProviderAnswer::Done(_)));
    assert_eq!(fake.soft_keys(), ["a", "b"]);

    let wrong = fastly(&fake.base(), "wrong");
    let m = fatal(&wrong.send(&batch, "k").await).to_string();
    assert!(m.contains("401") && m.contains("[cdn.fastly] token"), "{m}");
    assert_eq!(fake.auth_failures(), 1);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

// ---------------------------------------------------------------------------
// CloudFront
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cloudfront_invalidates_mapped_paths_with_a_valid_signature() {
    let fake = FakeCloudFront::start(DIST, AKID, SECRET);
    let p = cloudfront(&fake.base(), AKID, SECRET);
    let job = PurgeJob {
        id: "job-cf".into(),
        tags: vec![
            "vendors".into(),
            "wedding:1".into(),
            "wedding:2".into(),
            "menu".into(),
            "unmapped".into(),
        ],
        urls: vec![
            "https://shop.example.com/api/vendors/9".into(),
            "https://shop.example.com/api/rsvp?id=4".into(),
        ],
        ..Default::default()
    };
    let results = run(p.as_ref(), &job).await;
    assert_all_done(&results);
    assert_eq!(fake.request_count(), 2);
    let invs = fake.invalidations();
    assert_eq!(invs.len(), 2);
    // `/api/vendors/9` is covered by the tag's wildcard and not sent.
    assert_eq!(invs[0].paths, ["/api/rsvp?id=4"]);
    assert_eq!(
        invs[1].paths,
        ["/api/vendors/*", "/api/weddings/*", "/api/menu"]
    );
    assert_eq!(invs[0].caller_reference, "job-cf-0");
    for ((_, o), inv) in results.iter().zip(&invs) {
        assert!(
            matches!(o, ProviderAnswer::Done(d) if d.contains(&inv.id)),
            "{o:?}"
        );
    }

    // A retry of an accepted batch (same CallerReference, same body) returns the same
    // invalidation and creates no second one.
    let (b, first) = &results[1];
    let again = p.send(b, "job-cf-1").await;
    assert_eq!(&again, first);
    assert_eq!(fake.invalidations().len(), 2);
    assert_eq!(fake.replays(), 1);

    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    assert_eq!(fake.auth_failures(), 0);
}

#[tokio::test]
async fn cloudfront_splits_at_3000_paths_and_15_wildcards() {
    let fake = FakeCloudFront::start(DIST, AKID, SECRET);
    let p = cloudfront(&fake.base(), AKID, SECRET);
    let job = PurgeJob {
        id: "big".into(),
        urls: (0..3500)
            .map(|i| format!("https://shop.example.com/item/{i}"))
            .collect(),
        prefixes: (0..40)
            .map(|i| format!("shop.example.com/dir{i}/"))
            .collect(),
        ..Default::default()
    };
    let results = run(p.as_ref(), &job).await;
    assert_all_done(&results);
    // 3500 paths -> 2 requests, 40 wildcards -> 3 requests; the fake refuses anything larger.
    assert_eq!(fake.request_count(), 5);
    assert_eq!(fake.accepted_paths().len(), 3540);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn cloudfront_retries_throttling_and_refuses_a_wrong_secret() {
    let fake = FakeCloudFront::start(DIST, AKID, SECRET);
    let p = cloudfront(&fake.base(), AKID, SECRET);
    let batch = one_batch(Kind::Urls, &["/api/a", "/api/b*"], false);

    fake.fail_next(1);
    assert_eq!(retry_after(&p.send(&batch, "ref-1").await), None);
    fake.throttle_next(1, "3");
    assert_eq!(
        retry_after(&p.send(&batch, "ref-1").await),
        Some(Duration::from_secs(3))
    );
    fake.too_many_in_progress_next(1);
    let o = p.send(&batch, "ref-1").await;
    assert!(
        matches!(&o, ProviderAnswer::Retry { detail, .. } if detail.contains("TooManyInvalidationsInProgress")),
        "{o:?}"
    );
    assert!(matches!(
        p.send(&batch, "ref-1").await,
        ProviderAnswer::Done(_)
    ));
    assert_eq!(fake.invalidations().len(), 1);

    let wrong_secret = cloudfront(&fake.base(), AKID, "not-the-secret");
    let m = fatal(&wrong_secret.send(&batch, "ref-2").await).to_string();
    assert!(
        m.contains("SignatureDoesNotMatch") && m.contains("secret_access_key"),
        "{m}"
    );
    let wrong_key = cloudfront(&fake.base(), "AKIDOTHER", SECRET);
    let m = fatal(&wrong_key.send(&batch, "ref-3").await).to_string();
    assert!(m.contains("InvalidClientTokenId"), "{m}");

    assert_eq!(fake.auth_failures(), 2);
    assert_eq!(fake.invalidations().len(), 1);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn cloudfront_fake_rejects_unsigned_and_malformed_requests() {
    let fake = FakeCloudFront::start(DIST, AKID, SECRET);
    let client = crate::harness::client();
    let url = format!(
        "{}/2020-05-31/distribution/{DIST}/invalidation",
        fake.base()
    );
    let r = client
        .post(&url)
        .header("content-type", "application/xml")
        .body("<InvalidationBatch/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("MissingAuthenticationToken"));
    assert_eq!(fake.violations().len(), 1);

    let ok = format!(
        "<InvalidationBatch xmlns=\"{CLOUDFRONT_XMLNS}\"><CallerReference>r</CallerReference><Paths><Quantity>1</Quantity><Items><Path>/a</Path></Items></Paths></InvalidationBatch>"
    );
    assert_eq!(
        parse_batch(&ok).unwrap(),
        ("r".to_string(), vec!["/a".to_string()])
    );
    let cases = [
        (
            ok.replace("<Quantity>1", "<Quantity>2"),
            "InconsistentQuantities",
        ),
        (
            ok.replace(&format!(" xmlns=\"{CLOUDFRONT_XMLNS}\""), ""),
            "MalformedXML",
        ),
        ("<InvalidationBatch".to_string(), "MalformedXML"),
        (
            ok.replace("<Path>/a</Path>", "<Path>/a*/b</Path>"),
            "InvalidArgument",
        ),
        (
            ok.replace("<CallerReference>r<", "<CallerReference><"),
            "InvalidArgument",
        ),
    ];
    for (doc, code) in cases {
        assert_eq!(parse_batch(&doc).unwrap_err().0, code, "{doc}");
    }
    let many: String = (0..16).map(|i| format!("<Path>/w{i}*</Path>")).collect();
    let wild = ok
        .replace("<Quantity>1", "<Quantity>16")
        .replace("<Path>/a</Path>", &many);
    assert_eq!(parse_batch(&wild).unwrap_err().0, "BatchTooLarge");
}

// ---------------------------------------------------------------------------
// Transport failures
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_unreachable_api_is_retried() {
    let base = closed_url();
    let batch = one_batch(Kind::Tags, &["t"], false);
    for p in [
        cloudflare(&base, CF_TOKEN, CF_ZONE),
        fastly(&base, FASTLY_TOKEN),
        cloudfront(&base, AKID, SECRET),
    ] {
        let o = p.send(&batch, "k").await;
        assert!(
            matches!(&o, ProviderAnswer::Retry { after: None, detail } if detail.contains("connect")),
            "{}: {o:?}",
            p.name()
        );
    }
}

#[tokio::test]
async fn a_silent_api_times_out_after_10s_and_is_retried() {
    // Accepts connections and never answers; the held sockets close when the test ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let p = cloudflare(&base, CF_TOKEN, CF_ZONE);
    let started = std::time::Instant::now();
    let o = p.send(&one_batch(Kind::Tags, &["t"], false), "k").await;
    let took = started.elapsed();
    holder.abort();
    assert!(
        matches!(&o, ProviderAnswer::Retry { after: None, detail } if detail.contains("timed out after 10s")),
        "{o:?}"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(30),
        "{took:?}"
    );
}

// ---------------------------------------------------------------------------
// Plain HTTP (Varnish / nginx)
// ---------------------------------------------------------------------------

fn http_provider(hosts: &[String]) -> Arc<dyn Provider> {
    provider(&format!("[http]\nhosts = {hosts:?}\n"))
}

#[tokio::test]
async fn http_purges_urls_with_purge_and_tags_with_ban_on_every_host() {
    let cache = |req: crate::harness::OriginRequest| match (req.method.as_str(), req.path.as_str())
    {
        ("PURGE", "/not-cached") => OriginResponse::with_status(404),
        ("PURGE", _) | ("BAN", "/") => OriginResponse::ok("purged"),
        _ => OriginResponse::with_status(405),
    };
    let a = Origin::start(cache);
    let b = Origin::start(cache);
    let p = http_provider(&[a.url(), b.url()]);
    let job = PurgeJob {
        id: "h".into(),
        urls: vec![
            "https://shop.example.com/api/a?x=1".into(),
            "https://shop.example.com:8443/not-cached".into(),
        ],
        tags: vec!["vendors".into(), "wedding:1".into()],
        ..Default::default()
    };
    assert_all_done(&run(p.as_ref(), &job).await);
    for cache in [&a, &b] {
        let reqs = cache.requests();
        // "METHOD target host=... xkey=..." per request, in order.
        let seen: Vec<String> = reqs
            .iter()
            .map(|r| {
                let q = if r.query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", r.query)
                };
                format!(
                    "{} {}{q} host={} xkey={}",
                    r.method,
                    r.path,
                    r.header("host").unwrap_or_default(),
                    r.header("xkey").unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                "PURGE /api/a?x=1 host=shop.example.com xkey=".to_string(),
                "PURGE /not-cached host=shop.example.com:8443 xkey=".to_string(),
                format!("BAN / host={} xkey=vendors wedding:1", cache.addr()),
            ]
        );
    }
}

#[tokio::test]
async fn http_retries_when_one_host_fails_and_gives_up_on_405() {
    let a = Origin::start(|_| OriginResponse::ok("purged"));
    let b = Origin::start(|_| OriginResponse::ok("purged"));
    let p = http_provider(&[a.url(), b.url()]);
    let batch = one_batch(Kind::Urls, &["https://h/x"], false);

    b.set_down(true); // 503
    let o = p.send(&batch, "k").await;
    assert!(
        matches!(&o, ProviderAnswer::Retry { detail, .. } if detail.contains(&b.addr().to_string())),
        "{o:?}"
    );
    b.set_down(false);
    assert!(matches!(p.send(&batch, "k").await, ProviderAnswer::Done(_)));

    let refusing = Origin::start(|_| OriginResponse::with_status(405));
    let p = http_provider(&[refusing.url()]);
    let m = fatal(&p.send(&batch, "k").await).to_string();
    assert!(
        m.contains("405") && m.contains("does not accept PURGE"),
        "{m}"
    );
}
