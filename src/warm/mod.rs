//! Warm jobs (issue 15): fill the cache before clients ask, from a URL list, a rule's grid of
//! values, or the most requested keys of recent traffic.
//!
//! A job warms by sending ordinary requests to this gateway's own proxy listener on loopback,
//! so everything a client's request goes through applies to it unchanged: routing, admission,
//! keys, the fleet fill lock, upstream quotas (a 429 makes the job back off and retry, counted as
//! `throttled`), protection windows (a job pauses while one is on). An answer whose
//! `Cache-Status` says `hit` was already fresh and counts as `skipped`. `refresh: true` has to
//! refetch what is fresh, which clients cannot ask for: its requests carry `Aisle-Warm` with a
//! random secret made at process start (see [`Warmer::mark`]), which the proxy turns into a
//! forced miss; the header is never forwarded upstream (no `Aisle-*` header is) nor logged, and
//! the secret never leaves the process (CDN fronts get plain requests).
//!
//! With Redis, jobs are durable and run on one instance ([`store`]): each job has a lease its
//! runner renews; the 1 s tick of every instance takes over jobs whose lease lapsed, from the
//! last checkpoint. Without Redis, jobs live in this process only. Scheduled `[[warm]]` jobs are
//! started by the same tick, once per due time for the fleet (a `SET NX` on the due time), on
//! the calendar clock (`AISLE_FAKE_NOW`).
//!
//! A job naming `regions` ([`Warmer::submit`]) runs here when it names this region, and is
//! written, unleased, into each named peer region's store (its own Redis), so that region's
//! fleet takes it over through the same takeover: one mechanism for durability and for regions.

pub mod job;
pub mod popular;
pub mod store;

use crate::config::warm::{self as spec, JobSpec, Target};
use crate::invalidation::protection::Protection;
use crate::proxy::Shared;
use crate::redis::Redis;
use futures_util::StreamExt;
use job::{Definition, Job};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use popular::Popular;
use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Store;

/// Jobs kept (running and finished) per instance and in Redis.
pub const MAX_KEPT: usize = 100;
/// Jobs running at once on one instance; more are refused (429).
pub const MAX_RUNNING: usize = 8;
/// The request header marking a warm job's request.
pub const HEADER: &str = "aisle-warm";
/// [`HEADER`] as a header name, for the request path (no parse of the name per request).
pub const HEADER_NAME: http::HeaderName = http::HeaderName::from_static(HEADER);
/// Retries of one request the upstream's quota refused (429) before it counts as an error.
const THROTTLE_RETRIES: u32 = 8;
/// How often a running job saves its checkpoint (and renews its lease).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Time budget of one warm request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `aisle_warm_requests_total{result}`: warm requests by result (a fixed set).
static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_warm_requests_total",
        "Warm job requests by result: warmed, skipped (already fresh), error, throttled (429, retried), front_ok, front_error",
        &["result"]
    )
    .expect("register aisle_warm_requests_total")
});

/// `aisle_warm_jobs{state}`: this instance's jobs by state.
static JOBS: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "aisle_warm_jobs",
        "Warm jobs this instance runs or ran, by state (queued, running, paused, done)",
        &["state"]
    )
    .expect("register aisle_warm_jobs")
});

const STATES: [&str; 4] = ["queued", "running", "paused", "done"];

/// What a request's `Aisle-Warm` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mark {
    /// A client's request (no header, or a wrong secret).
    #[default]
    Client,
    /// A warm job's request.
    Warm,
    /// A warm job's request that must refetch even a fresh entry.
    Refresh,
}

/// The warm jobs of this instance, and its view of the fleet's.
pub struct Warmer {
    live: Shared,
    secret: String,
    pub popular: Arc<Popular>,
    protection: Option<Arc<Protection>>,
    store: Option<Store>,
    /// This process, as lease owner and in statuses.
    instance: String,
    /// For the gateway's own listener (which may have a certificate for another name).
    local: reqwest::Client,
    /// For CDN fronts (certificates checked).
    fronts: reqwest::Client,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Jobs seen done in Redis (not looked at again by takeovers), at most the index's size.
    finished: Mutex<std::collections::HashSet<String>>,
    /// Per schedule: the last due time seen, and the id of the job it last started.
    schedules: Mutex<HashMap<String, (u64, Option<String>)>>,
    /// `[region]` as it was at start (what the relay uses too), for jobs' `regions`.
    region: Option<crate::config::region::RegionConfig>,
    /// Each peer region's warm-job store (in its own Redis).
    peers: Vec<(String, Store)>,
}

/// A new job id (alphanumeric: `GET /admin/jobs/{id}` takes nothing else).
fn new_id() -> String {
    format!("w{:x}{}", crate::clock::now_ms(), random_hex(3))
}

/// Why `POST /admin/warm` refused a job: the message, the field at fault, and whether it is
/// the per-instance limit (429) rather than the job (400).
#[derive(Debug)]
pub struct Refused {
    pub message: String,
    pub field: Option<String>,
    pub busy: bool,
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused {
            busy: message.starts_with("busy"),
            message,
            field: None,
        }
    }
}

fn random_hex(bytes: usize) -> String {
    use aes_gcm::aead::rand_core::RngCore;
    let mut b = vec![0u8; bytes];
    aes_gcm::aead::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Warmer {
    pub fn new(
        live: Shared,
        redis: Option<Arc<Redis>>,
        protection: Option<Arc<Protection>>,
        peers: Vec<(String, Arc<Redis>)>,
    ) -> Result<Arc<Warmer>, String> {
        let store = redis.clone().map(Store::new).transpose()?;
        let peers = peers
            .into_iter()
            .map(|(name, r)| Ok((name, Store::new(r)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let region = live.load().config.region.clone();
        let popular = Popular::new(redis)?;
        for s in STATES {
            JOBS.with_label_values(&[s]).set(0);
        }
        for r in [
            "warmed",
            "skipped",
            "error",
            "throttled",
            "front_ok",
            "front_error",
        ] {
            REQUESTS.with_label_values(&[r]);
        }
        let local = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("warm jobs: cannot build an HTTP client: {e}"))?;
        let fronts = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("warm jobs: cannot build an HTTP client: {e}"))?;
        let now = crate::clock::calendar_now_ms();
        let schedules = live
            .load()
            .config
            .warm
            .iter()
            .map(|s| (s.name.clone(), (now, None)))
            .collect();
        Ok(Arc::new(Warmer {
            live,
            secret: random_hex(16),
            popular,
            protection,
            store,
            instance: format!("{}-{}", std::process::id(), &random_hex(4)),
            local,
            fronts,
            jobs: Mutex::new(VecDeque::new()),
            finished: Mutex::default(),
            schedules: Mutex::new(schedules),
            region,
            peers,
        }))
    }

    /// What a request's `Aisle-Warm` header value says (compared in constant time).
    pub fn mark(&self, value: Option<&[u8]>) -> Mark {
        use subtle::ConstantTimeEq;
        let Some(v) = value else { return Mark::Client };
        let (secret, refresh) = match v.strip_suffix(b";refresh") {
            Some(s) => (s, true),
            None => (v, false),
        };
        if secret.len() != self.secret.len() || !bool::from(secret.ct_eq(self.secret.as_bytes())) {
            return Mark::Client;
        }
        if refresh {
            Mark::Refresh
        } else {
            Mark::Warm
        }
    }

    /// Starts a job here: checks and expands it, stores it (Redis), and runs it here. The
    /// error is the client's (400) unless it starts with "busy" (429).
    pub async fn start(
        self: &Arc<Self>,
        spec: JobSpec,
        schedule: Option<String>,
    ) -> Result<String, String> {
        let def = self.prepare(spec, schedule, true).await?;
        Ok(self.launch(def).await)
    }

    /// Starts a job in each region of its `regions` (here only, without): the answer of
    /// `POST /admin/warm`, `{"id": <this region's job>, "regions": {<name>: <id> |
    /// "unavailable"}}`. A peer's job (same spec and targets, its own id) is written into the
    /// peer's warm-job store without a lease, so the peer's first instance to tick takes it
    /// over and runs it; a peer whose Redis does not take it is `"unavailable"`.
    pub async fn submit(
        self: &Arc<Self>,
        spec: JobSpec,
        schedule: Option<String>,
    ) -> Result<Value, Refused> {
        if spec.regions.is_empty() {
            let id = self.start(spec, schedule).await.map_err(Refused::from)?;
            return Ok(json!({ "id": id }));
        }
        spec::check_regions(&spec, self.region.as_ref()).map_err(|(message, field)| Refused {
            message,
            field: Some(field),
            busy: false,
        })?;
        let own = self
            .region
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let here = spec.regions.contains(&own);
        let def = self
            .prepare(spec.clone(), schedule, here)
            .await
            .map_err(Refused::from)?;
        let offers = spec.regions.iter().filter(|r| **r != own).map(|name| {
            let mut d = def.clone();
            d.id = new_id();
            d.spec.regions.clear();
            d.from_region = Some(own.clone());
            let store = self
                .peers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s);
            async move {
                let cp = Job::new(d.clone(), None, "").checkpoint();
                let taken = match store {
                    Some(store) => store.offer(&d, &cp).await,
                    None => false,
                };
                if taken {
                    tracing::info!(job = %d.id, region = %name, "warm job written into the peer region's store");
                    (name.clone(), Value::String(d.id))
                } else {
                    tracing::warn!(region = %name, "warm job: the peer region's Redis did not take it; not started there");
                    (name.clone(), Value::String("unavailable".into()))
                }
            }
        });
        let offers = futures_util::future::join_all(offers).await;
        let mut regions = serde_json::Map::new();
        let mut answer = json!({});
        if here {
            let id = self.launch(def).await;
            regions.insert(own, Value::String(id.clone()));
            answer["id"] = Value::String(id);
        }
        regions.extend(offers);
        answer["regions"] = Value::Object(regions);
        Ok(answer)
    }

    /// Checks and expands a job (`busy_check`: it would run here, so the per-instance limit
    /// applies).
    async fn prepare(
        &self,
        spec: JobSpec,
        schedule: Option<String>,
        busy_check: bool,
    ) -> Result<Definition, String> {
        spec::check_options(&spec)?;
        let running = self
            .jobs
            .lock()
            .iter()
            .filter(|j| matches!(j.state(), "queued" | "running" | "paused"))
            .count();
        if busy_check && running >= MAX_RUNNING {
            return Err(format!(
                "busy: {running} warm jobs already run on this instance (at most {MAX_RUNNING}); try again when one is done"
            ));
        }
        let config = self.live.load().config.clone();
        let targets = match spec.top {
            Some(n) => {
                let since = match &spec.since {
                    Some(s) => {
                        crate::units::parse_duration(s).map_err(|e| format!("\"since\": {e}"))?
                    }
                    None => Duration::from_secs(86_400),
                };
                self.popular
                    .top(n, since.as_millis() as u64, crate::clock::now_ms())
                    .await
            }
            None => spec::targets(&spec, &config.rules)?,
        };
        Ok(Definition {
            id: new_id(),
            kind: spec::kind(&spec).to_string(),
            spec,
            targets,
            created_ms: crate::clock::now_ms(),
            schedule,
            from_region: None,
        })
    }

    /// Stores a prepared job (Redis) and runs it here.
    async fn launch(self: &Arc<Self>, def: Definition) -> String {
        let job = Arc::new(Job::new(def, None, &self.instance));
        if let Some(store) = &self.store {
            if !store
                .create(&job.def, &job.checkpoint(), &self.instance)
                .await
            {
                tracing::warn!(
                    job = %job.id(),
                    "warm job: Redis did not take it; it runs on this instance only, and is lost if the instance stops"
                );
            }
        }
        let id = job.id().to_string();
        self.keep(job.clone());
        tokio::spawn(self.clone().run(job));
        id
    }

    fn keep(&self, job: Arc<Job>) {
        let mut jobs = self.jobs.lock();
        jobs.retain(|j| j.id() != job.id());
        jobs.push_back(job);
        while jobs.len() > MAX_KEPT {
            // The oldest finished job goes first; running ones stay (at most MAX_RUNNING).
            match jobs.iter().position(|j| j.state() == "done") {
                Some(i) => {
                    jobs.remove(i);
                }
                None => break,
            }
        }
    }

    fn local(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().iter().find(|j| j.id() == id).cloned()
    }

    /// `GET /admin/jobs/{id}`: from this instance when it runs (or ran) the job, else from
    /// Redis (as its runner last saved it).
    pub async fn status(&self, id: &str) -> Option<Value> {
        if let Some(job) = self.local(id) {
            if !job.cancelled() {
                return Some(job.status());
            }
        }
        let store = self.store.as_ref()?;
        let cp = store.checkpoint(id).await?;
        if cp.status.is_object() {
            return Some(cp.status);
        }
        None
    }

    /// `GET /admin/jobs`: jobs newest first, and the schedules with their next run.
    pub async fn list(&self) -> Value {
        let mut ids: Vec<String> = Vec::new();
        if let Some(store) = &self.store {
            ids = store.ids().await.unwrap_or_default();
        }
        for job in self.jobs.lock().iter().rev() {
            if !ids.iter().any(|i| i == job.id()) {
                ids.push(job.id().to_string());
            }
        }
        let mut jobs = Vec::new();
        for id in ids.iter().take(MAX_KEPT) {
            if let Some(s) = self.status(id).await {
                jobs.push(s);
            }
        }
        jobs.sort_by_key(|j| std::cmp::Reverse(j["created_ms"].as_u64().unwrap_or(0)));
        let now = crate::clock::calendar_now_ms();
        let config = self.live.load().config.clone();
        let last = self.schedules.lock().clone();
        let schedules: Vec<Value> = config
            .warm
            .iter()
            .map(|s| {
                let next = s.next_after(now);
                json!({
                    "name": s.name,
                    "schedule": s.schedule,
                    "tz": s.tz.name(),
                    "next_run": next.and_then(rfc3339),
                    "next_run_ms": next,
                    "last_job": last.get(&s.name).and_then(|(_, id)| id.clone()),
                    "job": serde_json::to_value(&s.job).unwrap_or_default(),
                })
            })
            .collect();
        json!({"jobs": jobs, "schedules": schedules})
    }

    /// Where the proxy listener is, as a loopback URL base.
    fn base(&self) -> String {
        let config = self.live.load().config.clone();
        let scheme = if config.listener.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let addr: std::net::SocketAddr = config
            .listen
            .parse()
            .unwrap_or_else(|_| "127.0.0.1:80".parse().expect("static"));
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        format!("{scheme}://{}", std::net::SocketAddr::new(ip, addr.port()))
    }

    /// Runs a job here until it is done or its lease goes to another instance.
    async fn run(self: Arc<Self>, job: Arc<Job>) {
        {
            let mut p = job.progress.lock();
            p.state = "running";
            p.run_start = Some(Instant::now());
            p.started_ms.get_or_insert(crate::clock::now_ms());
        }
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let saver = {
            let me = self.clone();
            let job = job.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                        _ = stop_rx.changed() => return,
                    }
                    if let Some(store) = &me.store {
                        if store.save(job.id(), &job.checkpoint(), &me.instance).await
                            == Some(false)
                        {
                            tracing::warn!(job = %job.id(), "warm job: another instance holds its lease now; stopping here");
                            job.cancel.store(true, Ordering::Release);
                            return;
                        }
                    }
                }
            })
        };
        let base = self.base();
        let concurrency = job
            .def
            .spec
            .concurrency
            .unwrap_or(spec::DEFAULT_CONCURRENCY);
        let pacer = job.def.spec.rate.map(Pacer::new);
        let from = job.progress.lock().from;
        futures_util::stream::iter(from..job.def.targets.len())
            .map(|i| self.one(&job, i, &base, pacer.as_ref()))
            .buffer_unordered(concurrency)
            .collect::<()>()
            .await;
        let _ = stop_tx.send(true);
        let _ = saver.await;
        if job.cancelled() {
            return;
        }
        {
            let mut p = job.progress.lock();
            p.state = "done";
            p.finished_ms = Some(crate::clock::now_ms());
        }
        if let Some(store) = &self.store {
            store
                .finish(job.id(), &job.checkpoint(), &self.instance)
                .await;
        }
        let c = job.counts();
        tracing::info!(
            job = %job.id(),
            total = job.def.targets.len(),
            warmed = c.warmed,
            skipped = c.skipped,
            errors = c.errors,
            "warm job done"
        );
    }

    /// Waits while a protection window is on (a job pauses rather than fill during one).
    async fn wait_unprotected(&self, job: &Job) {
        let Some(p) = &self.protection else { return };
        while p.active().any() && !job.cancelled() {
            job.set_state("paused");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if job.state() == "paused" {
            job.set_state("running");
        }
    }

    /// Sends target `i` to the gateway (and the CDN fronts) and records the result.
    async fn one(&self, job: &Job, i: usize, base: &str, pacer: Option<&Pacer>) {
        if job.cancelled() {
            return;
        }
        self.wait_unprotected(job).await;
        if job.cancelled() {
            return;
        }
        let target = &job.def.targets[i];
        let mut attempt = 0;
        let result = loop {
            if let Some(p) = pacer {
                p.wait().await;
            }
            match self.send(base, target, job.def.spec.refresh).await {
                Ok(Sent {
                    status: 429,
                    retry_after,
                    ..
                }) if attempt < THROTTLE_RETRIES && !job.cancelled() => {
                    attempt += 1;
                    job.progress.lock().throttled += 1;
                    REQUESTS.with_label_values(&["throttled"]).inc();
                    // The quota's Retry-After, else a doubling pause; capped either way.
                    let pause = retry_after.unwrap_or(Duration::from_millis(100 << attempt.min(6)));
                    tokio::time::sleep(pause.min(Duration::from_secs(30))).await;
                }
                Ok(Sent {
                    status, hit: true, ..
                }) if status < 400 && !job.def.spec.refresh => break job::SKIPPED,
                Ok(Sent { status, .. }) if status < 400 => break job::WARMED,
                Ok(_) | Err(_) => break job::ERROR,
            }
        };
        REQUESTS
            .with_label_values(&[match result {
                job::WARMED => "warmed",
                job::SKIPPED => "skipped",
                _ => "error",
            }])
            .inc();
        let mut failed = 0u16;
        for (f, front) in job.def.spec.warm_via.iter().enumerate() {
            if let Some(p) = pacer {
                p.wait().await;
            }
            let ok = self.send_front(front, target).await;
            REQUESTS
                .with_label_values(&[if ok { "front_ok" } else { "front_error" }])
                .inc();
            if !ok {
                failed |= 1 << f;
            }
        }
        job.finish_target(i, result, failed);
    }

    /// One request to the gateway.
    async fn send(&self, base: &str, t: &Target, refresh: bool) -> Result<Sent, reqwest::Error> {
        let method =
            reqwest::Method::from_bytes(t.method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut rb = self
            .local
            .request(method, format!("{base}{}", t.path))
            .header(
                HEADER,
                if refresh {
                    format!("{};refresh", self.secret)
                } else {
                    self.secret.clone()
                },
            );
        if let Some(h) = &t.host {
            rb = rb.header(http::header::HOST, h);
        }
        if let Some(b) = &t.body {
            rb = rb
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let hit = resp
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("aisle; hit"));
        // Read the body: the fill completes as the answer streams.
        let _ = resp.bytes().await?;
        Ok(Sent {
            status,
            hit,
            retry_after,
        })
    }

    /// One request through a CDN front (a plain request: no secret leaves the process).
    async fn send_front(&self, front: &str, t: &Target) -> bool {
        let method =
            reqwest::Method::from_bytes(t.method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut rb = self.fronts.request(method, format!("{front}{}", t.path));
        if let Some(b) = &t.body {
            rb = rb
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        match rb.send().await {
            Ok(r) => {
                let ok = r.status().as_u16() < 400;
                ok && r.bytes().await.is_ok()
            }
            Err(_) => false,
        }
    }

    /// The 1 s tick: popularity flushes, gauges, lapsed leases taken over, schedules started.
    async fn tick(self: &Arc<Self>) {
        self.popular.flush(crate::clock::now_ms()).await;
        let mut by_state: HashMap<&str, i64> = HashMap::new();
        for j in self.jobs.lock().iter() {
            if !j.cancelled() {
                *by_state.entry(j.state()).or_default() += 1;
            }
        }
        for s in STATES {
            JOBS.with_label_values(&[s])
                .set(by_state.get(s).copied().unwrap_or(0));
        }
        self.take_over().await;
        self.schedules().await;
    }

    /// Resumes jobs (Redis) whose runner stopped renewing its lease.
    async fn take_over(self: &Arc<Self>) {
        let Some(store) = &self.store else { return };
        let Some(ids) = store.ids().await else { return };
        self.finished.lock().retain(|f| ids.contains(f));
        for id in ids {
            if self.finished.lock().contains(&id) || self.local(&id).is_some_and(|j| !j.cancelled())
            {
                continue;
            }
            let Some(cp) = store.checkpoint(&id).await else {
                continue;
            };
            if cp.state == "done" {
                self.finished.lock().insert(id);
                continue;
            }
            if !store.claim(&id, &self.instance).await {
                continue;
            }
            let Some(def) = store.definition(&id).await else {
                continue;
            };
            tracing::info!(job = %id, from = cp.watermark, previous = %cp.instance, "warm job: taking it over");
            let job = Arc::new(Job::new(def, Some(&cp), &self.instance));
            self.keep(job.clone());
            tokio::spawn(self.clone().run(job));
        }
    }

    /// Starts each `[[warm]]` whose due time passed since the last tick (one instance per due
    /// time with Redis).
    async fn schedules(self: &Arc<Self>) {
        let config = self.live.load().config.clone();
        let now = crate::clock::calendar_now_ms();
        for s in &config.warm {
            let Some(due) = s.due_at_or_before(now) else {
                continue;
            };
            let seen = {
                let mut map = self.schedules.lock();
                let entry = map.entry(s.name.clone()).or_insert((now, None));
                let seen = entry.0;
                entry.0 = now;
                seen
            };
            if due <= seen {
                continue;
            }
            let ours = match &self.store {
                Some(store) => store.claim_schedule(&s.name, due, &self.instance).await,
                None => Some(true),
            };
            if ours != Some(true) {
                continue;
            }
            match self.submit(s.job.clone(), Some(s.name.clone())).await {
                Ok(answer) => {
                    tracing::info!(schedule = %s.name, job = %answer, "scheduled warm job started");
                    if let Some(e) = self.schedules.lock().get_mut(&s.name) {
                        e.1 = answer["id"].as_str().map(str::to_string);
                    }
                }
                Err(e) => {
                    tracing::warn!(schedule = %s.name, "scheduled warm job not started: {}", e.message)
                }
            }
        }
    }
}

/// What the gateway answered a warm request.
struct Sent {
    status: u16,
    /// `Cache-Status` says the answer came from a fresh entry.
    hit: bool,
    /// The quota's `Retry-After`.
    retry_after: Option<Duration>,
}

fn rfc3339(ms: u64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Spaces requests `1 / rate` apart (all of a job's requests, fronts included).
struct Pacer {
    interval: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        // `rate` is checked (>= MIN_RATE) when a job is made; a definition stored in Redis by
        // an older version is not, and must not panic the task that takes it over.
        let longest = Duration::from_secs_f64(1.0 / spec::MIN_RATE);
        Pacer {
            interval: Duration::try_from_secs_f64(1.0 / rate)
                .unwrap_or(longest)
                .min(longest),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The warm jobs' background tick (one per process).
pub struct Tick(pub Arc<Warmer>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Tick {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.0.tick().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored job's rate, whatever it is, gives an interval the pacer can wait.
    #[test]
    fn a_pacer_takes_any_rate() {
        for rate in [1e-300, 0.0, -1.0, f64::NAN, 0.001, 20.0, 1e308] {
            let p = Pacer::new(rate);
            assert!(p.interval <= Duration::from_secs(1000), "{rate}");
        }
        assert_eq!(Pacer::new(20.0).interval, Duration::from_millis(50));
    }
}
