//! What a lab is made of: [`LabConfig`] (names, address plan, MTUs) and [`LbMode`].

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::naming::{DEFAULT_LAB_NAME, validate_lab_name, validate_node_name};

/// How the router hands LoadBalancer IPs (the whole `lb_pool`) to the nodes, as a cloud load
/// balancer would. The router never NATs: clients' addresses reach the nodes unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbMode {
    /// One multipath route over every node, hashed on the L4 5-tuple
    /// (`fib_multipath_hash_policy=1`): different connections land on different nodes.
    Ecmp,
    /// Everything to one node.
    Node(String),
}

impl fmt::Display for LbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LbMode::Ecmp => f.write_str("ecmp"),
            LbMode::Node(n) => f.write_str(n),
        }
    }
}

impl FromStr for LbMode {
    type Err = Error;

    /// `ecmp`, or a node name (`node-1`).
    fn from_str(s: &str) -> Result<LbMode> {
        if s == "ecmp" {
            return Ok(LbMode::Ecmp);
        }
        validate_node_name(s).map_err(|_| {
            Error::invalid(
                "load-balancer mode",
                s,
                "use 'ecmp' or the name of a node, such as 'node-1'",
            )
        })?;
        Ok(LbMode::Node(s.to_owned()))
    }
}

/// Everything `Lab::create` needs. `LabConfig::new("margay", 3)` gives the documented defaults;
/// every field can be changed before `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LabConfig {
    /// The lab's name (1-12 lowercase letters and digits); prefixes everything it creates.
    pub name: String,
    /// The nodes to create, by name (`node-1`, `node-2`, ...). Node *k* (1-based, in this order)
    /// gets `first_node_ip + k - 1` and the underlay port `n<k>`.
    pub nodes: Vec<String>,
    /// The underlay segment shared by the router and the nodes.
    pub underlay: Ipv4Net,
    /// The router's address on the underlay (the nodes' default gateway).
    pub router_underlay_ip: Ipv4Addr,
    /// The first node's address; later nodes take the next free addresses.
    pub first_node_ip: Ipv4Addr,
    /// The "internet" segment between the router and the client.
    pub internet: Ipv4Net,
    /// The router's address on the internet segment (the client's default gateway).
    pub router_internet_ip: Ipv4Addr,
    /// The client's address.
    pub client_ip: Ipv4Addr,
    /// The LoadBalancer IPs the router sends to the nodes.
    pub lb_pool: Ipv4Net,
    /// How the router spreads `lb_pool` over the nodes.
    pub lb_mode: LbMode,
    /// MTU of the underlay links (router, nodes' eth0, the bridge).
    pub underlay_mtu: u32,
    /// MTU of pods' veths (both ends).
    pub pod_mtu: u32,
    /// Test hook: make `create` fail right after the step of this name (`state`, `namespaces`,
    /// `links`, `addresses`), to exercise its cleanup. Never saved.
    #[doc(hidden)]
    #[serde(skip)]
    pub fail_after_step: Option<String>,
}

impl Default for LabConfig {
    fn default() -> LabConfig {
        LabConfig::new(DEFAULT_LAB_NAME, 3)
    }
}

impl LabConfig {
    /// The defaults for a lab of `nodes` nodes named `node-1` ... `node-N`.
    pub fn new(name: impl Into<String>, nodes: usize) -> LabConfig {
        LabConfig {
            name: name.into(),
            nodes: (1..=nodes).map(default_node_name).collect(),
            underlay: Ipv4Net::new_assert(Ipv4Addr::new(10, 224, 0, 0), 16),
            router_underlay_ip: Ipv4Addr::new(10, 224, 0, 1),
            first_node_ip: Ipv4Addr::new(10, 224, 0, 4),
            internet: Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24),
            router_internet_ip: Ipv4Addr::new(203, 0, 113, 1),
            client_ip: Ipv4Addr::new(203, 0, 113, 10),
            lb_pool: Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24),
            lb_mode: LbMode::Ecmp,
            underlay_mtu: 1500,
            pod_mtu: 1500,
            fail_after_step: None,
        }
    }

    /// The address of node slot `slot` (1-based), checked to be a usable underlay host address
    /// other than the router's.
    pub fn node_ip(&self, slot: u32) -> Result<Ipv4Addr> {
        let first = u32::from(self.first_node_ip);
        let ip = slot
            .checked_sub(1)
            .and_then(|offset| first.checked_add(offset))
            .map(Ipv4Addr::from)
            .ok_or_else(|| Error::invalid("node slot", slot.to_string(), "out of range"))?;
        if !self.is_underlay_host(ip) || ip == self.router_underlay_ip {
            return Err(Error::invalid(
                "node address",
                ip.to_string(),
                format!(
                    "the underlay {} has no room for node {slot} (nodes start at {})",
                    self.underlay, self.first_node_ip
                ),
            ));
        }
        Ok(ip)
    }

    fn is_underlay_host(&self, ip: Ipv4Addr) -> bool {
        self.underlay.contains(&ip)
            && ip != self.underlay.network()
            && ip != self.underlay.broadcast()
    }

    /// Checks names and the address plan.
    pub fn validate(&self) -> Result<()> {
        validate_lab_name(&self.name)?;
        let mut seen = std::collections::BTreeSet::new();
        for node in &self.nodes {
            validate_node_name(node)?;
            if !seen.insert(node) {
                return Err(Error::invalid(
                    "node list",
                    self.nodes.join(","),
                    format!("{node} appears twice"),
                ));
            }
        }
        if !self.is_underlay_host(self.router_underlay_ip) {
            return Err(Error::invalid(
                "router underlay address",
                self.router_underlay_ip.to_string(),
                format!("not a host address of the underlay {}", self.underlay),
            ));
        }
        let internet_host =
            |ip: Ipv4Addr| self.internet.contains(&ip) && ip != self.internet.network();
        if !internet_host(self.router_internet_ip) || !internet_host(self.client_ip) {
            return Err(Error::invalid(
                "internet addresses",
                format!(
                    "router {} client {}",
                    self.router_internet_ip, self.client_ip
                ),
                format!("both must be host addresses of {}", self.internet),
            ));
        }
        if self.router_internet_ip == self.client_ip {
            return Err(Error::invalid(
                "client address",
                self.client_ip.to_string(),
                "the router already has it",
            ));
        }
        let overlaps =
            |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
        for (a, b, what) in [
            (&self.underlay, &self.internet, "underlay and internet"),
            (
                &self.underlay,
                &self.lb_pool,
                "underlay and LoadBalancer pool",
            ),
            (
                &self.internet,
                &self.lb_pool,
                "internet and LoadBalancer pool",
            ),
        ] {
            if overlaps(a, b) {
                return Err(Error::invalid(
                    "address plan",
                    format!("{a} / {b}"),
                    format!("the {what} segments overlap"),
                ));
            }
        }
        for slot in 1..=u32::try_from(self.nodes.len()).unwrap_or(u32::MAX) {
            self.node_ip(slot)?;
        }
        for (what, mtu) in [
            ("underlay MTU", self.underlay_mtu),
            ("pod MTU", self.pod_mtu),
        ] {
            if !(576..=65535).contains(&mtu) {
                return Err(Error::invalid(what, mtu.to_string(), "use 576 to 65535"));
            }
        }
        if let LbMode::Node(n) = &self.lb_mode
            && !self.nodes.contains(n)
        {
            return Err(Error::invalid(
                "load-balancer mode",
                n.clone(),
                format!("not one of the nodes ({})", self.nodes.join(", ")),
            ));
        }
        Ok(())
    }
}

/// `node-<i>`: the name of the i-th default node.
pub fn default_node_name(i: usize) -> String {
    format!("node-{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let c = LabConfig::new("margay", 3);
        c.validate().unwrap();
        assert_eq!(c.nodes, ["node-1", "node-2", "node-3"]);
        assert_eq!(c.node_ip(1).unwrap(), Ipv4Addr::new(10, 224, 0, 4));
        assert_eq!(c.node_ip(3).unwrap(), Ipv4Addr::new(10, 224, 0, 6));
        assert_eq!(c.node_ip(253).unwrap(), Ipv4Addr::new(10, 224, 1, 0));
        assert!(c.node_ip(0).is_err());
        assert!(c.node_ip(65532).is_err());
    }

    #[test]
    fn refuses_bad_plans() {
        let mut c = LabConfig::new("margay", 2);
        c.lb_mode = LbMode::Node("node-3".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("not one of the nodes")
        );
        let mut c = LabConfig::new("margay", 2);
        c.lb_pool = "10.224.5.0/24".parse().unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("overlap"));
        let mut c = LabConfig::new("margay", 2);
        c.nodes.push("node-1".into());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let c = LabConfig::new("bad-name", 2);
        assert!(c.validate().is_err());
    }

    #[test]
    fn lb_mode_parses() {
        assert_eq!("ecmp".parse::<LbMode>().unwrap(), LbMode::Ecmp);
        assert_eq!(
            "node-2".parse::<LbMode>().unwrap(),
            LbMode::Node("node-2".into())
        );
        assert!("Node 2".parse::<LbMode>().is_err());
        let json = serde_json::to_string(&LbMode::Node("node-1".into())).unwrap();
        assert_eq!(json, r#"{"node":"node-1"}"#);
    }

    #[test]
    fn config_round_trips_and_fills_defaults() {
        let c = LabConfig::new("x1", 2);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<LabConfig>(&text).unwrap(), c);
        let partial: LabConfig = serde_json::from_str(r#"{"name":"x2"}"#).unwrap();
        assert_eq!(partial.underlay_mtu, 1500);
    }
}
