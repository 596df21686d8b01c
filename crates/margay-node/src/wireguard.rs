//! WireGuard between nodes, as Calico's Felix does it: with `wireguardEnabled`, each node runs a
//! WireGuard interface (`wireguardInterfaceName`), publishes its public key
//! (`status.wireguardPublicKey`) and the interface's address (`spec.wireguard.
//! interfaceIPv4Address`) on its Node, peers with every other node that publishes a key, and
//! routes the pod traffic to those nodes through the tunnel. Turning it off removes the
//! interface, the routes, the rule, both Node fields and the address.
//!
//! Routing is Calico's: our own table ([`plan::ROUTING_TABLE`]) holds one route per peer block,
//! `dev wireguard.cali`, and a policy rule at `wireguardRoutingRulePriority` (99) sends every
//! packet *not* carrying the tunnel's mark through it before the main table. The tunnel's own UDP
//! packets carry the mark, so they are never routed into the tunnel. Nodes without a key have no
//! route in our table, so their traffic falls through to the main table and goes in the clear,
//! as the route driver (direct or VXLAN) has it: nothing in the main table changes, and turning
//! WireGuard on or off is one rule and one table.
//!
//! The tunnel is the kernel's WireGuard where the kernel has it (a `wireguard` link configured
//! through generic netlink, [`kernel`]), else userspace WireGuard (boringtun over TUN,
//! [`device`]); the agent logs which one runs and why, and `status.dataplane.wireguardDevice`
//! says it. A node that cannot run it (no TUN, the name taken by another interface,
//! no address for the interface) publishes no key and says why in `status.dataplane.message`;
//! the others reach it in the clear.

mod device;
mod ip;
mod kernel;
pub mod key;
mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;

use anyhow::{Context, Result};
use margay_api::Kind;
use margay_datastore::{Client, Key};
use serde_json::{Value, json};

use crate::cache::{Cache, node_ipv4};
use device::Device;
use key::KeyPair;
use plan::{FWMARK, NodeInfo, Peer, ROUTING_TABLE, Settings};

/// What a sync did, for the agent's status.
#[derive(Debug, Default)]
pub struct Report {
    /// A failure to program what is wanted (the previous state stays; retried next sync).
    pub error: Option<String>,
    /// Why this node runs without WireGuard although it is enabled (for
    /// `status.dataplane.message`; not an error of the dataplane: the others reach it in the
    /// clear).
    pub message: Option<String>,
    /// One line for the sync log.
    pub summary: String,
    /// Which WireGuard runs, while one does (`kernel`, or `userspace (boringtun over TUN):
    /// <why not the kernel>`), for `status.dataplane.wireguardDevice`.
    pub device: Option<String>,
}

/// Why enabling failed.
enum Failure {
    /// This node cannot run WireGuard: it publishes no key.
    CannotRun(anyhow::Error),
    /// Programming failed; what works stays, retried at the next sync.
    Dataplane(anyhow::Error),
}

/// The WireGuard device as the BPF dataplane needs it (see [`WireGuard::bpf_path`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BpfPath {
    pub interface: String,
    /// The underlay addresses of the nodes reached through the device.
    pub nodes: BTreeSet<Ipv4Addr>,
}

/// The agent's WireGuard state between syncs.
#[derive(Debug)]
pub struct WireGuard {
    state_dir: PathBuf,
    key: Option<KeyPair>,
    device: Option<Device>,
    /// The listening port set on the device.
    port: Option<u16>,
    /// The peers configured on the device, by public key.
    peers: BTreeMap<String, Peer>,
    /// Our interface's address (from IPAM).
    tunnel_ip: Option<Ipv4Addr>,
    /// The address configured on the interface.
    link_addr: Option<Ipv4Addr>,
    /// Whether kernel state may exist that a disable must remove (unknown at start: leftovers
    /// of an earlier run are looked for once).
    maybe_active: bool,
    last_warnings: Vec<String>,
    last_summary: String,
}

impl WireGuard {
    pub fn new(state_dir: PathBuf) -> WireGuard {
        WireGuard {
            state_dir,
            key: None,
            device: None,
            port: None,
            peers: BTreeMap::new(),
            tunnel_ip: None,
            link_addr: None,
            maybe_active: true,
            last_warnings: Vec::new(),
            last_summary: String::new(),
        }
    }

    /// Brings the tunnel to what the cluster asks for.
    pub async fn sync(
        &mut self,
        client: &Client,
        cache: &Cache,
        node: &str,
        node_ip: Ipv4Addr,
    ) -> Report {
        let report = self.sync_inner(client, cache, node, node_ip).await;
        // The agent logs each sync; this logs what WireGuard did when it says something new.
        if report.summary != self.last_summary {
            if !report.summary.is_empty() {
                tracing::info!("{}", report.summary);
            }
            self.last_summary = report.summary.clone();
        }
        report
    }

    async fn sync_inner(
        &mut self,
        client: &Client,
        cache: &Cache,
        node: &str,
        node_ip: Ipv4Addr,
    ) -> Report {
        let settings = Settings::from_felix(&cache.felix(node));
        if !settings.enabled {
            return match self.disable(client, cache, node, &settings).await {
                Ok(()) => Report::default(),
                Err(e) => Report {
                    error: Some(format!("disabling WireGuard: {e:#}")),
                    summary: "wireguard: disabling failed".into(),
                    ..Report::default()
                },
            };
        }
        self.maybe_active = true;
        match self.enable(client, cache, node, node_ip, &settings).await {
            Ok(summary) => Report {
                summary,
                device: self.device.as_ref().map(|d| d.implementation().to_owned()),
                ..Report::default()
            },
            Err(Failure::Dataplane(e)) => Report {
                error: Some(format!("wireguard: {e:#}")),
                summary: "wireguard: failed".into(),
                ..Report::default()
            },
            Err(Failure::CannotRun(reason)) => {
                let reason = format!("{reason:#}");
                let mut report = Report {
                    message: Some(format!(
                        "WireGuard is enabled but cannot run on this node ({reason}); it publishes no key and other nodes reach it unencrypted"
                    )),
                    // Logged (once per reason) by `sync`.
                    summary: format!(
                        "wireguard: cannot run on this node, reached unencrypted: {reason}"
                    ),
                    ..Report::default()
                };
                // Unpublish first, so that the others stop sending to a tunnel that is not
                // there; then remove what was half made.
                if let Err(e) = self.publish(client, cache, node, None, None).await {
                    report.error = Some(format!("wireguard: cannot unpublish the key: {e:#}"));
                } else if let Err(e) = self.teardown(&settings.interface).await {
                    report.error = Some(format!("wireguard: {e:#}"));
                }
                report
            }
        }
    }

    async fn enable(
        &mut self,
        client: &Client,
        cache: &Cache,
        node: &str,
        node_ip: Ipv4Addr,
        settings: &Settings,
    ) -> Result<String, Failure> {
        use Failure::{CannotRun, Dataplane};
        if self.key.is_none() {
            let (pair, created) = key::load_or_create(&self.state_dir).map_err(CannotRun)?;
            tracing::info!(
                public_key = %pair.public_base64(),
                file = %self.state_dir.join(key::KEY_FILE).display(),
                "{} the WireGuard key",
                if created { "created" } else { "loaded" }
            );
            self.key = Some(pair);
        }

        // The interface: made once, made again when its name, its MTU or its kind of sockets
        // changes (boringtun sizes its reads by the MTU it finds at start).
        let underlay_mtu = ip::mtu_of_address(node_ip).await;
        let mtu = match (underlay_mtu, &self.device) {
            (None, Some(d)) if settings.mtu == 0 => d.mtu(),
            (underlay, _) => settings.effective_mtu(underlay.unwrap_or(1500)),
        };
        let connected = !settings.host_encryption;
        if let Some(d) = &self.device
            && (d.name() != settings.interface || d.mtu() != mtu || d.connected() != connected)
        {
            let old = d.name().to_owned();
            tracing::info!(interface = %old, "recreating the WireGuard interface");
            self.teardown(&old).await.map_err(Dataplane)?;
        }
        if let Some(d) = self.device.as_mut() {
            let answer = d.alive().await;
            if self.forget_on_error(answer).is_err() {
                tracing::warn!("the WireGuard device stopped answering; starting it again");
            }
        }
        if self.device.is_none() {
            let Some(key) = self.key.as_ref() else {
                return Err(CannotRun(anyhow::anyhow!("no key")));
            };
            let mut device = Device::create(&settings.interface, mtu, connected)
                .await
                .map_err(CannotRun)?;
            device
                .configure(key, settings.port, FWMARK)
                .await
                .context("cannot configure the device")
                .map_err(CannotRun)?;
            tracing::info!(interface = %settings.interface, mtu, port = settings.port, implementation = %device.implementation(), "WireGuard interface up");
            self.device = Some(device);
            self.port = Some(settings.port);
            self.peers.clear();
            self.link_addr = None;
        }
        if self.port != Some(settings.port)
            && let Some(d) = self.device.as_mut()
        {
            let set = d.set_port(settings.port).await;
            self.forget_on_error(set).map_err(Dataplane)?;
            self.port = Some(settings.port);
        }

        // The interface's address: Calico's, one address of the node's block under a handle of
        // its own, kept while WireGuard is on.
        if self.tunnel_ip.is_none() {
            self.tunnel_ip = Some(
                assign_tunnel_ip(client, cache, node)
                    .await
                    .context("no address for the interface")
                    .map_err(CannotRun)?,
            );
        }
        let tunnel_ip = self.tunnel_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        if self.link_addr != Some(tunnel_ip) {
            let dev = &settings.interface;
            ip::batch(&[
                format!("addr flush dev {dev}"),
                format!("addr add {tunnel_ip}/32 dev {dev}"),
                format!("link set dev {dev} up"),
            ])
            .await
            .map_err(CannotRun)?;
            self.link_addr = Some(tunnel_ip);
        }

        let my_key = self
            .key
            .as_ref()
            .map(KeyPair::public_base64)
            .unwrap_or_default();
        self.publish(client, cache, node, Some(&my_key), Some(tunnel_ip))
            .await
            .map_err(Dataplane)?;

        // Peers, then the routes to them, then the rule that uses the routes.
        let nodes: Vec<NodeInfo> = cache
            .nodes()
            .iter()
            .map(|(name, v)| {
                let port = Settings::from_felix(&cache.felix(name)).port;
                NodeInfo::from_node(name, v, node_ipv4(v), port)
            })
            .collect();
        let (desired, warnings) =
            plan::desired_peers(node, &my_key, &nodes, &cache.blocks(), settings);
        if warnings != self.last_warnings {
            for w in &warnings {
                tracing::warn!("wireguard: {w}");
            }
            self.last_warnings = warnings;
        }
        let current = self.peers.clone();
        let (remove, add) = plan::peer_changes(&current, &desired);
        let mut added = Vec::new();
        for k in remove {
            if let Some(d) = self.device.as_mut() {
                let removed = d.remove_peer(k).await;
                self.forget_on_error(removed).map_err(Dataplane)?;
            }
            if let Some(p) = self.peers.remove(k) {
                tracing::info!(peer = %p.node, "WireGuard peer removed");
            }
        }
        for p in add {
            // A peer whose published key is not a key is left out (it cannot be configured).
            if key::base64_to_bytes(&p.public_key).is_some()
                && let Some(d) = self.device.as_mut()
            {
                let added_now = d.add_peer(p).await;
                self.forget_on_error(added_now).map_err(Dataplane)?;
                tracing::info!(peer = %p.node, endpoint = %p.endpoint, allowed_ips = ?p.allowed_ips, "WireGuard peer added");
                self.peers.insert(p.public_key.clone(), p.clone());
                added.push(p.clone());
            }
        }
        // Only configured peers get routes: a route to a peer the device does not know would
        // drop the traffic instead of sending it in the clear.
        let routes = plan::desired_routes(&self.peers, settings.host_encryption);
        let routes_now = ip::table_routes(ROUTING_TABLE).await.map_err(Dataplane)?;
        let mut lines = ip::route_lines(&routes_now, &routes, ROUTING_TABLE, &settings.interface);
        lines.extend(
            rule_changes(settings.rule_priority)
                .await
                .map_err(Dataplane)?,
        );
        ip::batch(&lines).await.map_err(Dataplane)?;

        // A new peer may have dropped our handshake before it knew us (it drops packets from
        // unknown keys, and WireGuard retries only after 5 s): start one from our side now.
        for p in &added {
            if let Some(t) = p.tunnel_ip {
                nudge(t);
            }
        }
        Ok(format!(
            "wireguard: {} peers, {} routes through {}",
            self.peers.len(),
            routes.len(),
            settings.interface
        ))
    }

    /// Where the BPF dataplane sends its tunnel between nodes (external clients' flows to
    /// backends on other nodes) so that it is encrypted too: our interface and the addresses of
    /// the nodes the device has a peer for (each peer's own address is among its allowed IPs).
    /// `None` while this node runs no WireGuard device: the tunnel then goes in the clear.
    pub fn bpf_path(&self) -> Option<BpfPath> {
        let device = self.device.as_ref()?;
        self.link_addr?;
        Some(BpfPath {
            interface: device.name().to_owned(),
            nodes: self
                .peers
                .values()
                .filter(|p| {
                    p.allowed_ips
                        .contains(&ipnet::Ipv4Net::from(*p.endpoint.ip()))
                })
                .map(|p| *p.endpoint.ip())
                .collect(),
        })
    }

    /// Removes everything of ours; idempotent, and cheap once nothing is left.
    async fn disable(
        &mut self,
        client: &Client,
        cache: &Cache,
        node: &str,
        settings: &Settings,
    ) -> Result<()> {
        self.publish(client, cache, node, None, None).await?;
        if self.maybe_active {
            self.teardown(&settings.interface).await?;
            self.maybe_active = false;
        }
        let handle = plan::tunnel_handle(node);
        let held = self.tunnel_ip.is_some()
            || plan::find_allocation(own_blocks(cache, node).iter().map(|b| &b["spec"]), &handle)
                .is_some();
        if held {
            let freed = margay_datastore::ipam::release(client, &handle).await?;
            tracing::info!(?freed, "released the WireGuard interface address");
            self.tunnel_ip = None;
        }
        Ok(())
    }

    /// Removes the rule, our table's routes, the device and the interface (only a TUN or a
    /// `wireguard` link: another kind of interface with that name is not ours).
    async fn teardown(&mut self, interface: &str) -> Result<()> {
        let mut lines = rule_changes(0).await?;
        let routes = ip::table_routes(ROUTING_TABLE).await?;
        lines.extend(ip::route_lines(
            &routes,
            &BTreeSet::new(),
            ROUTING_TABLE,
            interface,
        ));
        ip::batch(&lines).await?;
        let had_device = self.device.take().is_some();
        self.peers.clear();
        self.port = None;
        self.link_addr = None;
        if matches!(
            ip::link_kind(interface).await?.as_deref(),
            Some("tun" | "wireguard")
        ) {
            ip::batch(&[format!("link del dev {interface}")]).await?;
            tracing::info!(%interface, "WireGuard interface removed");
        } else if had_device {
            tracing::info!(%interface, "WireGuard device stopped");
        }
        Ok(())
    }

    /// Passes `result` of a request to the device on; after a failure the device is forgotten
    /// (made again at the next sync).
    fn forget_on_error<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            // A device that stopped answering is made again at the next sync.
            self.device = None;
            self.peers.clear();
        }
        result
    }

    /// Makes the Node's WireGuard fields say `key` and `tunnel_ip` (absent when `None`), writing
    /// only when they differ.
    async fn publish(
        &mut self,
        client: &Client,
        cache: &Cache,
        node: &str,
        key: Option<&str>,
        tunnel_ip: Option<Ipv4Addr>,
    ) -> Result<()> {
        let node_key = Key::new(Kind::Node, None, node);
        let want_spec = tunnel_ip.map_or(
            Value::Null,
            |ip| json!({"interfaceIPv4Address": ip.to_string()}),
        );
        let matches = |v: &Value| {
            v["status"]["wireguardPublicKey"].as_str() == key && v["spec"]["wireguard"] == want_spec
        };
        if cache.get(&node_key).is_some_and(matches) {
            return Ok(());
        }
        // The copy may lag behind our last write: read the store before writing.
        let stored = client.get(&node_key).await?;
        if matches(&stored.value) {
            return Ok(());
        }
        client
            .modify(&node_key, |current| {
                let mut next = current.clone();
                set_or_remove(&mut next["spec"], "wireguard", want_spec.clone());
                set_or_remove(
                    &mut next["status"],
                    "wireguardPublicKey",
                    key.map_or(Value::Null, Value::from),
                );
                if next["status"].as_object().is_some_and(|s| s.is_empty())
                    && let Some(o) = next.as_object_mut()
                {
                    o.remove("status");
                }
                Ok(next)
            })
            .await?;
        match key {
            Some(k) => tracing::info!(public_key = %k, ?tunnel_ip, "published the WireGuard key"),
            None => tracing::info!("removed the WireGuard key and address from the Node"),
        }
        Ok(())
    }
}

fn set_or_remove(object: &mut Value, field: &str, value: Value) {
    if value.is_null() {
        if let Some(o) = object.as_object_mut() {
            o.remove(field);
        }
    } else {
        if !object.is_object() {
            *object = json!({});
        }
        object[field] = value;
    }
}

/// The IPAMBlocks affine to `node`, from the copy.
fn own_blocks(cache: &Cache, node: &str) -> Vec<Value> {
    cache
        .blocks()
        .iter()
        .filter(|(_, owner)| owner.as_str() == node)
        .filter_map(|(cidr, _)| {
            let name = margay_api::calico::ipam::block_name(cidr);
            cache.get(&Key::new(Kind::IPAMBlock, None, &name)).cloned()
        })
        .collect()
}

/// The interface's address: the one already held under our handle (read from the store, not
/// the copy, so a restart or a lagging copy never assigns a second one), or a new one.
async fn assign_tunnel_ip(client: &Client, cache: &Cache, node: &str) -> Result<Ipv4Addr> {
    let handle = plan::tunnel_handle(node);
    let blocks = client.list(Kind::IPAMBlock, None).await?;
    if let Some(ip) = plan::find_allocation(blocks.items.iter().map(|b| &b.value["spec"]), &handle)
    {
        return Ok(ip);
    }
    let labels: BTreeMap<String, String> = cache
        .get(&Key::new(Kind::Node, None, node))
        .and_then(|n| serde_json::from_value(n["metadata"]["labels"].clone()).ok())
        .unwrap_or_default();
    let attributes = BTreeMap::from([
        ("node".to_owned(), node.to_owned()),
        ("type".to_owned(), "wireguardTunnelAddress".to_owned()),
    ]);
    let a = margay_datastore::ipam::assign(client, node, &labels, &handle, attributes).await?;
    tracing::info!(ip = %a.ip, block = %a.block, "assigned the WireGuard interface address");
    Ok(a.ip)
}

/// The `ip` lines that leave exactly one rule of ours, at `priority` (none for 0).
async fn rule_changes(priority: u32) -> Result<Vec<String>> {
    let present = ip::rule_priorities(ROUTING_TABLE, FWMARK).await?;
    let mut lines: Vec<String> = present
        .iter()
        .filter(|p| **p != priority)
        .map(|p| ip::rule_line("del", *p, ROUTING_TABLE, FWMARK))
        .collect();
    if priority != 0 && !present.contains(&priority) {
        lines.push(ip::rule_line("add", priority, ROUTING_TABLE, FWMARK));
    }
    Ok(lines)
}

/// Sends one empty datagram through the tunnel to `ip` (the discard port), which makes the
/// device start a handshake with that peer.
fn nudge(ip: Ipv4Addr) {
    let sent = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.send_to(&[], (ip, 9)));
    if let Err(e) = sent {
        tracing::debug!(%ip, error = %e, "cannot nudge the WireGuard peer");
    }
}

/// Removes whatever WireGuard state an agent left on this node (`margay-node --cleanup`).
pub async fn cleanup(interface: &str) -> Result<()> {
    let mut wg = WireGuard::new(PathBuf::new());
    wg.teardown(interface).await
}
