/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rewriting an address and a port with incremental checksum updates (RFC 1624 through the
 * kernel's bpf_l3_csum_replace / bpf_l4_csum_replace, which also handle CHECKSUM_PARTIAL skbs).
 */
#ifndef MARGAY_LIB_CSUM_H
#define MARGAY_LIB_CSUM_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include <linux/ip.h>

#include "parse.h"

#define MG_IP_CSUM_OFF	10 /* offset of the checksum in the IPv4 header */
#define MG_IP_SADDR_OFF 12
#define MG_IP_DADDR_OFF 16
#define MG_TCP_CSUM_OFF 16 /* offset of the checksum in the TCP header */
#define MG_UDP_CSUM_OFF 6  /* offset of the checksum in the UDP header */

enum mg_rewrite_side {
	MG_REWRITE_SRC = 0,
	MG_REWRITE_DST = 1,
};

/* One's complement sum folded to 16 bits. */
static __always_inline __u16 mg_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The checksum of an IPv4 header without options, from scratch. */
static __always_inline __u16 mg_ip_hdr_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return (__u16)~mg_csum_fold(sum);
}

/*
 * The IPv4 header checksum after replacing the 32-bit word `from` with `to` (RFC 1624, eqn. 3:
 * HC' = ~(~HC + ~m + m')). One's complement arithmetic is byte-order independent, so the words
 * are summed as they lie in the packet.
 */
static __always_inline __u16 mg_ip_csum_update(__u16 check, __be32 from, __be32 to)
{
	__u32 sum = (__u16)~check;

	sum += (__u16) ~(__u16)from + (__u16) ~(__u16)(from >> 16);
	sum += (__u16)to + (__u16)(to >> 16);
	return (__u16)~mg_csum_fold(sum);
}

/*
 * Replaces the source or destination address and port of the packet described by `p` and fixes
 * the IPv4 header checksum and the TCP/UDP checksum (pseudo-header included). A UDP checksum of
 * zero (none) stays zero (BPF_F_MARK_MANGLED_0). Returns 0 or a negative error from a helper.
 * Updates p's tuple to the new values.
 *
 * The L4 checksum goes through bpf_l4_csum_replace, the only one that knows whether the skb's
 * checksum is CHECKSUM_PARTIAL (then only the pseudo-header part may change) or complete. The IP
 * header checksum, the address and the port are written directly: the parser made sure the
 * headers are in the linear area, and two helper calls cost more than the writes (see the
 * benchmark in docs/design/bpf-dataplane.md).
 */
static __always_inline int mg_rewrite(struct __sk_buff *skb, struct mg_pkt *p,
				      enum mg_rewrite_side side, __be32 new_addr, __be16 new_port)
{
	__u32 l4_csum_off = p->l4_off;
	__u64 l4_flags = 0;
	__be32 old_addr = side == MG_REWRITE_DST ? p->daddr : p->saddr;
	__be16 old_port = side == MG_REWRITE_DST ? p->dport : p->sport;
	void *data, *data_end;
	struct iphdr *ip;
	__be16 *ports;
	int err;

	if (p->proto == IPPROTO_TCP) {
		l4_csum_off += MG_TCP_CSUM_OFF;
	} else {
		l4_csum_off += MG_UDP_CSUM_OFF;
		l4_flags = BPF_F_MARK_MANGLED_0;
	}

	if (old_addr != new_addr) {
		err = bpf_l4_csum_replace(skb, l4_csum_off, old_addr, new_addr,
					  l4_flags | BPF_F_PSEUDO_HDR | sizeof(new_addr));
		if (err)
			return err;
	}
	if (old_port != new_port) {
		err = bpf_l4_csum_replace(skb, l4_csum_off, old_port, new_port,
					  l4_flags | sizeof(new_port));
		if (err)
			return err;
	}

	/* Helpers invalidate packet pointers: derive them again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + p->l3_off;
	ports = data + p->l4_off;
	if ((void *)(ip + 1) > data_end || (void *)(ports + 2) > data_end)
		return -1;

	if (side == MG_REWRITE_DST) {
		ip->check = mg_ip_csum_update(ip->check, old_addr, new_addr);
		ip->daddr = new_addr;
		ports[1] = new_port;
		p->daddr = new_addr;
		p->dport = new_port;
	} else {
		ip->check = mg_ip_csum_update(ip->check, old_addr, new_addr);
		ip->saddr = new_addr;
		ports[0] = new_port;
		p->saddr = new_addr;
		p->sport = new_port;
	}
	return 0;
}

#endif /* MARGAY_LIB_CSUM_H */
