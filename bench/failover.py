"""What a client notices when one of three endpoints dies: the connections it sees fail, with
connect retries on (the default) and off, in one run.

    python -m bench.failover [--repeats N] [--seconds S] [--quick]

Bed: two point-to-point nodes; an enrolled client pod on node-1 and three enrolled echo servers
on node-2, all behind one Service twice: `retries` (the default: two retries on another
endpoint) and `no-retries` (amesh.io/connect-retries: "0"). Each measurement starts both agents
afresh (no breaker open), opens new connections back to back (a fresh TCP connection and one
64-byte echo each) for 1 s, kills server-c's process (its port now refuses), and goes on for
S seconds. Counted: the connections that failed as the client sees them (reset, or no echo),
and the slowest connection after the kill. The configurations run interleaved; unless --quick
the records go to bench/results/failover-<UTC time>.json.
"""

from __future__ import annotations

import socket
import sys
import time

from bench.bed import configurations_main, exchange_once, summary
from tests.bed import Bed, Pod
from tests.mesh import Mesh, ServiceSpec

ECHO_PORT = 8080
MESSAGE = b"x" * 64  # bytes exchanged on each new connection
BEFORE_KILL = 1.0  # seconds of connections while all three endpoints serve
SERVICES = {"retries": "10.96.0.70", "no-retries": "10.96.0.71"}
SERVERS = ("server-a", "server-b", "server-c")
VICTIM = "server-c"


def connections(bed: Bed, client: Pod, ip: str, seconds: float) -> tuple[int, int, float]:
    """New connections with one echo each, back to back for `seconds`: (served, failed, slowest s)."""
    served = failed = 0
    slowest = 0.0
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        began = time.perf_counter()
        try:
            with bed.connect(client, ip, 80, timeout=5) as sock:
                exchange_once(sock, MESSAGE, greeting=True)
            served += 1
        except (OSError, AssertionError, socket.timeout):  # reset, refused, or the echo cut short
            failed += 1
        slowest = max(slowest, time.perf_counter() - began)
    return served, failed, slowest


def run(repeats: int, seconds: float) -> list[dict]:
    figures: dict[tuple[str, str], list[float]] = {}
    with Bed(nodes=2, mode="p2p") as bed:
        mesh = Mesh(bed, namespaces={"bench": True})
        client = bed.add_pod("client", 1, namespace="bench", service_account="client", labels={"app": "client"})
        pods = [bed.add_pod(name, 2, namespace="bench", service_account="server", labels={"app": "server"})
                for name in SERVERS]
        servers = {pod.name: bed.start_podserver(pod, ECHO_PORT) for pod in pods}
        for name, ip in SERVICES.items():
            annotations = {"amesh.io/connect-retries": "0"} if name == "no-retries" else {}
            mesh.services.append(ServiceSpec(name, "bench", ip, 80, ECHO_PORT, {"app": "server"},
                                             annotations=annotations))
        mesh.write_registry()
        for repeat in range(1, repeats + 1):
            for configuration, ip in SERVICES.items():
                for node in bed.nodes:
                    mesh.start_agent(node, "--no-access-log")
                before, failed_before, _ = connections(bed, client, ip, BEFORE_KILL)
                bed.stop(servers[VICTIM])
                after, failed, slowest = connections(bed, client, ip, seconds)
                for node in bed.nodes:
                    mesh.stop_agent(node)
                servers[VICTIM] = bed.start_podserver(bed.pods[VICTIM], ECHO_PORT)
                if failed_before:
                    raise RuntimeError(f"{failed_before} connections failed before the kill: the bench is broken")
                print(f"  repeat {repeat} {configuration:10} {before} connections before the kill, {after + failed} "
                      f"after: {failed} failed, slowest {slowest * 1000:.1f} ms", flush=True)
                figures.setdefault((configuration, "failed"), []).append(failed)
                figures.setdefault((configuration, "connections"), []).append(after + failed)
                figures.setdefault((configuration, "slowest"), []).append(slowest * 1000)
    units = {"failed": "connections", "connections": "connections", "slowest": "ms"}
    return [{"scenario": "failover", "path": f"amesh-cross ({configuration})", "config": configuration,
             "metric": metric, "unit": units[metric], **summary(values)}
            for (configuration, metric), values in figures.items()]


def table(records: list[dict]) -> str:
    lines = ["| connect retries | connections after the kill (median) | failed as the client saw them "
             "(min/median/max) | slowest connection ms (median) |",
             "|---|---|---|---|"]
    for configuration in SERVICES:
        by_metric = {r["metric"]: r for r in records if r["config"] == configuration}
        f = by_metric["failed"]
        lines.append(f"| {configuration} | {by_metric['connections']['median']:.0f} | "
                     f"{f['min']:.0f} / {f['median']:.0f} / {f['max']:.0f} | {by_metric['slowest']['median']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return configurations_main(__doc__, "failover", len(SERVICES), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
