/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU packet counters by reason (enum mg_reason). */
#ifndef MARGAY_LIB_COUNTERS_H
#define MARGAY_LIB_COUNTERS_H

#include <linux/pkt_cls.h>

#include "maps.h"

static __always_inline void mg_count(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&mg_counters, &reason);

	/* Per-CPU slot: no other CPU writes it, a plain increment is exact. */
	if (v)
		*v += 1;
}

/* Counts a drop by reason; the TC verdict that drops. */
static __always_inline int mg_drop(__u32 reason)
{
	mg_count(reason);
	return TC_ACT_SHOT;
}

#endif /* MARGAY_LIB_COUNTERS_H */
