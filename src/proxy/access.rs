//! The access log line (`[log] access = true`): one line per request, in logfmt or JSON.
//!
//! A pure formatter, apart from the hook that fills it, so what may appear in a line is decided
//! in one place and table-tested: method, path, rule, status, `Cache-Status`, upstream, duration,
//! bytes. Never a body, a header value or the query string (query strings carry API keys and
//! signatures too often to be logged blindly; the path and the rule identify the request).
//! The line goes out through `tracing` at `info` under the target [`TARGET`], which `main`
//! writes to stderr as is, without the usual prefix, so a log shipper reads pure logfmt or JSON.

use crate::config::LogFormat;

/// The `tracing` target of access lines.
pub const TARGET: &str = "aisle_access";

/// What one access line says.
pub struct AccessLine<'a> {
    /// RFC 3339 time the request ended.
    pub time: &'a str,
    pub method: &'a str,
    /// The request path, without its query.
    pub path: &'a str,
    pub rule: &'a str,
    pub status: u16,
    pub cache_status: &'a str,
    /// The upstream's name, or `-` when the request did not go there.
    pub upstream: &'a str,
    pub duration_ms: f64,
    /// Response body bytes sent to the client.
    pub bytes: usize,
}

impl AccessLine<'_> {
    /// The line in `format`, without a trailing newline.
    pub fn render(&self, format: LogFormat) -> String {
        let duration = format!("{:.3}", self.duration_ms);
        match format {
            LogFormat::Json => serde_json::json!({
                "time": self.time,
                "method": self.method,
                "path": self.path,
                "rule": self.rule,
                "status": self.status,
                "cache_status": self.cache_status,
                "upstream": self.upstream,
                "duration_ms": duration.parse::<f64>().unwrap_or(self.duration_ms),
                "bytes": self.bytes,
            })
            .to_string(),
            LogFormat::Logfmt => {
                let status = self.status.to_string();
                let bytes = self.bytes.to_string();
                [
                    ("time", self.time),
                    ("method", self.method),
                    ("path", self.path),
                    ("rule", self.rule),
                    ("status", status.as_str()),
                    ("cache_status", self.cache_status),
                    ("upstream", self.upstream),
                    ("duration_ms", duration.as_str()),
                    ("bytes", bytes.as_str()),
                ]
                .iter()
                .map(|(k, v)| format!("{k}={}", logfmt_value(v)))
                .collect::<Vec<_>>()
                .join(" ")
            }
        }
    }
}

/// A logfmt value: bare when it can be, else double-quoted with `"` and `\` escaped and control
/// characters as `\n`, `\t` or `\u{..}`, so one request is always one line.
fn logfmt_value(v: &str) -> String {
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine<'static> {
        AccessLine {
            time: "2026-12-04T22:40:07.123Z",
            method: "GET",
            path: "/api/vendors/v1",
            rule: "vendor",
            status: 200,
            cache_status: "aisle; hit; ttl=42",
            upstream: "api",
            duration_ms: 1.23456,
            bytes: 512,
        }
    }

    #[test]
    fn logfmt_quotes_only_what_needs_it() {
        assert_eq!(
            line().render(LogFormat::Logfmt),
            "time=2026-12-04T22:40:07.123Z method=GET path=/api/vendors/v1 rule=vendor status=200 \
             cache_status=\"aisle; hit; ttl=42\" upstream=api duration_ms=1.235 bytes=512"
        );
        assert_eq!(logfmt_value(""), "\"\"");
        assert_eq!(logfmt_value("a\"b\nc"), "\"a\\\"b\\nc\"");
    }

    #[test]
    fn json_is_one_object() {
        let v: serde_json::Value = serde_json::from_str(&line().render(LogFormat::Json)).unwrap();
        assert_eq!(v["rule"], "vendor");
        assert_eq!(v["status"], 200);
        assert_eq!(v["cache_status"], "aisle; hit; ttl=42");
        assert_eq!(v["duration_ms"], 1.235);
        assert_eq!(v["bytes"], 512);
    }
}
