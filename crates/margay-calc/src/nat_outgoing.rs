//! Calico's `natOutgoing`: pods of a pool with `natOutgoing: true` reach destinations outside
//! every pool with the node's address as their source.
//!
//! Calico writes one rule in `cali-nat-outgoing` over two ipsets (`-m set --match-set
//! cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE`).
//! Margay writes the same decision without ipsets, so it needs neither the `ipset` tool nor a
//! second kind of kernel object to manage: every pool destination first returns (no NAT), then
//! each natOutgoing pool source is masqueraded. Pools are few, so the chain stays short.

use ipnet::Ipv4Net;

use crate::model::{Jump, Ruleset, comment};

/// The chain's name, as in Calico, so `iptables-save | grep cali-nat-outgoing` still works.
pub const NAT_OUTGOING_CHAIN: &str = "cali-nat-outgoing";

/// The rules of [`NAT_OUTGOING_CHAIN`] for `pools` (each pool's CIDR and its `natOutgoing`);
/// empty when no pool asks for natOutgoing. Pass every pool, disabled ones included with
/// `false`: a destination in any pool is "inside" (Calico's `all-ipam-pools` set), only enabled
/// natOutgoing pools are masqueraded (its `masq-ipam-pools` set).
pub fn nat_outgoing_rules(pools: &[(Ipv4Net, bool)]) -> Vec<String> {
    let mut all: Vec<Ipv4Net> = pools.iter().map(|(net, _)| net.trunc()).collect();
    all.sort();
    all.dedup();
    let mut masq: Vec<Ipv4Net> = pools
        .iter()
        .filter(|(_, nat)| *nat)
        .map(|(net, _)| net.trunc())
        .collect();
    masq.sort();
    masq.dedup();
    if masq.is_empty() {
        return Vec::new();
    }
    let mut rules: Vec<String> = all
        .iter()
        .map(|net| {
            format!(
                "-d {net} {} -j RETURN",
                comment("destination in an IP pool: no NAT")
            )
        })
        .collect();
    rules.extend(masq.iter().map(|net| {
        format!(
            "-s {net} {} -j MASQUERADE --random-fully",
            comment(&format!("natOutgoing from pool {net}"))
        )
    }));
    rules
}

/// The POSTROUTING rule that sends traffic through [`NAT_OUTGOING_CHAIN`].
pub fn nat_outgoing_jump() -> Jump {
    Jump::new(
        "POSTROUTING",
        format!("{} -j {NAT_OUTGOING_CHAIN}", comment("calico natOutgoing")),
    )
}

impl Ruleset {
    /// Adds the natOutgoing chain and its POSTROUTING jump when a pool asks for it (and nothing
    /// otherwise, so the driver removes both when the last natOutgoing pool goes).
    pub fn add_nat_outgoing(&mut self, pools: &[(Ipv4Net, bool)]) {
        let rules = nat_outgoing_rules(pools);
        if rules.is_empty() {
            return;
        }
        *self.nat.chain_mut(NAT_OUTGOING_CHAIN) = rules;
        let jump = nat_outgoing_jump();
        if !self.nat.jumps.contains(&jump) {
            self.nat.jumps.push(jump);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nothing_without_a_nat_pool() {
        assert!(nat_outgoing_rules(&[(net("10.244.0.0/16"), false)]).is_empty());
        let mut rs = Ruleset::default();
        rs.add_nat_outgoing(&[]);
        assert_eq!(rs, Ruleset::default());
    }

    #[test]
    fn pool_destinations_return_before_masquerade() {
        let rules =
            nat_outgoing_rules(&[(net("10.245.0.0/16"), false), (net("10.244.0.1/16"), true)]);
        assert_eq!(
            rules,
            [
                "-d 10.244.0.0/16 -m comment --comment \"destination in an IP pool: no NAT\" -j RETURN",
                "-d 10.245.0.0/16 -m comment --comment \"destination in an IP pool: no NAT\" -j RETURN",
                "-s 10.244.0.0/16 -m comment --comment \"natOutgoing from pool 10.244.0.0/16\" -j MASQUERADE --random-fully",
            ]
        );
    }
}
