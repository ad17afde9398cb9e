"""Listening sockets for the ports the BPF programs deliver captured connections to."""

from __future__ import annotations

import socket
import time
from typing import Callable

# Not exported by Python's socket module; from <linux/in.h>.
IP_TRANSPARENT = 19


def transparent_listener(port: int, backlog: int = 4096, host: str = "0.0.0.0") -> socket.socket:
    """A TCP listener on `host`:`port` that accepts connections addressed to any IP.

    IP_TRANSPARENT lets the socket own connections whose destination is not a local address
    (bpf_sk_assign hands it SYNs for Service IPs and remote pods); the accepted socket's
    local address is then the connection's original destination. SO_REUSEPORT lets the node's
    next agent listen on the same port while this one drains (an upgrade).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NodeAddresses:
    """This network namespace's own IPv4 addresses, read at most once per `max_age` seconds:
    the outbound listener asks only for connections to the ztunnel's own ports, so a refresh per
    second bounds the cost and still follows address changes. Read from /proc/net/fib_trie (the
    kernel's local routes), a file read on the event loop's thread, where netlink libraries that
    run their own event loop cannot be used."""

    def __init__(self, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 path: str = "/proc/net/fib_trie") -> None:
        self._max_age = max_age
        self._clock = clock
        self._path = path
        self._addresses: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def __call__(self) -> frozenset[str]:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._max_age:
            with open(self._path) as trie:
                self._addresses = local_addresses(trie.read())
            self._read_at = now
        return self._addresses


def local_addresses(fib_trie: str) -> frozenset[str]:
    """The addresses /proc/net/fib_trie lists as local ("|-- 10.0.0.1" then "/32 host LOCAL")."""
    found, last = set(), ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text == "/32 host LOCAL" and last:
            found.add(last)
    return frozenset(found)
