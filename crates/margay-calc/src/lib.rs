//! Margay's pure desired-state calculation: resources in, dataplane state out. No I/O, no clock,
//! no randomness, so every output can be pinned by a golden test that needs no root.
//!
//! - [`kube_proxy`]: the Iptables dataplane's Service rules, exactly as kube-proxy's iptables
//!   mode writes them ([`kube_proxy_ruleset`]).
//! - [`nat_outgoing`]: Calico's natOutgoing masquerade for pod pools.
//! - [`host_ports`]: pods' hostPorts (portmap's chains, BPF NAT frontends).
//! - [`model`]: the [`Ruleset`] both produce and the iptables-restore text that applies it
//!   ([`ruleset_to_restore`], [`RestorePlan`]).
//! - [`scenario`]: a node context plus resources as one YAML document (golden tests, lab).
//! - [`bpf_nat`]: the BPF dataplane's Service NAT maps ([`bpf_nat_model`]).
//! - [`bpf_handover`]: the rule that accepts what the BPF programs translated, so that both
//!   dataplanes can stand side by side during a switch.

pub mod bpf_handover;
pub mod bpf_nat;
pub mod host_ports;
pub mod kube_proxy;
pub mod model;
pub mod nat_outgoing;
pub mod scenario;

pub use bpf_nat::{NatModel, bpf_nat_model};
pub use kube_proxy::{NodeContext, kube_proxy_ruleset};
pub use model::{Jump, RestorePlan, Ruleset, Table, TablePlan, TableRules, ruleset_to_restore};
pub use nat_outgoing::nat_outgoing_rules;
pub use scenario::Scenario;
