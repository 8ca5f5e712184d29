//! The bounded in-process memory tier.
//!
//! Entries sit in a sharded table (one `RwLock` per shard, held only to clone an `Arc`), found by
//! pingora's combined key hash (primary + variance), which each entry holds. The eviction
//! manager ([`PriorityEviction`], `priority.rs`) decides what to drop when a fill would exceed
//! `cache.memory`; victims are then purged through [`Storage::purge`]. Every per-entry part is
//! kept small (issue 16: 474 B an entry beyond body and header at a million entries, from 2.5 KB):
//! 8-byte slots in the table and the URI index, times in 8 bytes, path and tags in one buffer.
//!
//! A hit must be cheap: rather than deserialising `CacheMeta` (zstd + header parsing), an entry
//! keeps the response header parsed and the few timestamps needed to rebuild the meta, and the
//! body as one `Bytes`. A per-URI index finds every variant of a URI (RFC 9111 §4.4 invalidation,
//! and `vary-miss` reporting) without scanning.
//!
//! This file is the store (shards, URI index, accounting, the `Storage` impl); how a found
//! body is read is in `hit.rs`, how a fetched body becomes an entry in `fill.rs`.

mod compact;
mod fill;
mod hit;
mod priority;
pub mod segments;

pub use super::meta::StoredTimes;
pub use hit::{BodyHit, PartialHit, Stored};
pub use priority::PriorityEviction;

use super::meta::MetaFacts;
use super::EntryInfo;
use crate::metrics::metrics;
use crate::rules::StoredRule;
use ahash::RandomState;
use async_trait::async_trait;
use bytes::Bytes;
use compact::{alloc_size, body_weight, header_weight, owned_body, StoredHeader, ARC_COUNTS};
use fill::{MemoryMiss, Partial, Progress};
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use pingora::cache::eviction::EvictionManager;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{HitHandler, MissHandler, PurgeOutcome, PurgeTarget, PurgeType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheEntryKey, CacheKey, CacheMeta, Storage};
use pingora::Result;
use std::any::Any;
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

const SHARDS: usize = 16;
/// A hash map slot of `slot` bytes as a share of the table: hashbrown keeps a control byte per
/// slot, fills at most 7/8 of its slots and doubles when full, so a slot costs up to 16/7 of
/// itself (and its control byte).
const fn map_slot(slot: usize) -> usize {
    (slot + 1) * 16 / 7
}
/// Bytes every entry costs beyond its body, header and facts: the entry with its reference
/// counts (in the allocator's size class), its slots in the table and in the URI index, and its
/// LRU node ([`priority::LRU_BYTES`]).
const ENTRY_OVERHEAD: usize = alloc_size(ARC_COUNTS + size_of::<Entry>())
    + 2 * map_slot(size_of::<Arc<Entry>>())
    + priority::LRU_BYTES;
/// What the allocator holds beyond an entry's own bytes while a full tier churns: entries are
/// freed by eviction on other threads and in another order than they were made, so their
/// pages are not all reused at once. Measured through the gateway (`tests/it/eviction.rs`, 4 MiB
/// of 1 KiB answers filled twice over): about 1 KB an entry held beyond what the library-level
/// fill of `benches/memory_scale.rs` (evicting in order, one thread) sees. Charged in part, so
/// that the budget holds about as many entries as before the entries shrank (issue 16) and the
/// process's growth stays within the test's bound.
const CHURN_ALLOWANCE: usize = 300;
/// A hit moves its entry up the LRU at most this often (milliseconds).
const LRU_INTERVAL_MS: u64 = 1000;

/// A monotonic millisecond clock, offset so that a fresh entry (last promoted at 0) is due.
pub(super) fn clock_ms() -> u64 {
    crate::clock::mono_ms() + LRU_INTERVAL_MS
}

/// The eviction manager type the memory tier is bounded by: one LRU per rule priority.
pub type Eviction = PriorityEviction;

/// What the entry keeps of pingora's meta: the facts both tiers keep ([`MetaFacts`]) and the
/// compact header.
#[derive(Clone)]
pub(super) struct StoredMeta {
    pub(super) facts: MetaFacts,
    header: StoredHeader,
}

impl StoredMeta {
    /// A complete entry states its length: an answer that came chunked is stored with
    /// `Content-Length`, so hits carry it and byte ranges can be served from it (pingora's range
    /// filter needs it; RFC 9110 §14).
    pub(super) fn set_length(&mut self, len: usize) {
        if matches!(self.header.status(), 204 | 304)
            || self.header.contains(&http::header::CONTENT_LENGTH)
        {
            return;
        }
        let mut h = self.header.to_response_header();
        h.remove_header(&http::header::TRANSFER_ENCODING);
        let _ = h.insert_header(http::header::CONTENT_LENGTH, len);
        // Stored again, so the new value shares the one exactly sized buffer.
        self.header = StoredHeader::new(&h);
    }

    fn from_meta(meta: &CacheMeta) -> Self {
        StoredMeta {
            facts: MetaFacts::of(meta),
            header: StoredHeader::new(meta.response_header()),
        }
    }

    /// The meta pingora sees, with the entry's facts attached.
    fn to_meta(&self, info: &Arc<EntryInfo>) -> CacheMeta {
        let mut meta = self.facts.to_meta(self.header.to_response_header());
        info.clone().attach(&mut meta);
        meta
    }
}

pub(super) struct Entry {
    /// Its combined key hash: what the shard's table finds it by.
    pub(super) id: u128,
    /// [`clock_ms`] (its low 32 bits, compared wrapping) when a hit last moved this entry up
    /// the LRU.
    pub(super) touched: AtomicU32,
    /// What it charges the budget ([`entry_weight`]; under 4 GiB, as `max_object` is at most
    /// 1 GiB).
    pub(super) weight: u32,
    /// Never changed in place: a revalidation stores a new entry with the same body
    /// ([`Storage::update_meta`]), so a reader holding this one sees one consistent answer
    /// and a hit takes no lock.
    pub(super) meta: StoredMeta,
    pub(super) body: Bytes,
    pub(super) info: Arc<EntryInfo>,
}

/// One shard of entries, found by combined key hash (which each entry holds: an 8-byte slot
/// per entry, not a 32-byte `(u128, Arc)` pair). Looked up on every hit. The table hashes the
/// low 64 bits of the key hash with aHash (keyed per process, so keys an attacker computes
/// offline cannot be made to collide) rather than SipHash.
type Shard = RwLock<HashTable<Arc<Entry>>>;
/// One shard of the URI index: every entry once more, found by its URI id, so all variants of a
/// URI are found without scanning (an 8-byte slot an entry, no list per URI; it was a 16-byte
/// `(URI id, low half of the key hash)` pair, issue 16). A link is changed only under the lock of
/// its entry's shard, taken first ([`MemoryStorage::relink`]), so the index holds exactly the
/// entries the table holds: a link left behind would keep its entry's body alive.
type UriShard = Mutex<HashTable<Arc<Entry>>>;

/// The memory tier.
pub struct MemoryStorage {
    shards: Box<[Shard]>,
    uris: Box<[UriShard]>,
    hasher: RandomState,
    /// Fills in progress, readable while they stream (e.g. server-sent events): key -> (write
    /// id, fill).
    partials: Mutex<HashMap<u128, (u64, Arc<Partial>)>>,
    /// Bytes held per rule (for `/admin/stats`); updated on fills and removals only.
    rule_bytes: Mutex<HashMap<Box<str>, i64>>,
    next_write: AtomicU64,
    eviction: &'static Eviction,
    entries: AtomicI64,
    bytes: AtomicI64,
    evictions: AtomicU64,
}

/// The map key of a pingora key hash.
pub fn id(hash: HashBinary) -> u128 {
    u128::from_be_bytes(hash)
}

impl MemoryStorage {
    /// A memory tier whose admissions are accounted by `eviction`.
    pub fn new(eviction: &'static Eviction) -> Self {
        MemoryStorage {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            uris: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: RandomState::new(),
            partials: Mutex::new(HashMap::new()),
            rule_bytes: Mutex::new(HashMap::new()),
            next_write: AtomicU64::new(1),
            eviction,
            entries: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u128) -> &Shard {
        &self.shards[(id as usize) % SHARDS]
    }

    fn uri_shard(&self, uri: u64) -> &UriShard {
        &self.uris[(uri as usize) % SHARDS]
    }

    /// Where an entry, or a URI, sits in its table: aHash of 64 bits of it.
    fn slot(&self, word: u64) -> u64 {
        self.hasher.hash_one(word)
    }

    /// The entry stored under `id`.
    pub(super) fn get(&self, id: u128) -> Option<Arc<Entry>> {
        self.shard(id)
            .read()
            .find(self.slot(id as u64), |e| e.id == id)
            .cloned()
    }

    /// Entries currently stored.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed).max(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes currently charged (bodies, headers and per-entry overhead).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed).max(0) as usize
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Whether any variant of this URI is stored (a miss on it is then a `vary-miss`).
    pub fn has_uri(&self, uri: u64) -> bool {
        self.uri_shard(uri)
            .lock()
            .find(self.slot(uri), |e| e.info.uri == uri)
            .is_some()
    }

    /// The entries the URI index links to a URI, taken under the index's lock alone.
    fn variants(&self, uri: u64) -> Vec<Arc<Entry>> {
        self.uri_shard(uri)
            .lock()
            .iter_hash(self.slot(uri))
            .filter(|e| e.info.uri == uri)
            .cloned()
            .collect()
    }

    /// Removes every variant stored for a URI; returns how many were removed.
    pub fn purge_uri(&self, uri: u64) -> usize {
        // Collected first: `remove` takes the entry's shard lock, then the index's (the one
        // order in which both are taken).
        let mut n = 0;
        for entry in self.variants(uri) {
            let id = entry.id;
            if self.remove(id).is_some() {
                self.eviction.remove_id(id);
                n += 1;
            }
        }
        n
    }

    /// Removes one entry (an invalidation from another instance); true if it was stored.
    pub fn purge_id(&self, id: u128) -> bool {
        match self.remove(id) {
            Some(_) => {
                self.eviction.remove_id(id);
                true
            }
            None => false,
        }
    }

    /// Drops every entry; returns how many. Used when this instance may have missed
    /// invalidations (its subscription to the fleet's broadcasts was lost).
    pub fn clear(&self) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            let ids: Vec<u128> = shard.read().iter().map(|e| e.id).collect();
            for id in ids {
                if self.purge_id(id) {
                    n += 1;
                }
            }
        }
        n
    }

    /// The body and facts of a stored entry (to rewrite it in a shared tier).
    pub fn body_and_info(&self, id: u128) -> Option<(Bytes, EntryInfo)> {
        let entry = self.get(id)?;
        Some((entry.body.clone(), (*entry.info).clone()))
    }

    /// Stores an entry read from a shared tier, admitting it to the LRU (and evicting what
    /// no longer fits) as a fill would.
    pub fn promote(&self, key: &CacheKey, meta: &CacheMeta, body: Bytes, info: Arc<EntryInfo>) {
        // The body read from Redis may be a slice of the whole record: keep only the body.
        let body = owned_body(&[body]);
        let mut stored = StoredMeta::from_meta(meta);
        stored.set_length(body.len());
        let weight = entry_weight(body.len(), &stored, &info);
        let id = id(key.combined_bin());
        self.insert(
            id,
            Entry {
                id,
                touched: AtomicU32::new(clock_ms() as u32),
                weight,
                meta: stored,
                body,
                info,
            },
        );
        let victims = self.eviction.admit(
            CacheEntryKey::key_only(key.to_compact()),
            weight as usize,
            meta.fresh_until(),
        );
        for victim in victims {
            if self.remove(self::id(victim.key().combined_bin())).is_some() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                metrics().evictions.inc();
            }
        }
    }

    /// Bytes held per rule.
    pub fn bytes_by_rule(&self) -> HashMap<String, u64> {
        self.rule_bytes
            .lock()
            .iter()
            .map(|(r, b)| (r.to_string(), (*b).max(0) as u64))
            .collect()
    }

    pub(super) fn insert(&self, id: u128, entry: Entry) {
        let weight = i64::from(entry.weight);
        self.charge_rule(entry.info.rule_name(), weight);
        let entry = Arc::new(entry);
        let old = {
            let mut shard = self.shard(id).write();
            let old = match shard.find_entry(self.slot(id as u64), |e| e.id == id) {
                Ok(mut slot) => Some(std::mem::replace(slot.get_mut(), entry.clone())),
                Err(_) => {
                    shard.insert_unique(self.slot(id as u64), entry.clone(), |e| {
                        self.slot(e.id as u64)
                    });
                    None
                }
            };
            self.relink(old.as_ref(), Some(entry));
            old
        };
        if let Some(old) = old {
            self.account(-1, -i64::from(old.weight));
            self.charge_rule(old.info.rule_name(), -i64::from(old.weight));
        }
        self.account(1, weight);
    }

    /// Puts `updated` in the place of `current`, if the table still holds it (a fill that
    /// replaced it since is newer, and stays).
    fn replace(&self, current: &Arc<Entry>, updated: Arc<Entry>) -> bool {
        let id = current.id;
        let mut shard = self.shard(id).write();
        match shard.find_mut(self.slot(id as u64), |e| e.id == id) {
            Some(slot) if Arc::ptr_eq(slot, current) => {
                *slot = updated.clone();
                self.relink(Some(current), Some(updated));
                true
            }
            _ => false,
        }
    }

    fn remove(&self, id: u128) -> Option<Arc<Entry>> {
        let entry = {
            let mut shard = self.shard(id).write();
            let entry = shard
                .find_entry(self.slot(id as u64), |e| e.id == id)
                .ok()?
                .remove()
                .0;
            self.relink(Some(&entry), None);
            entry
        };
        self.account(-1, -i64::from(entry.weight));
        self.charge_rule(entry.info.rule_name(), -i64::from(entry.weight));
        Some(entry)
    }

    /// Moves an entry's link in the URI index from the entry the table held (`old`) to the one
    /// it holds now (`new`). Called with the entry's shard locked for writing, so that a link
    /// changes in the same order as its entry, and the index never keeps a removed entry.
    fn relink(&self, old: Option<&Arc<Entry>>, new: Option<Arc<Entry>>) {
        if let Some(old) = old {
            let uri = old.info.uri;
            if let Ok(link) = self
                .uri_shard(uri)
                .lock()
                .find_entry(self.slot(uri), |e| Arc::ptr_eq(e, old))
            {
                link.remove();
            }
        }
        if let Some(new) = new {
            let uri = new.info.uri;
            self.uri_shard(uri)
                .lock()
                .insert_unique(self.slot(uri), new, |e| self.slot(e.info.uri));
        }
    }

    /// Adds `bytes` to what rule `name` holds (a name is copied only the first time).
    fn charge_rule(&self, name: &str, bytes: i64) {
        let mut rules = self.rule_bytes.lock();
        match rules.get_mut(name) {
            Some(held) => *held += bytes,
            None => {
                rules.insert(name.into(), bytes);
            }
        }
    }

    fn account(&self, entries: i64, bytes: i64) {
        let e = self.entries.fetch_add(entries, Ordering::Relaxed) + entries;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let m = metrics();
        m.cache_entries.set(e);
        m.cache_bytes.set(b);
    }
}

/// The eviction weight of an entry: every byte it holds, so that `cache.memory` bounds what the
/// memory tier really uses (issue 9 item 12): the body, the stored header, the entry's facts
/// ([`info_weight`]) and its bookkeeping. In 32 bits, as the LRU keeps it: `max_object` is at
/// most 1 GiB, so it never saturates (and if it did, the entry and the LRU would still agree on
/// the same figure).
pub(super) fn entry_weight(body: usize, meta: &StoredMeta, info: &EntryInfo) -> u32 {
    let weight = body_weight(body)
        + header_weight(&meta.header)
        + info_weight(info)
        + ENTRY_OVERHEAD
        + CHURN_ALLOWANCE;
    u32::try_from(weight).unwrap_or(u32::MAX)
}

/// Heap bytes an entry's facts hold, each allocation in its size class: the facts with their
/// reference counts, the `host/path` and tags buffer, and the rule's facts when they are the
/// entry's own (decoded from a shared tier's record; a compiled rule's `StoredRule` is one copy
/// shared by all of its entries, and not charged to them).
fn info_weight(info: &EntryInfo) -> usize {
    let rule = if info.rule.shared {
        0
    } else {
        alloc_size(ARC_COUNTS + size_of::<StoredRule>())
            + alloc_size(info.rule.name.len())
            + info
                .rule
                .tokens_at
                .as_ref()
                .map_or(0, |t| alloc_size(t.len()))
    };
    alloc_size(ARC_COUNTS + size_of::<EntryInfo>()) + alloc_size(info.names.heap_bytes()) + rule
}

/// What a lookup finds: the stored entry (`Ok`), else the fill in progress (`Err`), else
/// nothing. A fill that finishes between the first two looks has put its entry in the table
/// before taking its partial away ([`fill`]: `finish` inserts, then `end` removes), so when
/// neither look found anything the table is looked at once more. Without that third look, a
/// request that looked up just as the fill finished found neither, became a second fill and
/// went to the origin again: coalescing broke under load (stop 32, `caching::
/// concurrent_cold_requests_are_coalesced` in a loaded run). The table is looked at first
/// because a hit, the common case, then takes no global lock.
fn stored_or_filling<E, P>(
    stored: impl Fn() -> Option<E>,
    filling: impl FnOnce() -> Option<P>,
) -> Option<Result<E, P>> {
    if let Some(entry) = stored() {
        return Some(Ok(entry));
    }
    if let Some(partial) = filling() {
        return Some(Err(partial));
    }
    stored().map(Ok)
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let id = id(key.combined_bin());
        let found = stored_or_filling(
            || self.get(id),
            || self.partials.lock().get(&id).map(|(_, p)| p.clone()),
        );
        let entry = match found {
            None => return Ok(None),
            // A fill in progress is readable as it streams.
            Some(Err(p)) => return Ok(Some((p.meta.to_meta(&p.info), PartialHit::start(p)))),
            Some(Ok(entry)) => entry,
        };
        let meta = entry.meta.to_meta(&entry.info);
        let body = entry.body.clone();
        let mut hit = BodyHit::new(body, entry.weight as usize);
        hit.count_access = entry.lru_due();
        Ok(Some((meta, Box::new(hit))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let write = streaming_write_tag
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_be_bytes);
        let id = id(key.combined_bin());
        let partial = self
            .partials
            .lock()
            .get(&id)
            .filter(|(w, _)| Some(*w) == write)
            .map(|(_, p)| p.clone());
        match partial {
            Some(p) => Ok(Some((p.meta.to_meta(&p.info), PartialHit::start(p)))),
            None => self.lookup(key, trace).await,
        }
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let info = EntryInfo::of(meta).cloned().unwrap_or_default();
        let partial = Arc::new(Partial {
            meta: StoredMeta::from_meta(meta),
            info,
            chunks: RwLock::new(Vec::new()),
            progress: watch::channel(Progress::default()).0,
        });
        let write = self.next_write.fetch_add(1, Ordering::Relaxed);
        let id = id(key.combined_bin());
        self.partials.lock().insert(id, (write, partial.clone()));
        Ok(Box::new(MemoryMiss {
            storage: self,
            id,
            write,
            write_tag: write.to_be_bytes(),
            partial,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let id = id(target.key().combined_bin());
        match self.remove(id) {
            Some(_) => {
                match purge_type {
                    PurgeType::Eviction => {
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                        metrics().evictions.inc();
                    }
                    PurgeType::Invalidation => {
                        self.eviction.remove_id(id);
                    }
                }
                Ok(PurgeOutcome::Purged(None))
            }
            None => Ok(PurgeOutcome::NotFound),
        }
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let id = id(key.combined_bin());
        let Some(entry) = self.get(id) else {
            return Ok(false);
        };
        // The same body and facts with the new header and times; its charge and LRU place
        // stay the entry's (a 304's fields replace stored ones, RFC 9111 section 4.3.4).
        let updated = Arc::new(Entry {
            id,
            touched: AtomicU32::new(entry.touched.load(Ordering::Relaxed)),
            weight: entry.weight,
            meta: StoredMeta::from_meta(meta),
            body: entry.body.clone(),
            info: entry.info.clone(),
        });
        Ok(self.replace(&entry, updated))
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Names;
    use once_cell::sync::Lazy;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    static EVICTION: Lazy<Eviction> = Lazy::new(|| Eviction::with_capacity(1 << 20, 64));
    static STORE: Lazy<MemoryStorage> = Lazy::new(|| MemoryStorage::new(&EVICTION));

    /// A fill that finishes between a lookup's look at the table and its look at the fills in
    /// progress (its entry inserted, then its partial removed) is found, not missed; and each
    /// of the other cases finds what is there.
    #[test]
    fn a_fill_finishing_between_the_looks_is_found() {
        use std::cell::Cell;
        let table = Cell::new(None::<&str>);
        let found = stored_or_filling(
            || table.get(),
            || {
                // The fill finishes now: entry in, partial out.
                table.set(Some("entry"));
                None::<&str>
            },
        );
        assert_eq!(found, Some(Ok("entry")));
        let stored = stored_or_filling(|| Some("entry"), || -> Option<&str> { unreachable!() });
        assert_eq!(stored, Some(Ok("entry")));
        assert_eq!(
            stored_or_filling(|| None::<&str>, || Some("partial")),
            Some(Err("partial"))
        );
        assert_eq!(stored_or_filling(|| None::<&str>, || None::<&str>), None);
    }

    fn meta(max_age: u64, uri: u64) -> CacheMeta {
        let now = SystemTime::now();
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.insert_header("content-type", "application/json").unwrap();
        let mut m = CacheMeta::new(now + Duration::from_secs(max_age), now, 5, 7, h);
        Arc::new(EntryInfo {
            uri,
            names: Names::new("h/p", &["t1"]),
            rule: crate::rules::StoredRule::of(
                "r",
                false,
                Some(&crate::rules::Cost {
                    per_request: 0.0,
                    tokens: Some("/usage/total_tokens".into()),
                    per_1k_tokens: 1.0,
                }),
            ),
            tokens: 0,
        })
        .attach(&mut m);
        m
    }

    async fn fill(key: &CacheKey, body: &[&'static str], m: &CacheMeta) {
        let span = pingora::cache::trace::Span::inactive().handle();
        let mut miss = STORE.get_miss_handler(key, m, &span).await.unwrap();
        for (i, c) in body.iter().enumerate() {
            miss.write_body(Bytes::from_static(c.as_bytes()), i + 1 == body.len())
                .await
                .unwrap();
        }
        miss.finish().await.unwrap();
    }

    #[tokio::test]
    async fn fill_then_hit_shares_the_body() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k1", "");
        assert!(STORE.lookup(&key, &span).await.unwrap().is_none());
        let mut m = meta(60, 11);
        let age_start = SystemTime::now() - Duration::from_secs(100);
        m.set_epoch_override(age_start);
        fill(&key, &["hello ", "world"], &m).await;
        let (got, mut hit) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        assert!(got.is_fresh(SystemTime::now()));
        assert_eq!(got.stale_while_revalidate_sec(), 5);
        assert_eq!(got.stale_if_error_sec(), 7);
        assert!(
            got.age() >= Duration::from_secs(100),
            "upstream Age is kept"
        );
        assert_eq!(
            got.response_header().headers["content-type"],
            "application/json"
        );
        let a = hit.read_body().await.unwrap().unwrap();
        assert_eq!(&a[..], b"hello world");
        assert!(hit.read_body().await.unwrap().is_none());
        let (_, mut hit2) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        let b = hit2.read_body().await.unwrap().unwrap();
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "a hit hands out the stored bytes, not a copy"
        );
        hit2.seek(6, Some(11)).unwrap();
        assert_eq!(&hit2.read_body().await.unwrap().unwrap()[..], b"world");
        assert!(STORE.has_uri(11));
    }

    #[tokio::test]
    async fn every_hit_path_carries_the_entry_facts_and_tokens_are_counted_at_fill() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-facts", "");
        let mut miss = STORE
            .get_miss_handler(&key, &meta(60, 45), &span)
            .await
            .unwrap();
        miss.write_body(Bytes::from_static(b"{\"usage\":"), false)
            .await
            .unwrap();
        // A reader joining the fill while it streams sees the facts purge checks need.
        let (partial_meta, _) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        let facts = EntryInfo::of(&partial_meta).expect("a partial hit carries the facts");
        assert_eq!((facts.uri, facts.host_path()), (45, "h/p"));
        assert_eq!(facts.tags().next(), Some("t1"));
        miss.write_body(Bytes::from_static(b"{\"total_tokens\":77}}"), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();
        // A complete hit carries them too, with the token count read once at fill time.
        let (meta, _) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        let facts = EntryInfo::of(&meta).expect("a hit carries the facts");
        assert_eq!((facts.uri, facts.tokens), (45, 77));
        let (_, info) = STORE.body_and_info(id(key.combined_bin())).unwrap();
        assert_eq!(info.tokens, 77, "what a Redis record is written from");
    }

    #[tokio::test]
    async fn a_fill_is_readable_while_it_streams() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-stream", "");
        let mut miss = STORE
            .get_miss_handler(&key, &meta(60, 44), &span)
            .await
            .unwrap();
        miss.write_body(Bytes::from_static(b"data: 1\n\n"), false)
            .await
            .unwrap();
        let (_, mut reader) = STORE
            .lookup(&key, &span)
            .await
            .unwrap()
            .expect("partial hit");
        assert_eq!(
            &reader.read_body().await.unwrap().unwrap()[..],
            b"data: 1\n\n"
        );
        let next = tokio::spawn(async move {
            let second = reader.read_body().await.unwrap();
            let end = reader.read_body().await.unwrap();
            (second, end)
        });
        miss.write_body(Bytes::from_static(b"data: 2\n\n"), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();
        let (second, end) = next.await.unwrap();
        assert_eq!(
            &second.unwrap()[..],
            b"data: 2\n\n",
            "the reader got the chunk as it came"
        );
        assert!(end.is_none());
        let (_, mut hit) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        assert_eq!(
            &hit.read_body().await.unwrap().unwrap()[..],
            b"data: 1\n\ndata: 2\n\n"
        );
    }

    #[tokio::test]
    async fn a_broken_fill_is_not_stored_and_fails_its_readers() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-broken", "");
        let mut miss = STORE
            .get_miss_handler(&key, &meta(60, 45), &span)
            .await
            .unwrap();
        miss.write_body(Bytes::from_static(b"data: 1\n\n"), false)
            .await
            .unwrap();
        let (_, mut reader) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        assert!(reader.read_body().await.unwrap().is_some());
        drop(miss);
        assert!(
            reader.read_body().await.is_err(),
            "the reader learns the stream broke"
        );
        assert!(
            STORE.lookup(&key, &span).await.unwrap().is_none(),
            "nothing stored"
        );
    }

    /// Issue 9 item 12: an entry is charged for every byte it holds, its tags and `host_path`
    /// included, not only its body and header.
    #[tokio::test]
    async fn the_weight_counts_tags_host_path_and_key() {
        let now = SystemTime::now();
        let h = ResponseHeader::build(200, None).unwrap();
        let mut m = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h);
        let tag_bytes = 64 * crate::rules::template::MAX_TAG_LEN;
        Arc::new(EntryInfo {
            uri: 77,
            names: Names::new(
                &format!("h/{}", "p".repeat(20_000)),
                &(0..64)
                    .map(|i| format!("{i:03}{}", "t".repeat(253)))
                    .collect::<Vec<_>>(),
            ),
            rule: crate::rules::StoredRule::decoded("weight-rule", false),
            ..EntryInfo::default()
        })
        .attach(&mut m);
        fill(&CacheKey::new("k-weight", ""), &["body"], &m).await;
        let charged = STORE.bytes_by_rule()["weight-rule"] as usize;
        assert!(
            charged >= 4 + 20_000 + tag_bytes + size_of::<Entry>(),
            "charged {charged} bytes for an entry holding more than {}",
            20_000 + tag_bytes
        );
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-weight", "");
        STORE
            .purge(
                PurgeTarget::Active(&key.to_compact()),
                PurgeType::Invalidation,
                &span,
            )
            .await
            .unwrap();
        assert_eq!(
            STORE.bytes_by_rule()["weight-rule"],
            0,
            "and released on removal"
        );
    }

    /// Issue 10 item 3: a stored entry keeps none of the buffers pingora read it from (a header
    /// value is a slice of a 4 KiB read buffer, a body chunk may be a slice of a 64 KiB one),
    /// and its weight is at least what it really holds, measured from the kept parts' own
    /// lengths and capacities rather than from the weight formula.
    #[tokio::test]
    async fn an_entry_keeps_only_its_own_bytes_and_is_charged_for_them() {
        let read_buf = Bytes::from(vec![b'v'; 4096]);
        let body_buf = Bytes::from(vec![b'b'; 64 * 1024]);
        let now = SystemTime::now();
        let mut h = ResponseHeader::build(200, None).unwrap();
        for (i, name) in ["content-type", "etag", "x-origin-trace"]
            .iter()
            .enumerate()
        {
            let at = 1000 * i + 200;
            let value = http::HeaderValue::from_maybe_shared(read_buf.slice(at..at + 40)).unwrap();
            h.append_header(name.to_string(), value).unwrap();
        }
        let mut m = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h);
        Arc::new(EntryInfo {
            uri: 91,
            names: Names::new("h/compact", &["t-compact"]),
            rule: crate::rules::StoredRule::of("compact-rule", false, None),
            ..EntryInfo::default()
        })
        .attach(&mut m);
        let key = CacheKey::new("k-compact", "");
        let span = pingora::cache::trace::Span::inactive().handle();
        let mut miss = STORE.get_miss_handler(&key, &m, &span).await.unwrap();
        miss.write_body(body_buf.slice(100..1124), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();

        let id = id(key.combined_bin());
        let entry = STORE.get(id).unwrap();
        let meta = &entry.meta;
        let within = |buf: &Bytes, p: *const u8| {
            (buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len()).contains(&(p as usize))
        };
        assert_eq!(&entry.body[..], &body_buf[100..1124]);
        assert!(
            !within(&body_buf, entry.body.as_ptr()),
            "the stored body is a slice of the 64 KiB read buffer: it keeps all of it alive"
        );
        let header = meta.header.to_response_header();
        for v in header.headers.values() {
            assert!(
                !within(&read_buf, v.as_bytes().as_ptr()),
                "a stored header value is a slice of the 4 KiB read buffer: it keeps all of it alive"
            );
            assert!(
                within(meta.header.values(), v.as_bytes().as_ptr()),
                "a hit's header values are slices of the entry's one value buffer"
            );
        }
        // What the entry holds, from the parts themselves: the body, the header values'
        // buffer, a value end per field (the names are a list shared by entries with the same
        // fields), the facts, the key, and the entry struct.
        let held = entry.body.len()
            + meta.header.values().len()
            + header.headers.len() * size_of::<u32>()
            + entry.info.host_path().len()
            + entry.info.tags().map(|t| t.len()).sum::<usize>()
            + size_of::<Entry>();
        assert!(
            entry.weight as usize >= held,
            "charged {} bytes for an entry holding at least {held}",
            entry.weight
        );
    }

    /// The URI index holds each entry the table holds, once, and nothing else: a link left to
    /// a replaced or removed entry would keep its body alive and make `has_uri` lie.
    #[tokio::test]
    async fn the_uri_index_follows_every_replacement_and_removal() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-links", "");
        let id = id(key.combined_bin());
        fill(&key, &["one"], &meta(60, 50)).await;
        let first = STORE.get(id).unwrap();
        assert!(matches!(&STORE.variants(50)[..], [e] if Arc::ptr_eq(e, &first)));
        // A new fill of the same key replaces the entry and its link.
        fill(&key, &["two"], &meta(60, 50)).await;
        let second = STORE.get(id).unwrap();
        assert!(matches!(&STORE.variants(50)[..], [e] if Arc::ptr_eq(e, &second)));
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "nothing else holds a replaced entry"
        );
        // A revalidation's replacement too.
        assert!(STORE
            .update_meta(&key, &meta(600, 50), &span)
            .await
            .unwrap());
        let third = STORE.get(id).unwrap();
        assert!(matches!(&STORE.variants(50)[..], [e] if Arc::ptr_eq(e, &third)));
        assert_eq!(Arc::strong_count(&second), 1);
        // A removal takes the link with it.
        assert!(STORE.purge_id(id));
        assert!(STORE.variants(50).is_empty() && !STORE.has_uri(50));
        assert_eq!(
            Arc::strong_count(&third),
            1,
            "the index keeps no removed entry"
        );
    }

    #[tokio::test]
    async fn purge_by_uri_removes_every_variant() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let k1 = CacheKey::new("u-a", "");
        let k2 = CacheKey::new("u-b", "");
        fill(&k1, &["a"], &meta(60, 22)).await;
        fill(&k2, &["b"], &meta(60, 22)).await;
        assert_eq!(STORE.purge_uri(22), 2);
        assert!(STORE.lookup(&k1, &span).await.unwrap().is_none());
        assert!(STORE.lookup(&k2, &span).await.unwrap().is_none());
        assert!(!STORE.has_uri(22));
    }

    /// Issue 9 item 12: what an entry's facts hold is charged, tags and `host_path` included;
    /// a rule's facts decoded from a record are the entry's own and charged, a compiled rule's
    /// are shared by all of its entries and are not.
    #[test]
    fn the_facts_weigh_every_byte_they_hold() {
        let base = info_weight(&EntryInfo {
            rule: StoredRule::of("r", false, None),
            ..EntryInfo::default()
        });
        assert!(base >= ARC_COUNTS + size_of::<EntryInfo>());
        let big = EntryInfo {
            names: Names::new(&"h".repeat(10_000), &vec!["t".repeat(200); 3]),
            rule: StoredRule::of("r", false, None),
            ..EntryInfo::default()
        };
        assert!(info_weight(&big) >= base + 10_000 + 600);
        let name = "r".repeat(1000);
        let own = EntryInfo {
            rule: StoredRule::decoded(&name, false),
            ..EntryInfo::default()
        };
        assert!(info_weight(&own) >= base + size_of::<StoredRule>() + 1000);
        let cost = crate::rules::Cost {
            per_request: 0.0,
            tokens: Some("/usage/total_tokens".into()),
            per_1k_tokens: 1.0,
        };
        let compiled = EntryInfo {
            rule: StoredRule::of(&name, false, Some(&cost)),
            ..EntryInfo::default()
        };
        assert_eq!(info_weight(&compiled), base);
    }

    /// Issue 16: with its `Arc`'s two counts, an entry fits mimalloc's 192-byte class and its
    /// facts the 64-byte one, and an LRU node is 32 bytes: a field more would cost each of a
    /// million entries the next class up (measured by `benches/memory_scale.rs`).
    #[test]
    fn an_entry_its_facts_and_its_lru_node_keep_their_sizes() {
        assert!(
            ARC_COUNTS + size_of::<Entry>() <= 192,
            "{}",
            size_of::<Entry>()
        );
        assert!(
            ARC_COUNTS + size_of::<EntryInfo>() <= 64,
            "{}",
            size_of::<EntryInfo>()
        );
        assert_eq!(priority::LRU_BYTES, 2 * 32 + map_slot(size_of::<u32>()));
    }

    #[tokio::test]
    async fn update_meta_keeps_the_body() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-upd", "");
        fill(&key, &["body"], &meta(0, 33)).await;
        let before = STORE.get(id(key.combined_bin())).unwrap();
        let mut newer = meta(600, 33);
        newer.update_freshness(SystemTime::now() + Duration::from_secs(600), 1, 2);
        assert!(STORE.update_meta(&key, &newer, &span).await.unwrap());
        let (got, mut hit) = STORE.lookup(&key, &span).await.unwrap().unwrap();
        assert!(got.is_fresh(SystemTime::now()));
        assert_eq!(got.stale_if_error_sec(), 2);
        assert_eq!(&hit.read_body().await.unwrap().unwrap()[..], b"body");
        // The entry was replaced, not changed under a reader: one taken before still has the
        // old times, and shares the body; the charge is the entry's as before (`replace`
        // accounts nothing).
        let after = STORE.get(id(key.combined_bin())).unwrap();
        assert!(!Arc::ptr_eq(&before, &after));
        assert!(before.meta.facts.fresh_until.time() <= SystemTime::now());
        assert_eq!(before.body.as_ptr(), after.body.as_ptr());
        assert_eq!(before.weight, after.weight);
        // A replacement of an entry the table no longer holds (a newer fill took its place)
        // is refused, and the newer one stays.
        fill(&key, &["newer body"], &meta(600, 33)).await;
        let newest = STORE.get(id(key.combined_bin())).unwrap();
        let stale_update = Arc::new(Entry {
            id: after.id,
            touched: AtomicU32::new(0),
            weight: after.weight,
            meta: after.meta.clone(),
            body: after.body.clone(),
            info: after.info.clone(),
        });
        assert!(!STORE.replace(&after, stale_update));
        assert!(Arc::ptr_eq(
            &STORE.get(id(key.combined_bin())).unwrap(),
            &newest
        ));
        let purged = STORE
            .purge(
                PurgeTarget::Active(&key.to_compact()),
                PurgeType::Invalidation,
                &span,
            )
            .await
            .unwrap();
        assert_eq!(purged, PurgeOutcome::Purged(None));
        assert!(!STORE.update_meta(&key, &newer, &span).await.unwrap());
    }

    /// Two entries whose key hashes share the low half (what the table's slots are hashed by)
    /// but not their URI: a URI purge removes its own only.
    #[tokio::test]
    async fn purge_by_uri_spares_another_uri_with_the_same_low_half() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = |high: u64| {
            let mut k = CacheKey::new("collide", "");
            let id = (u128::from(high) << 64) | 0x5eed_0000_0000_0042;
            k.set_primary_bin_override(id.to_be_bytes());
            k
        };
        let (a, b) = (key(1), key(2));
        fill(&a, &["a"], &meta(60, 40)).await;
        fill(&b, &["b"], &meta(60, 41)).await;
        assert_eq!(STORE.purge_uri(40), 1);
        assert!(STORE.lookup(&a, &span).await.unwrap().is_none());
        let (_, mut hit) = STORE.lookup(&b, &span).await.unwrap().unwrap();
        assert_eq!(&hit.read_body().await.unwrap().unwrap()[..], b"b");
        assert!(STORE.has_uri(41) && !STORE.has_uri(40));
        assert_eq!(STORE.purge_uri(41), 1);
    }
}
