//! The bounded in-process memory tier.
//!
//! Entries are records in [`Segments`] (`segments.rs`): each entry one run of bytes, laid out by
//! `layout.rs`, packed with others in segments that are evicted a segment at a time, oldest
//! first within the lowest priority class, in S3-FIFO's queues: new entries on probation,
//! entries hit there or asked for again kept in the main queue, with a second chance for
//! entries hit since they were written. That is what brought an entry's cost beyond its body and header from 480 B to
//! under 300 B at a million entries (issue 16: five allocations an entry, each rounded up to
//! its size class, became none). The budget (`cache.memory`) counts whole segments and every
//! record's share of the index, so what the tier charges covers what it holds; the store
//! evicts as it fills, so pingora is given no eviction manager.
//!
//! A hit must be cheap: rather than deserialising `CacheMeta` (zstd + header parsing), a record
//! keeps the response header as stored fields and the few timestamps needed to rebuild the
//! meta; the header buffer and the body are handed out as slices of the segment (reference
//! counts). Variants of a URI are found through the store's URI index (RFC 9111 §4.4
//! invalidation, and `vary-miss` reporting) without scanning.
//!
//! This file is the tier (fills in progress, accounting, the `Storage` impl); how a found
//! body is read is in `hit.rs`, how a fetched body becomes an entry in `fill.rs`.

mod compact;
mod fill;
mod hit;
mod layout;
pub mod segments;

pub use super::meta::StoredTimes;
pub use hit::{BodyHit, PartialHit, Stored};

use super::meta::MetaFacts;
use super::EntryInfo;
use crate::metrics::metrics;
use crate::rules::Priority;
use async_trait::async_trait;
use bytes::Bytes;
use compact::StoredHeader;
use fill::{MemoryMiss, Partial, Progress};
use layout::{Encoded, Entry};
use parking_lot::{Mutex, RwLock};
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{HitHandler, MissHandler, PurgeOutcome, PurgeTarget, PurgeType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::Result;
use segments::{Inserted, Record, Segments};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

const SHARDS: usize = 16;
/// A hash map slot of `slot` bytes as a share of the table: hashbrown keeps a control byte per
/// slot, fills at most 7/8 of its slots and doubles when full, so a slot costs up to 16/7 of
/// itself (and its control byte).
const fn map_slot(slot: usize) -> usize {
    (slot + 1) * 16 / 7
}

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

/// The priority class of a key: its rule's `priority`, carried in the key's `user_tag`.
fn class_of(key: &CacheKey) -> u8 {
    Priority::from_tag(key.user_tag()).class() as u8
}

/// The memory tier.
pub struct MemoryStorage {
    store: Segments,
    /// Fills in progress, readable while they stream (e.g. server-sent events): key -> (write
    /// id, fill).
    partials: Mutex<HashMap<u128, (u64, Arc<Partial>)>>,
    /// Bytes held per rule (for `/admin/stats`); updated on fills and removals only.
    rule_bytes: Mutex<HashMap<Box<str>, i64>>,
    next_write: AtomicU64,
    evictions: AtomicU64,
}

/// The map key of a pingora key hash.
pub fn id(hash: HashBinary) -> u128 {
    u128::from_be_bytes(hash)
}

impl MemoryStorage {
    /// A memory tier of `budget` bytes.
    pub fn new(budget: usize) -> Self {
        MemoryStorage {
            store: Segments::for_budget(budget),
            partials: Mutex::new(HashMap::new()),
            rule_bytes: Mutex::new(HashMap::new()),
            next_write: AtomicU64::new(1),
            evictions: AtomicU64::new(0),
        }
    }

    /// The entry stored under `id`.
    fn get(&self, id: u128) -> Option<Entry> {
        self.store.get(id).and_then(Entry::decode)
    }

    /// The entry stored under `id`, noted as hit (it gets a second chance at eviction).
    fn hit(&self, id: u128) -> Option<Entry> {
        self.store.hit(id).and_then(Entry::decode)
    }

    /// Entries currently stored.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes currently charged: whole segments and the index's share of every record.
    pub fn bytes(&self) -> usize {
        self.store.allocated()
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Whether any variant of this URI is stored (a miss on it is then a `vary-miss`).
    pub fn has_uri(&self, uri: u64) -> bool {
        self.store.has_uri(uri)
    }

    /// Removes every variant stored for a URI; returns how many were removed.
    pub fn purge_uri(&self, uri: u64) -> usize {
        self.store
            .variants(uri)
            .iter()
            .filter(|r| self.remove(r.id()).is_some())
            .count()
    }

    /// Removes one entry (an invalidation from another instance); true if it was stored.
    pub fn purge_id(&self, id: u128) -> bool {
        self.remove(id).is_some()
    }

    /// Drops every entry; returns how many. Used when this instance may have missed
    /// invalidations (its subscription to the fleet's broadcasts was lost).
    pub fn clear(&self) -> usize {
        let dropped = self.store.clear();
        for rec in &dropped {
            self.uncharge(rec);
        }
        self.publish();
        dropped.len()
    }

    /// The body and facts of a stored entry (to rewrite it in a shared tier).
    pub fn body_and_info(&self, id: u128) -> Option<(Bytes, EntryInfo)> {
        let entry = self.get(id)?;
        Some((entry.body(), (*entry.info()).clone()))
    }

    /// Stores an entry read from a shared tier, evicting what no longer fits, as a fill would.
    pub fn promote(&self, key: &CacheKey, meta: &CacheMeta, body: Bytes, info: Arc<EntryInfo>) {
        let mut stored = StoredMeta::from_meta(meta);
        stored.set_length(body.len());
        self.store_entry(
            id(key.combined_bin()),
            class_of(key),
            &stored,
            &info,
            &[&body],
            None,
        );
    }

    /// Bytes held per rule.
    pub fn bytes_by_rule(&self) -> HashMap<String, u64> {
        self.rule_bytes
            .lock()
            .iter()
            .map(|(r, b)| (r.to_string(), (*b).max(0) as u64))
            .collect()
    }

    /// Stores an entry whose body is `body` (in parts) under `id` in priority class `class`,
    /// only if `expect` is still what is stored there when given; returns the record's length
    /// if it was stored.
    pub(super) fn store_entry(
        &self,
        id: u128,
        class: u8,
        meta: &StoredMeta,
        info: &EntryInfo,
        body: &[&[u8]],
        expect: Option<&Record>,
    ) -> Option<usize> {
        let encoded = Encoded::new(meta, info);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(4 + body.len());
        parts.extend_from_slice(&encoded.parts());
        parts.extend_from_slice(body);
        let out = self
            .store
            .insert_if(id, info.uri, class, &parts, expect)
            .ok()?;
        if out.linked {
            self.charge_rule(info.rule_name(), out.len as i64);
        }
        self.settle(&out);
        out.linked.then_some(out.len)
    }

    /// Accounts what an insert replaced and evicted.
    fn settle(&self, out: &Inserted) {
        if let Some(old) = &out.replaced {
            self.uncharge(old);
        }
        for rec in &out.evicted {
            self.uncharge(rec);
        }
        if !out.evicted.is_empty() {
            let n = out.evicted.len() as u64;
            self.evictions.fetch_add(n, Ordering::Relaxed);
            metrics().evictions.inc_by(n);
        }
        self.publish();
    }

    fn remove(&self, id: u128) -> Option<Record> {
        let rec = self.store.remove(id)?;
        self.uncharge(&rec);
        self.publish();
        Some(rec)
    }

    /// Takes a record that left the store off its rule's bytes.
    fn uncharge(&self, rec: &Record) {
        if let Some(entry) = Entry::decode(rec.clone()) {
            self.charge_rule(&entry.rule().name, -(rec.len() as i64));
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

    /// Publishes the entry count and the bytes charged.
    fn publish(&self) {
        let m = metrics();
        m.cache_entries.set(self.store.len() as i64);
        m.cache_bytes.set(self.store.allocated() as i64);
    }
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
            || self.hit(id),
            || self.partials.lock().get(&id).map(|(_, p)| p.clone()),
        );
        let entry = match found {
            None => return Ok(None),
            // A fill in progress is readable as it streams.
            Some(Err(p)) => return Ok(Some((p.meta.to_meta(&p.info), PartialHit::start(p)))),
            Some(Ok(entry)) => entry,
        };
        let meta = entry.meta.to_meta(&entry.info());
        let hit = BodyHit::new(entry.body(), entry.weight());
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
            class: class_of(key),
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
                if let PurgeType::Eviction = purge_type {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    metrics().evictions.inc();
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
        // A revalidation stores a new record with the same body; a purge since the entry was
        // read wins (the record is put only where the read one still is).
        let body = entry.body();
        let mut stored = StoredMeta::from_meta(meta);
        stored.set_length(body.len());
        let stored = self.store_entry(
            id,
            class_of(key),
            &stored,
            &entry.info(),
            &[&body],
            Some(&entry.rec),
        );
        Ok(stored.is_some())
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

    static STORE: Lazy<MemoryStorage> = Lazy::new(|| MemoryStorage::new(16 << 20));

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
            charged >= 4 + 20_000 + tag_bytes + layout::FIXED,
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
        let body = entry.body();
        assert_eq!(&body[..], &body_buf[100..1124]);
        assert!(
            !within(&body_buf, body.as_ptr()),
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
        // The header values and the body are slices of the entry's one record.
        let record = entry.rec.slice(0..entry.rec.payload().len());
        assert!(within(&record, body.as_ptr()) && within(&record, meta.header.values().as_ptr()));
        // What the entry holds, from the parts themselves: the body, the header values'
        // buffer, a value end per field (the names are a list shared by entries with the same
        // fields), the names and the fixed part.
        let held = body.len()
            + meta.header.values().len()
            + entry.names().host_path().len()
            + entry.names().tags().map(|t| t.len()).sum::<usize>()
            + layout::FIXED;
        assert!(
            entry.weight() >= held,
            "charged {} bytes for an entry holding at least {held}",
            entry.weight()
        );
    }

    /// The URI index holds each entry the table holds, once, and nothing else: a link left to
    /// a replaced or removed entry would make `has_uri` lie and purges miss.
    #[tokio::test]
    async fn the_uri_index_follows_every_replacement_and_removal() {
        let span = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("k-links", "");
        let id = id(key.combined_bin());
        let linked = |rec: &Record| matches!(&STORE.store.variants(50)[..], [r] if r.same(rec));
        fill(&key, &["one"], &meta(60, 50)).await;
        let first = STORE.get(id).unwrap();
        assert!(linked(&first.rec));
        // A new fill of the same key replaces the entry and its link.
        fill(&key, &["two"], &meta(60, 50)).await;
        let second = STORE.get(id).unwrap();
        assert!(linked(&second.rec) && !second.rec.same(&first.rec));
        // A revalidation's replacement too.
        assert!(STORE
            .update_meta(&key, &meta(600, 50), &span)
            .await
            .unwrap());
        let third = STORE.get(id).unwrap();
        assert!(linked(&third.rec) && !third.rec.same(&second.rec));
        // A removal takes the link with it.
        assert!(STORE.purge_id(id));
        assert!(STORE.store.variants(50).is_empty() && !STORE.has_uri(50));
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
        // old times and the same body.
        let after = STORE.get(id(key.combined_bin())).unwrap();
        assert!(!before.rec.same(&after.rec));
        assert!(before.meta.facts.fresh_until.time() <= SystemTime::now());
        assert_eq!(before.body(), after.body());
        // A replacement of an entry the table no longer holds (a newer fill took its place)
        // is refused, and the newer one stays.
        fill(&key, &["newer body"], &meta(600, 33)).await;
        let newest = STORE.get(id(key.combined_bin())).unwrap();
        let refused = STORE.store_entry(
            id(key.combined_bin()),
            1,
            &after.meta,
            &after.info(),
            &[&after.body()],
            Some(&after.rec),
        );
        assert!(refused.is_none());
        assert!(STORE
            .get(id(key.combined_bin()))
            .unwrap()
            .rec
            .same(&newest.rec));
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
