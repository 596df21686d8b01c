//! Kubernetes kinds for clusters without a Kubernetes API server: Namespace, Service, ConfigMap,
//! Pod and EndpointSlice, as k8s-openapi types, with the defaults and the checks the API server
//! would apply.

use std::net::IpAddr;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::{Validation, fail};
use crate::names::{check_label_name, check_labels, check_subdomain};

/// The NodePort range kube-apiserver serves by default.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i32> = 30000..=32767;
/// kube-proxy's default ClientIP affinity timeout: three hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10800;

const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const TRAFFIC_POLICIES: [&str; 2] = ["Cluster", "Local"];
const AFFINITIES: [&str; 2] = ["None", "ClientIP"];

fn one_of(path: &str, value: &str, allowed: &[&str]) -> Validation {
    if allowed.contains(&value) {
        Ok(())
    } else {
        fail(
            path,
            format!("{value:?} is not one of {}", allowed.join(", ")),
        )
    }
}

fn check_ip(path: &str, text: &str) -> Result<IpAddr, crate::ValidationError> {
    text.parse()
        .or_else(|_| fail(path, format!("{text:?} is not an IP address")))
}

fn check_port(path: &str, port: i32) -> Validation {
    if !(1..=65535).contains(&port) {
        return fail(
            path,
            format!("{port} is out of range (must be between 1 and 65535)"),
        );
    }
    Ok(())
}

// === Service ===

/// Fills what kube-apiserver fills: type ClusterIP, protocol TCP, targetPort = port, affinity
/// None (and its three-hour timeout when ClientIP), traffic policies Cluster.
pub fn default_service(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let svc_type = spec
        .type_
        .get_or_insert_with(|| "ClusterIP".to_owned())
        .clone();
    if svc_type == "ExternalName" {
        return;
    }
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".to_owned());
        if port.target_port.is_none() {
            port.target_port = Some(IntOrString::Int(port.port));
        }
    }
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".to_owned())
        .clone();
    if affinity == "ClientIP" {
        let config = spec
            .session_affinity_config
            .get_or_insert_with(Default::default);
        let client = config.client_ip.get_or_insert_with(Default::default);
        client
            .timeout_seconds
            .get_or_insert(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
    }
    spec.internal_traffic_policy
        .get_or_insert_with(|| "Cluster".to_owned());
    let externally_accessible = svc_type == "NodePort"
        || svc_type == "LoadBalancer"
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty());
    if externally_accessible {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".to_owned());
    }
}

pub fn validate_service(svc: &Service) -> Validation {
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    check_label_name("metadata.name", name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return fail(
            "metadata.name",
            format!("{name:?} is not a valid Service name: it must start with a letter"),
        );
    }
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    one_of("spec.type", svc_type, &SERVICE_TYPES)?;
    check_labels("spec.selector", spec.selector.as_ref())?;

    if svc_type == "ExternalName" {
        let external = spec.external_name.as_deref().unwrap_or_default();
        if external.is_empty() {
            return fail("spec.externalName", "is required for type ExternalName");
        }
        return check_subdomain("spec.externalName", external.trim_end_matches('.'));
    }

    if let Some(ip) = spec.cluster_ip.as_deref() {
        if ip == "None" {
            if svc_type != "ClusterIP" {
                return fail(
                    "spec.clusterIP",
                    format!(
                        "\"None\" (headless) is only allowed for type ClusterIP, not {svc_type}"
                    ),
                );
            }
        } else if !ip.is_empty() {
            check_ip("spec.clusterIP", ip)?;
        }
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && spec.cluster_ip.as_deref() != Some("None") {
        return fail("spec.ports", "at least one port is required");
    }
    for (i, port) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        check_port(&format!("{path}.port"), port.port)?;
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        one_of(&format!("{path}.protocol"), protocol, &PROTOCOLS)?;
        match (&port.name, ports.len()) {
            (None, n) if n > 1 => {
                return fail(
                    format!("{path}.name"),
                    "is required when a Service has more than one port",
                );
            }
            (Some(n), _) => check_label_name(&format!("{path}.name"), n)?,
            _ => {}
        }
        for (j, other) in ports[..i].iter().enumerate() {
            if other.name.is_some() && other.name == port.name {
                return fail(
                    format!("{path}.name"),
                    format!(
                        "{:?} is also the name of spec.ports[{j}]",
                        port.name.as_deref().unwrap_or_default()
                    ),
                );
            }
            if other.port == port.port && other.protocol.as_deref().unwrap_or("TCP") == protocol {
                return fail(
                    format!("{path}.port"),
                    format!("{}/{protocol} is also spec.ports[{j}]", port.port),
                );
            }
        }
        match &port.target_port {
            Some(IntOrString::Int(p)) => check_port(&format!("{path}.targetPort"), *p)?,
            Some(IntOrString::String(s)) => check_label_name(&format!("{path}.targetPort"), s)?,
            None => {}
        }
        if let Some(node_port) = port.node_port {
            if svc_type == "ClusterIP" {
                return fail(
                    format!("{path}.nodePort"),
                    "may not be set for type ClusterIP",
                );
            }
            if !NODE_PORT_RANGE.contains(&node_port) {
                return fail(
                    format!("{path}.nodePort"),
                    format!(
                        "{node_port} is outside the NodePort range {}-{}",
                        NODE_PORT_RANGE.start(),
                        NODE_PORT_RANGE.end()
                    ),
                );
            }
        }
    }

    let affinity = spec.session_affinity.as_deref().unwrap_or("None");
    one_of("spec.sessionAffinity", affinity, &AFFINITIES)?;
    if let Some(timeout) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
    {
        if affinity != "ClientIP" {
            return fail(
                "spec.sessionAffinityConfig",
                "may only be set when sessionAffinity is ClientIP",
            );
        }
        if !(1..=86400).contains(&timeout) {
            return fail(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{timeout} is out of range (must be between 1 and 86400)"),
            );
        }
    }

    let externally_accessible = svc_type == "NodePort"
        || svc_type == "LoadBalancer"
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty());
    if let Some(policy) = spec.external_traffic_policy.as_deref() {
        one_of("spec.externalTrafficPolicy", policy, &TRAFFIC_POLICIES)?;
        if !externally_accessible {
            return fail(
                "spec.externalTrafficPolicy",
                "may only be set for NodePort and LoadBalancer Services, or with externalIPs",
            );
        }
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref() {
        one_of("spec.internalTrafficPolicy", policy, &TRAFFIC_POLICIES)?;
    }
    if let Some(port) = spec.health_check_node_port {
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if svc_type != "LoadBalancer" || !local {
            return fail(
                "spec.healthCheckNodePort",
                "may only be set for LoadBalancer Services with externalTrafficPolicy Local",
            );
        }
        check_port("spec.healthCheckNodePort", port)?;
    }
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if range.trim().parse::<ipnet::IpNet>().is_err() {
            return fail(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{range:?} is not a CIDR"),
            );
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(&format!("spec.externalIPs[{i}]"), ip)?;
    }
    if let Some(ingress) = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
    {
        for (i, entry) in ingress.iter().enumerate() {
            if let Some(ip) = &entry.ip {
                check_ip(&format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
            }
        }
    }
    Ok(())
}

// === EndpointSlice ===

pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Validation {
    check_subdomain(
        "metadata.name",
        slice.metadata.name.as_deref().unwrap_or_default(),
    )?;
    let address_type = slice.address_type.as_str();
    one_of("addressType", address_type, &["IPv4", "IPv6", "FQDN"])?;
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let path = format!("endpoints[{i}]");
        if ep.addresses.is_empty() || ep.addresses.len() > 100 {
            return fail(
                format!("{path}.addresses"),
                "must hold between 1 and 100 addresses",
            );
        }
        for (j, addr) in ep.addresses.iter().enumerate() {
            let apath = format!("{path}.addresses[{j}]");
            match address_type {
                "IPv4" => {
                    if !matches!(check_ip(&apath, addr)?, IpAddr::V4(_)) {
                        return fail(apath, format!("{addr:?} is not an IPv4 address"));
                    }
                }
                "IPv6" => {
                    if !matches!(check_ip(&apath, addr)?, IpAddr::V6(_)) {
                        return fail(apath, format!("{addr:?} is not an IPv6 address"));
                    }
                }
                _ => check_subdomain(&apath, addr)?,
            }
        }
        if let Some(node) = &ep.node_name {
            check_subdomain(&format!("{path}.nodeName"), node)?;
        }
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(p) = port.port {
            check_port(&format!("ports[{i}].port"), p)?;
        }
        if let Some(proto) = &port.protocol {
            one_of(&format!("ports[{i}].protocol"), proto, &PROTOCOLS)?;
        }
    }
    Ok(())
}

// === Pod ===

pub fn validate_pod(pod: &Pod) -> Validation {
    check_subdomain(
        "metadata.name",
        pod.metadata.name.as_deref().unwrap_or_default(),
    )?;
    if let Some(spec) = &pod.spec {
        validate_pod_spec("spec", spec)?;
    }
    if let Some(status) = &pod.status {
        if let Some(ip) = &status.pod_ip {
            check_ip("status.podIP", ip)?;
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            check_ip(&format!("status.podIPs[{i}].ip"), &ip.ip)?;
        }
        if let Some(ip) = &status.host_ip {
            check_ip("status.hostIP", ip)?;
        }
    }
    Ok(())
}

fn validate_pod_spec(path: &str, spec: &PodSpec) -> Validation {
    if spec.containers.is_empty() {
        return fail(
            format!("{path}.containers"),
            "at least one container is required",
        );
    }
    for (i, c) in spec.containers.iter().enumerate() {
        let cpath = format!("{path}.containers[{i}]");
        check_label_name(&format!("{cpath}.name"), &c.name)?;
        for (j, p) in c.ports.iter().flatten().enumerate() {
            check_port(
                &format!("{cpath}.ports[{j}].containerPort"),
                p.container_port,
            )?;
            if let Some(hp) = p.host_port {
                check_port(&format!("{cpath}.ports[{j}].hostPort"), hp)?;
            }
            if let Some(proto) = &p.protocol {
                one_of(&format!("{cpath}.ports[{j}].protocol"), proto, &PROTOCOLS)?;
            }
        }
    }
    if let Some(node) = &spec.node_name {
        check_subdomain(&format!("{path}.nodeName"), node)?;
    }
    Ok(())
}

// === Deployment ===

pub fn validate_deployment(d: &Deployment) -> Validation {
    check_subdomain(
        "metadata.name",
        d.metadata.name.as_deref().unwrap_or_default(),
    )?;
    let Some(spec) = &d.spec else {
        return fail("spec", "is required");
    };
    if let Some(replicas) = spec.replicas
        && replicas < 0
    {
        return fail("spec.replicas", format!("{replicas} must not be negative"));
    }
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    if selector.is_empty() {
        return fail(
            "spec.selector.matchLabels",
            "is required (matchExpressions are not supported)",
        );
    }
    check_labels("spec.selector.matchLabels", Some(&selector))?;
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    check_labels("spec.template.metadata.labels", Some(&labels))?;
    if let Some((k, v)) = selector.iter().find(|(k, v)| labels.get(*k) != Some(*v)) {
        return fail(
            "spec.template.metadata.labels",
            format!("the selector {k}={v} does not match the template's labels"),
        );
    }
    match &spec.template.spec {
        Some(pod) => validate_pod_spec("spec.template.spec", pod),
        None => fail("spec.template.spec", "is required"),
    }
}

// === Namespace and ConfigMap ===

pub fn validate_namespace(ns: &Namespace) -> Validation {
    check_label_name(
        "metadata.name",
        ns.metadata.name.as_deref().unwrap_or_default(),
    )
}

pub fn validate_config_map(cm: &ConfigMap) -> Validation {
    check_subdomain(
        "metadata.name",
        cm.metadata.name.as_deref().unwrap_or_default(),
    )?;
    let keys = cm
        .data
        .iter()
        .flat_map(|d| d.keys())
        .chain(cm.binary_data.iter().flat_map(|d| d.keys()));
    for key in keys {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return fail(
                format!("data[{key:?}]"),
                "a key is made of letters, digits, '-', '_' and '.'",
            );
        }
    }
    if let Some(data) = &cm.data
        && let Some(key) = cm
            .binary_data
            .iter()
            .flat_map(|b| b.keys())
            .find(|k| data.contains_key(*k))
    {
        return fail(
            format!("binaryData[{key:?}]"),
            "the same key is also in data",
        );
    }
    Ok(())
}
