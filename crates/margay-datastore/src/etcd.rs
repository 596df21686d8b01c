//! The etcd backend: Margay's resources in an etcd v3 cluster, laid out as Calico lays them out.
//!
//! Past one machine the agents need a store they all reach, and etcd is the one Calico itself
//! supports outside Kubernetes. Keeping Calico's layout (see [`keys`]) means Calico's own tools
//! (`calicoctl` with `DATASTORE_TYPE=etcdv3`, `etcdctl`) read what Margay wrote, and the
//! contract of [`crate::backend`] maps onto etcd almost word for word, since it was written
//! from etcd's model:
//!
//! - **Revisions** are etcd's cluster revision. An object's `metadata.resourceVersion` is its
//!   key's ModRevision, as calicoctl shows it; the stored value is the object's JSON without
//!   `resourceVersion`. etcd counts its own bootstrap as revision 1, so an empty etcd is at
//!   revision 1, not 0, and other writers sharing the cluster advance the revision too: only
//!   "later commits have higher revisions" holds in general, "+1 per commit" only on an etcd
//!   that Margay alone writes.
//! - **Commits** are one etcd transaction: a compare per op (create: CreateRevision == 0;
//!   update and delete: ModRevision == the revision read) and the puts and deletes. The values
//!   read first serve three purposes: the precondition errors name the first failing op as the
//!   contract requires, updates keep the stored `uid` and `creationTimestamp`, and no-op updates
//!   write nothing (etcd would otherwise create a new revision for an identical value). If the
//!   transaction's compares fail, something changed between the read and the write: the commit
//!   reads again and either reports the precondition that now fails or retries.
//! - **Watches** are one etcd watch over one key range that covers both prefixes (so etcd
//!   delivers them in revision order), resumed from the last delivered revision after a lost
//!   connection (see [`watch`]); compaction ends them with [`Error::Compacted`].
//! - **Listings** are one read-only transaction of range reads, so every kind comes from one
//!   snapshot and the listing's revision is that snapshot's.
//!
//! Connections: several endpoints (requests are spread over them, and a request that could not
//! reach one is sent to another, see [`send`]), TLS with a CA and optionally a client
//! certificate, user and password (the token is refreshed when etcd expires it). A handle keeps
//! one gRPC connection per endpoint, reconnecting by itself; an operation made while no
//! endpoint answers fails with [`Error::Unavailable`]. A commit that fails that way after its
//! request left may or may not have been applied, which the error says: the caller reads again
//! (the validating client re-plans from what it reads).

pub mod keys;
mod watch;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use margay_api::Kind;
use serde_json::{Map, Value};

use crate::backend::{
    Datastore, Error, Key, ListRequest, Listing, Op, Revision, Stored, WatchStream,
};
use keys::{etcd_key, etcd_key_for_read, kind_prefix, namespace_prefix, parse_etcd_key};

/// The largest gRPC message this client accepts. tonic's default (4 MiB) is smaller than a
/// listing of a large cluster; etcd itself sends responses of any size.
const MAX_MESSAGE: usize = 512 * 1024 * 1024;

/// How often a commit re-reads and retries when its keys change between its read and its
/// transaction. Each retry means another writer's commit landed, so running out takes sustained
/// contention on the same keys.
const COMMIT_ATTEMPTS: usize = 64;

/// Where and how to reach etcd. Built from a datastore URL and calicoctl's environment by
/// [`crate::open()`], or by hand.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs: `http://host:port`, `https://host:port`, or one `unix:///path` (a socket).
    pub endpoints: Vec<String>,
    /// TLS settings; required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// etcd user name and password (etcd's `--auth` mode, calicoctl's `ETCD_USERNAME` and
    /// `ETCD_PASSWORD`).
    pub credentials: Option<(String, String)>,
    /// How long to wait for a TCP (and TLS) connection to an endpoint.
    pub connect_timeout: Duration,
    /// How long one request may take before it fails with [`Error::Unavailable`].
    pub request_timeout: Duration,
    /// How long a watch keeps trying to resume after losing its connection before it ends with
    /// [`Error::Unavailable`]. Resuming from the last delivered revision loses nothing, so short
    /// outages (a leader election, a member restart, moving to another endpoint) stay invisible
    /// to the watch's consumer; a longer one is reported so that [`crate::sync`] says
    /// `Resyncing` instead of claiming to be in sync with a store it cannot hear.
    pub watch_reconnect: Duration,
}

/// TLS files, as calicoctl names them (`ETCD_CA_CERT_FILE`, `ETCD_CERT_FILE`, `ETCD_KEY_FILE`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificates. Required: Margay does not fall back to
    /// the system's trust store, since an etcd cluster is almost always signed by a private CA.
    pub ca_cert_file: Option<PathBuf>,
    /// A client certificate, for etcd's `--client-cert-auth`; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// Options for `endpoints` (`host:port` or URLs) with the default timeouts, no TLS and no
    /// credentials.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints
                .iter()
                .map(|e| {
                    let e = e.as_ref();
                    if e.contains("://") {
                        e.to_owned()
                    } else {
                        format!("http://{e}")
                    }
                })
                .collect(),
            tls: None,
            credentials: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            watch_reconnect: Duration::from_secs(10),
        }
    }

    /// What [`Datastore::describe`] shows: the endpoints, whether TLS is on and the user, never
    /// the password.
    pub fn describe(&self) -> String {
        if let Some(socket) = self.unix_socket() {
            let mut text = format!("etcd+unix://{socket}");
            if let Some((user, _)) = &self.credentials {
                text.push_str(&format!(" (user {user})"));
            }
            return text;
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, rest)| rest))
            .collect();
        let scheme = if tls { "etcd+https" } else { "etcd" };
        let mut text = format!("{scheme}://{}", hosts.join(","));
        if let Some((user, _)) = &self.credentials {
            text.push_str(&format!(" (user {user})"));
        }
        text
    }
}

impl EtcdOptions {
    /// The socket path of a `unix://` endpoint, if there is one.
    pub fn unix_socket(&self) -> Option<&str> {
        self.endpoints
            .iter()
            .find_map(|e| e.strip_prefix("unix://"))
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("watch_reconnect", &self.watch_reconnect)
            .finish()
    }
}

/// The etcd backend. Cheap to clone behind an `Arc`; every handle made by
/// [`EtcdDatastore::connect`] has its own connections.
#[derive(Clone)]
pub struct EtcdDatastore {
    client: Client,
    options: EtcdOptions,
}

impl fmt::Debug for EtcdDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDatastore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl EtcdDatastore {
    /// Connects to etcd and checks that it answers (and accepts the credentials), so that a
    /// wrong address, certificate or password is reported here, once and clearly, rather than
    /// by the first operation. Later outages are survived: the connection is re-established on
    /// demand.
    pub async fn connect(options: EtcdOptions) -> Result<EtcdDatastore, Error> {
        if options.endpoints.is_empty() {
            return Err(Error::Invalid(
                "no etcd endpoint given; name at least one, as etcd://HOST:PORT".to_owned(),
            ));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // HTTP/2 pings notice a connection that died silently (a crashed host, a dropped
            // route) while a watch waits for events. Only while streams are open, and no more
            // often than etcd's --grpc-keepalive-min-time (5 s) allows: etcd answers pings
            // without streams, or too frequent ones, by closing the connection.
            .with_keep_alive(Duration::from_secs(15), Duration::from_secs(10))
            .with_keep_alive_while_idle(false)
            // A member cut off from the others cannot serve current data: refuse rather than
            // answer stale, and let the client move to another endpoint.
            .with_require_leader(true)
            // etcd's simple tokens expire after --auth-token-ttl (5 min) of inactivity.
            .with_auto_token_refresh(true);
        if let Some(tls) = &options.tls {
            if let Some(e) = options.endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(Error::Invalid(format!(
                    "the etcd endpoint {e} is plain HTTP but TLS files are configured; use \
                     https:// endpoints (etcd+https://...)"
                )));
            }
            connect = connect.with_tls(tls_options(tls)?);
        } else if let Some(e) = options.endpoints.iter().find(|e| e.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "the etcd endpoint {e} uses TLS: set ETCD_CA_CERT_FILE to the CA that signed \
                 its certificate"
            )));
        }
        if let Some((user, password)) = &options.credentials {
            connect = connect.with_user(user, password);
        }
        // Authentication (when configured) happens inside connect, on one of the endpoints.
        let unix = match options.unix_socket() {
            Some(_) if options.endpoints.len() > 1 => {
                return Err(Error::Invalid(format!(
                    "a unix socket endpoint cannot be mixed with others: {}",
                    options.endpoints.join(",")
                )));
            }
            Some(_) if options.tls.is_some() => {
                return Err(Error::Invalid(
                    "TLS over a unix socket is not supported; unset ETCD_CA_CERT_FILE, \
                     ETCD_CERT_FILE and ETCD_KEY_FILE"
                        .to_owned(),
                ));
            }
            Some(_) => Some(unix_channel(&options)?),
            None => None,
        };
        let client = send(&options, Retry::Unsent, || {
            let connect = connect.clone();
            let unix = unix.clone();
            let endpoints = &options.endpoints;
            async move {
                match unix {
                    Some(channel) => {
                        Client::from_channel(etcd_client::Channel::Tonic(channel), Some(connect))
                            .await
                    }
                    None => Client::connect(endpoints, Some(connect)).await,
                }
            }
        })
        .await
        .map_err(|failure| match failure {
            Failure::Etcd(e) => connect_err(&options, e),
            Failure::Timeout => timeout_err(&options, "the login"),
        })?;
        let store = EtcdDatastore { client, options };
        store.revision().await?;
        Ok(store)
    }

    /// The options this handle was made with.
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Sends one request (see [`send`]), mapping its failure.
    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, request: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        send(&self.options, retry, request)
            .await
            .map_err(|failure| match failure {
                Failure::Etcd(e) => request_err(&self.options, what, e),
                Failure::Timeout => timeout_err(&self.options, what),
            })
    }

    /// Reads `keys` in one snapshot: each key's current value (if any) and the snapshot's
    /// revision.
    async fn read_keys(&self, keys: &[String]) -> Result<(Vec<Option<KeyValue>>, i64), Error> {
        let txn = Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::get(k.as_bytes(), None))
                .collect::<Vec<_>>(),
        );
        let response = self
            .call("a read", Retry::Idempotent, || {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut values = Vec::with_capacity(keys.len());
        for op in response.op_responses() {
            match op {
                TxnOpResponse::Get(mut get) => values.push(get.take_kvs().into_iter().next()),
                other => {
                    return Err(Error::Unavailable(format!(
                        "etcd answered a read with {other:?}"
                    )));
                }
            }
        }
        Ok((values, revision))
    }

    /// One attempt at a commit: `Ok(None)` when the keys changed between the read and the
    /// transaction, so that the caller tries again.
    async fn try_commit(
        &self,
        ops: &[Op],
        etcd_keys: &[String],
    ) -> Result<Option<Vec<Stored>>, Error> {
        let (current, read_revision) = self.read_keys(etcd_keys).await?;
        let mut compares = Vec::with_capacity(ops.len());
        let mut writes = Vec::new();
        // Per op: the result if it writes nothing (a no-op or a delete), or the document it
        // writes (the result then gets the transaction's revision).
        let mut planned: Vec<Planned> = Vec::with_capacity(ops.len());
        for ((op, etcd_key), current) in ops.iter().zip(etcd_keys).zip(current) {
            let current = current
                .map(|kv| decode(op.key().clone(), &kv).map(|stored| (kv.mod_revision(), stored)))
                .transpose()?;
            match op {
                Op::Create { key, value } => {
                    if current.is_some() {
                        return Err(Error::AlreadyExists(key.clone()));
                    }
                    let mut value = value.clone();
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
                                Value::String(
                                    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
                                ),
                            );
                        }
                    }
                    compares.push(Compare::create_revision(
                        etcd_key.as_bytes(),
                        CompareOp::Equal,
                        0,
                    ));
                    writes.push(TxnOp::put(etcd_key.as_bytes(), encode(key, &value)?, None));
                    planned.push(Planned::Write(key.clone(), value));
                }
                Op::Update {
                    key,
                    value,
                    expected,
                } => {
                    let Some((mod_revision, stored)) = current else {
                        return Err(Error::NotFound(key.clone()));
                    };
                    check_expected(key, *expected, stored.revision)?;
                    compares.push(Compare::mod_revision(
                        etcd_key.as_bytes(),
                        CompareOp::Equal,
                        mod_revision,
                    ));
                    let mut value = value.clone();
                    // The identity of an object is the store's, not the client's.
                    if let (Some(meta), Some(stored_meta)) = (
                        metadata_mut(&mut value),
                        stored.value["metadata"].as_object(),
                    ) {
                        for field in ["uid", "creationTimestamp"] {
                            if let Some(v) = stored_meta.get(field) {
                                meta.insert(field.to_owned(), v.clone());
                            }
                        }
                    }
                    if value == without_resource_version(&stored.value) {
                        planned.push(Planned::Unchanged(stored));
                    } else {
                        writes.push(TxnOp::put(etcd_key.as_bytes(), encode(key, &value)?, None));
                        planned.push(Planned::Write(key.clone(), value));
                    }
                }
                Op::Delete { key, expected } => {
                    let Some((mod_revision, stored)) = current else {
                        return Err(Error::NotFound(key.clone()));
                    };
                    check_expected(key, *expected, stored.revision)?;
                    compares.push(Compare::mod_revision(
                        etcd_key.as_bytes(),
                        CompareOp::Equal,
                        mod_revision,
                    ));
                    writes.push(TxnOp::delete(etcd_key.as_bytes(), None));
                    planned.push(Planned::Unchanged(stored));
                }
            }
        }
        if writes.is_empty() {
            // Every op was a no-op: the read was a consistent snapshot, so answering from it is
            // as if the commit happened there.
            let read_revision = revision_from(read_revision)?;
            return Ok(Some(
                planned
                    .into_iter()
                    .map(|p| p.result(read_revision))
                    .collect(),
            ));
        }
        let txn = Txn::new().when(compares).and_then(writes);
        let response = self
            .call("a commit", Retry::Unsent, || {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| match e {
                Error::Unavailable(msg) => Error::Unavailable(format!(
                    "{msg}; the commit may or may not have been applied, read the objects again"
                )),
                other => other,
            })?;
        if !response.succeeded() {
            return Ok(None);
        }
        let revision = revision_from(response.header().map_or(0, |h| h.revision()))?;
        Ok(Some(
            planned.into_iter().map(|p| p.result(revision)).collect(),
        ))
    }
}

/// What a commit does with one op, decided from the values it read.
enum Planned {
    /// Nothing is written for this op (a no-op update), or what is returned is what was read
    /// (a delete).
    Unchanged(Stored),
    /// This document is written; its result carries the commit's revision.
    Write(Key, Value),
}

impl Planned {
    /// What the commit returns for this op, once it landed at `revision`.
    fn result(self, revision: Revision) -> Stored {
        match self {
            Planned::Unchanged(stored) => stored,
            Planned::Write(key, mut value) => {
                set_resource_version(&mut value, revision);
                Stored {
                    key,
                    revision,
                    value,
                }
            }
        }
    }
}

/// etcd's default `--max-txn-ops`.
pub const ETCD_MAX_TXN_OPS: usize = 128;

#[async_trait::async_trait]
impl Datastore for EtcdDatastore {
    /// etcd's default `--max-txn-ops`: a transaction with more compares or more writes is
    /// refused (each of our operations is one compare and at most one write). A cluster started
    /// with a higher limit still works with this one, only with more commits.
    fn max_commit_ops(&self) -> Option<usize> {
        Some(ETCD_MAX_TXN_OPS)
    }

    fn describe(&self) -> String {
        self.options.describe()
    }

    async fn get(&self, key: &Key) -> Result<Stored, Error> {
        let Some(etcd_key) = etcd_key_for_read(key)? else {
            return Err(Error::NotFound(key.clone()));
        };
        let mut response = self
            .call("a read", Retry::Idempotent, || {
                let (mut kv, key) = (self.kv(), etcd_key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        match response.take_kvs().into_iter().next() {
            Some(kv) => decode(key.clone(), &kv),
            None => Err(Error::NotFound(key.clone())),
        }
    }

    async fn list(&self, request: &ListRequest) -> Result<Listing, Error> {
        if request.namespace.as_deref() == Some("") {
            return Err(Error::Invalid(
                "an empty namespace is not allowed; list every namespace instead".to_owned(),
            ));
        }
        let kinds: Vec<Kind> = match request.kind {
            Some(kind) => vec![kind],
            None => Kind::ALL.to_vec(),
        };
        let prefixes: Vec<String> = kinds
            .into_iter()
            .filter_map(|kind| match (&request.namespace, kind.is_namespaced()) {
                (None, _) => Some(kind_prefix(kind)),
                (Some(ns), true) if !ns.contains('/') => Some(namespace_prefix(kind, ns)),
                // Namespaced listings never hold cluster-scoped objects.
                (Some(_), _) => None,
            })
            .collect();
        if prefixes.is_empty() {
            return Ok(Listing {
                items: Vec::new(),
                revision: self.revision().await?,
            });
        }
        // One transaction of range reads: one snapshot for every kind.
        let txn = Txn::new().and_then(
            prefixes
                .iter()
                .map(|p| TxnOp::get(p.as_bytes(), Some(GetOptions::new().with_prefix())))
                .collect::<Vec<_>>(),
        );
        let response = self
            .call("a listing", Retry::Idempotent, || {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        let revision = revision_from(response.header().map_or(0, |h| h.revision()))?;
        let mut items = Vec::new();
        for op in response.op_responses() {
            let TxnOpResponse::Get(get) = op else {
                return Err(Error::Unavailable(format!(
                    "etcd answered a listing with {op:?}"
                )));
            };
            for kv in get.kvs() {
                // Keys under our prefixes that are not ours (a deeper path) are skipped.
                if let Some(key) = parse_etcd_key(kv.key()) {
                    items.push(decode(key, kv)?);
                }
            }
        }
        // Key order (kind in `Kind` order, cluster-scoped before namespaced, then names), which
        // is not etcd's byte order of the paths.
        items.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { items, revision })
    }

    async fn commit(&self, mut ops: Vec<Op>) -> Result<Vec<Stored>, Error> {
        check_ops(&mut ops)?;
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let etcd_keys = ops
            .iter()
            .map(|op| etcd_key(op.key()))
            .collect::<Result<Vec<_>, _>>()?;
        for _ in 0..COMMIT_ATTEMPTS {
            if let Some(results) = self.try_commit(&ops, &etcd_keys).await? {
                return Ok(results);
            }
        }
        Err(Error::Unavailable(format!(
            "the commit lost the race for its keys {COMMIT_ATTEMPTS} times in a row (other \
             writers keep changing them); nothing was written, try again"
        )))
    }

    async fn revision(&self) -> Result<Revision, Error> {
        // Any read returns the cluster's current revision in its header; this one reads no
        // data, on a key inside our prefix so that an etcd role limited to it suffices.
        let response = self
            .call("a read", Retry::Idempotent, || {
                let mut kv = self.kv();
                async move {
                    kv.get(
                        keys::MARGAY_PREFIX,
                        Some(GetOptions::new().with_count_only()),
                    )
                    .await
                }
            })
            .await?;
        revision_from(response.header().map_or(0, |h| h.revision()))
    }

    async fn watch(&self, from: Revision) -> Result<WatchStream, Error> {
        watch::start(self.client.clone(), self.options.clone(), from).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        let current = self.revision().await?;
        if revision > current {
            return Err(Error::Invalid(format!(
                "cannot compact at revision {revision}: the store is only at revision {current}"
            )));
        }
        // The contract forgets history *at and before* `revision` (a watch from `revision` - 1
        // fails); etcd's compaction at C forgets what is *before* C (a watch starting at C
        // works). So compact at `revision` + 1, except at the current revision, which is as
        // far as etcd can go: there the last commit's changes stay watchable, which is more
        // than the contract promises and harms no one.
        let target = if revision < current {
            revision + 1
        } else {
            revision
        };
        let target = revision_to(target)?;
        // Compacting twice at one revision is harmless, so a lost answer may be retried.
        match send(&self.options, Retry::Idempotent, || {
            let mut kv = self.kv();
            async move { kv.compact(target, None).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            // Already compacted at or after `target`: nothing left to do.
            Err(Failure::Etcd(e)) if is_compacted(&e) => Ok(()),
            Err(Failure::Etcd(e)) => Err(request_err(&self.options, "a compaction", e)),
            Err(Failure::Timeout) => Err(timeout_err(&self.options, "a compaction")),
        }
    }
}

// === Documents ===

/// The stored object at `kv` with its resourceVersion filled in from the ModRevision.
fn decode(key: Key, kv: &KeyValue) -> Result<Stored, Error> {
    let etcd_key = String::from_utf8_lossy(kv.key()).into_owned();
    let mut value: Value = serde_json::from_slice(kv.value()).map_err(|e| Error::Corrupt {
        key: etcd_key.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    if !value.get("metadata").is_some_and(Value::is_object) {
        return Err(Error::Corrupt {
            key: etcd_key,
            reason: "the document has no metadata object".to_owned(),
        });
    }
    let revision = revision_from(kv.mod_revision()).map_err(|_| Error::Corrupt {
        key: etcd_key,
        reason: format!("ModRevision {} is not a revision", kv.mod_revision()),
    })?;
    set_resource_version(&mut value, revision);
    Ok(Stored {
        key,
        revision,
        value,
    })
}

/// The bytes stored for `value`: its JSON, which never holds a resourceVersion (`check_ops`
/// removed it).
fn encode(key: &Key, value: &Value) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::Invalid(format!("{key}: {e}")))
}

fn set_resource_version(value: &mut Value, revision: Revision) {
    if let Some(meta) = metadata_mut(value) {
        meta.insert(
            "resourceVersion".to_owned(),
            Value::String(revision.to_string()),
        );
    }
}

fn without_resource_version(value: &Value) -> Value {
    let mut value = value.clone();
    if let Some(meta) = metadata_mut(&mut value) {
        meta.shift_remove("resourceVersion");
    }
    value
}

fn metadata_mut(value: &mut Value) -> Option<&mut Map<String, Value>> {
    value.get_mut("metadata").and_then(Value::as_object_mut)
}

/// Rejects what no backend can store, before anything is read: the same rules as the SQLite
/// backend (one op per key, documents that are objects whose name and namespace match the key)
/// plus keys that this layout cannot hold.
fn check_ops(ops: &mut [Op]) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    for op in ops.iter_mut() {
        let key = op.key().clone();
        etcd_key(&key)?;
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
            // Never stored: it is the key's ModRevision, filled in on every read.
            meta.shift_remove("resourceVersion");
        }
    }
    Ok(())
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

/// A channel to etcd over the unix socket of `options` (tonic dials `unix://` endpoints itself;
/// etcd-client's own endpoint parsing only knows http and https). Connected lazily and again
/// after every loss, as the TCP channels are; keep-alive as in [`EtcdDatastore::connect`].
fn unix_channel(options: &EtcdOptions) -> Result<tonic::transport::Channel, Error> {
    let endpoint = options.endpoints[0].clone();
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|e| Error::Invalid(format!("the etcd endpoint {endpoint} is not usable: {e}")))?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false)
        .connect_lazy();
    Ok(channel)
}

// === Revisions ===

fn revision_from(revision: i64) -> Result<Revision, Error> {
    Revision::try_from(revision)
        .map_err(|_| Error::Unavailable(format!("etcd answered with revision {revision}")))
}

fn revision_to(revision: Revision) -> Result<i64, Error> {
    i64::try_from(revision)
        .map_err(|_| Error::Invalid(format!("revision {revision} is out of range")))
}

// === Connections and errors ===

/// Which failed requests [`send`] sends again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Only requests that never reached etcd (no connection could be made to the endpoint the
    /// client picked): the only retry that is safe for a write, whose lost answer could hide a
    /// commit that was applied.
    Unsent,
    /// Also requests whose answer was lost on the way back: safe for reads and anything else
    /// that can be repeated.
    Idempotent,
}

/// Why [`send`] gave up.
#[derive(Debug)]
pub(crate) enum Failure {
    Etcd(etcd_client::Error),
    Timeout,
}

/// Sends a request made by `request`, within the request timeout, retrying as `retry` allows.
///
/// Why retry at all: the client spreads requests over the endpoints and does not know which
/// ones are down, so with one member of three stopped a request fails now and then with a
/// connection error although the cluster is fine. A few quick retries (twice the number of
/// endpoints) get past the dead ones; when every endpoint is down they fail fast instead of
/// waiting out the timeout.
pub(crate) async fn send<T, F, Fut>(
    options: &EtcdOptions,
    retry: Retry,
    mut request: F,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + options.request_timeout;
    let attempts = 2 * options.endpoints.len() + 1;
    for attempt in 1.. {
        let e = match tokio::time::timeout_at(deadline, request()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => return Err(Failure::Timeout),
        };
        let again = match retry {
            Retry::Unsent => never_sent(&e),
            Retry::Idempotent => never_sent(&e) || transient(&e),
        };
        if !again || attempt >= attempts {
            return Err(Failure::Etcd(e));
        }
        let pause = Duration::from_millis(20 * attempt as u64);
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return Err(Failure::Etcd(e));
        }
    }
    unreachable!("the loop returns")
}

/// Whether `e` says no connection could be made, so that etcd never saw the request. tonic
/// reports it as a transport error or an `Unavailable` status whose source is a connect error.
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = format!("{e:?}");
    text.contains("ConnectError") || text.contains("tcp connect error")
}

/// Whether `e` may pass if the request is sent again: a lost connection or an unavailable
/// member (no leader, leader changed), not a refusal.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            matches!(status.code() as i32, grpc::UNAVAILABLE | grpc::CANCELLED)
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn timeout_err(options: &EtcdOptions, what: &str) -> Error {
    Error::Unavailable(format!(
        "etcd at {} did not answer {what} within {:?}",
        options.describe(),
        options.request_timeout
    ))
}

/// Reads the TLS files into tonic's settings, naming the file that cannot be used.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, Error> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            Error::Invalid(format!(
                "cannot read the etcd {what} {}: {e}",
                path.display()
            ))
        })
    };
    let Some(ca) = &tls.ca_cert_file else {
        return Err(Error::Invalid(
            "TLS to etcd needs the CA that signed its certificate: set ETCD_CA_CERT_FILE"
                .to_owned(),
        ));
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(
        ca,
        "CA certificate (ETCD_CA_CERT_FILE)",
    )?));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read(cert, "client certificate (ETCD_CERT_FILE)")?,
                read(key, "client key (ETCD_KEY_FILE)")?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(Error::Invalid(
                "ETCD_CERT_FILE is set without ETCD_KEY_FILE: a client certificate needs its key"
                    .to_owned(),
            ));
        }
        (None, Some(_)) => {
            return Err(Error::Invalid(
                "ETCD_KEY_FILE is set without ETCD_CERT_FILE: a client key needs its certificate"
                    .to_owned(),
            ));
        }
    }
    Ok(options)
}

/// What went wrong, in a few words: the error and its innermost cause, which is where tonic
/// keeps the useful part ("Connection refused", "invalid peer certificate: UnknownIssuer"),
/// plus a hint for the TLS failures whose cause is not obvious from the words alone.
fn cause(e: &etcd_client::Error, tls: bool) -> String {
    let (head, mut source): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::GRpcStatus(status) => (
            status.message().to_owned(),
            std::error::Error::source(status),
        ),
        other => (other.to_string(), std::error::Error::source(other)),
    };
    let mut innermost = None;
    while let Some(s) = source {
        innermost = Some(s.to_string());
        source = s.source();
    }
    let mut text = match innermost {
        Some(inner) if !head.contains(&inner) => format!("{head}: {inner}"),
        _ => head,
    };
    let debug = format!("{e:?}");
    if debug.contains("UnknownIssuer") || debug.contains("NotValidForName") {
        text.push_str(
            " (etcd's certificate is not signed by the CA in ETCD_CA_CERT_FILE, or not issued \
             for this address)",
        );
    } else if debug.contains("BadCertificate")
        || debug.contains("CertificateRequired")
        || debug.contains("UnknownCA")
    {
        text.push_str(
            " (etcd refused the client certificate: it requires one signed by its CA; check \
             ETCD_CERT_FILE and ETCD_KEY_FILE)",
        );
    } else if tls
        && [
            "connection closed",
            "broken pipe",
            "Broken pipe",
            "reset by peer",
        ]
        .iter()
        .any(|words| debug.contains(words))
    {
        // With TLS 1.3 the server checks the client certificate after the client considers
        // the handshake done, so a refused certificate often shows as a closed connection.
        text.push_str(
            " (etcd closed the connection; if it requires client certificates, check \
             ETCD_CERT_FILE and ETCD_KEY_FILE)",
        );
    }
    text
}

/// Maps an error of [`Client::connect`], which authenticates when credentials are set.
fn connect_err(options: &EtcdOptions, e: etcd_client::Error) -> Error {
    if let etcd_client::Error::GRpcStatus(status) = &e
        && status.message().contains("authentication failed")
    {
        let user = options.credentials.as_ref().map_or("", |(u, _)| u.as_str());
        return Error::Invalid(format!(
            "etcd at {} rejected the user {user:?} ({}); check ETCD_USERNAME and ETCD_PASSWORD",
            options.describe(),
            status.message()
        ));
    }
    request_err(options, "the login", e)
}

/// Maps an error of one request.
fn request_err(options: &EtcdOptions, what: &str, e: etcd_client::Error) -> Error {
    let describe = options.describe();
    let tls = options.tls.is_some();
    match &e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            match status.code() as i32 {
                grpc::INVALID_ARGUMENT if message.contains("too many operations") => {
                    Error::Invalid(format!(
                        "etcd refused {what}: {message} (etcd's --max-txn-ops, 128 by default, \
                         bounds the operations of one commit)"
                    ))
                }
                grpc::INVALID_ARGUMENT if message.contains("request is too large") => {
                    Error::Invalid(format!(
                        "etcd refused {what}: {message} (etcd's --max-request-bytes, 1.5 MiB by \
                         default, bounds one commit)"
                    ))
                }
                grpc::INVALID_ARGUMENT if message.contains("user name is empty") => {
                    Error::Invalid(format!(
                        "etcd at {describe} has authentication enabled: set ETCD_USERNAME and \
                         ETCD_PASSWORD"
                    ))
                }
                grpc::INVALID_ARGUMENT if message.contains("authentication failed") => {
                    Error::Invalid(format!(
                        "etcd at {describe} rejected the credentials: {message}; check \
                         ETCD_USERNAME and ETCD_PASSWORD"
                    ))
                }
                grpc::UNAUTHENTICATED => Error::Unavailable(format!(
                    "etcd at {describe} refused {what}: {message}; etcd requires a user: set \
                     ETCD_USERNAME and ETCD_PASSWORD"
                )),
                grpc::PERMISSION_DENIED => Error::Unavailable(format!(
                    "etcd at {describe} refused {what}: {message}; the user needs readwrite on \
                     the prefixes {} and {}, and read on the key range from the first to {} \
                     (docs/design/etcd.md)",
                    keys::CALICO_PREFIX,
                    keys::MARGAY_PREFIX,
                    keys::WATCH_RANGE_END
                )),
                grpc::OUT_OF_RANGE => Error::Invalid(format!("etcd refused {what}: {message}")),
                _ => Error::Unavailable(format!(
                    "etcd at {describe} failed {what}: {}",
                    cause(&e, tls)
                )),
            }
        }
        _ => Error::Unavailable(format!(
            "cannot reach etcd at {describe}: {}",
            cause(&e, tls)
        )),
    }
}

/// Whether `e` says the revision asked for has been compacted away.
fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("required revision has been compacted"))
}

/// The gRPC status codes this backend tells apart (they are part of gRPC's wire protocol, so
/// stable); named here rather than through a direct dependency on tonic for its `Code` enum.
mod grpc {
    pub const CANCELLED: i32 = 1;
    pub const UNAVAILABLE: i32 = 14;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNAUTHENTICATED: i32 = 16;
}
