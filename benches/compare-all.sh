#!/usr/bin/env bash
# Issue 16's whole comparison with nginx and Varnish (README "Performance"), in four runs of
# ../shared/bench/compare.sh, with the medians, p99s and ratios each printed, and a summary:
#   1. the memory tier, every scenario (benches/compare.toml);
#   2. Redis only, hit-1k (benches/redis-only.sh: the memory tier off, Redis on core 1);
#   3. the default route alone, hit-1k (benches/compare-default.toml), and
#   4. the realistic rule set, hit-1k (benches/compare-rules-on.toml): the rules' cost is
#      1 - ratio(4) / ratio(3), each ratio taken against nginx in its own run. The cost is a
#      few percent, about the drift between two runs, so 3 and 4 are run in turn, one rep each,
#      N times, and the medians of their ratios (from the req/s, not the rounded ratio) compared;
#   5. when built (cargo build --release --example bare_pingora), the floor: pingora answering
#      hits itself with no cache and proxying /pass/* with no hooks, hit-1k and pass.
# Usage: benches/compare-all.sh [--duration S] [--reps N] [OUT_DIR]   (defaults 8, 3, a temp dir)
# The gateway is target/release/aisle, or the build AISLE_BIN names (the profile-guided build of
# scripts/build-pgo.sh: AISLE_BIN=target/pgo/release/aisle). The floor stays the plain build.
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
AISLE=${AISLE_BIN:-target/release/aisle}
export AISLE_BIN=$AISLE   # benches/redis-only.sh runs the same build
[[ -x $AISLE ]] || { echo "no $AISLE: run cargo build --release (or scripts/build-pgo.sh)" >&2; exit 2; }
[[ -x $COMPARE ]] || { echo "no $COMPARE (the shared benchmark)" >&2; exit 2; }

run() {  # name scenarios reps gateway-command...
  local name=$1 scenarios=$2 reps=$3; shift 3
  echo "== $name" >&2
  # The previous gateway may still be in its shutdown grace period: compare.sh refuses a busy port.
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/17480) 2>/dev/null || break
    sleep 0.1
  done
  "$COMPARE" --duration "$DURATION" --reps "$reps" --scenarios "$scenarios" -- "$@" | tee "$OUT/$name.txt"
}

run memory "hit-1k hit-64k pass" "$REPS" "$AISLE" run --config benches/compare.toml
run redis-only "hit-1k" "$REPS" benches/redis-only.sh
for i in $(seq 1 "$REPS"); do
  run "default-route-$i" "hit-1k" 1 "$AISLE" run --config benches/compare-default.toml
  run "rules-on-$i" "hit-1k" 1 "$AISLE" run --config benches/compare-rules-on.toml
done

FLOOR=target/release/examples/bare_pingora
[[ -x $FLOOR ]] && run floor "hit-1k pass" "$REPS" "$FLOOR"

ratio() { awk -v s="$2" '$1 == "ratio" && $2 == s":" {sub(",", "", $5); print $5}' "$OUT/$1.txt"; }
# gateway/nginx of one hit-1k run from its req/s, to four places.
exact() { awk '$1 == "hit-1k" && $2 == "gateway" {g = $3} $1 == "hit-1k" && $2 == "nginx" {n = $3}
               END {printf "%.4f\n", g / n}' "$OUT/$1.txt"; }
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
d=$(for i in $(seq 1 "$REPS"); do exact "default-route-$i"; done | median)
r=$(for i in $(seq 1 "$REPS"); do exact "rules-on-$i"; done | median)
echo
echo "summary (gateway/nginx, medians of $REPS x ${DURATION}s; raw output in $OUT):"
echo "  gateway: $AISLE"
echo "  memory tier   hit-1k $(ratio memory hit-1k)  hit-64k $(ratio memory hit-64k)  pass $(ratio memory pass)"
echo "  Redis only    hit-1k $(ratio redis-only hit-1k)"
echo "  default route hit-1k $d   rules on hit-1k $r (each the median of $REPS runs in turn)   rules cost $(awk -v d="$d" -v r="$r" 'BEGIN {printf "%.1f%%", (1 - r / d) * 100}')"
if [[ -x $FLOOR ]]; then
  echo "  floor (bare pingora) hit-1k $(ratio floor hit-1k)  pass $(ratio floor pass)"
  # The share of the floor is steadier between machines than either ratio to nginx (stop 37:
  # 0.84 on hits on two machines whose floors were 1.53x and 1.10x nginx).
  share() { awk -v a="$(ratio memory "$1")" -v f="$(ratio floor "$1")" 'BEGIN {printf "%.2f", a / f}'; }
  echo "  gateway / floor    hit-1k $(share hit-1k)  pass $(share pass)"
fi
