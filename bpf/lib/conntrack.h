/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Conntrack: normalised keys, lookup, per-leg state updates, and creation of the NAT pair.
 * See docs/design/conntrack.md for the model.
 */
#ifndef MARGAY_LIB_CONNTRACK_H
#define MARGAY_LIB_CONNTRACK_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"

/*
 * Fills `k` with the normalised key of the tuple (s:sp -> d:dp). Returns true when the source
 * endpoint is the key's `b` side (the tuple was swapped).
 */
static __always_inline bool mg_ct_key_fill(struct mg_ct_key *k, __u8 proto, __be32 s, __be16 sp,
					   __be32 d, __be16 dp)
{
	bool src_is_b = s > d || (s == d && sp > dp);

	k->proto = proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
	if (src_is_b) {
		k->addr_a = d;
		k->port_a = dp;
		k->addr_b = s;
		k->port_b = sp;
	} else {
		k->addr_a = s;
		k->port_a = sp;
		k->addr_b = d;
		k->port_b = dp;
	}
	return src_is_b;
}

/* MG_TCPF_* (wire bits) -> MG_CT_TCP_* (conntrack bits). */
static __always_inline __u8 mg_ct_tcp_bits(__u8 raw)
{
	__u8 bits = 0;

	if (raw & MG_TCPF_SYN)
		bits |= MG_CT_TCP_SYN;
	if (raw & MG_TCPF_ACK)
		bits |= MG_CT_TCP_ACK;
	if (raw & MG_TCPF_FIN)
		bits |= MG_CT_TCP_FIN;
	if (raw & MG_TCPF_RST)
		bits |= MG_CT_TCP_RST;
	return bits;
}

/*
 * Records a packet on an entry: time, and TCP flags on the leg it came from. Flags are only
 * written when new, so that an established flow's cache line is not dirtied by every packet on
 * every CPU more than the timestamp needs.
 */
static __always_inline void mg_ct_seen(struct mg_ct_val *v, bool from_b, __u8 ct_tcp, __u64 now)
{
	v->last_seen_ns = now;
	if (from_b) {
		if ((v->tcp_b & ct_tcp) != ct_tcp)
			v->tcp_b |= ct_tcp;
	} else {
		if ((v->tcp_a & ct_tcp) != ct_tcp)
			v->tcp_a |= ct_tcp;
	}
}

/*
 * Creates the two entries of a NATed flow: the forward entry keyed by (client, frontend) and the
 * reverse entry keyed by (client, backend). The reverse entry is written first so that a forward
 * entry never points at a missing reverse entry. `tun_addr` is the ingress node of a flow that
 * came in the tunnel (with MG_CT_F_FROM_TUNNEL in `extra_flags`), else 0. Returns 0 or a negative
 * error.
 */
static __always_inline bool mg_ct_key_eq(const struct mg_ct_key *a, const struct mg_ct_key *b)
{
	return a->proto == b->proto && a->addr_a == b->addr_a && a->addr_b == b->addr_b &&
	       a->port_a == b->port_a && a->port_b == b->port_b;
}

/*
 * Port SNAT (bpfPSNATPorts): the reverse key (client, backend) of a new flow whose forward key is
 * `fwd_key` belongs to another flow: two ingress nodes (or two frontends) sent the same client
 * address and port to this backend. Tries MG_PSNAT_TRIES random ports of the configured range for
 * one whose reverse key is free and fills `rev_key` with it. Returns the port (be), 0 if none.
 */
static __always_inline __be16 mg_psnat_pick(const struct mg_pkt *p, __be32 be_addr, __be16 be_port,
					    struct mg_ct_key *rev_key)
{
	struct mg_node_cfg *cfg = mg_node_cfg_get();
	__u32 first, n;
	__be16 port;

	if (!cfg || !cfg->psnat_first || cfg->psnat_last < cfg->psnat_first)
		return 0;
	first = cfg->psnat_first;
	n = (__u32)cfg->psnat_last - first + 1;
#pragma unroll
	for (int i = 0; i < MG_PSNAT_TRIES; i++) {
		port = bpf_htons((__u16)(first + bpf_get_prandom_u32() % n));
		mg_ct_key_fill(rev_key, p->proto, p->saddr, port, be_addr, be_port);
		if (!bpf_map_lookup_elem(&mg_ct, rev_key))
			return port;
	}
	return 0;
}

/* The TCP flags an entry saw on the client's (`client`) or the server's leg. */
static __always_inline __u8 mg_ct_leg(const struct mg_ct_val *v, bool client)
{
	bool client_is_b = v->flags & MG_CT_F_CLIENT_IS_B;

	return client == client_is_b ? v->tcp_b : v->tcp_a;
}

/*
 * Whether the TCP flow owning entry `v` is over: a RST, or a FIN from each side, seen on either
 * entry of its pair (each entry may see only some legs). Its entries linger until the agent's
 * conntrack scan expires them (30 s after the FINs), but a new flow may take over its tuple at
 * once, as the kernel's conntrack reopens a TIME_WAIT entry on a SYN: a client that reuses its
 * port for another frontend of the same backend (NodePort, then the LoadBalancer IP) must not
 * need a bpfPSNATPorts port, and with the range busy or unset it would be dropped.
 */
static __always_inline bool mg_ct_tcp_pair_closed(const struct mg_ct_val *v)
{
	__u8 client = mg_ct_leg(v, true), server = mg_ct_leg(v, false);
	struct mg_ct_val *peer = bpf_map_lookup_elem(&mg_ct, &v->peer);

	if (peer) {
		client |= mg_ct_leg(peer, true);
		server |= mg_ct_leg(peer, false);
	}
	if ((client | server) & MG_CT_TCP_RST)
		return true;
	return (client & MG_CT_TCP_FIN) && (server & MG_CT_TCP_FIN);
}

static __always_inline int mg_ct_create_nat(const struct mg_pkt *p, __be32 be_addr, __be16 be_port,
					    __u32 svc_id, __u8 extra_flags, __be32 tun_addr,
					    __u64 now, __be16 *psnat_port)
{
	struct mg_ct_key fwd_key, rev_key;
	struct mg_ct_val fwd = {}, rev = {};
	struct mg_ct_val *taken;
	bool client_b_fwd, client_b_rev;
	__u8 ct_tcp = mg_ct_tcp_bits(p->tcp_flags);
	__be16 cport = p->sport;
	int err;

	client_b_fwd = mg_ct_key_fill(&fwd_key, p->proto, p->saddr, p->sport, p->daddr, p->dport);
	client_b_rev = mg_ct_key_fill(&rev_key, p->proto, p->saddr, p->sport, be_addr, be_port);
	/* (client, backend) held by another flow (an orphan of this very flow is overwritten). */
	taken = bpf_map_lookup_elem(&mg_ct, &rev_key);
	if (taken && !mg_ct_key_eq(&taken->peer, &fwd_key) && p->proto == IPPROTO_TCP &&
	    mg_ct_tcp_pair_closed(taken)) {
		/* A finished flow's tuple: the new pair takes it, the old forward entry goes (a late
		 * packet of the old flow then finds no state, as after its expiry). */
		struct mg_ct_key old_fwd = taken->peer;

		bpf_map_delete_elem(&mg_ct, &old_fwd);
		taken = NULL;
	}
	if (taken && !mg_ct_key_eq(&taken->peer, &fwd_key)) {
		cport = mg_psnat_pick(p, be_addr, be_port, &rev_key);
		if (!cport)
			return -1;
		client_b_rev =
		    mg_ct_key_fill(&rev_key, p->proto, p->saddr, cport, be_addr, be_port);
		fwd.psnat_port = cport;
		rev.psnat_port = p->sport;
	}
	*psnat_port = fwd.psnat_port;

	rev.created_ns = now;
	rev.last_seen_ns = now;
	rev.kind = MG_CT_NAT_REV;
	rev.flags = extra_flags | (client_b_rev ? MG_CT_F_CLIENT_IS_B : 0);
	rev.svc_id = svc_id;
	rev.peer = fwd_key;
	rev.nat_addr = p->daddr;
	rev.nat_port = p->dport;
	rev.tun_addr = tun_addr;

	fwd.created_ns = now;
	fwd.last_seen_ns = now;
	fwd.kind = MG_CT_NAT_FWD;
	fwd.flags = extra_flags | (client_b_fwd ? MG_CT_F_CLIENT_IS_B : 0);
	if (client_b_fwd)
		fwd.tcp_b = ct_tcp;
	else
		fwd.tcp_a = ct_tcp;
	fwd.svc_id = svc_id;
	fwd.peer = rev_key;
	fwd.nat_addr = be_addr;
	fwd.nat_port = be_port;
	fwd.tun_addr = tun_addr;

	err = bpf_map_update_elem(&mg_ct, &rev_key, &rev, BPF_ANY);
	if (err)
		return err;
	return bpf_map_update_elem(&mg_ct, &fwd_key, &fwd, BPF_ANY);
}

/*
 * Creates the entry of an external flow that this (ingress) node sends in the tunnel to the
 * backend's node `node`: one entry keyed by (client, frontend), no NAT, no peer. Both directions
 * of the flow find it (the replies come back in the tunnel with the frontend as source).
 */
static __always_inline int mg_ct_create_tunnel(const struct mg_pkt *p, __be32 node, __u32 svc_id,
					       __u8 extra_flags, __u64 now)
{
	struct mg_ct_key key;
	struct mg_ct_val v = {};
	bool client_b = mg_ct_key_fill(&key, p->proto, p->saddr, p->sport, p->daddr, p->dport);
	__u8 ct_tcp = mg_ct_tcp_bits(p->tcp_flags);

	v.created_ns = now;
	v.last_seen_ns = now;
	v.kind = MG_CT_TUNNEL;
	v.flags = extra_flags | (client_b ? MG_CT_F_CLIENT_IS_B : 0);
	if (client_b)
		v.tcp_b = ct_tcp;
	else
		v.tcp_a = ct_tcp;
	v.svc_id = svc_id;
	v.tun_addr = node;
	return bpf_map_update_elem(&mg_ct, &key, &v, BPF_ANY);
}

#endif /* MARGAY_LIB_CONNTRACK_H */
