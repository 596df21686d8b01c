//! The controllers against a real SQLite datastore: a Deployment becomes Pods spread over nodes,
//! Pods become EndpointSlice endpoints as they get addresses and readiness, and a deleted Pod is
//! replaced while its endpoint reports terminating.

use margay_api::Kind;
use margay_controllers::reconcile;
use margay_datastore::{Client, Key, WriteMode};
use serde_json::json;

#[tokio::test]
async fn deployment_to_pods_to_endpoint_slices() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let client = Client::new(margay_datastore::open(&url).await.unwrap());
    client.bootstrap().await.unwrap();
    client
        .write(
            vec![
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "yaobank"}}),
                json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "summary", "namespace": "yaobank"},
                    "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "summary"}},
                        "template": {"metadata": {"labels": {"app": "summary"}},
                            "spec": {"containers": [{"name": "summary", "image": "spikecurtis/yaobank-summary",
                                "ports": [{"containerPort": 80}]}]}}}}),
                json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "summary", "namespace": "yaobank"},
                    "spec": {"selector": {"app": "summary"}, "ports": [{"port": 80}]}}),
            ],
            "default",
            WriteMode::Create,
        )
        .await
        .unwrap();
    let nodes = vec!["node-1".to_owned(), "node-2".to_owned()];
    let mut n = 0;
    let mut suffix = move || {
        n += 1;
        format!("x{n}")
    };
    let changes = reconcile::deployments(&client, &nodes, &mut suffix)
        .await
        .unwrap();
    assert_eq!(changes.created.len(), 2);
    let pods = client.list(Kind::Pod, Some("yaobank")).await.unwrap().items;
    let mut placed: Vec<String> = pods
        .iter()
        .map(|p| p.value["spec"]["nodeName"].as_str().unwrap().to_owned())
        .collect();
    placed.sort();
    assert_eq!(placed, nodes, "replicas spread over the nodes");
    // Nothing more to do.
    assert!(
        reconcile::deployments(&client, &nodes, &mut suffix)
            .await
            .unwrap()
            .created
            .is_empty()
    );

    // Before the Pods have addresses the Service's slice is empty.
    reconcile::endpoint_slices(&client).await.unwrap();
    let slices = client
        .list(Kind::EndpointSlice, Some("yaobank"))
        .await
        .unwrap()
        .items;
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].value["endpoints"], json!([]));

    // The "kubelet" starts them: addresses and readiness.
    for (i, p) in pods.iter().enumerate() {
        client
            .modify(&p.key, |v| {
                let mut v = v.clone();
                v["status"] = json!({"phase": "Running", "podIP": format!("192.168.0.{}", i + 1),
                    "conditions": [{"type": "Ready", "status": "True"}]});
                Ok(v)
            })
            .await
            .unwrap();
    }
    let changes = reconcile::endpoint_slices(&client).await.unwrap();
    assert_eq!(changes.updated.len(), 1);
    let slice = &client
        .list(Kind::EndpointSlice, Some("yaobank"))
        .await
        .unwrap()
        .items[0]
        .value;
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
    // Reconciling again writes nothing.
    assert!(
        reconcile::endpoint_slices(&client)
            .await
            .unwrap()
            .is_empty()
    );

    // Deleting a Pod: it turns terminating, a replacement is created.
    let victim = pods[0].key.name.clone();
    reconcile::mark_for_deletion(&client, "yaobank", &victim)
        .await
        .unwrap();
    let changes = reconcile::deployments(&client, &nodes, &mut suffix)
        .await
        .unwrap();
    assert_eq!(changes.created.len(), 1);
    reconcile::endpoint_slices(&client).await.unwrap();
    let slice = &client
        .list(Kind::EndpointSlice, Some("yaobank"))
        .await
        .unwrap()
        .items[0]
        .value;
    let terminating: Vec<_> = slice["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["conditions"]["terminating"] == true)
        .collect();
    assert_eq!(terminating.len(), 1);
    assert_eq!(terminating[0]["conditions"]["serving"], true);
    let status = client
        .get(&Key::new(Kind::Deployment, Some("yaobank"), "summary"))
        .await
        .unwrap()
        .value["status"]
        .clone();
    assert_eq!(status["replicas"], 2);
    // Deleting the Service removes its slice.
    client
        .delete(
            vec![(Key::new(Kind::Service, Some("yaobank"), "summary"), None)],
            false,
        )
        .await
        .unwrap();
    let changes = reconcile::endpoint_slices(&client).await.unwrap();
    assert_eq!(changes.deleted.len(), 1);
}
