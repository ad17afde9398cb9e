"""What the traffic-shaping plan costs per new connection: the connection rate through the mesh
and the source ztunnel's CPU per connection, plain round-robin against the full plan, in one run.

    python -m bench.traffic_cost [--repeats N] [--seconds S] [--quick]

Bed: two point-to-point nodes; an enrolled client pod on node-1, two enrolled echo servers on
node-2, so every connection crosses both ztunnels over mTLS/HBONE and node-1 makes its plan. Two
Services over the same servers, in one registry, served by the same agents:

  plain  round-robin, no retries (amesh.io/connect-retries: "0"), nothing else
  full   every decision armed: a TCPRoute splits it 90/10 to two backend Services (smooth
         weighted round-robin), a rate limit (amesh.io/connection-rate-limit, far above the
         bench's rate: the bucket is taken, never empty), a DestinationRule connection limit
         (maxConnections, never reached: every connection holds and gives back its place),
         connect retries (the default two), and on the backends outlier detection and the
         LEAST_REQUEST balancer (power of two choices over live counts)

The two run interleaved (repeat 1 of each, then repeat 2, ...) without restarting the agents.
Each repeat also times the decisions alone in this process (ztunnel/shaping.py's TrafficShaper
on the registry the agents read: admit, the first attempt succeeds, the place is given back), a
figure the machine's noise hardly moves. Prints a table with each median's ratio to plain and,
unless --quick, writes bench/results/traffic-<UTC time>.json.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from bench.bed import configurations_main, cpu_seconds, new_connections, summary
from registry.kubefile import parse_objects
from registry.model import RegistryState
from tests.bed import Bed
from tests.mesh import Mesh, ServiceSpec, destination_rule, tcp_route
from ztunnel.shaping import TrafficShaper

ECHO_PORT = 8080
MESSAGE = b"x" * 64  # bytes exchanged on each new connection
WARMUP = 0.5  # seconds of connections before each measurement
SERVICES = {"plain": "10.96.0.60", "full": "10.96.0.61", "full-a": "10.96.0.62", "full-b": "10.96.0.63"}
CONFIGURATIONS = ("plain", "full")
NEVER_REACHED = 100_000  # connections a second (rate limit) and live connections (maxConnections)
DECISIONS = 20_000  # connections decided in-process per repeat and configuration


def registry(mesh: Mesh) -> None:
    """The four Services and the objects that shape `full`."""
    selectors = {"full-a": {"pod": "server-a"}, "full-b": {"pod": "server-b"}}
    annotations = {"plain": {"amesh.io/connect-retries": "0"},
                   "full": {"amesh.io/connection-rate-limit": f"{NEVER_REACHED}/s"}}
    for name, ip in SERVICES.items():
        mesh.services.append(ServiceSpec(name, "bench", ip, 80, ECHO_PORT, selectors.get(name, {"app": "server"}),
                                         annotations=annotations.get(name, {})))

    backend = {"outlierDetection": {"consecutiveGatewayErrors": 5, "baseEjectionTime": "30s"},
               "loadBalancer": {"simple": "LEAST_REQUEST"}}
    mesh.policies = [tcp_route("bench", "full-split", "full", {"full-a": 90, "full-b": 10}),
                     destination_rule("bench", "full", {"connectionPool": {"tcp": {"maxConnections": NEVER_REACHED}}}),
                     destination_rule("bench", "full-a", backend), destination_rule("bench", "full-b", backend)]
    mesh.write_registry()


def run(repeats: int, seconds: float) -> list[dict]:
    figures: dict[tuple[str, str], list[float]] = {}
    with Bed(nodes=2, mode="p2p") as bed:
        mesh = Mesh(bed, namespaces={"bench": True})
        client = bed.add_pod("client", 1, namespace="bench", service_account="client", labels={"app": "client"})
        for name in ("server-a", "server-b"):
            server = bed.add_pod(name, 2, namespace="bench", service_account="server",
                                 labels={"app": "server", "pod": name})
            bed.start_podserver(server, ECHO_PORT)
        # Thousands of connections a second from one address leave ephemeral ports in TIME_WAIT;
        # past ~28,000 of them connect() hunts for a free port and a measurement slows 2-3x
        # (bench/policy_cost.py found it). Set inside the bed only.
        for where in (client, *bed.nodes):
            bed.run(where, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"])
        registry(mesh)
        state = parse_objects(mesh.registry_path.read_text())
        # --workers 1: the CPU per connection is read from the agent's own process, and the split's exact
        # turns are per worker
        agents = {node.name: mesh.start_agent(node, "--no-access-log", "--workers", "1") for node in bed.nodes}
        source = agents[bed.nodes[0].name].pid
        for repeat in range(1, repeats + 1):
            for configuration in CONFIGURATIONS:
                ip = SERVICES[configuration]
                # the first connections pay for certificates and the HBONE session
                new_connections(bed, client, ip, 80, WARMUP, MESSAGE, greeting=True)
                cpu_before = cpu_seconds(source)
                latencies = new_connections(bed, client, ip, 80, seconds, MESSAGE, greeting=True)
                cpu_ms = (cpu_seconds(source) - cpu_before) / len(latencies) * 1000
                rate = len(latencies) / seconds
                print(f"  repeat {repeat} {configuration:5} {rate:7.0f} conn/s  source ztunnel {cpu_ms:.3f} ms "
                      f"CPU/conn", flush=True)
                figures.setdefault((configuration, "connections"), []).append(rate)
                figures.setdefault((configuration, "cpu_per_connection"), []).append(cpu_ms)
                figures.setdefault((configuration, "decision"), []).append(decision_us(state, bed.nodes[0].name, ip))
        check(mesh)
        for node in bed.nodes:
            mesh.stop_agent(node)
    # each repeat's full against the plain measured just before it: the machine's drift cancels
    for metric in ("connections", "cpu_per_connection", "decision"):
        for configuration in CONFIGURATIONS:
            figures[(configuration, f"{metric}_vs_plain")] = [
                value / plain for value, plain in zip(figures[(configuration, metric)], figures[("plain", metric)])]
    units = {"connections": "conn/s", "cpu_per_connection": "ms", "decision": "us"}
    return [{"scenario": "traffic-cost", "path": f"amesh-cross ({configuration})", "config": configuration,
             "metric": metric, "unit": units.get(metric, "ratio"), **summary(values)}
            for (configuration, metric), values in figures.items()]


def decision_us(state: RegistryState, node: str, ip: str) -> float:
    """Microseconds per connection of the decisions alone, on a fresh shaper of `node`: admitted,
    its first attempt succeeds, its place is given back."""
    shaper = TrafficShaper(node)
    counts: Counter[str] = Counter()
    began = time.perf_counter()
    for _ in range(DECISIONS):
        hold = shaper.live.hold()
        attempts = shaper.admit(state, ip, 80, hold, counts, [], 10.0)
        attempts.succeeded(next(iter(attempts)))
        hold.release()
    return (time.perf_counter() - began) / DECISIONS * 1e6


def check(mesh: Mesh) -> None:
    """The full plan did split and nothing failed: else the figures measure a broken bench."""
    failures = mesh.ctl_json(1, "status")["connections"]["failures"]
    [full] = [s for s in mesh.ctl_json(1, "services") if s["key"] == "bench/full"]
    counts = {b["service"]: b["connections"] for b in full["traffic"]["split"]}
    if failures or not counts.get("bench/full-b") or counts["bench/full-a"] < 8 * counts["bench/full-b"]:
        raise RuntimeError(f"the bench is broken: failures {failures}, split counts {counts}")


def table(records: list[dict]) -> str:
    base = {r["metric"]: r["median"] for r in records if r["config"] == "plain"}
    lines = ["| plan | new conn/s (min/median/max) | vs plain, paired (median) | source CPU ms/conn (median) "
             "| vs plain, paired | decisions us/conn (min/median/max) | added, share of a plain connection's time |",
             "|---|---|---|---|---|---|---|"]
    for configuration in CONFIGURATIONS:
        by_metric = {r["metric"]: r for r in records if r["config"] == configuration}
        c, cpu, d = by_metric["connections"], by_metric["cpu_per_connection"], by_metric["decision"]
        added = (d["median"] - base["decision"]) * 1e-6 * base["connections"]  # seconds added x connections/s
        lines.append(f"| {configuration} | {c['min']:.0f} / {c['median']:.0f} / {c['max']:.0f} | "
                     f"{by_metric['connections_vs_plain']['median']:.3f} | {cpu['median']:.3f} | "
                     f"{by_metric['cpu_per_connection_vs_plain']['median']:.3f} | {d['min']:.1f} / "
                     f"{d['median']:.1f} / {d['max']:.1f} | {added:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return configurations_main(__doc__, "traffic", len(CONFIGURATIONS), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
