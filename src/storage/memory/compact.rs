//! Compact entries: an entry owns exactly the bytes it keeps.
//!
//! Pingora hands the cache slices of its I/O buffers: each response header value it parses is a
//! `Bytes` slice of the (at least 4 KiB) buffer the header was read into, and a body chunk may be
//! a slice of a larger read buffer (HTTP/2 frames, a Redis reply). A stored slice keeps its whole
//! buffer alive, so a 100-byte answer pinned about 10 KB while the budget counted 0.5 KB
//! (issue 10 item 3). So an entry is rebuilt when it is stored: the header's values are copied
//! into one buffer of exactly their total length (every value a slice of it: one allocation, not
//! one per field), names are rebuilt (standard names are static, custom ones own their bytes),
//! and the body is copied into an exactly sized buffer. The header is kept as a [`StoredHeader`]
//! (a shared list of names, and value ends), not a `HeaderMap`, whose slots cost several times
//! the fields' bytes. This costs one copy per fill, never one per hit: a hit still hands out
//! reference counts.
//!
//! A segment record (`layout.rs`) then holds the header's one buffer and names its list of
//! field names by number.

use crate::storage::meta::{response_header, HIT_FIELDS};
use bytes::Bytes;
use hashbrown::Equivalent;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use pingora::http::ResponseHeader;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};

/// The body as the entry keeps it: a copy in a buffer of exactly its length, so that a slice of
/// a larger buffer does not keep that buffer alive.
pub(super) fn owned_body(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => Bytes::copy_from_slice(one),
        many => {
            let mut buf = Vec::with_capacity(many.iter().map(Bytes::len).sum());
            for c in many {
                buf.extend_from_slice(c);
            }
            Bytes::from(buf)
        }
    }
}

/// The high bit of a value end: the value is sensitive (never logged, not HPACK-indexed).
const SENSITIVE: u32 = 1 << 31;

/// A bounded table that numbers what many entries share, so a segment record keeps a 2-byte
/// number instead of its own copy: header-name lists here, rules' stored facts in `layout.rs`.
/// Numbering takes a lock (a fill's path); reading a number does not (a hit's path): each
/// number is set once and never changed, and nothing is ever removed, so the table is bounded
/// by its size whatever is numbered.
pub(super) struct Numbered<K, V> {
    by_key: Mutex<hashbrown::HashMap<K, u16>>,
    by_number: Box<[OnceLock<V>]>,
}

impl<K: Hash + Eq, V: Clone> Numbered<K, V> {
    /// A table of at most `size` numbers (below `u16::MAX`, which records keep for "not
    /// numbered").
    pub(super) fn new(size: usize) -> Self {
        Numbered {
            by_key: Mutex::default(),
            by_number: (0..size.min(u16::MAX as usize))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// The number of what `key` stands for and its value, numbering it (with `make`'s key and
    /// value) if it is new and the table has room. Looked up by `key` without making anything.
    pub(super) fn number<Q>(&self, key: &Q, make: impl FnOnce() -> (K, V)) -> Option<(u16, V)>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let mut by_key = self.by_key.lock();
        if let Some(&n) = by_key.get(key) {
            return Some((n, self.get(n)?.clone()));
        }
        let n = u16::try_from(by_key.len())
            .ok()
            .filter(|&n| (n as usize) < self.by_number.len())?;
        let (k, v) = make();
        let _ = self.by_number[n as usize].set(v.clone());
        by_key.insert(k, n);
        Some((n, v))
    }

    /// The value numbered `n`.
    pub(super) fn get(&self, n: u16) -> Option<&V> {
        self.by_number.get(n as usize)?.get()
    }
}

/// Most answers of an origin carry the same fields in the same order, so an entry's field names
/// are one shared list ([`interned`]), which a segment record names by number. The table keeps
/// at most this many lists, each of at most [`MAX_SHARED_NAMES`] bytes, so it is bounded (a
/// few MiB at worst) whatever origins send; a list beyond either bound is the entry's own.
const MAX_NAME_LISTS: usize = 4096;
const MAX_SHARED_NAMES: usize = 1024;
/// The list number of names that are the entry's own (not in the table).
pub(super) const OWN_NAMES: u16 = u16::MAX;

type NameList = Arc<[HeaderName]>;
static NAME_LISTS: Lazy<Numbered<NameList, NameList>> = Lazy::new(|| Numbered::new(MAX_NAME_LISTS));

/// The shared copy of a list of names and its number, if the table has (or can take) it.
fn interned(names: &[HeaderName]) -> Option<(u16, NameList)> {
    let bytes: usize = names.iter().map(|n| n.as_str().len()).sum();
    if bytes > MAX_SHARED_NAMES {
        return None;
    }
    NAME_LISTS.number(names, || {
        let list: NameList = names.into();
        (list.clone(), list)
    })
}

/// Shared list number `n`.
pub(super) fn shared_list(n: u16) -> Option<NameList> {
    NAME_LISTS.get(n).cloned()
}

/// A response header as an entry keeps it: status, version, and the fields in order (repeated
/// fields kept) as a list of names (shared between entries with the same fields) and one
/// exactly sized buffer holding, in turn, each field's value end (4 bytes, with
/// [`SENSITIVE`]), the values, and a reason phrase other than the status's canonical one. Not a
/// `HeaderMap`: a map keeps a 104-byte slot per field for a power-of-two capacity (12 slots for
/// 7 fields) and an index, about 1.4 KB for a typical API answer whose fields are 200 bytes;
/// this form keeps 4 bytes a field, in one buffer (issue 16: per-entry overhead at 1M
/// entries), which a hit reads as a slice of the entry's record. A hit
/// builds the `ResponseHeader` pingora writes from it ([`StoredHeader::to_response_header`]):
/// the same two allocations a `HeaderMap` clone makes, names and values shared by reference
/// count.
#[derive(Clone)]
pub(super) struct StoredHeader {
    status: http::StatusCode,
    version: http::Version,
    /// The number of `names` in the shared table, or [`OWN_NAMES`].
    list: u16,
    /// Bytes of the reason phrase at the end of `buf` (a longer phrase than this can say is
    /// not kept: the canonical one is sent).
    reason_len: u16,
    buf: Bytes,
    names: Arc<[HeaderName]>,
}

impl StoredHeader {
    /// A copy of `h` that owns exactly what it keeps (no slice of pingora's read buffer) and no
    /// header-name case map.
    pub(super) fn new(h: &ResponseHeader) -> StoredHeader {
        let fields = h.headers.len();
        let total: usize = h.headers.values().map(HeaderValue::len).sum();
        // The status's canonical phrase is not kept: pingora answers it for a header without
        // one, so keeping it only made every hit set it again (137 instructions a memory hit).
        let reason = h
            .get_reason_phrase()
            .filter(|r| u16::try_from(r.len()).is_ok() && Some(*r) != h.status.canonical_reason())
            .unwrap_or("");
        let mut buf = Vec::with_capacity(4 * fields + total + reason.len());
        let mut names = Vec::with_capacity(fields);
        let mut end = 0usize;
        for (name, value) in h.headers.iter() {
            // A stored name owns its bytes (a custom name parsed by pingora is a slice too).
            names.push(
                HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone()),
            );
            end += value.len();
            // Header blocks are bounded far below 2 GiB by pingora's parser.
            let at = u32::try_from(end).unwrap_or(u32::MAX) & !SENSITIVE;
            let at = if value.is_sensitive() {
                at | SENSITIVE
            } else {
                at
            };
            buf.extend_from_slice(&at.to_le_bytes());
        }
        for value in h.headers.values() {
            buf.extend_from_slice(value.as_bytes());
        }
        buf.extend_from_slice(reason.as_bytes());
        let (list, names) = match interned(&names) {
            Some((n, list)) => (n, list),
            None => (OWN_NAMES, names.into()),
        };
        StoredHeader {
            status: h.status,
            version: h.version,
            list,
            reason_len: reason.len() as u16,
            buf: Bytes::from(buf),
            names,
        }
    }

    /// The header pingora writes: fields in their stored order, values slices of the one buffer.
    /// Room is made for the fields every hit adds (`Age`, `Accept-Ranges`, `Cache-Status`,
    /// `Connection`), so adding them does not grow the map again.
    pub(super) fn to_response_header(&self) -> ResponseHeader {
        self.header_with(self.names.len() + HIT_FIELDS, |_| true)
    }

    /// The stored status line and the stored fields `keep` selects, in a map with room for
    /// `capacity` fields.
    pub(super) fn header_with(
        &self,
        capacity: usize,
        keep: impl Fn(&HeaderName) -> bool,
    ) -> ResponseHeader {
        let mut headers = HeaderMap::with_capacity(capacity);
        for (name, range, sensitive) in self.spans() {
            if !keep(name) {
                continue;
            }
            // SAFETY: the bytes are those of a `HeaderValue` (checked when it was made),
            // copied unchanged in `new`; `from_maybe_shared_unchecked` only skips the check.
            let mut value =
                unsafe { HeaderValue::from_maybe_shared_unchecked(self.buf.slice(range)) };
            value.set_sensitive(sensitive);
            headers.append(name.clone(), value);
        }
        let mut out = response_header(self.status, self.version, headers);
        if self.reason_len > 0 {
            let reason = &self.buf[self.buf.len() - self.reason_len as usize..];
            let _ = out.set_reason_phrase(std::str::from_utf8(reason).ok());
        }
        out
    }

    /// Each stored field in order: its name, where its value is in the buffer, and whether
    /// the value is sensitive.
    fn spans(&self) -> impl Iterator<Item = (&HeaderName, std::ops::Range<usize>, bool)> + '_ {
        let base = 4 * self.names.len();
        let mut at = base;
        self.names
            .iter()
            .zip(self.buf[..base].chunks_exact(4))
            .map(move |(name, end)| {
                let end = u32::from_le_bytes([end[0], end[1], end[2], end[3]]);
                let stop = base + (end & !SENSITIVE) as usize;
                let range = at..stop;
                at = stop;
                (name, range, end & SENSITIVE != 0)
            })
    }

    /// Each stored field in order, name and value bytes (checked when they were stored: no
    /// CR or LF), for a writer that serializes them itself.
    pub(super) fn fields(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> + '_ {
        self.spans()
            .map(|(name, range, _)| (name, &self.buf[range]))
    }

    /// Bytes of the stored fields in HTTP/1 form (`name: value\r\n` each).
    pub(super) fn wire_len(&self) -> usize {
        let values = self.buf.len() - 4 * self.names.len() - self.reason_len as usize;
        values
            + self
                .names
                .iter()
                .map(|n| n.as_str().len() + 4)
                .sum::<usize>()
    }

    /// Whether a field of this name is stored.
    pub(super) fn contains(&self, name: &HeaderName) -> bool {
        self.names.iter().any(|n| n == name)
    }

    pub(super) fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// The number of its names in the shared table, or [`OWN_NAMES`].
    pub(super) fn list(&self) -> u16 {
        self.list
    }

    /// What a record keeps of the header: status, version, reason phrase length, list
    /// number, the names (for a list of the entry's own) and the one buffer.
    pub(super) fn parts(&self) -> (StatusCode, Version, u16, u16, &[HeaderName], &Bytes) {
        (
            self.status,
            self.version,
            self.reason_len,
            self.list,
            &self.names,
            &self.buf,
        )
    }

    /// The header a record's parts describe (`buf` a slice of the record: no copy).
    pub(super) fn from_parts(
        status: StatusCode,
        version: Version,
        reason_len: u16,
        list: u16,
        names: Arc<[HeaderName]>,
        buf: Bytes,
    ) -> StoredHeader {
        StoredHeader {
            status,
            version,
            list,
            reason_len,
            buf,
            names,
        }
    }

    /// The one buffer (value ends, values, reason phrase).
    #[cfg(test)]
    pub(super) fn values(&self) -> &Bytes {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pingora parses a header into slices of its read buffer: the compacted copy shares none
    /// of it, keeps every field in order, and its values fill one buffer of exactly their length.
    #[test]
    fn a_compacted_header_owns_exactly_its_values() {
        let mut raw = vec![b' '; 4096];
        let fields: [(&str, &str); 4] = [
            ("content-type", "application/json"),
            ("x-request-id", "abc-123"),
            ("vary", "accept"),
            ("vary", "accept-language"),
        ];
        let read_buf = {
            let mut at = 100;
            for (_, v) in &fields {
                raw[at..at + v.len()].copy_from_slice(v.as_bytes());
                at += 900;
            }
            Bytes::from(raw)
        };
        let mut h = ResponseHeader::build(203, None).unwrap();
        let mut at = 100;
        for (k, v) in &fields {
            let value = HeaderValue::from_maybe_shared(read_buf.slice(at..at + v.len())).unwrap();
            h.append_header(k.to_string(), value).unwrap();
            at += 900;
        }
        h.set_reason_phrase(Some("Fine")).unwrap();
        let stored = StoredHeader::new(&h);
        let c = stored.to_response_header();
        let got: Vec<(String, String)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let want: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            (c.status.as_u16(), c.get_reason_phrase()),
            (203, Some("Fine"))
        );
        // The status's canonical phrase is not kept: the rebuilt header answers it anyway.
        let plain = StoredHeader::new(&ResponseHeader::build(200, None).unwrap());
        assert_eq!(plain.reason_len, 0);
        assert_eq!(plain.to_response_header().get_reason_phrase(), Some("OK"));
        let buf = read_buf.as_ptr() as usize..read_buf.as_ptr() as usize + read_buf.len();
        let starts: Vec<usize> = c
            .headers
            .values()
            .map(|v| v.as_bytes().as_ptr() as usize)
            .collect();
        assert!(
            starts.iter().all(|p| !buf.contains(p)),
            "a stored value still points into the read buffer"
        );
        let total: usize = fields.iter().map(|(_, v)| v.len()).sum();
        let lo = *starts.iter().min().unwrap();
        let hi = c
            .headers
            .values()
            .map(|v| v.as_bytes().as_ptr() as usize + v.len())
            .max()
            .unwrap();
        assert_eq!(
            hi - lo,
            total,
            "the values fill one buffer of exactly their length"
        );
        // The same field names share one list, found again by its number; a list too large
        // to share is the entry's own.
        let again = StoredHeader::new(&h);
        assert!(stored.list != OWN_NAMES && Arc::ptr_eq(&stored.names, &again.names));
        assert!(Arc::ptr_eq(
            &shared_list(stored.list).unwrap(),
            &stored.names
        ));
        let mut big = ResponseHeader::build(200, None).unwrap();
        for i in 0..40 {
            big.append_header(format!("x-custom-field-with-a-long-name-{i:02}"), "v")
                .unwrap();
        }
        // Sensitivity survives.
        let mut secret = ResponseHeader::build(200, None).unwrap();
        let mut v = HeaderValue::from_static("s3cr3t");
        v.set_sensitive(true);
        secret.append_header("set-cookie", v).unwrap();
        secret.append_header("etag", "\"x\"").unwrap();
        let back = StoredHeader::new(&secret).to_response_header();
        assert!(back.headers["set-cookie"].is_sensitive() && !back.headers["etag"].is_sensitive());
        assert_eq!(back.headers["set-cookie"], "s3cr3t");
        let own = StoredHeader::new(&big);
        assert_eq!(own.list, OWN_NAMES);
    }

    #[test]
    fn an_owned_body_does_not_keep_its_source_buffer() {
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        let body = owned_body(&[big.slice(10..110)]);
        assert_eq!(&body[..], &big[10..110]);
        let range = big.as_ptr() as usize..big.as_ptr() as usize + big.len();
        assert!(!range.contains(&(body.as_ptr() as usize)));
        let joined = owned_body(&[big.slice(0..3), Bytes::from_static(b"xyz")]);
        assert_eq!(&joined[..], b"\x07\x07\x07xyz");
        assert!(owned_body(&[]).is_empty());
    }
}
