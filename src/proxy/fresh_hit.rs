//! Fresh hits, answered in `request_filter` without pingora's cache phases.
//!
//! A hit through pingora's phases rebuilds a `CacheMeta` from the entry (header clone, boxed
//! meta, extensions), boxes a hit handler, builds the `CacheKey` and its compact copy, and
//! clones the header again to send it: most of what a hit cost beyond writing the answer
//! (issue 16, profile in README "Performance"). The plainest and commonest hit is answered
//! here instead: a GET or HEAD, admitted with no request cache directive, no `Range` and no
//! conditional, whose entry is complete, fresh, without variants, not purged and not due for a
//! refresh-ahead ([`judge`], one decision for both tiers). The entry is the memory tier's; with
//! the memory tier off (`cache.memory = "0"`) it is the Redis record, read as the phases'
//! lookup reads it ([`Tiered::prefetch`](crate::storage::tiered::Tiered::prefetch)). A record
//! this path does not answer (a miss, a stale or varied entry) is handed to that lookup, so a
//! request reads Redis once and a miss keeps the fleet fill lock it took.
//!
//! Every other case returns [`Served::No`] having changed nothing but the admission it
//! computed (kept in [`Ctx`] for `request_cache_filter`), and the cache phases answer as
//! before. So the decisions stay where they are: admission, the key, purge epochs, the
//! refresh-ahead point and `Cache-Status` are the same functions the phases call; this module
//! only chooses which requests may skip them. Tests compare both paths answer for answer.

use super::cache_status::{self, Lookup, Observed, Phase};
use super::{host_of, Ctx, Gateway};
use crate::admission::{self, Admission, KeyParts, Route, Terms};
use crate::metrics::metrics;
use crate::policy;
use crate::rules::Rule;
use crate::storage::epochs::{Epochs, Verdict};
use crate::storage::memory::{MemoryStorage, Stored, StoredTimes};
use crate::storage::NamesRef;
use bytes::Bytes;
use http::header;
use pingora::cache::key::HashBinary;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;
use std::time::SystemTime;

/// Request fields that make a hit more than "send the stored answer": pingora's hit phases
/// handle them (`Range` and `If-Range`: a part; the conditionals: a 304 or 412).
const DEFERRED: [header::HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// Whether the request has a [`DEFERRED`] field: a look at each of its few names, or for a
/// request with many, a lookup of each deferred name (whichever is fewer steps).
fn deferred(headers: &http::HeaderMap) -> bool {
    if headers.keys_len() <= DEFERRED.len() {
        headers.keys().any(|name| DEFERRED.contains(name))
    } else {
        DEFERRED.iter().any(|h| headers.contains_key(h))
    }
}

/// The multipart limit of pingora's default `ProxyHttp::range_header_filter` (Aisle keeps the
/// default), passed to the same function where [`decide_head`] checks itself against it.
const PINGORA_MAX_RANGES: Option<usize> = Some(200);

/// Whether the request was answered here.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Served {
    Yes,
    No,
}

/// A fresh hit found: the entry and what its answer says of it.
pub struct Hit {
    /// The key hash it was found under.
    pub key: HashBinary,
    pub stored: Stored,
    pub times: StoredTimes,
    /// Seconds of freshness left (`Cache-Status` `ttl`).
    pub ttl: i64,
    /// The entry's age in seconds (`Age`).
    pub age: u64,
}

/// The request's terms if it is a plain request this path may answer (a GET or HEAD, admitted
/// with no cache directive, no `Authorization` left to judge, no `Range` and no conditional,
/// on a rule that does not key on the body), with whether it is a HEAD.
pub fn eligible<'a>(
    req: &RequestHeader,
    rule: &Rule,
    admission: &'a Admission,
) -> Option<(&'a Terms, bool)> {
    let head = match req.method {
        http::Method::GET => false,
        http::Method::HEAD => true,
        _ => return None,
    };
    if rule.needs_body || deferred(&req.headers) {
        return None;
    }
    let Admission::Cache(terms) = admission else {
        return None;
    };
    if terms.directives.any() || terms.directives.authorization {
        return None;
    }
    Some((terms, head))
}

/// The fresh entry an eligible request is answered from, if the memory tier holds one that is
/// complete, fresh at `now`, without variants, not purged ([`Epochs::judge`]) and, for a GET,
/// not past its rule's refresh-ahead point ([`policy::refresh_due`]: the phases start that
/// refresh). `terms` are the admission before its keyability check: an unkeyable request finds
/// nothing, the check made in the one reading of the keyed values that gives the key
/// ([`admission::keyed_hash`]), as [`serve`] makes it. Allocates nothing for values keyed as
/// they are (`benches/hit_path.rs` counts).
pub fn find(
    memory: &MemoryStorage,
    epochs: &Epochs,
    route: &Route,
    terms: &Terms,
    parts: &KeyParts<'_>,
    head: bool,
    now: SystemTime,
) -> Option<Hit> {
    let key = admission::keyed_hash(route, terms, parts).ok()?;
    find_at(memory, epochs, route, key, head, now)
}

/// [`find`] for a key hash already computed.
fn find_at(
    memory: &MemoryStorage,
    epochs: &Epochs,
    route: &Route,
    key: HashBinary,
    head: bool,
    now: SystemTime,
) -> Option<Hit> {
    let stored = memory.complete(key)?;
    let times = stored.times();
    let (ttl, age) = judge(
        epochs,
        route,
        &times,
        (stored.names(), stored.uri()),
        head,
        now,
    )?;
    Some(Hit {
        ttl,
        age,
        key,
        stored,
        times,
    })
}

/// Whether an entry of either tier with these times and facts may be answered here, and its
/// `ttl` and age if so: fresh at `now`, without variants, not purged ([`Epochs::judge`]) and,
/// for a GET, not past its rule's refresh-ahead point ([`policy::refresh_due`]: the phases
/// start that refresh).
fn judge(
    epochs: &Epochs,
    route: &Route,
    times: &StoredTimes,
    (names, uri): (NamesRef<'_>, u64),
    head: bool,
    now: SystemTime,
) -> Option<(i64, u64)> {
    if times.varies || now >= times.fresh_until {
        return None;
    }
    if !epochs.is_empty()
        && epochs.judge(times.confirmed, names.tags(), names.host_path(), uri) != Verdict::Valid
    {
        return None;
    }
    if let (Some(ahead), false) = (route.rule.refresh_ahead, head) {
        let created = policy::unix_ms(times.confirmed);
        let until = policy::unix_ms(times.fresh_until);
        if policy::refresh_due(created, until, policy::unix_ms(now), ahead) {
            return None;
        }
    }
    Some((
        super::seconds_until(times.fresh_until, now),
        // As pingora's hit header: the entry's age (RFC 9111 §4).
        now.duration_since(times.epoch)
            .unwrap_or_default()
            .as_secs(),
    ))
}

/// What a fresh hit is answered with, from either tier.
struct Answer {
    header: Head,
    body: Bytes,
    ttl: i64,
    age: u64,
    tokens: u64,
}

/// Answers the request from a fresh entry if it is the plain case (see the module comment);
/// otherwise leaves it to the cache phases, with the admission it computed kept (and, with the
/// memory tier off, the Redis record it read, for their lookup).
pub(super) async fn serve(gw: &Gateway, session: &mut Session, ctx: &mut Ctx) -> Result<Served> {
    let storage = &gw.cache.storage;
    let memory = storage.memory_tier();
    if memory.is_none() && storage.redis.is_none() {
        return Ok(Served::No);
    }
    if session.subrequest_ctx.is_some() || ctx.warm == crate::warm::Mark::Refresh {
        return Ok(Served::No);
    }
    let req = session.req_header();
    let admitted = super::admitted(ctx, req);
    // An eligible request's keyed values are read once, for the keyability check and the key
    // hash together (`admission::keyed_hash`); any other gets the check alone.
    let (admission, plain) = match eligible(req, ctx.rule(), &admitted) {
        Some((terms, head)) => {
            let parts = ctx.key_parts(req, host_of(req));
            match admission::keyed_hash(ctx.route(), terms, &parts) {
                Ok(key) => (admitted, Some((key, head))),
                Err(reason) => (Admission::Bypass(reason), None),
            }
        }
        None => (
            admitted.unless_unkeyable(ctx.rule(), &ctx.view(req, host_of(req))),
            None,
        ),
    };
    ctx.admission = Some(admission);
    let Some((key, head)) = plain else {
        return Ok(Served::No);
    };
    ctx.cache.key_hash = Some(key);
    let epochs = &gw.invalidator.epochs;
    let now = SystemTime::now();
    let answer = match memory {
        Some(memory) => {
            let Some(hit) = find_at(memory, epochs, ctx.route(), key, head, now) else {
                return Ok(Served::No);
            };
            metrics().tier_hits_memory.inc();
            Answer {
                body: hit.stored.body(),
                ttl: hit.ttl,
                age: hit.age,
                tokens: hit.stored.tokens(),
                header: Head::Stored(hit.stored),
            }
        }
        None => {
            // Redis only: the record is read here, as the lookup would read it; if it cannot
            // be answered here, the lookup gets what was read instead of asking again.
            let Some(read) = storage.prefetch(key).await else {
                return Ok(Served::No);
            };
            let Some((record, raw)) = read else {
                storage.keep_prefetched(key, None);
                return Ok(Served::No);
            };
            let times = record
                .meta
                .times(record.header.headers.contains_key(header::VARY));
            let facts = (record.info.names.view(), record.info.uri);
            let Some((ttl, age)) = judge(epochs, ctx.route(), &times, facts, head, now) else {
                storage.keep_prefetched(key, Some(raw));
                return Ok(Served::No);
            };
            metrics().tier_hits_redis.inc();
            Answer {
                tokens: record.info.tokens,
                header: Head::Map(Box::new(record.header)),
                body: record.body,
                ttl,
                age,
            }
        }
    };
    let mut answered = cache_status::decide(&Observed {
        phase: Some(Phase::Hit),
        lookup: Lookup::Fresh,
        ttl: Some(answer.ttl),
        ..Observed::default()
    });
    ctx.cache.lookup = Lookup::Fresh;
    ctx.cache.hit_tokens = answer.tokens;
    if session.downstream_session.is_http1() {
        // Over HTTP/1 the field lines are written from the entry, without a map of them
        // (a memory entry) or without inserting into the record's (a Redis record).
        let (resp, lines) = match answer.header {
            Head::Stored(stored) => {
                let status = gw.cache_status(&mut answered);
                let (resp, lines) = http1_head(session.req_header(), &stored, answer.age, &status);
                (Box::new(resp), lines)
            }
            Head::Map(mut resp) => {
                decide_head(session.req_header(), &mut resp);
                let status = gw.cache_status(&mut answered);
                let fields = resp.headers.iter().map(|(n, v)| (n, v.as_bytes()));
                // A typical record's header; a larger one grows the buffer once or twice.
                let lines = field_lines(fields, &resp, answer.age, &status, 512);
                (resp, lines)
            }
        };
        ctx.answered = Some(answered);
        session
            .downstream_session
            .write_response_header_fields(resp, &lines)
            .await?;
    } else {
        let mut resp = match answer.header {
            Head::Stored(stored) => Box::new(stored.header()),
            Head::Map(resp) => resp,
        };
        resp.insert_header(header::AGE, answer.age)?;
        decide_head(session.req_header(), &mut resp);
        gw.finish_header(&mut resp, &mut answered)?;
        ctx.answered = Some(answered);
        session.write_response_header(resp, head).await?;
    }
    if !head {
        session.write_response_body(Some(answer.body), true).await?;
    }
    Ok(Served::Yes)
}

/// A fresh hit's header: a memory entry's, or a Redis record's, already a map.
enum Head {
    Stored(Stored),
    /// Boxed as pingora's writer takes it.
    Map(Box<ResponseHeader>),
}

/// Stored fields the HTTP/1 writer decides by (pingora's reads the framing and `Date`, the
/// range filter `Accept-Ranges`): they are kept in the header it is given, as well as sent.
const DECIDING: [header::HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::DATE,
    header::ACCEPT_RANGES,
];

/// What a fresh hit's header gets before it is written, on either path: version 1.1 and what
/// the phases' default `range_header_filter` gives a request without `Range` (a fresh hit
/// never has one: [`DEFERRED`]): `Accept-Ranges: bytes` on a 200 whose `Content-Length` is a
/// number. Set here rather than by calling that filter, which looks the request's `Range` up
/// again and builds the value from a string, a copy, on every hit (870 instructions of a memory
/// hit, issue 16). Debug builds (the test suite's gateway) run pingora's filter beside it on
/// every fresh hit and stop if the two headers differ.
fn decide_head(req: &RequestHeader, resp: &mut ResponseHeader) {
    resp.set_version(http::Version::HTTP_11);
    let oracle = cfg!(debug_assertions).then(|| {
        let mut theirs = resp.clone();
        pingora::proxy::range_header_filter(req, &mut theirs, PINGORA_MAX_RANGES);
        theirs
    });
    let length = resp.headers.get(header::CONTENT_LENGTH);
    let rangeable = resp.status == http::StatusCode::OK
        && length.is_some_and(|v| {
            std::str::from_utf8(v.as_bytes()).is_ok_and(|v| v.parse::<usize>().is_ok())
        });
    if rangeable {
        let _ = resp.insert_header(
            header::ACCEPT_RANGES,
            http::HeaderValue::from_static("bytes"),
        );
    }
    if let Some(theirs) = oracle {
        assert!(
            theirs.status == resp.status && theirs.headers == resp.headers,
            "a fresh hit's head differs from pingora's range filter's: {:?} against {:?}",
            resp.headers,
            theirs.headers
        );
    }
}

/// A fresh memory hit's head for pingora's HTTP/1 writer (`write_response_header_fields`): the
/// header it decides by (the stored status line and [`DECIDING`] fields) and the field lines,
/// with `Age` and the `Cache-Status` value `status` set. `benches/hit_path.rs` counts its
/// allocations.
pub fn http1_head(
    req: &RequestHeader,
    stored: &Stored,
    age: u64,
    status: &str,
) -> (ResponseHeader, Vec<u8>) {
    let mut resp = stored.header_with(DECIDING.len() + 2, |n| DECIDING.contains(n));
    decide_head(req, &mut resp);
    let lines = field_lines(stored.fields(), &resp, age, status, stored.fields_len());
    (resp, lines)
}

/// A fresh hit's field lines for an HTTP/1 writer that takes them serialized (vendored
/// pingora-core, patch 7), from the stored `fields` in order (a memory entry's, or a Redis
/// record's map). They are the lines pingora writes for the map the other path builds: the
/// stored fields, with `Age`, the range filter's `Accept-Ranges` (read from `deciding`, the
/// header the writer decides by) and [`Gateway::finish_header`]'s `Cache-Status` each in the
/// place of its stored lines (as `insert_header` puts it) or after them in that order; without
/// the stored-only stale field or a stored `Connection` (the writer adds its own, after `Date`
/// when it adds one); names spelled as pingora spells them in a header without a case map.
/// Building a map of every field and serializing it cost a memory hit about 2,400
/// instructions more than this (README "Performance"). `tests/it/fresh_hit.rs` compares both
/// paths' heads line for line, from either tier.
fn field_lines<'a>(
    fields: impl Iterator<Item = (&'a header::HeaderName, &'a [u8])>,
    deciding: &ResponseHeader,
    age: u64,
    status: &str,
    capacity: usize,
) -> Vec<u8> {
    let mut age_text = itoa::Buffer::new();
    let age = age_text.format(age).as_bytes();
    let set: [&header::HeaderName; 3] =
        [&header::AGE, &header::ACCEPT_RANGES, &cache_status::HEADER];
    let mut written = [false; 3];
    let mut out = Vec::with_capacity(capacity + status.len() + 64);
    let line = |out: &mut Vec<u8>, name: &header::HeaderName, value: &[u8]| {
        // Spelled as pingora writes a header without a case map (standard names titled).
        let spelled = pingora::http::titled_header_name_str(name).unwrap_or(name.as_str());
        out.extend_from_slice(spelled.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let set_lines = |out: &mut Vec<u8>, i: usize| match i {
        0 => line(out, set[0], age),
        1 => {
            for v in deciding.headers.get_all(header::ACCEPT_RANGES) {
                line(out, set[1], v.as_bytes());
            }
        }
        _ => line(out, set[2], status.as_bytes()),
    };
    for (name, value) in fields {
        if *name == header::CONNECTION || *name == policy::STALE_FIELD {
            continue;
        }
        match set.iter().position(|s| *s == name) {
            Some(i) => {
                if !written[i] {
                    set_lines(&mut out, i);
                    written[i] = true;
                }
            }
            None => line(&mut out, name, value),
        }
    }
    for (i, done) in written.into_iter().enumerate() {
        if !done {
            set_lines(&mut out, i);
        }
    }
    out
}
