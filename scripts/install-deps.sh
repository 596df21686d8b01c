#!/usr/bin/env bash
# Installs the system packages Margay's build, demo and tests use, on Debian 12, as root.
# Idempotent: packages already present are left alone, and apt is only asked when one is missing.
# Services that packages ship (etcd) are never started on the host: tests start their own
# instances on loopback, so installation runs under a policy-rc.d that forbids service starts.
set -euo pipefail

# One line per package, with what needs it.
packages=(
  build-essential   # the C compiler for rusqlite's bundled SQLite
  pkg-config
  ca-certificates
  jq                # the walkthrough reads margayctl's JSON output
  iproute2          # ip: the lab's namespaces, veths, routes; the agent's route batches
  iptables          # iptables-restore / iptables-save: the standard dataplane
  dnsmasq-base      # the lab's cluster DNS (the binary only, no host service)
  curl              # the lab's external client
  iputils-ping      # connectivity checks in the lab
  tcpdump           # captures on the lab's underlay (WireGuard tests)
  procps            # pgrep/pkill/sysctl
  clang             # compiles bpf/*.c to BPF objects
  llvm              # llvm-strip / llvm-objdump for BPF objects
  libbpf-dev        # BPF helper headers (bpf_helpers.h)
  bpftool           # inspecting BPF programs and maps
  clang-format      # checks the C's formatting
  etcd-server       # the etcd datastore's tests run a real etcd on loopback
  etcd-client       # etcdctl, to check the key layout as Calico's tools see it
  protobuf-compiler # protoc, for the etcd client's gRPC code
  libprotobuf-dev   # the well-known .proto files protoc needs for etcd's API
  fonts-dejavu-core # DejaVu Sans, the font of margay-lab bench's PNG plots
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
  # Forbid service starts while installing (etcd-server ships one), restoring any policy after.
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
  restore() { if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi; }
  trap restore EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  restore; trap - EXIT
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo is not on PATH; install Rust 1.95 or later (rustup) first" >&2
  exit 1
fi
echo "install-deps: system packages ready"
