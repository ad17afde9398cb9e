"""Workloads outside Kubernetes joining by registration: register, look up, route captured
connections to them, expire without heartbeats, revive, deregister; bad input refused.

Bed: two point-to-point nodes, an agent on each. Namespace "shop" is enrolled: client on node-1.
Service shop/billing 10.96.0.30:80 -> 8080 selects no pod. Pod "vm" on node-2 is in no registry
at all: it plays a VM outside the cluster, serving on 8080.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from tests.mesh import ADMIN_PORT, AMESHCTL, Mesh, ServiceSpec, exchange

BILLING_IP = "10.96.0.30"


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True})
    bed.add_pod("client", 1, namespace="shop", service_account="client")
    mesh.services.append(ServiceSpec("billing", "shop", BILLING_IP, 80, 8080, {"app": "billing"}))
    mesh.write_registry()
    vm = bed.add_pod("vm", 2, namespace="outside")  # added after the registry file: not in it
    bed.start_podserver(vm, 8080, name="vm")
    mesh.start_agent(1)
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def reachable(mesh: Mesh) -> bool:
    try:
        return exchange(mesh.bed, mesh.bed.pods["client"], BILLING_IP, 80, b"pay", timeout=2) == ("vm", b"pay")
    except ConnectionError:
        return False


def lookup(mesh: Mesh) -> list[dict]:
    return json.loads(mesh.ctl(1, "lookup", "billing", "-n", "shop", "-o", "json").stdout)["endpoints"]


def test_a_registered_workload_receives_captured_connections_until_it_expires(mesh: Mesh):
    vm = mesh.bed.pods["vm"]
    assert not reachable(mesh)  # no endpoint yet: the ztunnel resets the connection
    out = mesh.ctl(1, "register", "billing", "--address", vm.ip, "--port", "8080", "--version", "v2",
                   "-n", "shop", "--ttl", "6s").stdout  # room for the checks below: ~1 s per ameshctl call under load
    assert f"registered shop/billing at {vm.ip}:8080" in out
    assert [(e["ip"], e["ready"], e["source"]) for e in lookup(mesh)] == [(vm.ip, True, "registration")]
    assert reachable(mesh)
    [conn] = [c for c in mesh.ctl_json(1, "connections") if c["state"] == "closed"]
    assert conn["upstream"] == f"{vm.ip}:8080" and conn["upstream_workload"] == f"shop/billing@{vm.ip}:8080"
    workload = next(w for w in mesh.ctl_json(1, "workloads") if w["ip"] == vm.ip)
    assert (workload["source"], workload["ready"], workload["labels"]) == (
        "registration", True, {"app": "billing", "version": "v2"})
    assert "[registration]" in mesh.ctl(1, "services").stdout

    mesh.wait_for("the registration to expire", lambda: not lookup(mesh)[0]["ready"], timeout=10)
    assert not reachable(mesh)
    failed = [c for c in mesh.ctl_json(1, "connections") if c["state"] == "failed"][0]
    assert "has no ready endpoint" in failed["reason"]
    assert "unhealthy" in mesh.ctl(1, "lookup", "billing", "-n", "shop").stdout

    mesh.ctl(1, "heartbeat", "billing", "-n", "shop")
    assert reachable(mesh)
    mesh.ctl(1, "deregister", "billing", "-n", "shop")
    assert lookup(mesh) == [] and not reachable(mesh)


def test_keepalive_heartbeats_and_deregisters_when_stopped(mesh: Mesh):
    bed, vm = mesh.bed, mesh.bed.pods["vm"]
    proc = bed.spawn(bed.node(1), [AMESHCTL, "register", "billing", "--address", vm.ip, "--port", "8080",
                                   "-n", "shop", "--ttl", "1s", "--keepalive"], bed.logdir / "keepalive.log")
    mesh.wait_for("the registration", lambda: lookup(mesh))
    time.sleep(2.5)  # more than two TTLs: only heartbeats keep it healthy
    assert lookup(mesh)[0]["ready"] and reachable(mesh)
    assert bed.stop(proc) == 0
    assert lookup(mesh) == []


@pytest.mark.parametrize("args, message", [
    (["--address", "10.0.0.300", "--port", "8080"], "address: must be an IPv4 address"),
    (["--address", "10.0.0.3", "--port", "70000"], "port: must be an integer 1-65535"),
    (["--address", "10.0.0.3", "--port", "8080", "--ttl", "soon"], "ttl: must be a duration"),
    (["--address", "10.0.0.3", "--port", "8080", "-n", "Not_A_Label"], "namespace: must be a DNS label"),
    (["--address", "127.0.0.1", "--port", "8080"], "address: 127.0.0.1 is a loopback address"),
    (["--address", "10.0.0.3", "--port", "15000"], "port: 15000 is one of the ztunnel's own ports"),
])
def test_bad_registrations_are_refused_with_a_clear_error_and_change_nothing(mesh: Mesh, args, message):
    before = mesh.ctl(1, "workloads", "-o", "json").stdout
    result = mesh.ctl(1, "register", "billing", *args, check=False)
    assert result.returncode == 1
    assert "refused (400)" in result.stderr and message in result.stderr, result.stderr
    assert mesh.ctl(1, "workloads", "-o", "json").stdout == before


def test_unknown_fields_and_duplicates_are_refused_by_the_api(mesh: Mesh):
    vm = mesh.bed.pods["vm"]
    spec = {"name": "billing", "namespace": "shop", "address": vm.ip, "port": 8080}
    status, body = mesh.http(1, ADMIN_PORT, "/registrations", "POST", {**spec, "weight": 5})
    assert status == 400 and "unknown field(s) weight" in json.loads(body)["error"]
    status, body = mesh.http(1, ADMIN_PORT, "/registrations", "POST", ["not", "an", "object"])
    assert status == 400 and "must be a JSON object" in json.loads(body)["error"]
    mesh.ctl(1, "register", "billing", "--address", vm.ip, "--port", "8080", "-n", "shop")
    duplicate = mesh.ctl(1, "register", "billing", "--address", vm.ip, "--port", "8080", "-n", "shop", check=False)
    assert duplicate.returncode == 1 and "refused (409)" in duplicate.stderr
    assert len(lookup(mesh)) == 1
