//! One type for every resource, and the path a manifest takes before it may be stored:
//! kind check, typed read (naming the field at fault), unknown-field check, defaults, validation.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::calico::{
    BlockAffinity, ClusterInformation, FelixConfiguration, IPAMBlock, IPPool, Node,
};
use crate::error::{ValidationError, fail, join_path};
use crate::kind::Kind;
use crate::names::{check_label_key, check_labels};
use crate::operator::Installation;
use crate::{calico, k8s, operator};

/// Any resource Margay stores.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    FelixConfiguration(FelixConfiguration),
    Node(Node),
    IPPool(IPPool),
    ClusterInformation(ClusterInformation),
    Installation(Installation),
    Namespace(Namespace),
    Service(Service),
    ConfigMap(ConfigMap),
    Pod(Pod),
    EndpointSlice(EndpointSlice),
    IPAMBlock(IPAMBlock),
    BlockAffinity(BlockAffinity),
    Deployment(Deployment),
}

/// Dispatches an expression over every variant.
macro_rules! each {
    ($self:expr, $r:ident => $e:expr) => {
        match $self {
            Resource::FelixConfiguration($r) => $e,
            Resource::Node($r) => $e,
            Resource::IPPool($r) => $e,
            Resource::ClusterInformation($r) => $e,
            Resource::Installation($r) => $e,
            Resource::Namespace($r) => $e,
            Resource::Service($r) => $e,
            Resource::ConfigMap($r) => $e,
            Resource::Pod($r) => $e,
            Resource::EndpointSlice($r) => $e,
            Resource::IPAMBlock($r) => $e,
            Resource::BlockAffinity($r) => $e,
            Resource::Deployment($r) => $e,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::FelixConfiguration(_) => Kind::FelixConfiguration,
            Resource::Node(_) => Kind::Node,
            Resource::IPPool(_) => Kind::IPPool,
            Resource::ClusterInformation(_) => Kind::ClusterInformation,
            Resource::Installation(_) => Kind::Installation,
            Resource::Namespace(_) => Kind::Namespace,
            Resource::Service(_) => Kind::Service,
            Resource::ConfigMap(_) => Kind::ConfigMap,
            Resource::Pod(_) => Kind::Pod,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::IPAMBlock(_) => Kind::IPAMBlock,
            Resource::BlockAffinity(_) => Kind::BlockAffinity,
            Resource::Deployment(_) => Kind::Deployment,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        each!(self, r => &r.metadata)
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        each!(self, r => &mut r.metadata)
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }

    /// The object as JSON, with `apiVersion` and `kind`.
    pub fn to_value(&self) -> Value {
        let mut value = each!(self, r => to_json(r));
        if let Value::Object(map) = &mut value {
            // k8s-openapi writes these itself; ours carry them as fields. Set both the same way.
            map.insert("apiVersion".into(), self.kind().api_version().into());
            map.insert("kind".into(), self.kind().as_str().into());
        }
        value
    }

    /// Reads a stored object (already validated when written): the kind check and the typed
    /// read, without defaults.
    pub fn from_value(value: Value) -> Result<Resource, ValidationError> {
        let kind = manifest_kind(&value)?;
        read_typed(kind, value)
    }

    /// Fills the defaults Calico and kube-apiserver fill on write.
    pub fn apply_defaults(&mut self) {
        match self {
            Resource::IPPool(pool) => pool.spec.apply_defaults(),
            Resource::Service(svc) => k8s::default_service(svc),
            _ => {}
        }
    }

    /// Checks names, labels and every rule of the kind.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let meta = self.metadata();
        let name = meta.name.as_deref().unwrap_or_default();
        if name.is_empty() {
            return fail("metadata.name", "is required");
        }
        if self.kind().is_namespaced() {
            let ns = meta.namespace.as_deref().unwrap_or_default();
            crate::names::check_label_name("metadata.namespace", ns)?;
        } else if meta.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
            return fail(
                "metadata.namespace",
                format!(
                    "{} is not namespaced; remove metadata.namespace",
                    self.kind()
                ),
            );
        }
        check_labels("metadata.labels", meta.labels.as_ref())?;
        for key in meta.annotations.iter().flat_map(|a| a.keys()) {
            check_label_key(&format!("metadata.annotations[{key:?}]"), key)?;
        }
        if let Some(rv) = meta.resource_version.as_deref()
            && !rv.is_empty()
            && rv.parse::<u64>().is_err()
        {
            return fail(
                "metadata.resourceVersion",
                format!("{rv:?} is not a resourceVersion this datastore issued"),
            );
        }
        match self {
            Resource::FelixConfiguration(r) => {
                calico::felix::validate_name(name)?;
                r.spec.validate()
            }
            Resource::Node(r) => {
                calico::node::validate_name(name)?;
                r.spec.validate()?;
                r.status.as_ref().map_or(Ok(()), |s| s.validate())
            }
            Resource::IPPool(r) => {
                calico::ippool::validate_name(name)?;
                r.spec.validate()
            }
            Resource::ClusterInformation(_) => calico::cluster_info::validate_name(name),
            Resource::Installation(r) => {
                operator::validate_name(name)?;
                r.spec.validate()
            }
            Resource::Namespace(r) => k8s::validate_namespace(r),
            Resource::Service(r) => k8s::validate_service(r),
            Resource::ConfigMap(r) => k8s::validate_config_map(r),
            Resource::Pod(r) => k8s::validate_pod(r),
            Resource::EndpointSlice(r) => k8s::validate_endpoint_slice(r),
            Resource::IPAMBlock(r) => {
                calico::ipam::validate_name(name)?;
                r.spec.validate()
            }
            Resource::BlockAffinity(r) => {
                calico::ipam::validate_name(name)?;
                r.spec.validate()
            }
            Resource::Deployment(r) => k8s::validate_deployment(r),
        }
    }
}

/// Takes a manifest from a user or a program to the object that may be stored: checks its
/// `apiVersion` and `kind`, reads it into the typed form (refusing bad values with their path),
/// refuses fields the kind does not have, puts a namespaced object without a namespace into
/// `default_namespace`, fills defaults and validates.
pub fn prepare(value: Value, default_namespace: &str) -> Result<Resource, ValidationError> {
    let kind = manifest_kind(&value)?;
    let mut value = value;
    if kind.is_namespaced() {
        let meta = value.as_object_mut().map(|m| {
            m.entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()))
        });
        if let Some(Value::Object(meta)) = meta {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            if ns.is_empty() {
                meta.insert("namespace".into(), default_namespace.into());
            }
        }
    }
    let mut resource = read_typed(kind, value.clone())?;
    check_unknown_fields(&value, &resource.to_value(), "")?;
    resource.apply_defaults();
    resource.validate()?;
    Ok(resource)
}

fn manifest_kind(value: &Value) -> Result<Kind, ValidationError> {
    if !value.is_object() {
        return fail(
            "",
            "a resource must be an object with apiVersion, kind and metadata",
        );
    }
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    if kind.is_empty() {
        return fail("kind", "is required");
    }
    if api_version.is_empty() {
        return fail("apiVersion", "is required");
    }
    Kind::from_manifest(api_version, kind).map_err(|e| ValidationError::new("kind", e))
}

fn read_typed(kind: Kind, value: Value) -> Result<Resource, ValidationError> {
    Ok(match kind {
        Kind::FelixConfiguration => Resource::FelixConfiguration(read(value)?),
        Kind::Node => Resource::Node(read(value)?),
        Kind::IPPool => Resource::IPPool(read(value)?),
        Kind::ClusterInformation => Resource::ClusterInformation(read(value)?),
        Kind::Installation => Resource::Installation(read(value)?),
        Kind::Namespace => Resource::Namespace(read(value)?),
        Kind::Service => Resource::Service(read(value)?),
        Kind::ConfigMap => Resource::ConfigMap(read(value)?),
        Kind::Pod => Resource::Pod(read(value)?),
        Kind::EndpointSlice => Resource::EndpointSlice(read(value)?),
        Kind::IPAMBlock => Resource::IPAMBlock(read(value)?),
        Kind::BlockAffinity => Resource::BlockAffinity(read(value)?),
        Kind::Deployment => Resource::Deployment(read(value)?),
    })
}

fn read<T: DeserializeOwned>(value: Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ValidationError::new(path, tidy_serde_message(&e.inner().to_string()))
    })
}

/// serde's messages say "invalid type: string \"x\", expected u32 at line 1..."; keep the part a
/// user needs.
fn tidy_serde_message(message: &str) -> String {
    let message = message.split(" at line ").next().unwrap_or(message);
    message.replace("invalid type: ", "wrong type: ")
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Refuses any field of `input` that the typed read dropped: the typed form, written back, holds
/// every field the kind knows. Explicit `null`s are not fields (they mean "unset").
fn check_unknown_fields(input: &Value, known: &Value, path: &str) -> Result<(), ValidationError> {
    match (input, known) {
        (Value::Object(input), Value::Object(known)) => {
            for (key, value) in input {
                let child = join_path(path, key);
                match known.get(key) {
                    _ if value.is_null() => {}
                    None => {
                        return fail(child, "unknown field");
                    }
                    Some(k) => check_unknown_fields(value, k, &child)?,
                }
            }
            Ok(())
        }
        (Value::Array(input), Value::Array(known)) => {
            for (i, (a, b)) in input.iter().zip(known).enumerate() {
                check_unknown_fields(a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn felix(spec: Value) -> Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
               "metadata": {"name": "default"}, "spec": spec})
    }

    fn err(value: Value) -> String {
        prepare(value, "default").unwrap_err().to_string()
    }

    #[test]
    fn enum_errors_name_the_field_and_the_choices() {
        assert_eq!(
            err(felix(json!({"bpfLogLevel": "Loud"}))),
            "spec.bpfLogLevel: \"Loud\" is not one of Off, Info, Debug"
        );
        assert_eq!(
            err(felix(json!({"bpfExternalServiceMode": "Direct"}))),
            "spec.bpfExternalServiceMode: \"Direct\" is not one of Tunnel, DSR"
        );
    }

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        assert_eq!(
            err(felix(json!({"bpfEnable": true}))),
            "spec.bpfEnable: unknown field"
        );
        assert_eq!(
            err(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "labelz": {}},
                "spec": {"ports": [{"port": 80}]}})),
            "metadata.labelz: unknown field"
        );
        assert_eq!(
            err(
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"ports": [{"port": 80, "targetPrt": 8080}]}})
            ),
            "spec.ports[0].targetPrt: unknown field"
        );
        assert_eq!(
            err(
                json!({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                "metadata": {"name": "default"}, "spec": {}, "extra": 1})
            ),
            "extra: unknown field"
        );
    }

    #[test]
    fn durations_regexes_and_cidrs_are_checked() {
        assert!(
            err(felix(json!({"reportingInterval": "10 seconds"})))
                .starts_with("spec.reportingInterval: \"10 seconds\" is not a duration")
        );
        assert!(
            err(felix(json!({"bpfDataIfacePattern": "^(eth"}))).starts_with(
                "spec.bpfDataIfacePattern: \"^(eth\" is not a valid regular expression"
            )
        );
        assert!(
            err(felix(
                json!({"bpfExcludeCIDRsFromNAT": ["10.0.0.0/8", "nope"]})
            ))
            .starts_with("spec.bpfExcludeCIDRsFromNAT[1]: \"nope\" is not a CIDR")
        );
        assert!(
            err(felix(json!({"wireguardListeningPort": 70000})))
                .starts_with("spec.wireguardListeningPort: 70000 is out of range")
        );
        assert!(
            err(felix(
                json!({"bpfConntrackTimeouts": {"tcpEstablished": "forever"}})
            ))
            .starts_with("spec.bpfConntrackTimeouts.tcpEstablished:")
        );
        assert!(
            err(felix(json!({"wireguardEnabled": "yes"})))
                .starts_with("spec.wireguardEnabled: wrong type")
        );
    }

    #[test]
    fn valid_felix_configuration_round_trips() {
        let input = felix(json!({"bpfLogLevel": "", "floatingIPs": "Disabled",
            "logSeverityScreen": "Info", "reportingInterval": "0s", "wireguardEnabled": false,
            "bpfConntrackTimeouts": {"tcpFinsSeen": "Auto", "udpTimeout": "60s"},
            "bpfPSNATPorts": "20000:29999"}));
        let r = prepare(input.clone(), "default").unwrap();
        assert_eq!(r.to_value(), input);
        // Missing bpfLogLevel is stored as "", as Calico stores it.
        let r = prepare(felix(json!({})), "default").unwrap();
        assert_eq!(r.to_value()["spec"]["bpfLogLevel"], "");
    }

    #[test]
    fn names_and_namespaces() {
        assert!(
            err(
                json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": "Bad_Name"}, "spec": {"cidr": "10.0.0.0/16"}})
            )
            .starts_with("metadata.name:")
        );
        assert_eq!(
            err(
                json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                "metadata": {"name": "p", "namespace": "x"}, "spec": {"cidr": "10.0.0.0/16"}})
            ),
            "metadata.namespace: IPPool is not namespaced; remove metadata.namespace"
        );
        assert_eq!(
            err(
                json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
                "metadata": {"name": "other"}})
            ),
            "metadata.name: \"other\": the operator reads only the Installation named default"
        );
        let svc = prepare(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"ports": [{"port": 80}]}}),
            "yaobank",
        )
        .unwrap();
        assert_eq!(svc.namespace(), Some("yaobank"));
    }

    #[test]
    fn kinds_and_versions_are_checked() {
        assert!(
            err(json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "a"}}))
                .starts_with("kind: unknown kind \"Widget\"")
        );
        assert!(
            err(
                json!({"apiVersion": "projectcalico.org/v2", "kind": "IPPool",
            "metadata": {"name": "a"}})
            )
            .starts_with("kind: kind IPPool is served as apiVersion")
        );
        assert_eq!(err(json!({"kind": "IPPool"})), "apiVersion: is required");
        assert!(err(json!([1, 2])).contains("must be an object"));
    }

    #[test]
    fn installation_refuses_dataplanes_we_do_not_run() {
        let inst = |dp: &str| {
            json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
                "metadata": {"name": "default"},
                "spec": {"calicoNetwork": {"linuxDataplane": dp}}})
        };
        assert!(prepare(inst("BPF"), "default").is_ok());
        assert!(prepare(inst("Iptables"), "default").is_ok());
        assert_eq!(
            err(inst("Nftables")),
            "spec.calicoNetwork.linuxDataplane: Nftables is a Calico dataplane that Margay does not run yet; use Iptables or BPF"
        );
        assert!(err(inst("eBPF")).starts_with(
            "spec.calicoNetwork.linuxDataplane: \"eBPF\" is not one of Iptables, BPF, Nftables, VPP"
        ));
    }

    #[test]
    fn ippool_defaults_and_rules() {
        let pool = |spec: Value| {
            json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                "metadata": {"name": "p"}, "spec": spec})
        };
        let r = prepare(pool(json!({"cidr": "10.10.0.0/16"})), "default").unwrap();
        let v = r.to_value();
        assert_eq!(v["spec"]["blockSize"], 26);
        assert_eq!(v["spec"]["vxlanMode"], "Never");
        assert_eq!(v["spec"]["nodeSelector"], "all()");
        assert_eq!(v["spec"]["allowedUses"], json!(["Workload", "Tunnel"]));
        assert_eq!(err(pool(json!({}))), "spec.cidr: is required");
        assert!(
            err(pool(json!({"cidr": "10.10.0.0/16", "blockSize": 12})))
                .starts_with("spec.blockSize: 12 is out of range")
        );
        assert!(
            err(pool(
                json!({"cidr": "10.10.0.0/16", "vxlanMode": "Always", "ipipMode": "Always"})
            ))
            .starts_with("spec.vxlanMode: VXLAN and IPIP")
        );
        assert!(
            err(pool(
                json!({"cidr": "198.51.100.0/24", "allowedUses": ["LoadBalancer", "Workload"]})
            ))
            .starts_with("spec.allowedUses: LoadBalancer cannot be combined")
        );
        assert!(
            err(pool(
                json!({"cidr": "10.10.0.0/16", "nodeSelector": "zone =="})
            ))
            .starts_with("spec.nodeSelector:")
        );
        assert!(
            prepare(
                pool(json!({"cidr": "198.51.100.0/24", "allowedUses": ["LoadBalancer"]})),
                "default"
            )
            .is_ok()
        );
    }

    #[test]
    fn service_defaults_and_rules() {
        let svc = |spec: Value| {
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "yaobank-customer", "namespace": "yaobank"}, "spec": spec})
        };
        let r = prepare(
            svc(
                json!({"type": "LoadBalancer", "selector": {"app": "customer"},
            "ports": [{"port": 80}]}),
            ),
            "default",
        )
        .unwrap();
        let v = r.to_value();
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(v["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(v["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(v["spec"]["sessionAffinity"], "None");
        let r = prepare(
            svc(json!({"sessionAffinity": "ClientIP", "ports": [{"port": 80}]})),
            "d",
        )
        .unwrap();
        assert_eq!(
            r.to_value()["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        assert_eq!(
            err(svc(json!({"type": "Balanced", "ports": [{"port": 80}]}))),
            "spec.type: \"Balanced\" is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
        );
        assert!(
            err(svc(
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]})
            ))
            .starts_with("spec.ports[0].nodePort: 80 is outside the NodePort range")
        );
        assert_eq!(
            err(svc(json!({"ports": [{"port": 80}, {"port": 81}]}))),
            "spec.ports[0].name: is required when a Service has more than one port"
        );
        assert!(
            err(svc(
                json!({"ports": [{"port": 80}], "externalTrafficPolicy": "Local"})
            ))
            .starts_with("spec.externalTrafficPolicy: may only be set")
        );
        assert!(
            err(svc(json!({"type": "LoadBalancer", "ports": [{"port": 80}],
            "loadBalancerSourceRanges": ["bogus"]})))
            .starts_with("spec.loadBalancerSourceRanges[0]:")
        );
        assert!(
            err(svc(json!({"ports": [{"port": 0}]})))
                .starts_with("spec.ports[0].port: 0 is out of range")
        );
    }

    #[test]
    fn endpoint_slices_and_pods() {
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.168.0.5"], "nodeName": "node-1",
                           "conditions": {"ready": true, "serving": true, "terminating": false}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
        assert!(prepare(slice.clone(), "default").is_ok());
        let mut bad = slice;
        bad["endpoints"][0]["addresses"][0] = json!("fd00::1");
        assert_eq!(
            err(bad),
            "endpoints[0].addresses[0]: \"fd00::1\" is not an IPv4 address"
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "customer-1", "labels": {"app": "customer"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "customer", "image": "yaobank/customer"}]},
            "status": {"podIP": "192.168.0.300"}});
        assert_eq!(
            err(pod),
            "status.podIP: \"192.168.0.300\" is not an IP address"
        );
    }

    #[test]
    fn deployments() {
        let d = |labels: Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "customer", "namespace": "yaobank"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "customer"}},
                    "template": {"metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "customer",
                            "image": "spikecurtis/yaobank-customer:latest",
                            "ports": [{"containerPort": 80}]}]}}}})
        };
        assert!(prepare(d(json!({"app": "customer"})), "default").is_ok());
        assert!(err(d(json!({"app": "summary"}))).starts_with(
            "spec.template.metadata.labels: the selector app=customer does not match"
        ));
    }
}
