"""Bounds on what connections may cost. Pure: counts and token buckets, time from a clock given.

- HandshakeLimiter: a TLS handshake is the most expensive thing an unauthenticated client can
  make the ztunnel do (key exchange, certificate signature and verification, the session's
  buffers), so handshakes under way are capped per source address and per node; the excess is
  refused at once rather than queued, so a flood costs its sender as much as the node.
- ConnectionRateLimiter: new connections per second to a Service, as its owner allows them.
- LiveConnections: connections open now per destination Service (its DestinationRule's
  maxConnections caps them: Envoy's circuit-breaker threshold) and per Service endpoint (what
  LEAST_REQUEST balances on), each connection's share held by one `Hold` until it ends.
- TokenBucket: the rate both of these and the HTTP/2 frame budgets are measured with.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Mapping


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


def worker_share(limit: int, workers: int) -> int:
    """One worker process's part of a per-node count limit: an even split rounded up, at least 1,
    so the node as a whole admits at most `limit + workers - 1` (README, "The worker model")."""
    return limit if workers == 1 else max(1, -(-limit // workers))


class TokenBucket:
    """`burst` events at once, refilled at `per_second`; `take()` says whether one may happen now."""

    def __init__(self, burst: int, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.per_second, self._clock = burst, per_second, clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spends a token; False (nothing spent) if none is left."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class ConnectionRateLimiter:
    """New connections per second per destination Service on this node: a token bucket each,
    whose burst is one second's worth; over it a connection is refused at once, never queued."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, service: str, per_second: float) -> bool:
        """Whether a new connection to `service`, limited to `per_second`, may go now."""
        bucket = self._buckets.get(service)
        if bucket is None or bucket.per_second != per_second:  # new, or its annotation changed
            bucket = self._buckets[service] = TokenBucket(max(1, round(per_second)), per_second, self._clock)
        return bucket.take()


_NONE: Mapping[str, int] = {}  # the live counts of a Service no connection goes to


class LiveConnections:
    """Live outbound connections from this node, per destination Service and per Service
    endpoint: plain counters a connection's `Hold` moves, so reading them costs no scan of the
    connection table. An endpoint counts from the start of the connect to it."""

    def __init__(self) -> None:
        self.by_service: Counter[str] = Counter()  # the Service dialled -> connections (connecting or open)
        self._by_endpoint: dict[str, Counter[str]] = {}  # endpoint's Service -> "ip:port" -> connections

    def endpoints(self, service: str) -> Mapping[str, int]:
        """Live connections to each endpoint ("ip:port") of `service`; absent ones have none."""
        return self._by_endpoint.get(service, _NONE)

    def hold(self) -> Hold:
        """What one new connection holds: nothing yet."""
        return Hold(self)

    def _add(self, service: str, address: str, n: int) -> None:
        counts = self._by_endpoint.get(service)
        if counts is None:
            counts = self._by_endpoint[service] = Counter()
        counts[address] += n
        if counts[address] <= 0:
            del counts[address]
            if not counts:
                del self._by_endpoint[service]


class Hold:
    """One connection's share of the live counts: its destination Service once admitted, the
    endpoint it connects or is connected to. `release()` gives back all of it; the listener
    calls it once whatever way the connection ends, and a second call gives back nothing."""

    def __init__(self, live: LiveConnections) -> None:
        self._live = live
        self._service: str | None = None
        self._endpoint: tuple[str, str] | None = None

    def admit(self, service: str, limit: int | None) -> bool:
        """Takes a place among `service`'s live connections; False (nothing taken) when `limit`
        of them are live already."""
        if limit is not None and self._live.by_service[service] >= limit:
            return False
        self._live.by_service[service] += 1
        self._service = service
        return True

    def connect(self, service: str, address: str) -> None:
        """The connection now goes to `address`, an endpoint of `service` (instead of the last one)."""
        self._leave_endpoint()
        self._live._add(service, address, 1)
        self._endpoint = (service, address)

    def release(self) -> None:
        """The connection ended: what it held is given back, once."""
        self._leave_endpoint()
        if self._service is not None:
            live = self._live.by_service
            live[self._service] -= 1
            if not live[self._service]:
                del live[self._service]
            self._service = None

    def _leave_endpoint(self) -> None:
        if self._endpoint is not None:
            self._live._add(*self._endpoint, -1)
            self._endpoint = None
