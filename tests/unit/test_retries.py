"""The retry budget: a fifth of a Service's connections over 10 s plus a small floor, per Service."""

from __future__ import annotations

from ztunnel.retries import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


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
