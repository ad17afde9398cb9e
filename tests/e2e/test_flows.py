"""Per-flow counters kept by the capture program, read with `ameshctl flows`.

Bed: one p2p node. Namespace "shop" is enrolled (pod "client"), so the program is attached to
every pod veth; namespace "legacy" is not (pods "plain-a" and "plain-b", a podserver on
plain-b). Flows between the legacy pods bypass the ztunnel and must be counted all the same.
"""

from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from tests.bed import Bed
from tests.mesh import Mesh

PORT = 8080
CLOSED_PORT = 9  # nothing listens there: the SYN is answered by a RST
PAYLOAD = 200_000  # bytes, enough for many packets
# Most header bytes one counted packet can carry: IPv4 and TCP headers of at most 60 bytes
# each. A GSO packet is counted once with all its payload, so this bounds it too.
MAX_HEADERS_PER_PACKET = 60 + 60
SYN_IP_LENGTH = 20 + 20 + 20  # IP header, TCP header, Linux's SYN options (MSS, SACK, TS, WS)
RST_IP_LENGTH = 20 + 20


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=1)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=PORT)
    bed.add_pod("client", 1, namespace="shop", service_account="client")
    bed.add_pod("plain-a", 1, namespace="legacy")
    bed.add_pod("plain-b", 1, namespace="legacy")
    bed.start_podserver(bed.pods["plain-b"], PORT)
    mesh.write_registry()
    mesh.start_agent(1)
    yield mesh
    mesh.print_logs()


def transfer(bed: Bed, pod: str, ip: str, port: int, payload: bytes) -> tuple[str, bytes]:
    """One exchange with a podserver; returns the client's "ip:port" and the answer."""
    with bed.connect(bed.pods[pod], ip, port, timeout=5) as sock:
        src = "%s:%d" % sock.getsockname()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return src, bytes(received)


def flows_between(mesh: Mesh, src: str, dst: str) -> dict:
    """The flow src -> dst in `ameshctl flows -o json`, once it has seen its FIN."""
    def find():
        return next((f for f in mesh.ctl_json(1, "flows") if (f["src"], f["dst"]) == (src, dst)
                     and "FIN" in f["flags"]), None)
    return mesh.wait_for(f"flow {src} -> {dst}", find)


def assert_carries(flow: dict, payload: int) -> None:
    assert flow["packets"] > 0
    assert payload <= flow["bytes"] <= payload + flow["packets"] * MAX_HEADERS_PER_PACKET, flow


def test_flow_between_pods_not_enrolled_is_counted_and_not_captured(mesh: Mesh):
    bed = mesh.bed
    plain_b = bed.pods["plain-b"]
    dst = f"{plain_b.ip}:{PORT}"
    src, answer = transfer(bed, "plain-a", plain_b.ip, PORT, os.urandom(PAYLOAD))
    assert len(answer) == len(b"plain-b\n") + PAYLOAD

    there = flows_between(mesh, src, dst)
    back = flows_between(mesh, dst, src)
    assert_carries(there, PAYLOAD)
    assert_carries(back, len(answer))
    for flow in (there, back):
        assert flow["proto"] == "tcp" and flow["captured"] is False
        assert flow["first_seen"] <= flow["last_seen"]
    assert there["flags"].startswith("SYN,ACK") and "FIN" in there["flags"]

    # exact lengths on a refused connection: one SYN one way, one RST the other
    with pytest.raises(ConnectionRefusedError):
        bed.connect(bed.pods["plain-a"], plain_b.ip, CLOSED_PORT)
    refused = mesh.wait_for("the refused SYN and its RST", lambda: [
        f for f in mesh.ctl_json(1, "flows") if f"{plain_b.ip}:{CLOSED_PORT}" in (f["src"], f["dst"])])
    by_flags = {f["flags"]: f for f in refused}
    assert set(by_flags) == {"SYN", "ACK,RST"}, refused
    assert (by_flags["SYN"]["packets"], by_flags["SYN"]["bytes"]) == (1, SYN_IP_LENGTH)
    assert (by_flags["ACK,RST"]["packets"], by_flags["ACK,RST"]["bytes"]) == (1, RST_IP_LENGTH)


def test_enrolled_pods_connection_is_counted_as_captured(mesh: Mesh):
    bed = mesh.bed
    plain_b, client = bed.pods["plain-b"], bed.pods["client"]
    dst = f"{plain_b.ip}:{PORT}"
    src, answer = transfer(bed, "client", plain_b.ip, PORT, os.urandom(PAYLOAD))
    assert len(answer) == len(b"plain-b\n") + PAYLOAD

    captured = flows_between(mesh, src, dst)
    assert captured["captured"] is True and captured["flags"].startswith("SYN")
    assert_carries(captured, PAYLOAD)
    # the ztunnel's own upstream connection to plain-b: seen on its reply ingress, not captured
    upstream = mesh.wait_for("the ztunnel's upstream replies", lambda: [
        f for f in mesh.ctl_json(1, "flows")
        if f["src"] == dst and not f["dst"].startswith(f"{client.ip}:") and f["bytes"] >= len(answer)])
    assert [f["captured"] for f in upstream] == [False], upstream

    text = mesh.ctl(1, "flows", "--limit", "1").stdout.splitlines()
    assert text[0].split()[:4] == ["SOURCE", "DESTINATION", "PACKETS", "BYTES"] and len(text) == 2
    assert len(mesh.ctl_json(1, "flows")) > 1
