"""HTTP/2 PING keepalive of pooled client sessions, as a pure decision: `Keepalive` is told when
the peer was last heard from and when a PING went out, and says what to do at a given time.

A peer whose node disappeared sends nothing, not even a reset, and TCP notices only when it has
something to retransmit (minutes later) or never: a pooled session to it would take new streams
that hang until their CONNECT timeout. Pinging a session that has been quiet for `interval`
and giving up on it `timeout` after the PING (ztunnel's figures: 10 s and 20 s) finds the dead
peer within 30 s, and the pool then opens a fresh session for the next connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

KEEPALIVE_INTERVAL = 10.0  # seconds a session may hear nothing from its peer before we PING it
KEEPALIVE_TIMEOUT = 20.0  # seconds a PING may go unanswered before the session is declared dead


@dataclass(frozen=True)
class KeepaliveSettings:
    """When to PING a quiet peer (`interval`, seconds) and how long to wait for it (`timeout`)."""

    interval: float = KEEPALIVE_INTERVAL
    timeout: float = KEEPALIVE_TIMEOUT

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError(f"HBONE keepalive interval and timeout must be positive seconds, "
                             f"not {self.interval} and {self.timeout}")


class KeepaliveAction(Enum):
    """What `Keepalive.due` asks the session to do now."""

    WAIT = "wait"  # nothing; ask again at the time returned
    PING = "ping"  # send a PING, then call pinged()
    DEAD = "dead"  # the PING went unanswered: the peer is gone, drop the session


class Keepalive:
    """One session's keepalive state: the last time anything arrived and the PING in flight."""

    def __init__(self, settings: KeepaliveSettings, now: float) -> None:
        self.settings = settings
        self.last_heard = now  # the session's start counts as hearing from the peer
        self.ping_sent: float | None = None  # a PING awaiting its ACK (or any other frame)

    def heard(self, now: float) -> None:
        """Something arrived from the peer: it is alive, and a PING in flight is answered enough."""
        self.last_heard = now
        self.ping_sent = None

    def pinged(self, now: float) -> None:
        """A PING went out at `now`."""
        self.ping_sent = now

    def due(self, now: float) -> tuple[KeepaliveAction, float]:
        """What to do at `now`, and the time at which to ask again."""
        settings = self.settings
        if self.ping_sent is not None:
            deadline = self.ping_sent + settings.timeout
            if now >= deadline:
                return KeepaliveAction.DEAD, now
            return KeepaliveAction.WAIT, deadline
        quiet_until = self.last_heard + settings.interval
        if now >= quiet_until:
            return KeepaliveAction.PING, now + settings.timeout
        return KeepaliveAction.WAIT, quiet_until
