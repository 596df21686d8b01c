//! Helpers shared by the integration tests that need them.

pub mod etcd;
pub mod proxy;
