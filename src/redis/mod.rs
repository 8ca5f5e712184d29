//! The one owner of the Redis connection: every domain that keeps state in Redis goes through here.
//!
//! Aisle keeps several kinds of state in one Redis (or Redis Cluster): cached entries and their
//! fill locks, the URI index, the invalidation channel, purge epochs, the durable purge queue, the
//! audit log and webhook replay ids. They share one multiplexed connection ([`Redis`]), one
//! circuit breaker (after a few consecutive failures Redis is skipped until a probe succeeds, so
//! an outage costs a request at most one timeout) and two time budgets (the configured `timeout`
//! on the request path, a longer one for work off it).
//!
//! Each domain keeps its own key layout, but claims the start of its keys here first
//! ([`Redis::keyspace`]): it gets a [`Keyspace`] that builds `{prefix}<tag>...` keys, and two
//! domains whose tags are equal or one a prefix of the other are refused when the gateway starts,
//! before they could ever overwrite each other's keys. The configured prefix itself stays private
//! to this module, so no key is built from it anywhere else.
//!
//! Layer 4: imports only config, metrics and clock.

mod breaker;
mod conn;
mod keyspace;

pub use conn::Redis;
pub use keyspace::Keyspace;
