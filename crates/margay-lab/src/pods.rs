//! Pod networks, wired as Calico's CNI plugin wires them: a namespace whose `eth0` holds the pod's
//! /32 and routes everything via 169.254.1.1, answered by proxy ARP on the host end of the veth
//! (`cali...`) in the node's namespace, where a /32 route points back at the pod.

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;

use crate::cmd::{self, Job};
use crate::error::{Error, Result};
use crate::lab::{ETC_NETNS_DIR, Lab, netns_exists};
use crate::naming::{Target, validate_ifname, validate_pod_netns};
use crate::state::PodState;
use crate::topology;

impl Lab {
    /// Creates the network of a pod on `node`: namespace `pod_ns` (`<lab>-pod-<id>`, see
    /// [`crate::new_pod_netns_name`]), a veth whose host end `host_veth` (Calico-style
    /// `cali` + 11 hex, see [`crate::new_host_veth_name`]) stays in the node's namespace with
    /// proxy ARP and a `<pod_ip>/32` route, and whose other end is the pod's `eth0` with
    /// `<pod_ip>/32` and a default route via 169.254.1.1.
    ///
    /// Refuses an unknown node, a pod namespace, address or host interface already recorded.
    /// On failure nothing of the pod is left.
    pub fn create_pod_network(
        &self,
        node: &str,
        pod_ns: &str,
        pod_ip: Ipv4Addr,
        host_veth: &str,
    ) -> Result<()> {
        validate_pod_netns(&self.name, pod_ns)?;
        validate_ifname(host_veth)?;
        let state = self.store.load()?;
        let node_state = state
            .node(node)
            .cloned()
            .ok_or_else(|| self.missing_node(&state, node))?;
        let duplicate = |what: &'static str, name: String| Error::Duplicate {
            lab: self.name.clone(),
            what,
            name,
        };
        if state.pod(pod_ns).is_some() {
            return Err(duplicate("pod", pod_ns.to_owned()));
        }
        if let Some(p) = state.pods.iter().find(|p| p.ip == pod_ip) {
            return Err(duplicate(
                "pod address",
                format!("{pod_ip} (pod {})", p.netns),
            ));
        }
        if state
            .pods
            .iter()
            .any(|p| p.node == node && p.host_veth == host_veth)
        {
            return Err(duplicate("host interface", format!("{node}/{host_veth}")));
        }
        let pod = PodState {
            netns: pod_ns.to_owned(),
            node: node.to_owned(),
            ip: pod_ip,
            host_veth: host_veth.to_owned(),
            created_at: Utc::now(),
        };
        let mtu = state.config.pod_mtu;

        // `ip netns add` fails if the namespace exists; only then is it not ours to remove.
        cmd::run("ip", &["netns", "add", pod_ns])?;
        let wire = || -> Result<()> {
            cmd::ip_batch(
                Some(&node_state.netns),
                &topology::pod_host_lines(pod_ns, host_veth, pod_ip, mtu),
            )?;
            let node_ns = node_state.netns.clone();
            let jobs: Vec<Job<'_>> = vec![
                Box::new(move || cmd::sysctl(&node_ns, &topology::pod_host_sysctls(host_veth))),
                Box::new(move || cmd::ip_batch(Some(pod_ns), &topology::pod_lines(pod_ip))),
            ];
            cmd::parallel(jobs)?;
            self.store.update(|s| {
                if s.node(node).is_none() {
                    return Err(self.missing_node(s, node));
                }
                s.pods.push(pod.clone());
                Ok(())
            })
        };
        if let Err(e) = wire() {
            let _ = remove_pod_kernel_state(&self.name, &pod);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a pod's network: its processes, host veth (with its route), namespace and
    /// /etc/netns entry. Idempotent: a pod that is already gone (or half made) is fine.
    pub fn delete_pod_network(&self, pod_ns: &str) -> Result<()> {
        validate_pod_netns(&self.name, pod_ns)?;
        let state = self.store.load()?;
        crate::destroy::kill_in_netns(&[pod_ns.to_owned()], Duration::from_secs(5))?;
        match state.pod(pod_ns) {
            Some(pod) => remove_pod_kernel_state(&self.name, pod)?,
            None => {
                // Not recorded (a crash between wiring and recording): the namespace still goes,
                // and the veth with it.
                if netns_exists(pod_ns) {
                    cmd::run("ip", &["netns", "del", pod_ns])?;
                }
                remove_etc_netns(pod_ns)?;
            }
        }
        self.store.update(|s| {
            s.pods.retain(|p| p.netns != pod_ns);
            s.processes
                .retain(|r| r.target != Target::Pod(pod_ns.to_owned()));
            Ok(())
        })
    }

    /// Writes the resolv.conf that processes started in `pod_ns` (through `ip netns exec`, as
    /// `spawn` and `exec` do) see at /etc/resolv.conf: `/etc/netns/<pod_ns>/resolv.conf`.
    pub fn write_pod_resolv_conf(&self, pod_ns: &str, text: &str) -> Result<PathBuf> {
        validate_pod_netns(&self.name, pod_ns)?;
        if !netns_exists(pod_ns) {
            return Err(Error::Missing {
                lab: self.name.clone(),
                what: "pod namespace",
                name: pod_ns.to_owned(),
                hint: " (create its network first)".to_owned(),
            });
        }
        let dir = Path::new(ETC_NETNS_DIR).join(pod_ns);
        let path = dir.join("resolv.conf");
        let tmp = dir.join(format!(".resolv.conf.tmp.{}", std::process::id()));
        let mut last = None;
        // Retried: another lab's `down` may remove the shared, empty /etc/netns in between.
        for _ in 0..5 {
            let attempt = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&tmp, text))
                .and_then(|()| std::fs::rename(&tmp, &path));
            match attempt {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == ErrorKind::NotFound => last = Some(e),
                Err(e) => return Err(Error::io_path("write", &path, e)),
            }
        }
        Err(Error::io_path(
            "write",
            &path,
            last.unwrap_or_else(|| std::io::Error::other("retries exhausted")),
        ))
    }
}

/// Deletes the host veth (which takes the pod's `eth0` and the /32 route with it, at once), the
/// namespace and its /etc/netns entry; missing pieces are fine.
pub(crate) fn remove_pod_kernel_state(lab: &str, pod: &PodState) -> Result<()> {
    let node_ns = crate::naming::netns_name(lab, &pod.node);
    if netns_exists(&node_ns) {
        match cmd::run(
            "ip",
            &[
                "-n",
                node_ns.as_str(),
                "link",
                "del",
                pod.host_veth.as_str(),
            ],
        ) {
            Ok(_) => {}
            Err(Error::Command { stderr, .. }) if stderr.contains("Cannot find device") => {}
            Err(e) => return Err(e),
        }
    }
    if netns_exists(&pod.netns) {
        cmd::run("ip", &["netns", "del", pod.netns.as_str()])?;
    }
    remove_etc_netns(&pod.netns)
}

/// Removes `/etc/netns/<netns>` (and `/etc/netns` itself if that leaves it empty).
pub(crate) fn remove_etc_netns(netns: &str) -> Result<()> {
    let dir = Path::new(ETC_NETNS_DIR).join(netns);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io_path("remove", &dir, e)),
    }
    crate::cgroup::remove_if_empty(Path::new(ETC_NETNS_DIR));
    Ok(())
}
