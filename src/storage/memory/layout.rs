//! How a memory-tier entry is laid out as one [`Segments`](super::segments::Segments) record,
//! and read back without copying.
//!
//! An entry used to be five allocations (the `Entry`, its facts, names, header buffer and that
//! buffer's count); as a record it is one run of bytes after the store's head (id, URI id):
//!
//! ```text
//! fixed (44 B for most entries, at most 79; little-endian)
//!   fresh_until i64 | confirmed i64                   stamps, ns from the Unix epoch
//!   swr u32 | sie u32 | flags u8
//!   [epoch i64]            flag EPOCH: when it is not `confirmed` (an upstream `Age`)
//!   [variance 16 B]        flag VARIANCE
//!   [tokens u64]           flag TOKENS: when not 0
//!   [reason length u16]    flag REASON: a reason phrase other than the canonical one
//!   [extra length u32]     flag EXTRA
//!   status u16 | version u8 | name list u16 | tags u32 | names length u32
//!   header length u32 | rule u16
//! header   the value ends, values and reason phrase, as `StoredHeader` keeps them
//! names    host/path and tags, as `Names::as_bytes` lays them out
//! extra    the field names when they are not a shared list, the rule when it is not numbered
//! body     the rest
//! ```
//!
//! What many entries share is named by number rather than kept: a header's list of field
//! names and the rule's stored facts (`compact.rs`'s `Numbered` tables, [`RULES`] here;
//! beyond the bound a rule is written out in `extra`). A hit reads the fixed part, slices the
//! header buffer and the body out of the record (reference counts on the segment) and clones
//! the shared name list: no allocation. Only pingora's own lookup path builds the entry's facts
//! as an `Arc<EntryInfo>` for its meta.

use super::compact::{shared_list, Numbered, StoredHeader, OWN_NAMES};
use super::segments::Record;
use super::StoredMeta;
use crate::rules::StoredRule;
use crate::storage::meta::{version_code, version_of, MetaFacts, Stamp};
use crate::storage::{EntryInfo, Names, NamesRef};
use bytes::Bytes;
use hashbrown::Equivalent;
use http::{HeaderName, StatusCode};
use once_cell::sync::Lazy;
use std::ops::Range;
use std::sync::Arc;

/// Bytes of a record's fixed part at most (see the module comment).
const MAX_FIXED: usize = 79;
/// Bytes of the fixed part of an entry with none of the optional fields: the least an entry
/// takes besides its header, names and body.
#[cfg(test)]
pub(super) const FIXED: usize = 44;

const VARIANCE: u8 = 1;
const EPOCH: u8 = 2;
const TOKENS: u8 = 4;
const REASON: u8 = 8;
const EXTRA: u8 = 16;
/// At most this many rules are numbered (a reload compiles its rules anew, and records read
/// from Redis name rules by name: the table is bounded whatever happens).
const MAX_RULES: usize = 4096;
/// The rule number of a rule written out in the record.
const OWN_RULE: u16 = u16::MAX;

/// What an entry keeps of a rule (name, `encrypt`, token pointer): what the table numbers by.
type RuleKey = (Box<str>, bool, Option<Box<str>>);

/// A [`RuleKey`] borrowed from a `StoredRule`, to look one up without copying its strings on
/// every fill. It hashes as the owned key does (a `Box<str>` and a `&str` hash as their `str`).
#[derive(Hash)]
struct RuleRef<'a>(&'a str, bool, Option<&'a str>);

impl Equivalent<RuleKey> for RuleRef<'_> {
    fn equivalent(&self, key: &RuleKey) -> bool {
        self.0 == &*key.0 && self.1 == key.1 && self.2 == key.2.as_deref()
    }
}

/// The rules' stored facts by number.
static RULES: Lazy<Numbered<RuleKey, Arc<StoredRule>>> = Lazy::new(|| Numbered::new(MAX_RULES));

/// The number of `rule`'s stored facts, if the table has (or can take) them.
fn rule_number(rule: &StoredRule) -> Option<u16> {
    let key = RuleRef(&rule.name, rule.encrypt, rule.tokens_at.as_deref());
    let numbered = RULES.number(&key, || {
        let shared = StoredRule {
            name: rule.name.clone(),
            encrypt: rule.encrypt,
            tokens_at: rule.tokens_at.clone(),
            shared: true,
        };
        (
            (rule.name.clone(), rule.encrypt, rule.tokens_at.clone()),
            Arc::new(shared),
        )
    });
    numbered.map(|(n, _)| n)
}

/// An entry as a record's parts: the fixed part, the header buffer, the names buffer and
/// `extra` ([`Encoded::parts`]); the body follows them.
pub(super) struct Encoded<'a> {
    fixed: [u8; MAX_FIXED],
    fixed_len: usize,
    header: &'a [u8],
    names: &'a [u8],
    extra: Vec<u8>,
}

impl<'a> Encoded<'a> {
    pub(super) fn new(meta: &'a StoredMeta, info: &'a EntryInfo) -> Self {
        let (status, version, reason_len, list, own_names, buf) = meta.header.parts();
        let mut extra = Vec::new();
        if list == OWN_NAMES {
            put_u16(&mut extra, own_names.len());
            for n in own_names {
                put_str(&mut extra, n.as_str());
            }
        }
        let rule = rule_number(&info.rule);
        if rule.is_none() {
            put_str(&mut extra, &info.rule.name);
            extra.push(u8::from(info.rule.encrypt));
            match &info.rule.tokens_at {
                Some(t) => {
                    extra.push(1);
                    put_str(&mut extra, t);
                }
                None => extra.push(0),
            }
        }
        let facts = &meta.facts;
        let flags = [
            (facts.variance.is_some(), VARIANCE),
            (facts.epoch != facts.confirmed, EPOCH),
            (info.tokens != 0, TOKENS),
            (reason_len != 0, REASON),
            (!extra.is_empty(), EXTRA),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit);
        let mut fixed = [0u8; MAX_FIXED];
        let mut w = Writer {
            out: &mut fixed,
            at: 0,
        };
        w.put(&facts.fresh_until.nanos().to_le_bytes());
        w.put(&facts.confirmed.nanos().to_le_bytes());
        w.put(&facts.swr.to_le_bytes());
        w.put(&facts.sie.to_le_bytes());
        w.put(&[flags]);
        if flags & EPOCH != 0 {
            w.put(&facts.epoch.nanos().to_le_bytes());
        }
        if let Some(v) = &facts.variance {
            w.put(v);
        }
        if flags & TOKENS != 0 {
            w.put(&info.tokens.to_le_bytes());
        }
        if flags & REASON != 0 {
            w.put(&reason_len.to_le_bytes());
        }
        if flags & EXTRA != 0 {
            w.put(&len32(extra.len()));
        }
        w.put(&status.as_u16().to_le_bytes());
        w.put(&[version_code(version)]);
        w.put(&list.to_le_bytes());
        w.put(&info.names.tag_count().to_le_bytes());
        w.put(&len32(info.names.as_bytes().len()));
        w.put(&len32(buf.len()));
        w.put(&rule.unwrap_or(OWN_RULE).to_le_bytes());
        let fixed_len = w.at;
        Encoded {
            fixed,
            fixed_len,
            header: buf,
            names: info.names.as_bytes(),
            extra,
        }
    }

    /// The record's parts before the body (which follows them, in as many parts as it has).
    pub(super) fn parts(&self) -> [&[u8]; 4] {
        [
            &self.fixed[..self.fixed_len],
            self.header,
            self.names,
            &self.extra,
        ]
    }
}

/// Lengths in a record are 32 bits: a record is at most `max_object` (1 GiB) plus its header.
fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

fn put_u16(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_u16(out, s.len());
    out.extend_from_slice(s);
}

struct Writer<'a> {
    out: &'a mut [u8; MAX_FIXED],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

/// Reads little-endian fields in order; a record too short reads as `None`.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// A stored entry, read out of its record: its header and facts decoded, its names and body
/// still in the record.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) rec: Record,
    pub(super) meta: StoredMeta,
    names: Range<usize>,
    tags: u32,
    rule: u16,
    extra: Range<usize>,
    pub(super) tokens: u64,
    body: Range<usize>,
}

impl Entry {
    /// The entry `rec` holds; `None` if it is not one [`Encoded`] wrote.
    pub(super) fn decode(rec: Record) -> Option<Entry> {
        let payload = rec.payload();
        let mut r = Reader { b: payload };
        let stamp = |r: &mut Reader| r.u64().map(|n| Stamp::from_nanos(n as i64));
        let fresh_until = stamp(&mut r)?;
        let confirmed = stamp(&mut r)?;
        let swr = r.u32()?;
        let sie = r.u32()?;
        let flags = r.u8()?;
        let epoch = match flags & EPOCH {
            0 => confirmed,
            _ => stamp(&mut r)?,
        };
        let variance = match flags & VARIANCE {
            0 => None,
            _ => {
                let mut v = [0u8; 16];
                v.copy_from_slice(r.take(16)?);
                Some(v)
            }
        };
        let tokens = match flags & TOKENS {
            0 => 0,
            _ => r.u64()?,
        };
        let reason_len = match flags & REASON {
            0 => 0,
            _ => r.u16()?,
        };
        let extra_len = match flags & EXTRA {
            0 => 0,
            _ => r.u32()? as usize,
        };
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let version = version_of(r.u8()?)?;
        let list = r.u16()?;
        let tags = r.u32()?;
        let names_len = r.u32()? as usize;
        let header_len = r.u32()? as usize;
        let rule = r.u16()?;
        let fixed = payload.len() - r.b.len();
        let header = fixed..fixed.checked_add(header_len)?;
        let names = header.end..header.end.checked_add(names_len)?;
        let extra = names.end..names.end.checked_add(extra_len)?;
        let body = extra.end..payload.len();
        if body.start > body.end {
            return None;
        }
        let names_list = if list == OWN_NAMES {
            let mut x = Reader {
                b: &payload[extra.clone()],
            };
            let n = x.u16()? as usize;
            let mut own = Vec::with_capacity(n);
            for _ in 0..n {
                own.push(HeaderName::from_bytes(x.str()?.as_bytes()).ok()?);
            }
            own.into()
        } else {
            shared_list(list)?
        };
        let facts = MetaFacts {
            fresh_until,
            confirmed,
            epoch,
            swr,
            sie,
            variance,
        };
        let header = StoredHeader::from_parts(
            status,
            version,
            reason_len,
            list,
            names_list,
            rec.slice(header),
        );
        Some(Entry {
            rec,
            meta: StoredMeta { facts, header },
            names,
            tags,
            rule,
            extra,
            tokens,
            body,
        })
    }

    pub(super) fn uri(&self) -> u64 {
        self.rec.uri()
    }

    /// The body (a reference count on the segment, not a copy).
    pub(super) fn body(&self) -> Bytes {
        self.rec.slice(self.body.clone())
    }

    /// Bytes the entry takes in its segment.
    pub(super) fn weight(&self) -> usize {
        self.rec.len()
    }

    /// Its `host/path` and tags, read in place.
    pub(super) fn names(&self) -> NamesRef<'_> {
        NamesRef::new(&self.rec.payload()[self.names.clone()], self.tags)
    }

    /// The facts of the rule it was stored under.
    pub(super) fn rule(&self) -> Arc<StoredRule> {
        if self.rule != OWN_RULE {
            if let Some(rule) = RULES.get(self.rule) {
                return rule.clone();
            }
        }
        // Written out: the names list's part of `extra` comes first.
        let mut x = Reader {
            b: &self.rec.payload()[self.extra.clone()],
        };
        if self.meta.header.list() == OWN_NAMES {
            let n = x.u16().unwrap_or(0);
            for _ in 0..n {
                let _ = x.str();
            }
        }
        let name = x.str().unwrap_or("");
        let encrypt = x.u8() == Some(1);
        let tokens_at = match x.u8() {
            Some(1) => x.str().map(Box::from),
            _ => None,
        };
        Arc::new(StoredRule {
            name: name.into(),
            encrypt,
            tokens_at,
            shared: false,
        })
    }

    /// The entry's facts as pingora's meta carries them (built: two allocations).
    pub(super) fn info(&self) -> Arc<EntryInfo> {
        Arc::new(EntryInfo {
            uri: self.uri(),
            names: Names::from_encoded(&self.rec.payload()[self.names.clone()], self.tags),
            rule: self.rule(),
            tokens: self.tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::segments::Segments;
    use pingora::cache::CacheMeta;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn store(meta: &StoredMeta, info: &EntryInfo, body: &[u8]) -> Entry {
        let s = Segments::new(1 << 20, 64 << 10, 64);
        let enc = Encoded::new(meta, info);
        let mut parts = enc.parts().to_vec();
        parts.push(body);
        s.insert(5, info.uri, 1, &parts).unwrap();
        Entry::decode(s.get(5).unwrap()).unwrap()
    }

    /// Everything a record keeps reads back as it was written, with the names and the rule
    /// either numbered (shared) or written out (an entry's own).
    #[test]
    fn an_entry_reads_back_from_its_record() {
        let now = SystemTime::now();
        let mut h = ResponseHeader::build(203, None).unwrap();
        h.append_header("content-type", "application/json").unwrap();
        h.append_header("x-custom", "v1").unwrap();
        h.set_reason_phrase(Some("Fine")).unwrap();
        let mut m = CacheMeta::new(now + Duration::from_secs(60), now, 5, 7, h);
        m.set_variance([9; 16]);
        let meta = StoredMeta::from_meta(&m);
        let info = EntryInfo {
            uri: 42,
            names: Names::new("h/p/é", &["venue:1", "city:nyc"]),
            rule: StoredRule::of("shared-rule", true, None),
            tokens: 77,
        };
        let e = store(&meta, &info, b"the body");
        assert_eq!(&e.body()[..], b"the body");
        assert_eq!(e.uri(), 42);
        assert_eq!(e.names().host_path(), "h/p/é");
        assert_eq!(
            e.names().tags().collect::<Vec<_>>(),
            ["venue:1", "city:nyc"]
        );
        assert_eq!(e.tokens, 77);
        assert_eq!(e.meta.facts, meta.facts);
        let back = e.meta.header.to_response_header();
        assert_eq!(back.status.as_u16(), 203);
        assert_eq!(back.get_reason_phrase(), Some("Fine"));
        assert_eq!(back.headers["x-custom"], "v1");
        let rule = e.rule();
        assert_eq!((&*rule.name, rule.encrypt), ("shared-rule", true));
        assert_eq!(
            *e.info(),
            EntryInfo {
                rule: rule.clone(),
                ..info.clone()
            }
        );

        // A list of names too large to share and a rule's own copy are written out.
        let mut big = ResponseHeader::build(200, None).unwrap();
        for i in 0..40 {
            big.append_header(format!("x-custom-field-with-a-long-name-{i:02}"), "v")
                .unwrap();
        }
        let meta = StoredMeta::from_meta(&CacheMeta::new(now, now, 0, 0, big));
        assert_eq!(meta.header.list(), OWN_NAMES);
        let mut own = StoredRule::decoded(&"r".repeat(300), false);
        Arc::get_mut(&mut own).unwrap().tokens_at = Some("/usage/x".into());
        let info = EntryInfo { rule: own, ..info };
        // The rule is numbered unless the table is full; written out it reads back the same.
        let e = store(&meta, &info, b"");
        assert_eq!(e.meta.header.to_response_header().headers.len(), 40);
        let rule = e.rule();
        assert_eq!(
            (&*rule.name, rule.tokens_at.as_deref()),
            (&*"r".repeat(300), Some("/usage/x"))
        );
        assert!(e.body().is_empty());
    }

    /// A rule is numbered once by what an entry keeps of it, however many copies of it there
    /// are (a compiled rule's, one decoded from a Redis record), and looked up without a copy.
    #[test]
    fn a_rule_is_numbered_once_by_its_facts() {
        let compiled = StoredRule::of("numbered-once", true, None);
        let decoded = StoredRule::decoded("numbered-once", true);
        let n = rule_number(&compiled).unwrap();
        assert_eq!(rule_number(&decoded), Some(n));
        assert_eq!(rule_number(&compiled), Some(n));
        assert_ne!(
            rule_number(&StoredRule::decoded("numbered-once", false)),
            Some(n)
        );
        let numbered = RULES.get(n).unwrap();
        assert_eq!((&*numbered.name, numbered.encrypt), ("numbered-once", true));
    }

    /// A record whose lengths do not add up is not an entry.
    #[test]
    fn a_short_record_is_not_an_entry() {
        let now = SystemTime::now();
        let meta = StoredMeta::from_meta(&CacheMeta::new(
            now,
            now,
            0,
            0,
            ResponseHeader::build(200, None).unwrap(),
        ));
        let info = EntryInfo {
            names: Names::new("h/p", &["t"]),
            rule: StoredRule::of("r", false, None),
            ..EntryInfo::default()
        };
        let enc = Encoded::new(&meta, &info);
        assert_eq!(enc.parts()[0].len(), FIXED, "no optional field");
        let s = Segments::new(1 << 20, 64 << 10, 64);
        // The fixed part alone: its header and names are missing.
        s.insert(1, 0, 1, &[enc.parts()[0]]).unwrap();
        assert!(Entry::decode(s.get(1).unwrap()).is_none());
        s.insert(2, 0, 1, &[&enc.parts()[0][..FIXED - 1]]).unwrap();
        assert!(Entry::decode(s.get(2).unwrap()).is_none());
        // Whole, it is one.
        let mut parts = enc.parts().to_vec();
        parts.push(b"b");
        s.insert(3, 0, 1, &parts).unwrap();
        assert_eq!(&Entry::decode(s.get(3).unwrap()).unwrap().body()[..], b"b");
    }
}
