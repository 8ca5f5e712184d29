//! Upstreams as pingora sees them: each a pool of addresses behind pingora's own load-balancing
//! machinery (`pingora-load-balancing`: selection, `HttpHealthCheck`, discovery), the peer handed
//! to pingora per request, the per-upstream and per-address metrics, and whether the last
//! connection attempt failed.
//!
//! - Selection: `round_robin` and `hash` (ketama, on the cache key) are pingora's selectors;
//!   pingora has no least-connections one, so `least_conn` picks, among the healthy addresses,
//!   the one with the fewest requests in flight from this process (counted by [`Picked`]).
//!   `max_connections` bounds those in-flight requests per address. An upstream with one
//!   address has nothing to select: that address is judged by the same health state, without
//!   the selector's walk ([`Selector::pick`]).
//! - Health checks and re-resolution run in one background service ([`Background`]) that reads
//!   the [`Live`](super::Live) in force each tick, so the pools a reload builds are checked from
//!   then on and the old ones are dropped with their `Live` (their health state with them).
//! - Discovery ([`Resolve`]) resolves the configured names at load (a failure fails the load,
//!   as before), then every `resolve_every` with the system resolver; a lookup that fails keeps
//!   the addresses already known.
//!
//! The "unreachable" mark exists for keep-alive: pingora closes the client connection after any
//! failed upstream connection, even when it answers from a stale entry. Once a connection to an
//! upstream has failed, a request with a stale entry to fall back on first probes the upstream
//! (a TCP connect to an address it would pick) and, if it is still unreachable (or no address is
//! healthy), is answered from the entry as a hit, on the ordinary path that keeps the client
//! connection.

use super::forwarding::UpstreamFields;
use crate::config::{Balance, Config, Upstream};
use crate::metrics::metrics;
use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::{HealthObserve, HttpHealthCheck};
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use prometheus::{Histogram, IntCounter};
use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// One resolved address of an upstream: which configured address it came from, and the
/// requests in flight to it.
pub struct Slot {
    /// Index into `Upstream::addresses`.
    address: usize,
    /// The socket address, as metrics label it.
    label: String,
    in_flight: AtomicUsize,
    /// Its metric series, found on its first answer.
    metrics: OnceLock<AddressMetrics>,
}

/// The results `aisle_upstream_address_requests_total` counts for an address.
const RESULT_ANSWERED: &str = "answered";
const RESULT_ERROR: &str = "error";
const RESULT_CONNECT_ERROR: &str = "connect_error";

/// An address's series of `aisle_upstream_address_*`.
struct AddressMetrics {
    answered: IntCounter,
    error: IntCounter,
    duration: Histogram,
}

/// An upstream's series of `aisle_upstream_requests_total` (one per status, and `error`) and
/// `aisle_upstream_duration_seconds`, each found by its labels once and then kept: the label
/// lookup (hashing the values, a lock) was 0.8k instructions of every proxied request (issue 16,
/// the `pass` profile). Kept for the statuses 100..=599 and `error`; another code (the `http`
/// crate reads up to 999) is looked up each time, as before. The series are the same.
struct UpstreamMetrics {
    /// By status - 100; the last is `error`.
    requests: Box<[OnceLock<IntCounter>]>,
    duration: OnceLock<Histogram>,
}

impl UpstreamMetrics {
    const ERROR: usize = 500;

    fn new() -> Self {
        UpstreamMetrics {
            requests: (0..=Self::ERROR).map(|_| OnceLock::new()).collect(),
            duration: OnceLock::new(),
        }
    }

    /// Counts one request of upstream `name` that ended in `status`.
    fn count(&self, name: &str, status: &str) {
        let index = match status {
            "error" => Some(Self::ERROR),
            code => code
                .parse::<usize>()
                .ok()
                .and_then(|c| c.checked_sub(100))
                .filter(|&i| i < Self::ERROR),
        };
        let lookup = || {
            metrics()
                .upstream_requests
                .with_label_values(&[name, status])
        };
        match index {
            Some(i) => self.requests[i].get_or_init(lookup).inc(),
            None => lookup().inc(),
        }
    }
}

/// The address a request goes to; its in-flight count is held while this lives.
pub struct Picked {
    pub addr: SocketAddr,
    slot: Arc<Slot>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no address could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAddress {
    /// Every address fails its health check (or resolves to nothing).
    Unhealthy,
    /// Every healthy address has `max_connections` requests in flight.
    Busy,
    /// Every healthy address was tried for this request and refused the connection.
    Exhausted,
}

impl NoAddress {
    /// The `Cache-Status` detail and the status code the client gets.
    pub fn answer(self) -> (u16, &'static str, &'static str) {
        match self {
            NoAddress::Unhealthy => (
                502,
                "no-healthy-upstream",
                "every address of the upstream fails its health check; see aisle_upstream_health",
            ),
            NoAddress::Busy => (
                503,
                "upstream-busy",
                "every address of the upstream has max_connections requests in flight; retry later",
            ),
            NoAddress::Exhausted => (
                502,
                "upstream-unreachable",
                "no address of the upstream accepted a connection",
            ),
        }
    }
}

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Hash(LoadBalancer<Consistent>),
}

impl Selector {
    fn backends(&self) -> &Backends {
        match self {
            Selector::RoundRobin(lb) => lb.backends(),
            Selector::Hash(lb) => lb.backends(),
        }
    }

    async fn update(&self) -> pingora::Result<()> {
        match self {
            Selector::RoundRobin(lb) => lb.update().await,
            Selector::Hash(lb) => lb.update().await,
        }
    }

    /// The address pingora's selector picks for `key` among those `accept` takes (given each
    /// one's health), with its slot. With a single address there is nothing to select: it is
    /// judged directly, by the same health state the selector reads, without the selector's
    /// walk (a set of visited addresses allocated and hashed into, and a copy of the address's
    /// `Backend` with its extension map: about 1,200 instructions of a proxied request, issue 16).
    fn pick(
        &self,
        key: impl FnOnce() -> Vec<u8>,
        accept: impl Fn(&Backend, bool) -> bool,
    ) -> Option<(SocketAddr, Arc<Slot>)> {
        let backends = self.backends();
        let set = backends.get_backend();
        if set.len() == 1 {
            let only = set.first()?;
            if !accept(only, backends.ready(only)) {
                return None;
            }
            return Some((inet(only)?, only.ext.get::<Arc<Slot>>()?.clone()));
        }
        // Enough steps to visit every address: round robin falls back to hashing after its
        // first pick; ketama walks the ring, 160 points per address.
        let n = set.len().max(1);
        let key = key();
        let chosen = match self {
            Selector::RoundRobin(lb) => lb.select_with(&key, 16 * n + 16, accept),
            Selector::Hash(lb) => lb.select_with(&key, 160 * n + 1, accept),
        }?;
        Some((inet(&chosen)?, chosen.ext.get::<Arc<Slot>>()?.clone()))
    }
}

/// One upstream's pool.
pub struct Pool {
    upstream: Upstream,
    /// What each request to it carries, built once.
    fields: UpstreamFields,
    selector: Selector,
    ca: Option<Arc<[WrappedX509]>>,
    client_cert: Option<Arc<CertKey>>,
    /// The last connection attempt failed, and no answer or probe has succeeded since.
    unreachable: AtomicBool,
    /// Spreads `least_conn` ties.
    turn: AtomicUsize,
    checking: AtomicBool,
    resolving: AtomicBool,
    next_check: parking_lot::Mutex<Option<Instant>>,
    next_resolve: parking_lot::Mutex<Option<Instant>>,
    metrics: UpstreamMetrics,
}

/// The configured upstreams, indexed like `Config::upstreams` (and `Rule::upstream`).
pub struct Peers(Vec<Arc<Pool>>);

impl Peers {
    /// Builds every upstream's pool, resolving its names once (blocking: call it off the
    /// request path).
    pub fn resolve(config: &Config) -> std::io::Result<Self> {
        config
            .upstreams
            .iter()
            .map(|u| Pool::new(u).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map(Peers)
    }

    /// The upstream's name (metric label).
    pub fn name(&self, index: usize) -> &str {
        &self.0[index].upstream.name
    }

    /// Picks an address of upstream `index` for a request (`key`: the cache key, for `hash`;
    /// asked only when there is a choice to make by it), skipping those in `tried`.
    pub fn pick(
        &self,
        index: usize,
        key: impl FnOnce() -> Vec<u8>,
        tried: &[SocketAddr],
    ) -> Result<Picked, NoAddress> {
        self.0[index].pick(key, tried)
    }

    /// Whether a retry after a failed connection has an address left to go to.
    pub fn has_other(&self, index: usize, tried: &[SocketAddr]) -> bool {
        let pool = &self.0[index];
        pool.ready().iter().any(|(a, _)| !tried.contains(a))
    }

    /// How many connection failures upstream `index` retries on another address.
    pub fn retries(&self, index: usize) -> usize {
        self.0[index].upstream.retries as usize
    }

    /// The peer pingora connects to for upstream `index` at the picked address.
    pub fn http_peer(&self, index: usize, picked: &Picked) -> HttpPeer {
        let pool = &self.0[index];
        let u = &pool.upstream;
        let address = &u.addresses[picked.slot.address];
        // SNI is for TLS: a plain HTTP peer takes none rather than a copy of the host name
        // on every proxied request (it is in the pool's reuse hash, as the same empty value).
        let sni = if u.tls {
            address.host.clone()
        } else {
            String::new()
        };
        let mut p = HttpPeer::new(picked.addr, u.tls, sni);
        p.options.connection_timeout = Some(u.connect_timeout);
        p.options.total_connection_timeout = Some(u.connect_timeout);
        p.options.read_timeout = Some(u.read_timeout);
        p.options.write_timeout = Some(u.read_timeout);
        p.options.ca = pool.ca.clone();
        p.client_cert_key = pool.client_cert.clone();
        p
    }

    /// What a request to upstream `index` carries ([`UpstreamFields`], built with the pool),
    /// and its `Host`: `host`, else the picked address's own for https, else `None` (the
    /// client's).
    pub fn fields(
        &self,
        index: usize,
        picked: Option<&Picked>,
    ) -> (&UpstreamFields, Option<&http::HeaderValue>) {
        let pool = &self.0[index];
        let host = pool
            .fields
            .host(pool.upstream.tls, picked.map(|p| p.slot.address));
        (&pool.fields, host)
    }

    /// Records whether upstream `index` could be reached (a failed connect, or an answer).
    pub fn set_unreachable(&self, index: usize, unreachable: bool) {
        let flag = &self.0[index].unreachable;
        if flag.load(Ordering::Relaxed) != unreachable {
            flag.store(unreachable, Ordering::Relaxed);
        }
    }

    /// Whether the last connection to upstream `index` failed and it is still unreachable now:
    /// no address is healthy, or a TCP connect to one fails within `within` (at most its
    /// connect_timeout). A successful probe clears the mark. `false` without probing when no
    /// connection has failed.
    pub async fn still_unreachable(&self, index: usize, within: Duration) -> bool {
        let pool = &self.0[index];
        if !pool.unreachable.load(Ordering::Relaxed) {
            return false;
        }
        let Some((addr, _)) = pool.ready().into_iter().next() else {
            return true;
        };
        let within = within.min(pool.upstream.connect_timeout);
        let probe = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(within, probe).await {
            Ok(Ok(_)) => {
                self.set_unreachable(index, false);
                false
            }
            _ => true,
        }
    }

    /// Counts an upstream answer (`status` = its code, or "error" when none came) and how long
    /// the upstream took, for the upstream and for the address it came from.
    pub fn observe(
        &self,
        index: usize,
        picked: Option<&Picked>,
        status: &str,
        seconds: Option<f64>,
    ) {
        let pool = &self.0[index];
        let name = pool.upstream.name.as_str();
        pool.metrics.count(name, status);
        if let Some(s) = seconds {
            pool.metrics
                .duration
                .get_or_init(|| metrics().upstream_duration.with_label_values(&[name]))
                .observe(s);
        }
        if let Some(p) = picked {
            let label = p.slot.label.as_str();
            let series = p.slot.metrics.get_or_init(|| {
                let m = metrics();
                AddressMetrics {
                    answered: m.upstream_address_requests.with_label_values(&[
                        name,
                        label,
                        RESULT_ANSWERED,
                    ]),
                    error: m.upstream_address_requests.with_label_values(&[
                        name,
                        label,
                        RESULT_ERROR,
                    ]),
                    duration: m
                        .upstream_address_duration
                        .with_label_values(&[name, label]),
                }
            });
            if status == "error" {
                series.error.inc();
            } else {
                series.answered.inc();
            }
            if let Some(s) = seconds {
                series.duration.observe(s);
            }
        }
    }

    /// Counts a connection that failed to the picked address.
    pub fn connect_failed(&self, index: usize, picked: &Picked) {
        metrics()
            .upstream_address_requests
            .with_label_values(&[self.name(index), &picked.slot.label, RESULT_CONNECT_ERROR])
            .inc();
    }
}

impl Pool {
    fn new(u: &Upstream) -> std::io::Result<Pool> {
        let resolve = Resolve::new(u)?;
        let backends = Backends::new(Box::new(resolve));
        let mut selector = match u.balance {
            Balance::RoundRobin | Balance::LeastConn => {
                Selector::RoundRobin(LoadBalancer::from_backends(backends))
            }
            Balance::Hash => Selector::Hash(LoadBalancer::from_backends(backends)),
        };
        // The first discovery answers at once with what `Resolve::new` looked up.
        let first = futures_util::FutureExt::now_or_never(selector.update());
        if !matches!(first, Some(Ok(()))) {
            return Err(std::io::Error::other(format!(
                "upstream {}: its addresses could not be set up",
                u.name
            )));
        }
        let (ca, client_cert) = tls_material(u)?;
        let fields = UpstreamFields::of(u);
        if let Some(hc) = &u.health_check {
            let check = health_check(u, hc, &fields, ca.clone(), client_cert.clone());
            match &mut selector {
                Selector::RoundRobin(lb) => lb.set_health_check(check),
                Selector::Hash(lb) => lb.set_health_check(check),
            }
        }
        Ok(Pool {
            upstream: u.clone(),
            fields,
            selector,
            ca,
            client_cert,
            unreachable: AtomicBool::new(false),
            turn: AtomicUsize::new(0),
            checking: AtomicBool::new(false),
            resolving: AtomicBool::new(false),
            next_check: parking_lot::Mutex::new(None),
            next_resolve: parking_lot::Mutex::new(None),
            metrics: UpstreamMetrics::new(),
        })
    }

    /// The healthy addresses and their slots.
    fn ready(&self) -> Vec<(SocketAddr, Arc<Slot>)> {
        let backends = self.selector.backends();
        backends
            .get_backend()
            .iter()
            .filter(|b| backends.ready(b))
            .filter_map(|b| Some((inet(b)?, b.ext.get::<Arc<Slot>>()?.clone())))
            .collect()
    }

    fn pick(
        &self,
        key: impl FnOnce() -> Vec<u8>,
        tried: &[SocketAddr],
    ) -> Result<Picked, NoAddress> {
        let limit = self
            .upstream
            .max_connections
            .map_or(usize::MAX, |m| m as usize);
        let under = |slot: &Slot| slot.in_flight.load(Ordering::Relaxed) < limit;
        let chosen = if self.upstream.balance == Balance::LeastConn {
            let ready = self.ready();
            let n = ready.len().max(1);
            let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
            ready
                .iter()
                .cycle()
                .skip(start)
                .take(ready.len())
                .filter(|(a, s)| !tried.contains(a) && under(s))
                .min_by_key(|(_, s)| s.in_flight.load(Ordering::Relaxed))
                .cloned()
        } else {
            self.selector.pick(key, |b, healthy| {
                healthy
                    && inet(b).is_some_and(|a| !tried.contains(&a))
                    && b.ext.get::<Arc<Slot>>().is_some_and(|s| under(s))
            })
        };
        match chosen {
            Some((addr, slot)) => {
                slot.in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(Picked { addr, slot })
            }
            None => {
                let ready = self.ready();
                Err(if ready.is_empty() {
                    NoAddress::Unhealthy
                } else if ready.iter().all(|(a, _)| tried.contains(a)) {
                    NoAddress::Exhausted
                } else {
                    NoAddress::Busy
                })
            }
        }
    }

    /// Starts the health check and re-resolution that are due, each in its own task.
    fn tick(self: &Arc<Self>, now: Instant) {
        if let Some(hc) = &self.upstream.health_check {
            if due(&self.next_check, now, hc.interval)
                && !self.checking.swap(true, Ordering::AcqRel)
            {
                let pool = self.clone();
                tokio::spawn(async move {
                    pool.selector.backends().run_health_check(true).await;
                    pool.checking.store(false, Ordering::Release);
                });
            }
        }
        if let Some(every) = self.upstream.resolve_every {
            if due(&self.next_resolve, now, every) && !self.resolving.swap(true, Ordering::AcqRel) {
                let pool = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = pool.selector.update().await {
                        tracing::warn!(
                            upstream = %pool.upstream.name,
                            "re-resolving the upstream's addresses failed, the known ones are kept: {e}"
                        );
                    }
                    pool.resolving.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// Whether the next run is due (the first call only schedules one `every` from now).
fn due(next: &parking_lot::Mutex<Option<Instant>>, now: Instant, every: Duration) -> bool {
    let mut next = next.lock();
    match *next {
        Some(at) if now < at => false,
        Some(_) => {
            *next = Some(now + every);
            true
        }
        None => {
            *next = Some(now + every);
            false
        }
    }
}

fn inet(b: &Backend) -> Option<SocketAddr> {
    match &b.addr {
        PSocketAddr::Inet(a) => Some(*a),
        _ => None,
    }
}

/// The upstream's trust roots and client certificate in pingora's types.
#[allow(clippy::type_complexity)]
fn tls_material(
    u: &Upstream,
) -> std::io::Result<(Option<Arc<[WrappedX509]>>, Option<Arc<CertKey>>)> {
    // pingora's wrappers parse the DER and panic on a malformed certificate; the PEM files
    // were read at load, so a panic here means a certificate inside them is not valid X.509.
    let built = std::panic::catch_unwind(|| {
        let ca = u.ca.as_ref().map(|ders| {
            ders.iter()
                .map(|d| WrappedX509::new(d.clone(), pingora::utils::tls::parse_x509))
                .collect::<Vec<_>>()
                .into()
        });
        let client = u
            .client_cert
            .as_ref()
            .map(|c| Arc::new(CertKey::new(c.chain.clone(), c.key.clone())));
        (ca, client)
    });
    built.map_err(|_| {
        std::io::Error::other(format!(
            "upstream {}: a certificate in ca_file or client_cert is not valid X.509",
            u.name
        ))
    })
}

/// pingora's `HttpHealthCheck` for the upstream: `GET path` with the upstream's `Host` and
/// `set_headers`, over the same TLS settings as requests.
fn health_check(
    u: &Upstream,
    hc: &crate::config::upstream::HealthCheck,
    fields: &UpstreamFields,
    ca: Option<Arc<[WrappedX509]>>,
    client_cert: Option<Arc<CertKey>>,
) -> Box<HttpHealthCheck> {
    let first = &u.addresses[0];
    let host = u.host.clone().unwrap_or_else(|| first.host_header.clone());
    let mut check = HttpHealthCheck::new(&host, u.tls);
    if u.tls {
        check.peer_template.sni = first.host.clone();
    }
    check.peer_template.options.connection_timeout = Some(hc.timeout);
    check.peer_template.options.total_connection_timeout = Some(hc.timeout);
    check.peer_template.options.read_timeout = Some(hc.timeout);
    check.peer_template.options.write_timeout = Some(hc.timeout);
    check.peer_template.options.ca = ca;
    check.peer_template.client_cert_key = client_cert;
    if let Ok(mut req) = pingora::http::RequestHeader::build("GET", hc.path.as_bytes(), None) {
        let _ = req.insert_header(http::header::HOST, host.as_str());
        fields.set_on(&mut req);
        check.req = req;
    }
    check.consecutive_failure = hc.unhealthy_after as usize;
    check.consecutive_success = hc.healthy_after as usize;
    check.health_changed_callback = Some(Box::new(Observer(u.name.clone())));
    Box::new(check)
}

/// Health flips: the gauge and one log line each.
struct Observer(String);

#[async_trait]
impl HealthObserve for Observer {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let label = target.addr.to_string();
        metrics()
            .upstream_health
            .with_label_values(&[&self.0, &label])
            .set(i64::from(healthy));
        if healthy {
            tracing::info!(upstream = %self.0, address = %label, "upstream address is healthy again");
        } else {
            tracing::warn!(
                upstream = %self.0,
                address = %label,
                "upstream address failed its health check and gets no traffic until it passes again"
            );
        }
    }
}

/// Discovery: the upstream's names, looked up with the system resolver.
struct Resolve {
    name: String,
    /// `host:port` of each configured address.
    authorities: Vec<String>,
    /// The lookup made at load, handed out by the first discovery.
    first: parking_lot::Mutex<Option<BTreeSet<Backend>>>,
    /// Slots by socket address, so an address that stays keeps its in-flight count.
    slots: parking_lot::Mutex<HashMap<SocketAddr, Arc<Slot>>>,
}

impl Resolve {
    fn new(u: &Upstream) -> std::io::Result<Resolve> {
        let r = Resolve {
            name: u.name.clone(),
            authorities: u.addresses.iter().map(|a| a.authority.clone()).collect(),
            first: parking_lot::Mutex::new(None),
            slots: parking_lot::Mutex::new(HashMap::new()),
        };
        let mut found = Vec::new();
        for (i, authority) in r.authorities.iter().enumerate() {
            let addrs = match from_hosts_file(authority) {
                Some(addrs) => addrs,
                None => authority.to_socket_addrs()?.collect(),
            };
            if addrs.is_empty() {
                return Err(std::io::Error::other(format!(
                    "upstream {}: {authority} resolves to no address",
                    u.name
                )));
            }
            found.extend(addrs.into_iter().map(|a| (i, a)));
        }
        *r.first.lock() = Some(r.backends(found));
        Ok(r)
    }

    fn backends(&self, found: Vec<(usize, SocketAddr)>) -> BTreeSet<Backend> {
        let mut slots = self.slots.lock();
        let mut set = BTreeSet::new();
        let mut kept = HashMap::new();
        let health = &metrics().upstream_health;
        for (address, addr) in found {
            let slot = slots.get(&addr).cloned().unwrap_or_else(|| {
                // A new address starts healthy (pingora's default) until checked.
                let label = addr.to_string();
                health.with_label_values(&[&self.name, &label]).set(1);
                Arc::new(Slot {
                    address,
                    label,
                    in_flight: AtomicUsize::new(0),
                    metrics: OnceLock::new(),
                })
            });
            kept.insert(addr, slot.clone());
            let mut b = Backend {
                addr: PSocketAddr::Inet(addr),
                weight: 1,
                ext: Default::default(),
            };
            b.ext.insert(slot);
            set.insert(b);
        }
        let m = metrics();
        for (addr, slot) in slots.iter() {
            if !kept.contains_key(addr) {
                // Gone from DNS: its series go too, so that the labels stay bounded however
                // often a name's addresses change (a request still in flight to it counts into
                // a series no longer exported).
                let labels = [self.name.as_str(), slot.label.as_str()];
                let _ = health.remove_label_values(&labels);
                let _ = m.upstream_address_duration.remove_label_values(&labels);
                for result in [RESULT_ANSWERED, RESULT_ERROR, RESULT_CONNECT_ERROR] {
                    let _ = m.upstream_address_requests.remove_label_values(&[
                        &self.name,
                        &slot.label,
                        result,
                    ]);
                }
            }
        }
        *slots = kept;
        set
    }
}

#[async_trait]
impl ServiceDiscovery for Resolve {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        if let Some(first) = self.first.lock().take() {
            return Ok((first, HashMap::new()));
        }
        let mut found = Vec::new();
        for (i, authority) in self.authorities.iter().enumerate() {
            if let Some(addrs) = from_hosts_file(authority) {
                found.extend(addrs.into_iter().map(|a| (i, a)));
                continue;
            }
            let addrs = tokio::net::lookup_host(authority.as_str())
                .await
                .map_err(|e| {
                    pingora::Error::explain(
                        pingora::ErrorType::ConnectNoRoute,
                        format!("upstream {}: cannot resolve {authority}: {e}", self.name),
                    )
                })?;
            found.extend(addrs.map(|a| (i, a)));
        }
        if found.is_empty() {
            return pingora::Error::e_explain(
                pingora::ErrorType::ConnectNoRoute,
                format!("upstream {}: its names resolve to no address", self.name),
            );
        }
        let set = self.backends(found);
        Ok((set, HashMap::new()))
    }
}

/// `AISLE_HOSTS_FILE`: a hosts-format file (`IP name...` lines, `#` comments) consulted before
/// the system resolver and read again at every resolution, so names can be pinned or moved
/// without DNS (tests, staging). The addresses it gives `authority`'s host, if it names it.
fn from_hosts_file(authority: &str) -> Option<Vec<SocketAddr>> {
    let path = std::env::var_os("AISLE_HOSTS_FILE")?;
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let text = std::fs::read_to_string(path).ok()?;
    let addrs: Vec<SocketAddr> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip: std::net::IpAddr = words.next()?.parse().ok()?;
            words
                .any(|n| n.eq_ignore_ascii_case(host))
                .then_some(SocketAddr::new(ip, port))
        })
        .collect();
    (!addrs.is_empty()).then_some(addrs)
}

/// The background service that runs every upstream's health checks and re-resolution, on the
/// pools of the configuration in force (a reload's new pools start being checked at its next
/// tick; the old ones stop with their configuration).
pub struct Background(pub super::Shared);

/// How often the service looks for due work (health intervals are at least 10 ms).
const TICK: Duration = Duration::from_millis(50);

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let live = self.0.load_full();
            let now = Instant::now();
            for pool in &live.peers.0 {
                pool.tick(now);
            }
            drop(live);
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The key `hash` balancing hashes: the cache key, else the request's host and path.
pub fn balance_key(session: &pingora::proxy::Session) -> Vec<u8> {
    use pingora::cache::key::CacheHashKey;
    match session.cache.maybe_cache_key() {
        Some(k) => k.primary_bin().to_vec(),
        None => {
            let req = session.req_header();
            let host = req.headers.get(http::header::HOST).map(|h| h.as_bytes());
            let mut key = host.unwrap_or_default().to_vec();
            key.extend_from_slice(req.uri.path().as_bytes());
            key
        }
    }
}

/// The error `upstream_peer` returns when no address can be picked: an upstream error, so a
/// stale entry may answer (stale-if-error) and `fail_to_proxy` says why otherwise.
pub fn no_address_error(upstream: &str, why: NoAddress) -> Box<pingora::Error> {
    let mut e = pingora::Error::explain(
        pingora::ErrorType::ConnectNoRoute,
        format!("upstream {upstream}: {}", why.answer().2),
    );
    e.esource = pingora::ErrorSource::Upstream;
    e
}

/// A connection to the picked address failed: marks the upstream unreachable, counts it, and
/// says whether to retry on another address (`retries` left, an address left, and a request
/// that may be sent twice: idempotent methods and body-keyed POSTs, which are queries).
pub fn failed_connect(
    session: &pingora::proxy::Session,
    ctx: &mut super::Ctx,
    index: usize,
) -> bool {
    let peers = &ctx.live.peers;
    peers.set_unreachable(index, true);
    let Some(picked) = ctx.upstream.picked.take() else {
        return false;
    };
    peers.connect_failed(index, &picked);
    ctx.upstream.tried.push(picked.addr);
    drop(picked);
    let method = &session.req_header().method;
    let idempotent = method.is_idempotent()
        || (method == http::Method::POST && ctx.route.as_ref().is_some_and(|r| r.rule.needs_body));
    idempotent
        && ctx.upstream.tried.len() <= peers.retries(index)
        && peers.has_other(index, &ctx.upstream.tried)
}

/// The answer `fail_to_proxy` gives when no address could be picked or the upstream's TLS
/// handshake failed: (status, JSON body, `Cache-Status`). `None`: pingora's own answer.
pub fn failure_answer(ctx: &super::Ctx, e: &pingora::Error) -> Option<(u16, String, String)> {
    if let Some(why) = ctx.upstream.no_address {
        let (code, detail, error) = why.answer();
        let body = serde_json::json!({ "error": error }).to_string();
        return Some((code, body, format!("aisle; fwd=miss; detail={detail}")));
    }
    let rule = &ctx.route.as_ref()?.rule.name;
    let body = tls_failure(e, rule)?;
    Some((
        502,
        body,
        "aisle; fwd=miss; detail=upstream-tls".to_string(),
    ))
}

/// A TLS handshake with the upstream that failed (a certificate not trusted by `ca_file` or
/// the system, a name that does not match, a client certificate refused): the JSON body of the
/// 502 that says so, also logged as a warning. `None` for other errors.
fn tls_failure(e: &pingora::Error, rule: &str) -> Option<String> {
    use pingora::ErrorType::*;
    if *e.esource() != pingora::ErrorSource::Upstream
        || !matches!(
            e.etype(),
            TLSHandshakeFailure | InvalidCert | HandshakeError
        )
    {
        return None;
    }
    tracing::warn!(rule, "upstream TLS handshake failed: {e}");
    let error = format!(
        "the TLS handshake with the upstream failed ({e}); check that its certificate chains to \
         the upstream's ca_file (or the system's roots) and names its host, and its client_cert"
    );
    Some(serde_json::json!({ "error": error }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The balance key (a copy of the cache key, or of host and path) is made only when an
    /// address is chosen by it: not for an upstream with one address or for `least_conn`.
    #[test]
    fn the_balance_key_is_made_only_when_there_is_a_choice() {
        let config = crate::config::load_text(
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n\
             [upstreams.one]\nurl = \"http://127.0.0.1:9\"\n\
             [upstreams.least]\nurls = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]\nbalance = \"least_conn\"\n\
             [upstreams.hashed]\nurls = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]\nbalance = \"hash\"\n\
             [upstreams.rr]\nurls = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]\n",
        );
        let peers = Peers::resolve(&config).unwrap();
        let index = |name: &str| (0..config.upstreams.len()).find(|&i| peers.name(i) == name);
        for (name, asked) in [("one", 0), ("least", 0), ("hashed", 1), ("rr", 1)] {
            let made = std::cell::Cell::new(0);
            let key = || {
                made.set(made.get() + 1);
                b"example.com/a".to_vec()
            };
            let picked = peers.pick(index(name).unwrap(), key, &[]);
            assert!(picked.is_ok(), "{name}: an address is picked");
            assert_eq!(
                made.get(),
                asked,
                "{name}: the key was made {} times",
                made.get()
            );
        }
    }

    #[test]
    fn kept_series_are_the_labelled_ones() {
        let kept = UpstreamMetrics::new();
        let name = "kept-series-test";
        let series = |status: &str| {
            metrics()
                .upstream_requests
                .with_label_values(&[name, status])
                .get()
        };
        for (status, times) in [("100", 1), ("200", 3), ("599", 2), ("error", 4), ("999", 2)] {
            for _ in 0..times {
                kept.count(name, status);
            }
            assert_eq!(series(status), times, "status {status}");
        }
        // The same handle each time for a kept status; looked up anew for another.
        assert_eq!(
            kept.requests.iter().filter(|c| c.get().is_some()).count(),
            4
        );
        assert!(kept.requests[100].get().is_some(), "200 is kept at 100");
        assert!(kept.requests[UpstreamMetrics::ERROR].get().is_some());
        for not_kept in ["99", "600", "abc", ""] {
            kept.count(name, not_kept);
            assert_eq!(series(not_kept), 1, "status {not_kept:?}");
        }
        assert_eq!(
            kept.requests.iter().filter(|c| c.get().is_some()).count(),
            4
        );
    }
}
