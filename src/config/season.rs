//! `[[season]]`: parts of the year when rules' TTLs change ("April to October carries three
//! times the traffic", issue 14).
//!
//! A season is a month-day range that repeats every year (`from = "04-01"`, `to = "10-31"`,
//! both days included, in a time zone; a range may wrap the new year) with a `ttl_multiplier`
//! for rules' `ttl`. A rule may instead name its TTL per season (`season_ttl`, in the rules
//! compiler); the names it uses are checked against these tables by [`super`]. Shaped like
//! [`super::protection`]: raw serde structs with positions, every problem at `file:line:col`,
//! and a plain "is it active at this instant" for the fill path (no allocation, no lock).
//! Seasons may not overlap (which one applies would be a guess), so at most one is active.

use crate::diag::{Diagnostic, SourceFile};
use chrono::{Datelike, NaiveDate, TimeZone};
use chrono_tz::Tz;
use serde::Deserialize;
use toml::Spanned;

/// The name `season_ttl` uses for "outside every season"; no season may be called so.
pub const OFF: &str = "off";

/// `[[season]]` as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSeason {
    name: Spanned<String>,
    from: Spanned<String>,
    to: Spanned<String>,
    tz: Option<Spanned<String>>,
    ttl_multiplier: Option<Spanned<f64>>,
}

/// A compiled `[[season]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Season {
    pub name: String,
    /// (month, day), first day included.
    from: (u32, u32),
    /// (month, day), last day included; before `from`: the range wraps the new year.
    to: (u32, u32),
    tz: Tz,
    /// Rules' `ttl` times this while the season is on (1.0 when not written).
    pub ttl_multiplier: f64,
}

impl Season {
    /// Whether the season is on at unix millisecond `at_ms` (in its time zone).
    pub fn active_at(&self, at_ms: u64) -> bool {
        let Some(utc) = chrono::DateTime::from_timestamp_millis(at_ms as i64) else {
            return false;
        };
        let local = self.tz.from_utc_datetime(&utc.naive_utc());
        self.contains((local.month(), local.day()))
    }

    fn contains(&self, md: (u32, u32)) -> bool {
        if self.from <= self.to {
            self.from <= md && md <= self.to
        } else {
            md >= self.from || md <= self.to
        }
    }
}

/// `MM-DD` (Feb 29 allowed: it exists in leap years).
fn month_day(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{text:?} is not a month and day; write \"MM-DD\", e.g. \"04-01\"");
    let (m, d) = text.trim().split_once('-').ok_or_else(bad)?;
    let (m, d): (u32, u32) = (m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    // 2000 is a leap year, so every day that exists in some year is accepted.
    NaiveDate::from_ymd_opt(2000, m, d).ok_or_else(bad)?;
    Ok((m, d))
}

/// Compiles the `[[season]]` tables; problems go to `diags` at their position.
pub(super) fn compile(
    src: &SourceFile,
    raw: &[Spanned<RawSeason>],
    diags: &mut Vec<Diagnostic>,
) -> Vec<Season> {
    let mut out: Vec<Season> = Vec::new();
    // The line each accepted season's name is on, for overlap messages.
    let mut lines: Vec<usize> = Vec::new();
    for table in raw {
        let s = table.get_ref();
        let before = diags.len();
        let name = s.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            diags.push(src.at(
                s.name.span(),
                format!("season name {name:?} must be letters, digits, '-' or '_'"),
            ));
        } else if name == OFF {
            diags.push(src.at(
                s.name.span(),
                "a season may not be called \"off\": season_ttl uses `off` for outside every \
                 season; choose another name",
            ));
        } else if out.iter().any(|w| w.name == name) {
            diags.push(src.at(
                s.name.span(),
                format!("a season named {name:?} is defined twice; names must differ"),
            ));
        }
        let from = month_day(s.from.get_ref()).map_err(|e| diags.push(src.at(s.from.span(), e)));
        let to = month_day(s.to.get_ref()).map_err(|e| diags.push(src.at(s.to.span(), e)));
        let tz = super::protection::time_zone(src, &s.tz, diags).ok_or(());
        let ttl_multiplier = match &s.ttl_multiplier {
            None => 1.0,
            Some(m) => {
                let v = *m.get_ref();
                if !(v.is_finite() && v > 0.0) {
                    diags.push(src.at(
                        m.span(),
                        format!(
                            "ttl_multiplier = {v} must be a number greater than 0 (0.5 halves \
                             rules' ttl, 2 doubles it)"
                        ),
                    ));
                }
                v
            }
        };
        if diags.len() > before {
            continue;
        }
        let (Ok(from), Ok(to), Ok(tz)) = (from, to, tz) else {
            continue;
        };
        let season = Season {
            name,
            from,
            to,
            tz,
            ttl_multiplier,
        };
        // Overlap: a day of a leap year both seasons contain. (Zones are ignored here: two
        // seasons in different zones that share a calendar day overlap somewhere on earth.)
        let day = |n: u32| NaiveDate::from_yo_opt(2000, n).map(|d| (d.month(), d.day()));
        if let Some((other, line)) = out.iter().zip(&lines).find(|(o, _)| {
            (1..=366)
                .filter_map(day)
                .any(|md| o.contains(md) && season.contains(md))
        }) {
            diags.push(src.at(
                s.from.span(),
                format!(
                    "season {:?} overlaps season {:?} (line {line}); seasons may not overlap, \
                     so that one applies at a time: move `from` or `to`",
                    season.name, other.name,
                ),
            ));
            continue;
        }
        lines.push(src.at(s.name.span(), "").line);
        out.push(season);
    }
    out
}

/// The season active at `at_ms`, if any (seasons do not overlap).
pub fn active(seasons: &[Season], at_ms: u64) -> Option<&Season> {
    seasons.iter().find(|s| s.active_at(at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[derive(Deserialize)]
    struct Doc {
        season: Vec<Spanned<RawSeason>>,
    }

    fn seasons(text: &str) -> Result<Vec<Season>, Vec<String>> {
        let src = SourceFile::new(Path::new("gateway.toml"), text);
        let doc: Doc = toml::from_str(text).unwrap();
        let mut diags = Vec::new();
        let out = compile(&src, &doc.season, &mut diags);
        if diags.is_empty() {
            Ok(out)
        } else {
            Err(diags.iter().map(ToString::to_string).collect())
        }
    }

    fn ms(rfc3339: &str) -> u64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn peak_in_new_york_and_a_winter_that_wraps_the_year() {
        let s = seasons(
            "[[season]]\nname = \"peak\"\nfrom = \"04-01\"\nto = \"10-31\"\ntz = \"America/New_York\"\nttl_multiplier = 0.5\n\
             [[season]]\nname = \"winter\"\nfrom = \"12-15\"\nto = \"01-10\"\n",
        )
        .unwrap();
        let (peak, winter) = (&s[0], &s[1]);
        assert_eq!(peak.ttl_multiplier, 0.5);
        assert_eq!(winter.ttl_multiplier, 1.0, "the default multiplier");
        // New York is UTC-4 on April 1st.
        assert!(
            !peak.active_at(ms("2027-04-01T03:59:59Z")),
            "March 31 local"
        );
        assert!(peak.active_at(ms("2027-04-01T04:00:00Z")), "April 1 local");
        assert!(peak.active_at(ms("2027-11-01T03:59:59Z")), "Oct 31 local");
        assert!(!peak.active_at(ms("2027-11-01T04:00:00Z")), "Nov 1 local");
        assert!(winter.active_at(ms("2027-12-31T12:00:00Z")));
        assert!(winter.active_at(ms("2028-01-10T23:59:59Z")));
        assert!(!winter.active_at(ms("2028-01-11T00:00:00Z")));
        assert!(!winter.active_at(ms("2027-12-14T23:59:59Z")));
        assert_eq!(
            active(&s, ms("2027-06-01T00:00:00Z")).map(|s| s.name.as_str()),
            Some("peak")
        );
        assert!(active(&s, ms("2027-11-20T00:00:00Z")).is_none());
    }

    #[test]
    fn mistakes_are_named_where_they_are() {
        let errs = seasons(
            "[[season]]\nname = \"peak\"\nfrom = \"4/1\"\nto = \"02-30\"\ntz = \"Mars/Olympus\"\nttl_multiplier = 0\n\
             [[season]]\nname = \"off\"\nfrom = \"01-01\"\nto = \"01-02\"\n\
             [[season]]\nname = \"a\"\nfrom = \"03-01\"\nto = \"05-01\"\n\
             [[season]]\nname = \"b\"\nfrom = \"12-01\"\nto = \"03-01\"\nttl_multiplier = -2\n\
             [[season]]\nname = \"c\"\nfrom = \"11-01\"\nto = \"03-15\"\n",
        )
        .unwrap_err();
        let all = errs.join("\n");
        for want in [
            "gateway.toml:3:8: \"4/1\" is not a month and day",
            "gateway.toml:4:6: \"02-30\" is not a month and day",
            "gateway.toml:5:6: unknown time zone \"Mars/Olympus\"",
            "gateway.toml:6:18: ttl_multiplier = 0 must be a number greater than 0",
            "gateway.toml:8:8: a season may not be called \"off\"",
            "ttl_multiplier = -2 must be",
            "gateway.toml:22:8: season \"c\" overlaps season \"a\" (line 12)",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(errs.len(), 7, "{all}");
    }

    /// `season_ttl` names are checked against the seasons, at the name's position.
    #[test]
    fn season_ttl_names_a_defined_season() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(
            dir.path().join("rules/a.toml"),
            "[[rule]]\nname = \"v\"\nmatch = { path = \"/v\" }\nseason_ttl = { peak = \"10m\", summer = \"5m\", off = \"1h\" }\n",
        )
        .unwrap();
        let path = dir.path().join("gateway.toml");
        let gateway = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n[upstreams.api]\nurl = \"http://127.0.0.1:3000\"\n";
        let with_peak = format!("{gateway}[[season]]\nname = \"peak\"\nfrom = \"04-01\"\nto = \"10-31\"\nttl_multiplier = 0.5\n");
        std::fs::write(&path, &with_peak).unwrap();
        let Err(errs) = crate::config::Config::load(&path) else {
            panic!("summer is not a season")
        };
        let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("a.toml:4:30: season_ttl names season \"summer\"")
                && errs[0].contains("(defined: peak)"),
            "{errs:?}"
        );
        std::fs::write(
            &path,
            format!("{with_peak}[[season]]\nname = \"summer\"\nfrom = \"11-01\"\nto = \"11-30\"\n"),
        )
        .unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        assert_eq!(config.seasons.len(), 2);
        assert_eq!(
            config
                .season_at(ms("2027-06-01T00:00:00Z"))
                .map(|s| s.ttl_multiplier),
            Some(0.5)
        );
    }
}
