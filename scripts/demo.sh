#!/usr/bin/env bash
# The main job: installs what is needed, builds margayctl, and walks through the configuration
# steps of the Calico eBPF lab (../examples/seed-config-walkthrough.sh) against a fresh datastore.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
echo "== building margayctl"
cargo build --release --locked -p margayctl
exec bash examples/seed-config-walkthrough.sh "$PWD/target/release/margayctl"
