//! Credentials and AI calls (issue 13): `[[rule]] authorization = "isolate"` shares an answer
//! only among callers presenting the same credential (`Authorization`, or the header named by
//! `credential_header`), and the credential itself is nowhere: not in `Cache-Status` keys, not
//! in the Redis records, not in the gateway's debug logs. `"share"` needs an upstream that sets
//! its own credential, which `aisle check` enforces with a position.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::redis::{connect, RedisServer, SharedRedis};
use crate::harness::*;

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";

/// Credentials the tests send: each must never be stored or logged.
const ALICE: &str = "sk-alice-4c1f0e9a7b2d4d1f";
const BOB: &str = "sk-bob-91e07d33a5c84f20";
const CAROL: &str = "sk-ant-carol-55aa7e0c19b3";

const RULES: &str = r#"
[[rule]]
name = "chat"
match = { method = "POST", path = "/v1/chat/completions" }
upstream = "ai"
ttl = "1h"
body_key = { all = true, ignore = ["/user"] }
authorization = "isolate"

[[rule]]
name = "anthropic-messages"
match = { method = "POST", path = "/v1/messages" }
upstream = "ai"
ttl = "1h"
body_key = { all = true }
vary = ["header.anthropic-version"]
authorization = "isolate"
credential_header = "x-api-key"
"#;

fn config(origin_url: &str, extra: &str) -> String {
    format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"
default_upstream = "ai"

[cache]
memory = "64MiB"
max_object = "8MiB"
rules_dir = "rules"
key_secret = "${{AISLE_KEY_SECRET}}"

[upstreams.ai]
url = "{origin_url}"
connect_timeout = "2s"
read_timeout = "10s"
{extra}"#
    )
}

/// An AI origin that answers with the request number per path (so every fill is told apart),
/// and no `Cache-Control` (as OpenAI's and Anthropic's APIs answer): only the rule's `ttl` and
/// `authorization` decide.
fn origin() -> Origin {
    Origin::start(|req| {
        OriginResponse::ok(format!(
            "{{\"path\":\"{}\",\"n\":{},\"usage\":{{\"total_tokens\":9}}}}",
            req.path, req.count
        ))
        .header("content-type", "application/json")
    })
}

async fn gateway(origin: &Origin, extra: &str) -> Gateway {
    Gateway::start_with_env(
        &config(&origin.url(), extra),
        &[("ai.toml", RULES)],
        &[
            ("AISLE_KEY_SECRET", "credentials-test-secret-0123456789"),
            ("AISLE_LOG", "debug"),
        ],
    )
    .await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

const QUESTION: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"Plan a June wedding"}]}"#;

fn key_of(r: &Resp, what: &str) -> String {
    cache_status_param(&r.cache_status(), "key")
        .unwrap_or_else(|| panic!("{what}: no key= in Cache-Status {:?}", r.cache_status()))
}

/// Every key and every value (of any type) in `redis`, as text.
fn redis_dump(redis: &RedisServer) -> String {
    let mut con = connect(&redis.url()).expect("connect to the test redis");
    let keys: Vec<Vec<u8>> = ::redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    let mut out = String::new();
    for key in keys {
        let kind: String = ::redis::cmd("TYPE").arg(&key).query(&mut con).unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![::redis::cmd("GET").arg(&key).query(&mut con).unwrap()],
            "hash" => ::redis::cmd("HGETALL").arg(&key).query(&mut con).unwrap(),
            "set" => ::redis::cmd("SMEMBERS").arg(&key).query(&mut con).unwrap(),
            "zset" => ::redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            "list" => ::redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            _ => Vec::new(),
        };
        out.push_str(&format!("{kind} {}\n", String::from_utf8_lossy(&key)));
        for v in values {
            out.push_str(&String::from_utf8_lossy(&v));
            out.push('\n');
        }
    }
    out
}

fn assert_absent(haystack: &str, what: &str) {
    for secret in [ALICE, BOB, CAROL] {
        assert!(
            !haystack.contains(secret),
            "the credential {secret:?} appears in {what}:\n{haystack}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn isolate_shares_per_credential_and_keeps_no_credential() {
    let redis = RedisServer::start();
    let origin = origin();
    let gw = gateway(&origin, &redis.section("t-cred:")).await;
    let alice = bearer(ALICE);
    let bob = bearer(BOB);
    let gw_ref = &gw;
    let ask = |auth: Option<String>| async move {
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        post_json(gw_ref, CHAT, &headers, QUESTION).await
    };

    let a1 = ask(Some(alice.clone())).await;
    assert_stored_miss(&a1, "alice's first question");
    let a2 = ask(Some(alice.clone())).await;
    assert_hit(&a2, "alice again, same API key");
    assert_eq!(a2.body, a1.body, "alice gets her own stored answer");
    let b1 = ask(Some(bob.clone())).await;
    assert_stored_miss(&b1, "bob, another API key, same question");
    assert_ne!(b1.body, a1.body, "bob's answer is fetched with bob's key");
    assert_hit(&ask(Some(bob.clone())).await, "bob again");
    assert_hit(&ask(Some(alice.clone())).await, "alice after bob");
    let anonymous = ask(None).await;
    assert_stored_miss(&anonymous, "no credential shares with no credential holder");
    assert_eq!(origin.count(CHAT), 3, "one fill per credential (and none)");
    let (ka, kb) = (key_of(&a1, "alice"), key_of(&b1, "bob"));
    assert_ne!(ka, kb, "different credentials, different keys");
    assert_eq!(ka, key_of(&a2, "alice's hit"));
    // The origin saw each caller's own credential.
    let seen: Vec<Option<String>> = origin
        .requests_for(CHAT)
        .iter()
        .map(|r| r.header("authorization"))
        .collect();
    assert_eq!(seen, vec![Some(alice.clone()), Some(bob.clone()), None]);

    // credential_header = "x-api-key" (Anthropic style).
    let carol = [("x-api-key", CAROL), ("anthropic-version", "2023-06-01")];
    assert_stored_miss(&post_json(&gw, MESSAGES, &carol, QUESTION).await, "carol");
    assert_hit(
        &post_json(&gw, MESSAGES, &carol, QUESTION).await,
        "carol again",
    );
    let other = [("x-api-key", ALICE), ("anthropic-version", "2023-06-01")];
    assert_stored_miss(
        &post_json(&gw, MESSAGES, &other, QUESTION).await,
        "another x-api-key",
    );
    assert_eq!(origin.count(MESSAGES), 2);

    // Every entry reached Redis (4 chat/messages fills); then nothing there names a credential.
    let dump = poll_until(Duration::from_secs(10), "5 entries in Redis", || async {
        let dump = redis_dump(&redis);
        let entries = redis.keys("t-cred:*").len();
        (dump.matches("\"n\":").count() >= 5 && entries > 0).then_some(dump)
    })
    .await;
    assert_absent(&dump, "the Redis records");
    let logs = gw.logs();
    assert!(
        logs.contains(&format!("key={}", &ka[..8])) || logs.contains(" key="),
        "the debug log shows keys (so this check can see one):\n{logs}"
    );
    assert_absent(&logs, "the gateway's debug log");
    for r in [&a1, &a2, &b1] {
        assert_absent(&r.cache_status(), "Cache-Status");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_credential_bypasses() {
    let origin = origin();
    let gw = gateway(&origin, "").await;
    let (alice, bob) = (bearer(ALICE), bearer(BOB));
    let both = [
        ("authorization", alice.as_str()),
        ("authorization", bob.as_str()),
    ];
    let r = post_json(&gw, CHAT, &both, QUESTION).await;
    assert!(
        r.cache_status().contains("fwd=bypass") && r.cache_status().contains("repeated-param"),
        "two Authorization headers: {}",
        r.cache_status()
    );
}

/// `aisle check` on `gateway` and one rules file; (exit code, output).
fn check(gateway: &str, rules: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, gateway).unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules").join("ai.toml"), rules).unwrap();
    let out = Command::new(crate::harness::aisle_bin())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .current_dir(Path::new("/"))
        .env("AISLE_KEY_SECRET", "credentials-test-secret-0123456789")
        .output()
        .expect("run aisle check");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_refuses_share_unless_the_upstream_sets_its_own_credential() {
    let share = r#"[[rule]]
name = "weather"
match = { path = "/v1/forecast" }
upstream = "ai"
authorization = "share"
"#;
    let plain = config("http://127.0.0.1:3000", "")
        .replace("{listen}", "127.0.0.1:18080")
        .replace("{admin}", "127.0.0.1:19090");
    let (code, out) = check(&plain, share);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("ai.toml:5:17: authorization = \"share\"") && out.contains("set_headers"),
        "the error names the place and the fix:\n{out}"
    );
    let credentialed = plain.replace(
        "read_timeout = \"10s\"",
        "read_timeout = \"10s\"\nset_headers = { \"x-api-key\" = \"vendor-key\" }",
    );
    let (code, out) = check(&credentialed, share);
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = check(
        &plain,
        "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nauthorization = \"private\"\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("ai.toml:4:17: authorization \"private\" is not known"),
        "{out}"
    );
    let (code, out) = check(
        &plain,
        "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\ncredential_header = \"x-api-key\"\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("ai.toml:4:21: credential_header") && out.contains("isolate"),
        "{out}"
    );
    let (code, out) = check(
        &plain.replace("${AISLE_KEY_SECRET}", "short"),
        "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nauthorization = \"isolate\"\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("gateway.toml:10:14: [cache] key_secret must be at least 16"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn share_serves_one_answer_whatever_the_credential() {
    let origin = origin();
    let rules = RULES.replace(
        "authorization = \"isolate\"\n\n[[rule]]",
        "authorization = \"share\"\n\n[[rule]]",
    );
    let gw = Gateway::start_with_env(
        &config(
            &origin.url(),
            "set_headers = { authorization = \"Bearer gateway-own-key\" }\n",
        ),
        &[("ai.toml", &rules)],
        &[("AISLE_KEY_SECRET", "credentials-test-secret-0123456789")],
    )
    .await;
    let (alice, bob) = (bearer(ALICE), bearer(BOB));
    assert_stored_miss(
        &post_json(&gw, CHAT, &[("authorization", &alice)], QUESTION).await,
        "alice",
    );
    assert_hit(
        &post_json(&gw, CHAT, &[("authorization", &bob)], QUESTION).await,
        "bob shares alice's answer",
    );
    assert_eq!(origin.count(CHAT), 1);
}
