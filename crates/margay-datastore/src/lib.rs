//! Where Margay keeps its resources.
//!
//! [`Datastore`] is the contract every backend keeps (revisions, atomic compare-and-swap commits,
//! ordered watches); [`sqlite`] is the embedded default backend; [`sync`] turns list + watch into
//! a stream with an explicit [`SyncStatus`]; [`Client`] validates every write before it reaches
//! a backend.

pub mod backend;
pub mod client;
#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod etcd;
pub mod ipam;
pub mod open;
pub mod registry;
pub mod sqlite;
pub mod sync;

pub use backend::{
    Datastore, Error, EventType, Key, ListRequest, Listing, Op, Revision, Stored, WatchEvent,
    WatchStream,
};
pub use client::{Client, ClientError, WriteMode};
pub use etcd::{EtcdDatastore, EtcdOptions, EtcdTls};
pub use open::{DEFAULT_DATASTORE_URL, open};
pub use sqlite::{SqliteDatastore, SqliteOptions};
pub use sync::{SyncStatus, SyncStream, SyncUpdate};
