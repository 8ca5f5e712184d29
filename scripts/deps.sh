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

# Installs the pinned schemathesis (PyPI) in a venv under ~/.cache/aisle, where
# tests/it/openapi.rs looks for it (AISLE_SCHEMATHESIS overrides). Needs python3 with venv;
# on Debian that is python3-venv, installed here when missing.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="${HOME}/.cache/aisle/schemathesis-${SCHEMATHESIS_VERSION}"
  [[ -x "$venv/bin/schemathesis" ]] && return 0
  ensure_packages python3:python3
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # No command tells venv apart, so name one that never exists: the package is installed.
    ensure_packages python3-venv-missing:python3-venv
  fi
  echo "installing schemathesis ${SCHEMATHESIS_VERSION} in $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}"
}
