/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rejecting a new flow to a frontend without endpoints as kube-proxy's REJECT rules do: a TCP
 * segment is answered with a RST, sent back out of the interface it came in on, so the client
 * gets "connection refused" at once instead of retrying into a black hole.
 * (UDP's ICMP port unreachable needs a larger packet: not yet.)
 */
#ifndef MARGAY_LIB_REJECT_H
#define MARGAY_LIB_REJECT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "csum.h"
#include "parse.h"

struct mg_pseudo_hdr {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/* The 16-bit header checksum after replacing the 16-bit word `from` with `to` (RFC 1624). */
static __always_inline __u16 mg_csum16_update(__u16 check, __be16 from, __be16 to)
{
	__u32 sum = (__u16)~check;

	sum += (__u16)~from + (__u16)to;
	return (__u16)~mg_csum_fold(sum);
}

/*
 * Turns the TCP segment described by `p` into the RST that answers it (RFC 9293 3.10.7.1: with
 * the segment's ACK number as sequence if it had one, else sequence 0 and an ACK of everything
 * it carried), addressed back to its sender, and redirects it out of the interface it arrived
 * on. Returns TC_ACT_REDIRECT, or TC_ACT_SHOT when the packet cannot be rewritten.
 */
static __always_inline int mg_reject_tcp(struct __sk_buff *skb, const struct mg_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_pseudo_hdr ph = {};
	struct tcphdr in, th = {};
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u8 mac[ETH_ALEN];
	__u32 ip_hlen = p->l4_off - p->l3_off;
	__u32 seg_len;
	__be16 old_tot;
	__s64 sum;

	ip = data + p->l3_off;
	tcp = data + p->l4_off;
	if ((void *)(ip + 1) > data_end || (void *)(tcp + 1) > data_end)
		return TC_ACT_SHOT;
	in = *tcp;
	old_tot = ip->tot_len;
	seg_len = bpf_ntohs(old_tot);
	if (seg_len < ip_hlen + in.doff * 4)
		return TC_ACT_SHOT;
	seg_len = seg_len - ip_hlen - in.doff * 4 + in.syn + in.fin;

	th.source = p->dport;
	th.dest = p->sport;
	th.doff = sizeof(th) / 4;
	th.rst = 1;
	if (in.ack) {
		th.seq = in.ack_seq;
	} else {
		th.ack = 1;
		th.ack_seq = bpf_htonl(bpf_ntohl(in.seq) + seg_len);
	}
	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(th));
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&th, sizeof(th), (__u32)sum);
	th.check = (__u16)~mg_csum_fold((__u32)sum);

	/* Keep the headers only: Ethernet + IP (with its options) + a bare TCP header. */
	if (bpf_skb_change_tail(skb, p->l4_off + sizeof(th), 0))
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip = data + p->l3_off;
	tcp = data + p->l4_off;
	if ((void *)(eth + 1) > data_end || (void *)(ip + 1) > data_end ||
	    (void *)(tcp + 1) > data_end)
		return TC_ACT_SHOT;

	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	/* Swapping the addresses leaves the header checksum as it is; the length changes it. */
	ip->saddr = p->daddr;
	ip->daddr = p->saddr;
	ip->tot_len = bpf_htons(ip_hlen + sizeof(th));
	ip->check = mg_csum16_update(ip->check, old_tot, ip->tot_len);

	*tcp = th;
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* MARGAY_LIB_REJECT_H */
