//! The one integration-test binary (`cargo test --test it`), laid out as ripgrep lays out its
//! tests: one module per area, and the shared harness (`harness/`: loopback origins, the real
//! `aisle` binary, Redis servers, fake CDN APIs, rule fixtures) compiled once for all of them.
//!
//! One binary instead of one per file so that the harness is built once, and a helper that no
//! test uses shows up as a dead-code warning instead of hiding behind a blanket `allow`.
//!
//! Every test of every module runs in this one process, in parallel: nothing here may change
//! process-wide state (current directory, shared environment variables, fixed ports) in a way
//! another test could observe. Gateways and Redis servers are child processes on free loopback
//! ports; the library's in-process metrics (`purge_queue`) are read as increases of counters
//! labelled with a name unique to the test.

mod harness;

mod access_log;
mod admission_parity;
mod ai_caching;
mod ai_streaming;
mod attacks;
mod caching;
mod cdn_pipeline;
mod cdn_providers;
mod check_cli;
mod cli;
mod coalescing;
mod coherence;
mod credentials;
mod eviction;
mod fresh_hit;
mod header_patch;
mod hit_ratio;
mod invalidation;
mod listener;
mod monitoring;
mod openapi;
mod prediction;
mod protection;
mod protection_stale;
mod purge_queue;
mod quota;
mod readme;
mod redis_cluster;
mod redis_encryption;
mod redis_tier;
mod refresh_ahead;
mod regions;
mod reload;
mod rfc9111;
mod scripts;
mod seasons;
mod shutdown;
mod stale;
mod structure;
mod upgrade;
mod upstreams;
mod warm;
mod webhooks;
mod write_buffer;
