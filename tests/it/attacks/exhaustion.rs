//! Invalidation evasion and exhaustion (issue 9 items 10-13), against the real binary:
//!
//! - a tag rendered from a request value with a space (`vendor-type:wedding planner`) is
//!   purgeable by its raw value (admin JSON, an event parameter) and by its rendered form (a
//!   space-separated `Surrogate-Key` on `PURGE`);
//! - a signed webhook body replayed with a new, unsigned delivery header is a duplicate, and so
//!   is a plain-HMAC delivery that carries no id at all;
//! - entries with huge request-derived tags and paths are charged what they hold, so a 2 MiB
//!   memory budget evicts instead of growing;
//! - a thousand random webhook paths add no metric series.

use crate::harness::hostile::framework_origin;
use crate::harness::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const TOKEN: &str = "exhaustion-admin-token-5c1f0e";
const GITHUB_SECRET: &str = "exhaustion-github-secret-77";
const HMAC_SECRET: &str = "exhaustion-hmac-secret-31";

fn gateway_toml(origin_url: &str, memory: &str) -> String {
    format!(
        r#"{}
[admin]
token = "{TOKEN}"

[webhooks.tave]
secret = "{GITHUB_SECRET}"
signature = "github"
[[webhooks.tave.map]]
type = "/event"
when = "availability_changed"
fire = {{ event = "availability_changed", params = {{ vendorId = "/data/vendor_id" }} }}

[webhooks.plain]
secret = "{HMAC_SECRET}"
signature = "hmac-sha256"
header = "X-Signature"
[[webhooks.plain.map]]
type = "/event"
when = "availability_changed"
fire = {{ event = "availability_changed", params = {{ vendorId = "/data/vendor_id" }} }}
"#,
        config_with_cache(origin_url, memory, "1MiB")
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn admin_invalidate(gw: &Gateway, body: Value) -> Resp {
    let bearer = bearer();
    fetch_with_body(
        gw.client(),
        "POST",
        &gw.admin_url("/admin/invalidate"),
        &[
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

// ---------------------------------------------------------------------------
// Item 10: tags with spaces
// ---------------------------------------------------------------------------

/// The vendor search is tagged `vendor-type:{query.vendorType}`; a client searching for
/// `wedding planner` makes an entry tagged with a space. Each way of purging it must reach it:
/// the raw value in admin JSON, the rendered form in a space-separated `Surrogate-Key`, and an
/// event whose parameter is the raw value. Other vendor types are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_rendered_from_values_with_spaces_are_purgeable() {
    let origin = framework_origin();
    let gw = Gateway::start(
        &gateway_toml(&origin.url(), "64MiB"),
        &[("rules.toml", crate::harness::fixtures::EXHAUSTION_RULES)],
    )
    .await;
    let planner = "/api/vendors/search?location=Brooklyn&vendorType=wedding%20planner&budget=5000";
    let florist = "/api/vendors/search?location=Brooklyn&vendorType=florist&budget=5000";

    async fn refill(gw: &Gateway, path: &str, what: &str) {
        let r = gw.get(path).await;
        assert_eq!(r.status, 200, "{what}: {:?}", r.text());
        assert!(
            r.cache_status().contains("stored"),
            "{what}: expected a stored miss, got {:?}",
            r.cache_status()
        );
        assert_hit(&gw.get(path).await, &format!("{what}, again"));
    }
    refill(&gw, planner, "wedding planner").await;
    refill(&gw, florist, "florist").await;

    // 1. The raw value, as an admin names it in JSON.
    let r = admin_invalidate(&gw, json!({"tags": ["vendor-type:wedding planner"]})).await;
    assert_eq!(r.status, 202, "admin purge by raw value: {:?}", r.text());
    assert_purged(&gw.get(planner).await, "after the admin purge by raw value");
    assert_hit(&gw.get(florist).await, "florist after the admin purge");
    assert_hit(&gw.get(planner).await, "wedding planner refilled");

    // 2. The rendered form, in a space-separated Surrogate-Key on PURGE.
    let bearer = bearer();
    let r = gw
        .request(
            "PURGE",
            "/",
            &[
                ("authorization", bearer.as_str()),
                (
                    "surrogate-key",
                    "vendors-unrelated vendor-type:wedding%20planner",
                ),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "PURGE by rendered form: {:?}", r.text());
    assert_purged(&gw.get(planner).await, "after PURGE by the rendered form");
    assert_hit(&gw.get(florist).await, "florist after PURGE");
    assert_hit(&gw.get(planner).await, "wedding planner refilled again");

    // 3. An event whose parameter is the raw value.
    let r = admin_invalidate(
        &gw,
        json!({"events": [{"name": "vendor_type_changed", "params": {"type": "wedding planner"}}]}),
    )
    .await;
    assert_eq!(r.status, 202, "event with a raw value: {:?}", r.text());
    assert_purged(&gw.get(planner).await, "after the event");
    assert_hit(&gw.get(florist).await, "florist after the event");
}

/// The origin's tags take the same canonical form: a `Cache-Tag` with a space is purgeable by
/// its raw value; a response with more tags than an entry may carry (256) is not stored, since
/// dropping some would make their purges miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_tags_are_canonical_and_bounded() {
    let many: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let many = many.join(" ");
    let origin = Origin::start(move |req| {
        let resp = OriginResponse::ok("ok").header("cache-control", "public, max-age=300");
        match req.path.as_str() {
            "/o/spaces" => resp.header("cache-tag", "wedding planner, other"),
            "/o/many" => resp.header("surrogate-key", &many),
            _ => resp,
        }
    });
    let gw = Gateway::start(
        &gateway_toml(&origin.url(), "64MiB"),
        &[("rules.toml", crate::harness::fixtures::EXHAUSTION_RULES)],
    )
    .await;
    assert_stored_miss(&gw.get("/o/spaces").await, "a Cache-Tag with a space");
    assert_hit(
        &gw.get("/o/spaces").await,
        "a Cache-Tag with a space, again",
    );
    let r = admin_invalidate(&gw, json!({"tags": ["wedding planner"]})).await;
    assert_eq!(r.status, 202, "{:?}", r.text());
    assert_purged(
        &gw.get("/o/spaces").await,
        "after a purge by the raw origin tag",
    );

    let r = gw.get("/o/many").await;
    assert_eq!(r.status, 200);
    assert!(
        !r.cache_status().contains("stored"),
        "300 origin tags: {:?}",
        r.cache_status()
    );
    assert!(!gw.get("/o/many").await.is_hit(), "not served from cache");
    assert!(gw.metric("aisle_too_many_tags_total", &[]).await >= Some(1.0));
}

// ---------------------------------------------------------------------------
// Item 11: webhook replays
// ---------------------------------------------------------------------------

fn hmac_hex(secret: &str, body: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(body.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

async fn deliver(gw: &Gateway, source: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    fetch_with_body(
        gw.client(),
        "POST",
        &gw.url(&format!("/_aisle/webhooks/{source}")),
        &all,
        body.to_string(),
    )
    .await
}

fn duplicate(r: &Resp) -> bool {
    r.status == 202
        && serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| v["duplicate"] == json!(true))
}

/// A signed GitHub body replayed with a new `X-GitHub-Delivery` (not signed) is a duplicate and
/// purges nothing; a plain `hmac-sha256` delivery without any id, replayed as is, too. A
/// different signed body still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_replayed_with_new_unsigned_ids_are_duplicates() {
    let origin = framework_origin();
    let gw = Gateway::start(
        &gateway_toml(&origin.url(), "64MiB"),
        &[("rules.toml", crate::harness::fixtures::WEBHOOK_RULES)],
    )
    .await;
    let v1 = "/api/vendors/v1";
    let body = json!({"event": "availability_changed", "data": {"vendor_id": "v1"}}).to_string();
    let sig = format!("sha256={}", hmac_hex(GITHUB_SECRET, &body));

    assert_stored_miss(&gw.get(v1).await, "vendor v1");
    let r = deliver(
        &gw,
        "tave",
        &[("x-hub-signature-256", &sig), ("x-github-delivery", "d-1")],
        &body,
    )
    .await;
    assert!(
        r.status == 202 && !duplicate(&r),
        "first delivery: {:?}",
        r.text()
    );
    assert_purged(&gw.get(v1).await, "vendor v1 after the first delivery");
    assert_hit(&gw.get(v1).await, "vendor v1 refilled");

    for (n, id) in ["d-2", "d-3"].iter().enumerate() {
        let r = deliver(
            &gw,
            "tave",
            &[("x-hub-signature-256", &sig), ("x-github-delivery", id)],
            &body,
        )
        .await;
        assert!(
            duplicate(&r),
            "replay {n} with a new X-GitHub-Delivery {id}: {} {:?}",
            r.status,
            r.text()
        );
        assert_hit(&gw.get(v1).await, &format!("vendor v1 after replay {n}"));
    }
    assert_eq!(origin.count(v1), 2, "the replays refetched nothing");

    // hmac-sha256 carries no delivery id: the signed body is the delivery.
    let plain_sig = hmac_hex(HMAC_SECRET, &body);
    let r = deliver(&gw, "plain", &[("x-signature", &plain_sig)], &body).await;
    assert!(
        r.status == 202 && !duplicate(&r),
        "plain delivery: {:?}",
        r.text()
    );
    assert_purged(&gw.get(v1).await, "vendor v1 after the plain delivery");
    assert_hit(
        &gw.get(v1).await,
        "vendor v1 refilled after the plain delivery",
    );
    let r = deliver(&gw, "plain", &[("x-signature", &plain_sig)], &body).await;
    assert!(duplicate(&r), "plain replay: {} {:?}", r.status, r.text());
    assert_hit(&gw.get(v1).await, "vendor v1 after the plain replay");

    // Another signed body is another delivery.
    let body2 =
        json!({"event": "availability_changed", "data": {"vendor_id": "v1"}, "at": 2}).to_string();
    let sig2 = format!("sha256={}", hmac_hex(GITHUB_SECRET, &body2));
    let r = deliver(
        &gw,
        "tave",
        &[("x-hub-signature-256", &sig2), ("x-github-delivery", "d-4")],
        &body2,
    )
    .await;
    assert!(
        r.status == 202 && !duplicate(&r),
        "a new body: {:?}",
        r.text()
    );
    assert_purged(&gw.get(v1).await, "vendor v1 after a new delivery");
}

// ---------------------------------------------------------------------------
// Item 12: uncounted memory
// ---------------------------------------------------------------------------

const BUDGET: usize = 2 * 1024 * 1024;
const PATH_PAD: usize = 12 * 1024;
const TAG_VALUE: usize = 16 * 1024;
const REQUESTS: usize = 250;

/// 250 requests, each with a 12 KiB path and a 16 KiB query value rendered into three tags,
/// against a 2 MiB memory budget and an origin answering a few bytes. Each entry holds at least
/// its `host/path` (12 KiB) whatever else is charged, so 250 of them cannot fit: the tier must
/// evict, and never count fewer bytes than its entries' paths alone.
///
/// (The origin answers `ok`, not the framework origin's echo of the request: an answer as
/// large as the request would be charged as body and hide the uncounted bytes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_tag_values_are_charged_and_evicted_within_the_budget() {
    let origin =
        Origin::start(|_| OriginResponse::ok("ok").header("cache-control", "public, max-age=300"));
    let gw = Gateway::start(
        &gateway_toml(&origin.url(), "2MiB"),
        &[("rules.toml", crate::harness::fixtures::EXHAUSTION_RULES)],
    )
    .await;
    let pad = "p".repeat(PATH_PAD);
    let value = "v".repeat(TAG_VALUE);
    for i in 0..REQUESTS {
        let r = gw.get(&format!("/t/{i}/{pad}?v={i}{value}")).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.text());
        assert!(
            r.cache_status().contains("stored"),
            "request {i}: expected a stored miss, got {:?}",
            r.cache_status()
        );
    }
    // Pingora purges a fill's eviction victims in a task it spawns after the fill: wait for the
    // last ones to land.
    let text = poll_until(
        std::time::Duration::from_secs(10),
        "aisle_cache_bytes within the budget",
        || async {
            let text = gw.metrics().await;
            metric_value(&text, "aisle_cache_bytes", &[])
                .is_some_and(|b| b as usize <= BUDGET)
                .then_some(text)
        },
    )
    .await;
    let bytes = metric_value(&text, "aisle_cache_bytes", &[]).expect("aisle_cache_bytes") as usize;
    let entries =
        metric_value(&text, "aisle_cache_entries", &[]).expect("aisle_cache_entries") as usize;
    let evictions = metric_value(&text, "aisle_cache_evictions_total", &[]).unwrap_or(0.0);
    assert!(
        bytes <= BUDGET,
        "aisle_cache_bytes {bytes} over the budget {BUDGET}"
    );
    assert!(
        entries * PATH_PAD <= BUDGET,
        "{entries} entries each holding a {PATH_PAD}-byte path cannot fit in {BUDGET} bytes \
         (aisle_cache_bytes says {bytes}): their tags and paths are not counted"
    );
    assert!(
        bytes >= entries * (PATH_PAD + 3 * 200),
        "{bytes} bytes charged for {entries} entries each holding a {PATH_PAD}-byte path and \
         three tags of about 256 bytes"
    );
    assert!(evictions > 0.0, "no eviction: {evictions}");
    assert!(entries > 0, "the most recent entries are kept");
}

// ---------------------------------------------------------------------------
// Item 13: unbounded metric labels
// ---------------------------------------------------------------------------

fn webhook_series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("aisle_webhooks_total{"))
        .collect()
}

/// A thousand POSTs to random unconfigured webhook paths are answered 404 and counted under
/// `source="unknown"`: the number of `aisle_webhooks_total` series and the size of `/metrics`
/// stay where they were after the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_webhook_paths_add_no_metric_series() {
    let origin = framework_origin();
    let gw = Gateway::start(
        &gateway_toml(&origin.url(), "64MiB"),
        &[("rules.toml", crate::harness::fixtures::WEBHOOK_RULES)],
    )
    .await;
    let post = |path: String| {
        let gw = &gw;
        async move {
            fetch_with_body(gw.client(), "POST", &gw.url(&path), &[], "{}")
                .await
                .status
        }
    };
    assert_eq!(post("/_aisle/webhooks/first-random".into()).await, 404);
    let before = gw.metrics().await;
    let series_before = webhook_series(&before).len();

    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            batch.push(post(format!("/_aisle/webhooks/{seed:016x}/{chunk}")));
        }
        for status in futures_util::future::join_all(batch).await {
            assert_eq!(status, 404);
        }
    }

    let after = gw.metrics().await;
    let series = webhook_series(&after);
    assert_eq!(
        series.len(),
        series_before,
        "random webhook paths made new series: {} lines, e.g. {:?}",
        series.len(),
        series.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        after.len() < before.len() + 1024,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(
        series.iter().all(|l| l.contains("source=\"unknown\"")),
        "unknown sources are counted as unknown: {series:?}"
    );
    assert_eq!(
        metric_value(
            &after,
            "aisle_webhooks_total",
            &[("source", "unknown"), ("outcome", "unknown_source")]
        ),
        Some(1001.0)
    );
}
