//! The embedded default backend: one SQLite file, shared by every process on the machine.
//!
//! The CLI and several node agents may open the same file at once, so everything that matters is
//! kept in the file itself rather than in any one process:
//!
//! - the store's revision and compaction point live in the `meta` table and are read and advanced
//!   inside `BEGIN IMMEDIATE` transactions, so commits from different processes are serialised by
//!   SQLite's write lock and each gets exactly the next revision;
//! - every change is appended to the `events` table in the same transaction as the change itself,
//!   so a watcher in any process sees exactly the committed history, in order;
//! - WAL mode lets readers (listings, watch pollers) proceed while one writer commits, and
//!   `synchronous = FULL` makes a commit durable once it returns, at the cost of an fsync.
//!
//! Watches poll: each watch owns a read-only connection on a thread of its own that asks
//! `PRAGMA data_version` (a cheap in-memory check that changes whenever any other connection
//! commits) every [`SqliteOptions::poll_interval`] and only then reads new events. Polling is
//! what makes commits by *other processes* visible; SQLite has no cross-process notification.
//! To see a commit sooner than the next poll, a watch also listens with inotify for writes to
//! the database's files ([`CommitSignal`]) and, after one, checks every [`EAGER_STEP`] for a
//! while: a commit writes its WAL frames, syncs them, and only then becomes visible, so the
//! write itself announces a commit a little before it can be read. The poll stays the bound
//! (inotify says nothing of writes made on another machine's mount of a network filesystem).
//!
//! The file holds cluster configuration and secrets-adjacent data, so it is created with mode
//! 0600 in a directory created with mode 0700; SQLite gives its `-wal` and `-shm` files the mode
//! of the database file.

use std::collections::HashSet;
use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use margay_api::Kind;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use rustix::event::{PollFd, PollFlags};
use rustix::fs::inotify;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{
    Datastore, Error, EventType, Key, ListRequest, Listing, Op, Revision, Stored, WatchEvent,
    WatchStream,
};

/// Where the node agent and `margayctl` keep the store unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/margay/margay.db";

/// The layout this build reads and writes, kept in `PRAGMA user_version`. Bump it (and teach
/// [`init_schema`] to migrate) whenever the tables change, so that an older binary refuses a newer
/// file instead of misreading it.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE resources (
    kind      TEXT    NOT NULL,
    namespace TEXT    NOT NULL, -- '' for cluster-scoped objects
    name      TEXT    NOT NULL,
    revision  INTEGER NOT NULL, -- the commit that last wrote the object
    value     TEXT    NOT NULL, -- JSON, without metadata.resourceVersion
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE events (
    revision        INTEGER NOT NULL, -- the commit that made the change
    idx             INTEGER NOT NULL, -- position of the change within its commit
    ops             INTEGER NOT NULL, -- number of changes in the commit
    type            TEXT    NOT NULL, -- ADDED, MODIFIED or DELETED
    kind            TEXT    NOT NULL,
    namespace       TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    object_revision INTEGER NOT NULL, -- resourceVersion of `value` (older than `revision` for DELETED)
    value           TEXT    NOT NULL, -- the object after the change; for DELETED, as last stored
    PRIMARY KEY (revision, idx)
);
CREATE TABLE meta (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
";

/// How many events a watch poller reads per query, bounding its memory when it catches up on a
/// long history.
const WATCH_BATCH: usize = 1000;

/// How many events a watch may have read ahead of its consumer before the poller waits.
const WATCH_BUFFER: usize = 256;

/// After a write to the database's files, how often a watch checks for the commit it announces,
/// and for how long: a commit is visible once its WAL frames are synced, which takes an fsync
/// (a few ms, more on a loaded disk) after the write.
const EAGER_STEP: Duration = Duration::from_micros(500);
const EAGER_WINDOW: Duration = Duration::from_millis(200);

/// Tunables of [`SqliteDatastore`]; the defaults suit production.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How long a commit waits for another process's write lock before failing with
    /// [`Error::Unavailable`]. Writes are short, so waiting this long means something is stuck.
    pub busy_timeout: Duration,
    /// How often a watch checks for commits. Bounds the latency of watches (and the idle cost:
    /// one `PRAGMA data_version` per watch per interval).
    pub poll_interval: Duration,
    /// How many revisions of history to keep for watches; older events are compacted away.
    pub history: u64,
    /// Automatic compaction runs inside every commit whose revision is a multiple of this, so
    /// that it happens regardless of which process writes and costs nothing in between.
    pub compact_every: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(5),
            history: 100_000,
            compact_every: 1000,
        }
    }
}

/// The SQLite backend. Cheap to share behind an `Arc`; each handle owns one connection, used from
/// tokio's blocking pool so that SQLite's blocking I/O never stalls the async runtime.
pub struct SqliteDatastore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    conn: Mutex<Connection>,
}

impl fmt::Debug for SqliteDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDatastore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl SqliteDatastore {
    /// Opens (creating if needed) the store at `path` with the default options. Blocking: call it
    /// from `spawn_blocking` (as [`crate::open()`] does) or before the runtime is busy.
    pub fn open(path: &Path) -> Result<SqliteDatastore, Error> {
        SqliteDatastore::open_with(path, SqliteOptions::default())
    }

    /// Opens (creating if needed) the store at `path`.
    ///
    /// A missing parent directory is created with mode 0700 and a missing file with mode 0600
    /// before SQLite touches it, so the data is never readable by other users, not even briefly.
    pub fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteDatastore, Error> {
        let path = std::path::absolute(path).map_err(|e| {
            Error::Invalid(format!(
                "cannot resolve the datastore path {}: {e}",
                path.display()
            ))
        })?;
        prepare_file(&path)?;
        // Processes opening a new file at the same moment race to switch it to WAL and create
        // the schema, and SQLite answers some of those lock conflicts with an immediate
        // SQLITE_BUSY instead of waiting: retry them for as long as a commit would wait.
        let deadline = Instant::now() + options.busy_timeout;
        let conn = loop {
            match connect(&path, &options) {
                Ok(conn) => break conn,
                Err(OpenFailure::Sqlite(e)) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(OpenFailure::Sqlite(e)) => return Err(open_err(&path, e)),
                Err(OpenFailure::Refused(e)) => return Err(e),
            }
        };
        Ok(SqliteDatastore {
            inner: Arc::new(Inner {
                path,
                options,
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The file this handle opened.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on this handle's connection in tokio's blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Inner) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while the lock was held left no transaction open (dropping a rusqlite
            // Transaction rolls it back), so the connection is still usable.
            let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn, &inner)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("the datastore task failed: {e}")))?
    }
}

/// Creates the directory and the file with private modes; warns about an existing file that
/// others can read, without changing it (an administrator may have chosen that).
fn prepare_file(path: &Path) -> Result<(), Error> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot create the directory {}: {e}",
                    dir.display()
                ))
            })?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the datastore file is accessible to other users; chmod 600 it"
        );
    }
    Ok(())
}

/// Why one attempt at opening the store failed.
enum OpenFailure {
    /// SQLite said no; maybe only for now (see [`is_busy`]).
    Sqlite(rusqlite::Error),
    /// The file is not something this build can use.
    Refused(Error),
}

impl From<rusqlite::Error> for OpenFailure {
    fn from(e: rusqlite::Error) -> Self {
        OpenFailure::Sqlite(e)
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// One attempt at opening a configured connection on a file with the current schema.
fn connect(path: &Path, options: &SqliteOptions) -> Result<Connection, OpenFailure> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn, options, path)?;
    init_schema(&mut conn, path)?;
    Ok(conn)
}

/// Per-connection settings. WAL is a property of the file (set once, kept), so it is only switched
/// on when missing: switching needs an exclusive lock; the rest must be set on every connection.
fn configure(conn: &Connection, options: &SqliteOptions, path: &Path) -> Result<(), OpenFailure> {
    conn.busy_timeout(options.busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenFailure::Refused(Error::Unavailable(format!(
                "cannot use {}: SQLite cannot put it in WAL mode (journal mode is {mode}); \
                 put the datastore on a local file system",
                path.display()
            ))));
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Creates the tables in a new file, accepts a file of this schema, and refuses anything else with
/// a message saying what to do.
fn init_schema(conn: &mut Connection, path: &Path) -> Result<(), OpenFailure> {
    let version = user_version(conn)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // Several processes may open a new file at once: create the schema under the write lock and
    // look again once we hold it.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = user_version(&tx)?;
    match version {
        SCHEMA_VERSION => {}
        0 => {
            let tables: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
            if tables != 0 {
                return Err(OpenFailure::Refused(Error::Invalid(format!(
                    "{} is an SQLite database but not a Margay datastore; point the datastore \
                     URL at another file",
                    path.display()
                ))));
            }
            tx.execute_batch(SCHEMA)
                .and_then(|()| tx.pragma_update(None, "user_version", SCHEMA_VERSION))?;
        }
        v if v > SCHEMA_VERSION => {
            return Err(OpenFailure::Refused(Error::Invalid(format!(
                "{} was written by a newer Margay (datastore schema version {v}; this build \
                 understands version {SCHEMA_VERSION}); upgrade this binary",
                path.display()
            ))));
        }
        v => {
            return Err(OpenFailure::Refused(Error::Invalid(format!(
                "{} has unknown datastore schema version {v}; it was not written by Margay",
                path.display()
            ))));
        }
    }
    tx.commit()?;
    Ok(())
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Maps an SQLite error met while opening, naming the file.
fn open_err(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => Error::Invalid(format!(
            "{} is not an SQLite database; point the datastore URL at another file",
            path.display()
        )),
        _ => match db_err(e) {
            Error::Unavailable(msg) => {
                Error::Unavailable(format!("cannot open {}: {msg}", path.display()))
            }
            other => other,
        },
    }
}

/// Maps an SQLite error met while serving a request.
fn db_err(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            Error::Unavailable(format!(
                "the database stayed locked by another process or connection ({e})"
            ))
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            Error::Corrupt {
                key: "the database file".to_owned(),
                reason: e.to_string(),
            }
        }
        _ => Error::Unavailable(e.to_string()),
    }
}

fn to_db(revision: Revision) -> Result<i64, Error> {
    i64::try_from(revision)
        .map_err(|_| Error::Invalid(format!("revision {revision} is out of range")))
}

fn from_db(revision: i64, what: &dyn fmt::Display) -> Result<Revision, Error> {
    Revision::try_from(revision).map_err(|_| Error::Corrupt {
        key: what.to_string(),
        reason: format!("negative revision {revision}"),
    })
}

fn namespace_db(key: &Key) -> &str {
    key.namespace.as_deref().unwrap_or("")
}

fn parse_kind(kind: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str() == kind)
}

/// Rebuilds a key read from a row.
fn key_from_db(kind: &str, namespace: String, name: String) -> Result<Key, Error> {
    let parsed = parse_kind(kind).ok_or_else(|| Error::Corrupt {
        key: format!("{kind} {namespace}/{name}"),
        reason: format!("unknown kind {kind:?}"),
    })?;
    Ok(Key {
        kind: parsed,
        namespace: (!namespace.is_empty()).then_some(namespace),
        name,
    })
}

/// Parses a stored document and fills in its `metadata.resourceVersion`.
fn document(key: &Key, json: &str, revision: Revision) -> Result<Value, Error> {
    let mut value = parse_document(key, json)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".to_owned(),
            Value::String(revision.to_string()),
        );
    }
    Ok(value)
}

/// Parses a stored document as stored (without `metadata.resourceVersion`).
fn parse_document(key: &Key, json: &str) -> Result<Value, Error> {
    let value: Value = serde_json::from_str(json).map_err(|e| Error::Corrupt {
        key: key.to_string(),
        reason: format!("invalid JSON: {e}"),
    })?;
    if !value.get("metadata").is_some_and(Value::is_object) {
        return Err(Error::Corrupt {
            key: key.to_string(),
            reason: "the document has no metadata object".to_owned(),
        });
    }
    Ok(value)
}

/// The metadata object of a document about to be written; `check_ops` made sure it exists.
fn metadata_mut(value: &mut Value) -> Option<&mut Map<String, Value>> {
    value.get_mut("metadata").and_then(Value::as_object_mut)
}

/// Rejects what no backend can store, before any lock is taken.
fn check_ops(ops: &mut [Op]) -> Result<(), Error> {
    let mut seen = HashSet::new();
    for op in ops.iter_mut() {
        let key = op.key().clone();
        check_key(&key)?;
        if !seen.insert(key.clone()) {
            return Err(Error::Invalid(format!(
                "{key} appears more than once in one commit"
            )));
        }
        if let Op::Create { value, .. } | Op::Update { value, .. } = op {
            let Some(object) = value.as_object_mut() else {
                return Err(Error::Invalid(format!(
                    "{key}: the document is not a JSON object"
                )));
            };
            let meta = object
                .entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            let Some(meta) = meta.as_object_mut() else {
                return Err(Error::Invalid(format!("{key}: metadata is not an object")));
            };
            if let Some(name) = meta.get("name")
                && name.as_str() != Some(key.name.as_str())
            {
                return Err(Error::Invalid(format!(
                    "{key}: metadata.name {name} does not match the key"
                )));
            }
            if let Some(ns) = meta.get("namespace")
                && !ns.is_null()
                && ns.as_str() != key.namespace.as_deref()
            {
                return Err(Error::Invalid(format!(
                    "{key}: metadata.namespace {ns} does not match the key"
                )));
            }
            // Never stored: it is the row's revision, filled in on every read.
            meta.shift_remove("resourceVersion");
        }
    }
    Ok(())
}

fn check_key(key: &Key) -> Result<(), Error> {
    if key.name.is_empty() {
        return Err(Error::Invalid(format!("a {} needs a name", key.kind)));
    }
    if key.namespace.as_deref() == Some("") {
        return Err(Error::Invalid(format!(
            "{key}: an empty namespace is not allowed; omit the namespace instead"
        )));
    }
    Ok(())
}

/// A row of `resources`.
struct Row {
    revision: Revision,
    /// The document as stored (without `metadata.resourceVersion`).
    doc: Value,
    json: String,
}

impl Row {
    fn stored(&self, key: Key) -> Stored {
        let mut value = self.doc.clone();
        if let Some(meta) = metadata_mut(&mut value) {
            meta.insert(
                "resourceVersion".to_owned(),
                Value::String(self.revision.to_string()),
            );
        }
        Stored {
            key,
            revision: self.revision,
            value,
        }
    }
}

fn load(conn: &Connection, key: &Key) -> Result<Option<Row>, Error> {
    let row = conn
        .query_row(
            "SELECT revision, value FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![key.kind.as_str(), namespace_db(key), key.name],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
        )
        .optional()
        .map_err(db_err)?;
    let Some((revision, json)) = row else {
        return Ok(None);
    };
    Ok(Some(Row {
        revision: from_db(revision, key)?,
        doc: parse_document(key, &json)?,
        json,
    }))
}

fn meta_get(conn: &Connection, name: &str) -> Result<Revision, Error> {
    let value: i64 = conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |row| {
            row.get(0)
        })
        .map_err(db_err)?;
    from_db(value, &format!("meta.{name}"))
}

fn meta_set(conn: &Connection, name: &str, value: Revision) -> Result<(), Error> {
    conn.execute(
        "UPDATE meta SET value = ?2 WHERE name = ?1",
        params![name, to_db(value)?],
    )
    .map_err(db_err)?;
    Ok(())
}

/// A change about to be appended to `events`.
struct PendingEvent {
    event_type: EventType,
    key: Key,
    object_revision: Revision,
    json: String,
}

fn event_type_db(t: EventType) -> &'static str {
    match t {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    }
}

fn commit_blocking(
    conn: &mut Connection,
    inner: &Inner,
    mut ops: Vec<Op>,
) -> Result<Vec<Stored>, Error> {
    check_ops(&mut ops)?;
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    // IMMEDIATE takes the write lock up front: reading the revision under a deferred transaction
    // and upgrading later could fail with SQLITE_BUSY without waiting for the busy timeout.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let next = meta_get(&tx, "revision")? + 1;
    let mut results = Vec::with_capacity(ops.len());
    let mut events = Vec::new();
    for op in ops {
        match op {
            Op::Create { key, mut value } => {
                if load(&tx, &key)?.is_some() {
                    return Err(Error::AlreadyExists(key));
                }
                if let Some(meta) = metadata_mut(&mut value) {
                    if meta.get("uid").is_none_or(Value::is_null) {
                        meta.insert(
                            "uid".to_owned(),
                            Value::String(uuid::Uuid::new_v4().to_string()),
                        );
                    }
                    if meta.get("creationTimestamp").is_none_or(Value::is_null) {
                        meta.insert(
                            "creationTimestamp".to_owned(),
                            Value::String(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)),
                        );
                    }
                }
                let json = serde_json::to_string(&value)
                    .map_err(|e| Error::Invalid(format!("{key}: {e}")))?;
                tx.execute(
                    "INSERT INTO resources (kind, namespace, name, revision, value) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![key.kind.as_str(), namespace_db(&key), key.name, to_db(next)?, json],
                )
                .map_err(db_err)?;
                let row = Row {
                    revision: next,
                    doc: value,
                    json,
                };
                results.push(row.stored(key.clone()));
                events.push(PendingEvent {
                    event_type: EventType::Added,
                    key,
                    object_revision: next,
                    json: row.json,
                });
            }
            Op::Update {
                key,
                mut value,
                expected,
            } => {
                let Some(current) = load(&tx, &key)? else {
                    return Err(Error::NotFound(key));
                };
                check_expected(&key, expected, current.revision)?;
                // The identity of an object is the store's, not the client's.
                if let (Some(meta), Some(stored_meta)) = (
                    metadata_mut(&mut value),
                    current.doc["metadata"].as_object(),
                ) {
                    for field in ["uid", "creationTimestamp"] {
                        if let Some(v) = stored_meta.get(field) {
                            meta.insert(field.to_owned(), v.clone());
                        }
                    }
                }
                if value == current.doc {
                    results.push(current.stored(key));
                    continue;
                }
                let json = serde_json::to_string(&value)
                    .map_err(|e| Error::Invalid(format!("{key}: {e}")))?;
                tx.execute(
                    "UPDATE resources SET revision = ?4, value = ?5 WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![key.kind.as_str(), namespace_db(&key), key.name, to_db(next)?, json],
                )
                .map_err(db_err)?;
                let row = Row {
                    revision: next,
                    doc: value,
                    json,
                };
                results.push(row.stored(key.clone()));
                events.push(PendingEvent {
                    event_type: EventType::Modified,
                    key,
                    object_revision: next,
                    json: row.json,
                });
            }
            Op::Delete { key, expected } => {
                let Some(current) = load(&tx, &key)? else {
                    return Err(Error::NotFound(key));
                };
                check_expected(&key, expected, current.revision)?;
                tx.execute(
                    "DELETE FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![key.kind.as_str(), namespace_db(&key), key.name],
                )
                .map_err(db_err)?;
                results.push(current.stored(key.clone()));
                events.push(PendingEvent {
                    event_type: EventType::Deleted,
                    key,
                    object_revision: current.revision,
                    json: current.json,
                });
            }
        }
    }
    if events.is_empty() {
        // Every op was a no-op: dropping the transaction rolls it back, nothing was written.
        return Ok(results);
    }
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO events (revision, idx, ops, type, kind, namespace, name, object_revision, value)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .map_err(db_err)?;
        let count = events.len() as i64;
        for (idx, ev) in events.iter().enumerate() {
            insert
                .execute(params![
                    to_db(next)?,
                    idx as i64,
                    count,
                    event_type_db(ev.event_type),
                    ev.key.kind.as_str(),
                    namespace_db(&ev.key),
                    ev.key.name,
                    to_db(ev.object_revision)?,
                    ev.json,
                ])
                .map_err(db_err)?;
        }
    }
    meta_set(&tx, "revision", next)?;
    let options = &inner.options;
    if options.compact_every > 0 && next % options.compact_every == 0 && next > options.history {
        compact_tx(&tx, next - options.history)?;
    }
    tx.commit().map_err(db_err)?;
    Ok(results)
}

fn check_expected(key: &Key, expected: Option<Revision>, actual: Revision) -> Result<(), Error> {
    match expected {
        Some(expected) if expected != actual => Err(Error::Conflict {
            key: key.clone(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Drops the events at and before `revision` unless already done.
fn compact_tx(tx: &Transaction<'_>, revision: Revision) -> Result<(), Error> {
    if revision <= meta_get(tx, "compacted")? {
        return Ok(());
    }
    tx.execute(
        "DELETE FROM events WHERE revision <= ?1",
        [to_db(revision)?],
    )
    .map_err(db_err)?;
    meta_set(tx, "compacted", revision)?;
    tracing::debug!(revision, "compacted the datastore history");
    Ok(())
}

fn list_blocking(conn: &mut Connection, request: &ListRequest) -> Result<Listing, Error> {
    if request.namespace.as_deref() == Some("") {
        return Err(Error::Invalid(
            "an empty namespace is not allowed; list every namespace instead".to_owned(),
        ));
    }
    // One read transaction: WAL gives it a snapshot, so the rows and the revision agree.
    let tx = conn.transaction().map_err(db_err)?;
    let revision = meta_get(&tx, "revision")?;
    let kind = request.kind.map(Kind::as_str);
    let namespace = request.namespace.as_deref();
    let sql = match (kind, namespace) {
        (Some(_), Some(_)) => {
            "SELECT kind, namespace, name, revision, value FROM resources WHERE kind = ?1 AND namespace = ?2"
        }
        (Some(_), None) => {
            "SELECT kind, namespace, name, revision, value FROM resources WHERE kind = ?1 AND ?2 IS NULL"
        }
        (None, Some(_)) => {
            "SELECT kind, namespace, name, revision, value FROM resources WHERE ?1 IS NULL AND namespace = ?2"
        }
        (None, None) => {
            "SELECT kind, namespace, name, revision, value FROM resources WHERE ?1 IS NULL AND ?2 IS NULL"
        }
    };
    let mut stmt = tx.prepare_cached(sql).map_err(db_err)?;
    let rows = stmt
        .query_map(params![kind, namespace], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
            ))
        })
        .map_err(db_err)?;
    let mut items = Vec::new();
    for row in rows {
        let (kind, namespace, name, revision, json) = row.map_err(db_err)?;
        let key = key_from_db(&kind, namespace, name)?;
        let revision = from_db(revision, &key)?;
        let value = document(&key, &json, revision)?;
        items.push(Stored {
            key,
            revision,
            value,
        });
    }
    // Key order (kind in `Kind` order, cluster-scoped before namespaced, then names), which is
    // not the order of the text columns.
    items.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Listing { items, revision })
}

#[async_trait::async_trait]
impl Datastore for SqliteDatastore {
    fn describe(&self) -> String {
        format!("sqlite://{}", self.inner.path.display())
    }

    async fn get(&self, key: &Key) -> Result<Stored, Error> {
        check_key(key)?;
        let key = key.clone();
        self.run(move |conn, _| match load(conn, &key)? {
            Some(row) => Ok(row.stored(key)),
            None => Err(Error::NotFound(key)),
        })
        .await
    }

    async fn list(&self, request: &ListRequest) -> Result<Listing, Error> {
        let request = request.clone();
        self.run(move |conn, _| list_blocking(conn, &request)).await
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<Stored>, Error> {
        self.run(move |conn, inner| commit_blocking(conn, inner, ops))
            .await
    }

    async fn revision(&self) -> Result<Revision, Error> {
        self.run(|conn, _| meta_get(conn, "revision")).await
    }

    async fn watch(&self, from: Revision) -> Result<WatchStream, Error> {
        to_db(from)?;
        let inner = Arc::clone(&self.inner);
        let conn = tokio::task::spawn_blocking(move || open_reader(&inner))
            .await
            .map_err(|e| Error::Unavailable(format!("the datastore task failed: {e}")))??;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let signal = CommitSignal::open(&self.inner.path);
        let poller = Poller {
            conn,
            signal,
            interval: self.inner.options.poll_interval,
            tx,
            position: Position {
                revision: from,
                idx: i64::MAX,
                complete: true,
            },
        };
        std::thread::Builder::new()
            .name("margay-watch".to_owned())
            .spawn(move || poller.run())
            .map_err(|e| Error::Unavailable(format!("cannot start a watch thread: {e}")))?;
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        self.run(move |conn, _| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let current = meta_get(&tx, "revision")?;
            if revision > current {
                return Err(Error::Invalid(format!(
                    "cannot compact at revision {revision}: the store is only at revision {current}"
                )));
            }
            compact_tx(&tx, revision)?;
            tx.commit().map_err(db_err)
        })
        .await
    }
}

/// Opens the dedicated connection of a watch poller.
fn open_reader(inner: &Inner) -> Result<Connection, Error> {
    let conn = Connection::open_with_flags(
        &inner.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_err(&inner.path, e))?;
    conn.busy_timeout(inner.options.busy_timeout)
        .map_err(|e| open_err(&inner.path, e))?;
    Ok(conn)
}

/// The last event a watch delivered.
#[derive(Clone, Copy, Debug)]
struct Position {
    revision: Revision,
    idx: i64,
    /// Whether every event of `revision` has been delivered.
    complete: bool,
}

impl Position {
    /// The newest revision whose events have all been delivered.
    fn done_through(self) -> Revision {
        if self.complete {
            self.revision
        } else {
            self.revision.saturating_sub(1)
        }
    }
}

/// Wakes a watch when the database's files are written (the main file, its `-wal` or
/// `-journal`), whichever process writes them: an inotify watch on their directory, which
/// outlives the `-wal` file being removed and created again.
struct CommitSignal {
    fd: OwnedFd,
    /// The database file's name; events about other files of the directory are ignored.
    name: Vec<u8>,
    buf: Vec<MaybeUninit<u8>>,
}

impl CommitSignal {
    /// None when inotify cannot watch the directory (too many watches, say): the watch then
    /// relies on its poll alone, which the log says.
    fn open(db: &Path) -> Option<CommitSignal> {
        let (Some(dir), Some(name)) = (db.parent(), db.file_name()) else {
            return None;
        };
        let watch = || -> rustix::io::Result<OwnedFd> {
            let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
            inotify::add_watch(&fd, dir, inotify::WatchFlags::MODIFY)?;
            Ok(fd)
        };
        match watch() {
            Ok(fd) => Some(CommitSignal {
                fd,
                name: name.as_encoded_bytes().to_vec(),
                buf: vec![MaybeUninit::uninit(); 4096],
            }),
            Err(e) => {
                tracing::info!(directory = %dir.display(), error = %e, "cannot watch the datastore's directory with inotify; watches see commits by polling alone");
                None
            }
        }
    }

    /// Waits up to `timeout` for a write to the database's files; true if one came.
    fn wait(&mut self, timeout: Duration) -> bool {
        // A timeout too long for a timespec waits for a write alone.
        let timespec = rustix::event::Timespec::try_from(timeout).ok();
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, timespec.as_ref()) {
            Ok(0) => false,
            Ok(_) => self.drain(),
            // EINTR and the like: the caller checks the store anyway.
            Err(_) => false,
        }
    }

    /// Reads every pending event; true if one was about the database's files.
    fn drain(&mut self) -> bool {
        let mut ours = false;
        let mut reader = inotify::Reader::new(&self.fd, &mut self.buf);
        while let Ok(event) = reader.next() {
            ours |= event
                .file_name()
                .is_some_and(|n| n.to_bytes().starts_with(&self.name));
        }
        ours
    }
}

/// The thread behind one watch.
struct Poller {
    conn: Connection,
    signal: Option<CommitSignal>,
    interval: Duration,
    tx: mpsc::Sender<Result<WatchEvent, Error>>,
    position: Position,
}

impl Poller {
    /// Delivers events until the stream is dropped or an error ends it.
    fn run(mut self) {
        let mut seen_version = None;
        // Until when to check every EAGER_STEP: a write was seen, its commit may not be yet.
        let mut eager_until: Option<Instant> = None;
        loop {
            if self.tx.is_closed() {
                return;
            }
            match self.data_version() {
                Err(e) => {
                    let _ = self.tx.blocking_send(Err(e));
                    return;
                }
                Ok(version) if seen_version == Some(version) => {}
                Ok(version) => {
                    seen_version = Some(version);
                    eager_until = None;
                    if !self.drain() {
                        return;
                    }
                }
            }
            let pause = match eager_until {
                Some(until) if Instant::now() < until => EAGER_STEP.min(self.interval),
                _ => self.interval,
            };
            let written = match &mut self.signal {
                Some(signal) => signal.wait(pause),
                None => {
                    std::thread::sleep(pause);
                    false
                }
            };
            if written {
                eager_until = Some(Instant::now() + EAGER_WINDOW);
            }
        }
    }

    /// Changes whenever another connection commits; reading it touches no table.
    fn data_version(&self) -> Result<i64, Error> {
        self.conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(db_err)
    }

    /// Delivers every event after the current position; false once the watch is over.
    fn drain(&mut self) -> bool {
        loop {
            let batch = match self.read_batch() {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = self.tx.blocking_send(Err(e));
                    return false;
                }
            };
            let full = batch.len() == WATCH_BATCH;
            for (position, event) in batch {
                if self.tx.blocking_send(Ok(event)).is_err() {
                    return false;
                }
                self.position = position;
            }
            if !full {
                return true;
            }
        }
    }

    /// Reads the next events in one snapshot, after checking that compaction has not removed any
    /// of them.
    fn read_batch(&mut self) -> Result<Vec<(Position, WatchEvent)>, Error> {
        let tx = self.conn.transaction().map_err(db_err)?;
        let compacted = meta_get(&tx, "compacted")?;
        let done = self.position.done_through();
        if done < compacted {
            return Err(Error::Compacted {
                requested: done,
                oldest: compacted,
            });
        }
        let mut stmt = tx
            .prepare_cached(
                "SELECT revision, idx, ops, type, kind, namespace, name, object_revision, value
                 FROM events WHERE (revision, idx) > (?1, ?2) ORDER BY revision, idx LIMIT ?3",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(
                params![
                    to_db(self.position.revision)?,
                    self.position.idx,
                    WATCH_BATCH as i64
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, String>(6)?,
                        row.get::<_, i64>(7)?,
                        row.get::<_, String>(8)?,
                    ))
                },
            )
            .map_err(db_err)?;
        let mut batch = Vec::new();
        for row in rows {
            let (revision, idx, ops, event_type, kind, namespace, name, object_revision, json) =
                row.map_err(db_err)?;
            let key = key_from_db(&kind, namespace, name)?;
            let event_type = match event_type.as_str() {
                "ADDED" => EventType::Added,
                "MODIFIED" => EventType::Modified,
                "DELETED" => EventType::Deleted,
                other => {
                    return Err(Error::Corrupt {
                        key: key.to_string(),
                        reason: format!("unknown event type {other:?} at revision {revision}"),
                    });
                }
            };
            let revision = from_db(revision, &key)?;
            let value = document(&key, &json, from_db(object_revision, &key)?)?;
            let complete = idx + 1 >= ops;
            batch.push((
                Position {
                    revision,
                    idx,
                    complete,
                },
                WatchEvent {
                    event_type,
                    revision,
                    key,
                    value,
                    commit_complete: complete,
                },
            ));
        }
        Ok(batch)
    }
}
