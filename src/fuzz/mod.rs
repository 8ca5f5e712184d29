//! Property-based fuzzing (test-only, `#[cfg(test)]`): every parser and decoder that reads what
//! a client, an origin, a CDN, Redis or an operator wrote, run on generated inputs with
//! `proptest` on stable Rust.
//!
//! Each target is one `#[test]` (`fuzz::<area>::<target>`) running a bounded number of cases:
//! `AISLE_FUZZ_CASES` (else `PROPTEST_CASES`, else 256) times the target's weight. The
//! properties: nothing panics; encodings round-trip; invariants hold (a normalizer applied twice
//! changes nothing more, requests that differ in a keyed part get different keys, a webhook never
//! verifies without the secret, a tampered sealed record never opens). Every target prints
//! `fuzz <target>: <cases> cases, <failures> failures, seed <seed>`.
//!
//! `scripts/test.sh` runs a few thousand cases per target in the debug build; `scripts/fuzz.sh
//! [cases]` runs many more in the `fuzz` profile (optimized, overflow checks on). A failure
//! prints the shrunk input and the seed; `PROPTEST_RNG_SEED=<seed>` replays the run.
//!
//! | file | targets |
//! |---|---|
//! | `rules.rs` | rules files (text and structured), path patterns, normalizers, matcher, keys |
//! | `http.rs` | `Cache-Control` / `CDN-Cache-Control` / `Age` / `Expires` / `Vary` / request directives |
//! | `formats.rs` | JSON canonical form, webhook signatures, purge-queue log, Redis records |

mod formats;
mod http;
mod rules;

use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::fmt::Debug;
use std::hash::{BuildHasher, RandomState};
use std::time::Instant;

/// Cases per unit of weight: `AISLE_FUZZ_CASES`, else `PROPTEST_CASES`, else 256.
fn base_cases() -> f64 {
    ["AISLE_FUZZ_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(256) as f64
}

/// The run's seed: `PROPTEST_RNG_SEED`, else a fresh random one (printed, to replay a failure).
fn seed() -> u64 {
    std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| RandomState::new().hash_one(Instant::now()))
}

/// Runs `test` on `weight * base` cases drawn from `strategy` (at least one), prints the
/// summary line, and panics with the shrunk input on a failure (a panic inside `test` is one).
pub(crate) fn run<S>(
    name: &str,
    weight: f64,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: proptest::strategy::Strategy,
    S::Value: Debug,
{
    let cases = (base_cases() * weight).clamp(1.0, u32::MAX as f64) as u32;
    let seed = seed();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: 60_000,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, test);
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => println!("fuzz {name}: {cases} cases, 0 failures, seed {seed}, {secs:.1} s"),
        Err(TestError::Fail(why, input)) => {
            println!("fuzz {name}: {cases} cases, 1 failures, seed {seed}, {secs:.1} s");
            panic!(
                "fuzz {name} failed (seed {seed}; replay with PROPTEST_RNG_SEED={seed}): {why}\nshrunk input: {input:#?}"
            );
        }
        Err(TestError::Abort(why)) => {
            panic!("fuzz {name} aborted (seed {seed}): {why}")
        }
    }
}

/// `prop_assert!` without the macro's stringified-expression noise.
pub(crate) fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}
