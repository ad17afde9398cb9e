/*
 * capture.c: hands the TCP connections of enrolled pods to the node's ztunnel, both ways, and
 * counts every TCP and UDP flow it sees.
 *
 * Attaches at tc (clsact) ingress of every interface packets enter the node by: the uplink,
 * each host-side pod veth on point-to-point pod networks, the bridge device on bridged ones
 * (not its ports). Enrolled local pods are selected by address (enrolled_pods), so one
 * program serves every layout.
 *
 *   from an enrolled pod, SYN          -> outbound listener (15001)
 *   to an enrolled pod, port 15008 SYN -> inbound HBONE listener (15008)
 *   to an enrolled pod, other SYN      -> inbound plaintext listener (15006)
 *
 * A SYN is given to its listener with bpf_sk_assign and marked; the node's policy rule (mark
 * -> a table whose only route is "local 0.0.0.0/0") then delivers it locally, so the listener
 * accepts a socket whose local address is the original destination. Later packets of a
 * captured connection are only marked: the kernel's own lookup finds the ztunnel's socket.
 * So is a SYN whose 4-tuple a socket already owns (a client reconnecting from the port it just
 * used meets the ztunnel's TIME_WAIT): the kernel handles it as for any socket, and when it
 * lets the SYN reuse a TIME_WAIT it looks a listener up, which the second program,
 * capture_listener_lookup (sk_lookup, in the node's namespace), makes the same ztunnel
 * listener (steer() says why both are needed).
 * Packets of connections the ztunnel does not own (opened before enrollment) pass untouched,
 * so enrolling a pod cuts nothing. The ztunnel's own connections leave the node by egress and
 * are never captured; neither is traffic the node itself sends (kubelet probes).
 *
 * Flow counters (flows): every IPv4 TCP and UDP packet seen here, enrolled or not, is counted
 * under its 5-tuple as it appears in the packet (so each direction of a connection is its own
 * flow, as in NetFlow/IPFIX): packets, bytes (skb->len less the Ethernet header, i.e. the IP
 * length; a GSO/GRO packet counts once, with its full length), first and last time seen
 * (CLOCK_MONOTONIC ns), the OR of its TCP flags, and whether the flow was captured (a packet
 * handed to a listener or marked). That includes flows that bypass the ztunnel (between pods
 * that are not enrolled) and the replies to the ztunnel's own connections. Packets without a
 * readable L4 header (non-first fragments) are not counted. The map is an LRU hash shared by
 * all CPUs (not BPF_F_NO_COMMON_LRU): only a flow's first packet inserts, so the common LRU's
 * lock is rarely taken, and one shared pool keeps all 65536 entries usable whichever CPU a
 * flow's packets arrive on; when it is full the least recently used flow is evicted.
 *
 * Fail closed: a SYN for a slot with no listener is dropped, whether or not a socket owns its
 * 4-tuple, so a restarting agent never lets traffic bypass the mesh (not even through a TIME_WAIT
 * the killed ztunnel left, which the kernel would hand to a node socket on the destination's
 * port); TCP retries the SYN.
 *
 * Cost: per IPv4 TCP packet, one or two hash lookups for capture plus one LRU lookup, two
 * atomic adds and a clock read for the counters (a flow's first packet inserts instead, and
 * a new TCP flag takes one atomic OR); per packet of an enrolled pod one socket lookup
 * (bpf_skc_lookup_tcp: the established hash, then, if nothing owns the 4-tuple, the listener
 * lookup, which runs capture_listener_lookup: one or two hash lookups and a sockmap lookup),
 * and per SYN a sockmap lookup and bpf_sk_assign. Per UDP packet only the counters. Everything
 * else returns at the first checks. capture_listener_lookup costs the node's other listener
 * lookups (connections to the node itself) one or two hash lookups.
 * Needs: tc clsact, sockmap, bpf_sk_assign (5.7+), bpf_skc_lookup_tcp (5.2+), sk_lookup (5.9+),
 * LRU hash (4.10+), BPF atomic OR (5.12+).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define AF_INET 2  /* linux/socket.h, which is not a uapi header */

/* Defined by the loader (bpf/datapath.py), which also installs the rule: CAPTURE_MARK,
 * HBONE_PORT, FLOW_ACCOUNTING (1 or 0), and the sockmap slots OUTBOUND_SLOT,
 * INBOUND_HBONE_SLOT, INBOUND_PLAINTEXT_SLOT. */

BPF_HASH(enrolled_pods, u32, u8, 4096);          /* local enrolled pod IPv4 (network order) -> 1 */
BPF_TABLE("sockmap", u32, int, listeners, 3);    /* the ztunnel's listening sockets, by slot */

/* A flow as the packet carries it; addresses and ports in network byte order. No implicit
 * padding: the whole key is zeroed before it is filled, so equal tuples are equal keys. */
struct flow_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;       /* IPPROTO_TCP or IPPROTO_UDP */
    u8 pad[3];
};

struct flow_stats {
    u64 packets;
    u64 bytes;      /* IP lengths, headers included */
    u64 first_seen; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 last_seen;
    u64 tcp_flags;  /* OR of every packet's TCP flag byte (FIN 0x01 ... CWR 0x80); 64 bits: BCC's
                     * LLVM 14 has only 64-bit atomic OR */
    u32 captured;   /* 1 once a packet was handed to a ztunnel listener or marked */
    u32 pad;
};

BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows, 65536);

/* The listener slot of a TCP packet from `saddr` to `daddr`:`dport` (network order), or -1 when
 * neither end is an enrolled local pod. One decision for both programs below. */
static __always_inline int listener_slot(u32 saddr, u32 daddr, u16 dport)
{
    if (enrolled_pods.lookup(&saddr))
        return OUTBOUND_SLOT;
    if (!enrolled_pods.lookup(&daddr))
        return -1;
    return dport == htons(HBONE_PORT) ? INBOUND_HBONE_SLOT : INBOUND_PLAINTEXT_SLOT;
}

/* Whether a socket that is not a listener owns the 4-tuple: established (or closing), a
 * request socket (SYN_RECV) or TIME_WAIT. bpf_skc_lookup_tcp also returns listeners (ours,
 * through capture_listener_lookup, or any bound to the destination's port): those own nothing. */
static __always_inline int connection_exists(struct __sk_buff *skb, u32 saddr, u32 daddr, u16 sport, u16 dport)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = saddr;
    tuple.ipv4.daddr = daddr;
    tuple.ipv4.sport = sport;
    tuple.ipv4.dport = dport;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    int listening = sk->state == BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    return !listening;
}

/* Hands a SYN to the ztunnel: assigned to the listener in `slot`, or, when a socket already
 * owns its 4-tuple, only marked so the kernel's own lookup takes it to that socket (see
 * steer()). No listener in `slot` means no ztunnel: drop (fail closed), in both cases. */
static __always_inline int capture_syn(struct __sk_buff *skb, u32 slot, int owned)
{
    struct bpf_sock *listener = (struct bpf_sock *)listeners.lookup(&slot);
    if (!listener)
        return TC_ACT_SHOT;
    long err = owned ? 0 : bpf_sk_assign(skb, listener, 0);
    bpf_sk_release(listener);
    if (err)
        return TC_ACT_SHOT;
    skb->mark = CAPTURE_MARK;
    return TC_ACT_OK;
}

/* Counts one packet of `key`: one lookup and atomic adds, an insert for a flow's first packet. */
static __always_inline void count(struct flow_key *key, u64 len, u64 flags, u32 captured)
{
    if (!FLOW_ACCOUNTING)  /* the loader's switch; the compiler drops the rest when it is 0 */
        return;
    u64 now = bpf_ktime_get_ns();
    struct flow_stats *st = flows.lookup(key);
    if (!st) {
        struct flow_stats fresh = {.packets = 1, .bytes = len, .first_seen = now, .last_seen = now,
                                   .tcp_flags = flags, .captured = captured};
        if (flows.insert(key, &fresh) == 0)
            return;
        st = flows.lookup(key);  /* another CPU inserted it first */
        if (!st)
            return;
    }
    __sync_fetch_and_add(&st->packets, 1);
    __sync_fetch_and_add(&st->bytes, len);
    st->last_seen = now;  /* a plain store: concurrent writers all write "now" */
    if ((st->tcp_flags | flags) != st->tcp_flags)
        __sync_fetch_and_or(&st->tcp_flags, flags);
    if (captured && !st->captured)
        st->captured = 1;
}

/* The capture decision for a TCP packet whose header is readable; sets *captured when the
 * packet is handed to a listener or marked.
 *
 * A SYN whose 4-tuple a socket already owns goes to that socket through the kernel's lookup,
 * not to the listener: a client that reconnects from the port it just used meets the
 * ztunnel's TIME_WAIT socket when the ztunnel closed first. Assigned to the listener, such a
 * SYN is dropped, every retry, until the TIME_WAIT ends (60 s; measured on 6.18: the listener
 * does not queue a request socket whose 4-tuple the established hash already holds). Through
 * the lookup, tcp_timewait_state_process decides as for any TIME_WAIT socket. A SYN it may
 * accept (newer sequence number or timestamp) ends the TIME_WAIT and goes to the listener the
 * kernel looks up by destination address and port, which capture_listener_lookup makes the
 * ztunnel's, so the new connection is captured like the first. Without that program the
 * kernel takes a node socket bound to the port (measured: a transparent one took the
 * reconnect out of the mesh, a plain one held it 1 s), or, with none, answers from the
 * TIME_WAIT with an ACK, which the client resets before retrying in ~10 ms. A SYN it may not
 * accept gets that ACK too. A SYN for an established or SYN_RECV socket gets the kernel's
 * challenge ACK or SYN-ACK, as without the mesh. */
static __always_inline int steer(struct __sk_buff *skb, struct iphdr *ip, struct tcphdr *tcp, u32 *captured)
{
    int slot = listener_slot(ip->saddr, ip->daddr, tcp->dest);
    if (slot < 0)
        return TC_ACT_OK;
    int owned = connection_exists(skb, ip->saddr, ip->daddr, tcp->source, tcp->dest);

    if (tcp->syn && !tcp->ack) {
        int verdict = capture_syn(skb, slot, owned);
        *captured = verdict == TC_ACT_OK;
        return verdict;
    }
    if (owned) {
        skb->mark = CAPTURE_MARK;
        *captured = 1;
    }
    return TC_ACT_OK;
}

/* A TCP or UDP packet whose L4 header cannot be read (IP options beyond the packet, a
 * non-first fragment): not counted; dropped if it is TCP of an enrolled pod, rather than let past. */
static __always_inline int unreadable(struct iphdr *ip)
{
    u32 saddr = ip->saddr, daddr = ip->daddr;
    if (ip->protocol == IPPROTO_TCP && (enrolled_pods.lookup(&saddr) || enrolled_pods.lookup(&daddr)))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int capture(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
        return TC_ACT_OK;

    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip) || ip->frag_off & htons(0x1FFF))
        return unreadable(ip);

    struct flow_key key;
    __builtin_memset(&key, 0, sizeof(key));
    key.saddr = ip->saddr;
    key.daddr = ip->daddr;
    key.proto = ip->protocol;
    u64 len = skb->len - sizeof(*eth);

    if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = (void *)ip + ihl;
        if ((void *)(udp + 1) > data_end)
            return TC_ACT_OK;
        key.sport = udp->source;
        key.dport = udp->dest;
        count(&key, len, 0, 0);
        return TC_ACT_OK;  /* UDP is never captured */
    }

    struct tcphdr *tcp = (void *)ip + ihl;
    if ((void *)(tcp + 1) > data_end)
        return unreadable(ip);
    key.sport = tcp->source;
    key.dport = tcp->dest;
    u64 flags = ((u8 *)tcp)[13];  /* the flag byte: CWR ECE URG ACK PSH RST SYN FIN */

    u32 captured = 0;
    int verdict = steer(skb, ip, tcp, &captured);
    count(&key, len, flags, captured);
    return verdict;
}

/* sk_lookup, attached to the node's network namespace: runs where the kernel looks up a
 * listener for a packet delivered locally, and picks the ztunnel's for a connection of an
 * enrolled pod (the same listener_slot() as capture). An enrolled pod's packet reaches such a
 * lookup when capture() let its SYN through to a TIME_WAIT socket (see steer()), when no socket
 * at all owns it and it is addressed to the node itself (a listener answers that with a reset,
 * ours as the node's would), and from bpf_skc_lookup_tcp in capture() itself; every other
 * lookup is left to the kernel (SK_PASS with no socket). No listener in the slot: refused
 * (SK_DROP), never handed to another socket. */
int capture_listener_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    int slot = listener_slot(ctx->remote_ip4, ctx->local_ip4, htons(ctx->local_port));
    if (slot < 0)
        return SK_PASS;
    u32 key = slot;
    struct bpf_sock *listener = (struct bpf_sock *)listeners.lookup(&key);
    if (!listener)
        return SK_DROP;
    long err = bpf_sk_assign(ctx, listener, 0);
    bpf_sk_release(listener);
    return err ? SK_DROP : SK_PASS;
}
