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
 *   mg_from_wg   WireGuard device (L3), TC ingress: our tunnel, decrypted, back to the underlay
 *                interface's ingress (lib/tunnel.h); nothing else
 *
 * Every packet costs one conntrack lookup. A hit is translated from the entry alone; a miss on a
 * "from" hook looks the destination up among the service frontends and, for a new flow, picks a
 * backend, creates the conntrack pair and applies DNAT.
 *
 * Tunnel mode (external clients, backends on other nodes; lib/tunnel.h): `mg_from_hep` sends a
 * new external flow whose backend is on another node in the tunnel to that node, untranslated,
 * with one MG_CT_TUNNEL entry; it also receives the tunnel, decapsulates, and either forwards a
 * reply to its client or opens the flow on this node with a local backend.
 *
 * ICMP errors about a translated flow are translated back (lib/icmp.h); other ICMP passes.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"
#include "conntrack.h"
#include "counters.h"
#include "csum.h"
#include "icmp.h"
#include "log.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "reject.h"
#include "tunnel.h"

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

/*
 * A conntrack hit: translate according to the entry type and the packet's direction. `tun_src` is
 * the node that sent the packet through the tunnel (0 when it did not come through the tunnel).
 */
static __always_inline int mg_ct_hit(struct __sk_buff *skb, struct mg_pkt *p, struct mg_ct_val *v,
				     bool src_is_b, enum mg_hook hook, __be32 tun_src, __u64 now)
{
	bool from_client = src_is_b == !!(v->flags & MG_CT_F_CLIENT_IS_B);
	struct mg_node_cfg *cfg;

	mg_ct_seen(v, src_is_b, mg_ct_tcp_bits(p->tcp_flags), now);

	switch (v->kind) {
	case MG_CT_NAT_FWD:
		/* client -> frontend: DNAT to the backend chosen at creation (and the client's port
		 * to its port SNAT one, if it got one). */
		if (!from_client)
			return TC_ACT_OK;
		if (mg_rewrite(skb, p, MG_REWRITE_DST, v->nat_addr, v->nat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
		if (v->psnat_port && mg_rewrite(skb, p, MG_REWRITE_SRC, p->saddr, v->psnat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
		skb->mark |= MG_MARK_TRANSLATED;
		return TC_ACT_OK;
	case MG_CT_NAT_REV:
		if (from_client)
			return TC_ACT_OK;
		/* The client's own port back, under port SNAT. */
		if (v->psnat_port && mg_rewrite(skb, p, MG_REWRITE_DST, p->daddr, v->psnat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
		/* backend -> client: SNAT back to the frontend the client dialled. A flow that came
		 * in the tunnel: the reply goes back in it to the ingress node, which holds the
		 * client's flow (unless DSR: straight to the client). */
		if ((v->flags & (MG_CT_F_FROM_TUNNEL | MG_CT_F_DSR)) == MG_CT_F_FROM_TUNNEL) {
			cfg = mg_node_cfg_get();
			if (!cfg || !cfg->node_ip)
				return mg_drop(MG_DROP_ENCAP);
			return mg_tunnel_send(skb, p, cfg->node_ip, v->tun_addr, v->nat_addr,
					      v->nat_port);
		}
		if (mg_rewrite(skb, p, MG_REWRITE_SRC, v->nat_addr, v->nat_port))
			return mg_drop(MG_DROP_NAT_WRITE);
		skb->mark |= MG_MARK_TRANSLATED;
		return TC_ACT_OK;
	case MG_CT_TUNNEL:
		/* Ingress node: the client's packets go in the tunnel, untranslated. */
		if (from_client && hook == MG_HOOK_FROM_HEP && !tun_src) {
			cfg = mg_node_cfg_get();
			if (!cfg || !cfg->node_ip)
				return mg_drop(MG_DROP_ENCAP);
			return mg_tunnel_send(skb, p, cfg->node_ip, v->tun_addr, 0, 0);
		}
		/* The reply, out of the tunnel, already from the frontend: to the client. */
		if (!from_client && tun_src)
			return mg_fib_redirect(skb, p->saddr, p->daddr);
		return TC_ACT_OK;
	default:
		/* Otherwise the packet was already translated at an earlier hook. */
		return TC_ACT_OK;
	}
}

/* TCP that does not open a connection: a flow we never saw start. */
static __always_inline bool mg_tcp_not_syn(const struct mg_pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (MG_TCPF_SYN | MG_TCPF_ACK | MG_TCPF_RST)) != MG_TCPF_SYN;
}

static __always_inline int mg_new_flow(struct __sk_buff *skb, struct mg_pkt *p, enum mg_hook hook,
				       __u64 now)
{
	struct mg_nat_fe_val *fe;
	struct mg_nat_be_val be;
	struct mg_node_cfg *cfg;
	__be16 psnat_port = 0;
	int reason;

	fe = mg_nat_fe_lookup(p->saddr, p->daddr, p->dport, p->proto);
	if (!fe)
		return TC_ACT_OK;

	/* A TCP packet of a flow we never saw start (opened before BPF took over, or our state was
	 * lost): leave it to the kernel's conntrack and the rules it was set up with. */
	if (mg_tcp_not_syn(p)) {
		skb->mark |= MG_MARK_FALLTHROUGH;
		mg_count(MG_CNT_FALLTHROUGH);
		return TC_ACT_OK;
	}

	reason = mg_nat_pick_backend(fe, p->saddr, mg_hook_external(hook), false, now, &be);
	if (reason) {
		mg_debug("no backend svc %u reason %d", fe->svc_id, reason);
		mg_count(reason);
		/* No endpoints: refuse the connection as kube-proxy's REJECT does (TCP RST, ICMP
		 * port unreachable for UDP). */
		if (reason == MG_DROP_NO_BACKEND)
			return p->proto == IPPROTO_TCP ? mg_reject_tcp(skb, p)
						       : mg_reject_udp(skb, p);
		return TC_ACT_SHOT;
	}

	/* An external client and a backend on another node: tunnel mode. No NAT here; the
	 * backend's node NATs and sends the replies back to us, and the client keeps its address
	 * all the way to the pod. */
	if (hook == MG_HOOK_FROM_HEP && be.node) {
		cfg = mg_node_cfg_get();
		if (cfg && cfg->node_ip && be.node != cfg->node_ip) {
			if (mg_ct_create_tunnel(p, be.node, fe->svc_id, MG_CT_F_EXTERNAL, now))
				return mg_drop(MG_DROP_CT_CREATE);
			mg_count(MG_CNT_NEW_FLOW);
			mg_count(MG_CNT_TUNNEL_FLOW);
			mg_debug("new flow svc %u tunnelled to %pI4", fe->svc_id, &be.node);
			return mg_tunnel_send(skb, p, cfg->node_ip, be.node, 0, 0);
		}
	}

	if (mg_ct_create_nat(p, be.addr, be.port, fe->svc_id,
			     mg_hook_external(hook) ? MG_CT_F_EXTERNAL : 0, 0, now, &psnat_port))
		return mg_drop(MG_DROP_CT_CREATE);
	if (mg_rewrite(skb, p, MG_REWRITE_DST, be.addr, be.port))
		return mg_drop(MG_DROP_NAT_WRITE);
	if (psnat_port && mg_rewrite(skb, p, MG_REWRITE_SRC, p->saddr, psnat_port))
		return mg_drop(MG_DROP_NAT_WRITE);
	skb->mark |= MG_MARK_TRANSLATED;
	mg_count(MG_CNT_NEW_FLOW);
	mg_debug("new flow svc %u -> %pI4:%u", fe->svc_id, &be.addr, bpf_ntohs(be.port));
	return TC_ACT_OK;
}

/*
 * A new flow that came in the tunnel from the ingress node `ingress`, which chose this node: the
 * same frontend (or the NodePort wildcard), a local backend only, DNAT, and a conntrack pair that
 * sends the replies back through the tunnel. Whatever cannot be served is dropped: the inner
 * packet means nothing to this node's stack.
 */
static __always_inline int mg_new_tunnelled_flow(struct __sk_buff *skb, struct mg_pkt *p,
						 __be32 ingress, __u64 now)
{
	struct mg_nat_fe_val *fe;
	struct mg_nat_be_val be;
	struct mg_node_cfg *cfg;
	__u8 flags = MG_CT_F_EXTERNAL | MG_CT_F_FROM_TUNNEL;
	__be16 psnat_port = 0;
	int reason;

	fe = mg_nat_fe_lookup_tunnelled(p->saddr, p->daddr, p->dport, p->proto);
	if (!fe || mg_tcp_not_syn(p))
		return mg_drop(MG_DROP_TUNNEL_NO_FLOW);
	reason = mg_nat_pick_backend(fe, p->saddr, true, true, now, &be);
	if (reason)
		return mg_drop(reason);
	cfg = mg_node_cfg_get();
	if (cfg && (cfg->flags & MG_CFG_F_DSR) && !mg_dsr_opted_out(p->saddr))
		flags |= MG_CT_F_DSR;
	if (mg_ct_create_nat(p, be.addr, be.port, fe->svc_id, flags, ingress, now, &psnat_port))
		return mg_drop(MG_DROP_CT_CREATE);
	if (mg_rewrite(skb, p, MG_REWRITE_DST, be.addr, be.port))
		return mg_drop(MG_DROP_NAT_WRITE);
	if (psnat_port && mg_rewrite(skb, p, MG_REWRITE_SRC, p->saddr, psnat_port))
		return mg_drop(MG_DROP_NAT_WRITE);
	skb->mark |= MG_MARK_TRANSLATED;
	mg_count(MG_CNT_NEW_FLOW);
	mg_debug("tunnelled flow svc %u from %pI4 -> %pI4", fe->svc_id, &ingress, &be.addr);
	return TC_ACT_OK;
}

/*
 * An ICMP packet: errors about our flows translated (lib/icmp.h), then forwarded as told (only
 * from_wl, a pod's error about a tunnelled flow on the backend's node, and from_hep, the tunnel's
 * ends on the ingress node, ever have to).
 */
static __always_inline int mg_icmp(struct __sk_buff *skb, enum mg_hook hook, __be32 tun_src,
				   struct mg_ct_key *key)
{
	struct mg_node_cfg *cfg;
	__s64 rc = mg_icmp_error(skb, hook == MG_HOOK_FROM_HEP, tun_src, key);

	if (rc >= 0 && rc < MG_ICMP_TO_TUNNEL)
		return (int)rc;
	if (hook != MG_HOOK_FROM_WL && hook != MG_HOOK_FROM_HEP)
		return TC_ACT_OK;
	if (rc == MG_ICMP_TO_CLIENT)
		return mg_icmp_forward(skb, 0, 0);
	cfg = mg_node_cfg_get();
	if (!cfg || !cfg->node_ip)
		return mg_drop(MG_DROP_ENCAP);
	return mg_icmp_forward(skb, cfg->node_ip, (__be32)rc);
}

/*
 * Everything about one packet, `p` its parse result. `in` receives a copy of it as it arrived
 * (after decapsulation; untouched when not parsed) and `tun_src` the node it came in the tunnel
 * from, for the debug log.
 */
static __always_inline int mg_tc_body(struct __sk_buff *skb, enum mg_hook hook, struct mg_pkt *pp,
				      struct mg_pkt *in, __be32 *tun_from)
{
	struct mg_ct_key key;
	struct mg_ct_val *v;
	struct mg_node_cfg *cfg;
	__be32 tun_src = 0;
	bool src_is_b;
	int parsed;
	__u64 now;

	parsed = mg_parse_ipv4(skb, pp);
	if (parsed == MG_PARSE_DROP)
		return mg_drop(MG_DROP_SHORT);
	if (parsed == MG_PARSE_PASS)
		return TC_ACT_OK;

	/* Our tunnel to this node: continue with the packet inside, remembering who sent it. */
	if (hook == MG_HOOK_FROM_HEP && parsed == MG_PARSE_OK && mg_tunnel_maybe(pp)) {
		cfg = mg_node_cfg_get();
		if (cfg && mg_tunnel_is_ours(skb, pp, cfg)) {
			tun_src = pp->saddr;
			if (mg_tunnel_decap(skb, pp))
				return mg_drop(MG_DROP_ENCAP);
			parsed = mg_parse_ipv4(skb, pp);
			if (parsed == MG_PARSE_DROP)
				return mg_drop(MG_DROP_SHORT);
			if (parsed == MG_PARSE_PASS)
				return mg_drop(MG_DROP_TUNNEL_NO_FLOW);
		}
	}
	*in = *pp;
	*tun_from = tun_src;
	/* One call site for both (clang's stack slot sharing fails with two). */
	if (parsed == MG_PARSE_ICMP)
		return mg_icmp(skb, hook, tun_src, &key);

	src_is_b = mg_ct_key_fill(&key, pp->proto, pp->saddr, pp->sport, pp->daddr, pp->dport);
	v = bpf_map_lookup_elem(&mg_ct, &key);
	now = bpf_ktime_get_ns();
	if (v)
		return mg_ct_hit(skb, pp, v, src_is_b, hook, tun_src, now);
	if (tun_src)
		return mg_new_tunnelled_flow(skb, pp, tun_src, now);
	if (!mg_hook_opens_flows(hook))
		return TC_ACT_OK;
	return mg_new_flow(skb, pp, hook, now);
}

static __always_inline int mg_tc(struct __sk_buff *skb, enum mg_hook hook)
{
	struct mg_pkt p = {}, in = {};
	__be32 tun_src = 0;
	int verdict = mg_tc_body(skb, hook, &p, &in, &tun_src);

	/* bpfLogLevel Debug: the one branch Off and Info pay. */
	if (mg_log_debug)
		mg_log_decision(skb, hook, &in, &p, tun_src, verdict);
	return verdict;
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

SEC("classifier")
int mg_from_wg(struct __sk_buff *skb)
{
	return mg_wireguard_ingress(skb);
}

char LICENSE[] SEC("license") = "GPL";
