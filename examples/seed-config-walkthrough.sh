#!/usr/bin/env bash
# The configuration steps of the Calico eBPF lab (Module 5), done with margayctl against a fresh
# datastore. Each step prints the command, its output, and checks what the lab says it shows.
# Usage: seed-config-walkthrough.sh [path/to/margayctl]   (MARGAY_DATASTORE picks the datastore;
# by default a fresh one in a temporary folder, removed at the end).
set -euo pipefail

MARGAYCTL=${1:-margayctl}
if [ -z "${MARGAY_DATASTORE:-}" ]; then
  workdir=$(mktemp -d /tmp/margay-walkthrough.XXXXXX)
  trap 'rm -rf "$workdir"' EXIT
  export MARGAY_DATASTORE="sqlite://$workdir/margay.db"
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ margayctl %s\n' "$*"; "$MARGAYCTL" "$@"; }
expect() { # expect "what it shows" PATTERN TEXT
  if grep -qE -- "$2" <<<"$3"; then printf '   -> ok: %s\n' "$1"; else printf '   -> FAILED: %s\n' "$1" >&2; exit 1; fi
}

step "The datastore ($MARGAY_DATASTORE) holds what a fresh install holds"
out=$(show get felixconfiguration); echo "$out"
out=$(show get installation default -o wide); echo "$out"
expect "the cluster runs the standard (Iptables) dataplane" "default +Iptables" "$out"
out=$(show get ippools -o wide); echo "$out"
expect "the default IPv4 pool is 192.168.0.0/16" "192.168.0.0/16" "$out"

step "Step 2: disable WireGuard"
out=$(show --allow-version-mismatch patch felixconfiguration default --type=merge -p '{"spec":{"wireguardEnabled":false}}'); echo "$out"
expect "calicoctl's message" "^Successfully patched 1 'FelixConfiguration' resource$" "$out"

step "Step 3: no node carries WireGuard fields (the agents withdraw them within seconds)"
for _ in $(seq 1 60); do
  out=$("$MARGAYCTL" get nodes -o yaml)
  grep -q wireguard <<<"$out" || break
  sleep 0.5
done
for node in $("$MARGAYCTL" get nodes -o 'jsonpath={.items[*].metadata.name}'); do
  printf '$ margayctl --allow-version-mismatch get node %s -o yaml | grep wireguard\n' "$node"
  if "$MARGAYCTL" --allow-version-mismatch get node "$node" -o yaml | grep wireguard; then
    echo "   -> FAILED: $node still has WireGuard fields" >&2; exit 1
  fi
done
echo "   -> ok: blank, no WireGuard interface address or public key on any node"

step "Step 4b: the yaobank namespace and the LoadBalancer Service for the customer"
out=$(cat <<'YAML' | show apply -f -
apiVersion: v1
kind: Namespace
metadata:
  name: yaobank
---
apiVersion: v1
kind: Service
metadata:
  name: yaobank-customer
  namespace: yaobank
spec:
  selector:
    app: customer
  ports:
  - port: 80
    targetPort: 80
  type: LoadBalancer
YAML
); echo "$out"
out=$(show get svc -n yaobank); echo "$out"
expect "the Service is a LoadBalancer (its address comes from a LoadBalancer IP pool, when there is one)" "yaobank-customer +LoadBalancer" "$out"

step "Step 5: tell the agents how to reach the API server directly"
out=$(cat <<'YAML' | show apply -f -
apiVersion: v1
kind: Namespace
metadata:
  name: tigera-operator
---
kind: ConfigMap
apiVersion: v1
metadata:
  name: kubernetes-services-endpoint
  namespace: tigera-operator
data:
  KUBERNETES_SERVICE_HOST: "10.224.0.4"
  KUBERNETES_SERVICE_PORT: "443"
YAML
); echo "$out"

step "Step 7: keep kube-proxy's iptables rules in BPF mode"
out=$(show --allow-version-mismatch patch felixconfiguration default --patch='{"spec": {"bpfKubeProxyIptablesCleanupEnabled": false}}'); echo "$out"
out=$(show --allow-version-mismatch get felixconfiguration default -o yaml); echo "$out"
expect "bpfKubeProxyIptablesCleanupEnabled is false" "bpfKubeProxyIptablesCleanupEnabled: false" "$out"
expect "wireguardEnabled is false" "wireguardEnabled: false" "$out"

step "A typo is refused with the field and the choices, and changes nothing"
if out=$("$MARGAYCTL" patch felixconfiguration default --type merge -p '{"spec":{"bpfLogLevel":"Loud"}}' 2>&1); then
  echo "   -> FAILED: the bad value was accepted" >&2; exit 1
fi
echo "$out"
expect "the error names the field and the accepted values" 'spec.bpfLogLevel: "Loud" is not one of Off, Info, Debug' "$out"

step "Step 8: switch the Installation to the eBPF dataplane (hostPorts cleared as in the lab)"
out=$(show patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"linuxDataplane":"BPF", "hostPorts":null}}}'); echo "$out"
out=$(show get installation default -o wide); echo "$out"
expect "the Installation asks for BPF" "default +BPF" "$out"

step "Reversal 1-3: back to Iptables, and the cleanup option removed"
show patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"linuxDataplane":"Iptables"}}}'
show --allow-version-mismatch patch felixconfiguration default --patch='{"spec": {"bpfKubeProxyIptablesCleanupEnabled": null}}'
out=$(show --allow-version-mismatch get felixconfiguration default -o yaml); echo "$out"
if grep -q bpfKubeProxyIptablesCleanupEnabled <<<"$out"; then echo "   -> FAILED: the option is still there" >&2; exit 1; fi
echo "   -> ok: bpfKubeProxyIptablesCleanupEnabled is gone"
expect "wireguardEnabled is still false" "wireguardEnabled: false" "$out"

step "Reversal 5: delete the ConfigMap"
show delete cm -n tigera-operator kubernetes-services-endpoint

printf '\nWalkthrough complete: every configuration step of the lab works with margayctl.\n'
