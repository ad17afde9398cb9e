"""What the keepalive, drain and upgrade tests share: their two-node mesh (client on node-1,
an echo server on node-2 behind Service shop/web 10.96.0.10:80, namespace "shop" enrolled), a
long transfer through it, checked intact, and amesh's own lines of a node's network state."""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
import time

from tests.bed import Bed, Pod
from tests.mesh import Mesh, ServiceSpec

SERVICE_IP = "10.96.0.10"
PORT = 8080
EXIT_AFTER_LAST = 1.5  # seconds from a draining agent's last connection's end to its exit

CHUNK = 64 * 1024  # bytes per send of a transfer
CHUNK_INTERVAL = 0.05  # seconds between sends: a transfer that lasts, not one that is over at once
IO_TIMEOUT = 10.0  # seconds a transfer's socket may wait on one operation


class Transfer:
    """One connection through the mesh to a tests.podserver (an echo server) named "server" that
    sends CHUNK every CHUNK_INTERVAL for `duration` seconds while reading the echo back;
    `result()` says whether it came back intact."""

    def __init__(self, bed: Bed, pod: Pod, ip: str, duration: float, port: int = 80) -> None:
        self.sock = bed.connect(pod, ip, port, timeout=IO_TIMEOUT)
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

    def end_now(self) -> None:
        """Ends the connection from the client's side at once (FIN both ways, both threads woken)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:  # reset already: the agent carrying it was killed
                raise

    def result(self) -> bool:
        """Waits for both directions to end; True if the echo is what was sent, after the name line."""
        self._writer.join(timeout=self._duration + IO_TIMEOUT)
        self._reader.join(timeout=IO_TIMEOUT)
        self.sock.close()
        name, _, echoed = bytes(self.received).partition(b"\n")
        return self.error is None and name == b"server" and hashlib.sha256(echoed).digest() == self.sent.digest()


def amesh_state(snapshot: dict[str, str]) -> list[str]:
    """The lines of a namespace snapshot (tests.bed.netns_snapshot) that are amesh's: its tc
    filters, policy rule and route table."""
    return [line for text in snapshot.values() for line in text.splitlines()
            if "15001" in line or "capture" in line]


def client_server_bed(bed: Bed) -> Bed:
    """Adds the client (node-1) and the echo server (node-2) to a two-node bed."""
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server", 2, namespace="shop", service_account="web", labels={"app": "web"})
    bed.start_podserver(bed.pods["server"], PORT)
    return bed


def client_server_mesh(bed: Bed, *node2_args: str, agent_args: tuple[str, ...] = ()) -> Mesh:
    """The mesh of a client_server_bed, agents started on both nodes (node-2's with `node2_args`,
    both with `agent_args`)."""
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT, agent_args=agent_args)
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2, *node2_args)
    return mesh
