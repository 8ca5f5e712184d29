//! Tag templates: text with `{placeholder}`s, as in `"wedding:{path.id}"` (rules) or
//! `"vendor:{vendorId}"` (events). One splitter serves both; each caller says what a placeholder
//! may name and renders the pieces itself.
//!
//! Also the one canonical form of a tag ([`tag_key`]), shared by everything that stores a tag
//! (rule templates rendered from request values, event names, origin `Surrogate-Key` /
//! `Cache-Tag` / `xkey` / `Cache-Groups`) and everything that purges one (the admin API, `PURGE`
//! with `Surrogate-Key`, events, webhooks, `Cache-Group-Invalidation`):
//!
//! - bytes that cannot travel in a tag list are percent-encoded (uppercase hex): whitespace and
//!   control characters, non-ASCII, `,` (the `Cache-Tag` separator) and `"` (`Cache-Groups`
//!   quoting). `%` itself is kept, so the form is idempotent: a purge may name the raw value
//!   (`vendor-type:wedding planner`, in JSON) or its rendered form
//!   (`vendor-type:wedding%20planner`, in a space-separated header) and reach the same entries.
//!   Two values that differ only by such an escape share a tag: a purge may then reach more
//!   entries than named, never fewer.
//! - a canonical tag longer than [`MAX_TAG_LEN`] bytes keeps its first bytes and ends with `~` and
//!   16 hex digits of its BLAKE3 digest, so an entry never holds more than [`MAX_TAG_LEN`] bytes
//!   per tag however long a request value is, and a purge naming the full tag still reaches it.

use std::borrow::Cow;

/// Longest tag an entry carries, in bytes of its canonical form; longer ones are cut and end
/// with `~` and a digest of the whole (see [`tag_key`]).
pub const MAX_TAG_LEN: usize = 256;
/// Most tags one entry may carry (its rule's templates and `invalidate_on` names and the
/// origin's tag headers together). A response with more is not stored: a tag dropped would be a
/// purge that silently misses the entry.
pub const MAX_TAGS: usize = 256;
/// Hex digits of the digest that ends a cut tag.
const DIGEST_HEX: usize = 16;

/// Whether a byte stands for itself in a canonical tag.
fn plain(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b',' && b != b'"'
}

/// `s` with every byte that cannot travel in a tag list percent-encoded (whitespace, control
/// characters, non-ASCII, `,` and `"`); borrowed when nothing needed escaping. Idempotent, and
/// always ASCII.
pub fn escape_tag(s: &str) -> Cow<'_, str> {
    if s.bytes().all(plain) {
        return Cow::Borrowed(s);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len() + 16);
    for b in s.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    Cow::Owned(out)
}

/// The form a tag is stored and purged under: [`escape_tag`], then cut to [`MAX_TAG_LEN`] bytes
/// (the first bytes, `~`, and 16 hex digits of the BLAKE3 digest of the whole escaped tag).
/// Idempotent.
pub fn tag_key(s: &str) -> Cow<'_, str> {
    let escaped = escape_tag(s);
    if escaped.len() <= MAX_TAG_LEN {
        return escaped;
    }
    let digest = blake3::hash(escaped.as_bytes());
    let keep = MAX_TAG_LEN - 1 - DIGEST_HEX;
    // The escaped form is ASCII, so any byte offset is a character boundary.
    let head = escaped.get(..keep).unwrap_or_default();
    let hex = digest.to_hex();
    Cow::Owned(format!("{head}~{}", &hex.as_str()[..DIGEST_HEX]))
}

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
    fn tags_escape_what_tag_lists_cannot_carry() {
        assert!(matches!(tag_key("vendor:v-7"), Cow::Borrowed("vendor:v-7")));
        assert_eq!(
            tag_key("vendor-type:wedding planner"),
            "vendor-type:wedding%20planner"
        );
        assert_eq!(tag_key("t:a,b\"c\t\n\u{7f}"), "t:a%2Cb%22c%09%0A%7F");
        assert_eq!(tag_key("city:Zürich"), "city:Z%C3%BCrich");
        // The rendered form is its own canonical form: a purge may name either.
        for raw in [
            "vendor-type:wedding planner",
            "city:Zürich",
            "100%",
            "a%20b",
        ] {
            let once = tag_key(raw).into_owned();
            assert_eq!(tag_key(&once), once, "idempotent on {raw:?}");
            assert!(once.bytes().all(|b| b.is_ascii_graphic()), "{once:?}");
        }
        assert_eq!(
            tag_key("a%20b"),
            tag_key("a b"),
            "a shared tag over-purges, never under"
        );
    }

    #[test]
    fn long_tags_are_cut_with_a_digest() {
        let exact = format!("t:{}", "x".repeat(MAX_TAG_LEN - 2));
        assert_eq!(tag_key(&exact), exact, "up to the cap a tag is kept whole");
        let long = format!("t:{}", "x".repeat(10_000));
        let cut = tag_key(&long).into_owned();
        assert_eq!(cut.len(), MAX_TAG_LEN);
        assert!(cut.starts_with("t:xxx"));
        assert_eq!(cut.as_bytes()[MAX_TAG_LEN - 1 - DIGEST_HEX], b'~');
        assert_eq!(tag_key(&cut), cut, "idempotent");
        assert_eq!(
            tag_key(&long),
            cut,
            "the same long tag always cuts the same"
        );
        let other = format!("t:{}y", "x".repeat(9_999));
        assert_ne!(tag_key(&other), cut, "tags sharing a prefix stay apart");
        // Escaping happens before the cut, so a cut never splits a character.
        let wide = format!("t:{}", "é".repeat(1000));
        let cut = tag_key(&wide);
        assert_eq!(cut.len(), MAX_TAG_LEN);
        assert!(cut.is_ascii());
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
