"""The cluster CA on a real bed: agents hold no root key and get certificates only for the pods
the API server has placed on their node.

Bed: two point-to-point nodes; the control plane (tests.mesh.ControlPlane) in the fabric namespace
on 172.18.0.1: the test API server (:6443) and `ameshctl ca serve` (:15012, metrics :15014), which
alone holds the root key. Each agent watches the API server and asks the CA with a token bound
to its agent pod (audience amesh-ca), checking the CA's TLS against the trust bundle (ca.crt only).
Namespace "shop" is enrolled: client and server-a on node-1, server-b on node-2.
"""

from __future__ import annotations

import base64
import copy
import os
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tests.kubeapi import KubeAPIServer
from tests.mesh import ADMIN_PORT, METRICS_PORT, ControlPlane, Mesh, claimed_pod, exchange

RENEW_DEADLINE = 10.0  # seconds for renew-certs to reach the CA and come back (retries back off from 1 s)
ADMIN_VIEWS = ("/status", "/certs", "/workloads", "/services", "/connections", "/policies", "/flows",
               "/registrations")


@pytest.fixture
def cluster(make_bed) -> Iterator[tuple[Mesh, ControlPlane]]:
    bed = make_bed("p2p", nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=8080)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server-a", 1, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web"})
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], 8080)
    plane = ControlPlane.start(mesh)
    try:
        for node in (1, 2):
            mesh.start_agent(node)
        plane.wait_synced(RENEW_DEADLINE)
        yield mesh, plane
        mesh.print_logs()
        print((bed.logdir / "ca.log").read_text(errors="replace")[-4000:])
    finally:
        plane.close()


def certificates(mesh: Mesh, node: int) -> dict[str, dict]:
    return {c["identity"]: c for c in mesh.ctl_json(node, "certs")["certificates"]}


def sample(samples: dict, name: str, **labels: str) -> float:
    return sum(value for found, value in samples.get(name, []) if all(found.get(k) == v for k, v in labels.items()))


def served(mesh: Mesh, ip: str) -> str:
    return exchange(mesh.bed, mesh.bed.pods["client"], ip, 8080, b"hi", timeout=3)[0]


def renewed_with_error(mesh: Mesh, node: int, identity: str, text: str) -> dict:
    """Asks the node to renew now and waits until `identity`'s last error names `text`."""
    mesh.ctl(node, "renew-certs")
    return mesh.wait_for(f"{identity} refused with {text!r}",
                         lambda: (c := certificates(mesh, node)[identity])["last_error"] and text in c["last_error"]
                         and c, RENEW_DEADLINE)


def root_key_marks(plane: ControlPlane) -> list[bytes]:
    """Byte strings that would show the root key: its DER (PKCS#8 and raw scalar), PEM lines, hex."""
    key = serialization.load_pem_private_key((plane.secret_dir / "ca.key").read_bytes(), None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    pem_lines = [line for line in (plane.secret_dir / "ca.key").read_bytes().splitlines() if len(line) == 64]
    return [der, scalar, scalar.hex().encode(), base64.b64encode(der)[:48], *pem_lines]


def _group_pids(leader: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == leader:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def key_findings(pid_leader: int, marks: list[bytes]) -> list[str]:
    """Where a process group shows the root key: its environment, the files it has open, the files
    and directories named on its command line (and the files in them)."""
    found = []
    for pid in _group_pids(pid_leader):
        proc = Path(f"/proc/{pid}")
        places: dict[str, bytes] = {f"{proc}/environ": (proc / "environ").read_bytes()}
        for fd in (proc / "fd").iterdir():
            try:
                target = os.readlink(fd)
                if target.startswith("/") and not target.startswith("/dev/") and Path(fd).is_file():
                    places[f"fd {fd.name} -> {target}"] = fd.read_bytes()[:16 * 1024 * 1024]
            except OSError:
                continue  # closed meanwhile, or a socket
        for argument in (proc / "cmdline").read_bytes().split(b"\0"):
            path = Path(os.fsdecode(argument))
            if not argument.startswith(b"/"):
                continue
            for file in ([path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []):
                if file.is_file():
                    places[f"command-line file {file}"] = file.read_bytes()
        found += [f"pid {pid}: {where}" for where, data in places.items() if any(m in data for m in marks)]
    return found


def test_agents_get_certificates_from_the_cluster_ca_and_hold_no_root_key(cluster):
    mesh, plane = cluster
    assert served(mesh, mesh.bed.pods["server-b"].ip) == "server-b"  # mTLS across nodes, CA-issued
    for node, identities in ((1, {"client", "web"}), (2, {"web"})):
        held = certificates(mesh, node)
        assert {uri.rsplit("/", 1)[1] for uri in held} == identities
        assert all(c["state"] == "valid" for c in held.values()), held
        status = mesh.ctl_json(node, "status")["ca"]
        assert (status["mode"], status["address"], status["last_error"]) == ("cluster", plane.ca_address, None)
        assert sample(mesh.metrics(node), "amesh_ca_requests_total", result="signed") == len(identities)
    assert "certificate authority  cluster CA 172.18.0.1:15012: ok" in mesh.ctl(1, "status").stdout
    assert sample(plane.ca_metrics(), "amesh_ca_server_requests_total", result="signed") == 3

    marks = root_key_marks(plane)
    assert key_findings(plane.ca.pid, marks), "the check finds the key where it is (the CA's Secret)"
    for node in (1, 2):
        assert key_findings(mesh.agents[f"node-{node}"].pid, marks) == []
        for path in ADMIN_VIEWS:
            status, body = mesh.http(node, ADMIN_PORT, path)
            assert status == 200 and not any(m.decode("latin-1") in body for m in marks), path
        status, body = mesh.http(node, METRICS_PORT, "/metrics")
        assert not any(m.decode("latin-1") in body for m in marks)

    # the CA goes away: current certificates keep serving, with a clear status line and a metric
    plane.stop_ca()
    serial = certificates(mesh, 2)["spiffe://cluster.local/ns/shop/sa/web"]["serial"]
    row = renewed_with_error(mesh, 2, "spiffe://cluster.local/ns/shop/sa/web", "cannot reach the cluster CA")
    assert (row["state"], row["serial"]) == ("renewing", serial)
    assert served(mesh, mesh.bed.pods["server-b"].ip) == "server-b"
    line = next(line for line in mesh.ctl(2, "status").stdout.splitlines() if line.startswith("certificate authority"))
    assert "FAILING since" in line and "keep serving until they expire (first at" in line, line
    assert sample(mesh.metrics(2), "amesh_ca_requests_total", result="unreachable") >= 1
    plane.start_ca()
    mesh.wait_for("the CA back: the certificate renewed", lambda: (
        c := certificates(mesh, 2)["spiffe://cluster.local/ns/shop/sa/web"])["state"] == "valid"
        and c["serial"] != serial, 20)


def test_the_ca_refuses_identities_of_pods_not_on_the_asking_node(cluster):
    mesh, plane = cluster
    bed = mesh.bed
    web, client, ghost = (f"spiffe://cluster.local/ns/shop/sa/{sa}" for sa in ("web", "client", "ghost"))
    # node-2's agent lies (a compromised node): its own registry says client and a pod of a service
    # account no pod runs as are on node-2; the CA goes by the API server
    lie = mesh.objects() + [claimed_pod(mesh, "server-b", "client-copy", "client", "10.244.2.50"),
                            claimed_pod(mesh, "server-b", "ghost", "ghost", "10.244.2.51")]
    lie_file = bed.logdir / "node-2-lies.yaml"
    lie_file.write_text(yaml.safe_dump_all(lie))
    mesh.stop_agent(2)
    mesh.start_agent(2, "--registry-file", str(lie_file))

    mesh.wait_for("node-2's answers", lambda: all(
        c["state"] == "valid" or c["last_error"] for c in certificates(mesh, 2).values())
        and len(certificates(mesh, 2)) == 3, RENEW_DEADLINE)
    held = certificates(mesh, 2)
    assert held[web]["state"] == "valid"
    assert held[client]["state"] == "pending"
    assert ("(identity_on_other_node): node node-2 runs no pod with service account client in namespace shop "
            "(such pods run on node-1)") in held[client]["last_error"]
    assert held[ghost]["state"] == "pending"
    assert "(unknown_service_account): no pod with service account ghost" in held[ghost]["last_error"]
    metrics = mesh.metrics(2)
    assert sample(metrics, "amesh_ca_requests_total", result="identity_on_other_node") >= 1
    assert sample(metrics, "amesh_ca_requests_total", result="unknown_service_account") >= 1
    ca = plane.ca_metrics()
    assert sample(ca, "amesh_ca_server_requests_total", result="identity_on_other_node") >= 1
    assert sample(ca, "amesh_ca_server_requests_total", result="unknown_service_account") >= 1

    # tokens the CA cannot trust: expired, minted by another API server, for another audience
    plane.write_token(2, plane.api.request_token("amesh-system", "amesh-agent", "amesh-agent-node-2",
                                                 ["amesh-ca"], seconds=0.5))
    time.sleep(1.0)
    renewed_with_error(mesh, 2, web, "(token_expired): the Kubernetes API server did not authenticate")
    with KubeAPIServer() as other:
        other.apply(plane.api.get("Pod", "amesh-agent-node-2", "amesh-system"))
        plane.write_token(2, other.request_token("amesh-system", "amesh-agent", "amesh-agent-node-2", ["amesh-ca"]))
    renewed_with_error(mesh, 2, web, "(token_invalid): the Kubernetes API server did not authenticate the "
                                     "agent's token: [invalid bearer token, token not signed by this API server]")
    plane.write_token(2, plane.api.request_token("amesh-system", "amesh-agent", "amesh-agent-node-2", ["vault"]))
    renewed_with_error(mesh, 2, web, "(token_wrong_audience)")
    assert certificates(mesh, 2)[web]["state"] == "renewing"  # the one it has keeps serving
    for reason in ("token_expired", "token_invalid", "token_wrong_audience"):
        assert sample(mesh.metrics(2), "amesh_ca_requests_total", result=reason) >= 1

    # a good token again: renewed; then server-b moves to node-1 and node-2 can no longer get web
    plane.write_token(2)
    mesh.ctl(2, "renew-certs")
    mesh.wait_for("web renewed", lambda: certificates(mesh, 2)[web]["state"] == "valid", RENEW_DEADLINE)
    moved = copy.deepcopy(plane.api.get("Pod", "server-b", "shop"))
    moved["spec"]["nodeName"] = "node-1"
    plane.api.apply(moved)
    mesh.wait_for("node-1 to see server-b", lambda: any(
        w["key"] == "shop/server-b" and w["node"] == "node-1" for w in mesh.ctl_json(1, "workloads")), 5)
    renewed_with_error(mesh, 2, web, "(identity_on_other_node): node node-2 runs no pod with service account web")
