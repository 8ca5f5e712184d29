//! Graceful shutdown (issue 10 item 9): `SIGTERM` stops accepting at once and lets requests and
//! streams in flight finish within `[server] grace_period`; before, the process exited about 1 s
//! after the signal and a streamed answer was cut after its first bytes with status 200.

use crate::harness::*;
use bytes::Bytes;
use std::time::{Duration, Instant};

fn config(origin_url: &str, grace: &str) -> String {
    format!(
        r#"[server]
listen = "{{listen}}"
admin_listen = "{{admin}}"
grace_period = "{grace}"

[cache]
memory = "16MiB"
max_object = "1MiB"
rules_dir = "rules"

[upstreams.api]
url = "{origin_url}"
connect_timeout = "2s"
read_timeout = "20s"
"#
    )
}

/// A stream that still has 2 s to run when `SIGTERM` arrives reaches its client whole, then the
/// process exits by itself, once the grace period is over.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_stream_in_flight_finish() {
    let held = Gate::new();
    let gate = held.clone();
    let origin = StreamOrigin::start(move |_req| {
        StreamResponse::sse(vec![
            Step::Chunk(Bytes::from_static(b"data: first\n\n")),
            Step::Wait(gate.clone()),
            // The slow rest of an AI answer: longer than the old 1 s grace.
            Step::Sleep(Duration::from_millis(2_500)),
            Step::Chunk(Bytes::from_static(b"data: second\n\n")),
            Step::Chunk(Bytes::from_static(b"data: [DONE]\n\n")),
        ])
    });
    let mut gw = Gateway::start(&config(&origin.url(), "6s"), &[]).await;
    let (mut resp, mut got) = start_stream(&gw, "/v1/stream").await;
    assert_eq!(got, b"data: first\n\n");

    let signalled = Instant::now();
    gw.terminate();
    // The listener closes at once: new connections are refused (they belong to a new process).
    poll_until(Duration::from_secs(5), "the listener to close", || {
        let addr = gw.listen();
        async move {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .is_err()
                .then_some(())
        }
    })
    .await;
    held.open();
    read_rest(&mut resp, &mut got, signalled, "after SIGTERM").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "data: first\n\ndata: second\n\ndata: [DONE]\n\n",
        "the whole stream, after SIGTERM"
    );
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the gateway exits after its grace period");
    assert!(status.success(), "a graceful exit: {status}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "exited {took:?} after SIGTERM, while a stream was in flight"
    );
}
