//! Host patterns of `match = { host = ... }`: `api.example.com` or `*.example.com`.
//!
//! Compared case-insensitively without allocating at request time; [`HostMatch::covers`] is
//! what the shadowing check at load time asks, as [`super::path::PathPattern::covers`] is for
//! paths.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HostMatch {
    Exact(Box<str>),
    /// `*.example.com`: the suffix including the dot.
    Suffix(Box<str>),
}

impl HostMatch {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!(
                    "bad host pattern {s:?}; write \"api.example.com\" or \"*.example.com\""
                ));
            }
            return Ok(HostMatch::Suffix(format!(".{rest}").into()));
        }
        if s.is_empty() || s.contains('*') || s.contains('/') {
            return Err(format!(
                "bad host pattern {s:?}; write \"api.example.com\" or \"*.example.com\""
            ));
        }
        Ok(HostMatch::Exact(s.into()))
    }

    pub(super) fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            // Compared as bytes: slicing the text could cut a multi-byte char and panic.
            HostMatch::Suffix(sfx) => {
                let (host, sfx) = (host.as_bytes(), sfx.as_bytes());
                host.len() > sfx.len() && host[host.len() - sfx.len()..].eq_ignore_ascii_case(sfx)
            }
        }
    }

    pub(super) fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Suffix(a), HostMatch::Exact(b)) => b.ends_with(&**a) && b.len() > a.len(),
            (HostMatch::Suffix(a), HostMatch::Suffix(b)) => b.ends_with(&**a),
            (HostMatch::Exact(_), HostMatch::Suffix(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_never_slice_inside_a_char() {
        let m = HostMatch::parse("*.example.com").unwrap();
        assert!(m.matches("API.Example.com"));
        assert!(!m.matches("example.com"));
        // ".example.com" is 12 bytes; 12 bytes from the end falls inside 'é'.
        assert!(!m.matches("éexample.com"));
        assert!(!m.matches("ééééééé"));
        assert!(m.matches("API.Example.COM"));
        assert!(!m.matches(".example.com") && !m.matches("example.com"));
        // 13 bytes: the 12-byte suffix starts inside 'é' (a str slice there panicked).
        assert!(!m.matches("é.example.co"));
        assert!(m.matches("é.example.com"));
    }
}
