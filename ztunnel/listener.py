"""Listening sockets for the ports the BPF programs deliver captured connections to."""

from __future__ import annotations

import socket

# Not exported by Python's socket module; from <linux/in.h>.
IP_TRANSPARENT = 19


def transparent_listener(port: int, backlog: int = 4096, host: str = "0.0.0.0") -> socket.socket:
    """A TCP listener on `host`:`port` that accepts connections addressed to any IP.

    IP_TRANSPARENT lets the socket own connections whose destination is not a local address
    (bpf_sk_assign hands it SYNs for Service IPs and remote pods); the accepted socket's
    local address is then the connection's original destination.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
