//! `gateway.toml` as the operator wrote it: serde structs that mirror the file, with positions
//! (`Spanned`) kept on every value a later check may complain about.
//!
//! Nothing here is checked beyond TOML types and unknown keys (`deny_unknown_fields`); the
//! compiled form and its checks are in [`super`] (ripgrep splits its `lowargs` from `hiargs` the
//! same way), so what the user wrote and what the gateway runs on are never the same type.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    pub(super) redis: Option<Spanned<RawRedis>>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) webhooks: BTreeMap<String, Spanned<RawWebhook>>,
    #[serde(default)]
    pub(super) purge: RawPurge,
    /// Its tables as written are in [`super::cdn`], which is also parsed on its own.
    pub(super) cdn: Option<super::cdn::CdnConfig>,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) protection: Vec<Spanned<super::protection::RawProtection>>,
    #[serde(default)]
    pub(super) season: Vec<Spanned<super::season::RawSeason>>,
    /// Scheduled warm jobs (issue 15), checked in [`super::warm`].
    #[serde(default)]
    pub(super) warm: Vec<Spanned<super::warm::RawWarm>>,
    /// `[region]` and its peers (issue 15), checked in [`super::region`].
    pub(super) region: Option<Spanned<super::region::RawRegion>>,
}

/// `[log]`: the access log.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) access: Option<bool>,
    pub(super) format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<Spanned<String>>,
    pub(super) cluster: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) encryption_key: Option<Spanned<String>>,
    pub(super) previous_keys: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Spanned<String>,
    pub(super) admin_listen: Spanned<String>,
    pub(super) default_upstream: Option<Spanned<String>>,
    pub(super) threads: Option<usize>,
    pub(super) grace_period: Option<Spanned<String>>,
    pub(super) watch: Option<bool>,
    pub(super) upgrade_socket: Option<Spanned<String>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) trusted_clients: Option<Vec<Spanned<String>>>,
    pub(super) header_timeout: Option<Spanned<String>>,
    pub(super) keepalive_timeout: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_connections_per_client: Option<Spanned<i64>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) h2c: Option<bool>,
}

/// `[server] tls = { cert = "...", key = "..." }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) memory: Option<Spanned<String>>,
    pub(super) max_object: Option<Spanned<String>>,
    pub(super) rules_dir: Option<Spanned<String>>,
    pub(super) lock_timeout: Option<Spanned<String>>,
    pub(super) max_ttl: Option<Spanned<String>>,
    pub(super) heuristic_max: Option<Spanned<String>>,
    pub(super) key_secret: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) token: Option<Spanned<String>>,
    pub(super) purge_allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) secret: Spanned<String>,
    pub(super) signature: Spanned<String>,
    pub(super) header: Option<Spanned<String>>,
    pub(super) tolerance: Option<Spanned<String>>,
    pub(super) max_body: Option<Spanned<String>>,
    pub(super) id: Option<String>,
    #[serde(default)]
    pub(super) map: Vec<Spanned<RawMap>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMap {
    #[serde(rename = "type")]
    pub(super) type_pointer: Spanned<String>,
    pub(super) when: String,
    pub(super) fire: RawFire,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFire {
    pub(super) event: Spanned<String>,
    #[serde(default)]
    pub(super) params: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPurge {
    pub(super) dir: Option<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) give_up_after: Option<Spanned<String>>,
    pub(super) backoff_base: Option<Spanned<String>>,
    pub(super) backoff_max: Option<Spanned<String>>,
    pub(super) lease: Option<Spanned<String>>,
    pub(super) instance_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    /// One address; `urls` for several (exactly one of the two).
    pub(super) url: Option<Spanned<String>>,
    pub(super) urls: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) read_timeout: Option<Spanned<String>>,
    pub(super) stale_after: Option<Spanned<String>>,
    pub(super) host: Option<Spanned<String>>,
    /// Values may hold secrets (`${VAR}`): never printed.
    pub(super) set_headers: Option<BTreeMap<String, Spanned<String>>>,
    pub(super) remove_headers: Option<Vec<Spanned<String>>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_cert: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<String>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) health_check: Option<Spanned<RawHealthCheck>>,
    pub(super) resolve_every: Option<Spanned<String>>,
    pub(super) retries: Option<Spanned<u32>>,
    pub(super) max_connections: Option<Spanned<u32>>,
    /// `quota = { requests, per, burst, on_exhausted, fleet_size }`: see [`super::upstream`].
    pub(super) quota: Option<Spanned<super::upstream::RawQuota>>,
}

/// `health_check = { path, interval, timeout, unhealthy_after, healthy_after }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub(super) path: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) unhealthy_after: Option<Spanned<u32>>,
    pub(super) healthy_after: Option<Spanned<u32>>,
}
