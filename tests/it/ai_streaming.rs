//! Streamed (server-sent events) answers of a body-keyed POST rule: relayed
//! as they arrive, stored whole, replayed identically; a broken stream is not
//! stored; concurrent identical requests share one origin stream and see its
//! events as they are produced.
//!
//! The origin is a hand-written HTTP/1.1 server that writes each event as one
//! chunk and, where a test needs to prove ordering, waits for a `Gate` the
//! test opens: while it is closed the origin cannot have sent what follows.

use std::time::Duration;

use crate::harness::fixtures;
use crate::harness::*;
use bytes::Bytes;

const CHAT: &str = "/v1/chat/completions";

/// How long any one read may take.
const READ: Duration = Duration::from_secs(10);

fn config(origin_url: &str) -> String {
    let base = r#"[server]
listen = "{listen}"
admin_listen = "{admin}"

[cache]
memory = "64MiB"
max_object = "8MiB"
rules_dir = "rules"

[upstreams.openai]
url = "ORIGIN"
connect_timeout = "2s"
read_timeout = "10s"
"#;
    base.replace("ORIGIN", origin_url)
}

async fn start_gateway(origin: &StreamOrigin) -> Gateway {
    Gateway::start(
        &config(&origin.url()),
        &[("rules.toml", fixtures::CHAT_RULES)],
    )
    .await
}

fn event(i: usize) -> Bytes {
    Bytes::from(format!(
        "id: {i}\nevent: delta\ndata: {{\"index\":{i},\"delta\":\"token-{i} \"}}\n\n"
    ))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// The whole stream: events 1..=n then `[DONE]`.
fn whole(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.extend_from_slice(&event(i));
    }
    out.extend_from_slice(DONE);
    out
}

fn body(prompt: &str) -> String {
    format!(
        r#"{{"model":"m-1","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    )
}

/// Send a streaming POST and return as soon as the response head is in.
async fn start_post(gw: &Gateway, body: &str) -> reqwest::Response {
    let send = gw
        .client()
        .post(gw.url(CHAT))
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body.to_string())
        .send();
    match tokio::time::timeout(READ, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("POST {CHAT}: {e:?}"),
        Err(_) => panic!("POST {CHAT}: no response head within {READ:?}"),
    }
}

fn cache_status(r: &reqwest::Response) -> String {
    let value = r
        .headers()
        .get("cache-status")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    assert_valid_cache_status(&value);
    value
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// The `id:` numbers of the events in `text`, in order.
fn event_ids(text: &[u8]) -> Vec<usize> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().expect("numeric id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_is_relayed_as_it_arrives_and_a_hit_replays_it() {
    let gate = Gate::new();
    let held = gate.clone();
    let origin = StreamOrigin::start(move |_req| {
        StreamResponse::sse(vec![
            Step::Chunk(event(1)),
            Step::Chunk(event(2)),
            Step::Wait(held.clone()),
            Step::Chunk(event(3)),
            Step::Sleep(Duration::from_millis(20)),
            Step::Chunk(event(4)),
            Step::Chunk(Bytes::from_static(DONE)),
        ])
    });
    let gw = start_gateway(&origin).await;
    let sent = body("stream me");

    let mut resp = start_post(&gw, &sent).await;
    assert_eq!(resp.status().as_u16(), 200);
    let cs = cache_status(&resp);
    assert!(
        cs.starts_with("aisle; fwd="),
        "first request: expected a miss, got {cs:?}"
    );
    assert!(
        content_type(&resp).starts_with("text/event-stream"),
        "content-type {:?}",
        content_type(&resp)
    );

    let mut buf = Vec::new();
    read_until_contains(
        &mut resp,
        &mut buf,
        &event(2),
        READ,
        "events 1 and 2 of the miss",
    )
    .await;
    // The origin is still held before event 3: what the client has was relayed
    // as it arrived.
    assert!(!gate.is_open());
    assert_eq!(
        origin.chunks_sent(0),
        2,
        "the origin sent exactly events 1 and 2 so far"
    );
    assert_eq!(buf, whole(2)[..buf.len()].to_vec(), "events 1, 2 in order");
    assert!(
        !buf.windows(b"id: 3".len()).any(|w| w == b"id: 3"),
        "event 3 cannot have arrived yet: {:?}",
        String::from_utf8_lossy(&buf)
    );

    gate.open();
    read_to_end(&mut resp, &mut buf, READ)
        .await
        .unwrap_or_else(|e| panic!("miss: {e}; got {:?}", String::from_utf8_lossy(&buf)));
    assert_eq!(
        String::from_utf8_lossy(&buf),
        String::from_utf8_lossy(&whole(4)),
        "the miss relays the whole stream"
    );
    assert_eq!(origin.total(), 1);
    assert_eq!(
        origin.requests()[0].body,
        sent.as_bytes(),
        "request body forwarded untouched"
    );

    // The hit replays the same bytes, in the same order, without the origin.
    let hit = post_json(&gw, CHAT, &[], sent.clone()).await;
    assert_eq!(hit.status, 200);
    assert!(
        hit.is_hit(),
        "second request: expected a hit, got {:?}",
        hit.cache_status()
    );
    assert!(
        hit.header("content-type")
            .unwrap_or_default()
            .starts_with("text/event-stream"),
        "hit content-type {:?}",
        hit.header("content-type")
    );
    assert_eq!(
        hit.body.as_ref(),
        buf.as_slice(),
        "the hit replays the stored stream byte for byte"
    );
    assert_eq!(event_ids(&hit.body), vec![1, 2, 3, 4]);
    assert_eq!(origin.total(), 1, "a hit does not reach the origin");

    // An equivalent body (ignored field, other order) is the same entry.
    let equivalent = r#"{"messages":[{"content":"stream me","role":"user"}],"stream":true,"model":"m-1","stream_options":{"include_usage":true}}"#;
    let hit = post_json(&gw, CHAT, &[], equivalent).await;
    assert!(hit.is_hit(), "equivalent body: {:?}", hit.cache_status());
    assert_eq!(hit.body.as_ref(), buf.as_slice());
    assert_eq!(origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_stream_is_not_stored() {
    // The first answer breaks after event 1 (connection closed without the
    // final chunk, once the client has event 1); later ones are complete.
    let gate = Gate::new();
    let held = gate.clone();
    let origin = StreamOrigin::start(move |req| {
        if req.count == 1 {
            StreamResponse::sse(vec![
                Step::Chunk(event(1)),
                Step::Wait(held.clone()),
                Step::Abort,
            ])
        } else {
            StreamResponse::sse(vec![
                Step::Chunk(event(1)),
                Step::Chunk(event(2)),
                Step::Chunk(Bytes::from_static(DONE)),
            ])
        }
    });
    let gw = start_gateway(&origin).await;
    let sent = body("break me");

    let mut resp = start_post(&gw, &sent).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = Vec::new();
    read_until_contains(
        &mut resp,
        &mut buf,
        &event(1),
        READ,
        "event 1 of the broken stream",
    )
    .await;
    gate.open();
    let end = read_to_end(&mut resp, &mut buf, READ).await;
    assert!(
        end.is_err(),
        "the client must see the stream break, not a clean end; got {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(origin.total(), 1);

    let second = post_json(&gw, CHAT, &[], sent.clone()).await;
    assert_eq!(second.status, 200);
    assert!(
        !second.is_hit(),
        "a broken stream must not be stored; second request got Cache-Status {:?} and body {:?}",
        second.cache_status(),
        second.text()
    );
    assert_eq!(origin.total(), 2, "the second request reached the origin");
    assert_eq!(second.body.as_ref(), whole(2).as_slice());

    let third = post_json(&gw, CHAT, &[], sent).await;
    assert!(
        third.is_hit(),
        "the complete stream was stored: {:?}",
        third.cache_status()
    );
    assert_eq!(third.body.as_ref(), whole(2).as_slice());
    assert_eq!(origin.total(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_streams_share_one_origin_request() {
    let gate = Gate::new();
    let held = gate.clone();
    let origin = StreamOrigin::start(move |_req| {
        StreamResponse::sse(vec![
            Step::Chunk(event(1)),
            Step::Wait(held.clone()),
            Step::Chunk(event(2)),
            Step::Chunk(event(3)),
            Step::Chunk(Bytes::from_static(DONE)),
        ])
    });
    let gw = start_gateway(&origin).await;
    let sent = body("share me");

    // The first client starts the fill and gets event 1.
    let mut first = start_post(&gw, &sent).await;
    assert_eq!(first.status().as_u16(), 200);
    let mut first_buf = Vec::new();
    read_until_contains(
        &mut first,
        &mut first_buf,
        &event(1),
        READ,
        "first client, event 1",
    )
    .await;
    assert_eq!(origin.total(), 1);

    // Two more identical requests while the origin is held after event 1.
    let mut waiters = Vec::new();
    for i in 0..2 {
        let mut r = start_post(&gw, &sent).await;
        assert_eq!(r.status().as_u16(), 200, "waiter {i}");
        let what = format!(
            "waiter {i}: event 1 while the origin is held (Cache-Status {:?})",
            cache_status(&r)
        );
        let mut buf = Vec::new();
        read_until_contains(&mut r, &mut buf, &event(1), READ, &what).await;
        waiters.push((r, buf));
    }
    // Everyone has event 1 and the origin has not sent event 2.
    assert!(!gate.is_open());
    assert_eq!(origin.chunks_sent(0), 1);
    assert_eq!(
        origin.total(),
        1,
        "identical streaming requests in flight reach the origin once"
    );

    gate.open();
    let expected = whole(3);
    read_to_end(&mut first, &mut first_buf, READ)
        .await
        .unwrap_or_else(|e| panic!("first client: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&first_buf),
        String::from_utf8_lossy(&expected),
        "first client"
    );
    for (i, (mut r, mut buf)) in waiters.into_iter().enumerate() {
        read_to_end(&mut r, &mut buf, READ)
            .await
            .unwrap_or_else(|e| panic!("waiter {i}: {e}; got {:?}", String::from_utf8_lossy(&buf)));
        assert_eq!(
            String::from_utf8_lossy(&buf),
            String::from_utf8_lossy(&expected),
            "waiter {i}"
        );
    }
    assert_eq!(origin.total(), 1);

    let hit = post_json(&gw, CHAT, &[], sent).await;
    assert!(hit.is_hit(), "afterwards: {:?}", hit.cache_status());
    assert_eq!(hit.body.as_ref(), expected.as_slice());
    assert_eq!(origin.total(), 1);
}

/// Issue 8: a reader that joins a fill still streaming is judged against purge epochs like any
/// other hit. The fill starts, its URI is purged (`PURGE`) while the origin still holds the
/// stream, and a second identical request must not be served that purged stream: it goes to
/// the origin itself (after `lock_timeout`, 1 s here, since the purged fill still holds the
/// in-process lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_joining_a_purged_fill_is_not_served_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gate = Gate::new();
    let held = gate.clone();
    let arrivals = AtomicUsize::new(0);
    let origin = StreamOrigin::start(move |_req| {
        if arrivals.fetch_add(1, Ordering::SeqCst) == 0 {
            // The first fill: event 1, then held until the test opens the gate.
            StreamResponse::sse(vec![
                Step::Chunk(event(1)),
                Step::Wait(held.clone()),
                Step::Chunk(Bytes::from_static(DONE)),
            ])
        } else {
            StreamResponse::sse(vec![
                Step::Chunk(event(7)),
                Step::Chunk(Bytes::from_static(DONE)),
            ])
        }
    });
    let cfg = config(&origin.url()).replace(
        "rules_dir = \"rules\"",
        "rules_dir = \"rules\"\nlock_timeout = \"1s\"",
    ) + "\n[admin]\npurge_allow = [\"127.0.0.1/32\"]\n";
    let gw = Gateway::start(&cfg, &[("rules.toml", fixtures::CHAT_RULES)]).await;
    let sent = body("purged while streaming");

    let mut first = start_post(&gw, &sent).await;
    let mut first_buf = Vec::new();
    read_until_contains(
        &mut first,
        &mut first_buf,
        &event(1),
        READ,
        "first client, event 1",
    )
    .await;

    let purge = gw.request("PURGE", CHAT, &[]).await;
    assert_eq!(purge.status, 200, "PURGE {CHAT}: {:?}", purge.text());

    let mut second = start_post(&gw, &sent).await;
    let cs = cache_status(&second);
    let mut buf = Vec::new();
    read_to_end(&mut second, &mut buf, READ)
        .await
        .unwrap_or_else(|e| panic!("second client ({cs}): {e}"));
    assert!(
        !is_hit(&cs) && !cs.contains("fwd=stale"),
        "a reader joining a purged fill must not be served it; Cache-Status {cs:?}"
    );
    assert!(
        String::from_utf8_lossy(&buf).contains("token-7"),
        "the second client got the origin's new answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(origin.total(), 2, "the second request went to the origin");
    assert!(
        !gate.is_open(),
        "all of this happened while the first fill was held"
    );
    gate.open();
    read_to_end(&mut first, &mut first_buf, READ)
        .await
        .unwrap_or_else(|e| panic!("first client: {e}"));
}

/// Issue 18 item 7: a streamed answer's saving is read from its final usage event when it is
/// stored, so a replayed stream counts the tokens it saved (it counted 0).
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_stream_counts_the_tokens_it_saved() {
    let usage = Bytes::from_static(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n",
    );
    let origin = StreamOrigin::start(move |_req| {
        StreamResponse::sse(vec![
            Step::Chunk(event(1)),
            Step::Chunk(usage.clone()),
            Step::Chunk(Bytes::from_static(DONE)),
        ])
    });
    let rules = format!(
        "{}cost = {{ per_request = 0.002, tokens = \"/usage/total_tokens\", per_1k_tokens = 0.01 }}\n",
        fixtures::CHAT_RULES
    );
    let gw = Gateway::start(&config(&origin.url()), &[("rules.toml", &rules)]).await;
    let sent = body("count my tokens");
    let miss = start_post(&gw, &sent).await;
    assert!(!cache_status(&miss).contains("hit"));
    miss.bytes().await.expect("the whole stream");
    let saved = || async {
        gw.metric("aisle_tokens_saved_total", &[("rule", "chat")])
            .await
            .unwrap_or(0.0)
    };
    // The fill is stored once the stream ends; then a replay counts what it saved.
    let replay = poll_until(Duration::from_secs(10), "a replayed stream", || async {
        let r = start_post(&gw, &sent).await;
        let hit = is_hit(&cache_status(&r));
        let _ = r.bytes().await;
        hit.then_some(())
    })
    .await;
    let () = replay;
    // Counted when the request's log phase runs, just after its last byte.
    let tokens = poll_until(Duration::from_secs(5), "the saving counted", || async {
        let n = saved().await;
        (n > 0.0).then_some(n)
    })
    .await;
    assert_eq!(tokens, 12.0, "the final usage event's total_tokens");
    assert_eq!(origin.total(), 1);
}
