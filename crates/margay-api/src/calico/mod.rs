//! `projectcalico.org/v3` resources.

pub mod cluster_info;
pub mod felix;
pub mod ipam;
pub mod ippool;
pub mod node;

pub use cluster_info::{ClusterInformation, ClusterInformationSpec};
pub use felix::{FelixConfiguration, FelixConfigurationSpec};
pub use ipam::{BlockAffinity, IPAMBlock};
pub use ippool::{IPPool, IPPoolSpec};
pub use node::{Node, NodeSpec, NodeStatus};
