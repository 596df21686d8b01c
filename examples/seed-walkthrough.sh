#!/usr/bin/env bash
# The Calico eBPF lab (Module 5 of the Calico on AKS workshop) end to end, on a real 3-node lab
# made of network namespaces on this machine: every step of the lab and of its reversal, done with
# margayctl (for calicoctl and kubectl patch) and margay-lab (for kubectl and az), printing each
# command, what it shows, and checking that it shows what the lab says it shows. The first failed
# check stops the walkthrough with a non-zero exit (a test runs this script in CI).
#
#   before:   nodes Ready; WireGuard on, then off (no wireguard fields on any Node); yaobank and
#             its LoadBalancer; the customer pod logs a NODE's address (the standard dataplane
#             masquerades external traffic, as kube-proxy does)
#   switch:   kube-proxy's rules kept (bpfKubeProxyIptablesCleanupEnabled: false), the
#             Installation patched to BPF: every node switches live, no agent or pod restarts,
#             and the customer logs the CLIENT's address (203.0.113.10)
#   reversal: back to Iptables, the cleanup option removed, a node's address again
#
# Usage: examples/seed-walkthrough.sh [--bin DIR] [--name LAB] [--keep]
#   --bin DIR   where margay-lab, margayctl, margay-node and margay-demo-app are (default: the
#               directory of margay-lab on PATH, else target/release, else target/debug)
#   --name LAB  the lab's name (default: seed); a lab of that name left by an earlier run is
#               taken down first
#   --keep      leave the lab up at the end (and say how to take it down); by default it is
#               taken down on exit, also when a check fails
# Run as root. Nothing in the machine's own network namespace, iptables or root cgroup changes.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=""
lab="seed"
keep=false
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --name) lab="$2"; shift 2 ;;
    --keep) keep=true; shift ;;
    *) echo "usage: $0 [--bin DIR] [--name LAB] [--keep]" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  if command -v margay-lab >/dev/null; then bin=$(dirname "$(command -v margay-lab)")
  elif [ -x target/release/margay-lab ]; then bin="$PWD/target/release"
  else bin="$PWD/target/debug"; fi
fi
for b in margay-lab margayctl margay-node margay-demo-app; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing: build first (cargo build --workspace --bins)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "the lab needs root (network namespaces, iptables in them)" >&2; exit 2; }

export MARGAY_DATASTORE="sqlite:///run/margay-lab/$lab/margay.db"
CLIENT_IP=203.0.113.10

# Printing and checking.
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
ok() { printf '   \033[32m-> ok:\033[0m %s\n' "$*"; }
fail() { printf '   \033[31m-> FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
expect() { # expect "what it shows" ERE TEXT
  if grep -qE -- "$2" <<<"$3"; then ok "$1"; else fail "$1 (expected /$2/)"; fi
}
ctl() { "$bin/margayctl" "$@"; }
lab_() { "$bin/margay-lab" --name "$lab" "$@"; }
# show margayctl|margay-lab ARGS: print the command as a user types it, run it, print its output
# (also kept in $out for the checks that follow).
show() {
  local tool=$1; shift
  printf '$ %s %s\n' "$tool" "$*"
  case "$tool" in
    margayctl) out=$(ctl "$@") ;;
    margay-lab) out=$(lab_ "$@") ;;
  esac
  [ -z "$out" ] || printf '%s\n' "$out"
}
# wait_for SECONDS COMMAND...: retry until COMMAND succeeds (agents converge within seconds).
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

node_names() { ctl get nodes -o 'jsonpath={.items[*].metadata.name}'; }
node_ips() { ctl get nodes -o 'jsonpath={.items[*].spec.addresses[0].address}' | sed 's#/[0-9]*##g'; }

if ip netns list 2>/dev/null | grep -q "^$lab-"; then
  step "A lab named $lab exists from an earlier run: taking it down"
  lab_ down
fi
if ! $keep; then trap 'echo; echo "== margay-lab down"; lab_ down' EXIT; fi

step "The cluster: margay-lab up (3 nodes, the standard Iptables dataplane, cluster DNS)"
lab_ up --nodes 3
show margay-lab get nodes -o wide
show margayctl get installation default -o wide
expect "the cluster runs the standard (Iptables) dataplane" "default +Iptables" "$out"
show margayctl get ippools -o wide
expect "the default IPv4 pool is 192.168.0.0/16" "192.168.0.0/16" "$out"

step "The seed's cluster runs WireGuard between its nodes: so does this one"
show margayctl patch felixconfiguration default --type merge -p '{"spec":{"wireguardEnabled":true}}'
three_keys() { [ "$(ctl get nodes -o 'jsonpath={.items[*].status.wireguardPublicKey}' | wc -w)" -eq 3 ]; }
wait_for 30 three_keys || fail "not every node published a WireGuard public key"
show margayctl get node node-1 -o yaml
expect "node-1 publishes its WireGuard public key" "wireguardPublicKey: " "$out"
show margay-lab node exec node-1 -- ip -brief link show wireguard.cali
expect "node-1 has its WireGuard interface" "^wireguard.cali" "$out"
ok "every node has a WireGuard key: traffic between nodes is encrypted"

step "Step 1: the nodes are Ready (the lab has no Windows node pool to delete)"
show margay-lab get nodes
[ "$(grep -cE '^node-[0-9]+ +Ready ' <<<"$out")" -eq 3 ] || fail "three Ready nodes"
ok "three nodes, all Ready"

step "Step 2: disable WireGuard encryption across all the nodes"
show margayctl --allow-version-mismatch patch felixconfiguration default --type=merge -p '{"spec":{"wireguardEnabled":false}}'
expect "calicoctl's message" "^Successfully patched 1 'FelixConfiguration' resource$" "$out"

step "Step 3: the nodes have WireGuard disabled (the agents withdraw their fields within seconds)"
show margay-lab get nodes
[ "$(grep -cE '^node-[0-9]+ +Ready ' <<<"$out")" -eq 3 ] || fail "three Ready nodes"
no_wireguard_fields() { ! ctl get nodes -o yaml | grep -q wireguard; }
wait_for 30 no_wireguard_fields || fail "a node still has WireGuard fields"
for node in $(node_names); do
  printf '$ margayctl --allow-version-mismatch get node %s -o yaml | grep wireguard\n' "$node"
  if ctl --allow-version-mismatch get node "$node" -o yaml | grep wireguard; then
    fail "$node still has WireGuard fields"
  fi
done
ok "blank: no WireGuard interface address or public key on any node"
if lab_ node exec node-1 -- ip link show wireguard.cali >/dev/null 2>&1; then
  fail "node-1 still has its WireGuard interface"
fi
ok "and node-1's WireGuard interface is gone"

step "Step 4a: deploy the demo application yaobank"
show margay-lab apply -f examples/yaobank.yaml
show margay-lab get pods -n yaobank -o wide
[ "$(grep -cE ' Running ' <<<"$out")" -eq 4 ] || fail "four yaobank pods Running"
ok "yaobank's four pods are Running"
customer_pod=$(awk '/^customer-/ {print $1}' <<<"$out")
[ -n "$customer_pod" ] || fail "a customer pod"

step "Step 4b: the LoadBalancer Service for the customer front end"
show margay-lab apply -f examples/yaobank-customer-lb.yaml
show margay-lab get svc -n yaobank
expect "yaobank-customer is a LoadBalancer" "yaobank-customer +LoadBalancer" "$out"
SVC_HOST=$(lab_ get svc yaobank-customer -n yaobank -o 'jsonpath={.status.loadBalancer.ingress[0].ip}')
[[ "$SVC_HOST" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "a LoadBalancer IP is assigned (got '$SVC_HOST')"
ok "the LoadBalancer IP is $SVC_HOST"

step "Step 4c: curl the LoadBalancer IP from the external client ($CLIENT_IP)"
show margay-lab client -- curl -s -m 5 "http://$SVC_HOST/"
expect "yaobank's home page" "<h1>Welcome to YAO Bank</h1>" "$out"

# curl N times from the client; sources holds the addresses the customer logged for them.
log_lines() { lab_ logs -n yaobank deployment/customer | grep -c '' || true; }
new_sources() {
  local before; before=$(log_lines)
  for _ in $(seq 1 "$1"); do
    lab_ client -- curl -s -m 5 -o /dev/null -w '' "http://$SVC_HOST/" || fail "curl http://$SVC_HOST/"
  done
  printf '$ margay-lab logs -n yaobank deployment/customer   (the %s lines of these requests)\n' "$1"
  local lines; lines=$(lab_ logs -n yaobank deployment/customer | tail -n +"$((before + 1))" | grep '"GET / HTTP/1.1" 200')
  printf '%s\n' "$lines"
  sources=$(awk '{print $1}' <<<"$lines" | sort -u | paste -sd' ')
  [ "$(grep -c '' <<<"$lines")" -ge "$1" ] || fail "the customer logged every request"
}
all_node_addresses() { # every source in $sources is a node's address
  local ips; ips=" $(node_ips | tr '\n' ' ') "
  for s in $sources; do [[ "$ips" == *" $s "* ]] || return 1; done
}

step "Step 4d: the source address in the customer pod's log"
new_sources 4
all_node_addresses || fail "the customer logged a node's address (got: $sources)"
ok "the customer sees a NODE's address ($sources): traffic is NATed to the node, as with kube-proxy"

step "Step 5: tell the agents how to reach the API server directly (not through a Service)"
show margayctl apply -f - <<'YAML'
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
show margayctl get configmap kubernetes-services-endpoint -n tigera-operator -o 'jsonpath={.data.KUBERNETES_SERVICE_HOST}:{.data.KUBERNETES_SERVICE_PORT}'
expect "the ConfigMap holds the API server's address" "^10.224.0.4:443$" "$out"

step "Step 6: no rolling update is needed: each agent reads its datastore directly"
show margayctl node status
[ "$(grep -cE 'Iptables' <<<"$out")" -ge 3 ] || fail "three agents in Iptables"
ok "three agents running, in Iptables"

step "Step 7: keep kube-proxy's iptables rules in eBPF mode"
show margayctl --allow-version-mismatch patch felixconfiguration default --patch='{"spec": {"bpfKubeProxyIptablesCleanupEnabled": false}}'
expect "calicoctl's message" "^Successfully patched 1 'FelixConfiguration' resource$" "$out"
show margayctl --allow-version-mismatch get felixconfiguration default -o yaml
expect "bpfKubeProxyIptablesCleanupEnabled is false" "^  bpfKubeProxyIptablesCleanupEnabled: false$" "$out"
expect "wireguardEnabled is false" "^  wireguardEnabled: false$" "$out"

step "A typo is refused with the field and the choices, and changes nothing"
printf '$ margayctl patch felixconfiguration default --type merge -p %s\n' "'{\"spec\":{\"bpfLogLevel\":\"Loud\"}}'"
if out=$(ctl patch felixconfiguration default --type merge -p '{"spec":{"bpfLogLevel":"Loud"}}' 2>&1); then
  fail "the bad value was accepted"
fi
printf '%s\n' "$out"
expect "the error names the field and the accepted values" 'spec.bpfLogLevel: "Loud" is not one of Off, Info, Debug' "$out"

# switch DATAPLANE: wait until every node's agent runs it, then show the nodes' status.
all_nodes_run() { [ "$(ctl get nodes -o 'jsonpath={.items[*].status.dataplane.active}' | tr ' ' '\n' | grep -cx "$1")" -eq 3 ]; }
wait_switched() {
  wait_for 30 all_nodes_run "$1" || fail "every node runs $1"
  show margayctl node status
  ok "every node runs $1"
}

step "Step 8: enable eBPF mode: patch the Installation (live: no agent or pod restarts)"
show margayctl patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"linuxDataplane":"BPF", "hostPorts":null}}}'
wait_switched BPF
show margayctl get felixconfiguration default -o 'jsonpath={.spec.bpfEnabled}'
expect "FelixConfiguration's bpfEnabled follows, as Calico's operator sets it" "^true$" "$out"
show margay-lab node exec node-1 -- iptables -t nat -S KUBE-SERVICES
expect "kube-proxy's rules are still there (bpfKubeProxyIptablesCleanupEnabled: false)" "^-N KUBE-SERVICES" "$out"
show margay-lab node exec node-1 -- iptables -S FORWARD
expect "FORWARD's first rule accepts what the BPF programs translated (mark 0x2000000), ahead of KUBE-FORWARD's INVALID drop" \
  "^-A FORWARD -m mark --mark 0x2000000/0x2000000 .* -j ACCEPT$" "$(sed -n 2p <<<"$out")"

step "Step 9: the pods need no restart: the same customer pod serves"
show margay-lab get pods -n yaobank
expect "the customer pod is still $customer_pod, Running" "^$customer_pod +1/1 +Running" "$out"

step "Step 10: curl again: the customer pod logs the CLIENT's address"
new_sources 6
[ "$sources" = "$CLIENT_IP" ] || fail "the customer logged only the client's address $CLIENT_IP (got: $sources)"
ok "the customer sees the client's address ($CLIENT_IP), not a node's, whichever node the load balancer picked"

step "Reversal 1: the Installation back to the standard Linux (Iptables) dataplane"
show margayctl patch installation.operator.tigera.io default --type merge -p '{"spec":{"calicoNetwork":{"linuxDataplane":"Iptables"}}}'
wait_switched Iptables

step "Reversal 2-3: remove the cleanup option from the Felix configuration"
show margayctl --allow-version-mismatch patch felixconfiguration default --patch='{"spec": {"bpfKubeProxyIptablesCleanupEnabled": null}}'
expect "calicoctl's message" "^Successfully patched 1 'FelixConfiguration' resource$" "$out"
show margayctl --allow-version-mismatch get felixconfiguration default -o yaml
grep -q bpfKubeProxyIptablesCleanupEnabled <<<"$out" && fail "bpfKubeProxyIptablesCleanupEnabled is gone"
ok "bpfKubeProxyIptablesCleanupEnabled is gone"
expect "wireguardEnabled is still false" "^  wireguardEnabled: false$" "$out"

step "Reversal 4: again no pod restart"
show margay-lab get pods -n yaobank
expect "the customer pod is still $customer_pod, Running" "^$customer_pod +1/1 +Running" "$out"

step "Reversal 5: delete the ConfigMap"
show margayctl delete cm -n tigera-operator kubernetes-services-endpoint
if ctl get configmap -n tigera-operator kubernetes-services-endpoint >/dev/null 2>&1; then
  fail "the ConfigMap is gone"
fi
ok "the ConfigMap is gone"

step "Reversal 6: the customer pod logs a node's address again"
new_sources 4
all_node_addresses || fail "the customer logged a node's address (got: $sources)"
ok "the customer sees a NODE's address again ($sources)"

printf '\n\033[1mWalkthrough complete: every step of the lab and its reversal showed what the lab says.\033[0m\n'
if $keep; then
  echo "The lab is still up. Try: $bin/margay-lab --name $lab status"
  echo "Take it down with: $bin/margay-lab --name $lab down"
fi
