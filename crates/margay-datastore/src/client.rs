//! The validating client every Margay program writes through.
//!
//! A backend stores whatever JSON it is given; this client makes sure that is only ever a valid
//! resource. Every write goes: manifests -> [`margay_api::prepare`] (kind, typed read, unknown
//! fields, defaults, validation) -> cross-object checks (namespaces exist, IP pools do not overlap,
//! no key twice) -> one atomic [`Datastore::commit`]. Any failure before or during the commit
//! leaves the store exactly as it was.
//!
//! Writes that do not carry a `resourceVersion` (apply, replace, patch, label) are still
//! compare-and-swap underneath: the client reads, computes, and commits against the revision it
//! read, retrying from the read when another writer got there first. That is what lets many
//! processes patch different fields of one object at once without losing any of them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use margay_api::patch::{PatchError, PatchType, apply_patch};
use margay_api::{Kind, Resource, ValidationError};
use serde_json::Value;

use crate::backend::{Datastore, Error, Key, ListRequest, Listing, Op, Revision, Stored};
use crate::registry::Allocations;

/// How many times a read-compute-commit is retried when other writers keep winning.
const MAX_ATTEMPTS: usize = 64;

/// From this many objects in one commit on, the client lists what is stored instead of reading
/// each key (see `Client::current_objects`).
const LIST_INSTEAD_OF_GET: usize = 32;

/// Namespaces Kubernetes refuses to delete.
const PROTECTED_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// What a client call can fail with; each displays as one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A manifest failed validation; `what` names it (`FelixConfiguration default`, or its
    /// position in a file when it has no usable name).
    #[error("{what}: {error}")]
    Invalid {
        what: String,
        error: ValidationError,
    },
    #[error("{what}: {error}")]
    Patch { what: String, error: PatchError },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] Error),
}

/// How a batch of manifests is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Every object must be new.
    Create,
    /// Every object must exist.
    Replace,
    /// Create what is missing, replace what exists.
    Apply,
}

/// The validating client; cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    store: Arc<dyn Datastore>,
}

impl Client {
    pub fn new(store: Arc<dyn Datastore>) -> Client {
        Client { store }
    }

    /// The backend, for watches and for programs that need the raw contract.
    pub fn store(&self) -> &Arc<dyn Datastore> {
        &self.store
    }

    /// Seeds an empty store with what a fresh install holds (see
    /// [`margay_api::defaults::fresh_install`]). A store that has ever been written is left
    /// alone, so a resource the user deleted stays deleted.
    pub async fn bootstrap(&self) -> Result<(), ClientError> {
        // A store is fresh when it has never held ClusterInformation `default` (the seed creates
        // it, as calico-node does). Not "revision 0": an empty etcd starts at revision 1, and a
        // shared one anywhere.
        let info = Key::new(Kind::ClusterInformation, None, "default");
        match self.store.get(&info).await {
            Ok(_) => return Ok(()),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if self.store.revision().await? != 0
            && !self
                .store
                .list(&ListRequest::default())
                .await?
                .items
                .is_empty()
        {
            // Written to, but without ClusterInformation: the user deleted it. Leave it deleted.
            return Ok(());
        }
        let guid = uuid::Uuid::new_v4().simple().to_string();
        let manifests = margay_api::defaults::fresh_install(&guid);
        match self.write(manifests, "default", WriteMode::Create).await {
            Ok(_) => Ok(()),
            // Another process seeded it between our check and our commit.
            Err(ClientError::Store(Error::AlreadyExists(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, key: &Key) -> Result<Stored, ClientError> {
        Ok(self.store.get(key).await?)
    }

    pub async fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Listing, ClientError> {
        let request = ListRequest {
            kind: Some(kind),
            namespace: namespace.map(str::to_owned),
        };
        Ok(self.store.list(&request).await?)
    }

    /// Validates every manifest, then writes them all in one atomic commit. Namespaced objects
    /// without a namespace go to `default_namespace`.
    pub async fn write(
        &self,
        manifests: Vec<Value>,
        default_namespace: &str,
        mode: WriteMode,
    ) -> Result<Vec<Stored>, ClientError> {
        let prepared = prepare_all(manifests, default_namespace)?;
        self.write_prepared(&prepared, mode).await
    }

    /// Writes many objects (tens of thousands of Services and EndpointSlices) in atomic batches
    /// of at most `batch_size` objects, for bulk loads such as the benchmarks' and scale tests'.
    ///
    /// Every manifest is validated (and checked for duplicates), and the whole input is planned
    /// once against the store as it is (namespaces exist, creates are new, requested addresses
    /// and ports are free) before anything is written, so bad input changes nothing. Each batch
    /// is then one [`Client::write`]-style commit with the same checks and registry allocations
    /// against a fresh read; objects a batch needs (its namespaces, addresses allocated by
    /// earlier batches) are seen because earlier batches are committed. A concurrent writer or a
    /// store failure part-way leaves the earlier batches written, and the error says how many
    /// objects were. Batches are lowered to what the store takes in one commit
    /// ([`Client::commit_batch`]: etcd refuses commits of more than its `--max-txn-ops`, 128 by
    /// default); SQLite takes thousands at once.
    pub async fn write_in_batches(
        &self,
        manifests: Vec<Value>,
        default_namespace: &str,
        mode: WriteMode,
        batch_size: usize,
    ) -> Result<usize, ClientError> {
        if batch_size == 0 {
            return Err(ClientError::Refused(
                "batch size must be at least 1".to_owned(),
            ));
        }
        let prepared = prepare_all(manifests, default_namespace)?;
        // The dry run: everything the batches will check, on the whole input, before any write.
        self.plan(&prepared, mode).await?;
        let mut written = 0;
        for batch in prepared.chunks(self.commit_batch(batch_size)) {
            match self.write_prepared(batch, mode).await {
                Ok(stored) => written += stored.len(),
                Err(e) if written > 0 => {
                    return Err(ClientError::Refused(format!(
                        "{e} (after {written} of {} objects were written in earlier batches)",
                        prepared.len()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// How many objects one commit of a bulk write may carry: `wanted`, lowered below the
    /// store's limit on operations per commit (etcd's `--max-txn-ops`, 128 by default), leaving
    /// room for the operations a commit adds to its objects (the address registry's lock, a
    /// linked FelixConfiguration).
    pub fn commit_batch(&self, wanted: usize) -> usize {
        const ADDED_OPS: usize = 8;
        match self.store.max_commit_ops() {
            Some(limit) => wanted.min(limit.saturating_sub(ADDED_OPS)).max(1),
            None => wanted.max(1),
        }
    }

    /// One atomic commit of already validated objects, re-planned when another writer wins.
    async fn write_prepared(
        &self,
        prepared: &[Prepared],
        mode: WriteMode,
    ) -> Result<Vec<Stored>, ClientError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let mut ops = self.plan(prepared, mode).await?;
            self.link_dataplane(&mut ops).await?;
            match self.store.commit(ops).await {
                // Report what was asked for, not the allocation lock the registry added.
                Ok(mut stored) => {
                    stored.truncate(prepared.len());
                    return Ok(stored);
                }
                // Someone changed an object between our read and our commit, and the user did not
                // pin a resourceVersion: read again and retry.
                Err(Error::Conflict { key, .. })
                    if attempt < MAX_ATTEMPTS && !pinned(prepared, &key) =>
                {
                    continue;
                }
                // Two first allocations raced to create the registry's lock object.
                Err(Error::AlreadyExists(key))
                    if attempt < MAX_ATTEMPTS && crate::registry::is_lock(&key) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ClientError::Refused(
            "gave up after too many concurrent modifications; try again".into(),
        ))
    }

    /// What is stored now under the batch's keys. Small batches read each key; large ones list
    /// each (kind, namespace) once, which is what makes bulk loads linear instead of one store
    /// round trip per object.
    async fn current_objects(
        &self,
        prepared: &[Prepared],
    ) -> Result<HashMap<Key, Stored>, ClientError> {
        let mut found = HashMap::new();
        if prepared.len() < LIST_INSTEAD_OF_GET {
            for p in prepared {
                match self.store.get(&p.key).await {
                    Ok(s) => {
                        found.insert(p.key.clone(), s);
                    }
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(found);
        }
        let wanted: HashSet<&Key> = prepared.iter().map(|p| &p.key).collect();
        let groups: HashSet<(Kind, Option<String>)> = prepared
            .iter()
            .map(|p| (p.key.kind, p.key.namespace.clone()))
            .collect();
        for (kind, namespace) in groups {
            let listing = self
                .store
                .list(&ListRequest {
                    kind: Some(kind),
                    namespace,
                })
                .await?;
            for item in listing.items {
                if wanted.contains(&item.key) {
                    found.insert(item.key.clone(), item);
                }
            }
        }
        Ok(found)
    }

    /// Turns prepared resources into commit operations against the store as it is now.
    async fn plan(&self, prepared: &[Prepared], mode: WriteMode) -> Result<Vec<Op>, ClientError> {
        let mut ops = Vec::with_capacity(prepared.len());
        let batch_namespaces: HashSet<&str> = prepared
            .iter()
            .filter(|p| p.key.kind == Kind::Namespace)
            .map(|p| p.key.name.as_str())
            .collect();
        let mut checked_namespaces = HashSet::new();
        let mut allocations = if prepared.iter().any(|p| p.key.kind == Kind::Service) {
            Some(Allocations::load(self.store.as_ref()).await?)
        } else {
            None
        };
        let mut current_objects = self.current_objects(prepared).await?;
        for p in prepared {
            if let Some(ns) = &p.key.namespace
                && !batch_namespaces.contains(ns.as_str())
                && checked_namespaces.insert(ns.clone())
            {
                let ns_key = Key::new(Kind::Namespace, None, ns);
                if let Err(Error::NotFound(_)) = self.store.get(&ns_key).await {
                    return Err(ClientError::Refused(format!(
                        "{}: namespace {ns:?} not found; create it first (margayctl create namespace {ns})",
                        p.what
                    )));
                }
            }
            if p.key.kind == Kind::IPPool {
                self.check_pool_overlap(p, prepared).await?;
            }
            let current = current_objects.remove(&p.key);
            let mut value = match &current {
                Some(current) => keep_status(p.value.clone(), &current.value),
                None => without_resource_version(p.value.clone()),
            };
            if let Some(allocations) = allocations.as_mut()
                && p.key.kind == Kind::Service
            {
                allocations.assign(&p.key, &mut value, current.as_ref().map(|c| &c.value))?;
            }
            let op = match (mode, current) {
                (WriteMode::Create, Some(_)) => {
                    return Err(Error::AlreadyExists(p.key.clone()).into());
                }
                (WriteMode::Create, None) => {
                    if p.pinned_revision.is_some() {
                        return Err(ClientError::Refused(format!(
                            "{}: metadata.resourceVersion must not be set when creating; remove it or use apply",
                            p.what
                        )));
                    }
                    Op::Create {
                        key: p.key.clone(),
                        value,
                    }
                }
                (WriteMode::Replace, None) => return Err(Error::NotFound(p.key.clone()).into()),
                (WriteMode::Apply, None) => Op::Create {
                    key: p.key.clone(),
                    value,
                },
                (WriteMode::Replace | WriteMode::Apply, Some(current)) => Op::Update {
                    key: p.key.clone(),
                    value,
                    expected: Some(p.pinned_revision.unwrap_or(current.revision)),
                },
            };
            ops.push(op);
        }
        if let Some(lock) = allocations.as_ref().and_then(Allocations::lock_op) {
            ops.push(lock);
        }
        Ok(ops)
    }

    /// Calico refuses IP pools that overlap: an address must have one pool.
    async fn check_pool_overlap(
        &self,
        p: &Prepared,
        batch: &[Prepared],
    ) -> Result<(), ClientError> {
        let Some(mine) = pool_cidr(&p.value) else {
            return Ok(());
        };
        let stored = self.list(Kind::IPPool, None).await?;
        let others = stored.items.iter().map(|s| (&s.key.name, &s.value)).chain(
            batch
                .iter()
                .filter(|b| b.key.kind == Kind::IPPool)
                .map(|b| (&b.key.name, &b.value)),
        );
        for (name, value) in others {
            if *name == p.key.name {
                continue;
            }
            if let Some(theirs) = pool_cidr(value)
                && (mine.contains(&theirs.network()) || theirs.contains(&mine.network()))
            {
                return Err(ClientError::Refused(format!(
                    "{}: spec.cidr: {mine} overlaps IPPool {name} ({theirs})",
                    p.what
                )));
            }
        }
        Ok(())
    }

    /// Deletes objects in one atomic commit. `expected` pins a revision per key. Deleting a
    /// Namespace deletes what is in it, in the same commit, as Kubernetes does.
    pub async fn delete(
        &self,
        keys: Vec<(Key, Option<Revision>)>,
        skip_missing: bool,
    ) -> Result<Vec<Stored>, ClientError> {
        for (key, _) in &keys {
            if key.kind == Kind::Namespace && PROTECTED_NAMESPACES.contains(&key.name.as_str()) {
                return Err(ClientError::Refused(format!(
                    "namespace {:?} is a system namespace and cannot be deleted",
                    key.name
                )));
            }
        }
        for attempt in 1..=MAX_ATTEMPTS {
            let mut ops = Vec::new();
            let mut seen = HashSet::new();
            for (key, expected) in &keys {
                if !seen.insert(key.clone()) {
                    continue;
                }
                let current = match self.store.get(key).await {
                    Ok(s) => s,
                    Err(Error::NotFound(_)) if skip_missing => continue,
                    Err(e) => return Err(e.into()),
                };
                if key.kind == Kind::Namespace {
                    let contents = self
                        .store
                        .list(&ListRequest {
                            kind: None,
                            namespace: Some(key.name.clone()),
                        })
                        .await?;
                    for item in contents
                        .items
                        .into_iter()
                        .filter(|i| i.key.kind.is_namespaced())
                    {
                        if seen.insert(item.key.clone()) {
                            ops.push(Op::Delete {
                                key: item.key,
                                expected: Some(item.revision),
                            });
                        }
                    }
                }
                ops.push(Op::Delete {
                    key: key.clone(),
                    expected: Some(expected.unwrap_or(current.revision)),
                });
            }
            if ops.is_empty() {
                return Ok(Vec::new());
            }
            match self.store.commit(ops).await {
                Ok(deleted) => {
                    // Report what the user named, not the cascade.
                    let named: HashSet<&Key> = keys.iter().map(|(k, _)| k).collect();
                    return Ok(deleted
                        .into_iter()
                        .filter(|s| named.contains(&s.key))
                        .collect());
                }
                Err(Error::Conflict { key, .. })
                    if attempt < MAX_ATTEMPTS
                        && !keys.iter().any(|(k, e)| *k == key && e.is_some()) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ClientError::Refused(
            "gave up after too many concurrent modifications; try again".into(),
        ))
    }

    /// Patches one object: read, patch, validate, compare-and-swap, retried when another writer
    /// got in between (unless the patch itself pins a resourceVersion).
    pub async fn patch(
        &self,
        key: &Key,
        patch: &str,
        patch_type: PatchType,
    ) -> Result<Stored, ClientError> {
        let what = describe_key(key);
        self.modify(key, |current| {
            apply_patch(current, patch, patch_type).map_err(|error| ClientError::Patch {
                what: what.clone(),
                error,
            })
        })
        .await
    }

    /// Read-modify-write of one object through `change`, validated and compare-and-swapped, with
    /// retries. The object's identity (apiVersion, kind, name, namespace) may not change.
    pub async fn modify<F>(&self, key: &Key, mut change: F) -> Result<Stored, ClientError>
    where
        F: FnMut(&Value) -> Result<Value, ClientError>,
    {
        let what = describe_key(key);
        for attempt in 1..=MAX_ATTEMPTS {
            let current = self.store.get(key).await?;
            let mut changed = change(&current.value)?;
            if key.kind == Kind::Service {
                crate::registry::drop_type_dependent_fields(&current.value, &mut changed);
            }
            check_identity(&what, &current.value, &changed)?;
            let pinned = match changed["metadata"]["resourceVersion"].as_str() {
                Some(rv) if rv != current.revision.to_string() => {
                    Some(rv.parse::<Revision>().map_err(|_| ClientError::Invalid {
                        what: what.clone(),
                        error: ValidationError::new(
                            "metadata.resourceVersion",
                            format!("{rv:?} is not a resourceVersion this datastore issued"),
                        ),
                    })?)
                }
                _ => None,
            };
            let namespace = key.namespace.as_deref().unwrap_or("default");
            let resource =
                margay_api::prepare(changed, namespace).map_err(|error| ClientError::Invalid {
                    what: what.clone(),
                    error,
                })?;
            let mut value = without_resource_version(resource.to_value());
            let mut ops = Vec::with_capacity(2);
            if key.kind == Kind::Service {
                let mut allocations = Allocations::load(self.store.as_ref()).await?;
                allocations.assign(key, &mut value, Some(&current.value))?;
                ops.extend(allocations.lock_op());
            }
            ops.insert(
                0,
                Op::Update {
                    key: key.clone(),
                    value,
                    expected: Some(pinned.unwrap_or(current.revision)),
                },
            );
            self.link_dataplane(&mut ops).await?;
            match self.store.commit(ops).await {
                Ok(stored) => {
                    return stored.into_iter().next().ok_or_else(|| {
                        ClientError::Refused("the datastore returned nothing".into())
                    });
                }
                Err(Error::Conflict { .. }) if pinned.is_none() && attempt < MAX_ATTEMPTS => {
                    continue;
                }
                Err(Error::AlreadyExists(key))
                    if attempt < MAX_ATTEMPTS && crate::registry::is_lock(&key) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ClientError::Refused(
            "gave up after too many concurrent modifications; try again".into(),
        ))
    }
}

/// The annotation Calico's operator puts on FelixConfiguration `default` when it manages
/// `bpfEnabled` from the Installation.
pub const BPF_ENABLED_ANNOTATION: &str = "operator.tigera.io/bpfEnabled";

impl Client {
    /// Keeps Installation `default`'s `linuxDataplane` and FelixConfiguration `default`'s
    /// `bpfEnabled` in step, as Calico's operator does, inside the same commit: a write of the
    /// Installation sets `bpfEnabled` (and the operator's annotation) to follow it; a write that
    /// changes `bpfEnabled` moves the Installation along; one commit writing both in
    /// contradiction is refused with a message naming both.
    async fn link_dataplane(&self, ops: &mut Vec<Op>) -> Result<(), ClientError> {
        let installation = Key::new(Kind::Installation, None, "default");
        let felix = Key::new(Kind::FelixConfiguration, None, "default");
        let position = |ops: &[Op], key: &Key| {
            ops.iter().position(|op| {
                matches!(op, Op::Create { key: k, .. } | Op::Update { key: k, .. } if k == key)
            })
        };
        let dataplane_of = |inst: &Value| -> String {
            inst["spec"]["calicoNetwork"]["linuxDataplane"]
                .as_str()
                .unwrap_or("Iptables")
                .to_owned()
        };
        match (position(ops, &installation), position(ops, &felix)) {
            (None, None) => Ok(()),
            (Some(i), Some(f)) => {
                let dp = value_mut(&mut ops[i])
                    .map(|v| dataplane_of(v))
                    .unwrap_or_default();
                let Some(fv) = value_mut(&mut ops[f]) else {
                    return Ok(());
                };
                if let Some(bpf) = fv["spec"]["bpfEnabled"].as_bool()
                    && bpf != (dp == "BPF")
                {
                    return Err(ClientError::Refused(format!(
                        "FelixConfiguration default spec.bpfEnabled: {bpf} contradicts Installation default spec.calicoNetwork.linuxDataplane: {dp}; make them agree (or set only one: the other follows)"
                    )));
                }
                follow_dataplane(fv, &dp);
                Ok(())
            }
            (Some(i), None) => {
                let dp = value_mut(&mut ops[i])
                    .map(|v| dataplane_of(v))
                    .unwrap_or_default();
                let current = match self.store.get(&felix).await {
                    Ok(c) => c,
                    Err(Error::NotFound(_)) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                let mut next = current.value.clone();
                follow_dataplane(&mut next, &dp);
                if next != current.value {
                    ops.push(Op::Update {
                        key: felix,
                        value: without_resource_version(next),
                        expected: Some(current.revision),
                    });
                }
                Ok(())
            }
            (None, Some(f)) => {
                let Some(wanted) =
                    value_mut(&mut ops[f]).map(|v| v["spec"]["bpfEnabled"].as_bool())
                else {
                    return Ok(());
                };
                let stored_bpf = match self.store.get(&felix).await {
                    Ok(c) => c.value["spec"]["bpfEnabled"].as_bool(),
                    Err(Error::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                if wanted == stored_bpf {
                    return Ok(());
                }
                let current = match self.store.get(&installation).await {
                    Ok(c) => c,
                    Err(Error::NotFound(_)) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                let dp = if wanted == Some(true) {
                    "BPF"
                } else {
                    "Iptables"
                };
                if let Some(fv) = value_mut(&mut ops[f]) {
                    follow_dataplane(fv, dp);
                }
                if dataplane_of(&current.value) != dp {
                    let mut next = current.value.clone();
                    if !next["spec"]["calicoNetwork"].is_object() {
                        next["spec"]["calicoNetwork"] = Value::Object(Default::default());
                    }
                    next["spec"]["calicoNetwork"]["linuxDataplane"] = dp.into();
                    ops.push(Op::Update {
                        key: installation,
                        value: without_resource_version(next),
                        expected: Some(current.revision),
                    });
                }
                Ok(())
            }
        }
    }
}

/// The document an op writes, if it writes one.
fn value_mut(op: &mut Op) -> Option<&mut Value> {
    match op {
        Op::Create { value, .. } | Op::Update { value, .. } => Some(value),
        Op::Delete { .. } => None,
    }
}

/// Sets FelixConfiguration's `bpfEnabled` as the operator does for dataplane `dp`: `true` with
/// the operator's annotation for BPF; unset (false) without it otherwise.
fn follow_dataplane(felix: &mut Value, dp: &str) {
    let bpf = dp == "BPF";
    if let Some(spec) = felix["spec"].as_object_mut() {
        if bpf {
            spec.insert("bpfEnabled".into(), true.into());
        } else {
            spec.remove("bpfEnabled");
        }
    }
    let Some(meta) = felix["metadata"].as_object_mut() else {
        return;
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(a) = annotations.as_object_mut() {
        if bpf {
            a.insert(BPF_ENABLED_ANNOTATION.into(), "true".into());
        } else {
            a.remove(BPF_ENABLED_ANNOTATION);
        }
    }
    if annotations.as_object().is_some_and(|a| a.is_empty()) {
        meta.remove("annotations");
    }
}

/// A manifest that passed validation, ready to be written.
#[derive(Debug)]
struct Prepared {
    key: Key,
    /// The canonical object, without resourceVersion.
    value: Value,
    /// The resourceVersion the user's manifest carried, if any: a compare-and-swap they asked for.
    pinned_revision: Option<Revision>,
    what: String,
}

fn prepare_all(
    manifests: Vec<Value>,
    default_namespace: &str,
) -> Result<Vec<Prepared>, ClientError> {
    let count = manifests.len();
    let mut prepared: Vec<Prepared> = Vec::with_capacity(count);
    let mut seen: HashSet<Key> = HashSet::with_capacity(count);
    for (i, manifest) in manifests.into_iter().enumerate() {
        let fallback = if count > 1 {
            format!("resource {} of {count}", i + 1)
        } else {
            "resource".to_owned()
        };
        let what = describe_manifest(&manifest).unwrap_or(fallback);
        let resource = margay_api::prepare(manifest, default_namespace).map_err(|error| {
            ClientError::Invalid {
                what: what.clone(),
                error,
            }
        })?;
        let key = key_of(&resource);
        let what = describe_key(&key);
        if !seen.insert(key.clone()) {
            return Err(ClientError::Refused(format!(
                "{what} appears more than once in the input"
            )));
        }
        let pinned_revision = resource
            .metadata()
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty())
            .and_then(|rv| rv.parse().ok());
        prepared.push(Prepared {
            key,
            value: without_resource_version(resource.to_value()),
            pinned_revision,
            what,
        });
    }
    Ok(prepared)
}

fn pinned(prepared: &[Prepared], key: &Key) -> bool {
    prepared
        .iter()
        .any(|p| &p.key == key && p.pinned_revision.is_some())
}

/// The storage key of a validated resource.
pub fn key_of(resource: &Resource) -> Key {
    Key::new(resource.kind(), resource.namespace(), resource.name())
}

/// `FelixConfiguration default`, `Service yaobank/customer`.
pub fn describe_key(key: &Key) -> String {
    key.to_string()
}

fn describe_manifest(manifest: &Value) -> Option<String> {
    let kind = manifest["kind"].as_str()?;
    let name = manifest["metadata"]["name"].as_str()?;
    Some(match manifest["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

fn without_resource_version(mut value: Value) -> Value {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    value
}

/// Status is written by agents and controllers; a user's manifest without one (the usual case)
/// keeps the stored status rather than wiping it.
fn keep_status(mut value: Value, current: &Value) -> Value {
    if let (Some(map), Some(status)) = (value.as_object_mut(), current.get("status"))
        && !map.contains_key("status")
    {
        map.insert("status".into(), status.clone());
    }
    value
}

fn check_identity(what: &str, before: &Value, after: &Value) -> Result<(), ClientError> {
    for (path, a, b) in [
        ("apiVersion", &before["apiVersion"], &after["apiVersion"]),
        ("kind", &before["kind"], &after["kind"]),
        (
            "metadata.name",
            &before["metadata"]["name"],
            &after["metadata"]["name"],
        ),
        (
            "metadata.namespace",
            &before["metadata"]["namespace"],
            &after["metadata"]["namespace"],
        ),
    ] {
        if a != b {
            return Err(ClientError::Refused(format!(
                "{what}: the change would alter {path} from {a} to {b}; an object cannot be renamed or moved"
            )));
        }
    }
    Ok(())
}

fn pool_cidr(value: &Value) -> Option<ipnet::IpNet> {
    value["spec"]["cidr"].as_str()?.parse().ok()
}
