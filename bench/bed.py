"""Pieces every benchmark shares: iperf3 and new-connection measurements from a bed pod, the
CPU and memory of a process read from /proc, min/median/max summaries and the results file.

Each measurement checks the bytes it moved (iperf3 received some, every echo came back equal),
so a broken path fails the benchmark instead of producing a fast figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.bed import Bed, Pod

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # units of utime/stime in /proc/<pid>/stat


def iperf3(bed: Bed, client: Pod, ip: str, port: int, seconds: float, streams: int = 1) -> tuple[float, int]:
    """iperf3 from `client` to ip:port for `seconds` with `streams` streams: (Gbit/s, bytes) at the receiver."""
    argv = ["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    out = bed.run(client, argv, timeout=seconds + 30, check=False).stdout
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 to {ip}:{port} printed no JSON: {out[:300]!r}") from None
    if "error" in result:
        raise RuntimeError(f"iperf3 to {ip}:{port} failed: {result['error']}")
    received = result["end"]["sum_received"]
    if not received["bytes"]:
        intervals = [round(i["sum"]["bits_per_second"] / 1e9, 2) for i in result.get("intervals", [])]
        raise RuntimeError(f"iperf3 to {ip}:{port} moved no data (Gbit/s per interval: {intervals})")
    return received["bits_per_second"] / 1e9, int(received["bytes"])


def exchange_once(sock: socket.socket, message: bytes, greeting: bool = False) -> None:
    """Send `message` and read it back (after the server's one-line greeting if it has one)."""
    if greeting and not sock.recv(64):
        raise AssertionError("echo server closed before greeting")
    sock.sendall(message)
    received = bytearray()
    while len(received) < len(message):
        chunk = sock.recv(len(message) - len(received))
        if not chunk:
            break
        received += chunk
    if received != message:
        raise AssertionError(f"echo returned {len(received)} bytes, not the {len(message)} sent"
                             if len(received) != len(message) else "echo returned different bytes")


def new_connections(bed: Bed, client: Pod, ip: str, port: int, seconds: float, message: bytes,
                    greeting: bool = False) -> list[float]:
    """Fresh TCP connection plus one echo of `message`, back to back for `seconds`: each time in s."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter_ns()
        with bed.connect(client, ip, port, timeout=5) as sock:
            exchange_once(sock, message, greeting)
        latencies.append((time.perf_counter_ns() - started) / 1e9)
    return latencies


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank on sorted values."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(round(q * len(ordered) / 100, 6)) - 1))
    return ordered[rank]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant of it (an agent and its worker processes), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # it ended while we looked
            children.setdefault(parent, []).append(int(entry.name))
    tree, i = [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    return tree


def tree_cpu(pids: list[int]) -> dict[int, float]:
    """utime + stime in seconds of each of `pids` and of each of their live descendants."""
    seconds = {}
    for p in (p for pid in pids for p in process_tree(pid)):
        try:
            seconds[p] = cpu_seconds(p)
        except OSError:
            continue  # it ended while we looked
    return seconds


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "repeats": len(values)}


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"host": socket.gethostname(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu_model": model, "python": platform.python_version()}


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def write_report(path: Path, records: list[dict], **extra: object) -> Path:
    """Writes {"machine", "commit", **extra, "records"} as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "commit": commit(), **extra, "records": records}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def configurations_main(doc: str, name: str, configurations: int, run: Callable[[int, float], list[dict]],
                        table: Callable[[list[dict]], str], argv: list[str] | None) -> int:
    """The command line of a benchmark that measures `configurations` interleaved: --repeats,
    --seconds, --quick; prints `table(run(repeats, seconds))` and, unless quick, writes the
    records to bench/results/<name>-<UTC time>.json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--quick", action="store_true", help="one short repeat: checks the harness, not speed")
    args = parser.parse_args(argv)
    repeats, seconds = (1, 1.0) if args.quick else (args.repeats, args.seconds)
    print(f"{name} cost: {configurations} configurations x {repeats} repeats, {seconds:g} s per measurement")
    records = run(repeats, seconds)
    print(f"\n{table(records)}")
    if not args.quick:  # quick runs check the harness; their figures are not worth keeping
        out = write_report(RESULTS / f"{name}-{utc_stamp()}.json", records, quick=False)
        print(f"\nwritten to {out}")
    return 0
