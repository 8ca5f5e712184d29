//! The setup scripts' promises (README "Two commands"): on a machine without Rust, `deps.sh`
//! says what to install instead of failing later with "command not found" (issue 18 item 3).

use std::process::Command;

/// This process's PATH without the directories that hold a `cargo`.
fn path_without_cargo() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path
        .split(':')
        .filter(|d| !std::path::Path::new(d).join("cargo").exists())
        .collect();
    dirs.join(":")
}

/// With every system package present but no `cargo` on PATH, `ensure_packages` fails with the
/// promised message (it used to return early, before the Rust check).
#[test]
fn deps_sh_says_how_to_install_rust_when_cargo_is_missing() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/deps.sh");
    let out = Command::new("bash")
        .arg("-c")
        // `sh` is always there: no package is missing, only Rust.
        .arg(format!("source {script} && ensure_packages sh:dash"))
        .env("PATH", path_without_cargo())
        .output()
        .expect("run bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded without cargo: {stderr}");
    assert!(
        stderr.contains("cargo is not installed") && stderr.contains("rustup.rs"),
        "{stderr}"
    );
    // And with cargo on PATH (this test runs under it), nothing is missing: success.
    let ok = Command::new("bash")
        .arg("-c")
        .arg(format!("source {script} && ensure_packages sh:dash"))
        .output()
        .expect("run bash");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
