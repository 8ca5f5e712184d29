//! Attacks that held up when issue 9 was filed, kept so they keep holding: request smuggling
//! through ambiguous framing, and hop-by-hop headers a client nominates. Each sends raw bytes
//! and checks what the origin received: a smuggled request must never reach it.

use std::time::Duration;

use crate::harness::hostile::framework_origin;
use crate::harness::*;

const RAW: Duration = Duration::from_secs(10);

async fn gateway(origin: &Origin) -> Gateway {
    Gateway::start(&config_for(&origin.url()), &[]).await
}

/// Sends `request`, then a well-formed request of its own (`after`, a path never asked before, so
/// it goes upstream, typically on the pooled connection the attack used: where a desync between
/// the gateway's framing and the origin's would surface as an extra request); returns the paths
/// the origin saw.
async fn origin_paths_after(
    gw: &Gateway,
    origin: &Origin,
    request: &str,
    after: &str,
) -> Vec<String> {
    let _ = tokio::time::timeout(RAW, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.listen()).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
    })
    .await;
    // A well-formed request afterwards, so the origin has certainly seen all it was going to.
    let answer = gw.get(after).await;
    assert_eq!(answer.status, 200, "the gateway still serves");
    assert_eq!(origin.count(after), 1, "{after} went upstream");
    origin.requests().into_iter().map(|r| r.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_smuggles_nothing() {
    let origin = framework_origin();
    let gw = gateway(&origin).await;
    let cases = [
        // Content-Length and Transfer-Encoding together (CL.TE / TE.CL).
        "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled-1 HTTP/1.1\r\nHost: h\r\n\r\n",
        // Two different Content-Length values.
        "POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 44\r\nConnection: close\r\n\r\nGET /smuggled-2 HTTP/1.1\r\nHost: h\r\n\r\n",
        // An obfuscated Transfer-Encoding.
        "POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled-3 HTTP/1.1\r\nHost: h\r\n\r\n",
        // Whitespace before the colon.
        "POST /d HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled-4 HTTP/1.1\r\nHost: h\r\n\r\n",
        // A signed or padded Content-Length.
        "POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: +4\r\nConnection: close\r\n\r\nGET /smuggled-5 HTTP/1.1\r\nHost: h\r\n\r\n",
        "POST /f HTTP/1.1\r\nHost: h\r\nContent-Length: 4, 40\r\nConnection: close\r\n\r\nGET /smuggled-6 HTTP/1.1\r\nHost: h\r\n\r\n",
        // Transfer-Encoding with a coding before chunked, and chunked twice.
        "POST /g HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled-7 HTTP/1.1\r\nHost: h\r\n\r\n",
        "POST /h HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled-8 HTTP/1.1\r\nHost: h\r\n\r\n",
        // A chunk size that overflows, and one with an extension hiding a request.
        "POST /i HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\nGET /smuggled-9 HTTP/1.1\r\nHost: h\r\n\r\n",
        "POST /j HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;x=\"a\r\nGET /smuggled-10 HTTP/1.1\"\r\nabc\r\n0\r\n\r\n",
        // A bare LF line end and an obs-fold continuation.
        "POST /k HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nContent-Length: 4\nConnection: close\n\n0\n\nGET /smuggled-11 HTTP/1.1\nHost: h\n\n",
        "POST /l HTTP/1.1\r\nHost: h\r\nX-Pad: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 4\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled-12 HTTP/1.1\r\nHost: h\r\n\r\n",
        // A GET with a body the gateway must not read as the next request.
        "GET /m HTTP/1.1\r\nHost: h\r\nContent-Length: 38\r\nConnection: close\r\n\r\nGET /smuggled-13 HTTP/1.1\r\nHost: h\r\n\r\n",
        // HTTP/1.0 with Transfer-Encoding (no chunked framing in 1.0).
        "POST /n HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled-14 HTTP/1.1\r\nHost: h\r\n\r\n",
    ];
    for (i, case) in cases.iter().enumerate() {
        let paths = origin_paths_after(&gw, &origin, case, &format!("/after-{i}")).await;
        assert!(
            !paths.iter().any(|p| p.starts_with("/smuggled")),
            "case {i}: a smuggled request reached the origin: {paths:?}"
        );
    }
}

/// Two `Host` lines disagree on which site the request is for: refused, never routed or keyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_lines_are_refused() {
    let origin = framework_origin();
    let gw = gateway(&origin).await;
    let r = raw_request(
        gw.listen(),
        b"GET /two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        RAW,
    )
    .await;
    assert_eq!(r.status, 400, "two Host lines");
    assert!(origin.requests_for("/two-hosts").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_nominated_hop_by_hop_headers_do_not_reach_the_origin() {
    let origin = framework_origin();
    let gw = gateway(&origin).await;
    let r = raw_request(
        gw.listen(),
        b"GET /hop HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n\r\n",
        RAW,
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = origin.requests_for("/hop");
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].header("x-secret-hop").is_none(),
        "a header the client listed in Connection is hop-by-hop (RFC 9110 §7.6.1)"
    );
}
