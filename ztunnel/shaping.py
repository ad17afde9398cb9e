"""Every decision about a new outbound connection before its first connect, in one sans-I/O
class: where it may go (the Router's plan: split, locality, balancer), whether the destination
Service takes it now (its connection limit, then its rate limit), and the walk over the plan
(`Attempts`: retries within the budget, what each outcome tells the breakers). The outbound
listener asks once per connection and only connects; views, metrics and the benchmarks read the
same state.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Callable

from registry.model import CONNECTION_RATE_ANNOTATION, RegistryState
from ztunnel.errors import ProxyError
from ztunnel.limits import ConnectionRateLimiter, Hold, LiveConnections, worker_share
from ztunnel.outliers import OutlierDetector
from ztunnel.retries import Attempts, RetryBudget
from ztunnel.routing import Router


class RateLimited(ProxyError):
    """Over the destination Service's connection rate limit: refused at once, never queued."""


class Overflow(ProxyError):
    """Over the destination Service's connection limit on this node: refused at once, never queued."""


class TrafficShaper:
    """The traffic-shaping state of one node's outbound side: balancer turns and splits, retry
    budgets, rate buckets, breakers, live counts; time from `clock`, randomness from `rng`. One of
    `workers` worker processes holds the node's per-Service limits in equal shares."""

    def __init__(self, node: str, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, workers: int = 1) -> None:
        self.router = Router(node, rng)
        self.budget = RetryBudget(clock=clock)
        self.rates = ConnectionRateLimiter(clock)
        self.outliers = OutlierDetector(clock)  # the breaker of every Service endpoint
        self.live = LiveConnections()  # per destination Service and per endpoint
        self._clock = clock
        self._workers = workers

    def admit(self, state: RegistryState, dst_ip: str, dst_port: int, hold: Hold, counts: Counter[str],
              record: list[dict[str, str]], deadline: float) -> Attempts:
        """The walk over the plan of a connection to `dst_ip`:`dst_port`, whose place among its
        Service's live connections `hold` now keeps; RouteError, Overflow or RateLimited when it
        cannot go. `counts` and `record` hear of each attempt; `deadline` seconds for them all."""
        plan = self.router.plan(state, dst_ip, dst_port, self.outliers.unavailable, self.live.endpoints)
        service = plan.service
        if service is not None:
            # the connection limit first: a connection it refuses spends no token of the rate
            limit = plan.max_connections
            if not hold.admit(service, None if limit is None else worker_share(limit, self._workers)):
                raise Overflow("upstream_overflow", f"service {service} has {plan.max_connections} live connections "
                                                    "from this node, its limit (DestinationRule trafficPolicy."
                                                    "connectionPool.tcp.maxConnections)")
            if plan.rate_limit is not None and not self.rates.admit(service, plan.rate_limit / self._workers):
                raise RateLimited("rate_limited", f"service {service} takes at most {plan.rate_limit:g} new "
                                                  f"connections a second from each node (annotation "
                                                  f"{CONNECTION_RATE_ANNOTATION})")
        return Attempts(plan, self.budget, self.outliers, hold, counts, record, deadline, self._clock)
