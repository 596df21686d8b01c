//! The kinds of resource Margay stores, with the names users type for them.
//!
//! Names and aliases follow calicoctl and kubectl, so that `margayctl get felixconfig`,
//! `margayctl get installation.operator.tigera.io default` and `margayctl get svc -A` work as
//! users' fingers expect.

use std::fmt;
use std::str::FromStr;

/// A kind of resource, independent of its API version string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    FelixConfiguration,
    Node,
    IPPool,
    ClusterInformation,
    Installation,
    Namespace,
    Service,
    ConfigMap,
    Pod,
    EndpointSlice,
    IPAMBlock,
    BlockAffinity,
    Deployment,
}

/// The API groups our kinds belong to.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";
pub const OPERATOR_API_VERSION: &str = "operator.tigera.io/v1";
pub const CORE_API_VERSION: &str = "v1";
pub const DISCOVERY_API_VERSION: &str = "discovery.k8s.io/v1";
pub const CALICO_CRD_API_VERSION: &str = "crd.projectcalico.org/v1";
pub const APPS_API_VERSION: &str = "apps/v1";

impl Kind {
    /// Every kind, in the order `margayctl get all`-style listings use.
    pub const ALL: [Kind; 13] = [
        Kind::FelixConfiguration,
        Kind::Node,
        Kind::IPPool,
        Kind::ClusterInformation,
        Kind::Installation,
        Kind::Namespace,
        Kind::Service,
        Kind::ConfigMap,
        Kind::Pod,
        Kind::EndpointSlice,
        Kind::IPAMBlock,
        Kind::BlockAffinity,
        Kind::Deployment,
    ];

    /// The `kind:` field of a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FelixConfiguration => "FelixConfiguration",
            Kind::Node => "Node",
            Kind::IPPool => "IPPool",
            Kind::ClusterInformation => "ClusterInformation",
            Kind::Installation => "Installation",
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::ConfigMap => "ConfigMap",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::IPAMBlock => "IPAMBlock",
            Kind::BlockAffinity => "BlockAffinity",
            Kind::Deployment => "Deployment",
        }
    }

    /// The `apiVersion:` field of a manifest.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::FelixConfiguration | Kind::Node | Kind::IPPool | Kind::ClusterInformation => {
                CALICO_API_VERSION
            }
            Kind::Installation => OPERATOR_API_VERSION,
            Kind::Namespace | Kind::Service | Kind::ConfigMap | Kind::Pod => CORE_API_VERSION,
            Kind::EndpointSlice => DISCOVERY_API_VERSION,
            Kind::IPAMBlock | Kind::BlockAffinity => CALICO_CRD_API_VERSION,
            Kind::Deployment => APPS_API_VERSION,
        }
    }

    /// The lower-case plural used in etcd keys and REST paths (`felixconfigurations`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::FelixConfiguration => "felixconfigurations",
            Kind::Node => "nodes",
            Kind::IPPool => "ippools",
            Kind::ClusterInformation => "clusterinformations",
            Kind::Installation => "installations",
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::ConfigMap => "configmaps",
            Kind::Pod => "pods",
            Kind::EndpointSlice => "endpointslices",
            Kind::IPAMBlock => "ipamblocks",
            Kind::BlockAffinity => "blockaffinities",
            Kind::Deployment => "deployments",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            Kind::Service | Kind::ConfigMap | Kind::Pod | Kind::EndpointSlice | Kind::Deployment
        )
    }

    /// The `kind:` of a list of this kind, as calicoctl and kubectl print it.
    pub fn list_kind(self) -> String {
        format!("{}List", self.as_str())
    }

    /// Resolves a manifest's `apiVersion` and `kind` pair, refusing a known kind under the wrong
    /// group so that a typo in `apiVersion` is caught rather than silently accepted.
    pub fn from_manifest(api_version: &str, kind: &str) -> Result<Kind, String> {
        let found = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| {
                format!(
                    "unknown kind {kind:?}; known kinds: {}",
                    Kind::ALL.map(Kind::as_str).join(", ")
                )
            })?;
        if found.api_version() != api_version {
            return Err(format!(
                "kind {kind} is served as apiVersion {:?}, not {api_version:?}",
                found.api_version()
            ));
        }
        Ok(found)
    }

    /// The names and aliases a user may type on the command line.
    fn aliases(self) -> &'static [&'static str] {
        match self {
            Kind::FelixConfiguration => &[
                "felixconfiguration",
                "felixconfigurations",
                "felixconfig",
                "felixconfigs",
                "felixconfiguration.projectcalico.org",
                "felixconfigurations.projectcalico.org",
            ],
            Kind::Node => &[
                "node",
                "nodes",
                "no",
                "node.projectcalico.org",
                "nodes.projectcalico.org",
            ],
            Kind::IPPool => &[
                "ippool",
                "ippools",
                "ipp",
                "ipps",
                "pool",
                "pools",
                "ippool.projectcalico.org",
                "ippools.projectcalico.org",
            ],
            Kind::ClusterInformation => &[
                "clusterinformation",
                "clusterinformations",
                "clusterinfo",
                "clusterinfos",
                "clusterinformation.projectcalico.org",
                "clusterinformations.projectcalico.org",
            ],
            Kind::Installation => &[
                "installation",
                "installations",
                "installation.operator.tigera.io",
                "installations.operator.tigera.io",
            ],
            Kind::Namespace => &["namespace", "namespaces", "ns"],
            Kind::Service => &["service", "services", "svc"],
            Kind::ConfigMap => &["configmap", "configmaps", "cm"],
            Kind::Pod => &["pod", "pods", "po"],
            Kind::EndpointSlice => &[
                "endpointslice",
                "endpointslices",
                "endpointslice.discovery.k8s.io",
                "endpointslices.discovery.k8s.io",
            ],
            Kind::IPAMBlock => &[
                "ipamblock",
                "ipamblocks",
                "ipamblocks.crd.projectcalico.org",
            ],
            Kind::BlockAffinity => &[
                "blockaffinity",
                "blockaffinities",
                "blockaffinities.crd.projectcalico.org",
            ],
            Kind::Deployment => &[
                "deployment",
                "deployments",
                "deploy",
                "deployment.apps",
                "deployments.apps",
            ],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    /// Parses a kind as typed on the command line: any alias, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.aliases().contains(&lower.as_str()) || k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown resource type {s:?}; known types: {}",
                    Kind::ALL.map(|k| k.aliases()[0]).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_as_calicoctl_and_kubectl_spell_them() {
        for (typed, kind) in [
            ("felixconfiguration", Kind::FelixConfiguration),
            ("FelixConfig", Kind::FelixConfiguration),
            ("installation.operator.tigera.io", Kind::Installation),
            ("svc", Kind::Service),
            ("po", Kind::Pod),
            ("cm", Kind::ConfigMap),
            ("ns", Kind::Namespace),
            ("ippools", Kind::IPPool),
            ("endpointslices", Kind::EndpointSlice),
            ("nodes", Kind::Node),
        ] {
            assert_eq!(typed.parse::<Kind>(), Ok(kind), "{typed}");
        }
        assert!("widget".parse::<Kind>().is_err());
    }

    #[test]
    fn manifest_kind_needs_the_right_group() {
        assert_eq!(
            Kind::from_manifest("projectcalico.org/v3", "IPPool"),
            Ok(Kind::IPPool)
        );
        assert!(Kind::from_manifest("v1", "IPPool").is_err());
        assert!(Kind::from_manifest("v1", "Widget").is_err());
    }
}
