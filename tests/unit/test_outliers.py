"""The breaker of each endpoint, on a fake clock: Envoy's consecutive-failure ejection, growing
ejection times, one half-open trial, and max_ejection_percent."""

from __future__ import annotations

from tests.unit.clock import Clock
from registry.model import OutlierSettings
from ztunnel.outliers import OutlierDetector

A, B, C, D = (("shop/web", f"10.244.2.{i}:8080") for i in range(1, 5))


def detector(clock: Clock) -> OutlierDetector:
    return OutlierDetector(clock=clock)  # Envoy's defaults: 5 failures, 30 s x ejections up to 300 s, 50 %


def fail(outliers: OutlierDetector, key, times: int, endpoints: int = 4) -> None:
    for _ in range(times):
        assert outliers.begin(key)
        outliers.record(key, False, endpoints)


def test_five_failures_in_a_row_open_the_breaker_a_success_between_resets_the_count():
    clock = Clock()
    outliers = detector(clock)
    fail(outliers, A, 4)
    outliers.record(A, True, 4)
    fail(outliers, A, 4)
    assert outliers.state(A) == "CLOSED"
    fail(outliers, A, 1)
    assert outliers.state(A) == "OPEN" and not outliers.available(A) and not outliers.begin(A)
    assert outliers.ejected_until(A) == 1030 and outliers.ejections_total == {"shop/web": 1}


def test_after_the_ejection_one_trial_decides_and_each_ejection_lasts_longer():
    clock = Clock()
    outliers = detector(clock)
    fail(outliers, A, 5)
    clock.now = 1030
    assert outliers.state(A) == "HALF-OPEN" and outliers.begin(A)
    assert not outliers.begin(A)  # one trial at a time
    outliers.record(A, False, 4)  # the trial failed: open again, twice as long
    assert outliers.state(A) == "OPEN" and outliers.ejected_until(A) == 1090
    clock.now = 1090
    assert outliers.begin(A)
    outliers.record(A, True, 4)
    assert outliers.state(A) == "CLOSED" and outliers.begin(A)


def test_a_released_trial_is_free_again():
    clock = Clock()
    outliers = detector(clock)
    fail(outliers, A, 5)
    clock.now = 1030
    assert outliers.begin(A)
    outliers.release(A)  # e.g. the client left while it connected
    assert outliers.available(A) and outliers.begin(A)


def test_never_more_than_max_ejection_percent_of_a_services_endpoints_is_ejected():
    clock = Clock()
    outliers = detector(clock)
    for key in (A, B, C, D):
        fail(outliers, key, 5)
    assert [outliers.state(k) for k in (A, B, C, D)] == ["OPEN", "OPEN", "CLOSED", "CLOSED"]
    assert outliers.ejected("shop/web") == 2
    assert outliers.unavailable("shop/web") == {A[1], B[1]} and outliers.unavailable("shop/other") == set()
    lone = ("shop/db", "10.244.3.1:5432")
    fail(outliers, lone, 20, endpoints=1)
    assert outliers.state(lone) == "CLOSED"  # a Service's only endpoint is never ejected


def test_ejection_time_is_capped_and_forgotten_after_a_long_healthy_run():
    clock = Clock()
    outliers = detector(clock)
    for _ in range(12):
        fail(outliers, A, 5 if outliers.state(A) == "CLOSED" else 1)
        clock.now = outliers.ejected_until(A)
    assert outliers.ejected_until(A) - clock.now == 0  # we stand at its end
    fail(outliers, A, 1)
    assert outliers.ejected_until(A) - clock.now == 300  # capped
    clock.now += 300
    outliers.record(A, True, 4)
    clock.now += 300
    outliers.record(A, True, 4)  # healthy for max_ejection_time: the past is forgotten
    fail(outliers, A, 5)
    assert outliers.ejected_until(A) - clock.now == 30


def test_each_services_own_settings_decide_its_endpoints_ejection():
    clock = Clock()
    outliers = detector(clock)
    strict = OutlierSettings(consecutive_failures=2, base_ejection_time=10, max_ejection_time=15,
                             max_ejection_percent=100)
    for _ in range(2):
        outliers.record(A, False, 1, strict)
    assert outliers.state(A) == "OPEN" and outliers.ejected_until(A) == clock.now + 10
    clock.now += 10
    assert outliers.begin(A)
    outliers.record(A, False, 1, strict)  # a failed trial: 2 x 10 s, capped at 15 s
    assert outliers.ejected_until(A) == clock.now + 15
    for _ in range(2):
        outliers.record(B, False, 4)  # the defaults: five in a row
    assert outliers.state(B) == "CLOSED"


def test_a_service_whose_settings_say_zero_failures_never_ejects():
    outliers = detector(Clock())
    for _ in range(20):
        outliers.record(A, False, 4, OutlierSettings(consecutive_failures=0))
    assert outliers.state(A) == "CLOSED"
