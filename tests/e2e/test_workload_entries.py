"""Cluster-wide registrations: a workload outside Kubernetes registered as an Istio WorkloadEntry
through one node's `ameshctl register --kubeconfig ... --ttl 3` receives connections from a pod on
the other node, and stops receiving them when its heartbeats stop, while the API server still
holds the entry.

Bed: two point-to-point nodes whose agents watch the test API server (tests/kubeapi.py) on
172.18.0.1:6443 in the fabric namespace. Namespace "shop" is enrolled: client on node-2. Service
shop/billing 10.96.0.30:80 -> targetPort "http" selects app=billing, which no pod has. "vm" on
node-1 is in no registry at all: it plays a VM outside the cluster, serving on 8080; it registers
itself from node-1.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import pytest

from tests.bed import in_netns
from tests.kubeapi import KubeAPIServer
from tests.mesh import AMESHCTL, Mesh, ServiceSpec, exchange

API_HOST, API_PORT = "172.18.0.1", 6443
BILLING_IP = "10.96.0.30"
TTL = 3.0  # seconds, as registered
LAPSE_MARGIN = 1.5  # seconds past the TTL (after the last heartbeat) for every agent to stop routing to it


@pytest.fixture
def cluster(make_bed) -> Iterator[tuple[Mesh, KubeAPIServer]]:
    bed = make_bed("p2p", nodes=2)
    bed.run(bed.fabric, ["ip", "addr", "add", f"{API_HOST}/24", "dev", "br0"])
    mesh = Mesh(bed, namespaces={"shop": True})
    bed.add_pod("client", 2, namespace="shop", service_account="client", labels={"app": "client"})
    mesh.services.append(ServiceSpec("billing", "shop", BILLING_IP, 80, "http", {"app": "billing"}))
    with in_netns(bed.fabric):  # the server's thread, and so its sockets, live in the fabric namespace
        api = KubeAPIServer(API_HOST, API_PORT, bookmark_interval=1.0, objects=mesh.objects())
        api.start()
    try:
        vm = bed.add_pod("vm", 1, namespace="outside")  # after the API server's objects: in no registry
        bed.start_podserver(vm, 8080, name="vm")
        mesh.kubeconfig = api.write_kubeconfig(bed.logdir / "kubeconfig")
        mesh.start_agent(1)
        mesh.start_agent(2)
        mesh.wait_for("the agents' initial sync", lambda: all(
            mesh.ctl_json(n, "status")["registry"]["connected"] for n in (1, 2)))
        yield mesh, api
        mesh.print_logs()
    finally:
        api.close()


def reachable(mesh: Mesh) -> bool:
    try:
        return exchange(mesh.bed, mesh.bed.pods["client"], BILLING_IP, 80, b"pay", timeout=1) == ("vm", b"pay")
    except ConnectionError:
        return False


def billing_endpoints(mesh: Mesh, node: int) -> list[tuple[str, bool]]:
    [billing] = [s for s in mesh.ctl_json(node, "services") if s["key"] == "shop/billing"]
    return [(e["ip"], e["ready"]) for e in billing["endpoints"]]


def test_a_workload_entry_registered_on_one_node_serves_the_other_until_its_heartbeats_stop(cluster):
    mesh, api = cluster
    bed, vm = mesh.bed, mesh.bed.pods["vm"]
    assert not reachable(mesh)  # no endpoint yet: node-2's ztunnel resets the connection

    register = bed.spawn(bed.node(1), [AMESHCTL, "register", "billing", "--address", vm.ip, "--port", "8080",
                                       "-n", "shop", "--service-account", "billing", "--kubeconfig",
                                       str(mesh.kubeconfig), "--ttl", f"{TTL:g}s"], bed.logdir / "register.log")
    mesh.wait_for("node-2 to route to the entry", lambda: billing_endpoints(mesh, 2) == [(vm.ip, True)])
    assert billing_endpoints(mesh, 1) == [(vm.ip, True)]  # every agent reads it
    assert reachable(mesh)
    workload = next(w for w in mesh.ctl_json(2, "workloads") if w["ip"] == vm.ip)
    assert (workload["key"], workload["source"], workload["enrolled"], workload["labels"]) == (
        "shop/billing@WorkloadEntry", "kubernetes", False, {"app": "billing"})
    [conn] = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "closed"][-1:]
    assert conn["upstream"] == f"{vm.ip}:8080" and conn["security"] == "plaintext"  # as a loopback registration
    time.sleep(TTL + 0.5)  # more than a TTL: only the heartbeats keep it ready
    assert billing_endpoints(mesh, 2) == [(vm.ip, True)] and reachable(mesh)

    os.kill(register.pid, signal.SIGKILL)  # the client dies: no goodbye, its heartbeats just stop
    killed = time.monotonic()
    assert reachable(mesh)  # its last heartbeat (at most TTL/3 ago) still holds
    mesh.wait_for("the entry to lapse on node-2", lambda: not reachable(mesh), TTL + LAPSE_MARGIN)
    assert time.monotonic() - killed <= TTL + LAPSE_MARGIN
    assert billing_endpoints(mesh, 2) == [(vm.ip, False)]
    failed = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "failed"][-1]
    assert "has no ready endpoint" in failed["reason"]
    entry = api.get("WorkloadEntry", "billing", "shop")
    assert entry is not None and entry["status"]["conditions"][0]["status"] == "True"  # still held, still "True"
    mesh.wait_for("node-1 too", lambda: billing_endpoints(mesh, 1) == [(vm.ip, False)], 1.0)

    out = mesh.ctl(1, "deregister", "billing", "-n", "shop", "--kubeconfig", str(mesh.kubeconfig)).stdout
    assert out == "deregistered: WorkloadEntry shop/billing\n" and api.get("WorkloadEntry", "billing", "shop") is None
    mesh.wait_for("the entry gone", lambda: billing_endpoints(mesh, 2) == [])


def test_a_loopback_registration_is_refused_pointing_to_workload_entries(cluster):
    mesh, _ = cluster
    vm = mesh.bed.pods["vm"]
    refused = mesh.ctl(1, "register", "billing", "--address", vm.ip, "--port", "8080", "-n", "shop", check=False)
    assert refused.returncode == 1
    assert "this agent reads its registry from the Kubernetes API server" in refused.stderr
    assert "--kubeconfig FILE --ttl 30s" in refused.stderr and "WorkloadEntry" in refused.stderr
    assert billing_endpoints(mesh, 1) == []
