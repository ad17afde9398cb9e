"""The kernel's view of a TCP socket (TCP_INFO): round-trip time, retransmits, delivery rate.

`parse_tcp_info` is pure (bytes in, figures out); `read_tcp_info` asks the kernel. The ztunnel
reads it for both sockets of a connection (the pod-facing one and the upstream one) so
`ameshctl connections` can show the network's side of a slow connection next to its own.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# struct tcp_info from <linux/tcp.h>, up to tcpi_snd_wnd (Linux 5.4+): 8 one-byte fields (two
# of them bitfields), 24 u32 (tcpi_rto .. tcpi_total_retrans), u64 pacing/max_pacing/
# bytes_acked/bytes_received, u32 segs_out/segs_in, u32 notsent_bytes/min_rtt/data_segs_in/
# data_segs_out, u64 delivery_rate, u64 busy/rwnd_limited/sndbuf_limited, u32 delivered/
# delivered_ce, u64 bytes_sent/bytes_retrans, u32 dsack_dups/reord_seen/rcv_ooopack/snd_wnd.
_LAYOUT = struct.Struct("=8B24I4Q2I4IQ3Q2I2Q4I")
TCP_INFO_SIZE = _LAYOUT.size  # 232 bytes

_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
           7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


def parse_tcp_info(raw: bytes) -> dict[str, Any]:
    """The figures amesh shows, from the bytes getsockopt(TCP_INFO) returned.

    Older kernels return a shorter struct; the missing tail reads as zero.
    """
    fields = _LAYOUT.unpack(raw[:TCP_INFO_SIZE].ljust(TCP_INFO_SIZE, b"\0"))
    u32 = fields[8:32]
    rtt_us, rttvar_us, snd_cwnd = u32[15], u32[16], u32[18]
    total_retrans = u32[23]
    bytes_acked, bytes_received = fields[34], fields[35]
    segs_out, segs_in = fields[36], fields[37]
    min_rtt_us, delivery_rate = fields[39], fields[42]
    return {
        "state": _STATES.get(fields[0], str(fields[0])),
        "rtt_ms": rtt_us / 1000,
        "rtt_var_ms": rttvar_us / 1000,
        "min_rtt_ms": min_rtt_us / 1000,
        "retransmits": total_retrans,
        "delivery_rate_bps": delivery_rate * 8,
        "snd_cwnd": snd_cwnd,
        "bytes_acked": bytes_acked,
        "bytes_received": bytes_received,
        "segs_out": segs_out,
        "segs_in": segs_in,
    }


def read_tcp_info(sock: Any) -> dict[str, Any] | None:
    """TCP_INFO of a socket (a socket.socket or asyncio's TransportSocket); None once it is gone."""
    try:
        return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))
    except (OSError, ValueError):
        return None
