//! Seasons and priorities (issue 14): a `[[season]]` changes the TTL rules give new fills (the
//! calendar clock set with `AISLE_FAKE_NOW`, test-only), a season edit reloads live without
//! emptying the cache, and `priority = "critical"` entries outlive a memory-pressure run that
//! evicts normal ones.

use crate::harness::*;

const SEASONS: &str = "\n[[season]]\nname = \"peak\"\nfrom = \"04-01\"\nto = \"10-31\"\ntz = \"America/New_York\"\nttl_multiplier = 0.5\n";

const RULES: &str = r#"
[[rule]]
name = "vendor-page"
match = { method = "GET", path = "/v/*" }
upstream = "api"
ttl = "1h"

[[rule]]
name = "vendor-availability"
match = { method = "GET", path = "/a/*" }
upstream = "api"
ttl = "1h"
priority = "critical"
season_ttl = { peak = "10m", off = "2h" }
"#;

fn origin() -> Origin {
    Origin::start(|req| OriginResponse::ok(format!("{} #{}", req.path, req.count)))
}

/// The `ttl=` of a hit on `path` (filled just before).
async fn ttl_of(gw: &Gateway, path: &str) -> i64 {
    assert_stored_miss(&gw.get(path).await, path);
    let hit = gw.get(path).await;
    assert_hit(&hit, path);
    hit.ttl()
        .unwrap_or_else(|| panic!("{path}: no ttl in {:?}", hit.cache_status()))
}

fn about(got: i64, want: i64, what: &str) {
    assert!(
        got <= want && got >= want - 30,
        "{what}: ttl={got}, expected about {want}"
    );
}

/// June in New York is peak: the rule's 1h becomes 30 min and the `season_ttl` rule's own
/// peak value (10 min) applies; December is off: 1h and the `off` value (2h).
#[tokio::test(flavor = "multi_thread")]
async fn a_season_changes_a_rules_ttl() {
    let origin = origin();
    let config = format!(
        "{}{SEASONS}",
        config_with_cache(&origin.url(), "64MiB", "1MiB")
    );
    let peak = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_FAKE_NOW", "2027-06-12T10:00:00-04:00")],
    )
    .await;
    about(ttl_of(&peak, "/v/1").await, 1800, "peak, ttl x 0.5");
    about(ttl_of(&peak, "/a/1").await, 600, "peak, season_ttl");
    drop(peak);
    let off = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_FAKE_NOW", "2027-12-01T10:00:00-05:00")],
    )
    .await;
    about(ttl_of(&off, "/v/1").await, 3600, "off, the rule's ttl");
    about(ttl_of(&off, "/a/1").await, 7200, "off, season_ttl off");
}

/// A season's multiplier edited in gateway.toml applies to new fills after a live reload;
/// entries already stored keep their key (the rule's generation does not depend on seasons)
/// and stay hits.
#[tokio::test(flavor = "multi_thread")]
async fn a_season_edit_reloads_live_and_keeps_the_cache() {
    let origin = origin();
    let config = format!(
        "{}{SEASONS}",
        config_with_cache(&origin.url(), "64MiB", "1MiB")
    );
    let gw = Gateway::start_with_env(
        &config,
        &[("r.toml", RULES)],
        &[("AISLE_FAKE_NOW", "2027-06-12T10:00:00-04:00")],
    )
    .await;
    about(ttl_of(&gw, "/v/1").await, 1800, "before the edit");
    let ok = gw
        .metric("aisle_config_reloads_total", &[("result", "ok")])
        .await
        .unwrap_or(0.0);
    gw.edit_config(|text| text.replace("ttl_multiplier = 0.5", "ttl_multiplier = 0.25"));
    gw.wait_metric(
        "aisle_config_reloads_total",
        &[("result", "ok")],
        "the season edit reloaded",
        |v| v > ok,
    )
    .await;
    let kept = gw.get("/v/1").await;
    assert_hit(&kept, "stored before the edit");
    about(ttl_of(&gw, "/v/2").await, 900, "a new fill, ttl x 0.25");
    assert_eq!(origin.count("/v/1"), 1);
}

const PRESSURE_RULES: &str = r#"
[[rule]]
name = "critical"
match = { method = "GET", path = "/c/*" }
upstream = "api"
ttl = "1h"
priority = "critical"

[[rule]]
name = "normal"
match = { method = "GET", path = "/n/*" }
upstream = "api"
ttl = "1h"
"#;

const BODY: usize = 8 * 1024;

/// A 256 KiB memory tier: 8 critical entries filled first, then 100 normal ones (~800 KiB).
/// The normal fills evict older normal entries, never the critical ones, though those are the
/// least recently used.
#[tokio::test(flavor = "multi_thread")]
async fn critical_entries_survive_memory_pressure() {
    let origin = Origin::start(|req| {
        let mut body = format!("{} #{} ", req.path, req.count).into_bytes();
        body.resize(BODY, b'x');
        OriginResponse::ok(body)
    });
    let config = config_with_cache(&origin.url(), "256KiB", "64KiB");
    let gw = Gateway::start(&config, &[("r.toml", PRESSURE_RULES)]).await;
    for i in 0..8 {
        assert_stored_miss(&gw.get(&format!("/c/{i}")).await, "critical fill");
    }
    for i in 0..100 {
        assert_stored_miss(&gw.get(&format!("/n/{i}")).await, "normal fill");
    }
    gw.wait_metric("aisle_cache_evictions_total", &[], "> 0", |v| v > 0.0)
        .await;
    let mut evicted_normal = 0;
    for i in 0..20 {
        if !gw.get(&format!("/n/{i}")).await.is_hit() {
            evicted_normal += 1;
        }
    }
    assert!(evicted_normal > 0, "the run evicts normal entries");
    let lost: Vec<usize> = {
        let mut lost = Vec::new();
        for i in 0..8 {
            if !gw.get(&format!("/c/{i}")).await.is_hit() {
                lost.push(i);
            }
        }
        lost
    };
    assert!(
        lost.is_empty(),
        "critical entries evicted: {lost:?} ({evicted_normal} of the first 20 normal ones were)"
    );
    for i in 0..8 {
        assert_eq!(origin.count(&format!("/c/{i}")), 1);
    }
}
