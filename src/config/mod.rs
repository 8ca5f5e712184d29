//! The gateway configuration (`gateway.toml`) and its compiled form.
//!
//! Loading reads the file with positions kept, expands `${VAR}` from the environment (secrets
//! never live in the repository), checks every value, loads the rules directory, and returns
//! either a [`Config`] ready to serve or every problem found, each as `file:line:col: message`.
//! The compiled config is immutable; a reload builds a new one and swaps it in whole.
//!
//! Shaped like ripgrep's `lowargs` / `hiargs`: `raw` is what the operator wrote (serde structs
//! with spans), this file is what the gateway runs on and the checks between the two; the
//! `[cdn.*]` and `[webhooks.*]` sections have their own files ([`cdn`], [`webhook`]) and `env`
//! is the `${VAR}` leaf. Configuration sits below everything that uses it: it imports only
//! `rules`, `diag` and `units`, and the purge providers and webhook verifier are built from the
//! settings compiled here.

pub mod cdn;
mod env;
pub mod protection;
mod raw;
pub mod region;
pub mod season;
pub mod secret;
pub mod tls;
pub mod upstream;
pub mod warm;
pub mod webhook;

pub use upstream::{Balance, SetHeader, Upstream};

// Re-exported for the operator CLI, which reads `admin_listen` and the token without compiling the rest.
pub(crate) use env::expand_env;

use crate::diag::{Diagnostic, SourceFile};
use crate::rules::{self, RuleSet};
use crate::trust::{Networks, Trust};
use crate::units::{parse_duration, parse_size};
use raw::{RawAdmin, RawConfig, RawRedis};
use secret::redact_url;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A compiled, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    /// The first 16 hex digits of a BLAKE3 digest of `gateway.toml` and every rules file (names
    /// and texts): which configuration is running (`aisle_config_info{hash}`, reload audit).
    pub hash: String,
    pub listen: String,
    pub admin_listen: String,
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// `[server] grace_period`: how long `SIGTERM` lets requests and streams in flight finish
    /// (whole seconds; pingora's grace period).
    pub grace_period: Duration,
    /// `[server] watch` (default true): reload when `gateway.toml` or a rules file changes.
    pub watch: bool,
    /// `[server] upgrade_socket`: where `aisle run --upgrade` receives the listening sockets of
    /// the running process (default `/tmp/aisle-upgrade-<listen port>.sock`).
    pub upgrade_socket: PathBuf,
    pub cache: CacheConfig,
    /// Upstreams in name order; rules refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// The shared tier; `None`: memory tier only.
    pub redis: Option<RedisConfig>,
    pub admin: AdminConfig,
    pub webhooks: BTreeMap<String, webhook::WebhookConfig>,
    pub purge: PurgeConfig,
    /// CDN purge APIs; `None`: no CDN is purged.
    pub cdn: Option<cdn::CdnSettings>,
    pub rules: RuleSet,
    /// `[[protection]]` windows ("Saturday mode"), in file order.
    pub protection: Vec<protection::ProtectionWindow>,
    /// `[[warm]]` scheduled warm jobs, in file order.
    pub warm: Vec<warm::WarmSchedule>,
    /// `[[season]]`s (no two overlap), in file order.
    pub seasons: Vec<season::Season>,
    /// `[server] trusted_proxies` / `trusted_clients`: whose forwarding and control headers count.
    pub trust: Trust,
    /// `[log]`: the access log.
    pub log: LogConfig,
    /// `[server]`'s listener: TLS, HTTP/2 and the downstream limits.
    pub listener: ListenerConfig,
    /// `[region]`: this fleet's region and the peers its invalidations are relayed to.
    pub region: Option<region::RegionConfig>,
}

/// `[server]`'s listener settings: how clients are served and how much of the gateway one
/// (slow or greedy) client may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// `header_timeout` (default 10 s): the TLS handshake, then the whole request header
    /// (HTTP/1), the h2c preface and the HTTP/2 handshake must each complete within it, counted
    /// from the accept (the handshake's end with TLS) on a new connection and from the first
    /// byte on a reused one.
    pub header_timeout: Duration,
    /// `keepalive_timeout` (default 60 s, whole seconds): how long an idle keep-alive
    /// connection waits for its next request; `"0s"` turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// `max_connections` (default 10000; 0: no limit): client connections served at once.
    pub max_connections: usize,
    /// `max_connections_per_client` (default 0: no limit): connections from one client
    /// address served at once.
    pub max_connections_per_client: usize,
    /// `tls = { cert, key }`: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<tls::TlsFiles>,
    /// `h2c` (default false): accept HTTP/2 with prior knowledge on plain TCP.
    pub h2c: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_client: 0,
            tls: None,
            h2c: false,
        }
    }
}

/// `[log]`: one line per request when `access` is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// `[log] access` (default false): one line per request at `info`.
    pub access: bool,
    /// `[log] format`: `logfmt` (default) or `json`.
    pub format: LogFormat,
}

/// How an access-log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` pairs, values quoted when they need it.
    #[default]
    Logfmt,
    /// One JSON object.
    Json,
}

/// `[redis]`: the shared second tier.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` of a single server (empty when `cluster` is set).
    pub url: String,
    /// Seed nodes of a Redis Cluster.
    pub cluster: Vec<String>,
    /// Every key and channel Aisle uses starts with it.
    pub prefix: String,
    /// Per-operation budget on the request path.
    pub timeout: Duration,
    /// AES-256 keys: (current, previous) for `encrypt = true` rules.
    pub keys: Option<([u8; 32], Vec<[u8; 32]>)>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field(
                "keys",
                &self
                    .keys
                    .as_ref()
                    .map(|(_, p)| format!("<redacted>, {} previous", p.len())),
            )
            .finish()
    }
}

/// The largest `max_object`: an entry is held whole in memory, and its weight in 32 bits.
pub const MAX_OBJECT: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Memory tier budget in bytes.
    pub memory: u64,
    /// Responses larger than this are passed through, not stored. At most [`MAX_OBJECT`].
    pub max_object: u64,
    pub rules_dir: PathBuf,
    /// How long a fill may show no sign of life before its waiters stop waiting for it: the
    /// fleet fill lock's lease. A live fill is followed up to its upstream's timeouts.
    pub lock_timeout: Duration,
    /// The longest an entry may live in any tier (freshness and each stale window are capped by
    /// it); purge epochs older than twice this are forgotten.
    pub max_ttl: Duration,
    /// `[cache] heuristic_max`: the longest heuristic freshness (RFC 9111 §4.2.2, default 1 day).
    pub heuristic_max: Duration,
    /// `[cache] key_secret`, derived: what `authorization = "isolate"` hashes credentials with.
    /// `None`: unset (a random per-process key is used, with a warning).
    pub key_secret: Option<rules::CredentialKey>,
}

/// `[admin]`: who may invalidate.
#[derive(Clone, Default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/*` (and `PURGE` from outside `purge_allow`); `None`: admin
    /// invalidation endpoints answer 401 to everyone.
    pub token: Option<String>,
    /// Client networks allowed to send `PURGE` to the proxy listener without the token.
    pub purge_allow: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("purge_allow", &self.purge_allow)
            .finish()
    }
}

/// `[purge]`: the durable CDN purge queue.
#[derive(Debug, Clone)]
pub struct PurgeConfig {
    /// Directory of the local queue (used when Redis is absent or unavailable).
    pub dir: PathBuf,
    /// Failed attempts before an item becomes a dead letter; `None` (the default): no limit,
    /// only `give_up_after`.
    pub max_attempts: Option<u32>,
    /// How long an accepted purge is retried before it becomes a dead letter (default 24h).
    pub give_up_after: Duration,
    /// First retry delay and the cap on it (capped exponential backoff, full jitter).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long a Redis-queue item belongs to the instance sending it (renewed while sending).
    pub lease: Duration,
    /// This instance's identity in the Redis queue; `None`: persisted in `dir/instance-id`.
    pub instance_id: Option<String>,
}

impl Config {
    /// The `[[season]]` on at calendar instant `at_ms` ([`crate::clock::calendar_now_ms`]).
    pub fn season_at(&self, at_ms: u64) -> Option<&season::Season> {
        season::active(&self.seasons, at_ms)
    }

    /// Loads `path` and the rules it points to.
    pub fn load(path: &Path) -> Result<Config, Vec<Diagnostic>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                message: format!("cannot read the configuration: {e}"),
            }]
        })?;
        Self::from_str(path, &text)
    }

    /// Compiles configuration text as if read from `path` (rules_dir is relative to it).
    pub(crate) fn from_str(path: &Path, text: &str) -> Result<Config, Vec<Diagnostic>> {
        let src = SourceFile::new(path, text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![src.toml_error(&e)])?;
        let mut diags = Vec::new();

        let check = |field: &Spanned<String>, what: &str, diags: &mut Vec<Diagnostic>| {
            let v = field.get_ref();
            if v.parse::<std::net::SocketAddr>().is_err() {
                diags.push(src.at(
                    field.span(),
                    format!(
                        "{what} {v:?} is not an address; write IP:PORT, like \"127.0.0.1:8080\""
                    ),
                ));
            }
        };
        check(&raw.server.listen, "listen", &mut diags);
        check(&raw.server.admin_listen, "admin_listen", &mut diags);

        let size = |f: &Option<Spanned<String>>, default: u64, diags: &mut Vec<Diagnostic>| match f
        {
            None => default,
            Some(s) => parse_size(s.get_ref()).unwrap_or_else(|e| {
                diags.push(src.at(s.span(), e));
                default
            }),
        };
        let dur =
            |f: &Option<Spanned<String>>, default: Duration, diags: &mut Vec<Diagnostic>| match f {
                None => default,
                Some(s) => parse_duration(s.get_ref()).unwrap_or_else(|e| {
                    diags.push(src.at(s.span(), e));
                    default
                }),
            };
        let memory = size(&raw.cache.memory, 256 << 20, &mut diags);
        let max_object = size(&raw.cache.max_object, 8 << 20, &mut diags);
        if let Some(s) = raw
            .cache
            .max_object
            .as_ref()
            .filter(|_| max_object > MAX_OBJECT)
        {
            diags.push(src.at(
                s.span(),
                format!(
                    "max_object {:?} is over 1GiB: an entry is held whole in memory (and in one \
                     Redis value); write at most \"1GiB\"",
                    s.get_ref()
                ),
            ));
        }
        let lock_timeout = dur(&raw.cache.lock_timeout, Duration::from_secs(10), &mut diags);
        let base = path.parent().unwrap_or(Path::new("."));
        let max_ttl = dur(&raw.cache.max_ttl, Duration::from_secs(86_400), &mut diags);
        let heuristic_max = dur(
            &raw.cache.heuristic_max,
            Duration::from_secs(86_400),
            &mut diags,
        );
        let key_secret = key_secret(&src, raw.cache.key_secret.as_ref(), &mut diags);
        let log = LogConfig {
            access: raw.log.access.unwrap_or(false),
            format: match raw.log.format.as_ref().map(|f| f.get_ref().as_str()) {
                None | Some("logfmt") => LogFormat::Logfmt,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    let span = raw
                        .log
                        .format
                        .as_ref()
                        .map(|f| f.span())
                        .unwrap_or_default();
                    diags.push(src.at(
                        span,
                        format!("[log] format = {other:?} is not a log format; write \"logfmt\" or \"json\""),
                    ));
                    LogFormat::Logfmt
                }
            },
        };
        let upgrade_socket = match &raw.server.upgrade_socket {
            Some(p) => base.join(p.get_ref()),
            None => {
                let port = raw
                    .server
                    .listen
                    .get_ref()
                    .rsplit(':')
                    .next()
                    .unwrap_or("0")
                    .to_string();
                PathBuf::from(format!("/tmp/aisle-upgrade-{port}.sock"))
            }
        };
        let protection = protection::compile(&src, &raw.protection, &mut diags);
        let seasons = season::compile(&src, &raw.season, &mut diags);
        let grace_period = dur(
            &raw.server.grace_period,
            Duration::from_secs(10),
            &mut diags,
        );
        let listener = listener_config(&src, &raw.server, base, &mut diags);
        let admin = admin_config(&src, &raw.admin, &mut diags);
        let trust = Trust {
            proxies: networks(&src, raw.server.trusted_proxies.as_deref(), &mut diags),
            clients: networks(&src, raw.server.trusted_clients.as_deref(), &mut diags),
        };
        let purge = PurgeConfig {
            dir: raw
                .purge
                .dir
                .as_ref()
                .map_or_else(|| base.join("purge-queue"), |d| base.join(d)),
            max_attempts: raw.purge.max_attempts.map(|n| n.max(1)),
            give_up_after: dur(
                &raw.purge.give_up_after,
                Duration::from_secs(86_400),
                &mut diags,
            ),
            backoff_base: dur(
                &raw.purge.backoff_base,
                Duration::from_millis(500),
                &mut diags,
            ),
            backoff_max: dur(&raw.purge.backoff_max, Duration::from_secs(60), &mut diags),
            lease: dur(&raw.purge.lease, Duration::from_secs(15), &mut diags),
            instance_id: raw
                .purge
                .instance_id
                .clone()
                .filter(|s| !s.trim().is_empty()),
        };
        let mut webhooks = BTreeMap::new();
        for (name, w) in &raw.webhooks {
            if let Some(cfg) = webhook::compile(&src, w, &mut diags) {
                webhooks.insert(name.clone(), cfg);
            }
        }
        let rules_dir = base.join(
            raw.cache
                .rules_dir
                .as_ref()
                .map_or("rules", |s| s.get_ref().as_str()),
        );

        let mut upstreams = Vec::new();
        for (name, u) in &raw.upstreams {
            if let Some(u) = upstream::compile(&src, base, name, u, &mut diags) {
                upstreams.push(u);
            }
        }
        let redis = raw
            .redis
            .as_ref()
            .and_then(|r| redis_config(&src, r, &mut diags));
        let region = raw.region.as_ref().and_then(|r| {
            region::compile(&src, r, redis.as_ref(), raw.redis.is_some(), &mut diags)
        });
        let names: Vec<String> = raw.upstreams.keys().cloned().collect();
        let upstream_credentials: Vec<bool> = raw
            .upstreams
            .values()
            .map(|u| {
                u.get_ref()
                    .set_headers
                    .as_ref()
                    .is_some_and(|h| !h.is_empty())
            })
            .collect();
        let default_upstream = match &raw.server.default_upstream {
            Some(d) => match names.iter().position(|n| n == d.get_ref()) {
                Some(i) => Some(i),
                None => {
                    diags.push(src.at(
                        d.span(),
                        format!(
                            "default_upstream {:?} is not defined; defined upstreams: {}",
                            d.get_ref(),
                            names.join(", ")
                        ),
                    ));
                    None
                }
            },
            None if names.len() == 1 => Some(0),
            None => None,
        };
        if names.is_empty() {
            diags.push(
                src.whole("no upstreams are defined; add an [upstreams.NAME] table with a url"),
            );
        }

        // Checked here rather than left to `rules::load_dir`, so the problem points at
        // `rules_dir` in this file.
        if let Err(e) = std::fs::read_dir(&rules_dir) {
            let message = format!(
                "cannot read the rules directory {}: {e}; set [cache] rules_dir to a directory \
                 of *.toml rules files (relative to this file)",
                rules_dir.display()
            );
            diags.push(match &raw.cache.rules_dir {
                Some(d) => src.at(d.span(), message),
                None => src.whole(message),
            });
        }
        let mut rules_digest = None;
        let rules = if diags.is_empty() {
            let ctx = rules::Context {
                upstreams: &names,
                default_upstream,
                encryption: redis.as_ref().is_some_and(|r| r.keys.is_some()),
                upstream_credentials: &upstream_credentials,
                key_secret: key_secret.as_ref(),
            };
            match rules::load_dir(&rules_dir, &ctx) {
                Ok((r, digest)) => {
                    rules_digest = Some(digest);
                    Some(r)
                }
                Err(mut e) => {
                    diags.append(&mut e);
                    None
                }
            }
        } else {
            None
        };
        // Configuration warnings ride with the rules' own, which `aisle check`, start and every
        // reload print.
        let mut rules = rules;
        if let Some(r) = rules.as_mut() {
            r.warnings.extend(protection::overlaps(
                &src,
                &raw.protection,
                &protection,
                crate::clock::calendar_now_ms(),
            ));
        }
        let cdn = match &raw.cdn {
            None => None,
            Some(c) => match cdn::check(c) {
                Ok(settings) => Some(settings),
                Err(problems) => {
                    diags.extend(problems.into_iter().map(|p| src.problem(p)));
                    None
                }
            },
        };
        if let Some(rules) = &rules {
            // `season_ttl` names seasons defined here; `off` is outside every season.
            for rule in rules.rules() {
                for entry in rule.season_ttl.iter().flat_map(|s| &s.seasons) {
                    if !seasons.iter().any(|s| *s.name == *entry.season) {
                        let defined: Vec<&str> = seasons.iter().map(|s| s.name.as_str()).collect();
                        diags.push(Diagnostic {
                            message: format!(
                                "season_ttl names season {:?}, which no [[season]] in {} defines \
                                 (defined: {}); add the season or write `off` for outside every season",
                                entry.season,
                                path.display(),
                                if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
                            ),
                            ..entry.at.clone()
                        });
                    }
                }
            }
            for (name, w) in &raw.webhooks {
                for m in &w.get_ref().map {
                    let event = &m.get_ref().fire.event;
                    if rules.event(event.get_ref()).is_none() {
                        diags.push(src.at(
                            event.span(),
                            format!(
                                "webhooks.{name}: fire.event {:?} is not defined; add an [[event]] with that name to a rules file",
                                event.get_ref()
                            ),
                        ));
                    }
                }
            }
        }
        let warm = warm::compile(&src, &raw.warm, rules.as_ref(), region.as_ref(), &mut diags);
        if !diags.is_empty() {
            return Err(diags);
        }
        let hash = {
            let mut h = blake3::Hasher::new();
            h.update(text.as_bytes());
            if let Some(d) = rules_digest {
                h.update(d.as_bytes());
            }
            h.finalize().to_hex()[..16].to_string()
        };
        Ok(Config {
            hash,
            path: path.to_path_buf(),
            listen: raw.server.listen.into_inner(),
            admin_listen: raw.server.admin_listen.into_inner(),
            threads: raw
                .server
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            grace_period,
            watch: raw.server.watch.unwrap_or(true),
            upgrade_socket,
            cache: CacheConfig {
                memory,
                max_object,
                rules_dir,
                lock_timeout,
                max_ttl,
                heuristic_max,
                key_secret,
            },
            admin,
            webhooks,
            purge,
            cdn,
            upstreams,
            redis,
            rules: rules.expect("no diagnostics means rules loaded"),
            protection,
            seasons,
            warm,
            trust,
            log,
            listener,
            region,
        })
    }
}

/// `[server]`'s listener settings, checked (see [`ListenerConfig`] for the defaults).
fn listener_config(
    src: &SourceFile<'_>,
    raw: &raw::RawServer,
    base: &Path,
    diags: &mut Vec<Diagnostic>,
) -> ListenerConfig {
    let default = ListenerConfig::default();
    let mut dur = |f: &Option<Spanned<String>>, name: &str, default: Duration, zero_ok: bool| {
        let Some(s) = f else { return default };
        match parse_duration(s.get_ref()) {
            Ok(d) if d.is_zero() && !zero_ok => {
                diags.push(src.at(
                    s.span(),
                    format!("[server] {name} cannot be 0; write a duration like \"10s\""),
                ));
                default
            }
            Ok(d) => d,
            Err(e) => {
                diags.push(src.at(s.span(), e));
                default
            }
        }
    };
    let header_timeout = dur(
        &raw.header_timeout,
        "header_timeout",
        default.header_timeout,
        false,
    );
    let keepalive_timeout = dur(
        &raw.keepalive_timeout,
        "keepalive_timeout",
        default.keepalive_timeout,
        true,
    );
    // Pingora counts the keep-alive timeout in whole seconds: round up, so "500ms" keeps
    // connections alive (1 s) rather than turning keep-alive off.
    let keepalive_timeout =
        Duration::from_secs(keepalive_timeout.as_millis().div_ceil(1000) as u64);
    let mut count = |f: &Option<Spanned<i64>>, name: &str, default: usize| match f {
        None => default,
        Some(n) if *n.get_ref() < 0 => {
            diags.push(src.at(
                n.span(),
                format!(
                    "[server] {name} = {} is negative; write a count, or 0 for no limit",
                    n.get_ref()
                ),
            ));
            default
        }
        Some(n) => *n.get_ref() as usize,
    };
    let max_connections = count(
        &raw.max_connections,
        "max_connections",
        default.max_connections,
    );
    let max_connections_per_client = count(
        &raw.max_connections_per_client,
        "max_connections_per_client",
        default.max_connections_per_client,
    );
    let tls = raw.tls.as_ref().and_then(|t| {
        let files = tls::TlsFiles {
            cert: base.join(t.get_ref().cert.get_ref()),
            key: base.join(t.get_ref().key.get_ref()),
        };
        match files.load() {
            Ok(_) => Some(files),
            Err(e) => {
                diags.push(src.at(t.span(), format!("[server] tls: {e}")));
                None
            }
        }
    });
    ListenerConfig {
        header_timeout,
        keepalive_timeout,
        max_connections,
        max_connections_per_client,
        tls,
        h2c: raw.h2c.unwrap_or(false),
    }
}

/// `[cache] key_secret = "${AISLE_KEY_SECRET}"`: empty (`${AISLE_KEY_SECRET:-}` unset) is unset.
fn key_secret(
    src: &SourceFile<'_>,
    raw: Option<&Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<rules::CredentialKey> {
    let raw = raw?;
    match expand_env(raw.get_ref()) {
        Ok(v) if v.is_empty() => None,
        Ok(v) if v.len() >= 16 => Some(rules::CredentialKey::from_secret(v.as_bytes())),
        Ok(_) => {
            diags.push(src.at(
                raw.span(),
                "[cache] key_secret must be at least 16 characters, the same on every instance \
                 (make one with: head -c 32 /dev/urandom | base64)",
            ));
            None
        }
        Err(e) => {
            diags.push(src.at(raw.span(), e));
            None
        }
    }
}

fn admin_config(src: &SourceFile<'_>, raw: &RawAdmin, diags: &mut Vec<Diagnostic>) -> AdminConfig {
    let token = raw.token.as_ref().and_then(|t| match expand_env(t.get_ref()) {
        // `token = "${AISLE_ADMIN_TOKEN:-}"` with the variable unset: no token, the admin API
        // is disabled (as without `[admin]`), which the gateway says when it starts.
        Ok(v) if v.is_empty() => None,
        Ok(v) if v.len() >= 16 => Some(v),
        Ok(_) => {
            diags.push(src.at(t.span(), "the admin token must be at least 16 characters (make one with: head -c 24 /dev/urandom | base64)"));
            None
        }
        Err(e) => {
            diags.push(src.at(t.span(), e));
            None
        }
    });
    let mut purge_allow = Vec::new();
    if let Some(list) = &raw.purge_allow {
        for spanned in list {
            let cidr = spanned.get_ref();
            let parsed = cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => purge_allow.push(net),
                Err(_) => diags.push(src.at(
                    spanned.span(),
                    format!("{cidr:?} is not a network; write CIDRs like \"127.0.0.1/32\" or \"10.0.0.0/8\""),
                )),
            }
        }
    }
    AdminConfig { token, purge_allow }
}

/// `trusted_proxies` / `trusted_clients`: each entry a CIDR or an address, each bad one reported.
fn networks(
    src: &SourceFile<'_>,
    list: Option<&[Spanned<String>]>,
    diags: &mut Vec<Diagnostic>,
) -> Networks {
    let mut nets = Vec::new();
    for entry in list.unwrap_or_default() {
        match Networks::parse_one(entry.get_ref()) {
            Ok(net) => nets.push(net),
            Err(e) => diags.push(src.at(entry.span(), e)),
        }
    }
    Networks::new(nets)
}

fn redis_url(
    src: &SourceFile<'_>,
    span: std::ops::Range<usize>,
    raw: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<String> {
    let url = match expand_env(raw) {
        Ok(u) => u,
        Err(e) => {
            diags.push(src.at(span, e));
            return None;
        }
    };
    if !url.starts_with("redis://") {
        diags.push(src.at(
            span,
            format!(
                "redis url {:?} must start with redis://, like \"redis://127.0.0.1:6379\"",
                redact_url(&url)
            ),
        ));
        return None;
    }
    if let Err(e) = redis::Client::open(url.as_str()) {
        diags.push(src.at(span, format!("bad redis url {:?}: {e}", redact_url(&url))));
        return None;
    }
    Some(url)
}

fn aes_key(
    src: &SourceFile<'_>,
    span: std::ops::Range<usize>,
    raw: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<[u8; 32]> {
    use base64::Engine;
    let value = match expand_env(raw) {
        Ok(v) => v,
        Err(e) => {
            diags.push(src.at(span, e));
            return None;
        }
    };
    match base64::engine::general_purpose::STANDARD.decode(value.trim()) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            Some(key)
        }
        Ok(bytes) => {
            diags.push(src.at(span, format!("an encryption key must be 32 bytes, base64-encoded; this one is {} bytes (make one with: head -c 32 /dev/urandom | base64)", bytes.len())));
            None
        }
        Err(_) => {
            diags.push(src.at(span, "an encryption key must be base64 (make one with: head -c 32 /dev/urandom | base64)"));
            None
        }
    }
}

fn redis_config(
    src: &SourceFile<'_>,
    raw: &Spanned<RawRedis>,
    diags: &mut Vec<Diagnostic>,
) -> Option<RedisConfig> {
    let r = raw.get_ref();
    let before = diags.len();
    let (url, cluster) = match (&r.url, &r.cluster) {
        (Some(u), None) => (
            redis_url(src, u.span(), u.get_ref(), diags).unwrap_or_default(),
            Vec::new(),
        ),
        (None, Some(c)) if !c.get_ref().is_empty() => {
            let nodes = c
                .get_ref()
                .iter()
                .filter_map(|n| redis_url(src, n.span(), n.get_ref(), diags))
                .collect();
            (String::new(), nodes)
        }
        (Some(_), Some(c)) => {
            diags.push(src.at(
                c.span(),
                "give either url (one server) or cluster (a Redis Cluster), not both",
            ));
            return None;
        }
        _ => {
            diags.push(src.at(raw.span(), "[redis] needs url = \"redis://host:port\" or cluster = [\"redis://host:port\", ...]"));
            return None;
        }
    };
    let timeout = match &r.timeout {
        None => Duration::from_millis(50),
        Some(t) => parse_duration(t.get_ref()).unwrap_or_else(|e| {
            diags.push(src.at(t.span(), e));
            Duration::from_millis(50)
        }),
    };
    let keys = match &r.encryption_key {
        None => {
            if let Some(p) = &r.previous_keys {
                diags.push(src.at(
                    p.span(),
                    "previous_keys without encryption_key: set the current key too",
                ));
            }
            None
        }
        Some(k) => {
            let current = aes_key(src, k.span(), k.get_ref(), diags);
            let previous: Vec<[u8; 32]> = r
                .previous_keys
                .iter()
                .flat_map(|p| p.get_ref().iter())
                .filter_map(|v| aes_key(src, v.span(), v.get_ref(), diags))
                .collect();
            current.map(|c| (c, previous))
        }
    };
    if diags.len() > before {
        return None;
    }
    Some(RedisConfig {
        url,
        cluster,
        prefix: r
            .prefix
            .as_ref()
            .map_or("aisle:".to_string(), |p| p.get_ref().clone()),
        timeout,
        keys,
    })
}

/// A configuration loaded from `text` as `gateway.toml` (with an empty `rules/`), for other
/// modules' unit tests; panics with the diagnostics if it does not load.
#[cfg(test)]
pub(crate) fn load_text(text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e:?}"))
}

#[cfg(test)]
mod tests;
