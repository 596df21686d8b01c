//! The one iptables rule that lets both dataplanes stand side by side: packets the BPF programs
//! translated are accepted in filter `FORWARD` before kube-proxy's `KUBE-FORWARD`.
//!
//! The programs NAT at TC, before netfilter, so the kernel's conntrack sees a BPF flow half
//! translated: the client's packets go to the backend, the backend's replies come from the
//! frontend. It judges those replies (a SYN-ACK first) INVALID, and `KUBE-FORWARD`'s
//! `--ctstate INVALID -j DROP` would drop them. That rule is present whenever kube-proxy's rules
//! are: during a switch (Iptables -> BPF until the rules are removed, BPF -> Iptables while the
//! programs drain the flows they opened) and throughout BPF mode with
//! `bpfKubeProxyIptablesCleanupEnabled: false`. The programs set [`BPF_TRANSLATED_MARK`] on every
//! packet they translate (`MG_MARK_TRANSLATED` in `bpf/include/margay/types.h`); nothing else on
//! a Margay node sets that bit, so in Iptables mode the rule matches nothing.

use crate::model::{Jump, Ruleset, comment};

/// The chain an earlier Margay jumped to from FORWARD in BPF mode with kube-proxy's rules kept:
/// it accepted every INVALID packet not marked fall-through, far more than the translated ones.
/// The mark rule below replaced it; the name stays owned so that the iptables driver removes
/// the chain and its jump from a node upgraded from that version.
pub const LEGACY_BPF_FORWARD_CHAIN: &str = "MARGAY-BPF-FORWARD";

/// `MG_MARK_TRANSLATED` (bpf/include/margay/types.h), as iptables writes it.
pub const BPF_TRANSLATED_MARK: &str = "0x2000000";

/// The FORWARD rule accepting what the BPF programs translated.
pub fn bpf_translated_accept() -> Jump {
    Jump::new(
        "FORWARD",
        format!(
            "-m mark --mark {BPF_TRANSLATED_MARK}/{BPF_TRANSLATED_MARK} {} -j ACCEPT",
            comment("margay: translated by the BPF programs")
        ),
    )
}

impl Ruleset {
    /// Puts [`bpf_translated_accept`] at the top of filter's built-in jumps (ahead of
    /// kube-proxy's), once.
    pub fn add_bpf_translated_accept(&mut self) {
        let jump = bpf_translated_accept();
        if !self.filter.jumps.contains(&jump) {
            self.filter.jumps.insert(0, jump);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kube_proxy::{NodeContext, kube_proxy_ruleset};

    #[test]
    fn the_accept_comes_before_kube_forward() {
        let mut rs = kube_proxy_ruleset(&[], &[], &NodeContext::default());
        rs.add_bpf_translated_accept();
        rs.add_bpf_translated_accept();
        let forward: Vec<&str> = rs
            .filter
            .jumps
            .iter()
            .filter(|j| j.chain == "FORWARD")
            .map(|j| j.rule.as_str())
            .collect();
        assert_eq!(
            forward[0],
            "-m mark --mark 0x2000000/0x2000000 -m comment --comment \"margay: translated by the BPF programs\" -j ACCEPT"
        );
        assert_eq!(
            forward.iter().filter(|r| r.contains("0x2000000")).count(),
            1
        );
        let kube_forward = forward
            .iter()
            .position(|r| r.contains("-j KUBE-FORWARD"))
            .expect("KUBE-FORWARD jump");
        assert!(kube_forward > 0);
    }
}
