//! AI (POST) caching: keys built from JSON request bodies (`body./pointer`
//! vary sources with normalizers, and `body_key.all` canonical bodies), the
//! body forwarded untouched, bypasses for bodies that cannot be keyed, error
//! answers never stored, per-request controls, coalescing (one instance and
//! a Redis fleet) and the savings counters. Every test runs the real `aisle`
//! binary against real loopback origins.

use std::time::Duration;

use crate::harness::fixtures;
use crate::harness::redis::{wait_subscribed, RedisServer, SharedRedis};
use crate::harness::*;
use serde_json::Value;

const ADMIN_TOKEN: &str = "ai-caching-admin-token-0123456789";

const REC: &str = "/api/ai/recommendations";
const CHAT: &str = "/v1/chat/completions";
const RULE: &str = "ai-recommendations";

/// gateway.toml with both upstreams on `origin_url` and the admin token;
/// `extra` (e.g. a `[redis]` table) is appended last.
fn config(origin_url: &str, extra: &str) -> String {
    let base = r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
default_upstream = "ai"
# The tests' client sends Aisle-Cache-TTL / Aisle-Cache-Namespace.
trusted_clients = ["127.0.0.1/32"]

[cache]
memory = "64MiB"
max_object = "8MiB"
rules_dir = "rules"

[upstreams.ai]
url = "ORIGIN"
connect_timeout = "2s"
read_timeout = "10s"

[upstreams.openai]
url = "ORIGIN"
connect_timeout = "2s"
read_timeout = "10s"

[admin]
token = "${AISLE_ADMIN_TOKEN}"
"#;
    format!("{}{extra}", base.replace("ORIGIN", origin_url))
}

/// The origin: a JSON answer naming the path and the per-path request number
/// `n` (so every fill is recognisable), with `usage.total_tokens = 150`.
/// `/query/type` (or `/model` for chat) steers it: `status-NNN` answers that
/// status (with `max-age=600`, which a GET rule would store), `slow` answers
/// after 500 ms.
fn ai_origin() -> Origin {
    Origin::start(|req| {
        let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let kind = v
            .pointer("/query/type")
            .or_else(|| v.pointer("/model"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let body = serde_json::json!({
            "path": req.path,
            "n": req.count,
            "kind": kind,
            "usage": { "total_tokens": 150 },
        })
        .to_string();
        let mut resp = OriginResponse::ok(body).header("content-type", "application/json");
        if let Some(code) = kind.strip_prefix("status-") {
            resp = resp
                .status(code.parse().expect("status-NNN"))
                .header("cache-control", "max-age=600");
        }
        if kind == "slow" {
            resp = resp.delay(Duration::from_millis(500));
        }
        resp
    })
}

async fn start_gateway(origin: &Origin, extra: &str) -> Gateway {
    Gateway::start_with_env(
        &config(&origin.url(), extra),
        &[("rules.toml", fixtures::AI_RULES)],
        &[("AISLE_ADMIN_TOKEN", ADMIN_TOKEN)],
    )
    .await
}

async fn setup() -> (Origin, Gateway) {
    let origin = ai_origin();
    let gw = start_gateway(&origin, "").await;
    (origin, gw)
}

/// `n` from an origin answer.
fn fill_number(r: &Resp) -> u64 {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("answer {:?} is not JSON: {e}", r.text()));
    v["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("answer {:?} has no n", r.text()))
}

/// The `key=` parameter of Cache-Status: 8 lowercase hex digits.
fn key_of(r: &Resp, what: &str) -> String {
    let cs = r.cache_status();
    let key = cache_status_param(&cs, "key")
        .unwrap_or_else(|| panic!("{what}: no key= in Cache-Status {cs:?}"));
    assert!(
        key.len() == 8 && key.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "{what}: key= {key:?} is not 8 lowercase hex digits (Cache-Status {cs:?})"
    );
    key
}

fn assert_bypass(r: &Resp, detail: &str, what: &str) {
    let cs = r.cache_status();
    assert!(
        cs.starts_with("aisle; fwd=bypass") && cs.contains(&format!("detail={detail}")),
        "{what}: expected `aisle; fwd=bypass; detail={detail}`, got Cache-Status {cs:?}"
    );
}

/// A recommendations body with the keyed fields given and some unkeyed ones.
fn rec_body(kind: &str, content: &str, city: &str, budget: &str, date: &str) -> String {
    format!(
        r#"{{"query":{{"type":"{kind}","content":"{content}"}},"weddingContext":{{"location":{{"city":"{city}"}},"budgetRange":"{budget}","weddingDate":"{date}","guestCount":120}},"sessionId":"s-1"}}"#
    )
}

async fn admin_stats(gw: &Gateway) -> Value {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = fetch(
        gw.client(),
        "GET",
        &gw.admin_url("/admin/stats"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200, "GET /admin/stats: {}", r.text());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/admin/stats {:?} is not JSON: {e}", r.text()))
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn field_order_whitespace_and_unkeyed_fields_share_an_entry() {
    let (origin, gw) = setup().await;

    // body./pointer rule: order, whitespace and fields outside `vary` do not matter.
    let first = post_json(
        &gw,
        REC,
        &[],
        rec_body(
            "photographer",
            "garden wedding",
            "Austin, TX",
            "5000-8000",
            "2027-07-14",
        ),
    )
    .await;
    assert_stored_miss(&first, "first recommendations POST");
    let key = key_of(&first, "first recommendations POST");
    let variants = [
        (
            "keys reordered",
            r#"{"sessionId":"s-1","weddingContext":{"weddingDate":"2027-07-14","guestCount":120,"budgetRange":"5000-8000","location":{"city":"Austin, TX"}},"query":{"content":"garden wedding","type":"photographer"}}"#,
        ),
        (
            "pretty-printed",
            "{\n  \"query\" : {\n    \"type\" : \"photographer\",\n    \"content\" : \"garden wedding\"\n  },\n  \"weddingContext\" : {\n    \"location\" : { \"city\" : \"Austin, TX\" },\n    \"budgetRange\" : \"5000-8000\",\n    \"weddingDate\" : \"2027-07-14\",\n    \"guestCount\" : 120\n  },\n  \"sessionId\" : \"s-1\"\n}\n",
        ),
        (
            "unkeyed fields changed or missing",
            r#"{"query":{"type":"photographer","content":"garden wedding","page":3},"weddingContext":{"location":{"city":"Austin, TX","zip":"78701"},"budgetRange":"5000-8000","weddingDate":"2027-07-14","guestCount":300},"sessionId":"other","trace":[1,2,3]}"#,
        ),
    ];
    for (what, body) in variants {
        let r = post_json(&gw, REC, &[], body).await;
        assert_hit(&r, what);
        assert_eq!(r.body, first.body, "{what}: the stored answer");
        assert_eq!(key_of(&r, what), key, "{what}: key=");
    }
    assert_eq!(origin.count(REC), 1, "every variant was served from cache");

    // body_key.all rule: order, whitespace and the ignored pointers do not matter.
    let chat = r#"{"model":"m-1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello"}],"temperature":0.5,"user":"alice","metadata":{"trace":"t-1"}}"#;
    let first = post_json(&gw, CHAT, &[], chat).await;
    assert_stored_miss(&first, "first chat POST");
    let chat_key = key_of(&first, "first chat POST");
    assert_ne!(chat_key, key, "two rules, two keys");
    let variants = [
        (
            "chat keys reordered, whitespace",
            "{ \"temperature\": 0.5,\n \"messages\": [ {\"content\": \"be brief\", \"role\": \"system\"}, {\"content\": \"hello\", \"role\": \"user\"} ],\n \"metadata\": {\"trace\": \"t-1\"}, \"user\": \"alice\", \"model\": \"m-1\" }",
        ),
        (
            "chat ignored fields changed",
            r#"{"model":"m-1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello"}],"temperature":0.5,"user":"bob","metadata":{"trace":"t-2","x":1},"stream_options":{"include_usage":true}}"#,
        ),
        (
            "chat ignored fields absent",
            r#"{"model":"m-1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello"}],"temperature":0.5}"#,
        ),
    ];
    for (what, body) in variants {
        let r = post_json(&gw, CHAT, &[], body).await;
        assert_hit(&r, what);
        assert_eq!(r.body, first.body, "{what}: the stored answer");
        assert_eq!(key_of(&r, what), chat_key, "{what}: key=");
    }
    assert_eq!(
        origin.count(CHAT),
        1,
        "every chat variant was served from cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_keyed_field_is_a_separate_entry() {
    let (origin, gw) = setup().await;
    let base = rec_body(
        "photographer",
        "garden wedding",
        "Austin, TX",
        "5000-8000",
        "2027-07-14",
    );
    let first = post_json(&gw, REC, &[], base.clone()).await;
    assert_stored_miss(&first, "base body");
    let mut keys = vec![key_of(&first, "base body")];

    let changed = [
        (
            "query.type",
            rec_body(
                "florist",
                "garden wedding",
                "Austin, TX",
                "5000-8000",
                "2027-07-14",
            ),
        ),
        (
            "query.content",
            rec_body(
                "photographer",
                "beach wedding",
                "Austin, TX",
                "5000-8000",
                "2027-07-14",
            ),
        ),
        (
            "city (another market)",
            rec_body(
                "photographer",
                "garden wedding",
                "Seattle, WA",
                "5000-8000",
                "2027-07-14",
            ),
        ),
        (
            "budgetRange",
            rec_body(
                "photographer",
                "garden wedding",
                "Austin, TX",
                "8000-12000",
                "2027-07-14",
            ),
        ),
        (
            "weddingDate (another season)",
            rec_body(
                "photographer",
                "garden wedding",
                "Austin, TX",
                "5000-8000",
                "2027-12-20",
            ),
        ),
    ];
    for (i, (what, body)) in changed.iter().enumerate() {
        let r = post_json(&gw, REC, &[], body.clone()).await;
        assert_stored_miss(&r, what);
        assert_eq!(origin.count(REC), i + 2, "{what}: must reach the origin");
        let k = key_of(&r, what);
        assert!(
            !keys.contains(&k),
            "{what}: key= {k} equals an earlier key {keys:?}"
        );
        keys.push(k);
        // The same changed body again: its own entry, same key.
        let again = post_json(&gw, REC, &[], body.clone()).await;
        assert_hit(&again, &format!("{what}, again"));
        assert_eq!(again.body, r.body, "{what}, again: body");
        assert_eq!(key_of(&again, what), keys[i + 1], "{what}, again: key=");
    }

    // body_key.all: any field outside `ignore` is part of the key.
    let chat = |model: &str, content: &str, temp: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"{content}"}}],"temperature":{temp}}}"#
        )
    };
    let a = post_json(&gw, CHAT, &[], chat("m-1", "hello", "0.5")).await;
    assert_stored_miss(&a, "chat base");
    let mut chat_keys = vec![key_of(&a, "chat base")];
    for (i, (what, body)) in [
        ("chat model", chat("m-2", "hello", "0.5")),
        ("chat message", chat("m-1", "hello!", "0.5")),
        ("chat temperature", chat("m-1", "hello", "0.7")),
        (
            "chat extra top-level field",
            r#"{"model":"m-1","messages":[{"role":"user","content":"hello"}],"temperature":0.5,"n":2}"#.to_string(),
        ),
        (
            "chat message order",
            r#"{"model":"m-1","messages":[{"role":"user","content":"hello"},{"role":"user","content":"x"}],"temperature":0.5}"#.to_string(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = post_json(&gw, CHAT, &[], body).await;
        assert_stored_miss(&r, what);
        assert_eq!(origin.count(CHAT), i + 2, "{what}: must reach the origin");
        let k = key_of(&r, what);
        assert!(!chat_keys.contains(&k), "{what}: key= {k} equals an earlier key {chat_keys:?}");
        chat_keys.push(k);
    }
}

/// A miss for one body must not evict what other bodies of the same rule
/// (same URI) stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_miss_for_another_body_keeps_earlier_entries() {
    let (origin, gw) = setup().await;
    let a = rec_body(
        "photographer",
        "garden",
        "Austin, TX",
        "5000-8000",
        "2027-07-14",
    );
    let b = rec_body("florist", "garden", "Austin, TX", "5000-8000", "2027-07-14");
    let ra = post_json(&gw, REC, &[], a.clone()).await;
    assert_stored_miss(&ra, "A");
    assert_hit(
        &post_json(&gw, REC, &[], a.clone()).await,
        "A again, before B",
    );
    let rb = post_json(&gw, REC, &[], b.clone()).await;
    assert_stored_miss(&rb, "B");
    assert_eq!(origin.count(REC), 2);

    let ra2 = post_json(&gw, REC, &[], a).await;
    assert_hit(&ra2, "A after a miss for B (B's POST must not evict A)");
    assert_eq!(ra2.body, ra.body);
    let rb2 = post_json(&gw, REC, &[], b).await;
    assert_hit(&rb2, "B again");
    assert_eq!(rb2.body, rb.body);
    assert_eq!(origin.count(REC), 2, "A and B each reached the origin once");

    let c1 = r#"{"model":"m","messages":[{"role":"user","content":"one"}]}"#;
    let c2 = r#"{"model":"m","messages":[{"role":"user","content":"two"}]}"#;
    assert_stored_miss(&post_json(&gw, CHAT, &[], c1).await, "chat one");
    assert_stored_miss(&post_json(&gw, CHAT, &[], c2).await, "chat two");
    assert_hit(
        &post_json(&gw, CHAT, &[], c1).await,
        "chat one after chat two",
    );
    assert_eq!(origin.count(CHAT), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn equal_numbers_share_an_entry() {
    let (origin, gw) = setup().await;
    let first = post_json(
        &gw,
        CHAT,
        &[],
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1,"max_tokens":100,"top_p":0.5}"#,
    )
    .await;
    assert_stored_miss(&first, "integers");
    let key = key_of(&first, "integers");
    for (what, body) in [
        (
            "1.0 for 1",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1.0,"max_tokens":100,"top_p":0.5}"#,
        ),
        (
            "1e2 for 100, 5e-1 for 0.5",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1,"max_tokens":1e2,"top_p":5e-1}"#,
        ),
        (
            "1.00 and 100.0",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1.00,"max_tokens":100.0,"top_p":0.50}"#,
        ),
    ] {
        let r = post_json(&gw, CHAT, &[], body).await;
        assert_hit(&r, what);
        assert_eq!(key_of(&r, what), key, "{what}: key=");
        assert_eq!(r.body, first.body, "{what}: body");
    }
    assert_eq!(origin.count(CHAT), 1);

    // A different number is a different key.
    let r = post_json(
        &gw,
        CHAT,
        &[],
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1.5,"max_tokens":100,"top_p":0.5}"#,
    )
    .await;
    assert_stored_miss(&r, "temperature 1.5");
    assert_ne!(key_of(&r, "temperature 1.5"), key);

    // A number at a vary pointer is compared in canonical form too.
    let body = |budget: &str| {
        format!(
            r#"{{"query":{{"type":"dj","content":"x"}},"weddingContext":{{"location":{{"city":"Austin, TX"}},"budgetRange":{budget},"weddingDate":"2027-07-14"}}}}"#
        )
    };
    let a = post_json(&gw, REC, &[], body("5000")).await;
    assert_stored_miss(&a, "budgetRange 5000");
    let b = post_json(&gw, REC, &[], body("5000.0")).await;
    assert_hit(&b, "budgetRange 5000.0");
    assert_eq!(key_of(&b, "5000.0"), key_of(&a, "5000"));
    assert_eq!(origin.count(REC), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn normalizers_on_body_fields_share_an_entry() {
    let (origin, gw) = setup().await;
    let first = post_json(
        &gw,
        REC,
        &[],
        rec_body(
            "photographer",
            "Best photographers for a garden wedding",
            "New York",
            "5000-8000",
            "2027-07-14",
        ),
    )
    .await;
    assert_stored_miss(&first, "New York, July");
    let key = key_of(&first, "New York, July");
    for (what, body) in [
        // market table: brooklyn -> nyc, case-insensitive
        (
            "Brooklyn",
            rec_body(
                "photographer",
                "Best photographers for a garden wedding",
                "Brooklyn",
                "5000-8000",
                "2027-07-14",
            ),
        ),
        (
            "NEW YORK",
            rec_body(
                "photographer",
                "Best photographers for a garden wedding",
                "NEW YORK",
                "5000-8000",
                "2027-07-14",
            ),
        ),
        // season: June..August = summer
        (
            "2027-08-30",
            rec_body(
                "photographer",
                "Best photographers for a garden wedding",
                "New York",
                "5000-8000",
                "2027-08-30",
            ),
        ),
        (
            "2031-06-01",
            rec_body(
                "photographer",
                "Best photographers for a garden wedding",
                "New York",
                "5000-8000",
                "2031-06-01",
            ),
        ),
        // text: case-folded, whitespace collapsed, trimmed
        (
            "content re-spaced and re-cased",
            rec_body(
                "photographer",
                "  best   PHOTOGRAPHERS for a\\tgarden wedding ",
                "Brooklyn",
                "5000-8000",
                "2027-07-01",
            ),
        ),
    ] {
        let r = post_json(&gw, REC, &[], body).await;
        assert_hit(&r, what);
        assert_eq!(key_of(&r, what), key, "{what}: key=");
        assert_eq!(r.body, first.body, "{what}: body");
    }
    assert_eq!(
        origin.count(REC),
        1,
        "all normalized variants share one entry"
    );

    // The state fallback: "Austin, TX" and "Dallas, TX" are market "tx".
    let austin = post_json(
        &gw,
        REC,
        &[],
        rec_body("dj", "x", "Austin, TX", "1", "2027-01-10"),
    )
    .await;
    assert_stored_miss(&austin, "Austin, TX");
    let dallas = post_json(
        &gw,
        REC,
        &[],
        rec_body("dj", "x", "Dallas, TX", "1", "2027-02-10"),
    )
    .await;
    assert_hit(&dallas, "Dallas, TX in winter");
    assert_eq!(key_of(&dallas, "Dallas"), key_of(&austin, "Austin"));
    assert_eq!(origin.count(REC), 2);

    // Different normalized values are different entries.
    let fall = post_json(
        &gw,
        REC,
        &[],
        rec_body("dj", "x", "Austin, TX", "1", "2027-10-10"),
    )
    .await;
    assert_stored_miss(&fall, "another season (fall)");
    let ca = post_json(
        &gw,
        REC,
        &[],
        rec_body("dj", "x", "Austin, CA", "1", "2027-01-10"),
    )
    .await;
    assert_stored_miss(&ca, "another market (ca)");
    let words = post_json(
        &gw,
        REC,
        &[],
        rec_body("dj", "x y", "Austin, TX", "1", "2027-01-10"),
    )
    .await;
    assert_stored_miss(&words, "another text");
    assert_eq!(origin.count(REC), 5);
}

// ---------------------------------------------------------------------------
// The body on the wire
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_body_is_forwarded_byte_identical_on_a_miss() {
    let (origin, gw) = setup().await;
    // Whitespace, escapes, a non-ASCII character, number forms and a trailing
    // newline: nothing of it may be re-serialised on the way.
    let body = "{ \"query\":{\"type\" :\"photographer\",\t\"content\":\"caf\\u00e9 \u{1F338} \\\"garden\\\"\"},\r\n  \"weddingContext\":{\"location\":{\"city\":\"New York\"},\"budgetRange\":5000.0,\"weddingDate\":\"2027-07-14\",\"guestCount\":1.20e2},\"sessionId\":\"s\"}\n";
    let r = post_json(&gw, REC, &[("x-trace", "t-1")], body).await;
    assert_stored_miss(&r, "miss");
    let seen = origin.requests_for(REC);
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.method, "POST");
    assert_eq!(
        got.body,
        body.as_bytes(),
        "origin body {:?} differs from what was sent",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(got.header("content-length"), Some(body.len().to_string()));
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(got.header("x-trace").as_deref(), Some("t-1"));

    // The same for the whole-body rule, with a 64 KiB body exactly (the largest
    // that is keyed).
    let head = r#"{"model":"m","messages":[{"role":"user","content":""#;
    let tail = "\"}]}";
    let pad = 64 * 1024 - head.len() - tail.len();
    let big = format!(
        "{head}{}{tail}",
        "a b ".repeat(pad / 4) + &"z".repeat(pad % 4)
    );
    assert_eq!(big.len(), 64 * 1024);
    let r = post_json(&gw, CHAT, &[], big.clone()).await;
    assert_stored_miss(&r, "64 KiB body");
    let seen = origin.requests_for(CHAT);
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].body == big.as_bytes(),
        "64 KiB body changed on the way"
    );
    assert_hit(&post_json(&gw, CHAT, &[], big).await, "64 KiB body again");
    assert_eq!(origin.count(CHAT), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn unkeyable_bodies_bypass_and_reach_the_origin_untouched() {
    let (origin, gw) = setup().await;
    let mut expected_origin = 0;

    // Not JSON by Content-Type.
    let text = b"query=photographer&city=austin \x00\xff".to_vec();
    for i in 0..2 {
        let r = post(
            gw.client(),
            &gw.url(REC),
            &[("content-type", "text/plain")],
            text.clone(),
        )
        .await;
        assert_eq!(r.status, 200, "text/plain #{i}");
        assert_bypass(&r, "not-json", &format!("text/plain #{i}"));
        expected_origin += 1;
        assert_eq!(
            origin.count(REC),
            expected_origin,
            "text/plain #{i} reached the origin"
        );
        let got = origin.requests_for(REC).pop().unwrap();
        assert_eq!(got.body, text, "text/plain #{i}: body");
        assert_eq!(got.header("content-type").as_deref(), Some("text/plain"));
    }

    // JSON Content-Type, but not JSON.
    let broken = r#"{"query": {"type": "photographer""#;
    for i in 0..2 {
        let r = post_json(&gw, REC, &[], broken).await;
        assert_eq!(r.status, 200);
        assert_bypass(&r, "not-json", &format!("malformed JSON #{i}"));
        expected_origin += 1;
        assert_eq!(
            origin.count(REC),
            expected_origin,
            "malformed JSON #{i} reached the origin"
        );
        assert_eq!(
            origin.requests_for(REC).pop().unwrap().body,
            broken.as_bytes()
        );
    }

    // One byte over 64 KiB.
    let head = r#"{"query":{"type":"big","content":""#;
    let tail = "\"}}";
    let big = format!(
        "{head}{}{tail}",
        "x".repeat(64 * 1024 + 1 - head.len() - tail.len())
    );
    assert_eq!(big.len(), 64 * 1024 + 1);
    for i in 0..2 {
        let r = post_json(&gw, REC, &[], big.clone()).await;
        assert_eq!(r.status, 200);
        assert_bypass(&r, "body-too-large", &format!("64 KiB + 1 #{i}"));
        expected_origin += 1;
        assert_eq!(
            origin.count(REC),
            expected_origin,
            "64 KiB + 1 #{i} reached the origin"
        );
        let got = origin.requests_for(REC).pop().unwrap();
        assert!(
            got.body == big.as_bytes(),
            "64 KiB + 1 #{i}: body changed ({} bytes)",
            got.body.len()
        );
    }

    // Chunked (no Content-Length): sent by hand.
    let part1 = r#"{"query":{"type":"chunked","#;
    let part2 = r#""content":"x"}}"#;
    for i in 0..2 {
        let request = format!(
            "POST {REC} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{part1}\r\n{:x}\r\n{part2}\r\n0\r\n\r\n",
            part1.len(),
            part2.len()
        );
        let r = raw_request(gw.listen(), request.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(
            r.status,
            200,
            "chunked #{i}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let cs = r.header("cache-status").unwrap_or("").to_string();
        assert!(
            cs.starts_with("aisle; fwd=bypass") && cs.contains("detail=body-length-unknown"),
            "chunked #{i}: expected `aisle; fwd=bypass; detail=body-length-unknown`, got {cs:?}"
        );
        expected_origin += 1;
        assert_eq!(
            origin.count(REC),
            expected_origin,
            "chunked #{i} reached the origin"
        );
        let got = origin.requests_for(REC).pop().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got.body),
            format!("{part1}{part2}"),
            "chunked #{i}: body"
        );
    }

    gw.wait_metric(
        "aisle_requests_total",
        &[("rule", RULE), ("cache_status", "bypass")],
        "== 8",
        |v| v == 8.0,
    )
    .await;
    let stats = admin_stats(&gw).await;
    let rule = &stats["rules"][RULE];
    assert_eq!(rule["bypass"], 8, "/admin/stats: {stats}");
    assert_eq!(rule["hits"], 0, "/admin/stats: {stats}");
    assert_eq!(rule["bytes_stored"], 0, "/admin/stats: {stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn error_answers_are_never_stored() {
    let (origin, gw) = setup().await;
    let mut expected = 0;
    for status in [400u16, 404, 429, 500, 503] {
        let body = rec_body(
            &format!("status-{status}"),
            "x",
            "Austin, TX",
            "1",
            "2027-07-14",
        );
        for i in 0..2 {
            let r = post_json(&gw, REC, &[], body.clone()).await;
            let cs = r.cache_status();
            assert_eq!(r.status, status, "#{i}: Cache-Status {cs:?}");
            assert!(
                !is_hit(&cs) && !cs.contains("stored"),
                "{status} #{i}: must be neither a hit nor stored, got Cache-Status {cs:?}"
            );
            expected += 1;
            assert_eq!(
                origin.count(REC),
                expected,
                "{status} #{i} must reach the origin"
            );
        }
    }
    // The same for the whole-body rule.
    let chat = r#"{"model":"status-500","messages":[]}"#;
    for i in 0..2 {
        let r = post_json(&gw, CHAT, &[], chat).await;
        assert_eq!(r.status, 500);
        assert!(
            !r.is_hit() && !r.cache_status().contains("stored"),
            "chat 500 #{i}: {}",
            r.cache_status()
        );
        assert_eq!(origin.count(CHAT), i + 1);
    }
    // A 2xx of the same rule is stored.
    let ok = rec_body("photographer", "x", "Austin, TX", "1", "2027-07-14");
    assert_stored_miss(&post_json(&gw, REC, &[], ok.clone()).await, "200");
    assert_hit(&post_json(&gw, REC, &[], ok).await, "200 again");
    assert_eq!(origin.count(REC), expected + 1);
}

// ---------------------------------------------------------------------------
// Per-request controls
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn no_cache_refreshes_and_stores() {
    let (origin, gw) = setup().await;
    let body = rec_body("photographer", "no-cache", "Austin, TX", "1", "2027-07-14");
    let first = post_json(&gw, REC, &[], body.clone()).await;
    assert_stored_miss(&first, "first");
    assert_eq!(fill_number(&first), 1);
    assert_hit(&post_json(&gw, REC, &[], body.clone()).await, "second");

    let refreshed = post_json(&gw, REC, &[("cache-control", "no-cache")], body.clone()).await;
    let cs = refreshed.cache_status();
    assert!(
        !is_hit(&cs) && cs.contains("stored"),
        "no-cache: expected a stored refresh, got {cs:?}"
    );
    assert_eq!(origin.count(REC), 2, "no-cache must reach the origin");
    assert_eq!(fill_number(&refreshed), 2);

    let after = post_json(&gw, REC, &[], body).await;
    assert_hit(&after, "after the refresh");
    assert_eq!(
        after.body, refreshed.body,
        "later requests get the refreshed answer"
    );
    assert_eq!(origin.count(REC), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_store_bypasses() {
    let (origin, gw) = setup().await;
    // Cold: answered by the origin, not stored.
    let body = rec_body("photographer", "no-store", "Austin, TX", "1", "2027-07-14");
    let r = post_json(&gw, REC, &[("cache-control", "no-store")], body.clone()).await;
    assert_eq!(r.status, 200);
    assert!(
        r.cache_status().starts_with("aisle; fwd=bypass") && !r.cache_status().contains("stored"),
        "no-store: {}",
        r.cache_status()
    );
    assert_eq!(origin.count(REC), 1);
    let next = post_json(&gw, REC, &[], body.clone()).await;
    assert_stored_miss(&next, "after a no-store request nothing was stored");
    assert_eq!(origin.count(REC), 2);
    assert_eq!(fill_number(&next), 2);

    // Warm: no-store still goes to the origin and leaves the entry alone.
    let r = post_json(&gw, REC, &[("cache-control", "no-store")], body.clone()).await;
    assert!(
        r.cache_status().starts_with("aisle; fwd=bypass"),
        "warm no-store: {}",
        r.cache_status()
    );
    assert_eq!(origin.count(REC), 3);
    assert_eq!(fill_number(&r), 3);
    let hit = post_json(&gw, REC, &[], body).await;
    assert_hit(&hit, "after a warm no-store");
    assert_eq!(fill_number(&hit), 2, "the stored entry is unchanged");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_refuses_older_entries() {
    let (origin, gw) = setup().await;
    let body = rec_body("photographer", "max-age", "Austin, TX", "1", "2027-07-14");
    let first = post_json(&gw, REC, &[], body.clone()).await;
    assert_stored_miss(&first, "first");
    let young = post_json(&gw, REC, &[("cache-control", "max-age=600")], body.clone()).await;
    assert_hit(&young, "max-age=600 on a young entry");

    // Wait (polling) until the entry is at least 2 s old.
    poll_until(Duration::from_secs(10), "the entry's Age >= 2", || {
        let body = body.clone();
        let gw = &gw;
        async move {
            let r = post_json(gw, REC, &[], body).await;
            assert_hit(&r, "polling the entry's age");
            r.age().filter(|a| *a >= 2).map(|_| ())
        }
    })
    .await;
    assert_eq!(origin.count(REC), 1);

    let r = post_json(&gw, REC, &[("cache-control", "max-age=1")], body.clone()).await;
    assert_eq!(r.status, 200);
    assert!(
        !r.is_hit(),
        "max-age=1 on an entry >= 2 s old: {}",
        r.cache_status()
    );
    assert_eq!(origin.count(REC), 2, "max-age=1 must reach the origin");
    assert_eq!(fill_number(&r), 2);

    let r = post_json(&gw, REC, &[("cache-control", "max-age=600")], body).await;
    assert_hit(&r, "max-age=600 after the refresh");
    assert_eq!(fill_number(&r), 2, "the refreshed answer was stored");
    assert_eq!(origin.count(REC), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn aisle_cache_ttl_only_shortens() {
    let (origin, gw) = setup().await;
    let cases = [
        ("5m", 290, 300),
        ("90", 80, 90),
        // Longer than the rule's 10m: the rule wins.
        ("2h", 590, 600),
        ("86400", 590, 600),
    ];
    for (i, (ttl, lo, hi)) in cases.into_iter().enumerate() {
        let body = rec_body(
            "photographer",
            &format!("ttl {ttl}"),
            "Austin, TX",
            "1",
            "2027-07-14",
        );
        let r = post_json(&gw, REC, &[("aisle-cache-ttl", ttl)], body.clone()).await;
        assert_stored_miss(&r, &format!("Aisle-Cache-TTL: {ttl}"));
        assert_eq!(origin.count(REC), i + 1);
        let hit = post_json(&gw, REC, &[], body).await;
        assert_hit(&hit, &format!("after Aisle-Cache-TTL: {ttl}"));
        let left = hit.ttl().unwrap();
        assert!(
            (lo..=hi).contains(&left),
            "Aisle-Cache-TTL: {ttl}: ttl={left}, expected {lo}..={hi} (Cache-Status {:?})",
            hit.cache_status()
        );
    }
    // Without the header: the rule's 10m.
    let body = rec_body("photographer", "no header", "Austin, TX", "1", "2027-07-14");
    post_json(&gw, REC, &[], body.clone()).await;
    let left = post_json(&gw, REC, &[], body).await.ttl().unwrap();
    assert!((590..=600).contains(&left), "rule ttl: {left}");

    // A 1 s lifetime really ends.
    let body = rec_body("photographer", "ttl 1s", "Austin, TX", "1", "2027-07-14");
    let before = origin.count(REC);
    assert_stored_miss(
        &post_json(&gw, REC, &[("aisle-cache-ttl", "1s")], body.clone()).await,
        "1s",
    );
    poll_until(Duration::from_secs(10), "the 1 s entry to expire", || {
        let body = body.clone();
        let gw = &gw;
        async move { (!post_json(gw, REC, &[], body).await.is_hit()).then_some(()) }
    })
    .await;
    assert_eq!(
        origin.count(REC),
        before + 2,
        "expired entry refetched once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_are_separate_key_spaces() {
    let (origin, gw) = setup().await;
    let body = rec_body("photographer", "ns", "Austin, TX", "1", "2027-07-14");
    let plain = post_json(&gw, REC, &[], body.clone()).await;
    assert_stored_miss(&plain, "no namespace");
    let k0 = key_of(&plain, "no namespace");

    let a = post_json(
        &gw,
        REC,
        &[("aisle-cache-namespace", "tenant-a")],
        body.clone(),
    )
    .await;
    assert_stored_miss(&a, "tenant-a");
    let ka = key_of(&a, "tenant-a");
    assert_ne!(ka, k0);
    assert_eq!(origin.count(REC), 2);
    assert_eq!(fill_number(&a), 2);

    let b = post_json(
        &gw,
        REC,
        &[("aisle-cache-namespace", "tenant-b")],
        body.clone(),
    )
    .await;
    assert_stored_miss(&b, "tenant-b");
    let kb = key_of(&b, "tenant-b");
    assert!(kb != ka && kb != k0, "tenant-b key {kb} vs {ka}, {k0}");
    assert_eq!(origin.count(REC), 3);

    let a2 = post_json(
        &gw,
        REC,
        &[("aisle-cache-namespace", "tenant-a")],
        body.clone(),
    )
    .await;
    assert_hit(&a2, "tenant-a again");
    assert_eq!(key_of(&a2, "tenant-a again"), ka);
    assert_eq!(fill_number(&a2), 2);
    let p2 = post_json(&gw, REC, &[], body).await;
    assert_hit(&p2, "no namespace again");
    assert_eq!(key_of(&p2, "no namespace again"), k0);
    assert_eq!(fill_number(&p2), 1);
    assert_eq!(origin.count(REC), 3);
}

// ---------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------

async fn twenty_concurrent(origin: &Origin, gws: &[&Gateway], body: &str) {
    let futs = (0..20).map(|i| post_json(gws[i % gws.len()], REC, &[], body.to_string()));
    let results = futures_util::future::join_all(futs).await;
    let statuses: Vec<String> = results.iter().map(Resp::cache_status).collect();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.status,
            200,
            "request {i}: Cache-Status {:?}",
            r.cache_status()
        );
        assert_eq!(
            r.body, results[0].body,
            "request {i}: body (Cache-Status: {statuses:?})"
        );
    }
    assert_eq!(
        origin.count(REC),
        1,
        "20 identical concurrent POSTs reached the origin {} times (Cache-Status: {statuses:?})",
        origin.count(REC)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_posts_reach_the_origin_once() {
    let (origin, gw) = setup().await;
    let body = rec_body("slow", "coalesce", "Austin, TX", "1", "2027-07-14");
    twenty_concurrent(&origin, &[&gw], &body).await;
    assert_hit(&post_json(&gw, REC, &[], body).await, "afterwards");
    assert_eq!(origin.count(REC), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_posts_across_two_instances_reach_the_origin_once() {
    let redis = RedisServer::start();
    let origin = ai_origin();
    let section = redis.section("t-ai:");
    let (a, b) = tokio::join!(
        start_gateway(&origin, &section),
        start_gateway(&origin, &section)
    );
    wait_subscribed(&a, "A").await;
    wait_subscribed(&b, "B").await;
    let body = rec_body("slow", "fleet", "Austin, TX", "1", "2027-07-14");
    twenty_concurrent(&origin, &[&a, &b], &body).await;
    assert_eq!(origin.count(REC), 1);
}

// ---------------------------------------------------------------------------
// Savings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn savings_add_up_and_admin_stats_agree() {
    let (origin, gw) = setup().await;
    let a = rec_body("photographer", "savings a", "Austin, TX", "1", "2027-07-14");
    let b = rec_body("florist", "savings b", "Austin, TX", "1", "2027-07-14");
    // 2 misses + 5 hits, every answer carrying total_tokens = 150.
    let script = [
        (&a, false),
        (&a, true),
        (&a, true),
        (&b, false),
        (&b, true),
        (&b, true),
        (&b, true),
    ];
    for (i, (body, hit)) in script.iter().enumerate() {
        let r = post_json(&gw, REC, &[], (*body).clone()).await;
        if *hit {
            assert_hit(&r, &format!("step {i}"));
        } else {
            assert_stored_miss(&r, &format!("step {i}"));
        }
    }
    assert_eq!(origin.count(REC), 2);

    let labels = [("rule", RULE)];
    // Counted after each answer is sent: poll until all 7 are, then compare exactly.
    let text = poll_until(
        Duration::from_secs(10),
        "7 requests and 5 savings counted",
        || async {
            let m = gw.metrics().await;
            let requests = metric_value(&m, "aisle_requests_total", &labels).unwrap_or(0.0);
            let saved =
                metric_value(&m, "aisle_origin_requests_saved_total", &labels).unwrap_or(0.0);
            let tokens = metric_value(&m, "aisle_tokens_saved_total", &labels).unwrap_or(0.0);
            (requests >= 7.0 && saved >= 5.0 && tokens >= 750.0).then_some(m)
        },
    )
    .await;
    let get = |name: &str| {
        metric_value(&text, name, &labels)
            .unwrap_or_else(|| panic!("no {name}{{rule={RULE}}} in\n{text}"))
    };
    assert_eq!(get("aisle_requests_total"), 7.0);
    assert_eq!(get("aisle_origin_requests_saved_total"), 5.0);
    assert_eq!(get("aisle_tokens_saved_total"), 750.0);
    let cost = get("aisle_cost_saved_total");
    assert!(
        (cost - 0.0175).abs() < 1e-9,
        "aisle_cost_saved_total = {cost}, expected 5 * (0.002 + 0.0015) = 0.0175"
    );
    assert_eq!(
        metric_value(
            &text,
            "aisle_requests_total",
            &[("rule", RULE), ("cache_status", "hit")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "aisle_requests_total",
            &[("rule", RULE), ("cache_status", "miss")]
        ),
        Some(2.0)
    );

    let stats = admin_stats(&gw).await;
    let s = &stats["rules"][RULE];
    assert_eq!(s["requests"], 7, "{stats}");
    assert_eq!(s["hits"], 5, "{stats}");
    assert_eq!(s["misses"], 2, "{stats}");
    assert_eq!(s["bypass"], 0, "{stats}");
    assert_eq!(s["origin_requests_saved"], 5, "{stats}");
    assert_eq!(s["tokens_saved"], 750, "{stats}");
    let ratio = s["hit_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("hit_ratio: {stats}"));
    assert!(
        (ratio - 5.0 / 7.0).abs() < 1e-9,
        "hit_ratio {ratio}: {stats}"
    );
    let cost = s["cost_saved"]
        .as_f64()
        .unwrap_or_else(|| panic!("cost_saved: {stats}"));
    assert!((cost - 0.0175).abs() < 1e-9, "cost_saved {cost}: {stats}");
    let stored = s["bytes_stored"]
        .as_u64()
        .unwrap_or_else(|| panic!("bytes_stored: {stats}"));
    assert!(stored > 0, "bytes_stored: {stats}");
    // The other rule saw nothing.
    assert_eq!(stats["rules"]["chat"]["requests"], 0, "{stats}");

    // /admin/stats needs the token.
    let r = fetch(gw.client(), "GET", &gw.admin_url("/admin/stats"), &[]).await;
    assert_eq!(r.status, 401, "/admin/stats without a token: {}", r.text());
    let r = fetch(
        gw.client(),
        "GET",
        &gw.admin_url("/admin/stats"),
        &[("authorization", "Bearer wrong-token-0123456789")],
    )
    .await;
    assert_eq!(
        r.status,
        401,
        "/admin/stats with a wrong token: {}",
        r.text()
    );
}
