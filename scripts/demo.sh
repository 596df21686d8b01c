#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine as root: install what is needed, build (release),
# and run the Calico eBPF lab end to end on a real 3-node lab made of network namespaces
# (examples/seed-walkthrough.sh): WireGuard on then off, yaobank and its LoadBalancer, the
# customer logging a node's address; kube-proxy's rules kept, a live switch to the eBPF
# dataplane and the customer logging the client's address; the reversal and a node's address
# again. Every step prints its command, what it shows, and checks it.
# Usage: scripts/demo.sh [--keep]   (--keep leaves the lab up and says how to take it down)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
echo "== building (release)"
cargo build --release --locked --workspace --bins
exec bash examples/seed-walkthrough.sh --bin "$PWD/target/release" "$@"
