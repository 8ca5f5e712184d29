//! Invalidation through every entry point, against the real `aisle` binary: tag, soft, prefix
//! and URL purges through the admin API (on one instance and across two instances sharing a real
//! `redis-server`), the origin's tag headers (`Surrogate-Key`, `Cache-Tag`, `xkey`,
//! `Cache-Groups`) and `Cache-Group-Invalidation`, `PURGE` on the proxy listener (from an
//! allowed network and with the token), the admin API's authentication and validation, the
//! audit log and the live event stream.
//!
//! Every check that something was invalidated is paired with one that something else was not,
//! and every refused request is followed by a check that the entry is still a hit. Nothing sleeps
//! to synchronise: waits are `poll_until` with a deadline.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::fixtures;
use crate::harness::redis::{wait_plain_entry, wait_subscribed, RedisServer, SharedRedis};
use crate::harness::{
    assert_hit, assert_purged, assert_stored_miss, config_for, fetch_with_body, poll_until,
    Gateway, Origin, OriginResponse, Resp,
};
use serde_json::{json, Value};

const TOKEN: &str = "inv-test-admin-token-7f3a91c2";
const ENV: &[(&str, &str)] = &[("AISLE_ADMIN_TOKEN", TOKEN)];

/// GETs answer `<path> #<n>`, so every fill is recognisable; some paths carry tag headers;
/// `POST /api/groups/update` answers with `Cache-Group-Invalidation: "g1"`.
fn origin() -> Origin {
    Origin::start(|req| {
        let r = OriginResponse::ok(format!("{} #{}", req.path, req.count));
        if req.method == "POST" {
            return if req.path == "/api/groups/update" {
                r.header("Cache-Group-Invalidation", "\"g1\"")
            } else {
                r
            };
        }
        match req.path.as_str() {
            "/api/tagged/sk" => r.header("Surrogate-Key", "sk-1 sk-2"),
            "/api/tagged/ct" => r.header("Cache-Tag", "ct-1, ct-2"),
            "/api/tagged/xk" => r.header("xkey", "xk-1"),
            "/api/tagged/soft" => r.header("Surrogate-Key", "softy"),
            "/api/groups/a" => r.header("Cache-Groups", "\"g1\""),
            "/api/groups/b" => r.header("Cache-Groups", "\"g2\""),
            "/api/kept/sk" => r
                .header("Surrogate-Key", "kept-1 kept-2")
                .header("Cache-Tag", "kept-3"),
            _ => r,
        }
    })
}

/// gateway.toml for `origin` with an `[admin]` table (`purge_allow` as given) and `extra`.
fn gateway_toml(origin: &Origin, purge_allow: &str, extra: &str) -> String {
    format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\npurge_allow = [{purge_allow}]\n{extra}",
        config_for(&origin.url())
    )
}

async fn start(origin: &Origin) -> Gateway {
    Gateway::start_with_env(
        &gateway_toml(origin, "\"127.0.0.1/32\"", ""),
        &[("rules.toml", fixtures::INVALIDATION_RULES)],
        ENV,
    )
    .await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------
// Requests and assertions
// ---------------------------------------------------------------------------

/// A request to the admin listener, with `Authorization: Bearer <token>` when given.
async fn admin(gw: &Gateway, method: &str, path: &str, token: Option<&str>, body: &str) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    fetch_with_body(
        gw.client(),
        method,
        &gw.admin_url(path),
        &headers,
        body.to_string(),
    )
    .await
}

fn json_of(r: &Resp, what: &str) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body {:?} is not JSON: {e}", r.text()))
}

/// `POST /admin/invalidate` that must be accepted; returns the answer.
async fn invalidate(gw: &Gateway, body: Value) -> Value {
    let r = admin(
        gw,
        "POST",
        "/admin/invalidate",
        Some(TOKEN),
        &body.to_string(),
    )
    .await;
    assert_eq!(
        r.status,
        202,
        "POST /admin/invalidate {body}: answer {:?}",
        r.text()
    );
    json_of(&r, "POST /admin/invalidate")
}

/// `GET /admin/audit?since=<ms>` records.
async fn audit(gw: &Gateway, since: u64) -> Vec<Value> {
    let r = admin(
        gw,
        "GET",
        &format!("/admin/audit?since={since}"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "GET /admin/audit: {:?}", r.text());
    json_of(&r, "GET /admin/audit")["records"]
        .as_array()
        .unwrap_or_else(|| panic!("audit answer without records: {:?}", r.text()))
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Fill `path` (a stored miss) and check the next GET is a hit; returns the stored body.
async fn fill(gw: &Gateway, path: &str) -> String {
    let r = gw.get(path).await;
    assert_stored_miss(&r, &format!("first GET {path}"));
    let h = gw.get(path).await;
    assert_hit(&h, &format!("second GET {path}"));
    assert_eq!(h.body, r.body, "GET {path}: the hit serves the stored body");
    r.text()
}

// ---------------------------------------------------------------------------
// Two instances, one Redis
// ---------------------------------------------------------------------------

/// A and B share a Redis; both have `/api/vendors/x` and `/api/vendors/y` (tag `vendors`).
/// Invalidating the tag through B's admin API makes A's copy of x a purged miss (through the
/// fleet broadcast) and B's copy of y a purged miss (locally); no instance ever serves a
/// pre-purge body again; the refilled entries hit; A's event stream shows B's invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_invalidation_through_one_instance_reaches_the_other() {
    let redis = RedisServer::start();
    let origin = origin();
    let prefix = "t-inv2:";
    let cfg = format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\n",
        crate::harness::redis::gateway_config(&origin.url(), &redis.section(prefix))
    );
    let rules = [("rules.toml", fixtures::INVALIDATION_RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(&cfg, &rules, ENV),
        Gateway::start_with_env(&cfg, &rules, ENV)
    );
    wait_subscribed(&a, "A").await;
    wait_subscribed(&b, "B").await;

    let (x, y) = ("/api/vendors/x", "/api/vendors/y");
    let rx = a.get(x).await;
    assert_stored_miss(&rx, "A: first GET x");
    wait_plain_entry(&redis, prefix, &rx.body).await;
    assert_hit(&b.get(x).await, "B: GET x (from Redis)");
    assert_hit(&a.get(x).await, "A: GET x (memory)");
    let ry = b.get(y).await;
    assert_stored_miss(&ry, "B: first GET y");
    wait_plain_entry(&redis, prefix, &ry.body).await;
    assert_hit(&a.get(y).await, "A: GET y (from Redis)");
    assert_hit(&b.get(y).await, "B: GET y (memory)");
    assert_eq!((origin.count(x), origin.count(y)), (1, 1));

    // A's live event stream, opened before the invalidation.
    let mut events = EventStream::open(&a).await;

    let answer = invalidate(&b, json!({"tags": ["vendors"]})).await;
    assert_eq!(answer["tags"], json!(1), "answer {answer}");
    assert_eq!(answer["cdn"], json!("none"), "no CDN configured: {answer}");

    // B's own copy: purged at once.
    let by = b.get(y).await;
    assert_purged(&by, "B: GET y after the invalidation via B");
    assert_eq!(origin.count(y), 2, "B's purged miss went to the origin");
    assert_ne!(by.body, ry.body, "B serves a fresh y");

    // A learns through the fleet broadcast; poll until it stops hitting.
    let started = Instant::now();
    let ax = poll_until(
        Duration::from_secs(3),
        "A to stop hitting x after the invalidation via B",
        || async {
            let r = a.get(x).await;
            assert_eq!(r.status, 200);
            (!r.is_hit()).then_some(r)
        },
    )
    .await;
    println!(
        "invalidation via B reached A within {:?}",
        started.elapsed()
    );
    assert_purged(&ax, "A: GET x after the invalidation via B");
    assert_eq!(
        origin.count(x),
        2,
        "A's purged miss went to the origin once"
    );
    assert_ne!(ax.body, rx.body, "A serves a fresh x");

    // The other instance's copy of each: never the pre-purge body (either a purged miss or the
    // peer's refill through Redis).
    let ay = a.get(y).await;
    assert_eq!(ay.status, 200);
    assert_ne!(
        ay.body,
        ry.body,
        "A served y's pre-purge body (Cache-Status {:?})",
        ay.cache_status()
    );
    let bx = b.get(x).await;
    assert_eq!(bx.status, 200);
    assert_ne!(
        bx.body,
        rx.body,
        "B served x's pre-purge body (Cache-Status {:?})",
        bx.cache_status()
    );
    // Refilled entries are not purged forever.
    assert_hit(&a.get(x).await, "A: GET x after its refill");
    assert_hit(&b.get(y).await, "B: GET y after its refill");

    let seen = events
        .wait_for("A's event stream to show the tag invalidated on B", |d| {
            strings(&d["tags"]).contains(&"vendors".to_string())
        })
        .await;
    println!("A streamed: {seen}");
}

/// Issue 18 item 5: B's event stream shows what was invalidated on A (URL purges too, not only
/// tags and prefixes) as the very record A's own stream shows: the same id, actor, source,
/// targets and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_shows_other_instances_records_in_the_same_shape() {
    let redis = RedisServer::start();
    let origin = origin();
    let prefix = "t-inv-ev:";
    let cfg = format!(
        "{}\n[admin]\ntoken = \"${{AISLE_ADMIN_TOKEN}}\"\npurge_allow = [\"127.0.0.1/32\"]\n",
        crate::harness::redis::gateway_config(&origin.url(), &redis.section(prefix))
    );
    let rules = [("rules.toml", fixtures::INVALIDATION_RULES)];
    let (a, b) = tokio::join!(
        Gateway::start_with_env(&cfg, &rules, ENV),
        Gateway::start_with_env(&cfg, &rules, ENV)
    );
    wait_subscribed(&a, "A").await;
    wait_subscribed(&b, "B").await;
    let mut on_a = EventStream::open(&a).await;
    let mut on_b = EventStream::open(&b).await;

    // The same record on both streams: `what` made on A, found by its id.
    async fn same_on_both(on_a: &mut EventStream, on_b: &mut EventStream, id: &str, what: &str) {
        let here = on_a
            .wait_for(&format!("A's stream to show {what}"), |d| {
                d["id"] == json!(id)
            })
            .await;
        let there = on_b
            .wait_for(&format!("B's stream to show {what} made on A"), |d| {
                d["id"] == json!(id)
            })
            .await;
        println!("{what}: A streamed {here}\n  B streamed {there}");
        assert_eq!(there, here, "{what}: B's record differs from A's");
        for field in [
            "id", "actor", "source", "tags", "urls", "prefixes", "at_ms", "cdn",
        ] {
            assert!(
                there.get(field).is_some(),
                "{what}: no {field:?} in {there}"
            );
        }
    }

    let url = a.url("/api/vendors/ev-1");
    let answer = invalidate(&a, json!({"urls": [url]})).await;
    let id = answer["id"].as_str().expect("an id").to_string();
    same_on_both(&mut on_a, &mut on_b, &id, "a URL purge").await;

    let answer = invalidate(
        &a,
        json!({"tags": ["ev-tag"], "prefixes": ["localhost/api/ev/"], "soft": true}),
    )
    .await;
    let id = answer["id"].as_str().expect("an id").to_string();
    same_on_both(&mut on_a, &mut on_b, &id, "a tag and prefix purge").await;

    // PURGE <url> on A's proxy listener (no id in its answer: found by its URL on A first).
    let r = a.request("PURGE", "/api/vendors/ev-2", &[]).await;
    assert_eq!(r.status, 200, "PURGE: {:?}", r.text());
    let rec = on_a
        .wait_for("A's stream to show the PURGE", |d| {
            strings(&d["urls"])
                .iter()
                .any(|u| u.ends_with("/api/vendors/ev-2"))
        })
        .await;
    let id = rec["id"].as_str().expect("an id").to_string();
    let there = on_b
        .wait_for("B's stream to show the PURGE made on A", |d| {
            d["id"] == json!(id)
        })
        .await;
    assert_eq!(there, rec, "PURGE: B's record differs from A's");
    assert_eq!(there["source"], json!("purge-method"), "{there}");

    // Each record once on each stream: A does not stream its own record again when it comes
    // back through Redis, B gets it once. A last invalidation marks the end.
    let answer = invalidate(&a, json!({"tags": ["ev-last"]})).await;
    let last = answer["id"].as_str().expect("an id").to_string();
    for (name, stream) in [("A", &mut on_a), ("B", &mut on_b)] {
        stream
            .wait_for(&format!("{name}'s stream to show the last one"), |d| {
                d["id"] == json!(last)
            })
            .await;
        let ids: Vec<&str> = stream
            .seen
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(ids.len(), 4, "{name} streamed 4 records: {ids:?}");
        assert_eq!(
            unique.len(),
            ids.len(),
            "{name} streamed a record twice: {ids:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// One instance
// ---------------------------------------------------------------------------

/// A soft tag purge serves the stale entry once (stale-while-revalidate) while it is refetched
/// in the background, then the fresh copy; another tag's entry is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_serves_stale_once_then_fresh() {
    let origin = origin();
    let gw = start(&origin).await;
    let (path, other) = ("/api/vendors/soft", "/api/vendors/other");
    let old = fill(&gw, path).await;
    fill(&gw, other).await;

    let answer = invalidate(&gw, json!({"tags": ["vendor:soft"], "soft": true})).await;
    assert_eq!(answer["tags"], json!(1), "answer {answer}");

    let stale = gw.get(path).await;
    assert_eq!(stale.status, 200);
    let cs = stale.cache_status();
    assert!(
        cs.contains("fwd=stale"),
        "first GET after a soft purge: expected fwd=stale, got {cs:?}"
    );
    assert!(
        !cs.contains("detail=purged"),
        "a soft purge is not a hard one: {cs:?}"
    );
    assert_eq!(stale.text(), old, "the stale answer is the stored body");

    // The background refetch reaches the origin once.
    poll_until(
        Duration::from_secs(5),
        "the background refetch after the soft purge",
        || async { (origin.count(path) >= 2).then_some(()) },
    )
    .await;
    // Then the refreshed copy; until the refill is stored, answers may still be the stale
    // copy, never anything else.
    let fresh = poll_until(
        Duration::from_secs(5),
        "the refreshed copy after the soft purge",
        || async {
            let r = gw.get(path).await;
            assert_eq!(r.status, 200);
            (r.text() != old).then_some(r)
        },
    )
    .await;
    assert_eq!(fresh.text(), format!("{path} #2"));
    // The first answer with the new body may have read the refill while it was being stored
    // (a collapsed read, not a hit); the next one is a hit.
    let fresh = if fresh.is_hit() {
        fresh
    } else {
        gw.get(path).await
    };
    assert!(
        fresh.is_hit(),
        "the refreshed copy ({:?}) must be a fresh hit, got Cache-Status {:?} (origin requests \
         so far: {})",
        fresh.text(),
        fresh.cache_status(),
        origin.count(path)
    );
    assert_eq!(fresh.text(), format!("{path} #2"));
    assert_eq!(origin.count(path), 2, "exactly one refetch");
    assert_hit(&gw.get(other).await, "another vendor's entry");
    assert_eq!(origin.count(other), 1);
}

/// A soft purge of an entry without a stale-while-revalidate window: the next request refetches
/// it (synchronously), and the refetched copy is then a plain hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_without_a_stale_window_refetches_once() {
    let origin = origin();
    let gw = start(&origin).await;
    let path = "/api/tagged/soft";
    let old = fill(&gw, path).await;

    invalidate(&gw, json!({"tags": ["softy"], "soft": true})).await;
    let r = gw.get(path).await;
    assert_eq!(r.status, 200);
    assert!(
        r.cache_status().contains("fwd="),
        "the soft-purged entry is not served as is: {:?}",
        r.cache_status()
    );
    assert_ne!(r.text(), old, "no window to serve the stale copy in");
    assert_eq!(origin.count(path), 2);

    let h = gw.get(path).await;
    assert!(
        h.is_hit(),
        "the copy refetched after a soft purge must be a hit, got Cache-Status {:?} with {:?} \
         (origin requests so far: {})",
        h.cache_status(),
        h.text(),
        origin.count(path)
    );
    assert_eq!(h.text(), r.text());
    assert_eq!(origin.count(path), 2, "exactly one refetch");
}

/// A prefix purge hard-purges every entry under `host/path-prefix` and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_purge() {
    let origin = origin();
    let gw = start(&origin).await;
    let (p1, p2, v, o) = (
        "/api/vendors/pa-1",
        "/api/vendors/pa-2",
        "/api/vendors/zz",
        "/api/other/pa-3",
    );
    for p in [p1, p2, v, o] {
        fill(&gw, p).await;
    }

    let answer = invalidate(&gw, json!({"prefixes": ["127.0.0.1/api/vendors/pa-"]})).await;
    assert_eq!(
        (&answer["prefixes"], &answer["tags"], &answer["urls"]),
        (&json!(1), &json!(0), &json!(0)),
        "answer {answer}"
    );
    assert_purged(&gw.get(p1).await, "GET under the prefix (1)");
    assert_purged(&gw.get(p2).await, "GET under the prefix (2)");
    assert_hit(&gw.get(v).await, "a vendor outside the prefix");
    assert_hit(&gw.get(o).await, "another path outside the prefix");
    assert_eq!(
        [p1, p2, v, o].map(|p| origin.count(p)),
        [2, 2, 1, 1],
        "origin requests per path"
    );
    assert_hit(&gw.get(p1).await, "the refilled entry");
}

/// A URL purge through the admin API deletes that URL's entry only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_purge_via_admin_api() {
    let origin = origin();
    let gw = start(&origin).await;
    let (u1, u2) = ("/api/vendors/u1", "/api/vendors/u2");
    fill(&gw, u1).await;
    fill(&gw, u2).await;

    // The URL as a client requested it (with the gateway's port).
    let url = format!("http://{}{u1}", gw.listen());
    let answer = invalidate(&gw, json!({ "urls": [url] })).await;
    assert_eq!(answer["urls"], json!(1), "answer {answer}");

    let r = gw.get(u1).await;
    assert_stored_miss(&r, "GET of the purged URL");
    assert_eq!(origin.count(u1), 2, "the purged URL went to the origin");
    assert_eq!(r.text(), format!("{u1} #2"));
    assert_hit(&gw.get(u2).await, "another URL");
    assert_eq!(origin.count(u2), 1);
}

/// Tags from `Surrogate-Key`, `Cache-Tag`, `xkey` and `Cache-Groups` are invalidatable, and those
/// headers are removed from client responses unless the rule keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_tag_headers_tag_entries_and_are_stripped() {
    let origin = origin();
    let gw = start(&origin).await;
    const TAG_HEADERS: [&str; 4] = ["surrogate-key", "cache-tag", "xkey", "cache-groups"];
    let (sk, ct, xk, grp, kept) = (
        "/api/tagged/sk",
        "/api/tagged/ct",
        "/api/tagged/xk",
        "/api/groups/a",
        "/api/kept/sk",
    );
    for p in [sk, ct, xk, grp] {
        for (n, r) in [(1, gw.get(p).await), (2, gw.get(p).await)] {
            for h in TAG_HEADERS {
                assert_eq!(
                    r.header(h),
                    None,
                    "GET {p} #{n} ({:?}): the origin's {h} header reached the client",
                    r.cache_status()
                );
            }
            if n == 2 {
                assert_hit(&r, &format!("second GET {p}"));
            }
        }
    }
    let m = gw.get(kept).await;
    assert_stored_miss(&m, "first GET of a keep_tag_headers route");
    let h = gw.get(kept).await;
    assert_hit(&h, "second GET of a keep_tag_headers route");
    for r in [&m, &h] {
        assert_eq!(
            r.header("surrogate-key").as_deref(),
            Some("kept-1 kept-2"),
            "keep_tag_headers keeps Surrogate-Key ({:?})",
            r.cache_status()
        );
        assert_eq!(r.header("cache-tag").as_deref(), Some("kept-3"));
    }

    // Surrogate-Key (space separated): the second key.
    invalidate(&gw, json!({"tags": ["sk-2"]})).await;
    assert_purged(&gw.get(sk).await, "Surrogate-Key entry after purging sk-2");
    assert_hit(&gw.get(ct).await, "Cache-Tag entry after purging sk-2");
    // Cache-Tag (comma separated, with a space after the comma).
    invalidate(&gw, json!({"tags": ["ct-2"]})).await;
    assert_purged(&gw.get(ct).await, "Cache-Tag entry after purging ct-2");
    assert_hit(&gw.get(xk).await, "xkey entry after purging ct-2");
    invalidate(&gw, json!({"tags": ["xk-1"]})).await;
    assert_purged(&gw.get(xk).await, "xkey entry after purging xk-1");
    invalidate(&gw, json!({"tags": ["g1"]})).await;
    assert_purged(&gw.get(grp).await, "Cache-Groups entry after purging g1");
    // Kept headers still tag the entry.
    assert_hit(&gw.get(kept).await, "kept entry before its purge");
    invalidate(&gw, json!({"tags": ["kept-3"]})).await;
    assert_purged(&gw.get(kept).await, "kept entry after purging kept-3");
    assert_eq!(
        [sk, ct, xk, grp, kept].map(|p| origin.count(p)),
        [2, 2, 2, 2, 2],
        "origin requests per path"
    );
}

/// A successful POST answered with `Cache-Group-Invalidation: "g1"` purges group g1 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_group_invalidation_from_an_unsafe_response() {
    let origin = origin();
    let gw = start(&origin).await;
    let since = now_ms();
    let (a, b) = ("/api/groups/a", "/api/groups/b");
    fill(&gw, a).await;
    fill(&gw, b).await;

    let p = gw.request("POST", "/api/groups/update", &[]).await;
    assert_eq!(p.status, 200, "POST through the gateway");
    assert_eq!(origin.count("/api/groups/update"), 1);

    assert_purged(&gw.get(a).await, "GET of a group-g1 entry after the POST");
    assert_hit(&gw.get(b).await, "GET of a group-g2 entry after the POST");
    assert_eq!((origin.count(a), origin.count(b)), (2, 1));

    let records = audit(&gw, since).await;
    assert!(
        records
            .iter()
            .any(|r| r["source"] == json!("unsafe-request")
                && strings(&r["tags"]) == vec!["g1".to_string()]),
        "the audit log shows the group invalidation: {records:?}"
    );
}

/// `PURGE <url>` and `PURGE` with `Surrogate-Key`, allowed from 127.0.0.1 by `purge_allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_from_an_allowed_network() {
    let origin = origin();
    let gw = start(&origin).await;
    let since = now_ms();
    let (v1, v2, v3) = ("/api/vendors/m1", "/api/vendors/m2", "/api/vendors/m3");
    for p in [v1, v2, v3] {
        fill(&gw, p).await;
    }

    let r = gw.request("PURGE", v1, &[]).await;
    assert_eq!(r.status, 200, "PURGE {v1}: {:?}", r.text());
    assert_eq!(origin.count(v1), 1, "PURGE never reaches the origin");
    let m = gw.get(v1).await;
    assert_stored_miss(&m, "GET after PURGE <url>");
    assert_eq!(origin.count(v1), 2);
    assert_hit(&gw.get(v2).await, "another URL after PURGE <url>");

    let r = gw
        .request(
            "PURGE",
            "/",
            &[("Surrogate-Key", "vendor:m2 unrelated-tag")],
        )
        .await;
    assert_eq!(r.status, 200, "PURGE with Surrogate-Key: {:?}", r.text());
    assert_purged(&gw.get(v2).await, "GET after PURGE Surrogate-Key vendor:m2");
    assert_hit(&gw.get(v3).await, "an entry without the purged keys");
    assert_eq!(
        [v1, v2, v3].map(|p| origin.count(p)),
        [2, 2, 1],
        "origin requests per path"
    );

    let records = audit(&gw, since).await;
    let purges: Vec<&Value> = records
        .iter()
        .filter(|r| r["source"] == json!("purge-method"))
        .collect();
    assert_eq!(purges.len(), 2, "two PURGE records: {records:?}");
    assert!(
        purges.iter().any(|r| {
            let mut t = strings(&r["tags"]);
            t.sort();
            t == ["unrelated-tag", "vendor:m2"]
        }),
        "the Surrogate-Key purge is audited with its tags: {purges:?}"
    );
}

/// With `purge_allow` excluding 127.0.0.1, `PURGE` needs the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_outside_purge_allow_needs_the_token() {
    let origin = origin();
    let gw = Gateway::start_with_env(
        &gateway_toml(&origin, "\"10.99.0.0/16\"", ""),
        &[("rules.toml", fixtures::INVALIDATION_RULES)],
        ENV,
    )
    .await;
    let (v1, v2) = ("/api/vendors/n1", "/api/vendors/n2");
    fill(&gw, v1).await;
    fill(&gw, v2).await;
    let bearer = format!("Bearer {TOKEN}");
    let wrong = "Bearer not-the-admin-token-at-all";

    for (what, headers) in [
        ("no token", vec![]),
        ("a wrong token", vec![("Authorization", wrong)]),
    ] {
        let r = gw.request("PURGE", v1, &headers).await;
        assert_eq!(r.status, 401, "PURGE <url> with {what}: {:?}", r.text());
        let mut h = headers.clone();
        h.push(("Surrogate-Key", "vendor:n2"));
        let r = gw.request("PURGE", "/", &h).await;
        assert_eq!(
            r.status,
            401,
            "PURGE Surrogate-Key with {what}: {:?}",
            r.text()
        );
        assert_hit(
            &gw.get(v1).await,
            &format!("{v1} after a refused PURGE ({what})"),
        );
        assert_hit(
            &gw.get(v2).await,
            &format!("{v2} after a refused PURGE ({what})"),
        );
    }
    assert_eq!((origin.count(v1), origin.count(v2)), (1, 1));

    let r = gw
        .request("PURGE", v1, &[("Authorization", bearer.as_str())])
        .await;
    assert_eq!(r.status, 200, "PURGE <url> with the token: {:?}", r.text());
    assert_stored_miss(&gw.get(v1).await, "GET after PURGE <url> with the token");
    let r = gw
        .request(
            "PURGE",
            "/",
            &[
                ("Authorization", bearer.as_str()),
                ("Surrogate-Key", "vendor:n2"),
            ],
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "PURGE Surrogate-Key with the token: {:?}",
        r.text()
    );
    assert_purged(
        &gw.get(v2).await,
        "GET after PURGE Surrogate-Key with the token",
    );
    assert_eq!((origin.count(v1), origin.count(v2)), (2, 2));
}

/// Every `/admin/*` route needs the token; malformed invalidations are refused whole (400) and
/// change nothing; a valid event invalidates its tags and is audited with source and tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_auth_validation_and_audit() {
    let origin = origin();
    let gw = start(&origin).await;
    let since = now_ms();
    let (v1, v2) = ("/api/vendors/a1", "/api/vendors/a2");
    fill(&gw, v1).await;
    fill(&gw, v2).await;
    let all = json!({"tags": ["vendors"]}).to_string();

    for (method, path) in [
        ("POST", "/admin/invalidate"),
        ("GET", "/admin/purges"),
        ("POST", "/admin/purges/retry"),
        ("GET", "/admin/audit"),
        ("GET", "/admin/events"),
    ] {
        for token in [None, Some("wrong-token-of-enough-length")] {
            let r = admin(&gw, method, path, token, &all).await;
            assert_eq!(
                r.status,
                401,
                "{method} {path} with token {token:?}: {:?}",
                r.text()
            );
        }
    }
    assert_hit(&gw.get(v1).await, "after unauthenticated invalidations");

    // (what, body, the error's code, the input it names)
    let malformed: [(&str, &str, &str, Option<&str>); 8] = [
        ("not JSON", "{\"tags\": [\"vendors\"", "invalid_json", None),
        (
            "unknown key",
            r#"{"tagz": ["vendors"]}"#,
            "invalid_json",
            Some("tagz"),
        ),
        (
            "unknown key next to a valid tag",
            r#"{"tags": ["vendors"], "hard": true}"#,
            "invalid_json",
            Some("hard"),
        ),
        (
            "unknown event",
            r#"{"events": [{"name": "no_such_event", "params": {}}]}"#,
            "invalid_field",
            Some("events[0].name"),
        ),
        (
            "missing event parameter",
            r#"{"tags": ["vendors"], "events": [{"name": "availability_changed", "params": {}}]}"#,
            "invalid_field",
            Some("events[0].params"),
        ),
        (
            "relative URL",
            r#"{"tags": ["vendors"], "urls": ["/api/vendors/a1"]}"#,
            "invalid_field",
            Some("urls[0]"),
        ),
        // A tag with a space is a valid purge since issue 9 (it is escaped as entries carry
        // it); an empty one is not.
        (
            "empty tag",
            r#"{"tags": ["vendors", ""]}"#,
            "invalid_field",
            Some("tags[1]"),
        ),
        (
            "tags not a list",
            r#"{"tags": "vendors"}"#,
            "invalid_json",
            Some("tags"),
        ),
    ];
    for (what, body, code, field) in malformed {
        let r = admin(&gw, "POST", "/admin/invalidate", Some(TOKEN), body).await;
        assert_eq!(r.status, 400, "{what} ({body}): {:?}", r.text());
        let err = json_of(&r, what);
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{what}: a 400 says why: {err}"
        );
        assert_eq!(
            err["error"]["field"].as_str(),
            field,
            "{what}: a 400 names the input at fault: {err}"
        );
        assert_eq!(err["error"]["code"], code, "{what}: {err}");
        assert_hit(&gw.get(v1).await, &format!("{v1} after a 400 ({what})"));
        assert_hit(&gw.get(v2).await, &format!("{v2} after a 400 ({what})"));
    }
    assert_eq!((origin.count(v1), origin.count(v2)), (1, 1));
    let records = audit(&gw, since).await;
    assert!(
        records.is_empty(),
        "refused invalidations are not audited: {records:?}"
    );
    assert_eq!(
        admin_tag_invalidations(&gw).await,
        0.0,
        "nothing was invalidated yet"
    );

    let answer = invalidate(
        &gw,
        json!({"events": [{"name": "availability_changed", "params": {"vendorId": "a1"}}]}),
    )
    .await;
    assert_eq!(answer["tags"], json!(2), "answer {answer}");
    let id = answer["id"].as_str().expect("an id").to_string();
    assert_purged(&gw.get(v1).await, "vendor a1 after the event");
    // invalidate_on = ["availability_change"]: every vendor entry carries it.
    assert_purged(&gw.get(v2).await, "vendor a2 after the event");

    let records = audit(&gw, since).await;
    assert_eq!(records.len(), 1, "one audited invalidation: {records:?}");
    let rec = &records[0];
    assert_eq!(rec["id"], json!(id), "{rec}");
    assert_eq!(rec["source"], json!("admin"), "{rec}");
    assert_eq!(
        strings(&rec["tags"]),
        ["availability_change", "vendor:a1"],
        "{rec}"
    );
    assert_eq!(strings(&rec["events"]), ["availability_changed"], "{rec}");
    assert_eq!(rec["soft"], json!(false), "{rec}");
    let at = rec["at_ms"].as_u64().expect("at_ms");
    assert!(
        at >= since && at <= now_ms(),
        "at_ms {at} is when it happened"
    );
    assert!(
        audit(&gw, now_ms() + 60_000).await.is_empty(),
        "since= filters by time"
    );
    assert_eq!(
        admin_tag_invalidations(&gw).await,
        2.0,
        "two tags invalidated by admin"
    );
}

async fn admin_tag_invalidations(gw: &Gateway) -> f64 {
    gw.metric(
        "aisle_invalidations_total",
        &[("source", "admin"), ("kind", "tag")],
    )
    .await
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The live event stream
// ---------------------------------------------------------------------------

/// A `GET /admin/events` server-sent-events stream, read incrementally.
struct EventStream {
    resp: reqwest::Response,
    buf: String,
    /// Every `invalidation` record read so far, in order.
    seen: Vec<Value>,
}

impl EventStream {
    async fn open(gw: &Gateway) -> EventStream {
        // No overall timeout: the stream stays open; every read below has a deadline.
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client
                .get(gw.admin_url("/admin/events"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .send(),
        )
        .await
        .expect("GET /admin/events answers within 5 s")
        .expect("GET /admin/events");
        assert_eq!(resp.status().as_u16(), 200, "GET /admin/events status");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        let mut s = EventStream {
            resp,
            buf: String::new(),
            seen: Vec::new(),
        };
        // The stream's opening comment: the subscription is in place once it arrived.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.buf.contains("\n\n") {
            s.read_more(deadline, "the event stream's first message")
                .await;
        }
        s
    }

    async fn read_more(&mut self, deadline: Instant, what: &str) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.resp.chunk()).await {
            Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => panic!(
                "the event stream ended while waiting for {what}: {:?}",
                self.buf
            ),
            Ok(Err(e)) => panic!("reading the event stream for {what}: {e}"),
            Err(_) => panic!(
                "timed out waiting for {what}; stream so far: {:?}",
                self.buf
            ),
        }
    }

    /// Reads events until an `invalidation` whose JSON data satisfies `pred`; returns it.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let message: String = self.buf.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = String::new();
                for line in message.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event != "invalidation" {
                    continue;
                }
                let v: Value = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event data {data:?} is not JSON: {e}"));
                self.seen.push(v.clone());
                if pred(&v) {
                    return v;
                }
            }
            self.read_more(deadline, what).await;
        }
    }
}

/// An invalidation made after connecting shows up on the stream as `event: invalidation` with
/// the audit record as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_shows_invalidations_as_they_happen() {
    let origin = origin();
    let gw = start(&origin).await;
    let mut events = EventStream::open(&gw).await;

    let answer = invalidate(&gw, json!({"tags": ["sse-tag"], "soft": true})).await;
    let id = answer["id"].as_str().expect("an id").to_string();
    let rec = events
        .wait_for("the invalidation made after connecting", |d| {
            d["id"] == json!(id)
        })
        .await;
    assert_eq!(rec["source"], json!("admin"), "{rec}");
    assert_eq!(strings(&rec["tags"]), ["sse-tag"], "{rec}");
    assert_eq!(rec["soft"], json!(true), "{rec}");

    // A second one, through PURGE, arrives on the same stream.
    let r = gw
        .request("PURGE", "/", &[("Surrogate-Key", "sse-second")])
        .await;
    assert_eq!(r.status, 200);
    let rec = events
        .wait_for("the PURGE made after connecting", |d| {
            strings(&d["tags"]) == ["sse-second"]
        })
        .await;
    assert_eq!(rec["source"], json!("purge-method"), "{rec}");
}
