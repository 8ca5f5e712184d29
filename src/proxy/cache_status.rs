//! The RFC 9211 `Cache-Status` response header.
//!
//! Every response says what the cache did: `aisle; hit; ttl=42`, `aisle; fwd=uri-miss; stored`,
//! `aisle; fwd=stale; fwd-status=503; ttl=-7; detail=stale-if-error`, `aisle; fwd=bypass`.
//!
//! [`decide`] is a pure function from what the phases observed ([`Observed`]) to the header's
//! facts and the outcome metrics count, so every combination is table-tested here rather than
//! through a live session; [`CacheStatus::to_header_value`] spells the facts.

use crate::metrics::CacheOutcome;

/// The field every answer carries (RFC 9211), as a header name: inserted per request without
/// parsing its spelling.
pub const HEADER: http::HeaderName = http::HeaderName::from_static("cache-status");

/// What the lookup found, as the phases learnt it (one value, not a set of flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lookup {
    /// No lookup happened (yet).
    #[default]
    None,
    /// Nothing stored for the URI.
    UriMiss,
    /// Other variants of the URI are stored, not this one.
    VaryMiss,
    /// An entry was found but a purge after it was stored made it unusable.
    Purged,
    /// A fresh entry was found.
    Fresh,
    /// A stale entry was found.
    Stale,
    /// The request's own directives (`no-cache`, `max-age`, `Authorization`) ruled the entry out.
    Refused,
}

/// pingora's cache phase, reduced to what `Cache-Status` distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Hit,
    /// Served stale (while revalidating or because the upstream failed).
    Stale,
    /// Revalidated with a 304; `stored`: the refreshed entry was kept.
    Revalidated {
        stored: bool,
    },
    /// A stale entry was refetched in full.
    Expired,
    /// Anything else: a miss, a bypass, an uncacheable answer.
    Other,
}

/// Everything `Cache-Status` and the outcome metric depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `Some(detail)`: the request did not use the cache at all.
    pub bypass: Option<Option<&'static str>>,
    pub phase: Option<Phase>,
    pub lookup: Lookup,
    /// Serving stale because the upstream failed: `Some(status)` (`None` inside: no response).
    pub stale_error: Option<Option<u16>>,
    /// Answered stale because the origin had not answered within `stale_after`.
    pub stale_after: bool,
    /// Answered from the stored entry because the upstream's quota is used up.
    pub quota_exhausted: bool,
    pub upstream_status: Option<u16>,
    /// The response was admitted to storage.
    pub stored: bool,
    /// Seconds of freshness left in the entry answered from (negative when stale).
    pub ttl: Option<i64>,
    /// A short hash of the key, for rules keyed on the body.
    pub key: Option<String>,
    /// Answered from another request's fill: after waiting on its cache lock, or reading it
    /// while it streamed (RFC 9211 §2.6 `collapsed`).
    pub collapsed: bool,
    /// A fresh hit past its rule's `refresh_ahead` point (a background refresh follows).
    pub refresh_ahead: bool,
}

/// The `Cache-Status` facts and the outcome counted in metrics.
pub fn decide(o: &Observed) -> (CacheStatus, CacheOutcome) {
    let mut s = CacheStatus {
        key: o.key.clone(),
        ..CacheStatus::default()
    };
    if let Some(detail) = o.bypass {
        s.key = None;
        s.fwd = Some(Fwd::Bypass);
        s.detail = detail;
        return (s, CacheOutcome::Bypass);
    }
    let refused = o.lookup == Lookup::Refused;
    let fwd_stale = if refused { Fwd::Request } else { Fwd::Stale };
    let outcome = match o.phase.unwrap_or(Phase::Other) {
        // The stored entry, however old, because the upstream's quota is used up (served as a
        // hit, so that pingora neither refetches it nor drops the client connection).
        Phase::Hit if o.quota_exhausted => {
            s.fwd = Some(Fwd::Stale);
            s.ttl = o.ttl;
            s.detail = Some("quota-exhausted");
            CacheOutcome::Stale
        }
        // The stored entry, stale, because the origin is slow (readers are served it as a hit
        // while the fill goes on in the background, so the phase alone would say hit).
        Phase::Hit | Phase::Stale if o.stale_after => {
            s.fwd = Some(Fwd::Stale);
            s.ttl = o.ttl;
            s.detail = Some("stale-after");
            CacheOutcome::Stale
        }
        // The stored entry, stale, because the upstream cannot be reached (served as a hit, so
        // that the client connection is kept).
        Phase::Hit if o.stale_error.is_some() => {
            s.fwd = Some(Fwd::Stale);
            s.ttl = o.ttl;
            s.detail = Some("stale-if-error");
            CacheOutcome::Stale
        }
        Phase::Hit => {
            s.hit = true;
            s.ttl = o.ttl;
            s.collapsed = o.collapsed;
            if o.refresh_ahead {
                s.detail = Some("refresh-ahead");
            }
            CacheOutcome::Hit
        }
        Phase::Stale => {
            s.fwd = Some(Fwd::Stale);
            s.ttl = o.ttl;
            match o.stale_error {
                Some(code) => {
                    s.fwd_status = code;
                    s.detail = Some("stale-if-error");
                }
                None => s.detail = Some("stale-while-revalidate"),
            }
            CacheOutcome::Stale
        }
        Phase::Revalidated { stored } => {
            s.fwd = Some(fwd_stale);
            s.fwd_status = Some(304);
            s.ttl = o.ttl;
            s.stored = stored;
            CacheOutcome::Revalidated
        }
        Phase::Expired => {
            s.fwd = Some(fwd_stale);
            s.fwd_status = o.upstream_status;
            s.stored = o.stored;
            CacheOutcome::Expired
        }
        Phase::Other if o.lookup == Lookup::Stale => {
            // Found stale, refetched, and the new response could not be stored.
            s.fwd = Some(Fwd::Stale);
            s.fwd_status = o.upstream_status;
            CacheOutcome::Expired
        }
        Phase::Other => {
            s.fwd = Some(match o.lookup {
                Lookup::Purged => {
                    s.detail = Some("purged");
                    Fwd::Miss
                }
                Lookup::Refused => Fwd::Request,
                Lookup::VaryMiss => Fwd::VaryMiss,
                _ => Fwd::UriMiss,
            });
            s.stored = o.stored;
            CacheOutcome::Miss
        }
    };
    (s, outcome)
}

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
    /// RFC 9211 §2.6: the answer came from another request's fill.
    pub collapsed: bool,
    /// A short hash of the cache key (rules keyed on the body), so callers can see why two
    /// requests did or did not share an entry.
    pub key: Option<String>,
    /// The protection windows on (an extension parameter, RFC 9211 §2: `protection="a,b"`).
    pub protection: Option<std::sync::Arc<str>>,
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
        // `itoa`, not `write!`: this is spelled for every answer (issue 16).
        let mut num = itoa::Buffer::new();
        if let Some(code) = self.fwd_status {
            s.push_str("; fwd-status=");
            s.push_str(num.format(code));
        }
        if let Some(ttl) = self.ttl {
            s.push_str("; ttl=");
            s.push_str(num.format(ttl));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(key) = &self.key {
            // An sf-string: a token must not start with a digit (RFC 8941 §3.3.4).
            s.push_str("; key=\"");
            s.push_str(key);
            s.push('"');
        }
        if let Some(windows) = &self.protection {
            s.push_str("; protection=\"");
            s.push_str(windows);
            s.push('"');
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

    /// One row: what was observed, the header expected, the outcome expected.
    fn row(o: Observed, header: &str, outcome: CacheOutcome) {
        let (s, out) = decide(&o);
        assert_eq!(s.to_header_value(), header, "{o:?}");
        // RFC 9211 §2: a Structured Field List, parsed strictly.
        assert!(
            sfv::Parser::parse_list(header.as_bytes()).is_ok(),
            "{header:?} is not a valid structured field"
        );
        assert_eq!(out, outcome, "{o:?}");
    }

    #[test]
    fn decisions_table() {
        let base = Observed::default;
        row(
            Observed {
                bypass: Some(None),
                key: Some("ab".into()),
                ..base()
            },
            "aisle; fwd=bypass",
            CacheOutcome::Bypass,
        );
        row(
            Observed {
                bypass: Some(Some("not-json")),
                ..base()
            },
            "aisle; fwd=bypass; detail=not-json",
            CacheOutcome::Bypass,
        );
        row(
            Observed {
                phase: Some(Phase::Hit),
                lookup: Lookup::Fresh,
                ttl: Some(42),
                ..base()
            },
            "aisle; hit; ttl=42",
            CacheOutcome::Hit,
        );
        // Issue 18 item 8: a hit from another request's fill says `collapsed` (RFC 9211 §2.6).
        row(
            Observed {
                phase: Some(Phase::Hit),
                ttl: Some(5),
                collapsed: true,
                ..base()
            },
            "aisle; hit; ttl=5; collapsed",
            CacheOutcome::Hit,
        );
        // Issue 18 item 6: unquoted, a key starting with a digit is not a token.
        assert!(sfv::Parser::parse_list(b"aisle; hit; ttl=9; key=839d9967").is_err());
        row(
            Observed {
                phase: Some(Phase::Hit),
                ttl: Some(9),
                key: Some("839d9967".into()),
                ..base()
            },
            "aisle; hit; ttl=9; key=\"839d9967\"",
            CacheOutcome::Hit,
        );
        row(
            Observed {
                phase: Some(Phase::Stale),
                lookup: Lookup::Stale,
                ttl: Some(-3),
                ..base()
            },
            "aisle; fwd=stale; ttl=-3; detail=stale-while-revalidate",
            CacheOutcome::Stale,
        );
        row(
            Observed {
                phase: Some(Phase::Stale),
                stale_error: Some(Some(503)),
                ttl: Some(-7),
                ..base()
            },
            "aisle; fwd=stale; fwd-status=503; ttl=-7; detail=stale-if-error",
            CacheOutcome::Stale,
        );
        row(
            Observed {
                phase: Some(Phase::Hit),
                stale_error: Some(None),
                ttl: Some(-2),
                ..base()
            },
            "aisle; fwd=stale; ttl=-2; detail=stale-if-error",
            CacheOutcome::Stale,
        );
        for phase in [Phase::Hit, Phase::Stale] {
            row(
                Observed {
                    phase: Some(phase),
                    stale_error: Some(None),
                    stale_after: true,
                    ttl: Some(-4),
                    ..base()
                },
                "aisle; fwd=stale; ttl=-4; detail=stale-after",
                CacheOutcome::Stale,
            );
        }
        row(
            Observed {
                phase: Some(Phase::Hit),
                lookup: Lookup::Stale,
                quota_exhausted: true,
                ttl: Some(-95),
                ..base()
            },
            "aisle; fwd=stale; ttl=-95; detail=quota-exhausted",
            CacheOutcome::Stale,
        );
        row(
            Observed {
                phase: Some(Phase::Stale),
                stale_error: Some(None),
                ttl: Some(-1),
                ..base()
            },
            "aisle; fwd=stale; ttl=-1; detail=stale-if-error",
            CacheOutcome::Stale,
        );
        row(
            Observed {
                phase: Some(Phase::Revalidated { stored: true }),
                ttl: Some(60),
                ..base()
            },
            "aisle; fwd=stale; fwd-status=304; ttl=60; stored",
            CacheOutcome::Revalidated,
        );
        row(
            Observed {
                phase: Some(Phase::Revalidated { stored: false }),
                lookup: Lookup::Refused,
                ttl: Some(60),
                ..base()
            },
            "aisle; fwd=request; fwd-status=304; ttl=60",
            CacheOutcome::Revalidated,
        );
        row(
            Observed {
                phase: Some(Phase::Expired),
                upstream_status: Some(200),
                stored: true,
                ..base()
            },
            "aisle; fwd=stale; fwd-status=200; stored",
            CacheOutcome::Expired,
        );
        row(
            Observed {
                phase: Some(Phase::Expired),
                lookup: Lookup::Refused,
                upstream_status: Some(200),
                ..base()
            },
            "aisle; fwd=request; fwd-status=200",
            CacheOutcome::Expired,
        );
        row(
            Observed {
                lookup: Lookup::Stale,
                upstream_status: Some(500),
                ..base()
            },
            "aisle; fwd=stale; fwd-status=500",
            CacheOutcome::Expired,
        );
        row(
            Observed {
                lookup: Lookup::UriMiss,
                stored: true,
                ..base()
            },
            "aisle; fwd=uri-miss; stored",
            CacheOutcome::Miss,
        );
        row(
            Observed {
                lookup: Lookup::VaryMiss,
                stored: true,
                ..base()
            },
            "aisle; fwd=vary-miss; stored",
            CacheOutcome::Miss,
        );
        row(
            Observed {
                lookup: Lookup::Purged,
                stored: true,
                ..base()
            },
            "aisle; fwd=miss; stored; detail=purged",
            CacheOutcome::Miss,
        );
        row(
            Observed {
                lookup: Lookup::Refused,
                ..base()
            },
            "aisle; fwd=request",
            CacheOutcome::Miss,
        );
    }

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
