//! What a stored entry keeps of pingora's `CacheMeta` besides its header, and how the meta
//! (and the header, [`response_header`]) is rebuilt from it: one form for both tiers.
//!
//! The memory tier keeps these facts in every entry, and the Redis record (`record.rs`, `AIS4`)
//! writes the same facts in a fixed 33- or 49-byte form. So an entry means the same thing
//! whichever tier it is read from, and the rule that turns a meta into facts (the time the
//! origin last vouched for the content, the time its age starts) lives here only. Before
//! `AIS4` the Redis record held pingora's own serialization, whose header is zstd-compressed:
//! decompressing and re-parsing it was 13% of a Redis hit (issue 16, README "Performance").

use bytes::{Buf, Bytes};
use http::{HeaderMap, StatusCode, Version};
use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;
use pingora::http::ResponseHeader;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time in 8 bytes rather than `SystemTime`'s 16: nanoseconds from the Unix epoch
/// (exact for the years 1678 to 2262; later times are kept as 2262, still "far future").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(i64);

impl Stamp {
    pub fn of(t: SystemTime) -> Stamp {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Stamp(nanos(d)),
            Err(before) => Stamp(-nanos(before.duration())),
        }
    }

    /// The stamp `n` nanoseconds from the Unix epoch.
    pub const fn from_nanos(n: i64) -> Stamp {
        Stamp(n)
    }

    /// Nanoseconds from the Unix epoch.
    pub const fn nanos(self) -> i64 {
        self.0
    }

    pub fn time(self) -> SystemTime {
        let d = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        }
    }
}

/// The facts needed to rebuild a `CacheMeta` without deserialising one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaFacts {
    pub fresh_until: Stamp,
    /// When the origin last vouched for this content: its fetch, or a later revalidation.
    /// Purges are judged against it (a refetch after a soft purge is newer than the purge).
    pub confirmed: Stamp,
    /// When the entry's age starts (its store or last revalidation, minus upstream `Age`).
    pub epoch: Stamp,
    pub swr: u32,
    pub sie: u32,
    pub variance: Option<HashBinary>,
}

/// Fields a hit adds to a stored header before it is sent (`Age`, `Accept-Ranges`,
/// `Cache-Status`, `Connection`): room is kept for them when a stored header is rebuilt, so
/// adding them does not grow the map again.
pub const HIT_FIELDS: usize = 4;

/// A stored response header rebuilt from its parts, as both tiers rebuild one: no header-name
/// case map (the names are sent as stored). `headers` should have room for [`HIT_FIELDS`] more.
pub fn response_header(status: StatusCode, version: Version, headers: HeaderMap) -> ResponseHeader {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    ResponseHeader::from(parts)
}

/// The times and shape a hit is judged by (`proxy::fresh_hit::judge`), from either tier.
pub struct StoredTimes {
    pub fresh_until: SystemTime,
    /// When the origin last vouched for the content (what purges are judged against).
    pub confirmed: SystemTime,
    /// When the entry's age starts.
    pub epoch: SystemTime,
    /// The entry has variants (`Vary`): its lookup needs the request's variance.
    pub varies: bool,
}

/// A stored header's HTTP version in one byte, as both tiers write it.
pub fn version_code(v: Version) -> u8 {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

/// The version [`version_code`] wrote; `None` for a byte it never writes.
pub fn version_of(code: u8) -> Option<Version> {
    Some(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    })
}

/// Bytes of [`MetaFacts::encode`]'s form without and with a variance.
const PLAIN_LEN: usize = 3 * 8 + 2 * 4 + 1;
const VARIANCE_LEN: usize = 16;

impl MetaFacts {
    pub fn of(meta: &CacheMeta) -> Self {
        MetaFacts {
            fresh_until: Stamp::of(meta.fresh_until()),
            confirmed: Stamp::of(meta.created().max(meta.updated())),
            // The epoch override carries the upstream `Age` at store time; once the entry is
            // revalidated (`updated` moves past `created`) its age restarts from then.
            epoch: Stamp::of(if meta.updated() > meta.created() {
                meta.updated()
            } else {
                meta.epoch()
            }),
            swr: meta.stale_while_revalidate_sec(),
            sie: meta.stale_if_error_sec(),
            variance: meta.variance(),
        }
    }

    /// The times a hit is judged by; `header_varies`: the stored header has a `Vary` field.
    pub fn times(&self, header_varies: bool) -> StoredTimes {
        StoredTimes {
            fresh_until: self.fresh_until.time(),
            confirmed: self.confirmed.time(),
            epoch: self.epoch.time(),
            varies: self.variance.is_some() || header_varies,
        }
    }

    /// The meta pingora sees, around `header`.
    pub fn to_meta(&self, header: ResponseHeader) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until.time(),
            self.confirmed.time(),
            self.swr,
            self.sie,
            header,
        );
        if self.epoch != self.confirmed {
            meta.set_epoch_override(self.epoch.time());
        }
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        meta
    }

    /// Appends the facts: the three times, the two stale windows, then a variance flag and the
    /// variance when there is one (all big-endian).
    pub fn encode(&self, out: &mut Vec<u8>) {
        for stamp in [self.fresh_until, self.confirmed, self.epoch] {
            out.extend_from_slice(&stamp.0.to_be_bytes());
        }
        out.extend_from_slice(&self.swr.to_be_bytes());
        out.extend_from_slice(&self.sie.to_be_bytes());
        match &self.variance {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }

    /// Reads what [`MetaFacts::encode`] wrote; `None` if it is cut short or its flag is not
    /// 0 or 1.
    pub fn decode(b: &mut Bytes) -> Option<Self> {
        if b.remaining() < PLAIN_LEN {
            return None;
        }
        let mut stamp = || Stamp(b.get_i64());
        let (fresh_until, confirmed, epoch) = (stamp(), stamp(), stamp());
        let (swr, sie) = (b.get_u32(), b.get_u32());
        let variance = match b.get_u8() {
            0 => None,
            1 if b.remaining() >= VARIANCE_LEN => {
                let mut v = [0u8; VARIANCE_LEN];
                b.copy_to_slice(&mut v);
                Some(v)
            }
            _ => return None,
        };
        Some(MetaFacts {
            fresh_until,
            confirmed,
            epoch,
            swr,
            sie,
            variance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_keep_times_to_the_nanosecond() {
        let now = SystemTime::now();
        assert_eq!(Stamp::of(now).time(), now);
        let before = UNIX_EPOCH - Duration::new(86_400, 123);
        assert_eq!(Stamp::of(before).time(), before);
        // Past what 64 bits of nanoseconds hold: kept as a time still centuries away.
        let far = UNIX_EPOCH + Duration::from_secs(400 * 365 * 86_400);
        assert!(Stamp::of(far).time() > now + Duration::from_secs(200 * 365 * 86_400));
    }

    fn meta(variance: Option<HashBinary>) -> CacheMeta {
        let created = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = ResponseHeader::build(200, None).unwrap();
        let mut m = CacheMeta::new(created + Duration::from_secs(60), created, 30, 600, h);
        // An upstream `Age` of 7 s at store time.
        m.set_epoch_override(created - Duration::from_secs(7));
        if let Some(v) = variance {
            m.set_variance(v);
        }
        m
    }

    /// The facts round-trip through their byte form, with and without a variance, and the
    /// rebuilt meta carries the same freshness, age start, windows and variance.
    #[test]
    fn facts_round_trip_and_rebuild_the_meta() {
        for m in [meta(None), meta(Some([9; 16]))] {
            let facts = MetaFacts::of(&m);
            let mut out = Vec::new();
            facts.encode(&mut out);
            assert_eq!(
                out.len(),
                PLAIN_LEN + facts.variance.map_or(0, |_| VARIANCE_LEN)
            );
            let mut b = Bytes::from(out);
            assert_eq!(MetaFacts::decode(&mut b), Some(facts));
            assert!(b.is_empty(), "decode reads exactly what encode wrote");
            let back = facts.to_meta(ResponseHeader::build(200, None).unwrap());
            assert_eq!(back.fresh_until(), m.fresh_until());
            assert_eq!(back.epoch(), m.epoch());
            assert_eq!(back.variance(), m.variance());
            assert_eq!(back.stale_while_revalidate_sec(), 30);
            assert_eq!(back.stale_if_error_sec(), 600);
            assert_eq!(MetaFacts::of(&back), facts, "rebuilding is stable");
        }
    }

    #[test]
    fn short_or_unknown_forms_are_refused() {
        let mut out = Vec::new();
        MetaFacts::of(&meta(Some([1; 16]))).encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(
                MetaFacts::decode(&mut Bytes::copy_from_slice(&out[..cut])),
                None,
                "{cut} bytes"
            );
        }
        let mut bad = out.clone();
        bad[PLAIN_LEN - 1] = 2;
        assert_eq!(MetaFacts::decode(&mut Bytes::from(bad)), None);
    }
}
