//! Hit handlers: how a found entry's body is read.
//!
//! [`BodyHit`] hands out a complete body held in memory (or just read from Redis) by reference
//! count, with range seeks; [`PartialHit`] follows a fill that is still streaming, chunk by
//! chunk, so a client coalesced behind a streamed answer receives it as it is produced. Neither
//! carries the entry's facts: those travel in the meta (see [`crate::storage::EntryInfo`]).
//!
//! [`Stored`] is the other way a complete entry is read: by the proxy's fresh-hit path, which
//! answers the plainest hits without pingora's cache phases (`crate::proxy::fresh_hit`). It
//! reads the entry in place (its times under the meta's read lock, the header cloned only when
//! it is served) and moves it up the LRU as a hit through pingora's phases does.

use super::fill::{Partial, Progress};
use super::{clock_ms, id, Entry, MemoryStorage, LRU_INTERVAL_MS};
use crate::storage::meta::StoredTimes;
use crate::storage::EntryInfo;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderName;
use pingora::cache::key::HashBinary;
use pingora::cache::storage::{HandleHit, HitHandler};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, Storage};
use pingora::http::ResponseHeader;
use pingora::Result;
use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

impl Entry {
    /// Whether this hit moves the entry up the LRU (and records that it did). Like Varnish's
    /// `lru_interval`: a hot entry moves at most once a second, instead of taking the LRU
    /// shard's lock on every hit.
    pub(super) fn lru_due(&self) -> bool {
        let now = clock_ms() as u32;
        let due = now.wrapping_sub(self.touched.load(Ordering::Relaxed)) >= LRU_INTERVAL_MS as u32;
        if due {
            self.touched.store(now, Ordering::Relaxed);
        }
        due
    }
}

/// A complete entry of the memory tier, read in place by a fresh hit ([`MemoryStorage::complete`]).
pub struct Stored(Arc<Entry>);

impl MemoryStorage {
    /// The complete entry stored under `key` (a key hash without variance), if any; a fill
    /// still streaming is not complete.
    pub fn complete(&self, key: HashBinary) -> Option<Stored> {
        let id = id(key);
        self.get(id).map(Stored)
    }

    /// `stored` answered a request: it moves up the LRU when due, as a hit through pingora's
    /// phases does (`should_count_access`, then the eviction manager's `access`).
    pub fn count_hit(&self, stored: &Stored) {
        if stored.0.lru_due() {
            self.eviction.access_id(stored.0.id);
        }
    }
}

impl Stored {
    pub fn times(&self) -> StoredTimes {
        let meta = &self.0.meta;
        meta.facts.times(meta.header.contains(&http::header::VARY))
    }

    pub fn info(&self) -> &EntryInfo {
        &self.0.info
    }

    /// A copy of the stored response header, to send.
    pub fn header(&self) -> ResponseHeader {
        self.0.meta.header.to_response_header()
    }

    /// The stored fields in order, name and value bytes: what a writer serializing the header
    /// itself copies (`crate::proxy::fresh_hit`; no map is built).
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> + '_ {
        self.0.meta.header.fields()
    }

    /// Bytes of [`Stored::fields`] in HTTP/1 form.
    pub fn fields_len(&self) -> usize {
        self.0.meta.header.wire_len()
    }

    /// The stored status line with only the stored fields `keep` selects, in a map with room
    /// for `capacity` fields: the header a writer decides by when the fields are sent from
    /// [`Stored::fields`].
    pub fn header_with(
        &self,
        capacity: usize,
        keep: impl Fn(&HeaderName) -> bool,
    ) -> ResponseHeader {
        self.0.meta.header.header_with(capacity, keep)
    }

    /// The body (a reference count, not a copy).
    pub fn body(&self) -> Bytes {
        self.0.body.clone()
    }
}

/// Reads one body held in memory: hands out the `Bytes` (a reference count, not a copy).
pub struct BodyHit {
    body: Bytes,
    len: usize,
    range: Option<(usize, usize)>,
    done: bool,
    /// The eviction weight to report; 0 for a body that is not in the memory tier.
    weight: usize,
    /// Whether this hit moves the entry up the LRU.
    pub(super) count_access: bool,
}

impl BodyHit {
    pub fn new(body: Bytes, weight: usize) -> Self {
        BodyHit {
            len: body.len(),
            body,
            range: None,
            done: false,
            weight,
            count_access: weight > 0,
        }
    }
}

#[async_trait]
impl HandleHit for BodyHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(match self.range {
            Some((start, end)) => self.body.slice(start..end),
            None => self.body.clone(),
        }))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.len && self.len > 0 {
            return pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                format!("seek start out of range {start} >= {}", self.len),
            );
        }
        // `end` is exclusive.
        let end = end.map_or(self.len, |e| e.min(self.len));
        self.range = Some((start, end.max(start)));
        self.done = false;
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        self.count_access && self.weight > 0
    }

    fn get_eviction_weight(&self) -> usize {
        self.weight
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Reads a fill in progress chunk by chunk, waiting for the next one, so a client coalesced
/// behind a streaming miss receives the events as they are produced.
pub struct PartialHit {
    partial: Arc<Partial>,
    rx: watch::Receiver<Progress>,
    next: usize,
}

impl PartialHit {
    pub(super) fn start(partial: Arc<Partial>) -> HitHandler {
        let rx = partial.progress.subscribe();
        Box::new(PartialHit {
            partial,
            rx,
            next: 0,
        })
    }
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let progress = *self.rx.borrow_and_update();
            if self.next < progress.chunks {
                let chunk = self.partial.chunks.read()[self.next].clone();
                self.next += 1;
                return Ok(Some(chunk));
            }
            match progress.done {
                Some(true) => return Ok(None),
                Some(false) => return pingora::Error::e_explain(
                    pingora::ErrorType::InternalError,
                    "the fill this request was reading was abandoned (the upstream stream broke)",
                ),
                None => {}
            }
            if self.rx.changed().await.is_err() {
                return pingora::Error::e_explain(
                    pingora::ErrorType::InternalError,
                    "the fill this request was reading went away",
                );
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}
