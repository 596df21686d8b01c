//! `margay-lab up`: build the topology, printing each step with its duration.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use margay_lab::controller::{Cluster, agents, etcd};
use margay_lab::{Lab, LabConfig, LbMode, Target};

use crate::cli::UpArgs;

/// `println!` for `up`'s report: best effort, since a closed stdout must not stop (or panic)
/// building the lab.
macro_rules! progress {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Builds the lab's infrastructure and returns it (for later steps: agents, datastore, DNS).
pub fn run(name: &str, args: &UpArgs) -> Result<Lab> {
    super::require_root("up")?;
    let mut config = LabConfig::new(name, args.nodes);
    config.lb_mode = args.lb_mode.parse::<LbMode>()?;
    let started = Instant::now();
    progress!("lab {name}: {} nodes", args.nodes);
    let lab = Lab::create_with_progress(config, &mut |p| {
        // Progress only: a closed stdout must not stop (or panic) the build.
        let _ = writeln!(
            std::io::stdout(),
            "  {:<10} {:>6.1} ms  {}",
            p.step,
            p.elapsed.as_secs_f64() * 1000.0,
            p.detail
        );
    })
    .with_context(|| format!("cannot build lab {name:?}"))?;
    progress!(
        "  {:<10} {:>6.1} ms",
        "network",
        started.elapsed().as_secs_f64() * 1000.0
    );
    if !args.infrastructure_only {
        let result = super::runtime()?.block_on(start_cluster(&lab, args, started));
        if let Err(e) = result {
            return Err(e.context(format!(
                "the lab's network is up but its cluster did not start; see {} and take it down with `margay-lab --name {} down`",
                lab.logs_dir().display(),
                lab.name()
            )));
        }
    }
    progress!(
        "  {:<10} {:>6.1} ms",
        "total",
        started.elapsed().as_secs_f64() * 1000.0
    );
    print_summary(&lab)?;
    Ok(lab)
}

/// The cluster on top of the network: datastore, system resources, one agent per node, cluster
/// DNS; returns once every agent has programmed it.
async fn start_cluster(lab: &Lab, args: &UpArgs, started: Instant) -> Result<()> {
    let step = |what: &str, detail: String| {
        progress!(
            "  {:<10} {:>6.1} ms  {detail}",
            what,
            started.elapsed().as_secs_f64() * 1000.0
        );
    };
    let dataplane = match args.dataplane.as_str() {
        "iptables" => "Iptables",
        "bpf" => "BPF",
        other => anyhow::bail!("--dataplane {other:?}: use iptables or bpf"),
    };
    let url = match args.datastore.as_deref() {
        // The lab's own etcd, on a unix socket in its state directory (controller/etcd.rs).
        Some(etcd::LAB_ETCD) => {
            lab.set_annotation(etcd::ETCD_ANNOTATION, serde_json::Value::Bool(true))?;
            let url = etcd::start(lab, None).await?;
            step(
                "etcd",
                format!("{url} (data in {})", etcd::dir(lab).display()),
            );
            url
        }
        Some(url) => url.to_owned(),
        None => lab.default_datastore_url(),
    };
    lab.set_annotation(
        margay_lab::controller::DATASTORE_ANNOTATION,
        serde_json::Value::String(url.clone()),
    )?;
    let cluster = Cluster::connect(lab.clone(), url.clone()).await?;
    cluster.install_system().await?;
    cluster
        .client
        .patch(
            &margay_datastore::Key::new(margay_api::Kind::Installation, None, "default"),
            &format!(r#"{{"spec":{{"calicoNetwork":{{"linuxDataplane":"{dataplane}"}}}}}}"#),
            margay_api::patch::PatchType::Merge,
        )
        .await?;
    step("datastore", format!("{url}, dataplane {dataplane}"));
    for node in cluster.node_names()? {
        prepare_node(lab, &node)?;
        agents::start(lab, &node, &url)?;
    }
    step(
        "agents",
        format!("margay-node on {} nodes", cluster.node_names()?.len()),
    );
    cluster.converge().await?;
    step(
        "dns",
        "kube-system/kube-dns at 10.96.0.10 (dnsmasq)".to_owned(),
    );
    Ok(())
}

/// What a node's OS setup would do: no ICMP redirects (the node routes pod traffic back out of
/// the interface it came in on, and a redirect would get a REJECT's ICMP error rate-limited).
pub fn prepare_node(lab: &Lab, node: &str) -> Result<()> {
    lab.exec_checked(
        &Target::node(node),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ],
    )?;
    Ok(())
}

fn print_summary(lab: &Lab) -> Result<()> {
    let state = lab.state()?;
    let c = &state.config;
    progress!(
        "client {} -> router {} / {} -> nodes:",
        c.client_ip,
        c.router_internet_ip,
        c.router_underlay_ip
    );
    for n in &state.nodes {
        progress!("  {:<10} {:<15} netns {}", n.name, n.ip, n.netns);
    }
    progress!("LoadBalancer IPs {} -> {}", c.lb_pool, state.lb_mode);
    progress!(
        "try: margay-lab --name {0} node exec {1} -- ping -c1 {2}; margay-lab --name {0} status; margay-lab --name {0} down",
        lab.name(),
        state.nodes.first().map_or("node-1", |n| n.name.as_str()),
        c.client_ip
    );
    Ok(())
}
