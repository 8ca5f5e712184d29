#!/usr/bin/env bash
# Installs the system packages Aisle needs, when missing. Sourced by demo.sh and test.sh.
#   ensure_packages CMD:PACKAGE ...   e.g. ensure_packages cmake:cmake redis-server:redis-server
# As root on Debian/Ubuntu it runs apt-get; otherwise it says exactly what to install and fails.
ensure_packages() {
  local missing=() pair
  # Rust first: it is needed whatever else is installed (issue 18: this check used to sit after
  # the early return, so a machine with every package but no cargo never saw it).
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install Rust from https://rustup.rs (stable, 1.85 or newer)" >&2
    return 1
  fi
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing system packages: ${missing[*]}" >&2
    echo "install them first, e.g.: sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
}
