"""Retries without sockets: the budget (a fifth of a Service's connections over 10 s plus a
floor, per Service) and one connection's walk over its plan, on a fake clock."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.unit.clock import Clock
from ztunnel.errors import ProxyError
from ztunnel.outliers import OutlierDetector
from ztunnel.limits import LiveConnections
from ztunnel.retries import Attempts, RetryBudget
from ztunnel.routing import Plan, Pool, Upstream


def test_retries_stay_within_the_floor_plus_a_fifth_of_the_connections_of_the_window():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10, clock=clock)
    for _ in range(100):
        budget.connection("shop/web")
    allowed = sum(budget.try_retry("shop/web") for _ in range(100))
    assert allowed == 10 + 20  # the floor (1/s over 10 s) and a fifth of 100
    assert budget.try_retry("shop/other")  # each Service has its own budget


def test_the_budget_refills_as_the_window_moves_on():
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.5, window=4, clock=clock)
    assert [budget.try_retry("web") for _ in range(3)] == [True, True, False]
    clock.now += 3  # the first retries are still in the window
    assert not budget.try_retry("web")
    clock.now += 1  # now they are not
    assert budget.try_retry("web")


def attempts_over(endpoints: int, budget: RetryBudget | None = None, deadline: float = 10.0,
                  clock: Clock | None = None) -> tuple[Attempts, OutlierDetector, Counter, list]:
    clock = clock or Clock()
    plan = Plan(tuple(Upstream(f"10.244.2.{i}", 8080, "service", "shop/web") for i in range(endpoints)),
                endpoints, {"shop/web": Pool(endpoints)}, "shop/web")
    outliers, counts, record = OutlierDetector(clock=clock), Counter(), []
    return (Attempts(plan, budget or RetryBudget(clock=clock), outliers, LiveConnections().hold(), counts, record,
                     deadline, clock), outliers, counts, record)


REFUSED = ProxyError("connect_refused", "refused")


def test_a_retriable_failure_goes_on_to_the_next_endpoint_and_a_success_ends_the_walk():
    attempts, outliers, counts, record = attempts_over(3)
    tried = []
    for route in attempts:
        tried.append(route.ip)
        if len(tried) < 2:
            assert attempts.failed(route, REFUSED)
            continue
        attempts.succeeded(route)
        break
    assert tried == ["10.244.2.0", "10.244.2.1"]
    assert record == [{"upstream": "10.244.2.0:8080", "result": "connect_refused"},
                      {"upstream": "10.244.2.1:8080", "result": "ok"}]
    assert counts == {"connect_refused": 1, "ok": 1}


def test_no_retry_after_a_policy_denial_the_last_candidate_or_the_deadline():
    attempts, outliers, _, _ = attempts_over(3)
    first = next(iter(attempts))
    assert not attempts.failed(first, ProxyError("policy_denied", "denied"))
    assert outliers.state(("shop/web", first.address)) == "CLOSED"
    attempts, _, _, _ = attempts_over(1)
    assert not attempts.failed(next(iter(attempts)), REFUSED)  # nothing else to try
    clock = Clock()
    attempts, _, _, _ = attempts_over(3, deadline=2.0, clock=clock)
    route = next(iter(attempts))
    clock.now += 2.5
    assert attempts.time_left() == 0 and not attempts.failed(route, REFUSED)


def test_a_spent_budget_stops_retries_and_is_counted():
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10, clock=clock)  # one retry in 10 s
    attempts, _, counts, _ = attempts_over(3, budget=budget, clock=clock)
    walk = iter(attempts)
    assert attempts.failed(next(walk), REFUSED)
    assert not attempts.failed(next(walk), REFUSED)
    assert counts["retry_budget_spent"] == 1


def test_the_endpoints_own_failures_open_its_breaker():
    clock = Clock()
    attempts, outliers, _, _ = attempts_over(4, clock=clock)
    route = next(iter(attempts))
    for _ in range(5):
        attempts.failed(route, REFUSED)
    assert outliers.state(("shop/web", route.address)) == "OPEN"


def test_an_attempt_takes_its_services_connect_timeout_within_what_is_left_of_the_deadline():
    clock = Clock()
    plan = Plan((Upstream("10.244.2.1", 8080, "service", "shop/web"), Upstream("10.96.9.9", 80, "passthrough")), 2,
                {"shop/web": Pool(1, connect_timeout=0.5)}, "shop/web")
    attempts = Attempts(plan, RetryBudget(clock=clock), OutlierDetector(clock=clock), LiveConnections().hold(),
                        Counter(), [], 2.0, clock)
    service_route, passthrough = plan.candidates
    assert attempts.timeout(service_route, 5.0) == 0.5  # the DestinationRule's connectTimeout
    assert attempts.timeout(passthrough, 5.0) == 2.0  # the agent's 5 s, cut to the 2 s left
    clock.now += 1.8
    assert attempts.timeout(service_route, 5.0) == pytest.approx(0.2)
