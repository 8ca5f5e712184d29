//! Hit handlers: how a found entry's body is read.
//!
//! [`BodyHit`] hands out a complete body held in memory (or just read from Redis) by reference
//! count, with range seeks; [`PartialHit`] follows a fill that is still streaming, chunk by
//! chunk, so a client coalesced behind a streamed answer receives it as it is produced. Neither
//! carries the entry's facts: those travel in the meta (see [`crate::storage::EntryInfo`]).

use super::fill::{Partial, Progress};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::storage::{HandleHit, HitHandler};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, Storage};
use pingora::Result;
use std::any::Any;
use std::sync::Arc;
use tokio::sync::watch;

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
