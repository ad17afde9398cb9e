"""Router: Service load balancing, direct pod traffic, passthrough, and the errors it reports."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from registry.model import (Backend, Endpoint, OutlierSettings, RegistryState, Service, ServicePort, TrafficPolicy,
                            Workload)
from ztunnel.routing import Pool, RouteError, Router, Upstream

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


def service(name: str, ip: str, *endpoints: Endpoint, traffic: TrafficPolicy = TrafficPolicy()) -> Service:
    return replace(web(*endpoints), name=name, cluster_ip=ip, traffic=traffic)


def test_a_split_balances_over_the_chosen_backend_then_retries_on_it_then_on_the_others():
    split = TrafficPolicy(split=(Backend("shop/web-v1", 90), Backend("shop/web-v2", 10)))
    s = RegistryState(services=(
        service("web", VIP, traffic=split),
        service("web-v1", "10.96.0.11", ep("10.244.1.1"), ep("10.244.1.2"),
                traffic=TrafficPolicy(connect_timeout=0.5)),
        service("web-v2", "10.96.0.12", ep("10.244.2.1"))))
    router = Router()
    plans = [router.plan(s, VIP, 80) for _ in range(10)]
    assert Counter(p.first.service for p in plans) == {"shop/web-v1": 9, "shop/web-v2": 1}
    canary = next(p for p in plans if p.first.service == "shop/web-v2")
    # the canary's one endpoint, then the stable backend's: a dead canary costs the client nothing
    assert canary.first.ip == "10.244.2.1" and {u.ip for u in canary.candidates[1:]} == {"10.244.1.1", "10.244.1.2"}
    assert (canary.service, canary.pool("shop/web-v1").connect_timeout, canary.pool("shop/web-v2").size) == (
        "shop/web", 0.5, 1)
    stable = [p for p in plans if p.first.service == "shop/web-v1"]
    assert [u.ip for u in stable[0].candidates] == ["10.244.1.1", "10.244.1.2", "10.244.2.1"]
    assert stable[1].first.ip == "10.244.1.2"  # within the backend, its own rotation
    assert router.splits.picks("shop/web") == {"shop/web-v1": 9, "shop/web-v2": 1}


def test_a_split_whose_backends_have_no_endpoint_names_them():
    split = TrafficPolicy(split=(Backend("shop/web-v1", 1), Backend("shop/gone", 1), Backend("shop/web", 0)))
    s = RegistryState(services=(service("web", VIP, ep("10.244.1.1"), traffic=split),
                                service("web-v1", "10.96.0.11", ep("10.244.1.1", ready=False))))
    with pytest.raises(RouteError) as caught:
        Router().plan(s, VIP, 80)
    assert caught.value.reason == "no_endpoint"
    assert str(caught.value) == ("service shop/web is split to shop/web-v1 (weight 1), shop/gone (weight 1), "
                                 "shop/web (weight 0): none of weight above 0 has a ready endpoint for port 80")


def test_a_split_may_keep_the_services_own_endpoints_as_a_backend_on_another_port():
    split = TrafficPolicy(split=(Backend("shop/web", 1, port=443),))
    s = RegistryState(services=(service("web", VIP, ep("10.244.1.1"), traffic=split),))
    assert Router().plan(s, VIP, 80).first == Upstream("10.244.1.1", 8443, "service", "shop/web")


def local(ip: str, node: str | None, zone: str | None = None) -> Endpoint:
    return replace(ep(ip), node=node, zone=zone)


def test_prefer_close_stays_on_this_node_then_this_zone_and_spills_over_only_when_they_are_gone():
    close = TrafficPolicy(prefer_close=True)
    endpoints = (local("10.244.1.1", "n1", "z1"), local("10.244.1.2", "n1", "z1"), local("10.244.2.1", "n2", "z1"),
                 local("10.244.3.1", "n3", "z2"))
    router = Router("n1")
    s = RegistryState(services=(service("web", VIP, *endpoints, traffic=close),), node_zones={"n1": "z1"})
    assert {router.plan(s, VIP, 80).first.ip for _ in range(10)} == {"10.244.1.1", "10.244.1.2"}
    # a retry goes on to the next tier once this node's are tried
    assert [u.ip for u in router.plan(s, VIP, 80).candidates][2:] == ["10.244.2.1"]
    ejected = {"10.244.1.1:8080", "10.244.1.2:8080"}
    assert router.plan(s, VIP, 80, lambda key: ejected).first.ip == "10.244.2.1"  # the zone, not farther
    gone = RegistryState(services=(service("web", VIP, endpoints[3], traffic=close),))
    assert router.plan(gone, VIP, 80).first.ip == "10.244.3.1"
    spread = RegistryState(services=(service("web", VIP, *endpoints),))  # without PreferClose: everywhere
    assert {router.plan(spread, VIP, 80).first.ip for _ in range(4)} == {e.ip for e in endpoints}


def test_prefer_close_knows_an_endpoints_node_from_its_pod_when_the_endpoint_does_not_say():
    pods = (Workload(name="web-1", namespace="shop", ip="10.244.1.1", node="n1"),
            Workload(name="web-2", namespace="shop", ip="10.244.2.1", node="n2"))
    s = RegistryState(workloads=pods, services=(service("web", VIP, ep("10.244.1.1"), ep("10.244.2.1"),
                                                        traffic=TrafficPolicy(prefer_close=True)),))
    router = Router("n2")
    assert {router.plan(s, VIP, 80).first.ip for _ in range(4)} == {"10.244.2.1"}


def test_least_request_avoids_the_endpoint_with_the_most_live_connections():
    s = RegistryState(services=(service("web", VIP, ep("10.244.1.1"), ep("10.244.1.2"),
                                        traffic=TrafficPolicy(load_balancer="LEAST_REQUEST")),))
    router = Router(rng=random.Random(5))
    load = {"10.244.1.1:8080": 40}
    assert {router.plan(s, VIP, 80, load=lambda key: load).first.ip for _ in range(20)} == {"10.244.1.2"}
    assert {router.plan(s, VIP, 80).first.ip for _ in range(20)} == {"10.244.1.1", "10.244.1.2"}


def test_a_plan_carries_the_services_limits_and_settings():
    outlier = OutlierSettings(consecutive_failures=2)
    traffic = TrafficPolicy(connection_rate=20.0, max_connections=3, outlier=outlier, connect_timeout=1.5)
    plan = Router().plan(RegistryState(services=(service("web", VIP, ep("10.244.1.1"), traffic=traffic),)), VIP, 80)
    assert (plan.service, plan.rate_limit, plan.max_connections) == ("shop/web", 20.0, 3)
    assert plan.pool("shop/web") == Pool(1, outlier, 1.5)
