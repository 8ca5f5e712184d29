#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, integration tests (which start real
# redis-server and aisle processes on free loopback ports), and the benchmarks in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages cmake:cmake redis-server:redis-server redis-cli:redis-tools curl:curl  # curl: tests/it/readme.rs runs README's commands
# prometheus + promtool (Debian's prometheus package ships both): tests/it/monitoring.rs runs a real
# Prometheus and promtool; the package's own service (if systemd starts it) is never used.
ensure_packages promtool:prometheus prometheus:prometheus
# The schema-driven fuzzer of the admin API (tests/it/openapi.rs), pinned, in its own venv.
ensure_schemathesis
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The fuzz targets (src/fuzz/) run a bounded number of cases here (2000 per unit of weight,
# about 30 s on 2 cores); scripts/fuzz.sh runs them for longer.
# The seed is fixed here so that CI is reproducible; scripts/fuzz.sh explores with fresh seeds.
AISLE_FUZZ_CASES="${AISLE_FUZZ_CASES:-2000}" PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261204}" \
  cargo test --all-targets --locked
