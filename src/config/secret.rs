//! A configured value that must never be printed (CDN tokens, keys).
//!
//! `Debug` says `<redacted>`, so a struct holding secrets can derive `Debug` and a new secret field
//! cannot leak through it; the value is read only where it is sent, with [`Secret::expose`].

use serde::Deserialize;
use std::fmt;

/// A secret string: deserialized like a `String`, printed as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

/// A URL as it may be printed: any userinfo (`user:password@`) becomes `<redacted>@`. Every
/// diagnostic that shows a URL after `${VAR}` expansion goes through it, since a password in a
/// Redis, upstream or purge URL usually comes from the environment precisely to stay out of
/// files and logs.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &rest[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_userinfo() {
        assert_eq!(
            redact_url("redis://:pw@10.0.0.1:6379/0"),
            "redis://<redacted>@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("http://user:p@ss@host/a@b"),
            "http://<redacted>@host/a@b"
        );
        assert_eq!(redact_url("user:pw@host:1"), "<redacted>@host:1");
        assert_eq!(redact_url("http://host/x?u=a@b"), "http://host/x?u=a@b");
    }

    #[test]
    fn never_printed_but_exposed_where_sent() {
        let s = Secret::from("sekrit");
        assert_eq!(
            format!("{s:?} {:?}", Some(&s)),
            "<redacted> Some(<redacted>)"
        );
        assert_eq!(s.expose(), "sekrit");
    }
}
