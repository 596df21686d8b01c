//! Crafting and checking Ethernet/IPv4/TCP|UDP packets, independently of the programs: every
//! checksum is computed from scratch here, so a wrong incremental update in BPF shows up.

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A packet described by its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    /// TCP flags (ignored for UDP).
    pub flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// UDP only: send without checksum (0).
    pub no_udp_csum: bool,
    /// Clear the IPv4 "don't fragment" bit (set by default, as Linux sets it).
    pub may_fragment: bool,
}

impl Pkt {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            src,
            dst,
            proto: TCP,
            flags,
            payload: b"margay".to_vec(),
            ip_options: Vec::new(),
            no_udp_csum: false,
            may_fragment: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self {
            proto: UDP,
            flags: 0,
            ..Self::tcp(src, dst, 0)
        }
    }

    /// The same packet going the other way.
    pub fn reply(&self, flags: u8) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            flags,
            ..self.clone()
        }
    }

    pub fn with_src(&self, src: (Ipv4Addr, u16)) -> Self {
        Self {
            src,
            ..self.clone()
        }
    }

    pub fn with_dst(&self, dst: (Ipv4Addr, u16)) -> Self {
        Self {
            dst,
            ..self.clone()
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4_len = match self.proto {
            TCP => 20,
            _ => 8,
        } + self.payload.len();
        let ihl = 20 + self.ip_options.len();
        let total = ihl + l4_len;
        let mut p = Vec::with_capacity(14 + total);
        // Ethernet: dst, src, type IPv4.
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
        // IPv4.
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        let df = if self.may_fragment { 0 } else { 0x40 };
        p.extend_from_slice(&[0x12, 0x34, df, 0x00, 64, self.proto, 0, 0]);
        p.extend_from_slice(&self.src.0.octets());
        p.extend_from_slice(&self.dst.0.octets());
        p.extend_from_slice(&self.ip_options);
        let c = csum(&p[14..14 + ihl], 0);
        p[24..26].copy_from_slice(&c.to_be_bytes());
        // L4.
        let l4 = p.len();
        p.extend_from_slice(&self.src.1.to_be_bytes());
        p.extend_from_slice(&self.dst.1.to_be_bytes());
        if self.proto == TCP {
            p.extend_from_slice(&1000u32.to_be_bytes()); // seq
            p.extend_from_slice(&2000u32.to_be_bytes()); // ack
            p.extend_from_slice(&[0x50, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        if !(self.proto == UDP && self.no_udp_csum) {
            let off = l4 + if self.proto == TCP { 16 } else { 6 };
            let mut c = csum(&p[l4..], pseudo(self.src.0, self.dst.0, self.proto, l4_len));
            if self.proto == UDP && c == 0 {
                c = 0xffff;
            }
            p[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

/// What [`parse`] found, with the checksums checked from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    pub ip_csum_ok: bool,
    /// True also for a UDP packet without checksum.
    pub l4_csum_ok: bool,
    pub l4_csum: u16,
}

pub fn parse(p: &[u8]) -> Parsed {
    assert!(p.len() >= 34, "short packet {p:?}");
    assert_eq!(&p[12..14], &[0x08, 0x00], "not IPv4");
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[16], p[17]]));
    let proto = p[23];
    let src_ip = Ipv4Addr::new(p[26], p[27], p[28], p[29]);
    let dst_ip = Ipv4Addr::new(p[30], p[31], p[32], p[33]);
    let l4 = 14 + ihl;
    let l4_len = total - ihl;
    let ports = (
        u16::from_be_bytes([p[l4], p[l4 + 1]]),
        u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
    );
    let ip_csum_ok = csum(&p[14..l4], 0) == 0;
    let off = l4 + if proto == TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([p[off], p[off + 1]]);
    let l4_csum_ok = (proto == UDP && l4_csum == 0)
        || csum(&p[l4..l4 + l4_len], pseudo(src_ip, dst_ip, proto, l4_len)) == 0;
    Parsed {
        src: (src_ip, ports.0),
        dst: (dst_ip, ports.1),
        proto,
        ip_csum_ok,
        l4_csum_ok,
        l4_csum,
    }
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(proto),
        len as u16,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum()
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial sum.
pub fn csum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// === Ethernet addresses and the tunnel (VXLAN) ===

pub type Mac = [u8; 6];

/// `frame` with its Ethernet destination and source replaced.
pub fn with_macs(frame: &[u8], dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

/// The Ethernet (destination, source) of a frame.
pub fn macs(frame: &[u8]) -> (Mac, Mac) {
    let mut d = [0u8; 6];
    let mut s = [0u8; 6];
    d.copy_from_slice(&frame[0..6]);
    s.copy_from_slice(&frame[6..12]);
    (d, s)
}

/// Margay's tunnel (Calico's values): VXLAN on UDP 4789, VNI 0xca11c0.
pub const TUNNEL_PORT: u16 = 4789;
pub const TUNNEL_VNI: u32 = 0x00ca_11c0;

/// An Ethernet frame carried in VXLAN: outer Ethernet, IPv4 (no options, DF, TTL 64, id 0),
/// UDP (checksum 0), VXLAN, then `inner` (a whole Ethernet frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vxlan {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub sport: u16,
    pub dport: u16,
    pub vni: u32,
    pub inner: Vec<u8>,
}

impl Vxlan {
    pub fn new(eth: (Mac, Mac), src: Ipv4Addr, dst: Ipv4Addr, sport: u16, inner: &[u8]) -> Self {
        Self {
            eth_dst: eth.0,
            eth_src: eth.1,
            src,
            dst,
            tos: 0,
            sport,
            dport: TUNNEL_PORT,
            vni: TUNNEL_VNI,
            inner: inner.to_vec(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let total = 20 + 8 + 8 + self.inner.len();
        let mut p = Vec::with_capacity(14 + total);
        p.extend_from_slice(&self.eth_dst);
        p.extend_from_slice(&self.eth_src);
        p.extend_from_slice(&[0x08, 0x00]);
        p.extend_from_slice(&[0x45, self.tos]);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0x00, 64, UDP, 0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        let c = csum(&p[14..34], 0);
        p[24..26].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&((total - 20) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&[0x08, 0, 0, 0]);
        p.extend_from_slice(&(self.vni << 8).to_be_bytes());
        p.extend_from_slice(&self.inner);
        p
    }

    /// Reads a frame as VXLAN over IPv4/UDP (`None` if it is not), checking the outer IPv4
    /// checksum from scratch (panics when wrong).
    pub fn parse(p: &[u8]) -> Option<Self> {
        if p.len() < 14 + 20 + 8 + 8 + 14 || p[12..14] != [0x08, 0x00] || p[14] != 0x45 {
            return None;
        }
        if p[23] != UDP {
            return None;
        }
        assert_eq!(csum(&p[14..34], 0), 0, "outer IPv4 checksum of {p:?}");
        let total = usize::from(u16::from_be_bytes([p[16], p[17]]));
        assert_eq!(total, p.len() - 14, "outer IPv4 total length");
        let udp = &p[34..42];
        assert_eq!(
            usize::from(u16::from_be_bytes([udp[4], udp[5]])),
            total - 20,
            "outer UDP length"
        );
        let (eth_dst, eth_src) = macs(p);
        Some(Self {
            eth_dst,
            eth_src,
            src: Ipv4Addr::new(p[26], p[27], p[28], p[29]),
            dst: Ipv4Addr::new(p[30], p[31], p[32], p[33]),
            tos: p[15],
            sport: u16::from_be_bytes([udp[0], udp[1]]),
            dport: u16::from_be_bytes([udp[2], udp[3]]),
            vni: u32::from_be_bytes([p[46], p[47], p[48], p[49]]) >> 8,
            inner: p[50..].to_vec(),
        })
    }
}

/// ICMP "fragmentation needed" (type 3 code 4) from `src` to `dst` announcing `mtu`, quoting the
/// IPv4 header and first 8 payload bytes of `frame` (a whole Ethernet frame, no IP options), as
/// the programs build it: TOS 0xc0, id 0, no DF, TTL 64.
pub fn icmp_too_big(
    eth: (Mac, Mac),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    mtu: u16,
    frame: &[u8],
) -> Vec<u8> {
    icmp_answer(eth, src, dst, 4, mtu, frame)
}

/// ICMP "destination unreachable" with `code` (4: fragmentation needed, announcing `mtu`; 3:
/// port unreachable, `mtu` 0) as the programs build it (see [`icmp_too_big`]).
pub fn icmp_answer(
    eth: (Mac, Mac),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    code: u8,
    mtu: u16,
    frame: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&eth.0);
    p.extend_from_slice(&eth.1);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&[3, code, 0, 0, 0, 0]);
    p.extend_from_slice(&mtu.to_be_bytes());
    p.extend_from_slice(&frame[14..14 + 28]);
    let c = csum(&p[34..], 0);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// An ICMP error as a host or a router sends it: Ethernet (the addresses [`Pkt::bytes`] uses),
/// IPv4 from `src` to `dst` (TTL 64, id 0x4321), ICMP `kind` = (type, code) with `rest` (the
/// MTU for "fragmentation needed"), quoting the first `quote` bytes of the IPv4 packet in
/// `frame` (a whole Ethernet frame; all of it when shorter). Every checksum from scratch.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: (u8, u8),
    rest: u32,
    frame: &[u8],
    quote: usize,
) -> Vec<u8> {
    let quoted = &frame[14..(14 + quote).min(frame.len())];
    let total = 20 + 8 + quoted.len();
    let mut p = Vec::with_capacity(14 + total);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x43, 0x21, 0, 0, 64, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&[kind.0, kind.1, 0, 0]);
    p.extend_from_slice(&rest.to_be_bytes());
    p.extend_from_slice(quoted);
    let c = csum(&p[34..], 0);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}
