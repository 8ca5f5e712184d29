//! Eviction by priority class: one LRU per rule `priority` (issue 14), evicted low first.
//!
//! Pingora hands an eviction manager only the cache key, so a rule's class travels in the key's
//! `user_tag` ([`Priority::tag`], not part of the key's hash). Each class is a pingora sharded
//! LRU ([`lru::Manager`], never over its own limit); the weight budget (`[cache] memory`) is
//! shared, and when a fill goes over it victims are taken from the least recently used end of
//! the lowest non-empty class: low, then normal, then high, and critical only when nothing else
//! is left. A hit costs what it did with one LRU (one shard lock, rate-limited by the memory
//! tier's `lru_interval`), no allocation and no extra lookup: the class is in the key.
//!
//! With `prioritized = false` every key goes to one class: a plain LRU, the baseline the README's
//! hit-ratio figures compare with.

use crate::rules::Priority;
use async_trait::async_trait;
use pingora::cache::eviction::{lru, EvictionManager};
use pingora::cache::{CacheEntryKey, CacheEntryKeyRef};
use pingora::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use super::SHARDS;

/// The memory tier's eviction manager: a weight budget over one LRU per priority class.
pub struct PriorityEviction {
    /// By [`Priority::class`]: low (evicted first) .. critical.
    classes: [lru::Manager<SHARDS>; 4],
    limit: usize,
    prioritized: bool,
    /// Where the next victim search starts, so evictions spread over the shards.
    next_shard: AtomicUsize,
    evicted_size: AtomicUsize,
    evicted_items: AtomicUsize,
}

impl PriorityEviction {
    /// The memory tier's eviction for a `[cache] memory` budget of `budget` bytes (what the
    /// server builds; `benches/memory_scale.rs` measures the same).
    pub fn for_budget(budget: usize) -> Self {
        // Capacity hint: entries expected at ~4 KiB each, bounded so tiny test budgets stay
        // tiny, spread over the shards (pingora's LRU preallocates `capacity` in *each* shard:
        // a total here made a 2 GiB budget preallocate 16 times the table, 285 MiB of RSS).
        let capacity = (budget / 4096).clamp(64, 1 << 20) / SHARDS;
        Self::with_capacity(budget, capacity.max(64))
    }

    /// A budget of `limit` bytes, `capacity` entries expected per shard, priorities on.
    pub fn with_capacity(limit: usize, capacity: usize) -> Self {
        Self::new(limit, capacity, true)
    }

    /// `prioritized = false`: one LRU for every class (the baseline for measurements).
    pub fn new(limit: usize, capacity: usize, prioritized: bool) -> Self {
        let class = |c: usize| {
            // Normal takes the preallocation; the others grow as rules use them.
            let cap = if c == Priority::Normal.class() {
                capacity
            } else {
                capacity.min(64)
            };
            lru::Manager::with_capacity(usize::MAX, cap)
        };
        PriorityEviction {
            classes: [class(0), class(1), class(2), class(3)],
            limit,
            prioritized,
            next_shard: AtomicUsize::new(0),
            evicted_size: AtomicUsize::new(0),
            evicted_items: AtomicUsize::new(0),
        }
    }

    fn class_of(&self, item: &CacheEntryKey) -> &lru::Manager<SHARDS> {
        self.class_of_tag(&item.key().user_tag)
    }

    fn class_of_tag(&self, tag: &str) -> &lru::Manager<SHARDS> {
        if self.prioritized {
            &self.classes[Priority::from_tag(tag).class()]
        } else {
            &self.classes[Priority::Normal.class()]
        }
    }

    /// Takes victims, lowest class first, until the budget holds. The shards of a class are
    /// taken in turn (as pingora's sharded LRU does); `admitted`, the entry just filled, is
    /// taken only when nothing else is left.
    fn evict_to_limit(&self, admitted: &CacheEntryKey) -> Vec<CacheEntryKey> {
        let mut victims = Vec::new();
        let mut total = self.total_size();
        let mut take = |class: &lru::Manager<SHARDS>, victim: CacheEntryKey, total: &mut usize| {
            let weight = class.peek_weight(&victim).unwrap_or(0);
            class.remove(CacheEntryKeyRef::from(&victim));
            *total = total.saturating_sub(weight);
            self.evicted_size.fetch_add(weight, Ordering::Relaxed);
            self.evicted_items.fetch_add(1, Ordering::Relaxed);
            victims.push(victim);
        };
        for class in &self.classes {
            while total > self.limit && class.total_items() > 0 {
                let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
                let Some(victim) = (0..SHARDS)
                    .filter_map(|i| class.peek_lru((start + i) % SHARDS))
                    .find(|v| v != admitted)
                else {
                    break;
                };
                take(class, victim, &mut total);
            }
        }
        if total > self.limit {
            // Nothing else is left: the new entry alone is over the budget.
            let class = self.class_of(admitted);
            if class.peek(admitted) {
                take(class, admitted.clone(), &mut total);
            }
        }
        victims
    }

    /// Bytes held by a class.
    pub fn class_size(&self, priority: Priority) -> usize {
        self.classes[priority.class()].total_size()
    }
}

#[async_trait]
impl EvictionManager for PriorityEviction {
    fn total_size(&self) -> usize {
        self.classes.iter().map(|c| c.total_size()).sum()
    }

    fn total_items(&self) -> usize {
        self.classes.iter().map(|c| c.total_items()).sum()
    }

    fn evicted_size(&self) -> usize {
        self.evicted_size.load(Ordering::Relaxed)
    }

    fn evicted_items(&self) -> usize {
        self.evicted_items.load(Ordering::Relaxed)
    }

    fn admit(
        &self,
        item: CacheEntryKey,
        size: usize,
        fresh_until: SystemTime,
    ) -> Vec<CacheEntryKey> {
        // Never over its own (unbounded) limit: nothing comes back from the class itself.
        let class = self.class_of(&item);
        let _ = class.admit(item.clone(), size, fresh_until);
        self.evict_to_limit(&item)
    }

    fn increment_weight(
        &self,
        item: &CacheEntryKey,
        delta: usize,
        max_weight: Option<usize>,
    ) -> Vec<CacheEntryKey> {
        let _ = self
            .class_of(item)
            .increment_weight(item, delta, max_weight);
        self.evict_to_limit(item)
    }

    fn remove(&self, item: CacheEntryKeyRef<'_>) {
        self.class_of_tag(&item.key().user_tag).remove(item);
    }

    fn access(&self, item: &CacheEntryKey, size: usize, fresh_until: SystemTime) -> bool {
        self.class_of(item).access(item, size, fresh_until)
    }

    fn peek(&self, item: &CacheEntryKey) -> bool {
        self.class_of(item).peek(item)
    }

    async fn save(&self, dir_path: &str) -> Result<()> {
        for (c, class) in self.classes.iter().enumerate() {
            class.save(&format!("{dir_path}/class-{c}")).await?;
        }
        Ok(())
    }

    async fn load(&self, dir_path: &str) -> Result<()> {
        for (c, class) in self.classes.iter().enumerate() {
            class.load(&format!("{dir_path}/class-{c}")).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::key::CacheHashKey;
    use pingora::cache::CacheKey;

    fn key(name: &str, p: Priority) -> CacheEntryKey {
        CacheEntryKey::key_only(CacheKey::new(name, p.tag()).to_compact())
    }

    fn admit(e: &PriorityEviction, k: &CacheEntryKey, size: usize) -> Vec<String> {
        e.admit(k.clone(), size, SystemTime::now())
            .into_iter()
            .map(|v| v.key().combined())
            .collect()
    }

    #[test]
    fn low_goes_first_and_critical_last() {
        let e = PriorityEviction::with_capacity(100, 8);
        let crit = key("crit", Priority::Critical);
        let high = key("high", Priority::High);
        let low = key("low", Priority::Low);
        assert!(admit(&e, &crit, 40).is_empty());
        assert!(admit(&e, &high, 30).is_empty());
        assert!(admit(&e, &low, 30).is_empty());
        assert_eq!(e.total_size(), 100);
        // A normal fill over the budget takes the low entry, though the critical one is older.
        let n1 = key("n1", Priority::Normal);
        assert_eq!(admit(&e, &n1, 20), vec![low.key().combined()]);
        // Another: low is empty, so the older normal one goes before high.
        let n2 = key("n2", Priority::Normal);
        assert_eq!(admit(&e, &n2, 20), vec![n1.key().combined()]);
        // A big one: normal, then high, then (nothing else left) critical.
        let n3 = key("n3", Priority::Normal);
        assert_eq!(
            admit(&e, &n3, 90),
            vec![
                n2.key().combined(),
                high.key().combined(),
                crit.key().combined()
            ]
        );
        assert_eq!(e.total_size(), 90);
        assert_eq!(e.evicted_items(), 5);
        assert!(e.peek(&n3) && !e.peek(&crit));
        e.remove(CacheEntryKeyRef::from(&n3));
        assert_eq!(e.total_size(), 0);
    }

    #[test]
    fn without_priorities_it_is_one_lru() {
        let e = PriorityEviction::new(100, 8, false);
        let crit = key("crit", Priority::Critical);
        let low = key("low", Priority::Low);
        admit(&e, &crit, 50);
        admit(&e, &low, 50);
        let victims = admit(&e, &key("n", Priority::Normal), 50);
        assert_eq!(victims.len(), 1, "{victims:?}");
        assert!(
            victims[0] == crit.key().combined() || victims[0] == low.key().combined(),
            "an older entry goes, whatever its class"
        );
        // With priorities the low one would go; here it can be the critical one.
        let big = key("big", Priority::Normal);
        assert_eq!(
            admit(&e, &big, 200).len(),
            3,
            "alone over the budget: all go"
        );
        assert_eq!(e.total_size(), 0);
    }

    /// The hit ratio of critical entries under memory pressure, with and without priorities
    /// (the README's figures): 200,000 requests, 10% to 100 critical keys (uniform), 90% to
    /// 20,000 normal keys (skewed: key = n * u^2), 1 KiB each, a budget of 1,000 entries.
    /// Deterministic (a fixed xorshift seed), so the figures are reproducible:
    /// `cargo test --lib critical_hit_ratio -- --nocapture`.
    #[test]
    fn critical_hit_ratio_under_pressure() {
        fn run(prioritized: bool) -> (f64, f64) {
            let e = PriorityEviction::new(1000 * 1024, 64, prioritized);
            let crit: Vec<_> = (0..100)
                .map(|i| key(&format!("c{i}"), Priority::Critical))
                .collect();
            let normal: Vec<_> = (0..20_000)
                .map(|i| key(&format!("n{i}"), Priority::Normal))
                .collect();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut rand = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64
            };
            let (mut c_req, mut c_hit, mut n_req, mut n_hit) = (0u32, 0u32, 0u32, 0u32);
            let now = SystemTime::now();
            for _ in 0..200_000 {
                let is_crit = rand() < 0.1;
                let u = rand();
                let k = if is_crit {
                    &crit[(u * 100.0) as usize]
                } else {
                    &normal[((u * u) * 20_000.0) as usize]
                };
                let hit = e.peek(k);
                if hit {
                    e.access(k, 1024, now);
                } else {
                    e.admit(k.clone(), 1024, now);
                }
                if is_crit {
                    c_req += 1;
                    c_hit += u32::from(hit);
                } else {
                    n_req += 1;
                    n_hit += u32::from(hit);
                }
            }
            (
                f64::from(c_hit) / f64::from(c_req),
                f64::from(n_hit) / f64::from(n_req),
            )
        }
        let (with_c, with_n) = run(true);
        let (without_c, without_n) = run(false);
        println!(
            "critical hit ratio: {:.1}% with priorities, {:.1}% without; normal: {:.1}% with, {:.1}% without",
            with_c * 100.0,
            without_c * 100.0,
            with_n * 100.0,
            without_n * 100.0
        );
        assert!(with_c > 0.99, "critical entries stay once filled: {with_c}");
        assert!(without_c < with_c - 0.2, "{without_c} vs {with_c}");
    }
}
