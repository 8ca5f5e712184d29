//! Aisle: a rules-driven caching gateway for HTTP APIs, built on Pingora.
//!
//! The crate is layered the way a request flows through it, so that each question has one
//! place to look:
//!
//! | question                               | module            |
//! |----------------------------------------|-------------------|
//! | what does the operator's config say?   | [`config`]        |
//! | whose forwarding / `Aisle-*` headers count? | [`trust`]    |
//! | which rule does a request match?       | [`rules`]         |
//! | how is a cache key built?              | [`key`]           |
//! | may this be stored / served (RFC 9111)?| [`policy`]        |
//! | who owns the Redis connection and keys?| [`redis`]         |
//! | where do cached bytes live?            | [`storage`]       |
//! | what does `Cache-Status` say?          | [`cache_status`]  |
//! | the request phases (Pingora hooks)     | [`proxy`]         |
//! | `/metrics`, `/healthz`                 | [`admin`], [`metrics`] |
//! | warm jobs: preloading the cache        | [`warm`]          |
//! | wiring it all into a Pingora server    | [`server`]        |
//!
//! Configuration is compiled once at load time ([`config::Config::load`]) into matchers
//! and key builders; the request path only reads the compiled form.

pub mod admin;
pub mod admission;
pub mod alloc;
pub mod api_error;
pub mod clock;
pub mod config;
pub mod control;
pub mod diag;
pub mod invalidation;
pub mod key;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod purge;
pub mod redis;
pub mod reload;
pub mod rules;
pub mod server;
pub mod statedir;
pub mod storage;
pub mod tools;
pub mod trust;
pub mod units;
pub mod usage;
pub mod warm;

#[cfg(test)]
mod fuzz;
