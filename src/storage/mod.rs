//! Where cached bytes live.
//!
//! Pingora's cache machinery talks to a [`pingora::cache::Storage`]; Aisle's tiers implement it.
//! The memory tier ([`memory::MemoryStorage`]) packs its entries into segments that it evicts
//! by priority class as it fills ([`memory::segments`]) and hands a hit's body out as a slice of
//! its segment, a reference, never a copy. A shared tier (Redis) plugs in behind the same trait as a
//! second layer.
//!
//! What the cache needs to know about an entry beyond pingora's `CacheMeta` (the URI it was
//! stored for, its tags) travels in the meta's extensions as an [`EntryInfo`], set by the proxy
//! when it decides a response is cacheable.

pub mod epochs;
pub mod fill_lock;
pub mod memory;
pub mod meta;
pub mod record;
pub mod redis;
pub mod tiered;

use crate::rules::template::{tag_key, MAX_TAGS};
use crate::rules::StoredRule;
use pingora::cache::CacheMeta;
use std::sync::Arc;

/// Aisle's facts about a stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryInfo {
    /// [`crate::key::uri_id`] of the URI the entry was stored for; shared by its variants.
    pub uri: u64,
    /// `host/path` the entry was stored for (prefix purges match it) and its tags (from the
    /// rule's templates and `invalidate_on` names), in one buffer.
    pub names: Names,
    /// What the entry keeps of the rule it was stored under (its name, for per-rule bytes in
    /// `/admin/stats`; whether shared tiers seal it; where its token count is), shared with
    /// every other entry of that rule.
    pub rule: Arc<StoredRule>,
    /// Tokens the stored answer reports (0 when unknown): what each hit saves. Read once,
    /// when the fill completes, from where the rule's `cost.tokens` points.
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
        match &self.rule.tokens_at {
            Some(pointer) => Arc::new(EntryInfo {
                tokens: crate::usage::tokens(body, pointer),
                ..(**self).clone()
            }),
            None => self.clone(),
        }
    }

    /// Seal the entry when it is written to a shared tier (rule `encrypt = true`).
    pub fn encrypt(&self) -> bool {
        self.rule.encrypt
    }

    /// The name of the rule it was stored under.
    pub fn rule_name(&self) -> &str {
        &self.rule.name
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
    pub fn tags_from(rule: Vec<String>, origin: &[String]) -> Result<Vec<Box<str>>, TooManyTags> {
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
        Ok(tags)
    }
}

impl EntryInfo {
    /// `host/path` the entry was stored for.
    pub fn host_path(&self) -> &str {
        self.names.host_path()
    }

    /// The entry's tags.
    pub fn tags(&self) -> Tags<'_> {
        self.names.tags()
    }
}

/// An entry's `host/path` and tags in one exactly sized buffer: the end of `host/path` and of
/// each tag (4 bytes each), then their text. Not a `Box<str>` and a list of boxed tags: at a
/// million entries those were five allocations and about 150 bytes an entry (issue 16).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Names {
    /// `4 * (1 + tags)` bytes of ends (little-endian, relative to the text), then the text:
    /// valid UTF-8, built only from `&str`s by [`Names::new`] and never changed.
    buf: Box<[u8]>,
    tags: u32,
}

impl Names {
    pub fn new<T: AsRef<str>>(host_path: &str, tags: &[T]) -> Self {
        let text: usize = host_path.len() + tags.iter().map(|t| t.as_ref().len()).sum::<usize>();
        let head = 4 * (1 + tags.len());
        let mut buf = Vec::with_capacity(head + text);
        let mut end = host_path.len();
        buf.extend_from_slice(&(end as u32).to_le_bytes());
        for t in tags {
            end += t.as_ref().len();
            buf.extend_from_slice(&(end as u32).to_le_bytes());
        }
        buf.extend_from_slice(host_path.as_bytes());
        for t in tags {
            buf.extend_from_slice(t.as_ref().as_bytes());
        }
        Names {
            buf: buf.into_boxed_slice(),
            tags: tags.len() as u32,
        }
    }

    /// The names as a view (what a record of the memory tier's segments also gives).
    pub fn view(&self) -> NamesRef<'_> {
        NamesRef {
            buf: &self.buf,
            tags: self.tags,
        }
    }

    pub fn host_path(&self) -> &str {
        self.view().host_path()
    }

    pub fn tags(&self) -> Tags<'_> {
        self.view().tags()
    }

    /// Tags stored.
    pub fn tag_count(&self) -> u32 {
        self.tags
    }

    /// Names from a buffer [`Names::as_bytes`] gave, with `tags` tags.
    pub fn from_encoded(buf: &[u8], tags: u32) -> Names {
        Names {
            buf: buf.into(),
            tags,
        }
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The encoded buffer (ends, then text): what a record that packs an entry copies.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("host_path", &self.host_path())
            .field("tags", &self.tags().collect::<Vec<_>>())
            .finish()
    }
}

/// A [`Names`] buffer, borrowed: from a `Names`, or from a memory-tier record that holds the
/// same bytes. Reading it checks what it reads (bounds, UTF-8) rather than trusting how the
/// bytes were made, so a view of any bytes is safe; anything out of place reads as empty.
#[derive(Clone, Copy, Debug, Default)]
pub struct NamesRef<'a> {
    buf: &'a [u8],
    tags: u32,
}

impl<'a> NamesRef<'a> {
    /// A view of `buf`, as [`Names::as_bytes`] lays it out, holding `tags` tags.
    pub fn new(buf: &'a [u8], tags: u32) -> Self {
        NamesRef { buf, tags }
    }

    fn end(&self, i: usize) -> usize {
        let at = 4 * i;
        match self.buf.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => 0,
        }
    }

    fn text(&self, from: usize, to: usize) -> &'a str {
        let head = 4 * (1 + self.tags as usize);
        self.buf
            .get(head + from..head + to)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub fn host_path(&self) -> &'a str {
        if self.buf.is_empty() {
            return "";
        }
        self.text(0, self.end(0))
    }

    pub fn tags(&self) -> Tags<'a> {
        Tags {
            names: *self,
            next: 0,
        }
    }
}

/// The tags of a [`Names`], in order.
#[derive(Clone)]
pub struct Tags<'a> {
    names: NamesRef<'a>,
    next: usize,
}

impl<'a> Iterator for Tags<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.next >= self.names.tags as usize {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(self.names.text(self.names.end(i), self.names.end(i + 1)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.names.tags as usize - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Tags<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_back_what_they_were_built_from() {
        let n = Names::new("api.example/v1/lieux/é", &["venue:42", "", "城市:nyc"]);
        assert_eq!(n.host_path(), "api.example/v1/lieux/é");
        assert_eq!(n.tags().collect::<Vec<_>>(), ["venue:42", "", "城市:nyc"]);
        assert_eq!(n.tags().len(), 3);
        let none = Names::new::<&str>("h/p", &[]);
        assert_eq!((none.host_path(), none.tags().count()), ("h/p", 0));
        let empty = Names::default();
        assert_eq!((empty.host_path(), empty.tags().count()), ("", 0));
        // One buffer: four bytes an end, then the text.
        assert_eq!(
            n.heap_bytes(),
            4 * 4 + n.host_path().len() + "venue:42".len() + "城市:nyc".len()
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
