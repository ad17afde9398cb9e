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

import contextlib
import socket
import subprocess
import time
from collections import Counter
from typing import Iterator

import pytest

from tests.mesh import SINGLE_PROCESS, Mesh, ServiceSpec, destination_rule, exchange, tcp_route

PORT = 8080
CONNECTIONS = 200
LIMITED_IP, RATE = "10.96.0.30", 20
SERVICES = {"web": ("10.96.0.10", "a-b-c"), "api": ("10.96.0.11", "a-b-d"), "down": ("10.96.0.12", "c-d-e-f-g")}


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=3)
    # breakers and retry budgets are per worker (README "The worker model"): these tests count exact
    # ejections and attempts
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT, agent_args=SINGLE_PROCESS)
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
    return dict(Counter(served_by(mesh, service_ip, count)))


def served_by(mesh: Mesh, service_ip: str, count: int) -> list[str]:
    """The pod that served each of `count` connections in a row from the client to a Service IP
    ("reset" when reset)."""
    names = []
    for _ in range(count):
        try:
            name, echoed = exchange(mesh.bed, mesh.bed.pods["client"], service_ip, 80, b"ping", timeout=5)
            assert echoed == b"ping"
        except OSError:  # reset (or, reset while half-closing, "not connected")
            name = "reset"
        names.append(name)
    return names


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


# --- traffic shaping: weighted splits, connection limits, least-connections, locality ---
#
# Bed: two point-to-point nodes, an agent on each. client and web-v1-a on node-1, web-v1-b and
# web-v2 on node-2, all serving. Services: web (every web pod) split by a TCPRoute to web-v1 and
# web-v2; split (every web pod) split the same by an SMI TrafficSplit; limited at maxConnections 3
# (DestinationRule); least with loadBalancer LEAST_REQUEST; close with trafficDistribution
# PreferClose and a 1 s baseEjectionTime.

SHAPED = {"web": "10.96.0.40", "web-v1": "10.96.0.41", "web-v2": "10.96.0.42", "split": "10.96.0.43",
          "limited": "10.96.0.44", "least": "10.96.0.45", "close": "10.96.0.46"}
MAX_CONNECTIONS = 3
V1, V2 = {"web-v1-a", "web-v1-b"}, {"web-v2"}


def canary_route(stable: int, canary: int) -> dict:
    return tcp_route("shop", "web-canary", "web", {"web-v1": stable, "web-v2": canary})


def traffic_split(stable: int, canary: int) -> dict:
    return {"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
            "metadata": {"name": "split-canary", "namespace": "shop"},
            "spec": {"service": "split", "backends": [{"service": "web-v1", "weight": stable},
                                                      {"service": "web-v2", "weight": canary}]}}


SPLITS = {"web": canary_route, "split": traffic_split}
RULES = [destination_rule("shop", "limited", {"connectionPool": {"tcp": {"maxConnections": MAX_CONNECTIONS}}}),
         destination_rule("shop", "least", {"loadBalancer": {"simple": "LEAST_REQUEST"}}),
         destination_rule("shop", "close", {"outlierDetection": {"consecutiveGatewayErrors": 5,
                                                                 "baseEjectionTime": "1s"}})]


SERVERS: dict[str, subprocess.Popen] = {}  # the shaped bed's pod servers, by pod name


@pytest.fixture
def shaped(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=2)
    # split turns, live counts and maxConnections are per worker (a share each, README "The worker model"):
    # these tests count exact turns and limits
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT, agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    for name, node in (("web-v1-a", 1), ("web-v1-b", 2), ("web-v2", 2)):
        bed.add_pod(name, node, namespace="shop", service_account="web",
                    labels={"app": "web", "version": name[4:6], "pod": name})
        SERVERS[name] = bed.start_podserver(bed.pods[name], PORT)
    selectors = {"web-v1": {"version": "v1"}, "web-v2": {"version": "v2"}, "least": {"pod": "web-v1-a"}}
    for name, ip in SHAPED.items():
        mesh.services.append(ServiceSpec(name, "shop", ip, 80, "http", selectors.get(name, {"app": "web"}),
                                         traffic_distribution="PreferClose" if name == "close" else None))
    mesh.policies = [canary_route(90, 10), traffic_split(90, 10), *RULES]
    mesh.write_registry()
    for node in bed.nodes:
        mesh.start_agent(node)
    yield mesh
    mesh.print_logs()


def service_view(mesh: Mesh, key: str) -> dict:
    return next(s for s in mesh.ctl_json(1, "services") if s["key"] == key)


@pytest.mark.parametrize("parent", ["web", "split"], ids=["TCPRoute", "SMI TrafficSplit"])
def test_a_90_10_split_lands_within_5_points_over_1000_connections_and_follows_a_weight_change_in_a_second(
        shaped: Mesh, parent: str):
    names = served_by(shaped, SHAPED[parent], 1000)
    canary = sum(name in V2 for name in names)
    assert sum(name in V1 for name in names) + canary == 1000, set(names)
    assert abs(canary / 1000 - 0.10) <= 0.05, canary
    assert max(len(run) for run in "".join("c" if n in V2 else "s" for n in names).split("s")) <= 2  # interleaved
    view = service_view(shaped, f"shop/{parent}")
    assert {b["service"]: b["connections"] for b in view["traffic"]["split"]} == {
        "shop/web-v1": 1000 - canary, "shop/web-v2": canary}
    assert {labels["backend"]: value for labels, value in shaped.metrics(1)["amesh_split_connections_total"]
            if labels["service"] == f"shop/{parent}"} == {"shop/web-v1": 1000 - canary, "shop/web-v2": canary}

    shaped.policies = [SPLITS[parent](0, 100) if p["metadata"]["name"] == SPLITS[parent](0, 0)["metadata"]["name"]
                       else p for p in shaped.policies]
    shaped.write_registry()
    changed = time.monotonic()
    in_a_row = 0
    while in_a_row < 20:  # twenty in a row to the canary: the new weights are in force
        assert time.monotonic() - changed < 1.0, f"the split still sends to web-v1 after {in_a_row} to web-v2"
        in_a_row = in_a_row + 1 if served_by(shaped, SHAPED[parent], 1)[0] in V2 else 0


def held(mesh: Mesh, service: str) -> socket.socket:
    """A connection to `service` that its server answered (its name line), kept open."""
    sock = mesh.bed.connect(mesh.bed.pods["client"], SHAPED[service], 80, timeout=5)
    assert sock.recv(64).startswith(b"web-"), "the server did not answer"
    return sock


def test_max_connections_refuses_the_connection_over_it_at_once(shaped: Mesh):
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(held(shaped, "limited"))
        began = time.monotonic()
        with pytest.raises(OSError):  # reset before any answer
            with held(shaped, "limited"):
                pass
        assert time.monotonic() - began < 0.5
        assert service_view(shaped, "shop/limited")["connections"] == MAX_CONNECTIONS
        assert ({"service": "shop/limited"}, MAX_CONNECTIONS) in shaped.metrics(1)["amesh_service_connections_live"]
        assert f"{MAX_CONNECTIONS}/{MAX_CONNECTIONS}" in shaped.ctl(1, "services").stdout
    assert shaped.wait_for("the limit's places to be free",
                           lambda: service_view(shaped, "shop/limited")["connections"] == 0)
    # one after another they never reach the limit
    assert served_by(shaped, SHAPED["limited"], MAX_CONNECTIONS + 1).count("reset") == 0
    failures = shaped.ctl_json(1, "status")["connections"]["failures"]
    assert failures == {"upstream_overflow": 1}, failures


def test_least_request_sends_new_connections_away_from_an_endpoint_holding_many_long_ones(shaped: Mesh):
    with contextlib.ExitStack() as stack:
        for _ in range(10):  # while web-v1-a is least's only endpoint
            stack.enter_context(held(shaped, "least"))
        [least] = [s for s in shaped.services if s.name == "least"]
        least.selector = {"app": "web"}
        shaped.write_registry()
        shaped.wait_for("least to have three endpoints",
                        lambda: len(service_view(shaped, "shop/least")["endpoints"]) == 3)
        names = Counter(served_by(shaped, SHAPED["least"], 30))
        assert names["web-v1-a"] == 0 and names["web-v1-b"] + names["web-v2"] == 30, names
        loaded = next(e for e in service_view(shaped, "shop/least")["endpoints"]
                      if e["ip"] == shaped.bed.pods["web-v1-a"].ip)
        assert loaded["connections"] == 10


def test_prefer_close_keeps_connections_on_this_node_while_a_local_endpoint_is_ready_and_spills_over_when_not(
        shaped: Mesh):
    assert set(served_by(shaped, SHAPED["close"], 50)) == {"web-v1-a"}  # node-1's only web pod
    local = shaped.bed.pods["web-v1-a"]
    shaped.bed.stop(SERVERS[local.name])
    spilled = served_by(shaped, SHAPED["close"], 50)
    assert "reset" not in spilled and set(spilled) <= {"web-v1-b", "web-v2"}, Counter(spilled)  # retries hid it
    failed_local = [a for c in shaped.ctl_json(1, "connections") for a in c["attempts"]
                    if a["upstream"].startswith(f"{local.ip}:") and a["result"] != "ok"]
    # then its breaker opened and node-2's took the connections at once (a sixth: a half-open
    # trial, were the 50 connections slower than the 1 s ejection)
    assert len(failed_local) in (5, 6), failed_local
    shaped.bed.start_podserver(local, PORT)
    # after the Service's own 1 s ejection, one trial brings the local endpoint back
    assert shaped.wait_for("connections back on node-1",
                           lambda: served_by(shaped, SHAPED["close"], 1) == ["web-v1-a"], timeout=5.0)
    assert set(served_by(shaped, SHAPED["close"], 20)) == {"web-v1-a"}


def test_prefer_close_without_a_local_endpoint_stays_in_the_zone_and_leaves_it_only_when_it_must(make_bed):
    # three nodes: node-1 and node-2 in zone-a, node-3 in zone-b (their Node objects' labels);
    # plaintext backends in a namespace outside the mesh, so only node-1 needs an agent
    bed = make_bed("p2p", nodes=3)
    mesh = Mesh(bed, namespaces={"shop": True, "backend": False}, container_port=PORT)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    servers = {name: bed.start_podserver(bed.add_pod(name, node, namespace="backend", labels={"app": "zoned"}), PORT)
               for name, node in (("near", 2), ("far", 3))}
    mesh.services.append(ServiceSpec("zoned", "backend", "10.96.0.50", 80, "http", {"app": "zoned"},
                                     traffic_distribution="PreferClose"))
    mesh.policies = [{"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node.name, "labels": {"topology.kubernetes.io/zone": "zone-b" if node.index == 3 else "zone-a"}}}
        for node in bed.nodes]
    mesh.write_registry()
    mesh.start_agent(1)
    try:
        assert set(served_by(mesh, "10.96.0.50", 30)) == {"near"}  # node-2: this node's zone
        bed.stop(servers["near"])
        spilled = served_by(mesh, "10.96.0.50", 30)
        assert set(spilled) == {"far"}, Counter(spilled)  # retries hide the dead one, then its breaker opens
    finally:
        mesh.print_logs()
