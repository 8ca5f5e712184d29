//! README's ```console blocks are the real output of the shipped configuration (issue 18
//! item 2): every `$ command` in them runs, in README order, against `aisle demo` serving the
//! repository's own `gateway.toml` and `rules/`, and what it prints must be the lines below it.
//!
//! The rules a block follows (README's Quickstart says them to readers too):
//! - A line starting with `$ ` is a command (a line ending in `\` continues on the next); the
//!   lines after it, up to the next command or the end of the block, are its output (stdout
//!   and stderr together; trailing blank lines ignored). A `# comment` on a command line is the
//!   shell's.
//! - README's addresses are the shipped ones: the proxy `127.0.0.1:8080`, the admin listener
//!   `127.0.0.1:9180`, the demo origin `127.0.0.1:3000`. The test serves the same files on free
//!   ports and swaps the addresses in each command, and back in its output.
//! - In expected output, `<anything>` (a placeholder) stands for one run of non-space
//!   characters that changes from run to run: seconds left, ids, times.
//! - Commands run under `sh` in the directory holding `gateway.toml`, with `aisle` on `PATH` and
//!   `AISLE_ADMIN_TOKEN` set (as after the `export` line the demo prints); only `curl`, `grep`
//!   and the like from a fresh Debian, nothing that needs installing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::free_port;

const TOKEN: &str = "readme-demo-token-0123456789abcdef";
/// How long one README command may take (the streamed chat answer takes about a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// One `$ command` of a console block and the output README shows for it.
#[derive(Debug)]
struct Step {
    /// README line of the command (for messages).
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// Every command of every ```console block of `readme`, in order.
fn console_steps(readme: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut continuing = false;
    for (i, line) in readme.lines().enumerate() {
        if !in_block {
            in_block = line.trim_end() == "```console";
            continue;
        }
        if line.trim_end() == "```" {
            in_block = false;
            continuing = false;
            continue;
        }
        if continuing {
            let step = steps.last_mut().expect("a command continues");
            step.command.push('\n');
            step.command.push_str(line);
            continuing = line.ends_with('\\');
        } else if let Some(command) = line.strip_prefix("$ ") {
            steps.push(Step {
                line: i + 1,
                command: command.to_string(),
                expected: Vec::new(),
            });
            continuing = line.ends_with('\\');
        } else {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("README.md:{}: output before any `$ command`", i + 1));
            step.expected.push(line.trim_end().to_string());
        }
    }
    for s in &mut steps {
        while s.expected.last().is_some_and(|l| l.is_empty()) {
            s.expected.pop();
        }
    }
    steps
}

/// Whether `actual` is `expected` with each `<placeholder>` standing for a non-empty run of
/// non-space characters.
fn line_matches(expected: &str, actual: &str) -> bool {
    fn fits(pattern: &str, s: &str) -> bool {
        match pattern.find('<') {
            Some(open) if pattern[open..].contains('>') => {
                let close = open + pattern[open..].find('>').unwrap();
                let Some(rest) = s.strip_prefix(&pattern[..open]) else {
                    return false;
                };
                let after = &pattern[close + 1..];
                let run = rest
                    .char_indices()
                    .find(|(_, c)| c.is_whitespace())
                    .map_or(rest.len(), |(i, _)| i);
                (1..=run)
                    .filter(|&n| rest.is_char_boundary(n))
                    .any(|n| fits(after, &rest[n..]))
            }
            _ => pattern == s,
        }
    }
    fits(expected, actual)
}

/// `aisle demo` serving a copy of the repository's `gateway.toml` and `rules/` on free ports.
struct Demo {
    child: Child,
    dir: tempfile::TempDir,
    /// (README address, this demo's address)
    addresses: Vec<(&'static str, String)>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Demo {
    fn start() -> Demo {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = vec![
            ("127.0.0.1:8080", format!("127.0.0.1:{}", free_port())),
            ("127.0.0.1:9180", format!("127.0.0.1:{}", free_port())),
            ("127.0.0.1:3000", format!("127.0.0.1:{}", free_port())),
        ];
        let shipped = std::fs::read_to_string(repo.join("gateway.toml")).expect("gateway.toml");
        for (readme, _) in &addresses {
            assert!(
                shipped.contains(readme),
                "the shipped gateway.toml no longer uses {readme}, which README's blocks assume"
            );
        }
        std::fs::write(
            dir.path().join("gateway.toml"),
            swap(&shipped, &addresses, false),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        for entry in std::fs::read_dir(repo.join("rules")).expect("rules/") {
            let path = entry.unwrap().path();
            std::fs::copy(
                &path,
                dir.path().join("rules").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
        let stdout = dir.path().join("demo.out");
        let stderr = dir.path().join("demo.err");
        let child = Command::new(crate::harness::aisle_bin())
            .args(["demo", "--config", "gateway.toml"])
            .current_dir(dir.path())
            .env("AISLE_ADMIN_TOKEN", TOKEN)
            .env_remove("AISLE_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start aisle demo");
        let demo = Demo {
            child,
            dir,
            addresses,
            stdout,
            stderr,
        };
        // Ready once the proxy, the admin listener and the origin all accept.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (_, addr) in &demo.addresses {
            while std::net::TcpStream::connect(addr.as_str()).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "aisle demo did not listen on {addr} within 30 s\n{}",
                    demo.logs()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        demo
    }

    fn logs(&self) -> String {
        format!(
            "----- aisle demo stdout -----\n{}\n----- stderr -----\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Runs a README command (addresses swapped) under `sh`; its output, addresses swapped back.
    fn run(&self, command: &str) -> String {
        let aisle = crate::harness::aisle_bin();
        let aisle_dir = aisle.parent().unwrap();
        let path = format!(
            "{}:{}",
            aisle_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out_file = self.dir.path().join("command.out");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 2>&1\n{}\n",
                swap(command, &self.addresses, false)
            ))
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("AISLE_ADMIN_TOKEN", TOKEN)
            .env_remove("AISLE_LOG")
            .env_remove("RUST_LOG")
            .env("NO_PROXY", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_file).unwrap())
            .spawn()
            .expect("run sh");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if child.try_wait().expect("wait for sh").is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{command}` did not finish within {COMMAND_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        std::fs::File::open(&out_file)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        swap(&out, &self.addresses, true)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// README's addresses to the demo's (or back).
fn swap(text: &str, addresses: &[(&'static str, String)], back: bool) -> String {
    let mut out = text.to_string();
    for (readme, demo) in addresses {
        out = if back {
            out.replace(demo.as_str(), readme)
        } else {
            out.replace(readme, demo)
        };
    }
    out
}

/// Every ```console block of README.md, run in order against `aisle demo` on the shipped
/// configuration, prints what README shows.
#[test]
fn readme_console_blocks_are_the_real_output() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let steps = console_steps(&readme);
    assert!(steps.len() >= 5, "README has console blocks: {steps:?}");
    let demo = Demo::start();
    let mut failures = Vec::new();
    for step in &steps {
        let actual = demo.run(&step.command);
        let actual: Vec<&str> = actual.trim_end().lines().map(str::trim_end).collect();
        let same = actual.len() == step.expected.len()
            && step
                .expected
                .iter()
                .zip(&actual)
                .all(|(e, a)| line_matches(e, a));
        if !same {
            failures.push(format!(
                "README.md:{}: `$ {}`\n--- README shows ---\n{}\n--- it printed ---\n{}\n",
                step.line,
                step.command,
                step.expected.join("\n"),
                actual.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} README commands print something else:\n\n{}\n{}",
        failures.len(),
        steps.len(),
        failures.join("\n"),
        demo.logs()
    );
}

/// Issue 18 item 1: on the shipped configuration, the `invalidate_on` names the shipped rules
/// use fire through the admin API (with the token from `AISLE_ADMIN_TOKEN`) and `PURGE` from
/// loopback needs no token.
#[test]
fn shipped_config_fires_its_events_and_takes_loopback_purges() {
    let demo = Demo::start();
    for event in ["vendor_update", "availability_change"] {
        let out = demo.run(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}\\n' -X POST -H \"Authorization: Bearer $AISLE_ADMIN_TOKEN\" \
             http://127.0.0.1:9180/admin/invalidate -d '{{\"events\":[{{\"name\":\"{event}\",\"params\":{{}}}}]}}'"
        ));
        assert_eq!(out.trim(), "202", "firing {event}\n{}", demo.logs());
    }
    let out = demo.run(
        "curl -s -o /dev/null -w '%{http_code}\\n' -X PURGE http://127.0.0.1:8080/api/weddings/w-1/timeline",
    );
    assert_eq!(out.trim(), "200", "PURGE from loopback\n{}", demo.logs());
}

#[test]
fn placeholders_stand_for_one_word() {
    assert!(line_matches("a; ttl=<secs>", "a; ttl=1799"));
    assert!(line_matches("id <id>: 1 tag", "id inv-1-2: 1 tag"));
    assert!(!line_matches("id <id>: 1 tag", "id inv 1: 1 tag"));
    assert!(!line_matches("ttl=<secs>", "ttl="));
    assert!(line_matches("plain", "plain"));
    assert!(!line_matches("plain", "plain2"));
}
