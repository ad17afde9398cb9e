"""Agent upgrades without a dropped connection: a second agent started on a node where one runs
takes its datapath over (bpf/handover.py) and the old one drains.

Under a client opening 50 new connections a second through the mesh, none fails across the
upgrade; a transfer started before it finishes intact through the old agent, which exits when
that ends; the node then holds amesh's filters, rule and route once each, as before. SIGKILL of
either generation mid-upgrade: the survivor (or a new start) has capture back within 2 s and
the node holds no stray state.

Bed: two point-to-point nodes with agents. Namespace "shop" is enrolled: client on node-1,
server (an echo server) on node-2 behind Service shop/web 10.96.0.10:80. Upgrading node-1's
agent moves outbound capture (the client's connections), node-2's the inbound HBONE side.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.bed import Bed, netns_snapshot, netns_socket
from tests.mesh import AGENT_START_TIMEOUT, AMESHCTL, Mesh, exchange
from tests.transfer import EXIT_AFTER_LAST, SERVICE_IP, Transfer, amesh_state, client_server_bed, client_server_mesh

RATE = 50  # new connections a second
RECOVERY = 2.0  # seconds for capture to be back after a generation is killed (the figure)


class Load:
    """A client on node-1 opening RATE connections a second to the Service, each one exchange;
    counts what was served and what failed, until stop()."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                name, echoed = exchange(self.bed, self.bed.pods["client"], SERVICE_IP, 80, b"hello", timeout=5)
                assert (name, echoed) == ("server", b"hello"), (name, echoed)
                self.served += 1
            except (OSError, AssertionError) as e:
                self.failures.append(f"{time.strftime('%X')} {e!r}")
            next_at += 1 / RATE
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = client_server_bed(make_bed("p2p", nodes=2))
    mesh = client_server_mesh(bed)
    yield mesh
    mesh.print_logs()
    for path in bed.logdir.glob("agent-*-gen*.log"):
        print(f"--- {path.name} ---", *path.read_text(errors="replace").splitlines()[-40:], sep="\n")


def start_generation(mesh: Mesh, node: int, generation: int, *extra_args: str) -> subprocess.Popen:
    """Starts another agent on `node` beside the one running; returns once it serves."""
    proc, log = spawn_generation(mesh, node, generation, *extra_args)
    mesh.wait_for(f"agent generation {generation} on node-{node} to serve",
                  lambda: proc.poll() is not None or (log.exists() and "event=ready" in log.read_text()),
                  timeout=AGENT_START_TIMEOUT, interval=0.1)
    assert proc.poll() is None, log.read_text()
    return proc


def spawn_generation(mesh: Mesh, node: int, generation: int, *extra_args: str) -> tuple[subprocess.Popen, Path]:
    """Starts another agent on `node`; returns it and its log."""
    bed = mesh.bed
    nd = bed.node(node)
    log = bed.logdir / f"agent-{nd.name}-gen{generation}.log"
    argv = [AMESHCTL, "agent", "--node", nd.name, "--registry-file", str(mesh.registry_path),
            "--ca-dir", str(mesh.ca_dir), *extra_args]
    return bed.spawn(nd, argv, log), log


def served_at_once(mesh: Mesh) -> float:
    """Seconds until a new connection through the mesh succeeds (each try bounded)."""
    began = time.monotonic()
    while True:
        try:
            assert exchange(mesh.bed, mesh.bed.pods["client"], SERVICE_IP, 80, b"x", timeout=0.5) == ("server", b"x")
            return time.monotonic() - began
        except OSError:
            if time.monotonic() - began > 10:
                raise


@pytest.mark.parametrize("node", [1, 2], ids=["client node", "server node"])
def test_an_upgrade_under_load_fails_no_connection_and_the_old_agent_finishes_its_own(mesh: Mesh, node: int):
    bed = mesh.bed
    netns = bed.node(node).netns
    before = amesh_state(netns_snapshot(netns))
    old = mesh.agents[f"node-{node}"]
    load = Load(bed)
    try:
        transfer = Transfer(bed, bed.pods["client"], SERVICE_IP, duration=6.0)
        time.sleep(1.0)
        new = start_generation(mesh, node, 2)
        mesh.agents[f"node-{node}"] = new  # the bed stops it at the end
        assert old.poll() is None  # still carrying the transfer
        assert transfer.result(), transfer.error
        ended = time.monotonic()
        assert old.wait(timeout=EXIT_AFTER_LAST + 5) == 0
        assert time.monotonic() - ended <= EXIT_AFTER_LAST
        time.sleep(1.0)  # new connections after the old agent is gone
    finally:
        load.stop()
    print(f"served {load.served} connections, {len(load.failures)} failed")
    assert load.failures == [] and load.served >= RATE * 6, (load.served, load.failures[:5])
    assert amesh_state(netns_snapshot(netns)) == before  # once each: no duplicate filter, rule or route
    log = (bed.logdir / f"agent-node-{node}.log").read_text()
    assert "event=leftovers_removed" not in (bed.logdir / f"agent-node-{node}-gen2.log").read_text()
    assert "event=drain_requested by=\"a new agent took over the node's datapath\"" in log


@pytest.mark.parametrize("killed", ["old", "new"])
def test_sigkill_of_either_generation_mid_upgrade_recovers_capture_and_leaves_no_stray_state(mesh: Mesh, killed: str):
    bed = mesh.bed
    netns = bed.node(2).netns
    before = amesh_state(netns_snapshot(netns))
    old = mesh.agents["node-2"]
    transfer = Transfer(bed, bed.pods["client"], SERVICE_IP, duration=30.0)  # keeps the old agent draining
    new = start_generation(mesh, 2, 2)
    mesh.agents["node-2"] = new
    time.sleep(0.5)
    assert old.poll() is None
    victim = old if killed == "old" else new
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=5)
    if killed == "new":  # the old agent drains on; a new start takes over from it
        mesh.agents["node-2"] = start_generation(mesh, 2, 3)
    took = served_at_once(mesh)
    print(f"capture back {took:.2f} s after the {killed} agent was killed (or the next one served)")
    assert took <= RECOVERY, took
    assert amesh_state(netns_snapshot(netns)) == before
    transfer.end_now()
    mesh.stop_agent(2)
    if killed == "new":
        assert old.wait(timeout=EXIT_AFTER_LAST + 5) == 0  # its last connection ended
    assert amesh_state(netns_snapshot(netns)) == []  # nothing of amesh's is left on the node


def test_a_new_agent_that_fails_after_taking_the_sockmap_gives_capture_back_and_removes_nothing(mesh: Mesh):
    bed = mesh.bed
    netns = bed.node(2).netns
    before = amesh_state(netns_snapshot(netns))
    old = mesh.agents["node-2"]
    blocker = netns_socket(netns)  # a port the new agent's admin API cannot have (no SO_REUSEPORT here)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    with blocker:
        new, log = spawn_generation(mesh, 2, 2, "--admin-port", str(blocker.getsockname()[1]))
        assert new.wait(timeout=AGENT_START_TIMEOUT) != 0
    assert "event=datapath_taken_over" in log.read_text()  # it had put its listeners in the sockmap
    took = served_at_once(mesh)
    print(f"capture back {took:.2f} s after the failed takeover")
    assert took <= RECOVERY, took
    assert old.poll() is None and "event=takeover_failed" in (bed.logdir / "agent-node-2.log").read_text()
    assert "drain_requested" not in (bed.logdir / "agent-node-2.log").read_text()
    assert amesh_state(netns_snapshot(netns)) == before  # the failed agent removed nothing
