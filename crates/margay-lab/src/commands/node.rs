//! `margay-lab node exec|add|delete|restart-agent`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use margay_lab::{Lab, Target};

use crate::cli::NodeCommand;

pub fn run(name: &str, command: NodeCommand) -> Result<ExitCode> {
    let lab = Lab::open(name)?;
    match command {
        NodeCommand::Exec { node, command } => {
            lab.node(&node)?;
            let status = lab.exec_interactive(&Target::Node(node), &command.argv)?;
            Ok(super::exit_code(status))
        }
        NodeCommand::Add { node } => {
            super::require_root("node add")?;
            let started = Instant::now();
            let n = lab.add_node(&node)?;
            // A lab with a cluster: the new node gets its agent, and the control loops run.
            if !infrastructure_only(&lab)? {
                super::runtime()?.block_on(async {
                    let cluster = margay_lab::controller::Cluster::open(name).await?;
                    super::up::prepare_node(&lab, &node)?;
                    margay_lab::controller::agents::start(&lab, &node, &cluster.datastore_url)?;
                    cluster.converge().await
                })?;
            }
            margayctl::outln!(
                "node {} added: {} in {} (port {}) in {:.1} ms",
                n.name,
                n.ip,
                n.netns,
                n.underlay_veth,
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::RestartAgent { node, datastore } => {
            super::require_root("node restart-agent")?;
            lab.node(&node)?;
            if infrastructure_only(&lab)? {
                anyhow::bail!("the lab was built with --infrastructure-only: it has no agents");
            }
            let started = Instant::now();
            let (old, new) = super::runtime()?.block_on(async {
                let cluster = margay_lab::controller::Cluster::open(name).await?;
                let pids = margay_lab::controller::agents::restart_after_crash(
                    &lab,
                    &node,
                    datastore.as_deref().unwrap_or(&cluster.datastore_url),
                )?;
                cluster.converge().await?;
                anyhow::Ok(pids)
            })?;
            margayctl::outln!(
                "agent of {node} killed (pid {old}, SIGKILL) and restarted (pid {new}), in sync after {:.1} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Delete { node } => {
            super::require_root("node delete")?;
            let started = Instant::now();
            lab.delete_node(&node)?;
            margay_lab::controller::agents::remove_bpffs(&lab, &node)?;
            if !infrastructure_only(&lab)? {
                super::runtime()?.block_on(async {
                    let cluster = margay_lab::controller::Cluster::open(name).await?;
                    cluster.forget_node(&node).await?;
                    cluster.converge().await
                })?;
            }
            margayctl::outln!(
                "node {node} deleted in {:.1} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether the lab was built without a cluster (`up --infrastructure-only`).
fn infrastructure_only(lab: &Lab) -> Result<bool> {
    Ok(!lab
        .state()?
        .annotations
        .contains_key(margay_lab::controller::DATASTORE_ANNOTATION))
}
