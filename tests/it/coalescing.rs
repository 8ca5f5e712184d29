//! Coalescing on slow and hung origins (issue 10, item 2): concurrent identical misses wait for
//! one fill for as long as that fill's upstream request is alive (up to the upstream's
//! `read_timeout`), whatever `lock_timeout` says; a fill that fails is replaced by ONE new fill,
//! and waiters never fall back to one origin request each. Real binary, loopback origins that
//! count requests and answer late (or never).

use std::time::Duration;

use crate::harness::*;

const RULES: &str = r#"
[[rule]]
name = "slow"
match = { method = "GET", path = "/slow/*" }
upstream = "api"
ttl = "5m"
"#;

/// A gateway with `lock_timeout` and the upstream's `read_timeout` as given.
async fn gateway(origin: &Origin, lock_timeout: &str, read_timeout: &str) -> Gateway {
    let cfg = config_for(&origin.url())
        .replace(
            "rules_dir = \"rules\"",
            &format!("rules_dir = \"rules\"\nlock_timeout = \"{lock_timeout}\""),
        )
        .replace(
            "read_timeout = \"10s\"",
            &format!("read_timeout = \"{read_timeout}\""),
        );
    Gateway::start(&cfg, &[("rules.toml", RULES)]).await
}

/// `n` concurrent GETs of `path`; their answers in completion order.
async fn concurrent(gw: &Gateway, path: &str, n: usize) -> Vec<Resp> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let client = client();
        let url = gw.url(path);
        set.spawn(async move { fetch(&client, "GET", &url, &[]).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

/// Issue 10 item 2: 20 identical requests to an origin that takes 3 s, with `lock_timeout` 1 s.
/// Before: the waiters aged the lock out every second, became writers in turn, then went
/// upstream one each (20 origin requests, answers chained). Now: one origin request, and every
/// client is answered when it arrives (~3 s).
#[tokio::test(flavor = "multi_thread")]
async fn an_origin_slower_than_lock_timeout_is_asked_once() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("answer #{}", req.count)).delay(Duration::from_secs(3))
    });
    let gw = gateway(&origin, "1s", "10s").await;
    let answers = concurrent(&gw, "/slow/one", 20).await;
    let mut times: Vec<f64> = answers.iter().map(|r| r.elapsed.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "20 clients, origin 3 s, lock_timeout 1 s: {} origin request(s); answered at {:.2?} s",
        origin.count("/slow/one"),
        times
    );
    for r in &answers {
        assert_eq!(r.status, 200, "Cache-Status {:?}", r.cache_status());
        assert_eq!(
            r.text(),
            "answer #1",
            "every client gets the one fill's answer"
        );
    }
    assert_eq!(
        origin.count("/slow/one"),
        1,
        "waiters must follow the fill while its upstream request is open"
    );
    let last = times.last().copied().unwrap_or_default();
    assert!(
        last < 5.0,
        "every client must be answered when the one fill lands (~3 s), not chained; last at {last:.2} s"
    );
}

/// Issue 10 item 2, hung origin: it accepts and never answers. Each fill ends at the upstream's
/// `read_timeout` (2 s); when one fails, ONE waiter takes over as the new fill and the others
/// keep waiting behind it; after pingora's retry limit the remaining waiters are answered 504
/// rather than each sending its own request. Before: `lock_timeout` (1 s) aged each fill out,
/// and after the retry limit every waiter went upstream on its own (10 origin requests for 10
/// clients).
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_origin_gets_one_new_fill_per_failed_fill_not_one_per_waiter() {
    let origin = Origin::start(|req| {
        OriginResponse::ok(format!("never #{}", req.count)).delay(Duration::from_secs(3600))
    });
    let gw = gateway(&origin, "1s", "2s").await;
    let answers = concurrent(&gw, "/slow/hung", 10).await;
    let count = origin.count("/slow/hung");
    let mut times: Vec<f64> = answers.iter().map(|r| r.elapsed.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    println!(
        "10 clients, hung origin, read_timeout 2 s, lock_timeout 1 s: {count} origin request(s); \
         statuses {statuses:?}; answered at {times:.2?} s"
    );
    assert!(
        answers.iter().all(|r| r.status >= 500),
        "a hung origin has no answer to give: {statuses:?}"
    );
    // Three fills at most: the first, and one replacement per failed fill while waiters are
    // within pingora's retry limit (2).
    assert!(
        count <= 3,
        "each failed fill may be replaced by one new fill, not one per waiter: {count} origin requests"
    );
    let gave_up = answers
        .iter()
        .filter(|r| r.cache_status().contains("detail=fill-failed"))
        .count();
    assert_eq!(
        gave_up + count,
        10,
        "the clients that did not fill were told the fills failed"
    );
    gw.wait_metric("aisle_fill_wait_gave_up_total", &[], "> 0", |v| v > 0.0)
        .await;
}
