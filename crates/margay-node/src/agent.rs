//! The agent's loop: follow the datastore (list + watch with a sync status), and after the first
//! complete read, program the dataplane from the copy whenever it changes, at most once per
//! minimum sync period.
//!
//! Nothing is written to the dataplane before the datastore has been read completely once
//! ([`SyncStatus::InSync`]): programming from a half-read store would, for example, reject
//! traffic to Services not read yet. While the datastore is unreachable the dataplane is left
//! as it is and the agent reports "not in sync".

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use margay_api::Kind;
use margay_api::calico::felix::IptablesBackend;
use margay_api::operator::LinuxDataplane;
use margay_datastore::{Client, SyncStatus, SyncUpdate};
use serde_json::json;

use margay_api::calico::node::PreflightStatus;

use crate::bpf_mode::BpfDataplane;
use crate::cache::{Cache, Changes, KINDS};
use crate::health::{AgentStatus, HealthCheckServers, SharedStatus};
use crate::preflight;
use crate::proxy::ProxyDataplane;
use crate::routes::{RouteDriver, desired_routes};
use crate::vxlan;
use margay_calc::kube_proxy::ServiceName;

/// How the agent was started.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub datastore_url: String,
    pub node_ip: Ipv4Addr,
    pub node_prefix_len: u8,
    pub health_listen: SocketAddr,
    /// Where to write the agent's status after every sync (for the lab and for humans).
    pub status_file: Option<PathBuf>,
    /// Where the agent keeps state across restarts (the WireGuard key).
    pub state_dir: PathBuf,
    /// The bpffs directory the BPF dataplane pins its maps and links in (mounted if needed).
    pub bpffs_dir: PathBuf,
    /// The cgroup v2 directory connect-time load balancing attaches to.
    pub cgroup: Option<PathBuf>,
    /// How long a node leaving BPF waits for the flows its programs translated before it cuts
    /// them ([`crate::bpf_mode::DRAIN_LIMIT`] by default).
    pub bpf_drain_limit: Duration,
}

/// How often the Node's status is refreshed even when nothing changed (last sync time).
const STATUS_HEARTBEAT: Duration = Duration::from_secs(60);

/// Above this many changed Services a sync recalculates everything: one-Service updates cost
/// a little per Service, a full calculation a little per Service of the cluster.
const INCREMENTAL_MAX_SERVICES: usize = 64;

/// How often a node leaving BPF checks whether the flows its programs translated have ended.
const DRAIN_CHECK: Duration = Duration::from_secs(1);

/// In BPF mode, how often the conntrack cleanup and the map counts run between syncs (Calico's
/// conntrack scan period), and the shortest interval between two Node status writes that only
/// refresh map fill levels.
const BPF_MAINTENANCE: Duration = Duration::from_secs(10);

pub async fn run(config: AgentConfig) -> Result<()> {
    let status: SharedStatus = Arc::new(std::sync::RwLock::new(AgentStatus {
        node: config.node.clone(),
        datastore: "WaitingForDatastore".into(),
        dataplane: "Iptables".into(),
        ..AgentStatus::default()
    }));
    {
        let status = status.clone();
        let addr = config.health_listen;
        tokio::spawn(async move {
            if let Err(e) = crate::health::serve_agent_health(addr, status).await {
                tracing::error!(error = %e, "health server stopped");
            }
        });
    }

    // As kube-proxy does: NodePorts answer on 127.0.0.1 too, which needs local addresses routed.
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1") {
        tracing::warn!(error = %e, "cannot enable route_localnet; NodePorts on 127.0.0.1 will not answer");
    }
    let store = open_until_done(&config.datastore_url).await?;
    let client = Client::new(store.clone());
    register_until_done(&client, &config).await;

    let mut agent = Agent {
        config: config.clone(),
        client,
        status: status.clone(),
        cache: Cache::default(),
        routes: RouteDriver::default(),
        proxy: ProxyDataplane::new(),
        health_checks: HealthCheckServers::default(),
        last_node_status: None,
        last_status_write: None,
        wireguard: crate::wireguard::WireGuard::new(config.state_dir.clone()),
        bpf: None,
        preflight: None,
        last_preflight_failure: None,
        report: None,
        last_fills: None,
        last_fills_write: None,
    };

    let mut updates = margay_datastore::sync::sync(store, KINDS.to_vec());
    let mut in_sync = false;
    let mut dirty = false;
    // Between a commit's first change and the Progress after its last one: programming then
    // would apply half a commit and, with a large commit (a bulk load of thousands of Services),
    // spend the time in repeated full calculations while the rest of the commit waits.
    let mut mid_commit = false;
    let mut last_sync: Option<Instant> = None;
    let mut next_maintenance = Instant::now() + BPF_MAINTENANCE;
    // When the oldest change not yet programmed arrived (the sync log says how long it waited).
    let mut pending_since: Option<Instant> = None;
    // Read again only when a FelixConfiguration changes: reading it on every event cost a
    // parse of the configuration per change.
    let min_sync_period = |cache: &Cache| {
        cache
            .felix(&config.node)
            .bpf_kube_proxy_min_sync_period
            .map(|d| d.as_duration())
            .unwrap_or(Duration::from_secs(1))
    };
    let mut min_period = min_sync_period(&agent.cache);
    loop {
        // Run at once after a quiet period, else no sooner than min_period after the last sync
        // (kube-proxy's bounded-frequency runner).
        let due = last_sync.map_or(Instant::now(), |t| t + min_period);
        let heartbeat =
            last_sync.map_or(Instant::now() + STATUS_HEARTBEAT, |t| t + STATUS_HEARTBEAT);
        tokio::select! {
            update = updates.next() => {
                let Some(update) = update else { break };
                match update {
                    SyncUpdate::Status(s) => {
                        let name = format!("{s:?}");
                        if s == SyncStatus::Resyncing {
                            // The dataplane keeps what it has (stale beats empty) until the
                            // store answers again; readiness and the status file say so.
                            tracing::warn!(status = %name, datastore = %config.datastore_url, "datastore sync status: not in sync, lost the datastore's watch; the dataplane stays as programmed until it is back");
                        } else {
                            tracing::info!(status = %name, "datastore sync status");
                        }
                        let snapshot = status.write().ok().map(|mut st| {
                            st.datastore = name;
                            st.clone()
                        });
                        // Written at once, not at the next dataplane sync: the lab and people
                        // read the file to know whether the node follows the datastore.
                        if let (Some(path), Some(snapshot)) = (&config.status_file, snapshot) {
                            write_status_file(path, &snapshot);
                        }
                        if s == SyncStatus::InSync {
                            in_sync = true;
                            dirty = true;
                        }
                    }
                    SyncUpdate::Upsert(stored) => {
                        // A Node whose agent only refreshed its dataplane report changes
                        // nothing here: no sync (each agent writes it every few seconds in BPF
                        // mode, and every agent would resync on each).
                        let felix = stored.key.kind == Kind::FelixConfiguration;
                        let relevant = agent.cache.upsert(stored);
                        if felix {
                            min_period = min_sync_period(&agent.cache);
                        }
                        if relevant {
                            dirty = true;
                            pending_since.get_or_insert_with(Instant::now);
                        }
                        mid_commit = true;
                    }
                    SyncUpdate::Remove(key) => {
                        agent.cache.remove(&key);
                        if key.kind == Kind::FelixConfiguration {
                            min_period = min_sync_period(&agent.cache);
                        }
                        dirty = true;
                        mid_commit = true;
                        pending_since.get_or_insert_with(Instant::now);
                    }
                    SyncUpdate::Progress(revision) => {
                        mid_commit = false;
                        agent.cache.revision = revision;
                        // Nothing waiting to be programmed: the dataplane already reflects it.
                        if !dirty && in_sync {
                            agent.report_progress(revision);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(due.into()), if dirty && in_sync && !mid_commit => {
                dirty = false;
                last_sync = Some(Instant::now());
                let changes = agent.cache.take_changes();
                agent.sync(changes, pending_since.take()).await;
            }
            _ = tokio::time::sleep(DRAIN_CHECK), if in_sync && agent.draining() => {
                last_sync = Some(Instant::now());
                agent.cache.take_changes();
                agent.sync_dataplane(pending_since.take()).await;
            }
            _ = tokio::time::sleep_until(heartbeat.into()), if in_sync => {
                // Also the periodic full resync: every Service recalculated, every map and
                // chain compared with what it should hold.
                last_sync = Some(Instant::now());
                agent.cache.take_changes();
                agent.sync_dataplane(pending_since.take()).await;
            }
            _ = tokio::time::sleep_until(next_maintenance.into()), if in_sync && agent.bpf.is_some() => {
                next_maintenance = Instant::now() + BPF_MAINTENANCE;
                agent.maintain_bpf().await;
            }
        }
    }
    Ok(())
}

/// The datastore may not be up yet when the agent starts: keep trying, saying so.
/// Opens the datastore, waiting for it when it is unreachable (an agent started during a
/// datastore outage, or before etcd) rather than exiting; a wrong URL or refused credentials
/// end the agent at once.
async fn open_until_done(url: &str) -> Result<Arc<dyn margay_datastore::Datastore>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match margay_datastore::open(url).await {
            Ok(store) => return Ok(store),
            Err(margay_datastore::Error::Unavailable(e)) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the datastore yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot open the datastore {url}"))
                );
            }
        }
    }
}

async fn register_until_done(client: &Client, config: &AgentConfig) {
    let mut delay = Duration::from_millis(100);
    loop {
        match crate::node::register(client, &config.node, config.node_ip, config.node_prefix_len)
            .await
        {
            Ok(()) => {
                tracing::info!(node = %config.node, ip = %config.node_ip, "registered Node");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot register the Node yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Agent {
    config: AgentConfig,
    client: Client,
    status: SharedStatus,
    cache: Cache,
    routes: RouteDriver,
    proxy: ProxyDataplane,
    health_checks: HealthCheckServers,
    last_node_status: Option<serde_json::Value>,
    last_status_write: Option<Instant>,
    wireguard: crate::wireguard::WireGuard,
    /// The BPF dataplane while it is in use.
    bpf: Option<BpfDataplane>,
    /// The last BPF preflight, while BPF is requested.
    preflight: Option<PreflightStatus>,
    /// The last preflight failure logged (logged once, not at every sync).
    last_preflight_failure: Option<String>,
    /// The last sync's report for the Node's `status.dataplane` (what [`Agent::publish_status`]
    /// completes with the preflight, the attachments and the map fills).
    report: Option<serde_json::Value>,
    /// The map fills last written to the Node, and when.
    last_fills: Option<serde_json::Value>,
    last_fills_write: Option<Instant>,
}

impl Agent {
    /// Whether BPF programs are still attached for flows they opened before a switch to
    /// Iptables (the loop then syncs every [`DRAIN_CHECK`] to remove them once those end).
    fn draining(&self) -> bool {
        self.bpf.as_ref().is_some_and(BpfDataplane::draining)
    }

    /// Records that the dataplane reflects `revision` (no change since the last sync mattered).
    fn report_progress(&mut self, revision: u64) {
        let snapshot = match self.status.write() {
            Ok(mut st) if st.syncs > 0 && st.last_error.is_none() => {
                st.synced_revision = revision;
                st.clone()
            }
            _ => return,
        };
        if let Some(path) = &self.config.status_file {
            write_status_file(path, &snapshot);
        }
    }

    /// Programs `changes`: when only Services and EndpointSlices changed and the last sync
    /// succeeded, only those Services are recalculated and only their entries written
    /// ([`Agent::sync_services`]); anything else, or a refusal, is a full sync.
    async fn sync(&mut self, changes: Changes, pending_since: Option<Instant>) {
        let healthy = self
            .status
            .read()
            .is_ok_and(|st| st.syncs > 0 && st.last_error.is_none());
        // Many Services at once (a bulk load) are cheaper to recalculate together.
        let few = changes.services.len() <= INCREMENTAL_MAX_SERVICES;
        if healthy
            && !changes.other
            && few
            && self.sync_services(&changes.services, pending_since).await
        {
            return;
        }
        self.sync_dataplane(pending_since).await;
    }

    /// The incremental sync: the Services `names` recalculated alone, in the Service dataplane
    /// in use (BPF NAT entries and/or kube-proxy's chains); routes, interfaces and the other
    /// Services are not looked at. False when only a full sync can do it (nothing written, or
    /// an error the full sync will retry and report).
    async fn sync_services(
        &mut self,
        names: &BTreeSet<ServiceName>,
        pending_since: Option<Instant>,
    ) -> bool {
        let started = Instant::now();
        let revision = self.cache.revision;
        let node = self.config.node.clone();
        let (services, slices) = self.cache.services_and_slices_of(names);
        let mut bpf_summary = String::new();
        // Draining programs have no frontend: Services do not concern them.
        if let Some(bpf) = self.bpf.as_mut().filter(|b| !b.draining()) {
            match tokio::task::block_in_place(|| bpf.sync_services(names, &services, &slices)) {
                Some(Ok(summary)) => bpf_summary = summary,
                Some(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "one-Service BPF sync failed; syncing fully");
                    return false;
                }
                None => return false,
            }
        }
        let bpf_ms = started.elapsed().as_secs_f64() * 1000.0;
        let proxy = match self.proxy.sync_services(&node, names, &services, &slices) {
            Some(Ok(summary)) => summary,
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "one-Service iptables sync failed; syncing fully");
                return false;
            }
            None => return false,
        };
        self.health_checks.update(&proxy.health_checks).await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            duration_ms = format!("{ms:.1}"),
            bpf_ms = format!("{bpf_ms:.1}"),
            waited_ms = waited_ms(pending_since, started),
            revision,
            changed_services = names.len(),
            rules = %proxy.description,
            bpf = %bpf_summary,
            "dataplane sync (changed Services only)"
        );
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let services = self.cache.service_count();
        let snapshot = {
            let Ok(mut st) = self.status.write() else {
                return true;
            };
            st.syncs += 1;
            st.synced_revision = revision;
            st.last_sync_time = Some(now);
            st.last_sync_duration_ms = Some(ms);
            st.last_error = None;
            st.services = services;
            st.clone()
        };
        if let Some(path) = &self.config.status_file {
            write_status_file(path, &snapshot);
        }
        true
    }

    /// Computes the desired dataplane from the copy and applies the difference. Failures are
    /// logged and reported, and retried at the next sync; the previous state stays in place.
    async fn sync_dataplane(&mut self, pending_since: Option<Instant>) {
        let started = Instant::now();
        let revision = self.cache.revision;
        let node = self.config.node.clone();
        let requested = self.cache.requested_dataplane(&node);
        let mut message: Option<String> = None;

        let mut errors = Vec::new();
        let blocks = self.cache.blocks();
        // Between nodes: directly, or through VXLAN when a pool asks for it.
        let mode = self.cache.vxlan_mode();
        let peers: BTreeMap<String, vxlan::Peer> = self
            .cache
            .nodes()
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), vxlan::Peer::from_node(v)?)))
            .collect();
        let needed = peers.get(&node).is_some_and(|me| {
            peers
                .iter()
                .any(|(name, p)| *name != node && vxlan::tunnelled(mode, me, p))
        }) || mode == vxlan::Mode::Always;
        let felix = self.cache.felix(&node);
        if let Err(e) = vxlan::sync(
            &self.client,
            &node,
            self.config.node_ip,
            needed,
            felix.vxlan_vni.map_or(4096, |v| v.0),
            felix.vxlan_port.map_or(4789, |p| p.0),
            &peers,
        )
        .await
        {
            errors.push(format!("vxlan: {e:#}"));
        }
        let next_hops = vxlan::next_hops(&node, mode, &peers);
        let routes = desired_routes(&node, &blocks, &next_hops);
        let route_changes = match self.routes.apply(&routes).await {
            Ok(n) => n,
            Err(e) => {
                errors.push(format!("routes: {e:#}"));
                0
            }
        };
        // WireGuard between nodes: its own routing table and rule, ahead of the main table.
        let wg = self
            .wireguard
            .sync(&self.client, &self.cache, &node, self.config.node_ip)
            .await;
        errors.extend(wg.error);
        let wireguard_device = wg.device;
        if let Some(m) = wg.message {
            message = Some(message.map_or(m.clone(), |prev| format!("{prev}; {m}")));
        }
        let network_ms = started.elapsed().as_secs_f64() * 1000.0;
        let services = self.cache.services();
        let slices = self.cache.endpoint_slices();
        let pools = self.cache.pools();
        let local_ips: Vec<Ipv4Addr> = vec![self.config.node_ip];
        let host_ports = self.cache.host_ports(&node);
        // The Service dataplane: BPF when asked for and the node passes the preflight,
        // kube-proxy's rules otherwise.
        let mut active = LinuxDataplane::Iptables;
        let mut bpf_summary = String::new();
        match requested {
            LinuxDataplane::Bpf => {
                // Back to BPF while the programs were still draining: they take new flows again.
                if let Some(bpf) = self.bpf.as_mut()
                    && let Err(e) = bpf.resume()
                {
                    errors.push(format!("bpf: {e:#}"));
                }
                if self.bpf.is_none() {
                    let node_addresses: Vec<Ipv4Addr> = peers.values().map(|p| p.ip).collect();
                    if let Err(failed) = self
                        .preflight_and_load(&felix, &services, &slices, &node_addresses)
                        .await
                    {
                        message = Some(failed);
                    }
                }
                if let Some(bpf) = self.bpf.as_mut() {
                    let cidrs: Vec<ipnet::Ipv4Net> = pools.iter().map(|(n, _)| *n).collect();
                    match tokio::task::block_in_place(|| {
                        let peers: BTreeMap<String, Ipv4Addr> = peers
                            .iter()
                            .filter(|(name, _)| **name != node)
                            .map(|(name, p)| (name.clone(), p.ip))
                            .collect();
                        bpf.set_host_ports(margay_calc::host_ports::host_port_nat_services(
                            &host_ports,
                            &local_ips,
                        ));
                        bpf.sync(
                            &node,
                            &local_ips,
                            peers,
                            &cidrs,
                            &blocks,
                            &services,
                            &slices,
                            &felix,
                            self.wireguard.bpf_path().as_ref(),
                        )
                    }) {
                        Ok(summary) => {
                            active = LinuxDataplane::Bpf;
                            bpf_summary = summary;
                        }
                        Err(e) => errors.push(format!("bpf: {e:#}")),
                    }
                }
            }
            LinuxDataplane::Iptables => {
                if self.bpf.is_none() {
                    self.preflight = None;
                    self.last_preflight_failure = None;
                }
            }
            other => {
                message = Some(format!(
                    "{other} is not a dataplane this agent runs; staying in Iptables"
                ));
            }
        }
        // In BPF mode kube-proxy's Service rules go (bpfKubeProxyIptablesCleanupEnabled, the
        // default) or stay untouched but unused; natOutgoing stays either way.
        let cleanup = felix.bpf_kube_proxy_iptables_cleanup_enabled != Some(false);
        if let Err(e) = self
            .proxy
            .set_backend(felix.iptables_backend.unwrap_or(IptablesBackend::Auto))
        {
            errors.push(format!("iptables: {e:#}"));
        }
        let proxy = if active == LinuxDataplane::Bpf && cleanup {
            self.proxy
                .sync_nat_outgoing_only(&node, &services, &slices, &pools)
                .await
        } else {
            self.proxy
                .sync(
                    &node,
                    &local_ips,
                    &services,
                    &slices,
                    &pools,
                    // In BPF mode the programs serve hostPorts.
                    if active == LinuxDataplane::Bpf {
                        &[]
                    } else {
                        &host_ports
                    },
                )
                .await
        };
        // Back to Iptables: once the rules above are in place, the programs stop taking new
        // flows but go on translating the ones they opened (the kernel's conntrack never saw
        // those whole: kube-proxy's rules would NAT their next packet as a new flow, to another
        // source); when none is left, every program, link and map goes.
        if active != LinuxDataplane::Bpf
            && proxy.is_ok()
            && let Some(bpf) = self.bpf.as_mut()
        {
            let cidrs: Vec<ipnet::Ipv4Net> = pools.iter().map(|(n, _)| *n).collect();
            let live = tokio::task::block_in_place(|| {
                let was_draining = bpf.draining();
                bpf.start_drain(&node, &local_ips, &cidrs)?;
                if !was_draining {
                    tracing::info!("BPF programs take no new flows; draining the ones they opened");
                }
                bpf.live_flows(&felix)
            });
            let limit = self.config.bpf_drain_limit;
            match live {
                Ok(n) if n == 0 || bpf.drain_elapsed() >= limit => {
                    if n > 0 {
                        // The bound: a kept-alive connection may not hold the node between
                        // dataplanes for up to tcpEstablished (1 h). What is cut is said.
                        let flows = bpf.live_flow_descriptions(&felix).unwrap_or_default();
                        tracing::warn!(
                            flows = n,
                            limit_s = limit.as_secs_f64(),
                            "BPF drain limit reached: cutting {n} flow(s) the programs still translate: {}",
                            flows.join("; ")
                        );
                    }
                    let bpf = self.bpf.take().expect("checked above");
                    match tokio::task::block_in_place(|| bpf.remove()) {
                        Ok(()) => tracing::info!("BPF dataplane removed"),
                        Err(e) => errors.push(format!("bpf removal: {e:#}")),
                    }
                }
                Ok(n) => {
                    let left = limit.saturating_sub(bpf.drain_elapsed());
                    let m = format!(
                        "BPF programs stay attached for {n} flows they translated, until those end (at most {:.0} s more)",
                        left.as_secs_f64().ceil()
                    );
                    bpf_summary = m.clone();
                    message = Some(message.map_or(m.clone(), |prev| format!("{prev}; {m}")));
                }
                Err(e) => errors.push(format!("bpf drain: {e:#}")),
            }
        }
        let rule_summary = match proxy {
            Ok(summary) => {
                self.health_checks.update(&summary.health_checks).await;
                summary.description
            }
            Err(e) => {
                errors.push(format!("iptables: {e:#}"));
                String::from("iptables failed")
            }
        };

        let elapsed = started.elapsed();
        let ms = elapsed.as_secs_f64() * 1000.0;
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        match &error {
            None => tracing::info!(
                duration_ms = format!("{ms:.1}"),
                network_ms = format!("{network_ms:.1}"),
                waited_ms = waited_ms(pending_since, started),
                revision,
                services = services.len(),
                routes = routes.len(),
                route_changes,
                rules = %rule_summary,
                bpf = %bpf_summary,
                dataplane = active.as_str(),
                "dataplane sync"
            ),
            Some(e) => {
                tracing::error!(duration_ms = format!("{ms:.1}"), error = %e, "dataplane sync failed")
            }
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let snapshot = {
            let Ok(mut st) = self.status.write() else {
                return;
            };
            st.dataplane = active.to_string();
            st.syncs += 1;
            st.synced_revision = revision;
            st.last_sync_time = Some(now.clone());
            st.last_sync_duration_ms = Some(ms);
            st.last_error = error.clone();
            st.services = services.len();
            st.routes = routes.len();
            st.clone()
        };
        if let Some(path) = &self.config.status_file {
            write_status_file(path, &snapshot);
        }

        // The Node's status: written when it changes, and refreshed now and then for the last
        // sync time (writing it every sync would wake every agent on every sync).
        let pod_cidrs: Vec<String> = blocks
            .iter()
            .filter(|(_, owner)| **owner == node)
            .map(|(cidr, _)| cidr.to_string())
            .collect();
        self.report = Some(json!({
            "podCIDRs": if pod_cidrs.is_empty() { serde_json::Value::Null } else { json!(pod_cidrs) },
            "dataplane": {
                "requested": requested.as_str(),
                "active": active.as_str(),
                "message": message.or(error),
                // Which WireGuard runs (kernel or userspace, and why), while one does.
                "wireguardDevice": wireguard_device,
                "lastSyncTime": now,
                "lastSyncDurationMs": (ms * 1000.0).round() / 1000.0,
                "agentVersion": margay_api::VERSION,
                // Where this node's maps are pinned, for `margayctl bpf ... --node NAME`.
                "bpffsDir": (active == LinuxDataplane::Bpf)
                    .then(|| self.config.bpffs_dir.to_string_lossy().into_owned()),
            }
        }));
        self.publish_status().await;
    }

    /// The BPF preflight (`crate::preflight`) and, when it passes, the load. Records the
    /// outcome for the Node status; on failure returns the status message (logged once).
    async fn preflight_and_load(
        &mut self,
        felix: &margay_api::calico::FelixConfigurationSpec,
        services: &[k8s_openapi::api::core::v1::Service],
        slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
        node_addresses: &[Ipv4Addr],
    ) -> Result<(), String> {
        let bpffs = self.config.bpffs_dir.clone();
        let mut checks = vec![preflight::check("kernel BTF", preflight::kernel_btf())];
        checks.push(preflight::check(
            "bpffs",
            crate::bpf_mode::ensure_bpffs(&bpffs)
                .map(|()| format!("bpffs at {}", bpffs.display()))
                .map_err(|e| format!("{e:#}")),
        ));
        let ctlb = !matches!(
            felix.bpf_connect_time_load_balancing,
            Some(margay_api::calico::felix::ConnectTimeLoadBalancing::Disabled)
        );
        let mut cgroup = None;
        let cgroup_result = if ctlb {
            preflight::cgroup_v2(self.config.cgroup.as_deref(), &bpffs).map(|dir| {
                let detail = format!(
                    "cgroup v2 at {} (connect-time load balancing attaches there)",
                    dir.display()
                );
                cgroup = Some(dir);
                detail
            })
        } else {
            Ok("not needed: bpfConnectTimeLoadBalancing is Disabled".to_owned())
        };
        checks.push(preflight::check("cgroup v2", cgroup_result));
        let url = self.config.datastore_url.clone();
        let datastore = match margay_datastore::open::location(&url) {
            Ok(location) => {
                let resolved = preflight::resolve(&location).await;
                let range: ipnet::Ipv4Net = margay_datastore::registry::SERVICE_CIDR
                    .parse()
                    .expect("a CIDR");
                preflight::datastore(
                    &url,
                    &location,
                    &resolved,
                    &preflight::ServiceAddresses {
                        cluster_ip_range: range,
                        services,
                        slices,
                        node_addresses,
                    },
                )
            }
            Err(e) => Err(format!("cannot tell where the datastore {url} is: {e}")),
        };
        checks.push(preflight::check("datastore", datastore));
        if checks.iter().all(|c| c.passed) {
            let started =
                tokio::task::block_in_place(|| BpfDataplane::start(&bpffs, felix, cgroup));
            match started {
                Ok(bpf) => {
                    tracing::info!("BPF preflight passed; BPF dataplane loaded");
                    checks.push(preflight::check(
                        "programs",
                        Ok(
                            "loaded: the verifier accepted every program; maps created or adopted"
                                .to_owned(),
                        ),
                    ));
                    self.bpf = Some(bpf);
                }
                Err(e) => checks.push(preflight::check("programs", Err(format!("{e:#}")))),
            }
        }
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        self.preflight = Some(PreflightStatus {
            passed: failed.is_empty(),
            checks,
        });
        if failed.is_empty() {
            self.last_preflight_failure = None;
            return Ok(());
        }
        let message = format!(
            "BPF was requested but this node failed the preflight, staying in Iptables: {}",
            failed.join("; ")
        );
        // One line in the log, when the reason appears or changes (the check runs every sync).
        if self.last_preflight_failure.as_ref() != Some(&message) {
            tracing::warn!("{message}");
            self.last_preflight_failure = Some(message.clone());
        }
        Err(message)
    }

    /// In BPF mode between syncs: the conntrack cleanup and the map counts, then the Node
    /// status if the fills changed.
    async fn maintain_bpf(&mut self) {
        let felix = self.cache.felix(&self.config.node);
        let Some(bpf) = self.bpf.as_mut() else {
            return;
        };
        match tokio::task::block_in_place(|| bpf.maintain(&felix)) {
            Ok(Some(cleaned)) if cleaned.removed_entries > 0 => {
                tracing::info!(report = ?cleaned, "conntrack cleanup");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "BPF maintenance failed"),
        }
        self.publish_status().await;
    }

    /// Writes the Node's `status` (pod CIDRs and `dataplane`: the last sync's report, the
    /// preflight, the attachments and the map fills) when something other than the fills
    /// changed, when only the fills changed and they were last written [`BPF_MAINTENANCE`]
    /// ago or more, and every [`STATUS_HEARTBEAT`] for the last sync time.
    async fn publish_status(&mut self) {
        let Some(report) = self.report.clone() else {
            return;
        };
        let node = self.config.node.clone();
        let mut status = report;
        let (attached, fills) = match &self.bpf {
            Some(bpf) => (
                Some(serde_json::to_value(bpf.attachments()).unwrap_or_default()),
                Some(serde_json::to_value(bpf.map_fills()).unwrap_or_default()),
            ),
            None => (None, None),
        };
        let dp = &mut status["dataplane"];
        dp["preflight"] = serde_json::to_value(&self.preflight).unwrap_or_default();
        dp["attached"] = attached.unwrap_or_default();
        let mut substantive = status.clone();
        for volatile in ["lastSyncTime", "lastSyncDurationMs"] {
            if let Some(d) = substantive["dataplane"].as_object_mut() {
                d.remove(volatile);
            }
        }
        status["dataplane"]["maps"] = fills.clone().unwrap_or_default();
        let heartbeat_due = self
            .last_status_write
            .is_none_or(|t| t.elapsed() >= STATUS_HEARTBEAT);
        let fills_due = self.last_fills != fills
            && self
                .last_fills_write
                .is_none_or(|t| t.elapsed() >= BPF_MAINTENANCE);
        if self.last_node_status.as_ref() == Some(&substantive) && !heartbeat_due && !fills_due {
            return;
        }
        match crate::node::update_status(&self.client, &node, strip_nulls(status)).await {
            Ok(_) => {
                self.last_node_status = Some(substantive);
                self.last_status_write = Some(Instant::now());
                self.last_fills = fills;
                self.last_fills_write = Some(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "cannot update the Node status"),
        }
    }
}

/// How long the oldest change a sync programs waited for it, in ms ("-" for none).
fn waited_ms(pending_since: Option<Instant>, started: Instant) -> String {
    pending_since.map_or("-".to_owned(), |t| {
        format!("{:.1}", started.duration_since(t).as_secs_f64() * 1000.0)
    })
}

fn strip_nulls(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(map) = v.as_object_mut() {
        map.retain(|_, x| !x.is_null());
        for x in map.values_mut() {
            *x = strip_nulls(x.take());
        }
    }
    v
}

fn write_status_file(path: &std::path::Path, status: &AgentStatus) {
    let tmp = path.with_extension("tmp");
    let result = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
    }
}

/// Used by the proxy module to describe a sync.
#[derive(Debug, Default)]
pub struct ProxySummary {
    pub description: String,
    pub health_checks: BTreeMap<u16, crate::health::ServiceHealth>,
}
