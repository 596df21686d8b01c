//! [`Lab`]: create, open and inspect a lab; add and delete nodes; steer the router's
//! LoadBalancer route. Pods, processes, teardown and status live in sibling files as further
//! `impl Lab` blocks.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::cgroup::{self, EXTERNAL_GROUP, LabCgroups};
use crate::cmd::{self, Job};
use crate::config::{LabConfig, LbMode};
use crate::error::{Error, Result};
use crate::naming::{Target, netns_name, netns_prefix, validate_lab_name, validate_node_name};
use crate::state::{LabState, NodeState, PodState, STATE_ROOT, STATE_VERSION, StateStore};
use crate::topology::{self, LbRoute};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Where `ip netns exec` finds per-namespace files (resolv.conf) to bind over /etc.
pub const ETC_NETNS_DIR: &str = "/etc/netns";

/// One step of `create`, for progress output.
#[derive(Debug, Clone)]
pub struct Progress {
    /// A short name of the step (`namespaces`, `links`, ...).
    pub step: &'static str,
    /// What was done, for humans (`7 namespaces`).
    pub detail: String,
    /// How long the step took.
    pub elapsed: Duration,
}

/// A handle on one lab. Cheap to clone; every method re-reads the state, so several handles (in
/// several processes) see each other's changes. `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Lab {
    pub(crate) name: String,
    pub(crate) store: StateStore,
    pub(crate) cgroups: Option<LabCgroups>,
}

/// `sqlite:///run/margay-lab/<lab>/margay.db`: the datastore a lab's control plane uses unless
/// told otherwise.
pub fn default_datastore_url(lab: &str) -> String {
    format!(
        "sqlite://{}",
        crate::state::state_dir(lab).join("margay.db").display()
    )
}

/// The namespaces in /run/netns that belong to `lab` (named `<lab>-*`), sorted.
pub fn lab_netns(lab: &str) -> Vec<String> {
    names_with_prefix(Path::new(NETNS_DIR), &netns_prefix(lab))
}

pub(crate) fn names_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub(crate) fn netns_exists(netns: &str) -> bool {
    Path::new(NETNS_DIR).join(netns).exists()
}

// === impl Lab: create, open, accessors ===

impl Lab {
    /// Builds a lab: namespaces, underlay bridge, router, client, nodes, cgroups, state.
    ///
    /// Refuses (with [`Error::Exists`], which says to run `margay-lab down --name X`) if any
    /// piece of a lab with this name exists. If a step fails, everything made so far is torn
    /// down before the error is returned.
    pub fn create(config: LabConfig) -> Result<Lab> {
        Lab::create_with_progress(config, &mut |_| {})
    }

    /// As [`Lab::create`], reporting each step and its duration.
    pub fn create_with_progress(
        config: LabConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Lab> {
        config.validate()?;
        let name = config.name.clone();
        let found = Lab::footprint(&name)?;
        if !found.is_empty() {
            return Err(Error::Exists { name, found });
        }
        let store = StateStore::new(&name);
        // Claim the name: mkdir is atomic, so of two concurrent `up`s exactly one gets here.
        match cgroup::create_dir_in_shared_parent(Path::new(STATE_ROOT), store.dir()) {
            Ok(()) => {}
            Err(Error::Io { cause, .. }) if cause.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::Exists {
                    name,
                    found: vec![format!("state directory {}", store.dir().display())],
                });
            }
            Err(e) => return Err(e),
        }
        // From here on the name is ours: any failure tears down what exists.
        // A panic (in `progress`, say) tears down too, then goes on unwinding.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Lab::build(config, store, progress)
        }));
        match built {
            Ok(Ok(lab)) => Ok(lab),
            Ok(Err(e)) => {
                if let Err(cleanup) = Lab::destroy(&name) {
                    tracing::warn!(lab = %name, error = %cleanup, "cleanup after a failed create");
                }
                Err(e)
            }
            Err(panic) => {
                let _ = Lab::destroy(&name);
                std::panic::resume_unwind(panic)
            }
        }
    }

    fn build(
        config: LabConfig,
        store: StateStore,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Lab> {
        let lab_name = config.name.clone();
        let lab_name = lab_name.as_str();
        let fail_after = config.fail_after_step.clone();
        let mut step = |name: &'static str, detail: String, started: Instant| {
            progress(&Progress {
                step: name,
                detail,
                elapsed: started.elapsed(),
            });
            if fail_after.as_deref() == Some(name) {
                return Err(Error::invalid(
                    "create",
                    lab_name,
                    format!("failed on request after step {name:?} (test hook)"),
                ));
            }
            Ok(())
        };

        // State, logs and cgroups.
        let started = Instant::now();
        std::fs::create_dir_all(store.dir().join("logs"))
            .map_err(|e| Error::io_path("create", &store.dir().join("logs"), e))?;
        let cgroup_mount = cgroup::detect_mount();
        let cgroups = cgroup_mount.clone().map(|m| LabCgroups::new(m, lab_name));
        let nodes: Vec<NodeState> = config
            .nodes
            .iter()
            .zip(1..)
            .map(|(n, slot)| topology::node_state(lab_name, &config, n, slot))
            .collect::<Result<_>>()?;
        if let Some(cg) = &cgroups {
            cg.create_lab_dir()?;
            cg.create_group(EXTERNAL_GROUP)?;
            for n in &nodes {
                cg.create_group(&n.name)?;
            }
        }
        let state = LabState {
            version: STATE_VERSION,
            lb_mode: config.lb_mode.clone(),
            config,
            created_at: Utc::now(),
            cgroup_mount: cgroup_mount.clone(),
            nodes,
            pods: Vec::new(),
            processes: Vec::new(),
            annotations: BTreeMap::new(),
        };
        {
            let lock = store.lock()?;
            store.save(&state, &lock)?;
        }
        step(
            "state",
            match &cgroups {
                Some(cg) => format!(
                    "{}, cgroup {}",
                    store.dir().display(),
                    cg.lab_dir().display()
                ),
                None => format!(
                    "{} (cgroup2 not mounted: no cgroups)",
                    store.dir().display()
                ),
            },
            started,
        )?;

        // Namespaces: one `ip -batch` for all.
        let started = Instant::now();
        let [underlay, router, client] = topology::fixed_netns(lab_name);
        let mut all_netns = vec![underlay.clone(), router.clone(), client.clone()];
        all_netns.extend(state.nodes.iter().map(|n| n.netns.clone()));
        let adds: Vec<String> = all_netns
            .iter()
            .map(|ns| format!("netns add {ns}"))
            .collect();
        cmd::ip_batch(None, &adds)?;
        step(
            "namespaces",
            format!("{} namespaces", all_netns.len()),
            started,
        )?;

        // Links: every veth is created from the underlay namespace, each end directly in its
        // namespace (nothing passes through the root namespace).
        let started = Instant::now();
        let config = &state.config;
        let mut lines = topology::underlay_base_lines(lab_name, config);
        for n in &state.nodes {
            lines.extend(topology::underlay_node_lines(config, n));
        }
        cmd::ip_batch(Some(&underlay), &lines)?;
        step(
            "links",
            format!("bridge br0 and {} veth pairs", state.nodes.len() + 2),
            started,
        )?;

        // Addresses, routes and sysctls: every namespace at once.
        let started = Instant::now();
        let mut jobs: Vec<Job<'_>> = Vec::new();
        let router_lines = topology::router_lines(config, &state.lb_mode, &state.nodes);
        let router_ns = router.clone();
        jobs.push(Box::new(move || {
            cmd::ip_batch(Some(&router_ns), &router_lines)
        }));
        let router_ns = router.clone();
        jobs.push(Box::new(move || {
            cmd::sysctl(&router_ns, &topology::router_sysctls())
        }));
        let client_lines = topology::client_lines(config);
        jobs.push(Box::new(move || {
            cmd::ip_batch(Some(&client), &client_lines)
        }));
        for n in &state.nodes {
            jobs.extend(node_jobs(config, n));
        }
        cmd::parallel(jobs)?;
        step(
            "addresses",
            format!(
                "router, client and {} nodes addressed, routed, sysctls set; LoadBalancer {} -> {}",
                state.nodes.len(),
                config.lb_pool,
                state.lb_mode
            ),
            started,
        )?;

        Ok(Lab {
            name: lab_name.to_owned(),
            store,
            cgroups,
        })
    }

    /// Opens an existing lab from its state.
    pub fn open(name: &str) -> Result<Lab> {
        validate_lab_name(name)?;
        let store = StateStore::new(name);
        let state = store.load()?;
        Ok(Lab {
            name: name.to_owned(),
            cgroups: state.cgroup_mount.clone().map(|m| LabCgroups::new(m, name)),
            store,
        })
    }

    /// Everything of a lab called `name` that exists on this machine, whatever the state says:
    /// namespaces, state directory, cgroup, /etc/netns entries. Empty after a clean `destroy`.
    pub fn footprint(name: &str) -> Result<Vec<String>> {
        validate_lab_name(name)?;
        let mut found: Vec<String> = lab_netns(name)
            .into_iter()
            .map(|ns| format!("netns {ns}"))
            .collect();
        let dir = crate::state::state_dir(name);
        if dir.exists() {
            found.push(format!("state directory {}", dir.display()));
        }
        if let Some(mount) = cgroup::detect_mount() {
            let cg = LabCgroups::new(mount, name);
            if cg.lab_dir().exists() {
                found.push(format!("cgroup {}", cg.lab_dir().display()));
            }
        }
        for d in names_with_prefix(Path::new(ETC_NETNS_DIR), &netns_prefix(name)) {
            found.push(format!("{ETC_NETNS_DIR}/{d}"));
        }
        Ok(found)
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/margay-lab/<lab>`.
    pub fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    /// `/run/margay-lab/<lab>/logs`: where spawned processes' output goes.
    pub fn logs_dir(&self) -> PathBuf {
        self.store.dir().join("logs")
    }

    /// `sqlite:///run/margay-lab/<lab>/margay.db`.
    pub fn default_datastore_url(&self) -> String {
        default_datastore_url(&self.name)
    }

    /// The current state (re-read from disk).
    pub fn state(&self) -> Result<LabState> {
        self.store.load()
    }

    /// The configuration the lab was created with.
    pub fn config(&self) -> Result<LabConfig> {
        Ok(self.state()?.config)
    }

    /// The nodes, in slot order.
    pub fn nodes(&self) -> Result<Vec<NodeState>> {
        Ok(self.state()?.nodes)
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<NodeState> {
        let state = self.state()?;
        state
            .node(name)
            .cloned()
            .ok_or_else(|| self.missing_node(&state, name))
    }

    /// The pod networks.
    pub fn pods(&self) -> Result<Vec<PodState>> {
        Ok(self.state()?.pods)
    }

    /// The namespace a target runs in (`<lab>-node-1`, the pod's own, `<lab>-client`, ...).
    pub fn netns(&self, target: &Target) -> String {
        match target {
            Target::Node(n) => netns_name(&self.name, n),
            Target::Pod(ns) => ns.clone(),
            Target::Client => netns_name(&self.name, "client"),
            Target::Router => netns_name(&self.name, "router"),
            Target::Underlay => netns_name(&self.name, "underlay"),
        }
    }

    /// The namespace's bind mount (`/run/netns/<netns>`): open it to `setns` a thread into the
    /// namespace (netlink from Rust) instead of running a command there.
    pub fn netns_path(&self, target: &Target) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns(target))
    }

    /// The cgroup directory a target's processes join, or `None` without cgroup2.
    pub fn cgroup_dir(&self, target: &Target) -> Result<Option<PathBuf>> {
        let Some(cg) = &self.cgroups else {
            return Ok(None);
        };
        let group = match target {
            Target::Node(n) => n.clone(),
            Target::Pod(ns) => {
                let state = self.state()?;
                state
                    .pod(ns)
                    .map(|p| p.node.clone())
                    .ok_or_else(|| Error::Missing {
                        lab: self.name.clone(),
                        what: "pod",
                        name: ns.clone(),
                        hint: String::new(),
                    })?
            }
            Target::Client | Target::Router | Target::Underlay => EXTERNAL_GROUP.to_owned(),
        };
        Ok(Some(cg.group_dir(&group)))
    }

    /// Stores a free-form value in the state (for layers above: pids, ports, URLs).
    pub fn set_annotation(&self, key: &str, value: serde_json::Value) -> Result<()> {
        self.store.update(|s| {
            s.annotations.insert(key.to_owned(), value);
            Ok(())
        })
    }

    /// Removes a stored value.
    pub fn remove_annotation(&self, key: &str) -> Result<()> {
        self.store.update(|s| {
            s.annotations.remove(key);
            Ok(())
        })
    }

    pub(crate) fn missing_node(&self, state: &LabState, name: &str) -> Error {
        let known: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        Error::Missing {
            lab: self.name.clone(),
            what: "node",
            name: name.to_owned(),
            hint: format!(" (nodes: {})", known.join(", ")),
        }
    }
}

/// The jobs that address and configure one node's namespace (after its link exists).
fn node_jobs<'a>(config: &'a LabConfig, node: &'a NodeState) -> Vec<Job<'a>> {
    vec![
        Box::new(move || cmd::ip_batch(Some(&node.netns), &topology::node_lines(config, node))),
        Box::new(move || cmd::sysctl(&node.netns, &topology::node_sysctls())),
    ]
}

// === impl Lab: nodes and the router ===

impl Lab {
    /// Adds a node in the next free slot (lowest free address from `first_node_ip`), wired like
    /// the others; the LoadBalancer route is updated.
    pub fn add_node(&self, name: &str) -> Result<NodeState> {
        validate_node_name(name)?;
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        if state.node(name).is_some() {
            return Err(Error::Duplicate {
                lab: self.name.clone(),
                what: "node",
                name: name.to_owned(),
            });
        }
        let slot = (1..)
            .find(|s| state.nodes.iter().all(|n| n.slot != *s))
            .unwrap_or(1);
        let node = topology::node_state(&self.name, &state.config, name, slot)?;
        let underlay = netns_name(&self.name, "underlay");

        let wire = || -> Result<()> {
            cmd::run("ip", &["netns", "add", node.netns.as_str()])?;
            if let Some(cg) = &self.cgroups {
                cg.create_group(name)?;
            }
            cmd::ip_batch(
                Some(&underlay),
                &topology::underlay_node_lines(&state.config, &node),
            )?;
            cmd::parallel(node_jobs(&state.config, &node))
        };
        if let Err(e) = wire() {
            self.unwire_node(&node);
            return Err(e);
        }
        state.nodes.push(node.clone());
        state.nodes.sort_by_key(|n| n.slot);
        if let Err(e) = self.apply_lb_route(&state) {
            self.unwire_node(&node);
            return Err(e);
        }
        self.store.save(&state, &lock)?;
        Ok(node)
    }

    /// Deletes a node with its pods and their processes; the LoadBalancer route is updated.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        let node = state
            .node(name)
            .cloned()
            .ok_or_else(|| self.missing_node(&state, name))?;
        let pods: Vec<PodState> = state
            .pods
            .iter()
            .filter(|p| p.node == name)
            .cloned()
            .collect();
        // Processes first: the node's cgroup holds its own and its pods' processes.
        if let Some(cg) = &self.cgroups {
            LabCgroups::kill_tree(&cg.group_dir(name), Duration::from_secs(5))?;
        }
        let mut namespaces = vec![node.netns.clone()];
        namespaces.extend(pods.iter().map(|p| p.netns.clone()));
        crate::destroy::kill_in_netns(&namespaces, Duration::from_secs(5))?;
        for p in &pods {
            crate::pods::remove_pod_kernel_state(&self.name, p)?;
        }
        self.unwire_node(&node);
        if netns_exists(&node.netns) {
            return Err(Error::Timeout(format!(
                "namespace {} could not be deleted",
                node.netns
            )));
        }
        let pod_targets: Vec<Target> = pods.iter().map(|p| Target::Pod(p.netns.clone())).collect();
        state.nodes.retain(|n| n.name != name);
        state.pods.retain(|p| p.node != name);
        state.processes.retain(|r| {
            r.target != Target::Node(name.to_owned()) && !pod_targets.contains(&r.target)
        });
        self.apply_lb_route(&state)?;
        self.store.save(&state, &lock)
    }

    /// Best-effort removal of one node's kernel objects (used on failure and by delete).
    fn unwire_node(&self, node: &NodeState) {
        let underlay = netns_name(&self.name, "underlay");
        // Deleting the underlay end first makes the port name free at once (namespace cleanup
        // in the kernel is asynchronous).
        let _ = cmd::run(
            "ip",
            &[
                "-n",
                underlay.as_str(),
                "link",
                "del",
                node.underlay_veth.as_str(),
            ],
        );
        if netns_exists(&node.netns) {
            let _ = cmd::run("ip", &["netns", "del", node.netns.as_str()]);
        }
        if let Some(cg) = &self.cgroups {
            let _ = LabCgroups::remove_tree(&cg.group_dir(&node.name));
        }
    }

    /// Sets how the router spreads the LoadBalancer pool over the nodes.
    pub fn set_lb_mode(&self, mode: LbMode) -> Result<()> {
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        if let LbMode::Node(n) = &mode
            && state.node(n).is_none()
        {
            return Err(self.missing_node(&state, n));
        }
        state.lb_mode = mode;
        self.apply_lb_route(&state)?;
        self.store.save(&state, &lock)
    }

    /// The router's current load-balancing mode.
    pub fn lb_mode(&self) -> Result<LbMode> {
        Ok(self.state()?.lb_mode)
    }

    /// Makes the router's LoadBalancer route match `state`.
    fn apply_lb_route(&self, state: &LabState) -> Result<()> {
        let router = netns_name(&self.name, "router");
        match topology::lb_route(&state.config, &state.lb_mode, &state.nodes) {
            LbRoute::Replace(line) => cmd::ip_batch(Some(&router), &[line]),
            LbRoute::Absent(line) => match cmd::ip_batch(Some(&router), &[line]) {
                Err(Error::Command { stderr, .. }) if stderr.contains("No such process") => Ok(()),
                other => other,
            },
        }
    }
}
