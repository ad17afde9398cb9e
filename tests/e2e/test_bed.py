"""The test bed itself: pods reach each other, Service IPs lead nowhere, closing leaves no trace.

Every other e2e test and the benchmarks stand on tests.bed; these tests pin down what it
promises, in both pod networking modes.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.bed import MODES, Bed, BedError, list_netns, netns_snapshot, netns_socket

pytestmark = pytest.mark.e2e

PORT = 8080
PAYLOAD = os.urandom(512 * 1024)  # bytes; more than one socket buffer, so echo must stream
SERVICE_IP = "10.96.0.10"  # a cluster IP: no route to it anywhere in the bed
UNREACHABLE_BOUND = 3.0  # seconds; the node answers ICMP unreachable, so it is normally instant


def echo_roundtrip(sock: socket.socket, payload: bytes) -> tuple[bytes, bytes]:
    """Send `payload`, half-close, read to EOF; return (server name line, echoed bytes)."""
    sent_error: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the reading side
            sent_error.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    sender.join(timeout=5)
    assert not sent_error, f"sending failed: {sent_error[0]!r}"
    received = b"".join(chunks)
    name, _, echoed = received.partition(b"\n")
    return name, echoed


@pytest.mark.parametrize("mode", MODES)
def test_pods_reach_each_other_across_and_within_nodes(make_bed, mode):
    bed = make_bed(mode)
    client = bed.add_pod("client", 1)
    far = bed.add_pod("server-far", 2)
    near = bed.add_pod("server-near", 1)
    assert client.node.name == "node-1" and far.node.name == "node-2"
    assert (client.ip, near.ip, far.ip) == ("10.244.1.10", "10.244.1.11", "10.244.2.10")
    bed.start_podserver(far, PORT)
    bed.start_podserver(near, PORT)

    for server in (far, near):
        with bed.connect(client, server.ip, PORT, timeout=5.0) as sock:
            assert sock.getsockname()[0] == client.ip  # no NAT anywhere in the bed
            name, echoed = echo_roundtrip(sock, PAYLOAD)
        assert name == server.name.encode()
        assert len(echoed) == len(PAYLOAD) and echoed == PAYLOAD


@pytest.mark.parametrize("mode", MODES)
def test_nodes_reach_pods_and_pods_reach_nodes(make_bed, mode):
    """What the node agent needs: node -> local and remote pod, pod -> remote node address."""
    bed = make_bed(mode)
    n1, n2 = bed.nodes
    local, remote = bed.add_pod("local", 1), bed.add_pod("remote", 2)
    bed.start_podserver(local, PORT)
    bed.start_podserver(remote, PORT)
    bed.start_podserver(n2, PORT)
    for src, dst_ip, want in [
        (n1, local.ip, b"local"), (n1, remote.ip, b"remote"), (local, n2.ip, b"node-2"),
    ]:
        with bed.connect(src, dst_ip, PORT, timeout=5.0) as sock:
            assert echo_roundtrip(sock, b"hi") == (want, b"hi"), (src.name, dst_ip)


@pytest.mark.parametrize("mode", MODES)
def test_service_ip_is_unreachable(make_bed, mode):
    bed = make_bed(mode)
    client = bed.add_pod("client", 1)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        bed.connect(client, SERVICE_IP, 80, timeout=UNREACHABLE_BOUND)
    elapsed = time.monotonic() - started
    assert elapsed < UNREACHABLE_BOUND + 0.5
    assert isinstance(info.value, TimeoutError) or info.value.errno in (
        errno.ENETUNREACH, errno.EHOSTUNREACH
    ), info.value


def _root_sysctls() -> dict[str, str]:
    keys = ["net/ipv4/ip_forward", "net/ipv4/conf/all/proxy_arp", "net/ipv4/conf/all/rp_filter"]
    return {k: open(f"/proc/sys/{k}").read().strip() for k in keys}


@pytest.mark.parametrize("mode", MODES)
def test_root_namespace_untouched_and_nothing_left(mode):
    before, sysctls_before = netns_snapshot(), _root_sysctls()
    with Bed(2, mode) as bed:
        client = bed.add_pod("client", 1)
        server = bed.add_pod("server", 2)
        proc = bed.start_podserver(server, PORT)
        with bed.connect(client, server.ip, PORT) as sock:
            assert echo_roundtrip(sock, b"ping") == (b"server", b"ping")
        assert netns_snapshot() == before, "root namespace changed while the bed was up"
        ours = [ns for ns in list_netns() if ns.startswith(bed.prefix)]
        assert sorted(ours) == sorted(bed.namespaces)
    assert proc.returncode is not None, "podserver still running after close"
    assert [ns for ns in list_netns() if ns.startswith(bed.prefix)] == []
    assert netns_snapshot() == before, "root namespace changed after the bed closed"
    assert _root_sysctls() == sysctls_before
    bed.close()  # idempotent


def test_close_stops_stubborn_processes(make_bed):
    bed = make_bed("p2p", nodes=1)
    pod = bed.add_pod("a", 1)
    # Ignores SIGTERM and has a child: both must be gone after close.
    proc = bed.spawn(pod, ["sh", "-c", "trap '' TERM; sleep 60 & sleep 60; wait"],
                     stdout=subprocess.DEVNULL)
    time.sleep(0.2)
    started = time.monotonic()
    bed.close()
    assert time.monotonic() - started < 10
    assert proc.returncode == -9
    assert pod.netns not in list_netns()


def test_failed_build_leaves_nothing(monkeypatch):
    seen = []

    def broken(self, i):
        seen.append((self.prefix, list(self.namespaces)))
        raise RuntimeError("boom")

    monkeypatch.setattr(Bed, "_make_node", broken)
    with pytest.raises(RuntimeError, match="boom"):
        Bed(2, "bridge")
    [(prefix, made)] = seen
    assert made == [prefix + "fab"]  # the fabric was up when the build failed
    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []


def test_sweep_stale_removes_dead_runs_namespaces():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: a "killed run"
    stale = f"am{dead.pid}-fab"
    # Another run building a bed at this moment sweeps it too (by design), maybe before us.
    added = subprocess.run(["ip", "netns", "add", stale], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"a concurrent run swept {stale} while it was being made: {added.stderr}")
    try:
        Bed.sweep_stale()
        assert stale not in list_netns()
    finally:
        if stale in list_netns():
            subprocess.run(["ip", "netns", "delete", stale], check=False)


def test_netns_socket_lives_in_the_pod_and_thread_returns_home(make_bed):
    bed = make_bed("p2p", nodes=1)
    pod = bed.add_pod("a", 1)
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with netns_socket(pod.netns) as sock:
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
        sock.bind((pod.ip, 0))  # the pod's address exists only inside the pod
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind((pod.ip, 0))


def test_pod_names_are_checked(make_bed):
    bed = make_bed("bridge", nodes=1)
    for bad in ("fab", "n1", "Bad_Name", ""):
        with pytest.raises(ValueError):
            bed.add_pod(bad, 1)
    bed.add_pod("a", 1)
    with pytest.raises(ValueError):
        bed.add_pod("a", 1)


def test_spawn_host_mounts_keeps_cgroup_and_enters_the_netns(make_bed):
    bed = make_bed("p2p", nodes=1)
    node = bed.nodes[0]
    # `ip netns exec` remounts /sys: the host's cgroup mounts are not visible there.
    assert bed.run(node, ["ls", "/sys/fs/cgroup"]).stdout.strip() == ""
    ran = bed.run(node, ["sh", "-c", "ls /sys/fs/cgroup; ip -o addr show dev eth0"],
                  host_mounts=True).stdout
    assert ran.split()[0] and node.ip + "/24" in ran


def test_podserver_start_failure_is_explained(make_bed):
    bed = make_bed("bridge", nodes=1)
    pod = bed.add_pod("a", 1)
    bed.start_podserver(pod, PORT)
    with pytest.raises(BedError, match="(?is)exited.*cannot listen on 0.0.0.0:8080"):
        bed.start_podserver(pod, PORT, name="second")


def test_podserver_serves_many_connections_at_once(make_bed):
    bed = make_bed("p2p")
    client, server = bed.add_pod("client", 1), bed.add_pod("server", 2)
    bed.start_podserver(server, PORT)
    socks = [bed.connect(client, server.ip, PORT) for _ in range(100)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(b"x" * n)
            sock.shutdown(socket.SHUT_WR)
        for n, sock in enumerate(socks):
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            assert data == b"server\n" + b"x" * n
    finally:
        for sock in socks:
            sock.close()
