"""Connect retries end to end: a dead endpoint costs the client nothing, and the retry budget
keeps a Service whose endpoints are all dead from a retry storm.

Bed: three point-to-point nodes, agents on node-1 and node-2 only. Namespace "shop" is enrolled:
client and server-a (serving) on node-1, server-b (serving) and server-c (nothing listening) on
node-2, server-d on node-3, whose node runs no ztunnel (its HBONE port refuses), server-e on
node-2, server-f and server-g on node-2 (nothing listening). Services: web = a, b, c (a closed
port); api = a, b, d (a node without its ztunnel); down = c, d, e, f, g (all dead). Each Service
also exists with retries off (annotation amesh.io/connect-retries: "0"); limited = a, b at 20
new connections a second (annotation amesh.io/connection-rate-limit: "20/s").
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from tests.mesh import Mesh, ServiceSpec, exchange

PORT = 8080
CONNECTIONS = 200
LIMITED_IP, RATE = "10.96.0.30", 20
SERVICES = {"web": ("10.96.0.10", "a-b-c"), "api": ("10.96.0.11", "a-b-d"), "down": ("10.96.0.12", "c-d-e-f-g")}


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=3)
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    for name, node in (("a", 1), ("b", 2), ("c", 2), ("d", 3), ("e", 2), ("f", 2), ("g", 2)):
        labels = {f"in-{service}": "yes" for service, (_, of) in SERVICES.items() if name in of.split("-")}
        bed.add_pod(f"server-{name}", node, namespace="shop", service_account="web", labels=labels)
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], PORT)
    for service, (ip, _) in SERVICES.items():
        mesh.services.append(ServiceSpec(service, "shop", ip, 80, "http", {f"in-{service}": "yes"}))
        no_retry_ip = ip.rsplit(".", 1)[0] + f".{int(ip.rsplit('.', 1)[1]) + 100}"
        mesh.services.append(ServiceSpec(f"{service}-no-retry", "shop", no_retry_ip, 80, "http",
                                         {f"in-{service}": "yes"}, annotations={"amesh.io/connect-retries": "0"}))
    mesh.services.append(ServiceSpec("limited", "shop", LIMITED_IP, 80, "http", {"in-web": "yes"},
                                     annotations={"amesh.io/connection-rate-limit": f"{RATE}/s"}))
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def outcomes(mesh: Mesh, service_ip: str, count: int = CONNECTIONS) -> dict[str, int]:
    """`count` connections in a row from the client to a Service IP: how many were served by whom,
    and how many were reset."""
    seen: dict[str, int] = {}
    for _ in range(count):
        try:
            name, echoed = exchange(mesh.bed, mesh.bed.pods["client"], service_ip, 80, b"ping", timeout=5)
            assert echoed == b"ping"
        except OSError:  # reset (or, reset while half-closing, "not connected")
            name = "reset"
        seen[name] = seen.get(name, 0) + 1
    return seen


def attempts(mesh: Mesh) -> dict[str, float]:
    return {labels["result"]: value for labels, value in mesh.metrics(1)["amesh_upstream_connect_attempts_total"]}


@pytest.mark.parametrize("service", ["web", "api"], ids=["closed port", "node without its ztunnel"])
def test_a_dead_endpoint_costs_the_client_nothing_with_retries_and_a_share_of_connections_without(
        mesh: Mesh, service: str):
    ip = SERVICES[service][0]
    served = outcomes(mesh, ip)
    assert served == {"server-a": served.get("server-a"), "server-b": served.get("server-b")}, served
    assert sum(served.values()) == CONNECTIONS
    # five failures in a row opened the dead endpoint's breaker: no connection tried it after that
    failed = attempts(mesh)
    assert sum(v for k, v in failed.items() if k != "ok") == 5, failed
    retried = [c for c in mesh.ctl_json(1, "connections") if len(c["attempts"]) > 1]
    assert retried and retried[0]["state"] == "closed" and retried[0]["attempts"][-1]["result"] == "ok"
    dead = [e for s in mesh.ctl_json(1, "services") if s["key"] == f"shop/{service}" for e in s["endpoints"]
            if e["breaker"] != "CLOSED"]
    assert len(dead) == 1 and dead[0]["breaker"].startswith("OPEN until"), dead
    [(_, ejected)] = [(labels, v) for labels, v in mesh.metrics(1)["amesh_endpoint_ejected"]
                      if labels["service"] == f"shop/{service}"]
    assert ejected == 1 and "OPEN until" in mesh.ctl(1, "services").stdout

    # without retries the client sees the dead endpoint until its breaker opens
    no_retry_ip = ip.rsplit(".", 1)[0] + f".{int(ip.rsplit('.', 1)[1]) + 100}"
    without = outcomes(mesh, no_retry_ip, 60)
    assert without.get("reset") == 5 and without.get("server-a", 0) + without.get("server-b", 0) == 55, without


def test_the_retry_budget_caps_the_attempts_when_every_endpoint_is_dead(mesh: Mesh):
    assert outcomes(mesh, SERVICES["down"][0], 100) == {"reset": 100}
    counted = attempts(mesh)
    tried = sum(v for k, v in counted.items() if k not in ("ok", "retry_budget_spent"))
    # breakers open on two of the five (at most half), so each connection still has three; without
    # a budget 300 connects, with it the first tries plus at most 10/s over 10 s and a fifth
    assert 100 < tried <= 100 + 100 + 20, counted
    assert counted.get("retry_budget_spent", 0) >= 30, counted


def test_the_rate_limit_admits_about_its_rate_and_refuses_the_rest_at_once(mesh: Mesh):
    bed = mesh.bed
    served, refused, slowest_refusal = 0, 0, 0.0
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        began = time.monotonic()
        try:
            exchange(bed, bed.pods["client"], LIMITED_IP, 80, b"ping", timeout=5)
            served += 1
        except OSError:  # reset (or, reset while half-closing, "not connected")
            refused += 1
            slowest_refusal = max(slowest_refusal, time.monotonic() - began)
    elapsed = time.monotonic() - started
    # a second's worth at once, then the rate: 20 + 20 x 3 s, give or take the bed's pace
    assert RATE * elapsed * 0.8 <= served <= RATE * (elapsed + 1) + 2, (served, refused, elapsed)
    assert refused > served and slowest_refusal < 0.5, (refused, slowest_refusal)
    assert attempts(mesh).get("ok") == served
    failures = mesh.ctl_json(1, "status")["connections"]["failures"]
    assert failures.get("rate_limited") == refused, failures
