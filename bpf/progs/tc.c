// SPDX-License-Identifier: Apache-2.0
/*
 * TC entry programs (SEC("classifier"); attached with TCX where the kernel has it, clsact
 * otherwise). One body, specialised at compile time per hook:
 *
 *   mg_from_wl   pod veth, host side, TC ingress: packets leaving a pod
 *   mg_to_wl     pod veth, host side, TC egress: packets entering a pod
 *   mg_from_hep  host data interface, TC ingress: packets from outside the node
 *   mg_to_hep    host data interface, TC egress
 *   mg_from_tnl  tunnel device, TC ingress
 *   mg_to_tnl    tunnel device, TC egress
 *
 * Every packet costs one conntrack lookup. A hit is translated from the entry alone; a miss on a
 * "from" hook looks the destination up among the service frontends and, for a new flow, picks a
 * backend, creates the conntrack pair and applies DNAT.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"
#include "conntrack.h"
#include "counters.h"
#include "csum.h"
#include "log.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "reject.h"

enum mg_hook {
	MG_HOOK_FROM_WL,
	MG_HOOK_TO_WL,
	MG_HOOK_FROM_HEP,
	MG_HOOK_TO_HEP,
	MG_HOOK_FROM_TNL,
	MG_HOOK_TO_TNL,
};

/* Hooks where a packet can open a new service flow. */
static __always_inline bool mg_hook_opens_flows(enum mg_hook hook)
{
	return hook == MG_HOOK_FROM_WL || hook == MG_HOOK_FROM_HEP || hook == MG_HOOK_FROM_TNL;
}

/* Clients seen on this hook are external (externalTrafficPolicy applies, not internal). */
static __always_inline bool mg_hook_external(enum mg_hook hook)
{
	return hook == MG_HOOK_FROM_HEP;
}

static __always_inline int mg_drop(__u32 reason)
{
	mg_count(reason);
	return TC_ACT_SHOT;
}

/* A conntrack hit: translate according to the entry type and the packet's direction. */
static __always_inline int mg_ct_hit(struct __sk_buff *skb, struct mg_pkt *p, struct mg_ct_val *v,
				     bool src_is_b, __u64 now)
{
	bool from_client = src_is_b == !!(v->flags & MG_CT_F_CLIENT_IS_B);

	mg_ct_seen(v, src_is_b, mg_ct_tcp_bits(p->tcp_flags), now);

	if (v->kind == MG_CT_NAT_FWD && from_client) {
		/* client -> frontend: DNAT to the backend chosen at creation. */
		if (mg_rewrite(skb, p, MG_REWRITE_DST, v->nat_addr, v->nat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
	} else if (v->kind == MG_CT_NAT_REV && !from_client) {
		/* backend -> client: SNAT back to the frontend the client dialled. */
		if (mg_rewrite(skb, p, MG_REWRITE_SRC, v->nat_addr, v->nat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
	}
	/* Otherwise the packet was already translated at an earlier hook. */
	return TC_ACT_OK;
}

static __always_inline int mg_new_flow(struct __sk_buff *skb, struct mg_pkt *p, enum mg_hook hook,
				       __u64 now)
{
	struct mg_nat_fe_val *fe;
	struct mg_nat_be_val be;
	int reason;

	fe = mg_nat_fe_lookup(p->saddr, p->daddr, p->dport, p->proto);
	if (!fe)
		return TC_ACT_OK;

	/* A TCP packet of a flow we never saw start (opened before BPF took over, or our state was
	 * lost): leave it to the kernel's conntrack and the rules it was set up with. */
	if (p->proto == IPPROTO_TCP &&
	    (p->tcp_flags & (MG_TCPF_SYN | MG_TCPF_ACK | MG_TCPF_RST)) != MG_TCPF_SYN) {
		skb->mark |= MG_MARK_FALLTHROUGH;
		mg_count(MG_CNT_FALLTHROUGH);
		return TC_ACT_OK;
	}

	reason = mg_nat_pick_backend(fe, p->saddr, mg_hook_external(hook), now, &be);
	if (reason) {
		mg_debug("no backend svc %u reason %d", fe->svc_id, reason);
		mg_count(reason);
		/* No endpoints: refuse the connection as kube-proxy's REJECT does. */
		if (reason == MG_DROP_NO_BACKEND && p->proto == IPPROTO_TCP)
			return mg_reject_tcp(skb, p);
		return TC_ACT_SHOT;
	}
	if (mg_ct_create_nat(p, be.addr, be.port, fe->svc_id,
			     mg_hook_external(hook) ? MG_CT_F_EXTERNAL : 0, now))
		return mg_drop(MG_DROP_CT_CREATE);
	if (mg_rewrite(skb, p, MG_REWRITE_DST, be.addr, be.port))
		return mg_drop(MG_DROP_NAT_WRITE);
	mg_count(MG_CNT_NEW_FLOW);
	mg_debug("new flow svc %u -> %pI4:%u", fe->svc_id, &be.addr, bpf_ntohs(be.port));
	return TC_ACT_OK;
}

static __always_inline int mg_tc(struct __sk_buff *skb, enum mg_hook hook)
{
	struct mg_pkt p = {};
	struct mg_ct_key key;
	struct mg_ct_val *v;
	bool src_is_b;
	__u64 now;

	switch (mg_parse_ipv4(skb, &p)) {
	case MG_PARSE_OK:
		break;
	case MG_PARSE_DROP:
		return mg_drop(MG_DROP_SHORT);
	default:
		return TC_ACT_OK;
	}

	src_is_b = mg_ct_key_fill(&key, p.proto, p.saddr, p.sport, p.daddr, p.dport);
	v = bpf_map_lookup_elem(&mg_ct, &key);
	now = bpf_ktime_get_ns();
	if (v)
		return mg_ct_hit(skb, &p, v, src_is_b, now);
	if (!mg_hook_opens_flows(hook))
		return TC_ACT_OK;
	return mg_new_flow(skb, &p, hook, now);
}

SEC("classifier")
int mg_from_wl(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_FROM_WL);
}

SEC("classifier")
int mg_to_wl(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_TO_WL);
}

SEC("classifier")
int mg_from_hep(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_FROM_HEP);
}

SEC("classifier")
int mg_to_hep(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_TO_HEP);
}

SEC("classifier")
int mg_from_tnl(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_FROM_TNL);
}

SEC("classifier")
int mg_to_tnl(struct __sk_buff *skb)
{
	return mg_tc(skb, MG_HOOK_TO_TNL);
}

char LICENSE[] SEC("license") = "GPL";
