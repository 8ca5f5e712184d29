//! Eviction by priority class: one LRU per rule `priority` (issue 14), evicted low first.
//!
//! Pingora hands an eviction manager only the cache key, so a rule's class travels in the key's
//! `user_tag` ([`Priority::tag`], not part of the key's hash) and is read once, on admission.
//! The weight budget (`[cache] memory`) is shared by the classes; when a fill goes over it,
//! victims are taken from the least recently used end of the lowest non-empty class: low, then
//! normal, then high, and critical only when nothing else is left.
//!
//! Why not pingora's `lru::Manager`: its node (a boxed copy of the whole compact key, a lookup
//! slot and a list link per entry) made the tier's per-entry overhead at a million entries 836
//! bytes; with this one it was 757 (issue 16, `benches/memory_scale.rs`). Here an entry is one 32-byte node in its shard's slab,
//! linked into its class's list by `u32` indices, and one 4-byte slot in the shard's index,
//! found by the key's combined hash alone. A victim is handed back as a key whose primary hash
//! *is* that combined hash (no variance), which is all the storage's `purge` reads. A hit costs
//! what it did: one shard lock, rate-limited by the memory tier's `lru_interval`, no allocation.
//!
//! With `prioritized = false` every key goes to one class: a plain LRU, the baseline the README's
//! hit-ratio figures compare with.

use crate::rules::Priority;
use ahash::RandomState;
use async_trait::async_trait;
use hashbrown::HashTable;
use parking_lot::Mutex;
use pingora::cache::eviction::EvictionManager;
use pingora::cache::key::{CacheHashKey, CompactCacheKey};
use pingora::cache::{CacheEntryKey, CacheEntryKeyRef};
use pingora::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use super::SHARDS;

const CLASSES: usize = 4;
/// What one entry costs here: its node in a slab that grows by doubling, and its index slot.
pub(super) const LRU_BYTES: usize =
    2 * std::mem::size_of::<Node>() + super::map_slot(std::mem::size_of::<u32>());
/// A weight as a node keeps it. The memory tier's weights fit (`max_object` is at most 1 GiB);
/// a larger one, from another caller, is kept and accounted as `u32::MAX`.
fn weight_u32(weight: usize) -> u32 {
    u32::try_from(weight).unwrap_or(u32::MAX)
}

/// No node: the end of a list, an empty free list.
const NIL: u32 = u32::MAX;

/// One entry: its combined key hash, its weight, its class and its place in the class's list.
/// 32 bytes.
struct Node {
    /// The combined key hash, as two words (a `u128` would align the node to 16 bytes).
    id: [u64; 2],
    /// As the memory tier charges it ([`super::entry_weight`]: 32 bits).
    weight: u32,
    /// Towards the most recently used end, and away from it.
    newer: u32,
    older: u32,
    class: u8,
}

impl Node {
    fn id(&self) -> u128 {
        (u128::from(self.id[0]) << 64) | u128::from(self.id[1])
    }
}

#[derive(Clone, Copy)]
struct List {
    /// Most recently used.
    newest: u32,
    /// Least recently used: the next victim.
    oldest: u32,
}

/// One shard: a slab of nodes (freed slots linked through `older`), an index by key hash, and
/// one list per class.
struct Shard {
    nodes: Vec<Node>,
    free: u32,
    index: HashTable<u32>,
    lists: [List; CLASSES],
}

impl Shard {
    fn with_capacity(capacity: usize) -> Self {
        Shard {
            nodes: Vec::with_capacity(capacity),
            free: NIL,
            index: HashTable::with_capacity(capacity),
            lists: [List {
                newest: NIL,
                oldest: NIL,
            }; CLASSES],
        }
    }

    fn find(&self, hasher: &RandomState, id: u128) -> Option<u32> {
        let nodes = &self.nodes;
        self.index
            .find(hasher.hash_one(id), |&i| nodes[i as usize].id() == id)
            .copied()
    }

    fn unlink(&mut self, i: u32) {
        let (newer, older, class) = {
            let n = &self.nodes[i as usize];
            (n.newer, n.older, n.class as usize)
        };
        match newer {
            NIL => self.lists[class].newest = older,
            j => self.nodes[j as usize].older = older,
        }
        match older {
            NIL => self.lists[class].oldest = newer,
            j => self.nodes[j as usize].newer = newer,
        }
    }

    fn push_newest(&mut self, i: u32) {
        let class = self.nodes[i as usize].class as usize;
        let head = self.lists[class].newest;
        {
            let n = &mut self.nodes[i as usize];
            n.newer = NIL;
            n.older = head;
        }
        match head {
            NIL => self.lists[class].oldest = i,
            j => self.nodes[j as usize].newer = i,
        }
        self.lists[class].newest = i;
    }

    fn insert(&mut self, hasher: &RandomState, id: u128, weight: u32, class: u8) -> u32 {
        let node = Node {
            id: [(id >> 64) as u64, id as u64],
            weight,
            newer: NIL,
            older: NIL,
            class,
        };
        let i = match self.free {
            NIL => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
            i => {
                self.free = self.nodes[i as usize].older;
                self.nodes[i as usize] = node;
                i
            }
        };
        let nodes = &self.nodes;
        self.index.insert_unique(hasher.hash_one(id), i, |&j| {
            hasher.hash_one(nodes[j as usize].id())
        });
        self.push_newest(i);
        i
    }

    /// Removes node `i`; returns its weight and class.
    fn remove(&mut self, hasher: &RandomState, i: u32) -> (usize, usize) {
        self.unlink(i);
        let (id, weight, class) = {
            let n = &self.nodes[i as usize];
            (n.id(), n.weight as usize, n.class as usize)
        };
        if let Ok(slot) = self.index.find_entry(hasher.hash_one(id), |&j| j == i) {
            slot.remove();
        }
        self.nodes[i as usize].older = self.free;
        self.free = i;
        (weight, class)
    }
}

/// The memory tier's eviction manager: a weight budget over one LRU per priority class.
pub struct PriorityEviction {
    shards: Box<[Mutex<Shard>]>,
    /// Keyed per process, like the memory tier's maps.
    hasher: RandomState,
    limit: usize,
    prioritized: bool,
    /// Bytes and entries per class, by [`Priority::class`]: low (evicted first) .. critical.
    size: [AtomicUsize; CLASSES],
    items: [AtomicUsize; CLASSES],
    /// Where the next victim search starts, so evictions spread over the shards.
    next_shard: AtomicUsize,
    evicted_size: AtomicUsize,
    evicted_items: AtomicUsize,
}

/// The map key of a compact key: its combined hash (what the memory tier's maps are keyed by).
fn id_of(key: &CompactCacheKey) -> u128 {
    u128::from_be_bytes(key.combined_bin())
}

/// The key a victim is handed back as: its combined hash as the primary hash, no variance, so
/// that its `combined_bin` is the entry's.
fn victim_key(id: u128) -> CacheEntryKey {
    CacheEntryKey::key_only(CompactCacheKey {
        primary: id.to_be_bytes(),
        variance: None,
        user_tag: Box::default(),
    })
}

impl PriorityEviction {
    /// The memory tier's eviction for a `[cache] memory` budget of `budget` bytes (what the
    /// server builds; `benches/memory_scale.rs` measures the same).
    pub fn for_budget(budget: usize) -> Self {
        // Capacity hint: entries expected at ~4 KiB each, bounded so tiny test budgets stay
        // tiny, spread over the shards (each shard preallocates its share).
        let capacity = (budget / 4096).clamp(64, 1 << 20) / SHARDS;
        Self::with_capacity(budget, capacity.max(64))
    }

    /// A budget of `limit` bytes, `capacity` entries expected per shard, priorities on.
    pub fn with_capacity(limit: usize, capacity: usize) -> Self {
        Self::new(limit, capacity, true)
    }

    /// `prioritized = false`: one LRU for every class (the baseline for measurements).
    pub fn new(limit: usize, capacity: usize, prioritized: bool) -> Self {
        PriorityEviction {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::with_capacity(capacity)))
                .collect(),
            hasher: RandomState::new(),
            limit,
            prioritized,
            size: Default::default(),
            items: Default::default(),
            next_shard: AtomicUsize::new(0),
            evicted_size: AtomicUsize::new(0),
            evicted_items: AtomicUsize::new(0),
        }
    }

    fn class_of_tag(&self, tag: &str) -> u8 {
        if self.prioritized {
            Priority::from_tag(tag).class() as u8
        } else {
            Priority::Normal.class() as u8
        }
    }

    fn shard(&self, id: u128) -> &Mutex<Shard> {
        // The memory tier's maps shard by the same bits.
        &self.shards[(id as usize) % SHARDS]
    }

    fn account(&self, class: usize, weight: isize, items: isize) {
        let add = |a: &AtomicUsize, d: isize| {
            if d >= 0 {
                a.fetch_add(d as usize, Ordering::Relaxed);
            } else {
                a.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
            }
        };
        add(&self.size[class], weight);
        add(&self.items[class], items);
    }

    /// Removes the entry stored under combined key hash `id`; its weight, if it was tracked.
    pub fn remove_id(&self, id: u128) -> Option<usize> {
        let mut shard = self.shard(id).lock();
        let i = shard.find(&self.hasher, id)?;
        let (weight, class) = shard.remove(&self.hasher, i);
        drop(shard);
        self.account(class, -(weight as isize), -1);
        Some(weight)
    }

    /// A hit on the entry under `id`: it becomes its class's most recently used. False if it
    /// is not tracked.
    pub fn access_id(&self, id: u128) -> bool {
        let mut shard = self.shard(id).lock();
        match shard.find(&self.hasher, id) {
            Some(i) => {
                shard.unlink(i);
                shard.push_newest(i);
                true
            }
            None => false,
        }
    }

    fn contains(&self, id: u128) -> bool {
        self.shard(id).lock().find(&self.hasher, id).is_some()
    }

    /// Tracks `id` with `weight` in `class` (replacing an earlier weight and class), as the
    /// class's most recently used.
    fn track(&self, id: u128, weight: usize, class: u8) {
        // Accounted as the node keeps it, so that its removal takes back the same figure.
        let weight = weight_u32(weight);
        let mut shard = self.shard(id).lock();
        let old = shard
            .find(&self.hasher, id)
            .map(|i| shard.remove(&self.hasher, i));
        shard.insert(&self.hasher, id, weight, class);
        drop(shard);
        if let Some((w, c)) = old {
            self.account(c, -(w as isize), -1);
        }
        self.account(class as usize, weight as isize, 1);
    }

    /// Takes the least recently used entry of `class` from one shard, never `admitted`.
    fn take_oldest(&self, class: usize, admitted: u128) -> Option<(u128, usize)> {
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
        for s in 0..SHARDS {
            let mut shard = self.shards[(start + s) % SHARDS].lock();
            let mut i = shard.lists[class].oldest;
            if i != NIL && shard.nodes[i as usize].id() == admitted {
                i = shard.nodes[i as usize].newer;
            }
            if i == NIL {
                continue;
            }
            let id = shard.nodes[i as usize].id();
            let (weight, _) = shard.remove(&self.hasher, i);
            drop(shard);
            self.account(class, -(weight as isize), -1);
            return Some((id, weight));
        }
        None
    }

    /// Takes victims, lowest class first, until the budget holds. The shards of a class are
    /// taken in turn; `admitted`, the entry just filled, is taken only when nothing else is left.
    fn evict_to_limit(&self, admitted: u128) -> Vec<CacheEntryKey> {
        let mut victims = Vec::new();
        let mut take = |id: u128, weight: usize| {
            self.evicted_size.fetch_add(weight, Ordering::Relaxed);
            self.evicted_items.fetch_add(1, Ordering::Relaxed);
            victims.push(victim_key(id));
        };
        for class in 0..CLASSES {
            while self.total_size() > self.limit && self.items[class].load(Ordering::Relaxed) > 0 {
                let Some((id, weight)) = self.take_oldest(class, admitted) else {
                    break;
                };
                take(id, weight);
            }
        }
        if self.total_size() > self.limit {
            // Nothing else is left: the new entry alone is over the budget.
            if let Some(weight) = self.remove_id(admitted) {
                take(admitted, weight);
            }
        }
        victims
    }

    /// Bytes held by a class.
    pub fn class_size(&self, priority: Priority) -> usize {
        self.size[priority.class()].load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EvictionManager for PriorityEviction {
    fn total_size(&self) -> usize {
        self.size.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    fn total_items(&self) -> usize {
        self.items.iter().map(|s| s.load(Ordering::Relaxed)).sum()
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
        _fresh_until: SystemTime,
    ) -> Vec<CacheEntryKey> {
        let id = id_of(item.key());
        self.track(id, size, self.class_of_tag(&item.key().user_tag));
        self.evict_to_limit(id)
    }

    fn increment_weight(
        &self,
        item: &CacheEntryKey,
        delta: usize,
        max_weight: Option<usize>,
    ) -> Vec<CacheEntryKey> {
        let id = id_of(item.key());
        let class = self.class_of_tag(&item.key().user_tag);
        let old = {
            let shard = self.shard(id).lock();
            shard
                .find(&self.hasher, id)
                .map(|i| shard.nodes[i as usize].weight as usize)
        };
        let mut weight = old.unwrap_or(0).saturating_add(delta);
        if let Some(max) = max_weight {
            weight = weight.min(max);
        }
        self.track(id, weight, class);
        self.evict_to_limit(id)
    }

    fn remove(&self, item: CacheEntryKeyRef<'_>) {
        let _ = self.remove_id(id_of(item.key()));
    }

    fn access(&self, item: &CacheEntryKey, _size: usize, _fresh_until: SystemTime) -> bool {
        self.access_id(id_of(item.key()))
    }

    fn peek(&self, item: &CacheEntryKey) -> bool {
        self.contains(id_of(item.key()))
    }

    /// Not kept: the memory tier starts empty, and an order of keys without their entries
    /// would evict nothing.
    async fn save(&self, _dir_path: &str) -> Result<()> {
        Ok(())
    }

    async fn load(&self, _dir_path: &str) -> Result<()> {
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

    #[test]
    fn a_hit_moves_an_entry_away_from_eviction_and_freed_slots_are_reused() {
        let e = PriorityEviction::with_capacity(3, 4);
        let keys: Vec<_> = (0..4)
            .map(|i| key(&format!("k{i}"), Priority::Normal))
            .collect();
        for k in &keys[..3] {
            assert!(admit(&e, k, 1).is_empty());
        }
        assert!(e.access(&keys[0], 1, SystemTime::now()));
        // k0 was used last: k1 is now the least recently used.
        assert_eq!(admit(&e, &keys[3], 1), vec![keys[1].key().combined()]);
        // Many more admissions than the budget holds reuse the slots: the slab stays small.
        for round in 0..1000 {
            let k = key(&format!("r{round}"), Priority::Normal);
            assert_eq!(admit(&e, &k, 1).len(), 1);
        }
        assert_eq!((e.total_items(), e.total_size()), (3, 3));
        let slab: usize = e.shards.iter().map(|s| s.lock().nodes.len()).sum();
        // A shard holds at most the 4 entries alive during an admission (without reuse: 1,004).
        assert!(slab <= 4 * SHARDS, "{slab} nodes for 3 entries");
    }

    /// A victim comes back as a key whose combined hash is the entry's, variance included, so
    /// the storage's `purge` finds it.
    #[test]
    fn a_victim_key_names_the_admitted_variant() {
        let e = PriorityEviction::with_capacity(1, 4);
        let mut variant = CacheKey::new("v", Priority::Normal.tag());
        variant.set_variance_key([7; 16]);
        let variant = CacheEntryKey::key_only(variant.to_compact());
        admit(&e, &variant, 1);
        let victims = admit(&e, &key("other", Priority::Normal), 1);
        assert_eq!(victims, vec![variant.key().combined()]);
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
