//! The storage pingora sees: the memory tier in front of the optional Redis tier.
//!
//! Lookup order is memory, then Redis, then origin. A Redis hit is decoded once and promoted into
//! memory. A fill is written to memory as the body streams and to Redis afterwards, in a spawned
//! task, so the client never waits for Redis. When both tiers miss, the fleet fill lock makes the
//! instances agree on one fetch: the lock holder goes to the origin (renewing the lock's short
//! lease while its fill is alive), the others poll Redis for its result for as long as the lock
//! is held, up to the longest an upstream may take, and fetch themselves only once the lock is
//! gone (the fill failed, or its holder died and stopped renewing). The lock is a [`FillLock`] value:
//! handed to the request's context ([`Tiered::take_fill_lock`]) and to the fill that stores the
//! answer, and released when the last of them is dropped, however the request ends. Concurrent lookups of one key inside a
//! process share that Redis conversation.
//!
//! Invalidations (purges, replaced entries, unsafe requests) are applied locally, deleted in
//! Redis, and broadcast so every other instance drops its memory copy.
//!
//! With `cache.memory = "0"` the memory tier is skipped: hits are served straight from Redis.

use super::epochs::{Epoch, Epochs};
use super::fill_lock::FillLock;
use super::memory::{id, BodyHit, MemoryStorage};
use super::meta::MetaFacts;
use super::record::{DecodeError, Record};
use super::redis::{Message, RedisTier};
use super::EntryInfo;
use crate::clock::now_ms;
use crate::metrics::metrics;
use ahash::RandomState;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{
    HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::ResponseHeader;
use pingora::Result;
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::OnceCell;

/// How often a waiter polls Redis for another instance's fill (first poll, then doubling).
const FILL_POLL_START: Duration = Duration::from_millis(5);
const FILL_POLL_MAX: Duration = Duration::from_millis(50);

/// A map by key hash (BLAKE3, so already uniform): aHash rather than SipHash, whose cost showed
/// in every Redis hit (0.6k instructions; issue 16).
type ByKey<V> = HashMap<u128, V, RandomState>;

/// Memory + Redis.
pub struct Tiered {
    pub memory: &'static MemoryStorage,
    /// Purge epochs (URI purges are recorded here too: see [`Epochs`]).
    pub epochs: Arc<Epochs>,
    pub redis: Option<Arc<RedisTier>>,
    /// False when `cache.memory` is 0: Redis only.
    memory_enabled: bool,
    /// The fleet fill lock's lease (`lock_timeout`): renewed while the fill is alive, so it
    /// bounds only a holder that shows no sign of life.
    lease: Duration,
    /// The longest this instance waits for another instance's live fill: the slowest upstream's
    /// connect + read timeouts.
    wait_limit: Duration,
    /// Fleet fill waits in progress, by key hash.
    waits: Mutex<ByKey<Arc<OnceCell<Option<Bytes>>>>>,
    /// Fill locks taken by lookups, until the request that missed takes them (or they age out).
    held: Mutex<ByKey<(Instant, FillLock)>>,
    /// What [`Tiered::prefetch`] read for a request that the fresh-hit path did not answer,
    /// until that request's lookup takes it (or it ages out), so the lookup does not ask Redis
    /// again.
    prefetched: Mutex<ByKey<(Instant, Option<Bytes>)>>,
}

/// How long an entry stays servable from now: freshness plus the longer stale window.
pub fn servable_for(meta: &CacheMeta, now: SystemTime) -> Duration {
    let stale = meta
        .stale_while_revalidate_sec()
        .max(meta.stale_if_error_sec());
    let until = crate::policy::time_after(meta.fresh_until(), Duration::from_secs(stale.into()));
    until.duration_since(now).unwrap_or_default()
}

impl Tiered {
    pub fn new(
        memory: &'static MemoryStorage,
        epochs: Arc<Epochs>,
        redis: Option<Arc<RedisTier>>,
        memory_enabled: bool,
        lease: Duration,
        wait_limit: Duration,
    ) -> Self {
        Tiered {
            memory,
            epochs,
            redis,
            memory_enabled,
            lease,
            wait_limit: wait_limit.max(lease),
            waits: Mutex::default(),
            held: Mutex::default(),
            prefetched: Mutex::default(),
        }
    }

    /// The memory tier, when it is on (a fresh hit is answered from it directly).
    pub fn memory_tier(&self) -> Option<&'static MemoryStorage> {
        self.memory_enabled.then_some(self.memory)
    }

    /// Whether any variant of the URI is stored locally (`vary-miss` reporting).
    pub fn has_uri(&self, uri: u64) -> bool {
        self.memory.has_uri(uri)
    }

    /// Drops every variant of a URI here, in Redis, and on every other instance.
    pub async fn invalidate_uri(&self, uri: u64) -> usize {
        let at_ms = now_ms();
        // Recorded first: a fill already in flight must not bring the old answer back.
        self.epochs.purge_uri(uri, Epoch { at_ms, soft: false });
        let removed = self.memory.purge_uri(uri);
        if let Some(redis) = &self.redis {
            redis
                .save_epoch(&format!("u:{uri:016x}"), at_ms, false)
                .await;
            // The broadcast goes first: with the epoch recorded, a copy another instance reads
            // from Redis before the delete lands is refused anyway.
            redis.publish(&Message::Uri(uri)).await;
            redis.delete_uri(uri).await;
        }
        removed
    }

    /// The fleet fill lock a lookup of `key` took for this instance, if any: the request that
    /// missed keeps it until it ends (or hands it to the fill), and dropping it releases it.
    pub fn take_fill_lock(&self, key: &CacheKey) -> Option<FillLock> {
        self.held
            .lock()
            .remove(&id(key.combined_bin()))
            .map(|(_, lock)| lock)
    }

    /// Claims the refresh-ahead of the version of `key` stored at `created_ms` fleet-wide:
    /// `false` when another instance has claimed it. Without Redis (or when it does not answer)
    /// this instance decides alone: a refresh too many costs one origin request, a refresh
    /// skipped costs a miss.
    pub async fn claim_refresh(&self, key: &CacheKey, created_ms: i64, lease: Duration) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        let k = id(key.combined_bin());
        redis.try_refresh(k, created_ms, lease).await != Some(false)
    }

    /// With the memory tier off, the first half of a lookup of the key whose hash is `key`,
    /// for the fresh-hit path (`proxy/fresh_hit.rs`): the record as a lookup reads it (sharing
    /// the round trip with concurrent lookups, and taking the fleet fill lock on a miss), with
    /// its raw bytes; `Some(None)` when Redis has no usable record. `None` without Redis or
    /// with the memory tier on.
    pub async fn prefetch(&self, key: HashBinary) -> Option<Option<(Record, Bytes)>> {
        let redis = self.redis.as_ref().filter(|_| !self.memory_enabled)?;
        let k = id(key);
        let raw = self.redis_fetch(redis, k).await;
        Some(raw.and_then(|raw| Some((Self::decode(redis, k, raw.clone())?, raw))))
    }

    /// Hands what [`Tiered::prefetch`] read (`None`: nothing in Redis) to this request's
    /// lookup, which the fresh-hit path left it to. Kept at most one lease: a request that
    /// ends before its lookup leaves it to age out.
    pub fn keep_prefetched(&self, key: HashBinary, raw: Option<Bytes>) {
        let mut kept = self.prefetched.lock();
        let horizon = self.lease;
        kept.retain(|_, (at, _)| at.elapsed() < horizon);
        kept.insert(id(key), (Instant::now(), raw));
    }

    fn hold(&self, lock: FillLock) {
        let mut held = self.held.lock();
        // A lock no request took (the request failed between lookup and miss) is released once
        // it is older than its own lifetime in Redis.
        let horizon = self.lease;
        held.retain(|_, (at, _)| at.elapsed() < horizon);
        held.insert(lock.key(), (Instant::now(), lock));
    }

    /// The entry from Redis, or after waiting for another instance's fill. `None`: fetch it.
    async fn fetch_or_wait(&self, redis: &Arc<RedisTier>, k: u128) -> Option<Bytes> {
        if let Some(v) = redis.get(k).await {
            return Some(Bytes::from(v));
        }
        match redis.try_lock(k, self.lease).await {
            None => return None,
            Some(true) => {
                let lock = FillLock::new(redis.clone(), k, self.lease, self.wait_limit);
                // Ours; but the previous holder may have finished just before we asked.
                if let Some(v) = redis.get(k).await {
                    return Some(Bytes::from(v)); // `lock` is dropped: released
                }
                self.hold(lock);
                return None;
            }
            Some(false) => {}
        }
        // While the holder's fill is alive its lock stays (renewed); a holder that died lets it
        // expire within one lease, and then we fetch.
        let deadline = Instant::now() + self.wait_limit;
        let mut pause = FILL_POLL_START;
        while Instant::now() < deadline {
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(FILL_POLL_MAX);
            match redis.get_with_lock(k).await {
                Some((Some(v), _)) => {
                    metrics().coalesced.inc();
                    return Some(Bytes::from(v));
                }
                Some((None, true)) => continue,
                // The filler gave up, or Redis went away: fetch ourselves.
                Some((None, false)) | None => return None,
            }
        }
        tracing::debug!(
            "waited {:?} for another instance's fill; fetching",
            self.wait_limit
        );
        None
    }

    /// Reads `key`'s bytes from Redis, sharing the round trip with concurrent local lookups.
    async fn redis_fetch(&self, redis: &Arc<RedisTier>, k: u128) -> Option<Bytes> {
        let cell = self
            .waits
            .lock()
            .entry(k)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let raw = cell
            .get_or_init(|| self.fetch_or_wait(redis, k))
            .await
            .clone();
        {
            let mut waits = self.waits.lock();
            if waits.get(&k).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                waits.remove(&k);
            }
        }
        raw
    }

    fn decode(redis: &RedisTier, k: u128, raw: Bytes) -> Option<Record> {
        // The storage key authenticates a sealed record; a plain one does not need it made.
        let storage_key = if Record::is_sealed(&raw) {
            redis.entry_key(k)
        } else {
            String::new()
        };
        match Record::decode(raw, storage_key.as_bytes(), redis.keys.as_ref()) {
            Ok(r) => Some(r),
            Err(e) => {
                let reason = match e {
                    DecodeError::Malformed => "malformed",
                    DecodeError::UnknownKey => "unknown-key",
                    DecodeError::Tampered => "tampered",
                    DecodeError::NoKeys => "no-keys",
                };
                tracing::debug!("unusable redis entry ({reason}); treating it as a miss");
                metrics()
                    .redis_undecryptable
                    .with_label_values(&[reason])
                    .inc();
                None
            }
        }
    }
}

#[async_trait]
impl Storage for Tiered {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        if self.memory_enabled {
            if let Some(hit) = self.memory.lookup(key, trace).await? {
                metrics().tier_hits_memory.inc();
                return Ok(Some(hit));
            }
        }
        let Some(redis) = &self.redis else {
            return Ok(None);
        };
        let k = id(key.combined_bin());
        // What the fresh-hit path read for this request (memory tier off), if it left it.
        let kept = if self.memory_enabled {
            None
        } else {
            match self.prefetched.lock().remove(&k) {
                Some((at, raw)) if at.elapsed() < self.lease => Some(raw),
                _ => None,
            }
        };
        let raw = match kept {
            Some(raw) => raw,
            None => self.redis_fetch(redis, k).await,
        };
        let Some(raw) = raw else {
            return Ok(None);
        };
        if self.memory_enabled {
            // A concurrent lookup that shared this fetch may have promoted it already.
            if let Some(hit) = self.memory.lookup(key, trace).await? {
                metrics().tier_hits_redis.inc();
                return Ok(Some(hit));
            }
        }
        let Some(record) = Self::decode(redis, k, raw) else {
            return Ok(None);
        };
        metrics().tier_hits_redis.inc();
        let (meta, info, body) = record.into_meta();
        let info = Arc::new(info);
        if self.memory_enabled {
            self.memory.promote(key, &meta, body.clone(), info.clone());
            if let Some(hit) = self.memory.lookup(key, trace).await? {
                return Ok(Some(hit));
            }
            // Evicted at once (a budget smaller than the entry): serve the copy we read.
        }
        let mut meta = meta;
        info.attach(&mut meta);
        Ok(Some((meta, Box::new(BodyHit::new(body, 0)))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        if self.memory_enabled {
            self.memory
                .lookup_streaming_write(key, streaming_write_tag, trace)
                .await
        } else {
            self.lookup(key, trace).await
        }
    }

    fn support_streaming_partial_write(&self) -> bool {
        // Fills are readable while they stream only from the memory tier.
        self.memory_enabled
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let inner = if self.memory_enabled {
            Some(self.memory.get_miss_handler(key, meta, trace).await?)
        } else {
            None
        };
        let redis = match &self.redis {
            Some(r) => r.clone(),
            None => {
                return Ok(inner.expect("without redis the memory tier is always on"));
            }
        };
        let info = EntryInfo::of(meta).cloned().unwrap_or_default();
        Ok(Box::new(TieredMiss {
            inner,
            redis,
            // Held until the Redis write lands, so waiters find the entry, not a free lock.
            lock: meta.extensions().get::<FillLock>().cloned(),
            k: id(key.combined_bin()),
            meta: MetaFacts::of(meta),
            header: meta.response_header().clone(),
            info,
            ttl: servable_for(meta, SystemTime::now()),
            chunks: Vec::new(),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let outcome = self.memory.purge(target, purge_type, trace).await?;
        if let (PurgeType::Invalidation, Some(redis)) = (purge_type, &self.redis) {
            let k = id(target.key().combined_bin());
            redis.delete(k).await;
            redis.publish(&Message::Key(k)).await;
        }
        Ok(outcome)
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<bool> {
        let updated = self.memory.update_meta(key, meta, trace).await?;
        if let Some(redis) = &self.redis {
            let k = id(key.combined_bin());
            if let Some((body, info)) = self.memory.body_and_info(k) {
                let record = Record {
                    meta: MetaFacts::of(meta),
                    header: meta.response_header().clone(),
                    info,
                    body,
                };
                let ttl = servable_for(meta, SystemTime::now());
                let redis = redis.clone();
                tokio::spawn(async move { write_record(&redis, k, record, ttl, None).await });
            }
        }
        Ok(updated)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Encodes (sealing it if asked), stores, and tells other instances to drop their old copy.
/// `lock` (this fill's fleet lock) is released once the entry is written, or not worth writing.
async fn write_record(
    redis: &RedisTier,
    k: u128,
    record: Record,
    ttl: Duration,
    lock: Option<FillLock>,
) {
    let _lock = lock;
    if ttl.is_zero() {
        return;
    }
    let storage_key = redis.entry_key(k);
    let raw = record.encode(storage_key.as_bytes(), redis.keys.as_ref());
    if redis.put(k, record.info.uri, raw, ttl).await {
        redis.publish(&Message::Key(k)).await;
    }
}

/// A fill: to memory as it streams (when on), to Redis after it completes.
struct TieredMiss {
    inner: Option<MissHandler>,
    redis: Arc<RedisTier>,
    lock: Option<FillLock>,
    k: u128,
    meta: MetaFacts,
    header: ResponseHeader,
    info: Arc<EntryInfo>,
    ttl: Duration,
    chunks: Vec<Bytes>,
}

#[async_trait]
impl HandleMiss for TieredMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        match &mut self.inner {
            Some(inner) => inner.write_body(data, eof).await,
            None => Ok(()),
        }
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        self.inner.as_ref().and_then(|i| i.streaming_write_tag())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let this = *self;
        let size = match this.inner {
            Some(inner) => inner.finish().await?,
            None => MissFinishType::Created(0),
        };
        let body = match this.chunks.len() {
            0 => Bytes::new(),
            1 => this.chunks[0].clone(),
            _ => {
                let mut buf = BytesMut::with_capacity(this.chunks.iter().map(Bytes::len).sum());
                this.chunks.iter().for_each(|c| buf.extend_from_slice(c));
                buf.freeze()
            }
        };
        let record = Record {
            meta: this.meta,
            header: this.header,
            info: (*this.info.completed(&body)).clone(),
            body,
        };
        let (redis, k, ttl, lock) = (this.redis, this.k, this.ttl, this.lock);
        tokio::spawn(async move { write_record(&redis, k, record, ttl, lock).await });
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servable_window_includes_the_longer_stale_window() {
        let now = SystemTime::now();
        let h = ResponseHeader::build(200, None).unwrap();
        let m = CacheMeta::new(now + Duration::from_secs(60), now, 30, 3600, h);
        let d = servable_for(&m, now);
        assert_eq!(d, Duration::from_secs(3660));
        let h = ResponseHeader::build(200, None).unwrap();
        let gone = CacheMeta::new(now - Duration::from_secs(60), now, 0, 0, h);
        assert!(servable_for(&gone, now).is_zero());
    }
}
