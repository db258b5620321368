/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The mesh's tc programs. See the crate docs (datapath/src/lib.rs) for the
 * packet paths; datapath.h holds every struct the loader shares.
 *
 * Self-contained on purpose: only linux-libc-dev's uapi headers are needed, no
 * libbpf headers, so any machine with clang and the kernel headers builds it.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>

#include "datapath.h"

#define SEC(name) __attribute__((section(name), used))
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define LIBBPF_PIN_BY_NAME 1

#define bpf_htons(x) __builtin_bswap16(x)
#define bpf_ntohs(x) __builtin_bswap16(x)

/* Helper declarations: the helper ids come from the uapi enum. */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 offset, const void *from, __u32 len,
				   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to,
				   __u64 size) = (void *)BPF_FUNC_l3_csum_replace;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to,
				   __u64 flags) = (void *)BPF_FUNC_l4_csum_replace;
static __s64 (*bpf_csum_diff)(__be32 *from, __u32 from_size, __be32 *to, __u32 to_size,
			      __wsum seed) = (void *)BPF_FUNC_csum_diff;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect_peer;
static long (*bpf_skb_get_tunnel_key)(struct __sk_buff *skb, struct bpf_tunnel_key *key, __u32 size,
				      __u64 flags) = (void *)BPF_FUNC_skb_get_tunnel_key;
static long (*bpf_skb_set_tunnel_key)(struct __sk_buff *skb, struct bpf_tunnel_key *key, __u32 size,
				      __u64 flags) = (void *)BPF_FUNC_skb_set_tunnel_key;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len, __u64 flags) = (void *)BPF_FUNC_skb_change_head;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)BPF_FUNC_ringbuf_reserve;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)BPF_FUNC_ringbuf_submit;

char _license[] SEC("license") = "Dual BSD/GPL";

/* ---- maps (pinned by name under the loader's bpffs directory) ---- */

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct service_key);
	__type(value, struct service_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

/* Defaults only: the loader sets max_entries (tables * table size). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 128 * 16381);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct datapath_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* ---- packet parsing ---- */

#define IDENTITY_WORLD 2

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IP = 1,
	PARSE_INVALID = 2,
	PARSE_SHORT = 3,
};

struct pkt {
	__u8 family;
	__u8 proto;
	__u8 ttl;
	__u8 pad;
	__u16 sport; /* sport and dport adjacent: flow_hash reads them as one word */
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 l4_off; /* offset of the TCP/UDP header from skb->data */
};

/* What a forwarding decision carries into an event. */
struct fwd {
	__u32 identity;
	__u32 target_ifindex;
	__u32 tunnel_endpoint;
	__u32 tunnel_id;
};

/* Parses the IP header at l3_off (0 on L3 devices, ETH_HLEN on Ethernet). */
static __always_inline enum parse_result parse_l3(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *l4;
	__u32 frag_off = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3_off;

		if ((void *)(ip + 1) > data_end)
			return PARSE_SHORT;
		if (ip->version != 4 || ip->ihl < 5)
			return PARSE_INVALID;
		p->family = FAMILY_IPV4;
		p->proto = ip->protocol;
		p->ttl = ip->ttl;
		__builtin_memcpy(p->saddr, &ip->saddr, 4);
		__builtin_memcpy(p->daddr, &ip->daddr, 4);
		frag_off = ip->frag_off & bpf_htons(0x1fff);
		l4 = (void *)ip + ip->ihl * 4;
		p->l4_off = l3_off + ip->ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + l3_off;

		if ((void *)(ip6 + 1) > data_end)
			return PARSE_SHORT;
		if (ip6->version != 6)
			return PARSE_INVALID;
		p->family = FAMILY_IPV6;
		p->proto = ip6->nexthdr;
		p->ttl = ip6->hop_limit;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		l4 = (void *)(ip6 + 1);
		p->l4_off = l3_off + sizeof(*ip6);
	} else {
		return PARSE_NOT_IP;
	}

	/* Ports only for the first fragment of TCP/UDP; the rest keep 0. */
	if (frag_off == 0 && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
		__u16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return PARSE_SHORT;
		p->sport = ports[0];
		p->dport = ports[1];
	}
	return PARSE_OK;
}

/* Parses; if the headers are not in the linear area, pulls them and retries. */
static __always_inline enum parse_result parse(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	enum parse_result r;

	__builtin_memset(p, 0, sizeof(*p));
	r = parse_l3(skb, l3_off, p);
	if (r != PARSE_SHORT)
		return r;
	__u32 want = l3_off + sizeof(struct ipv6hdr) + 2 * sizeof(__u16);
	if (want > skb->len)
		want = skb->len;
	bpf_skb_pull_data(skb, want);
	__builtin_memset(p, 0, sizeof(*p));
	r = parse_l3(skb, l3_off, p);
	return r == PARSE_SHORT ? PARSE_INVALID : r;
}

/* ---- events ---- */

static __always_inline void emit(struct __sk_buff *skb, const struct pkt *p, __u8 kind, __u8 reason,
				 const struct fwd *f)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e)
		return; /* ring full: the reader is behind; the verdict stands */
	e->kind = kind;
	e->reason = reason;
	e->family = p->family;
	e->proto = p->proto;
	e->ifindex = skb->ifindex;
	e->target_ifindex = f->target_ifindex;
	e->identity = f->identity;
	e->tunnel_endpoint = f->tunnel_endpoint;
	e->tunnel_id = f->tunnel_id;
	e->pkt_len = skb->len;
	e->sport = p->sport;
	e->dport = p->dport;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int drop(struct __sk_buff *skb, const struct pkt *p, __u8 reason, const struct fwd *f)
{
	emit(skb, p, EVENT_DROP, reason, f);
	return TC_ACT_SHOT;
}

static __always_inline const struct datapath_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&dp_config, &zero);
}

static __always_inline void trace(struct __sk_buff *skb, const struct pkt *p, __u8 point, const struct fwd *f)
{
	const struct datapath_config *cfg = config();

	if (cfg && (cfg->flags & CONFIG_F_TRACE))
		emit(skb, p, EVENT_TRACE, point, f);
}

/* ---- lookups ---- */

static __always_inline struct endpoint_info *lookup_endpoint(__u8 family, const __u8 *addr)
{
	struct endpoint_key key = { .family = family };

	/* parse() zero-fills the tail of IPv4 addresses */
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&endpoints, &key);
}

static __always_inline struct ipcache_value *lookup_ipcache(__u8 family, const __u8 *addr)
{
	struct ipcache_key key = { .family = family };

	key.prefixlen = 32 + (family == FAMILY_IPV4 ? 32 : 128);
	/* parse() zero-fills the tail of IPv4 addresses */
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&ipcache, &key);
}

/* Multicast, broadcast, link-local and unspecified traffic belongs to the
 * link, not to the mesh: ND, DHCP, IGMP go to the node's stack untouched. */
static __always_inline int link_scoped(const struct pkt *p)
{
	if (p->family == FAMILY_IPV4) {
		__u32 d = *(__u32 *)p->daddr, s = *(__u32 *)p->saddr;

		return d == 0xffffffff || (p->daddr[0] & 0xf0) == 0xe0 || s == 0;
	}
	if (p->daddr[0] == 0xff)
		return 1;
	if (p->daddr[0] == 0xfe && (p->daddr[1] & 0xc0) == 0x80)
		return 1;
	if (p->saddr[0] == 0xfe && (p->saddr[1] & 0xc0) == 0x80)
		return 1;
	__u64 *s6 = (__u64 *)p->saddr;
	return s6[0] == 0 && s6[1] == 0;
}

/* ---- header rewrites ---- */

/* Decrements TTL / hop limit: the mesh forwards like a router, once per
 * path (from_pod for same-node and tunnelled packets, host_deliver for
 * kernel-routed ones; from_overlay does not again).
 *
 * Cost: the store helpers make the header writable first
 * (skb_ensure_writable). A TCP packet here is a clone of TCP's
 * retransmission copy, but TCP releases the header part to its clones
 * (skb_header_release), so that check copies nothing. Measured under
 * iperf3 with perf: no pskb_expand_head below from_pod, the TTL writes are
 * ~0.1% of CPU samples, and dropping them changed the throughput by less
 * than the run-to-run noise. (Cilium decrements on local delivery instead
 * of before encapsulation; doing it here drops an expiring packet before
 * it costs tunnel bandwidth.) */
static __always_inline int dec_ttl(struct __sk_buff *skb, __u32 l3_off, const struct pkt *p)
{
	__u8 ttl = p->ttl - 1;

	if (p->ttl <= 1)
		return -1;
	if (p->family == FAMILY_IPV4) {
		/* TTL and protocol share one 16-bit word of the checksum. */
		__u16 old = bpf_htons(((__u16)p->ttl << 8) | p->proto);
		__u16 new = bpf_htons(((__u16)ttl << 8) | p->proto);

		if (bpf_skb_store_bytes(skb, l3_off + offsetof(struct iphdr, ttl), &ttl, 1, 0) < 0)
			return -1;
		return bpf_l3_csum_replace(skb, l3_off + offsetof(struct iphdr, check), old, new, 2) < 0 ? -1 : 0;
	}
	return bpf_skb_store_bytes(skb, l3_off + offsetof(struct ipv6hdr, hop_limit), &ttl, 1, 0) < 0 ? -1 : 0;
}

static __always_inline int write_macs(struct __sk_buff *skb, const struct endpoint_info *ep)
{
	__u8 macs[12];

	__builtin_memcpy(macs, ep->pod_mac, 6);
	__builtin_memcpy(macs + 6, ep->host_mac, 6);
	return bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0 ? -1 : 0;
}

/* Hands an Ethernet frame (l3 at ETH_HLEN) to a local pod. */
static __always_inline int to_endpoint(struct __sk_buff *skb, const struct pkt *p, const struct endpoint_info *ep,
				       struct fwd *f)
{
	f->target_ifindex = ep->ifindex;
	if (write_macs(skb, ep) < 0)
		return drop(skb, p, DROP_HEADER_REWRITE, f);
	/* slot: ingress policy (policy map, POLICY_INGRESS, ep->endpoint_id, f->identity) */
	trace(skb, p, TRACE_TO_ENDPOINT, f);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* ---- service load balancing (see the crate docs, "Services") ---- */

static __always_inline __u32 rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 murmur_step(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

/* See FLOW_HASH_SEED in datapath.h; mirrored by datapath::lb::flow_hash. */
static __always_inline __u32 flow_hash(const struct pkt *p)
{
	__u32 w[4], ports, h = FLOW_HASH_SEED;

	__builtin_memcpy(w, p->saddr, 16);
	h = murmur_step(h, w[0]);
	h = murmur_step(h, w[1]);
	h = murmur_step(h, w[2]);
	h = murmur_step(h, w[3]);
	__builtin_memcpy(w, p->daddr, 16);
	h = murmur_step(h, w[0]);
	h = murmur_step(h, w[1]);
	h = murmur_step(h, w[2]);
	h = murmur_step(h, w[3]);
	__builtin_memcpy(&ports, &p->sport, 4);
	h = murmur_step(h, ports);
	h = murmur_step(h, (__u32)p->proto | ((__u32)p->family << 8));
	h ^= 40;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline void ct_key_of(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->dir = dir;
}

#define NAT_SRC 0
#define NAT_DST 1

/* Rewrites the source or destination address and port of a TCP/UDP packet
 * and fixes the IPv4 header checksum and the L4 checksum (pseudo header
 * included; with CHECKSUM_PARTIAL the helpers update only the pseudo-header
 * part, as the device finishes the sum). addr is 16 bytes on the stack
 * (IPv4 in the first four). Updates p. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, __u32 l3_off, struct pkt *p, int which,
				       __u8 *addr, __u16 port)
{
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							    : offsetof(struct udphdr, check));
	/* UDP over IPv4 may carry no checksum (0): keep it so, and never
	 * produce 0 from a real sum. */
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u8 *old_addr = which == NAT_DST ? p->daddr : p->saddr;
	__u16 old_port = which == NAT_DST ? p->dport : p->sport;
	__u32 port_off = p->l4_off + (which == NAT_DST ? offsetof(struct tcphdr, dest) : offsetof(struct tcphdr, source));

	if (p->family == FAMILY_IPV4) {
		__u32 from, to;
		__u32 addr_off = l3_off + (which == NAT_DST ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));

		__builtin_memcpy(&from, old_addr, 4);
		__builtin_memcpy(&to, addr, 4);
		if (bpf_skb_store_bytes(skb, addr_off, &to, 4, 0) < 0 ||
		    bpf_l3_csum_replace(skb, l3_off + offsetof(struct iphdr, check), from, to, 4) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, from, to, BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return -1;
	} else {
		__u32 addr_off = l3_off + (which == NAT_DST ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		__s64 diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)addr, 16, 0);

		if (diff < 0 || bpf_skb_store_bytes(skb, addr_off, addr, 16, 0) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled) < 0)
			return -1;
	}
	if (old_port != port &&
	    (bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0 ||
	     bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | 2) < 0))
		return -1;
	__builtin_memcpy(old_addr, addr, 16);
	if (which == NAT_DST)
		p->dport = port;
	else
		p->sport = port;
	return 0;
}

/* See SERVICE_LOOPBACK in datapath.h. */
static __always_inline void service_loopback(__u8 family, __u8 *addr)
{
	__builtin_memset(addr, 0, 16);
	if (family == FAMILY_IPV4) {
		addr[0] = 169;
		addr[1] = 254;
		addr[2] = 42;
		addr[3] = 1;
	} else {
		addr[0] = 0xfe;
		addr[1] = 0x80;
		addr[15] = 1;
	}
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline int lb_proto(const struct pkt *p)
{
	/* Non-first fragments carry no ports (0): they are never translated. */
	return (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) && p->dport && p->sport;
}

/* The backend a flow to svc uses: the one its ct entry names while that is
 * still a usable backend of this service, else the Maglev table's choice
 * (recorded in ct). NULL when the service has no usable backend. */
static __always_inline const struct backend_value *lb_select(const struct pkt *p, const struct service_value *svc,
							     struct ct_key *fk, __u32 *backend_id)
{
	const struct backend_value *be;
	struct ct_value *ct = bpf_map_lookup_elem(&lb_ct, fk);

	if (ct) {
		*backend_id = ct->backend_id;
		be = bpf_map_lookup_elem(&backends, backend_id);
		if (be && be->service_id == svc->service_id && be->state != BACKEND_STATE_QUARANTINED)
			return be;
	}

	const struct datapath_config *cfg = config();
	if (!svc->backend_count || !cfg || !cfg->maglev_size)
		return NULL;
	__u32 idx = svc->maglev_id * cfg->maglev_size + flow_hash(p) % cfg->maglev_size;
	__u32 *id = bpf_map_lookup_elem(&maglev, &idx);
	if (!id)
		return NULL;
	*backend_id = *id;
	be = bpf_map_lookup_elem(&backends, backend_id);
	/* A table being rewritten for another service is never read (the
	 * service entry switches tables only after the write), but check. */
	if (!be || be->service_id != svc->service_id)
		return NULL;

	struct ct_value fv = { .service_id = svc->service_id, .backend_id = *backend_id };
	bpf_map_update_elem(&lb_ct, fk, &fv, BPF_ANY); /* LRU: makes room itself */
	return be;
}

/* from_pod: a packet to a service frontend gets a backend as destination.
 * A client that is its own backend (hairpin) also gets the service loopback
 * address as source, or its kernel would drop the packet (source = its own
 * address); the reverse entry is then keyed by the reply to that address.
 * 0: not a service, or translated (p updated); else a DROP_* reason. */
static __always_inline int lb_translate(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	struct service_key sk = { .port = p->dport, .proto = p->proto, .family = p->family };
	struct ct_key fk, rk;
	__u32 backend_id = 0;
	__u8 addr[16], client[16];
	__u16 port;

	if (!lb_proto(p))
		return 0;
	__builtin_memcpy(sk.addr, p->daddr, 16);
	const struct service_value *svc = bpf_map_lookup_elem(&services, &sk);
	if (!svc)
		return 0;
	ct_key_of(&fk, p, CT_FORWARD);
	const struct backend_value *be = lb_select(p, svc, &fk, &backend_id);
	if (!be)
		return DROP_NO_BACKEND;
	__builtin_memcpy(addr, be->addr, 16);
	port = be->port;
	int hairpin = same_addr(addr, p->saddr);
	if (hairpin)
		service_loopback(p->family, client);
	else
		__builtin_memcpy(client, p->saddr, 16);

	/* The reverse entry, keyed by the reply as the backend sends it. */
	__builtin_memset(&rk, 0, sizeof(rk));
	__builtin_memcpy(rk.saddr, addr, 16);
	__builtin_memcpy(rk.daddr, client, 16);
	rk.sport = port;
	rk.dport = p->sport;
	rk.proto = p->proto;
	rk.family = p->family;
	rk.dir = CT_REVERSE;
	__u8 flags = hairpin ? CT_F_HAIRPIN : 0;
	struct ct_value *old = bpf_map_lookup_elem(&lb_ct, &rk);
	if (!old || old->backend_id != backend_id || old->service_id != svc->service_id || old->flags != flags) {
		struct ct_value rv = {
			.port = p->dport, .flags = flags, .service_id = svc->service_id, .backend_id = backend_id
		};

		__builtin_memcpy(rv.addr, p->daddr, 16);
		bpf_map_update_elem(&lb_ct, &rk, &rv, BPF_ANY);
	}
	if (nat_rewrite(skb, l3_off, p, NAT_DST, addr, port) < 0)
		return DROP_HEADER_REWRITE;
	if (hairpin && nat_rewrite(skb, l3_off, p, NAT_SRC, client, p->sport) < 0)
		return DROP_HEADER_REWRITE;
	return 0;
}

/* Before delivery to a local pod (and in from_pod, for a reply that a local
 * backend sends): a reply of a translated flow gets the frontend back as its
 * source, and a hairpin reply its client back as destination. Only from_pod
 * can see a hairpin reply (the pod sent it to the service loopback address):
 * the other callers deliver only to a local pod's address, which the
 * loopback address never is. 0: not a reply of a translated flow; 1:
 * rewritten (p updated); -1: rewrite failed. */
static __always_inline int lb_reverse(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	struct ct_key rk;
	__u8 addr[16], client[16];

	if (!lb_proto(p))
		return 0;
	ct_key_of(&rk, p, CT_REVERSE);
	const struct ct_value *rv = bpf_map_lookup_elem(&lb_ct, &rk);
	if (!rv)
		return 0;
	int hairpin = rv->flags & CT_F_HAIRPIN;
	__builtin_memcpy(addr, rv->addr, 16);
	/* The hairpin's client is the backend itself: the reply's source. */
	__builtin_memcpy(client, p->saddr, 16);
	if (nat_rewrite(skb, l3_off, p, NAT_SRC, addr, rv->port) < 0)
		return -1;
	if (hairpin && nat_rewrite(skb, l3_off, p, NAT_DST, client, p->dport) < 0)
		return -1;
	return 1;
}

/* A pod's reply to the IPv6 service loopback address (fe80::1, link-local)
 * is a hairpin reply, not link traffic. */
static __always_inline int to_service_loopback(const struct pkt *p)
{
	__u8 loopback[16];

	if (p->family != FAMILY_IPV6 || !lb_proto(p))
		return 0;
	service_loopback(FAMILY_IPV6, loopback);
	return same_addr(p->daddr, loopback);
}

/* ---- programs ---- */

/* tc ingress on the host side of a pod's veth: packets the pod sends. */
SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	struct fwd f = {};
	struct pkt p;
	enum parse_result r = parse(skb, ETH_HLEN, &p);

	if (r == PARSE_NOT_IP)
		return TC_ACT_OK; /* ARP and friends: the pod's gateway neighbour is static */
	if (r != PARSE_OK)
		return drop(skb, &p, DROP_INVALID_PACKET, &f);
	if (link_scoped(&p) && !to_service_loopback(&p))
		return TC_ACT_OK;

	const struct endpoint_info *src = lookup_endpoint(p.family, p.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return drop(skb, &p, DROP_UNKNOWN_SOURCE, &f);
	f.identity = src->identity;

	/* A reply from a backend here to a client of a translated flow gets
	 * the frontend back; anything else may be addressed to a service. */
	int rev = lb_reverse(skb, ETH_HLEN, &p);
	if (rev < 0)
		return drop(skb, &p, DROP_HEADER_REWRITE, &f);
	if (!rev) {
		int reason = lb_translate(skb, ETH_HLEN, &p);

		if (reason)
			return drop(skb, &p, reason, &f);
	}
	/* slot: egress policy (policy map, POLICY_EGRESS, src->endpoint_id) */

	const struct endpoint_info *dst = lookup_endpoint(p.family, p.daddr);
	if (dst) {
		if (dec_ttl(skb, ETH_HLEN, &p) < 0)
			return drop(skb, &p, DROP_TTL_EXCEEDED, &f);
		return to_endpoint(skb, &p, dst, &f);
	}

	const struct ipcache_value *info = lookup_ipcache(p.family, p.daddr);
	if (info && info->tunnel_endpoint && !(info->flags & IPCACHE_F_ENCRYPT)) {
		const struct datapath_config *cfg = config();
		struct bpf_tunnel_key key = {};

		f.tunnel_endpoint = info->tunnel_endpoint;
		f.tunnel_id = f.identity;
		if (!cfg || !cfg->vxlan_ifindex)
			return drop(skb, &p, DROP_NO_OVERLAY, &f);
		f.target_ifindex = cfg->vxlan_ifindex;
		if (dec_ttl(skb, ETH_HLEN, &p) < 0)
			return drop(skb, &p, DROP_TTL_EXCEEDED, &f);
		key.tunnel_id = f.identity; /* the VNI carries the source identity */
		key.remote_ipv4 = info->tunnel_endpoint;
		key.tunnel_ttl = 64;
		if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0)
			return drop(skb, &p, DROP_HEADER_REWRITE, &f);
		trace(skb, &p, TRACE_TO_OVERLAY, &f);
		return bpf_redirect(cfg->vxlan_ifindex, 0);
	}

	/* Native routing, encryption (the route points at the WireGuard
	 * device) or the world: the node's routing table decides. */
	trace(skb, &p, TRACE_TO_STACK, &f);
	return TC_ACT_OK;
}

/* Delivers a decapsulated frame to the local pod it is addressed to. */
static __always_inline int overlay_deliver(struct __sk_buff *skb, __u32 identity, __u32 remote)
{
	struct fwd f = { .identity = identity, .tunnel_endpoint = remote, .tunnel_id = identity };
	struct pkt p;
	enum parse_result r = parse(skb, ETH_HLEN, &p);

	if (r != PARSE_OK)
		return drop(skb, &p, DROP_INVALID_PACKET, &f);
	const struct endpoint_info *dst = lookup_endpoint(p.family, p.daddr);
	if (!dst)
		return drop(skb, &p, DROP_UNKNOWN_ENDPOINT, &f);
	/* The reply of a remote backend to a client here. */
	if (lb_reverse(skb, ETH_HLEN, &p) < 0)
		return drop(skb, &p, DROP_HEADER_REWRITE, &f);
	return to_endpoint(skb, &p, dst, &f);
}

/* tc ingress on the VXLAN device (external mode). */
SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0) {
		struct fwd f = {};
		struct pkt p;

		parse(skb, ETH_HLEN, &p);
		return drop(skb, &p, DROP_NO_TUNNEL_KEY, &f);
	}
	return overlay_deliver(skb, key.tunnel_id, key.remote_ipv4);
}

#ifdef MESH_TEST_PROGRAMS
/* BPF_PROG_TEST_RUN cannot attach tunnel metadata to a test packet, so this
 * twin of from_overlay takes the VNI from cb[0] and the remote node from cb[1]
 * and then runs the very same delivery code. Only in the test build of the
 * object (datapath_test.o), which the tests and benchmarks load; the object
 * the agent loads does not have it. */
SEC("classifier")
int test_from_overlay(struct __sk_buff *skb)
{
	return overlay_deliver(skb, skb->cb[0], skb->cb[1]);
}
#endif

/* Delivers traffic the kernel routed to this node (native routing over an
 * Ethernet underlay, or decrypted by WireGuard) to a local pod. Not for a pod:
 * TC_ACT_OK, the stack has it. l3_off is 0 on L3 devices. */
static __always_inline int host_deliver(struct __sk_buff *skb, __u32 l3_off)
{
	struct fwd f = {};
	struct pkt p;

	if (parse(skb, l3_off, &p) != PARSE_OK)
		return TC_ACT_OK;
	const struct endpoint_info *dst = lookup_endpoint(p.family, p.daddr);
	if (!dst)
		return TC_ACT_OK;
	const struct ipcache_value *src = lookup_ipcache(p.family, p.saddr);
	f.identity = src ? src->identity : IDENTITY_WORLD;
	/* The reply of a natively routed or encrypted remote backend. */
	if (lb_reverse(skb, l3_off, &p) < 0)
		return drop(skb, &p, DROP_HEADER_REWRITE, &f);
	if (dec_ttl(skb, l3_off, &p) < 0)
		return drop(skb, &p, DROP_TTL_EXCEEDED, &f);
	if (l3_off == 0) {
		/* L3 device: give the frame the Ethernet header a veth needs. */
		__u16 proto = skb->protocol;

		if (bpf_skb_change_head(skb, ETH_HLEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, 2, 0) < 0)
			return drop(skb, &p, DROP_HEADER_REWRITE, &f);
	}
	return to_endpoint(skb, &p, dst, &f);
}

/* tc ingress on an Ethernet device carrying natively routed pod traffic. */
SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	return host_deliver(skb, ETH_HLEN);
}

/* tc ingress on an L3 device (WireGuard, TUN): no Ethernet header. */
SEC("classifier")
int from_l3dev(struct __sk_buff *skb)
{
	return host_deliver(skb, 0);
}
