//! Tag and prefix purge epochs: invalidation in O(1), however many entries carry a tag.
//!
//! Purging a tag does not look for the entries that carry it. It records *when* the tag was
//! purged (and whether softly); a lookup then compares each found entry's creation time with the
//! epochs of its tags (`cache_hit_filter`). An entry stored before its tag's epoch is gone (hard)
//! or stale (soft). Prefix purges work the same way over the entry's `host/path`; both sides
//! of that comparison are in the one normal form [`crate::key`] gives them (`key::host_path`
//! for entries, `key::normalize_prefix` for purges: host case-insensitive and without port,
//! path case-sensitive with unreserved escapes decoded), so a plain `starts_with` is exact.
//!
//! Epochs only need to outlive the entries they could invalidate, so records older than the
//! longest possible entry lifetime are pruned. The map is empty on most hits, which the
//! check tests first with one atomic load.

use crate::clock::now_ms;
use crate::metrics::PURGE_EPOCHS;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When something was purged, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub soft: bool,
}

impl Epoch {
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.at_ms)
    }

    /// The later of two epochs; at equal times a hard purge wins.
    fn merge(self, other: Epoch) -> Epoch {
        match self.at_ms.cmp(&other.at_ms) {
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Less => other,
            std::cmp::Ordering::Equal => Epoch {
                at_ms: self.at_ms,
                soft: self.soft && other.soft,
            },
        }
    }
}

/// What a purge epoch does to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// Hard-purged: treat as absent.
    Gone,
    /// Soft-purged at this time: treat as stale.
    Stale(SystemTime),
}

/// All purge epochs known to this instance.
#[derive(Default)]
pub struct Epochs {
    tags: RwLock<HashMap<Box<str>, Epoch>>,
    /// URI purges (RFC 9111 §4.4, URL purges), by [`crate::key::uri_id`]: deleting the
    /// entries is not enough, as a fill that was already in flight could store them again.
    uris: RwLock<UriEpochs>,
    prefixes: RwLock<PrefixTrie>,
    any: AtomicBool,
}

/// Distinct URIs whose purge is kept exactly; older ones fold into [`URI_BUCKETS`].
/// About 50 bytes each: 65,536 cost about 3 MiB.
pub const URI_EXACT_MAX: usize = 65_536;
/// Buckets the oldest URI purges fold into (8 bytes each: 512 KiB).
pub const URI_BUCKETS: usize = 65_536;

/// URI purge epochs in bounded memory. Every unsafe request records one (RFC 9111 §4.4), so an
/// API taking many distinct writes would grow a plain map without bound within the retention
/// window (issue 10). The most recent [`URI_EXACT_MAX`] are kept exactly; when the map is full,
/// its older half folds into a fixed array of buckets (`uri % URI_BUCKETS`) holding the latest
/// purge time that fell in each. A bucket can only judge *more* entries purged than were (an
/// entry of another URI in the same bucket, created before that purge, is refetched): never a
/// purged answer served. URI purges are hard, so a bucket keeps only a time.
#[derive(Default)]
struct UriEpochs {
    exact: HashMap<u64, Epoch>,
    /// Unix ms of the latest folded purge per bucket; empty until the first fold.
    buckets: Box<[u64]>,
}

impl UriEpochs {
    fn insert(&mut self, uri: u64, epoch: Epoch) {
        if self.exact.len() >= URI_EXACT_MAX && !self.exact.contains_key(&uri) {
            self.fold_older_half();
        }
        let e = self.exact.entry(uri).or_insert(epoch);
        *e = e.merge(epoch);
    }

    /// Moves the older half of the exact map into the buckets: O(n) once per n/2 inserts.
    fn fold_older_half(&mut self) {
        if self.buckets.is_empty() {
            self.buckets = vec![0u64; URI_BUCKETS].into_boxed_slice();
        }
        let mut times: Vec<u64> = self.exact.values().map(|e| e.at_ms).collect();
        let mid = times.len() / 2;
        let (_, median, _) = times.select_nth_unstable(mid);
        let median = *median;
        let buckets = &mut self.buckets;
        self.exact.retain(|uri, e| {
            if e.at_ms > median {
                return true;
            }
            let b = &mut buckets[(*uri % URI_BUCKETS as u64) as usize];
            *b = (*b).max(e.at_ms);
            false
        });
    }

    /// The purge of `uri` at or after `created_ms`, if any.
    fn get(&self, uri: u64, created_ms: u64) -> Option<Epoch> {
        let exact = self
            .exact
            .get(&uri)
            .filter(|e| e.at_ms >= created_ms)
            .copied();
        let folded = self
            .buckets
            .get((uri % URI_BUCKETS as u64) as usize)
            .filter(|&&at_ms| at_ms != 0 && at_ms >= created_ms)
            .map(|&at_ms| Epoch { at_ms, soft: false });
        match (exact, folded) {
            (Some(a), Some(b)) => Some(a.merge(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops purges before `cutoff`; returns how many exact records were dropped.
    fn prune(&mut self, cutoff: u64) -> usize {
        let before = self.exact.len();
        self.exact.retain(|_, e| e.at_ms >= cutoff);
        let mut live = false;
        for b in self.buckets.iter_mut() {
            if *b < cutoff {
                *b = 0;
            }
            live |= *b != 0;
        }
        if !live {
            self.buckets = Box::default();
        }
        before - self.exact.len()
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.buckets.is_empty()
    }

    /// Sets `aisle_purge_epochs{kind="uri"|"uri_folded"}`.
    fn report(&self) {
        PURGE_EPOCHS
            .with_label_values(&["uri"])
            .set(self.exact.len() as i64);
        PURGE_EPOCHS
            .with_label_values(&["uri_folded"])
            .set(i64::from(!self.buckets.is_empty()));
    }
}

/// Prefix purges indexed by their bytes. Judging a `host/path` walks it once, so a hit costs
/// O(its length) however many prefixes were purged (a list scanned on every hit made hits slow
/// down as prefix purges accumulated: issue 10).
#[derive(Default)]
struct PrefixTrie {
    root: Node,
    len: usize,
}

#[derive(Default)]
struct Node {
    /// The purge of exactly the prefix that ends here, if any.
    epoch: Option<Epoch>,
    /// Sorted by byte (binary search); most nodes have one child.
    children: Vec<(u8, Node)>,
}

impl Drop for Node {
    /// Iterative, so a long prefix (a deep chain of nodes) cannot overflow the stack.
    fn drop(&mut self) {
        let mut stack: Vec<Node> = self.children.drain(..).map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain(..).map(|(_, c)| c));
        }
    }
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &[u8], epoch: Epoch) {
        let mut node = &mut self.root;
        for &b in prefix {
            let i = match node.children.binary_search_by_key(&b, |(k, _)| *k) {
                Ok(i) => i,
                Err(i) => {
                    node.children.insert(i, (b, Node::default()));
                    i
                }
            };
            node = &mut node.children[i].1;
        }
        match &mut node.epoch {
            Some(e) => *e = e.merge(epoch),
            None => {
                node.epoch = Some(epoch);
                self.len += 1;
            }
        }
    }

    /// The latest epoch, at or after `created_ms`, of a purged prefix of `s`.
    fn worst(&self, s: &[u8], created_ms: u64) -> Option<Epoch> {
        let mut worst: Option<Epoch> = None;
        let mut node = &self.root;
        let mut consider = |e: Option<Epoch>| {
            if let Some(e) = e.filter(|e| e.at_ms >= created_ms) {
                worst = Some(worst.map_or(e, |w| w.merge(e)));
            }
        };
        consider(node.epoch);
        for &b in s {
            match node.children.binary_search_by_key(&b, |(k, _)| *k) {
                Ok(i) => node = &node.children[i].1,
                Err(_) => break,
            }
            consider(node.epoch);
        }
        worst
    }

    /// Every recorded (prefix, epoch), without recursion (a prefix may be long).
    fn entries(&self) -> Vec<(Vec<u8>, Epoch)> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack: Vec<(&Node, Vec<u8>)> = vec![(&self.root, Vec::new())];
        while let Some((node, prefix)) = stack.pop() {
            if let Some(e) = node.epoch {
                out.push((prefix.clone(), e));
            }
            for (b, child) in &node.children {
                let mut p = prefix.clone();
                p.push(*b);
                stack.push((child, p));
            }
        }
        out
    }

    /// Keeps the epochs at or after `cutoff` (rebuilt: pruning runs at most once a minute);
    /// returns how many were dropped.
    fn prune(&mut self, cutoff: u64) -> usize {
        let entries = self.entries();
        let before = entries.len();
        let mut kept = PrefixTrie::default();
        for (p, e) in entries.into_iter().filter(|(_, e)| e.at_ms >= cutoff) {
            kept.insert(&p, e);
        }
        let dropped = before - kept.len;
        *self = kept;
        dropped
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Unix milliseconds now.
use crate::clock::millis;

impl Epochs {
    /// Records a tag purge (keeping the later epoch if one exists).
    pub fn purge_tag(&self, tag: &str, epoch: Epoch) {
        let mut tags = self.tags.write();
        let e = tags.entry(tag.into()).or_insert(epoch);
        *e = e.merge(epoch);
        PURGE_EPOCHS
            .with_label_values(&["tag"])
            .set(tags.len() as i64);
        self.any.store(true, Ordering::Release);
    }

    /// Records a purge of every variant of a URI.
    pub fn purge_uri(&self, uri: u64, epoch: Epoch) {
        let mut uris = self.uris.write();
        uris.insert(uri, epoch);
        uris.report();
        self.any.store(true, Ordering::Release);
    }

    /// Records a purge of every URI starting with `prefix` (`host/path...`).
    pub fn purge_prefix(&self, prefix: &str, epoch: Epoch) {
        let mut prefixes = self.prefixes.write();
        prefixes.insert(prefix.as_bytes(), epoch);
        PURGE_EPOCHS
            .with_label_values(&["prefix"])
            .set(prefixes.len as i64);
        self.any.store(true, Ordering::Release);
    }

    /// Whether any epoch is recorded (the hit path's fast exit).
    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// Judges an entry created at `created` carrying `tags`, stored for `host_path`.
    pub fn judge<'a>(
        &self,
        created: SystemTime,
        tags: impl IntoIterator<Item = &'a str>,
        host_path: &str,
        uri: u64,
    ) -> Verdict {
        if self.is_empty() {
            return Verdict::Valid;
        }
        let created = millis(created);
        let mut worst: Option<Epoch> = self.uris.read().get(uri, created);
        {
            let map = self.tags.read();
            if !map.is_empty() {
                for tag in tags {
                    if let Some(e) = map.get(tag) {
                        if e.at_ms >= created {
                            worst = Some(worst.map_or(*e, |w| w.merge(*e)));
                        }
                    }
                }
            }
        }
        {
            let prefixes = self.prefixes.read();
            if !prefixes.is_empty() {
                if let Some(e) = prefixes.worst(host_path.as_bytes(), created) {
                    worst = Some(worst.map_or(e, |w| w.merge(e)));
                }
            }
        }
        match worst {
            None => Verdict::Valid,
            Some(e) if e.soft => Verdict::Stale(e.time()),
            Some(_) => Verdict::Gone,
        }
    }

    /// Drops epochs older than `retention` (no entry that old can still be served).
    pub fn prune(&self, retention: Duration) -> usize {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut n = 0;
        self.tags.write().retain(|_, e| {
            let keep = e.at_ms >= cutoff;
            n += usize::from(!keep);
            keep
        });
        n += self.prefixes.write().prune(cutoff);
        n += self.uris.write().prune(cutoff);
        let (tags, prefixes) = self.len();
        PURGE_EPOCHS.with_label_values(&["tag"]).set(tags as i64);
        PURGE_EPOCHS
            .with_label_values(&["prefix"])
            .set(prefixes as i64);
        self.uris.read().report();
        if self.tags.read().is_empty()
            && self.prefixes.read().is_empty()
            && self.uris.read().is_empty()
        {
            self.any.store(false, Ordering::Release);
        }
        n
    }

    /// Number of recorded epochs (tags, prefixes).
    pub fn len(&self) -> (usize, usize) {
        (self.tags.read().len(), self.prefixes.read().len)
    }

    /// URI purges kept exactly (at most [`URI_EXACT_MAX`]), and whether older ones were folded
    /// into buckets.
    pub fn uri_len(&self) -> (usize, bool) {
        let uris = self.uris.read();
        (uris.exact.len(), !uris.buckets.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_trie_finds_every_purged_prefix_of_a_path_and_prunes() {
        let e = |at_ms, soft| Epoch { at_ms, soft };
        let mut t = PrefixTrie::default();
        t.insert(b"h/api/", e(10, true));
        t.insert(b"h/api/ven", e(20, false));
        t.insert(b"h/other", e(30, false));
        t.insert(b"h/api/", e(15, true));
        assert_eq!(t.len, 3, "a prefix purged twice is one record");
        // Every purged prefix of the path counts; the latest wins, hard over soft at equal times.
        assert_eq!(t.worst(b"h/api/vendors/1", 0), Some(e(20, false)));
        assert_eq!(t.worst(b"h/api/items", 0), Some(e(15, true)));
        assert_eq!(
            t.worst(b"h/api/vendors/1", 21),
            None,
            "created after every purge"
        );
        assert_eq!(
            t.worst(b"h/ap", 0),
            None,
            "a shorter path is not under the prefix"
        );
        assert_eq!(t.worst(b"", 0), None);
        // An empty prefix purges everything.
        t.insert(b"", e(5, false));
        assert_eq!(t.worst(b"x/anything", 0), Some(e(5, false)));
        assert_eq!(t.prune(12), 1, "only the empty prefix (5) is older than 12");
        assert_eq!(t.len, 3);
        assert_eq!(t.worst(b"h/api/vendors", 0), Some(e(20, false)));
        assert_eq!(t.worst(b"x/anything", 0), None);
        // A very long prefix neither recurses nor overflows the stack (walking, pruning, dropping).
        let long = vec![b'a'; 200_000];
        t.insert(&long, e(40, false));
        assert_eq!(t.worst(&long, 0), Some(e(40, false)));
        assert_eq!(t.prune(35), 3);
        assert_eq!(t.len, 1);
        assert_eq!(t.prune(41), 1);
        assert!(t.is_empty());
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn entries_older_than_the_epoch_are_gone() {
        let e = Epochs::default();
        assert_eq!(e.judge(at(1), ["a"], "h/x", 0), Verdict::Valid);
        e.purge_tag(
            "a",
            Epoch {
                at_ms: 1000,
                soft: false,
            },
        );
        assert_eq!(e.judge(at(999), ["b", "a"], "h/x", 0), Verdict::Gone);
        assert_eq!(
            e.judge(at(1000), ["a"], "h/x", 0),
            Verdict::Gone,
            "stored in the same ms: purged"
        );
        assert_eq!(
            e.judge(at(1001), ["a"], "h/x", 0),
            Verdict::Valid,
            "stored after the purge"
        );
        assert_eq!(
            e.judge(at(1), ["b"], "h/x", 0),
            Verdict::Valid,
            "other tags untouched"
        );
    }

    #[test]
    fn soft_and_hard() {
        let e = Epochs::default();
        e.purge_tag(
            "a",
            Epoch {
                at_ms: 1000,
                soft: true,
            },
        );
        assert_eq!(e.judge(at(10), ["a"], "h/x", 0), Verdict::Stale(at(1000)));
        e.purge_tag(
            "a",
            Epoch {
                at_ms: 1000,
                soft: false,
            },
        );
        assert_eq!(
            e.judge(at(10), ["a"], "h/x", 0),
            Verdict::Gone,
            "hard wins at equal times"
        );
        e.purge_tag(
            "a",
            Epoch {
                at_ms: 500,
                soft: true,
            },
        );
        assert_eq!(
            e.judge(at(10), ["a"], "h/x", 0),
            Verdict::Gone,
            "an older epoch changes nothing"
        );
    }

    #[test]
    fn uris() {
        let e = Epochs::default();
        e.purge_uri(
            7,
            Epoch {
                at_ms: 1000,
                soft: false,
            },
        );
        assert_eq!(
            e.judge(at(999), [], "h/x", 7),
            Verdict::Gone,
            "a fill from before the purge"
        );
        assert_eq!(e.judge(at(1001), [], "h/x", 7), Verdict::Valid);
        assert_eq!(
            e.judge(at(5), [], "h/x", 8),
            Verdict::Valid,
            "other URIs untouched"
        );
    }

    /// Issue 10 item 6: a stream of distinct URI purges (one per unsafe request) stays within a
    /// fixed bound, and every purge still refuses the entries stored before it.
    #[test]
    fn uri_epochs_stay_bounded_and_never_forget_a_purge() {
        let e = Epochs::default();
        let n = 4 * URI_EXACT_MAX as u64 + 123;
        for i in 0..n {
            // Distinct URIs, purged at increasing times (1 ms apart from t=10 s).
            e.purge_uri(
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                Epoch {
                    at_ms: 10_000 + i,
                    soft: false,
                },
            );
            let (exact, _) = e.uri_len();
            assert!(exact <= URI_EXACT_MAX, "{exact} exact records after {i}");
        }
        assert!(e.uri_len().1, "older purges were folded");
        for i in (0..n).step_by(97) {
            let uri = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(
                e.judge(at(10_000 + i), [], "h/x", uri),
                Verdict::Gone,
                "the entry stored in the purge's millisecond, uri #{i}"
            );
        }
        // The most recent purges are exact: an entry of an unpurged URI stored after the
        // latest folded purge is valid; one stored long before may be judged conservatively.
        assert_eq!(
            e.judge(at(10_000 + n), [], "h/x", 0xdead_beef_0000_0001),
            Verdict::Valid
        );
        // Pruning past every purge empties the buckets too.
        assert!(e.uris.write().prune(10_000 + n + 1) > 0);
        assert_eq!(e.uri_len(), (0, false));
        assert_eq!(
            e.judge(at(1), [], "h/x", 3u64.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            Verdict::Valid
        );
    }

    #[test]
    fn prefixes() {
        let e = Epochs::default();
        e.purge_prefix(
            "api.example.com/api/vendors",
            Epoch {
                at_ms: 1000,
                soft: false,
            },
        );
        assert_eq!(
            e.judge(at(5), [], "api.example.com/api/vendors/7", 0),
            Verdict::Gone
        );
        assert_eq!(
            e.judge(at(5), [], "api.example.com/api/weddings/7", 0),
            Verdict::Valid
        );
    }

    #[test]
    fn prefixes_compare_like_with_like() {
        use crate::key::{host_path, normalize_prefix};
        let e = Epochs::default();
        let hard = Epoch {
            at_ms: 1000,
            soft: false,
        };
        // Entries as the proxy stores them: normalized host, normalized case-kept path.
        let upper = host_path("localhost", "/API/Items/1");
        let escaped = host_path("localhost", "/api/weddings/4%32/x");
        e.purge_prefix(&normalize_prefix("LOCALHOST/API/Items").unwrap(), hard);
        e.purge_prefix(
            &normalize_prefix("http://localhost.:8080/api/weddings/42").unwrap(),
            hard,
        );
        assert_eq!(e.judge(at(5), [], &upper, 0), Verdict::Gone);
        assert_eq!(e.judge(at(5), [], &escaped, 0), Verdict::Gone);
        // Paths are case-sensitive: another resource is untouched.
        let lower = host_path("localhost", "/api/items/1");
        assert_eq!(e.judge(at(5), [], &lower, 0), Verdict::Valid);
    }

    #[test]
    fn pruning() {
        let e = Epochs::default();
        e.purge_tag(
            "old",
            Epoch {
                at_ms: 1,
                soft: false,
            },
        );
        e.purge_tag(
            "new",
            Epoch {
                at_ms: now_ms(),
                soft: false,
            },
        );
        assert_eq!(e.prune(Duration::from_secs(3600)), 1);
        assert_eq!(e.len(), (1, 0));
        assert!(!e.is_empty());
        e.prune(Duration::ZERO);
        e.tags.write().clear();
        e.prune(Duration::ZERO);
        assert!(e.is_empty());
    }
}
