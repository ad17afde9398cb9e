"""The retry budget: how many failed upstream connects may be retried, per destination Service.

A retry costs the failing Service another connect; when every endpoint of a Service fails, each
client connection would make `attempts` connects, a retry storm that keeps it down. As
linkerd2-proxy's budgets do, retries are allowed while they stay under `ratio` of the
connections to that Service in the last `window` seconds, plus a floor of `min_per_second` so a
quiet Service can still retry. Pure: counts in one-second buckets, time from the clock given.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

RETRY_RATIO = 0.2  # retries at most a fifth of the connections of the window...
RETRY_FLOOR = 10.0  # ...plus this many per second (linkerd2-proxy's default), so a quiet Service may retry
RETRY_WINDOW = 10  # seconds of connections and retries the budget looks back on


class RetryBudget:
    """Connections and retries per Service over the last `window` seconds."""

    def __init__(self, ratio: float = RETRY_RATIO, min_per_second: float = RETRY_FLOOR,
                 window: int = RETRY_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.min_per_second, self.window = ratio, min_per_second, window
        self._clock = clock
        # service -> buckets of [second, connections, retries], oldest first, within the window
        self._buckets: dict[str, deque[list[int]]] = {}

    def connection(self, service: str) -> None:
        """A new connection to `service` (its first attempt)."""
        self._bucket(service)[1] += 1

    def try_retry(self, service: str) -> bool:
        """Whether `service`'s budget allows one more retry now; if so it is spent."""
        buckets = self._buckets_of(service)
        connections = sum(b[1] for b in buckets)
        retries = sum(b[2] for b in buckets)
        if retries >= self.min_per_second * self.window + self.ratio * connections:
            return False
        self._bucket(service)[2] += 1
        return True

    def _bucket(self, service: str) -> list[int]:
        buckets = self._buckets_of(service)
        second = int(self._clock())
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def _buckets_of(self, service: str) -> deque[list[int]]:
        buckets = self._buckets.setdefault(service, deque())
        oldest = int(self._clock()) - self.window + 1
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()
        return buckets
