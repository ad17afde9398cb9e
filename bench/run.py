"""amesh against no mesh, stunnel and HAProxy: throughput, request/response latency, new
connections, idle connections and CPU per GB, every path in the same run.

    python -m bench.run [--repeats N] [--quick] [--out DIR]

Bed: two point-to-point nodes. Namespace "plain" (not enrolled): pod pclient on node-1, pod
pserver on node-2. Namespace "mesh" (enrolled): pod client on node-1, pod server on node-2 and
pod same on node-1. Each server pod runs iperf3 -s (5201) and bench.echo (7000). Paths:

    direct       pclient -> pserver, kernel only (the agents run but capture neither pod)
    stunnel      pclient -> stunnel4 (client pod) =TLS 1.3 mTLS=> stunnel4 (server pod) -> app
    haproxy      the same with an HAProxy pair
    amesh-cross  client -> server: BPF capture, node-1 ztunnel =HBONE mTLS=> node-2 ztunnel
    amesh-same   client -> same: BPF capture, node-1 ztunnel, same-node path

Scenarios, interleaved (repeat 1 of every scenario and path, then repeat 2, ...):

    bulk         iperf3 for 5 s, 1 and 4 streams: Gbit/s at the receiver
    cpu          during the 1-stream run: utime+stime of the proxying processes (the two
                 stunnels, the two haproxies, the two agents) per GB received; direct has none
    rr-64B, rr-16KiB  one persistent connection, back-to-back round trips of one message for
                 3 s: p50/p99/p99.9 round-trip time, timed with perf_counter_ns
    new-conn     fresh connection + one 64-byte echo, back to back for 3 s: conn/s, p50/p99 time
    idle-<N>     amesh-cross only, agents freshly restarted: N idle connections held open; the
                 node-1 ztunnel's RSS growth per connection and its CPU while they idle

Every exchange compares the echoed bytes and every iperf3 run must move bytes, so a broken path
fails the run. Writes bench/results/<UTC time>.json, .md and .png (--quick: one short repeat
with 500 idle connections into a temporary directory; it checks the harness, not speed).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import report
from bench.bed import (RESULTS, cpu_seconds, exchange_once, iperf3, new_connections, percentile,
                       rss_kib, summary, utc_stamp, write_report)
from bench.echo import raise_open_files
from bench.proxies import Forward, make_certificates, start_pair
from tests.bed import Bed, Pod
from tests.mesh import Mesh

IPERF_PORT = 5201
ECHO_PORT = 7000
FORWARDS = {  # the proxies' ports: client app -> 127.0.0.1:local, TLS on tls, server app on target
    "stunnel": [Forward(15201, 9441, IPERF_PORT), Forward(17000, 9442, ECHO_PORT)],
    "haproxy": [Forward(25201, 9451, IPERF_PORT), Forward(27000, 9452, ECHO_PORT)],
}
PATHS = ("direct", "stunnel", "haproxy", "amesh-cross", "amesh-same")
AGENT_FLAGS = ("--no-access-log",)
AGENT_OPEN_FILES = 65536  # wanted; the idle scenario holds about one descriptor per connection in each agent
RR_SIZES = {"rr-64B": 64, "rr-16KiB": 16 * 1024}
SETUP_MESSAGE = b"n" * 64  # exchanged on each new connection
IDLE_BATCH = 64  # connections opened before their first echo is read; below the listeners' backlog
WARMUP_ROUND_TRIPS = 100


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    bulk_seconds: float = 5.0
    rr_seconds: float = 3.0
    rr_max: int = 50_000  # round trips per measurement at most
    conn_seconds: float = 3.0
    idle_connections: int = 10_000
    idle_seconds: float = 5.0
    quick: bool = False


QUICK = Settings(repeats=1, bulk_seconds=1.0, rr_seconds=0.5, rr_max=5_000, conn_seconds=1.0,
                 idle_connections=500, idle_seconds=1.0, quick=True)


@dataclass
class Target:
    """Where a path's client connects: pod, address, iperf3 and echo ports, and who proxies."""

    name: str
    client: Pod
    ip: str
    iperf_port: int
    echo_port: int
    proxies: list[subprocess.Popen] = field(default_factory=list)  # stunnel/haproxy; agents are looked up live


class Bench:
    """The bed, its servers, proxies and agents; one method per scenario."""

    def __init__(self, bed: Bed, settings: Settings, agent_flags: tuple[str, ...] = AGENT_FLAGS) -> None:
        self.bed, self.settings, self.agent_flags = bed, settings, agent_flags
        self.mesh = Mesh(bed, namespaces={"mesh": True, "plain": False})
        pclient = bed.add_pod("pclient", 1, namespace="plain")
        pserver = bed.add_pod("pserver", 2, namespace="plain")
        client = bed.add_pod("client", 1, namespace="mesh")
        server = bed.add_pod("server", 2, namespace="mesh")
        same = bed.add_pod("same", 1, namespace="mesh")
        for ns in [n.netns for n in bed.nodes] + [p.netns for p in bed.pods.values()]:
            # Back-to-back new connections leave TIME_WAIT sockets; reuse them and widen the range
            bed.run(ns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                         "net.ipv4.ip_local_port_range=20000 65000", "net.core.somaxconn=16384"])
        for pod in (pserver, server, same):
            bed.spawn(pod, ["iperf3", "-s", "-p", str(IPERF_PORT)], bed.logdir / f"iperf3-{pod.name}.log")
            bed.wait_listening(pod, IPERF_PORT)
            echo = bed.spawn(pod, [sys.executable, "-m", "bench.echo", "--port", str(ECHO_PORT)],
                             bed.logdir / f"echo-{pod.name}.log")
            bed.wait_listening(pod, ECHO_PORT, proc=echo)
        certs = make_certificates(bed.logdir / "tls", pserver.ip)
        self.paths = {"direct": Target("direct", pclient, pserver.ip, IPERF_PORT, ECHO_PORT)}
        for kind, forwards in FORWARDS.items():
            procs = start_pair(bed, kind, pclient, pserver, forwards, certs)
            self.paths[kind] = Target(kind, pclient, "127.0.0.1", forwards[0].local, forwards[1].local, procs)
        self.paths["amesh-cross"] = Target("amesh-cross", client, server.ip, IPERF_PORT, ECHO_PORT)
        self.paths["amesh-same"] = Target("amesh-same", client, same.ip, IPERF_PORT, ECHO_PORT)
        self.mesh.write_registry()
        self.start_agents()
        self.figures: dict[tuple[str, str, str, str], list[float]] = {}  # (scenario, path, metric, unit)

    def start_agents(self) -> None:
        for node in self.bed.nodes:
            proc = self.mesh.start_agent(node, *self.agent_flags)
            raise_open_files(AGENT_OPEN_FILES, proc.pid)
            exe = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            if not any(b"ameshctl" in part for part in exe[:2]):  # ip netns exec replaced itself
                raise RuntimeError(f"pid {proc.pid} is not the agent: {exe[:3]}")

    def restart_agents(self) -> None:
        for node in self.bed.nodes:
            self.mesh.stop_agent(node)
        self.start_agents()

    def proxies(self, path: Target) -> list[int]:
        """Pids of the processes that carry the path's bytes in user space."""
        if path.name.startswith("amesh"):
            return [proc.pid for proc in self.mesh.agents.values()]
        return [proc.pid for proc in path.proxies]

    def record(self, scenario: str, path: str, metric: str, unit: str, value: float) -> None:
        self.figures.setdefault((scenario, path, metric, unit), []).append(value)

    # -- scenarios ------------------------------------------------------------------------------

    def bulk(self, path: Target) -> str:
        """iperf3 with 1 and 4 streams; the proxies' CPU per GB during the 1-stream run."""
        s = self.settings
        pids = self.proxies(path)
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        gbps, moved = iperf3(self.bed, path.client, path.ip, path.iperf_port, s.bulk_seconds, 1)
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        gbps4, _ = iperf3(self.bed, path.client, path.ip, path.iperf_port, s.bulk_seconds, 4)
        self.record("bulk", path.name, "1 stream", "Gbit/s", gbps)
        self.record("bulk", path.name, "4 streams", "Gbit/s", gbps4)
        if pids:
            self.record("cpu", path.name, "CPU per GB", "s/GB", cpu / (moved / 1e9))
        return f"{gbps:.2f}/{gbps4:.2f} Gbit/s" + (f" {cpu / (moved / 1e9):.2f} s/GB" if pids else "")

    def request_response(self, path: Target) -> str:
        """Round-trip times on one connection for each message size."""
        s = self.settings
        out = []
        for scenario, size in RR_SIZES.items():
            times = round_trips(self.bed, path.client, path.ip, path.echo_port, size, s.rr_seconds, s.rr_max)
            for q in (50, 99, 99.9):
                self.record(scenario, path.name, f"p{q:g}", "µs", percentile(times, q) / 1e3)
            out.append(f"{scenario} p50 {percentile(times, 50) / 1e3:.0f} µs ({len(times)})")
        return ", ".join(out)

    def new_conn(self, path: Target) -> str:
        """Fresh connection plus one 64-byte echo, back to back."""
        s = self.settings
        times = new_connections(self.bed, path.client, path.ip, path.echo_port, s.conn_seconds, SETUP_MESSAGE)
        self.record("new-conn", path.name, "rate", "conn/s", len(times) / s.conn_seconds)
        self.record("new-conn", path.name, "p50", "ms", percentile(times, 50) * 1e3)
        self.record("new-conn", path.name, "p99", "ms", percentile(times, 99) * 1e3)
        return f"{len(times) / s.conn_seconds:.0f} conn/s p50 {percentile(times, 50) * 1e3:.2f} ms"

    def idle(self) -> str:
        """Idle connections through amesh-cross on freshly started agents: RSS per connection, idle CPU."""
        s, path = self.settings, self.paths["amesh-cross"]
        scenario = f"idle-{s.idle_connections}"
        self.restart_agents()
        agent1, agent2 = (self.mesh.agents[node.name].pid for node in self.bed.nodes)
        new_connections(self.bed, path.client, path.ip, path.echo_port, 0.5, SETUP_MESSAGE)  # warm up
        time.sleep(0.5)
        base1, base2 = rss_kib(agent1), rss_kib(agent2)
        socks = hold_connections(self.bed, path.client, path.ip, path.echo_port, s.idle_connections)
        try:
            time.sleep(1.0)  # let the agents finish their bookkeeping for the last batch
            per1 = (rss_kib(agent1) - base1) / len(socks)
            per2 = (rss_kib(agent2) - base2) / len(socks)
            cpu_before, started = cpu_seconds(agent1), time.monotonic()
            time.sleep(s.idle_seconds)
            idle_cpu = (cpu_seconds(agent1) - cpu_before) / (time.monotonic() - started) * 100
            echo_all(socks)  # every held connection still carries bytes
        finally:
            for sock in socks:
                sock.close()
        self.record(scenario, "amesh-cross", "node-1 RSS per connection", "KiB", per1)
        self.record(scenario, "amesh-cross", "node-2 RSS per connection", "KiB", per2)
        self.record(scenario, "amesh-cross", "node-1 CPU while idle", "% of a CPU", idle_cpu)
        return f"{per1:.1f} KiB/conn (node-2 {per2:.1f}), idle CPU {idle_cpu:.1f} %"

    def run(self) -> list[dict]:
        for repeat in range(1, self.settings.repeats + 1):
            for scenario in (self.bulk, self.request_response, self.new_conn):
                for name in PATHS:
                    line = scenario(self.paths[name])
                    print(f"  repeat {repeat} {scenario.__name__:16} {name:11} {line}", flush=True)
            print(f"  repeat {repeat} idle             amesh-cross {self.idle()}", flush=True)
        return [{"scenario": sc, "path": path, "metric": metric, "unit": unit, **summary(values)}
                for (sc, path, metric, unit), values in self.figures.items()]


def round_trips(bed: Bed, client: Pod, ip: str, port: int, size: int, seconds: float, limit: int) -> list[int]:
    """Round trips of a `size`-byte message on one connection for `seconds` (at most `limit`): ns each."""
    message = os.urandom(size)
    buffer = bytearray(size)
    view = memoryview(buffer)
    times: list[int] = []
    with bed.connect(client, ip, port, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(WARMUP_ROUND_TRIPS):
            exchange_once(sock, message)
        deadline = time.monotonic() + seconds
        while len(times) < limit and time.monotonic() < deadline:
            started = time.perf_counter_ns()
            sock.sendall(message)
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    raise AssertionError(f"connection to {ip}:{port} closed after {got} of {size} echoed bytes")
                got += n
            times.append(time.perf_counter_ns() - started)
            if buffer != message:
                raise AssertionError(f"echo from {ip}:{port} returned different bytes")
    return times


def hold_connections(bed: Bed, client: Pod, ip: str, port: int, count: int) -> list[socket.socket]:
    """`count` connections from `client`, each having echoed one byte; the caller closes them."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            batch = [bed.connect(client, ip, port, timeout=10) for _ in range(min(IDLE_BATCH, count - len(socks)))]
            socks += batch
            echo_all(batch)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def echo_all(socks: list[socket.socket]) -> None:
    """One byte out on every socket, then its echo back from each, in batches."""
    for i in range(0, len(socks), IDLE_BATCH):
        batch = socks[i:i + IDLE_BATCH]
        for sock in batch:
            sock.sendall(b"i")
        for sock in batch:
            if sock.recv(1) != b"i":
                raise AssertionError(f"held connection {sock.getsockname()} lost its echo")


def check_complete(records: list[dict], settings: Settings) -> None:
    """Every path has every scenario's figures (the quick mode's check of the harness)."""
    have = {(r["scenario"], r["path"]) for r in records}
    want = {(sc, p) for sc in ("bulk", *RR_SIZES, "new-conn") for p in PATHS}
    want |= {("cpu", p) for p in PATHS if p != "direct"} | {(f"idle-{settings.idle_connections}", "amesh-cross")}
    missing = sorted(want - have)
    if missing:
        raise AssertionError(f"no figures for {missing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=Settings.repeats)
    parser.add_argument("--quick", action="store_true", help="one short repeat, 500 idle connections: checks the harness")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the results (default bench/results; --quick: a temporary one)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings(repeats=args.repeats)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="amesh-bench-")) if args.quick else RESULTS)
    raise_open_files()  # the idle scenario holds its connections in this process
    print(f"amesh vs direct, stunnel, haproxy: {len(PATHS)} paths x {settings.repeats} repeats"
          f"{' (quick: checks the harness, not speed)' if settings.quick else ''}", flush=True)
    started = time.monotonic()
    with Bed(nodes=2, mode="p2p") as bed:
        records = Bench(bed, settings).run()
    check_complete(records, settings)
    report.add_ratios(records)
    stem = out_dir / utc_stamp()
    write_report(stem.with_suffix(".json"), records, quick=settings.quick,
                 settings=settings.__dict__, seconds=round(time.monotonic() - started))
    markdown = report.markdown(records)
    stem.with_suffix(".md").write_text(markdown + "\n")
    report.chart(records, stem.with_suffix(".png"))
    print(f"\n{markdown}\n\nwritten to {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
