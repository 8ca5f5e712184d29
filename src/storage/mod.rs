//! Where cached bytes live.
//!
//! Pingora's cache machinery talks to a [`pingora::cache::Storage`]; Aisle's tiers implement it.
//! The memory tier ([`memory::MemoryStorage`]) is bounded by pingora's sharded LRU eviction
//! manager and holds bodies as `Bytes`, so a hit hands out a reference, never a copy. A shared
//! tier (Redis) plugs in behind the same trait as a second layer.
//!
//! What the cache needs to know about an entry beyond pingora's `CacheMeta` (the URI it was
//! stored for, its tags) travels in the meta's extensions as an [`EntryInfo`], set by the proxy
//! when it decides a response is cacheable.

pub mod epochs;
pub mod fill_lock;
pub mod memory;
pub mod record;
pub mod redis;
pub mod tiered;

use pingora::cache::CacheMeta;
use std::sync::Arc;

/// Aisle's facts about a stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// [`crate::key::uri_id`] of the URI the entry was stored for; shared by its variants.
    pub uri: u64,
    /// `host/path` the entry was stored for (prefix purges match it).
    pub host_path: Box<str>,
    /// Tags from the rule's templates and `invalidate_on` names.
    pub tags: Arc<[Box<str>]>,
    /// Seal the entry when it is written to a shared tier (rule `encrypt = true`).
    pub encrypt: bool,
    /// The rule it was stored under (per-rule bytes in `/admin/stats`).
    pub rule: Arc<str>,
    /// Where the answer's token count is (rule `cost.tokens`, a JSON pointer); read once when
    /// the fill completes, into `tokens`. Not stored in shared tiers.
    pub tokens_at: Option<Arc<str>>,
    /// Tokens the stored answer reports (0 when unknown): what each hit saves.
    pub tokens: u64,
}

impl EntryInfo {
    /// The facts attached to a meta, if any.
    pub fn of(meta: &CacheMeta) -> Option<&Arc<EntryInfo>> {
        meta.extensions().get::<Arc<EntryInfo>>()
    }

    /// Attaches these facts to a meta (replacing any).
    pub fn attach(self: Arc<Self>, meta: &mut CacheMeta) {
        meta.extensions_mut().insert(self);
    }

    /// The facts of a completed fill: `tokens` read from the body, once.
    pub fn completed(self: &Arc<Self>, body: &[u8]) -> Arc<EntryInfo> {
        match &self.tokens_at {
            Some(pointer) => Arc::new(EntryInfo {
                tokens: crate::usage::tokens(body, pointer),
                ..(**self).clone()
            }),
            None => self.clone(),
        }
    }
}

impl Default for EntryInfo {
    fn default() -> Self {
        EntryInfo {
            uri: 0,
            host_path: "".into(),
            tags: Arc::from(Vec::new()),
            encrypt: false,
            rule: Arc::from(""),
            tokens_at: None,
            tokens: 0,
        }
    }
}
