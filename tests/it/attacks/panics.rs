//! Panics reachable from the network (issue 9, item 14), against the real binary: each input
//! once made the gateway panic and drop the connection without an answer. Each now gets an
//! answer, the gateway keeps serving, and its log holds no panic. (`Host: [` is in the host
//! parsing suite.)

use crate::harness::*;

const RULES: &str = r#"
[[rule]]
name = "season"
match = { path = "/season" }
ttl = "5m"
vary = ["query.date"]
normalize = { "query.date" = "season" }

[[rule]]
name = "ttl"
match = { path = "/ttl/*" }
ttl = "5m"
# The huge Aisle-Cache-TTL values must reach the lifetime sum: honour client controls here.
client_controls = true
"#;

const STRIPE_SECRET: &str = "whsec_panics_test_secret";

/// Answers `max-age=60` with the `Age` the path names (`/age/<value>`), and `ok` elsewhere.
fn origin() -> Origin {
    Origin::start(|req| {
        let resp = OriginResponse::ok(format!("{} #{}", req.path, req.count))
            .header("cache-control", "public, max-age=60");
        match req.path.strip_prefix("/age/") {
            Some(age) => resp.header("age", age),
            None => resp,
        }
    })
}

async fn gateway(origin: &Origin) -> Gateway {
    let config = format!(
        "{}\n[webhooks.billing]\nsecret = \"${{STRIPE_SECRET}}\"\nsignature = \"stripe\"\n",
        config_for(&origin.url())
    );
    Gateway::start_with_env(
        &config,
        &[("rules.toml", RULES)],
        &[("STRIPE_SECRET", STRIPE_SECRET)],
    )
    .await
}

/// The gateway still answers, and nothing panicked.
async fn still_serving(gw: &Gateway, after: &str) {
    let r = gw.get("/after").await;
    assert_eq!(r.status, 200, "the gateway still serves after {after}");
    let logs = gw.logs();
    assert!(!logs.contains("panicked"), "{after} panicked:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn season_of_a_non_ascii_date_is_answered() {
    let origin = origin();
    let gw = gateway(&origin).await;
    // `2027-07-1é`: byte 10 is inside the 'é'.
    for date in [
        "2027-07-1%C3%A9",
        "%E6%97%A5%E6%9C%AC%E8%AA%9E%E3%81%AE%E6%97%A5",
    ] {
        let r = gw.get(&format!("/season?date={date}")).await;
        assert_eq!(r.status, 200, "date={date}");
    }
    // Still keyed by season: two summer dates share one entry.
    gw.get("/season?date=2027-07-14").await;
    assert_hit(&gw.get("/season?date=2027-08-02").await, "the same season");
    still_serving(&gw, "a non-ASCII season date").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_aisle_cache_ttl_is_answered_and_never_lengthens_an_entry() {
    let origin = origin();
    let gw = gateway(&origin).await;
    for (i, ttl) in [
        "99999999999999999s",
        "18446744073709551615s",
        "18446744073709551615",
        "584942417355y",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/ttl/{i}");
        let r = gw.get_with(&path, &[("aisle-cache-ttl", ttl)]).await;
        assert_eq!(r.status, 200, "Aisle-Cache-TTL: {ttl}");
        let hit = gw.get(&path).await;
        assert_hit(&hit, &format!("stored under Aisle-Cache-TTL: {ttl}"));
        let left = hit.ttl().expect("a ttl in Cache-Status");
        assert!(left <= 300, "the rule's 5 minutes at most, got {left}");
    }
    still_serving(&gw, "a huge Aisle-Cache-TTL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_age_past_u64_is_answered_and_stale() {
    let origin = origin();
    let gw = gateway(&origin).await;
    // u64::MAX panicked; one more digit was read as 0 and served fresh for a minute.
    for age in ["18446744073709551615", "18446744073709551616", "2147483648"] {
        let path = format!("/age/{age}");
        let r = gw.get(&path).await;
        assert_eq!(r.status, 200, "Age: {age}");
        let again = gw.get(&path).await;
        assert_eq!(again.status, 200);
        assert!(
            !again.is_hit(),
            "Age {age} is stale (RFC 9111 §1.2.2: 2^31)"
        );
        assert_eq!(
            origin.count(&path),
            2,
            "Age {age}: revalidated at the origin"
        );
    }
    still_serving(&gw, "an origin Age past u64").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_timestamp_at_the_end_of_i64_is_refused() {
    let origin = origin();
    let gw = gateway(&origin).await;
    for t in [i64::MIN, i64::MAX] {
        let r = gw
            .client()
            .post(gw.url("/_aisle/webhooks/billing"))
            .header("stripe-signature", format!("t={t},v1=00"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(r.status(), 401, "t={t}");
    }
    still_serving(&gw, "a webhook timestamp of i64::MIN").await;
}
