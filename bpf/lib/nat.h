/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service NAT: frontend lookup and backend choice. Only new flows come here; established flows
 * are translated from their conntrack entry alone.
 */
#ifndef MARGAY_LIB_NAT_H
#define MARGAY_LIB_NAT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

#define MG_NSEC_PER_SEC 1000000000ull

/* Longest-prefix match on (addr, port, proto, client source): the most specific source range. */
static __always_inline struct mg_nat_fe_val *mg_nat_fe_lookup(__be32 saddr, __be32 daddr,
							      __be16 dport, __u8 proto)
{
	struct mg_nat_fe_key k = {
	    .prefixlen = MG_NAT_FE_PREFIX_FULL,
	    .addr = daddr,
	    .port = dport,
	    .proto = proto,
	    .pad = 0,
	    .src_addr = saddr,
	};

	return bpf_map_lookup_elem(&mg_nat_fe, &k);
}

/*
 * The frontend of a packet that came in the tunnel: its own address first (LoadBalancer IPs and
 * external IPs are the same on every node), else the NodePort wildcard (the destination is the
 * ingress node's address).
 */
static __always_inline struct mg_nat_fe_val *mg_nat_fe_lookup_tunnelled(__be32 saddr, __be32 daddr,
									__be16 dport, __u8 proto)
{
	struct mg_nat_fe_val *fe = mg_nat_fe_lookup(saddr, daddr, dport, proto);

	if (fe)
		return fe;
	return mg_nat_fe_lookup(saddr, MG_NAT_FE_NODEPORT_ANY, dport, proto);
}

/* Lookup ignoring source ranges (connect-time LB, where the source is not known yet): finds the
 * frontend's catch-all entry, which is a blackhole when the frontend has source ranges. */
static __always_inline struct mg_nat_fe_val *mg_nat_fe_lookup_any_src(__be32 daddr, __be16 dport,
								      __u8 proto)
{
	struct mg_nat_fe_key k = {
	    .prefixlen = MG_NAT_FE_PREFIX_FIXED,
	    .addr = daddr,
	    .port = dport,
	    .proto = proto,
	    .pad = 0,
	    .src_addr = 0,
	};

	return bpf_map_lookup_elem(&mg_nat_fe, &k);
}

/*
 * Chooses the backend of a new flow: sticky backend when the service has session affinity and the
 * client's entry has not expired, else a uniformly random ordinal among all backends, or among
 * the local ones (ordinals 0..local_count-1) when the traffic policy for this client is Local or
 * when `local_only` (a flow that came in the tunnel from the ingress node, which already chose
 * this node). With `local_only` a sticky backend on another node is ignored (and replaced).
 * Returns 0 and fills `out`, or an enum mg_reason to drop with.
 */
static __always_inline int mg_nat_pick_backend(const struct mg_nat_fe_val *fe, __be32 client,
					       bool external, bool local_only, __u64 now,
					       struct mg_nat_be_val *out)
{
	struct mg_nat_be_key bk = {};
	struct mg_nat_be_val *be;
	struct mg_nat_aff_key ak = {};
	struct mg_nat_aff_val *aff, nv = {};
	__u32 n = fe->count;
	__u32 timeout_s = fe->affinity_timeout_s;

	if (fe->flags & MG_FE_F_BLACKHOLE)
		return MG_DROP_BLACKHOLE;
	if (local_only || (external && (fe->flags & MG_FE_F_EXT_LOCAL)) ||
	    (!external && (fe->flags & MG_FE_F_INT_LOCAL)))
		n = fe->local_count;
	if (n == 0)
		return MG_DROP_NO_BACKEND;

	if (timeout_s) {
		ak.svc_id = fe->svc_id;
		ak.client = client;
		aff = bpf_map_lookup_elem(&mg_nat_aff, &ak);
		if (aff && now - aff->ts_ns < (__u64)timeout_s * MG_NSEC_PER_SEC &&
		    !(local_only && aff->be.node)) {
			*out = aff->be;
			return 0;
		}
	}

	bk.svc_id = fe->svc_id;
	bk.ordinal = bpf_get_prandom_u32() % n;
	be = bpf_map_lookup_elem(&mg_nat_be, &bk);
	if (!be)
		return MG_DROP_BACKEND_MISSING;
	*out = *be;

	if (timeout_s) {
		nv.ts_ns = now;
		nv.be = *be;
		/* Best effort: without the entry the next flow picks again. */
		bpf_map_update_elem(&mg_nat_aff, &ak, &nv, BPF_ANY);
	}
	return 0;
}

#endif /* MARGAY_LIB_NAT_H */
