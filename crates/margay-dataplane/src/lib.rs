//! Margay's dataplane drivers: each takes desired state from `margay-calc` and applies the
//! difference to the kernel of the network namespace it runs in.
//!
//! - [`iptables`]: the standard (Iptables) dataplane's Service rules and natOutgoing, applied
//!   atomically with `iptables-restore`.
//! - [`bpf`]: the BPF dataplane's Service NAT maps, written by difference, and the conntrack
//!   cleanup.

pub mod bpf;
pub mod iptables;
