#!/usr/bin/env bash
# Runs the gateway on its embedded default: memory tier, bundled demo origin (see README).
# The admin token is AISLE_ADMIN_TOKEN; unset, `aisle demo` makes one up and prints the export line.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages cmake:cmake  # pingora's zlib-ng is built with cmake
cargo build --release --bin aisle
exec target/release/aisle demo --config gateway.toml
