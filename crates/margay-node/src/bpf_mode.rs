//! The BPF dataplane on this node: the programs of `margay-bpf` loaded with their maps pinned
//! under the agent's bpffs directory, TC programs on the host data interfaces and on every pod
//! veth, connect-time load balancing on the node's cgroup, and the NAT maps kept equal to the
//! Services and EndpointSlices by margay-dataplane's driver (only differences are written).
//!
//! Pins make it restart-proof: a restarted agent adopts the maps (with their conntrack) and the
//! pinned links, so established flows go on while the agent is down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::FelixConfigurationSpec;
use margay_api::calico::node::{AttachmentStatus, MapFillStatus};
use margay_bpf::maps::MapSizes;
use margay_bpf::maps::RouteValue;
use margay_bpf::maps::ifstate::{IF_HOST, IF_READY, IF_TUNNEL, IF_WORKLOAD, IfStateValue};
use margay_bpf::maps::routes::{
    RT_IN_POOL, RT_LOCAL_HOST, RT_LOCAL_WL, RT_REMOTE_HOST, RT_REMOTE_WL, RT_WIREGUARD,
};
use margay_bpf::{CgroupProgram, Config, Dataplane, TcLinkKind, TcMode, TcProgram};
use margay_calc::NodeContext;
use margay_dataplane::bpf::{BpfNatDriver, ServicesSync, Timeouts, map_sizes};

use crate::wireguard::BpfPath;

/// How often expired and orphaned conntrack pairs are removed (Calico scans every 10 s).
const CONNTRACK_SCAN: Duration = Duration::from_secs(10);

/// Where the agent pins by default.
pub const DEFAULT_BPFFS_DIR: &str = margay_bpf::DEFAULT_BPFFS_DIR;

pub struct BpfDataplane {
    dp: Dataplane,
    driver: BpfNatDriver,
    pin_dir: PathBuf,
    /// TC programs attached: (interface, program name) -> the program, TCX or clsact.
    attached: BTreeMap<(String, &'static str), (TcProgram, TcLinkKind)>,
    /// The maps' sizes (`bpfMapSize*`), for their fill levels.
    sizes: MapSizes,
    /// Entries counted by the last periodic scan (conntrack, affinity, connect-time LB reverse
    /// map): counting is a full iteration, done with the conntrack cleanup every
    /// [`CONNTRACK_SCAN`], never per sync.
    scanned: BTreeMap<&'static str, usize>,
    /// What `mg_ifstate` holds, by ifindex.
    if_states: BTreeMap<u32, IfStateValue>,
    /// The WireGuard interface (name, ifindex) `mg_from_wg` is attached to.
    wireguard_link: Option<(String, u32)>,
    /// What `mg_routes` holds (adopted from the pin at start, then kept by difference).
    routes: BTreeMap<Ipv4Net, RouteValue>,
    last_scan: Instant,
    /// `bpfLogLevel: Debug` as last written to the programs.
    debug_log: bool,
    /// Stops the thread that logs the programs' packet decisions.
    log_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where connect-time load balancing attaches (None: it is off).
    ctlb_cgroup: Option<PathBuf>,
    /// Leaving BPF: no frontend, no connect-time load balancing; the programs only go on
    /// translating the flows they opened, until those end or [`DRAIN_LIMIT`] passes. When it
    /// started.
    draining: Option<Instant>,
    /// Whether the flows the kernel's conntrack NATed have been handed over (the first sync
    /// after taking over from iptables, or after coming back during a drain, seeds them).
    took_over: bool,
    /// How TC programs attach: TCX where the kernel has it (clsact otherwise), or as
    /// [`TC_ATTACH_ENV`] forces.
    tc_mode: TcMode,
    /// The node as the last full sync saw it, for one-Service syncs; `None` until a full sync
    /// has succeeded (and after a failed one, and while draining).
    context: Option<NodeContext>,
}

/// Test-only: `MARGAY_BPF_TC_ATTACH=clsact` (or `tcx`) forces how the agent attaches its TC
/// programs, so that the tests cover the clsact fallback on a kernel that has TCX. Not a user
/// setting: unset, the agent picks TCX and falls back to clsact by itself.
pub const TC_ATTACH_ENV: &str = "MARGAY_BPF_TC_ATTACH";

fn tc_mode_from_env() -> Result<TcMode> {
    match std::env::var(TC_ATTACH_ENV).as_deref() {
        Err(_) | Ok("" | "auto") => Ok(TcMode::Auto),
        Ok("tcx") => Ok(TcMode::Tcx),
        Ok("clsact") => Ok(TcMode::Clsact),
        Ok(other) => bail!("{TC_ATTACH_ENV}={other:?} is not one of auto, tcx, clsact"),
    }
}

/// How long a node leaving BPF keeps its programs attached for the flows they translated
/// (`--bpf-drain-limit`). Calico has no such setting (it restarts Felix and drops what BPF
/// translated); five minutes is the connection-draining time cloud load balancers default to
/// (AWS's deregistration delay, GCP's connection draining), long enough for requests in flight
/// and short enough that an idle kept-alive connection (up to `tcpEstablished`, 1 h) cannot
/// hold the node between dataplanes. When it passes, the remaining flows are cut (logged one by
/// one) and everything is removed.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(300);

impl Drop for BpfDataplane {
    fn drop(&mut self) {
        self.log_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often the decision log thread empties the ring buffer (it holds 256 KiB: ~6 500 events).
const DECISION_LOG_POLL: Duration = Duration::from_millis(100);

/// Logs every packet decision the programs write to `mg_log` (only while `bpfLogLevel` is
/// Debug), one line each, until `stop`.
fn spawn_decision_log(
    pin_dir: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let mut log = margay_bpf::maps::DecisionLog::open(pin_dir)
        .context("cannot open the decision log (mg_log)")?;
    std::thread::Builder::new()
        .name("bpf-decisions".to_owned())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for e in log.drain() {
                    tracing::info!(target: "margay_node::bpf_decision", "bpf decision: {e}");
                }
                std::thread::sleep(DECISION_LOG_POLL);
            }
        })
        .context("cannot start the decision log thread")?;
    Ok(())
}

impl std::fmt::Debug for BpfDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfDataplane")
            .field("pin_dir", &self.pin_dir)
            .field("attached", &self.attached.len())
            .finish()
    }
}

/// Mounts a bpffs at `dir` unless one is there already (bpffs is not always mounted, and the
/// agent may pin in a directory of its own).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next(), f.next(), f.next());
        kind == Some("bpf") && at.map(Path::new) == Some(canonical.as_path())
    });
    if !mounted {
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&canonical)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount bpffs at {}: {}",
                canonical.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        tracing::info!(dir = %canonical.display(), "mounted bpffs");
    }
    Ok(())
}

impl BpfDataplane {
    /// The load, after the other preflight checks (`crate::preflight`) passed: the verifier
    /// accepts the programs, the maps are created or adopted, connect-time load balancing
    /// attaches to `cgroup` (the cgroup v2 directory the preflight resolved; None when
    /// `bpfConnectTimeLoadBalancing` is Disabled).
    pub fn start(
        bpffs: &Path,
        felix: &FelixConfigurationSpec,
        cgroup: Option<PathBuf>,
    ) -> Result<Self> {
        let tc_mode = tc_mode_from_env()?;
        ensure_bpffs(bpffs)?;
        // Replies the programs SNAT back to a NodePort carry this node's own address as source
        // and are forwarded from a pod's veth: without accept_local the kernel drops them as
        // martians.
        std::fs::write("/proc/sys/net/ipv4/conf/all/accept_local", "1")
            .context("cannot set net.ipv4.conf.all.accept_local")?;
        let pin_dir = bpffs.join(margay_bpf::MAPS_SUBDIR);
        let mut config = Config::new(&pin_dir);
        config.sizes = map_sizes(felix);
        config.ctlb_udp = matches!(
            felix.bpf_connect_time_load_balancing,
            Some(margay_api::calico::felix::ConnectTimeLoadBalancing::Enabled)
        );
        let dp = Dataplane::load(&config).context("cannot load the BPF programs")?;
        if !dp.replaced_maps().is_empty() {
            tracing::warn!(maps = ?dp.replaced_maps(), "recreated pinned maps whose layout or size changed");
        }
        let driver = BpfNatDriver::new(dp.maps()?).context("cannot open the NAT maps")?;
        let routes: BTreeMap<Ipv4Net, RouteValue> =
            driver.maps().routes.entries()?.into_iter().collect();
        // Adopted with the maps, so a restarted agent rewrites none of it.
        let if_states: BTreeMap<u32, IfStateValue> =
            driver.maps().if_state.entries()?.into_iter().collect();
        let adopted = driver.adopted();
        if adopted.frontends + adopted.backends + routes.len() > 0 {
            // A restart: the maps were pinned by the previous agent and keep serving; only
            // differences will be written.
            tracing::info!(
                frontends = adopted.frontends,
                backends = adopted.backends,
                routes = routes.len(),
                "adopted pinned BPF maps"
            );
        }
        let log_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_decision_log(&pin_dir, log_stop.clone())?;
        let mut bpf = BpfDataplane {
            dp,
            driver,
            pin_dir: bpffs.to_owned(),
            attached: BTreeMap::new(),
            sizes: config.sizes,
            scanned: BTreeMap::new(),
            if_states,
            wireguard_link: None,
            routes,
            last_scan: Instant::now(),
            debug_log: false,
            log_stop,
            ctlb_cgroup: cgroup,
            draining: None,
            took_over: false,
            tc_mode,
            context: None,
        };
        bpf.set_debug_log(felix)?;
        bpf.attach_cgroups()?;
        // A first count, so the first status already says how full the maps are.
        bpf.count_scanned()?;
        Ok(bpf)
    }

    /// `bpfLogLevel: Debug` switches the programs' decision log on (one line per packet in this
    /// agent's log), anything else off; written when it changes.
    fn set_debug_log(&mut self, felix: &FelixConfigurationSpec) -> Result<()> {
        let on = felix.bpf_log_level.level() == margay_api::calico::felix::BpfLogLevel::Debug;
        if on != self.debug_log {
            self.dp
                .set_debug_log(on)
                .context("cannot switch the decision log")?;
            self.debug_log = on;
            tracing::info!(on, "bpfLogLevel Debug: packet decision log");
        }
        Ok(())
    }

    /// Connect-time load balancing on the node's cgroup (links pinned beside the TC ones).
    fn attach_cgroups(&mut self) -> Result<()> {
        let Some(cgroup) = self.ctlb_cgroup.clone() else {
            return Ok(());
        };
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links)?;
        for prog in CgroupProgram::ALL {
            let pin = links.join(format!("cgroup_{}", prog.name()));
            self.dp
                .attach_cgroup_pinned(prog, &cgroup, &pin)
                .with_context(|| {
                    format!("cannot attach {} to {}", prog.name(), cgroup.display())
                })?;
        }
        tracing::info!(cgroup = %cgroup.display(), "connect-time load balancing attached");
        Ok(())
    }

    /// Leaving BPF, once kube-proxy's rules are in place: connect-time load balancing goes
    /// (sockets it already connected reach their backend directly and need nothing more) and
    /// every NAT frontend is removed, so that every new flow misses and goes to the iptables
    /// rules; conntrack stays, and with it the translation of the flows the programs opened,
    /// which the kernel's conntrack never saw whole. [`Self::live_flows`] says when they ended.
    pub fn start_drain(
        &mut self,
        node: &str,
        node_ips: &[Ipv4Addr],
        pools: &[Ipv4Net],
    ) -> Result<()> {
        if self.draining.is_some() {
            return Ok(());
        }
        let links = self.pin_dir.join("links");
        for prog in CgroupProgram::ALL {
            let pin = links.join(format!("cgroup_{}", prog.name()));
            // The pin holds the only reference: removing it detaches the program.
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", pin.display()));
                }
            }
        }
        let context = NodeContext {
            node_name: node.to_owned(),
            node_ips: node_ips.to_vec(),
            cluster_cidrs: pools.to_vec(),
        };
        self.context = None;
        self.driver
            .sync(&[], &[], &context)
            .context("cannot remove the NAT frontends")?;
        self.draining = Some(Instant::now());
        Ok(())
    }

    /// Back to BPF before the drain ended: connect-time load balancing again; the next
    /// [`Self::sync`] writes the frontends.
    pub fn resume(&mut self) -> Result<()> {
        if self.draining.is_some() {
            self.attach_cgroups()?;
            self.draining = None;
            // Flows iptables opened during the drain are handed over like at the first switch.
            self.took_over = false;
        }
        Ok(())
    }

    pub fn draining(&self) -> bool {
        self.draining.is_some()
    }

    /// How long the drain has lasted (zero when not draining).
    pub fn drain_elapsed(&self) -> Duration {
        self.draining.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// The flows still live, one line each, to log what a drain that reached its limit cuts.
    pub fn live_flow_descriptions(&self, felix: &FelixConfigurationSpec) -> Result<Vec<String>> {
        Ok(self
            .driver
            .live_flow_descriptions(&Timeouts::from_felix(felix))?)
    }

    /// Where each program is attached, for the Node status: the TC programs by interface (TC
    /// ingress or egress, TCX or clsact), connect-time load balancing on its cgroup (not while
    /// draining: it is detached then).
    pub fn attachments(&self) -> Vec<AttachmentStatus> {
        let mut out: Vec<AttachmentStatus> = self
            .attached
            .iter()
            .map(|((iface, _), (prog, kind))| AttachmentStatus {
                program: prog.name().to_owned(),
                hook: match prog {
                    TcProgram::FromWorkload
                    | TcProgram::FromHostIface
                    | TcProgram::FromTunnel
                    | TcProgram::FromWireguard => "tc ingress",
                    TcProgram::ToWorkload | TcProgram::ToHostIface | TcProgram::ToTunnel => {
                        "tc egress"
                    }
                }
                .to_owned(),
                mode: Some(
                    match kind {
                        TcLinkKind::Tcx => "tcx",
                        TcLinkKind::Clsact => "clsact",
                    }
                    .to_owned(),
                ),
                interface: Some(iface.clone()),
                cgroup: None,
            })
            .collect();
        if let Some((iface, _)) = &self.wireguard_link {
            out.push(AttachmentStatus {
                program: TcProgram::FromWireguard.name().to_owned(),
                hook: "tc ingress".to_owned(),
                mode: None,
                interface: Some(iface.clone()),
                cgroup: None,
            });
        }
        if let (Some(cgroup), None) = (&self.ctlb_cgroup, self.draining) {
            for prog in CgroupProgram::ALL {
                out.push(AttachmentStatus {
                    program: prog.name().to_owned(),
                    hook: format!("cgroup {}", prog.name().trim_start_matches("mg_")),
                    mode: None,
                    interface: None,
                    cgroup: Some(cgroup.display().to_string()),
                });
            }
        }
        out
    }

    /// How full each map is: NAT frontends and backends from the driver's model, routes and
    /// interfaces from what this agent wrote (exact, free), conntrack, affinity and the
    /// connect-time LB reverse map from the last periodic scan (`source: scan`).
    pub fn map_fills(&self) -> Vec<MapFillStatus> {
        use margay_bpf::maps::names;
        let model = self.driver.current();
        let exact = [
            (
                names::NAT_FRONTEND,
                model.frontends.len(),
                self.sizes.nat_frontend,
            ),
            (
                names::NAT_BACKEND,
                model.backends.len(),
                self.sizes.nat_backend,
            ),
            (names::ROUTES, self.routes.len(), self.sizes.route),
            (names::IF_STATE, self.if_states.len(), self.sizes.if_state),
        ];
        let scanned = [
            (names::CONNTRACK, self.sizes.conntrack),
            (names::NAT_AFFINITY, self.sizes.nat_affinity),
            (names::CTLB_REV, self.sizes.nat_affinity),
        ];
        let fill = |name: &str, entries: usize, max: u32, source: &str| MapFillStatus {
            name: name.to_owned(),
            entries: entries as u64,
            max_entries: u64::from(max),
            source: Some(source.to_owned()),
        };
        exact
            .iter()
            .map(|(n, e, m)| fill(n, *e, *m, "exact"))
            .chain(
                scanned
                    .iter()
                    .map(|(n, m)| fill(n, self.scanned.get(n).copied().unwrap_or(0), *m, "scan")),
            )
            .collect()
    }

    /// The periodic work between syncs: every [`CONNTRACK_SCAN`], the conntrack cleanup and the
    /// counts of the maps the programs fill themselves. Returns the cleanup's report when one
    /// ran.
    pub fn maintain(
        &mut self,
        felix: &FelixConfigurationSpec,
    ) -> Result<Option<margay_dataplane::bpf::CleanupReport>> {
        if self.last_scan.elapsed() < CONNTRACK_SCAN {
            return Ok(None);
        }
        self.last_scan = Instant::now();
        let cleaned = self
            .driver
            .cleanup_conntrack(&Timeouts::from_felix(felix))?;
        self.scanned.insert(
            margay_bpf::maps::names::CONNTRACK,
            cleaned.entries.saturating_sub(cleaned.removed_entries),
        );
        self.count_scanned()?;
        Ok(Some(cleaned))
    }

    /// Counts the affinity and connect-time LB reverse maps (LRU maps the programs fill; at
    /// most `bpfMapSizeNATAffinity` entries each), and conntrack when no cleanup counted it yet.
    fn count_scanned(&mut self) -> Result<()> {
        use margay_bpf::maps::names;
        let maps = self.driver.maps();
        if !self.scanned.contains_key(names::CONNTRACK) {
            self.scanned
                .insert(names::CONNTRACK, maps.conntrack.entries()?.len());
        }
        self.scanned
            .insert(names::NAT_AFFINITY, maps.affinity.entries()?.len());
        self.scanned
            .insert(names::CTLB_REV, maps.ctlb_rev.entries()?.len());
        Ok(())
    }

    /// The flows in conntrack that may still send packets (neither closed nor expired).
    pub fn live_flows(&self, felix: &FelixConfigurationSpec) -> Result<usize> {
        Ok(self.driver.live_flows(&Timeouts::from_felix(felix))?)
    }

    /// Attaches the TC programs to new interfaces, writes the NAT maps, and now and then removes
    /// expired conntrack pairs. Returns a one-line summary.
    #[expect(
        clippy::too_many_arguments,
        reason = "one sync's inputs, all from the agent's cache"
    )]
    pub fn sync(
        &mut self,
        node: &str,
        node_ips: &[Ipv4Addr],
        peers: BTreeMap<String, Ipv4Addr>,
        pools: &[Ipv4Net],
        blocks: &BTreeMap<Ipv4Net, String>,
        services: &[Service],
        slices: &[EndpointSlice],
        felix: &FelixConfigurationSpec,
        wireguard: Option<&BpfPath>,
    ) -> Result<String> {
        let pattern = felix
            .bpf_data_iface_pattern
            .as_ref()
            .map(|p| p.regex().clone())
            .context("no bpfDataIfacePattern")?;
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links)?;
        let all = all_interfaces()?;
        let ifaces = interfaces(&all);
        let wireguard_iface = wireguard.map(|w| w.interface.as_str());
        let mut if_states = BTreeMap::new();
        // Interfaces that went (a pod deleted): their links died with them; forget them so that
        // the status lists only live attachments and a veth re-created under the same name
        // gets its programs again.
        let gone: Vec<(String, &'static str)> = self
            .attached
            .keys()
            .filter(|(iface, _)| !all.iter().any(|l| l.name == *iface))
            .cloned()
            .collect();
        for (iface, prog) in gone {
            self.attached.remove(&(iface.clone(), prog));
            let pin = links.join(format!("tc_{}_{prog}", iface.replace('.', "_")));
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", pin.display()));
                }
            }
        }
        for (iface, ifindex) in &ifaces {
            let (iface, ifindex) = (iface.clone(), *ifindex);
            let (progs, kind): (&[TcProgram], u32) = if iface.starts_with("cali") {
                (
                    &[TcProgram::FromWorkload, TcProgram::ToWorkload],
                    IF_WORKLOAD,
                )
            } else if Some(iface.as_str()) == wireguard_iface {
                // An L3 device: the host programs parse Ethernet. Its own program is attached
                // by `sync_wireguard`.
                (&[], 0)
            } else if pattern.is_match(&iface) {
                (&[TcProgram::FromHostIface, TcProgram::ToHostIface], IF_HOST)
            } else {
                (&[], 0)
            };
            for prog in progs {
                if self.attached.contains_key(&(iface.clone(), prog.name())) {
                    continue;
                }
                let pin = links.join(format!("tc_{}_{}", iface.replace('.', "_"), prog.name()));
                let (kind, _adopted) = self
                    .dp
                    .attach_tc_pinned(*prog, &iface, &pin, self.tc_mode)
                    .with_context(|| format!("cannot attach {} to {iface}", prog.name()))?;
                self.attached
                    .insert((iface.clone(), prog.name()), (*prog, kind));
            }
            if !progs.is_empty() {
                if_states.insert(ifindex, IfStateValue::new(kind | IF_READY, &iface));
            }
        }
        // Tunnel mode: this node's address tells the programs to send external flows for
        // backends on other nodes to those nodes (whose addresses the backends carry).
        self.set_debug_log(felix)?;
        let mode = match felix.bpf_external_service_mode {
            Some(margay_api::calico::felix::ExternalServiceMode::Dsr) => {
                margay_bpf::maps::ExternalServiceMode::Dsr
            }
            _ => margay_bpf::maps::ExternalServiceMode::Tunnel,
        };
        // bpfPSNATPorts: the ports a second flow with the same client address and port to the
        // same backend gets (Calico's default 20000:29999).
        let (psnat_first, psnat_last) = felix
            .bpf_psnat_ports
            .as_ref()
            .map_or((20000, 29999), |r| (r.first, r.last));
        if let Some(ip) = node_ips.first() {
            self.driver.set_node_config(
                &margay_bpf::maps::NodeConfig::new(*ip, mode)
                    .with_psnat_ports(psnat_first, psnat_last),
            )?;
        }
        let optout: Vec<ipnet::IpNet> = felix
            .bpf_dsr_optout_cidrs
            .iter()
            .flatten()
            .map(margay_api::values::Cidr::net)
            .collect();
        self.driver.set_dsr_optout(&optout)?;
        let mut routes = desired_routes(node, node_ips, &peers, pools, blocks, &local_workloads()?);
        let wireguard_note = match self.sync_wireguard(wireguard, &ifaces, &links)? {
            Some((w, index)) => {
                through_wireguard(&mut routes, &w.nodes, index);
                // Named in dumps and debug lines like the interfaces above.
                if_states.insert(index, IfStateValue::new(IF_TUNNEL | IF_READY, &w.interface));
                format!(
                    "; tunnel to {} nodes through {}",
                    w.nodes.len(),
                    w.interface
                )
            }
            None => String::new(),
        };
        let route_changes = self.write_routes(routes)?;
        let if_changes = self.write_if_states(if_states)?;
        self.driver.set_peer_nodes(peers);
        let context = NodeContext {
            node_name: node.to_owned(),
            node_ips: node_ips.to_vec(),
            cluster_cidrs: pools.to_vec(),
        };
        self.context = None;
        let desired = self.driver.desired(services, slices, &context);
        // Taking over from iptables: the UDP flows its rules NATed keep their backends. Once
        // before the frontends are written (from then on new flows are the programs'), and once
        // after, for flows iptables opened in between.
        let seed_kernel_flows = !self.took_over;
        let mut seeded = Vec::new();
        if seed_kernel_flows {
            seeded.push(self.seed_kernel_udp_flows(&desired));
        }
        let report = self.driver.apply(&desired)?;
        self.context = Some(context);
        if seed_kernel_flows {
            seeded.push(self.seed_kernel_udp_flows(&desired));
            self.took_over = true;
            tracing::info!(passes = ?seeded, "UDP flows NATed by iptables written into BPF conntrack");
        }
        let mut summary = format!(
            "{} programs attached; {} routes ({route_changes} written or removed); {} interfaces ({if_changes} written or removed); NAT {report:?}{wireguard_note}",
            self.attached.len(),
            self.routes.len(),
            self.if_states.len()
        );
        if let Some(cleaned) = self.maintain(felix)? {
            summary.push_str(&format!("; conntrack cleanup {cleaned:?}"));
        }
        Ok(summary)
    }

    /// The tunnel between nodes through WireGuard: `mg_from_wg` on the WireGuard interface's
    /// ingress (it hands our decrypted tunnel back to the underlay interface). Returns the
    /// device and its ifindex when it is there, for the `mg_routes` entries of the nodes reached
    /// through it ([`through_wireguard`]); without it the tunnel is sent in the clear.
    fn sync_wireguard<'a>(
        &mut self,
        wireguard: Option<&'a BpfPath>,
        ifaces: &[(String, u32)],
        links: &Path,
    ) -> Result<Option<(&'a BpfPath, u32)>> {
        let device = wireguard.and_then(|w| {
            ifaces
                .iter()
                .find(|(name, _)| *name == w.interface)
                .map(|(_, index)| (w, *index))
        });
        // The pin is per ifindex: a TCX link of a deleted interface must never be adopted for
        // the new interface of the same name (turning WireGuard off and on makes a new one).
        let pin_of = |index: u32| links.join(format!("tc_wireguard{index}_mg_from_wg"));
        let wanted = device.map(|(w, index)| (w.interface.clone(), index));
        if self.wireguard_link != wanted {
            let current = wanted.as_ref().map(|(_, i)| pin_of(*i));
            for stale in std::fs::read_dir(links)?.flatten() {
                let name = stale.file_name().to_string_lossy().into_owned();
                if name.starts_with("tc_wireguard") && Some(stale.path()) != current {
                    std::fs::remove_file(stale.path())
                        .with_context(|| format!("cannot unpin {}", stale.path().display()))?;
                }
            }
            if let Some((name, index)) = &wanted {
                self.dp
                    .attach_tc_pinned(
                        TcProgram::FromWireguard,
                        name,
                        &pin_of(*index),
                        self.tc_mode,
                    )
                    .with_context(|| format!("cannot attach mg_from_wg to {name}"))?;
                tracing::info!(interface = %name, "BPF: tunnel between nodes through WireGuard");
            }
            self.wireguard_link = wanted;
        }
        Ok(device)
    }

    /// One pass of [`BpfNatDriver::seed_udp_flows`] over this namespace's kernel conntrack. A
    /// failure is logged, not fatal: the programs serve every new flow all the same, only the
    /// UDP flows iptables opened may then change backends.
    fn seed_kernel_udp_flows(
        &mut self,
        model: &margay_calc::bpf_nat::NatModel,
    ) -> Option<margay_dataplane::bpf::handover::SeedReport> {
        let seeded = margay_dataplane::bpf::handover::read_kernel_conntrack().and_then(|text| {
            let flows = margay_dataplane::bpf::handover::parse_nf_conntrack(&text);
            self.driver.seed_udp_flows(model, &flows)
        });
        seeded
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot hand the kernel's UDP NAT flows to BPF conntrack");
            })
            .ok()
    }

    /// Writes the NAT entries of the Services `names` alone (`services`: those of them that
    /// exist, `slices`: every EndpointSlice naming one of them), without looking at
    /// interfaces, routes or the other Services. `None` when only a full [`Self::sync`] can do
    /// it (none has succeeded yet, the programs are draining, or the driver refuses: see
    /// `BpfNatDriver::sync_services`); nothing is written then.
    pub fn sync_services(
        &mut self,
        names: &BTreeSet<margay_calc::kube_proxy::ServiceName>,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> Option<Result<String>> {
        if self.draining.is_some() {
            return None;
        }
        let context = self.context.clone()?;
        let names: Vec<_> = names.iter().cloned().collect();
        let report = match self
            .driver
            .sync_services(&names, services, slices, &context)
        {
            Ok(ServicesSync::Applied(report)) => report,
            Ok(ServicesSync::NeedsFull(why)) => {
                tracing::info!(reason = %why, "a full sync instead of a one-Service sync");
                return None;
            }
            Err(e) => {
                self.context = None;
                return Some(Err(e.into()));
            }
        };
        Some(Ok(format!("NAT for {} Services {report:?}", names.len())))
    }

    /// Writes `mg_ifstate` by difference: one entry per interface our programs are attached to
    /// (what it is, its name), so dumps and debug lines can name an ifindex.
    fn write_if_states(&mut self, desired: BTreeMap<u32, IfStateValue>) -> Result<usize> {
        let map = &mut self.driver.maps_mut().if_state;
        let mut changes = 0;
        for (ifindex, value) in &desired {
            if self.if_states.get(ifindex) != Some(value) {
                map.insert(*ifindex, value)?;
                changes += 1;
            }
        }
        for ifindex in self.if_states.keys() {
            if !desired.contains_key(ifindex) {
                map.remove(*ifindex)?;
                changes += 1;
            }
        }
        self.if_states = desired;
        Ok(changes)
    }

    /// Makes `mg_routes` hold `desired`, writing only the difference; returns how many entries
    /// were written or removed.
    fn write_routes(&mut self, desired: BTreeMap<Ipv4Net, RouteValue>) -> Result<usize> {
        let map = &mut self.driver.maps_mut().routes;
        let mut changes = 0;
        for (net, value) in &desired {
            if self.routes.get(net) != Some(value) {
                map.insert(*net, value)?;
                changes += 1;
            }
        }
        for net in self.routes.keys() {
            if !desired.contains_key(net) {
                map.remove(*net)?;
                changes += 1;
            }
        }
        self.routes = desired;
        Ok(changes)
    }

    /// The backend lists for pods' hostPorts the next sync writes beside the Services'.
    pub fn set_host_ports(&mut self, lists: Vec<margay_calc::bpf_nat::NatService>) {
        self.driver.set_host_ports(lists);
    }

    /// Detaches everything: unpinning the links detaches the TCX and cgroup programs, and our
    /// clsact filters (which have no link to unpin) are removed from every interface of this
    /// namespace, found by program name; the maps go with their pins and the programs' last
    /// references. Afterwards nothing of ours stays in the kernel (the lab test
    /// `switching_back_leaves_no_bpf_program_link_map_or_pin_in_the_kernel` checks it with the
    /// kernel, in both attachment modes).
    pub fn remove(self) -> Result<()> {
        let dir = self.pin_dir.clone();
        drop(self);
        let mut clsact_filters = 0;
        // Every interface, down ones included: a filter stays on a device that went down.
        for iface in all_interfaces()?.into_iter().map(|l| l.name) {
            clsact_filters += margay_bpf::detach_clsact(&iface)
                .with_context(|| format!("cannot detach the clsact filters of {iface}"))?;
        }
        if clsact_filters > 0 {
            tracing::info!(filters = clsact_filters, "clsact filters removed");
        }
        for sub in ["links", "maps"] {
            let path = dir.join(sub);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// This process's own cgroup v2 directory, for when the configured one is not visible: inside
/// `ip netns exec` (the lab), /sys is a fresh sysfs without the cgroup mounts. Mounts cgroup2 at
/// a directory beside the bpffs one, in this process's mount namespace only.
pub fn own_cgroup(bpffs: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2")?
        .trim_start_matches('/')
        .to_owned();
    let root = bpffs.with_extension("cgroup2");
    std::fs::create_dir_all(&root)?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*root.to_string_lossy()));
    if !mounted {
        let out = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&root)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount cgroup2 at {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let dir = root.join(relative);
    if !dir.exists() {
        bail!("cgroup {} does not exist", dir.display());
    }
    Ok(dir)
}

/// What `mg_routes` should hold, as Calico's route map: the IP pools (in-pool), other nodes'
/// pod blocks (remote workloads, next hop the block's node), this node's pods (a /32 per pod
/// with its host-side veth), this node's and the other nodes' addresses.
fn desired_routes(
    node: &str,
    node_ips: &[Ipv4Addr],
    peers: &BTreeMap<String, Ipv4Addr>,
    pools: &[Ipv4Net],
    blocks: &BTreeMap<Ipv4Net, String>,
    local_workloads: &[(Ipv4Addr, u32)],
) -> BTreeMap<Ipv4Net, RouteValue> {
    let in_pool = |net: &Ipv4Net| {
        if pools.iter().any(|p| p.contains(net)) {
            RT_IN_POOL
        } else {
            0
        }
    };
    let route = |flags, ifindex, next_hop: Option<Ipv4Addr>| RouteValue {
        flags,
        ifindex,
        next_hop: next_hop.map_or(0, margay_bpf::maps::be_addr),
        pad: 0,
    };
    let mut out = BTreeMap::new();
    for pool in pools {
        out.insert(pool.trunc(), route(RT_IN_POOL, 0, None));
    }
    for (block, owner) in blocks {
        if owner == node {
            continue;
        }
        if let Some(ip) = peers.get(owner) {
            out.insert(
                block.trunc(),
                route(RT_REMOTE_WL | in_pool(block), 0, Some(*ip)),
            );
        }
    }
    for (ip, ifindex) in local_workloads {
        let net = Ipv4Net::from(*ip);
        out.insert(net, route(RT_LOCAL_WL | in_pool(&net), *ifindex, None));
    }
    for ip in peers.values() {
        out.insert(Ipv4Net::from(*ip), route(RT_REMOTE_HOST, 0, Some(*ip)));
    }
    for ip in node_ips {
        out.insert(Ipv4Net::from(*ip), route(RT_LOCAL_HOST, 0, None));
    }
    out
}

/// Marks the other nodes reached through WireGuard (their /32 entries, `RT_REMOTE_HOST`) with
/// `RT_WIREGUARD` and the device: the programs then send the tunnel to them into the device.
fn through_wireguard(
    routes: &mut BTreeMap<Ipv4Net, RouteValue>,
    nodes: &BTreeSet<Ipv4Addr>,
    ifindex: u32,
) {
    for ip in nodes {
        if let Some(r) = routes.get_mut(&Ipv4Net::from(*ip))
            && r.flags & RT_REMOTE_HOST != 0
        {
            r.flags |= RT_WIREGUARD;
            r.ifindex = ifindex;
        }
    }
}

/// This node's pods: the /32 routes through a `cali*` veth (what the CNI plugin writes), with
/// the veth's ifindex.
fn local_workloads() -> Result<Vec<(Ipv4Addr, u32)>> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-4", "route", "show", "table", "main"])
        .output()
        .context("cannot run ip route")?;
    let routes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let links = std::process::Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
        .context("cannot run ip link")?;
    let links: Vec<serde_json::Value> = serde_json::from_slice(&links.stdout).unwrap_or_default();
    let ifindex = |dev: &str| {
        links
            .iter()
            .find(|l| l["ifname"] == dev)
            .and_then(|l| l["ifindex"].as_u64())
            .and_then(|i| u32::try_from(i).ok())
    };
    Ok(routes
        .iter()
        .filter_map(|r| {
            let dev = r["dev"].as_str().filter(|d| d.starts_with("cali"))?;
            let ip: Ipv4Addr = r["dst"].as_str()?.parse().ok()?;
            Some((ip, ifindex(dev)?))
        })
        .collect())
}

/// An interface of this namespace as `ip -j link show` lists it.
struct Link {
    name: String,
    ifindex: u32,
    down: bool,
}

/// Every interface of this namespace.
fn all_interfaces() -> Result<Vec<Link>> {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
        .context("cannot run ip link")?;
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(links
        .iter()
        .filter_map(|l| {
            Some(Link {
                name: l["ifname"].as_str()?.to_owned(),
                ifindex: u32::try_from(l["ifindex"].as_u64()?).ok()?,
                down: l["operstate"] == "DOWN",
            })
        })
        .collect())
}

/// The names and ifindexes of the interfaces the programs may attach to: every one that is not
/// down (pod veths even then), except loopback.
fn interfaces(all: &[Link]) -> Vec<(String, u32)> {
    all.iter()
        .filter(|l| !l.down || l.name.starts_with("cali"))
        .filter(|l| l.name != "lo")
        .map(|l| (l.name.clone(), l.ifindex))
        .collect()
}
