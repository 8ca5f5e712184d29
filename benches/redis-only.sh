#!/usr/bin/env bash
# The gateway for ../shared/bench/compare.sh with the memory tier off (Redis only):
#   ../shared/bench/compare.sh -- benches/redis-only.sh
# Starts a private redis-server on 127.0.0.1:17495 (in this process group, so compare.sh stops
# it with the gateway), waits for it, then runs aisle with benches/compare-redis.toml
# (target/release/aisle, or the build AISLE_BIN names).
# compare.sh pins this script, and so everything it starts, to the gateway's core (0); Redis is
# a separate server that a fleet runs on its own machine, so it is moved to core 1 (beside wrk
# and the origin) rather than made to share the gateway's one core.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
taskset -c 1 redis-server --port 17495 --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
for _ in $(seq 1 100); do
  redis-cli -p 17495 ping >/dev/null 2>&1 && break
  sleep 0.05
done
exec "${AISLE_BIN:-target/release/aisle}" run --config benches/compare-redis.toml
