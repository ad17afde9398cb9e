"""What authorization costs per new connection: the connection rate through the mesh and the
destination ztunnel's CPU per connection with 0, 10 and 1,000 AuthorizationPolicies in the
destination's namespace, in one run.

    python -m bench.policy_cost [--repeats N] [--seconds S] [--quick]

Bed: two point-to-point nodes; an enrolled client pod on node-1 and an enrolled echo server on
node-2, so every connection crosses both ztunnels over mTLS/HBONE and node-2 decides it. Of the
N policies, one selects the server and allows the client's principal; the others are what a busy
namespace holds: ALLOW policies selecting other apps, so the index must pass them over without
evaluating them. The configurations run interleaved (repeat 1 of each, then repeat 2, ...);
each restarts both agents on a registry file with its policies. Prints a table with the ratio
of each median to "0 policies" and, unless --quick, writes bench/results/policy-<UTC time>.json.
"""

from __future__ import annotations

import sys

from bench.bed import configurations_main, cpu_seconds, new_connections, summary
from tests.bed import Bed
from tests.mesh import Mesh

ECHO_PORT = 8080
MESSAGE = b"x" * 64  # bytes exchanged on each new connection
POLICY_COUNTS = (0, 10, 1000)
WARMUP = 0.5  # seconds of connections before each measurement


def policies(count: int) -> list[dict]:
    """`count` AuthorizationPolicies in namespace bench: one admits the client to the server."""
    def allow(name: str, app: str, principal: str) -> dict:
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"selector": {"matchLabels": {"app": app}}, "action": "ALLOW",
                         "rules": [{"from": [{"source": {"principals": [principal]}}],
                                    "to": [{"operation": {"ports": [str(ECHO_PORT)]}}]}]}}

    if not count:
        return []
    return [allow("server-from-client", "server", "cluster.local/ns/bench/sa/client")] + [
        allow(f"app-{i}", f"app-{i}", f"cluster.local/ns/bench/sa/caller-{i}") for i in range(count - 1)]


def run(repeats: int, seconds: float) -> list[dict]:
    figures: dict[tuple[int, str], list[float]] = {}
    with Bed(nodes=2, mode="p2p") as bed:
        mesh = Mesh(bed, namespaces={"bench": True})
        client = bed.add_pod("client", 1, namespace="bench", service_account="client", labels={"app": "client"})
        server = bed.add_pod("server", 2, namespace="bench", service_account="server", labels={"app": "server"})
        bed.start_podserver(server, ECHO_PORT)
        # Thousands of connections a second from one address to one server leave ephemeral ports
        # in TIME_WAIT (in the client pod, and in node-2 for the ztunnel's upstream connects); past
        # ~28,000 of them connect() hunts for a free port and a whole measurement slows 2-3x,
        # whatever the configuration (one outlier per run). Set inside the bed only.
        for where in (client, *bed.nodes):
            bed.run(where, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"])
        for repeat in range(1, repeats + 1):
            for count in POLICY_COUNTS:
                mesh.policies = policies(count)
                mesh.write_registry()
                agents = {node.name: mesh.start_agent(node, "--no-access-log") for node in bed.nodes}
                destination = agents[bed.nodes[1].name].pid
                # the first connections pay for certificates, the HBONE session and the memo
                new_connections(bed, client, server.ip, ECHO_PORT, WARMUP, MESSAGE, greeting=True)
                cpu_before = cpu_seconds(destination)
                latencies = new_connections(bed, client, server.ip, ECHO_PORT, seconds, MESSAGE, greeting=True)
                cpu_ms = (cpu_seconds(destination) - cpu_before) / len(latencies) * 1000
                denied = mesh.ctl_json(2, "status")["connections"]["failures"].get("policy_denied", 0)
                for node in bed.nodes:
                    mesh.stop_agent(node)
                if denied:
                    raise RuntimeError(f"{denied} connections were denied with {count} policies: the bench is broken")
                rate = len(latencies) / seconds
                print(f"  repeat {repeat} {count:5} policies {rate:7.0f} conn/s  destination ztunnel "
                      f"{cpu_ms:.3f} ms CPU/conn", flush=True)
                figures.setdefault((count, "connections"), []).append(rate)
                figures.setdefault((count, "cpu_per_connection"), []).append(cpu_ms)
    units = {"connections": "conn/s", "cpu_per_connection": "ms"}
    return [{"scenario": "policy-cost", "path": f"amesh-cross ({count} policies)", "config": count,
             "metric": metric, "unit": units[metric], **summary(values)} for (count, metric), values in figures.items()]


def table(records: list[dict]) -> str:
    base = {r["metric"]: r["median"] for r in records if r["config"] == 0}
    lines = ["| policies in the namespace | new conn/s (min/median/max) | vs 0 "
             "| destination CPU ms/conn (median) | vs 0 |",
             "|---|---|---|---|---|"]
    for count in POLICY_COUNTS:
        by_metric = {r["metric"]: r for r in records if r["config"] == count}
        c, cpu = by_metric["connections"], by_metric["cpu_per_connection"]
        lines.append(f"| {count} | {c['min']:.0f} / {c['median']:.0f} / {c['max']:.0f} | "
                     f"{c['median'] / base['connections']:.3f} | {cpu['median']:.3f} | "
                     f"{cpu['median'] / base['cpu_per_connection']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return configurations_main(__doc__, "policy", len(POLICY_COUNTS), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
