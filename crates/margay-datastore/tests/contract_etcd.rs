//! The datastore contract suite against a real etcd, plus what only etcd has: Calico's key
//! layout as etcdctl sees it, objects written by Calico's tools, TLS with client certificates,
//! user and password auth, watches that survive lost connections and lost cluster members.
//!
//! Each test starts its own etcd (Debian's `etcd`, see `support/etcd.rs`) on free loopback
//! ports with a temporary data directory, so tests run in parallel and start empty.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use margay_api::Kind;
use margay_datastore::contract::Fixture;
use margay_datastore::etcd::keys::{CALICO_PREFIX, MARGAY_PREFIX, WATCH_RANGE_END};
use margay_datastore::{
    Client, Datastore, Error, EtcdDatastore, EventType, Key, ListRequest, Op, Revision, Stored,
    SyncStatus, SyncUpdate, WatchEvent, WatchStream, WriteMode,
};
use serde_json::{Value, json};
use support::etcd::{TestEtcd, UnixEtcd};
use support::proxy::Proxy;

/// Two handles (two connections) on a fresh etcd. etcd starts at revision 1, which the suite
/// takes as its base: every check sees the same revisions as on SQLite, shifted by one.
async fn fixture() -> Fixture {
    let etcd = TestEtcd::start().await;
    let first = etcd.connect().await;
    let second = etcd.connect().await;
    let base = first.revision().await.unwrap();
    assert_eq!(base, 1, "a fresh etcd is at revision 1");
    Fixture::new(first, second, etcd).with_base_revision(base)
}

mod contract {
    margay_datastore::datastore_contract_tests!(super::fixture);
}

/// How long a test waits for a watch event or a sync update.
const WAIT: Duration = Duration::from_secs(20);

fn ippool(name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": cidr, "blockSize": 26, "natOutgoing": true, "nodeSelector": "all()"}
    })
}

fn pool_key(name: &str) -> Key {
    Key::new(Kind::IPPool, None, name)
}

async fn create(ds: &dyn Datastore, value: Value) -> Stored {
    let kind = Kind::from_manifest(
        value["apiVersion"].as_str().unwrap(),
        value["kind"].as_str().unwrap(),
    )
    .unwrap();
    let key = Key::of(kind, &value);
    ds.commit(vec![Op::Create { key, value }])
        .await
        .unwrap()
        .remove(0)
}

async fn next_event(watch: &mut WatchStream) -> Result<WatchEvent, Error> {
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

fn lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

// === Calico's layout ===

/// Part 6 of the issue: `etcdctl get --prefix .../felixconfigurations/` shows our object where
/// and as Calico stores it.
#[tokio::test]
async fn felix_configuration_is_stored_as_calico_stores_it() {
    let etcd = TestEtcd::start().await;
    let client = Client::new(etcd.connect().await);
    let written = client
        .write(
            vec![json!({
                "apiVersion": "projectcalico.org/v3",
                "kind": "FelixConfiguration",
                "metadata": {"name": "default"},
                "spec": {"bpfEnabled": true, "logSeverityScreen": "Info"}
            })],
            "default",
            WriteMode::Apply,
        )
        .await
        .unwrap()
        .remove(0);

    let prefix = "/calico/resources/v3/projectcalico.org/felixconfigurations/";
    let plain = lines(&etcd.etcdctl(None, &["get", "--prefix", prefix]));
    assert_eq!(plain.len(), 2, "one key, one value: {plain:?}");
    assert_eq!(
        plain[0],
        "/calico/resources/v3/projectcalico.org/felixconfigurations/default"
    );
    let stored: Value = serde_json::from_str(&plain[1]).unwrap();
    assert_eq!(stored["apiVersion"], "projectcalico.org/v3");
    assert_eq!(stored["kind"], "FelixConfiguration");
    assert_eq!(stored["metadata"]["name"], "default");
    assert_eq!(
        stored["metadata"]["uid"], written.value["metadata"]["uid"],
        "uid is stored"
    );
    let timestamp = stored["metadata"]["creationTimestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
        "{timestamp}"
    );
    assert!(
        stored["metadata"].get("resourceVersion").is_none(),
        "resourceVersion is never stored: {stored}"
    );
    assert_eq!(stored["spec"]["bpfEnabled"], json!(true));
    assert_eq!(stored["spec"]["logSeverityScreen"], "Info");

    // The resourceVersion Margay reports is the key's ModRevision, as calicoctl reports it.
    let json_out: Value = serde_json::from_slice(
        &etcd
            .etcdctl(None, &["get", "--prefix", prefix, "-w", "json"])
            .stdout,
    )
    .unwrap();
    let mod_revision = json_out["kvs"][0]["mod_revision"].as_u64().unwrap();
    assert_eq!(written.revision, mod_revision);
    assert_eq!(
        written.value["metadata"]["resourceVersion"],
        json!(mod_revision.to_string())
    );
}

/// Kinds that are not Calico v3 kinds live under Margay's documented prefix, by API group.
#[tokio::test]
async fn other_kinds_live_under_margays_prefix() {
    let etcd = TestEtcd::start().await;
    let ds = etcd.connect().await;
    create(
        ds.as_ref(),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default"},
               "spec": {"ports": [{"port": 80}]}}),
    )
    .await;
    create(
        ds.as_ref(),
        json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
               "metadata": {"name": "default"}, "spec": {"variant": "Calico"}}),
    )
    .await;
    create(
        ds.as_ref(),
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
               "metadata": {"name": "10-244-0-0-26"}, "spec": {"cidr": "10.244.0.0/26"}}),
    )
    .await;
    create(ds.as_ref(), ippool("p1", "10.244.0.0/16")).await;

    let keys = lines(&etcd.etcdctl(None, &["get", "--prefix", "/", "--keys-only"]));
    let keys: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        keys,
        vec![
            "/calico/resources/v3/projectcalico.org/ippools/p1",
            "/margay/resources/v1/core/services/default/web",
            "/margay/resources/v1/crd.projectcalico.org/ipamblocks/10-244-0-0-26",
            "/margay/resources/v1/operator.tigera.io/installations/default",
        ]
    );
}

/// What Calico's tools write at Calico's keys, Margay reads: a calicoctl-written IPPool shows up
/// in get, list and watch with its ModRevision as resourceVersion. Kinds Margay does not know
/// (network policies) and other applications' keys are ignored; a value that is not a document
/// is reported as corrupt, not skipped.
#[tokio::test]
async fn objects_written_by_calico_tools_are_read() {
    let etcd = TestEtcd::start().await;
    let ds = etcd.connect().await;
    let base = ds.revision().await.unwrap();
    let mut watch = ds.watch(base).await.unwrap();

    // As calicoctl writes it: whole object, uid and creationTimestamp, no resourceVersion.
    let calico_pool = json!({
        "kind": "IPPool",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {
            "name": "default-ipv4-ippool",
            "uid": "5f0bd5a8-2f4a-4e4b-9a43-0ae9c0f0b8a1",
            "creationTimestamp": "2022-12-08T21:45:45Z"
        },
        "spec": {"cidr": "192.168.0.0/16", "ipipMode": "Always", "natOutgoing": true,
                 "blockSize": 26, "nodeSelector": "all()"}
    });
    let key = format!("{CALICO_PREFIX}ippools/default-ipv4-ippool");
    etcd.etcdctl(None, &["put", &key, &calico_pool.to_string()]);
    etcd.etcdctl(
        None,
        &[
            "put",
            &format!("{CALICO_PREFIX}networkpolicies/default/allow-dns"),
            r#"{"kind":"NetworkPolicy"}"#,
        ],
    );
    // Between the two prefixes, inside the range a watch covers, but not ours.
    etcd.etcdctl(None, &["put", "/calico/v1/config/LogSeverity", "info"]);
    etcd.etcdctl(None, &["put", "/coreos.com/network/config", "{}"]);
    let after = create(ds.as_ref(), ippool("mine", "10.9.0.0/16")).await;

    let stored = ds.get(&pool_key("default-ipv4-ippool")).await.unwrap();
    assert_eq!(stored.revision, base + 1);
    let mut expected = calico_pool.clone();
    expected["metadata"]["resourceVersion"] = json!((base + 1).to_string());
    assert_eq!(stored.value, expected);

    let listing = ds.list(&ListRequest::default()).await.unwrap();
    let names: Vec<String> = listing.items.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(names, vec!["IPPool default-ipv4-ippool", "IPPool mine"]);
    assert_eq!(listing.revision, after.revision);

    // The watch skips the foreign keys and keeps revision order.
    let first = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (first.event_type, first.revision, first.key.clone()),
        (EventType::Added, base + 1, pool_key("default-ipv4-ippool"))
    );
    assert_eq!(first.value, expected);
    let second = next_event(&mut watch).await.unwrap();
    assert_eq!(second.revision, after.revision);
    assert_eq!(second.key, pool_key("mine"));

    // A Calico tool's delete reaches the watch with the object as last stored.
    etcd.etcdctl(None, &["del", &key]);
    let deleted = next_event(&mut watch).await.unwrap();
    assert_eq!(deleted.event_type, EventType::Deleted);
    assert_eq!(deleted.value, expected);

    etcd.etcdctl(
        None,
        &[
            "put",
            &format!("{CALICO_PREFIX}ippools/broken"),
            "{not json",
        ],
    );
    assert!(matches!(
        ds.get(&pool_key("broken")).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        ds.list(&ListRequest::default()).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        next_event(&mut watch).await,
        Err(Error::Corrupt { .. })
    ));
}

// === Connections ===

#[tokio::test]
async fn open_connects_from_a_url() {
    let etcd = TestEtcd::start().await;
    let url = format!("etcd://{}", etcd.endpoints()[0]);
    let first = margay_datastore::open(&url).await.unwrap();
    assert_eq!(first.describe(), url);
    let stored = create(first.as_ref(), ippool("p1", "10.0.0.0/16")).await;
    drop(first);
    let again = margay_datastore::open(&format!("etcd+http://{}/", etcd.endpoints()[0]))
        .await
        .unwrap();
    assert_eq!(again.get(&stored.key).await.unwrap(), stored);
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = margay_datastore::EtcdOptions::new(&[format!("127.0.0.1:{port}")]);
    options.connect_timeout = Duration::from_secs(1);
    options.request_timeout = Duration::from_secs(2);
    match EtcdDatastore::connect(options).await {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
            assert!(msg.contains("Connection refused"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// The lab's etcd listens on a unix socket only: `etcd+unix://` reads, writes and watches
/// through it, and a watch follows etcd across a restart on the same socket.
#[tokio::test]
async fn a_unix_socket_etcd_is_used_and_followed_across_a_restart() {
    let mut etcd = UnixEtcd::start().await;
    let ds = margay_datastore::open(&etcd.url()).await.unwrap();
    assert_eq!(ds.describe(), etcd.url());
    let base = ds.revision().await.unwrap();
    let mut watch = ds.watch(base).await.unwrap();
    let p1 = create(ds.as_ref(), ippool("p1", "10.0.0.0/16")).await;
    assert_eq!(next_event(&mut watch).await.unwrap().revision, p1.revision);

    etcd.stop();
    assert!(matches!(ds.get(&p1.key).await, Err(Error::Unavailable(_))));
    etcd.restart().await;
    let p2 = commit_retrying(ds.as_ref(), ippool("p2", "10.1.0.0/16")).await;
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!((event.revision, event.key), (p2.revision, p2.key));
    assert_eq!(ds.get(&p1.key).await.unwrap(), p1);
}

#[tokio::test]
async fn a_missing_unix_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("etcd+unix://{}/etcd.sock:2379", dir.path().display());
    match margay_datastore::open(&url).await {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains(&url), "{msg}");
            assert!(msg.contains("No such file or directory"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Several endpoints: the client uses those that answer.
#[tokio::test]
async fn a_dead_endpoint_among_several_is_avoided() {
    let etcd = TestEtcd::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = margay_datastore::EtcdOptions::new(&[
        format!("127.0.0.1:{dead}"),
        etcd.endpoints()[0].clone(),
    ]);
    let ds = EtcdDatastore::connect(options).await.unwrap();
    for i in 0..10 {
        create(&ds, ippool(&format!("p{i}"), "10.0.0.0/16")).await;
    }
    assert_eq!(
        ds.list(&ListRequest::default()).await.unwrap().items.len(),
        10
    );
}

/// Part 5: TLS with client certificates made here; a client without a certificate, with one
/// from another CA, or trusting another CA is refused with a message that says why.
#[tokio::test]
async fn tls_with_client_certificates() {
    let etcd = TestEtcd::start_tls().await;
    let ds = etcd.connect().await;
    assert!(
        ds.describe().starts_with("etcd+https://127.0.0.1:"),
        "{}",
        ds.describe()
    );
    let stored = create(ds.as_ref(), ippool("p1", "10.0.0.0/16")).await;
    let base = stored.revision - 1;
    let mut watch = ds.watch(base).await.unwrap();
    assert_eq!(next_event(&mut watch).await.unwrap().key, stored.key);

    let tls = etcd.tls().clone();
    let with = |ca: &std::path::Path, cert: Option<(&std::path::Path, &std::path::Path)>| {
        let mut options = etcd.options();
        options.connect_timeout = Duration::from_secs(2);
        options.request_timeout = Duration::from_secs(3);
        options.tls = Some(margay_datastore::EtcdTls {
            ca_cert_file: Some(ca.to_owned()),
            cert_file: cert.map(|(c, _)| c.to_owned()),
            key_file: cert.map(|(_, k)| k.to_owned()),
        });
        options
    };
    // The right CA and certificate: works (and reads what the other handle wrote).
    let good = EtcdDatastore::connect(with(&tls.ca, Some((&tls.client_cert, &tls.client_key))))
        .await
        .unwrap();
    assert_eq!(good.get(&stored.key).await.unwrap(), stored);

    for (what, options, hint) in [
        (
            "no client certificate",
            with(&tls.ca, None),
            "ETCD_CERT_FILE",
        ),
        (
            "a certificate from another CA",
            with(&tls.ca, Some((&tls.stranger_cert, &tls.stranger_key))),
            "ETCD_CERT_FILE",
        ),
        (
            "trusting another CA",
            with(&tls.other_ca, Some((&tls.client_cert, &tls.client_key))),
            "ETCD_CA_CERT_FILE",
        ),
    ] {
        match EtcdDatastore::connect(options).await {
            Err(Error::Unavailable(msg)) => {
                assert!(msg.contains("127.0.0.1"), "{what}: {msg}");
                assert!(msg.contains(hint), "{what}: {msg}");
            }
            other => panic!("{what}: expected Unavailable, got {other:?}"),
        }
    }
    // Plain HTTP to a TLS port does not work either, and a missing file is named.
    let mut missing = with(&tls.ca, None);
    missing.tls.as_mut().unwrap().ca_cert_file = Some("/nonexistent/ca.pem".into());
    match EtcdDatastore::connect(missing).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("/nonexistent/ca.pem"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Part 5: user and password. With auth enabled, root logs in, a wrong password is a clear
/// error, no user is refused, and a user whose role grants exactly what docs/design/etcd.md
/// lists can do everything the backend needs.
#[tokio::test]
async fn user_and_password_auth() {
    let etcd = TestEtcd::start().await;
    etcd.etcdctl(None, &["user", "add", "root:rootpw"]);
    etcd.etcdctl(None, &["role", "add", "margay"]);
    etcd.etcdctl(
        None,
        &[
            "role",
            "grant-permission",
            "margay",
            "--prefix=true",
            "readwrite",
            CALICO_PREFIX,
        ],
    );
    etcd.etcdctl(
        None,
        &[
            "role",
            "grant-permission",
            "margay",
            "--prefix=true",
            "readwrite",
            MARGAY_PREFIX,
        ],
    );
    // The watch covers one key range from Calico's prefix to the end of Margay's.
    etcd.etcdctl(
        None,
        &[
            "role",
            "grant-permission",
            "margay",
            "read",
            CALICO_PREFIX,
            WATCH_RANGE_END,
        ],
    );
    etcd.etcdctl(None, &["user", "add", "agent:agentpw"]);
    etcd.etcdctl(None, &["user", "grant-role", "agent", "margay"]);
    // A role with the two prefixes but not the range between them: enough for everything but
    // the watch.
    etcd.etcdctl(None, &["role", "add", "narrow"]);
    for prefix in [CALICO_PREFIX, MARGAY_PREFIX] {
        etcd.etcdctl(
            None,
            &[
                "role",
                "grant-permission",
                "narrow",
                "--prefix=true",
                "readwrite",
                prefix,
            ],
        );
    }
    etcd.etcdctl(None, &["user", "add", "narrow:narrowpw"]);
    etcd.etcdctl(None, &["user", "grant-role", "narrow", "narrow"]);
    etcd.etcdctl(None, &["auth", "enable"]);

    let root = etcd.connect_as("root", "rootpw").await;
    assert!(
        root.describe().ends_with("(user root)"),
        "{}",
        root.describe()
    );
    let p1 = create(root.as_ref(), ippool("p1", "10.0.0.0/16")).await;

    let agent = etcd.connect_as("agent", "agentpw").await;
    assert_eq!(agent.get(&p1.key).await.unwrap(), p1);
    let mut watch = agent.watch(p1.revision - 1).await.unwrap();
    assert_eq!(next_event(&mut watch).await.unwrap().key, p1.key);
    let svc = create(
        agent.as_ref(),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default"}, "spec": {}}),
    )
    .await;
    assert_eq!(next_event(&mut watch).await.unwrap().key, svc.key);
    assert_eq!(
        agent
            .list(&ListRequest::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    root.compact(svc.revision).await.unwrap();

    let narrow = etcd.connect_as("narrow", "narrowpw").await;
    assert_eq!(narrow.get(&p1.key).await.unwrap(), p1);
    let mut watch = narrow.watch(svc.revision).await.unwrap();
    match next_event(&mut watch).await {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains("permission denied"), "{msg}");
            assert!(msg.contains(WATCH_RANGE_END), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    let mut options = etcd.options();
    options.credentials = Some(("root".to_owned(), "wrong".to_owned()));
    match EtcdDatastore::connect(options).await {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains("rejected the user \"root\""), "{msg}");
            assert!(msg.contains("ETCD_PASSWORD"), "{msg}");
            assert!(!msg.contains("wrong"), "the password is never shown: {msg}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    match EtcdDatastore::connect(etcd.options()).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("ETCD_USERNAME"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// === Watches across failures ===

/// Cut off from etcd while others write, a watch resumes where it stopped: every change once,
/// in order, and the consumer never hears of the outage.
#[tokio::test]
async fn a_watch_resumes_after_a_lost_connection() {
    let etcd = TestEtcd::start().await;
    let direct = etcd.connect().await;
    let proxy = Proxy::start(&etcd.endpoints()[0]).await;
    let mut options = margay_datastore::EtcdOptions::new(&[proxy.endpoint()]);
    options.watch_reconnect = Duration::from_secs(30);
    let via_proxy = EtcdDatastore::connect(options).await.unwrap();
    let base = direct.revision().await.unwrap();
    let mut watch = via_proxy.watch(base).await.unwrap();
    let p1 = create(direct.as_ref(), ippool("p1", "10.0.0.0/16")).await;
    assert_eq!(next_event(&mut watch).await.unwrap().revision, p1.revision);

    proxy.cut();
    let mut written = Vec::new();
    for i in 2..=4 {
        written.push(create(direct.as_ref(), ippool(&format!("p{i}"), "10.0.0.0/16")).await);
    }
    // Long enough for the watch to notice and retry a few times.
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    for stored in &written {
        let event = next_event(&mut watch).await.unwrap();
        assert_eq!(
            (event.event_type, event.revision, &event.key),
            (EventType::Added, stored.revision, &stored.key)
        );
    }
    let p5 = create(direct.as_ref(), ippool("p5", "10.0.0.0/16")).await;
    assert_eq!(next_event(&mut watch).await.unwrap().revision, p5.revision);
    assert!(proxy.accepted() >= 2, "the watch reconnected");
}

/// A watch resumed after its history was compacted says Compacted, and `sync` re-lists and
/// emits exactly what changed meanwhile.
#[tokio::test]
async fn sync_resyncs_when_the_lost_watch_was_compacted() {
    let etcd = TestEtcd::start().await;
    let direct = etcd.connect().await;
    let proxy = Proxy::start(&etcd.endpoints()[0]).await;
    let mut options = margay_datastore::EtcdOptions::new(&[proxy.endpoint()]);
    options.watch_reconnect = Duration::from_secs(30);
    let via_proxy: Arc<dyn Datastore> = Arc::new(EtcdDatastore::connect(options).await.unwrap());
    let a = create(direct.as_ref(), ippool("a", "10.0.0.0/16")).await;
    let b = create(direct.as_ref(), ippool("b", "10.1.0.0/16")).await;

    let mut updates = margay_datastore::sync::sync(Arc::clone(&via_proxy), vec![Kind::IPPool]);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, updates.next())
            .await
            .unwrap()
            .unwrap()
        {
            SyncUpdate::Status(SyncStatus::InSync) => break,
            update => seen.push(update),
        }
    }
    assert!(seen.contains(&SyncUpdate::Upsert(a.clone())));

    // A raw watch on the same path, to see the error itself.
    let mut watch = via_proxy.watch(b.revision).await.unwrap();
    proxy.cut();
    let c = create(direct.as_ref(), ippool("c", "10.2.0.0/16")).await;
    direct
        .commit(vec![Op::Delete {
            key: a.key.clone(),
            expected: None,
        }])
        .await
        .unwrap();
    let now = direct.revision().await.unwrap();
    direct.compact(now).await.unwrap();
    proxy.heal();

    match next_event(&mut watch).await {
        Err(Error::Compacted { requested, oldest }) => {
            assert_eq!(requested, b.revision);
            assert!(oldest >= c.revision, "oldest {oldest}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut after = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, updates.next())
            .await
            .unwrap()
            .unwrap()
        {
            SyncUpdate::Status(SyncStatus::InSync) => break,
            SyncUpdate::Progress(_) => {}
            update => after.push(update),
        }
    }
    assert_eq!(
        after,
        vec![
            SyncUpdate::Status(SyncStatus::Resyncing),
            SyncUpdate::Upsert(c),
            SyncUpdate::Remove(a.key.clone()),
        ]
    );
}

/// An outage longer than `watch_reconnect` ends the watch with Unavailable, so that its
/// consumer stops claiming to be in sync.
#[tokio::test]
async fn a_long_outage_ends_the_watch_with_unavailable() {
    let etcd = TestEtcd::start().await;
    let proxy = Proxy::start(&etcd.endpoints()[0]).await;
    let mut options = margay_datastore::EtcdOptions::new(&[proxy.endpoint()]);
    options.watch_reconnect = Duration::from_secs(1);
    options.request_timeout = Duration::from_secs(1);
    let ds = EtcdDatastore::connect(options).await.unwrap();
    let mut watch = ds.watch(ds.revision().await.unwrap()).await.unwrap();
    proxy.cut();
    match next_event(&mut watch).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("could not resume"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, watch.next()).await.unwrap();
    assert!(end.is_none(), "the stream ends after Unavailable: {end:?}");
    // The handle itself recovers once etcd is reachable again.
    proxy.heal();
    create(&ds, ippool("p1", "10.0.0.0/16")).await;
}

/// etcd itself restarting (same data, same port) is survived by watches and handles alike.
#[tokio::test]
async fn a_restarted_etcd_is_followed_again() {
    let mut etcd = TestEtcd::start().await;
    let ds = etcd.connect().await;
    let base = ds.revision().await.unwrap();
    let mut watch = ds.watch(base).await.unwrap();
    let p1 = create(ds.as_ref(), ippool("p1", "10.0.0.0/16")).await;
    assert_eq!(next_event(&mut watch).await.unwrap().revision, p1.revision);

    etcd.stop(0);
    assert!(matches!(ds.get(&p1.key).await, Err(Error::Unavailable(_))));
    etcd.restart(0).await;
    let p2 = commit_retrying(ds.as_ref(), ippool("p2", "10.1.0.0/16")).await;
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!((event.revision, event.key), (p2.revision, p2.key));
    assert_eq!(ds.get(&p1.key).await.unwrap(), p1);
}

/// Creates `value`, retrying while the handle reconnects; what a client does after an
/// Unavailable, reading back before retrying since a lost commit may have been applied.
async fn commit_retrying(ds: &dyn Datastore, value: Value) -> Stored {
    let key = Key::of(Kind::IPPool, &value);
    for _ in 0..100 {
        match ds
            .commit(vec![Op::Create {
                key: key.clone(),
                value: value.clone(),
            }])
            .await
        {
            Ok(mut stored) => return stored.remove(0),
            Err(Error::Unavailable(_)) => {
                if let Ok(stored) = ds.get(&key).await {
                    return stored;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("commit failed: {e}"),
        }
    }
    panic!("the commit never went through")
}

/// A three-member cluster loses each member in turn: commits continue through the others and
/// one watch follows every change, whichever member served it.
#[tokio::test]
async fn a_watch_survives_losing_cluster_members() {
    let mut etcd = TestEtcd::cluster(3).await;
    let ds = etcd.connect().await;
    let base = ds.revision().await.unwrap();
    let mut watch = ds.watch(base).await.unwrap();
    let mut expected: Vec<Revision> = Vec::new();
    for member in 0..3 {
        etcd.stop(member);
        let stored =
            commit_retrying(ds.as_ref(), ippool(&format!("p{member}"), "10.0.0.0/16")).await;
        expected.push(stored.revision);
        let event = next_event(&mut watch).await.unwrap();
        assert_eq!(
            event.revision, stored.revision,
            "after losing member {member}"
        );
        etcd.restart(member).await;
    }
    let last = commit_retrying(ds.as_ref(), ippool("last", "10.0.0.0/16")).await;
    assert_eq!(
        next_event(&mut watch).await.unwrap().revision,
        last.revision
    );
    assert_eq!(
        ds.list(&ListRequest::default()).await.unwrap().items.len(),
        4
    );
}

/// A bulk write asking for batches far above etcd's `--max-txn-ops` (128 by default) is split
/// into commits etcd takes: 300 Services and their EndpointSlices (600 objects) with a requested
/// batch of 5,000, as the benchmarks and scale tests ask for, and removed again in batches of the
/// same bound. Before, the first commit was refused ("too many operations in txn request").
#[tokio::test]
async fn bulk_writes_fit_etcds_operations_per_commit() {
    let etcd = TestEtcd::start().await;
    let client = Client::new(etcd.connect().await);
    client.bootstrap().await.unwrap();
    assert_eq!(client.commit_batch(5_000), 120);
    let mut manifests =
        vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bulk"}})];
    for i in 0..300 {
        let name = format!("svc-{i}");
        manifests.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bulk"},
            "spec": {"ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}
        }));
        manifests.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "bulk",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.244.1.{}", i % 250 + 1)]}],
            "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]
        }));
    }
    let written = client
        .write_in_batches(manifests, "bulk", WriteMode::Create, 5_000)
        .await
        .unwrap();
    assert_eq!(written, 601);
    let services = client
        .list(Kind::Service, Some("bulk"))
        .await
        .unwrap()
        .items;
    assert_eq!(services.len(), 300);
    let mut ips: Vec<&str> = services
        .iter()
        .filter_map(|s| s.value["spec"]["clusterIP"].as_str())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    assert_eq!(ips.len(), 300, "every Service has its own ClusterIP");
    let keys: Vec<(Key, Option<u64>)> = services.into_iter().map(|s| (s.key, None)).collect();
    for batch in keys.chunks(client.commit_batch(5_000)) {
        client.delete(batch.to_vec(), true).await.unwrap();
    }
    assert!(
        client
            .list(Kind::Service, Some("bulk"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
