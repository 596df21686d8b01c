/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ICMP errors about NATed flows, translated back (RFC 5508 section 4: NAT behaviour for ICMP).
 *
 * An ICMP error (destination unreachable, e.g. port unreachable or fragmentation needed; time
 * exceeded; parameter problem) quotes the IPv4 header and at least 8 bytes of the packet that
 * caused it. When that packet belonged to a flow we translated, the error is about addresses the
 * other end never used: it is rewritten so that its receiver gets it about the packet it sent.
 * The quoted packet's tuple finds the flow's conntrack entry (one lookup, like any packet):
 *
 *   reverse entry, quoted packet from the client (an error from the backend's side about a
 *   DNATed packet client -> backend): the quoted destination becomes the frontend, and the
 *   outer source too when it was the backend itself (a router's address stays);
 *
 *   forward entry, quoted packet from the server (an error from the client's side about an
 *   SNATed reply frontend -> client): the quoted source becomes the backend, and the outer
 *   destination (the frontend, which the error was sent to) the backend.
 *
 * Checksums: the quoted IPv4 header's, the quoted UDP checksum when there is one (it lies in the
 * first 8 bytes), the ICMP checksum, and the outer IPv4 header's, all incrementally (RFC 1624).
 * Every change is compensated inside the checksum that covers it, so a CHECKSUM_COMPLETE skb's
 * sum stays right. A quoted TCP checksum (beyond the first 8 bytes, when the sender quoted more)
 * is left alone: receivers match errors on addresses, ports and sequence numbers only.
 *
 * Tunnel mode: on the ingress node a MG_CT_TUNNEL entry has no NAT: an error from the client's
 * side about a reply goes in the tunnel to the backend's node (which translates it with its
 * forward entry), an error that comes out of the tunnel (translated by the backend's node) is
 * forwarded to the client. On the backend's node an error from the pod's side about a tunnelled
 * flow is translated and sent back in the tunnel (or, in DSR mode, straight to the client).
 *
 * Not translated (passed as they are): errors with IPv4 options in the outer or the quoted
 * header, and errors quoting fewer than 8 bytes of the packet.
 */
#ifndef MARGAY_LIB_ICMP_H
#define MARGAY_LIB_ICMP_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "conntrack.h"
#include "counters.h"
#include "csum.h"
#include "maps.h"
#include "parse.h"
#include "reject.h"
#include "tunnel.h"

#define MG_ICMP_TIME_EXCEEDED 11
#define MG_ICMP_PARAMETERPROB 12

/* The headers of an ICMP error as far as translation needs them: outer IPv4 (no options), the
 * ICMP header, the quoted IPv4 header (no options) and the quoted ports and next 4 bytes (UDP:
 * length and checksum). */
struct mg_icmp_err {
	struct iphdr ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__be32 rest;
	struct iphdr in_ip;
	__be16 in_sport;
	__be16 in_dport;
	__be16 in_udp_len;
	__u16 in_udp_check;
} __attribute__((packed, aligned(4)));

/* The 16-bit checksum after replacing the 32-bit word `from` with `to`. */
static __always_inline __u16 mg_csum_upd32(__u16 check, __be32 from, __be32 to)
{
	return mg_ip_csum_update(check, from, to);
}

/*
 * Rewrites the quoted packet's source (`src_side`) or destination to `addr`:`port`, the outer
 * address that named the same endpoint, and every checksum that covers them.
 */
static __always_inline void mg_icmp_err_rewrite(struct mg_icmp_err *h, bool src_side, __be32 addr,
						__be16 port)
{
	__be32 old_addr = src_side ? h->in_ip.saddr : h->in_ip.daddr;
	__be16 old_port = src_side ? h->in_sport : h->in_dport;
	__u16 old_ip_check = h->in_ip.check;
	__u16 old_udp_check = h->in_udp_check;

	h->in_ip.check = mg_csum_upd32(h->in_ip.check, old_addr, addr);
	if (h->in_ip.protocol == IPPROTO_UDP && h->in_udp_check) {
		h->in_udp_check = mg_csum_upd32(h->in_udp_check, old_addr, addr);
		h->in_udp_check = mg_csum16_update(h->in_udp_check, old_port, port);
		if (!h->in_udp_check)
			h->in_udp_check = 0xffff;
	}
	h->check = mg_csum_upd32(h->check, old_addr, addr);
	h->check = mg_csum16_update(h->check, old_port, port);
	h->check = mg_csum16_update(h->check, old_ip_check, h->in_ip.check);
	h->check = mg_csum16_update(h->check, old_udp_check, h->in_udp_check);
	if (src_side) {
		h->in_ip.saddr = addr;
		h->in_sport = port;
		/* The error went to the quoted packet's source: it now goes to the new one. */
		if (h->ip.daddr == old_addr) {
			h->ip.check = mg_csum_upd32(h->ip.check, old_addr, addr);
			h->ip.daddr = addr;
		}
	} else {
		h->in_ip.daddr = addr;
		h->in_dport = port;
		/* From the quoted destination itself (not a router on the way): from the new one.
		 */
		if (h->ip.saddr == old_addr) {
			h->ip.check = mg_csum_upd32(h->ip.check, old_addr, addr);
			h->ip.saddr = addr;
		}
	}
}

/* What is not an error about a flow of ours: passed, unless it came out of the tunnel. */
static __always_inline int mg_icmp_not_ours(__be32 tun_src)
{
	return tun_src ? mg_drop(MG_DROP_TUNNEL_NO_FLOW) : TC_ACT_OK;
}

/* mg_icmp_error's answers beyond a TC verdict (0..255): what the caller must do with the packet,
 * with mg_icmp_forward. MG_ICMP_TO_TUNNEL is or-ed with the node to send it to (low 32 bits). */
#define MG_ICMP_TO_CLIENT (-1LL)      /* forward along the FIB to the outer destination */
#define MG_ICMP_TO_TUNNEL (1LL << 32) /* send in the tunnel to the node in the low 32 bits */

/*
 * An ICMP packet (the parser said MG_PARSE_ICMP; its IPv4 header at ETH_HLEN), `from_hep`
 * when it arrived on a host interface, `tun_src` the node it came from in the tunnel (0 if not).
 * Errors about our flows are translated in place as described above and everything else is
 * passed, except what came out of the tunnel and belongs to no flow (dropped: it means nothing
 * to this node). Returns a TC verdict or one of MG_ICMP_TO_*. The headers are copied out and
 * back (bpf_skb_load_bytes / store_bytes, flags 0: every change is checksum-neutral): direct
 * packet pointers here made clang keep `&skb->data` in a register, which the verifier refuses.
 */
static __always_inline __s64 mg_icmp_error(struct __sk_buff *skb, bool from_hep, __be32 tun_src,
					   struct mg_ct_key *key)
{
	struct mg_icmp_err hdrs;
	struct mg_icmp_err *h = &hdrs;
	struct mg_ct_val *v;
	bool src_is_b, from_client;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, h, sizeof(*h)))
		return mg_icmp_not_ours(tun_src);
	if (h->ip.ihl != 5)
		return mg_icmp_not_ours(tun_src);
	if (h->type != MG_ICMP_DEST_UNREACH && h->type != MG_ICMP_TIME_EXCEEDED &&
	    h->type != MG_ICMP_PARAMETERPROB)
		return mg_icmp_not_ours(tun_src);
	if (h->in_ip.ihl != 5 ||
	    (h->in_ip.protocol != IPPROTO_TCP && h->in_ip.protocol != IPPROTO_UDP))
		return mg_icmp_not_ours(tun_src);

	src_is_b = mg_ct_key_fill(key, h->in_ip.protocol, h->in_ip.saddr, h->in_sport,
				  h->in_ip.daddr, h->in_dport);
	v = bpf_map_lookup_elem(&mg_ct, key);
	if (!v)
		return mg_icmp_not_ours(tun_src);
	/* The quoted packet was sent by the flow's client. */
	from_client = src_is_b == !!(v->flags & MG_CT_F_CLIENT_IS_B);

	switch (v->kind) {
	case MG_CT_NAT_REV:
		if (!from_client)
			return TC_ACT_OK; /* already translated */
		mg_icmp_err_rewrite(h, false, v->nat_addr, v->nat_port);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, h, sizeof(*h), 0))
			return mg_drop(MG_DROP_NAT_WRITE);
		if ((v->flags & (MG_CT_F_FROM_TUNNEL | MG_CT_F_DSR)) == MG_CT_F_FROM_TUNNEL)
			return MG_ICMP_TO_TUNNEL | v->tun_addr;
		return TC_ACT_OK;
	case MG_CT_NAT_FWD:
		if (from_client)
			return TC_ACT_OK; /* already translated */
		mg_icmp_err_rewrite(h, true, v->nat_addr, v->nat_port);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, h, sizeof(*h), 0))
			return mg_drop(MG_DROP_NAT_WRITE);
		return TC_ACT_OK;
	case MG_CT_TUNNEL:
		/* Ingress node: from the client's side about a reply -> to the backend's node. */
		if (!from_client && from_hep && !tun_src)
			return MG_ICMP_TO_TUNNEL | v->tun_addr;
		/* Out of the tunnel, translated by the backend's node: to the client. */
		if (from_client && tun_src)
			return MG_ICMP_TO_CLIENT;
		return TC_ACT_OK;
	default:
		return mg_icmp_not_ours(tun_src);
	}
}

/*
 * Forwards an ICMP error mg_icmp_error translated: in the tunnel to `tun_dst` (from this node,
 * `node_ip`), or, with `tun_dst` 0, along the FIB to its destination. An ICMP error is at most
 * 576 bytes (RFC 1812): one that would not fit the tunnel is dropped (`too_big`), not answered.
 * Returns a TC verdict.
 */
static __always_inline int mg_icmp_forward(struct __sk_buff *skb, __be32 node_ip, __be32 tun_dst)
{
	struct bpf_fib_lookup fib = {};
	struct mg_pkt q = {.l3_off = ETH_HLEN, .l4_off = ETH_HLEN + sizeof(struct iphdr)};
	__be32 addrs[2];
	long rc;

	if (bpf_skb_load_bytes(skb, ETH_HLEN + MG_IP_SADDR_OFF, addrs, sizeof(addrs)))
		return mg_drop(MG_DROP_SHORT);
	q.saddr = addrs[0];
	q.daddr = addrs[1];
	q.proto = IPPROTO_ICMP;
	if (!tun_dst) {
		rc = mg_route(skb, &fib, q.saddr, q.daddr, skb->len - ETH_HLEN);
		return mg_route_out(skb, &fib, rc);
	}
	rc = mg_route(skb, &fib, node_ip, tun_dst, skb->len - ETH_HLEN + MG_TUNNEL_HLEN);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return mg_route_out(skb, &fib, rc);
	if (mg_tunnel_encap(skb, &q, node_ip, tun_dst))
		return mg_drop(MG_DROP_ENCAP);
	return mg_route_out(skb, &fib, rc);
}

#endif /* MARGAY_LIB_ICMP_H */
