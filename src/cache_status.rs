//! The RFC 9211 `Cache-Status` response header.
//!
//! Every response says what the cache did: `aisle; hit; ttl=42`, `aisle; fwd=uri-miss; stored`,
//! `aisle; fwd=stale; fwd-status=503; ttl=-7; detail=stale-if-error`, `aisle; fwd=bypass`. The
//! proxy decides the facts; this module only spells them.

use std::fmt::Write;

/// Why the request went forward (RFC 9211 §2.2 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Not eligible for caching.
    Bypass,
    /// Nothing stored for the URI.
    UriMiss,
    /// Other variants of the URI are stored, not this one.
    VaryMiss,
    /// Nothing usable was stored (e.g. the stored entry was purged).
    Miss,
    /// A stored response was stale.
    Stale,
    /// The request's own directives (`no-cache`, `max-age`) ruled out the stored response.
    Request,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Miss => "miss",
            Fwd::Stale => "stale",
            Fwd::Request => "request",
        }
    }
}

/// The facts one `Cache-Status` entry reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    pub hit: bool,
    pub fwd: Option<Fwd>,
    pub fwd_status: Option<u16>,
    /// Seconds of freshness left (negative when stale).
    pub ttl: Option<i64>,
    pub stored: bool,
    pub detail: Option<&'static str>,
    /// A short hash of the cache key (rules keyed on the body), so callers can see why two
    /// requests did or did not share an entry.
    pub key: Option<String>,
}

impl CacheStatus {
    /// The header value, starting with the cache's name `aisle`.
    pub fn to_header_value(&self) -> String {
        let mut s = String::with_capacity(48);
        s.push_str("aisle");
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(fwd.as_str());
        }
        if let Some(code) = self.fwd_status {
            let _ = write!(s, "; fwd-status={code}");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(s, "; ttl={ttl}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if let Some(key) = &self.key {
            s.push_str("; key=");
            s.push_str(key);
        }
        if let Some(detail) = self.detail {
            s.push_str("; detail=");
            s.push_str(detail);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelled_as_rfc9211() {
        let hit = CacheStatus {
            hit: true,
            ttl: Some(42),
            ..Default::default()
        };
        assert_eq!(hit.to_header_value(), "aisle; hit; ttl=42");
        let miss = CacheStatus {
            fwd: Some(Fwd::UriMiss),
            stored: true,
            ..Default::default()
        };
        assert_eq!(miss.to_header_value(), "aisle; fwd=uri-miss; stored");
        let stale = CacheStatus {
            fwd: Some(Fwd::Stale),
            fwd_status: Some(503),
            ttl: Some(-7),
            detail: Some("stale-if-error"),
            ..Default::default()
        };
        assert_eq!(
            stale.to_header_value(),
            "aisle; fwd=stale; fwd-status=503; ttl=-7; detail=stale-if-error"
        );
        let bypass = CacheStatus {
            fwd: Some(Fwd::Bypass),
            ..Default::default()
        };
        assert_eq!(bypass.to_header_value(), "aisle; fwd=bypass");
    }
}
