"""Handshakes under way are capped per source and per node; the excess is refused at once."""

from __future__ import annotations

import pytest

from ztunnel.limits import ConnectionRateLimiter, HandshakeLimiter


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
