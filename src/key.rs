//! Cache keys: the one place a key gets built, and the request identity keys share with purges.
//!
//! A key is scheme, host, method, route (rule name, its generation, and path) and the rule's vary values, each
//! component length-prefixed so that no two different requests can frame to the same bytes
//! (a path-only key was a cross-tenant poisoning CVE in pingora). The default route, which has
//! no vary list, keys on the full query string instead: RFC 9111's key is the URI.
//!
//! Identity is normalized once, here, and every consumer uses the same functions: the host
//! ([`normalize_host`]: lowercase, no trailing dot, no port) and the path ([`normalize_path`]:
//! RFC 3986 §6.2.2, case kept) go into the key, the URI identity ([`uri_id`]) that URL purges,
//! `PURGE` and RFC 9111 §4.4 invalidation look up, and the `host/path` prefix purges compare
//! ([`host_path`], [`normalize_prefix`]). The gateway forwards the same normalized host and path
//! upstream, so the origin answers for exactly what the key names.
//!
//! A rule with `authorization = "isolate"` adds the request's credential as a keyed hash
//! ([`crate::rules::CredentialKey`], from `[cache] key_secret`): callers share an entry only
//! when they present the same credential, and no key holds the credential itself.
//!
//! The primary bytes are hashed once here (BLAKE3) and handed to pingora as an override, so later
//! phases reuse the hash instead of rehashing the key.

use crate::rules::source::{canonical, remove_pointer, RequestView, Unkeyable};
use crate::rules::{Authorization, Rule};
use pingora::cache::key::HashBinary;
use pingora::cache::CacheKey;
use std::borrow::Cow;
use std::fmt;

/// Bumped when the key layout changes, so old entries (e.g. in a shared tier) are not misread.
/// 2: normalized hosts and paths; a keyed value the origin could read two ways never gets a key.
/// 3: the rule's generation follows its name (a reloaded rule that changed keys anew).
const KEY_VERSION: &[u8] = b"aisle/3";

/// The scheme of the proxy listener: part of every key and URI identity, spelled only here.
pub const SCHEME: &str = "http";

/// The request parts a key is made of.
pub struct KeyInput<'a> {
    pub host: &'a str,
    pub method: &'a http::Method,
    pub view: RequestView<'a>,
    /// `Aisle-Cache-Namespace`: a separate key space (e.g. per tenant).
    pub namespace: Option<&'a str>,
}

/// Builds the primary key bytes for a request matched to `rule`.
pub fn primary(rule: &Rule, input: &KeyInput<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + input.view.path.len());
    // Keyability is admission's to judge (`admission::keyable`); the bytes are the same either way.
    let _ = write_primary(rule, input, &mut out);
    out
}

/// The hash of [`primary`] (what [`cache_key`] stores under), streamed into the hasher: no
/// buffer is built, so a hit's key costs no allocation (issue 16). One writer serves both, so
/// the two cannot disagree. With it, whether every keyed value could be read one way only: the
/// first that cannot ([`crate::rules::source::Source::keyed`]), in `vary` order. The values are
/// read once for both (issue 16: reading them for the check, then again for the key, was most
/// of what a realistic rule added to a hit); [`crate::admission::keyed_hash`] makes its
/// admission check from it.
pub fn checked_hash(rule: &Rule, input: &KeyInput<'_>) -> (HashBinary, Result<(), Unkeyable>) {
    let mut sink = HashSink::new();
    let keyed = write_primary(rule, input, &mut sink);
    (truncate(sink.finalize()), keyed)
}

/// A key's bytes gathered on the stack and handed to BLAKE3 in as few calls as the key's length
/// allows: a key is a score of short pieces (length prefixes, names, values), and each
/// `Hasher::update` has a fixed cost that outweighed hashing the piece (issue 16: 18 updates,
/// 2.5k instructions, of a hit's 58k). A key that fits the buffer (nearly all) is hashed in one
/// call of `blake3::hash`, with no `Hasher`: BLAKE3's streaming hasher is about 1.9 KB, and
/// building it in the sink and moving the sink was a 2.9 KB copy on every hit (issue 16,
/// README "Performance"). A longer key streams through a boxed hasher. Either way the hash is
/// the same as of one call over the whole key, which is what streaming BLAKE3 guarantees.
struct HashSink {
    len: usize,
    buf: [u8; HashSink::SIZE],
    /// The hasher of a key longer than the buffer, holding what was flushed so far.
    long: Option<Box<blake3::Hasher>>,
}

impl HashSink {
    /// Room for a typical key (BLAKE3's chunk); a longer one is hashed a buffer at a time.
    const SIZE: usize = 1024;

    fn new() -> Self {
        HashSink {
            len: 0,
            buf: [0; HashSink::SIZE],
            long: None,
        }
    }

    fn finalize(&mut self) -> blake3::Hash {
        let rest = &self.buf[..self.len];
        match &mut self.long {
            None => blake3::hash(rest),
            Some(hasher) => {
                hasher.update(rest);
                hasher.finalize()
            }
        }
    }
}

/// Where key bytes go: a buffer ([`primary`]) or straight into the hash ([`checked_hash`]).
trait KeySink {
    fn put(&mut self, bytes: &[u8]);
}

impl KeySink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl KeySink for HashSink {
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > HashSink::SIZE {
            let hasher = self
                .long
                .get_or_insert_with(|| Box::new(blake3::Hasher::new()));
            hasher.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > HashSink::SIZE {
                hasher.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Writes the key; `Err`: the first keyed value that cannot be keyed (the key is still written,
/// see below).
fn write_primary(
    rule: &Rule,
    input: &KeyInput<'_>,
    out: &mut impl KeySink,
) -> Result<(), Unkeyable> {
    let mut keyed = Ok(());
    push(out, KEY_VERSION);
    push(out, SCHEME.as_bytes());
    // `input.host` is normalized ([`normalize_host`]); lowercasing again costs nothing.
    push_lowercase(out, input.host.as_bytes());
    // HEAD is answered from GET entries (pingora turns HEAD into GET upstream).
    let method = if input.method == http::Method::HEAD {
        http::Method::GET.as_str()
    } else {
        input.method.as_str()
    };
    push(out, method.as_bytes());
    push(out, rule.name.as_bytes());
    // A rule whose definition changed (by a reload, or between the versions of a fleet) no
    // longer finds the entries stored under the old one.
    push(out, &rule.generation.to_le_bytes());
    if rule.key_path {
        push(out, normalize_path(input.view.path).as_bytes());
    }
    match input.namespace {
        Some(ns) => {
            out.put(&[1]);
            push(out, ns.as_bytes());
        }
        None => out.put(&[0]),
    }
    if let Authorization::Isolate { header, key } = &rule.authorization {
        // `authorization = "isolate"`: the credential's keyed hash, never the credential (a
        // key is logged at debug level, shown in `Cache-Status` and stored in Redis).
        match input.view.headers.get(header) {
            Some(credential) => {
                out.put(&[1]);
                push(out, &key.digest(credential.as_bytes()));
            }
            None => out.put(&[0]),
        }
    }
    if let Some(ignore) = &rule.body_key {
        match input.view.body {
            Some(body) => {
                let mut body = body.clone();
                for pointer in ignore {
                    remove_pointer(&mut body, pointer);
                }
                out.put(&[1]);
                push(out, canonical(&body).as_bytes());
            }
            None => out.put(&[0]),
        }
    }
    if rule.is_default {
        push(out, input.view.query.unwrap_or("").as_bytes());
    } else {
        for field in &rule.vary {
            match field.keyed_value(&input.view) {
                Ok(Some(v)) => {
                    out.put(&[1]);
                    push(out, v.as_bytes());
                }
                Ok(None) => out.put(&[0]),
                // Admission bypasses such requests (`admission::keyable`, or this `Err` through
                // `admission::keyed_hash`). Should a caller skip that check, the value still
                // shares a key with no keyable request.
                Err(e) => {
                    out.put(&[2]);
                    keyed = keyed.and(Err(e));
                }
            }
        }
    }
    // The default route has no `vary` (`rules::compiler`): its query is keyed whole.
    keyed
}

/// The 128-bit hash a key is stored under: BLAKE3 (collision-resistant, so keys cannot be forged
/// to collide, and the same on every instance of a fleet).
pub fn hash(primary: &[u8]) -> HashBinary {
    truncate(blake3::hash(primary))
}

fn truncate(full: blake3::Hash) -> HashBinary {
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_bytes()[..16]);
    out
}

/// The pingora cache key for a request matched to `rule`.
pub fn cache_key(rule: &Rule, input: &KeyInput<'_>) -> CacheKey {
    let primary = primary(rule, input);
    let hash = hash(&primary);
    stored_under(rule, primary, hash)
}

/// [`cache_key`] for a request whose hash [`checked_hash`] gave: the one writer makes both, so
/// the bytes built here hash to it (debug builds, which the test suite runs, check every one).
pub fn cache_key_hashed(rule: &Rule, input: &KeyInput<'_>, hash: HashBinary) -> CacheKey {
    let primary = primary(rule, input);
    debug_assert_eq!(
        hash,
        self::hash(&primary),
        "a key hashed by checked_hash is the hash of its bytes"
    );
    stored_under(rule, primary, hash)
}

fn stored_under(rule: &Rule, primary: Vec<u8>, hash: HashBinary) -> CacheKey {
    // The user_tag (not hashed) tells the memory tier's eviction the rule's priority class.
    let mut key = CacheKey::new(primary, rule.priority.tag());
    key.set_primary_bin_override(hash);
    key
}

/// Identity of a stored URI (scheme, host, path), shared by all its variants. Used to find every
/// variant of a URI, e.g. to invalidate it after a successful unsafe request (RFC 9111 §4.4), or
/// for a URL purge. `host` is a normalized host ([`normalize_host`]); the path is normalized here
/// ([`normalize_path`]), so `/a/4%32` and `/a/42` are one URI, as they are one key.
pub fn uri_id(host: &str, path: &str) -> u64 {
    static STATE: ahash::RandomState = ahash::RandomState::with_seeds(
        0x6169_736c_6531,
        0x7572_6900,
        0x0bad_5eed,
        0x1234_5678_9abc_def0,
    );
    let mut lower_host = [0u8; 256];
    let host = host.as_bytes();
    let host: &[u8] = if host.len() <= lower_host.len() {
        for (d, s) in lower_host.iter_mut().zip(host) {
            *d = s.to_ascii_lowercase();
        }
        &lower_host[..host.len()]
    } else {
        host
    };
    let path = normalize_path(path);
    STATE.hash_one((SCHEME.as_bytes(), host, path.as_bytes()))
}

/// The `host/path` an entry is stored for, which prefix purges compare against: the normalized
/// host ([`normalize_host`]) and the normalized path, as [`normalize_prefix`] writes a purge.
pub fn host_path(host: &str, path: &str) -> String {
    let path = normalize_path(path);
    let mut out = String::with_capacity(host.len() + path.len());
    out.push_str(host);
    out.push_str(&path);
    out
}

/// A purge prefix (`host/path-prefix`, a scheme ignored) in the form [`host_path`] stores:
/// the host normalized (case, trailing dot and port do not matter), the path normalized but
/// case-sensitive (RFC 3986 §6.2.2.1: `/API/Items` and `/api/items` are different resources).
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let bare = prefix.split_once("://").map_or(prefix, |(_, rest)| rest);
    let Some(slash) = bare.find('/') else {
        return Err(format!("prefix {prefix:?} must look like host/path/prefix"));
    };
    if bare.chars().any(char::is_whitespace) {
        return Err(format!(
            "prefix {prefix:?} must look like host/path/prefix, without spaces"
        ));
    }
    // `find` returned the byte index of an ASCII '/': a char boundary.
    let (host, path) = bare.split_at(slash);
    let host = normalize_host(host.as_bytes()).map_err(|e| format!("prefix {prefix:?}: {e}"))?;
    Ok(host_path(&host, path))
}

/// Why a `Host` cannot name the origin of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    /// Neither a `Host` header nor an authority in the request target.
    Missing,
    Empty,
    /// The port is not a number from 1 to 65535.
    Port,
    /// A `[` without its `]`, or no IPv6 address between them.
    Ipv6,
    /// A character no host name has, or an empty label (`a..b`, `.a`).
    Name,
    /// More than 253 characters.
    TooLong,
}

impl fmt::Display for BadHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadHost::Missing => "the request has no Host header; send Host: name[:port]",
            BadHost::Empty => "the Host header is empty; send Host: name[:port]",
            BadHost::Port => "the port in Host is not a number from 1 to 65535",
            BadHost::Ipv6 => "an IPv6 host must be an address in brackets, like [2001:db8::1]:8080",
            BadHost::Name => {
                "the host name in Host may only have letters, digits, '-', '_' and dots between non-empty labels"
            }
            BadHost::TooLong => "the host name in Host is longer than 253 characters",
        })
    }
}

/// Longest host name (RFC 1035 §2.3.4, without the trailing dot).
const MAX_HOST: usize = 253;

/// A `Host` value (or a URL's authority) as the host it names, in normal form (RFC 3986 §6.2.2,
/// §6.2.3): lowercase, one trailing dot removed (`private.test.` is `private.test`), the port
/// checked to be a number from 1 to 65535 and dropped, an IPv6 literal in its RFC 5952 form
/// (`[0:0::1]` is `[::1]`). Anything else (characters outside letters, digits, `-`, `_`, `.`;
/// empty labels; a `[` without `]`) is an error, so a hostile `Host` never reaches a key, a
/// rule or an origin. Borrows when the text is already in normal form.
pub fn normalize_host(text: &[u8]) -> Result<Cow<'_, str>, BadHost> {
    if text.is_empty() {
        return Err(BadHost::Empty);
    }
    // Every split below is at an ASCII byte of a byte slice: nothing can cut a UTF-8 char.
    let (name, port): (&[u8], Option<&[u8]>) = if text[0] == b'[' {
        let end = text.iter().position(|&b| b == b']').ok_or(BadHost::Ipv6)?;
        let port = match &text[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(BadHost::Ipv6),
        };
        (&text[..=end], port)
    } else {
        match text.iter().rposition(|&b| b == b':') {
            Some(colon) => (&text[..colon], Some(&text[colon + 1..])),
            None => (text, None),
        }
    };
    if let Some(port) = port {
        check_port(port)?;
    }
    if name.first() == Some(&b'[') {
        let inner = &name[1..name.len() - 1];
        let addr: std::net::Ipv6Addr = std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(BadHost::Ipv6)?;
        let normal = format!("[{addr}]");
        return Ok(if normal.as_bytes() == name {
            // `name` equals an ASCII string: valid UTF-8.
            Cow::Borrowed(std::str::from_utf8(name).map_err(|_| BadHost::Ipv6)?)
        } else {
            Cow::Owned(normal)
        });
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(BadHost::Empty);
    }
    if name.len() > MAX_HOST {
        return Err(BadHost::TooLong);
    }
    // One pass (every request's `Host` comes through here): the allowed bytes, no empty label
    // (no dot first, last or after another), and whether any letter is uppercase.
    let mut upper = false;
    let mut label_empty = true;
    for &b in name {
        if b == b'.' {
            if label_empty {
                return Err(BadHost::Name);
            }
            label_empty = true;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(BadHost::Name);
        }
        upper |= b.is_ascii_uppercase();
        label_empty = false;
    }
    if label_empty {
        return Err(BadHost::Name);
    }
    // Only ASCII bytes are left.
    let name = std::str::from_utf8(name).map_err(|_| BadHost::Name)?;
    Ok(if upper {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
}

/// An empty port is allowed (RFC 3986 §3.2.3); otherwise digits for 1 to 65535.
fn check_port(port: &[u8]) -> Result<(), BadHost> {
    if port.is_empty() {
        return Ok(());
    }
    if !port.iter().all(u8::is_ascii_digit) {
        return Err(BadHost::Port);
    }
    let significant = port
        .iter()
        .position(|&b| b != b'0')
        .map_or(&port[port.len()..], |i| &port[i..]);
    if significant.is_empty() || significant.len() > 5 {
        return Err(BadHost::Port);
    }
    let n = significant
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    if n > u32::from(u16::MAX) {
        return Err(BadHost::Port);
    }
    Ok(())
}

/// A request path in normal form (RFC 3986 §6.2.2.2): percent-encoded unreserved characters
/// decoded (`%32` is `2`, `%7e` is `~`) and the hex digits of every other escape uppercased
/// (`%2f` is `%2F`). Nothing else changes: escapes of other bytes (`%2F`, `%FF`) stay escaped,
/// so no two different paths become one, and case is kept (paths are case-sensitive). Borrows
/// when the path is already in normal form, which is the common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    // Most paths hold no escape at all: found a word at a time (a hit's path is normalized when
    // the request arrives, then read again for its URI and its key).
    if !bytes.contains(&b'%') {
        return Cow::Borrowed(path);
    }
    let needs = |i: usize| match escape_at(bytes, i) {
        Some(b) => unreserved(b) || bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase),
        None => false,
    };
    let Some(first) = (0..bytes.len()).find(|&i| bytes[i] == b'%' && needs(i)) else {
        return Cow::Borrowed(path);
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        match escape_at(bytes, i) {
            Some(b) if unreserved(b) => {
                out.push(b);
                i += 3;
            }
            Some(_) => {
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // Only ASCII triplets were replaced by ASCII: the rest is the input's UTF-8, intact.
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(path),
    }
}

/// The byte a `%XX` escape at `i` encodes, if there is one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let hi = hex(*bytes.get(i + 1)?)?;
    let lo = hex(*bytes.get(i + 2)?)?;
    Some((hi * 16 + lo) as u8)
}

/// RFC 3986 §2.3 unreserved characters: encoding them never changes a URI's meaning.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push(out: &mut impl KeySink, bytes: &[u8]) {
    out.put(&(bytes.len() as u32).to_le_bytes());
    out.put(bytes);
}

fn push_lowercase(out: &mut impl KeySink, bytes: &[u8]) {
    out.put(&(bytes.len() as u32).to_le_bytes());
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        out.put(lower);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, Context, RuleSet};
    use http::HeaderMap;
    use std::path::Path;

    fn rules() -> RuleSet {
        let ups = vec!["api".to_string()];
        let ctx = Context::with_upstreams(&ups);
        compile(
            &[(
                Path::new("r.toml"),
                r#"
[tables.market]
map = { "new york" = "nyc", brooklyn = "nyc" }
fallback = "state"
[[rule]]
name = "search"
match = { path = "/api/vendors/search" }
vary = ["query.location", "query.type", "header.x-tenant"]
normalize = { "query.location" = ["trim", "market"] }
[[rule]]
name = "timeline"
match = { path = "/api/weddings/:id/timeline" }
vary = ["path.id"]
normalize = { "path.id" = "lowercase" }
[[rule]]
name = "items"
match = { path = "/items/:id" }
"#,
            )],
            &ctx,
        )
        .unwrap()
    }

    fn key(
        set: &RuleSet,
        method: &str,
        host: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let uri: http::Uri = uri.parse().unwrap();
        let method: http::Method = method.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = set.find(&method, host, uri.path()).unwrap();
        let input = KeyInput {
            host,
            method: &method,
            view: RequestView {
                path: uri.path(),
                query: uri.query(),
                headers: &h,
                params: &m.params,
                body: None,
            },
            namespace: None,
        };
        let bytes = primary(m.rule, &input);
        // The streamed hash a hit uses is the hash of these bytes, for every key any test builds.
        assert_eq!(checked_hash(m.rule, &input).0, hash(&bytes));
        bytes
    }

    /// The buffered sink hashes as one call over the whole key would, whatever the pieces'
    /// lengths: across its buffer's end, exactly filling it, and longer than it.
    #[test]
    fn the_buffered_hash_is_the_hash_of_the_concatenation() {
        let sizes = [0, 1, 7, 1023, 1, 1024, 1025, 3000, 16, 1008, 2, 5000, 64];
        for start in 0..sizes.len() {
            let mut sink = HashSink::new();
            let mut all = Vec::new();
            for (i, &n) in sizes[start..].iter().enumerate() {
                let piece: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                sink.put(&piece);
                all.extend_from_slice(&piece);
            }
            assert_eq!(sink.finalize(), blake3::hash(&all), "from piece {start}");
        }
    }

    /// The streamed writer lowercases a host in 64-byte pieces: a long host keys as its
    /// lowercase spelling does, and both writers agree on it.
    #[test]
    fn streamed_hash_equals_the_hash_of_the_bytes_for_long_hosts() {
        let set = rules();
        let long = format!("{}.Example.COM", "Sub".repeat(40));
        let a = key(&set, "GET", &long, "/items/1?x=1", &[]);
        let b = key(&set, "GET", &long.to_ascii_lowercase(), "/items/1?x=1", &[]);
        assert_eq!(a, b);
        let other = key(&set, "GET", "example.com", "/items/1", &[]);
        assert_ne!(a, other);
    }

    /// Issue 13: an isolating rule keys on a keyed hash of the credential: the same credential
    /// shares, another does not, the key bytes never contain it, and another secret gives other
    /// keys. A rule without `authorization` keys as before, whatever the credential.
    #[test]
    fn isolated_credentials_are_keyed_by_their_keyed_hash() {
        use crate::rules::CredentialKey;
        let text = r#"
[[rule]]
name = "chat"
match = { method = "POST", path = "/chat" }
authorization = "isolate"
[[rule]]
name = "messages"
match = { method = "POST", path = "/messages" }
authorization = "isolate"
credential_header = "x-api-key"
[[rule]]
name = "plain"
match = { path = "/plain" }
"#;
        let set = |secret: &str| {
            let key = CredentialKey::from_secret(secret.as_bytes());
            compile(
                &[(Path::new("r.toml"), text)],
                &Context {
                    upstreams: &["api".to_string()],
                    default_upstream: Some(0),
                    encryption: false,
                    upstream_credentials: &[],
                    key_secret: Some(&key),
                },
            )
            .unwrap()
        };
        let s = set("one secret of sixteen");
        let chat = |auth: &str| key(&s, "POST", "h", "/chat", &[("authorization", auth)]);
        let alice = chat("Bearer sk-alice-0123456789");
        assert_eq!(alice, chat("Bearer sk-alice-0123456789"));
        assert_ne!(alice, chat("Bearer sk-bob-0123456789"));
        assert_ne!(alice, key(&s, "POST", "h", "/chat", &[]));
        let raw = b"sk-alice-0123456789";
        assert!(
            !alice.windows(raw.len()).any(|w| w == raw),
            "no raw credential"
        );
        let other = set("another secret, sixteen");
        assert_ne!(
            alice,
            key(
                &other,
                "POST",
                "h",
                "/chat",
                &[("authorization", "Bearer sk-alice-0123456789")]
            ),
            "the hash is keyed by the gateway's secret"
        );
        // credential_header: x-api-key isolates, Authorization does not enter the key.
        let msg = |h: &[(&str, &str)]| key(&s, "POST", "h", "/messages", h);
        assert_ne!(msg(&[("x-api-key", "a")]), msg(&[("x-api-key", "b")]));
        assert_eq!(
            msg(&[("x-api-key", "a"), ("authorization", "x")]),
            msg(&[("x-api-key", "a"), ("authorization", "y")])
        );
        let plain = |auth: &str| key(&s, "GET", "h", "/plain", &[("authorization", auth)]);
        assert_eq!(plain("a"), plain("b"));
    }

    #[test]
    fn unkeyed_query_parameters_are_ignored() {
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=nyc&type=venue",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?type=venue&utm_source=mail&location=nyc",
            &[],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn normalized_values_share_a_key() {
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=New%20York",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=%20brooklyn",
            &[],
        );
        let c = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=Austin,%20TX",
            &[],
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_component_separates() {
        let s = rules();
        let base = key(&s, "GET", "h", "/api/vendors/search?location=nyc", &[]);
        assert_ne!(
            base,
            key(&s, "GET", "other", "/api/vendors/search?location=nyc", &[]),
            "host"
        );
        assert_ne!(
            base,
            key(&s, "GET", "h", "/api/vendors/search?location=sf", &[]),
            "vary value"
        );
        assert_ne!(
            base,
            key(
                &s,
                "GET",
                "h",
                "/api/vendors/search?location=nyc",
                &[("x-tenant", "a")]
            ),
            "header"
        );
        assert_ne!(
            base,
            key(&s, "GET", "h", "/api/vendors/search", &[]),
            "absent vs present"
        );
        assert_eq!(
            base,
            key(&s, "HEAD", "h", "/api/vendors/search?location=nyc", &[]),
            "HEAD reads GET entries"
        );
        assert_eq!(
            base,
            key(&s, "GET", "H", "/api/vendors/search?location=nyc", &[]),
            "host is case-insensitive"
        );
        // Absent and empty differ.
        assert_ne!(
            key(&s, "GET", "h", "/api/vendors/search?type=", &[]),
            key(&s, "GET", "h", "/api/vendors/search", &[])
        );
        assert_ne!(
            key(&s, "GET", "h", "/api/weddings/1/timeline", &[]),
            key(&s, "GET", "h", "/api/weddings/2/timeline", &[])
        );
    }

    #[test]
    fn path_is_keyed_unless_vary_determines_it() {
        let s = rules();
        // Every parameter is varied (and normalized): the normalized value decides.
        assert_eq!(
            key(&s, "GET", "h", "/api/weddings/W-1/timeline", &[]),
            key(&s, "GET", "h", "/api/weddings/w-1/timeline", &[])
        );
        // A parameter not in vary: the raw path still separates entries.
        assert_ne!(
            key(&s, "GET", "h", "/items/1", &[]),
            key(&s, "GET", "h", "/items/2", &[])
        );
    }

    #[test]
    fn framing_is_unambiguous() {
        // Values that would collide if concatenated without lengths.
        let s = rules();
        let a = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=ab&type=c",
            &[],
        );
        let b = key(
            &s,
            "GET",
            "h",
            "/api/vendors/search?location=a&type=bc",
            &[],
        );
        assert_ne!(a, b);
    }

    #[test]
    fn default_route_keys_on_the_whole_query() {
        let s = rules();
        assert_ne!(
            key(&s, "GET", "h", "/other?a=1", &[]),
            key(&s, "GET", "h", "/other?a=2", &[])
        );
        assert_eq!(
            key(&s, "GET", "h", "/other?a=1", &[]),
            key(&s, "GET", "h", "/other?a=1", &[])
        );
    }

    #[test]
    fn uri_ids() {
        assert_eq!(uri_id("H", "/a"), uri_id("h", "/a"));
        assert_ne!(uri_id("h", "/a"), uri_id("h", "/b"));
        assert_ne!(uri_id("h", "/a"), uri_id("g", "/a"));
        // The same normalized path as the key: an entry filled via an escape is purged by the
        // plain spelling, and the other way round.
        assert_eq!(
            uri_id("h", "/api/weddings/4%32/timeline"),
            uri_id("h", "/api/weddings/42/timeline")
        );
        assert_eq!(uri_id("h", "/a%2f"), uri_id("h", "/a%2F"));
        // Paths are case-sensitive; escapes of other bytes stay apart.
        assert_ne!(uri_id("h", "/API/Items"), uri_id("h", "/api/items"));
        assert_ne!(uri_id("h", "/x/%FF"), uri_id("h", "/x/%FE"));
        assert_ne!(uri_id("h", "/a%2Fb"), uri_id("h", "/a/b"));
    }

    #[test]
    fn paths_in_normal_form() {
        assert!(matches!(normalize_path("/a/b"), Cow::Borrowed("/a/b")));
        assert!(matches!(normalize_path("/a%2Fb%FF"), Cow::Borrowed(_)));
        assert_eq!(normalize_path("/api/weddings/4%32/x"), "/api/weddings/42/x");
        assert_eq!(normalize_path("/%7e%41%2d%5F%2e"), "/~A-_.");
        assert_eq!(normalize_path("/a%2fb%ff"), "/a%2Fb%FF");
        // Broken escapes and non-ASCII text are kept as they are.
        assert_eq!(normalize_path("/%4"), "/%4");
        assert_eq!(normalize_path("/%zz%41"), "/%zzA");
        assert_eq!(normalize_path("/é%41%"), "/éA%");
        // Idempotent.
        for p in ["/4%32", "/%2f%7e", "/é%c3%a9"] {
            let once = normalize_path(p).into_owned();
            assert_eq!(normalize_path(&once), once);
        }
    }

    #[test]
    fn hosts_in_normal_form() {
        let n = |h: &str| normalize_host(h.as_bytes()).map(Cow::into_owned);
        assert!(matches!(
            normalize_host(b"a.test:8080"),
            Ok(Cow::Borrowed("a.test"))
        ));
        assert_eq!(n("LOCALHOST").unwrap(), "localhost");
        assert_eq!(n("Private.Test.").unwrap(), "private.test");
        assert_eq!(n("h:00080").unwrap(), "h");
        assert_eq!(n("[2001:DB8:0::1]:443").unwrap(), "[2001:db8::1]");
        assert_eq!(n("under_score.test").unwrap(), "under_score.test");
        for bad in [
            "[", "]", "[x]", "[::1]:", "h:1:2", "h:-1", "h:99999", "h:1x", "a b", "a/b", "a@b",
            ".a", "a..", "", ":80",
        ] {
            let r = n(bad);
            // `[::1]:` has an empty port, which is allowed.
            if bad == "[::1]:" {
                assert_eq!(r.unwrap(), "[::1]");
                continue;
            }
            assert!(r.is_err(), "{bad:?} is not a host: {r:?}");
        }
        assert_eq!(n(&"a".repeat(254)), Err(BadHost::TooLong));
        assert!(n(&"a.".repeat(126)).is_ok());
        // Never a panic, whatever the bytes.
        for bytes in [
            &b"[\xff]"[..],
            b"\xff",
            b"[\xc3",
            b"h:\xc3\xa9",
            b"[::1]\xff",
        ] {
            assert!(normalize_host(bytes).is_err());
        }
    }

    /// The one-pass host check refuses exactly what "only letters, digits, '-', '_' and dots
    /// between non-empty labels" refuses, and lowercases exactly what has an uppercase letter,
    /// over every name of up to five bytes from a mixed alphabet.
    #[test]
    fn the_host_check_is_the_rule_it_states() {
        let alphabet: &[u8] = b"aZ9.-_ \xff";
        let rule = |name: &[u8]| -> Result<String, BadHost> {
            let name = name.strip_suffix(b".").unwrap_or(name);
            if name.is_empty() {
                return Err(BadHost::Empty);
            }
            let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
            if !name.iter().all(allowed) || name.split(|&b| b == b'.').any(<[u8]>::is_empty) {
                return Err(BadHost::Name);
            }
            Ok(String::from_utf8(name.to_ascii_lowercase()).unwrap())
        };
        let mut names: Vec<Vec<u8>> = vec![vec![]];
        let mut checked = 0;
        for _ in 0..5 {
            names = names
                .iter()
                .flat_map(|n| {
                    alphabet.iter().map(move |&b| {
                        let mut n = n.clone();
                        n.push(b);
                        n
                    })
                })
                .collect();
            for name in &names {
                let got = normalize_host(name).map(Cow::into_owned);
                assert_eq!(got, rule(name), "{:?}", String::from_utf8_lossy(name));
                checked += 1;
            }
        }
        assert_eq!(checked, 8 + 64 + 512 + 4096 + 32768);
    }

    #[test]
    fn prefixes_compare_like_with_like() {
        let stored = host_path("localhost", "/API/Items/4%32");
        assert_eq!(stored, "localhost/API/Items/42");
        for purge in [
            "localhost/API/Items",
            "LOCALHOST/API/Items/4",
            "http://Localhost.:8080/API/It%65ms",
        ] {
            let p = normalize_prefix(purge).unwrap();
            assert!(stored.starts_with(&p), "{purge:?} -> {p:?}");
        }
        // The path is case-sensitive (RFC 3986 §6.2.2.1).
        assert!(!stored.starts_with(&normalize_prefix("localhost/api/items").unwrap()));
        assert!(normalize_prefix("localhost").is_err());
        assert!(normalize_prefix("local host/x").is_err());
        assert!(normalize_prefix("[/x").unwrap_err().contains("IPv6"));
    }

    #[test]
    fn repeated_and_badly_encoded_values_never_share_a_key() {
        let s = rules();
        let q = |query: &str| key(&s, "GET", "h", &format!("/api/vendors/search?{query}"), &[]);
        // Today's comma join made these one key; a repeated keyed value is never keyed as a
        // list (admission bypasses it, and the key builder frames it apart).
        assert_ne!(
            q("location=Paris&location=Boston"),
            q("location=Paris,Boston")
        );
        assert_ne!(q("location=Paris&location=Boston"), q("location=Boston"));
        assert_ne!(q("location=%FF"), q("location=%EF%BF%BD"));
        // Two header lines are their combination, as the origin reads them.
        let h = |lines: &[(&str, &str)]| key(&s, "GET", "h", "/api/vendors/search", lines);
        assert_eq!(
            h(&[("x-tenant", "a"), ("x-tenant", "b")]),
            h(&[("x-tenant", "a, b")])
        );
        assert_ne!(
            h(&[("x-tenant", "a"), ("x-tenant", "b")]),
            h(&[("x-tenant", "a")])
        );
        assert_ne!(h(&[("x-tenant", "")]), h(&[]));
    }

    #[test]
    fn keyed_paths_are_normalized() {
        let s = rules();
        assert_eq!(
            key(&s, "GET", "h", "/items/4%32", &[]),
            key(&s, "GET", "h", "/items/42", &[])
        );
        assert_ne!(
            key(&s, "GET", "h", "/items/A", &[]),
            key(&s, "GET", "h", "/items/a", &[])
        );
    }
}
