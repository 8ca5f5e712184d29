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

    fn lookup<'a>(&self, value: &'a str) -> Cow<'a, str> {
        let folded = fold(value);
        if let Some(hit) = self.map.get(folded.as_str()) {
            return Cow::Owned(hit.to_string());
        }
        // "Brooklyn, NY": try the city part before the first comma.
        if let Some((city, _)) = folded.split_once(',') {
            if let Some(hit) = self.map.get(city.trim()) {
                return Cow::Owned(hit.to_string());
            }
        }
        match self.fallback {
            Fallback::State => match folded.rsplit_once(',') {
                Some((_, state)) => Cow::Owned(state.trim().to_string()),
                None => Cow::Owned(folded),
            },
            Fallback::Keep => Cow::Owned(folded),
            Fallback::Drop => Cow::Borrowed(""),
        }
    }
}

/// Lowercase, whitespace collapsed, trimmed.
fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
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

    /// Applies this step.
    pub fn apply<'a>(&self, value: Cow<'a, str>) -> Cow<'a, str> {
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
                Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
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
            Normalizer::Text => Cow::Owned(fold(&value)),
            Normalizer::Table(table) => Cow::Owned(table.lookup(&value).into_owned()),
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
pub(crate) fn apply_all<'a>(steps: &[Normalizer], value: &'a str) -> Cow<'a, str> {
    let mut v = Cow::Borrowed(value);
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
        apply_all(&steps, v).into_owned()
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
        assert_eq!(keep.lookup("B, C"), "b, c");
        let drop = Table::new("t", [("a".to_string(), "x".to_string())], Fallback::Drop);
        assert_eq!(drop.lookup("zzz"), "");
        assert!(Fallback::parse("nope").is_err());
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
