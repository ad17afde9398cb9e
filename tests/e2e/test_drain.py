"""Draining an agent (SIGUSR2 or POST /drain, what an upgrade does to the old agent): its HBONE
peers get a graceful GOAWAY and take new connections elsewhere, a transfer under way finishes
intact through it, and it exits when that last connection ends, or at its drain deadline.

Bed: two point-to-point nodes with agents. Namespace "shop" is enrolled: client on node-1,
server (an echo server) on node-2 behind Service shop/web 10.96.0.10:80. The agent drained is
node-2's: the transfers are its inbound HBONE connections.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import pytest

from tests.bed import Bed, netns_snapshot
from tests.mesh import Mesh
from tests.transfer import EXIT_AFTER_LAST, SERVICE_IP, Transfer, amesh_state, client_server_bed, client_server_mesh



@pytest.fixture
def bed(make_bed) -> Bed:
    return client_server_bed(make_bed("p2p", nodes=2))


@pytest.fixture
def mesh(bed: Bed) -> Iterator[Mesh]:
    mesh = client_server_mesh(bed)
    yield mesh
    mesh.print_logs()


def test_a_drained_agent_finishes_its_live_transfer_sends_peers_elsewhere_and_exits_after_it(mesh: Mesh):
    bed = mesh.bed
    agent = mesh.agents["node-2"]
    transfer = Transfer(bed, bed.pods["client"], SERVICE_IP, duration=3.0)
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
    mesh = client_server_mesh(bed, "--drain-deadline", str(deadline))
    try:
        agent = mesh.agents["node-2"]
        transfer = Transfer(bed, bed.pods["client"], SERVICE_IP, duration=8.0)
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
