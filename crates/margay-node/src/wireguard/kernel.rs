//! The kernel's WireGuard, where the module exists: a `wireguard` link made with `ip link add
//! NAME type wireguard` (like every other link change of this module, through `ip`), configured
//! through the WireGuard generic netlink family (`WG_CMD_SET_DEVICE`, `WG_CMD_GET_DEVICE`), as
//! `wg` and Calico's Felix (wgctrl) do. The messages are built with `netlink-packet-wireguard`
//! and sent with `genetlink` (rust-netlink's crates: typed attributes, the family id resolved
//! by name, an async socket on the agent's tokio runtime), so no attribute layout is written
//! by hand here.
//!
//! The socket is opened in the agent's network namespace, the node's, where the link is.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

use super::ip;
use super::key::base64_to_bytes;
use super::plan::Peer;

pub struct Kernel {
    name: String,
    mtu: u32,
    handle: GenetlinkHandle,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Makes the `wireguard` link `name` (or adopts it, after a restart: `exists`) with `mtu`
    /// and opens the netlink socket that configures it. Fails when the kernel refuses the link
    /// kind (no module) or has no WireGuard netlink family; a link made here is removed again.
    pub async fn create(name: &str, mtu: u32, exists: bool) -> Result<Kernel> {
        if !exists {
            ip::batch(&[format!("link add dev {name} type wireguard")])
                .await
                .context("the kernel refused a wireguard interface")?;
        }
        let opened = Self::open(name, mtu).await;
        if opened.is_err() && !exists {
            // Never leave a half-made device behind: the fallback needs the name.
            let _ = ip::batch(&[format!("link del dev {name}")]).await;
        }
        opened
    }

    async fn open(name: &str, mtu: u32) -> Result<Kernel> {
        ip::batch(&[format!("link set dev {name} mtu {mtu}")]).await?;
        let (connection, handle, _) =
            genetlink::new_connection().context("cannot open a generic netlink socket")?;
        tokio::spawn(connection);
        let mut device = Kernel {
            name: name.to_owned(),
            mtu,
            handle,
        };
        device
            .get()
            .await
            .context("the kernel's WireGuard netlink interface does not answer")?;
        Ok(device)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Sets the private key, port and mark, and removes every peer (a fresh device, as the
    /// userspace one's `replace_peers`).
    pub async fn configure(&mut self, secret: [u8; 32], port: u16, fwmark: u32) -> Result<()> {
        let message = device_message(&self.name, secret, port, fwmark);
        self.set(message).await
    }

    pub async fn set_port(&mut self, port: u16) -> Result<()> {
        let message = set_message(&self.name, vec![WireguardAttribute::ListenPort(port)]);
        self.set(message).await
    }

    pub async fn add_peer(&mut self, peer: &Peer) -> Result<()> {
        let message = add_peer_message(&self.name, peer)
            .ok_or_else(|| anyhow!("{}'s key is not a WireGuard key", peer.node))?;
        self.set(message).await
    }

    pub async fn remove_peer(&mut self, public_key: &str) -> Result<()> {
        let message = remove_peer_message(&self.name, public_key)
            .ok_or_else(|| anyhow!("{public_key:?} is not a WireGuard key"))?;
        self.set(message).await
    }

    /// Reads the device (`WG_CMD_GET_DEVICE`, a dump): proves it is there and answers.
    pub async fn get(&mut self) -> Result<()> {
        let message = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.name.clone())],
        };
        self.exchange(message, NLM_F_REQUEST | NLM_F_DUMP).await
    }

    async fn set(&mut self, message: WireguardMessage) -> Result<()> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_ACK).await
    }

    async fn exchange(&mut self, message: WireguardMessage, flags: u16) -> Result<()> {
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(message));
        request.header.flags = flags;
        let mut answers = self
            .handle
            .request(request)
            .await
            .map_err(|e| anyhow!("WireGuard netlink request on {}: {e}", self.name))?;
        while let Some(answer) = answers.next().await {
            let answer = answer.map_err(|e| anyhow!("cannot decode the kernel's answer: {e}"))?;
            if let NetlinkPayload::Error(e) = answer.payload
                && e.code.is_some()
            {
                bail!(
                    "the kernel refused a WireGuard request on {}: {}",
                    self.name,
                    e.to_io()
                );
            }
        }
        Ok(())
    }
}

fn set_message(name: &str, mut attributes: Vec<WireguardAttribute>) -> WireguardMessage {
    attributes.insert(0, WireguardAttribute::IfName(name.to_owned()));
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    }
}

/// `WG_CMD_SET_DEVICE` with the key, port and mark, replacing every peer.
pub fn device_message(name: &str, secret: [u8; 32], port: u16, fwmark: u32) -> WireguardMessage {
    set_message(
        name,
        vec![
            WireguardAttribute::PrivateKey(secret),
            WireguardAttribute::ListenPort(port),
            WireguardAttribute::Fwmark(fwmark),
            WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
        ],
    )
}

/// `WG_CMD_SET_DEVICE` adding `peer` (its allowed IPs replace any it had), or `None` when its
/// key is not a WireGuard key.
pub fn add_peer_message(name: &str, peer: &Peer) -> Option<WireguardMessage> {
    let allowed = peer
        .allowed_ips
        .iter()
        .map(|net| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                WireguardAllowedIpAttr::IpAddr(IpAddr::V4(net.network())),
                WireguardAllowedIpAttr::Cidr(net.prefix_len()),
            ])
        })
        .collect();
    let attributes = vec![
        WireguardPeerAttribute::PublicKey(base64_to_bytes(&peer.public_key)?),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(SocketAddr::V4(peer.endpoint)),
        WireguardPeerAttribute::PersistentKeepalive(peer.keepalive),
        WireguardPeerAttribute::AllowedIps(allowed),
    ];
    Some(set_message(
        name,
        vec![WireguardAttribute::Peers(vec![WireguardPeer(attributes)])],
    ))
}

/// `WG_CMD_SET_DEVICE` removing the peer with `public_key`.
pub fn remove_peer_message(name: &str, public_key: &str) -> Option<WireguardMessage> {
    Some(set_message(
        name,
        vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(base64_to_bytes(public_key)?),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])])],
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, SocketAddrV4};

    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;

    use super::*;

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    fn peer() -> Peer {
        Peer {
            node: "node-2".into(),
            public_key: KEY.into(),
            endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 224, 0, 5), 51820),
            allowed_ips: BTreeSet::from([
                "10.244.0.64/26".parse().expect("net"),
                "10.224.0.5/32".parse().expect("net"),
            ]),
            keepalive: 25,
            tunnel_ip: Some(Ipv4Addr::new(10, 244, 0, 65)),
        }
    }

    /// Emits `message` as the kernel receives it (generic netlink header, attributes) and parses
    /// it back with the crate's parser, as the kernel's reply parser would see it.
    fn round_trip(message: &WireguardMessage) -> WireguardMessage {
        let header = GenlHeader {
            cmd: message.cmd.into(),
            version: 1,
        };
        let mut buffer = vec![0; header.buffer_len() + message.buffer_len()];
        header.emit(&mut buffer);
        message.emit(&mut buffer[header.buffer_len()..]);
        let parsed = GenlHeader::parse(&buffer).expect("header");
        WireguardMessage::parse_with_param(&buffer[header.buffer_len()..], parsed)
            .expect("attributes")
    }

    #[test]
    fn device_message_sets_key_port_mark_and_replaces_peers() {
        let message = device_message("wireguard.cali", [7; 32], 51820, 0x10_0000);
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            message.attributes,
            vec![
                WireguardAttribute::IfName("wireguard.cali".into()),
                WireguardAttribute::PrivateKey([7; 32]),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(0x10_0000),
                WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
            ]
        );
        assert_eq!(round_trip(&message), message);
    }

    #[test]
    fn peer_messages_carry_the_key_endpoint_keepalive_and_allowed_ips() {
        let message = add_peer_message("wireguard.cali", &peer()).expect("message");
        let WireguardAttribute::Peers(peers) = &message.attributes[1] else {
            panic!("no peers: {message:?}");
        };
        let attributes = &peers[0].0;
        assert_eq!(
            attributes[0],
            WireguardPeerAttribute::PublicKey(base64_to_bytes(KEY).expect("key"))
        );
        assert!(attributes.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(attributes.contains(&WireguardPeerAttribute::Endpoint(
            "10.224.0.5:51820".parse().expect("addr")
        )));
        assert!(attributes.contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        let allowed: Vec<(IpAddr, u8)> = attributes
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => Some(ips),
                _ => None,
            })
            .expect("allowed IPs")
            .iter()
            .map(|ip| {
                let addr = ip.0.iter().find_map(|a| match a {
                    WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                    _ => None,
                });
                let cidr = ip.0.iter().find_map(|a| match a {
                    WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                    _ => None,
                });
                (addr.expect("address"), cidr.expect("prefix"))
            })
            .collect();
        assert_eq!(
            allowed,
            vec![
                ("10.224.0.5".parse().expect("ip"), 32),
                ("10.244.0.64".parse().expect("ip"), 26)
            ]
        );
        assert_eq!(round_trip(&message), message);

        let remove = remove_peer_message("wireguard.cali", KEY).expect("message");
        assert_eq!(
            remove.attributes[1],
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(base64_to_bytes(KEY).expect("key")),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])])
        );
        assert_eq!(round_trip(&remove), remove);
    }

    #[test]
    fn a_peer_whose_key_is_not_a_key_gets_no_message() {
        let bad = Peer {
            public_key: "not a key".into(),
            ..peer()
        };
        assert!(add_peer_message("wireguard.cali", &bad).is_none());
        assert!(remove_peer_message("wireguard.cali", "short").is_none());
    }
}
