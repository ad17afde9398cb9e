"""Root rotation with the cluster CA, end to end: `ameshctl ca rotate prepare|activate|finish` on
the CA's Secret, each step's bundle published to the agents' ConfigMap, under traffic.

Bed: tests/e2e/test_root_rotation.py's (two point-to-point nodes; client and server-a on node-1,
server-b on node-2, enrolled; "plain" on node-1, not enrolled, from which a peer holding a
certificate of the old root dials node-2's HBONE port), with the control plane
(tests.mesh.ControlPlane): the test API server and `ameshctl ca serve`, which alone holds the
root key and follows its Secret directory. The agents read the ConfigMap amesh-trust-bundle (a
kubelet-style volume: ca.crt through a ..data symlink swapped at each update).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_root_rotation import (
    TARGET_PORT,
    LongTransfer,
    Prober,
    old_root_peer_accepted,
    rotation_mesh,
    wait_for_agents,
)
from tests.mesh import AMESHCTL, ControlPlane, Mesh, exchange
from ztunnel.identity import FileCA, fingerprint, load_roots
from ztunnel.rotation import short

POLL = "0.3"  # seconds between checks of the Secret (the CA) and of the ConfigMap (the agents); default 5
CA_DEADLINE = 10.0  # seconds for the CA to take a changed Secret


@pytest.fixture
def cluster(make_bed) -> Iterator[tuple[Mesh, ControlPlane]]:
    mesh = rotation_mesh(make_bed)  # the same bed as the local-CA rotation's
    bed = mesh.bed
    plane = ControlPlane.start(mesh, ca_options=("--ca-poll-interval", POLL))
    try:
        for node in (1, 2):
            mesh.start_agent(node, "--ca-poll-interval", POLL)
        plane.wait_synced(10.0)
        yield mesh, plane
        mesh.print_logs()
        print((bed.logdir / "ca.log").read_text(errors="replace")[-4000:])
    finally:
        plane.close()


def rotate(mesh: Mesh, plane: ControlPlane, step: str, *options: str) -> str:
    """Runs `ameshctl ca rotate STEP` on the CA's Secret, writing the bundle for the ConfigMap."""
    result = subprocess.run([AMESHCTL, "ca", "rotate", step, *options, "--trust-bundle-out", str(staged(mesh)),
                             str(plane.secret_dir)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def staged(mesh: Mesh) -> Path:
    return mesh.bed.logdir / "trust-bundle-out.pem"


def ca_signs_with(mesh: Mesh, plane: ControlPlane, root: str, reloads: int) -> None:
    """Until the CA has taken `reloads` changes of its Secret and signs with `root`."""
    def taken() -> bool:
        samples = plane.ca_metrics()
        return (sum(v for _, v in samples.get("amesh_ca_server_root_reloads_total", [])) == reloads
                and [labels["fingerprint"] for labels, v in samples.get("amesh_ca_server_signing_root", []) if v] == [root])
    mesh.wait_for(f"the CA to sign with {root[:23]} after {reloads} changes of its Secret", taken, CA_DEADLINE)


def test_a_long_transfer_and_new_connections_run_through_a_cluster_ca_rotation(cluster):
    mesh, plane = cluster
    old = FileCA.load_or_create(plane.secret_dir)
    old_root = old.root_fingerprint
    assert old_root_peer_accepted(mesh, old, plane.secret_dir)  # the control: before the rotation, a mesh peer
    transfer = LongTransfer(mesh)
    prober = Prober(mesh)
    try:
        out = rotate(mesh, plane, "prepare")
        assert "update the Secret, then the ConfigMap" in out
        new_root = fingerprint(load_roots(staged(mesh).read_bytes(), staged(mesh))[1])
        ca_signs_with(mesh, plane, old_root, 1)  # the CA has the new bundle, the old root still signs
        plane.publish_trust_bundle(staged(mesh).read_bytes())
        wait_for_agents(mesh, old_root, [old_root, new_root])  # every agent trusts both, renewed from the old

        out = rotate(mesh, plane, "activate")
        assert "update the Secret first; once the CA signs with the new root" in out
        ca_signs_with(mesh, plane, new_root, 2)
        plane.publish_trust_bundle(staged(mesh).read_bytes())  # its change makes every agent renew
        wait_for_agents(mesh, new_root, [new_root, old_root])
        for node in (1, 2):  # the ROOT column: every certificate from the new root
            table = mesh.ctl(node, "certs").stdout
            rows = [line for line in table.splitlines() if line.startswith("spiffe://")]
            assert rows and all(f"valid    {short(new_root)}" in row for row in rows), table
        assert old_root_peer_accepted(mesh, old, plane.secret_dir)  # an old-root certificate is still accepted

        rotate(mesh, plane, "finish", "--force")
        ca_signs_with(mesh, plane, new_root, 3)
        plane.publish_trust_bundle(staged(mesh).read_bytes())
        wait_for_agents(mesh, new_root, [new_root])
        time.sleep(0.5)  # new connections keep being made under the finished rotation
        server_b = mesh.bed.pods["server-b"].ip
        for node, direction in ((1, "outbound"), (2, "inbound")):  # still the one tunnel of before the rotation
            long = [c for c in mesh.ctl_json(node, "connections") if c["direction"] == direction
                    and c["security"] == "mtls" and c["state"] == "open" and c["bytes_sent"] > 16 * 1024 * 20]
            assert len(long) == 1 and long[0]["upstream"].startswith(server_b), long
    finally:
        prober.stop()
        transfer.close()
    print(f"cluster CA rotation under traffic: {prober.made} new connections across nodes, "
          f"{transfer.sent} chunks of one long transfer")
    assert not prober.failures, f"{len(prober.failures)} of {prober.made} new connections failed: {prober.failures[:5]}"
    assert prober.made > 20 and transfer.sent > 20, (prober.made, transfer.sent)
    assert not old_root_peer_accepted(mesh, old, plane.secret_dir), "an old-root certificate was accepted after finish"
    refused = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "failed" and c["direction"] == "inbound"]
    assert any("certificate" in c["reason"] for c in refused), refused


def test_a_broken_trust_bundle_is_refused_naming_the_file_and_the_last_good_is_kept(cluster):
    mesh, plane = cluster
    bed = mesh.bed
    good = plane.trust_bundle.read_bytes()
    plane.publish_trust_bundle(good + good[:-40])  # a ConfigMap edited by hand, cut short
    certs = mesh.wait_for("node-1 to refuse the bundle", lambda: (
        c := mesh.ctl_json(1, "certs"))["ca"]["trust_bundle"]["last_error"] and c, timeout=10)
    assert str(plane.trust_bundle) in certs["ca"]["trust_bundle"]["last_error"]
    assert "cut short" in certs["ca"]["trust_bundle"]["last_error"]
    assert "trust_bundle.refused" in mesh.agent_log(1).read_text()
    assert f"trust bundle {plane.trust_bundle} refused, last good bundle kept" in mesh.ctl(1, "certs").stdout
    mesh.ctl(1, "renew-certs")  # the CA is still reached and trusted with the last good bundle
    mesh.wait_for("node-1 to renew", lambda: all(c["state"] == "valid" and c["issue_failures"] == 0
                                                  for c in mesh.ctl_json(1, "certs")["certificates"]), timeout=10)
    assert exchange(bed, bed.pods["client"], bed.pods["server-b"].ip, TARGET_PORT, b"still") == ("server-b", b"still")
    plane.publish_trust_bundle(good)  # fixed: taken, the error gone
    mesh.wait_for("node-1 to take the fixed bundle",
                  lambda: mesh.ctl_json(1, "certs")["ca"]["trust_bundle"]["last_error"] is None, timeout=10)
