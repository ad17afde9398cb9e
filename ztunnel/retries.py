"""Connect retries: the budget that bounds them per destination Service, and `Attempts`, one
connection's walk over its plan.

A retry costs the failing Service another connect; when every endpoint of a Service fails, each
client connection would make `attempts` connects, a retry storm that keeps it down. As
linkerd2-proxy's budgets do, retries are allowed while they stay under `ratio` of the
connections to that Service in the last `window` seconds, plus a floor of `min_per_second` so a
quiet Service can still retry. Pure: counts in one-second buckets, time from the clock given.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Callable, Iterator

from ztunnel.errors import ProxyError
from ztunnel.limits import Hold
from ztunnel.outliers import OutlierDetector
from ztunnel.routing import Plan, Upstream

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


class Attempts:
    """One connection's connects over its plan, sans I/O: which endpoint comes next, whether a
    failure is tried again elsewhere, and what each outcome tells the endpoint's breaker and
    the counters. The listener only connects:

        for route in attempts:
            try: stream = await connect(route, attempts.timeout(route, default))
            except ProxyError as e:
                if attempts.failed(route, e): continue
                raise
            except BaseException: attempts.abandoned(route); raise
            attempts.succeeded(route)

    A failure is retried when it is retriable (the failure table says so: nothing of the
    client's reached an upstream), another candidate is left, the deadline is not over and the
    Service's retry budget allows (the Service dialled: a split's, not its backend's); only
    failures that are the endpoint's own count against it, judged by its own Service's settings.
    The connection's `hold` follows it from endpoint to endpoint, for the live counts.
    """

    def __init__(self, plan: Plan, budget: RetryBudget, outliers: OutlierDetector, hold: Hold,
                 counts: Counter[str], record: list[dict[str, str]], deadline: float,
                 clock: Callable[[], float]) -> None:
        self._plan, self._budget, self._outliers, self._hold = plan, budget, outliers, hold
        self._counts, self._record = counts, record
        self._clock = clock
        self._ends = clock() + deadline
        self._service = plan.service
        if self._service is not None:
            budget.connection(self._service)

    def __iter__(self) -> Iterator[Upstream]:
        for route in self._plan.candidates:
            if route.service is not None:
                self._outliers.begin(_breaker(route))
                self._hold.connect(route.service, route.address)
            yield route

    def time_left(self) -> float:
        return max(0.0, self._ends - self._clock())

    def timeout(self, route: Upstream, default: float) -> float:
        """Seconds the connect to `route` may take: its Service's connect timeout (else
        `default`), within what is left of the deadline."""
        timeout = self._plan.pool(route.service).connect_timeout if route.service is not None else None
        return max(0.0, min(default if timeout is None else timeout, self.time_left()))

    def succeeded(self, route: Upstream) -> None:
        if route.service is not None:
            self._judge(route, True)
        self._outcome(route, "ok")

    def failed(self, route: Upstream, error: ProxyError) -> bool:
        """Whether to try the next candidate after `error` from `route`."""
        info = error.info
        if route.service is not None:
            if info.retriable and info.fault in ("upstream", "peer"):
                self._judge(route, False)
            else:  # not the endpoint's doing (a policy, the client, this node)
                self._outliers.release(_breaker(route))
        self._outcome(route, error.reason)
        if not (info.retriable and self._service is not None and route is not self._plan.candidates[-1]
                and self.time_left() > 0):
            return False
        if self._budget.try_retry(self._service):
            return True
        self._counts["retry_budget_spent"] += 1
        return False

    def abandoned(self, route: Upstream) -> None:
        """The connect to `route` was cancelled: it says nothing of the endpoint."""
        if route.service is not None:
            self._outliers.release(_breaker(route))

    def _judge(self, route: Upstream, ok: bool) -> None:
        pool = self._plan.pool(route.service)  # type: ignore[arg-type]
        self._outliers.record(_breaker(route), ok, pool.size, pool.outlier)

    def _outcome(self, route: Upstream, result: str) -> None:
        self._record.append({"upstream": route.address, "result": result})
        self._counts[result] += 1


def _breaker(route: Upstream) -> tuple[str, str]:
    return (route.service or "", route.address)
