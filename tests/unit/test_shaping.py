"""The decisions before a connection's first connect, without sockets: the plan, the connection
limit and then the rate limit of the Service dialled, and the walk the listener carries out."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from registry.model import Endpoint, RegistryState, Service, ServicePort, TrafficPolicy
from tests.unit.clock import Clock
from ztunnel.errors import ProxyError
from ztunnel.shaping import TrafficShaper

VIP = "10.96.0.10"


def shop(traffic: TrafficPolicy) -> RegistryState:
    endpoints = tuple(Endpoint(f"10.244.2.{i}", {"http": 8080}) for i in (1, 2))
    return RegistryState(services=(Service("web", "shop", VIP, (ServicePort(80, "http", "http"),), endpoints=endpoints,
                                           traffic=traffic),))


def admit(shaper: TrafficShaper, state: RegistryState, counts: Counter[str] | None = None):
    hold = shaper.live.hold()
    return shaper.admit(state, VIP, 80, hold, counts if counts is not None else Counter(), [], 10.0), hold


def refusal(shaper: TrafficShaper, state: RegistryState) -> str:
    """Why a connection is refused; what it held is given back, as the listener does."""
    hold = shaper.live.hold()
    with pytest.raises(ProxyError) as caught:
        shaper.admit(state, VIP, 80, hold, Counter(), [], 10.0)
    hold.release()
    return caught.value.reason


def test_the_connection_over_the_limit_is_refused_and_spends_no_token_of_the_rate():
    clock = Clock()
    shaper = TrafficShaper("n1", clock, random.Random(1))
    state = shop(TrafficPolicy(max_connections=2, connection_rate=3.0))
    held = [admit(shaper, state)[1] for _ in range(2)]
    assert refusal(shaper, state) == "upstream_overflow"
    assert shaper.live.by_service == {"shop/web": 2}
    held[0].release()
    admit(shaper, state)  # the third token: the refused connection took none
    held[1].release()
    assert refusal(shaper, state) == "rate_limited"  # places are free, the bucket is empty
    clock.now += 1 / 3  # the bucket refills at 3/s
    admit(shaper, state)
    assert shaper.live.by_service == {"shop/web": 2}


def test_a_walk_follows_the_plan_and_its_hold_counts_the_endpoint_it_is_on():
    shaper = TrafficShaper("n1", Clock(), random.Random(1))
    counts: Counter[str] = Counter()
    attempts, hold = admit(shaper, shop(TrafficPolicy()), counts)
    route = next(iter(attempts))
    assert shaper.live.endpoints("shop/web") == {route.address: 1}
    attempts.succeeded(route)
    hold.release()
    assert counts == {"ok": 1} and shaper.live.by_service == {} and shaper.live.endpoints("shop/web") == {}
