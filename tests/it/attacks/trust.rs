//! Client trust (issue 9, items 4 to 7): what one client's request may change about what others
//! are served. Each case is what got through when the issue was filed, against the
//! framework-like origin (first JSON key wins, `X-Forwarded-Host` reflected in redirects and
//! links, `X-Original-URL` routed, the `aisle-*` headers it received listed).
//!
//! - a JSON body with a repeated key, or integers past 2^53, in a body-keyed request;
//! - a GET with a body the key ignores;
//! - forwarding headers from a client that is not a trusted proxy;
//! - `Aisle-*` control headers and `Cache-Control: no-cache` from any client.

use std::path::Path;

use std::time::Duration;

use serde_json::Value;

use crate::harness::hostile::framework_origin;
use crate::harness::*;

const RAW: Duration = Duration::from_secs(10);

const RULES: &str = r#"
[[rule]]
name = "chat"
match = { method = "POST", path = "/v1/chat" }
upstream = "api"
ttl = "1h"
body_key = { all = true, ignore = ["/user"] }

[[rule]]
name = "page"
match = { path = "/page/*" }
upstream = "api"
ttl = "1h"

[[rule]]
name = "tenant"
match = { path = "/tenant/*" }
upstream = "api"
ttl = "1h"
client_controls = true

[[rule]]
name = "paid"
match = { path = "/paid/*" }
upstream = "api"
ttl = "1h"
client_revalidation = "ignore"
"#;

/// A gateway in front of `origin` with `server` lines added to `[server]`.
async fn gateway(origin: &Origin, server: &str) -> Gateway {
    let config = config_for(&origin.url()).replace("[cache]", &format!("{server}\n[cache]"));
    Gateway::start(&config, &[("rules.toml", RULES)]).await
}

/// `GET path` on a raw connection (no redirects followed), with `extra` header lines.
async fn raw_get(gw: &Gateway, path: &str, extra: &str) -> RawResp {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}Connection: close\r\n\r\n",
        gw.listen()
    );
    raw_request(gw.listen(), request.as_bytes(), RAW).await
}

fn json(r: &Resp) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", r.text()))
}

fn bypassed(r: &Resp, detail: &str) -> bool {
    let cs = r.cache_status();
    cs.starts_with("aisle; fwd=bypass") && cs.contains(&format!("detail={detail}"))
}

async fn post(gw: &Gateway, path: &str, body: &str) -> Resp {
    fetch_with_body(
        gw.client(),
        "POST",
        &gw.url(path),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

// ---------------------------------------------------------------------------
// Item 4: the JSON body
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_json_key_does_not_poison_the_entry_of_its_last_value() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    // The origin answers for A (the first key); the key would have been B's (the last).
    let attack = post(&gw, "/v1/chat", r#"{"messages":["A"],"messages":["B"]}"#).await;
    assert_eq!(attack.status, 200);
    assert!(
        bypassed(&attack, "duplicate-key"),
        "{}",
        attack.cache_status()
    );
    assert_eq!(json(&attack)["body"]["messages"][0], "A");
    let victim = post(&gw, "/v1/chat", r#"{"messages":["B"]}"#).await;
    assert_stored_miss(&victim, "the victim's own question");
    assert_eq!(
        json(&victim)["body"]["messages"][0],
        "B",
        "the victim is answered for B"
    );
    // At any depth, in any object.
    let deep = post(
        &gw,
        "/v1/chat",
        r#"{"messages":[{"role":"user","content":"hi","role":"system"}]}"#,
    )
    .await;
    assert!(bypassed(&deep, "duplicate-key"), "{}", deep.cache_status());
    assert_eq!(origin.count("/v1/chat"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_past_2_pow_53_key_exactly() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    let a = post(&gw, "/v1/chat", r#"{"seed":9007199254740993}"#).await;
    assert_stored_miss(&a, "2^53 + 1");
    let b = post(&gw, "/v1/chat", r#"{"seed":9007199254740992}"#).await;
    assert_stored_miss(&b, "2^53 is another question");
    assert_eq!(json(&b)["body"]["seed"].as_u64(), Some(9007199254740992));
    assert_hit(
        &post(&gw, "/v1/chat", r#"{"seed":9007199254740993}"#).await,
        "2^53 + 1 again",
    );
    // Spelling does not matter for one value; `user` is not in the key.
    assert_hit(
        &post(
            &gw,
            "/v1/chat",
            r#"{ "user": "u2", "seed": 9007199254740992 }"#,
        )
        .await,
        "2^53 spelled otherwise",
    );
    // Beyond 64 bits the parsed value is a double: not keyable.
    let big = post(&gw, "/v1/chat", r#"{"seed":18446744073709551617}"#).await;
    assert!(
        bypassed(&big, "integer-too-large"),
        "{}",
        big.cache_status()
    );
    assert_eq!(origin.count("/v1/chat"), 3);
}

// ---------------------------------------------------------------------------
// Item 5: a GET with a body
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_is_forwarded_but_never_stored_or_answered_from_the_cache() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    let gw = &gw;
    let fat = |path: &'static str| {
        let url = gw.url(path);
        async move {
            fetch_with_body(
                gw.client(),
                "GET",
                &url,
                &[("content-type", "application/json")],
                r#"{"answer":"the attacker's"}"#,
            )
            .await
        }
    };
    let attack = fat("/page/fat").await;
    assert_eq!(attack.status, 200);
    assert!(
        bypassed(&attack, "body-on-get"),
        "{}",
        attack.cache_status()
    );
    assert_eq!(
        json(&attack)["body"]["answer"],
        "the attacker's",
        "forwarded with its body"
    );
    let victim = gw.get("/page/fat").await;
    assert_stored_miss(&victim, "the victim's GET without a body");
    assert_eq!(json(&victim)["body"], Value::Null);
    assert_hit(&gw.get("/page/fat").await, "a plain GET again");
    // A stored entry does not answer a GET with a body either.
    let again = fat("/page/fat").await;
    assert!(bypassed(&again, "body-on-get"), "{}", again.cache_status());
    assert_eq!(json(&again)["body"]["answer"], "the attacker's");
    assert_eq!(origin.count("/page/fat"), 3);
    // The default route too.
    assert!(bypassed(&fat("/elsewhere").await, "body-on-get"));
}

// ---------------------------------------------------------------------------
// Item 6: forwarding headers
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_clients_forwarding_headers_do_not_reach_the_origin() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    // The host the gateway forwards is the normalized one, without the port: what the key names.
    let host = gw.listen().ip().to_string();
    // A redirect built from X-Forwarded-Host would be stored for everyone.
    let attack = raw_get(
        &gw,
        "/page/home",
        "X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n",
    )
    .await;
    assert_eq!(attack.status, 301);
    let expected = format!("http://{host}/home");
    assert_eq!(attack.header("location"), Some(expected.as_str()));
    let victim = raw_get(&gw, "/page/home", "").await;
    assert_eq!(
        victim.header("location"),
        Some(expected.as_str()),
        "Cache-Status {:?}",
        victim.header("cache-status")
    );
    assert!(victim
        .header("cache-status")
        .unwrap_or("")
        .starts_with("aisle; hit"));
    // Routing headers and the rest.
    let r = gw
        .get_with(
            "/page/a",
            &[
                ("x-original-url", "/admin"),
                ("x-rewrite-url", "/admin"),
                ("forwarded", "for=10.9.9.9;host=evil.example;proto=https"),
                ("x-forwarded-for", "10.9.9.9"),
                ("x-real-ip", "10.9.9.9"),
            ],
        )
        .await;
    assert_stored_miss(&r, "a request with forwarding headers");
    let answer = json(&r);
    assert_eq!(answer["routed"], "/page/a");
    assert_eq!(answer["link"], format!("http://{host}/next"));
    let seen = &origin.requests_for("/page/a")[0];
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some(host.clone()));
    assert_eq!(
        seen.header("forwarded"),
        Some(format!("for=127.0.0.1;host={host};proto=http"))
    );
    for gone in ["x-real-ip", "x-original-url", "x-rewrite-url"] {
        assert_eq!(seen.header(gone), None, "{gone}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_forwarding_headers_are_kept_and_extended() {
    let origin = framework_origin();
    let gw = gateway(&origin, "trusted_proxies = [\"127.0.0.1/32\"]").await;
    // The gateway's own view of the host is the normalized one (no port), as the key has it.
    let host = gw.listen().ip().to_string();
    let r = gw
        .get_with(
            "/page/proxied",
            &[
                ("x-forwarded-for", "192.0.2.7"),
                ("x-forwarded-host", "shop.example"),
                ("x-forwarded-proto", "https"),
                ("forwarded", "for=192.0.2.7;host=shop.example;proto=https"),
                ("x-original-url", "/page/original"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let answer = json(&r);
    assert_eq!(answer["link"], "https://shop.example/next");
    assert_eq!(answer["routed"], "/page/original");
    let seen = &origin.requests_for("/page/proxied")[0];
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("192.0.2.7, 127.0.0.1")
    );
    assert_eq!(
        seen.header("forwarded"),
        Some(format!(
            "for=192.0.2.7;host=shop.example;proto=https, for=127.0.0.1;host={host};proto=http"
        ))
    );
    // A proxy that sends none: the gateway's own view.
    gw.get("/page/direct").await;
    let seen = &origin.requests_for("/page/direct")[0];
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some(host));
}

// ---------------------------------------------------------------------------
// Item 7: client-controlled cache behaviour
// ---------------------------------------------------------------------------

fn aisle_headers(r: &Resp) -> Vec<Value> {
    json(r)["aisle_headers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_client_cannot_shorten_an_entry_or_pick_a_key_space() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    // Aisle-Cache-TTL: 0 would have expired the shared entry at once.
    let attack = gw
        .get_with(
            "/page/ttl",
            &[("aisle-cache-ttl", "0"), ("aisle-future-control", "1")],
        )
        .await;
    assert_stored_miss(&attack, "the attacker's fill");
    assert!(
        aisle_headers(&attack).is_empty(),
        "Aisle-* headers never reach the origin: {:?}",
        aisle_headers(&attack)
    );
    let victim = gw.get("/page/ttl").await;
    assert_hit(&victim, "the victim's request");
    assert!(victim.ttl().unwrap() > 3000, "{}", victim.cache_status());
    assert_eq!(origin.count("/page/ttl"), 1);
    // Aisle-Cache-Namespace would have read (or filled) another tenant's entries.
    let tenant = gw
        .get_with("/page/ttl", &[("aisle-cache-namespace", "tenant-a")])
        .await;
    assert_hit(
        &tenant,
        "a namespace from an untrusted client is not a key space",
    );
    // A rule with client_controls = true honours them from anyone.
    assert_stored_miss(&gw.get("/tenant/x").await, "plain");
    let own = gw
        .get_with("/tenant/x", &[("aisle-cache-namespace", "tenant-a")])
        .await;
    assert_stored_miss(&own, "client_controls: the namespace is a key space");
    assert!(aisle_headers(&own).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_clients_control_the_cache_directly_or_through_a_trusted_proxy() {
    let origin = framework_origin();
    let gw = gateway(&origin, "trusted_clients = [\"127.0.0.1/32\"]").await;
    let r = gw
        .get_with("/page/short", &[("aisle-cache-ttl", "60")])
        .await;
    assert_stored_miss(&r, "a trusted client's fill");
    assert!(aisle_headers(&r).is_empty());
    let left = gw.get("/page/short").await.ttl().unwrap();
    assert!((50..=60).contains(&left), "ttl={left}");
    drop(gw);

    let behind = gateway(
        &origin,
        "trusted_proxies = [\"127.0.0.1/32\"]\ntrusted_clients = [\"192.0.2.0/24\"]",
    )
    .await;
    assert_stored_miss(&behind.get("/page/ns").await, "plain");
    let untrusted = behind
        .get_with(
            "/page/ns",
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("aisle-cache-namespace", "t"),
            ],
        )
        .await;
    assert_hit(&untrusted, "a client the proxy names, not trusted");
    let spoofed = behind
        .get_with(
            "/page/ns",
            &[
                ("x-forwarded-for", "192.0.2.7, 198.51.100.1"),
                ("aisle-cache-namespace", "t"),
            ],
        )
        .await;
    assert_hit(
        &spoofed,
        "a trusted address left of the real client is not believed",
    );
    let trusted = behind
        .get_with(
            "/page/ns",
            &[
                ("x-forwarded-for", "192.0.2.7"),
                ("aisle-cache-namespace", "t"),
            ],
        )
        .await;
    assert_stored_miss(&trusted, "a trusted client behind a trusted proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_revalidation_ignore_keeps_paid_entries() {
    let origin = framework_origin();
    let gw = gateway(&origin, "").await;
    assert_stored_miss(&gw.get("/paid/forecast").await, "first");
    for h in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        assert_hit(
            &gw.get_with("/paid/forecast", &[h]).await,
            &format!("{h:?}"),
        );
    }
    assert_eq!(origin.count("/paid/forecast"), 1, "no paid refetch");
    // Rules that honour it (the default) still refetch.
    assert_stored_miss(&gw.get("/page/free").await, "first");
    let r = gw
        .get_with("/page/free", &[("cache-control", "no-cache")])
        .await;
    assert!(!r.is_hit(), "{}", r.cache_status());
    assert_eq!(origin.count("/page/free"), 2);
}

#[test]
fn the_shipped_paid_rules_ignore_client_revalidation() {
    use aisle::rules::ClientRevalidation;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = aisle::config::Config::load(&root.join("gateway.toml")).expect("shipped config");
    for name in ["ai-recommendations", "chat", "weather"] {
        let rule = config
            .rules
            .rules()
            .iter()
            .find(|r| &*r.name == name)
            .unwrap_or_else(|| panic!("shipped rule {name}"));
        assert_eq!(
            rule.client_revalidation,
            ClientRevalidation::Ignore,
            "{name}"
        );
        assert!(!rule.client_controls, "{name}");
    }
    assert!(config.trust.clients.is_empty() && config.trust.proxies.is_empty());
}
