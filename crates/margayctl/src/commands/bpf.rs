//! `bpf nat dump | conntrack dump | routes dump | counters`: a node's BPF dataplane read from the
//! maps its agent pinned, one line per entry as `calico-node -bpf` prints them, or JSON.
//!
//! The maps are found in `<bpffs dir>/maps`: the directory given with `--bpffs-dir`, the agent's
//! default, or the one the node's agent reports in its Node status (`--node`). Reading needs
//! root (CAP_BPF) and changes nothing. Every view is first built as JSON (`-o json` prints it
//! as is) and the text is rendered from it, so the two never disagree.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Service;
use margay_api::Kind;
use margay_bpf::maps::conntrack::{
    F_CLIENT_IS_B, F_DSR, F_EXTERNAL, F_FROM_TUNNEL, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use margay_bpf::maps::ifstate::IfStateValue;
use margay_bpf::maps::nat::{
    FE_BLACKHOLE, FE_EXT_LOCAL, FE_INT_LOCAL, FE_SRC_RANGES, NODEPORT_ANY,
};
use margay_bpf::maps::routes::{
    RT_IN_POOL, RT_LOCAL_HOST, RT_LOCAL_WL, RT_REMOTE_HOST, RT_REMOTE_WL, RT_WIREGUARD,
};
use margay_bpf::maps::{
    AffinityKey, AffinityValue, CtKey, CtType, CtValue, Maps, NatBackendKey, NatBackendValue,
    NatFrontendKey, NatFrontendValue, Protocol, RouteValue, names,
};
use margay_datastore::{Client, Key};
use serde_json::{Value, json};

use crate::cli::{BpfCommand, BpfDump, BpfTarget};

/// What to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    Nat,
    Conntrack,
    Routes,
    Counters,
}

pub async fn run(datastore: Option<&str>, command: BpfCommand) -> Result<()> {
    let (view, target) = match command {
        BpfCommand::Nat(BpfDump::Dump(t)) => (View::Nat, t),
        BpfCommand::Conntrack(BpfDump::Dump(t)) => (View::Conntrack, t),
        BpfCommand::Routes(BpfDump::Dump(t)) => (View::Routes, t),
        BpfCommand::Counters(t) => (View::Counters, t),
    };
    let json_output = match target.output.as_str() {
        "json" => true,
        "text" | "" => false,
        other => bail!("unknown output format {other:?}; use text or json"),
    };
    let (dir, node, client) = resolve(datastore, &target).await?;
    let maps = open_maps(&dir, node.as_ref())?;
    let now_ns = margay_dataplane::bpf::conntrack::monotonic_now_ns();
    // Conntrack rows name their Service when the datastore is at hand (`--node`, or an
    // explicit `--datastore`); without one they still carry the frontend's service id.
    let service_names = match (view, client) {
        (View::Conntrack, Some(client)) => service_port_names(&client).await?,
        _ => ServiceNames::new(),
    };
    let value = match view {
        View::Nat => nat_view(
            &maps.nat_frontends.entries()?,
            &maps.nat_backends.entries()?.into_iter().collect(),
            &maps.affinity.entries()?,
            now_ns,
        ),
        View::Conntrack => conntrack_view(
            &maps.conntrack.entries()?,
            &Frontends::new(&maps.nat_frontends.entries()?, &service_names),
            now_ns,
        ),
        View::Routes => routes_view(
            &maps.routes.entries()?,
            &maps.if_state.entries()?.into_iter().collect(),
        ),
        View::Counters => counters_view(
            &maps
                .counters
                .all()?
                .into_iter()
                .map(|(r, n)| (r.name(), r.is_drop(), n))
                .collect::<Vec<_>>(),
        ),
    };
    if json_output {
        margayctl::outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let text = match view {
            View::Nat => nat_text(&value),
            View::Conntrack => conntrack_text(&value),
            View::Routes => routes_text(&value),
            View::Counters => counters_text(&value),
        };
        margayctl::out!("{text}");
    }
    Ok(())
}

/// A node named with `--node`, as its Node resource describes it.
#[derive(Debug)]
struct NodeRef {
    name: String,
    address: Option<Ipv4Addr>,
}

/// The bpffs directory to read, the node it belongs to when `--node` named one, and the
/// datastore when `--node` or `--datastore` named one.
async fn resolve(
    datastore: Option<&str>,
    target: &BpfTarget,
) -> Result<(PathBuf, Option<NodeRef>, Option<Client>)> {
    let Some(name) = &target.node else {
        let dir = target
            .bpffs_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(margay_bpf::DEFAULT_BPFFS_DIR));
        let client = match datastore {
            Some(_) => Some(super::open_client(datastore).await?),
            None => None,
        };
        return Ok((dir, None, client));
    };
    let client = super::open_client(datastore).await?;
    let node = client.get(&Key::new(Kind::Node, None, name)).await?.value;
    let dp = &node["status"]["dataplane"];
    let active = dp["active"].as_str().unwrap_or("unknown");
    if active != "BPF" {
        bail!(
            "node {name} runs the {active} dataplane, not BPF: it has no BPF maps (margayctl node status {name} says why)"
        );
    }
    let Some(dir) = dp["bpffsDir"].as_str() else {
        bail!(
            "node {name}'s agent does not report its bpffs directory: use --bpffs-dir on the node"
        );
    };
    Ok((
        PathBuf::from(dir),
        Some(NodeRef {
            name: name.clone(),
            address: node_address(&node),
        }),
        Some(client),
    ))
}

/// Service port names (`ns/name:port/tcp`, as the agent names its backend lists) by frontend
/// (address, port, IP protocol).
type ServiceNames = HashMap<(Ipv4Addr, u16, u8), String>;

/// The frontends the datastore's Services make, computed by the agent's own calculation
/// (`margay_calc::bpf_nat::nat_services`), so a flow is named by the same rules that wrote
/// its frontend. Endpoints do not change frontends, and NodePorts are matched through their
/// wildcard frontend, so neither the slices nor the node's addresses are needed.
async fn service_port_names(client: &Client) -> Result<ServiceNames> {
    let services: Vec<Service> = client
        .list(Kind::Service, None)
        .await?
        .items
        .into_iter()
        .filter_map(|item| serde_json::from_value(item.value).ok())
        .collect();
    let lists = margay_calc::bpf_nat::nat_services(
        &services,
        &[],
        &margay_calc::kube_proxy::NodeContext::default(),
    );
    let mut names = ServiceNames::new();
    // Sorted by name, so a port's own list comes before its `+local` variant.
    for list in lists {
        for (key, _) in &list.frontends {
            names
                .entry((key.addr, key.port, key.proto.number()))
                .or_insert_with(|| list.name.clone());
        }
    }
    Ok(names)
}

/// What a flow's frontend tells: the service id in `mg_nat_fe` and the Service's port name.
struct Frontends<'a> {
    ids: HashMap<(Ipv4Addr, u16, u8), u32>,
    names: &'a ServiceNames,
}

impl<'a> Frontends<'a> {
    fn new(entries: &[(NatFrontendKey, NatFrontendValue)], names: &'a ServiceNames) -> Self {
        let ids = entries
            .iter()
            .filter(|(k, _)| k.source().is_none())
            .map(|(k, v)| ((k.addr(), k.port(), k.proto), v.svc_id))
            .collect();
        Frontends { ids, names }
    }

    /// The (service id, Service port name) of `frontend`: its own entry, else the NodePort
    /// wildcard of its port (how a backend node matches a NodePort flow tunnelled to it).
    fn service(&self, proto: u8, frontend: (Ipv4Addr, u16)) -> (Option<u32>, Option<&str>) {
        let exact = (frontend.0, frontend.1, proto);
        let wildcard = (NODEPORT_ANY, frontend.1, proto);
        let id = self
            .ids
            .get(&exact)
            .or_else(|| self.ids.get(&wildcard))
            .copied();
        let name = self
            .names
            .get(&exact)
            .or_else(|| self.names.get(&wildcard))
            .map(String::as_str);
        (id, name)
    }
}

/// The node's address as Calico's Node carries it (`spec.addresses` InternalIP, else
/// `spec.bgp.ipv4Address`).
fn node_address(node: &Value) -> Option<Ipv4Addr> {
    let parse = |s: &str| s.split('/').next()?.parse::<Ipv4Addr>().ok();
    node["spec"]["addresses"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter(|x| x["type"] == "InternalIP")
                .find_map(|x| parse(x["address"].as_str()?))
        })
        .or_else(|| parse(node["spec"]["bgp"]["ipv4Address"].as_str()?))
}

/// Opens the pinned maps with errors that say what to do. With a node, refuses maps whose
/// node address (`mg_node_cfg`) is another node's: `--node` on a real cluster reads this
/// machine's bpffs, which is only that node's on that node.
fn open_maps(dir: &Path, node: Option<&NodeRef>) -> Result<Maps> {
    let pin_dir = dir.join(margay_bpf::MAPS_SUBDIR);
    let missing: Vec<&str> = names::ALL
        .iter()
        .copied()
        .filter(|n| !pin_dir.join(n).exists())
        .collect();
    if missing.len() == names::ALL.len() {
        bail!(
            "no BPF maps are pinned in {}: the agent here does not run the BPF dataplane (margayctl node status shows each node's), or it pins elsewhere (--bpffs-dir, --node)",
            pin_dir.display()
        );
    }
    if !missing.is_empty() {
        bail!(
            "{} holds only some of the dataplane's maps (missing {}): is the agent starting or stopping?",
            pin_dir.display(),
            missing.join(", ")
        );
    }
    let maps = Maps::open(&pin_dir).map_err(|e| {
        let hint = if e.to_string().contains("ermission") {
            " (reading pinned maps needs root)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot open the maps in {}: {e}{hint}", pin_dir.display())
    })?;
    if let Some(node) = node
        && let (Some(want), Some(have)) = (node.address, maps.node_config.get()?.node_ip())
        && want != have
    {
        bail!(
            "the maps in {} are those of the node with address {have}, not {} ({want}): run margayctl on {}",
            pin_dir.display(),
            node.name,
            node.name
        );
    }
    Ok(maps)
}

// === NAT ===

fn proto_name(n: u8) -> String {
    match Protocol::from_number(n) {
        Some(Protocol::Tcp) => "TCP".to_owned(),
        Some(Protocol::Udp) => "UDP".to_owned(),
        None => match n {
            1 => "ICMP".to_owned(),
            other => format!("proto-{other}"),
        },
    }
}

fn frontend_flags(flags: u32) -> Vec<&'static str> {
    [
        (FE_EXT_LOCAL, "external-local"),
        (FE_INT_LOCAL, "internal-local"),
        (FE_SRC_RANGES, "source-ranges"),
        (FE_BLACKHOLE, "blackhole"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect()
}

fn seconds(ns: u64) -> f64 {
    (ns as f64 / 1e8).round() / 10.0
}

/// Frontends (sorted by service id, address, port) each with its backends in ordinal order,
/// then the session-affinity entries.
fn nat_view(
    frontends: &[(NatFrontendKey, NatFrontendValue)],
    backends: &HashMap<NatBackendKey, NatBackendValue>,
    affinity: &[(AffinityKey, AffinityValue)],
    now_ns: u64,
) -> Value {
    let mut sorted: Vec<&(NatFrontendKey, NatFrontendValue)> = frontends.iter().collect();
    sorted.sort_by_key(|(k, v)| {
        (
            v.svc_id,
            u32::from(k.addr()),
            k.port(),
            k.proto,
            k.prefixlen,
        )
    });
    let frontends: Vec<Value> = sorted
        .iter()
        .map(|(k, v)| {
            let backends: Vec<Value> = (0..v.count)
                .map(|ordinal| {
                    match backends.get(&NatBackendKey {
                        svc_id: v.svc_id,
                        ordinal,
                    }) {
                        Some(b) => json!({
                            "ordinal": ordinal,
                            "address": b.addr().to_string(),
                            "port": b.port(),
                            "local": ordinal < v.local_count,
                            "node": b.node().map(|n| n.to_string()),
                        }),
                        None => json!({"ordinal": ordinal, "missing": true}),
                    }
                })
                .collect();
            json!({
                "address": if k.addr() == NODEPORT_ANY { "*".to_owned() } else { k.addr().to_string() },
                "port": k.port(),
                "protocol": proto_name(k.proto),
                "sourceRange": k.source().map(|s| s.to_string()),
                "serviceId": v.svc_id,
                "flags": frontend_flags(v.flags),
                "affinityTimeoutSeconds": (v.affinity_timeout_s != 0).then_some(v.affinity_timeout_s),
                "count": v.count,
                "localCount": v.local_count,
                "backends": backends,
            })
        })
        .collect();
    let mut aff: Vec<&(AffinityKey, AffinityValue)> = affinity.iter().collect();
    aff.sort_by_key(|(k, _)| (k.svc_id, k.client.to_be()));
    let affinity: Vec<Value> = aff
        .iter()
        .map(|(k, v)| {
            json!({
                "serviceId": k.svc_id,
                "client": margay_bpf::maps::addr_of(k.client).to_string(),
                "backend": format!("{}:{}", v.be.addr(), v.be.port()),
                "ageSeconds": seconds(now_ns.saturating_sub(v.ts_ns)),
            })
        })
        .collect();
    json!({"frontends": frontends, "affinity": affinity})
}

fn nat_text(v: &Value) -> String {
    let mut out = String::new();
    let frontends = v["frontends"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for f in frontends {
        let mut line = format!(
            "{}:{}/{}",
            f["address"].as_str().unwrap_or("?"),
            f["port"],
            f["protocol"].as_str().unwrap_or("?")
        );
        if let Some(src) = f["sourceRange"].as_str() {
            line.push_str(&format!(" from {src}"));
        }
        line.push_str(&format!(
            "  svc {}  backends {} (local {})",
            f["serviceId"], f["count"], f["localCount"]
        ));
        if f["address"] == "*" {
            line.push_str("  nodeport-wildcard");
        }
        for flag in f["flags"].as_array().into_iter().flatten() {
            line.push_str(&format!("  {}", flag.as_str().unwrap_or("?")));
        }
        if let Some(t) = f["affinityTimeoutSeconds"].as_u64() {
            line.push_str(&format!("  affinity {t}s"));
        }
        out.push_str(&line);
        out.push('\n');
        for b in f["backends"].as_array().into_iter().flatten() {
            if b["missing"] == true {
                out.push_str(&format!(
                    "  {:>3}  MISSING\n",
                    b["ordinal"].as_u64().unwrap_or(0)
                ));
                continue;
            }
            let place = if b["local"] == true {
                "local".to_owned()
            } else {
                format!("on {}", b["node"].as_str().unwrap_or("an unknown node"))
            };
            out.push_str(&format!(
                "  {:>3}  {}:{}  {place}\n",
                b["ordinal"].as_u64().unwrap_or(0),
                b["address"].as_str().unwrap_or("?"),
                b["port"]
            ));
        }
    }
    let affinity = v["affinity"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for a in affinity {
        out.push_str(&format!(
            "affinity  svc {}  client {} -> {}  age {}s\n",
            a["serviceId"],
            a["client"].as_str().unwrap_or("?"),
            a["backend"].as_str().unwrap_or("?"),
            a["ageSeconds"]
        ));
    }
    out.push_str(&format!(
        "{} frontends, {} affinity entries\n",
        frontends.len(),
        affinity.len()
    ));
    out
}

// === Conntrack ===

fn tcp_flags(f: u8) -> Vec<&'static str> {
    [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
    ]
    .iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// A flow's state from the TCP flags seen on both legs (the pair's, as the agent's expiry
/// judges it): the state whose timeout applies.
fn flow_state(proto: u8, client: u8, server: u8) -> &'static str {
    match proto {
        6 => {
            let both = TCP_SYN | TCP_ACK;
            if (client | server) & TCP_RST != 0 {
                "reset-seen"
            } else if client & server & TCP_FIN != 0 {
                "fins-seen"
            } else if client & both != both || server & both != both {
                "syn-sent"
            } else {
                "established"
            }
        }
        17 => "udp",
        1 => "icmp",
        _ => "generic",
    }
}

fn type_name(v: &CtValue) -> String {
    match v.kind() {
        Some(CtType::Normal) => "normal".to_owned(),
        Some(CtType::NatForward) => "nat-forward".to_owned(),
        Some(CtType::NatReverse) => "nat-reverse".to_owned(),
        Some(CtType::Tunnel) => "tunnel".to_owned(),
        None => format!("type-{}", v.kind),
    }
}

/// Conntrack rows sort by protocol, client, server and entry type.
type SortKey = (u8, (u32, u16), (u32, u16), u8);

/// One object per entry, client first (sorted by protocol, client, server, type).
/// NAT and tunnel entries also name their frontend's Service (`frontends`) and the port SNAT
/// port (`psnatPort`: on the forward entry the port the client's packets get, on the reverse
/// entry the client's own port, which replies get back).
fn conntrack_view(entries: &[(CtKey, CtValue)], frontends: &Frontends<'_>, now_ns: u64) -> Value {
    let by_key: HashMap<CtKey, &CtValue> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut rows: Vec<(SortKey, Value)> = entries
        .iter()
        .map(|(k, v)| {
            let (client, server) = if v.flags & F_CLIENT_IS_B != 0 {
                (k.b(), k.a())
            } else {
                (k.a(), k.b())
            };
            // The flow's flags are both entries' (each sees the legs through it).
            let (mut c, mut s) = v.tcp_client_server();
            let peer = match v.kind() {
                Some(CtType::NatForward | CtType::NatReverse) => by_key.get(&v.peer).copied(),
                _ => None,
            };
            if let Some(p) = peer {
                let (pc, ps) = p.tcp_client_server();
                c |= pc;
                s |= ps;
            }
            let last = peer.map_or(v.last_seen_ns, |p| p.last_seen_ns.max(v.last_seen_ns));
            let flags: Vec<&str> = [
                (F_EXTERNAL, "external"),
                (F_FROM_TUNNEL, "from-tunnel"),
                (F_DSR, "dsr"),
            ]
            .iter()
            .filter(|(bit, _)| v.flags & bit != 0)
            .map(|(_, n)| *n)
            .collect();
            let nat = match v.kind() {
                Some(CtType::NatForward) => {
                    json!({"backend": format!("{}:{}", v.nat().0, v.nat().1)})
                }
                Some(CtType::NatReverse) => {
                    json!({"frontend": format!("{}:{}", v.nat().0, v.nat().1)})
                }
                _ => Value::Null,
            };
            // The frontend the client dialled: the forward and tunnel entries' server, the
            // reverse entry's NAT address.
            let frontend = match v.kind() {
                Some(CtType::NatForward | CtType::Tunnel) => Some(server),
                Some(CtType::NatReverse) => Some(v.nat()),
                _ => None,
            };
            let (frontend_id, service) =
                frontend.map_or((None, None), |f| frontends.service(k.proto, f));
            let service_id = (v.svc_id != 0).then_some(v.svc_id).or(frontend_id);
            let psnat_port = margay_bpf::maps::port_of(v.psnat_port);
            let row = json!({
                "protocol": proto_name(k.proto),
                "client": format!("{}:{}", client.0, client.1),
                "server": format!("{}:{}", server.0, server.1),
                "type": type_name(v),
                "nat": nat,
                "tunnelNode": v.tunnel_node().map(|n| n.to_string()),
                "serviceId": service_id,
                "service": service,
                "psnatPort": (psnat_port != 0).then_some(psnat_port),
                "state": flow_state(k.proto, c, s),
                "tcpClient": (k.proto == 6).then(|| tcp_flags(c)),
                "tcpServer": (k.proto == 6).then(|| tcp_flags(s)),
                "peerPresent": match v.kind() {
                    Some(CtType::NatForward | CtType::NatReverse) => Some(peer.is_some()),
                    _ => None,
                },
                "ageSeconds": seconds(now_ns.saturating_sub(v.created_ns)),
                "idleSeconds": seconds(now_ns.saturating_sub(last)),
                "flags": flags,
            });
            (
                (
                    k.proto,
                    (u32::from(client.0), client.1),
                    (u32::from(server.0), server.1),
                    v.kind,
                ),
                row,
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    Value::Array(rows.into_iter().map(|r| r.1).collect())
}

fn conntrack_text(v: &Value) -> String {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut out = String::new();
    let s = |x: &Value| x.as_str().unwrap_or("?").to_owned();
    for r in rows {
        let mut line = format!(
            "{} {} -> {}  {}",
            s(&r["protocol"]),
            s(&r["client"]),
            s(&r["server"]),
            s(&r["type"])
        );
        if let Some(b) = r["nat"]["backend"].as_str() {
            line.push_str(&format!(" backend {b}"));
        }
        if let Some(f) = r["nat"]["frontend"].as_str() {
            line.push_str(&format!(" frontend {f}"));
        }
        if let Some(n) = r["tunnelNode"].as_str() {
            // The ingress node's tunnel entry names the backend's node; the backend node's
            // pair names the ingress node the flow came from.
            if r["type"] == "tunnel" {
                line.push_str(&format!(" to node {n}"));
            } else {
                line.push_str(&format!(" ingress node {n}"));
            }
        }
        if let Some(p) = r["psnatPort"].as_u64() {
            if r["type"] == "nat-reverse" {
                line.push_str(&format!(" psnat client's port {p}"));
            } else {
                line.push_str(&format!(" psnat port {p}"));
            }
        }
        if let Some(id) = r["serviceId"].as_u64() {
            line.push_str(&format!("  svc {id}"));
        }
        if let Some(name) = r["service"].as_str() {
            line.push_str(&format!(" {name}"));
        }
        line.push_str(&format!("  {}", s(&r["state"])));
        if r["tcpClient"].is_array() {
            let join = |x: &Value| {
                let f: Vec<&str> = x
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if f.is_empty() {
                    "-".to_owned()
                } else {
                    f.join(",")
                }
            };
            line.push_str(&format!(
                " (client {} server {})",
                join(&r["tcpClient"]),
                join(&r["tcpServer"])
            ));
        }
        line.push_str(&format!(
            "  age {}s idle {}s",
            r["ageSeconds"], r["idleSeconds"]
        ));
        for f in r["flags"].as_array().into_iter().flatten() {
            line.push_str(&format!("  {}", f.as_str().unwrap_or("?")));
        }
        if r["peerPresent"] == false {
            line.push_str("  PEER-MISSING");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("{} entries\n", rows.len()));
    out
}

// === Routes ===

/// `interfaces`: `mg_ifstate`'s names by ifindex, as the agent wrote them.
fn routes_view(
    entries: &[(ipnet::Ipv4Net, RouteValue)],
    interfaces: &std::collections::BTreeMap<u32, IfStateValue>,
) -> Value {
    let mut sorted: Vec<&(ipnet::Ipv4Net, RouteValue)> = entries.iter().collect();
    sorted.sort_by_key(|(n, _)| (u32::from(n.addr()), n.prefix_len()));
    Value::Array(
        sorted
            .iter()
            .map(|(net, v)| {
                let kind = if v.flags & RT_LOCAL_WL != 0 {
                    "local-workload"
                } else if v.flags & RT_REMOTE_WL != 0 {
                    "remote-workload"
                } else if v.flags & RT_LOCAL_HOST != 0 {
                    "local-host"
                } else if v.flags & RT_REMOTE_HOST != 0 {
                    "remote-host"
                } else if v.flags & RT_IN_POOL != 0 {
                    "pool"
                } else {
                    "other"
                };
                json!({
                    "prefix": net.to_string(),
                    "type": kind,
                    "inPool": v.flags & RT_IN_POOL != 0,
                    "wireguard": v.flags & RT_WIREGUARD != 0,
                    "ifindex": (v.ifindex != 0).then_some(v.ifindex),
                    "interface": interfaces.get(&v.ifindex).map(IfStateValue::name),
                    "nextHop": (v.next_hop != 0).then(|| v.next_hop().to_string()),
                })
            })
            .collect(),
    )
}

fn routes_text(v: &Value) -> String {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut out = String::new();
    for r in rows {
        let mut line = format!(
            "{:<18} {}",
            r["prefix"].as_str().unwrap_or("?"),
            r["type"].as_str().unwrap_or("?")
        );
        if r["inPool"] == true && r["type"] != "pool" {
            line.push_str(" in-pool");
        }
        if r["wireguard"] == true {
            line.push_str(" wireguard");
        }
        if let Some(i) = r["ifindex"].as_u64() {
            line.push_str(&format!(" ifindex {i}"));
            if let Some(name) = r["interface"].as_str() {
                line.push_str(&format!(" ({name})"));
            }
        }
        if let Some(n) = r["nextHop"].as_str() {
            line.push_str(&format!(" via {n}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("{} routes\n", rows.len()));
    out
}

// === Counters ===

fn counters_view(counts: &[(&str, bool, u64)]) -> Value {
    Value::Array(
        counts
            .iter()
            .map(|(name, drop, n)| json!({"reason": name, "drop": drop, "packets": n}))
            .collect(),
    )
}

fn counters_text(v: &Value) -> String {
    let rows = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:>12}  {}\n",
            r["reason"].as_str().unwrap_or("?"),
            r["packets"].as_u64().unwrap_or(0),
            if r["drop"] == true { "drop" } else { "event" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bpf::maps::ifstate::{IF_READY, IF_TUNNEL, IF_WORKLOAD};
    use margay_bpf::maps::{CtKey, NatBackendValue, NatFrontendKey};

    const NS: u64 = 1_000_000_000;

    #[test]
    fn nat_dump_lists_each_frontend_with_its_backends_local_first() {
        let svc = 7;
        let fe = NatFrontendKey::new(Ipv4Addr::new(10, 96, 0, 20), 80, Protocol::Tcp, None);
        let wildcard = NatFrontendKey::node_port_any(30080, Protocol::Tcp);
        let value = NatFrontendValue {
            svc_id: svc,
            count: 3,
            local_count: 1,
            flags: FE_EXT_LOCAL,
            affinity_timeout_s: 10800,
        };
        let mut backends = HashMap::new();
        backends.insert(
            NatBackendKey {
                svc_id: svc,
                ordinal: 0,
            },
            NatBackendValue::new(Ipv4Addr::new(10, 244, 1, 5), 8080),
        );
        backends.insert(
            NatBackendKey {
                svc_id: svc,
                ordinal: 1,
            },
            NatBackendValue::new(Ipv4Addr::new(10, 244, 2, 9), 8080)
                .on_node(Ipv4Addr::new(10, 224, 0, 5)),
        );
        let aff = AffinityValue {
            ts_ns: 2 * NS,
            be: NatBackendValue::new(Ipv4Addr::new(10, 244, 1, 5), 8080),
            pad: 0,
        };
        let client = AffinityKey {
            svc_id: svc,
            client: margay_bpf::maps::be_addr(Ipv4Addr::new(10, 244, 3, 3)),
        };
        let view = nat_view(
            &[(wildcard, value), (fe, value)],
            &backends,
            &[(client, aff)],
            5 * NS,
        );
        assert_eq!(
            nat_text(&view),
            "\
10.96.0.20:80/TCP  svc 7  backends 3 (local 1)  external-local  affinity 10800s
    0  10.244.1.5:8080  local
    1  10.244.2.9:8080  on 10.224.0.5
    2  MISSING
*:30080/TCP  svc 7  backends 3 (local 1)  nodeport-wildcard  external-local  affinity 10800s
    0  10.244.1.5:8080  local
    1  10.244.2.9:8080  on 10.224.0.5
    2  MISSING
affinity  svc 7  client 10.244.3.3 -> 10.244.1.5:8080  age 3.0s
2 frontends, 1 affinity entries
"
        );
        assert_eq!(view["frontends"][0]["backends"][1]["node"], "10.224.0.5");
        assert_eq!(view["frontends"][0]["backends"][0]["local"], true);
    }

    #[test]
    fn conntrack_dump_shows_client_first_nat_state_service_psnat_and_age_of_the_pair() {
        let client = (Ipv4Addr::new(203, 0, 113, 10), 40000);
        let frontend = (Ipv4Addr::new(10, 224, 0, 4), 30080);
        let backend = (Ipv4Addr::new(10, 244, 1, 5), 8080);
        let (fwd_key, fwd_client_is_b) = CtKey::new(Protocol::Tcp, client, frontend);
        let (rev_key, rev_client_is_b) = CtKey::new(Protocol::Tcp, client, backend);
        let side = |b: bool| if b { F_CLIENT_IS_B } else { 0 };
        // The client's SYN+ACK went through the forward entry, the server's through the
        // reverse: only together do they make "established".
        let (fwd_tcp, rev_tcp) = (TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK);
        let tcp = |client_is_b: bool, client: u8, server: u8| {
            if client_is_b {
                (server, client)
            } else {
                (client, server)
            }
        };
        let (fa, fb) = tcp(fwd_client_is_b, fwd_tcp, 0);
        let (ra, rb) = tcp(rev_client_is_b, 0, rev_tcp);
        let fwd = CtValue {
            created_ns: NS,
            last_seen_ns: 3 * NS,
            kind: CtType::NatForward as u8,
            flags: side(fwd_client_is_b) | F_EXTERNAL,
            tcp_a: fa,
            tcp_b: fb,
            svc_id: 4,
            peer: rev_key,
            nat_addr: margay_bpf::maps::be_addr(backend.0),
            nat_port: margay_bpf::maps::be_port(backend.1),
            ..CtValue::default()
        };
        let rev = CtValue {
            created_ns: NS,
            last_seen_ns: 4 * NS,
            kind: CtType::NatReverse as u8,
            flags: side(rev_client_is_b) | F_EXTERNAL,
            tcp_a: ra,
            tcp_b: rb,
            svc_id: 4,
            peer: fwd_key,
            nat_addr: margay_bpf::maps::be_addr(frontend.0),
            nat_port: margay_bpf::maps::be_port(frontend.1),
            ..CtValue::default()
        };
        // The NodePort is served through its wildcard frontend (service id 4), named by the
        // datastore's Service.
        let nat_frontends = [(
            NatFrontendKey::node_port_any(frontend.1, Protocol::Tcp),
            NatFrontendValue {
                svc_id: 4,
                count: 1,
                ..NatFrontendValue::default()
            },
        )];
        let names: ServiceNames = [(
            (NODEPORT_ANY, frontend.1, 6),
            "shop/web:http/tcp".to_owned(),
        )]
        .into();
        let frontends = Frontends::new(&nat_frontends, &names);
        let view = conntrack_view(&[(rev_key, rev), (fwd_key, fwd)], &frontends, 5 * NS);
        assert_eq!(
            conntrack_text(&view),
            "\
TCP 203.0.113.10:40000 -> 10.224.0.4:30080  nat-forward backend 10.244.1.5:8080  svc 4 shop/web:http/tcp  established (client SYN,ACK server SYN,ACK)  age 4.0s idle 1.0s  external
TCP 203.0.113.10:40000 -> 10.244.1.5:8080  nat-reverse frontend 10.224.0.4:30080  svc 4 shop/web:http/tcp  established (client SYN,ACK server SYN,ACK)  age 4.0s idle 1.0s  external
2 entries
"
        );
        assert_eq!(view[0]["service"], "shop/web:http/tcp");
        assert_eq!(view[0]["psnatPort"], Value::Null);

        // Under port SNAT the pair is keyed by the client's new port on the reverse side; the
        // forward entry says which port the client's packets get, the reverse entry the
        // client's own port. With no datastore the service id still comes from the frontend.
        let psnat = 20017;
        let (snat_rev_key, snat_rev_client_is_b) =
            CtKey::new(Protocol::Tcp, (client.0, psnat), backend);
        let snat_fwd = CtValue {
            svc_id: 0,
            peer: snat_rev_key,
            psnat_port: margay_bpf::maps::be_port(psnat),
            ..fwd
        };
        let snat_rev = CtValue {
            svc_id: 0,
            flags: side(snat_rev_client_is_b) | F_EXTERNAL,
            peer: fwd_key,
            psnat_port: margay_bpf::maps::be_port(client.1),
            ..rev
        };
        let no_names = ServiceNames::new();
        let view = conntrack_view(
            &[(snat_rev_key, snat_rev), (fwd_key, snat_fwd)],
            &Frontends::new(&nat_frontends, &no_names),
            5 * NS,
        );
        let text = conntrack_text(&view);
        assert!(
            text.contains(
                "TCP 203.0.113.10:40000 -> 10.224.0.4:30080  nat-forward backend 10.244.1.5:8080 psnat port 20017  svc 4  established"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "TCP 203.0.113.10:20017 -> 10.244.1.5:8080  nat-reverse frontend 10.224.0.4:30080 psnat client's port 40000  svc 4  established"
            ),
            "{text}"
        );
        let forward = view
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "nat-forward")
            .unwrap();
        assert_eq!(forward["psnatPort"], 20017);
        assert_eq!(forward["serviceId"], 4);
        assert_eq!(forward["service"], Value::Null);

        // Alone, the forward entry has seen only the client's leg, and says its peer is gone.
        let alone = conntrack_view(&[(fwd_key, fwd)], &frontends, 5 * NS);
        assert_eq!(alone[0]["state"], "syn-sent");
        assert_eq!(alone[0]["peerPresent"], false);
        assert!(conntrack_text(&alone).contains("PEER-MISSING"));
    }

    #[test]
    fn routes_and_counters_render_one_line_each() {
        let remote = RouteValue {
            flags: RT_REMOTE_WL | RT_IN_POOL,
            ifindex: 0,
            next_hop: margay_bpf::maps::be_addr(Ipv4Addr::new(10, 224, 0, 5)),
            pad: 0,
        };
        let local = RouteValue {
            flags: RT_LOCAL_WL | RT_IN_POOL,
            ifindex: 12,
            next_hop: 0,
            pad: 0,
        };
        let through_wireguard = RouteValue {
            flags: RT_REMOTE_HOST | RT_WIREGUARD,
            ifindex: 7,
            next_hop: margay_bpf::maps::be_addr(Ipv4Addr::new(10, 224, 0, 5)),
            pad: 0,
        };
        let interfaces = [
            (
                12,
                IfStateValue::new(IF_WORKLOAD | IF_READY, "cali1a2b3c4d5e6"),
            ),
            (7, IfStateValue::new(IF_TUNNEL | IF_READY, "wireguard.cali")),
        ];
        let view = routes_view(
            &[
                ("10.244.2.0/26".parse().expect("net"), remote),
                ("10.244.1.5/32".parse().expect("net"), local),
                ("10.224.0.5/32".parse().expect("net"), through_wireguard),
            ],
            &interfaces.into_iter().collect(),
        );
        assert_eq!(
            routes_text(&view),
            "\
10.224.0.5/32      remote-host wireguard ifindex 7 (wireguard.cali) via 10.224.0.5
10.244.1.5/32      local-workload in-pool ifindex 12 (cali1a2b3c4d5e6)
10.244.2.0/26      remote-workload in-pool via 10.224.0.5
3 routes
"
        );
        let counters = counters_view(&[("no_backend", true, 3), ("new_flow", false, 12)]);
        assert_eq!(
            counters_text(&counters),
            "no_backend                  3  drop\nnew_flow                   12  event\n"
        );
    }
}
