// SPDX-License-Identifier: Apache-2.0
/*
 * Connect-time load balancing (cgroup v2 sock_addr hooks): a socket that connects or sends to a
 * service frontend talks to a backend directly, so its packets need no NAT at all.
 *
 *   mg_connect4      cgroup/connect4: TCP (and UDP when enabled) connect() to a frontend
 *   mg_sendmsg4      cgroup/sendmsg4: unconnected UDP sendto() to a frontend
 *   mg_recvmsg4      cgroup/recvmsg4: replies from the backend appear to come from the frontend
 *   mg_getpeername4  cgroup/getpeername4: getpeername() reports the frontend
 *
 * Frontends with source ranges or session affinity are left to the TC programs, which see the
 * client's address. Every program returns 1 (allow): they translate, never refuse.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"
#include "log.h"
#include "maps.h"
#include "nat.h"

/* Load-time constant: also balance UDP (bpfConnectTimeLoadBalancing: Enabled) or TCP only. */
const volatile __u32 mg_ctlb_udp = 0;

static __always_inline int mg_ctlb_xlate(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct mg_nat_fe_val *fe;
	struct mg_nat_be_val be;
	struct mg_ctlb_rev_key rk = {};
	struct mg_ctlb_rev_val rv = {};
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	fe = mg_nat_fe_lookup_any_src(addr, port, proto);
	if (!fe)
		return 1;
	if (fe->flags & (MG_FE_F_BLACKHOLE | MG_FE_F_SRC_RANGES) || fe->affinity_timeout_s)
		return 1;
	if (mg_nat_pick_backend(fe, 0, false, false, 0, &be))
		return 1; /* no backend: the TC programs drop (and count) the first packet */

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be.addr;
	rk.port = be.port;
	rv.addr = addr;
	rv.port = port;
	bpf_map_update_elem(&mg_ctlb_rev, &rk, &rv, BPF_ANY);

	ctx->user_ip4 = be.addr;
	ctx->user_port = (__u32)be.port;
	mg_debug("ctlb svc %u -> %pI4", fe->svc_id, &be.addr);
	return 1;
}

static __always_inline void mg_ctlb_rev_xlate(struct bpf_sock_addr *ctx)
{
	struct mg_ctlb_rev_key rk = {};
	struct mg_ctlb_rev_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rv = bpf_map_lookup_elem(&mg_ctlb_rev, &rk);
	if (!rv)
		return;
	ctx->user_ip4 = rv->addr;
	ctx->user_port = (__u32)rv->port;
}

SEC("cgroup/connect4")
int mg_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		return mg_ctlb_xlate(ctx, IPPROTO_TCP);
	if (ctx->protocol == IPPROTO_UDP && mg_ctlb_udp)
		return mg_ctlb_xlate(ctx, IPPROTO_UDP);
	return 1;
}

SEC("cgroup/sendmsg4")
int mg_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP && mg_ctlb_udp)
		return mg_ctlb_xlate(ctx, IPPROTO_UDP);
	return 1;
}

SEC("cgroup/recvmsg4")
int mg_recvmsg4(struct bpf_sock_addr *ctx)
{
	if (mg_ctlb_udp)
		mg_ctlb_rev_xlate(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int mg_getpeername4(struct bpf_sock_addr *ctx)
{
	mg_ctlb_rev_xlate(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
