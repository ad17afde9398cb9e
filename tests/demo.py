"""`make demo`: a live two-node mesh on a closed test bed, narrated, then torn down.

    python -m tests.demo [--mode p2p|bridge] [--requests N] [--control-plane]

Builds the bed (nothing touches the root namespace), describes it in a registry file of
Kubernetes objects, starts one `ameshctl agent` per node, sends traffic from an enrolled pod to
a Service cluster IP that only the mesh can reach, and shows what `ameshctl` reports; then an
endpoint killed mid-run (retries hide it, its breaker opens and closes), a 90/10 canary split
and a rate limit, live.

With --control-plane (`make demo`'s default) the objects live in the test API server instead and
the agents get their certificates from the cluster CA (`ameshctl ca serve`), both in the bed's
fabric namespace; a last scene shows the CA refusing a node the identity of a pod on another node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Iterator

import yaml

from tests.bed import Bed
from tests.mesh import ControlPlane, Mesh, ServiceSpec, claimed_pod, destination_rule, exchange, tcp_route

SERVICE_IP = "10.96.0.10"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(mesh: Mesh, node: int, *args: str) -> None:
    print(f"$ ameshctl {' '.join(args)}    # on node-{node}", flush=True)
    print(mesh.ctl(node, *args).stdout, flush=True)


@contextlib.contextmanager
def registry(mesh: Mesh, control_plane: bool) -> Iterator[ControlPlane | None]:
    """The bed's objects in a registry file, or (control_plane) in the test API server with the
    cluster CA beside it; the control plane is closed after the block."""
    if not control_plane:
        mesh.write_registry()
        print(f"    {mesh.registry_path}")
        yield None
        return
    say("control plane in the bed's fabric namespace (172.18.0.1): the test Kubernetes API server (:6443) "
        "and the cluster CA `ameshctl ca serve` (:15012), the only holder of the root key; agents get a "
        "token bound to their agent pod and the root certificate only")
    plane = ControlPlane.start(mesh)
    try:
        print(f"    Secret (root key, CA only): {plane.secret_dir}\n    trust bundle (agents): {plane.trust_bundle}")
        yield plane
    finally:
        plane.close()


def cluster_ca_refusal_scene(mesh: Mesh, plane: ControlPlane) -> None:
    """A compromised node-2 claims shop/client runs on it; the CA, going by the API server, refuses."""
    say("node-2 is compromised: its agent is restarted with a registry of its own that claims a pod of "
        "service account shop/client runs on node-2. The cluster CA goes by the API server (client runs on "
        "node-1) and refuses; node-2 still gets shop/web, whose pod server-b it does run")
    bed = mesh.bed
    lie = claimed_pod(mesh, "server-b", "client-copy", "client", "10.244.2.50")
    path = bed.logdir / "node-2-lies.yaml"
    path.write_text(yaml.safe_dump_all(mesh.objects() + [lie], sort_keys=False))
    mesh.stop_agent(2)
    mesh.start_agent(2, "--registry-file", str(path))
    client = "spiffe://cluster.local/ns/shop/sa/client"
    mesh.wait_for("the CA's answer", lambda: any(
        c["identity"] == client and c["last_error"] for c in mesh.ctl_json(2, "certs")["certificates"]), 10)
    show(mesh, 2, "certs")
    refused = sum(v for labels, v in mesh.metrics(2).get("amesh_ca_requests_total", [])
                  if labels["result"] == "identity_on_other_node")
    print(f"    node-2's amesh_ca_requests_total{{result=\"identity_on_other_node\"}} {refused:g}")


def run(mode: str, requests: int, control_plane: bool = False) -> None:
    say(f"building a closed test bed: 2 nodes, {mode} pod networking, in network namespaces only")
    with Bed(nodes=2, mode=mode) as bed, contextlib.ExitStack() as stack:
        mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=8080)
        client = bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
        for name, node in (("server-a", 1), ("server-b", 2)):
            bed.add_pod(name, node, namespace="shop", service_account="web", labels={"app": "web"})
        plain = bed.add_pod("plain", 1, namespace="legacy", labels={"app": "plain"})
        for pod in bed.pods.values():
            print(f"    pod {pod.key:16} {pod.ip:12} on {pod.node.name}")

        say("starting an echo server in server-a and server-b (port 8080, named \"http\")")
        for name in ("server-a", "server-b"):
            bed.start_podserver(bed.pods[name], 8080)

        say(f"registry: namespace shop labelled amesh.io/dataplane-mode=ambient, legacy not; "
            f"Service shop/web {SERVICE_IP}:80 -> http")
        mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
        scene_servers = prepare_traffic_scenes(bed, mesh)
        plane = stack.enter_context(registry(mesh, control_plane))

        say("starting one amesh agent per node (compiles and attaches the BPF capture program; "
            + ("the first creates the mesh's root CA, each issues" if plane is None else
               "each asks the cluster CA, sending CSRs (keys stay on the node), for")
            + " certificates for its pods' service accounts)")
        for node in bed.nodes:
            mesh.start_agent(node)
        if plane is not None:
            plane.wait_synced()
        show(mesh, 1, "status")

        say(f"client -> {SERVICE_IP}:80, {requests} connections (no route to that address exists: "
            "only capture reaches it)")
        for i in range(requests):
            payload = os.urandom(1024 * (i + 1))
            name, echoed = exchange(bed, client, SERVICE_IP, 80, payload)
            verdict = "intact" if echoed == payload else "CORRUPTED"
            print(f"    connection {i + 1}: served by {name}, {len(payload)} bytes echoed {verdict}")

        say(f"legacy/plain (not enrolled) -> {SERVICE_IP}:80")
        try:
            exchange(bed, plain, SERVICE_IP, 80, b"hello", timeout=1.0)
            print("    connected (unexpected: this pod is not in the mesh)")
        except OSError as exc:
            print(f"    fails as it should without the mesh: {exc.strerror or exc}")

        say("what node-1's ztunnel saw: server-a is on the same node, server-b was reached over "
            "mTLS (HBONE to node-2:15008) as spiffe://cluster.local/ns/shop/sa/client")
        show(mesh, 1, "connections")
        say("node-2's ztunnel terminated those tunnels and checked the client's identity")
        show(mesh, 2, "connections")
        show(mesh, 1, "certs")
        show(mesh, 1, "workloads")
        show(mesh, 1, "services")

        traffic_scenes(mesh, scene_servers)

        say("an AuthorizationPolicy (Istio's, as users write them): shop's web pods take connections only "
            "from the service account frontend, so client is no longer allowed")
        mesh.policies = [{
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "web-from-frontend", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                                "to": [{"operation": {"ports": ["8080"]}}]}]},
        }]
        mesh.write_registry()
        mesh.wait_for("the policy to reach node-2", lambda: mesh.ctl_json(2, "policies")["authorization_policies"])
        server_b = bed.pods["server-b"]
        try:
            exchange(bed, client, server_b.ip, 8080, b"hello", timeout=2.0)
            print("    connected (unexpected: the policy should deny it)")
        except OSError as exc:
            print(f"    client -> server-b {server_b.ip}:8080 refused at once: {exc.strerror or exc}")
        show(mesh, 2, "policies")
        say("why? `ameshctl check` asks the same decision without sending a packet")
        show(mesh, 2, "check", "--from", "shop/client", "--to", "shop/server-b", "--port", "8080")

        if plane is not None:
            cluster_ca_refusal_scene(mesh, plane)

        say("stopping the agents (SIGTERM: each removes its filters, rule and route) and the bed")
        for node in bed.nodes:
            mesh.stop_agent(node)
    say("done: the bed is gone and the root namespace was never touched")


# --- resilience and traffic shaping (issue 14): a breaker, a canary split, a rate limit ---

ORDERS_IP, CHECKOUT_IP, SEARCH_IP = "10.96.0.20", "10.96.0.21", "10.96.0.22"
SEARCH_RATE = 10  # new connections a second to shop/search from each node


def prepare_traffic_scenes(bed: Bed, mesh: Mesh) -> dict[str, subprocess.Popen]:
    """A third web pod and a canary on node-2, and the Services and objects the scenes use:
    orders (the web pods; a DestinationRule ejects an endpoint for 2 s after 5 failures),
    checkout (a TCPRoute sends 90 % to checkout-v1, the web pods, 10 % to checkout-v2, the
    canary), search (amesh.io/connection-rate-limit). Returns the pods' servers by name."""
    servers = {}
    for name, app in (("server-c", "web"), ("canary", "web-canary")):
        servers[name] = bed.start_podserver(bed.add_pod(name, 2, namespace="shop", service_account="web",
                                                        labels={"app": app}), 8080)
    mesh.services += [
        ServiceSpec("orders", "shop", ORDERS_IP, 80, "http", {"app": "web"}),
        ServiceSpec("checkout", "shop", CHECKOUT_IP, 80, "http", {"app": "web"}),
        ServiceSpec("checkout-v1", "shop", "10.96.0.23", 80, "http", {"app": "web"}),
        ServiceSpec("checkout-v2", "shop", "10.96.0.24", 80, "http", {"app": "web-canary"}),
        ServiceSpec("search", "shop", SEARCH_IP, 80, "http", {"app": "web"},
                    annotations={"amesh.io/connection-rate-limit": f"{SEARCH_RATE}/s"}),
    ]
    mesh.policies += [
        destination_rule("shop", "orders", {"outlierDetection": {"consecutiveGatewayErrors": 5,
                                                                 "baseEjectionTime": "2s"}}),
        canary_route(90, 10),
    ]
    return servers


def canary_route(stable: int, canary: int) -> dict:
    return tcp_route("shop", "checkout-canary", "checkout", {"checkout-v1": stable, "checkout-v2": canary})


def served(mesh: Mesh, ip: str, count: int) -> list[str]:
    """Who served each of `count` connections in a row from the client to `ip`:80 ("reset" if reset)."""
    names = []
    for _ in range(count):
        try:
            names.append(exchange(mesh.bed, mesh.bed.pods["client"], ip, 80, b"hello", timeout=5)[0])
        except OSError:
            names.append("reset")
    return names


def tally(names: list[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(Counter(names).items()))


def traffic_scenes(mesh: Mesh, servers: dict[str, subprocess.Popen]) -> None:
    """The three scenes of issue 14, one after another."""
    scene_breaker(mesh, servers)
    scene_canary(mesh)
    scene_rate_limit(mesh)


def scene_breaker(mesh: Mesh, servers: dict[str, subprocess.Popen]) -> None:
    bed = mesh.bed
    say(f"shop/orders {ORDERS_IP}:80 over server-a, server-b and server-c: 30 connections")
    print(f"    {tally(served(mesh, ORDERS_IP, 30))}")
    say("killing server-c's process mid-run (Kubernetes still lists it ready): 60 more connections")
    bed.stop(servers["server-c"])
    names = served(mesh, ORDERS_IP, 60)
    print(f"    {tally(names)}: {names.count('reset')} failed; the first connects to server-c were retried on "
          "another endpoint, and after 5 failures in a row its breaker opened")
    show(mesh, 1, "services")
    say("server-c comes back; after its 2 s ejection (DestinationRule orders: baseEjectionTime) one trial "
        "connection closes the breaker")
    servers["server-c"] = bed.start_podserver(bed.pods["server-c"], 8080)
    server_c = bed.pods["server-c"].ip

    def breaker() -> str:
        [orders] = [s for s in mesh.ctl_json(1, "services") if s["key"] == "shop/orders"]
        return next(e["breaker"] for e in orders["endpoints"] if e["ip"] == server_c)

    print(f"    server-c's breaker now: {breaker()}")
    mesh.wait_for("server-c's breaker to close", lambda: served(mesh, ORDERS_IP, 3) and breaker() == "CLOSED",
                  timeout=10.0, interval=0.5)
    print(f"    server-c's breaker now: {breaker()}; 30 more connections: {tally(served(mesh, ORDERS_IP, 30))}")


def scene_canary(mesh: Mesh) -> None:
    say(f"a canary: TCPRoute checkout-canary sends shop/checkout {CHECKOUT_IP}:80 90 % to checkout-v1 (the web "
        "pods) and 10 % to checkout-v2 (the canary pod): 200 connections")
    names = served(mesh, CHECKOUT_IP, 200)
    print(f"    {tally(names)}")
    print("    in order: " + "".join("C" if name == "canary" else "." for name in names[:60]) + " ... (C: canary)")
    show(mesh, 1, "services")
    say("the rollout goes on: weights 50/50, in force from the next connection")
    mesh.policies = [canary_route(50, 50) if p["metadata"]["name"] == "checkout-canary" else p for p in mesh.policies]
    mesh.write_registry()
    mesh.wait_for("the new weights on node-1", lambda: [b["weight"] for s in mesh.ctl_json(1, "services")
                                                         if s["key"] == "shop/checkout"
                                                         for b in s["traffic"]["split"]] == [50, 50])
    print(f"    {tally(served(mesh, CHECKOUT_IP, 100))}")


def scene_rate_limit(mesh: Mesh) -> None:
    say(f"a rate limit: shop/search takes {SEARCH_RATE} new connections a second from each node "
        "(amesh.io/connection-rate-limit); the client opens 50 a second for 3 s")
    names: list[str] = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < 3.0:
        names += served(mesh, SEARCH_IP, 1)
        time.sleep(max(0.0, len(names) / 50 - elapsed))
    print(f"    {len(names) - names.count('reset')} served (a second's worth at once, then {SEARCH_RATE}/s), "
          f"{names.count('reset')} refused at once")
    show(mesh, 1, "status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["p2p", "bridge"], default="p2p")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--control-plane", action="store_true",
                        help="the test API server and the cluster CA instead of a registry file and a local CA")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo builds network namespaces and loads BPF programs: run it as root", file=sys.stderr)
        return 1
    run(args.mode, args.requests, args.control_plane)
    return 0


if __name__ == "__main__":
    sys.exit(main())
