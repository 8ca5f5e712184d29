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

use crate::rules::template::{tag_key, MAX_TAGS};
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

/// A response carried more tags than an entry may hold ([`MAX_TAGS`]); it is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTags(pub usize);

impl EntryInfo {
    /// An entry's tags: the rule's (already rendered in canonical form) and the origin's, each
    /// in the canonical form purges name ([`tag_key`]: escaped, at most 256 bytes), without
    /// repeats. More than [`MAX_TAGS`] is refused rather than cut: a dropped tag would be a purge
    /// that silently misses the entry.
    pub fn tags_from(rule: Vec<String>, origin: &[String]) -> Result<Arc<[Box<str>]>, TooManyTags> {
        let mut tags: Vec<Box<str>> = rule
            .into_iter()
            .map(String::into_boxed_str)
            .chain(origin.iter().map(|t| tag_key(t).into()))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        if tags.len() > MAX_TAGS {
            return Err(TooManyTags(tags.len()));
        }
        Ok(tags.into())
    }

    /// Bytes these facts hold: the struct, the `host_path`, every tag (and its slot), the rule
    /// name and token pointer, and the reference counts of the shared parts. The memory tier
    /// charges them to the entry's weight.
    pub fn size(&self) -> usize {
        const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();
        std::mem::size_of::<EntryInfo>()
            + ARC_COUNTS
            + self.host_path.len()
            + ARC_COUNTS
            + self
                .tags
                .iter()
                .map(|t| std::mem::size_of::<Box<str>>() + t.len())
                .sum::<usize>()
            + ARC_COUNTS
            + self.rule.len()
            + self.tokens_at.as_ref().map_or(0, |t| ARC_COUNTS + t.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 12: what an entry's facts hold is counted, tags and `host_path` included.
    #[test]
    fn size_counts_every_byte_of_the_facts() {
        let small = EntryInfo::default();
        let base = small.size();
        assert!(base >= std::mem::size_of::<EntryInfo>());
        let big = EntryInfo {
            host_path: "h".repeat(10_000).into(),
            tags: Arc::from(vec!["t".repeat(200).into_boxed_str(); 3]),
            rule: Arc::from("rule-name"),
            tokens_at: Some(Arc::from("/usage/total_tokens")),
            ..EntryInfo::default()
        };
        assert!(
            big.size() >= base + 10_000 + 600 + "rule-name".len() + "/usage/total_tokens".len(),
            "{} vs {base}",
            big.size()
        );
    }

    /// Issue 9 items 10 and 12: origin tags take the canonical form; rule and origin tags are
    /// merged without repeats; more than MAX_TAGS is refused.
    #[test]
    fn tags_are_canonical_deduplicated_and_bounded() {
        let tags = EntryInfo::tags_from(
            vec!["vendors".into(), "b".into()],
            &["wedding planner".into(), "vendors".into(), "x".repeat(1000)],
        )
        .unwrap();
        assert_eq!(tags.len(), 4);
        assert!(tags.iter().any(|t| &**t == "wedding%20planner"));
        assert!(tags
            .iter()
            .all(|t| t.len() <= crate::rules::template::MAX_TAG_LEN));
        let many: Vec<String> = (0..MAX_TAGS).map(|i| format!("o{i}")).collect();
        assert!(EntryInfo::tags_from(Vec::new(), &many).is_ok());
        assert_eq!(
            EntryInfo::tags_from(vec!["one-more".into()], &many),
            Err(TooManyTags(MAX_TAGS + 1))
        );
    }
}
