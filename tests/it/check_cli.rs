//! `aisle check --config X`: exit status and `file:line:col: message`
//! diagnostics for each kind of configuration error.

use std::path::Path;
use std::process::Command;

use crate::harness::fixtures;
use crate::harness::line_of;

const GATEWAY: &str = r#"[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"

[cache]
memory = "64MiB"
max_object = "8MiB"
rules_dir = "rules"

[upstreams.api]
url = "http://127.0.0.1:3000"
read_timeout = "30s"
connect_timeout = "2s"
"#;

struct CheckRun {
    code: Option<i32>,
    output: String,
    _dir: tempfile::TempDir,
}

/// Write `gateway.toml` and `rules/*`, then run `aisle check` from an
/// unrelated working directory (relative paths resolve from the config).
fn run_check(gateway: &str, rules: &[(&str, &str)]) -> CheckRun {
    run_check_env(gateway, rules, &[])
}

/// [`run_check`] with extra environment variables for `${VAR}` expansion.
fn run_check_env(gateway: &str, rules: &[(&str, &str)], env: &[(&str, &str)]) -> CheckRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, gateway).unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    for (name, text) in rules {
        std::fs::write(dir.path().join("rules").join(name), text).unwrap();
    }
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = Command::new(crate::harness::aisle_bin())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .current_dir(elsewhere.path())
        .envs(env.iter().copied())
        .output()
        .expect("run aisle check");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    CheckRun {
        code: out.status.code(),
        output,
        _dir: dir,
    }
}

/// Some output line holds `<file>:<L>:<col>:` for an L in `lines` and, on
/// the same line, one of `words` (case-insensitive).
fn assert_reports(run: &CheckRun, file: &str, lines: &[usize], words: &[&str]) {
    assert_eq!(
        run.code,
        Some(1),
        "aisle check should exit 1; output:\n{}",
        run.output
    );
    let found = run.output.lines().any(|out_line| {
        let lower = out_line.to_lowercase();
        let located = lines.iter().any(|l| {
            let needle = format!("{file}:{l}:");
            out_line.match_indices(&needle).any(|(i, _)| {
                let preceded_ok = i == 0 || {
                    let prev = out_line.as_bytes()[i - 1];
                    prev == b'/' || prev == b'\\' || prev == b' ' || prev == b'"'
                };
                let rest = &out_line[i + needle.len()..];
                let col_len = rest.bytes().take_while(u8::is_ascii_digit).count();
                preceded_ok && col_len > 0 && rest[col_len..].starts_with(':')
            })
        });
        located && words.iter().any(|w| lower.contains(&w.to_lowercase()))
    });
    assert!(
        found,
        "expected a `{file}:<one of {lines:?}>:<col>: ...` diagnostic mentioning one of {words:?}; output:\n{}",
        run.output
    );
}

fn rule(body: &str) -> String {
    format!("[[rule]]\n{body}")
}

#[test]
fn valid_config_passes() {
    let run = run_check(GATEWAY, &[("vendors.toml", fixtures::CHECKED_RULES)]);
    assert_eq!(
        run.code,
        Some(0),
        "valid config rejected; output:\n{}",
        run.output
    );
}

#[test]
fn valid_config_without_rules_passes() {
    let run = run_check(GATEWAY, &[]);
    assert_eq!(run.code, Some(0), "output:\n{}", run.output);
}

#[test]
fn unknown_key_in_rule() {
    let bad = rule(
        "name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"api\"\nttll = \"30m\"\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(&run, "bad.toml", &[line_of(&bad, "ttll")], &["unknown"]);
    assert!(run.output.contains("ttll"), "output:\n{}", run.output);
}

#[test]
fn unknown_key_in_gateway_toml() {
    let gw = GATEWAY.replace("[cache]\n", "[cache]\nmemroy = \"1MiB\"\n");
    let run = run_check(&gw, &[]);
    assert_reports(
        &run,
        "gateway.toml",
        &[line_of(&gw, "memroy")],
        &["unknown"],
    );
}

#[test]
fn bad_duration_in_rule() {
    let bad = rule(
        "name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"api\"\n\nttl = \"30 parsecs\"\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "parsecs")],
        &["duration", "parsecs"],
    );
}

#[test]
fn bad_size_in_gateway_toml() {
    let gw = GATEWAY.replace("memory = \"64MiB\"", "memory = \"lots\"");
    let run = run_check(&gw, &[("ok.toml", fixtures::CHECKED_RULES)]);
    assert_reports(
        &run,
        "gateway.toml",
        &[line_of(&gw, "\"lots\"")],
        &["size", "lots"],
    );
}

#[test]
fn bad_duration_in_gateway_toml() {
    let gw = GATEWAY.replace("read_timeout = \"30s\"", "read_timeout = \"forever\"");
    let run = run_check(&gw, &[]);
    assert_reports(
        &run,
        "gateway.toml",
        &[line_of(&gw, "forever")],
        &["duration", "forever"],
    );
}

#[test]
fn unknown_upstream() {
    let bad = rule(
        "name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nttl = \"1m\"\nupstream = \"nope\"\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "nope")],
        &["upstream", "nope"],
    );
}

#[test]
fn bad_path_pattern_star_not_trailing() {
    let bad = rule(
        "name = \"a\"\nupstream = \"api\"\nmatch = { method = \"GET\", path = \"/files/*/raw\" }\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "/files/*/raw")],
        &["path", "pattern"],
    );
}

#[test]
fn bad_path_pattern_no_leading_slash() {
    let bad = rule(
        "name = \"a\"\nupstream = \"api\"\n\nmatch = { method = \"GET\", path = \"vendors/:id\" }\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "vendors/:id")],
        &["path", "pattern", "/"],
    );
}

#[test]
fn unknown_vary_source() {
    let bad = rule(
        "name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"api\"\nvary = [\"query.q\", \"body.size\"]\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "body.size")],
        &["vary", "source", "body"],
    );
}

#[test]
fn duplicate_rule_name() {
    let bad = format!(
        "{}\n{}",
        rule("name = \"dup\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"api\"\n"),
        rule("name = \"dup\"\nmatch = { method = \"GET\", path = \"/b\" }\nupstream = \"api\"\n"),
    );
    let name_line = line_of(&bad, "path = \"/b\"") - 1;
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    // The second definition: its `name` line or its `[[rule]]` header.
    assert_reports(
        &run,
        "bad.toml",
        &[name_line, name_line - 1],
        &["duplicate"],
    );
}

#[test]
fn shadowed_rule() {
    let bad = format!(
        "{}\n{}",
        rule("name = \"catch-all\"\nmatch = { method = \"GET\", path = \"/api/*\" }\nupstream = \"api\"\nttl = \"1m\"\n"),
        rule("name = \"specific\"\nmatch = { method = \"GET\", path = \"/api/vendors/:id\" }\nupstream = \"api\"\nttl = \"1m\"\n"),
    );
    let start = line_of(&bad, "name = \"specific\"") - 1;
    let block: Vec<usize> = (start..=bad.lines().count()).collect();
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    // Anywhere in the shadowed (second) rule.
    assert_reports(&run, "bad.toml", &block, &["shadowed"]);
}

#[test]
fn unknown_normalizer() {
    let bad = rule(
        "name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"api\"\nvary = [\"query.q\"]\nnormalize = { \"query.q\" = \"reverse\" }\n",
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "reverse")],
        &["normalizer", "reverse"],
    );
}

#[test]
fn every_problem_is_reported() {
    let bad = format!(
        "{}\n{}",
        rule("name = \"one\"\nmatch = { method = \"GET\", path = \"/one\" }\nupstream = \"missing-upstream\"\n"),
        rule("name = \"two\"\nmatch = { method = \"GET\", path = \"/two\" }\nupstream = \"api\"\nttl = \"soon\"\n"),
    );
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "missing-upstream")],
        &["upstream", "missing-upstream"],
    );
    assert_reports(
        &run,
        "bad.toml",
        &[line_of(&bad, "soon")],
        &["duration", "soon"],
    );
}

#[test]
fn reported_path_is_the_rules_file() {
    let bad =
        rule("name = \"a\"\nmatch = { method = \"GET\", path = \"/a\" }\nupstream = \"nope\"\n");
    let run = run_check(GATEWAY, &[("bad.toml", &bad)]);
    let expected = Path::new("rules").join("bad.toml");
    assert!(
        run.output.contains(&format!("{}:", expected.display())),
        "diagnostic should name {}; output:\n{}",
        expected.display(),
        run.output
    );
}

/// Secrets expanded from `${VAR}` never reach `aisle check`'s output: the password of a Redis URL,
/// the userinfo of an upstream URL and of a CDN purge host are shown as `<redacted>`, while the
/// problem is still located and explained.
#[test]
fn check_output_redacts_secrets() {
    const PW: &str = "s3cr3t-pw-9f2a71";
    let gw = GATEWAY.replace(
        "url = \"http://127.0.0.1:3000\"",
        "url = \"http://ops:${AISLE_CHECK_PW}@127.0.0.1:3000/v1\"",
    ) + "\n[redis]\nurl = \"http://:${AISLE_CHECK_PW}@127.0.0.1:6379\"\n\n[cdn.http]\nhosts = [\"http://purge:${AISLE_CHECK_PW}@127.0.0.1:6081/?x=1\"]\n";
    let run = run_check_env(&gw, &[], &[("AISLE_CHECK_PW", PW)]);
    assert_reports(
        &run,
        "gateway.toml",
        &[line_of(&gw, "ops:")],
        &["has a path"],
    );
    assert_reports(&run, "gateway.toml", &[line_of(&gw, "6379")], &["redis://"]);
    assert_reports(&run, "gateway.toml", &[line_of(&gw, "6081")], &["query"]);
    assert!(
        !run.output.contains(PW) && !run.output.contains("ops:") && !run.output.contains("purge:"),
        "a secret in the output:\n{}",
        run.output
    );
    assert!(
        run.output.contains("<redacted>@127.0.0.1:3000"),
        "{}",
        run.output
    );
}

#[test]
fn unknown_log_format() {
    let gw = format!("{GATEWAY}\n[log]\naccess = true\nformat = \"xml\"\n");
    let run = run_check(&gw, &[]);
    assert_reports(&run, "gateway.toml", &[line_of(&gw, "xml")], &["logfmt"]);
}

/// Issue 18 item 1: the shipped `gateway.toml` and `rules/` check clean in a shell without
/// `AISLE_ADMIN_TOKEN` (the admin API is then disabled, which is not a configuration problem),
/// and with it; no warning either way (every `invalidate_on` name has its `[[event]]`).
#[test]
fn shipped_config_checks_clean() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    for token in [None, Some("a-demo-token-of-32-characters-xx")] {
        let mut cmd = Command::new(crate::harness::aisle_bin());
        cmd.arg("check").arg("--config").arg(&config);
        cmd.env_remove("AISLE_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("AISLE_ADMIN_TOKEN", t);
        }
        let out = cmd.output().expect("run aisle check");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "token {token:?}: output:\n{output}"
        );
        assert!(
            output.contains("gateway.toml: ok (") && !output.contains("warning"),
            "token {token:?}: expected a clean summary; output:\n{output}"
        );
    }
}

/// Issue 18 item 1: an `invalidate_on` name that no `[[event]]` can invalidate is a warning at
/// its position (the config still loads: exit 0); a name an event lists, literally or through
/// a template, is not.
#[test]
fn unfireable_invalidate_on_name_is_warned_about() {
    let rules = r#"[[event]]
name = "vendor_update"
invalidates = ["vendor_update", "{kind}_change"]

[[rule]]
name = "vendor"
match = { method = "GET", path = "/api/vendors/:id" }
ttl = "60s"
invalidate_on = ["vendor_update", "availability_change", "never_fired"]
"#;
    let run = run_check(GATEWAY, &[("a.toml", rules)]);
    assert_eq!(
        run.code,
        Some(0),
        "a warning is no error; output:\n{}",
        run.output
    );
    let line = line_of(rules, "invalidate_on");
    let warnings: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "exactly one warning (never_fired); output:\n{}",
        run.output
    );
    assert!(
        warnings[0].contains(&format!("a.toml:{line}:"))
            && warnings[0].contains("\"never_fired\"")
            && warnings[0].contains("[[event]]"),
        "the warning names the file, line, the name and the fix; output:\n{}",
        run.output
    );
}

/// Issue 14: `aisle check` names overlapping protection windows, at the later window's `when`
/// (a warning, exit 0: while both are on they combine); windows that never meet are not named.
#[test]
fn overlapping_protection_windows_are_warned_about() {
    let gateway = format!(
        "{GATEWAY}\n[[protection]]\nname = \"wedding-day\"\nwhen = {{ days = [\"sat\"], from = \"07:00\", to = \"23:59\", tz = \"America/New_York\" }}\n\n[[protection]]\nname = \"sunday\"\nwhen = {{ days = [\"sun\"], from = \"09:00\", to = \"12:00\", tz = \"America/New_York\" }}\n\n[[protection]]\nname = \"chicago-brunch\"\nwhen = {{ days = [\"sat\"], from = \"08:00\", to = \"10:00\", tz = \"America/Chicago\" }}\n"
    );
    let run = run_check(&gateway, &[]);
    assert_eq!(
        run.code,
        Some(0),
        "a warning is no error; output:\n{}",
        run.output
    );
    let warnings: Vec<&str> = (run.output.lines())
        .filter(|l| l.contains("warning"))
        .collect();
    let line = gateway
        .lines()
        .position(|l| l.contains("America/Chicago"))
        .unwrap()
        + 1;
    assert_eq!(warnings.len(), 1, "output:\n{}", run.output);
    assert!(
        warnings[0].contains(&format!("gateway.toml:{line}:"))
            && warnings[0].contains("\"chicago-brunch\" overlaps \"wedding-day\"")
            && warnings[0].contains("08:00 C"),
        "the warning names the place, both windows and when; output:\n{}",
        run.output
    );
}

/// `refresh_ahead` is a fraction of the freshness lifetime, strictly between 0 and 1.
#[test]
fn refresh_ahead_out_of_range_is_refused_with_its_position() {
    let text = rule(
        "name = \"r\"\nmatch = { path = \"/r\" }\nupstream = \"api\"\nttl = \"5m\"\nrefresh_ahead = 1.5\n",
    );
    let run = run_check(GATEWAY, &[("r.toml", &text)]);
    assert_reports(
        &run,
        "r.toml",
        &[line_of(&text, "refresh_ahead")],
        &["refresh_ahead = 1.5"],
    );
    assert!(run.output.contains("r.toml:6:17:"), "{}", run.output);
}
