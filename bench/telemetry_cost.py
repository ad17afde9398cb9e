"""What seeing every connection costs: throughput and connection rate through the mesh with
metrics (Prometheus + access log) and BPF flow accounting on and off, in one run.

    python -m bench.telemetry_cost [--repeats N] [--seconds S] [--quick]

Bed: two point-to-point nodes; an enrolled client pod on node-1, an enrolled server pod on
node-2 (iperf3 server and an echo server), so every figure crosses the fabric through both
ztunnels over mTLS/HBONE. The configurations run interleaved (repeat 1 of each, then repeat
2, ...) so slow drifts of the machine hit them alike. Each configuration restarts both agents
with its flags. Prints a table with min/median/max and the ratio of each median to "off",
and (unless --quick) writes bench/results/telemetry-<UTC time>.json.
"""

from __future__ import annotations

import statistics
import sys

from bench.bed import configurations_main, iperf3, new_connections, summary
from tests.bed import Bed
from tests.mesh import Mesh

IPERF_PORT = 5201
ECHO_PORT = 8080
MESSAGE = b"x" * 64  # bytes exchanged on each new connection

CONFIGS = {  # name -> agent flags
    "off": ["--no-metrics", "--no-access-log", "--no-flow-accounting"],
    "metrics": ["--no-flow-accounting"],  # Prometheus collector + JSON access log
    "flows": ["--no-metrics", "--no-access-log"],  # BPF per-flow counters
    "all on": [],
}


def throughput_gbps(bed: Bed, client, server_ip: str, seconds: float) -> float:
    """One iperf3 stream client -> server for `seconds`; the receiver's rate in Gbit/s."""
    return iperf3(bed, client, server_ip, IPERF_PORT, seconds)[0]


def connection_rate(bed: Bed, client, server_ip: str, seconds: float) -> tuple[float, float]:
    """New connections plus one 64-byte exchange, back to back for `seconds`: (per second, p50 ms)."""
    latencies = new_connections(bed, client, server_ip, ECHO_PORT, seconds, MESSAGE, greeting=True)
    return len(latencies) / seconds, statistics.median(latencies) * 1000


def run(repeats: int, seconds: float) -> list[dict]:
    figures: dict[tuple[str, str], list[float]] = {}
    with Bed(nodes=2, mode="p2p") as bed:
        mesh = Mesh(bed, namespaces={"bench": True})
        client = bed.add_pod("client", 1, namespace="bench")
        server = bed.add_pod("server", 2, namespace="bench")
        bed.spawn(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], bed.logdir / "iperf3.log")
        bed.wait_listening(server, IPERF_PORT)
        bed.start_podserver(server, ECHO_PORT)
        mesh.write_registry()
        for repeat in range(1, repeats + 1):
            for name, flags in CONFIGS.items():
                for node in bed.nodes:
                    mesh.start_agent(node, *flags)
                gbps = throughput_gbps(bed, client, server.ip, seconds)
                rate, p50 = connection_rate(bed, client, server.ip, seconds)
                for node in bed.nodes:
                    mesh.stop_agent(node)
                print(f"  repeat {repeat} {name:8} {gbps:6.2f} Gbit/s  {rate:7.0f} conn/s  p50 {p50:.2f} ms", flush=True)
                for metric, value in (("throughput", gbps), ("connections", rate), ("setup_p50", p50)):
                    figures.setdefault((name, metric), []).append(value)
    units = {"throughput": "Gbit/s", "connections": "conn/s", "setup_p50": "ms"}
    return [{"scenario": "telemetry-cost", "path": f"amesh-cross ({name})", "config": name, "metric": metric,
             "unit": units[metric], **summary(values)} for (name, metric), values in figures.items()]


def table(records: list[dict]) -> str:
    base = {r["metric"]: r["median"] for r in records if r["config"] == "off"}
    lines = ["| configuration | throughput Gbit/s (min/median/max) | vs off | new conn/s (median) | vs off | setup p50 ms |",
             "|---|---|---|---|---|---|"]
    for config in CONFIGS:
        by_metric = {r["metric"]: r for r in records if r["config"] == config}
        t, c, s = by_metric["throughput"], by_metric["connections"], by_metric["setup_p50"]
        lines.append(f"| {config} | {t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} | "
                     f"{t['median'] / base['throughput']:.2f} | {c['median']:.0f} | "
                     f"{c['median'] / base['connections']:.2f} | {s['median']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return configurations_main(__doc__, "telemetry", len(CONFIGS), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
