//! The datastore contract suite against the SQLite backend, plus what only SQLite has: file
//! permissions, schema versions, corrupt rows, lock timeouts, automatic compaction, and several
//! processes sharing one file.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use futures::StreamExt;
use margay_api::Kind;
use margay_datastore::contract::{Fixture, increment};
use margay_datastore::sqlite::{SqliteDatastore, SqliteOptions};
use margay_datastore::{Datastore, Error, EventType, Key, ListRequest, Op};
use serde_json::json;

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let first = Arc::new(SqliteDatastore::open(&path).unwrap());
    let second = Arc::new(SqliteDatastore::open(&path).unwrap());
    Fixture::new(first, second, dir)
}

mod contract {
    margay_datastore::datastore_contract_tests!(super::fixture);
}

fn ippool(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": "192.168.0.0/16", "natOutgoing": true}
    })
}

fn create(name: &str) -> Op {
    Op::Create {
        key: Key::new(Kind::IPPool, None, name),
        value: ippool(name),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[tokio::test]
async fn the_file_and_its_directory_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("var/lib/margay/margay.db");
    let ds = SqliteDatastore::open(&path).unwrap();
    ds.commit(vec![create("p1")]).await.unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&dir.path().join("var")), 0o700);
    for suffix in ["-wal", "-shm"] {
        let file = sibling(&path, suffix);
        assert_eq!(
            mode(&file) & 0o077,
            0,
            "{} is readable by others",
            file.display()
        );
    }
    assert_eq!(ds.describe(), format!("sqlite://{}", path.display()));
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let url = format!("sqlite://{}", path.display());
    let first = margay_datastore::open(&url).await.unwrap();
    assert_eq!(first.describe(), url);
    let stored = first.commit(vec![create("p1")]).await.unwrap().remove(0);
    drop(first);
    let again = margay_datastore::open(&url).await.unwrap();
    assert_eq!(again.get(&stored.key).await.unwrap(), stored);
    assert_eq!(again.revision().await.unwrap(), 1);
    let next = again.commit(vec![create("p2")]).await.unwrap().remove(0);
    assert_eq!(next.revision, 2);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    drop(SqliteDatastore::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 7)
        .unwrap();
    match SqliteDatastore::open(&path) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("newer Margay"), "{msg}"),
        other => panic!("expected a schema error, got {other:?}"),
    }
}

#[tokio::test]
async fn foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other_db = dir.path().join("other.db");
    rusqlite::Connection::open(&other_db)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    match SqliteDatastore::open(&other_db) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("not a Margay datastore"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a database, just some text ".repeat(100)).unwrap();
    match SqliteDatastore::open(&text) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("not an SQLite database"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let ds = SqliteDatastore::open(&path).unwrap();
    let stored = ds.commit(vec![create("p1")]).await.unwrap().remove(0);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE resources SET value = '{not json'", [])
        .unwrap();
    raw.execute("UPDATE events SET value = '[1, 2'", [])
        .unwrap();

    assert!(matches!(
        ds.get(&stored.key).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        ds.list(&ListRequest::default()).await,
        Err(Error::Corrupt { .. })
    ));
    let update = Op::Update {
        key: stored.key.clone(),
        value: ippool("p1"),
        expected: None,
    };
    assert!(matches!(
        ds.commit(vec![update]).await,
        Err(Error::Corrupt { .. })
    ));
    let mut watch = ds.watch(0).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(first, Some(Err(Error::Corrupt { .. }))),
        "{first:?}"
    );
    assert!(watch.next().await.is_none());

    raw.execute("UPDATE resources SET kind = 'Widget'", [])
        .unwrap();
    match ds.list(&ListRequest::default()).await {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("Widget"), "{e}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn a_held_write_lock_makes_commits_unavailable_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let options = SqliteOptions {
        busy_timeout: Duration::from_millis(200),
        ..SqliteOptions::default()
    };
    let ds = SqliteDatastore::open_with(&path, options).unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    match ds.commit(vec![create("p1")]).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("locked"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Readers are not blocked by a writer.
    assert_eq!(ds.revision().await.unwrap(), 0);
    raw.execute_batch("ROLLBACK").unwrap();
    assert_eq!(ds.commit(vec![create("p1")]).await.unwrap()[0].revision, 1);
}

#[tokio::test]
async fn history_is_compacted_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let options = SqliteOptions {
        history: 10,
        compact_every: 5,
        ..SqliteOptions::default()
    };
    let ds = SqliteDatastore::open_with(&path, options).unwrap();
    for i in 0..24 {
        ds.commit(vec![create(&format!("p{i}"))]).await.unwrap();
    }
    // Compaction ran at revision 20 and kept revisions 11..=20 and newer.
    let mut watch = ds.watch(0).await.unwrap();
    match watch.next().await {
        Some(Err(Error::Compacted { requested, oldest })) => {
            assert_eq!((requested, oldest), (0, 10));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut watch = ds.watch(10).await.unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!((first.event_type, first.revision), (EventType::Added, 11));
    let events: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
        .unwrap();
    assert_eq!(events, 14);
}

/// Runs this test binary again as a child process doing `role` (see `child`).
fn spawn_child(role: &str, path: &Path, arg: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--quiet", "--test-threads=1"])
        .env("MARGAY_TEST_CHILD", role)
        .env("MARGAY_TEST_CHILD_DB", path)
        .env("MARGAY_TEST_CHILD_ARG", arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_for(child: std::process::Child) {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "a child process failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The child side of the tests that need processes of their own; passes trivially when run as
/// part of the ordinary test run.
#[test]
fn child() {
    let Ok(role) = std::env::var("MARGAY_TEST_CHILD") else {
        return;
    };
    let path = PathBuf::from(std::env::var("MARGAY_TEST_CHILD_DB").unwrap());
    let arg = std::env::var("MARGAY_TEST_CHILD_ARG").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ds: Arc<dyn Datastore> = Arc::new(SqliteDatastore::open(&path).unwrap());
        match role.as_str() {
            "increment" => {
                let key = Key::new(Kind::ConfigMap, Some("kube-system"), "counter");
                let conflicts = AtomicUsize::new(0);
                for _ in 0..arg.parse::<usize>().unwrap() {
                    increment(&ds, &key, &conflicts).await;
                }
            }
            "create" => {
                ds.commit(vec![create(&arg)]).await.unwrap();
            }
            "watch-threads" => {
                let watch_threads = || {
                    std::fs::read_dir("/proc/self/task")
                        .unwrap()
                        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                        .filter(|name| name.trim() == "margay-watch")
                        .count()
                };
                let mut watches = Vec::new();
                for _ in 0..3 {
                    watches.push(ds.watch(0).await.unwrap());
                }
                // A thread names itself once it runs, so wait for the count to settle.
                let settled = async |want: usize| {
                    let mut count = watch_threads();
                    for _ in 0..200 {
                        if count == want {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        count = watch_threads();
                    }
                    count
                };
                assert_eq!(settled(3).await, 3, "one poller thread per watch");
                drop(watches);
                assert_eq!(
                    settled(0).await,
                    0,
                    "dropped watches left their pollers running"
                );
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

/// Processes that find no store at all create it at the same moment without tripping over each
/// other (pre-creating the file, switching to WAL, creating the schema).
#[tokio::test]
async fn many_processes_create_a_new_store_at_once() {
    const PROCESSES: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/margay.db");
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| spawn_child("create", &path, &format!("pool-{i}")))
        .collect();
    for child in children {
        wait_for(child).await;
    }
    let ds = SqliteDatastore::open(&path).unwrap();
    let listing = ds.list(&ListRequest::default()).await.unwrap();
    assert_eq!(listing.items.len(), PROCESSES);
    assert_eq!(listing.revision, PROCESSES as u64);
}

/// `run_all` (the entry point for backends that prefer one test) runs the same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_runs_every_check() {
    margay_datastore::contract::run_all(fixture).await;
}

/// A watch's poller thread ends soon after the stream is dropped (checked in a process of its
/// own, where no other test's watches run).
#[tokio::test]
async fn a_dropped_watch_stops_its_poller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    drop(SqliteDatastore::open(&path).unwrap());
    wait_for(spawn_child("watch-threads", &path, "")).await;
}

/// Several OS processes doing read-modify-write on one object: every increment lands, and a
/// watcher in this process sees every one of them in order.
#[tokio::test]
async fn many_processes_increment_one_counter() {
    const PROCESSES: usize = 6;
    const EACH: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let ds = SqliteDatastore::open(&path).unwrap();
    let counter = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "counter", "namespace": "kube-system"},
        "data": {"count": "0"}
    });
    let key = Key::of(Kind::ConfigMap, &counter);
    ds.commit(vec![Op::Create {
        key: key.clone(),
        value: counter,
    }])
    .await
    .unwrap();
    let mut watch = ds.watch(1).await.unwrap();

    let children: Vec<_> = (0..PROCESSES)
        .map(|_| spawn_child("increment", &path, &EACH.to_string()))
        .collect();
    for child in children {
        wait_for(child).await;
    }

    let total = PROCESSES * EACH;
    let last = ds.get(&key).await.unwrap();
    assert_eq!(last.value["data"]["count"], json!(total.to_string()));
    assert_eq!(last.revision, 1 + total as u64);
    for expected in 1..=total {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.revision, 1 + expected as u64);
        assert_eq!(event.value["data"]["count"], json!(expected.to_string()));
    }
}

/// A watch sees another handle's commit when it is made, not at its next poll: with a poll
/// interval of ten minutes, each event still arrives within seconds (the inotify wake on the
/// write to the `-wal` file and the checks that follow it until the commit is visible).
#[tokio::test]
async fn a_watch_wakes_on_a_commit_without_waiting_for_its_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("margay.db");
    let slow = SqliteOptions {
        poll_interval: Duration::from_secs(600),
        ..SqliteOptions::default()
    };
    let watcher = SqliteDatastore::open_with(&path, slow).unwrap();
    let writer = SqliteDatastore::open(&path).unwrap();
    let from = watcher.revision().await.unwrap();
    let mut watch = watcher.watch(from).await.unwrap();
    // Let the poller make its first check and settle into its wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        let name = format!("wake-{i}");
        writer.commit(vec![create(&name)]).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .unwrap_or_else(|_| {
                panic!("commit {i}: no event within 30 s, with a poll every 600 s: the watch did not wake on the write")
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            (event.event_type, event.key.name.as_str()),
            (EventType::Added, name.as_str())
        );
        // A quiet spell, so that the next commit finds the poller waiting, not checking.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
