"""Handshakes under way are capped per source and per node; the excess is refused at once."""

from __future__ import annotations

import pytest

from ztunnel.limits import ConnectionRateLimiter, HandshakeLimiter, LiveConnections


def test_a_source_at_its_limit_is_refused_while_others_are_admitted_until_the_node_is_full():
    limiter = HandshakeLimiter(per_source=2, total=3)
    assert limiter.admit("10.0.0.1") is None and limiter.admit("10.0.0.1") is None
    refused = limiter.admit("10.0.0.1")
    assert refused == "2 TLS handshakes from 10.0.0.1 are under way (limit 2 per source)"
    assert limiter.admit("10.0.0.2") is None
    assert limiter.admit("10.0.0.3") == "3 TLS handshakes are under way on this node (limit 3)"
    assert limiter.under_way == 3


def test_a_finished_handshake_frees_its_place_and_done_without_admit_is_a_bug():
    limiter = HandshakeLimiter(per_source=1, total=1)
    assert limiter.admit("10.0.0.1") is None
    limiter.done("10.0.0.1")
    assert limiter.under_way == 0 and limiter.admit("10.0.0.2") is None
    with pytest.raises(ValueError, match="no handshake from 10.0.0.1"):
        limiter.done("10.0.0.1")


def test_limits_must_be_consistent():
    with pytest.raises(ValueError, match="per_source"):
        HandshakeLimiter(per_source=10, total=5)


def test_a_services_rate_limit_admits_a_seconds_worth_at_once_then_its_rate():
    now = [100.0]
    limiter = ConnectionRateLimiter(clock=lambda: now[0])
    assert sum(limiter.admit("shop/web", 20.0) for _ in range(50)) == 20  # the burst: one second's worth
    now[0] += 0.5
    assert sum(limiter.admit("shop/web", 20.0) for _ in range(50)) == 10  # refilled at 20/s
    assert limiter.admit("shop/other", 1.0) and not limiter.admit("shop/other", 1.0)  # each Service its own
    assert sum(limiter.admit("shop/web", 100.0) for _ in range(200)) == 100  # a changed limit starts anew


def test_a_services_connection_limit_refuses_the_one_over_it_until_one_ends():
    live = LiveConnections()
    holds = [live.hold() for _ in range(3)]
    assert [hold.admit("shop/web", 2) for hold in holds] == [True, True, False]
    assert live.by_service == {"shop/web": 2}  # the refused one took nothing
    assert live.hold().admit("shop/other", 2)  # each Service its own
    holds[0].release()
    assert holds[2].admit("shop/web", 2)
    assert all(live.hold().admit("shop/web", None) for _ in range(10))  # None: no limit


def test_a_hold_follows_its_connection_between_endpoints_and_gives_everything_back_once():
    live = LiveConnections()
    hold, other = live.hold(), live.hold()
    assert hold.admit("shop/web", None) and other.admit("shop/web", None)
    hold.connect("shop/web-v1", "10.244.1.1:8080")
    other.connect("shop/web-v1", "10.244.1.1:8080")
    assert live.endpoints("shop/web-v1") == {"10.244.1.1:8080": 2}
    hold.connect("shop/web-v1", "10.244.1.2:8080")  # a retry: the failed endpoint's count is given back
    assert live.endpoints("shop/web-v1") == {"10.244.1.1:8080": 1, "10.244.1.2:8080": 1}
    hold.release()
    hold.release()  # a second release gives back nothing more
    assert live.by_service == {"shop/web": 1} and live.endpoints("shop/web-v1") == {"10.244.1.1:8080": 1}
    other.release()
    assert live.by_service == {} and live.endpoints("shop/web-v1") == {} and live._by_endpoint == {}
