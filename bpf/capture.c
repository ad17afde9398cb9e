/*
 * capture.c: hands the TCP connections of enrolled pods to the node's ztunnel, both ways.
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
 * Packets of connections the ztunnel does not own (opened before enrollment) pass untouched,
 * so enrolling a pod cuts nothing. The ztunnel's own connections leave the node by egress and
 * are never seen here; neither is traffic the node itself sends (kubelet probes).
 *
 * Fail closed: a SYN for a slot with no listener is dropped, so a restarting agent never lets
 * traffic bypass the mesh; TCP retries the SYN.
 *
 * Cost: per IPv4 TCP packet, one or two hash lookups; per non-SYN packet of an enrolled pod
 * one socket lookup. Everything else returns at the first checks.
 * Needs: tc clsact, sockmap, bpf_sk_assign (5.7+), bpf_skc_lookup_tcp (5.2+).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

/* Defined by the loader (bpf/datapath.py), which also installs the rule: CAPTURE_MARK,
 * HBONE_PORT, and the sockmap slots OUTBOUND_SLOT, INBOUND_HBONE_SLOT, INBOUND_PLAINTEXT_SLOT. */

BPF_HASH(enrolled_pods, u32, u8, 4096);          /* local enrolled pod IPv4 (network order) -> 1 */
BPF_TABLE("sockmap", u32, int, listeners, 3);    /* the ztunnel's listening sockets, by slot */

/* Hands a SYN to the listener in `slot`; no listener means no ztunnel: drop (fail closed). */
static __always_inline int assign(struct __sk_buff *skb, u32 slot)
{
    struct bpf_sock *listener = (struct bpf_sock *)listeners.lookup(&slot);
    if (!listener)
        return TC_ACT_SHOT;
    long err = bpf_sk_assign(skb, listener, 0);
    bpf_sk_release(listener);
    if (err)
        return TC_ACT_SHOT;
    skb->mark = CAPTURE_MARK;
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
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
        return TC_ACT_OK;

    u32 saddr = ip->saddr, daddr = ip->daddr;
    int outbound = enrolled_pods.lookup(&saddr) != 0;
    if (!outbound && !enrolled_pods.lookup(&daddr))
        return TC_ACT_OK;

    /* From here on the packet belongs to an enrolled pod: a header we cannot read (IP
     * options beyond the packet, a non-first fragment) is dropped rather than let past. */
    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip) || ip->frag_off & htons(0x1FFF))
        return TC_ACT_SHOT;
    struct tcphdr *tcp = (void *)ip + ihl;
    if ((void *)(tcp + 1) > data_end)
        return TC_ACT_SHOT;

    if (tcp->syn && !tcp->ack) {
        if (outbound)
            return assign(skb, OUTBOUND_SLOT);
        return assign(skb, tcp->dest == htons(HBONE_PORT) ? INBOUND_HBONE_SLOT : INBOUND_PLAINTEXT_SLOT);
    }

    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = saddr;
    tuple.ipv4.daddr = daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;
    struct bpf_sock *owner = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (owner) {
        bpf_sk_release(owner);
        skb->mark = CAPTURE_MARK;
    }
    return TC_ACT_OK;
}
