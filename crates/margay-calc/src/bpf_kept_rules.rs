//! BPF mode with `bpfKubeProxyIptablesCleanupEnabled: false` (the seed's AKS setup, where
//! kube-proxy cannot be removed): kube-proxy's chains stay in place, but one of their rules would
//! break the BPF dataplane. `KUBE-FORWARD` drops packets the kernel's conntrack calls INVALID, and
//! every reply of a flow the BPF programs NAT is one: the kernel saw `client -> pod` on the way in
//! and sees `frontend -> client` on the way out, a SYN-ACK or ACK of a connection it never saw
//! open. So a FORWARD rule ahead of kube-proxy's accepts INVALID packets, exactly what the BPF
//! dataplane does when the chains are cleaned up (nothing else drops INVALID packets then), except
//! for packets the programs marked as not theirs (`MG_MARK_FALLTHROUGH`: TCP of a flow opened
//! before BPF took over), which still go through kube-proxy's rules as they were set up.

use crate::model::{Jump, Ruleset, comment};

/// Margay's filter chain jumped to from FORWARD ahead of `KUBE-FORWARD` in this mode.
pub const BPF_FORWARD_CHAIN: &str = "MARGAY-BPF-FORWARD";

/// `MG_MARK_FALLTHROUGH` (`bpf/include/margay/types.h`): a packet the BPF programs left to the
/// kernel's conntrack.
pub const MARK_FALLTHROUGH: u32 = 0x0100_0000;

impl Ruleset {
    /// Adds [`BPF_FORWARD_CHAIN`] and its FORWARD jump, listed first so it is inserted ahead of
    /// kube-proxy's jumps.
    pub fn add_bpf_forward_accept(&mut self) {
        *self.filter.chain_mut(BPF_FORWARD_CHAIN) = vec![format!(
            "-m conntrack --ctstate INVALID -m mark ! --mark {MARK_FALLTHROUGH:#x}/{MARK_FALLTHROUGH:#x} {} -j ACCEPT",
            comment("BPF mode: replies of flows the BPF programs NAT are INVALID to conntrack")
        )];
        let jump = Jump::new(
            "FORWARD",
            format!(
                "{} -j {BPF_FORWARD_CHAIN}",
                comment("BPF mode: ahead of kube-proxy's kept rules")
            ),
        );
        if !self.filter.jumps.contains(&jump) {
            self.filter.jumps.insert(0, jump);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jump_comes_before_kube_proxys() {
        let mut rs = Ruleset::default();
        rs.filter
            .jumps
            .push(Jump::new("FORWARD", "-j KUBE-FORWARD"));
        rs.add_bpf_forward_accept();
        rs.add_bpf_forward_accept();
        assert_eq!(rs.filter.jumps.len(), 2);
        assert!(rs.filter.jumps[0].rule.ends_with("-j MARGAY-BPF-FORWARD"));
        assert_eq!(
            rs.filter.chains[BPF_FORWARD_CHAIN],
            [
                "-m conntrack --ctstate INVALID -m mark ! --mark 0x1000000/0x1000000 -m comment --comment \"BPF mode: replies of flows the BPF programs NAT are INVALID to conntrack\" -j ACCEPT"
            ]
        );
    }
}
