//! Path patterns: `/api/vendors/:id`, `/api/weddings/:id/timeline`, `/static/*`.
//!
//! A pattern is compiled once into segments; matching walks the request path's segments without
//! allocating and records each `:param` as a byte range of the path. `covers` answers "does
//! pattern A match every path B matches?", which is how shadowed rules are detected at load time.

use std::ops::Range;

/// At most this many `:param` segments per pattern (keeps captures on the stack).
pub const MAX_PARAMS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// Index into the pattern's parameter names.
    Param(usize),
}

/// A compiled path pattern.
#[derive(Debug, Clone)]
pub struct PathPattern {
    source: Box<str>,
    segments: Vec<Segment>,
    params: Vec<Box<str>>,
    /// A trailing `*`: any number (including zero) of further segments.
    wildcard: bool,
}

/// The `:param` values captured by a match, as byte ranges of the request path.
#[derive(Debug, Clone, Default)]
pub struct PathParams {
    ranges: [(u32, u32); MAX_PARAMS],
    len: u8,
}

impl PathParams {
    /// The captured value of parameter `index` within `path`.
    pub fn get<'p>(&self, path: &'p str, index: usize) -> Option<&'p str> {
        if index >= self.len as usize {
            return None;
        }
        let (s, e) = self.ranges[index];
        path.get(s as usize..e as usize)
    }

    fn push(&mut self, range: Range<usize>) {
        self.ranges[self.len as usize] = (range.start as u32, range.end as u32);
        self.len += 1;
    }
}

impl PathPattern {
    /// Compiles a pattern, or says what is wrong with it.
    pub fn parse(source: &str) -> Result<Self, String> {
        let Some(rest) = source.strip_prefix('/') else {
            return Err(format!("path pattern {source:?} must start with '/'"));
        };
        let mut segments = Vec::new();
        let mut params: Vec<Box<str>> = Vec::new();
        let mut wildcard = false;
        let parts: Vec<&str> = rest.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if *part == "*" {
                if i + 1 != parts.len() {
                    return Err(format!(
                        "path pattern {source:?}: '*' is only allowed as the last segment"
                    ));
                }
                wildcard = true;
            } else if let Some(name) = part.strip_prefix(':') {
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(format!(
                        "path pattern {source:?}: bad parameter name {part:?} (use letters, digits and '_', like :id)"
                    ));
                }
                if params.iter().any(|p| &**p == name) {
                    return Err(format!(
                        "path pattern {source:?}: parameter :{name} appears twice"
                    ));
                }
                if params.len() == MAX_PARAMS {
                    return Err(format!(
                        "path pattern {source:?}: more than {MAX_PARAMS} parameters"
                    ));
                }
                segments.push(Segment::Param(params.len()));
                params.push(name.into());
            } else if part.contains('*') || part.contains(':') {
                return Err(format!(
                    "path pattern {source:?}: segment {part:?} mixes text with ':' or '*'; a parameter takes a whole segment (\"/:id\") and '*' only ends a pattern (\"/static/*\")"
                ));
            } else {
                segments.push(Segment::Literal((*part).into()));
            }
        }
        if source.contains('?') {
            return Err(format!(
                "path pattern {source:?} must not contain a query; vary on query parameters instead"
            ));
        }
        Ok(PathPattern {
            source: source.into(),
            segments,
            params,
            wildcard,
        })
    }

    /// Whether the path is fully determined by the literal segments and the values of `params`
    /// (no wildcard, and every parameter is among `params`).
    pub fn determined_by(&self, mut params: impl FnMut(usize) -> bool) -> bool {
        !self.wildcard && (0..self.params.len()).all(&mut params)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Index of the parameter called `name`.
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| &**p == name)
    }

    /// Matches a request path (without query), capturing parameters. The path is split on
    /// `/` bytes by a plain loop: every rule is tried on every request, and `str::split`'s
    /// searcher setup cost more than the short segments it scanned (issue 16).
    pub fn matches(&self, path: &str) -> Option<PathParams> {
        let rest = path.strip_prefix('/')?.as_bytes();
        let mut params = PathParams::default();
        let mut offset = 1;
        let mut parts = rest.split(|&b| b == b'/');
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) => {
                    if lit.as_bytes() != part {
                        return None;
                    }
                }
                Segment::Param(_) => {
                    if part.is_empty() {
                        return None;
                    }
                    params.push(offset..offset + part.len());
                }
            }
            offset += part.len() + 1;
        }
        if self.wildcard || parts.next().is_none() {
            Some(params)
        } else {
            None
        }
    }

    /// True when every path that `other` matches is also matched by `self`.
    pub fn covers(&self, other: &PathPattern) -> bool {
        for (i, theirs) in other.segments.iter().enumerate() {
            match self.segments.get(i) {
                None => return self.wildcard,
                Some(Segment::Param(_)) => {
                    if matches!(theirs, Segment::Literal(l) if l.is_empty()) {
                        return false;
                    }
                }
                Some(Segment::Literal(mine)) => match theirs {
                    Segment::Literal(t) if t == mine => {}
                    _ => return false,
                },
            }
        }
        if self.segments.len() > other.segments.len() {
            return false;
        }
        !other.wildcard || self.wildcard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn literal_and_params() {
        let pat = p("/api/weddings/:id/timeline");
        let path = "/api/weddings/w-42/timeline";
        let m = pat.matches(path).unwrap();
        assert_eq!(m.get(path, 0), Some("w-42"));
        assert!(
            pat.matches("/api/weddings//timeline").is_none(),
            "empty param"
        );
        assert!(pat.matches("/api/weddings/1/timeline/x").is_none());
        assert!(pat.matches("/api/weddings/1").is_none());
        assert!(p("/api/vendors/search")
            .matches("/api/vendors/search")
            .is_some());
        assert!(p("/api/vendors/search")
            .matches("/api/vendors/searchx")
            .is_none());
    }

    /// The byte split captures the same ranges as splitting the text did, whatever the
    /// segments hold (multi-byte characters, escapes, empty trailing segments).
    #[test]
    fn captures_are_ranges_of_the_path() {
        let pat = p("/v/:a/x/:b");
        for (path, a, b) in [
            ("/v/é-1/x/ü", "é-1", "ü"),
            ("/v/%2F/x/%C3%A9", "%2F", "%C3%A9"),
            ("/v/日本/x/語", "日本", "語"),
        ] {
            let m = pat.matches(path).unwrap();
            assert_eq!(
                (m.get(path, 0), m.get(path, 1)),
                (Some(a), Some(b)),
                "{path}"
            );
        }
        assert!(pat.matches("/v/a/y/b").is_none());
        assert!(pat.matches("/v/a/x/").is_none(), "empty last parameter");
        assert!(pat.matches("/v/a/x/b/").is_none(), "trailing segment");
        assert!(p("/v/").matches("/v/").is_some());
        assert!(p("/v/").matches("/v").is_none());
    }

    #[test]
    fn wildcard() {
        let pat = p("/static/*");
        assert!(pat.matches("/static").is_some());
        assert!(pat.matches("/static/").is_some());
        assert!(pat.matches("/static/a/b/c").is_some());
        assert!(pat.matches("/staticx").is_none());
        assert!(p("/*").matches("/anything/at/all").is_some());
    }

    #[test]
    fn bad_patterns() {
        assert!(PathPattern::parse("api")
            .unwrap_err()
            .contains("start with '/'"));
        assert!(PathPattern::parse("/a/*/b")
            .unwrap_err()
            .contains("last segment"));
        assert!(PathPattern::parse("/a/:1x")
            .unwrap_err()
            .contains("parameter name"));
        assert!(PathPattern::parse("/a/x:y")
            .unwrap_err()
            .contains("whole segment"));
        assert!(PathPattern::parse("/a/:id/:id")
            .unwrap_err()
            .contains("twice"));
        assert!(PathPattern::parse("/a?x=1").unwrap_err().contains("query"));
    }

    #[test]
    fn coverage() {
        assert!(p("/api/*").covers(&p("/api/vendors/:id")));
        assert!(p("/api/vendors/:id").covers(&p("/api/vendors/search")));
        assert!(!p("/api/vendors/search").covers(&p("/api/vendors/:id")));
        assert!(!p("/api/vendors/:id").covers(&p("/api/vendors/*")));
        assert!(p("/api/vendors/*").covers(&p("/api/vendors/*")));
        assert!(!p("/api/vendors/:id").covers(&p("/api/vendors/:id/reviews")));
        assert!(!p("/a/b/c").covers(&p("/a/b")));
        assert!(p("/a/:x").covers(&p("/a/:y")));
    }
}
