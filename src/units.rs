//! Durations ("30m", "1h30m", "250ms") and sizes ("256MiB", "8 MB") as operators write them.
//!
//! Both are parsed with maintained crates (`humantime`, `bytesize`); this module only adds the
//! error wording shown by `aisle check`, so a bad value says what form was expected.

use std::time::Duration;

/// Parses a duration such as `30m`, `1h 30m`, `250ms` or `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!(
            "bad duration {s:?}: {e}; write a number and a unit, like \"30s\", \"5m\" or \"1h\""
        )
    })
}

/// Parses a size in bytes such as `256MiB`, `8 MB` or `1024`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| {
            format!("bad size {s:?}: {e}; write a number and a unit, like \"256MiB\" or \"8MB\"")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").unwrap_err().contains("bad duration"));
        assert!(parse_duration("30").is_err(), "a bare number has no unit");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 * 1024 * 1024);
        assert_eq!(parse_size("8MiB").unwrap(), 8 * 1024 * 1024);
        assert_eq!(parse_size("64KiB").unwrap(), 64 * 1024);
        assert_eq!(parse_size("1 MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").unwrap_err().contains("bad size"));
    }
}
