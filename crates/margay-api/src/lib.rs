//! Margay's resources: kinds, Calico-compatible types with their defaults, validation that
//! names the field at fault, and patch semantics. This crate does no I/O.
//!
//! A manifest becomes storable through [`prepare`]: kind check, typed read, unknown-field check,
//! defaults, validation. [`patch`] applies calicoctl's and kubectl's patch types to JSON.
//! [`defaults::fresh_install`] is what a new datastore holds.

pub mod calico;
pub mod defaults;
pub mod error;
pub mod k8s;
pub mod kind;
pub mod names;
pub mod object;
pub mod operator;
pub mod patch;
pub mod resource;
pub mod selector;
pub mod values;

pub use error::ValidationError;
pub use kind::Kind;
pub use resource::{Resource, prepare};

/// Margay's version, printed by `margayctl version` and recorded by agents.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
