"""Listening sockets for the ports the BPF programs deliver captured connections to."""

from __future__ import annotations

import socket
import time
from typing import Callable

from pyroute2 import IPRoute

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


class NodeAddresses:
    """This network namespace's own IPv4 addresses, read over netlink at most once per
    `max_age` seconds: the outbound listener asks only for connections to the ztunnel's own
    ports, so a refresh per second bounds the cost and still follows address changes."""

    def __init__(self, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age
        self._clock = clock
        self._addresses: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def __call__(self) -> frozenset[str]:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._max_age:
            with IPRoute() as ipr:
                self._addresses = frozenset(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET))
            self._read_at = now
        return self._addresses
