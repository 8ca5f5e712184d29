//! Which requests are popular: a count-min sketch and a top-K list per minute, folded into
//! hourly top-K lists (fleet-wide in Redis sorted sets, or in this process without Redis).
//!
//! Memory is fixed: the sketch is [`DEPTH`] x [`WIDTH`] counters, the minute's candidates at
//! most [`TOP_K`] entries (a request enters when its sketch estimate beats the smallest
//! candidate, the classic "heavy hitters" scheme), and the local history at most [`HOURS`]
//! lists of [`TOP_K`]. Only GET requests the cache admitted and whose answer it held or stored (a
//! `no-store` answer would store nothing when warmed), that no warm job sent, are counted,
//! identified by `Host` and path with query (what a `top` job replays) and skipped above
//! [`MAX_LEN`] bytes. With Redis, each instance adds its minute's list to the hour's sorted set
//! (`ZINCRBY`, trimmed to [`TOP_K`], expiring after a day) when the minute ends, so the fleet's
//! view lags by at most a minute; `top` reads those sets and this instance's current minute.

use super::spec::Target;
use crate::redis::{Keyspace, Redis};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Most candidates kept per minute and per hour, and the largest `top`.
pub const TOP_K: usize = 1000;
/// Sketch rows and counters per row.
const DEPTH: usize = 4;
const WIDTH: usize = 2048;
/// A minute, the unit of flushing.
const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// Hours of history kept (locally and in Redis).
const HOURS: usize = 25;
/// Longest host + path counted.
const MAX_LEN: usize = 2048;

struct Minute {
    start_ms: u64,
    sketch: Vec<u32>,
    /// By the key's hash: its count and the key (built once, when it enters the list). Looked
    /// up on every counted hit: aHash (keyed per process) rather than SipHash.
    candidates: ahash::AHashMap<u64, (u64, String)>,
    /// The smallest candidate count while the list is full (a new key must beat it), so the
    /// common case, a rare key, costs no scan of the list.
    floor: u64,
}

impl Minute {
    fn new(start_ms: u64) -> Self {
        Minute {
            start_ms,
            sketch: vec![0; DEPTH * WIDTH],
            candidates: ahash::AHashMap::new(),
            floor: 0,
        }
    }

    /// Counts one request and returns its estimate. One hash of the key serves every sketch
    /// row (double hashing) and the candidate list, so a request allocates only when its key
    /// enters the list. Two keys with one 64-bit hash would share a count.
    fn add(&mut self, host: &str, path: &str) -> u64 {
        let h = HASHER.hash_one((host, path));
        let (h1, h2) = (h as usize, ((h >> 32) as usize) | 1);
        let mut estimate = u32::MAX;
        for row in 0..DEPTH {
            let col = h1.wrapping_add(row.wrapping_mul(h2)) % WIDTH;
            let cell = &mut self.sketch[row * WIDTH + col];
            *cell = cell.saturating_add(1);
            estimate = estimate.min(*cell);
        }
        let estimate = u64::from(estimate);
        if let Some(c) = self.candidates.get_mut(&h) {
            c.0 = estimate;
        } else if self.candidates.len() < TOP_K {
            self.candidates.insert(h, (estimate, encode(host, path)));
            if self.candidates.len() == TOP_K {
                self.floor = self.lowest().map_or(0, |(_, c)| c);
            }
        } else if estimate > self.floor {
            if let Some((k, _)) = self.lowest() {
                self.candidates.remove(&k);
            }
            self.candidates.insert(h, (estimate, encode(host, path)));
            self.floor = self.lowest().map_or(0, |(_, c)| c);
        }
        estimate
    }

    /// The candidate with the smallest count: its hash and count.
    fn lowest(&self) -> Option<(u64, u64)> {
        (self.candidates.iter())
            .min_by_key(|(_, (c, _))| *c)
            .map(|(k, (c, _))| (*k, *c))
    }

    /// The candidates as key -> count.
    fn counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.candidates.values().map(|(c, k)| (k.as_str(), *c))
    }
}

/// The one hasher of popularity keys (fixed seeds: a key lands in the same counters all minute).
static HASHER: once_cell::sync::Lazy<ahash::RandomState> =
    once_cell::sync::Lazy::new(|| ahash::RandomState::with_seeds(7, 11, 13, 17));

/// The popularity tracker (one per process).
pub struct Popular {
    redis: Option<(Arc<Redis>, Keyspace)>,
    current: Mutex<Minute>,
    /// Without Redis: (hour start, top list), newest last.
    history: Mutex<VecDeque<(u64, HashMap<String, u64>)>>,
}

fn encode(host: &str, path: &str) -> String {
    format!("{host} {path}")
}

fn decode(key: &str) -> Option<Target> {
    let (host, path) = key.split_once(' ')?;
    Some(Target {
        method: "GET".into(),
        path: path.to_string(),
        host: (!host.is_empty()).then(|| host.to_string()),
        body: None,
    })
}

impl Popular {
    pub fn new(redis: Option<Arc<Redis>>) -> Result<Arc<Self>, String> {
        let redis = match redis {
            Some(r) => {
                let keys = r.keyspace("warm popularity", "warm:pop:")?;
                Some((r, keys))
            }
            None => None,
        };
        Ok(Arc::new(Popular {
            redis,
            current: Mutex::new(Minute::new(minute_of(crate::clock::now_ms()))),
            history: Mutex::new(VecDeque::new()),
        }))
    }

    /// Counts one request (cheap: one hash and no allocation under a short lock, unless the
    /// key enters the minute's list). A minute that ended is
    /// handed to [`Self::flush`] by the caller's next tick, not here.
    pub fn record(&self, host: &str, path: &str) {
        if host.len() + path.len() + 1 > MAX_LEN {
            return;
        }
        self.current.lock().add(host, path);
    }

    /// Ends the minute if it is over: its candidates go to the hour's list (Redis or local).
    pub async fn flush(&self, now_ms: u64) {
        let ended = {
            let mut cur = self.current.lock();
            if minute_of(now_ms) == cur.start_ms {
                return;
            }
            std::mem::replace(&mut *cur, Minute::new(minute_of(now_ms)))
        };
        if ended.candidates.is_empty() {
            return;
        }
        let hour = ended.start_ms / HOUR_MS * HOUR_MS;
        match &self.redis {
            Some((redis, keys)) => {
                let key = keys.key(hour);
                let mut pipe = redis::pipe();
                for (k, c) in ended.counts() {
                    pipe.cmd("ZINCRBY").arg(&key).arg(c).arg(k).ignore();
                }
                pipe.cmd("ZREMRANGEBYRANK")
                    .arg(&key)
                    .arg(0)
                    .arg(-(TOP_K as i64) - 1)
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(HOURS as u64 * HOUR_MS)
                    .ignore();
                let _: Option<()> = redis.background_pipe("warm popularity", &pipe).await;
            }
            None => {
                let mut history = self.history.lock();
                if history.back().is_none_or(|(h, _)| *h != hour) {
                    history.push_back((hour, HashMap::new()));
                    while history.len() > HOURS {
                        history.pop_front();
                    }
                }
                let list = &mut history.back_mut().expect("pushed above").1;
                for (c, k) in ended.candidates.into_values() {
                    *list.entry(k).or_default() += c;
                }
                trim(list);
            }
        }
    }

    /// The `n` most requested over the last `since_ms` (whole hours, plus the current minute).
    pub async fn top(&self, n: usize, since_ms: u64, now_ms: u64) -> Vec<Target> {
        // Nothing older than the history is kept: a longer `since` (`"30y"`) reads no more,
        // and must not walk (one Redis read per hour) back to 1970.
        let since_ms = since_ms.min(HOURS as u64 * HOUR_MS);
        let from_hour = now_ms.saturating_sub(since_ms) / HOUR_MS * HOUR_MS;
        let mut sum: HashMap<String, u64> = (self.current.lock().counts())
            .map(|(k, c)| (k.to_string(), c))
            .collect();
        match &self.redis {
            Some((redis, keys)) => {
                let mut hour = from_hour;
                while hour <= now_ms {
                    let mut cmd = redis::cmd("ZRANGE");
                    cmd.arg(keys.key(hour))
                        .arg(0)
                        .arg(TOP_K as i64 - 1)
                        .arg("REV")
                        .arg("WITHSCORES");
                    let list: Option<Vec<(String, f64)>> =
                        redis.background("warm popularity", &cmd).await;
                    for (k, c) in list.unwrap_or_default() {
                        *sum.entry(k).or_default() += c as u64;
                    }
                    hour += HOUR_MS;
                }
            }
            None => {
                for (hour, list) in self.history.lock().iter() {
                    if *hour >= from_hour {
                        for (k, c) in list {
                            *sum.entry(k.clone()).or_default() += *c;
                        }
                    }
                }
            }
        }
        let mut all: Vec<(String, u64)> = sum.into_iter().collect();
        // Most requested first; ties by name, so the answer is reproducible.
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.into_iter()
            .filter_map(|(k, _)| decode(&k))
            .take(n)
            .collect()
    }
}

fn minute_of(ms: u64) -> u64 {
    ms / MINUTE_MS * MINUTE_MS
}

/// Keeps the [`TOP_K`] largest.
fn trim(list: &mut HashMap<String, u64>) {
    if list.len() <= TOP_K {
        return;
    }
    let mut counts: Vec<u64> = list.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let floor = counts[TOP_K - 1];
    list.retain(|_, c| *c >= floor);
    if list.len() > TOP_K {
        let mut keys: Vec<(String, u64)> = list.drain().collect();
        keys.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        keys.truncate(TOP_K);
        list.extend(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_most_requested_come_first_and_memory_stays_bounded() {
        let p = Popular::new(None).unwrap();
        // 3000 distinct one-off requests, then a few popular ones.
        for i in 0..3000 {
            p.record("h", &format!("/once/{i}"));
        }
        for (path, n) in [("/a", 50), ("/b", 40), ("/c", 30)] {
            for _ in 0..n {
                p.record("h", path);
            }
        }
        assert!(p.current.lock().candidates.len() <= TOP_K);
        let now = crate::clock::now_ms();
        let top = p.top(3, HOUR_MS, now).await;
        let paths: Vec<&str> = top.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["/a", "/b", "/c"]);
        assert_eq!(top[0].host.as_deref(), Some("h"));
        // The minute ends: its list moves to the hour's, and still answers.
        p.flush(now + MINUTE_MS).await;
        let top = p.top(1, HOUR_MS, now + MINUTE_MS).await;
        assert_eq!(top[0].path, "/a");
        assert!(p.history.lock().iter().all(|(_, l)| l.len() <= TOP_K));
    }
}
