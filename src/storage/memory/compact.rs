//! Compact entries: an entry owns exactly the bytes it keeps, and is charged for all of them.
//!
//! Pingora hands the cache slices of its I/O buffers: each response header value it parses is a
//! `Bytes` slice of the (at least 4 KiB) buffer the header was read into, and a body chunk may be
//! a slice of a larger read buffer (HTTP/2 frames, a Redis reply). A stored slice keeps its whole
//! buffer alive, so a 100-byte answer pinned about 10 KB while the budget counted 0.5 KB
//! (issue 10 item 3). So an entry is rebuilt when it is stored: the header's values are copied
//! into one buffer of exactly their total length (every value a slice of it: one allocation, not
//! one per field), names are rebuilt (standard names are static, custom ones own their bytes),
//! and the body is copied into an exactly sized buffer. This costs one copy per fill, never one
//! per hit: a hit still hands out reference counts.
//!
//! [`header_weight`] and [`body_weight`] charge what the kept parts really hold on the heap,
//! including the map's spare capacity and the allocator's size classes (mimalloc rounds a request
//! up by at most a quarter: four size classes per power of two).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use std::mem::size_of;

/// Bytes of the reference count block a `Bytes` allocates when a stored buffer is first
/// shared (a hit's clone, a header value's slice).
const SHARED: usize = 32;

/// What the allocator really reserves for a request of `n` bytes: sizes round up to one of four
/// classes per power of two (mimalloc's bins; glibc's are finer), at least 8 bytes.
pub(super) fn alloc_size(n: usize) -> usize {
    if n <= 64 {
        return n.next_multiple_of(8);
    }
    // Four classes between 2^k and 2^(k+1): steps of 2^(k-2).
    let step = 1usize << (usize::BITS - 1 - n.leading_zeros()).saturating_sub(2);
    n.next_multiple_of(step)
}

/// A non-body part of an entry of `n` requested bytes, with the allocator's rounding (at most a
/// quarter more, or 7 bytes for tiny requests, see [`alloc_size`]; the per-part constants in the
/// weights cover the latter).
pub(super) fn with_slack(n: usize) -> usize {
    n + n / 4
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

/// A copy of `h` that owns exactly what it keeps: status, version, reason phrase and fields
/// (in order, repeated fields kept), values in one exactly sized buffer, no header-name case map
/// (a hit clones the header: half the allocations without it).
pub(super) fn compact_header(h: &ResponseHeader) -> ResponseHeader {
    let total: usize = h.headers.values().map(HeaderValue::len).sum();
    let mut buf = Vec::with_capacity(total);
    for v in h.headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = Bytes::from(buf);
    let mut headers = HeaderMap::with_capacity(h.headers.len());
    let mut at = 0;
    for (name, value) in h.headers.iter() {
        let end = at + value.len();
        // The bytes were a valid value a moment ago; the fallback (sharing the original) is
        // unreachable but keeps this free of panics.
        let mut kept =
            HeaderValue::from_maybe_shared(buf.slice(at..end)).unwrap_or_else(|_| value.clone());
        kept.set_sensitive(value.is_sensitive());
        at = end;
        let name =
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        headers.append(name, kept);
    }
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = h.status;
    parts.version = h.version;
    parts.headers = headers;
    let mut out = ResponseHeader::from(parts);
    // Only a phrase other than the status's canonical one is stored.
    let _ = out.set_reason_phrase(h.get_reason_phrase());
    out
}

/// Heap bytes a compacted header holds (before the allocator's slack): the map's slots for its
/// whole capacity (entries and index), extra values of repeated fields, the names, the one value
/// buffer and the reason phrase. An upper bound for a header [`compact_header`] built.
pub(super) fn header_weight(h: &ResponseHeader) -> usize {
    // One slot of the map's entry table: hash, name, value, links to extra values.
    const BUCKET: usize = size_of::<(u16, HeaderName, HeaderValue, Option<(usize, usize)>)>();
    // One extra value of a repeated field: its value and two links.
    const EXTRA: usize = size_of::<(HeaderValue, (usize, usize), (usize, usize))>();
    let map = &h.headers;
    let capacity = map.capacity();
    // The index has a power-of-two number of 4-byte slots, at most 4/3 of the capacity, rounded up.
    let index = 4 * (capacity * 4 / 3 + 1).next_power_of_two();
    // Repeated fields' extra values live in a vector that grows by doubling.
    let extras = 2 * (map.len() - map.keys_len()) * EXTRA;
    let names: usize = map.keys().map(|k| k.as_str().len() + SHARED).sum();
    let values: usize = map.values().map(HeaderValue::len).sum();
    let reason = h.get_reason_phrase().map_or(0, str::len);
    capacity * BUCKET + index + extras + names + values + SHARED + reason
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
            assert!(a >= n && a < with_slack(n) + 8, "{n} -> {a}");
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
        let c = compact_header(&h);
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
        assert!(
            header_weight(&c)
                >= total + c.headers.capacity() * size_of::<(HeaderName, HeaderValue)>()
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
