//! Signed vendor webhooks against the real `aisle` binary: a verified delivery fires its mapped
//! event (the event's tags are invalidated locally and, `cdn = true`, purged at the loopback
//! Cloudflare fake); every refused delivery (bad or missing signature, stale timestamp, malformed
//! JSON, a missing parameter, a body over `max_body`, a replay) invalidates nothing and purges
//! nothing. Each refusal is paired with the corrected delivery, which is accepted, so a refusal
//! can only pass for the reason under test.
//!
//! Signatures are computed here from the scheme's definition (GitHub `X-Hub-Signature-256`,
//! Stripe `Stripe-Signature`, Standard Webhooks `webhook-*`), never taken from the gateway.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::cdn::FakeCloudflare;
use crate::harness::fixtures;
use crate::harness::{
    assert_hit, assert_purged, config_for, poll_until, Gateway, Origin, OriginResponse, Resp,
};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const TOKEN: &str = "webhook-test-admin-token-55e1";
const CF_ZONE: &str = "z1";
const CF_TOKEN: &str = "cf-test-token-for-webhooks";
const TAVE_SECRET: &str = "tave-webhook-secret-91b2";
const STRIPE_SECRET: &str = "whsec_stripe_test_secret_x7";
/// 32 bytes; the configured secret is `whsec_<base64 of this>`.
const SVIX_KEY: &[u8] = b"standard-webhooks-key-0123456789";

fn svix_secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SVIX_KEY)
    )
}

/// The explicit `[cdn]` header works around a config bug: `[cdn.cloudflare]` alone (the
/// README's form) is refused with "invalid type: string \"cloudflare\", expected a borrowed
/// string" (see `cdn_pipeline.rs`, `documented_cdn_table_form_loads`).
fn gateway_toml(origin: &Origin, cf: &FakeCloudflare) -> String {
    format!(
        r#"{}
[admin]
token = "${{AISLE_ADMIN_TOKEN}}"

[purge]
dir = "purge-queue"
max_attempts = 5

[cdn]
[cdn.cloudflare]
base = "{}"
zone_id = "{CF_ZONE}"
token = "${{CF_TOKEN}}"

[webhooks.tave]
secret = "${{TAVE_SECRET}}"
signature = "github"
max_body = "1KiB"
[[webhooks.tave.map]]
type = "/event"
when = "availability_changed"
fire = {{ event = "availability_changed", params = {{ vendorId = "/data/vendor_id" }} }}

[webhooks.billing]
secret = "${{STRIPE_SECRET}}"
signature = "stripe"
[[webhooks.billing.map]]
type = "/type"
when = "vendor.availability.updated"
fire = {{ event = "availability_changed", params = {{ vendorId = "/data/object/vendor" }} }}

[webhooks.svix]
secret = "${{SVIX_SECRET}}"
signature = "standard-webhooks"
[[webhooks.svix.map]]
type = "/type"
when = "availability.changed"
fire = {{ event = "availability_changed", params = {{ vendorId = "/payload/vendor" }} }}
"#,
        config_for(&origin.url()),
        cf.base()
    )
}

/// The fixture: an origin, the Cloudflare fake and a gateway purging it.
struct Fixture {
    origin: Origin,
    cf: FakeCloudflare,
    gw: Gateway,
    started_ms: u64,
}

async fn fixture() -> Fixture {
    let origin = Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)));
    let cf = FakeCloudflare::start(CF_ZONE, CF_TOKEN);
    let svix = svix_secret();
    let gw = Gateway::start_with_env(
        &gateway_toml(&origin, &cf),
        &[("rules.toml", fixtures::WEBHOOK_RULES)],
        &[
            ("AISLE_ADMIN_TOKEN", TOKEN),
            ("CF_TOKEN", CF_TOKEN),
            ("TAVE_SECRET", TAVE_SECRET),
            ("STRIPE_SECRET", STRIPE_SECRET),
            ("SVIX_SECRET", svix.as_str()),
        ],
    )
    .await;
    Fixture {
        origin,
        cf,
        gw,
        started_ms: now_ms(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn now_secs() -> i64 {
    (now_ms() / 1000) as i64
}

// ---------------------------------------------------------------------------
// Signing, per scheme
// ---------------------------------------------------------------------------

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// GitHub: `X-Hub-Signature-256: sha256=<hex HMAC(secret, body)>`, id in `X-GitHub-Delivery`.
fn github(secret: &str, body: &str, delivery: &str) -> Vec<(String, String)> {
    vec![
        (
            "X-Hub-Signature-256".into(),
            format!(
                "sha256={}",
                hex::encode(mac(secret.as_bytes(), &[body.as_bytes()]))
            ),
        ),
        ("X-GitHub-Delivery".into(), delivery.into()),
        ("X-GitHub-Event".into(), "availability".into()),
    ]
}

/// Stripe: `Stripe-Signature: t=<unix>,v1=<hex HMAC(secret, "t.body")>`.
fn stripe(secret: &str, body: &str, t: i64) -> Vec<(String, String)> {
    let sig = mac(
        secret.as_bytes(),
        &[t.to_string().as_bytes(), b".", body.as_bytes()],
    );
    vec![(
        "Stripe-Signature".into(),
        format!("t={t},v1={}", hex::encode(sig)),
    )]
}

/// Standard Webhooks: `webhook-signature: v1,<base64 HMAC(key, "id.ts.body")>`.
fn standard(key: &[u8], body: &str, id: &str, ts: i64) -> Vec<(String, String)> {
    let sig = mac(
        key,
        &[
            id.as_bytes(),
            b".",
            ts.to_string().as_bytes(),
            b".",
            body.as_bytes(),
        ],
    );
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(sig)
            ),
        ),
    ]
}

fn tave_body(vendor: &str) -> String {
    json!({"event": "availability_changed", "data": {"vendor_id": vendor}}).to_string()
}

fn stripe_body(id: &str, vendor: &str) -> String {
    json!({"id": id, "type": "vendor.availability.updated", "data": {"object": {"vendor": vendor}}})
        .to_string()
}

fn svix_body(vendor: &str) -> String {
    json!({"type": "availability.changed", "payload": {"vendor": vendor}}).to_string()
}

// ---------------------------------------------------------------------------
// Requests and checks
// ---------------------------------------------------------------------------

async fn deliver(gw: &Gateway, source: &str, headers: &[(String, String)], body: &str) -> Resp {
    let url = gw.url(&format!("/_aisle/webhooks/{source}"));
    let mut rb = gw
        .client()
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        rb = rb.header(k.as_str(), v.as_str());
    }
    let started = Instant::now();
    let resp = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url} failed: {e:?}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("webhook answer body");
    Resp {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

fn json_of(r: &Resp) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("answer {:?} is not JSON: {e}", r.text()))
}

/// A delivery that must be accepted and fire one event with two tags, queued for the CDN.
fn assert_accepted(r: &Resp, what: &str) -> Value {
    assert_eq!(r.status, 202, "{what}: answer {:?}", r.text());
    let v = json_of(r);
    assert_eq!(v["fired"], json!(1), "{what}: {v}");
    assert_eq!(v["tags"], json!(2), "{what}: {v}");
    assert_eq!(v["cdn"], json!("queued"), "{what}: {v}");
    assert!(
        v["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: {v}"
    );
    v
}

fn assert_refused(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: answer {:?}", r.text());
    let v = json_of(r);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{what}: a refusal says why: {v}"
    );
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let expected: &[&str] = match status {
        401 => &["bad_signature", "stale_timestamp"],
        400 => &["invalid_json", "invalid_field"],
        404 => &["not_found"],
        405 => &["method_not_allowed"],
        413 => &["too_large"],
        _ => &[],
    };
    assert!(
        expected.contains(&code),
        "{what}: code {code:?} for {status}: {v}"
    );
}

/// Fill `path` and check it hits.
async fn fill(gw: &Gateway, path: &str) {
    let r = gw.get(path).await;
    assert!(
        r.status == 200 && r.cache_status().contains("stored"),
        "first GET {path}: {:?}",
        r.cache_status()
    );
    assert_hit(&gw.get(path).await, &format!("second GET {path}"));
}

fn tags_for(vendor: &str) -> Vec<String> {
    vec!["availability_change".into(), format!("vendor:{vendor}")]
}

/// Poll until the Cloudflare fake has accepted the tag purges for exactly `vendors`, in this
/// order, one request each; and nothing a correct client would not send.
async fn wait_cdn_purges(cf: &FakeCloudflare, vendors: &[&str]) {
    let want: Vec<(String, Vec<String>)> = vendors
        .iter()
        .map(|v| ("tags".to_string(), tags_for(v)))
        .collect();
    poll_until(
        Duration::from_secs(10),
        &format!("Cloudflare to receive the purges for {vendors:?}"),
        || async { (cf.accepted().len() >= want.len()).then_some(()) },
    )
    .await;
    let mut got = cf.accepted();
    for (_, items) in got.iter_mut() {
        items.sort();
    }
    assert_eq!(got, want, "what Cloudflare accepted");
    assert_eq!(
        cf.request_count(),
        vendors.len(),
        "requests Cloudflare received"
    );
    assert!(cf.violations().is_empty(), "{:?}", cf.violations());
    assert_eq!(cf.auth_failures(), 0);
}

/// `GET /admin/audit?since=..` records from `source`.
async fn audit(gw: &Gateway, since: u64) -> Vec<Value> {
    let r = crate::harness::fetch(
        gw.client(),
        "GET",
        &gw.admin_url(&format!("/admin/audit?since={since}")),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(r.status, 200, "GET /admin/audit: {:?}", r.text());
    json_of(&r)["records"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn webhook_count(gw: &Gateway, source: &str, outcome: &str) -> f64 {
    gw.metric(
        "aisle_webhooks_total",
        &[("source", source), ("outcome", outcome)],
    )
    .await
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Accepted deliveries
// ---------------------------------------------------------------------------

/// A GitHub-signed delivery fires `availability_changed` for vendor v7: `vendor:v7` and
/// `availability_change` entries miss, others hit, the CDN gets both tags once, and the audit log
/// names the webhook and the delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_delivery_invalidates_mapped_tags_and_purges_the_cdn() {
    let f = fixture().await;
    let gw = &f.gw;
    let (v7, v8, avail, venue) = (
        "/api/vendors/v7",
        "/api/vendors/v8",
        "/api/availability/a1",
        "/api/venues/x",
    );
    for p in [v7, v8, avail, venue] {
        fill(gw, p).await;
    }

    let body = tave_body("v7");
    let delivery = "d6a1c0de-0001";
    let r = deliver(gw, "tave", &github(TAVE_SECRET, &body, delivery), &body).await;
    let answer = assert_accepted(&r, "GitHub-signed delivery");

    assert_purged(&gw.get(v7).await, "vendor v7 after the delivery");
    assert_purged(&gw.get(avail).await, "an availability_change entry");
    assert_hit(&gw.get(v8).await, "vendor v8 after the delivery");
    assert_hit(&gw.get(venue).await, "a venue after the delivery");
    assert_eq!(
        [v7, v8, avail, venue].map(|p| f.origin.count(p)),
        [2, 1, 2, 1],
        "origin requests per path"
    );

    wait_cdn_purges(&f.cf, &["v7"]).await;

    let records = audit(gw, f.started_ms).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let rec = &records[0];
    assert_eq!(rec["id"], answer["id"], "{rec}");
    assert_eq!(rec["source"], json!("webhook:tave"), "{rec}");
    assert_eq!(rec["actor"], json!(delivery), "{rec}");
    assert_eq!(rec["events"], json!(["availability_changed"]), "{rec}");
    assert_eq!(rec["tags"], json!(tags_for("v7")), "{rec}");
    assert_eq!(webhook_count(gw, "tave", "accepted").await, 1.0);
}

/// Standard Webhooks: a valid signature is accepted; the `webhook-id` is signed (changing it
/// breaks the signature) and is the delivery id (a replay is a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_delivery() {
    let f = fixture().await;
    let gw = &f.gw;
    let (s1, s2) = ("/api/vendors/s1", "/api/vendors/s2");
    fill(gw, s1).await;
    fill(gw, s2).await;
    let body = svix_body("s1");
    let ts = now_secs();
    let headers = standard(SVIX_KEY, &body, "msg_2f9a", ts);

    let mut forged = headers.clone();
    forged[0].1 = "msg_other".into();
    let r = deliver(gw, "svix", &forged, &body).await;
    assert_refused(&r, 401, "a signature made for another webhook-id");
    assert_hit(&gw.get(s1).await, "vendor s1 after the refused delivery");

    let stale = standard(SVIX_KEY, &body, "msg_2f9a", ts - 3600);
    let r = deliver(gw, "svix", &stale, &body).await;
    assert_refused(&r, 401, "a Standard Webhooks timestamp an hour old");
    assert_hit(&gw.get(s1).await, "vendor s1 after the stale delivery");

    let r = deliver(gw, "svix", &headers, &body).await;
    assert_accepted(&r, "Standard Webhooks delivery");
    assert_purged(&gw.get(s1).await, "vendor s1 after the delivery");
    assert_hit(&gw.get(s2).await, "vendor s2 after the delivery");

    let r = deliver(gw, "svix", &headers, &body).await;
    assert_eq!(r.status, 202, "replay: {:?}", r.text());
    assert_eq!(json_of(&r)["duplicate"], json!(true), "{:?}", r.text());
    assert_hit(&gw.get(s1).await, "vendor s1 after the replay");

    wait_cdn_purges(&f.cf, &["s1"]).await;
    assert_eq!(webhook_count(gw, "svix", "accepted").await, 1.0);
    assert_eq!(webhook_count(gw, "svix", "duplicate").await, 1.0);
}

// ---------------------------------------------------------------------------
// Refused deliveries
// ---------------------------------------------------------------------------

/// Vendor v1's entry is cached; `refused` must be refused with `status` and leave it a hit;
/// then `corrected` (the same delivery done right) is accepted, purges v1 and reaches the CDN,
/// which received nothing before it.
async fn refused_then_corrected(
    f: &Fixture,
    what: &str,
    status: u16,
    refused: (&str, Vec<(String, String)>, String),
    corrected: (&str, Vec<(String, String)>, String),
) {
    let gw = &f.gw;
    let (v1, v2) = ("/api/vendors/v1", "/api/vendors/v2");
    fill(gw, v1).await;
    fill(gw, v2).await;

    let (source, headers, body) = refused;
    let r = deliver(gw, source, &headers, &body).await;
    assert_refused(&r, status, what);
    assert_hit(&gw.get(v1).await, &format!("vendor v1 after {what}"));
    assert_hit(&gw.get(v2).await, &format!("vendor v2 after {what}"));
    assert_eq!(f.origin.count(v1), 1, "{what}: nothing was refetched");
    assert_eq!(f.cf.request_count(), 0, "{what}: the CDN was not called");
    // The refusal itself is audited (issue 18 item 9): who, when, why; nothing invalidated,
    // no body.
    let records = audit(gw, f.started_ms).await;
    assert_eq!(records.len(), 1, "{what}: one refusal record: {records:?}");
    let refusal = &records[0];
    assert!(
        refusal["refused"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: {refusal}"
    );
    assert!(refusal["source"]
        .as_str()
        .unwrap_or("")
        .starts_with("webhook:"));
    assert_eq!(refusal["tags"], serde_json::json!([]), "{what}: {refusal}");
    assert_eq!(
        refusal["events"],
        serde_json::json!([]),
        "{what}: {refusal}"
    );
    assert!(
        !refusal.to_string().contains(body.as_str()),
        "{what}: the body is not in the audit record"
    );

    let (source, headers, body) = corrected;
    let r = deliver(gw, source, &headers, &body).await;
    assert_accepted(&r, &format!("the corrected delivery after {what}"));
    assert_purged(&gw.get(v1).await, "vendor v1 after the corrected delivery");
    assert_hit(&gw.get(v2).await, "vendor v2 after the corrected delivery");
    // The CDN receives the corrected delivery's purge, and nothing from the refused one.
    wait_cdn_purges(&f.cf, &["v1"]).await;
    let records = audit(gw, f.started_ms).await;
    let invalidations: Vec<_> = records
        .iter()
        .filter(|r| r.get("refused").is_none())
        .collect();
    assert_eq!(
        invalidations.len(),
        1,
        "{what}: only the corrected delivery invalidated: {records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_is_refused() {
    let f = fixture().await;
    let body = tave_body("v1");
    refused_then_corrected(
        &f,
        "a signature made with another secret",
        401,
        (
            "tave",
            github("not-the-secret", &body, "d-bad"),
            body.clone(),
        ),
        ("tave", github(TAVE_SECRET, &body, "d-bad"), body.clone()),
    )
    .await;
    assert_eq!(webhook_count(&f.gw, "tave", "bad_signature").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_signature_is_refused() {
    let f = fixture().await;
    let body = tave_body("v1");
    let signed = github(TAVE_SECRET, &body, "d-missing");
    let unsigned: Vec<(String, String)> = signed
        .iter()
        .filter(|(k, _)| k != "X-Hub-Signature-256")
        .cloned()
        .collect();
    refused_then_corrected(
        &f,
        "a delivery without a signature",
        401,
        ("tave", unsigned, body.clone()),
        ("tave", signed, body.clone()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_body_is_refused() {
    let f = fixture().await;
    let body = tave_body("v1");
    // Signed for v2, delivered with v1.
    refused_then_corrected(
        &f,
        "a body that is not the one signed",
        401,
        (
            "tave",
            github(TAVE_SECRET, &tave_body("v2"), "d-tamper"),
            body.clone(),
        ),
        ("tave", github(TAVE_SECRET, &body, "d-tamper"), body.clone()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_stripe_timestamp_is_refused() {
    let f = fixture().await;
    let body = stripe_body("evt_1", "v1");
    // Correctly signed, ten minutes old (tolerance 5 min).
    refused_then_corrected(
        &f,
        "a Stripe timestamp ten minutes old",
        401,
        (
            "billing",
            stripe(STRIPE_SECRET, &body, now_secs() - 600),
            body.clone(),
        ),
        (
            "billing",
            stripe(STRIPE_SECRET, &body, now_secs()),
            body.clone(),
        ),
    )
    .await;
    assert_eq!(webhook_count(&f.gw, "billing", "bad_signature").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_refused() {
    let f = fixture().await;
    let bad = r#"{"event": "availability_changed", "data": {"vendor_id": "v1"}"#.to_string();
    let good = tave_body("v1");
    refused_then_corrected(
        &f,
        "a correctly signed body that is not JSON",
        400,
        ("tave", github(TAVE_SECRET, &bad, "d-json"), bad.clone()),
        ("tave", github(TAVE_SECRET, &good, "d-json"), good.clone()),
    )
    .await;
    assert_eq!(webhook_count(&f.gw, "tave", "malformed").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_missing_a_parameter_is_refused() {
    let f = fixture().await;
    let bad = json!({"event": "availability_changed", "data": {"vendor": "v1"}}).to_string();
    let good = tave_body("v1");
    // The same delivery id: a refused delivery's id is not burnt, so the vendor's retry counts.
    refused_then_corrected(
        &f,
        "a mapped delivery without /data/vendor_id",
        400,
        ("tave", github(TAVE_SECRET, &bad, "d-param"), bad.clone()),
        ("tave", github(TAVE_SECRET, &good, "d-param"), good.clone()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_over_max_body_is_refused() {
    let f = fixture().await;
    let big = json!({
        "event": "availability_changed",
        "data": {"vendor_id": "v1"},
        "padding": "x".repeat(2048),
    })
    .to_string();
    assert!(big.len() > 1024);
    let good = tave_body("v1");
    refused_then_corrected(
        &f,
        "a correctly signed delivery over max_body (1KiB)",
        413,
        ("tave", github(TAVE_SECRET, &big, "d-big"), big.clone()),
        ("tave", github(TAVE_SECRET, &good, "d-big"), good.clone()),
    )
    .await;
    assert_eq!(webhook_count(&f.gw, "tave", "too_large").await, 1.0);
}

/// A replayed delivery id is acknowledged as a duplicate and does nothing, even when the entry
/// was refilled since; another delivery id is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_delivery_is_a_duplicate() {
    let f = fixture().await;
    let gw = &f.gw;
    let (v1, v2) = ("/api/vendors/v1", "/api/vendors/v2");
    fill(gw, v1).await;
    fill(gw, v2).await;
    let body = tave_body("v1");
    let headers = github(TAVE_SECRET, &body, "d-replay");

    assert_accepted(
        &deliver(gw, "tave", &headers, &body).await,
        "first delivery",
    );
    assert_purged(&gw.get(v1).await, "vendor v1 after the first delivery");
    assert_hit(&gw.get(v1).await, "vendor v1 refilled");
    wait_cdn_purges(&f.cf, &["v1"]).await;

    for n in 1..=2 {
        let r = deliver(gw, "tave", &headers, &body).await;
        assert_eq!(r.status, 202, "replay {n}: {:?}", r.text());
        let v = json_of(&r);
        assert_eq!(v["duplicate"], json!(true), "replay {n}: {v}");
        assert_hit(&gw.get(v1).await, &format!("vendor v1 after replay {n}"));
    }
    assert_eq!(f.origin.count(v1), 2, "the replays refetched nothing");
    assert_eq!(webhook_count(gw, "tave", "duplicate").await, 2.0);

    // A new delivery id (for v2) goes through; the CDN saw v1 once, then v2.
    let body2 = tave_body("v2");
    let r = deliver(gw, "tave", &github(TAVE_SECRET, &body2, "d-next"), &body2).await;
    assert_accepted(&r, "a new delivery after the replays");
    assert_purged(&gw.get(v2).await, "vendor v2 after the new delivery");
    wait_cdn_purges(&f.cf, &["v1", "v2"]).await;
    assert_eq!(
        audit(gw, f.started_ms).await.len(),
        2,
        "replays are not audited"
    );
}
