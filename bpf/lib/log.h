/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Logging to the kernel trace pipe. The level is a load-time constant (`mg_log_level`, set by the
 * loader through .rodata); the verifier removes the disabled branches, so a program loaded with
 * MG_LOG_OFF carries no logging code at all.
 */
#ifndef MARGAY_LIB_LOG_H
#define MARGAY_LIB_LOG_H

#include <bpf/bpf_helpers.h>

#include "margay/types.h"
#include "maps.h"
#include "parse.h"

const volatile __u32 mg_log_level = MG_LOG_OFF;

/*
 * bpfLogLevel Debug at run time: the agent sets this global of the TC object (its .bss map) to 1,
 * and every TC program then writes one mg_log_event per packet decision to mg_log. A global,
 * not a field of mg_node_cfg: reading it is one load from a fixed address and one branch, with
 * no map lookup and no NULL check, which is all Off and Info cost on the fast path.
 */
volatile __u32 mg_log_debug = 0;

/* Not used: puts struct mg_log_event into the object's BTF (a ring buffer map declares no value
 * type), where tests/layout.rs compares it with its Rust mirror. */
const volatile struct mg_log_event mg_log_event_btf = {};

/* Writes the decision about one packet (`in` as it arrived, `out` as it leaves) to mg_log. A full
 * ring drops the event (the agent reads it several times a second). */
static __always_inline void mg_log_decision(struct __sk_buff *skb, __u8 hook,
					    const struct mg_pkt *in, const struct mg_pkt *out,
					    __be32 tun_src, int verdict)
{
	struct mg_log_event *e;

	if (!in->proto)
		return; /* not parsed: not ours */
	e = bpf_ringbuf_reserve(&mg_log, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = skb->ifindex;
	e->hook = hook;
	e->proto = in->proto;
	e->verdict = (__u8)verdict;
	e->pad = 0;
	e->saddr = in->saddr;
	e->daddr = in->daddr;
	e->sport = in->sport;
	e->dport = in->dport;
	e->out_saddr = out->saddr;
	e->out_daddr = out->daddr;
	e->out_sport = out->sport;
	e->out_dport = out->dport;
	e->tun_src = tun_src;
	bpf_ringbuf_submit(e, 0);
}

#define mg_debug(fmt, ...)                                                                         \
	do {                                                                                       \
		if (mg_log_level >= MG_LOG_DEBUG)                                                  \
			bpf_printk("margay: " fmt, ##__VA_ARGS__);                                 \
	} while (0)

#define mg_info(fmt, ...)                                                                          \
	do {                                                                                       \
		if (mg_log_level >= MG_LOG_INFO)                                                   \
			bpf_printk("margay: " fmt, ##__VA_ARGS__);                                 \
	} while (0)

#endif /* MARGAY_LIB_LOG_H */
