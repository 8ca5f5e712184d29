#!/usr/bin/env bash
# Issue 16's scenarios in instructions per request (benches/instructions.sh, callgrind), in one
# table: the memory tier (hit-1k, hit-64k, pass), Redis only, the default route against the
# realistic rule set (the rules' cost, which a timed comparison cannot show on a machine whose
# runs drift by more than the 5% bound), and the floor (examples/bare_pingora) when it is built.
# Each figure hardly moves for the same build however busy the machine is (within about 1%
# between runs; a pass request's reads from the origin split differently from run to run).
# Usage: benches/instructions-all.sh [--requests N] [AISLE_BINARY]   (about 6 minutes)
#   AISLE_BINARY defaults to target/release/aisle; give another build's copy to compare builds.
# Needs what benches/instructions.sh needs (valgrind, nginx, curl) and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
N=2000
if [[ ${1:-} == --requests ]]; then N="$2"; shift 2; fi
AISLE=${1:-target/release/aisle}
[[ -x $AISLE ]] || { echo "no $AISLE: run cargo build --release" >&2; exit 2; }
FLOOR=target/release/examples/bare_pingora

count() {  # scenario gateway-command... -> instructions per request
  local out
  # The previous gateway may still be in its shutdown grace period: the script refuses a busy port.
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/17480) 2>/dev/null || break
    sleep 0.1
  done
  out=$(benches/instructions.sh --requests "$N" --scenario "$1" -- "${@:2}" | head -1)
  awk '{print $2}' <<<"$out"
}

printf '%-34s %12s\n' "scenario" "instructions"
row() { printf '%-34s %12s\n' "$1" "$2"; }
row "memory tier hit-1k" "$(count hit-1k "$AISLE" run --config benches/compare.toml)"
row "memory tier hit-64k" "$(count hit-64k "$AISLE" run --config benches/compare.toml)"
row "memory tier pass" "$(count pass "$AISLE" run --config benches/compare.toml)"
row "Redis only hit-1k" "$(AISLE_BIN=$(realpath "$AISLE") count hit-1k benches/redis-only.sh)"
d=$(count hit-1k "$AISLE" run --config benches/compare-default.toml)
r=$(count hit-1k "$AISLE" run --config benches/compare-rules-on.toml)
row "default route hit-1k" "$d"
row "rules on hit-1k" "$r"
if [[ -x $FLOOR ]]; then
  row "floor (bare pingora) hit-1k" "$(count hit-1k "$FLOOR")"
  row "floor (bare pingora) pass" "$(count pass "$FLOOR")"
fi
echo "rules cost: $(awk -v d="$d" -v r="$r" 'BEGIN {printf "%+.1f%%", (r / d - 1) * 100}') instructions against the default route (issue 16's bound: 5%)"
