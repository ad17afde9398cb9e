"""Inbound HBONE believes only what a peer proved: the pod is the one the connection was made to,
and a claimed source counts only when its identity is the one the peer's certificate proved.

Bed: two point-to-point nodes, an agent on node-2 only. Namespace "shop" is enrolled: server-b
and server-c (both sa web) on node-2, client (sa client) on node-1. The attacker runs in pod
"rogue" (not enrolled) on node-1 with a valid mesh certificate of its own choosing, speaking
HBONE with amesh's own client to server-b's IP on port 15008 (captured on node-2 like any
peer ztunnel's connection). A claimed source that is not borne out leaves the connection with
the peer's own address, attributed to a workload only if the registry shows the proved identity
there.
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from tests.bed import in_netns
from tests.mesh import SINGLE_PROCESS, Mesh
from ztunnel.hbone import HBONE_PORT, HboneClientPool, HboneError, PoolKey, forwarded_for
from ztunnel.identity import CertificateManager, FileCA, Identity

TARGET_PORT = 8080


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=TARGET_PORT,
                # /metrics counts this process only until the dataplane-telemetry merge sums the workers
                agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client")
    bed.add_pod("rogue", 1, namespace="legacy")
    for name in ("server-b", "server-c"):
        bed.add_pod(name, 2, namespace="shop", service_account="web")
        bed.start_podserver(bed.pods[name], TARGET_PORT)
    mesh.write_registry()
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def connect_as(mesh: Mesh, identity: str, dialled_ip: str, authority: str,
               claimed_source: str | None) -> tuple[str, bytes]:
    """From pod "rogue": one CONNECT to `authority` over mTLS to `dialled_ip`:15008 with a
    certificate for `identity`; ("ok", what the pod said first) or ("refused", the error)."""
    proved = Identity.parse(identity)
    headers = [("forwarded", forwarded_for(claimed_source))] if claimed_source else []

    async def attempt() -> tuple[str, bytes]:
        certs = CertificateManager(FileCA.load_or_create(mesh.ca_dir))
        certs.set_identities([proved])
        pool = HboneClientPool(connect_timeout=3.0)
        try:
            key = PoolKey(identity, "any", (dialled_ip, HBONE_PORT))
            stream = await pool.open(key, certs.client_context(proved), authority, headers, lambda _: None)
            greeting = await asyncio.wait_for(stream.read(100), 3)
            stream.close()
            return "ok", bytes(greeting)
        except HboneError as e:
            return "refused", str(e).encode()
        finally:
            await pool.close()

    with in_netns(mesh.bed.pods["rogue"].netns):
        return asyncio.run(attempt())


def inbound(mesh: Mesh, count: int) -> list[dict]:
    """The node-2 ztunnel's inbound connection records, once `count` of them have ended."""
    return mesh.wait_for(f"{count} ended inbound connections", lambda: len(
        cs := [c for c in mesh.ctl_json(2, "connections") if c["direction"] == "inbound"
               and c["state"] in ("closed", "failed")]) >= count and cs)


def test_a_connect_naming_another_pod_than_the_one_dialled_gets_400_and_reaches_neither(mesh: Mesh):
    bed = mesh.bed
    server_b, server_c = bed.pods["server-b"], bed.pods["server-c"]
    # server-c shares server-b's service account, so its identity is the certificate served
    outcome, error = connect_as(mesh, "spiffe://cluster.local/ns/shop/sa/client", server_b.ip,
                                f"{server_c.ip}:{TARGET_PORT}", None)
    assert outcome == "refused" and b"answered CONNECT" in error and b"400" in error, error
    [record] = inbound(mesh, 1)
    assert record["state"] == "failed" and record["failure"] == "wrong_authority", record
    assert "only the port may differ" in record["reason"]
    # the control: the same peer asking for server-b itself is tunnelled to server-b
    assert connect_as(mesh, "spiffe://cluster.local/ns/shop/sa/client", server_b.ip,
                      f"{server_b.ip}:{TARGET_PORT}", None) == ("ok", b"server-b\n")
    records = inbound(mesh, 2)
    assert [r["upstream_workload"] for r in records if r["state"] == "closed"] == ["shop/server-b"], records


def test_a_spoofed_forwarded_source_is_not_believed_and_is_counted(mesh: Mesh):
    bed = mesh.bed
    client, rogue, server_b = bed.pods["client"], bed.pods["rogue"], bed.pods["server-b"]
    authority = f"{server_b.ip}:{TARGET_PORT}"
    # rogue proves legacy/default but names the shop client's address as the source
    assert connect_as(mesh, "spiffe://cluster.local/ns/legacy/sa/default", server_b.ip, authority,
                      client.ip) == ("ok", b"server-b\n")
    [spoofed] = inbound(mesh, 1)
    # never attributed to the pod it named; rogue dialled from its own address, where the registry
    # shows the identity it proved, so it is recorded as itself (an Istio ztunnel peer dials so)
    assert (spoofed["source_workload"], spoofed["source_ip"]) == ("legacy/rogue", rogue.ip), spoofed
    assert spoofed["source_identity"] == "spiffe://cluster.local/ns/legacy/sa/default"
    # the claim is believed when the identity proved is the one the registry gives that address
    assert connect_as(mesh, "spiffe://cluster.local/ns/shop/sa/client", server_b.ip, authority,
                      client.ip) == ("ok", b"server-b\n")
    believed = inbound(mesh, 2)[0]
    assert (believed["source_workload"], believed["source_ip"]) == ("shop/client", client.ip), believed
    [(_, unverified)] = mesh.metrics(2)["amesh_hbone_unverified_sources_total"]
    assert unverified == 1
