//! Fill handlers: how a response being fetched becomes an entry.
//!
//! A [`MemoryMiss`] collects the body as it streams into a [`Partial`] that readers can follow
//! ([`super::hit::PartialHit`]), and stores the entry when the fill completes, with the token
//! count read once from the complete body: its chunks are copied into the entry's record (so a
//! chunk that is a slice of a larger read buffer does not keep that buffer alive). Dropped
//! without `finish` (a broken upstream stream), nothing is stored and the readers are told.

use super::compact::owned_body;
use super::{MemoryStorage, StoredMeta};
use crate::storage::EntryInfo;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use pingora::cache::storage::{HandleMiss, MissFinishType};
use pingora::Result;
use std::sync::Arc;
use tokio::sync::watch;

/// How far a fill has come.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    pub(super) chunks: usize,
    /// `Some(true)`: complete; `Some(false)`: abandoned (the stream broke; nothing is stored).
    pub(super) done: Option<bool>,
}

/// A fill in progress: its header, facts and the chunks so far, for readers that join
/// mid-stream (their hits are judged against purge epochs like any other).
pub(super) struct Partial {
    pub(super) meta: StoredMeta,
    pub(super) info: Arc<EntryInfo>,
    pub(super) chunks: RwLock<Vec<Bytes>>,
    pub(super) progress: watch::Sender<Progress>,
}

/// Collects a response body being filled, readable while it streams; stores the entry on
/// `finish`. Dropped without `finish` (a broken upstream stream), nothing is stored.
pub(super) struct MemoryMiss {
    pub(super) storage: &'static MemoryStorage,
    pub(super) id: u128,
    /// Its priority class (from the key's `user_tag`).
    pub(super) class: u8,
    pub(super) write: u64,
    pub(super) write_tag: [u8; 8],
    pub(super) partial: Arc<Partial>,
    /// Set by `finish`; a fill dropped before it is abandoned.
    pub(super) finished: bool,
}

impl MemoryMiss {
    /// Forgets the fill in progress (if it is still ours) and tells its readers how it ended.
    fn end(&self, complete: bool) {
        let mut partials = self.storage.partials.lock();
        if partials
            .get(&self.id)
            .is_some_and(|(w, _)| *w == self.write)
        {
            partials.remove(&self.id);
        }
        drop(partials);
        self.partial
            .progress
            .send_modify(|p| p.done = Some(complete));
    }
}

#[async_trait]
impl HandleMiss for MemoryMiss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.partial.chunks.write().push(data);
        self.partial.progress.send_modify(|p| p.chunks += 1);
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        let stored = {
            let chunks = self.partial.chunks.read();
            let len = chunks.iter().map(Bytes::len).sum();
            let mut meta = self.partial.meta.clone();
            meta.set_length(len);
            // The token count is read from the whole body, made contiguous only for that.
            let info = match (&self.partial.info.rule.tokens_at, chunks.len()) {
                (None, _) => self.partial.info.clone(),
                (Some(_), 1) => self.partial.info.completed(&chunks[0]),
                (Some(_), _) => self.partial.info.completed(&owned_body(&chunks)),
            };
            let body: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            self.storage
                .store_entry(self.id, self.class, &meta, &info, &body, None)
        };
        self.finished = true;
        self.end(true);
        Ok(MissFinishType::Created(stored.unwrap_or(0)))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.write_tag)
    }
}

impl Drop for MemoryMiss {
    fn drop(&mut self) {
        if !self.finished {
            self.end(false);
        }
    }
}
