//! Compact entries: an entry owns exactly the bytes it keeps, and is charged for all of them.
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
//! [`header_weight`] and [`body_weight`] charge what the kept parts really hold on the heap,
//! including the map's spare capacity and the allocator's size classes (mimalloc rounds a request
//! up by at most a quarter: four size classes per power of two).

use crate::storage::meta::{response_header, HIT_FIELDS};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use pingora::http::ResponseHeader;
use std::collections::HashSet;
use std::mem::size_of;
use std::sync::Arc;

/// Bytes of the reference count block a `Bytes` allocates when a stored buffer is first
/// shared (a hit's clone, a header value's slice).
const SHARED: usize = 32;
/// An `Arc`'s two reference counts.
pub(super) const ARC_COUNTS: usize = 2 * size_of::<usize>();

/// What the allocator really reserves for a request of `n` bytes: sizes round up to one of four
/// classes per power of two (mimalloc's bins; glibc's are finer), at least 8 bytes.
pub(super) const fn alloc_size(n: usize) -> usize {
    if n <= 64 {
        return n.next_multiple_of(8);
    }
    // Four classes between 2^k and 2^(k+1): steps of 2^(k-2).
    let step = 1usize << (usize::BITS - 1 - n.leading_zeros()).saturating_sub(2);
    n.next_multiple_of(step)
}

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

/// Heap bytes a stored body holds: its buffer and the shared reference count.
pub(super) fn body_weight(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        alloc_size(len) + SHARED
    }
}

/// The high bit of a value end: the value is sensitive (never logged, not HPACK-indexed).
const SENSITIVE: u32 = 1 << 31;

/// Most answers of an origin carry the same fields in the same order, so an entry's field names
/// are one shared list ([`interned`]). The table keeps at most this many lists, each of at
/// most [`MAX_SHARED_NAMES`] bytes, so it is bounded (a few MiB at worst) whatever origins
/// send; a list beyond either bound is the entry's own and charged to it.
const MAX_NAME_LISTS: usize = 4096;
const MAX_SHARED_NAMES: usize = 1024;

static NAME_LISTS: Lazy<Mutex<HashSet<Arc<[HeaderName]>>>> = Lazy::new(Mutex::default);

/// The shared copy of a list of names, if the table has (or can take) it.
fn interned(names: &[HeaderName]) -> Option<Arc<[HeaderName]>> {
    let bytes: usize = names.iter().map(|n| n.as_str().len()).sum();
    if bytes > MAX_SHARED_NAMES {
        return None;
    }
    let mut lists = NAME_LISTS.lock();
    if let Some(list) = lists.get(names) {
        return Some(list.clone());
    }
    if lists.len() >= MAX_NAME_LISTS {
        return None;
    }
    let list: Arc<[HeaderName]> = names.into();
    lists.insert(list.clone());
    Some(list)
}

/// A response header as an entry keeps it: status, version, and the fields in order (repeated
/// fields kept) as a list of names (shared between entries with the same fields) and one
/// exactly sized buffer holding, in turn, each field's value end (4 bytes, with
/// [`SENSITIVE`]), the values, and a reason phrase other than the status's canonical one. Not a
/// `HeaderMap`: a map keeps a 104-byte slot per field for a power-of-two capacity (12 slots for
/// 7 fields) and an index, about 1.4 KB for a typical API answer whose fields are 200 bytes;
/// this form keeps 4 bytes a field, in one allocation (issue 16: per-entry overhead at 1M
/// entries; the struct is 56 bytes, and an `Entry` with it fits mimalloc's 192-byte class). A hit
/// builds the `ResponseHeader` pingora writes from it ([`StoredHeader::to_response_header`]):
/// the same two allocations a `HeaderMap` clone makes, names and values shared by reference
/// count.
#[derive(Clone)]
pub(super) struct StoredHeader {
    status: http::StatusCode,
    version: http::Version,
    /// Whether `names` is the shared table's (else the entry's own, and charged to it).
    shared_names: bool,
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
        let (names, shared_names) = match interned(&names) {
            Some(list) => (list, true),
            None => (names.into(), false),
        };
        StoredHeader {
            status: h.status,
            version: h.version,
            shared_names,
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

    /// The one buffer (value ends, values, reason phrase).
    #[cfg(test)]
    pub(super) fn values(&self) -> &Bytes {
        &self.buf
    }
}

/// Heap bytes a stored header holds, each allocation with the allocator's rounding: the one
/// buffer (and the reference count block its first slice makes), and the names when they are
/// the entry's own (the list, custom names and theirs).
pub(super) fn header_weight(h: &StoredHeader) -> usize {
    let buf = if h.buf.is_empty() {
        0
    } else {
        alloc_size(h.buf.len()) + SHARED
    };
    let names = if h.shared_names {
        0
    } else {
        ARC_COUNTS
            + alloc_size(h.names.len() * size_of::<HeaderName>())
            + h.names
                .iter()
                .filter(|n| !is_standard(n))
                .map(|n| alloc_size(n.as_str().len()) + SHARED)
                .sum::<usize>()
    };
    buf + names
}

/// Whether a name is one of `http`'s static standard names (no heap bytes of its own).
fn is_standard(name: &HeaderName) -> bool {
    HeaderName::from_bytes(name.as_str().as_bytes())
        .map(|n| {
            // A standard name's `as_str` points into static memory, the same for every copy;
            // a custom one's into its own buffer.
            n.as_str().as_ptr() == name.as_str().as_ptr()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_size_rounds_up_to_a_size_class() {
        assert_eq!(alloc_size(0), 0);
        assert_eq!(alloc_size(1), 8);
        assert_eq!(alloc_size(100), 112);
        assert_eq!(alloc_size(1024), 1024);
        assert_eq!(alloc_size(1025), 1280);
        assert_eq!(alloc_size(65_536), 65_536);
        for n in 1..100_000 {
            let a = alloc_size(n);
            assert!(a >= n && a < n + n / 4 + 8, "{n} -> {a}");
        }
    }

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
        assert!(header_weight(&stored) >= total + c.headers.len() * size_of::<u32>());
        // The same field names share one list; a list too large to share is the entry's own
        // and charged to it, custom names and all.
        let again = StoredHeader::new(&h);
        assert!(stored.shared_names && Arc::ptr_eq(&stored.names, &again.names));
        let mut big = ResponseHeader::build(200, None).unwrap();
        for i in 0..40 {
            big.append_header(format!("x-custom-field-with-a-long-name-{i:02}"), "v")
                .unwrap();
        }
        // Sensitivity survives; the struct stays small enough for an `Entry` to keep its size
        // class (see `StoredHeader`).
        let mut secret = ResponseHeader::build(200, None).unwrap();
        let mut v = HeaderValue::from_static("s3cr3t");
        v.set_sensitive(true);
        secret.append_header("set-cookie", v).unwrap();
        secret.append_header("etag", "\"x\"").unwrap();
        let back = StoredHeader::new(&secret).to_response_header();
        assert!(back.headers["set-cookie"].is_sensitive() && !back.headers["etag"].is_sensitive());
        assert_eq!(back.headers["set-cookie"], "s3cr3t");
        assert!(size_of::<StoredHeader>() <= 56);
        let own = StoredHeader::new(&big);
        assert!(!own.shared_names);
        assert!(header_weight(&own) >= 40 * (size_of::<HeaderName>() + 32));
        assert!(
            !is_standard(&HeaderName::from_static("x-request-id"))
                && is_standard(&http::header::CONTENT_TYPE)
        );
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
