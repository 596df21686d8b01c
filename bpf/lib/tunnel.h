/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The tunnel between nodes that keeps an external client's address (bpfExternalServiceMode
 * Tunnel, Calico's model): the ingress node sends the client's packet, untranslated, in VXLAN
 * (UDP 4789, reserved VNI 0xca11c0) to the node of the backend it chose; that node decapsulates
 * it and NATs it to one of its own backends; replies come back the same way.
 *
 *   encapsulation  mg_tunnel_encap: outer IPv4/UDP/VXLAN + the original Ethernet header as the
 *                  inner one, inserted after the outer Ethernet header (bpf_skb_adjust_room with
 *                  the ENCAP flags, so GSO packets are segmented as UDP tunnels and their
 *                  gso_size shrinks by the header)
 *   forwarding     mg_route + mg_route_out: bpf_fib_lookup for the egress interface and MACs,
 *                  then bpf_redirect; without a neighbour entry bpf_redirect_neigh lets the
 *                  kernel resolve it. The route is looked up before the packet is touched: one
 *                  that will not fit is answered with ICMP "fragmentation needed" (reject.h)
 *   recognition    mg_tunnel_is_ours: UDP to MG_TUNNEL_PORT on this node's address, VXLAN with
 *                  the I flag and MG_TUNNEL_VNI, an inner IPv4 frame; anything else on 4789 (a
 *                  pod network VXLAN device) is left alone
 *   decapsulation  mg_tunnel_decap: removes outer IPv4 (with options), UDP, VXLAN and the inner
 *                  Ethernet header; the outer Ethernet header stays
 *   WireGuard      to a node whose mg_routes entry says MG_RT_F_WIREGUARD the encapsulated packet
 *                  is redirected into the WireGuard device instead (mg_tunnel_send_wireguard;
 *                  the kernel strips the Ethernet header for that L3 device), so the tunnel is
 *                  encrypted like pod traffic. The receiving node's WireGuard device hands it
 *                  back decrypted, without an Ethernet header: mg_wireguard_ingress gives it the
 *                  one it would have had on the underlay and re-injects it into the underlay
 *                  interface's ingress, where mg_from_hep handles it as any tunnelled packet.
 */
#ifndef MARGAY_LIB_TUNNEL_H
#define MARGAY_LIB_TUNNEL_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"
#include "counters.h"
#include "csum.h"
#include "maps.h"
#include "parse.h"
#include "reject.h"

#define MG_AF_INET     2
#define MG_IP_DF       0x4000
#define MG_VXLAN_F_VNI 0x08000000u /* the I flag: the VNI is valid */
#define MG_TUNNEL_TTL  64
#define MG_IP_MIN_MTU  68 /* RFC 791 */

struct mg_vxlanhdr {
	__be32 flags; /* MG_VXLAN_F_VNI */
	__be32 vni;   /* VNI << 8 */
};

/* What encapsulation inserts after the outer Ethernet header. */
struct mg_tunnel_hdr {
	struct iphdr ip;
	struct udphdr udp;
	struct mg_vxlanhdr vxlan;
	struct ethhdr eth; /* the inner Ethernet header: the original one */
} __attribute__((packed));

#define MG_TUNNEL_HLEN ((__u32)sizeof(struct mg_tunnel_hdr))

/* What follows the outer UDP header of a packet of ours. */
struct mg_tunnel_tail {
	struct mg_vxlanhdr vxlan;
	struct ethhdr eth;
} __attribute__((packed));

/*
 * The outer UDP source port: a hash of the inner 5-tuple in 49152..65535 (RFC 7348), so that
 * ECMP in the underlay spreads flows and keeps each on one path.
 */
static __always_inline __be16 mg_tunnel_sport(const struct mg_pkt *p)
{
	__u32 h =
	    p->saddr ^ (p->daddr * 0x9e3779b1u) ^ (((__u32)p->sport << 16) | p->dport) ^ p->proto;

	h ^= h >> 16;
	h *= 0x7feb352du;
	h ^= h >> 15;
	h *= 0x846ca68bu;
	h ^= h >> 16;
	return bpf_htons(0xc000 | (h & 0x3fff));
}

/* A UDP packet to the tunnel port: worth a closer look (one comparison on the common path). */
static __always_inline bool mg_tunnel_maybe(const struct mg_pkt *p)
{
	return p->proto == IPPROTO_UDP && p->dport == bpf_htons(MG_TUNNEL_PORT);
}

/* The parsed packet (UDP to MG_TUNNEL_PORT) is our tunnel, addressed to this node. */
static __always_inline bool mg_tunnel_is_ours(struct __sk_buff *skb, const struct mg_pkt *p,
					      const struct mg_node_cfg *cfg)
{
	struct mg_tunnel_tail t;

	if (!cfg->node_ip || p->daddr != cfg->node_ip)
		return false;
	if (bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct udphdr), &t, sizeof(t)))
		return false;
	return (t.vxlan.flags & bpf_htonl(MG_VXLAN_F_VNI)) &&
	       t.vxlan.vni == bpf_htonl(MG_TUNNEL_VNI << 8) && t.eth.h_proto == bpf_htons(ETH_P_IP);
}

/* Removes the tunnel headers of a packet `mg_tunnel_is_ours` accepted. 0 or a negative error. */
static __always_inline int mg_tunnel_decap(struct __sk_buff *skb, const struct mg_pkt *p)
{
	__s32 len = p->l4_off - p->l3_off + sizeof(struct udphdr) + sizeof(struct mg_tunnel_tail);

	return bpf_skb_adjust_room(skb, -len, BPF_ADJ_ROOM_MAC, 0);
}

/*
 * Wraps the packet described by `p` (its IPv4 header at ETH_HLEN) in the tunnel from `src` (this
 * node) to `dst` (another node). The outer Ethernet header is the original one, to be addressed
 * by mg_fib_redirect. Returns 0 or a negative error.
 */
static __always_inline int mg_tunnel_encap(struct __sk_buff *skb, const struct mg_pkt *p,
					   __be32 src, __be32 dst)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_tunnel_hdr h = {};
	struct iphdr ip = {};
	struct ethhdr *eth = data;
	struct iphdr *inner = data + ETH_HLEN;
	__u32 tot = skb->len - ETH_HLEN + MG_TUNNEL_HLEN; /* outer IPv4 total length */

	if ((void *)(eth + 1) > data_end || (void *)(inner + 1) > data_end)
		return -1;
	/* Only a GSO packet can be longer than an IPv4 packet: its segments' outer lengths are
	 * written when it is segmented. */
	if (tot > 0xffff) {
		if (!skb->gso_size)
			return -1;
		tot = 0xffff;
	}
	__builtin_memcpy(&h.eth, eth, sizeof(h.eth));
	ip.version = 4;
	ip.ihl = 5;
	ip.tos = inner->tos;
	ip.tot_len = bpf_htons((__u16)tot);
	ip.frag_off = bpf_htons(MG_IP_DF);
	ip.ttl = MG_TUNNEL_TTL;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = src;
	ip.daddr = dst;
	ip.check = mg_ip_hdr_csum(&ip);
	h.ip = ip;
	h.udp.source = mg_tunnel_sport(p);
	h.udp.dest = bpf_htons(MG_TUNNEL_PORT);
	h.udp.len = bpf_htons((__u16)(tot - sizeof(struct iphdr)));
	h.udp.check = 0; /* RFC 7348: zero over IPv4; the inner packet has its own */
	h.vxlan.flags = bpf_htonl(MG_VXLAN_F_VNI);
	h.vxlan.vni = bpf_htonl(MG_TUNNEL_VNI << 8);

	if (bpf_skb_adjust_room(skb, MG_TUNNEL_HLEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
				    BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
				    BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr))))
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM);
}

/*
 * The route of a packet about to leave (IPv4 from `saddr` to `daddr`, `len` bytes of L3 once it
 * leaves): bpf_fib_lookup from the ingress perspective of the interface the packet is on. The
 * length is checked against the route's MTU, except for a GSO packet, which the kernel segments
 * to fit (encapsulation shrinks its gso_size by the tunnel header): with `tot_len` set the helper
 * would compare the whole GSO packet. Returns a BPF_FIB_LKUP_RET_* code; `fib->mtu_result` holds
 * the MTU after BPF_FIB_LKUP_RET_FRAG_NEEDED.
 */
static __always_inline long mg_route(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				     __be32 saddr, __be32 daddr, __u32 len)
{
	fib->family = MG_AF_INET;
	fib->tot_len = skb->gso_size ? 0 : (len > 0xffff ? 0xffff : (__u16)len);
	fib->ifindex = skb->ifindex;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/*
 * Sends a packet along the route mg_route found (`rc` its result): MACs from the FIB and
 * bpf_redirect to the egress interface; without a neighbour entry, bpf_redirect_neigh has the
 * kernel resolve the next hop. Returns a TC verdict.
 */
static __always_inline int mg_route_out(struct __sk_buff *skb, const struct bpf_fib_lookup *fib,
					long rc)
{
	struct bpf_redir_neigh nh = {};
	void *data, *data_end;
	struct ethhdr *eth;

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		if ((void *)(eth + 1) > data_end)
			return mg_drop(MG_DROP_SHORT);
		__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		nh.nh_family = MG_AF_INET;
		nh.ipv4_nh = fib->ipv4_dst; /* the gateway, or the destination when on link */
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return mg_drop(MG_DROP_TOO_BIG);
	return mg_drop(MG_DROP_FIB);
}

/* Forwards the packet (IPv4 from `saddr` to `daddr`) to its next hop. A TC verdict. */
static __always_inline int mg_fib_redirect(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct bpf_fib_lookup fib = {};
	long rc = mg_route(skb, &fib, saddr, daddr, skb->len - ETH_HLEN);

	return mg_route_out(skb, &fib, rc);
}

/* The WireGuard device that reaches node `node` (its mg_routes entry is MG_RT_F_WIREGUARD), or 0
 * when the tunnel to it goes over the underlay in the clear. */
static __always_inline __u32 mg_wireguard_to(__be32 node)
{
	struct mg_route_key k = {.prefixlen = MG_RT_PREFIX_MAX, .addr = node};
	struct mg_route_val *r = bpf_map_lookup_elem(&mg_routes, &k);

	return r && (r->flags & MG_RT_F_WIREGUARD) ? r->ifindex : 0;
}

/* The answer of a too-big packet: ICMP "fragmentation needed" with what is left of a path of
 * `path_mtu` bytes inside the tunnel. */
static __always_inline int mg_tunnel_too_big(struct __sk_buff *skb, struct mg_pkt *p, __be32 src,
					     __u32 path_mtu)
{
	__u16 mtu =
	    path_mtu > MG_TUNNEL_HLEN + MG_IP_MIN_MTU ? path_mtu - MG_TUNNEL_HLEN : MG_IP_MIN_MTU;

	return mg_icmp_too_big(skb, p, src, mtu);
}

/*
 * Whether the packet fits the WireGuard device `ifindex` once encapsulated: the MTU that counts is
 * the device's (wireguardMTU). A non-GSO packet must fit with the tunnel header; a GSO packet's
 * segments keep their size once encapsulated (bpf_skb_adjust_room shrinks gso_size by the
 * header), so each of them must fit as it is. Returns 0 when it fits, the device's MTU when it
 * does not, a negative error when there is no such device. A subprogram (not inlined): inlined,
 * it made clang keep pointers into the context in registers, which the verifier refuses.
 */
static __attribute__((noinline)) long mg_wireguard_mtu(struct __sk_buff *skb, __u32 ifindex)
{
	__u32 mtu = 0;
	long rc;

	if (skb->gso_size) {
		rc = bpf_check_mtu(skb, ifindex, &mtu, 0, BPF_MTU_CHK_SEGS);
	} else {
		mtu = skb->len - ETH_HLEN + MG_TUNNEL_HLEN; /* the outer L3 length */
		rc = bpf_check_mtu(skb, ifindex, &mtu, 0, 0);
	}
	if (rc == BPF_MTU_CHK_RET_SUCCESS)
		return 0;
	if (rc == BPF_MTU_CHK_RET_FRAG_NEEDED || rc == BPF_MTU_CHK_RET_SEGS_TOOBIG)
		return mtu ? mtu : 1;
	return -1;
}

/* What a decrypted packet of our tunnel starts with on the WireGuard device (no Ethernet). */
struct mg_wg_tunnel_head {
	struct iphdr ip;
	struct udphdr udp;
	struct mg_tunnel_tail tail;
} __attribute__((packed));

/*
 * TC ingress of the WireGuard device (an L3 device: packets start with the IPv4 header). Our
 * tunnel from another node, decrypted, is given the Ethernet header it would have had on the
 * underlay (from a FIB lookup of the sending node in the main table: the underlay interface, its
 * MAC as destination, the sender's as source) and re-injected into that interface's ingress,
 * where mg_from_hep decapsulates it. Everything else (pod traffic) continues untouched.
 */
static __always_inline int mg_wireguard_ingress(struct __sk_buff *skb)
{
	struct mg_wg_tunnel_head h;
	struct bpf_fib_lookup fib = {};
	struct mg_node_cfg *cfg;
	struct ethhdr eth;
	long rc;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, 0, &h, sizeof(h)))
		return TC_ACT_OK;
	if (h.ip.version != 4 || h.ip.ihl != 5 || h.ip.protocol != IPPROTO_UDP ||
	    h.udp.dest != bpf_htons(MG_TUNNEL_PORT))
		return TC_ACT_OK;
	cfg = mg_node_cfg_get();
	if (!cfg || !cfg->node_ip || h.ip.daddr != cfg->node_ip)
		return TC_ACT_OK;
	if (!(h.tail.vxlan.flags & bpf_htonl(MG_VXLAN_F_VNI)) ||
	    h.tail.vxlan.vni != bpf_htonl(MG_TUNNEL_VNI << 8))
		return TC_ACT_OK;

	/* The main table only (DIRECT): with host encryption WireGuard's own table would route
	 * the sending node into this very device. */
	fib.family = MG_AF_INET;
	fib.ifindex = skb->ifindex;
	fib.ipv4_src = cfg->node_ip;
	fib.ipv4_dst = h.ip.saddr;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_DIRECT);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex == skb->ifindex)
		return mg_drop(MG_DROP_FIB);
	__builtin_memcpy(eth.h_dest, fib.smac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, fib.dmac, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_change_head(skb, ETH_HLEN, 0) ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
		return mg_drop(MG_DROP_ENCAP);
	return bpf_redirect(fib.ifindex, BPF_F_INGRESS);
}

/*
 * Sends the packet in the tunnel from this node (`src`) to node `dst`, SNATed first to
 * (`snat_addr`, `snat_port`) when `snat_addr` is not 0 (a reply on the backend node). The route
 * of the encapsulated packet is looked up before anything is rewritten, so that a packet that
 * will not fit is answered as its sender sent it, with ICMP "fragmentation needed" carrying the
 * MTU left inside the tunnel. Returns a TC verdict.
 */
static __always_inline int mg_tunnel_send(struct __sk_buff *skb, struct mg_pkt *p, __be32 src,
					  __be32 dst, __be32 snat_addr, __be16 snat_port)
{
	struct bpf_fib_lookup fib = {};
	__u32 wg_ifindex = mg_wireguard_to(dst);
	__u32 too_big = 0; /* the path's MTU when the packet will not fit */
	long rc = 0;

	if (wg_ifindex) {
		rc = mg_wireguard_mtu(skb, wg_ifindex);
		if (rc < 0)
			return mg_drop(
			    MG_DROP_FIB); /* the device is gone: the agent updates the map */
		too_big = (__u32)rc;
	} else {
		rc = mg_route(skb, &fib, src, dst, skb->len - ETH_HLEN + MG_TUNNEL_HLEN);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			too_big = fib.mtu_result;
		else if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
			return mg_drop(MG_DROP_FIB);
	}
	if (too_big)
		return mg_tunnel_too_big(skb, p, src, too_big);
	if (snat_addr && mg_rewrite(skb, p, MG_REWRITE_SRC, snat_addr, snat_port))
		return mg_drop(MG_DROP_NAT_WRITE);
	if (mg_tunnel_encap(skb, p, src, dst))
		return mg_drop(MG_DROP_ENCAP);
	/* Into WireGuard: the kernel strips the Ethernet header for the L3 device, whose TUN or
	 * kernel driver encrypts to the node the outer destination belongs to. */
	if (wg_ifindex)
		return bpf_redirect(wg_ifindex, 0);
	return mg_route_out(skb, &fib, rc);
}

#endif /* MARGAY_LIB_TUNNEL_H */
