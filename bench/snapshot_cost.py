"""What a data-plane snapshot costs the loop that takes it, with 1,000 live connections.

    python -m bench.snapshot_cost [--live N] [--repeats R]

In one process, no bed: a ConnectionTable with N live (open) connections and a full history of
1,000 closed ones over 20 Istio series, the DataplaneCounters folding them. Times, each the
median of R runs: take_snapshot for a scrape (no rows) and for `ameshctl connections` (rows;
plus the two TCP_INFO reads per live connection, timed on a real loopback socket pair), the
snapshot's pickled size and pickle + unpickle time (what a worker sends the agent), merge of
two halves, and the agent's render of the merge (generate_latest). Prints the figures; writes
nothing.
"""

from __future__ import annotations

import argparse
import pickle
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest

from agent.config import AgentConfig
from agent.metrics import AgentCollector
from agent.node import NodeAgent
from registry.model import RegistryState, Workload
from ztunnel.connections import ConnectionTable
from ztunnel.hbone import HboneClientPool
from ztunnel.snapshot import DataplaneCounters, DataplaneSnapshot, merge, take_snapshot
from ztunnel.tcpinfo import read_tcp_info

CLOSED = 1000  # a full history (ConnectionTable's closed_capacity)
SERIES = 20  # client workloads, so as many Istio label sets
SERVER = Workload("db-0", "data", "10.244.2.10", "node-2", "db", labels={"app": "db"}, enrolled=True)
CLIENTS = tuple(Workload(f"web-{i}", "shop", f"10.244.1.{i + 1}", "node-1", "web", labels={"app": f"web-{i}"},
                         enrolled=True) for i in range(SERIES))
STATE = RegistryState(workloads=(SERVER, *CLIENTS))


def data_plane(live: int, first_id: int = 1, id_step: int = 1) -> tuple[ConnectionTable, DataplaneCounters]:
    """A table with `live` open connections and CLOSED closed ones, folded into its counters."""
    table = ConnectionTable(first_id=first_id, id_step=id_step)
    counters = DataplaneCounters(table, lambda: STATE, "Kubernetes")
    for i in range(live + CLOSED):
        client = CLIENTS[i % SERIES]
        record = table.open(client.ip, 30000 + i % 30000, "10.96.0.10:80", client.key)
        record.service, record.upstream, record.upstream_workload = "data/db", f"{SERVER.ip}:8080", SERVER.key
        record.security, record.state, record.connect_duration = "mtls", "open", 0.002
        record.bytes_sent, record.bytes_received = 1000 + i, 2000 + i
        if i < CLOSED:
            table.close(record, "closed", "closed")
    return table, counters


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tcp_info_seconds(reads: int) -> float:
    """Seconds per read_tcp_info on a connected loopback socket."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            peer, _ = server.accept()
            with peer:
                start = time.perf_counter()
                for _ in range(reads):
                    read_tcp_info(client)
                return (time.perf_counter() - start) / reads


def render_seconds(snapshots: list[DataplaneSnapshot], repeats: int) -> float:
    """The agent's /metrics body from `snapshots`: merge, then generate_latest."""
    agent = NodeAgent(AgentConfig(node="node-1", registry_file=Path("/nonexistent")))
    collector = AgentCollector(agent)
    registry = CollectorRegistry()
    registry.register(collector)

    def scrape() -> bytes:
        collector.snapshot = merge(snapshots)
        return generate_latest(registry)

    return median_seconds(scrape, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=1000, help="live connections (default 1000)")
    parser.add_argument("--repeats", type=int, default=51, help="runs per figure; the median is shown (default 51)")
    args = parser.parse_args()
    pool = HboneClientPool()
    table, counters = data_plane(args.live)
    scrape = median_seconds(lambda: take_snapshot(table, counters, pool, None, None, STATE), args.repeats)
    with_rows = median_seconds(lambda: take_snapshot(table, counters, pool, None, None, STATE, rows=True),
                               args.repeats)
    tcp_info = tcp_info_seconds(2000)
    snapshot = take_snapshot(table, counters, pool, None, None, STATE)
    rows = take_snapshot(table, counters, pool, None, None, STATE, rows=True)
    pickled, pickled_rows = pickle.dumps(snapshot), pickle.dumps(rows)
    halves = [take_snapshot(t, c, pool, None, None, STATE, rows=True)
              for t, c in (data_plane(args.live // 2, k + 1, 2) for k in range(2))]
    figures = [
        ("take_snapshot, scrape (no rows)", scrape * 1e3, "ms"),
        ("take_snapshot, with rows (no sockets)", with_rows * 1e3, "ms"),
        (f"  + TCP_INFO of {args.live} live connections (2 reads each)", 2 * args.live * tcp_info * 1e3, "ms"),
        ("pickled size, scrape / with rows", f"{len(pickled) / 1024:.1f} / {len(pickled_rows) / 1024:.1f}", "KiB"),
        ("pickle + unpickle, scrape", median_seconds(lambda: pickle.loads(pickle.dumps(snapshot)), args.repeats) * 1e3,
         "ms"),
        ("pickle + unpickle, with rows", median_seconds(lambda: pickle.loads(pickle.dumps(rows)), args.repeats) * 1e3,
         "ms"),
        ("merge of 2 snapshots with rows", median_seconds(lambda: merge(halves), args.repeats) * 1e3, "ms"),
        ("agent's /metrics render of 1 snapshot (merge + generate_latest)", render_seconds([snapshot], args.repeats)
         * 1e3, "ms"),
    ]
    print(f"{args.live} live connections, {CLOSED} closed in the history, {SERIES} Istio series; "
          f"median of {args.repeats} runs")
    for name, value, unit in figures:
        print(f"  {name:<64} {value if isinstance(value, str) else f'{value:.3f}'} {unit}")


if __name__ == "__main__":
    main()
