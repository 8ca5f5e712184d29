//! The durable purge queue and its worker, against a real `redis-server` (and the local file
//! store), with a scripted CDN [`Provider`] written here: what is under test is the queue's
//! bookkeeping (retries, backoff, `Retry-After`, dead letters, durability across restarts and
//! Redis outages, one delivery per item across a fleet), not any CDN's API.
//!
//! Nothing sleeps to synchronise: every wait is `poll_until` with a deadline. Backoff and lease
//! durations are configured small so the tests stay fast; assertions are about order and counts,
//! compared against the state the queue persisted, not wall-clock thresholds.

use aisle::config::RedisConfig;
use aisle::purge::queue::{Item, PurgeQueue, QueueConfig, QueueStatus};
use aisle::purge::worker::PurgeWorker;
use aisle::purge::{AnswerSink, Batch, Kind, Plan, Provider, ProviderAnswer, PurgeJob};
use aisle::redis::Redis;

use crate::harness::poll_until;
use crate::harness::redis::{connect, RedisServer};
use async_trait::async_trait;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const PREFIX: &str = "t:";
/// Deadline for anything the worker should get done.
const DEADLINE: Duration = Duration::from_secs(20);

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

// -------------------------------------------------------------------------------------------
// A scripted CDN
// -------------------------------------------------------------------------------------------

/// One `send` the fake CDN received.
#[derive(Debug, Clone)]
struct Call {
    /// Which worker (queue) sent it, for the fleet test.
    worker: &'static str,
    id: String,
    /// 1-based number of this call among the calls for `id`.
    n: u32,
    batch: Batch,
    start: Instant,
    end: Instant,
    start_ms: f64,
    end_ms: f64,
    outcome: ProviderAnswer,
    /// The item as the queue had persisted it when this attempt started.
    stored: Option<Item>,
}

type Script = dyn Fn(&str, u32) -> Option<ProviderAnswer> + Send + Sync;
type Peek = dyn Fn(&str) -> Option<Item> + Send + Sync;

/// A CDN whose answers a test scripts: `script(id, n)` answers the `n`th call for `id`
/// (`None`: never answer, as a hung connection would).
struct Fake {
    name: String,
    worker: &'static str,
    chunk: usize,
    rate: f64,
    script: Box<Script>,
    peek: Option<Box<Peek>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Fake {
    fn new(
        name: &str,
        script: impl Fn(&str, u32) -> Option<ProviderAnswer> + Send + Sync + 'static,
    ) -> Fake {
        Fake {
            name: name.into(),
            worker: "a",
            chunk: 1,
            rate: 1000.0,
            script: Box::new(script),
            peek: None,
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn chunk(mut self, n: usize) -> Self {
        self.chunk = n;
        self
    }

    fn peek(mut self, peek: Box<Peek>) -> Self {
        self.peek = Some(peek);
        self
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Provider for Fake {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, job: &PurgeJob) -> Plan {
        Plan {
            batches: job
                .urls
                .chunks(self.chunk)
                .map(|c| Batch {
                    kind: Kind::Urls,
                    items: c.to_vec(),
                    soft: job.soft,
                })
                .collect(),
            skipped: Vec::new(),
        }
    }

    fn rate(&self) -> f64 {
        self.rate
    }

    async fn send(&self, batch: &Batch, idempotency: &str) -> ProviderAnswer {
        let start = Instant::now();
        let start_ms = wall_ms();
        let stored = self.peek.as_ref().and_then(|p| p(idempotency));
        let n = 1 + self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.id == idempotency)
            .count() as u32;
        let Some(outcome) = (self.script)(idempotency, n) else {
            self.calls.lock().unwrap().push(Call {
                worker: self.worker,
                id: idempotency.into(),
                n,
                batch: batch.clone(),
                start,
                end: start,
                start_ms,
                end_ms: start_ms,
                outcome: ProviderAnswer::Fatal("never answered".into()),
                stored,
            });
            return std::future::pending().await;
        };
        self.calls.lock().unwrap().push(Call {
            worker: self.worker,
            id: idempotency.into(),
            n,
            batch: batch.clone(),
            start,
            end: Instant::now(),
            start_ms,
            end_ms: wall_ms(),
            outcome: outcome.clone(),
            stored,
        });
        outcome
    }
}

/// Reads an item as the Redis store holds it.
fn redis_peek(redis: &RedisServer, provider: &str) -> Box<Peek> {
    let url = redis.url();
    let key = format!("{PREFIX}purge:{{{provider}}}:items");
    Box::new(move |id| {
        let mut con = connect(&url).ok()?;
        let raw: Option<String> = ::redis::cmd("HGET")
            .arg(&key)
            .arg(id)
            .query(&mut con)
            .ok()?;
        serde_json::from_str(&raw?).ok()
    })
}

/// The item's latest `put` record in the local log.
fn last_put(dir: &Path, id: &str) -> Option<Item> {
    let text = std::fs::read_to_string(dir.join("queue.log")).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["op"] == "put" && r["item"]["id"] == id)
        .and_then(|r| serde_json::from_value(r["item"].clone()).ok())
}

fn file_peek(dir: &Path) -> Box<Peek> {
    let dir = dir.to_path_buf();
    Box::new(move |id| last_put(&dir, id))
}

fn log_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("queue.log")).unwrap_or_default()
}

/// Records what the worker reports for every attempt.
#[derive(Default)]
struct Answers(Mutex<Vec<(String, String, u32, ProviderAnswer)>>);

impl AnswerSink for Answers {
    fn cdn_answer(&self, job_id: &str, provider: &str, attempt: u32, outcome: &ProviderAnswer) {
        self.0
            .lock()
            .unwrap()
            .push((job_id.into(), provider.into(), attempt, outcome.clone()));
    }
}

impl Answers {
    fn all(&self) -> Vec<(String, String, u32, ProviderAnswer)> {
        self.0.lock().unwrap().clone()
    }
}

// -------------------------------------------------------------------------------------------
// Set-up
// -------------------------------------------------------------------------------------------

fn cfg(dir: &Path) -> QueueConfig {
    let mut c = QueueConfig::new(dir);
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(100);
    c.lease = Duration::from_millis(1500);
    c.send_timeout = Duration::from_millis(1000);
    c.poll_interval = Duration::from_millis(20);
    c.shutdown_grace = Duration::from_secs(5);
    c
}

fn tier(redis: &RedisServer) -> Arc<Redis> {
    Arc::new(
        Redis::new(&RedisConfig {
            url: redis.url(),
            cluster: Vec::new(),
            prefix: PREFIX.into(),
            timeout: Duration::from_millis(250),
            keys: None,
        })
        .expect("redis tier"),
    )
}

fn queue(
    cfg: QueueConfig,
    fake: &Arc<Fake>,
    redis: Option<&RedisServer>,
    answers: &Arc<Answers>,
) -> Arc<PurgeQueue> {
    PurgeQueue::new(
        cfg,
        vec![fake.clone() as Arc<dyn Provider>],
        redis.map(tier),
        answers.clone() as Arc<dyn AnswerSink>,
    )
    .expect("purge queue")
}

fn job(id: &str, urls: usize) -> PurgeJob {
    PurgeJob {
        id: id.into(),
        urls: (0..urls)
            .map(|i| format!("https://cdn.example/{id}/{i}"))
            .collect(),
        source: "test".into(),
        created_ms: wall_ms() as u64,
        ..PurgeJob::default()
    }
}

/// A worker running on the test's runtime.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn run(queue: &Arc<PurgeQueue>) -> Running {
    let (stop, rx) = watch::channel(false);
    let worker = PurgeWorker::new(queue.clone());
    let task = tokio::spawn(async move { worker.start(rx).await });
    Running { stop, task }
}

impl Running {
    /// A graceful shutdown (pingora's), waiting for the worker to return.
    async fn stop(self) {
        self.stop.send(true).expect("worker listens");
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the worker stops within the deadline")
            .expect("the worker does not panic");
    }

    /// A crash: the worker's future (and its sends in flight) is dropped where it stands.
    async fn crash(self) {
        self.task.abort();
        let r = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the aborted worker ends");
        assert!(r.is_err_and(|e| e.is_cancelled()), "aborted, not finished");
    }
}

fn ids(job: &str, provider: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{job}-{provider}-{i}")).collect()
}

/// Done answers per item id.
fn delivered(calls: &[Call]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for c in calls {
        if matches!(c.outcome, ProviderAnswer::Done(_)) {
            *m.entry(c.id.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// Waits until every id in `want` has been delivered and the queue is empty (so no further
/// send can happen), then returns the calls.
async fn wait_delivered(
    fakes: &[&Arc<Fake>],
    queues: &[&Arc<PurgeQueue>],
    want: &[String],
    what: &str,
) -> Vec<Call> {
    poll_until(DEADLINE, what, || async {
        let calls: Vec<Call> = fakes.iter().flat_map(|f| f.calls()).collect();
        let done = delivered(&calls);
        if !want.iter().all(|id| done.contains_key(id)) {
            return None;
        }
        for q in queues {
            if !is_empty(&q.status().await) {
                return None;
            }
        }
        Some(calls)
    })
    .await
}

fn is_empty(s: &QueueStatus) -> bool {
    s.depth == 0 && s.in_flight == 0 && s.dead_letters == 0
}

fn assert_once_each(calls: &[Call], want: &[String]) {
    let done = delivered(calls);
    for id in want {
        assert_eq!(
            done.get(id),
            Some(&1),
            "{id} delivered exactly once: {calls:#?}"
        );
    }
    assert_eq!(
        done.len(),
        want.len(),
        "nothing else was delivered: {done:?}"
    );
}

fn calls_for<'a>(calls: &'a [Call], id: &str) -> Vec<&'a Call> {
    calls.iter().filter(|c| c.id == id).collect()
}

/// The worker's `aisle_purge_requests_total{provider, outcome}` counters for one provider, as
/// increases since [`Sent::since`]. The library's metrics registry is process-wide and this
/// binary runs every test module in one process, so a test reads only the increase of the
/// counters labelled with its own provider name (every test here uses a name of its own; the
/// queue gauges it reads are set from that provider's own queue).
struct Sent {
    provider: String,
    at_start: HashMap<&'static str, u64>,
}

impl Sent {
    const OUTCOMES: [&'static str; 3] = ["done", "retry", "fatal"];

    fn since(provider: &str) -> Sent {
        let at_start = Self::OUTCOMES
            .iter()
            .map(|o| (*o, Self::total(provider, o)))
            .collect();
        Sent {
            provider: provider.into(),
            at_start,
        }
    }

    fn total(provider: &str, outcome: &str) -> u64 {
        aisle::metrics::metrics()
            .purge_requests
            .with_label_values(&[provider, outcome])
            .get()
    }

    /// Requests answered with `outcome` since `since`.
    fn count(&self, outcome: &str) -> u64 {
        Self::total(&self.provider, outcome) - self.at_start[outcome]
    }
}

// -------------------------------------------------------------------------------------------
// Retries and backoff
// -------------------------------------------------------------------------------------------

/// Each batch fails three times (503) and then goes through: every batch is delivered exactly
/// once, on its 4th attempt, each attempt starting no earlier than the `not_before_ms` the
/// previous failure persisted, which itself lies after that failure.
async fn retries_then_delivers(redis: Option<&RedisServer>, name: &str) {
    let sent = Sent::since(name);
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(name, |_, n| {
        Some(if n <= 3 {
            ProviderAnswer::Retry {
                after: None,
                detail: format!("503 #{n}"),
            }
        } else {
            ProviderAnswer::Done(format!("purge-{n}"))
        })
    });
    // 5 URLs in batches of 2 -> 3 items.
    let fake = fake.chunk(2);
    let fake = Arc::new(match redis {
        Some(r) => fake.peek(redis_peek(r, name)),
        None => fake.peek(file_peek(dir.path())),
    });
    let answers = Arc::new(Answers::default());
    let q = queue(cfg(dir.path()), &fake, redis, &answers);
    assert_eq!(q.enqueue(&job("j1", 5)).await, Ok(3));
    let want = ids("j1", name, 3);
    let w = run(&q);
    let calls = wait_delivered(&[&fake], &[&q], &want, "3 batches delivered").await;
    w.stop().await;

    assert_once_each(&calls, &want);
    let mut sizes: Vec<usize> = Vec::new();
    for id in &want {
        let mine = calls_for(&calls, id);
        let ns: Vec<u32> = mine.iter().map(|c| c.n).collect();
        assert_eq!(ns, [1, 2, 3, 4], "{id}: three failures, then the success");
        assert!(matches!(mine[3].outcome, ProviderAnswer::Done(_)));
        sizes.push(mine[0].batch.items.len());
        for (k, c) in mine.iter().enumerate() {
            assert_eq!(c.batch, mine[0].batch, "the same batch on every retry");
            let stored = c.stored.as_ref().expect("the item is persisted while sent");
            assert_eq!(
                stored.attempts,
                k as u32,
                "{id}: attempts persisted before attempt {}",
                k + 1
            );
            if k == 0 {
                continue;
            }
            let prev = mine[k - 1];
            assert_eq!(stored.last_error, format!("503 #{k}"));
            assert!(
                stored.not_before_ms as f64 >= prev.end_ms.floor(),
                "{id}: retry {k} scheduled after the failure ({} < {})",
                stored.not_before_ms,
                prev.end_ms
            );
            assert!(
                c.start_ms >= stored.not_before_ms as f64,
                "{id}: attempt {} started at {} before its not_before {}",
                k + 1,
                c.start_ms,
                stored.not_before_ms
            );
        }
    }
    sizes.sort();
    assert_eq!(sizes, [1, 2, 2], "batched to the provider's size");

    let answers = answers.all();
    assert_eq!(answers.len(), 12, "every attempt is reported");
    for a in 1..=4 {
        let n = answers
            .iter()
            .filter(|(j, p, at, _)| j == "j1" && p == name && *at == a)
            .count();
        assert_eq!(n, 3, "attempt {a} reported for each batch");
    }
    assert_eq!(sent.count("retry"), 9);
    assert_eq!(sent.count("done"), 3);
    assert_eq!(sent.count("fatal"), 0);
    let depth = aisle::metrics::metrics()
        .purge_queue_depth
        .with_label_values(&[name])
        .get();
    assert_eq!(depth, 0);
    if redis.is_none() {
        assert_eq!(
            log_text(dir.path()),
            "",
            "the log is compacted when all is done"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_then_delivers_once_redis() {
    let redis = RedisServer::start();
    retries_then_delivers(Some(&redis), "retry-redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_then_delivers_once_file() {
    retries_then_delivers(None, "retry-file").await;
}

/// A 429 with `Retry-After: 300ms`: neither that batch nor any other batch for the provider is
/// sent before it has passed.
async fn retry_after_is_honoured(redis: Option<&RedisServer>, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let after = Duration::from_millis(300);
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let fake = Fake::new(name, move |_, _| {
        Some(if f.swap(false, Ordering::SeqCst) {
            ProviderAnswer::Retry {
                after: Some(after),
                detail: "429 Too Many Requests".into(),
            }
        } else {
            ProviderAnswer::Done("ok".into())
        })
    });
    let fake = Arc::new(match redis {
        Some(r) => fake.peek(redis_peek(r, name)),
        None => fake.peek(file_peek(dir.path())),
    });
    let answers = Arc::new(Answers::default());
    let mut c = cfg(dir.path());
    c.concurrency = 1;
    let q = queue(c, &fake, redis, &answers);
    assert_eq!(q.enqueue(&job("j429", 3)).await, Ok(3));
    let want = ids("j429", name, 3);
    let w = run(&q);
    let calls = wait_delivered(&[&fake], &[&q], &want, "all batches delivered").await;
    w.stop().await;

    assert_once_each(&calls, &want);
    assert_eq!(
        calls.len(),
        4,
        "one 429, then one success per batch: {calls:#?}"
    );
    let limited = &calls[0];
    assert!(matches!(limited.outcome, ProviderAnswer::Retry { .. }));
    for c in &calls[1..] {
        assert!(
            c.start >= limited.end + after,
            "{} (call {}) was sent {:?} after the 429, before its Retry-After",
            c.id,
            c.n,
            c.start - limited.end
        );
    }
    let retried = calls_for(&calls, &limited.id);
    assert_eq!(retried.len(), 2);
    let stored = retried[1].stored.as_ref().unwrap();
    assert_eq!(
        stored.attempts, 0,
        "a 429 is pacing: it consumes no attempt"
    );
    assert_eq!(stored.last_error, "429 Too Many Requests");
    assert!(
        stored.not_before_ms as f64 >= limited.end_ms + after.as_millis() as f64 - 1.0,
        "not_before {} honours Retry-After from {}",
        stored.not_before_ms,
        limited.end_ms
    );
    assert!(retried[1].start_ms >= stored.not_before_ms as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_redis() {
    let redis = RedisServer::start();
    retry_after_is_honoured(Some(&redis), "ra-redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_file() {
    retry_after_is_honoured(None, "ra-file").await;
}

/// A 429 answered to one gateway holds back the others too: gateway A gets the 429 and stops;
/// gateway B, which only knows about it through Redis, sends nothing before the `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_holds_back_the_whole_fleet() {
    let redis = RedisServer::start();
    let name = "ra-fleet";
    let after = Duration::from_millis(400);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut fa = Fake::new(name, move |_, _| {
        Some(ProviderAnswer::Retry {
            after: Some(after),
            detail: "429 Too Many Requests".into(),
        })
    });
    fa.calls = calls.clone();
    let mut fb = Fake::new(name, |_, _| Some(ProviderAnswer::Done("ok".into())));
    fb.worker = "b";
    fb.calls = calls.clone();
    let (fa, fb) = (Arc::new(fa), Arc::new(fb));
    let answers = Arc::new(Answers::default());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = cfg(da.path());
    ca.concurrency = 1;
    let qa = queue(ca, &fa, Some(&redis), &answers);
    let qb = queue(cfg(db.path()), &fb, Some(&redis), &answers);
    assert_eq!(qa.enqueue(&job("jfl", 4)).await, Ok(4));
    let want = ids("jfl", name, 4);

    let wa = run(&qa);
    poll_until(DEADLINE, "gateway A to get its 429", || async {
        (!answers.all().is_empty()).then_some(())
    })
    .await;
    wa.stop().await;
    let wb = run(&qb);
    let all = wait_delivered(&[&fb], &[&qa, &qb], &want, "B delivers everything").await;
    wb.stop().await;

    assert_once_each(&all, &want);
    let limited = &all[0];
    assert_eq!(limited.worker, "a");
    assert!(matches!(limited.outcome, ProviderAnswer::Retry { .. }));
    assert_eq!(all.len(), 5, "A's one 429, then B's four sends: {all:#?}");
    for c in &all[1..] {
        assert_eq!(c.worker, "b");
        assert!(
            c.start_ms >= limited.end_ms + after.as_millis() as f64,
            "{} was sent by B {} ms after A's 429, before its Retry-After",
            c.id,
            c.start_ms - limited.end_ms
        );
    }
}

// -------------------------------------------------------------------------------------------
// Dead letters
// -------------------------------------------------------------------------------------------

/// Batch 0 keeps failing (503) and dies after `max_attempts`; batch 1 is refused (400) and dies
/// at once. Once the CDN is healthy, `retry_dead_letters` brings both back, attempts reset.
async fn dead_letters(redis: Option<&RedisServer>, name: &str) {
    let sent = Sent::since(name);
    let dir = tempfile::tempdir().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let fake = Arc::new(Fake::new(name, move |id, _| {
        Some(if h.load(Ordering::SeqCst) {
            ProviderAnswer::Done("ok".into())
        } else if id.ends_with("-0") {
            ProviderAnswer::Retry {
                after: None,
                detail: "503".into(),
            }
        } else {
            ProviderAnswer::Fatal("400 bad request".into())
        })
    }));
    let answers = Arc::new(Answers::default());
    let mut c = cfg(dir.path());
    c.max_attempts = Some(3);
    let q = queue(c, &fake, redis, &answers);
    assert_eq!(q.enqueue(&job("jd", 2)).await, Ok(2));
    let want = ids("jd", name, 2);
    let w = run(&q);

    let st = poll_until(DEADLINE, "both items to be dead letters", || async {
        let s = q.status().await;
        (s.dead_letters == 2 && s.depth == 0 && s.in_flight == 0).then_some(s)
    })
    .await;
    assert_eq!(st.providers[0].dead_letters, 2);
    assert_eq!(
        aisle::metrics::metrics()
            .purge_dead_letters
            .with_label_values(&[name])
            .get(),
        2
    );
    let calls = fake.calls();
    assert_eq!(
        calls_for(&calls, &want[0]).len(),
        3,
        "max_attempts sends, no more"
    );
    assert_eq!(
        calls_for(&calls, &want[1]).len(),
        1,
        "a fatal answer is not retried"
    );
    let mut dead = q.dead_letters().await;
    dead.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(dead.len(), 2);
    assert_eq!((dead[0].attempts, dead[0].last_error.as_str()), (3, "503"));
    assert_eq!(
        (dead[1].attempts, dead[1].last_error.as_str()),
        (1, "400 bad request")
    );
    assert_eq!(sent.count("retry"), 3);
    assert_eq!(sent.count("fatal"), 1);

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(q.retry_dead_letters().await, 2);
    let calls = wait_delivered(&[&fake], &[&q], &want, "revived dead letters delivered").await;
    assert_once_each(&calls, &want);
    assert_eq!(q.retry_dead_letters().await, 0, "nothing left to revive");
    w.stop().await;

    let done_attempts: Vec<u32> = answers
        .all()
        .iter()
        .filter(|a| matches!(a.3, ProviderAnswer::Done(_)))
        .map(|a| a.2)
        .collect();
    assert_eq!(
        done_attempts,
        [1, 1],
        "attempts start again after a revival"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_make_dead_letters_and_they_can_be_retried_redis() {
    let redis = RedisServer::start();
    dead_letters(Some(&redis), "dead-redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_make_dead_letters_and_they_can_be_retried_file() {
    dead_letters(None, "dead-file").await;
}

// -------------------------------------------------------------------------------------------
// Durability
// -------------------------------------------------------------------------------------------

/// Items that a first gateway accepted and tried (the CDN was down) are delivered by a second
/// one started after the first stopped, with the attempts made so far still counted.
async fn survives_restart(redis: Option<&RedisServer>, name: &str, second_dir: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let down = Arc::new(Fake::new(name, |_, _| {
        Some(ProviderAnswer::Retry {
            after: None,
            detail: "502".into(),
        })
    }));
    let answers = Arc::new(Answers::default());
    let q1 = queue(cfg(dir.path()), &down, redis, &answers);
    assert_eq!(q1.enqueue(&job("jr", 3)).await, Ok(3));
    let want = ids("jr", name, 3);
    let w1 = run(&q1);
    poll_until(DEADLINE, "every item to be tried at least once", || async {
        let calls = down.calls();
        want.iter()
            .all(|id| !calls_for(&calls, id).is_empty())
            .then_some(())
    })
    .await;
    w1.stop().await;
    drop(q1);
    if redis.is_some() {
        assert_eq!(
            log_text(dir.path()),
            "",
            "with Redis up, nothing went to the file"
        );
    }
    let tried = down.calls().len();

    let second_dir = if redis.is_some() {
        second_dir
    } else {
        dir.path().to_path_buf()
    };
    let up = Fake::new(name, |_, _| Some(ProviderAnswer::Done("ok".into())));
    let up = Arc::new(match redis {
        Some(r) => up.peek(redis_peek(r, name)),
        None => up.peek(file_peek(&second_dir)),
    });
    let q2 = queue(cfg(&second_dir), &up, redis, &answers);
    let w2 = run(&q2);
    let calls = wait_delivered(&[&up], &[&q2], &want, "delivery after the restart").await;
    w2.stop().await;
    assert_once_each(&calls, &want);
    for c in &calls {
        let stored = c.stored.as_ref().expect("persisted");
        assert!(stored.attempts >= 1, "{}: earlier attempts kept", c.id);
    }
    assert_eq!(
        down.calls().len(),
        tried,
        "the stopped worker sent nothing more"
    );
    if redis.is_none() {
        assert_eq!(log_text(&second_dir), "", "compacted once all is done");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_survives_a_gateway_restart() {
    let redis = RedisServer::start();
    let other = tempfile::tempdir().unwrap();
    survives_restart(Some(&redis), "restart-redis", other.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_queue_survives_a_gateway_restart() {
    survives_restart(None, "restart-file", PathBuf::new()).await;
}

/// Accepted, never tried: the job is only in the store when the process goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueued_job_is_delivered_by_the_next_process() {
    let redis = RedisServer::start();
    for (store, name) in [(Some(&redis), "next-redis"), (None, "next-file")] {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::new(name, |_, _| {
            Some(ProviderAnswer::Done("ok".into()))
        }));
        let answers = Arc::new(Answers::default());
        let q1 = queue(cfg(dir.path()), &fake, store, &answers);
        let jn = job("jn", 2);
        assert_eq!(q1.enqueue(&jn).await, Ok(2));
        assert_eq!(
            q1.enqueue(&jn).await,
            Ok(2),
            "{name}: enqueueing again is harmless"
        );
        assert_eq!(q1.status().await.depth, 2, "{name}: not duplicated");
        drop(q1);
        assert!(fake.calls().is_empty());
        let q2 = queue(cfg(dir.path()), &fake, store, &answers);
        assert_eq!(
            q2.status().await.depth,
            2,
            "{name}: both items still queued"
        );
        let want = ids("jn", name, 2);
        let w = run(&q2);
        let calls = wait_delivered(&[&fake], &[&q2], &want, name).await;
        w.stop().await;
        assert_once_each(&calls, &want);
    }
}

/// A gateway that dies mid-send leaves its items leased in Redis; once the lease passes, another
/// gateway sends them (once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_items_return_after_the_lease() {
    let redis = RedisServer::start();
    let name = "crash";
    let hung = Arc::new(Fake::new(name, |_, _| None));
    let answers = Arc::new(Answers::default());
    // The hung sends must still be hanging when the gateway dies: a long send timeout (and so
    // a longer lease).
    let slow = |dir: &Path| {
        let mut c = cfg(dir);
        c.send_timeout = Duration::from_secs(3);
        c.lease = Duration::from_millis(3500);
        c
    };
    let dir1 = tempfile::tempdir().unwrap();
    let q1 = queue(slow(dir1.path()), &hung, Some(&redis), &answers);
    assert_eq!(q1.enqueue(&job("jc", 3)).await, Ok(3));
    let want = ids("jc", name, 3);
    let w1 = run(&q1);
    poll_until(
        DEADLINE,
        "all items in flight on the first gateway",
        || async { (hung.calls().len() == 3).then_some(()) },
    )
    .await;
    assert_eq!(q1.status().await.in_flight, 3);
    w1.crash().await;
    drop(q1);

    let dir2 = tempfile::tempdir().unwrap();
    let fine = Arc::new(Fake::new(name, |_, _| {
        Some(ProviderAnswer::Done("ok".into()))
    }));
    let q2 = queue(slow(dir2.path()), &fine, Some(&redis), &answers);
    let w2 = run(&q2);
    let calls = wait_delivered(&[&fine], &[&q2], &want, "leased items recovered").await;
    w2.stop().await;
    assert_once_each(&calls, &want);
    assert_eq!(hung.calls().len(), 3, "the crashed gateway sent each once");
    assert!(
        answers.all().iter().all(|a| a.2 == 1),
        "a crashed attempt is not counted"
    );
}

// -------------------------------------------------------------------------------------------
// The fleet and Redis outages
// -------------------------------------------------------------------------------------------

/// Two gateways drain one Redis: each item is sent once, by one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_redis_deliver_each_item_once() {
    let redis = RedisServer::start();
    let name = "fleet";
    let calls = Arc::new(Mutex::new(Vec::new()));
    let make = |worker: &'static str| {
        let mut f = Fake::new(name, |_, _| Some(ProviderAnswer::Done("ok".into())));
        f.worker = worker;
        f.calls = calls.clone();
        Arc::new(f)
    };
    let (fa, fb) = (make("a"), make("b"));
    let answers = Arc::new(Answers::default());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let qa = queue(cfg(da.path()), &fa, Some(&redis), &answers);
    let qb = queue(cfg(db.path()), &fb, Some(&redis), &answers);
    let (wa, wb) = (run(&qa), run(&qb));
    let mut want = Vec::new();
    for i in 0..30 {
        let id = format!("jf{i}");
        let q = if i % 2 == 0 { &qa } else { &qb };
        assert_eq!(q.enqueue(&job(&id, 2)).await, Ok(2));
        want.extend(ids(&id, name, 2));
    }
    let all = wait_delivered(&[&fa], &[&qa, &qb], &want, "60 items delivered").await;
    wa.stop().await;
    wb.stop().await;
    assert_once_each(&all, &want);
    assert_eq!(all.len(), 60, "no item was sent twice: {} sends", all.len());
    let by_a = all.iter().filter(|c| c.worker == "a").count();
    println!("gateway a sent {by_a}, gateway b sent {}", all.len() - by_a);
    assert!(
        by_a > 0 && by_a < 60,
        "both gateways took part ({by_a} by a)"
    );
    assert_eq!(log_text(da.path()) + &log_text(db.path()), "");
}

/// Redis dies while items are being retried: new purges are still accepted (spilled to the
/// local file) and delivered while it is down; once it is back (with its snapshot), the items
/// it held are delivered too. Nothing is lost, nothing delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_spills_to_the_file_and_loses_nothing() {
    let mut redis = RedisServer::start();
    let name = "outage";
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let fake = Arc::new(Fake::new(name, move |_, _| {
        Some(if h.load(Ordering::SeqCst) {
            ProviderAnswer::Done("ok".into())
        } else {
            ProviderAnswer::Retry {
                after: None,
                detail: "503".into(),
            }
        })
    }));
    let answers = Arc::new(Answers::default());
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.max_attempts = None;
    let q = queue(c, &fake, Some(&redis), &answers);
    let w = run(&q);

    assert_eq!(q.enqueue(&job("ja", 2)).await, Ok(2));
    let in_redis = ids("ja", name, 2);
    assert!(!log_text(dir.path()).contains("ja-"), "Redis took them");
    poll_until(DEADLINE, "the Redis items to be retrying", || async {
        let calls = fake.calls();
        in_redis
            .iter()
            .all(|id| calls_for(&calls, id).len() >= 2)
            .then_some(())
    })
    .await;

    // Redis' own persistence keeps what it held; then it dies.
    let mut con = connect(&redis.url()).expect("connect");
    let _: () = ::redis::cmd("SAVE").query(&mut con).expect("SAVE");
    drop(con);
    redis.kill();

    assert_eq!(
        q.enqueue(&job("jb", 2)).await,
        Ok(2),
        "accepted during the outage"
    );
    let spilled = ids("jb", name, 2);
    let log = log_text(dir.path());
    for id in &spilled {
        assert!(log.contains(id.as_str()), "{id} is in the local log: {log}");
    }
    let st = q.status().await;
    assert_eq!(st.redis, "down");
    assert_eq!(st.providers[0].local, 2);

    healthy.store(true, Ordering::SeqCst);
    poll_until(
        DEADLINE,
        "the spilled items delivered with Redis down",
        || async {
            let done = delivered(&fake.calls());
            spilled.iter().all(|id| done.contains_key(id)).then_some(())
        },
    )
    .await;
    assert!(
        in_redis
            .iter()
            .all(|id| !delivered(&fake.calls()).contains_key(id)),
        "the items held by Redis wait for it"
    );

    redis.restart();
    let mut want = in_redis.clone();
    want.extend(spilled.iter().cloned());
    let calls = wait_delivered(
        &[&fake],
        &[&q],
        &want,
        "everything delivered after the outage",
    )
    .await;
    w.stop().await;
    assert_once_each(&calls, &want);
    assert_eq!(q.status().await.redis, "up");
    assert_eq!(log_text(dir.path()), "", "the spill is compacted away");
}

/// A CDN that takes `hold` to accept each request (a slow API), counting the requests per id.
struct SlowCdn {
    name: String,
    hold: Duration,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl Provider for SlowCdn {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, job: &PurgeJob) -> Plan {
        Plan {
            batches: vec![Batch {
                kind: Kind::Urls,
                items: job.urls.clone(),
                soft: false,
            }],
            skipped: Vec::new(),
        }
    }

    fn rate(&self) -> f64 {
        1000.0
    }

    async fn send(&self, _batch: &Batch, idempotency: &str) -> ProviderAnswer {
        self.calls.lock().unwrap().push(idempotency.into());
        // The CDN's own slowness, not synchronisation: the test waits on the queue's state.
        tokio::time::sleep(self.hold).await;
        ProviderAnswer::Done("ok".into())
    }
}

/// A send that outlasts the lease four times keeps its item: the worker renews the lease every
/// third of it while the CDN takes its time, so a second instance polling the same Redis does
/// not take the item and send it again. (Issue 10 item 5: leases are now short, 15 s by default,
/// because they are renewed; before, a lease had to outlast the send timeout, 120 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_send_keeps_its_lease_while_it_lasts() {
    let redis = RedisServer::start();
    let cdn = Arc::new(SlowCdn {
        name: "renew".into(),
        hold: Duration::from_millis(2400),
        calls: Mutex::new(Vec::new()),
    });
    let answers = Arc::new(Answers::default());
    let short = |dir: &Path| {
        let mut c = cfg(dir);
        c.lease = Duration::from_millis(600);
        c.send_timeout = Duration::from_secs(10);
        c
    };
    let make = |dir: &Path| {
        PurgeQueue::new(
            short(dir),
            vec![cdn.clone() as Arc<dyn Provider>],
            Some(tier(&redis)),
            answers.clone() as Arc<dyn AnswerSink>,
        )
        .expect("purge queue")
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (qa, qb) = (make(da.path()), make(db.path()));
    assert_eq!(qa.enqueue(&job("jr", 1)).await, Ok(1));
    let wa = run(&qa);
    poll_until(DEADLINE, "A to start the slow send", || async {
        (!cdn.calls.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let wb = run(&qb);
    poll_until(
        DEADLINE,
        "the slow send to finish and the queue to empty",
        || async {
            let s = qb.status().await;
            (answers.all().len() == 1 && is_empty(&s)).then_some(())
        },
    )
    .await;
    wa.stop().await;
    wb.stop().await;
    let calls = cdn.calls.lock().unwrap().clone();
    println!("sends of one item whose send lasted 4 leases: {calls:?}");
    assert_eq!(calls, ["jr-renew-0"], "sent once: the lease was renewed");
}

/// The queue on a Redis Cluster: every script and pipeline (claim, reclaim, the generation
/// check, renew, done) stays in the provider's slot, so items are delivered once each (a key
/// outside the slot would make every claim fail with CROSSSLOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_works_on_a_redis_cluster() {
    use crate::harness::redis::{RedisCluster, SharedRedis};
    let cluster = RedisCluster::start(3);
    let name = "cluster";
    let fake = Arc::new(Fake::new(name, |_, _| {
        Some(ProviderAnswer::Done("ok".into()))
    }));
    let answers = Arc::new(Answers::default());
    let tier = Arc::new(
        Redis::new(&RedisConfig {
            url: String::new(),
            cluster: cluster.node_urls(),
            prefix: PREFIX.into(),
            timeout: Duration::from_millis(250),
            keys: None,
        })
        .expect("redis cluster tier"),
    );
    let dir = tempfile::tempdir().unwrap();
    let q = PurgeQueue::new(
        cfg(dir.path()),
        vec![fake.clone() as Arc<dyn Provider>],
        Some(tier),
        answers.clone() as Arc<dyn AnswerSink>,
    )
    .expect("purge queue");
    assert_eq!(q.enqueue(&job("jcl", 3)).await, Ok(3));
    let want = ids("jcl", name, 3);
    let w = run(&q);
    let calls = wait_delivered(&[&fake], &[&q], &want, "delivered through the cluster").await;
    w.stop().await;
    assert_once_each(&calls, &want);
    assert_eq!(log_text(dir.path()), "", "nothing spilled to the file");
}

/// A graceful upgrade hands the local queue over (`PurgeQueue::hand_over`): what was accepted
/// before is in the file for the next process, and an enqueue afterwards is an error, never an
/// acknowledgement into a log nobody will read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_hand_over_enqueues_are_refused_and_the_file_has_everything() {
    let name = "handover";
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::new(name, |_, _| None));
    let answers = Arc::new(Answers::default());
    let q = queue(cfg(dir.path()), &fake, None, &answers);
    assert_eq!(q.enqueue(&job("before", 2)).await, Ok(2));
    q.hand_over();
    let refused = q.enqueue(&job("after", 2)).await;
    let err = refused.expect_err("an enqueue after the hand-over");
    assert!(err.contains("handed over"), "{err}");
    // The next process (a new queue on the same directory) has the accepted one, only it.
    let next = queue(cfg(dir.path()), &fake, None, &answers);
    assert_eq!(next.status().await.depth, 2);
}
