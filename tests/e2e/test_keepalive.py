"""HTTP/2 PING keepalive end to end: a pooled HBONE session to a node that vanished (its fabric
link cut: no FIN, no reset, nothing) is found dead within 30 s (ztunnel's 10 s interval and 20 s
timeout), and once the node is back a new connection goes through a fresh session.

Bed: two point-to-point nodes with agents. Namespace "shop" is enrolled: client on node-1,
server on node-2 behind Service shop/web 10.96.0.10:80.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Iterator

import pytest

from tests.mesh import SINGLE_PROCESS, Mesh, exchange
from tests.transfer import SERVICE_IP, client_server_bed, client_server_mesh
from ztunnel.hbone.keepalive import KEEPALIVE_TIMEOUT

DETECTION_BOUND = 30.0  # seconds from the cut to the session's end (the figure)


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    # /metrics counts this process only until the dataplane-telemetry merge sums the workers
    mesh = client_server_mesh(client_server_bed(make_bed("p2p", nodes=2)), agent_args=SINGLE_PROCESS)
    yield mesh
    mesh.print_logs()


def hbone(mesh: Mesh) -> dict:
    return mesh.ctl_json(1, "status")["hbone"]


def test_a_session_to_a_vanished_node_is_found_dead_by_ping_and_the_next_connection_gets_a_fresh_one(mesh: Mesh):
    bed = mesh.bed
    assert exchange(bed, bed.pods["client"], SERVICE_IP, 80, b"before") == ("server", b"before")
    assert hbone(mesh) == {"handshakes": 1, "sessions": 1, "dead_peers": 0}

    bed.set_node_link(2, up=False)
    cut = time.time()
    mesh.wait_for("node-1 to drop its session to the vanished node-2",
                  lambda: hbone(mesh)["dead_peers"] == 1, timeout=DETECTION_BOUND + 5, interval=0.25)
    # when the agent decided, from its log line (the status poll above adds its own delay)
    [line] = [line for line in mesh.agent_log(1).read_text().splitlines() if "event=hbone_peer_dead" in line]
    decided = datetime.fromisoformat(line.split()[0].removeprefix("ts=").replace("Z", "+00:00")).timestamp()
    detected = decided - cut
    print(f"dead peer found {detected:.2f} s after the cut")
    assert detected <= DETECTION_BOUND, detected
    # no sooner than a PING's timeout: it was the keepalive, not something else, that ended it
    assert detected >= KEEPALIVE_TIMEOUT - 0.5, detected
    assert hbone(mesh)["sessions"] == 0
    assert mesh.metrics(1)["amesh_hbone_dead_peers_total"][0][1] == 1

    bed.set_node_link(2, up=True)
    assert exchange(bed, bed.pods["client"], SERVICE_IP, 80, b"after") == ("server", b"after")
    assert hbone(mesh) == {"handshakes": 2, "sessions": 1, "dead_peers": 1}
