"""The ztunnel's worker processes (`--workers N`, agent/workers.py): the kernel fact they stand on,
connections spread over the workers, a killed worker restarted while the others serve, and an
agent that stops (or is killed) leaving no worker and none of its kernel state behind.

Bed: two point-to-point nodes. Namespace "shop" is enrolled: client on node-1, an echo server on
node-2 behind Service shop/web 10.96.0.10:80. Node-1's agent (the client's outbound side) runs
the workers under test; a worker numbers its connections k+1, k+1+N, ..., so a connection's id
says which worker carried it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Iterator

from bpf.datapath import NodeDatapath, Slot
from tests.bed import Bed, in_netns, netns_snapshot, netns_socket
from tests.mesh import Mesh, ServiceSpec
from tests.transfer import PORT, SERVICE_IP, amesh_state, client_server_bed
from ztunnel.dataplane import LISTENER_PORTS
from ztunnel.listener import transparent_listener

CONNECTIONS = 200
WORKERS = 2
IO_TIMEOUT = 5.0  # seconds for one connection's exchange


@contextlib.contextmanager
def workers_mesh(make_bed, *node1_args: str) -> Iterator[Mesh]:
    """The client/server mesh, node-1's agent started with `node1_args`; its logs shown at the end."""
    bed = client_server_bed(make_bed("p2p", nodes=2))
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=PORT)
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    mesh.write_registry()
    mesh.start_agent(1, *node1_args)
    mesh.start_agent(2)
    try:
        yield mesh
    finally:
        mesh.print_logs()


def _accepted(listener: socket.socket) -> int:
    """Accepts (and closes) every connection queued on a non-blocking listener; how many."""
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_a_sockmap_socket_of_a_reuseport_group_shares_its_syns_with_the_group(make_bed):
    """The kernel fact the worker model stands on (README, "The worker model"): bpf_sk_assign of
    one SO_REUSEPORT group member, by the tc program and by the sk_lookup program, hands each SYN
    to a member the group picks, not always to that one."""
    bed = make_bed("p2p", nodes=1)
    pod = bed.add_pod("client", 1)
    node = bed.nodes[0]
    with in_netns(node.netns):
        groups = {slot: [transparent_listener(port), transparent_listener(port)] for slot, port in LISTENER_PORTS.items()}
        datapath = NodeDatapath({slot: group[0] for slot, group in groups.items()}, LISTENER_PORTS[Slot.INBOUND_HBONE])
    try:
        with in_netns(node.netns):
            datapath.sync([pod.ip])
        for _ in range(CONNECTIONS):  # through tc: the pod's SYNs to a Service IP
            with netns_socket(pod.netns) as client:
                client.settimeout(IO_TIMEOUT)
                client.connect((SERVICE_IP, 80))
        time.sleep(0.2)
        by_tc = [_accepted(listener) for listener in groups[Slot.OUTBOUND]]
        # through sk_lookup alone: over lo (no tc there) from an address the program takes for an enrolled pod's
        datapath.program.set_enrolled([pod.ip, node.ip])
        for _ in range(CONNECTIONS):
            with netns_socket(node.netns) as client:
                client.settimeout(IO_TIMEOUT)
                client.bind((node.ip, 0))
                client.connect((node.ip, 7777))
        time.sleep(0.2)
        by_lookup = [_accepted(listener) for listener in groups[Slot.OUTBOUND]]
    finally:
        with in_netns(node.netns):
            datapath.close()
        for group in groups.values():
            for listener in group:
                listener.close()
    print(f"tc: {by_tc}, sk_lookup: {by_lookup} (the sockmap's member first)")
    assert sum(by_tc) == CONNECTIONS and min(by_tc) > CONNECTIONS // 5, by_tc
    assert sum(by_lookup) == CONNECTIONS and min(by_lookup) > CONNECTIONS // 5, by_lookup


def _exchange(bed: Bed, payload: bytes = b"ping") -> bytes:
    """One short connection from the client through node-1's workers to the echo server."""
    with bed.connect(bed.pods["client"], SERVICE_IP, 80, timeout=IO_TIMEOUT) as sock:
        return _echo(sock, payload, greeting=True)


def _echo(sock: socket.socket, payload: bytes, greeting: bool = False) -> bytes:
    sock.sendall(payload)
    wanted = (b"server\n" if greeting else b"") + payload
    received = b""
    while len(received) < len(wanted):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def _workers(mesh: Mesh, node: int = 1) -> list[dict]:
    return mesh.ctl_json(node, "status")["workers"]["processes"]


def _worker_of(connection_id: int) -> int:
    return (connection_id - 1) % WORKERS


def test_two_workers_share_the_connections_and_a_killed_one_loses_only_its_own(make_bed):
    with workers_mesh(make_bed, "--workers", str(WORKERS)) as mesh:
        bed = mesh.bed
        mesh.wait_for("node-1's workers to serve", lambda: all(w["state"] == "serving" for w in _workers(mesh)),
                      timeout=10)
        for _ in range(CONNECTIONS):
            assert _exchange(bed) == b"server\nping"
        rows = mesh.ctl_json(1, "connections")
        outbound = [r for r in rows if r["direction"] == "outbound"]
        per_worker = [sum(1 for r in outbound if _worker_of(r["id"]) == k) for k in range(WORKERS)]
        print(f"{CONNECTIONS} connections over {WORKERS} workers: {per_worker}")
        assert sum(per_worker) == CONNECTIONS and min(per_worker) > 0, per_worker
        assert _opened(mesh) == CONNECTIONS  # /metrics sums the workers' counters

        # long-lived connections on both workers; then one worker is killed
        held = [bed.connect(bed.pods["client"], SERVICE_IP, 80, timeout=IO_TIMEOUT) for _ in range(12)]
        for sock in held:
            assert _echo(sock, b"a", greeting=True) == b"server\na"
        ports = {r["source_port"]: _worker_of(r["id"]) for r in mesh.ctl_json(1, "connections")
                 if r["state"] != "closed" and r["state"] != "failed" and r["direction"] == "outbound"}
        carried_by = [ports[sock.getsockname()[1]] for sock in held]
        assert set(carried_by) == set(range(WORKERS)), carried_by
        before = _workers(mesh)
        victim = before[0]
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        during = [_exchange(bed) for _ in range(50)]  # while it is dead and restarting
        assert during == [b"server\nping"] * 50
        mesh.wait_for("the killed worker to be restarted and serve",
                      lambda: (w := _workers(mesh)[0])["state"] == "serving" and w["pid"] != victim["pid"], timeout=15)
        print(f"worker 0 restarted and serving {time.monotonic() - killed_at:.2f} s after its SIGKILL")
        after = _workers(mesh)
        assert after[0]["restarts"] == 1 and after[1]["pid"] == before[1]["pid"]
        assert mesh.ctl_json(1, "status")["workers"]["restarts"] == 1
        for sock, worker in zip(held, carried_by):
            try:
                echoed = _echo(sock, b"b")
            except OSError:
                echoed = b""
            assert (echoed == b"b") == (worker != 0), (worker, echoed)  # only the killed worker's were lost
            sock.close()
        for _ in range(50):
            assert _exchange(bed) == b"server\nping"
        assert [e for e in _workers(mesh) if e["state"] == "serving"] == _workers(mesh)
        # the killed worker's counters as last scraped stay in the node's totals: never down, and
        # every connection the other worker and the restarted one carried since is counted
        assert _opened(mesh) >= CONNECTIONS + 100 + carried_by.count(1)


def _opened(mesh: Mesh) -> float:
    """node-1's istio_tcp_connections_opened_total as the source's reporter, over every series."""
    return sum(value for labels, value in mesh.metrics(1)["istio_tcp_connections_opened_total"]
               if labels["reporter"] == "source")


def _children(pid: int) -> set[int]:
    """The processes `pid` started that still exist (from /proc/<pid>/task/*/children)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found.update(int(child) for child in children.read().split())
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_every_worker_and_the_node_is_as_before(make_bed):
    with workers_mesh(make_bed) as mesh:  # the default on this 2-CPU machine: 2 workers
        bed = mesh.bed
        assert _exchange(bed) == b"server\nping"
        agent = mesh.agents["node-1"]
        workers = [w["pid"] for w in _workers(mesh)]
        assert len(workers) == WORKERS and _children(agent.pid) == set(workers)
        assert amesh_state(netns_snapshot(bed.node(1).netns)) != []
        assert mesh.stop_agent(1) == 0
        assert not [pid for pid in workers if _alive(pid)]
        assert amesh_state(netns_snapshot(bed.node(1).netns)) == []


def test_an_agent_killed_takes_its_workers_with_it(make_bed):
    with workers_mesh(make_bed) as mesh:
        _killed_with_its_agent(mesh)


def _killed_with_its_agent(mesh: Mesh) -> None:
    agent = mesh.agents["node-1"]
    workers = [w["pid"] for w in _workers(mesh)]
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(timeout=5)
    mesh.agents.pop("node-1")
    deadline = time.monotonic() + 5
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)]


def test_one_worker_is_the_single_process_of_before(make_bed):
    with workers_mesh(make_bed, "--workers", "1") as mesh:
        assert _exchange(mesh.bed) == b"server\nping"
        assert mesh.ctl_json(1, "status")["workers"] == {"count": 1}
        assert _children(mesh.agents["node-1"].pid) == set()
        [row] = [r for r in mesh.ctl_json(1, "connections") if r["direction"] == "outbound"]
        assert row["id"] == 1
