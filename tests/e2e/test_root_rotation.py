"""Root rotation end to end: `ameshctl ca rotate prepare|activate|finish` on the CA directory two
agents share (local-CA mode), under traffic.

Bed: two point-to-point nodes, an agent on each. Namespace "shop" is enrolled: client (sa client)
and server-a (sa web) on node-1, server-b (sa web) on node-2. Namespace "legacy" is not: pod
"plain" on node-1, from which a peer holding a certificate of the old root dials node-2's HBONE
port directly.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest

from tests.attacker import H2Attacker, connect_frame
from tests.mesh import AMESHCTL, Mesh, exchange
from ztunnel.identity import CertificateManager, FileCA, Identity, IssuedCertificate, fingerprint

TARGET_PORT = 8080
HBONE_PORT = 15008
POLL = "0.3"  # seconds between the agents' checks of the CA directory (default 5)
CHUNK = b"r" * 16 * 1024  # bytes the long transfer sends at a time
CHUNK_INTERVAL = 0.02  # seconds between them: a transfer spanning the rotation, not a burst
PROBE_INTERVAL = 0.05  # seconds between new connections across nodes while the rotation runs
PEER = Identity("cluster.local", "legacy", "default")  # who the old-root peer says it is


def rotation_mesh(make_bed) -> Mesh:
    """The bed of the module's docstring, its pod servers running, no agent yet."""
    bed = make_bed("p2p", nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=TARGET_PORT)
    bed.add_pod("client", 1, namespace="shop", service_account="client")
    bed.add_pod("server-a", 1, namespace="shop", service_account="web")
    bed.add_pod("server-b", 2, namespace="shop", service_account="web")
    bed.add_pod("plain", 1, namespace="legacy")
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], TARGET_PORT)
    return mesh


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    mesh = rotation_mesh(make_bed)
    mesh.write_registry()
    mesh.start_agent(1, "--ca-poll-interval", POLL)
    mesh.start_agent(2, "--ca-poll-interval", POLL)
    yield mesh
    mesh.print_logs()


class LongTransfer:
    """One connection from client (node-1) to server-b (node-2) through the mesh, sending a chunk
    every CHUNK_INTERVAL from a thread until `close()`, which checks every byte came back."""

    def __init__(self, mesh: Mesh) -> None:
        bed = mesh.bed
        self.sock = bed.connect(bed.pods["client"], bed.pods["server-b"].ip, TARGET_PORT, timeout=10)
        self.received = bytearray()
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read)
        self._writer = threading.Thread(target=self._write)
        self._reader.start()
        self._writer.start()

    def _read(self) -> None:
        while data := self.sock.recv(65536):
            self.received += data

    def _write(self) -> None:
        try:
            while not self._stop.wait(CHUNK_INTERVAL):
                self.sock.sendall(CHUNK)
                self.sent += 1
        except OSError as e:
            self.error = e

    def close(self) -> None:
        """Ends the transfer: half-close, read to EOF, check it is whole and nothing broke."""
        self._stop.set()
        self._writer.join(timeout=10)
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self._reader.join(timeout=10)
        finally:
            self.sock.close()
        assert self.error is None, f"the long transfer broke after {self.sent} chunks: {self.error}"
        assert bytes(self.received) == b"server-b\n" + CHUNK * self.sent, (
            f"the long transfer got {len(self.received)} bytes back of {9 + len(CHUNK) * self.sent}")


class Prober:
    """New connections across nodes, both ways (client -> server-b, server-b -> server-a), one
    every PROBE_INTERVAL from a thread, each an exchange that must echo; failures are kept."""

    def __init__(self, mesh: Mesh) -> None:
        self.bed = mesh.bed
        self.made = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        pairs = (("client", "server-b"), ("server-b", "server-a"))
        while not self._stop.wait(PROBE_INTERVAL):
            source, target = pairs[self.made % 2]
            payload = b"probe %d" % self.made
            try:
                answer = exchange(self.bed, self.bed.pods[source], self.bed.pods[target].ip, TARGET_PORT, payload)
                if answer != (target, payload):
                    self.failures.append(f"{source} -> {target}: answered {answer!r}")
            except OSError as e:
                self.failures.append(f"{source} -> {target}: {e!r} at {time.strftime('%H:%M:%S')}")
            self.made += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class OldRootIssuer:
    """Signs with the old root, kept in memory after the directory dropped it, and trusts it and
    the mesh's current bundle: a peer whose certificate missed the rotation."""

    def __init__(self, old: FileCA, bundle: bytes) -> None:
        self._old = old
        self.root_fingerprint = old.root_fingerprint
        self.trust_bundle = old.root_pem + bundle

    def issue(self, identity: Identity, public_key, lifetime: timedelta) -> IssuedCertificate:
        return self._old.issue(identity, public_key, lifetime)


def old_root_peer_accepted(mesh: Mesh, old: FileCA, ca_dir: Path | None = None) -> bool:
    """Whether node-2 tunnels a CONNECT to server-b from a peer presenting an old-root certificate
    (trusting the bundle of `ca_dir`, by default the agents' CA directory)."""
    bed = mesh.bed
    certs = CertificateManager(OldRootIssuer(old, FileCA.load_or_create(ca_dir or mesh.ca_dir).trust_bundle))
    certs.set_identities([PEER])
    server_b = bed.pods["server-b"]
    try:
        attacker = H2Attacker.open(bed.pods["plain"].netns, server_b.ip, HBONE_PORT, certs.client_context(PEER))
    except (OSError, AssertionError):  # TLS refused, or the session ended before SETTINGS
        return False
    try:
        attacker.send(connect_frame(attacker.encoder, 1, f"{server_b.ip}:{TARGET_PORT}"), 5)
        attacker.pump(lambda: attacker.answered([1]) or attacker.ended, 5)
        return attacker.responses.get(1) == 200
    finally:
        attacker.close()


def rotate(mesh: Mesh, step: str, *options: str) -> str:
    """Runs `ameshctl ca rotate STEP` on the agents' CA directory, as an operator would."""
    result = subprocess.run([AMESHCTL, "ca", "rotate", step, *options, str(mesh.ca_dir)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for_agents(mesh: Mesh, signing: str, bundle: list[str]) -> None:
    """Until both agents serve with the directory as it is now: that bundle, and every certificate
    renewed under it and issued from `signing`."""
    for node in (1, 2):
        def caught_up() -> bool:
            certs = mesh.ctl_json(node, "certs")
            return ([r["fingerprint"] for r in certs["trust_bundle"]] == bundle and certs["certificates"]
                    and all(c["root"] == signing and c["trusts"] == bundle for c in certs["certificates"]))
        mesh.wait_for(f"node-{node} to serve with signing root {signing[:23]} and bundle {len(bundle)}", caught_up,
                      timeout=10)


def test_a_long_transfer_and_new_connections_run_through_the_whole_rotation(mesh: Mesh):
    old = FileCA.load_or_create(mesh.ca_dir)
    old_root = old.root_fingerprint
    assert old_root_peer_accepted(mesh, old)  # the control: before the rotation, it is a mesh peer
    transfer = LongTransfer(mesh)
    prober = Prober(mesh)
    try:
        out = rotate(mesh, "prepare")
        assert "next: wait until every agent trusts the new root" in out
        new_root = fingerprint(FileCA.load_or_create(mesh.ca_dir).roots[1])
        wait_for_agents(mesh, old_root, [old_root, new_root])  # trusted by all, signing nothing yet
        assert "trust bundle: " in mesh.ctl(1, "certs").stdout

        rotate(mesh, "activate")
        wait_for_agents(mesh, new_root, [new_root, old_root])  # renewed at once with the new root, listed first
        assert old_root_peer_accepted(mesh, old)  # an old-root certificate is still accepted

        finishing = subprocess.run([AMESHCTL, "ca", "rotate", "finish", str(mesh.ca_dir)],
                                   capture_output=True, text=True, timeout=30)
        assert finishing.returncode == 1 and "--force" in finishing.stderr  # too early without it
        rotate(mesh, "finish", "--force")
        wait_for_agents(mesh, new_root, [new_root])
        time.sleep(0.5)  # new connections keep being made under the finished rotation
        # the long transfer is still the one tunnel it was before the rotation, open on both nodes
        server_b = mesh.bed.pods["server-b"].ip
        for node, direction in ((1, "outbound"), (2, "inbound")):
            long = [c for c in mesh.ctl_json(node, "connections") if c["direction"] == direction
                    and c["security"] == "mtls" and c["state"] == "open" and c["bytes_sent"] > len(CHUNK) * 20]
            assert len(long) == 1 and long[0]["upstream"].startswith(server_b), long
    finally:
        prober.stop()
        transfer.close()
    print(f"rotation under traffic: {prober.made} new connections across nodes, {transfer.sent * len(CHUNK)} "
          "bytes of one long transfer")
    assert not prober.failures, f"{len(prober.failures)} of {prober.made} new connections failed: {prober.failures[:5]}"
    assert prober.made > 20, prober.made
    assert transfer.sent > 20, transfer.sent
    assert not old_root_peer_accepted(mesh, old), "a certificate of the dropped root was accepted after finish"
    refused = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "failed" and c["direction"] == "inbound"]
    assert any("certificate" in c["reason"] for c in refused), refused


def test_a_broken_ca_directory_is_refused_and_the_last_good_ca_keeps_serving(mesh: Mesh):
    bed = mesh.bed
    good = (mesh.ca_dir / "ca.crt").read_bytes()
    (mesh.ca_dir / "trust-bundle.pem").write_bytes(good[:-40])  # an operator's copy cut short
    certs = mesh.wait_for("node-1 to refuse the directory",
                          lambda: (c := mesh.ctl_json(1, "certs"))["ca_directory"]["last_error"] and c, timeout=10)
    assert str(mesh.ca_dir / "trust-bundle.pem") in certs["ca_directory"]["last_error"]
    assert [r["fingerprint"] for r in certs["trust_bundle"]] == [certs["root_fingerprint"]]
    assert "ca.refused" in mesh.agent_log(1).read_text()
    assert exchange(bed, bed.pods["client"], bed.pods["server-b"].ip, TARGET_PORT, b"still") == ("server-b", b"still")
    (mesh.ca_dir / "trust-bundle.pem").write_bytes(good)  # fixed: taken, the error gone
    mesh.wait_for("node-1 to take the fixed directory",
                  lambda: mesh.ctl_json(1, "certs")["ca_directory"]["last_error"] is None, timeout=10)
