#!/usr/bin/env bash
# Issue 16's whole comparison with nginx and Varnish (README "Performance"), in four runs of
# ../shared/bench/compare.sh, with the medians, p99s and ratios each printed, and a summary:
#   1. the memory tier, every scenario (benches/compare.toml);
#   2. Redis only, hit-1k (benches/redis-only.sh: the memory tier off, Redis on core 1);
#   3. the default route alone, hit-1k (benches/compare-default.toml), and
#   4. the realistic rule set, hit-1k (benches/compare-rules-on.toml): the rules' cost is
#      1 - ratio(4) / ratio(3), each ratio taken against nginx in its own run.
# Usage: benches/compare-all.sh [--duration S] [--reps N] [OUT_DIR]   (defaults 8, 3, a temp dir)
# Needs a release build (cargo build --release) and compare.sh's packages (its README).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=8; REPS=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:-$(mktemp -d /tmp/aisle-compare.XXXXXX)}
mkdir -p "$OUT"
COMPARE=../shared/bench/compare.sh
[[ -x target/release/aisle ]] || { echo "no target/release/aisle: run cargo build --release" >&2; exit 2; }
[[ -x $COMPARE ]] || { echo "no $COMPARE (the shared benchmark)" >&2; exit 2; }

run() {  # name scenarios gateway-command...
  local name=$1 scenarios=$2; shift 2
  echo "== $name" >&2
  # The previous gateway may still be in its shutdown grace period: compare.sh refuses a busy port.
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/17480) 2>/dev/null || break
    sleep 0.1
  done
  "$COMPARE" --duration "$DURATION" --reps "$REPS" --scenarios "$scenarios" -- "$@" | tee "$OUT/$name.txt"
}

run memory "hit-1k hit-64k pass" target/release/aisle run --config benches/compare.toml
run redis-only "hit-1k" benches/redis-only.sh
run default-route "hit-1k" target/release/aisle run --config benches/compare-default.toml
run rules-on "hit-1k" target/release/aisle run --config benches/compare-rules-on.toml

ratio() { awk -v s="$2" '$1 == "ratio" && $2 == s":" {sub(",", "", $5); print $5}' "$OUT/$1.txt"; }
d=$(ratio default-route hit-1k); r=$(ratio rules-on hit-1k)
echo
echo "summary (gateway/nginx, medians of $REPS x ${DURATION}s; raw output in $OUT):"
echo "  memory tier   hit-1k $(ratio memory hit-1k)  hit-64k $(ratio memory hit-64k)  pass $(ratio memory pass)"
echo "  Redis only    hit-1k $(ratio redis-only hit-1k)"
echo "  default route hit-1k $d   rules on hit-1k $r   rules cost $(awk -v d="$d" -v r="$r" 'BEGIN {printf "%.1f%%", (1 - r / d) * 100}')"
