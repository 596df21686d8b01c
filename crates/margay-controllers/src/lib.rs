//! The control loops a Kubernetes controller manager would run, for clusters that have none (the
//! lab, and single-machine installs): each a pure calculation (objects in, desired objects out,
//! unit-tested without I/O) and a reconcile function that reads the datastore through the
//! validating client and writes only the difference.
//!
//! - [`deployments`]: a Deployment's replicas as Pods, replaced when the template changes
//!   (`rollout restart` is a template annotation, as in kubectl).
//! - [`placement`]: which node a new Pod runs on.
//! - [`endpoints`]: Services and Pods to EndpointSlices, with the ready / serving / terminating
//!   conditions kube-proxy and the BPF dataplane read.
//! - [`dns`]: Services and Pods to the records cluster DNS serves.

pub mod deployments;
pub mod dns;
pub mod endpoints;
pub mod placement;
pub mod reconcile;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label saying who manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value for [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "margay-controllers";

/// A short stable hash of `text`, in lower-case base32-ish hex as Kubernetes' generated names use.
pub fn short_hash(text: &str, len: usize) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    digest
        .iter()
        .take(len)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}
