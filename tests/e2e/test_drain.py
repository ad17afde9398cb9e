"""Draining an agent (SIGUSR2 or POST /drain, what an upgrade does to the old agent): its HBONE
peers get a graceful GOAWAY and take new connections elsewhere, a transfer under way finishes
intact through it, and it exits when that last connection ends, or at its drain deadline.

Bed: two point-to-point nodes with agents. Namespace "shop" is enrolled: client on node-1,
server (an echo server) on node-2 behind Service shop/web 10.96.0.10:80. The agent drained is
node-2's: the transfers are its inbound HBONE connections.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from typing import Iterator

import pytest

from tests.bed import Bed, Pod, netns_snapshot
from tests.mesh import Mesh, ServiceSpec

SERVICE_IP = "10.96.0.10"
PORT = 8080
CHUNK = 64 * 1024  # bytes per send of a transfer
CHUNK_INTERVAL = 0.05  # seconds between sends: a transfer that lasts, not one that is over at once
IO_TIMEOUT = 10.0  # seconds a transfer's socket may wait on one operation
EXIT_AFTER_LAST = 1.5  # seconds from a draining agent's last connection's end to its exit


class Transfer:
    """One connection through the mesh to the echo server that sends CHUNK every CHUNK_INTERVAL
    for `duration` seconds while reading the echo back; `result()` says whether it came back intact."""

    def __init__(self, bed: Bed, pod: Pod, duration: float) -> None:
        self.sock = bed.connect(pod, SERVICE_IP, 80, timeout=IO_TIMEOUT)
        self.sent = hashlib.sha256()
        self.received = bytearray()
        self.error: BaseException | None = None
        self._duration = duration
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        try:
            ends = time.monotonic() + self._duration
            n = 0
            while time.monotonic() < ends:
                chunk = bytes([n % 251]) * CHUNK
                self.sock.sendall(chunk)
                self.sent.update(chunk)
                n += 1
                time.sleep(CHUNK_INTERVAL)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = e

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
        except OSError as e:
            self.error = e

    def result(self) -> bool:
        """Waits for both directions to end; True if the echo is what was sent, after the name line."""
        self._writer.join(timeout=self._duration + IO_TIMEOUT)
        self._reader.join(timeout=IO_TIMEOUT)
        self.sock.close()
        name, _, echoed = bytes(self.received).partition(b"\n")
        return self.error is None and name == b"server" and hashlib.sha256(echoed).digest() == self.sent.digest()


@pytest.fixture
def bed(make_bed) -> Bed:
    bed = make_bed("p2p", nodes=2)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server", 2, namespace="shop", service_account="web", labels={"app": "web"})
    bed.start_podserver(bed.pods["server"], PORT)
    return bed


def start_mesh(bed: Bed, *node2_args: str) -> Mesh:
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT)
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2, *node2_args)
    return mesh


def amesh_state(snapshot: dict[str, str]) -> list[str]:
    """The lines of a namespace snapshot that are amesh's: its tc filter, rule and route table."""
    return [line for text in snapshot.values() for line in text.splitlines()
            if "15001" in line or "capture" in line]


@pytest.fixture
def mesh(bed: Bed) -> Iterator[Mesh]:
    mesh = start_mesh(bed)
    yield mesh
    mesh.print_logs()


def test_a_drained_agent_finishes_its_live_transfer_sends_peers_elsewhere_and_exits_after_it(mesh: Mesh):
    bed = mesh.bed
    agent = mesh.agents["node-2"]
    transfer = Transfer(bed, bed.pods["client"], duration=3.0)
    time.sleep(0.5)
    assert mesh.ctl_json(1, "status")["hbone"]["sessions"] == 1
    status, body = mesh.http(2, 15000, "/drain", "POST")
    assert status == 202 and '"live_connections": 1' in body, body
    # node-1's pool saw the GOAWAY: the session left the pool while its stream runs on
    mesh.wait_for("node-1's pool to let go of the draining session",
                  lambda: mesh.ctl_json(1, "status")["hbone"]["sessions"] == 0, timeout=3)
    assert agent.poll() is None
    assert transfer.result(), transfer.error
    ended = time.monotonic()
    assert agent.wait(timeout=EXIT_AFTER_LAST + 5) == 0
    assert time.monotonic() - ended <= EXIT_AFTER_LAST
    mesh.agents.pop("node-2")
    assert amesh_state(netns_snapshot(bed.node(2).netns)) == []  # no successor: it removed everything
    [entry] = [e for e in mesh.access_log(2) if e["direction"] == "inbound"]
    assert entry["message"] == "connection complete", entry


def test_a_drained_agent_cuts_what_outlives_its_drain_deadline(bed: Bed):
    deadline = 1.5  # seconds
    mesh = start_mesh(bed, "--drain-deadline", str(deadline))
    try:
        agent = mesh.agents["node-2"]
        transfer = Transfer(bed, bed.pods["client"], duration=8.0)
        time.sleep(0.5)
        os.kill(agent.pid, signal.SIGUSR2)
        began = time.monotonic()
        assert agent.wait(timeout=deadline + 5) == 0
        took = time.monotonic() - began
        mesh.agents.pop("node-2")
        assert deadline <= took <= deadline + EXIT_AFTER_LAST, took
        assert not transfer.result()  # cut at the deadline
    finally:
        mesh.print_logs()
