"""Bounds on what a connection may cost before it has proved anything. Pure: counts, no I/O.

A TLS handshake is the most expensive thing an unauthenticated client can make the ztunnel do
(key exchange, certificate signature and verification, the session's buffers), so handshakes
under way are capped per source address and per node; the excess is refused at once rather
than queued, so a flood costs its sender as much as the node.
"""

from __future__ import annotations

from collections import Counter


class HandshakeLimiter:
    """Counts TLS handshakes under way; `admit` a new one, `done` when it ends either way."""

    def __init__(self, per_source: int, total: int) -> None:
        if not 1 <= per_source <= total:
            raise ValueError(f"handshake limits: need 1 <= per_source ({per_source}) <= total ({total})")
        self.per_source = per_source
        self.total = total
        self._by_source: Counter[str] = Counter()
        self._under_way = 0

    @property
    def under_way(self) -> int:
        return self._under_way

    def admit(self, source_ip: str) -> str | None:
        """None if a handshake from `source_ip` may start now (and counts it); else why not."""
        if self._under_way >= self.total:
            return f"{self._under_way} TLS handshakes are under way on this node (limit {self.total})"
        if self._by_source[source_ip] >= self.per_source:
            return (f"{self._by_source[source_ip]} TLS handshakes from {source_ip} are under way "
                    f"(limit {self.per_source} per source)")
        self._by_source[source_ip] += 1
        self._under_way += 1
        return None

    def done(self, source_ip: str) -> None:
        """An admitted handshake from `source_ip` finished, failed or was abandoned."""
        if self._by_source[source_ip] <= 0:
            raise ValueError(f"no handshake from {source_ip} is under way")
        self._by_source[source_ip] -= 1
        if not self._by_source[source_ip]:
            del self._by_source[source_ip]
        self._under_way -= 1
