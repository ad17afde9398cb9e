/*
 * capture.c: hands the TCP connections that enrolled pods open to the node's ztunnel.
 *
 * Attaches at tc (clsact) ingress of the interface a pod's packets enter the node by: the
 * host-side veth on point-to-point pod networks, the bridge device on bridged ones. Pods are
 * selected by source address (enrolled_pods), so one program serves both layouts.
 *
 * For a pod's SYN it assigns the ztunnel's outbound listener (held in outbound_listener) with
 * bpf_sk_assign and marks the packet; the node's policy rule (fwmark -> a table whose only
 * route is "local 0.0.0.0/0") then delivers it locally, so the listener accepts a socket
 * whose local address is the original destination. Later packets of a captured connection
 * are only marked: the kernel's own lookup finds the ztunnel's established socket. Packets
 * of connections the ztunnel does not own (opened before enrollment, or replies to
 * connections into the pod) pass untouched, so enrolling a pod cuts nothing.
 *
 * Fail closed: a SYN from an enrolled pod while no listener is present is dropped, so a
 * restarting agent never lets a pod bypass the mesh; the pod's TCP retries the SYN.
 *
 * Cost: per TCP packet of an enrolled pod, one hash lookup; per non-SYN packet one socket
 * lookup. Everything that is not IPv4 TCP from an enrolled pod returns at the first checks.
 * Needs: tc clsact, sockmap, bpf_sk_assign (5.7+), bpf_skc_lookup_tcp (5.2+).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

/* CAPTURE_MARK is defined by the loader (bpf/capture.py), which also installs the rule. */

BPF_HASH(enrolled_pods, u32, u8, 4096);          /* pod IPv4 (network order) -> 1 */
BPF_TABLE("sockmap", u32, int, outbound_listener, 1);

int capture(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
        return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > data_end)
        return TC_ACT_OK;

    u32 saddr = ip->saddr;
    if (!enrolled_pods.lookup(&saddr))
        return TC_ACT_OK;

    if (tcp->syn && !tcp->ack) {
        u32 key = 0;
        struct bpf_sock *listener = (struct bpf_sock *)outbound_listener.lookup(&key);
        if (!listener)
            return TC_ACT_SHOT;
        long err = bpf_sk_assign(skb, listener, 0);
        bpf_sk_release(listener);
        if (err)
            return TC_ACT_SHOT;
        skb->mark = CAPTURE_MARK;
        return TC_ACT_OK;
    }

    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;
    struct bpf_sock *owner = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (owner) {
        bpf_sk_release(owner);
        skb->mark = CAPTURE_MARK;
    }
    return TC_ACT_OK;
}
