"""Zero-trust transport end to end: identities, mTLS/HBONE between nodes, inbound capture,
STRICT/PERMISSIVE, certificate renewal under traffic and connection pooling.

Bed: three point-to-point nodes, agents on node-1 and node-2 only. Namespace "shop" is enrolled:
client (sa client) and server-a (sa web) on node-1, server-b (sa web) on node-2, behind Service
shop/web 10.96.0.10:80. Namespace "legacy" is not: pod "plain" on node-1. On node-3, which has
no agent, "impostor" is registered as an enrolled shop pod of sa web but runs a rogue HBONE
server whose (validly signed) certificate says sa other.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import sys
import threading
import time
from typing import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.bed import netns_socket
from tests.mesh import SINGLE_PROCESS, Mesh, ServiceSpec, exchange
from ztunnel.identity import FileCA, Identity

SERVICE_IP = "10.96.0.10"
TARGET_PORT = 8080
HBONE_PORT = 15008
SECRET = b"AMESH-PAYLOAD-IN-CLEAR?"  # must never appear on the fabric
TRUST_DOMAIN = "cluster.local"
PCAP_HEADER = 24  # bytes of a pcap file's global header


def spiffe(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=3)
    # one HBONE pool per process: with workers a peer sees a session per worker (by design)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=TARGET_PORT, agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server-a", 1, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("plain", 1, namespace="legacy", labels={"app": "plain"})
    bed.add_pod("impostor", 3, namespace="shop", service_account="web", labels={"app": "impostor"})
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], TARGET_PORT)
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def closed(mesh: Mesh, node: int, count: int) -> list[dict]:
    """Waits for `count` closed or failed connections on a node's ztunnel; newest first."""
    return mesh.wait_for(f"{count} ended connections on node-{node}", lambda: len(
        cs := [c for c in mesh.ctl_json(node, "connections") if c["state"] in ("closed", "failed")]) >= count and cs)


def status(mesh: Mesh, node: int) -> dict:
    return mesh.ctl_json(node, "status")


def test_cross_node_traffic_is_mutual_tls_on_the_wire_with_identities_on_both_ends(mesh: Mesh):
    bed = mesh.bed
    capture = bed.logdir / "fabric.pcap"
    tcpdump = bed.spawn(bed.fabric, ["tcpdump", "-i", "n1", "--immediate-mode", "-U", "-n", "-w", str(capture), "tcp"],
                        bed.logdir / "tcpdump.log")
    _flush(mesh, capture, PCAP_HEADER)
    start = capture.stat().st_size
    served = []
    for _ in range(4):
        payload = SECRET * 100
        name, echoed = exchange(bed, bed.pods["client"], SERVICE_IP, 80, payload)
        assert echoed == payload
        served.append(name)
    assert sorted(served) == ["server-a", "server-a", "server-b", "server-b"]
    _flush(mesh, capture, capture.stat().st_size)  # packets are written in order: all before it are in
    bed.stop(tcpdump)

    wire = capture.read_bytes()[start:]
    assert wire.count(b"\x08\x00\x45") > 20, "the capture on node-1's fabric port saw no IPv4 traffic:\n" + bed.run(
        bed.fabric, ["tcpdump", "-r", str(capture), "-n"]).stdout
    assert SECRET not in wire, "payload crossed the fabric in clear"
    hello = bed.run(bed.fabric, ["tcpdump", "-r", str(capture), "-n",
                                 f"tcp dst port {HBONE_PORT} and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16"]).stdout
    assert hello.strip(), "no TLS handshake record to port 15008 on the fabric"
    direct = bed.run(bed.fabric, ["tcpdump", "-r", str(capture), "-n", f"tcp port {TARGET_PORT}"]).stdout
    assert not direct.strip(), f"pod port {TARGET_PORT} reached across the fabric without HBONE:\n{direct}"

    outbound = closed(mesh, 1, 4)
    by_security = {c["security"] for c in outbound}
    assert by_security == {"mtls", "same-node"}
    for c in outbound:
        assert c["source_identity"] == spiffe("shop", "client")
        assert c["destination_identity"] == spiffe("shop", "web")
    inbound = mesh.wait_for("2 tunnelled connections on node-2", lambda: len(
        cs := [c for c in mesh.ctl_json(2, "connections") if c["security"] == "mtls"]) == 2 and cs)
    for c in inbound:
        assert (c["direction"], c["security"], c["state"]) == ("inbound", "mtls", "closed")
        assert c["source_identity"] == spiffe("shop", "client")
        assert c["source_workload"] == "shop/client" and c["source_ip"] == bed.pods["client"].ip
        assert c["upstream_workload"] == "shop/server-b"
        assert (c["bytes_sent"], c["bytes_received"]) == (len(SECRET) * 100, len(b"server-b\n") + len(SECRET) * 100)
    certs = mesh.ctl_json(2, "certs")
    assert [c["identity"] for c in certs["certificates"]] == [spiffe("shop", "web")]
    assert certs["root_fingerprint"] == mesh.ctl_json(1, "certs")["root_fingerprint"]
    assert {c["identity"] for c in mesh.ctl_json(1, "certs")["certificates"]} == {
        spiffe("shop", "client"), spiffe("shop", "web")}


def _flush(mesh: Mesh, capture: Path, size: int) -> None:
    """Sends probes (SYNs from pod "plain" across node-1's fabric port) until `capture` grows
    past `size` bytes: then tcpdump is capturing, and has written everything sent before."""
    bed = mesh.bed

    def probe() -> bool:
        try:
            bed.connect(bed.pods["plain"], bed.pods["server-b"].ip, 9, timeout=0.2).close()
        except OSError:
            pass  # refused: only the packets matter
        return capture.exists() and capture.stat().st_size > size

    mesh.wait_for(f"tcpdump to write {capture.name}", probe)


def _client_context(chain_pem: bytes | None, key_pem: bytes | None, root_pem: bytes, tmp: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.check_hostname = False
    context.load_verify_locations(cadata=root_pem.decode())
    if chain_pem is not None:
        path = tmp / f"client-{len(list(tmp.iterdir()))}.pem"
        path.write_bytes(key_pem + chain_pem)
        context.load_cert_chain(path)
    return context


def _credentials(ca: FileCA, identity: str, lifetime: datetime.timedelta) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(Identity.parse(identity), key.public_key(), lifetime)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return issued.chain_pem, key_pem


def _refused(mesh: Mesh, context: ssl.SSLContext) -> bool:
    """Whether node-2 refuses an HBONE session from pod "plain" to server-b made with `context`."""
    bed = mesh.bed
    with netns_socket(bed.pods["plain"].netns) as raw:
        raw.settimeout(3)
        raw.connect((bed.pods["server-b"].ip, HBONE_PORT))
        try:
            with context.wrap_socket(raw, server_hostname=None) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9))  # preface + empty SETTINGS
                return tls.recv(100) == b""  # an accepted session answers with its SETTINGS
        except (ssl.SSLError, ConnectionError):
            return True


def test_clients_without_a_valid_identity_are_refused_before_reaching_the_pod(mesh: Mesh, tmp_path: Path):
    root = (mesh.ca_dir / "ca.crt").read_bytes()
    ours = FileCA.load_or_create(mesh.ca_dir)
    other_ca = FileCA.load_or_create(tmp_path / "other-ca")
    other_domain = FileCA.load_or_create(mesh.ca_dir, "evil.local")  # same root key, other trust domain
    past = FileCA.load_or_create(mesh.ca_dir, clock=lambda: time.time() - 2 * 86400)
    hour = datetime.timedelta(hours=1)
    cases = {
        "no certificate": (None, None),
        "another CA": _credentials(other_ca, spiffe("shop", "client"), hour),
        "another trust domain": _credentials(other_domain, spiffe("shop", "client", "evil.local"), hour),
        "expired": _credentials(past, spiffe("shop", "client"), hour),
    }
    for case, (chain, key) in cases.items():
        assert _refused(mesh, _client_context(chain, key, root, tmp_path)), case
    # the control: the same client with a valid certificate is served
    valid = _credentials(ours, spiffe("legacy", "default"), hour)
    assert not _refused(mesh, _client_context(*valid, root, tmp_path))

    failed = [c for c in closed(mesh, 2, 4) if c["state"] == "failed"]
    reasons = " | ".join(c["reason"] for c in failed)
    assert len(failed) == 4, reasons
    assert "did not return a certificate" in reasons or "certificate required" in reasons, reasons
    assert "certificate has expired" in reasons, reasons
    assert "self-signed certificate in certificate chain" in reasons, reasons  # the other root, sent along
    assert "trust domain evil.local" in reasons, reasons
    failures = status(mesh, 2)["connections"]["failures"]
    assert failures == {"tls": 3, "wrong_trust_domain": 1}, failures
    # nothing was delivered: no inbound connection to the pod was ever opened
    assert not [c for c in mesh.ctl_json(2, "connections") if c["state"] == "closed"]


def test_a_server_with_another_identity_is_refused_by_the_client(mesh: Mesh):
    bed = mesh.bed
    impostor = bed.pods["impostor"]
    proc = bed.spawn(impostor, [sys.executable, "-m", "tests.impostor",
                                "--ca-dir", str(mesh.ca_dir), "--identity", spiffe("shop", "other")],
                     bed.logdir / "impostor.log")
    bed.wait_listening(impostor, HBONE_PORT, proc=proc)
    with pytest.raises(ConnectionResetError):  # possibly before connect() even returns
        with bed.connect(bed.pods["client"], impostor.ip, TARGET_PORT, timeout=3) as sock:
            sock.sendall(b"secret")
            sock.recv(100)
    [conn] = closed(mesh, 1, 1)
    assert conn["state"] == "failed" and conn["security"] == "mtls"
    assert f"peer presented {spiffe('shop', 'other')} but {spiffe('shop', 'web')} was expected" in conn["reason"]


def test_strict_refuses_plaintext_from_outside_the_mesh_but_never_the_node_itself(mesh: Mesh):
    bed = mesh.bed
    server_b = bed.pods["server-b"]
    assert exchange(bed, bed.pods["plain"], server_b.ip, TARGET_PORT, b"permissive") == ("server-b", b"permissive")
    [delivered] = closed(mesh, 2, 1)
    assert (delivered["security"], delivered["state"], delivered["source_identity"]) == ("plaintext", "closed", None)

    mesh.mtls_modes["shop"] = "STRICT"
    mesh.write_registry()
    mesh.wait_for("STRICT to apply", lambda: status(mesh, 2)["registry"]["generation"] == 2)
    with pytest.raises(ConnectionError):
        exchange(bed, bed.pods["plain"], server_b.ip, TARGET_PORT, b"strict")
    refused = closed(mesh, 2, 2)[0]
    assert refused["state"] == "failed" and "STRICT" in refused["reason"]
    # a kubelet probe comes from the node itself: never captured, never refused
    with netns_socket(bed.node(2).netns) as probe:
        probe.settimeout(3)
        probe.connect((server_b.ip, TARGET_PORT))
        assert probe.recv(100) == b"server-b\n"
    # enrolled clients still get through, over mTLS
    assert exchange(bed, bed.pods["client"], server_b.ip, TARGET_PORT, b"mesh") == ("server-b", b"mesh")


def test_connections_to_one_destination_share_one_tls_session(mesh: Mesh):
    bed = mesh.bed
    server_b = bed.pods["server-b"]
    for i in range(100):
        assert exchange(bed, bed.pods["client"], server_b.ip, TARGET_PORT, b"%d" % i)[1] == b"%d" % i
    hbone = status(mesh, 1)["hbone"]
    assert hbone["handshakes"] == 1, hbone
    assert len(closed(mesh, 2, 100)) == 100


def test_agents_on_either_event_loop_carry_mtls_between_each_other(mesh: Mesh):
    bed = mesh.bed
    assert status(mesh, 1)["event_loop"] == "uvloop"  # the default
    mesh.stop_agent(1)
    mesh.start_agent(1, "--event-loop", "asyncio")
    assert status(mesh, 1)["event_loop"] == "asyncio"
    for source, target in (("client", "server-b"), ("server-b", "server-a")):  # asyncio -> uvloop, and back
        assert exchange(bed, bed.pods[source], bed.pods[target].ip, TARGET_PORT, b"both loops")[1] == b"both loops"
    assert [c["security"] for c in closed(mesh, 1, 2)] == ["mtls", "mtls"]


def test_certificate_renewal_keeps_live_transfers_and_new_connections_use_new_certificates(mesh: Mesh):
    bed = mesh.bed
    server_b = bed.pods["server-b"]
    serials = {n: {c["identity"]: c["serial"] for c in mesh.ctl_json(n, "certs")["certificates"]} for n in (1, 2)}
    assert exchange(bed, bed.pods["client"], server_b.ip, TARGET_PORT, b"warm")[1] == b"warm"

    chunk, chunks = os.urandom(64 * 1024), 40
    received = bytearray()
    sock = bed.connect(bed.pods["client"], server_b.ip, TARGET_PORT, timeout=10)

    def read_all() -> None:
        while data := sock.recv(65536):
            received.extend(data)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        for i in range(chunks):
            sock.sendall(chunk)
            if i == chunks // 2:
                for node in (1, 2):
                    mesh.ctl(node, "renew-certs")
                for node in (1, 2):
                    mesh.wait_for(f"new serials on node-{node}", lambda: all(
                        serials[node][c["identity"]] != c["serial"]
                        for c in mesh.ctl_json(node, "certs")["certificates"]))
            time.sleep(0.02)  # a transfer that spans the renewal, not a burst before it
        sock.shutdown(socket.SHUT_WR)
        reader.join(timeout=10)
    finally:
        sock.close()
    assert bytes(received) == b"server-b\n" + chunk * chunks

    before = status(mesh, 1)["hbone"]["handshakes"]
    assert exchange(bed, bed.pods["client"], server_b.ip, TARGET_PORT, b"after")[1] == b"after"
    assert status(mesh, 1)["hbone"]["handshakes"] == before + 1, "a new connection reused the old certificate"
