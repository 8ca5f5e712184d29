//! Normalizers: make equivalent request values produce one cache key.
//!
//! `location=NYC`, `location=nyc` and `location= Brooklyn` should share an entry; a wedding on
//! 2027-07-14 and one on 2027-08-02 ask the same seasonal question. Each normalizer is a small
//! pure function from value to value; a vary field applies its list in order. Lookup tables
//! (`[tables.NAME]`) are compiled once and shared by every rule that names them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// What a lookup table answers for a value it does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The part after the last comma ("Austin, TX" -> "tx"), else the value itself.
    State,
    /// The (trimmed, lowercased) value itself.
    Keep,
    /// The empty string: every unknown value shares one entry.
    Drop,
}

impl Fallback {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "state" => Ok(Fallback::State),
            "keep" => Ok(Fallback::Keep),
            "drop" => Ok(Fallback::Drop),
            other => Err(format!(
                "unknown fallback {other:?}; expected \"state\", \"keep\" or \"drop\""
            )),
        }
    }
}

/// A compiled `[tables.NAME]` lookup table, e.g. city -> market.
#[derive(Debug)]
pub struct Table {
    pub name: Box<str>,
    map: HashMap<Box<str>, Box<str>>,
    fallback: Fallback,
}

impl Table {
    /// Builds a table; keys are matched case-insensitively with surrounding spaces ignored.
    pub fn new(
        name: &str,
        map: impl IntoIterator<Item = (String, String)>,
        fallback: Fallback,
    ) -> Self {
        let map = map
            .into_iter()
            .map(|(k, v)| (fold(&k).into_boxed_str(), v.into_boxed_str()))
            .collect();
        Table {
            name: name.into(),
            map,
            fallback,
        }
    }

    /// The table's value for `value` (compared folded), else the fallback's. A hit borrows the
    /// table's value, and a short ASCII value is folded on the stack: a lookup allocates only
    /// when it answers with a value of its own (issue 16: a realistic rule's keyed values).
    fn lookup<'a>(&'a self, value: Cow<'a, str>) -> Cow<'a, str> {
        let already = is_folded(&value);
        let mut stack = [0u8; STACK_FOLD];
        let heap: String;
        let folded: &str = if already {
            &value
        } else if let Some(f) = fold_ascii(&value, &mut stack) {
            f
        } else {
            heap = fold(&value);
            &heap
        };
        if let Some(hit) = self.map.get(folded) {
            return Cow::Borrowed(hit);
        }
        // "Brooklyn, NY": try the city part before the first comma.
        if let Some((city, _)) = folded.split_once(',') {
            if let Some(hit) = self.map.get(city.trim()) {
                return Cow::Borrowed(hit);
            }
        }
        match self.fallback {
            Fallback::State => {
                if let Some((_, state)) = folded.rsplit_once(',') {
                    return Cow::Owned(state.trim().to_string());
                }
            }
            Fallback::Keep => {}
            Fallback::Drop => return Cow::Borrowed(""),
        }
        // The folded value itself.
        if already {
            value
        } else {
            Cow::Owned(folded.to_string())
        }
    }
}

/// Values up to this long are folded on the stack for a table lookup.
const STACK_FOLD: usize = 128;

/// Whether [`fold`] leaves `s` as it is, told without allocating. Exact for ASCII (no
/// uppercase letter, no whitespace but single spaces between words); any other text is
/// reported as not folded, and folded the slow way.
fn is_folded(s: &str) -> bool {
    let b = s.as_bytes();
    b.first() != Some(&b' ')
        && b.last() != Some(&b' ')
        && !b.windows(2).any(|w| w == b"  ")
        && b.iter().all(|&c| {
            c.is_ascii() && !c.is_ascii_uppercase() && (c == b' ' || !(c as char).is_whitespace())
        })
}

/// [`fold`] of an ASCII value into `buf`, if it fits (`None`: not ASCII, or too long).
fn fold_ascii<'b>(s: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    if !s.is_ascii() || s.len() > buf.len() {
        return None;
    }
    let mut n = 0;
    // ASCII in, ASCII out, one byte a character and never longer than `s`.
    for c in folded_chars(s) {
        buf[n] = c as u8;
        n += 1;
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// Lowercase, whitespace collapsed, trimmed.
fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    out.extend(folded_chars(s));
    out
}

/// The characters [`fold`] (and [`fold_ascii`]) write: the words lowercased, one space between.
fn folded_chars(s: &str) -> impl Iterator<Item = char> + '_ {
    s.split_whitespace().enumerate().flat_map(|(i, word)| {
        (i > 0)
            .then_some(' ')
            .into_iter()
            .chain(word.chars().flat_map(char::to_lowercase))
    })
}

/// One normalization step.
#[derive(Debug, Clone)]
pub enum Normalizer {
    Lowercase,
    Uppercase,
    Trim,
    /// A comma-separated list, items trimmed, empty items dropped, sorted and deduplicated.
    SortedList,
    /// A number floored to a multiple of the bucket width; non-numbers are kept as they are.
    Bucket(f64),
    /// An ISO date (`2027-07-14`, `2027-07`, or an RFC 3339 timestamp) to its meteorological
    /// northern-hemisphere season: `winter`, `spring`, `summer`, `fall`.
    Season,
    /// Free text: case-folded, whitespace collapsed, trimmed.
    Text,
    Table(Arc<Table>),
}

/// Feeds `bytes` into a generation hash, length first, so no two sequences frame alike.
pub(crate) fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

impl Normalizer {
    /// Feeds what this step does into a rule's generation ([`super::Rule::generation`]): the
    /// same on every instance of a fleet (a table's entries are fed sorted).
    pub(crate) fn fingerprint(&self, h: &mut blake3::Hasher) {
        match self {
            Normalizer::Bucket(width) => {
                put(h, b"bucket");
                put(h, &width.to_bits().to_le_bytes());
            }
            Normalizer::Table(table) => {
                put(h, b"table");
                put(h, table.name.as_bytes());
                let mut entries: Vec<_> = table.map.iter().collect();
                entries.sort_unstable();
                for (k, v) in entries {
                    put(h, k.as_bytes());
                    put(h, v.as_bytes());
                }
                put(h, format!("{:?}", table.fallback).as_bytes());
            }
            unit => put(h, format!("{unit:?}").as_bytes()),
        }
    }

    /// Parses a normalizer name; `tables` resolves names of lookup tables.
    pub fn parse(name: &str, tables: &HashMap<String, Arc<Table>>) -> Result<Self, String> {
        Ok(match name {
            "lowercase" => Normalizer::Lowercase,
            "uppercase" => Normalizer::Uppercase,
            "trim" => Normalizer::Trim,
            "sorted_list" => Normalizer::SortedList,
            "season" => Normalizer::Season,
            "text" => Normalizer::Text,
            _ => {
                if let Some(width) = name.strip_prefix("bucket:") {
                    match width.trim().parse::<f64>() {
                        Ok(w) if w > 0.0 && w.is_finite() => Normalizer::Bucket(w),
                        _ => {
                            return Err(format!(
                                "bad bucket width in {name:?}; write a positive number, like \"bucket:1000\""
                            ))
                        }
                    }
                } else if let Some(table) = tables.get(name) {
                    Normalizer::Table(table.clone())
                } else {
                    let mut known: Vec<&str> = tables.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    return Err(format!(
                        "unknown normalizer {name:?}; expected lowercase, uppercase, trim, sorted_list, bucket:N, season, text{}{}",
                        if known.is_empty() { "" } else { " or a table: " },
                        known.join(", ")
                    ));
                }
            }
        })
    }

    /// Applies this step. The result borrows the value, or a lookup table's entry, where it
    /// can.
    pub fn apply<'a>(&'a self, value: Cow<'a, str>) -> Cow<'a, str> {
        match self {
            Normalizer::Lowercase => {
                if value.chars().any(char::is_uppercase) {
                    Cow::Owned(value.to_lowercase())
                } else {
                    value
                }
            }
            Normalizer::Uppercase => {
                if value.chars().any(char::is_lowercase) {
                    Cow::Owned(value.to_uppercase())
                } else {
                    value
                }
            }
            Normalizer::Trim => match value {
                Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
                // Trimmed where it is (a decoded query value is owned).
                Cow::Owned(mut s) => {
                    s.truncate(s.trim_end().len());
                    let start = s.len() - s.trim_start().len();
                    s.drain(..start);
                    Cow::Owned(s)
                }
            },
            Normalizer::SortedList => {
                let mut items: Vec<&str> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                items.sort_unstable();
                items.dedup();
                Cow::Owned(items.join(","))
            }
            Normalizer::Bucket(width) => match value.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => match bucket(n, *width) {
                    Some(floored) => Cow::Owned(format_number(floored)),
                    None => value,
                },
                _ => value,
            },
            Normalizer::Season => match season(value.trim()) {
                Some(s) => Cow::Borrowed(s),
                None => value,
            },
            Normalizer::Text if is_folded(&value) => value,
            Normalizer::Text => Cow::Owned(fold(&value)),
            Normalizer::Table(table) => table.lookup(value),
        }
    }
}

/// The lower bound of `n`'s bucket of `width`, picked inside that same bucket: `k * width` can
/// round to just below the bound, where normalizing the label again would give the bucket below
/// (found by fuzzing: `4692.1e9` with `bucket:860459076.9185034`). `None` (keep the value) more
/// than 2^52 buckets from zero, where floats no longer tell neighbouring buckets apart.
fn bucket(n: f64, width: f64) -> Option<f64> {
    let k = (n / width).floor();
    if !k.is_finite() || k.abs() >= (1u64 << 52) as f64 {
        return None;
    }
    let mut m = k * width;
    for _ in 0..16 {
        let q = (m / width).floor();
        if q == k {
            return Some(m);
        }
        m = step(m, q < k);
    }
    None
}

/// The next float above (or below) a finite `x` (`f64::next_up` needs Rust 1.86).
fn step(x: f64, up: bool) -> f64 {
    if x == 0.0 {
        let tiny = f64::from_bits(1);
        return if up { tiny } else { -tiny };
    }
    let bits = x.to_bits();
    f64::from_bits(if (x > 0.0) == up { bits + 1 } else { bits - 1 })
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn season(s: &str) -> Option<&'static str> {
    let month: u32 = if s.len() >= 10 {
        // `get`, not `[..10]`: the value is the client's, and byte 10 may fall inside a
        // character (`2027-07-1é`); such a value is no date and is kept as it is.
        chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d")
            .ok()
            .map(|d| chrono::Datelike::month(&d))?
    } else if s.len() == 7 {
        chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
            .ok()
            .map(|d| chrono::Datelike::month(&d))?
    } else {
        return None;
    };
    Some(match month {
        3..=5 => "spring",
        6..=8 => "summer",
        9..=11 => "fall",
        _ => "winter",
    })
}

/// Applies a list of normalizers in order.
pub(crate) fn apply_all<'a>(steps: &'a [Normalizer], value: Cow<'a, str>) -> Cow<'a, str> {
    let mut v = value;
    for step in steps {
        v = step.apply(v);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn market() -> Arc<Table> {
        Arc::new(Table::new(
            "market",
            [
                ("New York".to_string(), "nyc".to_string()),
                ("brooklyn".to_string(), "nyc".to_string()),
                ("San  Francisco".to_string(), "sf-bay".to_string()),
            ],
            Fallback::State,
        ))
    }

    fn tables() -> HashMap<String, Arc<Table>> {
        HashMap::from([("market".to_string(), market())])
    }

    fn run(names: &[&str], v: &str) -> String {
        let t = tables();
        let steps: Vec<Normalizer> = names
            .iter()
            .map(|n| Normalizer::parse(n, &t).unwrap())
            .collect();
        apply_all(&steps, Cow::Borrowed(v)).into_owned()
    }

    #[test]
    fn case_and_trim() {
        assert_eq!(run(&["lowercase"], "NYC"), "nyc");
        assert_eq!(run(&["uppercase"], "ny"), "NY");
        assert_eq!(run(&["trim"], "  nyc \t"), "nyc");
        assert_eq!(run(&["trim", "lowercase"], " NyC "), "nyc");
    }

    #[test]
    fn sorted_list() {
        assert_eq!(
            run(&["sorted_list"], "venue, caterer,,photographer,venue"),
            "caterer,photographer,venue"
        );
        assert_eq!(run(&["sorted_list"], ""), "");
    }

    #[test]
    fn bucket() {
        assert_eq!(run(&["bucket:1000"], "5400"), "5000");
        assert_eq!(run(&["bucket:1000"], "999.99"), "0");
        assert_eq!(run(&["bucket:0.5"], "1.7"), "1.5");
        assert_eq!(
            run(&["bucket:1000"], "cheap"),
            "cheap",
            "non-numbers are kept"
        );
        assert!(Normalizer::parse("bucket:0", &tables()).is_err());
        // A bucket's label is in that bucket: normalizing it again changes nothing.
        let w = Normalizer::Bucket(860459076.9185034);
        let once = w.apply(Cow::Borrowed("4692.1e9")).into_owned();
        assert_eq!(w.apply(Cow::Borrowed(&once)), once);
        assert_eq!(
            run(&["bucket:0.1"], "0.7"),
            run(&["bucket:0.1"], &run(&["bucket:0.1"], "0.7"))
        );
        assert_eq!(step(1.0, true), 1.0f64 + f64::EPSILON);
        assert!(step(-1.0, true) > -1.0 && step(-1.0, false) < -1.0);
        assert!(step(0.0, true) > 0.0 && step(0.0, false) < 0.0);
        // Past 2^52 buckets, floats cannot tell them apart: kept as written.
        assert_eq!(run(&["bucket:0.000001"], "1e300"), "1e300");
        assert!(Normalizer::parse("bucket:x", &tables()).is_err());
    }

    #[test]
    fn season_of_dates() {
        assert_eq!(run(&["season"], "2027-07-14"), "summer");
        assert_eq!(run(&["season"], "2027-12-01"), "winter");
        assert_eq!(run(&["season"], "2028-02-29"), "winter");
        assert_eq!(run(&["season"], "2027-04"), "spring");
        assert_eq!(run(&["season"], "2027-10-03T15:00:00Z"), "fall");
        assert_eq!(run(&["season"], "someday"), "someday");
        assert_eq!(run(&["season"], "2027-13-01"), "2027-13-01");
    }

    #[test]
    fn season_of_text_that_is_no_date_keeps_it_without_panicking() {
        // Byte 10 falls inside 'é' (issue 9, item 14): no slicing through a character.
        assert_eq!(run(&["season"], "2027-07-1é"), "2027-07-1é");
        assert_eq!(run(&["season"], "2027-07-é"), "2027-07-é");
        assert_eq!(run(&["season"], "日本語の日付です"), "日本語の日付です");
        assert_eq!(run(&["season"], "2027-07-14é"), "summer");
    }

    #[test]
    fn text() {
        assert_eq!(
            run(&["text"], "  Best   VENUES\nin Austin "),
            "best venues in austin"
        );
    }

    #[test]
    fn table_with_state_fallback() {
        assert_eq!(run(&["market"], "NEW YORK"), "nyc");
        assert_eq!(run(&["market"], " Brooklyn, NY"), "nyc");
        assert_eq!(run(&["market"], "san francisco"), "sf-bay");
        assert_eq!(run(&["market"], "Austin, TX"), "tx");
        assert_eq!(run(&["market"], "Smallville"), "smallville");
    }

    #[test]
    fn table_fallbacks() {
        let keep = Table::new("t", [("a".to_string(), "x".to_string())], Fallback::Keep);
        assert_eq!(keep.lookup(Cow::Borrowed("B, C")), "b, c");
        assert_eq!(keep.lookup(Cow::Borrowed("b, c")), "b, c");
        assert_eq!(keep.lookup(Cow::Borrowed(" B,\u{0B}Ç ")), "b, ç");
        let drop = Table::new("t", [("a".to_string(), "x".to_string())], Fallback::Drop);
        assert_eq!(drop.lookup(Cow::Borrowed("zzz")), "");
        assert!(Fallback::parse("nope").is_err());
    }

    #[test]
    fn folding_without_allocating_is_folding() {
        // Cased letters, each kind of whitespace fold treats alike (\x0B is Unicode White_Space
        // but not `u8::is_ascii_whitespace`), punctuation, and a non-ASCII letter.
        let alphabet = ['a', 'Z', ' ', '\t', '\u{0B}', '\n', ',', 'é', 'Ñ'];
        let all = crate::rules::every_string(&alphabet, 5);
        assert_eq!(all.len(), 66_430);
        let mut stack = [0u8; STACK_FOLD];
        for s in &all {
            let folded = fold(s);
            if is_folded(s) {
                assert_eq!(folded, *s, "{s:?} is not folded");
            } else if s.is_ascii() {
                assert_ne!(folded, *s, "{s:?} is folded");
            }
            match fold_ascii(s, &mut stack) {
                Some(f) => assert_eq!(f, folded, "{s:?}"),
                None => assert!(!s.is_ascii(), "{s:?}"),
            }
            // Trimmed in place or borrowed, the same text.
            let step = Normalizer::Trim;
            assert_eq!(step.apply(Cow::Owned(s.clone())), s.trim(), "{s:?}");
            assert_eq!(step.apply(Cow::Borrowed(s)), s.trim(), "{s:?}");
        }
        let long = "A".repeat(STACK_FOLD + 1);
        assert_eq!(fold_ascii(&long, &mut stack), None);
    }

    #[test]
    fn table_lookups_answer_as_before_and_borrow_their_hits() {
        // The lookup as it was, allocating: what every answer must still be.
        fn reference(t: &Table, value: &str) -> String {
            let folded = fold(value);
            if let Some(hit) = t.map.get(folded.as_str()) {
                return hit.to_string();
            }
            if let Some((city, _)) = folded.split_once(',') {
                if let Some(hit) = t.map.get(city.trim()) {
                    return hit.to_string();
                }
            }
            match t.fallback {
                Fallback::State => match folded.rsplit_once(',') {
                    Some((_, state)) => state.trim().to_string(),
                    None => folded,
                },
                Fallback::Keep => folded,
                Fallback::Drop => String::new(),
            }
        }
        let tables = [
            Table::new(
                "t",
                [
                    ("a z".to_string(), "x".to_string()),
                    ("é".to_string(), "y".to_string()),
                ],
                Fallback::State,
            ),
            Table::new("t", [("a".to_string(), "x".to_string())], Fallback::Keep),
            Table::new("t", [("z".to_string(), "x".to_string())], Fallback::Drop),
        ];
        let alphabet = ['a', 'Z', ' ', '\t', ',', 'é'];
        for s in crate::rules::every_string(&alphabet, 5) {
            for t in &tables {
                assert_eq!(t.lookup(Cow::Borrowed(&s)), reference(t, &s), "{s:?}");
                assert_eq!(t.lookup(Cow::Owned(s.clone())), reference(t, &s), "{s:?}");
            }
        }
        // A hit is the table's own value, however the request spelled it: nothing allocated.
        let market = market();
        for spelled in ["brooklyn", "Brooklyn", " BROOKLYN ", "Brooklyn,  NY"] {
            let got = market.lookup(Cow::Borrowed(spelled));
            assert!(matches!(got, Cow::Borrowed("nyc")), "{spelled:?}: {got:?}");
        }
        // A value already folded is kept as it came.
        assert!(matches!(
            market.lookup(Cow::Borrowed("smallville")),
            Cow::Borrowed("smallville")
        ));
    }

    #[test]
    fn unknown_names_list_alternatives() {
        let err = Normalizer::parse("city", &tables()).unwrap_err();
        assert!(
            err.contains("unknown normalizer \"city\"") && err.contains("market"),
            "{err}"
        );
    }
}
