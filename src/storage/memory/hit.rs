//! Hit handlers: how a found entry's body is read.
//!
//! [`BodyHit`] hands out a complete body held in memory (or just read from Redis) by reference
//! count, with range seeks; [`PartialHit`] follows a fill that is still streaming, chunk by
//! chunk, so a client coalesced behind a streamed answer receives it as it is produced. Neither
//! carries the entry's facts: those travel in the meta (see [`crate::storage::EntryInfo`]).
//!
//! [`Stored`] is the other way a complete entry is read: by the proxy's fresh-hit path, which
//! answers the plainest hits without pingora's cache phases (`crate::proxy::fresh_hit`). It
//! reads the entry in its record (its times decoded, its names read in place, the header
//! cloned only when it is served); finding it notes the hit, as a lookup does.

use super::fill::{Partial, Progress};
use super::layout::Entry;
use super::{id, MemoryStorage};
use crate::storage::meta::StoredTimes;
use crate::storage::NamesRef;
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
use std::sync::Arc;
use tokio::sync::watch;

/// A complete entry of the memory tier, read in place by a fresh hit ([`MemoryStorage::complete`]).
pub struct Stored(Entry);

impl MemoryStorage {
    /// The complete entry stored under `key` (a key hash without variance), if any, noted as
    /// hit; a fill still streaming is not complete.
    pub fn complete(&self, key: HashBinary) -> Option<Stored> {
        self.hit(id(key)).map(Stored)
    }
}

impl Stored {
    pub fn times(&self) -> StoredTimes {
        let meta = &self.0.meta;
        meta.facts.times(meta.header.contains(&http::header::VARY))
    }

    /// The URI id it was stored for.
    pub fn uri(&self) -> u64 {
        self.0.uri()
    }

    /// Its `host/path` and tags.
    pub fn names(&self) -> NamesRef<'_> {
        self.0.names()
    }

    /// Tokens the stored answer reports (0 when unknown).
    pub fn tokens(&self) -> u64 {
        self.0.tokens
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
        self.0.body()
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
}

impl BodyHit {
    pub fn new(body: Bytes, weight: usize) -> Self {
        BodyHit {
            len: body.len(),
            body,
            range: None,
            done: false,
            weight,
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

    /// Pingora is given no eviction manager (the memory tier's store notes hits itself).
    fn should_count_access(&self) -> bool {
        false
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
