//! `margay-lab etcd stop|start|status`: the lab's own etcd (`up --datastore etcd`), for outage
//! drills. Stopping it leaves the agents running on what they programmed; starting it again
//! lets them resync.

use std::process::ExitCode;

use anyhow::{Result, bail};
use margay_lab::Lab;
use margay_lab::controller::etcd;

use crate::cli::EtcdCommand;

pub fn run(name: &str, command: EtcdCommand) -> Result<ExitCode> {
    super::require_root("etcd")?;
    let lab = Lab::open(name)?;
    if !etcd::is_lab_etcd(&lab)? {
        bail!(
            "lab {name} does not run its own etcd (it was brought up without `--datastore etcd`)"
        );
    }
    match command {
        EtcdCommand::Stop => {
            if etcd::stop(&lab)? {
                margayctl::outln!(
                    "etcd stopped; its data stays in {}",
                    etcd::dir(&lab).display()
                );
            } else {
                margayctl::outln!("etcd was not running");
            }
        }
        EtcdCommand::Start { socket } => {
            let url = super::runtime()?.block_on(etcd::start(&lab, socket.as_deref()))?;
            margayctl::outln!("etcd serves {url}");
        }
        EtcdCommand::Status => match etcd::running(&lab)? {
            Some(pid) => margayctl::outln!("{} (pid {pid})", etcd::url(&lab)),
            None => margayctl::outln!("{} (stopped)", etcd::url(&lab)),
        },
    }
    Ok(ExitCode::SUCCESS)
}
