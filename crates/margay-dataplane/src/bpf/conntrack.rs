//! Conntrack cleanup: a userspace scan of `mg_ct` that removes expired flows in pairs, entries
//! whose peer is gone, and flows to backends the NAT model no longer has. Design:
//! `docs/design/conntrack.md` and `docs/design/services-nat.md`.
//!
//! ## Expiry (Calico's rules, `bpfConntrackTimeouts`)
//!
//! A NAT flow is a pair (forward and reverse entry) and is judged as one: its TCP flags are the
//! OR of both entries' per-leg flags (client leg, server leg), its last activity the newer of
//! the two `last_seen_ns`, its age since creation the older `created_ns`. Then, as Calico's
//! `EntryExpired`:
//!
//! - younger than `creationGracePeriod` since creation: kept, whatever else;
//! - TCP with a RST seen: expires after `tcpResetSeen` of silence (and no other rule applies);
//! - TCP with a FIN from both sides: `tcpFinsSeen`;
//! - TCP not established (SYN and ACK from both sides): `tcpSynSent`;
//! - TCP established: `tcpEstablished`;
//! - UDP: `udpTimeout`; ICMP: `icmpTimeout`; anything else: `genericTimeout`.
//!
//! **Live flows are never removed by expiry**: an expired pair is read again just before it is
//! deleted and kept if a packet refreshed it meanwhile; deletion goes forward entry first
//! (`Conntrack::remove_pair`).
//!
//! ## Orphans
//!
//! An entry whose peer is missing (LRU eviction took it, or a crashed writer) cannot translate
//! its flow both ways: it is removed, once older than the creation grace period (the programs
//! write the reverse entry a moment before the forward one).
//!
//! ## Flows to removed backends
//!
//! With the NAT model ([`LiveBackends`]), a pair whose backend is no longer a backend of the
//! frontend the client addressed (by address, port and protocol, whatever the service id) is
//! removed at once, UDP and TCP alike. UDP: so that a client does not keep sending to a dead
//! pod (kube-proxy's conntrack cleanup). TCP: the peer is gone or no longer serves the
//! service; the client's next packet misses conntrack, is marked "fall through" and left to the
//! kernel, and the client times out or is reset by whoever owns the address now. Sending a RST
//! to the client from userspace would end it sooner; that is left for later.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use margay_api::calico::FelixConfigurationSpec;
use margay_api::calico::felix::ConntrackTimeout;
use margay_bpf::maps::conntrack::{F_CLIENT_IS_B, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use margay_bpf::maps::{Conntrack, CtKey, CtType, CtValue};
use margay_calc::bpf_nat::NatModel;

use super::BpfError;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

// === Timeouts ===

/// Idle timeouts per flow state (`bpfConntrackTimeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// No entry younger than this (since creation) is removed.
    pub creation_grace: Duration,
    pub tcp_syn_sent: Duration,
    pub tcp_established: Duration,
    pub tcp_fins_seen: Duration,
    pub tcp_reset_seen: Duration,
    pub udp: Duration,
    pub generic: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    /// Calico's defaults.
    fn default() -> Self {
        Self {
            creation_grace: Duration::from_secs(10),
            tcp_syn_sent: Duration::from_secs(20),
            tcp_established: Duration::from_secs(3600),
            tcp_fins_seen: Duration::from_secs(30),
            tcp_reset_seen: Duration::from_secs(40),
            udp: Duration::from_secs(60),
            generic: Duration::from_secs(600),
            icmp: Duration::from_secs(5),
        }
    }
}

impl Timeouts {
    /// From an effective FelixConfiguration (`FelixConfigurationSpec::effective`). Unset
    /// fields and `Auto` take Calico's default (for `tcpFinsSeen`, `Auto` would read the
    /// kernel's `nf_conntrack_tcp_timeout_time_wait` in Calico; Margay uses the 30 s Calico
    /// falls back to).
    pub fn from_felix(spec: &FelixConfigurationSpec) -> Self {
        let d = Self::default();
        let Some(c) = spec.bpf_conntrack_timeouts.as_ref() else {
            return d;
        };
        let pick = |v: &Option<ConntrackTimeout>, default: Duration| match v {
            Some(ConntrackTimeout::Duration(g)) => g.as_duration(),
            Some(ConntrackTimeout::Auto) | None => default,
        };
        Self {
            creation_grace: pick(&c.creation_grace_period, d.creation_grace),
            tcp_syn_sent: pick(&c.tcp_syn_sent, d.tcp_syn_sent),
            tcp_established: pick(&c.tcp_established, d.tcp_established),
            tcp_fins_seen: pick(&c.tcp_fins_seen, d.tcp_fins_seen),
            tcp_reset_seen: pick(&c.tcp_reset_seen, d.tcp_reset_seen),
            udp: pick(&c.udp_timeout, d.udp),
            generic: pick(&c.generic_timeout, d.generic),
            icmp: pick(&c.icmp_timeout, d.icmp),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps the entries.
pub fn monotonic_now_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

// === Pair state ===

/// Why a flow expired (a metrics label).
pub type ExpiryReason = &'static str;

/// Whether a flow made of `entries` (one or two, of the same flow) has expired at `now_ns`.
pub fn expired(entries: &[&CtValue], proto: u8, now_ns: u64, t: &Timeouts) -> Option<ExpiryReason> {
    let created = entries.iter().map(|v| v.created_ns).min()?;
    let last = entries.iter().map(|v| v.last_seen_ns).max()?;
    if Duration::from_nanos(now_ns.saturating_sub(created)) < t.creation_grace {
        return None;
    }
    let idle = Duration::from_nanos(now_ns.saturating_sub(last));
    match proto {
        IPPROTO_TCP => {
            let (mut client, mut server) = (0u8, 0u8);
            for v in entries {
                let (c, s) = v.tcp_client_server();
                client |= c;
                server |= s;
            }
            if (client | server) & TCP_RST != 0 {
                return (idle > t.tcp_reset_seen).then_some("tcp_reset");
            }
            if client & server & TCP_FIN != 0 {
                return (idle > t.tcp_fins_seen).then_some("tcp_fins");
            }
            let both = TCP_SYN | TCP_ACK;
            if client & both != both || server & both != both {
                return (idle > t.tcp_syn_sent).then_some("tcp_syn_sent");
            }
            (idle > t.tcp_established).then_some("tcp_established")
        }
        IPPROTO_UDP => (idle > t.udp).then_some("udp"),
        IPPROTO_ICMP => (idle > t.icmp).then_some("icmp"),
        _ => (idle > t.generic).then_some("generic"),
    }
}

/// How many flows in `entries` may still send packets at `now_ns`: those neither closed (TCP
/// with a RST, or a FIN from both sides) nor expired. Each flow counts once, by its forward
/// entry (NAT) or its only entry (tunnel, no NAT); a reverse entry alone counts too (its peer
/// was lost, yet it still translates the replies).
///
/// This is what a node leaving BPF waits for: until it is zero the programs stay attached so
/// that the flows they translated keep being translated (the kernel's conntrack never saw them
/// whole, and kube-proxy's rules would NAT their next packet as a new flow).
pub fn live_flows(entries: &[(CtKey, CtValue)], now_ns: u64, t: &Timeouts) -> usize {
    live_flow_entries(entries, now_ns, t).len()
}

/// The entries [`live_flows`] counts, one per live flow (to say which flows a bounded drain
/// cuts).
pub fn live_flow_entries<'a>(
    entries: &'a [(CtKey, CtValue)],
    now_ns: u64,
    t: &Timeouts,
) -> Vec<&'a (CtKey, CtValue)> {
    let keys: HashSet<&CtKey> = entries.iter().map(|(k, _)| k).collect();
    entries
        .iter()
        .filter(|(k, v)| match v.kind() {
            Some(CtType::NatForward | CtType::Tunnel | CtType::Normal) => true,
            // Counted through its forward entry when that is there.
            Some(CtType::NatReverse) => !keys.contains(&v.peer),
            None => false,
        } && !closed(v, k.proto) && expired(&[v], k.proto, now_ns, t).is_none())
        .collect()
}

/// One line for a flow's conntrack entry: protocol, the two ends of its key, and for a NAT
/// entry the address it translates to (`tcp 203.0.113.10:40000 <-> 10.224.0.4:30080 nat
/// 10.244.1.5:8080`).
pub fn describe_flow(key: &CtKey, value: &CtValue) -> String {
    let proto = match key.proto {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        IPPROTO_ICMP => "icmp".to_owned(),
        other => format!("proto {other}"),
    };
    let (a, b) = (key.a(), key.b());
    let mut line = format!("{proto} {}:{} <-> {}:{}", a.0, a.1, b.0, b.1);
    if matches!(value.kind(), Some(CtType::NatForward | CtType::NatReverse)) {
        let (ip, port) = value.nat();
        line.push_str(&format!(" nat {ip}:{port}"));
    }
    line
}

/// A TCP flow that ended (a RST, or a FIN from both sides): nothing more of it needs translating
/// but stray retransmissions.
fn closed(v: &CtValue, proto: u8) -> bool {
    if proto != IPPROTO_TCP {
        return false;
    }
    let (client, server) = v.tcp_client_server();
    (client | server) & TCP_RST != 0 || client & server & TCP_FIN != 0
}

fn client_is_b(v: &CtValue) -> bool {
    v.flags & F_CLIENT_IS_B != 0
}

/// The non-client side of an entry's key.
fn server_side(k: &CtKey, v: &CtValue) -> (Ipv4Addr, u16) {
    if client_is_b(v) { k.a() } else { k.b() }
}

/// (frontend, backend) of a NAT flow, from its forward entry or else its reverse entry.
pub fn frontend_and_backend(
    fwd: Option<(&CtKey, &CtValue)>,
    rev: Option<(&CtKey, &CtValue)>,
) -> Option<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
    if let Some((k, v)) = fwd {
        return Some((server_side(k, v), v.nat()));
    }
    let (k, v) = rev?;
    Some((v.nat(), server_side(k, v)))
}

// === Live backends ===

/// For each frontend (address, port, protocol), every backend of every service id its entries
/// point at: what a NAT flow may still legitimately be translated to.
#[derive(Clone, Debug, Default)]
pub struct LiveBackends {
    by_frontend: HashMap<(Ipv4Addr, u16, u8), HashSet<(Ipv4Addr, u16)>>,
}

impl LiveBackends {
    pub fn new(model: &NatModel) -> Self {
        let mut by_id: HashMap<u32, Vec<(Ipv4Addr, u16)>> = HashMap::new();
        for (k, b) in &model.backends {
            by_id.entry(k.svc_id).or_default().push((b.addr, b.port));
        }
        let mut by_frontend: HashMap<(Ipv4Addr, u16, u8), HashSet<(Ipv4Addr, u16)>> =
            HashMap::new();
        for (k, v) in &model.frontends {
            let set = by_frontend
                .entry((k.addr, k.port, k.proto.number()))
                .or_default();
            if let Some(list) = by_id.get(&v.svc_id) {
                set.extend(list.iter().copied());
            }
        }
        Self { by_frontend }
    }

    /// Whether `backend` still serves `frontend` (false when the frontend is gone). A flow that
    /// came through the tunnel to a NodePort of another node names that node's address: it is
    /// matched through the NodePort wildcard frontend, as the programs matched it.
    pub fn serves(&self, frontend: (Ipv4Addr, u16), proto: u8, backend: (Ipv4Addr, u16)) -> bool {
        [frontend.0, Ipv4Addr::BROADCAST].iter().any(|addr| {
            self.by_frontend
                .get(&(*addr, frontend.1, proto))
                .is_some_and(|set| set.contains(&backend))
        })
    }

    /// Whether the model has this frontend at all (directly or through the NodePort wildcard).
    pub fn has_frontend(&self, frontend: (Ipv4Addr, u16), proto: u8) -> bool {
        [frontend.0, Ipv4Addr::BROADCAST]
            .iter()
            .any(|addr| self.by_frontend.contains_key(&(*addr, frontend.1, proto)))
    }
}

// === The scan ===

/// What a cleanup pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Entries read.
    pub entries: usize,
    /// NAT pairs with both entries.
    pub pairs: usize,
    /// Expired flows removed (pairs, or single non-NAT entries), by reason.
    pub expired: std::collections::BTreeMap<ExpiryReason, usize>,
    /// Entries removed because their peer was missing.
    pub orphans: usize,
    /// Flows removed because their backend left the frontend (or the frontend left).
    pub stale_backend_udp: usize,
    pub stale_backend_tcp: usize,
    /// Expired at the scan, refreshed by a packet before deletion: kept.
    pub revived: usize,
    /// Entries removed in total.
    pub removed_entries: usize,
    pub duration: Duration,
}

impl CleanupReport {
    pub fn expired_total(&self) -> usize {
        self.expired.values().sum()
    }
}

/// One pass over `mg_ct` at `now_ns` (CLOCK_MONOTONIC, see [`monotonic_now_ns`]). With `live`,
/// flows to backends no longer serving their frontend are removed too.
pub fn cleanup(
    ct: &mut Conntrack,
    live: Option<&LiveBackends>,
    timeouts: &Timeouts,
    now_ns: u64,
) -> Result<CleanupReport, BpfError> {
    let start = Instant::now();
    let entries = ct.entries()?;
    let mut report = CleanupReport {
        entries: entries.len(),
        ..CleanupReport::default()
    };
    let index: HashMap<CtKey, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (*k, i))
        .collect();
    let mut seen: HashSet<CtKey> = HashSet::with_capacity(entries.len());

    for (key, val) in &entries {
        if seen.contains(key) {
            continue;
        }
        seen.insert(*key);
        let kind = val.kind();
        if !matches!(kind, Some(CtType::NatForward | CtType::NatReverse)) {
            // A flow without NAT (none are created yet) or an unknown kind: judged alone.
            if let Some(reason) = expired(&[val], key.proto, now_ns, timeouts) {
                if still_expired(ct, key, None, now_ns, timeouts)? {
                    ct.remove(key)?;
                    *report.expired.entry(reason).or_default() += 1;
                    report.removed_entries += 1;
                } else {
                    report.revived += 1;
                }
            }
            continue;
        }
        // The peer must be the other half of this flow, pointing back.
        let peer = index
            .get(&val.peer)
            .map(|i| &entries[*i].1)
            .filter(|p| p.peer == *key && p.kind() != kind && p.kind().is_some());
        let Some(peer_val) = peer else {
            let young = Duration::from_nanos(now_ns.saturating_sub(val.created_ns))
                < timeouts.creation_grace;
            // Read both again before deleting: since the scan, the peer may have been written
            // (a new flow writes its reverse entry first) or a new SYN may have taken the tuple
            // over with a new peer; either makes the entry a live flow's.
            let unchanged = ct
                .get(key)?
                .is_some_and(|now| now.peer == val.peer && now.created_ns == val.created_ns);
            if !young && unchanged && ct.get(&val.peer)?.is_none_or(|p| p.peer != *key) {
                ct.remove(key)?;
                report.orphans += 1;
                report.removed_entries += 1;
            }
            continue;
        };
        seen.insert(val.peer);
        report.pairs += 1;
        let (fwd, rev) = if kind == Some(CtType::NatForward) {
            ((key, val), (&val.peer, peer_val))
        } else {
            ((&val.peer, peer_val), (key, val))
        };

        if let Some(live) = live
            && let Some((frontend, backend)) = frontend_and_backend(Some(fwd), Some(rev))
            && !live.serves(frontend, key.proto, backend)
        {
            ct.remove_pair(fwd.0)?;
            if key.proto == IPPROTO_UDP {
                report.stale_backend_udp += 1;
            } else {
                report.stale_backend_tcp += 1;
            }
            report.removed_entries += 2;
            continue;
        }

        if let Some(reason) = expired(&[fwd.1, rev.1], key.proto, now_ns, timeouts) {
            if still_expired(ct, fwd.0, Some(rev.0), now_ns, timeouts)? {
                ct.remove_pair(fwd.0)?;
                *report.expired.entry(reason).or_default() += 1;
                report.removed_entries += 2;
            } else {
                report.revived += 1;
            }
        }
    }
    report.duration = start.elapsed();
    Ok(report)
}

/// Reads the entries again just before deleting them: a packet may have refreshed the flow
/// since the scan read it.
fn still_expired(
    ct: &Conntrack,
    key: &CtKey,
    peer: Option<&CtKey>,
    now_ns: u64,
    t: &Timeouts,
) -> Result<bool, BpfError> {
    let Some(a) = ct.get(key)? else {
        return Ok(false);
    };
    let b = match peer {
        Some(p) => ct.get(p)?,
        None => None,
    };
    let fresh: Vec<&CtValue> = std::iter::once(&a).chain(b.as_ref()).collect();
    Ok(expired(&fresh, key.proto, now_ns, t).is_some())
}
