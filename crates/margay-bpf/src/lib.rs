//! Margay's eBPF dataplane: the kube-proxy replacement in BPF.
//!
//! The C programs in `bpf/` are compiled by clang in `build.rs` and embedded ([`objects`]).
//! [`Dataplane::load`] creates or adopts their maps pinned in a bpffs directory and loads every
//! program through the verifier; [`maps::Maps`] gives typed access to the maps (the same API the
//! agent and the tests use); [`Dataplane::attach_tc`] and [`Dataplane::attach_cgroup`] attach
//! the programs, with pinned links that outlive the agent. See `docs/design/bpf-dataplane.md`.
//!
//! Everything here needs root (CAP_BPF, CAP_NET_ADMIN) and a kernel with BTF; the layout check
//! ([`layout`], [`maps::shared_layouts`]) does not.

mod attach;
pub mod layout;
mod loader;
pub mod maps;
pub mod objects;

use std::path::PathBuf;

pub use attach::{
    CgroupAttachment, TcAttachment, TcLinkKind, TcMode, detach_clsact, tcx_program_ids,
    tcx_programs,
};
pub use loader::{
    CgroupProgram, Config, Dataplane, LogLevel, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TcProgram,
    TcRun, TcRunContext,
};

/// Where the agent keeps its bpffs by default (`margay-node --bpffs-dir`); tools read the same.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/margay";

/// The directory under the agent's bpffs that holds the pinned maps ([`maps::Maps::open`]).
pub const MAPS_SUBDIR: &str = "maps";

/// Errors of this crate. aya's errors are boxed: they are large and this is not a hot path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading {object}: {source}")]
    Load {
        object: &'static str,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{what}: {count} entries, at most {max} fit")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
