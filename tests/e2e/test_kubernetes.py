"""The registry synced live from a Kubernetes API server: the agents list and watch the test
API server (tests/kubeapi.py, which the real kubectl also reads) and follow its changes into
routing and capture; an API server that is down leaves the last good registry serving; an
AuthorizationPolicy applied with the real kubectl is enforced within a second; a DestinationRule
applied with it shapes its Service, and a malformed version leaves the last good one in force.

Bed: two point-to-point nodes with agents that have no registry file. The API server listens
on 172.18.0.1:6443 in the fabric namespace (an address on the fabric bridge, as a control plane
on the node network). Namespace "shop" is enrolled: client on node-1, server-a on node-1,
server-b on node-2, behind Service shop/web 10.96.0.10:80 -> http (8080).
"""

from __future__ import annotations

import copy
import shutil
import time
from typing import Iterator

import pytest
import yaml

from tests.bed import in_netns
from tests.kubeapi import KubeAPIServer
from tests.mesh import SINGLE_PROCESS, Mesh, ServiceSpec, exchange

API_HOST, API_PORT = "172.18.0.1", 6443
SERVICE_IP = "10.96.0.10"
CHANGE_DEADLINE = 3.0  # seconds for a change in the API server to reach routing or capture
POLICY_DEADLINE = 1.0  # seconds for an AuthorizationPolicy applied with kubectl to be enforced
KUBECTL = shutil.which("kubectl")
DENY_CLIENT = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-client", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
             "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]},
}


@pytest.fixture
def cluster(make_bed) -> Iterator[tuple[Mesh, KubeAPIServer]]:
    bed = make_bed("p2p", nodes=2)
    bed.run(bed.fabric, ["ip", "addr", "add", f"{API_HOST}/24", "dev", "br0"])
    # round-robin turns are per worker process: the exact a, a, b, b below needs one
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=8080, agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server-a", 1, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web"})
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], 8080)
    with in_netns(bed.fabric):  # the server's thread, and so its sockets, live in the fabric namespace
        api = KubeAPIServer(API_HOST, API_PORT, bookmark_interval=1.0, objects=mesh.objects())
        api.start()
    try:
        mesh.kubeconfig = api.write_kubeconfig(bed.logdir / "kubeconfig")
        mesh.start_agent(1)
        mesh.start_agent(2)
        mesh.wait_for("the agents' initial sync", lambda: all(
            mesh.ctl_json(n, "status")["registry"]["connected"] for n in (1, 2)))
        yield mesh, api
        mesh.print_logs()
    finally:
        api.close()


def served_by(mesh: Mesh, count: int = 4) -> list[str]:
    return [exchange(mesh.bed, mesh.bed.pods["client"], SERVICE_IP, 80, b"hi", timeout=2)[0] for _ in range(count)]


def reachable(mesh: Mesh) -> bool:
    try:
        return exchange(mesh.bed, mesh.bed.pods["client"], SERVICE_IP, 80, b"hi", timeout=0.5)[1] == b"hi"
    except OSError:
        return False


def workload(mesh: Mesh, key: str, node: int = 1) -> dict | None:
    return next((w for w in mesh.ctl_json(node, "workloads") if w["key"] == key), None)


def test_initial_sync_feeds_routing_and_capture(cluster):
    mesh, _ = cluster
    client = workload(mesh, "shop/client")
    assert (client["source"], client["enrolled"], client["captured"]) == ("kubernetes", True, True)
    [web] = [s for s in mesh.ctl_json(1, "services") if s["key"] == "shop/web"]
    assert (web["source"], len(web["endpoints"])) == ("kubernetes", 2)
    assert sorted(served_by(mesh)) == ["server-a", "server-a", "server-b", "server-b"]
    assert mesh.ctl_json(1, "status")["registry"]["source"] == "kubernetes"


def test_changes_in_the_api_server_reach_routing_and_capture(cluster):
    mesh, api = cluster
    # readiness: server-b turns not ready -> new connections avoid it
    pod = copy.deepcopy(api.get("Pod", "server-b", "shop"))
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    api.apply(pod)
    mesh.wait_for("server-b not ready", lambda: not workload(mesh, "shop/server-b")["ready"], CHANGE_DEADLINE)
    assert served_by(mesh) == ["server-a"] * 4

    # delete: server-a goes -> no ready endpoint left, the client's connections are refused
    api.delete("Pod", "server-a", "shop")
    mesh.wait_for("server-a gone", lambda: workload(mesh, "shop/server-a") is None, CHANGE_DEADLINE)
    assert not reachable(mesh)

    # EndpointSlice: once one exists it alone lists the endpoints -> server-b is served again
    api.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"addresses": [mesh.bed.pods["server-b"].ip], "conditions": {"ready": True}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    mesh.wait_for("the EndpointSlice's endpoint", lambda: reachable(mesh), CHANGE_DEADLINE)
    assert served_by(mesh) == ["server-b"] * 4

    # namespace label flip: un-enrolling shop stops capture of the client; enrolling it again restores it
    namespace = copy.deepcopy(api.get("Namespace", "shop"))
    namespace["metadata"]["labels"] = {}
    api.apply(namespace)
    mesh.wait_for("shop un-enrolled", lambda: not workload(mesh, "shop/client")["captured"], CHANGE_DEADLINE)
    assert not reachable(mesh)  # no capture: the cluster IP has no route
    namespace["metadata"]["labels"] = {"amesh.io/dataplane-mode": "ambient"}
    api.apply(namespace)
    mesh.wait_for("shop enrolled again", lambda: reachable(mesh), CHANGE_DEADLINE)


def test_an_api_server_down_for_ten_seconds_leaves_traffic_flowing_and_the_agent_catches_up(cluster):
    mesh, api = cluster
    api.stop()
    mesh.wait_for("the agent to notice", lambda: not mesh.ctl_json(1, "status")["registry"]["connected"], 10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the last good registry keeps serving
        assert reachable(mesh)
        time.sleep(0.5)
    status = mesh.ctl_json(1, "status")["registry"]
    assert status["last_error"] and status["workloads"] == 3
    pod = copy.deepcopy(api.get("Pod", "server-b", "shop"))
    pod["metadata"]["labels"]["version"] = "v2"
    api.apply(pod)  # changed while the agents could not see it
    api.start()
    mesh.wait_for("the agent to catch up", lambda: workload(mesh, "shop/server-b")["labels"].get("version") == "v2",
                  35)
    mesh.wait_for("every watch to be open again", lambda: mesh.ctl_json(1, "status")["registry"]["connected"], 35)


def kubectl(mesh: Mesh, *args: str) -> str:
    """The real kubectl against the test API server, from the fabric namespace where it listens."""
    home = mesh.bed.logdir / "kubectl-home"  # its discovery cache, not in ~/.kube
    argv = ["env", f"HOME={home}", f"KUBECACHEDIR={home / 'cache'}", str(KUBECTL),
            "--kubeconfig", str(mesh.kubeconfig), "--request-timeout=10s", *args]
    return mesh.bed.run(mesh.bed.fabric, argv).stdout


def policy_denials(mesh: Mesh, node: int) -> int:
    return mesh.ctl_json(node, "status")["connections"]["failures"].get("policy_denied", 0)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found on PATH (apt-get install -y kubernetes-client)")
def test_an_authorization_policy_applied_with_kubectl_denies_the_client_within_a_second(cluster):
    mesh, api = cluster
    assert reachable(mesh)
    manifest = mesh.bed.logdir / "deny-client.yaml"
    manifest.write_text(yaml.safe_dump(DENY_CLIENT))
    assert kubectl(mesh, "apply", "-f", str(manifest)) == "authorizationpolicy.security.istio.io/deny-client created\n"
    mesh.wait_for("the client's connections refused", lambda: not reachable(mesh), POLICY_DEADLINE)
    # both endpoints refuse it: server-a on the client's node, server-b across the fabric
    assert not any(reachable(mesh) for _ in range(4))
    assert policy_denials(mesh, 1) > 0 and policy_denials(mesh, 2) > 0
    [policy] = mesh.ctl_json(2, "policies")["authorization_policies"]
    assert (policy["namespace"], policy["name"], policy["action"]) == ("shop", "deny-client", "DENY")
    assert kubectl(mesh, "get", "authorizationpolicies", "-A").splitlines()[1].split()[:3] == \
        ["shop", "deny-client", "DENY"]

    assert kubectl(mesh, "delete", "-f", str(manifest)) == 'authorizationpolicy.security.istio.io "deny-client" deleted\n'
    mesh.wait_for("the client allowed again", lambda: reachable(mesh), POLICY_DEADLINE)
    assert sorted(served_by(mesh)) == ["server-a", "server-a", "server-b", "server-b"]


WEB_RULE = {
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"host": "web", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 50}},
                                              "loadBalancer": {"simple": "RANDOM"}}},
}


def web_traffic(mesh: Mesh, node: int) -> dict:
    [web] = [s for s in mesh.ctl_json(node, "services") if s["key"] == "shop/web"]
    return web["traffic"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found on PATH (apt-get install -y kubernetes-client)")
def test_a_destination_rule_applied_with_kubectl_shapes_the_service_and_a_malformed_one_keeps_the_last_good(cluster):
    mesh, api = cluster
    manifest = mesh.bed.logdir / "web-rule.yaml"
    manifest.write_text(yaml.safe_dump(WEB_RULE))
    assert kubectl(mesh, "apply", "-f", str(manifest)) == "destinationrule.networking.istio.io/web created\n"
    mesh.wait_for("the rule in force on both nodes", lambda: all(
        web_traffic(mesh, n)["max_connections"] == 50 for n in (1, 2)), CHANGE_DEADLINE)
    traffic = web_traffic(mesh, 1)
    assert (traffic["load_balancer"], traffic["configured_by"]) == ("RANDOM", ["DestinationRule shop/web"])
    assert "max 50 conns, random" in mesh.ctl(1, "services").stdout

    malformed = copy.deepcopy(WEB_RULE)
    malformed["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] = -1
    manifest.write_text(yaml.safe_dump(malformed))
    assert kubectl(mesh, "apply", "-f", str(manifest)) == "destinationrule.networking.istio.io/web configured\n"
    expected = ("rejected DestinationRule shop/web: spec.trafficPolicy.connectionPool.tcp.maxConnections: must be a "
                "positive integer, got -1 (the version before it stays in force)")
    mesh.wait_for("the rejection in ameshctl status", lambda: mesh.ctl_json(1, "status")["registry"]["last_error"]
                  == expected, CHANGE_DEADLINE)
    assert expected.removeprefix("rejected ") in mesh.ctl(1, "status").stdout
    assert web_traffic(mesh, 1)["max_connections"] == 50 and reachable(mesh)

    assert kubectl(mesh, "delete", "-f", str(manifest)) == 'destinationrule.networking.istio.io "web" deleted\n'
    mesh.wait_for("the rule gone", lambda: web_traffic(mesh, 1)["configured_by"] == [], CHANGE_DEADLINE)
    assert mesh.ctl_json(1, "status")["registry"]["last_error"] is None
