//! `[[protection]]`: when the gateway protects what it serves ("Saturday mode", issue 14).
//!
//! A window is a schedule in a time zone (weekdays or dates, a time of day range) plus what it
//! changes while active: purges that would remove cached answers only mark them stale
//! (`hard_purges = "soften"`, or kept until it ends with `"defer"`:
//! [`crate::invalidation::protection`]), CDN purges wait until it ends (`cdn_purges = "defer"`)
//! and cached answers may be served stale `serve_stale` longer than their own windows allow.
//! This module only parses
//! and checks the tables (errors at `file:line:col`) and answers "is it active at this instant";
//! the runtime state (manual switches shared through Redis, what is active now) lives in
//! [`crate::invalidation::protection`].

use crate::diag::{Diagnostic, SourceFile};
use crate::units::parse_duration;
use chrono::{Datelike, NaiveDate, NaiveTime, TimeZone, Timelike, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// `[[protection]]` as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtection {
    name: Spanned<String>,
    when: Option<Spanned<RawWhen>>,
    serve_stale: Option<Spanned<String>>,
    hard_purges: Option<Spanned<String>>,
    cdn_purges: Option<Spanned<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    days: Option<Vec<Spanned<String>>>,
    dates: Option<Vec<Spanned<String>>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    tz: Option<Spanned<String>>,
}

/// What a window does to purges that would remove cached answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardPurges {
    /// They mark answers stale instead (served stale while revalidating).
    Soften,
    /// They apply as asked.
    Apply,
    /// They are kept durably (in order) and applied once no deferring window is on.
    Defer,
}

/// What a window does to CDN purges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdnPurges {
    /// Kept in the durable queue and sent when no deferring window is active.
    Defer,
    /// Sent as usual.
    Send,
}

/// When a window is on.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Monday first; empty with `dates` set.
    days: [bool; 7],
    dates: Vec<NaiveDate>,
    /// Time of day the window starts (inclusive) and ends (inclusive, to the end of the minute
    /// when written `HH:MM`); `from > to` spans midnight into the next day.
    from: NaiveTime,
    to: NaiveTime,
    tz: Tz,
}

impl Schedule {
    /// Whether the window is on at unix millisecond `at`.
    pub fn active_at(&self, at_ms: u64) -> bool {
        let Some(utc) = chrono::DateTime::from_timestamp_millis(at_ms as i64) else {
            return false;
        };
        let local = self.tz.from_utc_datetime(&utc.naive_utc());
        let (date, time) = (local.date_naive(), local.time());
        let on = |d: NaiveDate| {
            if self.dates.is_empty() {
                self.days[d.weekday().num_days_from_monday() as usize]
            } else {
                self.dates.contains(&d)
            }
        };
        if self.from <= self.to {
            on(date) && time >= self.from && time <= self.to
        } else {
            // Over midnight: the evening of a listed day, or the morning after one.
            (on(date) && time >= self.from) || (date.pred_opt().is_some_and(on) && time <= self.to)
        }
    }
}

impl Schedule {
    /// The instants (unix ms) this window starts at within `span_days` days of `from_ms`
    /// (beginning a day earlier, so a window already on at `from_ms` counts).
    fn starts(&self, from_ms: u64, span_days: i64) -> Vec<u64> {
        let Some(utc) = chrono::DateTime::from_timestamp_millis(from_ms as i64) else {
            return Vec::new();
        };
        let first = self.tz.from_utc_datetime(&utc.naive_utc()).date_naive();
        let days = (first.iter_days().take(span_days as usize + 1)).chain(first.pred_opt());
        let days: Vec<NaiveDate> = if self.dates.is_empty() {
            days.filter(|d| self.days[d.weekday().num_days_from_monday() as usize])
                .collect()
        } else {
            days.filter(|d| self.dates.contains(d)).collect()
        };
        days.into_iter()
            .filter_map(|d| {
                self.tz
                    .from_local_datetime(&d.and_time(self.from))
                    .earliest()
            })
            .map(|t| t.timestamp_millis().max(0) as u64)
            .collect()
    }
}

/// Warnings (not errors: overlapping windows combine, each setting taking its strictest value)
/// for scheduled windows that are on at the same time within a year of `now_ms`, each at the
/// later window's `when`, naming the first instant both are on. Two intervals overlap exactly
/// when one starts inside the other, so only the windows' start instants are looked at.
pub(super) fn overlaps(
    src: &SourceFile,
    raw: &[Spanned<RawProtection>],
    windows: &[ProtectionWindow],
    now_ms: u64,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (j, b) in windows.iter().enumerate() {
        for a in &windows[..j] {
            let (Some(sa), Some(sb)) = (&a.schedule, &b.schedule) else {
                continue;
            };
            let first = (sa
                .starts(now_ms, 366)
                .into_iter()
                .filter(|&t| sb.active_at(t)))
            .chain(
                sb.starts(now_ms, 366)
                    .into_iter()
                    .filter(|&t| sa.active_at(t)),
            )
            .min();
            let (Some(at), Some(table)) = (first, raw.get(j)) else {
                continue;
            };
            let when = chrono::DateTime::from_timestamp_millis(at as i64)
                .map(|t| {
                    sb.tz
                        .from_utc_datetime(&t.naive_utc())
                        .format("%Y-%m-%d %H:%M %Z")
                        .to_string()
                })
                .unwrap_or_default();
            let span = table
                .get_ref()
                .when
                .as_ref()
                .map_or(table.span(), |w| w.span());
            out.push(src.at(
                span,
                format!(
                    "warning: protection window {:?} overlaps {:?} (both on at {when}); while both are on they combine, each setting taking its strictest value; narrow one of them if that is not meant",
                    b.name, a.name
                ),
            ));
        }
    }
    out
}

/// A compiled `[[protection]]` window.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtectionWindow {
    pub name: String,
    /// `None`: only switched by hand (`POST /admin/protection`).
    pub schedule: Option<Schedule>,
    /// Extra stale-if-error and stale-while-revalidate while the window is on (zero: none).
    /// Only entries stored since a window with it was configured can use it (see
    /// [`crate::policy::Limits::serve_stale`]).
    pub serve_stale: Duration,
    pub hard_purges: HardPurges,
    pub cdn_purges: CdnPurges,
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Mon),
    ("tue", Weekday::Tue),
    ("wed", Weekday::Wed),
    ("thu", Weekday::Thu),
    ("fri", Weekday::Fri),
    ("sat", Weekday::Sat),
    ("sun", Weekday::Sun),
];

/// `HH:MM` (to the end of that minute when `end`) or `HH:MM:SS`.
fn time_of_day(text: &str, end: bool) -> Result<NaiveTime, String> {
    let bad = || format!("{text:?} is not a time of day; write \"HH:MM\" or \"HH:MM:SS\" (24 h)");
    if let Ok(t) = NaiveTime::parse_from_str(text, "%H:%M:%S") {
        return Ok(t);
    }
    let t = NaiveTime::parse_from_str(text, "%H:%M").map_err(|_| bad())?;
    Ok(if end {
        t.with_second(59)
            .and_then(|t| t.with_nanosecond(999_999_999))
            .unwrap_or(t)
    } else {
        t
    })
}

/// `tz = "..."`: an IANA zone (default UTC); an unknown name is reported where it is written.
/// Shared with `[[season]]`.
pub(super) fn time_zone(
    src: &SourceFile,
    tz: &Option<Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Tz> {
    let Some(s) = tz else { return Some(Tz::UTC) };
    s.get_ref()
        .parse::<Tz>()
        .map_err(|_| {
            diags.push(src.at(
                s.span(),
                format!(
                    "unknown time zone {:?}; write an IANA name such as \"America/New_York\" or \"UTC\"",
                    s.get_ref()
                ),
            ))
        })
        .ok()
}

/// Compiles the `[[protection]]` tables; problems go to `diags` at their position.
pub(super) fn compile(
    src: &SourceFile,
    raw: &[Spanned<RawProtection>],
    diags: &mut Vec<Diagnostic>,
) -> Vec<ProtectionWindow> {
    let mut out: Vec<ProtectionWindow> = Vec::new();
    for table in raw {
        let p = table.get_ref();
        let name = p.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            diags.push(src.at(
                p.name.span(),
                format!("protection name {name:?} must be letters, digits, '-' or '_'"),
            ));
        } else if out.iter().any(|w| w.name == name) {
            diags.push(src.at(
                p.name.span(),
                format!("a protection window named {name:?} is defined twice; names must differ"),
            ));
        }
        let serve_stale = match &p.serve_stale {
            None => Duration::ZERO,
            Some(s) => parse_duration(s.get_ref()).unwrap_or_else(|e| {
                diags.push(src.at(s.span(), format!("serve_stale: {e}")));
                Duration::ZERO
            }),
        };
        let hard_purges = match p
            .hard_purges
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("soften", _)) => HardPurges::Soften,
            Some(("apply", _)) => HardPurges::Apply,
            Some(("defer", _)) => HardPurges::Defer,
            Some((other, span)) => {
                diags.push(src.at(
                    span,
                    format!("hard_purges = {other:?}: write \"soften\", \"defer\" or \"apply\""),
                ));
                HardPurges::Soften
            }
        };
        let cdn_purges = match p
            .cdn_purges
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("defer", _)) => CdnPurges::Defer,
            Some(("send", _)) => CdnPurges::Send,
            Some((other, span)) => {
                diags.push(src.at(
                    span,
                    format!("cdn_purges = {other:?}: write \"defer\" or \"send\""),
                ));
                CdnPurges::Defer
            }
        };
        let schedule = p.when.as_ref().and_then(|w| schedule(src, w, diags));
        out.push(ProtectionWindow {
            name,
            schedule,
            serve_stale,
            hard_purges,
            cdn_purges,
        });
    }
    out
}

fn schedule(
    src: &SourceFile,
    when: &Spanned<RawWhen>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Schedule> {
    let w = when.get_ref();
    let before = diags.len();
    let mut days = [false; 7];
    for d in w.days.iter().flatten() {
        match DAYS
            .iter()
            .find(|(n, _)| d.get_ref().eq_ignore_ascii_case(n))
        {
            Some((_, wd)) => days[wd.num_days_from_monday() as usize] = true,
            None => diags.push(src.at(
                d.span(),
                format!(
                    "{:?} is not a day; write mon, tue, wed, thu, fri, sat or sun",
                    d.get_ref()
                ),
            )),
        }
    }
    let mut dates = Vec::new();
    for d in w.dates.iter().flatten() {
        match NaiveDate::parse_from_str(d.get_ref(), "%Y-%m-%d") {
            Ok(date) => dates.push(date),
            Err(_) => diags.push(src.at(
                d.span(),
                format!("{:?} is not a date; write \"YYYY-MM-DD\"", d.get_ref()),
            )),
        }
    }
    match (w.days.is_some(), w.dates.is_some()) {
        (false, false) => diags.push(src.at(
            when.span(),
            "a protection window needs `days = [\"sat\"]` or `dates = [\"2027-06-12\"]`",
        )),
        (true, true) => diags.push(src.at(
            when.span(),
            "write either `days` or `dates` in one window, not both (add a second window)",
        )),
        _ => {}
    }
    let time = |f: &Option<Spanned<String>>,
                default: &str,
                end: bool,
                diags: &mut Vec<Diagnostic>| {
        match f {
            None => time_of_day(default, end).ok(),
            Some(s) => time_of_day(s.get_ref(), end)
                .map_err(|e| diags.push(src.at(s.span(), e)))
                .ok(),
        }
    };
    let from = time(&w.from, "00:00", false, diags);
    let to = time(&w.to, "23:59", true, diags);
    let tz = time_zone(src, &w.tz, diags);
    if diags.len() > before {
        return None;
    }
    Some(Schedule {
        days,
        dates,
        from: from?,
        to: to?,
        tz: tz?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[derive(Deserialize)]
    struct Doc {
        protection: Vec<Spanned<RawProtection>>,
    }

    fn windows(text: &str) -> Result<Vec<ProtectionWindow>, Vec<String>> {
        let src = SourceFile::new(Path::new("gateway.toml"), text);
        let doc: Doc = toml::from_str(text).unwrap();
        let mut diags = Vec::new();
        let out = compile(&src, &doc.protection, &mut diags);
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

    fn overlap_warnings(text: &str, now: &str) -> Vec<String> {
        let src = SourceFile::new(Path::new("gateway.toml"), text);
        let doc: Doc = toml::from_str(text).unwrap();
        let mut diags = Vec::new();
        let out = compile(&src, &doc.protection, &mut diags);
        assert!(diags.is_empty(), "{diags:?}");
        overlaps(&src, &doc.protection, &out, ms(now))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Issue 14: `aisle check` names overlapping windows (a warning: they combine).
    #[test]
    fn overlapping_windows_are_named_with_the_first_shared_instant() {
        let sat = "[[protection]]\nname = \"wedding-day\"\nwhen = { days = [\"sat\"], from = \"07:00\", to = \"23:59\", tz = \"America/New_York\" }\n";
        // 18:00 in London is 13:00 in New York on that Saturday.
        let london = "[[protection]]\nname = \"launch\"\nwhen = { dates = [\"2027-06-12\"], from = \"18:00\", to = \"20:00\", tz = \"Europe/London\" }\n";
        let w = overlap_warnings(&format!("{sat}{london}"), "2027-06-01T00:00:00Z");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("gateway.toml:6:8: warning: protection window \"launch\" overlaps \"wedding-day\" (both on at 2027-06-12 18:00 BST)"),
            "{w:?}"
        );
        // A window starting inside the other counts too (the other way round).
        let evening = "[[protection]]\nname = \"evening\"\nwhen = { days = [\"fri\"], from = \"22:00\", to = \"08:00\", tz = \"America/New_York\" }\n";
        let w = overlap_warnings(&format!("{sat}{evening}"), "2027-06-01T00:00:00Z");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("(both on at 2027-06-05 07:00 EDT)"), "{w:?}");
        // Sunday does not meet Saturday; a date a year away or in the past is not looked at.
        let sun = sat.replace("wedding-day", "sunday").replace("sat", "sun");
        let past = london.replace("2027-06-12", "2026-06-13");
        assert_eq!(
            overlap_warnings(&format!("{sat}{sun}{past}"), "2027-06-01T00:00:00Z"),
            Vec::<String>::new()
        );
        // A window only switched by hand has no schedule to compare.
        let manual = "[[protection]]\nname = \"freeze\"\n";
        assert!(overlap_warnings(&format!("{sat}{manual}"), "2027-06-01T00:00:00Z").is_empty());
    }

    #[test]
    fn saturday_in_new_york() {
        let w = windows(
            "[[protection]]\nname = \"wedding-day\"\nwhen = { days = [\"sat\"], from = \"07:00\", to = \"23:59\", tz = \"America/New_York\" }\n",
        )
        .unwrap();
        let s = w[0].schedule.as_ref().unwrap();
        // 2027-06-12 is a Saturday; New York is UTC-4 in June.
        assert!(!s.active_at(ms("2027-06-12T10:59:59Z")), "06:59:59 local");
        assert!(s.active_at(ms("2027-06-12T11:00:00Z")), "07:00 local");
        assert!(
            s.active_at(ms("2027-06-13T03:59:59Z")),
            "23:59:59 local, still Saturday"
        );
        assert!(
            !s.active_at(ms("2027-06-13T04:00:00Z")),
            "Sunday 00:00 local"
        );
        assert!(!s.active_at(ms("2027-06-11T15:00:00Z")), "a Friday");
        assert_eq!(w[0].hard_purges, HardPurges::Soften);
        assert_eq!(w[0].cdn_purges, CdnPurges::Defer);
        assert_eq!(w[0].serve_stale, Duration::ZERO, "no serve_stale: none");
        let w = windows("[[protection]]\nname = \"w\"\nserve_stale = \"6h\"\n").unwrap();
        assert_eq!(w[0].serve_stale, Duration::from_secs(6 * 3600));
    }

    #[test]
    fn dates_and_windows_over_midnight() {
        let w = windows(
            "[[protection]]\nname = \"gala\"\nwhen = { dates = [\"2027-06-12\"], from = \"18:00\", to = \"02:00\" }\n",
        )
        .unwrap();
        let s = w[0].schedule.as_ref().unwrap();
        assert!(s.active_at(ms("2027-06-12T20:00:00Z")));
        assert!(s.active_at(ms("2027-06-13T01:30:00Z")), "the morning after");
        assert!(!s.active_at(ms("2027-06-13T03:00:00Z")));
        assert!(!s.active_at(ms("2027-06-12T12:00:00Z")));
        assert!(
            !s.active_at(ms("2027-06-14T01:00:00Z")),
            "not after another day"
        );
    }

    #[test]
    fn mistakes_are_named_where_they_are() {
        let errs = windows(
            "[[protection]]\nname = \"a\"\nwhen = { days = [\"saturday\"], from = \"7am\", tz = \"Mars/Olympus\" }\nhard_purges = \"later\"\nserve_stale = \"six hours\"\n[[protection]]\nname = \"a\"\nwhen = { days = [\"sat\"], dates = [\"2027-13-01\"] }\n",
        )
        .unwrap_err();
        let all = errs.join("\n");
        for want in [
            "gateway.toml:3:18: \"saturday\" is not a day",
            "\"7am\" is not a time of day",
            "unknown time zone \"Mars/Olympus\"",
            "gateway.toml:4:15: hard_purges = \"later\": write \"soften\", \"defer\" or \"apply\"",
            "gateway.toml:5:15: serve_stale: bad duration \"six hours\"",
            "gateway.toml:7:8: a protection window named \"a\" is defined twice",
            "\"2027-13-01\" is not a date",
            "write either `days` or `dates`",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }
}
