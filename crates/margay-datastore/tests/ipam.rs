//! Pod IPAM against a real SQLite store: blocks claimed per node as Calico records them,
//! concurrent assignments never collide, releases free addresses.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use margay_api::Kind;
use margay_datastore::{Client, ipam};

async fn client(dir: &tempfile::TempDir) -> Client {
    let url = format!("sqlite://{}", dir.path().join("ipam.db").display());
    let client = Client::new(margay_datastore::open(&url).await.expect("open"));
    client.bootstrap().await.expect("bootstrap");
    client
}

fn attrs(pod: &str, node: &str) -> BTreeMap<String, String> {
    [("namespace", "default"), ("pod", pod), ("node", node)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_assignments_on_two_nodes_never_collide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Arc::new(client(&dir).await);
    let mut tasks = Vec::new();
    // 70 pods on node-1 needs two /26 blocks; 10 on node-2 one.
    for i in 0..80 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let node = if i < 70 { "node-1" } else { "node-2" };
            let pod = format!("pod-{i}");
            ipam::assign(
                &client,
                node,
                &BTreeMap::new(),
                &format!("h-{i}"),
                attrs(&pod, node),
            )
            .await
            .map(|a| (node, a))
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        let (node, a) = t.await.expect("join").expect("assign");
        assert!(seen.insert(a.ip), "{} assigned twice", a.ip);
        assert!(a.block.contains(&a.ip));
        let cidrs = ipam::node_cidrs(&client, node).await.expect("cidrs");
        assert!(
            cidrs.contains(&a.block),
            "{} is not one of {node}'s blocks",
            a.block
        );
    }
    // Two /26 blocks hold 70 pods. Under contention a node may claim one block more than it
    // needs (Calico's IPAM can too); it never claims one per racing pod.
    let node1 = ipam::node_cidrs(&client, "node-1").await.unwrap().len();
    let node2 = ipam::node_cidrs(&client, "node-2").await.unwrap().len();
    assert!((2..=3).contains(&node1), "node-1 claimed {node1} blocks");
    assert!((1..=2).contains(&node2), "node-2 claimed {node2} blocks");
    let affinities = client.list(Kind::BlockAffinity, None).await.unwrap();
    assert_eq!(affinities.items.len(), node1 + node2);
    let first = &client.list(Kind::IPAMBlock, None).await.unwrap().items[0].value;
    assert_eq!(first["metadata"]["name"], "192-168-0-0-26");
    assert_eq!(
        first["spec"]["attributes"][0]["secondary"]["namespace"],
        "default"
    );
}

#[tokio::test]
async fn release_frees_and_reuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client(&dir).await;
    let a = ipam::assign(
        &client,
        "node-1",
        &BTreeMap::new(),
        "h-a",
        attrs("a", "node-1"),
    )
    .await
    .unwrap();
    let b = ipam::assign(
        &client,
        "node-1",
        &BTreeMap::new(),
        "h-b",
        attrs("b", "node-1"),
    )
    .await
    .unwrap();
    assert_ne!(a.ip, b.ip);
    assert_eq!(ipam::release(&client, "h-a").await.unwrap(), vec![a.ip]);
    let block = &client.list(Kind::IPAMBlock, None).await.unwrap().items[0].value;
    assert_eq!(block["spec"]["attributes"].as_array().unwrap().len(), 1);
    // The freed address goes back in the queue; every other address is handed out first.
    assert!(
        ipam::release(&client, "h-unknown")
            .await
            .unwrap()
            .is_empty()
    );
    ipam::release_node(&client, "node-1").await.unwrap();
    assert!(
        client
            .list(Kind::IPAMBlock, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        client
            .list(Kind::BlockAffinity, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn pools_that_do_not_select_the_node_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client(&dir).await;
    client
        .modify(
            &margay_datastore::Key::new(Kind::IPPool, None, "default-ipv4-ippool"),
            |v| {
                let mut v = v.clone();
                v["spec"]["nodeSelector"] = "zone == 'a'".into();
                Ok(v)
            },
        )
        .await
        .unwrap();
    let err = ipam::assign(
        &client,
        "node-1",
        &BTreeMap::new(),
        "h",
        attrs("p", "node-1"),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("no IP pool has a free block"),
        "{err}"
    );
    let labels = [("zone".to_owned(), "a".to_owned())].into();
    assert!(
        ipam::assign(&client, "node-1", &labels, "h", attrs("p", "node-1"))
            .await
            .is_ok()
    );
}
