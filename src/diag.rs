//! Diagnostics shown to operators: `file:line:col: message`.
//!
//! Every configuration problem is reported against the file and position it comes from, the way
//! compilers do, so that `aisle check` output can be clicked in an editor and read in CI logs.
//! Positions are kept as byte spans while parsing and turned into line/column only when shown.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is about the file as a whole.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

/// A problem located by a byte span in a text whose file is not known where it was found: the
/// `[cdn.*]` checks run both on `gateway.toml` and on a `[cdn]` table parsed alone.
/// [`SourceFile::problem`] places it in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub span: Range<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A configuration file being parsed: keeps its text so spans can be located. (Named apart from
/// `rules::source`, where a "source" is where a vary value comes from.)
pub(crate) struct SourceFile<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl<'a> SourceFile<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        SourceFile { path, text }
    }

    /// A diagnostic at the start of `span` (byte offsets into the text).
    pub fn at(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = line_col(self.text, span.start);
        Diagnostic {
            file: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// The diagnostic of a [`Problem`] found in this file's text.
    pub fn problem(&self, problem: Problem) -> Diagnostic {
        self.at(problem.span, problem.message)
    }

    /// A diagnostic about the whole file.
    pub fn whole(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.path.to_path_buf(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }

    /// Turns a `toml` parse error into a positioned diagnostic.
    pub fn toml_error(&self, err: &toml::de::Error) -> Diagnostic {
        let mut message = err.message().trim().to_string();
        if message.is_empty() {
            // `toml` has no words for some errors (a file that ends inside a value).
            message = "invalid TOML: a value is missing or unfinished here (an unclosed `{`, \
                       `[` or string, or a `key =` with nothing after it); complete or remove it"
                .to_string();
        }
        match err.span() {
            Some(span) => self.at(span, message),
            None => self.whole(message),
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("abc\ndef", 5), (2, 2));
        assert_eq!(line_col("a\n\nxyz", 4), (3, 2));
    }

    #[test]
    fn a_toml_error_without_words_still_says_what_is_wrong() {
        let text = "[[rule]]\nname = \"broken\"\nmatch = { path = ";
        let err = toml::from_str::<toml::Value>(text).unwrap_err();
        let d = SourceFile::new(Path::new("rules/r.toml"), text).toml_error(&err);
        let shown = d.to_string();
        assert!(
            shown.starts_with("rules/r.toml:3:18: invalid TOML: a value is missing"),
            "{shown}"
        );
    }

    #[test]
    fn display_is_clickable() {
        let src = SourceFile::new(Path::new("rules/a.toml"), "x = 1\ny = 2\n");
        let d = src.at(6..7, "unknown key `y`");
        assert_eq!(d.to_string(), "rules/a.toml:2:1: unknown key `y`");
    }
}
