/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rejecting a new flow to a frontend without endpoints as kube-proxy's REJECT rules do: a TCP
 * segment is answered with a RST, sent back out of the interface it came in on, so the client
 * gets "connection refused" at once instead of retrying into a black hole; a UDP datagram is
 * answered with ICMP port unreachable, which the client's socket reports as ECONNREFUSED.
 *
 * A packet too big for the tunnel (with DF) is answered with ICMP "fragmentation needed"
 * (RFC 1191), so that its sender lowers its path MTU instead of retrying into a black hole.
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

#include "counters.h"
#include "csum.h"
#include "parse.h"

#define MG_IP_DF_BIT 0x4000 /* in the host-order frag_off word */

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

/* An ICMP error as built here: IPv4, ICMP, and the quoted packet's IPv4 header (without
 * options) and first 8 bytes of its payload (RFC 792). `mtu` is 0 but for "fragmentation
 * needed" (RFC 1191). */
struct mg_icmp_answer {
	struct iphdr ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__be16 unused;
	__be16 mtu;
	__u8 quote[sizeof(struct iphdr) + 8];
} __attribute__((packed, aligned(4)));

#define MG_ICMP_ANSWER_LEN    ((__u32)sizeof(struct mg_icmp_answer))
#define MG_IP_TOS_INETCONTROL 0xc0
#define MG_ICMP_DEST_UNREACH  3 /* <linux/icmp.h> pulls in libc headers */
#define MG_ICMP_PORT_UNREACH  3
#define MG_ICMP_FRAG_NEEDED   4

/*
 * Turns the packet described by `p` (an IPv4 header without options at ETH_HLEN) into the ICMP
 * "destination unreachable" with `code` (and `mtu` for "fragmentation needed") that answers it,
 * from `src` to its sender, quoting its IPv4 header and first 8 payload bytes as it arrived, and
 * sends it back out of the interface it came in on (MACs swapped). Returns a TC verdict
 * (TC_ACT_REDIRECT, or TC_ACT_SHOT when the packet cannot be rewritten).
 */
static __always_inline int mg_icmp_answer(struct __sk_buff *skb, const struct mg_pkt *p, __be32 src,
					  __u8 code, __u16 mtu)
{
	struct mg_icmp_answer m = {};
	struct iphdr ip = {};
	const __u16 *w;
	struct ethhdr *eth;
	void *data, *data_end;
	__u8 mac[ETH_ALEN];
	__u32 sum = 0;

	if (p->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, m.quote, sizeof(m.quote)))
		return TC_ACT_SHOT;

	ip.version = 4;
	ip.ihl = 5;
	ip.tos = MG_IP_TOS_INETCONTROL;
	ip.tot_len = bpf_htons(MG_ICMP_ANSWER_LEN);
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = src;
	ip.daddr = p->saddr;
	ip.check = mg_ip_hdr_csum(&ip);
	m.ip = ip;
	m.type = MG_ICMP_DEST_UNREACH;
	m.code = code;
	m.mtu = bpf_htons(mtu);
	w = (const __u16 *)((const __u8 *)&m + sizeof(struct iphdr));
#pragma unroll
	for (int i = 0; i < (int)((MG_ICMP_ANSWER_LEN - sizeof(struct iphdr)) / 2); i++)
		sum += w[i];
	m.check = (__u16)~mg_csum_fold(sum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + MG_ICMP_ANSWER_LEN, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &m, sizeof(m), 0))
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * Answers the packet described by `p`, which will not fit a path of `mtu` bytes, with ICMP
 * "fragmentation needed" from `src`, back out of the interface it came in on (MACs swapped). A
 * packet without DF, or with IPv4 options, is only dropped. Counts MG_DROP_TOO_BIG either way.
 * Returns a TC verdict.
 */
static __always_inline int mg_icmp_too_big(struct __sk_buff *skb, const struct mg_pkt *p,
					   __be32 src, __u16 mtu)
{
	__u8 frag_hi;

	if (p->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return mg_drop(MG_DROP_TOO_BIG);
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag_hi, 1) || !(frag_hi & (MG_IP_DF_BIT >> 8)))
		return mg_drop(MG_DROP_TOO_BIG);
	mg_count(MG_DROP_TOO_BIG);
	return mg_icmp_answer(skb, p, src, MG_ICMP_FRAG_NEEDED, mtu);
}

/*
 * Refuses a UDP datagram to a frontend without endpoints as kube-proxy's REJECT does: ICMP port
 * unreachable from the frontend the client addressed (so its socket matches it and reports
 * ECONNREFUSED). A datagram with IPv4 options is only dropped. A TC verdict.
 */
static __always_inline int mg_reject_udp(struct __sk_buff *skb, const struct mg_pkt *p)
{
	return mg_icmp_answer(skb, p, p->daddr, MG_ICMP_PORT_UNREACH, 0);
}

#endif /* MARGAY_LIB_REJECT_H */
