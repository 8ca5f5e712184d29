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

#[cfg(test)]
mod tests {
    use super::*;

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
