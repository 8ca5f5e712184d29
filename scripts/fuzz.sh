#!/usr/bin/env bash
# Runs the property-based fuzz targets (src/fuzz/) far longer than scripts/test.sh does: in the
# `fuzz` cargo profile (optimized, overflow checks on), CASES cases per unit of target weight
# (default 100000; a target runs 0.5x to 8x that), two targets at a time. Prints the cases run
# and failures per target and in total; exits non-zero when a target failed (its shrunk input
# and seed are in the log: PROPTEST_RNG_SEED=<seed> replays it).
#   scripts/fuzz.sh [CASES] [TARGET]     e.g. scripts/fuzz.sh 1000000 normalizers
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages cmake:cmake
cases="${1:-100000}"
target="${2:-}"
log="${FUZZ_LOG:-target/fuzz.log}"
mkdir -p "$(dirname "$log")"
cargo test --profile fuzz --locked --lib --no-run
echo "fuzzing with AISLE_FUZZ_CASES=$cases (log: $log)" >&2
start=$(date +%s)
set +e
# Targets are `fuzz::<area>::<target>`: filter on the target's name when one is given.
AISLE_FUZZ_CASES="$cases" cargo test --profile fuzz --locked --lib "${target:-fuzz::}" -- \
  --nocapture --test-threads="${FUZZ_THREADS:-2}" >"$log" 2>&1
status=$?
set -e
awk -v secs="$(($(date +%s) - start))" '
  /^fuzz [a-z_]+: [0-9]+ cases, [0-9]+ failures/ {
    name = $2; sub(":", "", name); n = $3; f = $5
    printf "%-20s %12d cases %3d failures   %s %s\n", name, n, f, $9, $10
    total += n; failed += f
  }
  /^fuzz [a-z_]+ (failed|aborted)/ { print "  " $0 }
  END { printf "%-20s %12d cases %3d failures   in %d s\n", "total", total, failed, secs }
' "$log"
if [[ $status -ne 0 ]]; then
  echo "fuzzing found failures (or did not build); see $log" >&2
elif ! grep -q '^fuzz ' "$log"; then
  echo "no fuzz target matches ${target:-fuzz::}; targets are the test names under src/fuzz/" >&2
  status=1
fi
exit $status
