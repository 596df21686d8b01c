//! Loading the embedded objects: map creation or adoption in the pin directory, load-time
//! constants, and every program through the verifier.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{CgroupSockAddr, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions},
};

use crate::{
    Error,
    maps::{self, MapSizes},
    objects,
};

/// `bpfLogLevel`: what the programs write to the kernel trace pipe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogLevel {
    #[default]
    Off,
    Info,
    Debug,
}

impl LogLevel {
    /// The value of the C constant `mg_log_level` (`MG_LOG_*`).
    pub const fn as_c(self) -> u32 {
        match self {
            LogLevel::Off => 0,
            LogLevel::Info => 1,
            LogLevel::Debug => 2,
        }
    }
}

/// `MG_LOG_RING_BYTES`: the size of the debug log ring buffer `mg_log`.
pub const LOG_RING_BYTES: u32 = 256 * 1024;

/// What to load and where to pin.
#[derive(Clone, Debug)]
pub struct Config {
    /// A directory on a bpffs where the maps are pinned by name (created if missing). Maps
    /// already pinned there with a compatible layout are adopted, with their contents.
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
    pub log_level: LogLevel,
    /// `bpfConnectTimeLoadBalancing: Enabled` (UDP too) rather than `TCP`.
    pub ctlb_udp: bool,
}

impl Config {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            sizes: MapSizes::default(),
            log_level: LogLevel::Off,
            ctlb_udp: false,
        }
    }
}

/// The TC programs of `bpf/progs/tc.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcProgram {
    /// Pod veth (host side), TC ingress: packets leaving the pod.
    FromWorkload,
    /// Pod veth (host side), TC egress: packets entering the pod.
    ToWorkload,
    /// Host data interface, TC ingress.
    FromHostIface,
    /// Host data interface, TC egress.
    ToHostIface,
    /// Tunnel device, TC ingress.
    FromTunnel,
    /// Tunnel device, TC egress.
    ToTunnel,
    /// WireGuard device (L3), TC ingress: our tunnel between nodes, decrypted, goes back to the
    /// underlay interface's ingress (where `FromHostIface` decapsulates it); nothing else.
    FromWireguard,
}

impl TcProgram {
    pub const ALL: [TcProgram; 7] = [
        TcProgram::FromWorkload,
        TcProgram::ToWorkload,
        TcProgram::FromHostIface,
        TcProgram::ToHostIface,
        TcProgram::FromTunnel,
        TcProgram::ToTunnel,
        TcProgram::FromWireguard,
    ];

    /// The function (and program) name in the object.
    pub const fn name(self) -> &'static str {
        match self {
            TcProgram::FromWorkload => "mg_from_wl",
            TcProgram::ToWorkload => "mg_to_wl",
            TcProgram::FromHostIface => "mg_from_hep",
            TcProgram::ToHostIface => "mg_to_hep",
            TcProgram::FromTunnel => "mg_from_tnl",
            TcProgram::ToTunnel => "mg_to_tnl",
            TcProgram::FromWireguard => "mg_from_wg",
        }
    }

    pub const fn attach_type(self) -> TcAttachType {
        match self {
            TcProgram::FromWorkload
            | TcProgram::FromHostIface
            | TcProgram::FromTunnel
            | TcProgram::FromWireguard => TcAttachType::Ingress,
            TcProgram::ToWorkload | TcProgram::ToHostIface | TcProgram::ToTunnel => {
                TcAttachType::Egress
            }
        }
    }
}

/// The cgroup sock_addr programs of `bpf/progs/connect_balancer.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupProgram {
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
}

impl CgroupProgram {
    pub const ALL: [CgroupProgram; 4] = [
        CgroupProgram::Connect4,
        CgroupProgram::Sendmsg4,
        CgroupProgram::Recvmsg4,
        CgroupProgram::Getpeername4,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            CgroupProgram::Connect4 => "mg_connect4",
            CgroupProgram::Sendmsg4 => "mg_sendmsg4",
            CgroupProgram::Recvmsg4 => "mg_recvmsg4",
            CgroupProgram::Getpeername4 => "mg_getpeername4",
        }
    }
}

/// The outcome of one BPF_PROG_TEST_RUN of a TC program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcRun {
    /// The program's return value (`TC_ACT_OK` = 0, `TC_ACT_SHOT` = 2).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// `skb->mark` after the program.
    pub mark: u32,
    /// Run time as the kernel measured it (average over the repeats).
    pub duration: Duration,
}

/// `TC_ACT_OK`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT` (what `bpf_redirect` returns).
pub const TC_ACT_REDIRECT: u32 = 7;

/// `sizeof(struct __sk_buff)` in the uapi this was written against; the kernel accepts a shorter
/// context and zero-fills the rest.
const SKB_CTX_LEN: usize = 192;
/// `offsetof(struct __sk_buff, mark)`.
const SKB_MARK_OFF: usize = 8;
/// `offsetof(struct __sk_buff, ingress_ifindex)`.
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
/// `offsetof(struct __sk_buff, ifindex)`.
const SKB_IFINDEX_OFF: usize = 40;
/// `offsetof(struct __sk_buff, gso_segs)`.
const SKB_GSO_SEGS_OFF: usize = 164;
/// `offsetof(struct __sk_buff, gso_size)`.
const SKB_GSO_SIZE_OFF: usize = 176;

/// What a BPF_PROG_TEST_RUN of a TC program starts from, beyond the packet: the fields of
/// `struct __sk_buff` the kernel takes as input that the programs read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcRunContext {
    /// `skb->mark`.
    pub mark: u32,
    /// The interface the packet is on (`skb->ifindex`, also `ingress_ifindex`), in the network
    /// namespace of the calling thread; 0 = that namespace's loopback. The programs' FIB lookups
    /// (tunnel mode) start from it, in that namespace.
    pub ifindex: u32,
    /// How many times to run on the same skb (see [`Dataplane::run_tc_repeat`]); 0 = once.
    pub repeat: u32,
    /// Make the skb a GSO packet of segments of this size (`skb_shinfo->gso_size`); 0 = not GSO.
    /// The kernel sets no GSO type for a test run.
    pub gso_size: u32,
}

/// The loaded programs and their maps.
#[derive(Debug)]
pub struct Dataplane {
    pub(crate) tc: Ebpf,
    pub(crate) ctlb: Ebpf,
    pin_dir: PathBuf,
    replaced_maps: Vec<&'static str>,
}

impl Dataplane {
    /// Creates (or adopts) the maps pinned in `config.pin_dir`, then loads every program of every
    /// embedded object through the verifier. Pinned maps whose type, key, value or size differ
    /// from what this build expects are removed and created anew (see [`Self::replaced_maps`]).
    pub fn load(config: &Config) -> Result<Self, Error> {
        std::fs::create_dir_all(&config.pin_dir).map_err(|source| Error::Io {
            path: config.pin_dir.clone(),
            source,
        })?;
        let replaced_maps = remove_incompatible_pins(&config.pin_dir, &config.sizes)?;

        let log_level = config.log_level.as_c();
        let ctlb_udp = u32::from(config.ctlb_udp);
        let sizes = config.sizes.by_name();

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&config.pin_dir);
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        loader.override_global("mg_log_level", &log_level, true);
        let mut tc = loader.load(objects::TC).map_err(|source| Error::Load {
            object: "tc.o",
            source: Box::new(source),
        })?;
        for p in TcProgram::ALL {
            let prog: &mut SchedClassifier = program_mut(&mut tc, p.name())?;
            prog.load().map_err(prog_err(p.name()))?;
        }

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&config.pin_dir);
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        loader.override_global("mg_log_level", &log_level, true);
        loader.override_global("mg_ctlb_udp", &ctlb_udp, true);
        let mut ctlb = loader
            .load(objects::CONNECT_BALANCER)
            .map_err(|source| Error::Load {
                object: "connect_balancer.o",
                source: Box::new(source),
            })?;
        for p in CgroupProgram::ALL {
            let prog: &mut CgroupSockAddr = program_mut(&mut ctlb, p.name())?;
            prog.load().map_err(prog_err(p.name()))?;
        }

        Ok(Self {
            tc,
            ctlb,
            pin_dir: config.pin_dir.clone(),
            replaced_maps,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Maps that were pinned with an incompatible layout or size and were created anew (their
    /// contents are lost; the agent rewrites NAT state, conntrack starts empty).
    pub fn replaced_maps(&self) -> &[&'static str] {
        &self.replaced_maps
    }

    /// Switches the debug log of packet decisions (`bpfLogLevel: Debug`) on or off at once for
    /// every TC program of this load: the TC object's global `mg_log_debug` (its `.bss`), the
    /// one branch the fast path pays when it is off. Read the events with
    /// [`maps::DecisionLog`].
    pub fn set_debug_log(&mut self, on: bool) -> Result<(), Error> {
        let name = ".bss";
        let map = self.tc.map_mut(name).ok_or(Error::MissingMap(name))?;
        let mut bss: aya::maps::Array<&mut aya::maps::MapData, u32> =
            aya::maps::Array::try_from(map).map_err(|source| Error::Map { name, source })?;
        bss.set(0, u32::from(on), 0)
            .map_err(|source| Error::Map { name, source })
    }

    /// Opens the typed maps (from their pins).
    pub fn maps(&self) -> Result<maps::Maps, Error> {
        maps::Maps::open(&self.pin_dir)
    }

    /// How many instructions the verifier processed to accept a TC program (its complexity; the
    /// kernel's limit is 1 000 000), and the size of its translated code in bytes.
    pub fn tc_complexity(&self, prog: TcProgram) -> Result<(Option<u32>, Option<u32>), Error> {
        let p: &SchedClassifier = self
            .tc
            .program(prog.name())
            .ok_or(Error::MissingProgram(prog.name()))?
            .try_into()
            .map_err(prog_err(prog.name()))?;
        let info = p.info().map_err(prog_err(prog.name()))?;
        Ok((info.verified_instruction_count(), info.size_translated()))
    }

    /// Runs a TC program once on `packet` with BPF_PROG_TEST_RUN, with `skb->mark` = `mark`.
    pub fn run_tc(&self, prog: TcProgram, packet: &[u8], mark: u32) -> Result<TcRun, Error> {
        self.run_tc_repeat(prog, packet, mark, 1)
    }

    /// As [`Self::run_tc`], `repeat` times on the same skb (the kernel reuses it: a program that
    /// rewrites the packet sees its own output from the second pass on).
    pub fn run_tc_repeat(
        &self,
        prog: TcProgram,
        packet: &[u8],
        mark: u32,
        repeat: u32,
    ) -> Result<TcRun, Error> {
        self.run_tc_with(
            prog,
            packet,
            &TcRunContext {
                mark,
                repeat,
                ..TcRunContext::default()
            },
        )
    }

    /// Runs a TC program on `packet` with BPF_PROG_TEST_RUN from the context `ctx`. The run
    /// happens in the calling thread's network namespace (FIB lookups, `ctx.ifindex`); a
    /// redirect is reported as the verdict [`TC_ACT_REDIRECT`], not carried out.
    pub fn run_tc_with(
        &self,
        prog: TcProgram,
        packet: &[u8],
        ctx: &TcRunContext,
    ) -> Result<TcRun, Error> {
        let (mark, repeat) = (ctx.mark, ctx.repeat.max(1));
        let p: &SchedClassifier = self
            .tc
            .program(prog.name())
            .ok_or(Error::MissingProgram(prog.name()))?
            .try_into()
            .map_err(prog_err(prog.name()))?;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        for off in [SKB_INGRESS_IFINDEX_OFF, SKB_IFINDEX_OFF] {
            ctx_in[off..off + 4].copy_from_slice(&ctx.ifindex.to_ne_bytes());
        }
        if let Some(segs) = u32::try_from(packet.len())
            .unwrap_or(u32::MAX)
            .checked_div(ctx.gso_size)
        {
            let segs = segs + 1;
            ctx_in[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&segs.to_ne_bytes());
            ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4]
                .copy_from_slice(&ctx.gso_size.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut out = vec![0u8; packet.len() + 256];
        let res = p
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(prog_err(prog.name()))?;
        out.truncate(res.data_size_out as usize);
        let mark = u32::from_ne_bytes([
            ctx_out[SKB_MARK_OFF],
            ctx_out[SKB_MARK_OFF + 1],
            ctx_out[SKB_MARK_OFF + 2],
            ctx_out[SKB_MARK_OFF + 3],
        ]);
        Ok(TcRun {
            verdict: res.return_value,
            packet: out,
            mark,
            duration: res.duration,
        })
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))
}

pub(crate) fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program {
        name,
        source: Box::new(source),
    }
}

/// What this build expects of each pinned map: type, key size, value size, max entries.
fn expected_maps(sizes: &MapSizes) -> Vec<(&'static str, MapType, usize, usize, u32)> {
    use maps::*;
    vec![
        (
            names::NAT_FRONTEND,
            MapType::LpmTrie,
            size_of::<NatFrontendKey>(),
            size_of::<NatFrontendValue>(),
            sizes.nat_frontend,
        ),
        (
            names::NAT_BACKEND,
            MapType::Hash,
            size_of::<NatBackendKey>(),
            size_of::<NatBackendValue>(),
            sizes.nat_backend,
        ),
        (
            names::NAT_AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            sizes.nat_affinity,
        ),
        (
            names::CONNTRACK,
            MapType::LruHash,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            sizes.conntrack,
        ),
        (
            names::ROUTES,
            MapType::LpmTrie,
            size_of::<RouteKey>(),
            size_of::<RouteValue>(),
            sizes.route,
        ),
        (
            names::IF_STATE,
            MapType::Hash,
            size_of::<IfStateKey>(),
            size_of::<IfStateValue>(),
            sizes.if_state,
        ),
        (
            names::COUNTERS,
            MapType::PerCpuArray,
            4,
            8,
            Reason::ALL.len() as u32 + 1,
        ),
        (
            names::CTLB_REV,
            MapType::LruHash,
            size_of::<CtlbRevKey>(),
            size_of::<CtlbRevValue>(),
            sizes.nat_affinity,
        ),
        (
            names::NODE_CONFIG,
            MapType::Array,
            4,
            size_of::<NodeConfig>(),
            1,
        ),
        (names::LOG, MapType::RingBuf, 0, 0, LOG_RING_BYTES),
        (
            names::DSR_OPTOUT,
            MapType::LpmTrie,
            size_of::<RouteKey>(),
            4,
            node_config::DSR_OPTOUT_MAX,
        ),
    ]
}

fn remove_incompatible_pins(dir: &Path, sizes: &MapSizes) -> Result<Vec<&'static str>, Error> {
    let mut replaced = Vec::new();
    for (name, ty, key, value, max) in expected_maps(sizes) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let ok = match MapInfo::from_pin(&path) {
            Ok(info) => {
                info.map_type().ok() == Some(ty)
                    && info.key_size() as usize == key
                    && info.value_size() as usize == value
                    && info.max_entries() == max
            }
            Err(_) => false,
        };
        if !ok {
            tracing::warn!(map = name, path = %path.display(), "pinned map incompatible with this build; recreating it");
            std::fs::remove_file(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            replaced.push(name);
        }
    }
    Ok(replaced)
}
