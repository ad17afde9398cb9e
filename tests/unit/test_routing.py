"""Router: Service load balancing, direct pod traffic, passthrough, and the errors it reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from registry.model import Endpoint, RegistryState, Service, ServicePort, TrafficPolicy, Workload
from ztunnel.routing import RouteError, Router, Upstream

VIP = "10.96.0.10"


def web(*endpoints: Endpoint) -> Service:
    return Service(
        name="web",
        namespace="shop",
        cluster_ip=VIP,
        ports=(
            ServicePort(port=80, target_port="http", name="http"),
            ServicePort(port=443, target_port=8443, name="https"),
        ),
        endpoints=endpoints,
    )


def ep(ip: str, http: int = 8080, ready: bool = True, workload: str | None = None) -> Endpoint:
    return Endpoint(ip=ip, ports={"http": http, "https": 8443}, ready=ready, workload=workload)


def state(*endpoints: Endpoint, workloads: tuple[Workload, ...] = ()) -> RegistryState:
    return RegistryState(workloads=workloads, services=(web(*endpoints),))


def test_service_port_maps_to_endpoint_port_by_service_port_name() -> None:
    s = state(ep("10.244.1.5", http=8080, workload="shop/web-1"))
    router = Router()
    assert router.plan(s, VIP, 80).first == Upstream("10.244.1.5", 8080, "service", "shop/web", "shop/web-1")
    assert router.plan(s, VIP, 443).first.port == 8443


def test_endpoint_workload_falls_back_to_registry_by_ip() -> None:
    pod = Workload(name="web-1", namespace="shop", ip="10.244.1.5", node="n1")
    s = state(ep("10.244.1.5"), workloads=(pod,))
    assert Router().plan(s, VIP, 80).first.workload == "shop/web-1"


def test_round_robin_alternates_between_two_endpoints() -> None:
    s = state(ep("10.244.1.5"), ep("10.244.2.7"))
    router = Router()
    picks = [router.plan(s, VIP, 80).first.ip for _ in range(4)]
    assert picks == ["10.244.1.5", "10.244.2.7", "10.244.1.5", "10.244.2.7"]


def test_rotation_is_per_service_port() -> None:
    s = state(ep("10.244.1.5"), ep("10.244.2.7"))
    router = Router()
    assert router.plan(s, VIP, 80).first.ip == "10.244.1.5"
    assert router.plan(s, VIP, 443).first.ip == "10.244.1.5"


def test_not_ready_endpoints_are_skipped() -> None:
    s = state(ep("10.244.1.5", ready=False), ep("10.244.2.7"))
    router = Router()
    assert {router.plan(s, VIP, 80).first.ip for _ in range(4)} == {"10.244.2.7"}


def test_endpoint_without_the_service_port_is_skipped() -> None:
    other = Endpoint(ip="10.244.3.3", ports={"https": 8443})
    s = state(other, ep("10.244.2.7"))
    router = Router()
    assert {router.plan(s, VIP, 80).first.ip for _ in range(4)} == {"10.244.2.7"}


def test_no_ready_endpoint_is_an_error() -> None:
    s = state(ep("10.244.1.5", ready=False))
    with pytest.raises(RouteError) as caught:
        Router().plan(s, VIP, 80).first
    assert caught.value.reason == "no_endpoint"
    assert str(caught.value) == "service shop/web has no ready endpoint for port 80"


def test_port_the_service_does_not_expose_is_an_error() -> None:
    s = state(ep("10.244.1.5"))
    with pytest.raises(RouteError) as caught:
        Router().plan(s, VIP, 8081).first
    assert caught.value.reason == "no_service_port"
    assert str(caught.value) == "service shop/web does not expose port 8081"


def test_known_workload_ip_goes_direct_to_the_dialled_port() -> None:
    pod = Workload(name="db-0", namespace="data", ip="10.244.4.4", node="n2")
    s = state(workloads=(pod,))
    assert Router().plan(s, "10.244.4.4", 5432).first == Upstream("10.244.4.4", 5432, "workload", None, "data/db-0")


def test_unknown_destination_passes_through() -> None:
    assert Router().plan(state(), "93.184.216.34", 443).first == Upstream("93.184.216.34", 443, "passthrough")


def test_rotation_stays_fair_when_endpoints_change() -> None:
    router = Router()
    two = state(ep("10.244.1.1"), ep("10.244.1.2"))
    for _ in range(3):  # leave the rotation mid-cycle
        router.plan(two, VIP, 80).first

    three = state(ep("10.244.1.3"), ep("10.244.1.1"), ep("10.244.1.2"))  # order in registry is irrelevant
    counts = Counter(router.plan(three, VIP, 80).first.ip for _ in range(30))
    assert counts == {"10.244.1.1": 10, "10.244.1.2": 10, "10.244.1.3": 10}

    one_gone = state(ep("10.244.1.1"), ep("10.244.1.3"))
    picks = [router.plan(one_gone, VIP, 80).first.ip for _ in range(4)]
    assert sorted(picks) == ["10.244.1.1", "10.244.1.1", "10.244.1.3", "10.244.1.3"]
    assert picks[0] != picks[1]


def test_a_plan_offers_other_endpoints_in_rotation_order_up_to_the_services_attempts() -> None:
    endpoints = [ep(f"10.244.1.{i}") for i in range(1, 6)]
    router = Router()
    first, second = router.plan(state(*endpoints), VIP, 80), router.plan(state(*endpoints), VIP, 80)
    assert [u.ip for u in first.candidates] == ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
    assert [u.ip for u in second.candidates] == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    assert first.attempts == 3
    single = Router().plan(state(ep("10.244.1.1")), VIP, 80)
    assert (len(single.candidates), single.attempts) == (1, 1)  # a retry must go to another endpoint
    no_retries = RegistryState(services=(replace(web(*endpoints), traffic=TrafficPolicy(connect_attempts=1)),))
    assert len(Router().plan(no_retries, VIP, 80).candidates) == 1
    pod = Router().plan(state(), "10.244.9.9", 80)
    assert (len(pod.candidates), pod.attempts) == (1, 1)
