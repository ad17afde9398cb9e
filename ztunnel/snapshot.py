"""The data plane's observable state as a value: taken in whichever process runs the listeners,
merged over the node's processes, rendered by the agent (/metrics, `ameshctl connections`,
`top`, `status`).

`DataplaneCounters` folds each connection into per-label-set totals once, when it closes: the
only per-connection work. `take_snapshot` copies the counters of one process and adds its live
connections; it runs on that process's loop at scrape time only. `merge` sums the snapshots of
the node's processes into the node's one view, and `retire` keeps the counters of a process
that died in it. A snapshot is plain data (dicts, tuples, numbers,
strings, frozensets), so it pickles: a worker process can send it to the agent.

Cost on the loop that takes it (`python -m bench.snapshot_cost`, 1,000 live connections and
1,000 closed in the history, 20 series): about 0.5 ms for a scrape's snapshot (2.6 KiB pickled),
once per scrape and never per connection; the connection rows (`ameshctl connections`, `top`)
cost what ConnectionTable.snapshot() always did (14 ms or more, plus 3 ms of TCP_INFO reads).
"""

from __future__ import annotations

import heapq
import operator
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from registry.model import RegistryState
from ztunnel.connections import ConnectionRecord, ConnectionTable
from ztunnel.hbone import HboneClientPool
from ztunnel.telemetry import istio_labels

if TYPE_CHECKING:
    from ztunnel.inbound import InboundHboneProxy
    from ztunnel.outbound import OutboundProxy

K = TypeVar("K")
V = TypeVar("V")

# seconds; upstream connects range from ~0.1 ms (same node) to seconds (a timing-out peer)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# One Istio label set's totals: connections opened, closed, request bytes (client to upstream,
# the record's bytes_sent), response bytes (upstream to client, its bytes_received).
IstioTotals = tuple[int, int, int, int]


@dataclass(frozen=True)
class ConnectHistogram:
    """Bucket counts (cumulative, one per CONNECT_BUCKETS bound) of upstream connect durations."""

    buckets: tuple[int, ...] = (0,) * len(CONNECT_BUCKETS)
    count: int = 0
    sum: float = 0.0  # seconds

    def observed(self, seconds: float) -> ConnectHistogram:
        """This histogram with one more connect of `seconds`."""
        buckets = tuple(n + 1 if seconds <= bound else n for n, bound in zip(self.buckets, CONNECT_BUCKETS))
        return ConnectHistogram(buckets, self.count + 1, self.sum + seconds)

    def __add__(self, other: ConnectHistogram) -> ConnectHistogram:
        return ConnectHistogram(tuple(map(operator.add, self.buckets, other.buckets)), self.count + other.count,
                                self.sum + other.sum)


class DataplaneCounters:
    """The Istio totals and connect histograms of one process's closed connections, folded as
    each closes; it lives where `table` is (the process that runs the listeners)."""

    def __init__(self, table: ConnectionTable, state: Callable[[], RegistryState], cluster: str) -> None:
        self._state = state
        self._cluster = cluster
        self._closed: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # IstioTotals' order
        self.connect: dict[str, ConnectHistogram] = {}  # by the connection's security
        # A connection's labels are fixed at its first scrape, so its bytes move from the live
        # sum to the closed totals under the same series even if the registry changed meanwhile.
        self._live_labels: dict[int, tuple[str, ...]] = {}
        table.on_close.append(self.fold)

    def _labels(self, record: ConnectionRecord) -> tuple[str, ...]:
        labels = self._live_labels.get(record.id)
        if labels is None:
            labels = istio_labels(record, self._state(), self._cluster)
        return labels

    def fold(self, record: ConnectionRecord) -> None:
        """Adds a connection that just ended to the totals."""
        totals = self._closed[self._labels(record)]
        self._live_labels.pop(record.id, None)
        totals[0] += 1
        totals[1] += 1
        totals[2] += record.bytes_sent
        totals[3] += record.bytes_received
        if record.connect_duration is not None:
            security = record.security or "unknown"
            self.connect[security] = self.connect.get(security, ConnectHistogram()).observed(record.connect_duration)

    def istio(self, live: Iterable[ConnectionRecord]) -> dict[tuple[str, ...], IstioTotals]:
        """The totals by label set: the closed connections' plus those of `live` that are open."""
        totals = {labels: list(values) for labels, values in self._closed.items()}
        for record in live:
            if record.state != "open":
                continue  # still being routed: its series is not known yet
            labels = self._live_labels.setdefault(record.id, self._labels(record))
            values = totals.setdefault(labels, [0, 0, 0, 0])
            values[0] += 1
            values[2] += record.bytes_sent
            values[3] += record.bytes_received
        return {labels: tuple(values) for labels, values in totals.items()}  # type: ignore[misc]


def _no_connections() -> dict[str, int]:
    return {"outbound": 0, "inbound": 0}


@dataclass(frozen=True)
class DataplaneSnapshot:
    """One process's data-plane counters at one instant, or the sum of several (`merge`).
    Mappings keep the order their source had; renderers sort where they always did."""

    istio: dict[tuple[str, ...], IstioTotals] = field(default_factory=dict)  # ISTIO_LABELS values -> totals
    connect: dict[str, ConnectHistogram] = field(default_factory=dict)  # security -> upstream connect times
    failures: dict[str, int] = field(default_factory=dict)  # failed connections by reason code
    attempts: dict[str, int] = field(default_factory=dict)  # upstream connects by result
    ejections: dict[str, int] = field(default_factory=dict)  # outlier ejections by service, ever
    # endpoints ("ip:port") OPEN or HALF-OPEN now, by service: a set, so that an endpoint two
    # processes' breakers both ejected counts once
    ejected: dict[str, frozenset[str]] = field(default_factory=dict)
    service_live: dict[str, int] = field(default_factory=dict)  # outbound connections live, by service
    split_picks: dict[tuple[str, str], int] = field(default_factory=dict)  # (split service, backend) -> picks
    hbone_handshakes: int = 0
    hbone_sessions: int = 0
    hbone_dead_peers: int = 0
    server_mitigations: dict[str, int] = field(default_factory=dict)  # HTTP/2 limits peers crossed, by kind
    client_mitigations: dict[str, int] = field(default_factory=dict)
    log_suppressed: dict[str, int] = field(default_factory=dict)  # agent log lines not written, by reason
    unverified_sources: int = 0
    live: dict[str, int] = field(default_factory=_no_connections)  # live connections by direction
    recently_closed: int = 0  # closed connections in the tables' histories
    # ConnectionTable.snapshot() rows (live oldest first, then closed newest first), when asked
    rows: list[dict[str, Any]] = field(default_factory=list)


def take_snapshot(table: ConnectionTable, counters: DataplaneCounters | None, pool: HboneClientPool,
                  outbound: OutboundProxy | None, inbound_hbone: InboundHboneProxy | None, state: RegistryState,
                  rows: bool = False) -> DataplaneSnapshot:
    """The data plane of one process now: `counters` None (metrics off) gives no Istio totals or
    histograms; `rows` adds the connection rows (a TCP_INFO read per live socket)."""
    live = table.live()
    by_direction = _no_connections()
    for record in live:
        by_direction[record.direction] += 1
    shaper = outbound.shaper if outbound is not None else None
    outliers = shaper.outliers if shaper is not None else None
    return DataplaneSnapshot(
        istio=counters.istio(live) if counters is not None else {},
        connect=dict(counters.connect) if counters is not None else {},
        failures=dict(table.failures),
        attempts=dict(table.attempts),
        ejections=dict(outliers.ejections_total) if outliers is not None else {},
        ejected={service: outliers.ejected_endpoints(service) for service in outliers.ejections_total}
        if outliers is not None else {},
        service_live=dict(shaper.live.by_service) if shaper is not None else {},
        split_picks={(service.key, backend): count for service in state.services
                     for backend, count in sorted(shaper.router.splits.picks(service.key).items())}
        if shaper is not None else {},
        hbone_handshakes=pool.handshakes,
        hbone_sessions=pool.sessions,
        hbone_dead_peers=pool.dead_peers,
        server_mitigations=dict(inbound_hbone.mitigations) if inbound_hbone is not None else {},
        client_mitigations=dict(pool.mitigations),
        log_suppressed=dict(table.failure_log.suppressed),
        unverified_sources=inbound_hbone.unverified_sources if inbound_hbone is not None else 0,
        live=by_direction,
        recently_closed=len(table.recent()),
        rows=table.snapshot() if rows else [],
    )


def merge(snapshots: list[DataplaneSnapshot]) -> DataplaneSnapshot:
    """The node's view over its processes' snapshots: counts summed, ejected endpoints joined, rows
    interleaved as one table would list them (live oldest first, then closed newest first)."""
    add = operator.add
    live_rows = heapq.merge(*([r for r in s.rows if r["ended"] is None] for s in snapshots),
                            key=lambda row: row["started"])  # ISO 8601 UTC, one format: sorts as time
    closed_rows = heapq.merge(*([r for r in s.rows if r["ended"] is not None] for s in snapshots),
                              key=lambda row: row["ended"], reverse=True)
    return DataplaneSnapshot(
        istio=_combine((s.istio for s in snapshots), lambda a, b: tuple(map(add, a, b))),  # type: ignore[arg-type]
        connect=_combine((s.connect for s in snapshots), add),
        failures=_combine((s.failures for s in snapshots), add),
        attempts=_combine((s.attempts for s in snapshots), add),
        ejections=_combine((s.ejections for s in snapshots), add),
        ejected=_combine((s.ejected for s in snapshots), operator.or_),
        service_live=_combine((s.service_live for s in snapshots), add),
        split_picks=_combine((s.split_picks for s in snapshots), add),
        hbone_handshakes=sum(s.hbone_handshakes for s in snapshots),
        hbone_sessions=sum(s.hbone_sessions for s in snapshots),
        hbone_dead_peers=sum(s.hbone_dead_peers for s in snapshots),
        server_mitigations=_combine((s.server_mitigations for s in snapshots), add),
        client_mitigations=_combine((s.client_mitigations for s in snapshots), add),
        log_suppressed=_combine((s.log_suppressed for s in snapshots), add),
        unverified_sources=sum(s.unverified_sources for s in snapshots),
        live=_combine([_no_connections(), *(s.live for s in snapshots)], add),
        recently_closed=sum(s.recently_closed for s in snapshots),
        rows=[*live_rows, *closed_rows],
    )


def retire(snapshot: DataplaneSnapshot) -> DataplaneSnapshot:
    """What stays of the last snapshot of a process that is gone (a worker that died), to be merged
    into every later view: its counters, so that the node's totals never go down (Prometheus would
    read that as a counter reset), without its gauges (live connections, sessions, ejected
    endpoints, live per service) or its rows."""
    return replace(snapshot, ejected={}, service_live={}, hbone_sessions=0, live=_no_connections(), recently_closed=0,
                   rows=[])


def _combine(mappings: Iterable[Mapping[K, V]], add: Callable[[V, V], V]) -> dict[K, V]:
    """One mapping of every key in `mappings`, in the order first seen, its values added up."""
    combined: dict[K, V] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            combined[key] = add(combined[key], value) if key in combined else value
    return combined
