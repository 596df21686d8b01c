//! The contract every datastore backend keeps.
//!
//! A backend stores resources as JSON documents under a [`Key`] and knows nothing of their
//! meaning: validation happens above it, in [`crate::Client`]. The contract is written for
//! etcd's model, which SQLite emulates, so that one suite of tests (`crate::contract`) holds
//! every backend to the same behaviour:
//!
//! - **Revisions.** The store has one revision counter, starting at 0 when empty. Every successful
//!   [`Datastore::commit`] that changes something increments it by exactly one; all the operations
//!   of that commit carry the new revision. An object's `metadata.resourceVersion` is the decimal
//!   revision of the commit that last wrote it (etcd's ModRevision).
//! - **Compare-and-swap.** [`Op::Update`] and [`Op::Delete`] may name the revision they expect the
//!   object to have; [`Op::Create`] expects the key to be absent. A commit is all or nothing: if
//!   any precondition fails nothing is written and [`Error::Conflict`] / [`Error::AlreadyExists`] /
//!   [`Error::NotFound`] names the first failing key. As in etcd, a commit names each key at most
//!   once ([`Error::Invalid`] otherwise), so no op depends on another op of the same commit.
//! - **Metadata.** On create the backend sets `metadata.uid` and `metadata.creationTimestamp` when
//!   they are absent; on update it keeps the stored ones (a client cannot change them). It never
//!   stores `metadata.resourceVersion` inside the document; it fills it in on every read, and
//!   ignores one given in a written document (the expected revision of an op is what counts).
//! - **No-op writes.** An update whose document equals the stored one (ignoring resourceVersion)
//!   writes nothing, does not advance the revision and emits no event.
//! - **Watch.** [`Datastore::watch`] from revision `R` delivers every change with a revision greater
//!   than `R`, in revision order, ops of one commit in commit order, without gaps or duplicates,
//!   for as long as the stream lives. If the history after `R` is no longer kept (compaction), the
//!   stream yields [`Error::Compacted`] first and ends: the caller must list again and watch from
//!   the listing's revision ([`crate::sync`] does exactly that and reports it as a
//!   [`crate::SyncStatus::Resyncing`]). If the backend loses its connection the stream yields
//!   [`Error::Unavailable`] and ends.
//! - **Listing.** [`Datastore::list`] returns a consistent snapshot and the revision it reflects,
//!   so that `watch(listing.revision)` continues exactly where the listing stopped.

use std::fmt;
use std::pin::Pin;

use futures::Stream;
use margay_api::Kind;
use serde_json::Value;

/// A position in the store's history; see the module documentation.
pub type Revision = u64;

/// Where an object lives: its kind, its namespace (for namespaced kinds) and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Key {
        Key {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    /// The key of a manifest, read from its `kind`, `metadata.namespace` and `metadata.name`.
    /// The document must already have passed validation.
    pub fn of(kind: Kind, value: &Value) -> Key {
        let meta = &value["metadata"];
        Key {
            kind,
            namespace: meta["namespace"].as_str().map(str::to_owned),
            name: meta["name"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// An object as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub key: Key,
    /// The revision of the commit that last wrote the object.
    pub revision: Revision,
    /// The whole object, with `metadata.resourceVersion` set to `revision`.
    pub value: Value,
}

/// One write inside an atomic [`Datastore::commit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Create the object; fails with [`Error::AlreadyExists`] if its key exists.
    Create { key: Key, value: Value },
    /// Replace the object; fails with [`Error::NotFound`] if absent, and with
    /// [`Error::Conflict`] if `expected` is set and differs from the stored revision.
    Update {
        key: Key,
        value: Value,
        expected: Option<Revision>,
    },
    /// Remove the object, under the same conditions as `Update`.
    Delete {
        key: Key,
        expected: Option<Revision>,
    },
}

impl Op {
    pub fn key(&self) -> &Key {
        match self {
            Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// What a listing returns: a snapshot and the revision it reflects.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing {
    pub items: Vec<Stored>,
    pub revision: Revision,
}

/// Which objects a listing returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListRequest {
    /// `None` lists every kind.
    pub kind: Option<Kind>,
    /// `None` lists every namespace (and the cluster-scoped objects when `kind` is `None`);
    /// `Some(ns)` lists only objects in `ns`, so never a cluster-scoped one.
    pub namespace: Option<String>,
}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as a watch delivers it.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchEvent {
    pub event_type: EventType,
    /// The revision of the commit that made the change.
    pub revision: Revision,
    pub key: Key,
    /// The object after the change; for `Deleted`, the object as it was last stored (its
    /// `metadata.resourceVersion` is the revision that last wrote it, not `revision`).
    pub value: Value,
    /// This is the last change of its commit the watch delivers: every change of `revision` is
    /// now out. Consumers that act per commit can act at once instead of waiting for a quiet
    /// spell. A backend that cannot tell leaves it false.
    pub commit_complete: bool,
}

/// A stream of changes; see [`Datastore::watch`].
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Error>> + Send>>;

/// What can go wrong in a backend. Messages are complete sentences for the user.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(Key),
    #[error("{0} already exists")]
    AlreadyExists(Key),
    #[error(
        "{key} was modified since it was read (resourceVersion {expected} is stale, the stored one is {actual}); read it again and retry"
    )]
    Conflict {
        key: Key,
        expected: Revision,
        actual: Revision,
    },
    #[error(
        "revision {requested} has been compacted (the oldest revision kept is {oldest}); list again"
    )]
    Compacted {
        requested: Revision,
        /// The oldest revision a watch can start from.
        oldest: Revision,
    },
    #[error("the datastore is unavailable: {0}")]
    Unavailable(String),
    #[error("the datastore holds a corrupt record for {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// A datastore backend. See the module documentation for the contract.
#[async_trait::async_trait]
pub trait Datastore: Send + Sync + fmt::Debug {
    /// One line saying which store this is (`sqlite:///var/lib/margay/margay.db`).
    fn describe(&self) -> String;

    /// The most operations one [`Datastore::commit`] may carry, when the store bounds it (etcd's
    /// `--max-txn-ops`); bulk writers split their input below it.
    fn max_commit_ops(&self) -> Option<usize> {
        None
    }

    /// Reads one object.
    async fn get(&self, key: &Key) -> Result<Stored, Error>;

    /// Lists objects as one consistent snapshot, ordered by key.
    async fn list(&self, request: &ListRequest) -> Result<Listing, Error>;

    /// Applies all `ops` atomically and returns what each wrote (for a delete, the object as it was
    /// last stored). An empty or entirely no-op commit returns the current objects without writing.
    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<Stored>, Error>;

    /// The store's current revision.
    async fn revision(&self) -> Result<Revision, Error>;

    /// Streams every change after revision `from`; see the module documentation.
    async fn watch(&self, from: Revision) -> Result<WatchStream, Error>;

    /// Forgets the history at and before `revision`: a later `watch(r)` with `r < revision` gets
    /// [`Error::Compacted`], while `watch(revision)` still works. Compacting at a revision already
    /// compacted is a no-op; beyond the current revision it is [`Error::Invalid`]. Backends also
    /// compact on their own to bound their size.
    async fn compact(&self, revision: Revision) -> Result<(), Error>;
}
