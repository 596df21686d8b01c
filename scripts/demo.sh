#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine as root: install what is needed, build, and show the
# Calico eBPF lab's "before" state on a real 3-node cluster made of network namespaces:
#   margay-lab up -> yaobank + its LoadBalancer -> curl from the external client -> the customer
#   pod logs the NODE's address (the standard dataplane masquerades, as kube-proxy does) ->
#   switch the Installation to BPF live -> the customer logs the CLIENT's address -> switch back.
# The seed's configuration steps run against the live cluster first (WireGuard on, then off).
# Usage: scripts/demo.sh [--keep]   (--keep leaves the lab up and says how to take it down)
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true

bash scripts/install-deps.sh
echo "== building (release)"
cargo build --release --locked --workspace --bins
bin="$PWD/target/release"
lab="demo"
L() { "$bin/margay-lab" --name "$lab" "$@"; }

if ip netns list 2>/dev/null | grep -q "^$lab-"; then
  echo "== a lab named $lab exists from an earlier run; taking it down"
  L down
fi
if ! $keep; then trap 'echo "== margay-lab down"; L down' EXIT; fi

echo; echo "== margay-lab up (3 nodes, Iptables dataplane, cluster DNS)"
L up
echo; echo "== margay-lab get nodes"
L get nodes

echo; echo "== the lab starts as the seed's cluster does: with WireGuard on between the nodes"
export MARGAY_DATASTORE="sqlite:///run/margay-lab/$lab/margay.db"
"$bin/margayctl" patch felixconfiguration default --type merge -p '{"spec":{"wireguardEnabled":true}}'
for _ in $(seq 1 60); do
  keys=$("$bin/margayctl" get nodes -o 'jsonpath={.items[*].status.wireguardPublicKey}' | wc -w)
  [ "$keys" -eq 3 ] && break
  sleep 0.5
done
"$bin/margayctl" get node node-1 -o yaml | grep -i wireguard

echo; echo "== the configuration steps of the lab with margayctl (WireGuard off first, as the seed does)"
bash examples/seed-config-walkthrough.sh "$bin/margayctl"

echo; echo "== deploy yaobank and the LoadBalancer Service for its customer front end"
L apply -f examples/yaobank.yaml
L apply -f examples/yaobank-customer-lb.yaml
L get pods -n yaobank -o wide
L get svc -n yaobank
SVC_HOST=$(L get svc yaobank-customer -n yaobank -o 'jsonpath={.status.loadBalancer.ingress[0].ip}')

echo; echo "== curl http://$SVC_HOST/ from the external client (203.0.113.10)"
L client -- curl -s -m 5 "http://$SVC_HOST/"
for _ in 1 2 3; do L client -- curl -s -m 5 -o /dev/null "http://$SVC_HOST/"; done

echo; echo "== the customer pod's log: the source is a NODE's address, as with kube-proxy"
L logs -n yaobank deployment/customer | grep '"GET / '

switch() { # switch DATAPLANE: the seed's step 8 (or its reversal), live, then wait for every node
  "$bin/margayctl" patch installation.operator.tigera.io default --type merge \
    -p "{\"spec\":{\"calicoNetwork\":{\"linuxDataplane\":\"$1\"}}}"
  for _ in $(seq 1 100); do
    active=$("$bin/margayctl" get nodes -o 'jsonpath={.items[*].status.dataplane.active}')
    [ "$(tr ' ' '\n' <<<"$active" | grep -c "^$1$")" -eq 3 ] && break
    sleep 0.2
  done
  "$bin/margayctl" node status
}
new_log_lines() { # curl N times from the client, print what the customer logged for them
  local before; before=$(L logs -n yaobank deployment/customer | wc -l)
  for _ in $(seq 1 "$1"); do L client -- curl -s -m 5 -o /dev/null "http://$SVC_HOST/"; done
  L logs -n yaobank deployment/customer | tail -n +"$((before + 1))" | grep '"GET / '
}

echo; echo "== step 8: switch the Installation to the eBPF dataplane, live (no agent or pod restarts)"
switch BPF
echo; echo "== step 10: the customer now logs the CLIENT's address (203.0.113.10), whichever node the LB picked"
new_log_lines 4

echo; echo "== reversal: back to the standard dataplane, and a node's address again"
switch Iptables
new_log_lines 3

if $keep; then
  echo; echo "The lab is still up. Try: $bin/margay-lab --name $lab status; take it down with: $bin/margay-lab --name $lab down"
fi
