/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ABI between the eBPF programs and the Rust loader: every map key and
 * value, every constant both sides use. Each struct here has a #[repr(C)] twin
 * in datapath/src/abi.rs; tests/layout.rs compiles this header with the host
 * compiler and checks that sizes and field offsets agree. Padding is explicit
 * so that both compilers see the same bytes and so that hash keys never
 * contain uninitialised memory.
 *
 * Changing a struct changes the layout of a pinned map: a restarted agent
 * would adopt a map whose entries it misreads. Add fields only at the end of a
 * value, bump DATAPATH_ABI_VERSION, and teach the loader to migrate. The
 * loader records its version in dp_config and refuses to adopt pins that
 * another version wrote.
 */
#ifndef MESH_DATAPATH_H
#define MESH_DATAPATH_H

#include <linux/types.h>

#define DATAPATH_ABI_VERSION 2

/* Address families in keys and events (not AF_*: these are stable on disk). */
#define FAMILY_IPV4 4
#define FAMILY_IPV6 6

/* ipcache: LPM trie. prefixlen counts the 32 bits of family+pad first, so a
 * /24 IPv4 prefix has prefixlen 32 + 24. addr holds the address in network
 * byte order, IPv4 in the first 4 bytes. */
struct ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

#define IPCACHE_F_REMOTE_CLUSTER (1U << 0) /* identity belongs to another cluster */
#define IPCACHE_F_ENCRYPT (1U << 1)        /* hand to the kernel (WireGuard route) */

struct ipcache_value {
	__u32 identity;
	/* IPv4 address of the node hosting the prefix, host byte order (as
	 * bpf_tunnel_key.remote_ipv4 wants it); 0 = no tunnel (native routing or
	 * world). */
	__u32 tunnel_endpoint;
	__u32 flags;
	__u32 pad;
};

/* endpoints: hash, exact pod IP -> local pod. */
struct endpoint_key {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct endpoint_info {
	__u32 ifindex;     /* host side of the pod's veth, in the node namespace */
	__u32 identity;    /* the pod's security identity */
	__u32 endpoint_id; /* agent-local endpoint id (policy key) */
	__u32 flags;       /* reserved, 0 */
	__u8 pod_mac[6];   /* MAC of eth0 inside the pod */
	__u8 host_mac[6];  /* MAC of the host side of the veth (the pod's gateway) */
	__u8 pad[4];
};

/* services: hash, frontend -> service. from_pod looks the destination up
 * here (TCP/UDP only) and translates it to a backend. */
struct service_key {
	__u8 addr[16];
	__u16 port; /* network byte order */
	__u8 proto; /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 family;
};

#define SERVICE_F_AFFINITY_LOCAL (1U << 0)
#define SERVICE_F_AFFINITY_REMOTE (1U << 1)
#define SERVICE_F_SHARED (1U << 2)
#define SERVICE_F_GLOBAL (1U << 3)

/* maglev_id of a service without a table (backend_count is 0). */
#define MAGLEV_NO_TABLE 0xffffffffU

struct service_value {
	__u32 service_id;    /* stable per frontend; backends and ct entries carry it */
	__u32 backend_count; /* backends in the Maglev table; 0 = drop (DROP_NO_BACKEND) */
	__u32 maglev_id;     /* table number in the maglev array */
	__u32 flags;         /* SERVICE_F_*: informational, the loader applies affinity */
};

/* backends: hash, backend id (__u32) -> backend. Backend ids belong to one
 * service (service_id) and are not reused while the agent runs, so a ct entry
 * naming a deleted or foreign backend is detected and the flow re-balanced. */
#define BACKEND_STATE_ACTIVE 0      /* in the Maglev table, takes new flows */
#define BACKEND_STATE_TERMINATING 1 /* no new flows, existing flows stay */
#define BACKEND_STATE_QUARANTINED 2 /* no flows: existing flows are re-balanced */

struct backend_value {
	__u8 addr[16];
	__u16 port; /* network byte order */
	__u8 proto;
	__u8 family;
	__u16 cluster_id;
	__u8 state; /* BACKEND_STATE_* */
	__u8 pad;
	__u32 service_id;
};

/* maglev: array of __u32 backend ids, table t at [t * M, (t + 1) * M), where
 * M = datapath_config.maglev_size (prime). max_entries is set by the loader
 * (tables * M). A service's slot for a flow is flow_hash % M. */

/* lb_ct: LRU hash of translated flows. A CT_FORWARD entry is keyed by the
 * client's packet as sent (client -> frontend) and names the backend, so the
 * flow sticks to it; a CT_REVERSE entry is keyed by the backend's reply
 * (backend -> client) and holds the frontend to restore as its source. */
#define CT_FORWARD 0
#define CT_REVERSE 1

struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
	__u8 proto;
	__u8 family;
	__u8 dir; /* CT_FORWARD / CT_REVERSE */
	__u8 pad;
};

/* The flow hash that picks a Maglev slot: murmur3_32 (seed FLOW_HASH_SEED)
 * over ten 32-bit words in native byte order: saddr[16], daddr[16], the
 * ports as they sit in the packet (sport then dport), proto | family << 8;
 * length 40. Mirrored by datapath::lb::flow_hash. */
#define FLOW_HASH_SEED 0x6d657368U

/* CT_REVERSE of a hairpin flow: the client is its own backend, so the
 * forward direction also rewrote the source to the service loopback address
 * (see SERVICE_LOOPBACK_IPV4/6) and the entry is keyed by the reply to that
 * address; the reply's destination is restored to the client (its source). */
#define CT_F_HAIRPIN (1U << 0)

struct ct_value {
	__u8 addr[16]; /* CT_REVERSE: frontend address */
	__u16 port;    /* CT_REVERSE: frontend port, network byte order */
	__u8 flags;    /* CT_REVERSE: CT_F_*; was padding, so older entries read 0 */
	__u8 pad;
	__u32 service_id;
	__u32 backend_id;
};

/* The service loopback addresses (Cilium's --ipv4/ipv6-service-loopback-
 * address): the source a pod's packet to its own service carries once it is
 * translated back to the pod itself, since a packet from the pod's own
 * address to that address is a martian to the pod's kernel. IPv4
 * 169.254.42.1; IPv6 fe80::1, the pods' IPv6 gateway, whose permanent
 * neighbour entry sends the pod's replies back to from_pod. Written by
 * service_loopback() in datapath.c; datapath::SERVICE_LOOPBACK_V4/V6 in Rust. */

/* policy: hash. Lookup lands with the policy issue. */
#define POLICY_INGRESS 0
#define POLICY_EGRESS 1

struct policy_key {
	__u32 endpoint_id;
	__u32 identity; /* peer identity, 0 = any */
	__u16 dport;    /* network byte order, 0 = any */
	__u8 proto;     /* 0 = any */
	__u8 direction; /* POLICY_INGRESS / POLICY_EGRESS */
};

#define POLICY_ALLOW 1
#define POLICY_DENY 2

struct policy_value {
	__u8 verdict; /* POLICY_ALLOW / POLICY_DENY */
	__u8 pad[7];
	__u64 packets;
	__u64 bytes;
};

/* config: array with one entry, written by the loader. */
#define CONFIG_F_TRACE (1U << 0) /* emit a trace event for every forwarded packet */

struct datapath_config {
	__u32 flags;
	__u32 vxlan_ifindex; /* VXLAN device (external mode) in the node namespace */
	__u32 maglev_size;   /* slots per Maglev table (prime); 0 = no service translation */
	__u32 abi_version;   /* DATAPATH_ABI_VERSION of the loader that wrote the maps; 0 = before it was recorded (version 2) */
};

/* events: ring buffer of struct event. */
#define EVENT_DROP 1
#define EVENT_TRACE 2

/* Drop reasons (EVENT_DROP). Stable: meshctl observe prints them. */
#define DROP_INVALID_PACKET 1   /* truncated or malformed headers */
#define DROP_UNKNOWN_SOURCE 2   /* from_pod: source IP is not this veth's pod */
#define DROP_UNKNOWN_ENDPOINT 3 /* from_overlay: destination is no local pod */
#define DROP_NO_TUNNEL_KEY 4    /* from_overlay: no tunnel metadata on the skb */
#define DROP_TTL_EXCEEDED 5     /* TTL / hop limit would reach 0 */
#define DROP_NO_OVERLAY 6       /* tunnel needed but no VXLAN device configured */
#define DROP_HEADER_REWRITE 7   /* a helper failed to rewrite the packet */
#define DROP_POLICY_DENIED 8    /* reserved for the policy issue */
#define DROP_NO_BACKEND 9       /* from_pod: service frontend without a usable backend */

/* Trace observation points (EVENT_TRACE). */
#define TRACE_TO_ENDPOINT 1 /* redirected to a local pod (target = its veth) */
#define TRACE_TO_OVERLAY 2  /* tunnel key set, redirected to the VXLAN device */
#define TRACE_TO_STACK 3    /* handed to the kernel's routing */

struct event {
	__u8 kind;   /* EVENT_DROP / EVENT_TRACE */
	__u8 reason; /* DROP_* or TRACE_* */
	__u8 family; /* FAMILY_IPV4 / FAMILY_IPV6, 0 if not IP */
	__u8 proto;
	__u32 ifindex;         /* device the packet arrived on */
	__u32 target_ifindex;  /* redirect target, 0 if none */
	__u32 identity;        /* source identity, 0 if unknown */
	__u32 tunnel_endpoint; /* host byte order, 0 if none */
	__u32 tunnel_id;       /* VNI set or read, 0 if none */
	__u32 pkt_len;
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
	__u8 saddr[16];
	__u8 daddr[16];
};

#endif /* MESH_DATAPATH_H */
