//! Names: which strings the lab accepts, and how its namespaces, interfaces and paths are named.
//!
//! Everything a lab creates carries its name as a prefix (`<lab>-<role>` namespaces,
//! `margay-lab/<lab>` cgroups, `/run/margay-lab/<lab>` state, `/etc/netns/<lab>-*`), so that
//! `down` can find it again by name alone, after a crash, without trusting any state file.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lab name used when none is given.
pub const DEFAULT_LAB_NAME: &str = "margay";
/// Longest accepted lab name.
pub const MAX_LAB_NAME_LEN: usize = 12;
/// Longest accepted node name (a DNS label).
pub const MAX_NODE_NAME_LEN: usize = 63;
/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// The bridge in the underlay namespace that every node and the router attach to.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// The router's port on the underlay bridge (in the underlay namespace).
pub const ROUTER_UNDERLAY_PORT: &str = "rtr";
/// The link-local gateway every pod routes through (answered by proxy ARP on the host veth).
pub const POD_GATEWAY: &str = "169.254.1.1";

/// Role names that node names may not take, because they name the lab's other namespaces or
/// cgroups.
pub const RESERVED_NODE_NAMES: &[&str] = &["underlay", "router", "client", "external"];

/// Checks a lab name: 1 to 12 lowercase letters and digits, starting with a letter.
///
/// Stricter than a DNS label on purpose: no `-`. The lab owns every namespace named `<lab>-*`;
/// if `a` and `a-b` were both allowed, `a`'s `down` would take `a-b-router` for its own.
pub fn validate_lab_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_LAB_NAME_LEN {
        Some("it is longer than 12 characters")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("it must start with a lowercase letter")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        Some(
            "only lowercase letters and digits are allowed (no '-': the lab owns every \
             namespace named '<lab>-*', so 'a' would own 'a-b's namespaces)",
        )
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid(
            "lab name",
            name,
            format!(
                "{reason}; use 1 to 12 lowercase letters and digits, such as 'margay' or 'lab2'"
            ),
        )),
        None => Ok(()),
    }
}

/// Checks a node name: a DNS label (lowercase letters, digits, '-'), not a reserved role and not
/// starting with `pod-`.
pub fn validate_node_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name.len() > MAX_NODE_NAME_LEN {
        Some(format!("it is longer than {MAX_NODE_NAME_LEN} characters"))
    } else if !is_dns_label(name) {
        Some(
            "a node name is a DNS label: lowercase letters, digits and '-', starting and ending \
             with a letter or digit"
                .to_owned(),
        )
    } else if RESERVED_NODE_NAMES.contains(&name) {
        Some(format!(
            "it names one of the lab's own namespaces or cgroups ({})",
            RESERVED_NODE_NAMES.join(", ")
        ))
    } else if name.starts_with("pod-") {
        Some("names starting with 'pod-' are pods' namespaces".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid("node name", name, reason)),
        None => Ok(()),
    }
}

/// Checks an interface name as the kernel would, plus the characters `ip` handles plainly.
pub fn validate_ifname(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("interface names are at most 15 characters")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("use letters, digits, '-', '_' and '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid("interface name", name, reason)),
        None => Ok(()),
    }
}

/// The prefix of every network namespace a lab owns: `<lab>-`.
pub fn netns_prefix(lab: &str) -> String {
    format!("{lab}-")
}

/// The prefix of a lab's pod namespaces: `<lab>-pod-`.
pub fn pod_netns_prefix(lab: &str) -> String {
    format!("{lab}-pod-")
}

/// The namespace of a role (`underlay`, `router`, `client`) or a node: `<lab>-<role>`.
pub fn netns_name(lab: &str, role: &str) -> String {
    format!("{lab}-{role}")
}

/// A fresh pod namespace name, `<lab>-pod-<8 hex digits>`.
pub fn new_pod_netns_name(lab: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", pod_netns_prefix(lab), &id[..8])
}

/// A fresh Calico-style host veth name: `cali` + 11 hex digits.
pub fn new_host_veth_name() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("cali{}", &id[..11])
}

/// Checks that `netns` is one of `lab`'s pod namespaces: `<lab>-pod-` then lowercase letters,
/// digits and '-'.
pub fn validate_pod_netns(lab: &str, netns: &str) -> Result<()> {
    let prefix = pod_netns_prefix(lab);
    let suffix = netns.strip_prefix(&prefix);
    match suffix {
        Some(s) if !s.is_empty() && s.len() <= 48 && is_dns_label(s) => Ok(()),
        _ => Err(Error::invalid(
            "pod namespace",
            netns,
            format!(
                "pod namespaces of lab {lab:?} are named '{prefix}<id>' with a short id of \
                 lowercase letters and digits (see margay_lab::new_pod_netns_name)"
            ),
        )),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Where a command runs: a node's namespace, a pod's, or the outside world's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A node, by name (`node-1`): namespace `<lab>-node-1`, cgroup `<lab>/node-1`.
    Node(String),
    /// A pod, by its full namespace name (`<lab>-pod-1a2b3c4d`): its node's cgroup.
    Pod(String),
    /// The client on the "internet" segment: cgroup `<lab>/external`.
    Client,
    /// The router between the underlay and the internet: cgroup `<lab>/external`.
    Router,
    /// The underlay namespace holding the bridge (for tcpdump on `br0`): cgroup `<lab>/external`.
    Underlay,
}

impl Target {
    /// A node target.
    pub fn node(name: impl Into<String>) -> Target {
        Target::Node(name.into())
    }

    /// A pod target, by namespace.
    pub fn pod(netns: impl Into<String>) -> Target {
        Target::Pod(netns.into())
    }

    /// A short name usable in file names: `node-1`, `pod-1a2b3c4d`, `client`.
    pub fn slug(&self, lab: &str) -> String {
        match self {
            Target::Node(n) => n.clone(),
            Target::Pod(ns) => ns.strip_prefix(&netns_prefix(lab)).unwrap_or(ns).to_owned(),
            Target::Client => "client".to_owned(),
            Target::Router => "router".to_owned(),
            Target::Underlay => "underlay".to_owned(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node/{n}"),
            Target::Pod(ns) => write!(f, "pod/{ns}"),
            Target::Client => f.write_str("client"),
            Target::Router => f.write_str("router"),
            Target::Underlay => f.write_str("underlay"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        for ok in ["margay", "a", "lab2", "abcdefghijkl"] {
            assert!(validate_lab_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Margay", "2lab", "a-b", "abcdefghijklm", "a_b", "a.b"] {
            let e = validate_lab_name(bad).unwrap_err().to_string();
            assert!(e.contains("lowercase letters and digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn node_names() {
        for ok in ["node-1", "worker", "n", "node-10"] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Node", "-a", "a-", "router", "client", "underlay", "external", "pod-1", "a_b",
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_names() {
        assert!(validate_ifname("cali0123456789a").is_ok());
        assert!(validate_ifname("cali0123456789ab").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("").is_err());
        let veth = new_host_veth_name();
        assert_eq!(veth.len(), 15);
        assert!(validate_ifname(&veth).is_ok());
    }

    #[test]
    fn pod_netns_names() {
        let ns = new_pod_netns_name("margay");
        assert!(ns.starts_with("margay-pod-"));
        assert_eq!(ns.len(), "margay-pod-".len() + 8);
        assert!(validate_pod_netns("margay", &ns).is_ok());
        assert!(validate_pod_netns("other", &ns).is_err());
        assert!(validate_pod_netns("margay", "margay-pod-").is_err());
        assert!(validate_pod_netns("margay", "margay-node-1").is_err());
        assert!(validate_pod_netns("margay", "margay-pod-A").is_err());
    }

    #[test]
    fn targets_display_and_slug() {
        let pod = Target::pod("m-pod-0011aabb");
        assert_eq!(pod.to_string(), "pod/m-pod-0011aabb");
        assert_eq!(pod.slug("m"), "pod-0011aabb");
        assert_eq!(Target::node("node-1").to_string(), "node/node-1");
        assert_eq!(
            serde_json::to_string(&Target::node("node-1")).unwrap(),
            r#"{"node":"node-1"}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Client).unwrap(),
            r#""client""#
        );
    }
}
