//! Bulk writes through the validating client (`Client::write_in_batches`): thousands of Services
//! and EndpointSlices in batches keep validation (bad input writes nothing) and the registry's
//! allocation invariants (every ClusterIP once, across batches and alongside earlier writes).

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use margay_api::Kind;
use margay_datastore::sqlite::SqliteDatastore;
use margay_datastore::{Client, ClientError, Datastore, WriteMode};
use serde_json::{Value, json};

async fn client() -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Datastore> =
        Arc::new(SqliteDatastore::open(&dir.path().join("margay.db")).unwrap());
    let client = Client::new(store);
    client.bootstrap().await.unwrap();
    client
        .write(
            vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bulk"}})],
            "default",
            WriteMode::Create,
        )
        .await
        .unwrap();
    (client, dir)
}

/// `count` selectorless Services (ClusterIP allocated by the registry) and one EndpointSlice
/// each, as the benchmarks load them.
fn services(count: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(2 * count);
    for i in 0..count {
        let name = format!("svc-{i}");
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bulk"},
            "spec": {"ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}
        }));
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "bulk",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.244.{}.{}", i / 250, i % 250 + 1)]}],
            "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]
        }));
    }
    out
}

async fn cluster_ips(client: &Client) -> Vec<String> {
    client
        .list(Kind::Service, Some("bulk"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.value["spec"]["clusterIP"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn thousands_of_services_in_batches_get_distinct_addresses() {
    let (client, _dir) = client().await;
    // The first automatic address is taken by hand first: the bulk allocation must skip it.
    client
        .write(
            vec![json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "pinned", "namespace": "bulk"},
                        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}})],
            "default",
            WriteMode::Create,
        )
        .await
        .unwrap();
    const COUNT: usize = 3000;
    let t = Instant::now();
    let written = client
        .write_in_batches(services(COUNT), "default", WriteMode::Create, 1000)
        .await
        .unwrap();
    eprintln!(
        "bulk: {COUNT} Services + {COUNT} EndpointSlices in {:?}",
        t.elapsed()
    );
    assert_eq!(written, 2 * COUNT);
    let ips = cluster_ips(&client).await;
    assert_eq!(ips.len(), COUNT + 1);
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(
        distinct.len(),
        ips.len(),
        "a ClusterIP was handed out twice"
    );
    assert_eq!(
        client
            .list(Kind::EndpointSlice, Some("bulk"))
            .await
            .unwrap()
            .items
            .len(),
        COUNT
    );
    // A later single write still gets a free address.
    let one = client
        .write(
            vec![json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "later", "namespace": "bulk"},
                        "spec": {"ports": [{"port": 80}]}})],
            "default",
            WriteMode::Create,
        )
        .await
        .unwrap();
    let later = one[0].value["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!distinct.contains(&later), "{later} was already allocated");

    // Applying the same objects again changes nothing and keeps every address.
    let before = client.store().revision().await.unwrap();
    client
        .write_in_batches(services(COUNT), "default", WriteMode::Apply, 700)
        .await
        .unwrap();
    let mut again = cluster_ips(&client).await;
    again.retain(|ip| *ip != later);
    assert_eq!(again, ips);
    // Only the allocation lock may move (one commit per batch); no Service changed.
    assert!(client.store().revision().await.unwrap() - before <= 5);
}

#[tokio::test]
async fn one_bad_object_in_a_bulk_write_writes_nothing() {
    let (client, _dir) = client().await;
    let before = client.store().revision().await.unwrap();
    let mut manifests = services(500);
    // The 451st Service asks for an address outside the service range.
    manifests[900]["spec"]["clusterIP"] = "192.0.2.1".into();
    let err = client
        .write_in_batches(manifests, "default", WriteMode::Create, 100)
        .await
        .unwrap_err();
    // The address is checked by the registry, in the dry run over the whole input: no batch,
    // not even those before the bad object, is written.
    let message = err.to_string();
    assert!(message.contains("svc-450"), "{message}");
    assert!(message.contains("192.0.2.1"), "{message}");
    assert_eq!(client.store().revision().await.unwrap(), before);

    // A manifest that fails validation is refused before any batch is written.
    let mut manifests = services(500);
    manifests[998]["spec"]["ports"] = json!([{"name": "tcp", "port": "eighty"}]);
    let err = client
        .write_in_batches(manifests, "default", WriteMode::Create, 100)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Invalid { .. }), "{err}");
    assert_eq!(client.store().revision().await.unwrap(), before);

    // So is a name given twice.
    let mut manifests = services(10);
    manifests.push(manifests[0].clone());
    let err = client
        .write_in_batches(manifests, "default", WriteMode::Create, 4)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("more than once"), "{err}");
    assert_eq!(client.store().revision().await.unwrap(), before);

    let err = client
        .write_in_batches(services(1), "default", WriteMode::Create, 0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("batch size"), "{err}");
}
