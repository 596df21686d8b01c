//! The records cluster DNS serves: `<service>.<namespace>.svc.cluster.local` for every Service
//! with a ClusterIP, and the ready endpoints' addresses for headless Services, written as a hosts
//! file (what dnsmasq's `--addn-hosts` reads). Short names (`summary`, `summary.yaobank`) resolve
//! through the search path in each pod's resolv.conf, as in Kubernetes.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::SERVICE_NAME_LABEL;

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The hosts file for `services` (and their `slices`, for headless Services).
pub fn hosts_file(services: &[Service], slices: &[EndpointSlice]) -> String {
    let mut lines = BTreeSet::new();
    for svc in services {
        let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else {
            continue;
        };
        let fqdn = format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}");
        match svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) {
            Some("None") => {
                for slice in slices {
                    let owner = slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL));
                    if owner != Some(name) || slice.metadata.namespace.as_ref() != Some(ns) {
                        continue;
                    }
                    for ep in &slice.endpoints {
                        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                        if ready {
                            for addr in &ep.addresses {
                                lines.insert(format!("{addr} {fqdn}"));
                            }
                        }
                    }
                }
            }
            Some(ip) if !ip.is_empty() => {
                lines.insert(format!("{ip} {fqdn}"));
            }
            _ => {}
        }
    }
    let mut out = String::from("# Cluster DNS records, written by margay-controllers.\n");
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A pod's resolv.conf, as kubelet writes it for `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str, dns_ip: &str) -> String {
    format!(
        "nameserver {dns_ip}\nsearch {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ips_and_headless_services() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "summary", "namespace": "yaobank"}, "spec": {"clusterIP": "10.96.0.20"}},
            {"metadata": {"name": "db", "namespace": "yaobank"}, "spec": {"clusterIP": "None"}},
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db-x", "namespace": "yaobank", "labels": {"kubernetes.io/service-name": "db"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": ["192.168.0.9"], "conditions": {"ready": true}},
                           {"addresses": ["192.168.0.10"], "conditions": {"ready": false}}]}
        ]))
        .unwrap();
        let hosts = hosts_file(&services, &slices);
        assert!(hosts.contains("10.96.0.20 summary.yaobank.svc.cluster.local\n"));
        assert!(hosts.contains("192.168.0.9 db.yaobank.svc.cluster.local\n"));
        assert!(!hosts.contains("192.168.0.10"));
        assert!(resolv_conf("yaobank", "10.96.0.10").contains("search yaobank.svc.cluster.local"));
    }
}
