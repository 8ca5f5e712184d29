//! Tag templates: text with `{placeholder}`s, as in `"wedding:{path.id}"` (rules) or
//! `"vendor:{vendorId}"` (events). One splitter serves both; each caller says what a placeholder
//! may name and renders the pieces itself.

/// A piece of a template: literal text, or a placeholder the caller has parsed into `P`.
#[derive(Debug, Clone)]
pub enum Piece<P> {
    Text(Box<str>),
    Hole(P),
}

/// Splits a tag template. Tags have no spaces; every `{` needs its `}`.
pub fn split<P>(
    s: &str,
    mut hole: impl FnMut(&str) -> Result<P, String>,
) -> Result<Vec<Piece<P>>, String> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!("tag {s:?} must be non-empty and contain no spaces"));
    }
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].into()));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!(
                "tag template {s:?} has a '{{' without a closing '}}'"
            ));
        };
        pieces.push(Piece::Hole(
            hole(&after[..close]).map_err(|e| format!("tag template {s:?}: {e}"))?,
        ));
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!(
            "tag template {s:?} has a '}}' without an opening '{{'"
        ));
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.into()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &str) -> Result<Vec<String>, String> {
        Ok(split(s, |h| Ok(h.to_string()))?
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => format!("t:{t}"),
                Piece::Hole(h) => format!("h:{h}"),
            })
            .collect())
    }

    #[test]
    fn splits_and_checks() {
        assert_eq!(
            names("a:{x}:{y}b").unwrap(),
            vec!["t:a:", "h:x", "t::", "h:y", "t:b"]
        );
        assert!(names("a{x").unwrap_err().contains("closing"));
        assert!(names("a}").unwrap_err().contains("opening"));
        assert!(names("a b").unwrap_err().contains("no spaces"));
        assert!(names("").is_err());
        let err = split("x:{bad}", |_| Err::<(), _>("nope".to_string())).unwrap_err();
        assert_eq!(err, "tag template \"x:{bad}\": nope");
    }
}
