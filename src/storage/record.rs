//! The byte form of an entry in a shared tier: the facts both tiers keep of pingora's meta
//! ([`MetaFacts`]), the response header, Aisle's [`EntryInfo`], and the body, optionally
//! sealed with AES-256-GCM.
//!
//! ```text
//! envelope  = 0x00 payload                                   (plain)
//!           | 0x01 key_id[4] nonce[12] AES-256-GCM(payload)  (encrypted; AAD = the storage key)
//! payload   = "AIS4" facts header info body
//!           | "AIS3" len32 internal_meta len32 header info body   (read, no longer written)
//! facts     = fresh_until64 confirmed64 epoch64 swr32 sie32 (0x00 | 0x01 variance[16])
//! header    = status16 version8 len16 reason nfields16
//!             (len16 name len32 value)*                      (bit 31 of a value's len: sensitive)
//! info      = uri64 len32 host_path len32 rule ntags32 (len32 tag)* flags8 [tokens64 if flags & 2]
//! ```
//! The header is written as it is, not compressed: `AIS3` held pingora's serialized meta, whose
//! header is zstd-compressed, and decompressing and re-parsing it was 13% of a Redis hit's CPU
//! (issue 16). Every name and value read back is checked as pingora's parser would (a record
//! in a shared Redis is not trusted to be well formed).
//!
//! The key id is derived from the key itself, so rotating keys needs no bookkeeping: records
//! sealed with a `previous_keys` entry still open, and an unknown id is simply a miss.

use super::meta::{self, version_code, version_of, MetaFacts, HIT_FIELDS};
use super::{EntryInfo, Names};
use crate::rules::StoredRule;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora::cache::CacheMeta;
use pingora::http::ResponseHeader;
use pingora::protocols::http::v1::common::content_length_parse_all;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"AIS4";
/// The previous payload (pingora's serialized meta): still read, so that the entries an older
/// instance of the fleet wrote stay hits through an upgrade.
const MAGIC_V3: &[u8; 4] = b"AIS3";
const PLAIN: u8 = 0;
const SEALED: u8 = 1;
const FLAG_ENCRYPT: u8 = 1;
/// The answer's token count follows the flags (records written before it was kept have none).
const FLAG_TOKENS: u8 = 2;
/// The high bit of a value's length: the value is sensitive (never logged, not HPACK-indexed).
const SENSITIVE: u32 = 1 << 31;
/// More fields than a header map can hold would make it panic; no answer pingora parsed comes
/// near this.
const MAX_FIELDS: usize = 8192;

/// A decoded entry.
#[derive(Debug, Clone)]
pub struct Record {
    pub meta: MetaFacts,
    pub header: ResponseHeader,
    pub info: EntryInfo,
    pub body: Bytes,
}

impl Record {
    /// The meta pingora sees, with the entry's info and body beside it.
    pub fn into_meta(self) -> (CacheMeta, EntryInfo, Bytes) {
        (self.meta.to_meta(self.header), self.info, self.body)
    }
}

/// Equal when they say the same: facts, status, version, reason phrase, fields in order (with
/// their sensitivity), entry info and body.
impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        let fields = |h: &ResponseHeader| {
            h.headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
                .collect::<Vec<_>>()
        };
        self.meta == other.meta
            && self.header.status == other.header.status
            && self.header.version == other.header.version
            && self.header.get_reason_phrase() == other.header.get_reason_phrase()
            && fields(&self.header) == fields(&other.header)
            && self.info == other.info
            && self.body == other.body
    }
}

impl Eq for Record {}

/// Appends `h` in the record's header form.
fn put_header(out: &mut Vec<u8>, h: &ResponseHeader) {
    out.extend_from_slice(&h.status.as_u16().to_be_bytes());
    out.push(version_code(h.version));
    let reason = h
        .get_reason_phrase()
        .filter(|r| u16::try_from(r.len()).is_ok())
        .unwrap_or("");
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    // Pingora's parser bounds a header block far below these limits.
    let fields = h.headers.len().min(MAX_FIELDS);
    out.extend_from_slice(&(fields as u16).to_be_bytes());
    for (name, value) in h.headers.iter().take(fields) {
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        let len = value.len() as u32 & !SENSITIVE;
        let len = if value.is_sensitive() {
            len | SENSITIVE
        } else {
            len
        };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
}

/// Reads what [`put_header`] wrote. Values are slices of `b` (no copy), each checked as a
/// `HeaderValue`; names are parsed as `HeaderName`s.
fn take_header(b: &mut Bytes) -> Result<ResponseHeader, DecodeError> {
    const M: DecodeError = DecodeError::Malformed;
    if b.remaining() < 5 {
        return Err(M);
    }
    let status = StatusCode::from_u16(b.get_u16()).map_err(|_| M)?;
    let version = version_of(b.get_u8()).ok_or(M)?;
    let reason_len = b.get_u16() as usize;
    if b.remaining() < reason_len + 2 {
        return Err(M);
    }
    let reason = b.split_to(reason_len);
    let fields = b.get_u16() as usize;
    // Each field takes at least 6 bytes: a count beyond what is left is not a record.
    if fields > MAX_FIELDS || fields * 6 > b.remaining() {
        return Err(M);
    }
    let mut headers = HeaderMap::with_capacity(fields + HIT_FIELDS);
    for _ in 0..fields {
        if b.remaining() < 2 {
            return Err(M);
        }
        let n = b.get_u16() as usize;
        if b.remaining() < n + 4 {
            return Err(M);
        }
        let name = HeaderName::from_bytes(&b[..n]).map_err(|_| M)?;
        b.advance(n);
        let len = b.get_u32();
        let n = (len & !SENSITIVE) as usize;
        if b.remaining() < n {
            return Err(M);
        }
        let mut value = HeaderValue::from_maybe_shared(b.split_to(n)).map_err(|_| M)?;
        value.set_sensitive(len & SENSITIVE != 0);
        headers.append(name, value);
    }
    let mut h = meta::response_header(status, version, headers);
    if !reason.is_empty() {
        let reason = std::str::from_utf8(&reason).map_err(|_| M)?;
        h.set_reason_phrase(Some(reason)).map_err(|_| M)?;
    }
    Ok(h)
}

/// Whether a header read back from a record (of either format) may be served as it is. Its
/// names and values are checked as they are made; what else a forged record could do to every
/// client it is served to is refused here:
/// - a reason phrase with a control character: pingora writes it as it is given, so a line
///   break would split the answer (RFC 9112 §4: tab, space, visible characters and obs-text);
/// - an interim status (1xx), which Aisle never stores: the client would wait for the final
///   answer (or, a 101, switch its connection's protocol);
/// - framing a client could read otherwise than pingora writes it: a `Transfer-Encoding`
///   (hop-by-hop, stripped before storing: `policy::strip_hop_by_hop`), or `Content-Length`
///   values that disagree, which pingora's reader refuses in an upstream's answer; the body
///   would be written close-delimited while a client took one of the lengths, and read the
///   rest as the answer to its next request.
fn servable(h: &ResponseHeader) -> Result<(), DecodeError> {
    let reason = h.get_reason_phrase().unwrap_or("");
    let headers = &h.headers;
    if h.status.is_informational()
        || !reason
            .bytes()
            .all(|c| c == b'\t' || (c >= b' ' && c != 0x7f))
        || headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return Err(DecodeError::Malformed);
    }
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => Ok(()),
        // The common case, without pingora's general parse (a list, spaces, an overflow):
        // one value of at most 19 digits, which always fits its u64.
        (Some(v), None)
            if (1..=19).contains(&v.len()) && v.as_bytes().iter().all(u8::is_ascii_digit) =>
        {
            Ok(())
        }
        _ => match content_length_parse_all(headers) {
            Some(_) => Ok(()),
            None => Err(DecodeError::Malformed),
        },
    }
}

/// Why a stored record could not be used (always treated as a miss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Truncated or not a record.
    Malformed,
    /// Sealed with a key this instance does not have.
    UnknownKey,
    /// Authentication failed: tampered, or sealed for another storage key.
    Tampered,
    /// Sealed, but no keys are configured.
    NoKeys,
}

/// The configured encryption keys: the current one seals, all of them open.
pub struct Keys {
    current: (u32, Aes256Gcm),
    previous: Vec<(u32, Aes256Gcm)>,
}

fn key_id(key: &[u8; 32]) -> u32 {
    let digest = Sha256::digest(key);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl Keys {
    pub fn new(current: [u8; 32], previous: &[[u8; 32]]) -> Self {
        let make = |k: &[u8; 32]| (key_id(k), Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k)));
        Keys {
            current: make(&current),
            previous: previous.iter().map(make).collect(),
        }
    }

    fn find(&self, id: u32) -> Option<&Aes256Gcm> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|(i, _)| *i == id)
            .map(|(_, c)| c)
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Record {
    fn payload(&self) -> Vec<u8> {
        let tags_len: usize = self.info.tags().map(|t| t.len() + 4).sum();
        let header_len: usize = self
            .header
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(
            128 + header_len + self.info.host_path().len() + tags_len + self.body.len(),
        );
        out.extend_from_slice(MAGIC);
        self.meta.encode(&mut out);
        put_header(&mut out, &self.header);
        out.extend_from_slice(&self.info.uri.to_be_bytes());
        put(&mut out, self.info.host_path().as_bytes());
        put(&mut out, self.info.rule_name().as_bytes());
        out.extend_from_slice(&(self.info.tags().len() as u32).to_be_bytes());
        for t in self.info.tags() {
            put(&mut out, t.as_bytes());
        }
        let mut flags = if self.info.encrypt() { FLAG_ENCRYPT } else { 0 };
        if self.info.tokens > 0 {
            flags |= FLAG_TOKENS;
        }
        out.push(flags);
        if self.info.tokens > 0 {
            out.extend_from_slice(&self.info.tokens.to_be_bytes());
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Encodes the record; sealed when the entry asks for encryption (`keys` must then be set).
    pub fn encode(&self, storage_key: &[u8], keys: Option<&Keys>) -> Vec<u8> {
        let payload = self.payload();
        match (self.info.encrypt(), keys) {
            (true, Some(keys)) => {
                let (id, cipher) = &keys.current;
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let sealed = cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: &payload,
                            aad: storage_key,
                        },
                    )
                    .expect("AES-GCM encryption of an in-memory buffer cannot fail");
                let mut out = Vec::with_capacity(1 + 4 + 12 + sealed.len());
                out.push(SEALED);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&sealed);
                out
            }
            _ => {
                let mut out = Vec::with_capacity(1 + payload.len());
                out.push(PLAIN);
                out.extend_from_slice(&payload);
                out
            }
        }
    }

    /// Whether `raw` is sealed: only a sealed record needs its storage key to open.
    pub fn is_sealed(raw: &[u8]) -> bool {
        raw.first() == Some(&SEALED)
    }

    /// Decodes a record read from `storage_key`.
    pub fn decode(
        raw: Bytes,
        storage_key: &[u8],
        keys: Option<&Keys>,
    ) -> Result<Record, DecodeError> {
        let (&kind, rest) = raw.split_first().ok_or(DecodeError::Malformed)?;
        match kind {
            PLAIN => Self::parse(raw.slice(1..)),
            SEALED => {
                let keys = keys.ok_or(DecodeError::NoKeys)?;
                if rest.len() < 4 + 12 + 16 {
                    return Err(DecodeError::Malformed);
                }
                let id = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let cipher = keys.find(id).ok_or(DecodeError::UnknownKey)?;
                let nonce = Nonce::from_slice(&rest[4..16]);
                let plain = cipher
                    .decrypt(
                        nonce,
                        Payload {
                            msg: &rest[16..],
                            aad: storage_key,
                        },
                    )
                    .map_err(|_| DecodeError::Tampered)?;
                Self::parse(Bytes::from(plain))
            }
            _ => Err(DecodeError::Malformed),
        }
    }

    fn parse(mut b: Bytes) -> Result<Record, DecodeError> {
        fn take(b: &mut Bytes) -> Result<Bytes, DecodeError> {
            if b.remaining() < 4 {
                return Err(DecodeError::Malformed);
            }
            let n = b.get_u32() as usize;
            if b.remaining() < n {
                return Err(DecodeError::Malformed);
            }
            Ok(b.split_to(n))
        }
        if b.remaining() < 4 {
            return Err(DecodeError::Malformed);
        }
        let (meta, header) = if &b[..4] == MAGIC {
            b.advance(4);
            let meta = MetaFacts::decode(&mut b).ok_or(DecodeError::Malformed)?;
            (meta, take_header(&mut b)?)
        } else if &b[..4] == MAGIC_V3 {
            b.advance(4);
            let internal = take(&mut b)?;
            let header = take(&mut b)?;
            let meta =
                CacheMeta::deserialize(&internal, &header).map_err(|_| DecodeError::Malformed)?;
            (MetaFacts::of(&meta), meta.response_header().clone())
        } else {
            return Err(DecodeError::Malformed);
        };
        servable(&header)?;
        if b.remaining() < 12 {
            return Err(DecodeError::Malformed);
        }
        let uri = b.get_u64();
        // Slices of the record, checked as text where they are read: no copy of each
        // (`Names` makes the entry's one copy).
        let host_path = take(&mut b)?;
        let rule = take(&mut b)?;
        if b.remaining() < 4 {
            return Err(DecodeError::Malformed);
        }
        let ntags = b.get_u32() as usize;
        // A tag takes at least its 4-byte length: a count beyond what is left is not a record.
        if ntags > b.remaining() / 4 {
            return Err(DecodeError::Malformed);
        }
        let tags = (0..ntags)
            .map(|_| take(&mut b))
            .collect::<Result<Vec<Bytes>, _>>()?;
        fn text(x: &Bytes) -> Result<&str, DecodeError> {
            std::str::from_utf8(x).map_err(|_| DecodeError::Malformed)
        }
        let (host_path, rule) = (text(&host_path)?, text(&rule)?);
        let tags = tags.iter().map(text).collect::<Result<Vec<&str>, _>>()?;
        if b.remaining() < 1 {
            return Err(DecodeError::Malformed);
        }
        let flags = b.get_u8();
        let tokens = if flags & FLAG_TOKENS != 0 {
            if b.remaining() < 8 {
                return Err(DecodeError::Malformed);
            }
            b.get_u64()
        } else {
            0
        };
        Ok(Record {
            meta,
            header,
            info: EntryInfo {
                uri,
                names: Names::new(host_path, &tags),
                rule: StoredRule::decoded(rule, flags & FLAG_ENCRYPT != 0),
                tokens,
            },
            body: b,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ResponseHeader {
        let mut h = ResponseHeader::build(203, None).unwrap();
        h.append_header("content-type", "application/json").unwrap();
        h.append_header("x-vendor-trace", "abc").unwrap();
        h.append_header("vary", "accept").unwrap();
        h.append_header("vary", "accept-language").unwrap();
        let mut secret = HeaderValue::from_static("s=1");
        secret.set_sensitive(true);
        h.append_header("set-cookie", secret).unwrap();
        h.set_reason_phrase(Some("Fine Indeed")).unwrap();
        h
    }

    fn facts() -> MetaFacts {
        let now = std::time::SystemTime::now();
        let m = CacheMeta::new(
            now + std::time::Duration::from_secs(60),
            now,
            5,
            600,
            ResponseHeader::build(200, None).unwrap(),
        );
        MetaFacts::of(&m)
    }

    fn record(encrypt: bool) -> Record {
        Record {
            meta: facts(),
            header: header(),
            info: EntryInfo {
                uri: 77,
                names: Names::new("h/p", &["a", "wedding:42"]),
                rule: StoredRule::decoded("r", encrypt),
                tokens: 0,
            },
            body: Bytes::from_static(b"{\"secret\":\"guest list\"}"),
        }
    }

    #[test]
    fn token_counts_round_trip_and_old_records_have_none() {
        let mut r = record(false);
        r.info.tokens = 1234;
        let raw = r.encode(b"k", None);
        assert_eq!(Record::decode(Bytes::from(raw), b"k", None).unwrap(), r);
        // A record written without the tokens flag (as before it existed) decodes as 0 tokens.
        let old = record(false).encode(b"k", None);
        assert_eq!(
            Record::decode(Bytes::from(old), b"k", None)
                .unwrap()
                .info
                .tokens,
            0
        );
    }

    #[test]
    fn plain_round_trip() {
        let r = record(false);
        let raw = r.encode(b"k", None);
        assert!(raw.windows(10).any(|w| w == b"guest list"));
        assert_eq!(Record::decode(Bytes::from(raw), b"k", None).unwrap(), r);
    }

    #[test]
    fn sealed_round_trip_and_rotation() {
        let old = Keys::new([7; 32], &[]);
        let r = record(true);
        let raw = r.encode(b"k", Some(&old));
        assert!(
            !raw.windows(10).any(|w| w == b"guest list"),
            "ciphertext hides the body"
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&old)).unwrap(),
            r
        );
        let rotated = Keys::new([9; 32], &[[7; 32]]);
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&rotated)).unwrap(),
            r
        );
        let wrong = Keys::new([9; 32], &[]);
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&wrong)),
            Err(DecodeError::UnknownKey)
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", None),
            Err(DecodeError::NoKeys)
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"other", Some(&old)),
            Err(DecodeError::Tampered),
            "a record moved to another key does not open"
        );
        let mut tampered = raw;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            Record::decode(Bytes::from(tampered), b"k", Some(&old)),
            Err(DecodeError::Tampered)
        );
    }

    /// The header comes back field for field: order, repeats, sensitivity, reason phrase, and
    /// the variance with the facts.
    #[test]
    fn the_header_and_facts_round_trip_uncompressed() {
        let mut r = record(false);
        r.meta.variance = Some([3; 16]);
        let raw = r.encode(b"k", None);
        assert!(
            raw.windows(15).any(|w| w == b"accept-language"),
            "the header is written as it is"
        );
        let back = Record::decode(Bytes::from(raw), b"k", None).unwrap();
        assert_eq!(back, r);
        let values: Vec<_> = back.header.headers.get_all("vary").iter().collect();
        assert_eq!(values, ["accept", "accept-language"]);
        assert!(back.header.headers["set-cookie"].is_sensitive());
        assert!(!back.header.headers["content-type"].is_sensitive());
        assert_eq!(back.header.get_reason_phrase(), Some("Fine Indeed"));
        let (meta, _, _) = back.into_meta();
        assert_eq!(meta.variance(), Some([3; 16]));
        assert_eq!(meta.response_header().status.as_u16(), 203);
    }

    /// A record an instance of the previous version wrote (pingora's serialized meta, `AIS3`)
    /// still reads, to the same facts and header: a fleet being upgraded keeps its hits.
    #[test]
    fn records_written_before_ais4_still_read() {
        let now = std::time::SystemTime::now();
        let v3 = |h: ResponseHeader| {
            let mut meta = CacheMeta::new(now + std::time::Duration::from_secs(90), now, 7, 70, h);
            meta.set_epoch_override(now - std::time::Duration::from_secs(4));
            let (internal, h) = meta.serialize().unwrap();
            let mut raw = vec![PLAIN];
            raw.extend_from_slice(MAGIC_V3);
            put(&mut raw, &internal);
            put(&mut raw, &h);
            let r = record(false);
            // The tail is the same in both versions.
            let tail = r.payload();
            let facts_and_header = 4 + {
                let mut out = Vec::new();
                r.meta.encode(&mut out);
                put_header(&mut out, &r.header);
                out.len()
            };
            raw.extend_from_slice(&tail[facts_and_header..]);
            (
                Record::decode(Bytes::from(raw), b"k", None),
                MetaFacts::of(&meta),
            )
        };
        let (back, facts) = v3(header());
        let back = back.unwrap();
        let r = record(false);
        assert_eq!(back.meta, facts);
        assert_eq!(back.header.status.as_u16(), 203);
        assert_eq!(back.header.headers.get_all("vary").iter().count(), 2);
        assert_eq!(back.info, r.info);
        assert_eq!(back.body, r.body);
        // An old record is held to the same rules as a new one (`servable`).
        let mut interim = header();
        interim.set_status(100).unwrap();
        let mut chunked = header();
        chunked
            .append_header("transfer-encoding", "chunked")
            .unwrap();
        let mut lengths = header();
        lengths.append_header("content-length", "5").unwrap();
        lengths.append_header("content-length", "50").unwrap();
        for forged in [interim, chunked, lengths] {
            assert_eq!(v3(forged).0, Err(DecodeError::Malformed));
        }
    }

    /// What a shared Redis holds is not trusted: a value or reason phrase with a line break
    /// (response splitting), a bad name, a field count a header map cannot hold, an unknown or
    /// interim status, an unknown version, ambiguous framing, and every cut of a good record
    /// are refused, never served or panicked on.
    #[test]
    fn a_bad_header_in_a_record_is_refused() {
        let good = record(false).encode(b"k", None);
        for cut in 0..good.len() - record(false).body.len() {
            assert!(Record::decode(Bytes::copy_from_slice(&good[..cut]), b"k", None).is_err());
        }
        let forged = |h: &dyn Fn(&mut Vec<u8>)| {
            let mut raw = vec![PLAIN];
            raw.extend_from_slice(MAGIC);
            facts().encode(&mut raw);
            h(&mut raw);
            raw.extend_from_slice(&[0; 8 + 4 + 4 + 4 + 1]);
            Record::decode(Bytes::from(raw), b"k", None)
        };
        let field = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        };
        let head = |out: &mut Vec<u8>, status: u16, version: u8, fields: u16| {
            out.extend_from_slice(&status.to_be_bytes());
            out.push(version);
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&fields.to_be_bytes());
        };
        assert!(forged(&|o| {
            head(o, 200, 2, 1);
            field(o, b"x-ok", b"fine");
        })
        .is_ok());
        // Identical `Content-Length` values, as pingora's reader accepts from an upstream.
        assert!(forged(&|o| {
            head(o, 200, 2, 2);
            field(o, b"content-length", b"0");
            field(o, b"content-length", b"0");
        })
        .is_ok());
        for bad in [
            &(|o: &mut Vec<u8>| {
                head(o, 200, 2, 1);
                field(o, b"x-a", b"1\r\nset-cookie: evil=1");
            }) as &dyn Fn(&mut Vec<u8>),
            &|o| {
                head(o, 200, 2, 1);
                field(o, b"bad name", b"1");
            },
            &|o| {
                head(o, 200, 2, u16::MAX);
                for _ in 0..11_000 {
                    field(o, b"x", b"1");
                }
            },
            &|o| head(o, 1000, 2, 0),
            &|o| {
                head(o, 200, 2, 1);
                field(o, b"transfer-encoding", b"chunked");
            },
            &|o| {
                head(o, 200, 2, 2);
                field(o, b"content-length", b"5");
                field(o, b"content-length", b"500");
            },
            &|o| {
                head(o, 200, 2, 1);
                field(o, b"content-length", b"5, 6");
            },
            &|o| {
                head(o, 200, 2, 1);
                field(o, b"content-length", b"-1");
            },
            &|o| head(o, 100, 2, 0),
            &|o| head(o, 101, 2, 0),
            &|o| head(o, 200, 9, 0),
            // A reason phrase with a line break: pingora writes it as given.
            &|o| {
                let reason = b"OK\r\nSet-Cookie: evil=1";
                o.extend_from_slice(&200u16.to_be_bytes());
                o.push(2);
                o.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                o.extend_from_slice(reason);
                o.extend_from_slice(&0u16.to_be_bytes());
            },
        ] {
            assert_eq!(forged(bad).unwrap_err(), DecodeError::Malformed);
        }
    }

    /// `servable`'s shortcut for one plain `Content-Length` decides as pingora's general rule
    /// does, on either side of its bounds.
    #[test]
    fn one_content_length_is_judged_as_pingora_judges_it() {
        for value in [
            "0",
            "1024",
            "0001",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999",
            " 5",
            "5 ",
            "+5",
            "-5",
            "5,5",
            "5, 6",
            "abc",
            "",
        ] {
            let mut h = ResponseHeader::build(200, None).unwrap();
            h.append_header("content-length", value).unwrap();
            assert_eq!(
                servable(&h).is_ok(),
                content_length_parse_all(&h.headers).is_some(),
                "Content-Length: {value:?}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for raw in [
            &b""[..],
            b"\x00",
            b"\x00AIS3\x00\x00",
            b"\x00AIS4\x00\x00",
            b"\x05xyz",
            b"\x00NOPE",
        ] {
            assert_eq!(
                Record::decode(Bytes::copy_from_slice(raw), b"k", None),
                Err(DecodeError::Malformed)
            );
        }
    }
}
