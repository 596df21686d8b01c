//! A node's view of the cluster written as one YAML document: the node context, the IP pools and
//! the Services and EndpointSlices. The golden tests are made of these, and the lab and the
//! privileged driver tests replay them.
//!
//! ```yaml
//! description: why this case exists
//! node:
//!   name: node-a
//!   ips: [192.168.0.10]
//!   clusterCIDRs: [10.244.0.0/16]
//! pools:                    # optional: Calico IP pools, for natOutgoing
//!   - cidr: 10.244.0.0/16
//!     natOutgoing: true
//! objects:                  # Services and EndpointSlices, as kubectl would show them
//!   - apiVersion: v1
//!     kind: Service
//!     metadata: {namespace: default, name: web}
//!     spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
//! ```

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::kube_proxy::{NodeContext, kube_proxy_ruleset};
use crate::model::Ruleset;

/// Why a scenario could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario is not valid YAML of the expected shape: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("{field}: {value:?} is not an IPv4 CIDR")]
    Cidr { field: String, value: String },
    #[error("objects[{index}]: {message}")]
    Object { index: usize, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    description: String,
    node: RawNode,
    #[serde(default)]
    pools: Vec<RawPool>,
    #[serde(default)]
    objects: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNode {
    name: String,
    #[serde(default)]
    ips: Vec<Ipv4Addr>,
    #[serde(default, rename = "clusterCIDRs")]
    cluster_cidrs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPool {
    cidr: String,
    #[serde(default)]
    nat_outgoing: bool,
}

/// A node context with the resources it sees.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub description: String,
    pub node: NodeContext,
    /// IP pools: CIDR and natOutgoing.
    pub pools: Vec<(Ipv4Net, bool)>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Scenario {
    /// Reads a scenario; objects must be `v1 Service` or `discovery.k8s.io/v1 EndpointSlice`.
    pub fn from_yaml(text: &str) -> Result<Self, ScenarioError> {
        let raw: RawScenario = serde_yaml_ng::from_str(text)?;
        let cidr = |field: String, value: &str| {
            value.parse::<Ipv4Net>().map_err(|_| ScenarioError::Cidr {
                field,
                value: value.to_owned(),
            })
        };
        let mut scenario = Scenario {
            description: raw.description,
            node: NodeContext {
                node_name: raw.node.name,
                node_ips: raw.node.ips,
                cluster_cidrs: raw
                    .node
                    .cluster_cidrs
                    .iter()
                    .enumerate()
                    .map(|(i, c)| cidr(format!("node.clusterCIDRs[{i}]"), c))
                    .collect::<Result<_, _>>()?,
            },
            pools: raw
                .pools
                .iter()
                .enumerate()
                .map(|(i, p)| Ok((cidr(format!("pools[{i}].cidr"), &p.cidr)?, p.nat_outgoing)))
                .collect::<Result<_, ScenarioError>>()?,
            ..Scenario::default()
        };
        for (index, object) in raw.objects.into_iter().enumerate() {
            let kind = object
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_owned();
            let bad = |e: serde_json::Error| ScenarioError::Object {
                index,
                message: e.to_string(),
            };
            match kind.as_str() {
                "Service" => scenario
                    .services
                    .push(serde_json::from_value(object).map_err(bad)?),
                "EndpointSlice" => scenario
                    .slices
                    .push(serde_json::from_value(object).map_err(bad)?),
                other => {
                    return Err(ScenarioError::Object {
                        index,
                        message: format!("kind {other:?} is not Service or EndpointSlice"),
                    });
                }
            }
        }
        Ok(scenario)
    }

    /// The node's ruleset: kube-proxy's rules plus natOutgoing.
    pub fn ruleset(&self) -> Ruleset {
        let mut rs = kube_proxy_ruleset(&self.services, &self.slices, &self.node);
        rs.add_nat_outgoing(&self.pools);
        rs
    }
}

/// One step of [`Scenario::churn`]: the Services whose objects or slices it changed, and the
/// whole state after it.
#[derive(Debug, Clone)]
pub struct ChurnStep {
    pub what: String,
    pub touched: Vec<crate::kube_proxy::ServiceName>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

/// The Service an EndpointSlice belongs to (namespace, `kubernetes.io/service-name`).
pub fn slice_service(slice: &EndpointSlice) -> Option<crate::kube_proxy::ServiceName> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(crate::kube_proxy::LABEL_SERVICE_NAME)?;
    Some((
        slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name.clone(),
    ))
}

/// The (namespace, name) of a Service.
pub fn service_name(svc: &Service) -> crate::kube_proxy::ServiceName {
    (
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

impl Scenario {
    /// A sequence of one-Service changes that builds this scenario up from nothing and takes it
    /// down again, for equivalence tests of incremental updates against a full calculation:
    /// each Service arrives (with its slices), then each slice loses its last endpoint, then
    /// each slice's first endpoint turns not ready (and terminating), then the Services go one
    /// by one (their slices stay a moment, as when a controller is slow), then the slices go.
    pub fn churn(&self) -> Vec<ChurnStep> {
        let mut steps = Vec::new();
        let mut services: Vec<Service> = Vec::new();
        let mut slices: Vec<EndpointSlice> = Vec::new();
        let mut push = |what: String, touched, services: &[Service], slices: &[EndpointSlice]| {
            steps.push(ChurnStep {
                what,
                touched,
                services: services.to_vec(),
                slices: slices.to_vec(),
            });
        };
        for svc in &self.services {
            let name = service_name(svc);
            services.push(svc.clone());
            slices.extend(
                self.slices
                    .iter()
                    .filter(|s| slice_service(s).as_ref() == Some(&name))
                    .cloned(),
            );
            push(format!("add {name:?}"), vec![name], &services, &slices);
        }
        for i in 0..slices.len() {
            if slices[i].endpoints.len() < 2 {
                continue;
            }
            slices[i].endpoints.pop();
            let touched = slice_service(&slices[i]).into_iter().collect();
            push(
                format!("slice {i} loses an endpoint"),
                touched,
                &services,
                &slices,
            );
        }
        for i in 0..slices.len() {
            let Some(ep) = slices[i].endpoints.first_mut() else {
                continue;
            };
            let cond = ep.conditions.get_or_insert_with(Default::default);
            cond.ready = Some(false);
            cond.serving = Some(true);
            cond.terminating = Some(true);
            let touched = slice_service(&slices[i]).into_iter().collect();
            push(
                format!("slice {i} terminating"),
                touched,
                &services,
                &slices,
            );
        }
        while let Some(svc) = services.pop() {
            let name = service_name(&svc);
            push(format!("remove {name:?}"), vec![name], &services, &slices);
        }
        while let Some(slice) = slices.pop() {
            let touched = slice_service(&slice).into_iter().collect();
            push("remove a slice".to_owned(), touched, &services, &slices);
        }
        steps
    }
}
