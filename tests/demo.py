"""`make demo`: a live two-node mesh on a closed test bed, narrated, then torn down.

    python -m tests.demo [--mode p2p|bridge] [--requests N]

Builds the bed (nothing touches the root namespace), describes it in a registry file of
Kubernetes objects, starts one `ameshctl agent` per node, sends traffic from an enrolled pod to
a Service cluster IP that only the mesh can reach, and shows what `ameshctl` reports.
"""

from __future__ import annotations

import argparse
import os
import sys

from tests.bed import Bed
from tests.mesh import Mesh, ServiceSpec, exchange

SERVICE_IP = "10.96.0.10"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(mesh: Mesh, node: int, *args: str) -> None:
    print(f"$ ameshctl {' '.join(args)}    # on node-{node}", flush=True)
    print(mesh.ctl(node, *args).stdout, flush=True)


def run(mode: str, requests: int) -> None:
    say(f"building a closed test bed: 2 nodes, {mode} pod networking, in network namespaces only")
    with Bed(nodes=2, mode=mode) as bed:
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
        mesh.write_registry()
        print(f"    {mesh.registry_path}")

        say("starting one amesh agent per node (compiles and attaches the BPF capture program; the first "
            "creates the mesh's root CA, each issues certificates for its pods' service accounts)")
        for node in bed.nodes:
            mesh.start_agent(node)
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

        say("stopping the agents (SIGTERM: each removes its filters, rule and route) and the bed")
        for node in bed.nodes:
            mesh.stop_agent(node)
    say("done: the bed is gone and the root namespace was never touched")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["p2p", "bridge"], default="p2p")
    parser.add_argument("--requests", type=int, default=6)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo builds network namespaces and loads BPF programs: run it as root", file=sys.stderr)
        return 1
    run(args.mode, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
