"""The ztunnel's record of each proxied connection: live ones, and the most recent closed ones.

The data plane counts bytes with plain integers on the record as they flow; readers such as
`ameshctl connections` take a `snapshot()` when they need one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from ztunnel.logbound import RateLimitedLog, cut
from ztunnel.tcpinfo import read_tcp_info

REASON_LIMIT = 512  # characters of a connection's end reason kept (the longest of ours is about 300)

ConnectionState = Literal["connecting", "open", "closed", "failed"]
EndState = Literal["closed", "failed"]
Direction = Literal["outbound", "inbound"]
# How the connection crossed between workloads: "mtls" (HBONE), "plaintext", or "same-node"
# (both ends enrolled on this node: joined inside the ztunnel, identities still checked).
Security = Literal["mtls", "plaintext", "same-node"]


@dataclass
class ConnectionRecord:
    """One client connection and its upstream, from accept to close."""

    id: int
    source_ip: str
    source_port: int
    source_workload: str | None
    original_dst: str  # "ip:port" the client dialled
    started: float  # wall-clock seconds since the epoch
    direction: Direction = "outbound"
    security: Security | None = None  # known once routed
    source_identity: str | None = None  # SPIFFE IDs, when known (proved by mTLS or local)
    destination_identity: str | None = None
    service: str | None = None
    upstream: str | None = None  # "ip:port", once routed
    upstream_workload: str | None = None
    ended: float | None = None
    bytes_sent: int = 0  # client -> upstream
    bytes_received: int = 0  # upstream -> client
    state: ConnectionState = "connecting"
    reason: str | None = None
    failure: str | None = None  # the reason code of a failed connection (ProxyError.reason)
    connect_duration: float | None = None  # seconds to connect upstream (incl. HBONE setup)
    # each upstream connect tried, in order: {"upstream": "ip:port", "result": "ok" or a reason code}
    attempts: list[dict[str, str]] = field(default_factory=list)
    # TCP_INFO of the client-facing and upstream sockets: read live while the connection is
    # open, kept as last read when it closes.
    kernel: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    sockets: dict[str, Any] = field(default_factory=dict, repr=False)  # side -> socket, while open
    # what admission decided on (a ztunnel.authz.Connection), so a policy change can re-decide
    admitted: Any = field(default=None, repr=False)
    # while relaying: stops the relay, so `cut()` can end the connection from outside
    abort: Callable[[], object] | None = field(default=None, repr=False)
    cut_reason: tuple[str, str] | None = field(default=None, repr=False)  # (code, sentence) once cut

    def cut(self, code: str, reason: str) -> None:
        """Ends a connection from outside (a policy no longer allows it): both sides are reset,
        now or as soon as it starts relaying, and the record ends failed with `code` and `reason`."""
        if self.cut_reason is None:
            self.cut_reason = (code, reason)
            if self.abort is not None:
                self.abort()

    def count_sent(self, n: int) -> None:
        self.bytes_sent += n

    def count_received(self, n: int) -> None:
        self.bytes_received += n

    def duration(self, now: float | None = None) -> float:
        """Seconds from accept to close, or to `now` (default: the wall clock) while live."""
        end = self.ended if self.ended is not None else (time.time() if now is None else now)
        return max(0.0, end - self.started)

    def read_kernel(self) -> None:
        """Refreshes `kernel` from the sockets (once more as the connection ends)."""
        for side, sock in self.sockets.items():
            self.kernel[side] = read_tcp_info(sock)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready view: ISO 8601 UTC times, duration in seconds rounded to milliseconds."""
        if self.ended is None:
            self.read_kernel()
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        data["started"] = iso_utc(self.started)
        data["ended"] = iso_utc(self.ended) if self.ended is not None else None
        data["duration"] = round(self.duration(now), 3)
        return data


def iso_utc(timestamp: float) -> str:
    """A wall-clock time as ISO 8601 UTC with milliseconds, as the admin API shows times."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


class ConnectionTable:
    """Live connections by id, plus a bounded history of closed ones (newest first). Ids are
    `first_id`, `first_id + id_step`, ...: worker k of N numbers k+1, k+1+N, ..., so ids stay
    unique over a node's worker processes."""

    def __init__(self, closed_capacity: int = 1000, clock: Callable[[], float] = time.time, first_id: int = 1,
                 id_step: int = 1) -> None:
        """Ids run first_id, first_id + id_step, ...: worker k of a node's N numbers k+1, k+1+N, ...,
        so that ids stay unique over the node's tables."""
        if first_id < 1 or id_step < 1:
            raise ValueError(f"connection ids must start at 1 or more and step by 1 or more, not first_id={first_id} "
                             f"id_step={id_step}")
        self.on_close: list[Callable[[ConnectionRecord], None]] = []  # told of each ended connection
        self._ids = itertools.count(first_id, id_step)
        self._clock = clock
        self._live: dict[int, ConnectionRecord] = {}
        self._recent: deque[ConnectionRecord] = deque(maxlen=closed_capacity)
        self.failures: Counter[str] = Counter()  # failed connections by reason code, since start
        # upstream connect attempts by result ("ok" or a reason code), and retries the budget refused
        self.attempts: Counter[str] = Counter()
        # The agent's log line per failed connection, at a bounded rate per reason: a flood of
        # refused connections writes a few lines and a count (the access log keeps them all).
        self.failure_log = RateLimitedLog(logging.getLogger("amesh.ztunnel"))

    def open(
        self,
        source_ip: str,
        source_port: int,
        original_dst: str,
        source_workload: str | None = None,
        direction: Direction = "outbound",
    ) -> ConnectionRecord:
        """Start tracking a newly accepted connection, in state "connecting"."""
        record = ConnectionRecord(
            id=next(self._ids),
            source_ip=source_ip,
            source_port=source_port,
            source_workload=source_workload,
            original_dst=original_dst,
            started=self._clock(),
            direction=direction,
        )
        self._live[record.id] = record
        return record

    def close(self, record: ConnectionRecord, state: EndState, reason: str, code: str | None = None) -> None:
        """Mark a live connection ended and move it to the recent history.

        A failed connection is counted under `code` (a ProxyError's reason), else "other".
        """
        if state not in ("closed", "failed"):
            raise ValueError(f"connection {record.id}: end state must be closed or failed, not {state!r}")
        if self._live.pop(record.id, None) is None:
            raise ValueError(f"connection {record.id} is not live in this table (closed twice?)")
        record.read_kernel()
        record.sockets.clear()
        record.abort = None
        record.state = state
        record.reason = cut(reason, REASON_LIMIT)  # a peer's text inside a reason must not grow every view
        record.ended = self._clock()
        self._recent.appendleft(record)
        if state == "failed":
            record.failure = code or "other"
            self.failures[record.failure] += 1
        for hook in self.on_close:
            hook(record)

    def live(self) -> list[ConnectionRecord]:
        """Connections not yet closed, oldest first."""
        return list(self._live.values())

    def recent(self) -> list[ConnectionRecord]:
        """Closed connections, newest first, at most `closed_capacity` of them."""
        return list(self._recent)

    def snapshot(self) -> list[dict[str, Any]]:
        """Live then recent connections as JSON-ready dicts, durations taken at one instant."""
        now = self._clock()
        return [record.to_dict(now) for record in (*self._live.values(), *self._recent)]
