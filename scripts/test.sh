#!/usr/bin/env bash
# Runs every test Margay has, as CI does: formatting, lints, and the whole workspace's tests.
# Run as root on Debian 12: later suites load BPF programs and build network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo build --workspace --bins (the lab's tests run the agent and demo binaries)"
cargo build --workspace --bins --locked

echo "== cargo test"
cargo test --workspace --locked
