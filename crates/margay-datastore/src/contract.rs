//! The datastore contract suite: the behaviour of [`crate::backend`] written down as checks that
//! every backend must pass, so that the SQLite backend and a future etcd backend cannot drift
//! apart.
//!
//! Each check takes a [`Fixture`]: two independent handles on one fresh, empty store (two
//! connections, as two processes would have), so that visibility between handles is checked too.
//! Revisions are counted from the empty store's revision, [`Fixture::base`]: 0 for SQLite, 1 for
//! etcd (which counts its own bootstrap), so that every backend is held to the same "+1 per
//! commit" without shifting the revisions it reports.
//!
//! To hold a backend to the contract, give its tests a function returning a fixture and either
//! expand [`datastore_contract_tests!`](crate::datastore_contract_tests) (one `#[test]` per check)
//! or call [`run_all`] from one test:
//!
//! ```ignore
//! async fn fixture() -> Fixture {
//!     let dir = tempfile::tempdir().unwrap();
//!     let path = dir.path().join("margay.db");
//!     let first = Arc::new(SqliteDatastore::open(&path).unwrap());
//!     let second = Arc::new(SqliteDatastore::open(&path).unwrap());
//!     Fixture::new(first, second, dir)
//! }
//!
//! mod contract {
//!     margay_datastore::datastore_contract_tests!(super::fixture);
//! }
//! ```
//!
//! The checks panic on failure, like any test.

#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use margay_api::Kind;
use serde_json::{Value, json};

use crate::backend::{
    Datastore, Error, EventType, Key, ListRequest, Listing, Op, Revision, Stored, WatchEvent,
    WatchStream,
};
use crate::sync::{SyncStatus, SyncStream, SyncUpdate, sync};

/// Two handles on one fresh, empty store, plus whatever keeps the store alive (a temporary
/// directory, a test etcd) until the check is over.
pub struct Fixture {
    pub first: Arc<dyn Datastore>,
    pub second: Arc<dyn Datastore>,
    /// The revision of the empty store, from which the checks count: 0 for SQLite, 1 for a
    /// fresh etcd (etcd counts its own bootstrap as revision 1, and Margay keeps etcd's
    /// revisions unshifted so that a resourceVersion means the same to calicoctl and to
    /// Margay). Every check expects exactly the same revisions relative to it.
    pub base: Revision,
    _guard: Box<dyn Any + Send>,
}

impl Fixture {
    /// `first` and `second` must be independent handles (separate connections) on the same
    /// empty store; `guard` is dropped after both.
    pub fn new(
        first: Arc<dyn Datastore>,
        second: Arc<dyn Datastore>,
        guard: impl Any + Send,
    ) -> Fixture {
        Fixture {
            first,
            second,
            base: 0,
            _guard: Box::new(guard),
        }
    }

    /// For a backend whose empty store is at revision `base` rather than 0 (see
    /// [`Fixture::base`]).
    pub fn with_base_revision(mut self, base: Revision) -> Fixture {
        self.base = base;
        self
    }
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("first", &self.first)
            .field("second", &self.second)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// One check of the suite.
pub type Check = fn(Fixture) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        /// Every check, by name, in the order [`run_all`] runs them.
        pub const CHECKS: &[(&str, Check)] = &[$((stringify!($name), |f| Box::pin($name(f)))),*];
    };
}

checks![
    create_then_get,
    create_twice_is_already_exists,
    missing_objects_are_not_found,
    update_is_compare_and_swap,
    delete_returns_the_last_value_and_checks_the_revision,
    failed_commit_writes_nothing,
    revisions_advance_by_one_per_commit,
    metadata_is_set_on_create_and_kept_on_update,
    noop_update_keeps_the_revision_and_emits_no_event,
    duplicate_keys_in_one_commit_are_invalid,
    list_is_an_ordered_filtered_snapshot,
    list_never_sees_half_a_commit,
    watch_from_zero_replays_everything_in_order,
    watch_from_a_revision_continues_without_gaps_or_duplicates,
    watch_sees_writes_through_another_handle,
    watch_from_a_compacted_revision_fails,
    watch_marks_the_last_change_of_each_commit,
    sync_lists_then_follows,
    sync_waits_until_the_store_can_be_listed,
    sync_resync_emits_only_real_changes,
    sync_reports_progress_after_whole_commits,
    concurrent_commits_get_distinct_revisions,
    concurrent_compare_and_swap_loses_no_update,
];

/// How long a check may wait for an event before failing instead of hanging.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a whole check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs every check, each against a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    for (name, check) in CHECKS {
        eprintln!("datastore contract: {name}");
        tokio::time::timeout(CHECK_TIMEOUT, check(make().await))
            .await
            .unwrap_or_else(|_| panic!("contract check {name} timed out"));
    }
}

/// Runs the check called `name` against a fresh store from `make`, on a runtime of its own (so
/// that the calling test crate needs no tokio of its own). Used by
/// [`datastore_contract_tests!`](crate::datastore_contract_tests).
pub fn run_one<F, Fut>(name: &str, make: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Fixture>,
{
    let check = CHECKS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, check)| *check)
        .unwrap_or_else(|| panic!("there is no datastore contract check called {name}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start a tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(CHECK_TIMEOUT, check(make().await))
            .await
            .unwrap_or_else(|_| panic!("contract check {name} timed out"));
    });
}

/// Fails unless `generated` names exactly the checks of [`CHECKS`]; keeps
/// [`datastore_contract_tests!`](crate::datastore_contract_tests) complete.
pub fn assert_complete(generated: &[&str]) {
    let generated: BTreeSet<&str> = generated.iter().copied().collect();
    let known: BTreeSet<&str> = CHECKS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        generated, known,
        "datastore_contract_tests! and contract::CHECKS list different checks"
    );
}

/// Expands to one `#[test]` per contract check, each against a fresh fixture from `$make`
/// (an `async fn() -> Fixture` or a closure returning such a future).
#[macro_export]
macro_rules! datastore_contract_tests {
    ($make:expr) => {
        $crate::datastore_contract_tests!(@tests $make;
            create_then_get,
            create_twice_is_already_exists,
            missing_objects_are_not_found,
            update_is_compare_and_swap,
            delete_returns_the_last_value_and_checks_the_revision,
            failed_commit_writes_nothing,
            revisions_advance_by_one_per_commit,
            metadata_is_set_on_create_and_kept_on_update,
            noop_update_keeps_the_revision_and_emits_no_event,
            duplicate_keys_in_one_commit_are_invalid,
            list_is_an_ordered_filtered_snapshot,
            list_never_sees_half_a_commit,
            watch_from_zero_replays_everything_in_order,
            watch_from_a_revision_continues_without_gaps_or_duplicates,
            watch_sees_writes_through_another_handle,
            watch_from_a_compacted_revision_fails,
            watch_marks_the_last_change_of_each_commit,
            sync_lists_then_follows,
            sync_waits_until_the_store_can_be_listed,
            sync_resync_emits_only_real_changes,
            sync_reports_progress_after_whole_commits,
            concurrent_commits_get_distinct_revisions,
            concurrent_compare_and_swap_loses_no_update,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::contract::run_one(stringify!($name), $make);
            }
        )*

        #[test]
        fn contract_suite_is_complete() {
            $crate::contract::assert_complete(&[$(stringify!($name)),*]);
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Objects shaped like real manifests.

fn ippool(name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {
            "cidr": cidr,
            "blockSize": 26,
            "ipipMode": "Never",
            "vxlanMode": "CrossSubnet",
            "natOutgoing": true,
            "nodeSelector": "all()"
        }
    })
}

fn service(namespace: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]
        }
    })
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"bgp": {"ipv4Address": "192.168.1.10/24"}}
    })
}

fn felix_configuration() -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {"bpfEnabled": true, "logSeverityScreen": "Info"}
    })
}

fn counter(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "kube-system"},
        "data": {"count": "0"}
    })
}

fn kind_of(value: &Value) -> Kind {
    Kind::from_manifest(
        value["apiVersion"].as_str().unwrap(),
        value["kind"].as_str().unwrap(),
    )
    .unwrap()
}

fn key_of(value: &Value) -> Key {
    Key::of(kind_of(value), value)
}

fn pool_key(name: &str) -> Key {
    Key::new(Kind::IPPool, None, name)
}

fn create_op(value: Value) -> Op {
    Op::Create {
        key: key_of(&value),
        value,
    }
}

fn update_op(stored: &Stored, value: Value) -> Op {
    Op::Update {
        key: stored.key.clone(),
        value,
        expected: Some(stored.revision),
    }
}

async fn create(ds: &Arc<dyn Datastore>, value: Value) -> Stored {
    one(ds.commit(vec![create_op(value)]).await.unwrap())
}

/// Changes `stored` with `change` and writes it back, expecting its revision.
async fn update(
    ds: &Arc<dyn Datastore>,
    stored: &Stored,
    change: impl FnOnce(&mut Value),
) -> Stored {
    let mut value = stored.value.clone();
    change(&mut value);
    one(ds.commit(vec![update_op(stored, value)]).await.unwrap())
}

async fn delete(ds: &Arc<dyn Datastore>, stored: &Stored) -> Stored {
    one(ds
        .commit(vec![Op::Delete {
            key: stored.key.clone(),
            expected: Some(stored.revision),
        }])
        .await
        .unwrap())
}

fn one(mut results: Vec<Stored>) -> Stored {
    assert_eq!(results.len(), 1, "one op, one result: {results:?}");
    results.remove(0)
}

fn resource_version(value: &Value) -> Revision {
    value["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no resourceVersion in {value}"))
        .parse()
        .unwrap()
}

/// The document without the fields the store sets, to compare with what was written.
fn as_written(value: &Value) -> Value {
    let mut value = value.clone();
    let meta = value["metadata"].as_object_mut().unwrap();
    for field in ["uid", "creationTimestamp", "resourceVersion"] {
        meta.shift_remove(field);
    }
    value
}

/// Checks what every stored object must satisfy.
fn assert_consistent(stored: &Stored) {
    assert_eq!(
        resource_version(&stored.value),
        stored.revision,
        "resourceVersion is the ModRevision: {stored:?}"
    );
    assert_eq!(key_of(&stored.value), stored.key);
}

/// The next event, with `commit_complete` cleared: the expectations below are about the
/// changes; [`watch_marks_the_last_change_of_each_commit`] checks the flag.
async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    let mut event = next_marked_event(stream).await;
    event.commit_complete = false;
    event
}

async fn next_marked_event(stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
    }
}

async fn next_events(stream: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(next_event(stream).await);
    }
    events
}

fn event(event_type: EventType, revision: Revision, stored: &Stored) -> WatchEvent {
    WatchEvent {
        event_type,
        revision,
        key: stored.key.clone(),
        value: stored.value.clone(),
        commit_complete: false,
    }
}

/// The next update other than progress reports (checked on their own by
/// `sync_reports_progress_after_whole_commits`).
async fn next_update(stream: &mut SyncStream) -> SyncUpdate {
    loop {
        match next_update_or_progress(stream).await {
            SyncUpdate::Progress(_) => continue,
            update => return update,
        }
    }
}

async fn next_update_or_progress(stream: &mut SyncStream) -> SyncUpdate {
    tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no sync update within {EVENT_TIMEOUT:?}"))
        .expect("a sync stream never ends")
}

/// Reads updates up to and including the next `InSync`; fails on any other status.
async fn updates_until_in_sync(stream: &mut SyncStream) -> Vec<SyncUpdate> {
    let mut updates = Vec::new();
    loop {
        match next_update(stream).await {
            SyncUpdate::Status(SyncStatus::InSync) => return updates,
            SyncUpdate::Status(status) => panic!("unexpected {status:?} after {updates:?}"),
            update => updates.push(update),
        }
    }
}

fn upserts_and_removes(updates: &[SyncUpdate]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut upserts = BTreeSet::new();
    let mut removes = BTreeSet::new();
    for update in updates {
        match update {
            SyncUpdate::Upsert(stored) => {
                assert_consistent(stored);
                upserts.insert(stored.key.to_string());
            }
            SyncUpdate::Remove(key) => {
                removes.insert(key.to_string());
            }
            SyncUpdate::Status(status) => panic!("unexpected {status:?}"),
            SyncUpdate::Progress(_) => {}
        }
    }
    (upserts, removes)
}

fn names(keys: &[&Key]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// A created object reads back as written plus the metadata the store owns.
pub async fn create_then_get(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    assert_eq!(
        ds.revision().await.unwrap(),
        base,
        "a fresh store is at its base revision (0 in SQLite)"
    );

    let input = ippool("default-ipv4-ippool", "192.168.0.0/16");
    let created = create(ds, input.clone()).await;
    assert_eq!(created.revision, base + 1);
    assert_consistent(&created);
    assert_eq!(as_written(&created.value), input);
    assert_eq!(ds.get(&created.key).await.unwrap(), created);
    assert_eq!(f.second.get(&created.key).await.unwrap(), created);

    // Namespaced objects: the namespace is part of the key.
    let web = create(ds, service("default", "web", 80)).await;
    let other = create(ds, service("kube-system", "web", 443)).await;
    assert_ne!(web.key, other.key);
    assert_eq!(
        ds.get(&Key::new(Kind::Service, Some("default"), "web"))
            .await
            .unwrap(),
        web
    );
    assert_eq!(
        ds.get(&Key::new(Kind::Service, Some("kube-system"), "web"))
            .await
            .unwrap(),
        other
    );
    assert_eq!(ds.revision().await.unwrap(), base + 3);
}

pub async fn create_twice_is_already_exists(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let created = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let again = ds
        .commit(vec![create_op(ippool("p1", "10.1.0.0/16"))])
        .await;
    assert_eq!(again, Err(Error::AlreadyExists(created.key.clone())));
    let again = f
        .second
        .commit(vec![create_op(ippool("p1", "10.1.0.0/16"))])
        .await;
    assert_eq!(again, Err(Error::AlreadyExists(created.key.clone())));
    assert_eq!(ds.get(&created.key).await.unwrap(), created);
    assert_eq!(ds.revision().await.unwrap(), base + 1);
}

pub async fn missing_objects_are_not_found(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let key = pool_key("missing");
    assert_eq!(ds.get(&key).await, Err(Error::NotFound(key.clone())));
    let update = Op::Update {
        key: key.clone(),
        value: ippool("missing", "10.0.0.0/16"),
        expected: None,
    };
    assert_eq!(
        ds.commit(vec![update]).await,
        Err(Error::NotFound(key.clone()))
    );
    let delete = Op::Delete {
        key: key.clone(),
        expected: None,
    };
    assert_eq!(
        ds.commit(vec![delete]).await,
        Err(Error::NotFound(key.clone()))
    );
    // A namespaced object is not found in another namespace.
    create(ds, service("default", "web", 80)).await;
    let elsewhere = Key::new(Kind::Service, Some("other"), "web");
    assert_eq!(
        ds.get(&elsewhere).await,
        Err(Error::NotFound(elsewhere.clone()))
    );
    assert_eq!(ds.revision().await.unwrap(), base + 1);
}

/// An update that expects a stale revision changes nothing.
pub async fn update_is_compare_and_swap(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let v1 = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let v2 = update(ds, &v1, |v| v["spec"]["natOutgoing"] = json!(false)).await;
    assert_eq!(v2.revision, base + 2);
    assert_consistent(&v2);
    assert_eq!(v2.value["spec"]["natOutgoing"], json!(false));

    // A writer that read v1 loses.
    let mut stale = v1.value.clone();
    stale["spec"]["blockSize"] = json!(28);
    let result = f.second.commit(vec![update_op(&v1, stale)]).await;
    assert_eq!(
        result,
        Err(Error::Conflict {
            key: v1.key.clone(),
            expected: base + 1,
            actual: base + 2
        })
    );
    assert_eq!(ds.get(&v1.key).await.unwrap(), v2);
    assert_eq!(ds.revision().await.unwrap(), base + 2);

    // Without an expected revision the update is unconditional.
    let mut value = v1.value.clone();
    value["spec"]["blockSize"] = json!(28);
    let v3 = one(f
        .second
        .commit(vec![Op::Update {
            key: v1.key.clone(),
            value,
            expected: None,
        }])
        .await
        .unwrap());
    assert_eq!(v3.revision, base + 3);
    assert_eq!(v3.value["spec"]["blockSize"], json!(28));
    assert_eq!(ds.get(&v1.key).await.unwrap(), v3);
}

pub async fn delete_returns_the_last_value_and_checks_the_revision(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let v1 = create(ds, service("default", "web", 80)).await;
    let v2 = update(ds, &v1, |v| v["spec"]["ports"][0]["port"] = json!(8080)).await;

    let stale = ds
        .commit(vec![Op::Delete {
            key: v1.key.clone(),
            expected: Some(base + 1),
        }])
        .await;
    assert_eq!(
        stale,
        Err(Error::Conflict {
            key: v1.key.clone(),
            expected: base + 1,
            actual: base + 2
        })
    );
    assert_eq!(ds.get(&v1.key).await.unwrap(), v2);

    let deleted = delete(&f.second, &v2).await;
    assert_eq!(deleted, v2, "a delete returns the object as last stored");
    assert_eq!(ds.get(&v1.key).await, Err(Error::NotFound(v1.key.clone())));
    assert_eq!(ds.revision().await.unwrap(), base + 3);

    // The name can be used again, by a new object.
    let again = create(ds, service("default", "web", 80)).await;
    assert_eq!(again.revision, base + 4);
    assert_ne!(
        again.value["metadata"]["uid"], v1.value["metadata"]["uid"],
        "a re-created object is a new object"
    );

    // Unconditional delete.
    let gone = one(ds
        .commit(vec![Op::Delete {
            key: again.key.clone(),
            expected: None,
        }])
        .await
        .unwrap());
    assert_eq!(gone, again);
}

/// A commit whose last op fails writes none of its ops and does not advance the revision.
pub async fn failed_commit_writes_nothing(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let p1 = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let mut changed = p1.value.clone();
    changed["spec"]["cidr"] = json!("10.9.0.0/16");

    let missing = pool_key("p3");
    let result = ds
        .commit(vec![
            create_op(ippool("p2", "10.2.0.0/16")),
            update_op(&p1, changed.clone()),
            Op::Delete {
                key: missing.clone(),
                expected: None,
            },
        ])
        .await;
    assert_eq!(result, Err(Error::NotFound(missing)));

    let result = ds
        .commit(vec![
            create_op(ippool("p2", "10.2.0.0/16")),
            create_op(ippool("p1", "10.1.0.0/16")),
        ])
        .await;
    assert_eq!(result, Err(Error::AlreadyExists(p1.key.clone())));

    let result = ds
        .commit(vec![
            create_op(ippool("p2", "10.2.0.0/16")),
            Op::Update {
                key: p1.key.clone(),
                value: changed,
                expected: Some(base + 7),
            },
        ])
        .await;
    assert_eq!(
        result,
        Err(Error::Conflict {
            key: p1.key.clone(),
            expected: base + 7,
            actual: base + 1
        })
    );

    assert_eq!(ds.revision().await.unwrap(), base + 1);
    assert_eq!(ds.get(&p1.key).await.unwrap(), p1);
    assert_eq!(
        ds.get(&pool_key("p2")).await,
        Err(Error::NotFound(pool_key("p2")))
    );

    // Nothing reached the history either: the next commit's event follows p1's directly.
    let mut watch = ds.watch(base).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        event(EventType::Added, base + 1, &p1)
    );
    let p2 = create(&f.second, ippool("p2", "10.2.0.0/16")).await;
    assert_eq!(p2.revision, base + 2);
    assert_eq!(
        next_event(&mut watch).await,
        event(EventType::Added, base + 2, &p2)
    );
}

/// One revision per commit, shared by all the ops of the commit.
pub async fn revisions_advance_by_one_per_commit(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    assert_eq!(
        ds.commit(vec![]).await.unwrap(),
        vec![],
        "an empty commit writes nothing"
    );
    assert_eq!(ds.revision().await.unwrap(), base);

    let a = create(ds, ippool("a", "10.0.0.0/16")).await;
    assert_eq!(
        (a.revision, ds.revision().await.unwrap()),
        (base + 1, base + 1)
    );

    let batch = f
        .second
        .commit(vec![
            create_op(ippool("b", "10.1.0.0/16")),
            create_op(service("default", "web", 80)),
            create_op(felix_configuration()),
        ])
        .await
        .unwrap();
    assert_eq!(batch.len(), 3);
    for stored in &batch {
        assert_eq!(
            stored.revision,
            base + 2,
            "every op of a commit has the commit's revision"
        );
        assert_consistent(stored);
    }
    assert_eq!(ds.revision().await.unwrap(), base + 2);

    let a2 = update(ds, &a, |v| v["spec"]["natOutgoing"] = json!(false)).await;
    assert_eq!(a2.revision, base + 3);
    let results = ds
        .commit(vec![
            Op::Delete {
                key: batch[0].key.clone(),
                expected: Some(base + 2),
            },
            update_op(&a2, ippool("a", "10.5.0.0/16")),
        ])
        .await
        .unwrap();
    assert_eq!(
        results[0], batch[0],
        "a delete returns the last stored object"
    );
    assert_eq!(results[1].revision, base + 4);
    assert_eq!(f.second.revision().await.unwrap(), base + 4);

    // Every listed object's resourceVersion is its ModRevision.
    let listing = f.second.list(&ListRequest::default()).await.unwrap();
    assert_eq!(listing.revision, base + 4);
    let revisions: Vec<(String, Revision)> = listing
        .items
        .iter()
        .map(|s| {
            assert_consistent(s);
            (s.key.name.clone(), s.revision)
        })
        .collect();
    assert_eq!(
        revisions,
        vec![
            ("default".to_owned(), base + 2),
            ("a".to_owned(), base + 4),
            ("web".to_owned(), base + 2)
        ]
    );
}

/// The store owns `uid`, `creationTimestamp` and `resourceVersion`.
pub async fn metadata_is_set_on_create_and_kept_on_update(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let created = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let meta = &created.value["metadata"];
    let uid = meta["uid"].as_str().expect("create sets metadata.uid");
    assert_eq!(uid.len(), 36, "a UUID: {uid}");
    assert_eq!(uid.matches('-').count(), 4, "a UUID: {uid}");
    let timestamp = meta["creationTimestamp"]
        .as_str()
        .expect("create sets metadata.creationTimestamp");
    let parsed = chrono::DateTime::parse_from_rfc3339(timestamp)
        .unwrap_or_else(|e| panic!("{timestamp} is not RFC 3339: {e}"));
    assert_eq!(
        timestamp,
        parsed
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "UTC, whole seconds, like 2022-12-08T21:45:45Z"
    );
    let age = chrono::Utc::now().signed_duration_since(parsed);
    assert!(age.num_seconds().abs() < 300, "{timestamp} is not now");

    // An update cannot change them, nor remove them.
    let mut value = created.value.clone();
    value["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000000");
    value["metadata"]["creationTimestamp"] = json!("2001-01-01T00:00:00Z");
    value["spec"]["natOutgoing"] = json!(false);
    let updated = one(ds.commit(vec![update_op(&created, value)]).await.unwrap());
    assert_eq!(
        updated.value["metadata"]["uid"],
        created.value["metadata"]["uid"]
    );
    assert_eq!(
        updated.value["metadata"]["creationTimestamp"],
        created.value["metadata"]["creationTimestamp"]
    );
    let mut value = as_written(&updated.value);
    value["spec"]["natOutgoing"] = json!(true);
    let updated = one(ds.commit(vec![update_op(&updated, value)]).await.unwrap());
    assert_eq!(
        updated.value["metadata"]["uid"],
        created.value["metadata"]["uid"]
    );
    assert_eq!(
        updated.value["metadata"]["creationTimestamp"],
        created.value["metadata"]["creationTimestamp"]
    );

    // Values given on create are kept (objects imported from another cluster keep their
    // identity); a resourceVersion in the document is never stored.
    let mut imported = service("default", "web", 80);
    imported["metadata"]["uid"] = json!("6e1a41b6-3c5d-4a5e-9f7a-1b2c3d4e5f60");
    imported["metadata"]["creationTimestamp"] = json!("2022-12-08T21:45:45Z");
    imported["metadata"]["resourceVersion"] = json!("12345");
    let stored = create(&f.second, imported).await;
    assert_eq!(
        stored.value["metadata"]["uid"],
        json!("6e1a41b6-3c5d-4a5e-9f7a-1b2c3d4e5f60")
    );
    assert_eq!(
        stored.value["metadata"]["creationTimestamp"],
        json!("2022-12-08T21:45:45Z")
    );
    assert_eq!(stored.revision, base + 4);
    assert_consistent(&stored);
    assert_consistent(&ds.get(&stored.key).await.unwrap());
}

/// Writing back what is stored is not a change.
pub async fn noop_update_keeps_the_revision_and_emits_no_event(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let created = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let mut watch = ds.watch(created.revision).await.unwrap();

    // As read (with resourceVersion and the server-set fields) ...
    let same = one(ds
        .commit(vec![update_op(&created, created.value.clone())])
        .await
        .unwrap());
    assert_eq!(same, created);
    // ... and as written originally.
    let same = one(f
        .second
        .commit(vec![update_op(&created, as_written(&created.value))])
        .await
        .unwrap());
    assert_eq!(same, created);
    // A no-op op inside a commit that changes something else does not change its object.
    let results = ds
        .commit(vec![
            update_op(&created, created.value.clone()),
            create_op(ippool("p2", "10.1.0.0/16")),
        ])
        .await
        .unwrap();
    assert_eq!(results[0], created);
    assert_eq!(results[1].revision, base + 2);
    assert_eq!(ds.revision().await.unwrap(), base + 2);

    // The watch skips straight to the real change.
    let next = next_event(&mut watch).await;
    assert_eq!(next, event(EventType::Added, base + 2, &results[1]));

    // A no-op with a stale revision is still a conflict.
    let changed = update(ds, &created, |v| v["spec"]["blockSize"] = json!(27)).await;
    let stale = ds
        .commit(vec![update_op(&created, changed.value.clone())])
        .await;
    assert_eq!(
        stale,
        Err(Error::Conflict {
            key: created.key.clone(),
            expected: base + 1,
            actual: base + 3
        })
    );
    assert_eq!(
        next_event(&mut watch).await,
        event(EventType::Modified, base + 3, &changed)
    );
}

/// Two ops on one key in one commit are refused, as etcd refuses them.
pub async fn duplicate_keys_in_one_commit_are_invalid(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let result = ds
        .commit(vec![
            create_op(ippool("p1", "10.0.0.0/16")),
            create_op(ippool("p1", "10.0.0.0/16")),
        ])
        .await;
    assert!(matches!(result, Err(Error::Invalid(_))), "{result:?}");
    let result = ds
        .commit(vec![
            create_op(ippool("p1", "10.0.0.0/16")),
            Op::Delete {
                key: pool_key("p1"),
                expected: None,
            },
        ])
        .await;
    assert!(matches!(result, Err(Error::Invalid(_))), "{result:?}");
    assert_eq!(ds.revision().await.unwrap(), base);
}

/// Listings are ordered by key, filtered by kind and namespace, and carry their revision.
pub async fn list_is_an_ordered_filtered_snapshot(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    assert_eq!(
        ds.list(&ListRequest::default()).await.unwrap(),
        Listing {
            items: vec![],
            revision: base
        }
    );
    for value in [
        ippool("pool-b", "10.1.0.0/16"),
        service("kube-system", "kube-dns", 53),
        ippool("pool-a", "10.0.0.0/16"),
        service("default", "web", 80),
        service("default", "api", 443),
        node("node-1"),
        felix_configuration(),
        ippool("pool-c", "10.2.0.0/16"),
    ] {
        create(&f.second, value).await;
    }
    let gone = create(ds, ippool("pool-gone", "10.3.0.0/16")).await;
    delete(ds, &gone).await;

    let all = ds.list(&ListRequest::default()).await.unwrap();
    assert_eq!(all.revision, base + 10);
    assert_eq!(all.revision, ds.revision().await.unwrap());
    let keys: Vec<String> = all.items.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(
        keys,
        vec![
            "FelixConfiguration default",
            "Node node-1",
            "IPPool pool-a",
            "IPPool pool-b",
            "IPPool pool-c",
            "Service default/api",
            "Service default/web",
            "Service kube-system/kube-dns",
        ],
        "ordered by key"
    );
    for item in &all.items {
        assert_consistent(item);
        assert_eq!(&ds.get(&item.key).await.unwrap(), item);
    }

    let names_of = |listing: &Listing| -> Vec<String> {
        listing.items.iter().map(|s| s.key.to_string()).collect()
    };
    let pools = ds
        .list(&ListRequest {
            kind: Some(Kind::IPPool),
            namespace: None,
        })
        .await
        .unwrap();
    assert_eq!(
        names_of(&pools),
        vec!["IPPool pool-a", "IPPool pool-b", "IPPool pool-c"]
    );
    assert_eq!(pools.revision, base + 10);

    let default_services = ds
        .list(&ListRequest {
            kind: Some(Kind::Service),
            namespace: Some("default".to_owned()),
        })
        .await
        .unwrap();
    assert_eq!(
        names_of(&default_services),
        vec!["Service default/api", "Service default/web"]
    );
    let everything_in_kube_system = ds
        .list(&ListRequest {
            kind: None,
            namespace: Some("kube-system".to_owned()),
        })
        .await
        .unwrap();
    assert_eq!(
        names_of(&everything_in_kube_system),
        vec!["Service kube-system/kube-dns"]
    );
    let nothing = ds
        .list(&ListRequest {
            kind: Some(Kind::Pod),
            namespace: None,
        })
        .await
        .unwrap();
    assert_eq!(
        nothing,
        Listing {
            items: vec![],
            revision: base + 10
        }
    );
}

/// A listing taken while another handle commits pairs of objects never holds half a pair.
pub async fn list_never_sees_half_a_commit(f: Fixture) {
    let base = f.base;
    let writer = Arc::clone(&f.second);
    let pair = |i: u64| {
        let mut a = counter("pair-a");
        let mut b = counter("pair-b");
        a["data"]["count"] = json!(i.to_string());
        b["data"]["count"] = json!(i.to_string());
        (a, b)
    };
    let (a, b) = pair(0);
    writer
        .commit(vec![create_op(a), create_op(b)])
        .await
        .unwrap();
    let writes = tokio::spawn(async move {
        for i in 1..=40 {
            let (a, b) = pair(i);
            writer
                .commit(vec![
                    Op::Update {
                        key: key_of(&a),
                        value: a,
                        expected: None,
                    },
                    Op::Update {
                        key: key_of(&b),
                        value: b,
                        expected: None,
                    },
                ])
                .await
                .unwrap();
        }
    });
    let request = ListRequest {
        kind: Some(Kind::ConfigMap),
        namespace: Some("kube-system".to_owned()),
    };
    let mut last_revision = 0;
    loop {
        let done = writes.is_finished();
        let listing = f.first.list(&request).await.unwrap();
        assert_eq!(listing.items.len(), 2);
        assert_eq!(
            listing.items[0].value["data"], listing.items[1].value["data"],
            "half a commit at revision {}",
            listing.revision
        );
        assert_eq!(listing.items[0].revision, listing.revision);
        assert!(listing.revision >= last_revision, "revisions never go back");
        last_revision = listing.revision;
        if done {
            break;
        }
    }
    writes.await.unwrap();
    assert_eq!(last_revision, base + 41);
}

/// A watch from 0 replays the whole history, then follows.
pub async fn watch_from_zero_replays_everything_in_order(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let mut live = ds.watch(base).await.unwrap();

    let p1 = create(ds, ippool("p1", "10.0.0.0/16")).await;
    let web = create(ds, service("default", "web", 80)).await;
    let p1b = update(ds, &p1, |v| v["spec"]["natOutgoing"] = json!(false)).await;
    let web_gone = delete(ds, &web).await;
    let batch = ds
        .commit(vec![
            create_op(ippool("p2", "10.1.0.0/16")),
            Op::Delete {
                key: p1.key.clone(),
                expected: Some(p1b.revision),
            },
        ])
        .await
        .unwrap();
    let expected = vec![
        event(EventType::Added, base + 1, &p1),
        event(EventType::Added, base + 2, &web),
        event(EventType::Modified, base + 3, &p1b),
        event(EventType::Deleted, base + 4, &web_gone),
        event(EventType::Added, base + 5, &batch[0]),
        event(EventType::Deleted, base + 5, &p1b),
    ];
    assert_eq!(
        expected[3].value["metadata"]["resourceVersion"],
        json!((base + 2).to_string()),
        "a Deleted event carries the object as last stored"
    );
    assert_eq!(next_events(&mut live, 6).await, expected);

    // A watch opened later replays the same history.
    let mut replay = f.second.watch(base).await.unwrap();
    assert_eq!(next_events(&mut replay, 6).await, expected);

    // Both continue with the next commit, once.
    let p3 = create(ds, ippool("p3", "10.2.0.0/16")).await;
    assert_eq!(
        next_event(&mut live).await,
        event(EventType::Added, base + 6, &p3)
    );
    assert_eq!(
        next_event(&mut replay).await,
        event(EventType::Added, base + 6, &p3)
    );
    let p3b = update(ds, &p3, |v| v["spec"]["blockSize"] = json!(24)).await;
    assert_eq!(
        next_event(&mut live).await,
        event(EventType::Modified, base + 7, &p3b)
    );
    assert_eq!(
        next_event(&mut replay).await,
        event(EventType::Modified, base + 7, &p3b)
    );
}

/// A watch from revision R starts with R + 1.
pub async fn watch_from_a_revision_continues_without_gaps_or_duplicates(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let mut history = Vec::new();
    let mut pool = create(ds, ippool("p", "10.0.0.0/16")).await;
    history.push(event(EventType::Added, base + 1, &pool));
    for size in 20..24 {
        pool = update(ds, &pool, |v| v["spec"]["blockSize"] = json!(size)).await;
        history.push(event(EventType::Modified, pool.revision, &pool));
    }
    assert_eq!(ds.revision().await.unwrap(), base + 5);

    let mut from2 = ds.watch(base + 2).await.unwrap();
    assert_eq!(next_events(&mut from2, 3).await, history[2..].to_vec());
    let mut from5 = f.second.watch(base + 5).await.unwrap();
    // Watching from the future is allowed: it starts when the store gets there.
    let mut from6 = ds.watch(base + 6).await.unwrap();

    let svc = create(&f.second, service("default", "web", 80)).await;
    let svc2 = update(ds, &svc, |v| v["spec"]["type"] = json!("NodePort")).await;
    for watch in [&mut from2, &mut from5] {
        assert_eq!(
            next_events(watch, 2).await,
            vec![
                event(EventType::Added, base + 6, &svc),
                event(EventType::Modified, base + 7, &svc2)
            ]
        );
    }
    assert_eq!(
        next_event(&mut from6).await,
        event(EventType::Modified, base + 7, &svc2)
    );
}

/// Commits through one handle reach watches on the other, in both directions.
pub async fn watch_sees_writes_through_another_handle(f: Fixture) {
    let base = f.base;
    let mut on_first = f.first.watch(base).await.unwrap();
    let mut on_second = f.second.watch(base).await.unwrap();

    let p1 = create(&f.second, ippool("p1", "10.0.0.0/16")).await;
    assert_eq!(
        next_event(&mut on_first).await,
        event(EventType::Added, base + 1, &p1)
    );
    let svc = create(&f.first, service("default", "web", 80)).await;
    assert_eq!(
        next_event(&mut on_second).await,
        event(EventType::Added, base + 1, &p1)
    );
    assert_eq!(
        next_event(&mut on_second).await,
        event(EventType::Added, base + 2, &svc)
    );
    assert_eq!(
        next_event(&mut on_first).await,
        event(EventType::Added, base + 2, &svc)
    );
    assert_eq!(f.first.get(&p1.key).await.unwrap(), p1);
    assert_eq!(f.second.get(&svc.key).await.unwrap(), svc);
}

/// Each change says whether it is the last of its commit, so that a consumer acting per
/// commit (the node agent) need not wait for a quiet spell to know that a commit is whole.
pub async fn watch_marks_the_last_change_of_each_commit(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let mut watch = ds.watch(base).await.unwrap();
    create(ds, ippool("p1", "10.0.0.0/16")).await;
    ds.commit(vec![
        create_op(ippool("p2", "10.1.0.0/16")),
        create_op(ippool("p3", "10.2.0.0/16")),
        create_op(service("default", "web", 80)),
    ])
    .await
    .unwrap();
    create(ds, ippool("p4", "10.3.0.0/16")).await;
    let mut marks = Vec::new();
    for _ in 0..5 {
        let e = next_marked_event(&mut watch).await;
        marks.push((e.revision - base, e.commit_complete));
    }
    assert_eq!(
        marks,
        vec![(1, true), (2, false), (2, false), (2, true), (3, true)]
    );
}

/// History forgotten by compaction cannot be watched; what follows it can.
pub async fn watch_from_a_compacted_revision_fails(f: Fixture) {
    let base = f.base;
    let ds = &f.first;
    let mut pool = create(ds, ippool("p", "10.0.0.0/16")).await;
    for size in 20..24 {
        pool = update(ds, &pool, |v| v["spec"]["blockSize"] = json!(size)).await;
    }
    assert!(
        ds.compact(base + 6).await.is_err(),
        "revision 6 does not exist yet"
    );
    ds.compact(base + 3).await.unwrap();

    for from in [base, base + 2] {
        let mut watch = f.second.watch(from).await.unwrap();
        match tokio::time::timeout(EVENT_TIMEOUT, watch.next())
            .await
            .unwrap()
        {
            Some(Err(Error::Compacted { requested, oldest })) => {
                assert_eq!(requested, from);
                assert!((base + 3..=base + 4).contains(&oldest), "oldest {oldest}");
            }
            other => panic!("watch({from}) after compact(3) gave {other:?}"),
        }
        let end = tokio::time::timeout(EVENT_TIMEOUT, watch.next())
            .await
            .unwrap();
        assert!(end.is_none(), "the stream ends after Compacted: {end:?}");
    }

    // The objects themselves are untouched, and the kept history is still served.
    assert_eq!(ds.get(&pool.key).await.unwrap(), pool);
    let mut watch = ds.watch(base + 3).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision, base + 4);
    assert_eq!(
        next_event(&mut watch).await,
        event(EventType::Modified, base + 5, &pool)
    );
    let later = create(&f.second, ippool("q", "10.9.0.0/16")).await;
    assert_eq!(
        next_event(&mut watch).await,
        event(EventType::Added, base + 6, &later)
    );
}

/// `sync` lists, reports InSync, then forwards only the wanted kinds' real changes.
pub async fn sync_lists_then_follows(f: Fixture) {
    let writer = &f.second;
    let p1 = create(writer, ippool("p1", "10.0.0.0/16")).await;
    let p2 = create(writer, ippool("p2", "10.1.0.0/16")).await;
    let web = create(writer, service("default", "web", 80)).await;
    create(writer, node("node-1")).await;
    create(writer, felix_configuration()).await;

    let mut updates = sync(Arc::clone(&f.first), vec![Kind::IPPool, Kind::Service]);
    assert_eq!(
        next_update(&mut updates).await,
        SyncUpdate::Status(SyncStatus::WaitingForDatastore)
    );
    let snapshot = updates_until_in_sync(&mut updates).await;
    assert_eq!(
        snapshot,
        vec![
            SyncUpdate::Upsert(p1.clone()),
            SyncUpdate::Upsert(p2.clone()),
            SyncUpdate::Upsert(web.clone())
        ]
    );

    let p3 = create(writer, ippool("p3", "10.2.0.0/16")).await;
    create(writer, node("node-2")).await; // not a synced kind
    one(writer
        .commit(vec![update_op(&p1, p1.value.clone())])
        .await
        .unwrap()); // no-op
    let web2 = update(writer, &web, |v| {
        v["spec"]["ports"][0]["port"] = json!(8080)
    })
    .await;
    delete(writer, &p2).await;
    let p4 = create(&f.first, ippool("p4", "10.3.0.0/16")).await;
    for expected in [
        SyncUpdate::Upsert(p3),
        SyncUpdate::Upsert(web2),
        SyncUpdate::Remove(p2.key.clone()),
        SyncUpdate::Upsert(p4),
    ] {
        assert_eq!(next_update(&mut updates).await, expected);
    }
}

/// `sync` reports progress after the listing and after the last change of every commit, also
/// for commits of kinds it does not follow, and never in the middle of a commit: a consumer that
/// waits for progress R has seen every change up to R.
pub async fn sync_reports_progress_after_whole_commits(f: Fixture) {
    let writer = &f.second;
    let p1 = create(writer, ippool("p1", "10.0.0.0/16")).await;
    let mut updates = sync(Arc::clone(&f.first), vec![Kind::IPPool]);
    let mut seen = Vec::new();
    loop {
        match next_update_or_progress(&mut updates).await {
            SyncUpdate::Status(SyncStatus::InSync) => break,
            u => seen.push(u),
        }
    }
    assert_eq!(
        seen.last(),
        Some(&SyncUpdate::Progress(p1.revision)),
        "{seen:?}"
    );

    // Two pools in one commit: both upserts come before the progress report of that commit.
    let both = writer
        .commit(vec![
            create_op(ippool("p2", "10.1.0.0/16")),
            create_op(ippool("p3", "10.2.0.0/16")),
        ])
        .await
        .unwrap();
    let revision = both[0].revision;
    let mut upserts = 0;
    loop {
        match next_update_or_progress(&mut updates).await {
            SyncUpdate::Upsert(_) => upserts += 1,
            SyncUpdate::Progress(r) => {
                assert_eq!(r, revision);
                assert_eq!(upserts, 2, "progress reported in the middle of a commit");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A commit of a kind not followed still advances the progress.
    let n = create(writer, node("node-1")).await;
    assert_eq!(
        next_update_or_progress(&mut updates).await,
        SyncUpdate::Progress(n.revision)
    );
}

/// While the store cannot be listed the status stays WaitingForDatastore.
pub async fn sync_waits_until_the_store_can_be_listed(f: Fixture) {
    let p1 = create(&f.first, ippool("p1", "10.0.0.0/16")).await;
    let faulty = Faulty::new(Arc::clone(&f.first));
    faulty.failing_lists.store(2, Ordering::SeqCst);
    let mut updates = sync(faulty.clone(), vec![Kind::IPPool]);
    assert_eq!(
        next_update(&mut updates).await,
        SyncUpdate::Status(SyncStatus::WaitingForDatastore)
    );
    assert_eq!(
        updates_until_in_sync(&mut updates).await,
        vec![SyncUpdate::Upsert(p1)]
    );
    assert_eq!(faulty.failing_lists.load(Ordering::SeqCst), 0);
    assert!(faulty.lists.load(Ordering::SeqCst) >= 3);
}

/// After the watch is lost to compaction, `sync` re-lists and emits only what really changed.
pub async fn sync_resync_emits_only_real_changes(f: Fixture) {
    let writer = &f.second;
    let a = create(writer, ippool("a", "10.0.0.0/16")).await;
    let b = create(writer, ippool("b", "10.1.0.0/16")).await;
    let c = create(writer, ippool("c", "10.2.0.0/16")).await;
    let d = create(writer, ippool("d", "10.3.0.0/16")).await;
    let web = create(writer, service("default", "web", 80)).await;

    let faulty = Faulty::new(Arc::clone(&f.first));
    let mut updates = sync(faulty.clone(), vec![Kind::IPPool, Kind::Service]);
    assert_eq!(
        next_update(&mut updates).await,
        SyncUpdate::Status(SyncStatus::WaitingForDatastore)
    );
    let (upserts, removes) = upserts_and_removes(&updates_until_in_sync(&mut updates).await);
    assert_eq!(upserts, names(&[&a.key, &b.key, &c.key, &d.key, &web.key]));
    assert!(removes.is_empty());
    let a2 = update(writer, &a, |v| v["spec"]["natOutgoing"] = json!(false)).await;
    assert_eq!(next_update(&mut updates).await, SyncUpdate::Upsert(a2));

    // While nobody reads the stream: real changes, a no-op, an object that comes and goes, and
    // a compaction that forgets all of it.
    let e = create(writer, ippool("e", "10.4.0.0/16")).await;
    let b2 = update(writer, &b, |v| v["spec"]["blockSize"] = json!(24)).await;
    delete(writer, &c).await;
    one(writer
        .commit(vec![update_op(&d, d.value.clone())])
        .await
        .unwrap());
    let transient = create(writer, ippool("transient", "10.5.0.0/16")).await;
    delete(writer, &transient).await;
    create(writer, node("node-1")).await;
    let now = writer.revision().await.unwrap();
    writer.compact(now).await.unwrap();
    faulty.break_watches(Error::Compacted {
        requested: a.revision,
        oldest: now,
    });

    assert_eq!(
        next_update(&mut updates).await,
        SyncUpdate::Status(SyncStatus::Resyncing)
    );
    let diff = updates_until_in_sync(&mut updates).await;
    let (upserts, removes) = upserts_and_removes(&diff);
    assert_eq!(upserts, names(&[&e.key, &b2.key]), "{diff:?}");
    assert_eq!(removes, names(&[&c.key]), "{diff:?}");
    assert!(diff.contains(&SyncUpdate::Upsert(b2)));
    assert!(diff.contains(&SyncUpdate::Upsert(e.clone())));

    // And it follows the store again from the listing's revision.
    let e2 = update(writer, &e, |v| v["spec"]["cidr"] = json!("10.40.0.0/16")).await;
    assert_eq!(next_update(&mut updates).await, SyncUpdate::Upsert(e2));
}

/// Commits racing from many tasks and both handles all land, each with its own revision.
pub async fn concurrent_commits_get_distinct_revisions(f: Fixture) {
    let base = f.base;
    const TASKS: usize = 8;
    const EACH: usize = 5;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let ds = if t % 2 == 0 {
            Arc::clone(&f.first)
        } else {
            Arc::clone(&f.second)
        };
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..EACH {
                let stored = create(&ds, ippool(&format!("pool-{t}-{i}"), "10.0.0.0/16")).await;
                revisions.push(stored.revision);
            }
            revisions
        }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.extend(task.await.unwrap());
    }
    revisions.sort_unstable();
    let total = (TASKS * EACH) as Revision;
    assert_eq!(revisions, (base + 1..=base + total).collect::<Vec<_>>());
    assert_eq!(f.first.revision().await.unwrap(), base + total);
    let mut watch = f.second.watch(base).await.unwrap();
    let events = next_events(&mut watch, TASKS * EACH).await;
    let watched: Vec<Revision> = events.iter().map(|e| e.revision).collect();
    assert_eq!(watched, (base + 1..=base + total).collect::<Vec<_>>());
}

/// Read-modify-write loops that retry on Conflict never lose an increment.
pub async fn concurrent_compare_and_swap_loses_no_update(f: Fixture) {
    let base = f.base;
    const TASKS: usize = 6;
    const EACH: usize = 5;
    let initial = create(&f.first, counter("counter")).await;
    let key = initial.key.clone();
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let ds = if t % 2 == 0 {
            Arc::clone(&f.first)
        } else {
            Arc::clone(&f.second)
        };
        let key = key.clone();
        let conflicts = Arc::clone(&conflicts);
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                increment(&ds, &key, &conflicts).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = f.second.get(&key).await.unwrap();
    assert_eq!(
        last.value["data"]["count"],
        json!((TASKS * EACH).to_string())
    );
    assert_eq!(last.revision, base + 1 + (TASKS * EACH) as Revision);
}

/// Adds one to a counter ConfigMap, retrying on conflict; the pattern every client uses.
pub async fn increment(ds: &Arc<dyn Datastore>, key: &Key, conflicts: &AtomicUsize) {
    loop {
        let current = ds.get(key).await.unwrap();
        let count: u64 = current.value["data"]["count"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut value = current.value.clone();
        value["data"]["count"] = json!((count + 1).to_string());
        match ds.commit(vec![update_op(&current, value)]).await {
            Ok(_) => return,
            Err(Error::Conflict { .. }) => {
                conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("increment failed: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Wraps a backend to inject the failures `sync` must survive: listings that fail, and watches
/// that end with a given error (for a deterministic "the watch fell behind compaction").
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn Datastore>,
    /// How many of the next listings fail.
    failing_lists: AtomicUsize,
    /// How many listings were attempted.
    lists: AtomicUsize,
    /// Bumped to end every open watch with `break_with`.
    breaker: tokio::sync::watch::Sender<u64>,
    break_with: Arc<Mutex<Option<Error>>>,
}

impl Faulty {
    fn new(inner: Arc<dyn Datastore>) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            failing_lists: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
            breaker: tokio::sync::watch::channel(0).0,
            break_with: Arc::new(Mutex::new(None)),
        })
    }

    /// Ends the open watches with `error`; their buffered events are dropped.
    fn break_watches(&self, error: Error) {
        *self.break_with.lock().unwrap() = Some(error);
        self.breaker.send_modify(|generation| *generation += 1);
    }
}

#[async_trait::async_trait]
impl Datastore for Faulty {
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }

    async fn get(&self, key: &Key) -> Result<Stored, Error> {
        self.inner.get(key).await
    }

    async fn list(&self, request: &ListRequest) -> Result<Listing, Error> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_lists
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(Error::Unavailable("injected failure".to_owned()));
        }
        self.inner.list(request).await
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<Stored>, Error> {
        self.inner.commit(ops).await
    }

    async fn revision(&self) -> Result<Revision, Error> {
        self.inner.revision().await
    }

    async fn watch(&self, from: Revision) -> Result<WatchStream, Error> {
        let inner = self.inner.watch(from).await?;
        let broken = self.breaker.subscribe();
        let error = Arc::clone(&self.break_with);
        let stream = futures::stream::unfold(Some((inner, broken, error)), |state| async move {
            let (mut inner, mut broken, error) = state?;
            tokio::select! {
                biased;
                _ = broken.changed() => {
                    let e = error
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| Error::Unavailable("watch broken".to_owned()));
                    Some((Err(e), None))
                }
                item = inner.next() => item.map(|item| (item, Some((inner, broken, error)))),
            }
        });
        Ok(Box::pin(stream))
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        self.inner.compact(revision).await
    }
}
