#!/usr/bin/env bash
# CPU time the gateway spends per request, user and kernel apart, under load: what a timed run's
# req/s hides and callgrind's instruction counts (benches/instructions.sh) leave out (cache
# misses, system calls, the kernel's share). Issue 16 compares Aisle with the floor
# (examples/bare_pingora) with it: the same requests, the same pinning as compare.sh.
#
# Usage: benches/cpu-per-request.sh [--scenario hit-1k|pass] [--seconds N] [--perf FILE] -- GATEWAY_CMD...
#   benches/cpu-per-request.sh -- target/release/aisle run --config benches/compare.toml
#   benches/cpu-per-request.sh --scenario pass -- target/release/examples/bare_pingora
# The gateway must listen on 127.0.0.1:17480 and forward to 127.0.0.1:17490 (compare.sh's
# contract); this script runs that origin (nginx, compare.sh's fixed bodies). The gateway is
# pinned to core 0, wrk (64 connections, 1000 random keys) and the origin to core 1. After a
# 3 s warm-up it reads the gateway's user and system CPU ticks (/proc/PID/stat, all threads)
# and its context switches around an N-second run (default 8) and prints them per request.
# --perf FILE also records a cpu-clock profile of that run (perf report -i FILE --sort dso,sym).
# Needs nginx, wrk, curl, taskset (apt-get install -y nginx-light wrk curl util-linux), and
# linux-perf for --perf.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=hit-1k; SECONDS_RUN=8; PERF=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --scenario) SCENARIO="$2"; shift 2 ;;
    --seconds) SECONDS_RUN="$2"; shift 2 ;;
    --perf) PERF="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (usage: see the top of $0)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "no gateway command (usage: see the top of $0)" >&2; exit 2; }
for tool in nginx wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx-light wrk curl util-linux)" >&2; exit 2; }
done
[[ -z $PERF ]] || command -v perf >/dev/null || { echo "missing perf (apt-get install -y linux-perf)" >&2; exit 2; }
case "$SCENARIO" in
  hit-1k) PREFIX=/bench/1k/k ;;
  pass) PREFIX=/pass/k ;;
  *) echo "unknown scenario $SCENARIO (hit-1k or pass)" >&2; exit 2 ;;
esac
. benches/origin.sh
bench_setup cpu
bench_origin 1

setsid taskset -c 0 "$@" >"$RUN/gateway.log" 2>&1 &
GW=$!
ready=""
for _ in $(seq 1 300); do
  curl -s -o /dev/null "http://127.0.0.1:17480${PREFIX}1" && { ready=1; break; }
  sleep 0.1
done
[[ -n $ready ]] || { echo "the gateway did not answer within 30 s" >&2; tail -20 "$RUN/gateway.log" >&2; exit 1; }
# The process that serves: the group leader, or the one it started (benches/redis-only.sh execs).
PID=$GW
cat > "$RUN/keys.lua" <<'EOL'
request = function()
  return wrk.format("GET", string.format("%s%d", os.getenv("PREFIX"), math.random(1, 1000)))
end
EOL
load() { PREFIX=$PREFIX taskset -c 1 wrk -t1 -c64 -d"$1"s -s "$RUN/keys.lua" http://127.0.0.1:17480; }
ticks() { awk '{print $14, $15}' "/proc/$PID/stat"; }
switches() { cat /proc/"$PID"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }

load 3 >/dev/null
read -r u1 s1 < <(ticks); c1=$(switches)
if [[ -n $PERF ]]; then
  perf record -q -e cpu-clock -F 4000 -p "$PID" -o "$PERF" -- sleep "$SECONDS_RUN" >/dev/null 2>&1 &
  PERF_PID=$!
fi
out=$(load "$SECONDS_RUN")
[[ -z $PERF ]] || wait "$PERF_PID" || true
read -r u2 s2 < <(ticks); c2=$(switches)
n=$(awk '/requests in/ {print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
[[ ${n:-0} -gt 0 ]] || { echo "wrk made no request: $out" >&2; exit 1; }
hz=$(getconf CLK_TCK)
awk -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v c=$((c2 - c1)) -v n="$n" -v r="$rps" -v hz="$hz" -v sc="$SCENARIO" 'BEGIN {
  printf "%s: %s req/s; per request: user %.2f us, system %.2f us, total %.2f us; context switches %.3f\n",
    sc, r, u * 1e6 / hz / n, s * 1e6 / hz / n, (u + s) * 1e6 / hz / n, c / n }'
