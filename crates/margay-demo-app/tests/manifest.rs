//! examples/yaobank.yaml: valid-shaped Kubernetes objects that match what the demo app serves.

use serde_yaml_ng::Value;

const MANIFEST: &str = include_str!("../../../examples/yaobank.yaml");

fn docs() -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(MANIFEST)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn yaobank_manifest_has_the_three_tiers() {
    let docs = docs();
    assert_eq!(docs.len(), 7);
    assert_eq!(find(&docs, "Namespace", "yaobank")["apiVersion"], "v1");
    for (tier, port, service_port) in [
        ("database", 2379, 2379),
        ("summary", 80, 80),
        ("customer", 80, 80),
    ] {
        let deployment = find(&docs, "Deployment", tier);
        assert_eq!(deployment["apiVersion"], "apps/v1");
        assert_eq!(deployment["metadata"]["namespace"], "yaobank");
        let selector = deployment["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .expect("matchLabels");
        assert_eq!(selector.get("app").and_then(Value::as_str), Some(tier));
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (key, value) in selector {
            assert_eq!(&labels[key.as_str().expect("label key")], value, "{tier}");
        }
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["image"].as_str(),
            Some(format!("spikecurtis/yaobank-{tier}:latest").as_str())
        );
        assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(port));

        let service = find(&docs, "Service", tier);
        assert_eq!(service["metadata"]["namespace"], "yaobank");
        assert_eq!(service["spec"]["selector"]["app"], tier);
        assert_eq!(
            service["spec"]["ports"][0]["port"].as_u64(),
            Some(service_port)
        );
    }
    let customer = find(&docs, "Service", "customer");
    assert_eq!(customer["spec"]["type"], "NodePort");
    assert_eq!(
        customer["spec"]["ports"][0]["targetPort"].as_u64(),
        Some(80)
    );
}

/// The servers' default addresses and URLs are the manifest's Services: a pod started with no
/// flags finds its upstream by the Service's short name through resolv.conf's search path.
#[test]
fn defaults_match_the_manifests_services() {
    use clap::Parser as _;
    use margay_demo_app::cli::{Cli, Command};
    let parse = |args: &[&str]| {
        Cli::try_parse_from(args.iter().copied())
            .expect("parse")
            .command
    };
    let Command::Customer(customer) = parse(&["margay-demo-app", "customer"]) else {
        panic!("customer")
    };
    assert_eq!(customer.summary_url, "http://summary:80/");
    assert_eq!(customer.listen.port(), 80);
    let Command::Summary(summary) = parse(&["margay-demo-app", "summary"]) else {
        panic!("summary")
    };
    assert_eq!(summary.database_url, "http://database:2379/");
    let Command::Database(database) = parse(&["margay-demo-app", "database"]) else {
        panic!("database")
    };
    assert_eq!(database.listen.port(), 2379);
}
