/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing for TC programs: Ethernet, IPv4, and the TCP/UDP ports. The result is a small
 * struct of offsets and tuple fields, so later steps work on offsets (packet pointers are
 * invalidated by every helper that rewrites the packet).
 */
#ifndef MARGAY_LIB_PARSE_H
#define MARGAY_LIB_PARSE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"

#define MG_IP_MF     0x2000
#define MG_IP_OFFSET 0x1fff

/* Raw TCP flag bits (byte 13 of the TCP header). */
#define MG_TCPF_FIN 0x01
#define MG_TCPF_SYN 0x02
#define MG_TCPF_RST 0x04
#define MG_TCPF_ACK 0x10

struct mg_pkt {
	__u32 l3_off;	/* offset of the IPv4 header from skb->data */
	__u32 l4_off;	/* offset of the TCP/UDP header from skb->data */
	__be32 saddr;	/* be */
	__be32 daddr;	/* be */
	__be16 sport;	/* be */
	__be16 dport;	/* be */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP (IPPROTO_ICMP for MG_PARSE_ICMP) */
	__u8 tcp_flags; /* raw TCP flags byte (MG_TCPF_*), 0 for UDP */
	__u8 pad[2];
};

enum mg_parse_result {
	MG_PARSE_OK = 0,   /* an unfragmented IPv4 TCP or UDP packet: p is filled in */
	MG_PARSE_PASS = 1, /* not ours (not IPv4, other protocol, fragment): leave it alone */
	MG_PARSE_DROP = 2, /* malformed: drop and count MG_DROP_SHORT */
	MG_PARSE_ICMP = 3, /* an unfragmented ICMP packet: p has the addresses and offsets only */
};

/*
 * skb->data and skb->data_end, loaded straight from the context register. Plain C lets clang keep
 * `&skb->data` (ctx + 76) in a register or on the stack across the program, and the verifier
 * refuses a load through a modified context pointer; the asm pins the load to `ctx + offset`.
 */
static __always_inline void *mg_data(const struct __sk_buff *skb)
{
	void *d;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(d)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return d;
}

static __always_inline void *mg_data_end(const struct __sk_buff *skb)
{
	void *d;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(d)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return d;
}

/* Headers we need in the linear area: Ethernet + the largest IPv4 header + the TCP header up to
 * and including its checksum. */
#define MG_PARSE_PULL_LEN (ETH_HLEN + 60 + 20)

static __always_inline int mg_parse_ipv4(struct __sk_buff *skb, struct mg_pkt *p)
{
	void *data = mg_data(skb);
	void *data_end = mg_data_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl_len;
	__u32 l4_min;

	if ((void *)(eth + 1) > data_end)
		return MG_PARSE_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return MG_PARSE_PASS;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end) {
		/* Headers not in the linear area: pull what we need, then look again. */
		if (bpf_skb_pull_data(skb,
				      MG_PARSE_PULL_LEN < skb->len ? MG_PARSE_PULL_LEN : skb->len))
			return MG_PARSE_DROP;
		data = mg_data(skb);
		data_end = mg_data_end(skb);
		ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return MG_PARSE_DROP;
	}
	if (ip->ihl < 5 || ip->version != 4)
		return MG_PARSE_DROP;
	if (ip->frag_off & bpf_htons(MG_IP_MF | MG_IP_OFFSET))
		return MG_PARSE_PASS;
	ihl_len = ip->ihl * 4;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP) {
		/* ICMP may be an error about one of our flows (lib/icmp.h); the caller decides. */
		if (ip->protocol != IPPROTO_ICMP)
			return MG_PARSE_PASS;
		p->l3_off = ETH_HLEN;
		p->l4_off = ETH_HLEN + ihl_len;
		p->saddr = ip->saddr;
		p->daddr = ip->daddr;
		p->proto = IPPROTO_ICMP;
		return MG_PARSE_ICMP;
	}

	l4_min = ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + ihl_len;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;

	if (data + p->l4_off + l4_min > data_end) {
		if (bpf_skb_pull_data(skb,
				      MG_PARSE_PULL_LEN < skb->len ? MG_PARSE_PULL_LEN : skb->len))
			return MG_PARSE_DROP;
		data = mg_data(skb);
		data_end = mg_data_end(skb);
	}
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + p->l4_off;

		if ((void *)(tcp + 1) > data_end)
			return MG_PARSE_DROP;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = data + p->l4_off;

		if ((void *)(udp + 1) > data_end)
			return MG_PARSE_DROP;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->tcp_flags = 0;
	}
	return MG_PARSE_OK;
}

#endif /* MARGAY_LIB_PARSE_H */
