"""Data-plane snapshots: taken per process, pickled, merged, and rendered as one node's /metrics
and connection table (no sockets: the tables are fed as the listeners would)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.metrics import AgentCollector
from agent.node import NodeAgent
from registry.model import RegistryState, Workload
from ztunnel.connections import ConnectionTable
from ztunnel.hbone import HboneClientPool
from ztunnel.snapshot import DataplaneCounters, DataplaneSnapshot, merge, retire, take_snapshot

CLIENT = Workload("web-0", "shop", "10.244.1.10", "node-1", "web", labels={"app": "web"}, enrolled=True)
SERVER = Workload("db-0", "data", "10.244.2.10", "node-2", "db", labels={"app": "db"}, enrolled=True)
STATE = RegistryState(workloads=(CLIENT, SERVER))


class Clock:
    """Wall-clock seconds that move only when told, shared by the tables of one test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Process:
    """One process's data plane as a worker runs it: its table, counters and HBONE pool."""

    def __init__(self, clock: Clock, first_id: int = 1, id_step: int = 1) -> None:
        self.clock = clock
        self.table = ConnectionTable(clock=clock, first_id=first_id, id_step=id_step)
        self.counters = DataplaneCounters(self.table, lambda: STATE, "Kubernetes")
        self.pool = HboneClientPool()

    def connection(self, port: int, sent: int, end: str | None = "closed", connect: float = 0.002) -> int:
        """One outbound mTLS connection shop/web-0 -> data/db-0, ended as `end` (None: left open);
        the clock moves 1 s after it opens."""
        record = self.table.open(CLIENT.ip, port, "10.96.0.10:80", CLIENT.key)
        record.service, record.upstream, record.upstream_workload = "data/db", f"{SERVER.ip}:8080", SERVER.key
        record.security, record.state, record.connect_duration = "mtls", "open", connect
        record.bytes_sent, record.bytes_received = sent, 2 * sent
        self.clock.now += 1
        if end == "failed":
            self.table.close(record, "failed", "upstream 10.244.2.10:8080 refused the connection", "connect_refused")
        elif end is not None:
            self.table.close(record, "closed", "closed")
        return record.id

    def snapshot(self, rows: bool = False) -> DataplaneSnapshot:
        """Taken here, read back as the agent would receive it from a worker."""
        return pickle.loads(pickle.dumps(take_snapshot(self.table, self.counters, self.pool, None, None, STATE,
                                                       rows=rows)))


def rendered(snapshot: DataplaneSnapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics of an agent whose data plane is `snapshot`: sample (name, labels) -> value."""
    agent = NodeAgent(AgentConfig(node="node-1", registry_file=Path("/nonexistent")))
    collector = AgentCollector(agent)
    collector.snapshot = snapshot
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def istio(samples: dict, name: str) -> float:
    """The sum of an Istio counter over its series."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def test_merging_two_processes_renders_their_sums_on_metrics() -> None:
    clock = Clock()
    one, two = Process(clock, 1, 2), Process(clock, 2, 2)
    for port in range(3):
        one.connection(40000 + port, sent=100)
    one.connection(40010, sent=0, end="failed")
    one.connection(40011, sent=5, end=None)
    two.connection(41000, sent=1000, connect=0.7)
    two.connection(41001, sent=0, end="failed")
    two.connection(41002, sent=7, end=None)
    one.pool.handshakes, two.pool.handshakes = 2, 3
    one.pool.mitigations["ping_flood"] += 1
    two.pool.mitigations["ping_flood"] += 4
    one.table.attempts["ok"] += 4
    two.table.attempts.update({"ok": 2, "connect_refused": 1})

    samples = rendered(merge([one.snapshot(), two.snapshot()]))

    # 4 closed (3 + 1) and 2 failed connections, 2 open: opened counts them all, closed the ended ones
    assert istio(samples, "istio_tcp_connections_opened_total") == 8
    assert istio(samples, "istio_tcp_connections_closed_total") == 6
    assert istio(samples, "istio_tcp_received_bytes_total") == 3 * 100 + 5 + 1000 + 7
    assert istio(samples, "istio_tcp_sent_bytes_total") == 2 * (3 * 100 + 5 + 1000 + 7)
    assert samples[("amesh_connection_failures_total", (("reason", "connect_refused"),))] == 2
    assert samples[("amesh_upstream_connect_attempts_total", (("result", "ok"),))] == 6
    assert samples[("amesh_upstream_connect_attempts_total", (("result", "connect_refused"),))] == 1
    assert samples[("amesh_connect_duration_seconds_count", (("security", "mtls"),))] == 6
    assert samples[("amesh_connect_duration_seconds_bucket", (("le", "0.005"), ("security", "mtls")))] == 5
    assert samples[("amesh_connections_live", (("direction", "outbound"),))] == 2
    assert samples[("amesh_connections_live", (("direction", "inbound"),))] == 0
    assert samples[("amesh_hbone_handshakes_total", ())] == 5
    assert samples[("amesh_hbone_mitigations_total", (("kind", "ping_flood"), ("side", "client")))] == 5


def test_an_endpoint_ejected_by_two_processes_counts_once() -> None:
    one = DataplaneSnapshot(ejections={"data/db": 1}, ejected={"data/db": frozenset({"10.244.2.10:8080"})})
    two = DataplaneSnapshot(ejections={"data/db": 2},
                            ejected={"data/db": frozenset({"10.244.2.10:8080", "10.244.2.11:8080"})})
    samples = rendered(merge([one, two]))
    assert samples[("amesh_endpoint_ejections_total", (("service", "data/db"),))] == 3
    assert samples[("amesh_endpoint_ejected", (("service", "data/db"),))] == 2


def test_merged_rows_keep_ids_distinct_live_oldest_first_then_closed_newest_first() -> None:
    clock = Clock()
    workers = [Process(clock, k + 1, 2) for k in range(2)]
    opened = []
    for turn in range(6):  # alternately, so each table's ids and times interleave with the other's
        worker = workers[turn % 2]
        opened.append(worker.connection(42000 + turn, sent=turn, end="closed" if turn < 4 else None))

    merged = merge([w.snapshot(rows=True) for w in workers])
    ids = [row["id"] for row in merged.rows]

    assert sorted(ids) == sorted(opened) == list(range(1, 7))  # distinct across the two tables
    assert ids == [5, 6, 4, 3, 2, 1]  # live in the order they opened, then the closed ones newest first
    assert (sum(merged.live.values()), merged.recently_closed) == (2, 4)


def test_a_dead_processs_counters_stay_in_the_nodes_totals_and_its_gauges_leave() -> None:
    clock = Clock()
    dead, restarted = Process(clock, 1, 2), Process(clock, 1, 2)
    dead.connection(40000, sent=100)
    dead.connection(40001, sent=0, end="failed")
    dead.connection(40002, sent=5, end=None)
    dead.pool.handshakes = 2
    last = dead.snapshot(rows=True)
    restarted.connection(40003, sent=10, end=None)

    samples = rendered(merge([retire(last), restarted.snapshot()]))

    assert istio(samples, "istio_tcp_connections_opened_total") == 4
    assert istio(samples, "istio_tcp_received_bytes_total") == 100 + 5 + 10
    assert samples[("amesh_connection_failures_total", (("reason", "connect_refused"),))] == 1
    assert samples[("amesh_hbone_handshakes_total", ())] == 2
    assert samples[("amesh_connections_live", (("direction", "outbound"),))] == 1  # the restarted one's only
    assert retire(last).rows == [] and retire(last).recently_closed == 0


def test_merging_one_snapshot_changes_nothing() -> None:
    process = Process(Clock())
    process.connection(40000, sent=10)
    process.connection(40001, sent=0, end="failed")
    process.connection(40002, sent=3, end=None)
    process.table.failure_log.suppressed["connect_refused"] += 2
    snapshot = process.snapshot(rows=True)
    assert merge([snapshot]) == snapshot
    assert merge([]) == DataplaneSnapshot()


def test_ids_step_from_their_first() -> None:
    table = ConnectionTable(first_id=3, id_step=4)
    assert [table.open("10.0.0.1", port, "10.0.0.2:80").id for port in range(3)] == [3, 7, 11]
    with pytest.raises(ValueError, match="id_step=0"):
        ConnectionTable(first_id=1, id_step=0)


def test_the_cost_benchmark_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.snapshot_cost", "--live", "10", "--repeats", "1"],
                         cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "10 live connections" in out and "take_snapshot, scrape (no rows)" in out
