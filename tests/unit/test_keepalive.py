"""The HBONE keepalive's decisions, on a clock the test moves: PING a quiet peer after the
interval, give it the timeout to answer, and anything heard from it counts as an answer."""

from __future__ import annotations

import pytest

from tests.unit.clock import Clock
from ztunnel.hbone.keepalive import KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Keepalive, KeepaliveAction, KeepaliveSettings

WAIT, PING, DEAD = KeepaliveAction.WAIT, KeepaliveAction.PING, KeepaliveAction.DEAD


def test_a_session_that_hears_nothing_pings_after_the_interval_and_is_dead_after_the_timeout():
    clock = Clock()
    keepalive = Keepalive(KeepaliveSettings(), clock())
    assert keepalive.due(clock()) == (WAIT, clock.now + KEEPALIVE_INTERVAL)
    clock.now += KEEPALIVE_INTERVAL
    action, again = keepalive.due(clock())
    assert action is PING and again == clock.now + KEEPALIVE_TIMEOUT
    keepalive.pinged(clock())
    clock.now += KEEPALIVE_TIMEOUT - 0.001
    assert keepalive.due(clock()) == (WAIT, clock.now + 0.001)
    clock.now += 0.001
    assert keepalive.due(clock())[0] is DEAD
    # ztunnel's figures: a vanished peer is found within 30 s of the last thing it sent
    assert KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT <= 30


def test_anything_heard_answers_the_ping_and_puts_off_the_next():
    clock = Clock()
    keepalive = Keepalive(KeepaliveSettings(interval=10, timeout=20), clock())
    clock.now += 10
    assert keepalive.due(clock())[0] is PING
    keepalive.pinged(clock())
    clock.now += 5
    keepalive.heard(clock())  # the ACK, or a DATA frame
    assert keepalive.due(clock()) == (WAIT, clock.now + 10)
    clock.now += 19  # long past the first PING's timeout: it was answered
    assert keepalive.due(clock())[0] is PING


def test_a_busy_session_never_pings():
    clock = Clock()
    keepalive = Keepalive(KeepaliveSettings(interval=10, timeout=20), clock())
    for _ in range(100):
        clock.now += 9.9
        keepalive.heard(clock())
        assert keepalive.due(clock())[0] is WAIT


@pytest.mark.parametrize("interval, timeout", [(0, 20), (10, -1)])
def test_settings_that_are_not_positive_are_refused_naming_both(interval, timeout):
    with pytest.raises(ValueError, match=f"not {interval} and {timeout}"):
        KeepaliveSettings(interval=interval, timeout=timeout)
