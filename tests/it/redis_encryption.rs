//! `encrypt = true` rules: entries are sealed with AES-256-GCM in Redis,
//! readable by instances holding the key (current or previous), and a miss
//! (never an error) everywhere else. Keys reach the gateways through
//! environment variables, as `${VAR}` in gateway.toml.

use std::collections::HashSet;
use std::io::Read;
use std::process::Command;

use crate::harness::fixtures;
use crate::harness::redis::*;
use crate::harness::*;
use base64::Engine;

const PLAINTEXT: &str = "TOP-SECRET-PLAINTEXT";

fn origin() -> Origin {
    Origin::start(|req| {
        OriginResponse::ok(format!(
            "{PLAINTEXT} {} #{} card=4111111111111111",
            req.path, req.count
        ))
    })
}

/// 32 random bytes, base64.
fn random_key() -> String {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("read /dev/urandom");
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn unusable(gw: &Gateway, reason: Option<&str>) -> f64 {
    let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
    gw.metric("aisle_redis_unusable_entries_total", &labels)
        .await
        .unwrap_or(0.0)
}

async fn redis_hits(gw: &Gateway) -> f64 {
    gw.metric("aisle_tier_hits_total", &[("tier", "redis")])
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_entries_are_sealed_shared_and_rotatable() {
    let redis = RedisServer::start();
    let origin = origin();
    let prefix = "t-enc:";
    let (k1, k2) = (random_key(), random_key());
    assert_ne!(k1, k2);
    let env = [
        ("AISLE_TEST_KEY1", k1.as_str()),
        ("AISLE_TEST_KEY2", k2.as_str()),
    ];
    let base = gateway_config(&origin.url(), &redis.section(prefix));
    let with_k1 = format!("{base}encryption_key = \"${{AISLE_TEST_KEY1}}\"\n");
    let with_k2 = format!("{base}encryption_key = \"${{AISLE_TEST_KEY2}}\"\n");
    let rotated = format!(
        "{base}encryption_key = \"${{AISLE_TEST_KEY2}}\"\nprevious_keys = [\"${{AISLE_TEST_KEY1}}\"]\n"
    );
    let rules = [("rules.toml", fixtures::ENCRYPTION_RULES)];
    let (a, b, c, d) = tokio::join!(
        Gateway::start_with_env(&with_k1, &rules, &env),
        Gateway::start_with_env(&with_k1, &rules, &env),
        Gateway::start_with_env(&with_k2, &rules, &env),
        Gateway::start_with_env(&rotated, &rules, &env),
    );
    for (name, gw) in [("A", &a), ("B", &b), ("C", &c), ("D", &d)] {
        wait_subscribed(gw, name).await;
    }
    let mut known = HashSet::new();

    // A fills /s/doc: sealed in Redis.
    let doc = "/s/doc";
    let r = a.get(doc).await;
    assert_stored_miss(&r, "A GET /s/doc");
    assert!(r.text().contains(PLAINTEXT), "the client gets plaintext");
    let key = wait_new_entry(&redis, prefix, &known).await;
    known.insert(key.clone());
    assert_entry_key_shape(&key, prefix);
    let raw = redis.get_bytes(&key).expect("entry bytes");
    assert_eq!(raw[0], 0x01, "sealed record marker");
    assert!(
        !contains(&raw, PLAINTEXT.as_bytes()),
        "plaintext marker visible in Redis"
    );
    assert!(!contains(&raw, &r.body), "body visible in Redis");
    assert!(
        !contains(&raw, b"4111111111111111"),
        "secret visible in Redis"
    );

    // B, same key: a hit from Redis.
    let before = redis_hits(&b).await;
    let rb = b.get(doc).await;
    assert_hit(&rb, "B GET /s/doc (same key)");
    assert_eq!(rb.body, r.body);
    assert_eq!(origin.count(doc), 1);
    assert!(redis_hits(&b).await > before, "B's hit came from redis");

    // A fills /s/rot with K1 (only A ever asks for it before D).
    let rot = "/s/rot";
    let r_rot = a.get(rot).await;
    assert_stored_miss(&r_rot, "A GET /s/rot");
    let rot_key = wait_new_entry(&redis, prefix, &known).await;
    known.insert(rot_key.clone());
    assert_eq!(redis.get_bytes(&rot_key).expect("rot entry")[0], 0x01);

    // D: current K2, previous K1: opens the K1 entry.
    let before = redis_hits(&d).await;
    let rd = d.get(rot).await;
    assert_hit(&rd, "D GET /s/rot (K1 entry, K1 in previous_keys)");
    assert_eq!(rd.body, r_rot.body);
    assert_eq!(origin.count(rot), 1);
    assert!(redis_hits(&d).await > before, "D's hit came from redis");
    assert_eq!(unusable(&d, None).await, 0.0, "D found nothing unusable");

    // C: only K2: A's entry is unusable -> a miss, never an error.
    let rc = c.get(doc).await;
    assert_eq!(rc.status, 200, "C GET /s/doc");
    assert!(
        rc.cache_status().contains("fwd="),
        "C GET /s/doc with another key: expected a miss, got {:?}",
        rc.cache_status()
    );
    assert_eq!(origin.count(doc), 2, "C fetched from the origin");
    let n = unusable(&c, None).await;
    println!(
        "C: aisle_redis_unusable_entries_total = {n} (unknown-key: {})",
        unusable(&c, Some("unknown-key")).await
    );
    assert!(n > 0.0, "C counted the unusable entry");

    // A plain rule stays plain even with a key configured.
    let public = "/p/open";
    let rp = a.get(public).await;
    assert_stored_miss(&rp, "A GET /p/open");
    let pkey = wait_plain_entry(&redis, prefix, &rp.body).await;
    assert!(!known.contains(&pkey));
    known.insert(pkey);

    // A tampered sealed entry is a miss (and counted) on a holder of the key.
    let tamper = "/s/tamper";
    let rt = a.get(tamper).await;
    assert_stored_miss(&rt, "A GET /s/tamper");
    let tkey = wait_new_entry(&redis, prefix, &known).await;
    let traw = redis.get_bytes(&tkey).expect("tamper entry");
    assert_eq!(traw[0], 0x01);
    let last = traw.len() - 1;
    redis.set_byte(&tkey, last, traw[last] ^ 0x01);
    assert_ne!(
        redis.get_bytes(&tkey).unwrap(),
        traw,
        "the entry was altered"
    );
    let before = unusable(&b, None).await;
    let rbt = b.get(tamper).await;
    assert_eq!(rbt.status, 200, "B GET tampered /s/tamper");
    assert!(
        rbt.cache_status().contains("fwd="),
        "B GET tampered /s/tamper: expected a miss, got {:?}",
        rbt.cache_status()
    );
    assert_eq!(origin.count(tamper), 2);
    assert!(
        unusable(&b, None).await > before,
        "B counted the tampered entry"
    );
    println!("B: tampered = {}", unusable(&b, Some("tampered")).await);
}

#[test]
fn check_rejects_encrypt_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/rules.toml"),
        fixtures::ENCRYPTION_RULES,
    )
    .unwrap();
    let gateway = config_for("http://127.0.0.1:3000")
        .replace("{listen}", "127.0.0.1:18080")
        .replace("{admin}", "127.0.0.1:19090");
    for (name, extra) in [
        ("no [redis]", String::new()),
        (
            "[redis] without a key",
            "\n[redis]\nurl = \"redis://127.0.0.1:1\"\n".to_string(),
        ),
    ] {
        std::fs::write(dir.path().join("gateway.toml"), format!("{gateway}{extra}")).unwrap();
        let out = Command::new(crate::harness::aisle_bin())
            .arg("check")
            .arg("--config")
            .arg(dir.path().join("gateway.toml"))
            .output()
            .expect("run aisle check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: aisle check output:\n{text}"
        );
        assert!(
            text.contains("encrypt"),
            "{name}: message names encrypt:\n{text}"
        );
        assert!(
            text.contains("rules.toml:"),
            "{name}: message has a position:\n{text}"
        );
    }
}
