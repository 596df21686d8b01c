//! Attaching the programs: TC (TCX where the kernel has it, clsact otherwise) and cgroup v2,
//! with links pinned in bpffs so that they outlive the agent and a restarted agent adopts them.
//!
//! - TCX (Linux >= 6.6, commit e420bed02507 "bpf: Add fd-based tcx multi-prog infra with link
//!   support"): a BPF link per (interface, direction); pinned, it stays attached without any
//!   process; a new agent replaces its program atomically with `BPF_LINK_UPDATE`.
//! - clsact (older kernels): a netlink filter at a fixed priority and handle; it stays attached
//!   until removed; a new agent replaces it in place (same priority and handle).
//! - cgroup sock_addr: a BPF link per (cgroup, hook), attached in multi mode and pinned; a new
//!   agent attaches its program next to the old one, then drops the old link. Running both for a
//!   moment is harmless: the second translation finds a backend address, which is no frontend.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier,
    cgroup_sock_addr::CgroupSockAddrLink,
    links::{FdLink, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};

use crate::{CgroupProgram, Dataplane, Error, TcProgram, loader::prog_err};

/// How to attach a TC program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcMode {
    /// TCX, falling back to clsact when the kernel refuses TCX links.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// How a TC program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcLinkKind {
    Tcx,
    Clsact,
}

/// Priority of Margay's clsact filters (lower runs first); with a fixed handle, it names the
/// filter so that a restarted agent replaces it rather than adding a second one.
const CLSACT_PRIORITY: u16 = 1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x4d47); // "MG"

/// A TC program attached to an interface. Dropping it detaches the program, unless it was
/// [pinned](TcAttachment::pin).
///
/// Drop a clsact attachment in the network namespace it was attached in: the filter is removed
/// over netlink by interface index, in the namespace of the thread that drops it. (A TCX link is
/// a file descriptor and may be dropped anywhere.)
#[derive(Debug)]
pub struct TcAttachment {
    prog: TcProgram,
    iface: String,
    kind: TcLinkKind,
    link: Option<SchedClassifierLink>,
}

impl TcAttachment {
    pub fn kind(&self) -> TcLinkKind {
        self.kind
    }

    pub fn program(&self) -> TcProgram {
        self.prog
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Keeps the program attached after this process: a TCX link is pinned at `path`; a clsact
    /// filter simply stays in the qdisc (it has no link to pin; `path` is not created).
    pub fn pin(mut self, path: &Path) -> Result<(), Error> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        match self.kind {
            TcLinkKind::Tcx => {
                let fd: FdLink = link.try_into().map_err(|e| Error::Link {
                    path: path.to_owned(),
                    source: Box::new(e),
                })?;
                fd.pin(path).map_err(|source| Error::Pin {
                    path: path.to_owned(),
                    source,
                })?;
            }
            TcLinkKind::Clsact => {
                // Dropping the link would delete the filter; forgetting it keeps the filter.
                // It owns no file descriptor, so nothing leaks but a few bytes.
                std::mem::forget(link);
            }
        }
        Ok(())
    }
}

impl Dataplane {
    /// Attaches a TC program to `iface` (in the calling thread's network namespace).
    pub fn attach_tc(
        &mut self,
        prog: TcProgram,
        iface: &str,
        mode: TcMode,
    ) -> Result<TcAttachment, Error> {
        let p: &mut SchedClassifier = self
            .tc
            .program_mut(prog.name())
            .ok_or(Error::MissingProgram(prog.name()))?
            .try_into()
            .map_err(prog_err(prog.name()))?;
        let tcx = match mode {
            TcMode::Clsact => None,
            TcMode::Tcx | TcMode::Auto => Some(p.attach_with_options(
                iface,
                prog.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )),
        };
        let (id, kind) = match tcx {
            Some(Ok(id)) => (id, TcLinkKind::Tcx),
            Some(Err(e)) if mode == TcMode::Tcx => return Err(prog_err(prog.name())(e)),
            _ => (attach_clsact(p, prog, iface)?, TcLinkKind::Clsact),
        };
        let link = p.take_link(id).map_err(prog_err(prog.name()))?;
        Ok(TcAttachment {
            prog,
            iface: iface.to_owned(),
            kind,
            link: Some(link),
        })
    }

    /// Attaches a TC program to `iface` so that it stays attached after this process, adopting
    /// what a previous agent left: a TCX link pinned at `pin` gets this program atomically (no
    /// packet sees no program); a clsact filter of ours is replaced in place. Returns how the
    /// program is attached and whether an existing attachment was adopted.
    pub fn attach_tc_pinned(
        &mut self,
        prog: TcProgram,
        iface: &str,
        pin: &Path,
        mode: TcMode,
    ) -> Result<(TcLinkKind, bool), Error> {
        if pin.exists() {
            let p: &mut SchedClassifier = self
                .tc
                .program_mut(prog.name())
                .ok_or(Error::MissingProgram(prog.name()))?
                .try_into()
                .map_err(prog_err(prog.name()))?;
            let link_err = |e| Error::Link {
                path: pin.to_owned(),
                source: Box::new(e),
            };
            let old = PinnedLink::from_pin(pin).map_err(link_err)?;
            let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(link_err)?;
            let id = p.attach_to_link(link).map_err(prog_err(prog.name()))?;
            // The link is still pinned; dropping our handle of it does not detach it.
            let link = p.take_link(id).map_err(prog_err(prog.name()))?;
            let fd: FdLink = link.try_into().map_err(link_err)?;
            drop(fd);
            return Ok((TcLinkKind::Tcx, true));
        }
        let att = self.attach_tc(prog, iface, mode)?;
        let kind = att.kind();
        att.pin(pin)?;
        Ok((kind, false))
    }

    /// Attaches a cgroup program to the cgroup v2 directory `cgroup` (multi mode). Dropping the
    /// attachment detaches it unless it was [pinned](CgroupAttachment::pin).
    pub fn attach_cgroup(
        &mut self,
        prog: CgroupProgram,
        cgroup: &Path,
    ) -> Result<CgroupAttachment, Error> {
        let file = File::open(cgroup).map_err(|source| Error::Io {
            path: cgroup.to_owned(),
            source,
        })?;
        let p: &mut CgroupSockAddr = self
            .ctlb
            .program_mut(prog.name())
            .ok_or(Error::MissingProgram(prog.name()))?
            .try_into()
            .map_err(prog_err(prog.name()))?;
        // aya uses BPF links on Linux >= 5.7; the kernel refuses flags on cgroup links, which
        // always behave as BPF_F_ALLOW_MULTI, hence the default mode.
        let id = p
            .attach(&file, CgroupAttachMode::default())
            .map_err(prog_err(prog.name()))?;
        let link = p.take_link(id).map_err(prog_err(prog.name()))?;
        Ok(CgroupAttachment {
            prog,
            cgroup: cgroup.to_owned(),
            link: Some(link),
        })
    }

    /// Attaches a cgroup program and pins its link at `pin`, replacing (after the new one is in
    /// place) a link a previous agent pinned there. Returns whether one was replaced.
    pub fn attach_cgroup_pinned(
        &mut self,
        prog: CgroupProgram,
        cgroup: &Path,
        pin: &Path,
    ) -> Result<bool, Error> {
        let att = self.attach_cgroup(prog, cgroup)?;
        if !pin.exists() {
            att.pin(pin)?;
            return Ok(false);
        }
        let mut staging = pin.as_os_str().to_owned();
        staging.push("_new"); // bpffs refuses names with a dot
        let staging = PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        att.pin(&staging)?;
        let old = PinnedLink::from_pin(pin).map_err(|e| Error::Link {
            path: pin.to_owned(),
            source: Box::new(e),
        })?;
        // Unpinning the old link and dropping our last handle detaches the old program.
        let old = old.unpin().map_err(|source| Error::Io {
            path: pin.to_owned(),
            source,
        })?;
        drop(old);
        std::fs::rename(&staging, pin).map_err(|source| Error::Io {
            path: pin.to_owned(),
            source,
        })?;
        Ok(true)
    }
}

/// Names of the programs attached with TCX to `iface` in the direction `prog` attaches to (in
/// the calling thread's network namespace), in run order. Debian's bpftool 7.1 cannot show them.
pub fn tcx_programs(iface: &str, prog: TcProgram) -> Result<Vec<String>, Error> {
    let (_, infos) =
        SchedClassifier::query_tcx(iface, prog.attach_type()).map_err(prog_err(prog.name()))?;
    Ok(infos
        .iter()
        .map(|i| i.name_as_str().unwrap_or_default().to_owned())
        .collect())
}

/// Detaches every clsact filter of ours from `iface` (in the calling thread's network
/// namespace): each filter running one of Margay's TC programs, found by program name, whatever
/// its priority and handle. Returns how many were removed (0 when the interface has no clsact
/// qdisc or none of our filters).
///
/// Why by name and from the kernel rather than from what the agent remembers: a clsact filter
/// has no link to pin, so removing the pins (which detaches TCX links) leaves it in place, and a
/// restarted agent did not attach what an earlier one left. The qdisc itself stays: other
/// programs may have filters on it, and an empty clsact qdisc runs nothing.
pub fn detach_clsact(iface: &str) -> Result<usize, Error> {
    let mut removed = 0;
    for prog in TcProgram::ALL {
        match aya::programs::tc::qdisc_detach_program(iface, prog.attach_type(), prog.name()) {
            Ok(()) => removed += 1,
            // No filter of that name on this hook.
            Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            // No clsact qdisc on the interface (TCX mode, or never attached): nothing to dump.
            Err(TcError::NetlinkError(e)) if matches!(e.raw_os_error(), Some(ENOENT | EINVAL)) => {}
            Err(e) => return Err(prog_err(prog.name())(e.into())),
        }
    }
    Ok(removed)
}

/// The TCX programs attached to `iface` in the calling thread's network namespace, as the kernel
/// reports them: `[("ingress", IDs), ("egress", IDs)]`, IDs in run order. For tests and
/// diagnostics that must not trust the agent's own bookkeeping (Debian's bpftool 7.1 does not
/// list TCX attachments).
pub fn tcx_program_ids(iface: &str) -> Result<Vec<(&'static str, Vec<u32>)>, Error> {
    let mut out = Vec::new();
    for (hook, attach_type) in [
        ("ingress", aya::programs::TcAttachType::Ingress),
        ("egress", aya::programs::TcAttachType::Egress),
    ] {
        let (_, infos) =
            SchedClassifier::query_tcx(iface, attach_type).map_err(prog_err("tcx query"))?;
        out.push((hook, infos.iter().map(|i| i.id()).collect()));
    }
    Ok(out)
}

fn attach_clsact(
    p: &mut SchedClassifier,
    prog: TcProgram,
    iface: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId, Error> {
    match aya::programs::tc::qdisc_add_clsact(iface) {
        Ok(()) | Err(TcError::AlreadyAttached) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc_eexist()) => {}
        Err(e) => return Err(prog_err(prog.name())(e.into())),
    }
    let opts = || NlOptions {
        priority: CLSACT_PRIORITY,
        handle: CLSACT_HANDLE,
        classid: None,
    };
    match p.attach_with_options(iface, prog.attach_type(), TcAttachOptions::Netlink(opts())) {
        Ok(id) => Ok(id),
        Err(_) => {
            // Our filter is already there (a previous agent): replace its program in place.
            let link = SchedClassifierLink::attached(
                iface,
                prog.attach_type(),
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            )
            .map_err(|source| Error::Io {
                path: PathBuf::from(iface),
                source,
            })?;
            p.attach_to_link(link).map_err(prog_err(prog.name()))
        }
    }
}

const fn libc_eexist() -> i32 {
    17
}

/// Netlink's answers to a filter dump on an interface without a clsact qdisc.
const ENOENT: i32 = 2;
const EINVAL: i32 = 22;

/// A cgroup program attached to a cgroup. Dropping it detaches the program, unless it was
/// [pinned](CgroupAttachment::pin).
#[derive(Debug)]
pub struct CgroupAttachment {
    prog: CgroupProgram,
    cgroup: PathBuf,
    link: Option<CgroupSockAddrLink>,
}

impl CgroupAttachment {
    pub fn program(&self) -> CgroupProgram {
        self.prog
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Pins the link at `path`: the program stays attached after this process.
    pub fn pin(mut self, path: &Path) -> Result<(), Error> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        let fd: FdLink = link.try_into().map_err(|e| Error::Link {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        fd.pin(path).map_err(|source| Error::Pin {
            path: path.to_owned(),
            source,
        })?;
        Ok(())
    }
}
