//! Where each kind lives in etcd: the one place that turns a [`Key`] into an etcd key and back.
//!
//! Calico's own kinds sit exactly where Calico's etcdv3 backend (libcalico-go) puts them, so that
//! `calicoctl` and `etcdctl` users find them where they expect:
//!
//! ```text
//! /calico/resources/v3/projectcalico.org/<plural>/<name>
//! /calico/resources/v3/projectcalico.org/<plural>/<namespace>/<name>
//! ```
//!
//! Everything else (the operator's Installation, the Kubernetes kinds Margay keeps for clusters
//! without Kubernetes, and Calico's IPAM kinds) lives under a prefix of our own, grouped by API
//! group the way Kubernetes groups them (`core` for the unnamed core group):
//!
//! ```text
//! /margay/resources/v1/<group>/<plural>/<name>
//! /margay/resources/v1/<group>/<plural>/<namespace>/<name>
//! ```
//!
//! IPAM is not mirrored at Calico's `/calico/ipam/v2/...`: Calico stores libcalico-go's internal
//! model structs there (an `AllocationBlock`, an affinity `{"state": ...}`), not the
//! `crd.projectcalico.org/v1` objects Margay stores, and a block's etcd key is derived from its
//! CIDR rather than its name. Writing our documents at those keys would make Calico's IPAM
//! tooling misread them; a faithful mirror would be a translation layer of its own
//! (`docs/design/etcd.md`).
//!
//! Names and namespaces never contain `/` (Kubernetes names are DNS subdomains or labels), which
//! is what makes the mapping reversible; [`etcd_key`] refuses a key that breaks that.

use margay_api::Kind;
use margay_api::kind::CALICO_API_VERSION;

use crate::backend::{Error, Key};

/// Calico's etcdv3 prefix for `projectcalico.org/v3` kinds.
pub const CALICO_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";

/// Margay's prefix for every other kind. The `v1` is the version of this layout, so that a
/// future change of layout can live beside it during a migration.
pub const MARGAY_PREFIX: &str = "/margay/resources/v1/";

/// The start of the one key range a watch covers: see [`WATCH_RANGE_END`].
pub const WATCH_RANGE_START: &str = CALICO_PREFIX;

/// The end (exclusive) of the one key range a watch covers: from [`CALICO_PREFIX`] to the end of
/// [`MARGAY_PREFIX`]. One range, because etcd orders events only within one watcher: two
/// watchers (one per prefix) could deliver a later revision of one prefix before an earlier
/// revision of the other, and the contract promises revision order. Keys between the two
/// prefixes that are not ours (few in practice: Calico's and Margay's prefixes are
/// lexicographically close) are dropped by [`parse_etcd_key`].
pub const WATCH_RANGE_END: &str = "/margay/resources/v10";

/// Whether Calico itself stores this kind under `/calico/resources/v3/projectcalico.org/`.
pub fn is_calico_kind(kind: Kind) -> bool {
    kind.api_version() == CALICO_API_VERSION
}

/// The API group used in Margay's prefix: the part of `apiVersion` before the `/`, or `core`
/// for the core group (`v1`), as Kubernetes names it in its own documentation.
pub fn group(kind: Kind) -> &'static str {
    match kind.api_version().split_once('/') {
        Some((group, _version)) => group,
        None => "core",
    }
}

/// The etcd prefix holding every object of `kind`, ending in `/`.
pub fn kind_prefix(kind: Kind) -> String {
    if is_calico_kind(kind) {
        format!("{CALICO_PREFIX}{}/", kind.plural())
    } else {
        format!("{MARGAY_PREFIX}{}/{}/", group(kind), kind.plural())
    }
}

/// The etcd prefix holding the objects of a namespaced `kind` in `namespace`, ending in `/`.
pub fn namespace_prefix(kind: Kind, namespace: &str) -> String {
    format!("{}{namespace}/", kind_prefix(kind))
}

/// Refuses what no backend accepts, for reads and writes alike (as the SQLite backend does): an
/// empty name, an empty namespace.
pub fn check_key(key: &Key) -> Result<(), Error> {
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

/// Why `key` cannot be stored in this layout, if it cannot: a `/` in a name or namespace, or a
/// namespace on a cluster-scoped kind (or none on a namespaced one) would make the etcd key
/// ambiguous to read back. Reads of such a key find nothing; writes are refused.
pub fn unstorable(key: &Key) -> Option<String> {
    if key.name.contains('/') {
        return Some(format!("{key}: a name cannot contain '/'"));
    }
    match (&key.namespace, key.kind.is_namespaced()) {
        (Some(ns), _) if ns.contains('/') => Some(format!("{key}: a namespace cannot contain '/'")),
        (Some(_), false) => Some(format!(
            "{key}: a {} is cluster-scoped and has no namespace",
            key.kind
        )),
        (None, true) => Some(format!(
            "{key}: a {} lives in a namespace; name one",
            key.kind
        )),
        _ => None,
    }
}

/// The etcd key of `key`, for a write: fails on keys that [`parse_etcd_key`] could not read
/// back.
pub fn etcd_key(key: &Key) -> Result<String, Error> {
    check_key(key)?;
    if let Some(reason) = unstorable(key) {
        return Err(Error::Invalid(reason));
    }
    Ok(raw_etcd_key(key))
}

/// The etcd key of `key`, for a read: `None` when no object can be stored there, so that the
/// read finds nothing (as it would in any backend).
pub fn etcd_key_for_read(key: &Key) -> Result<Option<String>, Error> {
    check_key(key)?;
    Ok(unstorable(key).is_none().then(|| raw_etcd_key(key)))
}

fn raw_etcd_key(key: &Key) -> String {
    match &key.namespace {
        Some(ns) => format!("{}{}", namespace_prefix(key.kind, ns), key.name),
        None => format!("{}{}", kind_prefix(key.kind), key.name),
    }
}

/// The [`Key`] stored at `etcd_key`, or `None` for a key that is not one of ours: another
/// Calico kind (network policies, BGP peers, ...), another application's key inside the watched
/// range, or a malformed path.
pub fn parse_etcd_key(etcd_key: &[u8]) -> Option<Key> {
    let etcd_key = std::str::from_utf8(etcd_key).ok()?;
    Kind::ALL.into_iter().find_map(|kind| {
        let rest = etcd_key.strip_prefix(&kind_prefix(kind))?;
        let (namespace, name) = if kind.is_namespaced() {
            let (ns, name) = rest.split_once('/')?;
            (Some(ns), name)
        } else {
            (None, rest)
        };
        let key = Key::new(kind, namespace, name);
        (check_key(&key).is_ok() && unstorable(&key).is_none()).then_some(key)
    })
}

/// The first key after every key starting with `prefix` (etcd's "range end" for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // A prefix of only 0xff bytes: every key from it on.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_kinds_live_where_calico_puts_them() {
        for (key, expected) in [
            (
                Key::new(Kind::FelixConfiguration, None, "default"),
                "/calico/resources/v3/projectcalico.org/felixconfigurations/default",
            ),
            (
                Key::new(Kind::Node, None, "node-1"),
                "/calico/resources/v3/projectcalico.org/nodes/node-1",
            ),
            (
                Key::new(Kind::IPPool, None, "default-ipv4-ippool"),
                "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool",
            ),
            (
                Key::new(Kind::ClusterInformation, None, "default"),
                "/calico/resources/v3/projectcalico.org/clusterinformations/default",
            ),
        ] {
            assert_eq!(etcd_key(&key).unwrap(), expected);
            assert_eq!(parse_etcd_key(expected.as_bytes()), Some(key));
        }
    }

    #[test]
    fn other_kinds_live_under_margays_prefix_by_group() {
        for (key, expected) in [
            (
                Key::new(Kind::Installation, None, "default"),
                "/margay/resources/v1/operator.tigera.io/installations/default",
            ),
            (
                Key::new(Kind::Namespace, None, "kube-system"),
                "/margay/resources/v1/core/namespaces/kube-system",
            ),
            (
                Key::new(Kind::Service, Some("default"), "web"),
                "/margay/resources/v1/core/services/default/web",
            ),
            (
                Key::new(Kind::ConfigMap, Some("kube-system"), "cfg"),
                "/margay/resources/v1/core/configmaps/kube-system/cfg",
            ),
            (
                Key::new(Kind::Pod, Some("default"), "web-0"),
                "/margay/resources/v1/core/pods/default/web-0",
            ),
            (
                Key::new(Kind::EndpointSlice, Some("default"), "web-abcde"),
                "/margay/resources/v1/discovery.k8s.io/endpointslices/default/web-abcde",
            ),
            (
                Key::new(Kind::IPAMBlock, None, "10-244-0-0-26"),
                "/margay/resources/v1/crd.projectcalico.org/ipamblocks/10-244-0-0-26",
            ),
            (
                Key::new(Kind::BlockAffinity, None, "node-1-10-244-0-0-26"),
                "/margay/resources/v1/crd.projectcalico.org/blockaffinities/node-1-10-244-0-0-26",
            ),
        ] {
            assert_eq!(etcd_key(&key).unwrap(), expected);
            assert_eq!(parse_etcd_key(expected.as_bytes()), Some(key));
        }
    }

    #[test]
    fn every_kind_round_trips_and_falls_inside_the_watched_range() {
        for kind in Kind::ALL {
            let key = if kind.is_namespaced() {
                Key::new(kind, Some("ns"), "name")
            } else {
                Key::new(kind, None, "name")
            };
            let etcd = etcd_key(&key).unwrap();
            assert_eq!(parse_etcd_key(etcd.as_bytes()), Some(key), "{etcd}");
            assert!(
                etcd.as_str() >= WATCH_RANGE_START && etcd.as_bytes() < WATCH_RANGE_END.as_bytes(),
                "{etcd} is outside the watched range"
            );
        }
        assert_eq!(prefix_end(MARGAY_PREFIX), WATCH_RANGE_END.as_bytes());
    }

    #[test]
    fn foreign_and_malformed_keys_are_not_ours() {
        for foreign in [
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/allow",
            "/calico/resources/v3/projectcalico.org/felixconfigurations/",
            "/calico/resources/v3/projectcalico.org/felixconfigurations/a/b",
            "/calico/ipam/v2/assignment/ipv4/block/10.244.0.0-26",
            "/margay/resources/v1/core/services/default",
            "/margay/resources/v1/core/services/default/",
            "/margay/resources/v1/core/services/a/b/c",
            "/margay/resources/v1/core/namespaces/a/b",
            "/registry/services/specs/default/kubernetes",
        ] {
            assert_eq!(parse_etcd_key(foreign.as_bytes()), None, "{foreign}");
        }
        assert_eq!(
            parse_etcd_key(b"/calico/resources/v3/projectcalico.org/nodes/\xff"),
            None
        );
    }

    #[test]
    fn unstorable_keys_are_refused() {
        for key in [
            Key::new(Kind::IPPool, None, ""),
            Key::new(Kind::IPPool, None, "a/b"),
            Key::new(Kind::Service, Some(""), "web"),
            Key::new(Kind::Service, Some("a/b"), "web"),
            Key::new(Kind::Service, None, "web"),
            Key::new(Kind::IPPool, Some("default"), "p"),
        ] {
            assert!(matches!(etcd_key(&key), Err(Error::Invalid(_))), "{key:?}");
        }
        // Reads of a key that cannot be stored find nothing; empty names are still mistakes.
        assert_eq!(
            etcd_key_for_read(&Key::new(Kind::IPPool, Some("default"), "p")),
            Ok(None)
        );
        assert!(etcd_key_for_read(&Key::new(Kind::IPPool, None, "")).is_err());
    }

    #[test]
    fn prefix_ends_are_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(prefix_end(""), vec![0]);
    }
}
