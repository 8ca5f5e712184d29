#!/usr/bin/env bash
# Builds target/pgo/release/aisle with profile-guided optimisation and BOLT (issue 16): the
# compiler lays out and inlines the code by what a running gateway actually executes, where a
# plain release build guesses. A hit runs about 10% more instructions than pingora alone but
# took 30-45% more CPU time (README "Performance"): much of the gap is code spread over more
# cache lines, which is what PGO and BOLT reorder.
#
# Usage: scripts/build-pgo.sh [--seconds N] [--no-bolt] [--no-check]
#   1. builds an instrumented gateway (target/pgo-gen, RUSTFLAGS=-Cprofile-generate);
#   2. trains it on loopback, against benches/origin.sh's nginx origin on 127.0.0.1:17490 (the
#      gateway listens on 127.0.0.1:17480): for each of benches/compare.toml (the memory tier,
#      a plain rule), benches/compare-rules-on.toml (path parameters, normalized query fields,
#      tags) and benches/compare-redis.toml (the memory tier off, a private redis-server on
#      127.0.0.1:17495), misses that fill, then N seconds (default 10) each of 1 KiB hits,
#      64 KiB hits, uncacheable passes, conditional and ranged hits, and PURGEs of single keys;
#   3. merges the profiles (llvm-profdata, from `rustup component add llvm-tools`) into
#      target/pgo/aisle-HASH.profdata (named by its content, so a new profile rebuilds) and
#      builds the gateway with it (RUSTFLAGS=-Cprofile-use), kept as target/pgo/release/aisle-pgo;
#   4. unless --no-bolt, lays that binary out again after linking with BOLT (llvm-bolt, Debian's
#      bolt-19): instruments it, trains it as in step 2, and reorders its blocks and functions
#      by what ran, hot code together and cold code split off (rustc's own release build does
#      the same). PGO chose inlining and block order inside each compilation unit; BOLT orders
#      the whole linked binary, which is where the floor comparison's gap was (on stop 39's
#      training, taken branches -33% against the PGO binary's). The result is
#      target/pgo/release/aisle (with --no-bolt, a copy of aisle-pgo);
#   5. unless --no-check, runs the integration suite against target/pgo/release/aisle
#      (AISLE_TEST_BIN), so the binary shipped is a binary tested (about 5 more minutes).
# The training requests are the benchmark's request shapes: say so when quoting figures of the
# binary it builds. The test suite and `cargo build` are unchanged: this is a separate build.
# Needs nginx, wrk, curl, redis-server (apt-get install -y nginx-light wrk curl redis-server),
# llvm-tools and, for step 4, llvm-bolt and merge-fdata (apt-get install -y bolt-19).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=10; CHECK=1; BOLT=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) SECS="$2"; shift 2 ;;
    --no-bolt) BOLT=0; shift ;;
    --no-check) CHECK=0; shift ;;
    *) echo "unknown option $1 (usage: see the top of $0)" >&2; exit 2 ;;
  esac
done
for tool in nginx wrk curl redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx-light wrk curl redis-server)" >&2; exit 2; }
done
PROFDATA=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
[[ -n $PROFDATA && -x $PROFDATA ]] || {
  echo "missing llvm-profdata: run 'rustup component add llvm-tools' (it must match rustc's LLVM)" >&2; exit 2; }
# BOLT reads the linked binary, so any recent release does (it need not match rustc's LLVM).
# Resolved through Debian's /usr/bin/llvm-bolt-19 link: llvm-bolt finds its instrumentation
# runtime (libbolt_rt_instr.a) beside its own real path.
find_tool() {
  local t
  t=$(command -v "$1" || ls /usr/bin/"$1"-[0-9]* 2>/dev/null | sort -V | tail -1)
  [[ -z $t ]] || readlink -f "$t"
}
if [[ $BOLT -eq 1 ]]; then
  LLVM_BOLT=$(find_tool llvm-bolt); MERGE_FDATA=$(find_tool merge-fdata)
  [[ -n $LLVM_BOLT && -n $MERGE_FDATA ]] || {
    echo "missing llvm-bolt: apt-get install -y bolt-19 (or run with --no-bolt)" >&2; exit 2; }
fi
# v0 symbol names hold no dots: BOLT 19 takes a legacy name with '.warm' in it (every function
# of aisle::config::warm, 'aisle..config..warm..') for a split-off part of another function,
# finds no parent and stops. The same names in both builds, or the profile would not match.
FLAGS="-Csymbol-mangling-version=v0"

# With --target, RUSTFLAGS reach the gateway's code and not build scripts or proc macros (whose
# runs at build time would write profiles of their own).
TARGET=$(rustc -vV | awk '/^host:/ {print $2}')
. benches/origin.sh
bench_setup pgo
# A fixed directory, so the instrumented build is not redone when only the training changes.
DATA="$PWD/target/pgo-gen/profiles"
rm -rf "$DATA"; mkdir -p "$DATA"
GEN="target/pgo-gen/$TARGET/release/aisle"

echo "== 1. instrumented build (target/pgo-gen)"
CARGO_TARGET_DIR=target/pgo-gen RUSTFLAGS="$FLAGS -Cprofile-generate=$DATA" \
  cargo build --release --locked --bin aisle --target "$TARGET"
bench_origin

cat > "$RUN/keys.lua" <<'EOL'
-- BENCH_PREFIX plus a key of 1..1000, "?v=1" as compare.sh asks; BENCH_HEADER adds one field.
local header = os.getenv("BENCH_HEADER")
request = function()
  local headers = {}
  if header and header ~= "" then
    local k, v = header:match("^([^:]+):%s*(.*)$")
    headers[k] = v
  end
  return wrk.format("GET", os.getenv("BENCH_PREFIX") .. math.random(1, 1000) .. "?v=1", headers)
end
EOL
load() { BENCH_PREFIX="$1" BENCH_HEADER="${2:-}" wrk -t1 -c32 -d"${SECS}s" -s "$RUN/keys.lua" http://127.0.0.1:17480 >/dev/null; }

train() {  # command...: the gateway (its last process execs aisle, which SIGINT stops)
  echo "== training on $*"
  setsid "$@" >"$RUN/gateway.log" 2>&1 &
  GW=$!
  local ready=""
  for _ in $(seq 1 300); do
    curl -s -o /dev/null http://127.0.0.1:17480/pass/k1 && { ready=1; break; }
    sleep 0.1
  done
  [[ -n $ready ]] || { echo "the gateway did not answer within 30 s" >&2; tail -20 "$RUN/gateway.log" >&2; exit 1; }
  for i in $(seq 1 1000); do   # misses: every key filled once
    curl -s -o /dev/null -o /dev/null "http://127.0.0.1:17480/bench/1k/k$i?v=1" "http://127.0.0.1:17480/bench/64k/k$i?v=1"
  done
  load /bench/1k/k
  load /bench/64k/k
  load /pass/k
  load /bench/1k/k "If-None-Match: *"
  load /bench/1k/k "Range: bytes=0-99"
  for i in $(seq 1 200); do   # a purge, then the miss that fills again
    curl -s -o /dev/null -X PURGE "http://127.0.0.1:17480/bench/1k/k$i?v=1"
    curl -s -o /dev/null "http://127.0.0.1:17480/bench/1k/k$i?v=1"
  done
  # SIGINT: pingora exits at once through exit(), which writes the profile; then the rest of
  # its process group (redis-only.sh's Redis) is stopped.
  kill -INT "$GW"
  for _ in $(seq 1 100); do kill -0 "$GW" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$GW" 2>/dev/null; then echo "the instrumented gateway did not exit" >&2; exit 1; fi
  kill -TERM -- "-$GW" 2>/dev/null || true
  GW=""
}
train_all() {  # binary: the three configurations step 2 names, PGO's and BOLT's training alike
  train "$1" run --config benches/compare.toml
  train "$1" run --config benches/compare-rules-on.toml
  train env AISLE_BIN="$1" benches/redis-only.sh
}
echo "== 2. training the instrumented build"
train_all "$GEN"

ls "$DATA"/*.profraw >/dev/null 2>&1 || { echo "no profile was written in $DATA" >&2; exit 1; }
echo "== 3. merging $(ls "$DATA"/*.profraw | wc -l) profiles; optimised build (target/pgo)"
"$PROFDATA" merge -o "$DATA/merged.profdata" "$DATA"/*.profraw
mkdir -p target/pgo
PROFILE="$PWD/target/pgo/aisle-$(sha256sum "$DATA/merged.profdata" | cut -c1-16).profdata"
cp "$DATA/merged.profdata" "$PROFILE"
# --emit-relocs keeps the relocations BOLT needs to move code; it only makes the file larger.
CARGO_TARGET_DIR=target/pgo RUSTFLAGS="$FLAGS -Cprofile-use=$PROFILE -Clink-arg=-Wl,--emit-relocs" \
  cargo build --release --locked --bin aisle --target "$TARGET"
mkdir -p target/pgo/release
cp "target/pgo/$TARGET/release/aisle" target/pgo/release/aisle-pgo
echo "profile: $PROFILE"
if [[ $BOLT -eq 1 ]]; then
  echo "== 4. BOLT: instrumenting target/pgo/release/aisle-pgo"
  BDATA="$PWD/target/pgo/bolt-profiles"
  rm -rf "$BDATA"; mkdir -p "$BDATA"
  "$LLVM_BOLT" target/pgo/release/aisle-pgo -instrument --instrumentation-file-append-pid \
    --instrumentation-file="$BDATA/prof" -o target/pgo/aisle-bolt-gen >"$BDATA/instrument.log" 2>&1 ||
    { tail -20 "$BDATA/instrument.log" >&2; exit 1; }
  train_all "$PWD/target/pgo/aisle-bolt-gen"
  ls "$BDATA"/prof.*.fdata >/dev/null 2>&1 || { echo "no BOLT profile was written in $BDATA" >&2; exit 1; }
  "$MERGE_FDATA" "$BDATA"/prof.*.fdata >"$BDATA/merged.fdata" 2>"$BDATA/merge.log" ||
    { tail -20 "$BDATA/merge.log" >&2; exit 1; }
  "$LLVM_BOLT" target/pgo/release/aisle-pgo -data="$BDATA/merged.fdata" -o target/pgo/release/aisle \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold -split-eh \
    -icf=1 -use-gnu-stack -dyno-stats >"$BDATA/optimize.log" 2>&1 ||
    { tail -20 "$BDATA/optimize.log" >&2; exit 1; }
  grep -E "^ +[0-9]+ : (executed instructions|taken branches)" "$BDATA/optimize.log" || true
else
  cp target/pgo/release/aisle-pgo target/pgo/release/aisle
fi
if [[ $CHECK -eq 1 ]]; then
  echo "== 5. the integration suite against target/pgo/release/aisle"
  # What scripts/test.sh installs for the suite (Prometheus, the pinned schemathesis).
  source scripts/deps.sh
  ensure_packages promtool:prometheus prometheus:prometheus
  ensure_schemathesis
  AISLE_TEST_BIN="$PWD/target/pgo/release/aisle" cargo test --locked --test it
fi
echo "built target/pgo/release/aisle"
