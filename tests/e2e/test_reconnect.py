"""Reconnects from the source port a client just used: through the mesh they succeed at once and
are still captured, whichever side closed first (so whichever side holds the TIME_WAIT).

Bed: two nodes, point-to-point or bridged. Namespace "shop" is enrolled: client on node-1,
server on node-2 behind Services 10.96.0.10 and .11. Namespace "legacy" is not: pod "plain" on
node-1. The server answers on two ports: on one it closes first (the TIME_WAIT is the
ztunnel's socket that accepted the connection), on the other after the client (the TIME_WAIT
is in the client pod, which is set to reuse it, as Linux does by default only on loopback).
Both nodes also run a transparent listener of their own on those ports: the kernel's
TIME_WAIT path looks a listener up by destination port, and a SYN it took there would bypass
the mesh; it must get nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from tests.bed import Pod, netns_socket
from tests.mesh import Mesh, ServiceSpec

SERVER_CLOSES_PORT = 7000  # the server closes first
CLIENT_CLOSES_PORT = 7001  # the server closes after the client's FIN
SERVICE_IPS = {SERVER_CLOSES_PORT: "10.96.0.10", CLIENT_CLOSES_PORT: "10.96.0.11"}  # one Service per port
CLIENT_PORT = 40100  # the fixed source port every connection of a test is made from
RECONNECTS = 3
REUSE_DEADLINE = 0.1  # seconds a reconnect's connect() may take (the figure)
CONNECT_TIMEOUT = 1.0  # seconds: a dropped SYN fails the test in a second, not 60 s later
IO_TIMEOUT = 5.0  # seconds for the exchange once connected
IP_TRANSPARENT = 19  # linux/in.h; Python's socket module has no name for it
REQUEST = b"hello from a reused port"


@dataclass
class Server:
    """A listener on a thread: per connection it reads REQUEST, answers `name` + REQUEST and
    closes, first or once the client has closed its side."""

    sock: socket.socket
    name: bytes
    closes_first: bool
    accepted: int = 0
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # shut down: the test is over
            self.accepted += 1
            with conn:
                conn.settimeout(IO_TIMEOUT)
                request = conn.recv(len(REQUEST), socket.MSG_WAITALL)
                conn.sendall(self.name + b"\n" + request)
                if not self.closes_first:
                    while conn.recv(100):
                        pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
        self.sock.close()
        self.thread.join(timeout=IO_TIMEOUT)


def listen(netns: str, port: int, name: str, closes_first: bool, transparent: bool = False) -> Server:
    sock = netns_socket(netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    return Server(sock, name.encode(), closes_first)


@dataclass
class Reconnects:
    """The bed's mesh and every listener the test started."""

    mesh: Mesh
    servers: dict[str, Server]  # by "<where>:<port>", where is "server", "node-1" or "node-2"


@pytest.fixture(params=["p2p", "bridge"])
def bed_mesh(request, make_bed) -> Iterator[Reconnects]:
    bed = make_bed(request.param, nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False})
    for name, node, namespace in (("client", 1, "shop"), ("plain", 1, "legacy"), ("server", 2, "shop")):
        bed.add_pod(name, node, namespace=namespace, service_account=name, labels={"app": name})
    for client in ("client", "plain"):
        bed.run(bed.pods[client], ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.tcp_tw_reuse_delay=1"])
    for port in (SERVER_CLOSES_PORT, CLIENT_CLOSES_PORT):
        mesh.services.append(ServiceSpec(f"web-{port}", "shop", SERVICE_IPS[port], port, port, {"app": "server"}))
    servers: dict[str, Server] = {}
    try:
        for port, closes_first in ((SERVER_CLOSES_PORT, True), (CLIENT_CLOSES_PORT, False)):
            servers[f"server:{port}"] = listen(bed.pods["server"].netns, port, "server", closes_first)
            for node in bed.nodes:
                servers[f"{node.name}:{port}"] = listen(node.netns, port, node.name, closes_first, transparent=True)
        mesh.write_registry()
        mesh.start_agent(1)
        mesh.start_agent(2)
        yield Reconnects(mesh, servers)
        mesh.print_logs()
    finally:
        for server in servers.values():
            server.close()


def connect_and_exchange(pod: Pod, ip: str, port: int, client_closes_first: bool) -> tuple[float, bytes]:
    """One connection from pod:CLIENT_PORT; returns how long connect() took and the answer."""
    with netns_socket(pod.netns) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((pod.ip, CLIENT_PORT))
        sock.settimeout(CONNECT_TIMEOUT)
        started = time.monotonic()
        sock.connect((ip, port))
        took = time.monotonic() - started
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(REQUEST)
        if client_closes_first:
            sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while chunk := sock.recv(100):
            answer += chunk
    return took, bytes(answer)


def ended_from_client_port(mesh: Mesh, node: int, direction: str, count: int) -> list[dict]:
    """Waits for `count` ended connection records from CLIENT_PORT on a node's ztunnel."""
    def find():
        records = [c for c in mesh.ctl_json(node, "connections") if c["direction"] == direction
                   and c["source_port"] == CLIENT_PORT and c["state"] in ("closed", "failed")]
        return len(records) >= count and records
    return mesh.wait_for(f"{count} {direction} records from port {CLIENT_PORT} on node-{node}", find)


@pytest.mark.parametrize("closing", ["server closes first", "client closes first"])
@pytest.mark.parametrize("path", ["outbound over HBONE", "inbound plaintext"])
def test_reconnects_from_one_source_port_are_immediate_and_captured(bed_mesh: Reconnects, path: str, closing: str):
    mesh, bed = bed_mesh.mesh, bed_mesh.mesh.bed
    client_closes_first = closing == "client closes first"
    port = CLIENT_CLOSES_PORT if client_closes_first else SERVER_CLOSES_PORT
    outbound = path == "outbound over HBONE"
    client, ip = (bed.pods["client"], SERVICE_IPS[port]) if outbound else (bed.pods["plain"], bed.pods["server"].ip)

    connects = []
    for attempt in range(1 + RECONNECTS):
        try:
            took, answer = connect_and_exchange(client, ip, port, client_closes_first)
        except socket.timeout:
            pytest.fail(f"connection {attempt + 1} from port {CLIENT_PORT} got no answer to its SYN "
                        f"within {CONNECT_TIMEOUT}s (connects so far: {connects})")
        assert answer == b"server\n" + REQUEST, f"connection {attempt + 1} was answered by {answer!r}"
        connects.append(round(took, 4))
    assert max(connects[1:]) < REUSE_DEADLINE, f"connect() times in seconds: {connects}"

    total = 1 + RECONNECTS
    if outbound:
        records = ended_from_client_port(mesh, 1, "outbound", total)
        assert {(c["original_dst"], c["security"], c["upstream"]) for c in records} == {
            (f"{SERVICE_IPS[port]}:{port}", "mtls", f"{bed.pods['server'].ip}:{port}")}
        # node-2's ztunnel took each one out of its HBONE tunnel (through its inbound capture)
        inbound = mesh.wait_for(f"{total} HBONE connections on node-2", lambda: len(cs := [
            c for c in mesh.ctl_json(2, "connections") if c["security"] == "mtls"
            and c["state"] == "closed" and c["original_dst"].endswith(f":{port}")]) >= total and cs)
        assert len(inbound) == total
    else:
        records = ended_from_client_port(mesh, 2, "inbound", total)
        assert {(c["source_ip"], c["security"], c["state"]) for c in records} == {
            (client.ip, "plaintext", "closed")}
    assert len(records) == total
    bypassed = {where: s.accepted for where, s in bed_mesh.servers.items() if where.startswith("node-") and s.accepted}
    assert not bypassed, f"the nodes' own listeners took connections: the mesh was bypassed: {bypassed}"


def test_a_reconnect_meeting_a_killed_ztunnels_time_wait_is_dropped_until_a_new_agent_takes_it(
        bed_mesh: Reconnects):
    mesh, bed = bed_mesh.mesh, bed_mesh.mesh.bed
    client, ip = bed.pods["client"], SERVICE_IPS[SERVER_CLOSES_PORT]
    connect_and_exchange(client, ip, SERVER_CLOSES_PORT, client_closes_first=False)  # TIME_WAIT on node-1
    proc = mesh.agents.pop("node-1")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=IO_TIMEOUT)
    # fail closed: the kernel's TIME_WAIT path would find the node's own listener on the port
    with pytest.raises(socket.timeout):
        connect_and_exchange(client, ip, SERVER_CLOSES_PORT, client_closes_first=False)
    assert bed_mesh.servers[f"node-1:{SERVER_CLOSES_PORT}"].accepted == 0

    mesh.start_agent(1)
    took, answer = connect_and_exchange(client, ip, SERVER_CLOSES_PORT, client_closes_first=False)
    assert answer == b"server\n" + REQUEST and took < REUSE_DEADLINE, (took, answer)
    [record] = ended_from_client_port(mesh, 1, "outbound", 1)
    assert record["original_dst"] == f"{ip}:{SERVER_CLOSES_PORT}"
    assert bed_mesh.servers[f"node-1:{SERVER_CLOSES_PORT}"].accepted == 0
