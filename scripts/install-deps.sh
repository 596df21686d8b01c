#!/usr/bin/env bash
# Installs the system packages Margay's build, demo and tests use, on Debian 12, as root.
# Idempotent: packages already present are left alone, and apt is only asked when one is missing.
set -euo pipefail

# One line per package, with what needs it.
packages=(
  build-essential  # the C compiler for rusqlite's bundled SQLite
  pkg-config
  ca-certificates
  jq               # the walkthrough reads margayctl's JSON output
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo is not on PATH; install Rust 1.95 or later (rustup) first" >&2
  exit 1
fi
echo "install-deps: system packages ready"
