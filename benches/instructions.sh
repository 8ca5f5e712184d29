#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind: the same figure for the
# same binary and requests whatever else the machine is doing, unlike req/s on a shared 2-core
# machine (where compare.sh's ratios drift by +-20% between runs). Issue 16 measures each change
# of the hit and pass paths with it, beside compare.sh.
#
# Usage: benches/instructions.sh [--requests N] [--scenario hit-1k|hit-64k|pass] [--layout] -- GATEWAY_CMD...
#   benches/instructions.sh -- target/release/aisle run --config benches/compare.toml
#   benches/instructions.sh --scenario pass -- target/release/examples/bare_pingora   # the floor
#   benches/instructions.sh -- benches/redis-only.sh                                   # Redis only
# The gateway must listen on 127.0.0.1:17480 and forward to 127.0.0.1:17490, as for
# ../shared/bench/compare.sh; this script runs that origin (nginx, the same fixed bodies). It
# warms 50 keys, then counts N requests (default 2000) from 8 kept-alive connections (curl
# --parallel), from callgrind's instrumentation switched on to switched off, and prints the
# total over N. Kernel time is not counted: system calls are counted by `perf stat` instead.
# CALLGRIND_EXTRA adds callgrind options (e.g. CALLGRIND_EXTRA=--dump-instr=yes, to see which
# instructions of a function the count is in). --layout also simulates the caches and branch
# predictor (--cache-sim=yes --branch-sim=yes; about twice as slow) and prints the first-level
# instruction-cache misses and mispredicted conditional branches per request: what a change of
# code layout (PGO, BOLT: scripts/build-pgo.sh) changes where the instruction count does not.
# The simulated machine is valgrind's model (this host's L1i size, its own predictor), not the
# host: compare builds with it, not machines.
# Needs valgrind, nginx and curl (apt-get install -y valgrind nginx-light curl).
set -euo pipefail
cd "$(dirname "$0")/.."
N=2000; SCENARIO=hit-1k; LAYOUT=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --requests) N="$2"; shift 2 ;;
    --layout) LAYOUT=1; shift ;;
    --scenario) SCENARIO="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (usage: see the top of $0)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "no gateway command (usage: see the top of $0)" >&2; exit 2; }
SIM=""
if [[ $LAYOUT -eq 1 ]]; then SIM="--cache-sim=yes --branch-sim=yes"; fi
for tool in valgrind callgrind_control callgrind_annotate nginx curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y valgrind nginx-light curl)" >&2; exit 2; }
done
case "$SCENARIO" in
  hit-1k) PREFIX=/bench/1k/k ;;
  hit-64k) PREFIX=/bench/64k/k ;;
  pass) PREFIX=/pass/k ;;
  *) echo "unknown scenario $SCENARIO (hit-1k, hit-64k or pass)" >&2; exit 2 ;;
esac
. benches/origin.sh
bench_setup instructions
bench_origin

# Children are followed (benches/redis-only.sh execs aisle), except the servers it starts.
setsid valgrind --tool=callgrind ${CALLGRIND_EXTRA:-} ${SIM:-} --instr-atstart=no --trace-children=yes \
  --trace-children-skip='*redis-server*,*redis-cli*,*taskset*,*mktemp*,*dirname*,*seq*,*sleep*' \
  --callgrind-out-file="$RUN/callgrind.%p" "$@" >"$RUN/gateway.log" 2>&1 &
GW=$!
ready=""
for _ in $(seq 1 600); do
  curl -s -o /dev/null "http://127.0.0.1:17480${PREFIX}ready" && { ready=1; break; }
  sleep 0.1
done
[[ -n $ready ]] || { echo "the gateway did not answer within 60 s" >&2; tail -20 "$RUN/gateway.log" >&2; exit 1; }

urls() {  # count -> a curl config of that many requests over 50 keys
  for i in $(seq 1 "$1"); do
    echo "url = \"http://127.0.0.1:17480${PREFIX}$((i % 50 + 1))?v=1\""
    echo "output = /dev/null"
  done
}
urls 100 > "$RUN/warm.cfg"
urls "$N" > "$RUN/load.cfg"
curl -s --parallel --parallel-max 8 -K "$RUN/warm.cfg" 2>/dev/null
curl -s --parallel --parallel-max 8 -K "$RUN/warm.cfg" 2>/dev/null
callgrind_control -i on "$GW" >/dev/null 2>&1
curl -s --parallel --parallel-max 8 -K "$RUN/load.cfg" 2>/dev/null
callgrind_control -i off "$GW" >/dev/null 2>&1
callgrind_control -d "$GW" >/dev/null 2>&1
out=$(ls -S "$RUN"/callgrind.* | head -1)
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$SCENARIO: $((total / N)) instructions per request ($total over $N requests; profile: $out)"
if [[ $LAYOUT -eq 1 ]]; then
  read -r i1 bcm < <(callgrind_annotate --show=I1mr,Bcm "$out" 2>/dev/null |
    awk '/PROGRAM TOTALS/ {gsub(/,|\([^)]*\)/, ""); print $1, $2}')
  echo "$SCENARIO: $((i1 / N)) L1 instruction-cache misses and $((bcm / N)) mispredicted conditional branches per request (simulated)"
fi
echo "(callgrind_annotate --inclusive=yes $out | less   shows where they go; the directory is kept)"
trap - EXIT
bench_cleanup
