//! The floor of `compare.sh` on this machine: a bare pingora proxy service that answers every
//! request itself, with a fixed body of the size the scenario asks for, and caches nothing.
//!
//! Issue 16 measures Aisle's hits against nginx; this says how much of a hit is pingora's own
//! (reading the request, writing the answer, the runtime) and so how much is left to Aisle.
//! Run it as the gateway of `../shared/bench/compare.sh` (README "Performance"):
//!
//! ```sh
//! cargo build --release --example bare_pingora
//! ../shared/bench/compare.sh -- target/release/examples/bare_pingora
//! ```
//!
//! `/bench/64k/*` gets 64 KiB, anything else 1 KiB, with `Cache-Control` as the origin sends it;
//! `/pass/*` is proxied to compare.sh's origin (127.0.0.1:17490) with no hook of its own, the
//! floor of the `pass` scenario. One worker thread on 127.0.0.1:17480, like
//! `benches/compare.toml`.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare {
    small: Bytes,
    large: Bytes,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let path = session.req_header().uri.path();
        let (body, cache_control) = if path.starts_with("/bench/64k/") {
            (self.large.clone(), "public, max-age=3600")
        } else if path.starts_with("/pass/") {
            return Ok(false);
        } else {
            (self.small.clone(), "public, max-age=3600")
        };
        let mut resp = ResponseHeader::build(200, Some(4))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len())?;
        resp.insert_header("cache-control", cache_control)?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            "127.0.0.1:17490",
            false,
            String::new(),
        )))
    }
}

fn main() {
    let conf = ServerConf {
        threads: 1,
        // Exit promptly on SIGTERM, as the gateway does in the benchmarks: pingora's default
        // grace period (minutes) outlived the scripts that started it and kept its port.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let bare = Bare {
        small: Bytes::from(vec![b'a'; 1024]),
        large: Bytes::from(vec![b'b'; 65536]),
    };
    let mut service = http_proxy_service(&server.configuration, bare);
    service.add_tcp("127.0.0.1:17480");
    server.add_service(service);
    server.run_forever();
}
