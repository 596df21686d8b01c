/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Types shared by the BPF programs and the Rust userspace (crates/margay-bpf/src/maps/).
 *
 * This header is the one source of truth for every map key and value. The Rust mirrors are
 * `#[repr(C)]` structs that name the C struct they mirror; the test `layout_matches_btf` in
 * crates/margay-bpf/tests/layout.rs reads the BTF of the compiled objects and fails when a size
 * or a field offset differs. Change a struct here, then its mirror, then run that test.
 *
 * Rules for every struct in this file:
 * - explicit padding: every byte belongs to a named field (`pad*` fields are written as zero),
 *   so that hash keys compare equal byte for byte and the Rust mirror has no implicit holes;
 * - a byte-order note on every field: "be" = network byte order (as on the wire),
 *   "host" = the CPU's order (little endian on x86_64 and arm64);
 * - fixed-width kernel types only (__u8.. __u64, __be16, __be32), so that sizes are the same
 *   for clang -target bpf and for the Rust mirror.
 */
#ifndef MARGAY_TYPES_H
#define MARGAY_TYPES_H

#include <linux/types.h>

/* === NAT frontends === */

/*
 * Number of bits of `struct mg_nat_fe_key` after `prefixlen` that every frontend matches
 * exactly: addr (32) + port (16) + proto (8) + pad (8). The LPM prefix length of an entry is
 * MG_NAT_FE_PREFIX_FIXED + the length of its source CIDR (0..32); a lookup uses
 * MG_NAT_FE_PREFIX_FULL and the packet's source address, so the longest (most specific)
 * source range wins and an entry without a source range (prefix /0) matches every client.
 */
#define MG_NAT_FE_PREFIX_FIXED 64
#define MG_NAT_FE_PREFIX_FULL  (MG_NAT_FE_PREFIX_FIXED + 32)

/*
 * Frontend address of a NodePort's wildcard entry: {255.255.255.255, nodePort, proto}. Looked up
 * only for packets that arrived through the tunnel, whose destination is the NodePort on the
 * ingress node's address (which this node has no frontend for). The agent writes it next to the
 * per-address NodePort frontends, with the same value.
 */
#define MG_NAT_FE_NODEPORT_ANY 0xffffffffu

/* Key of the LPM trie map mg_nat_fe: a service frontend (ClusterIP, node IP for a NodePort,
 * LoadBalancer ingress IP, external IP), optionally restricted to a client source CIDR. */
struct mg_nat_fe_key {
	__u32 prefixlen; /* host: LPM prefix length in bits, see MG_NAT_FE_PREFIX_FIXED */
	__be32 addr;	 /* be: frontend IPv4 address */
	__be16 port;	 /* be: frontend port */
	__u8 proto;	 /* IPPROTO_TCP / IPPROTO_UDP (one byte, no order) */
	__u8 pad;	 /* zero; part of the matched prefix */
	__be32 src_addr; /* be: client source network (loadBalancerSourceRanges), 0 if none */
};

/* Frontend flags (host order bits of mg_nat_fe_val.flags). */
#define MG_FE_F_EXT_LOCAL  (1u << 0) /* externalTrafficPolicy: Local for external clients */
#define MG_FE_F_INT_LOCAL  (1u << 1) /* internalTrafficPolicy: Local for in-cluster clients */
#define MG_FE_F_BLACKHOLE  (1u << 2) /* drop: the client is outside every allowed source range */
#define MG_FE_F_SRC_RANGES (1u << 3) /* the frontend has loadBalancerSourceRanges */

struct mg_nat_fe_val {
	__u32 svc_id;	   /* host: service id, key of the backends in mg_nat_be */
	__u32 count;	   /* host: number of backends (ordinals 0..count-1) */
	__u32 local_count; /* host: backends on this node; they hold ordinals 0..local_count-1 */
	__u32 flags;	   /* host: MG_FE_F_* */
	__u32 affinity_timeout_s; /* host: sessionAffinity ClientIP timeout in seconds, 0 = none */
};

/* === NAT backends === */

struct mg_nat_be_key {
	__u32 svc_id;  /* host: mg_nat_fe_val.svc_id */
	__u32 ordinal; /* host: 0..count-1, local backends first */
};

/*
 * A backend. `node` is the underlay IPv4 address of the node that hosts it, 0 for a backend on
 * this node (the agent writes 0 for local backends, which hold ordinals 0..local_count-1). An
 * external client's new flow that picks a backend with a non-zero `node` other than this node's
 * address is not NATed here but sent in the tunnel to that node (tunnel mode, see
 * docs/design/bpf-dataplane.md "External clients and remote backends").
 */
struct mg_nat_be_val {
	__be32 addr; /* be: backend (endpoint) IPv4 address */
	__be16 port; /* be: backend port */
	__u16 pad;   /* zero */
	__be32 node; /* be: address of the backend's node, 0 = this node */
};

/* === Session affinity (sessionAffinity: ClientIP) === */

struct mg_nat_aff_key {
	__u32 svc_id;  /* host */
	__be32 client; /* be: client IPv4 address */
};

struct mg_nat_aff_val {
	__u64 ts_ns;		 /* host: bpf_ktime_get_ns() when the backend was (re)chosen */
	struct mg_nat_be_val be; /* the backend this client sticks to */
	__u32 pad;		 /* zero */
};

/* === Conntrack === */

/*
 * A normalised 5-tuple: the endpoint that sorts lower (address compared as the raw __be32, then
 * port as the raw __be16) is `a`. Both directions of a flow therefore have the same key.
 */
struct mg_ct_key {
	__u8 proto;    /* IPPROTO_* (one byte, no order) */
	__u8 pad[3];   /* zero */
	__be32 addr_a; /* be */
	__be32 addr_b; /* be */
	__be16 port_a; /* be */
	__be16 port_b; /* be */
};

enum mg_ct_type {
	MG_CT_NORMAL = 0,  /* a flow without NAT (reserved: not created yet) */
	MG_CT_NAT_FWD = 1, /* keyed by the pre-DNAT tuple (client, frontend); DNAT to nat_addr */
	MG_CT_NAT_REV = 2, /* keyed by the post-DNAT tuple (client, backend); SNAT to nat_addr */
	/* On the ingress node, keyed by (client, frontend): an external flow whose backend is on
	 * node `tun_addr`. The client's packets are sent there in the tunnel without NAT; replies
	 * come back in the tunnel and are forwarded to the client. A single entry (no peer). */
	MG_CT_TUNNEL = 3,
};

/* TCP flags seen on one leg (bits of mg_ct_val.tcp_a / tcp_b). */
#define MG_CT_TCP_SYN (1u << 0)
#define MG_CT_TCP_ACK (1u << 1)
#define MG_CT_TCP_FIN (1u << 2)
#define MG_CT_TCP_RST (1u << 3)

/* Entry flags (bits of mg_ct_val.flags). */
#define MG_CT_F_CLIENT_IS_B (1u << 0) /* the endpoint that opened the flow is the key's `b` */
#define MG_CT_F_EXTERNAL    (1u << 1) /* the client came in through a host interface */
/* On the backend node: the flow arrived in the tunnel from the ingress node `tun_addr`; replies
 * are SNATed and sent back through the tunnel to it (both entries of the pair carry it). */
#define MG_CT_F_FROM_TUNNEL (1u << 2)
/* With MG_CT_F_FROM_TUNNEL: replies go straight to the client (bpfExternalServiceMode DSR). */
#define MG_CT_F_DSR (1u << 3)

/*
 * One conntrack entry. A NATed flow has two, created together and pointing at each other
 * through `peer`: a forward entry (type NAT_FWD) and a reverse entry (type NAT_REV). Each holds
 * what its own packets need, so that every packet of an established flow costs exactly one
 * lookup: a client->frontend packet finds the forward entry and its DNAT target; a
 * backend->client packet finds the reverse entry and its SNAT source. Each entry records the
 * TCP flags and the time of the packets that hit it; userspace reads a pair together to decide
 * its state and expiry (docs/design/conntrack.md). In tunnel mode the ingress node keeps a single
 * MG_CT_TUNNEL entry instead (no NAT there), and the backend's node an ordinary pair flagged
 * MG_CT_F_FROM_TUNNEL; `tun_addr` names the other node.
 */
struct mg_ct_val {
	__u64 created_ns;      /* host: bpf_ktime_get_ns() at creation */
	__u64 last_seen_ns;    /* host: bpf_ktime_get_ns() of the last packet that hit this entry */
	__u8 kind;	       /* enum mg_ct_type */
	__u8 flags;	       /* MG_CT_F_* */
	__u8 tcp_a;	       /* MG_CT_TCP_* seen from endpoint a (via this entry) */
	__u8 tcp_b;	       /* MG_CT_TCP_* seen from endpoint b (via this entry) */
	__u32 svc_id;	       /* host: service of a NATed flow (to flush a service's flows) */
	struct mg_ct_key peer; /* the other entry of the pair (all-zero for MG_CT_NORMAL) */
	__be32 nat_addr;       /* be: NAT_FWD: backend address; NAT_REV: frontend address */
	__be16 nat_port;       /* be: NAT_FWD: backend port; NAT_REV: frontend port */
	/* be: the client's port under port SNAT (bpfPSNATPorts), 0 = kept. NAT_FWD: the port the
	 * client's packets get (with the DNAT); NAT_REV: the client's own port, which the replies
	 * get back (with the SNAT). Set when another flow already held (client, backend). */
	__be16 psnat_port;
	__be32 tun_addr; /* be: TUNNEL: the backend's node; FROM_TUNNEL: the ingress node */
	__u32 pad2;	 /* zero */
};

/* === Node configuration (array of one entry, written by the agent) === */

/* bpfExternalServiceMode DSR: replies of tunnelled flows leave the backend node directly. */
#define MG_CFG_F_DSR (1u << 0)

/*
 * What the programs need to know about their node. With `node_ip` 0 (not configured) external
 * flows to remote backends are DNATed here like any other (no tunnel).
 */
struct mg_node_cfg {
	__be32 node_ip; /* be: this node's underlay address: outer source of tunnelled packets, and
			 * the only outer destination decapsulated; 0 = tunnel off */
	__u32 flags;	/* host: MG_CFG_F_* */
	/* host: bpfPSNATPorts, the client source ports a new flow gets when its (client, backend)
	 * is taken by another flow (two ingress nodes, or two frontends, sent the same client
	 * address and port to one backend). 0..0 = no port SNAT: the second flow is dropped. */
	__u16 psnat_first;
	__u16 psnat_last;
};

/* How many random ports of the bpfPSNATPorts range a new flow tries before giving up. */
#define MG_PSNAT_TRIES 8

/*
 * bpfDSROptoutCIDRs (LPM trie mg_dsr_optout, key struct mg_route_key, value __u32 1): in DSR mode,
 * flows of clients in these networks are served the Tunnel way (replies back through the ingress
 * node), e.g. clients whose network drops packets from a frontend address it did not route.
 */

/* The tunnel between nodes for external clients (Calico's values): VXLAN on UDP 4789 with a
 * reserved VNI, so that a VXLAN device of the pod network on the same port is not confused. */
#define MG_TUNNEL_PORT 4789
#define MG_TUNNEL_VNI  0xca11c0

/* === Routes (LPM trie), for tunnel mode and traffic policy (userspace-written) === */

#define MG_RT_PREFIX_MAX 32

struct mg_route_key {
	__u32 prefixlen; /* host: 0..32 */
	__be32 addr;	 /* be */
};

#define MG_RT_F_LOCAL_WL    (1u << 0) /* a pod on this node */
#define MG_RT_F_REMOTE_WL   (1u << 1) /* a pod block on another node */
#define MG_RT_F_LOCAL_HOST  (1u << 2) /* an address of this node */
#define MG_RT_F_REMOTE_HOST (1u << 3) /* an address of another node */
#define MG_RT_F_IN_POOL	    (1u << 4) /* inside a Calico IP pool */
/* Another node reached through WireGuard: the tunnel to it (VXLAN, MG_TUNNEL_VNI) is sent into
 * the WireGuard device `ifindex` instead of out of the underlay interface. */
#define MG_RT_F_WIREGUARD (1u << 5)

struct mg_route_val {
	__u32 flags;	 /* host: MG_RT_F_* */
	__u32 ifindex;	 /* host: local pod's host-side veth; WIREGUARD: the WireGuard device */
	__be32 next_hop; /* be: node IP that hosts a remote block, 0 otherwise */
	__u32 pad;	 /* zero */
};

/* === Interface state (userspace-written, keyed by ifindex) === */

#define MG_IF_F_WORKLOAD (1u << 0)
#define MG_IF_F_HOST	 (1u << 1)
#define MG_IF_F_TUNNEL	 (1u << 2)
#define MG_IF_F_READY	 (1u << 3)

struct mg_ifstate_key {
	__u32 ifindex; /* host */
};

struct mg_ifstate_val {
	__u32 flags;   /* host: MG_IF_F_* */
	char name[16]; /* NUL-padded interface name (IFNAMSIZ) */
};

/* === Connect-time load balancing: reverse translation for recvmsg4 / getpeername4 === */

struct mg_ctlb_rev_key {
	__u64 cookie; /* host: bpf_get_socket_cookie() of the client socket */
	__be32 addr;  /* be: backend address the socket talks to */
	__be16 port;  /* be: backend port */
	__u16 pad;    /* zero */
};

struct mg_ctlb_rev_val {
	__be32 addr; /* be: frontend address the application asked for */
	__be16 port; /* be: frontend port */
	__u16 pad;   /* zero */
};

/* === Counters (per-CPU array indexed by enum mg_reason; value: __u64 packets, host) === */

enum mg_reason {
	MG_REASON_NONE = 0,	     /* unused slot */
	MG_DROP_SHORT = 1,	     /* truncated or malformed header */
	MG_DROP_NO_BACKEND = 2,	     /* the frontend has no (local, where required) backend */
	MG_DROP_BACKEND_MISSING = 3, /* backend ordinal missing from mg_nat_be (update race) */
	MG_DROP_CT_CREATE = 4,	     /* conntrack entries could not be created */
	MG_DROP_NAT_WRITE = 5,	     /* rewriting the packet or its checksums failed */
	MG_DROP_BLACKHOLE = 6,	     /* client outside loadBalancerSourceRanges */
	MG_CNT_NEW_FLOW = 7,	     /* not a drop: NAT flows created */
	MG_CNT_FALLTHROUGH = 8,	     /* not a drop: TCP without SYN and without conntrack */
	MG_DROP_ENCAP = 9,	     /* tunnel encapsulation or decapsulation failed */
	MG_DROP_FIB = 10,	     /* no route (FIB) for a tunnelled or decapsulated packet */
	MG_DROP_TOO_BIG = 11,	     /* too big for the tunnel (ICMP sent when DF) */
	MG_DROP_TUNNEL_NO_FLOW = 12, /* decapsulated packet of no known flow that opens none */
	MG_CNT_TUNNEL_FLOW = 13,     /* not a drop: new flows sent in the tunnel to another node */
	MG_REASON_MAX = 14,
};

/* skb->mark bit for a TCP packet of a flow BPF does not know (left to the kernel's conntrack). */
#define MG_MARK_FALLTHROUGH 0x01000000u

/*
 * One packet decision of a TC program (bpfLogLevel: Debug), written to the ring buffer mg_log
 * only while the agent has set the TC object's global `mg_log_debug` (lib/log.h); read and
 * logged by the agent (one line each). The tuple as the packet arrived and as it left.
 */
struct mg_log_event {
	__u64 ts_ns;	  /* host: bpf_ktime_get_ns() */
	__u32 ifindex;	  /* host: skb->ifindex */
	__u8 hook;	  /* host: the program, enum mg_hook in progs/tc.c (MG_LOG_HOOK_*) */
	__u8 proto;	  /* IPPROTO_* of the packet (ICMP: the outer header) */
	__u8 verdict;	  /* TC verdict returned */
	__u8 pad;	  /* zero */
	__be32 saddr;	  /* be: as it arrived (after decapsulation when tunnelled) */
	__be32 daddr;	  /* be */
	__be16 sport;	  /* be: 0 for ICMP */
	__be16 dport;	  /* be */
	__be32 out_saddr; /* be: as it left (tunnel headers not included) */
	__be32 out_daddr; /* be */
	__be16 out_sport; /* be */
	__be16 out_dport; /* be */
	__be32 tun_src;	  /* be: the node it came from in the tunnel, 0 if not */
};

/* Size of the ring buffer mg_log in bytes (a power of two, a multiple of the page size). */
#define MG_LOG_RING_BYTES (256 * 1024)

/*
 * skb->mark bit for a packet the programs translated (DNAT or SNAT from conntrack or a new flow).
 * The kernel's conntrack sees such a flow half translated (the reply carries the frontend, the
 * request the backend), so it judges the replies INVALID; the agent's iptables rules accept
 * packets with this bit before kube-proxy's "drop INVALID" (needed while both dataplanes are in
 * place: during a switch, and in BPF mode with bpfKubeProxyIptablesCleanupEnabled false).
 */
#define MG_MARK_TRANSLATED 0x02000000u

/* Log levels, the values of the load-time constant `mg_log_level`. */
#define MG_LOG_OFF   0
#define MG_LOG_INFO  1
#define MG_LOG_DEBUG 2

#endif /* MARGAY_TYPES_H */
