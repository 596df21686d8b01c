/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map definitions shared by every program. Each object that includes this header declares the
 * same maps; they are pinned by name in the agent's bpffs directory, so every object and every
 * restart of the agent use the same kernel maps. max_entries here are Calico's defaults
 * (bpfMapSize*); the loader overrides them from the configuration before creating the maps.
 */
#ifndef MARGAY_LIB_MAPS_H
#define MARGAY_LIB_MAPS_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "margay/types.h"

/* NAT frontends: LPM trie on (addr, port, proto, source CIDR). bpfMapSizeNATFrontend. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_nat_fe_key);
	__type(value, struct mg_nat_fe_val);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_nat_fe SEC(".maps");

/* NAT backends: (service id, ordinal) -> endpoint. bpfMapSizeNATBackend. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mg_nat_be_key);
	__type(value, struct mg_nat_be_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_nat_be SEC(".maps");

/* Session affinity: (service id, client) -> backend and time. bpfMapSizeNATAffinity. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_nat_aff_key);
	__type(value, struct mg_nat_aff_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_nat_aff SEC(".maps");

/* Conntrack: normalised 5-tuple -> entry. LRU: eviction is the last resort, userspace scans
 * and removes expired pairs. bpfMapSizeConntrack. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_ct_key);
	__type(value, struct mg_ct_val);
	__uint(max_entries, 512000);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ct SEC(".maps");

/* Routes: LPM trie on IPv4 prefixes. bpfMapSizeRoute. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_route_key);
	__type(value, struct mg_route_val);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_routes SEC(".maps");

/* Interface state: ifindex -> flags and name. bpfMapSizeIfState. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mg_ifstate_key);
	__type(value, struct mg_ifstate_val);
	__uint(max_entries, 1000);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ifstate SEC(".maps");

/* Counters: per-CPU packets by enum mg_reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MG_REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_counters SEC(".maps");

/* Connect-time LB reverse translation (recvmsg4 / getpeername4). Sized like affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_ctlb_rev_key);
	__type(value, struct mg_ctlb_rev_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ctlb_rev SEC(".maps");

/* bpfDSROptoutCIDRs: client networks served the Tunnel way in DSR mode (written by the agent;
 * read for new tunnelled flows in DSR mode only). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_route_key);
	__type(value, __u32);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_dsr_optout SEC(".maps");

/* Packet decisions for bpfLogLevel: Debug (struct mg_log_event), read by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MG_LOG_RING_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_log SEC(".maps");

/* Node configuration: one entry (key 0), written by the agent. An array lookup with a constant
 * key is inlined by the verifier: it costs no helper call. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_node_cfg);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_node_cfg SEC(".maps");

static __always_inline struct mg_node_cfg *mg_node_cfg_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&mg_node_cfg, &zero);
}

/* The client is in bpfDSROptoutCIDRs: served the Tunnel way even in DSR mode. */
static __always_inline bool mg_dsr_opted_out(__be32 client)
{
	struct mg_route_key k = {.prefixlen = MG_RT_PREFIX_MAX, .addr = client};

	return bpf_map_lookup_elem(&mg_dsr_optout, &k) != NULL;
}

#endif /* MARGAY_LIB_MAPS_H */
