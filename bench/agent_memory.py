"""The idle agent's resident memory and start-up time, and what holds that memory.

Bed: one point-to-point node with five enrolled pods (tests/bed.py), one `ameshctl agent`, first
on the registry file, then watching the test API server (tests/kubeapi.py) serving the same
objects. Each repeat starts the agent and times it from spawn to ready (/healthz/ready
answers 200, which needs the BPF programs loaded, the listeners serving and the registry read)
and reads the CPU time it took (the agent's and its reaped children's: the BPF loader),
lets it idle, then reads its /proc: VmRSS and VmHWM (status), Rss/Pss/Anonymous (smaps_rollup),
and Rss per mapping (smaps) grouped by the file mapped, so libLLVM and libbcc show by name.
Then, in a fresh interpreter of the same venv, the resident memory each of the agent's heavy
imports adds, in the order the agent imports them, and the agent's full import set.

    python -m bench.agent_memory [--repeats 3] [--idle 5]

prints the figures and writes bench/results/agent-memory-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.bed import CLOCK_TICKS, RESULTS, process_tree, rss_kib, summary, utc_stamp, write_report
from tests.bed import Bed, Node, in_netns
from tests.kubeapi import KubeAPIServer
from tests.mesh import Mesh

PODS = 5
READINESS_PORT = 15021
READY_TIMEOUT = 30.0  # seconds from spawn to ready before the run fails
TOP_MAPPINGS = 12  # mappings listed per run, largest resident first
# Libraries that only compiling BPF needs: the agent should map none of them.
COMPILER_LIBRARIES = ("libLLVM", "libbcc", "libclang")
# The agent's heavy imports, in the order it first imports them (agent/cli.py, then agent/node.py);
# each figure is what it adds to the ones before it in one interpreter (a dependency several
# share, such as asyncio or ssl, counts for the first).
IMPORTS = ("click", "uvloop", "cryptography.x509", "agent.cli", "aiohttp", "immutables", "prometheus_client",
           "pyroute2", "yaml", "h2.connection", "agent.node",
           "registry.kubernetes")  # the Kubernetes source (over aiohttp: registry/kubeclient.py), imported only when used
SOURCES = ("file", "kubernetes")  # the agent's registry: the bed's file, or the test API server serving it
API_HOST, API_PORT = "172.18.0.1", 6443  # the test API server, on the bed's fabric
_IMPORT_PROBE = """
import importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
added, before = [], rss()
interpreter = before
for name in sys.argv[1:]:
    importlib.import_module(name)
    now = rss()
    added.append([name, now - before])
    before = now
bcc_loaded = any(m == "bcc" or m.startswith("bcc.") for m in sys.modules)
print(json.dumps({"interpreter_kib": interpreter, "added_kib": added,
                  "total_kib": rss(), "modules": len(sys.modules), "bcc_imported": bcc_loaded}))
"""


def _ready(mesh: Mesh, node: Node, timeout: float) -> float:
    """Seconds until the node's agent answers /healthz/ready with 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if mesh.http(node, READINESS_PORT, "/healthz/ready")[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        time.sleep(0.02)
    raise RuntimeError(f"the agent on {node.name} was not ready after {timeout:.1f} s")


def _cpu_with_children(pid: int) -> float:
    """CPU seconds of process `pid` and its reaped children (the BPF loader): the cost of a start,
    which, unlike its wall time, other work on the machine barely changes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime: stat(5) fields 14-17


def mappings(pid: int) -> dict[str, int]:
    """Resident KiB of process `pid` by what is mapped: a file's path, [heap], [anon], [stack]..."""
    by_name: dict[str, int] = defaultdict(int)
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5:  # a mapping's header: range perms offset dev inode [path]
            name = head[5] if len(head) == 6 else "[anon]"
        elif head[0] == "Rss:":
            by_name[name] += int(head[1])
    return dict(by_name)


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            values[key] = int(rest.split()[0])
    return values


def memory(pid: int) -> dict:
    """The memory figures of process `pid`, in KiB."""
    by_mapping = mappings(pid)
    top = sorted(by_mapping.items(), key=lambda kv: kv[1], reverse=True)[:TOP_MAPPINGS]
    return {
        "vmrss_kib": rss_kib(pid),
        **{k.lower() + "_kib": v for k, v in _kib_fields(Path(f"/proc/{pid}/status"), ("VmHWM",)).items()},
        "smaps_rollup_kib": _kib_fields(Path(f"/proc/{pid}/smaps_rollup"), ("Rss", "Pss", "Anonymous", "Swap")),
        "compiler_libraries_kib": {path: kib for path, kib in by_mapping.items()
                                   if any(lib in path for lib in COMPILER_LIBRARIES)},
        "top_mappings_kib": top,
    }


def import_costs() -> dict:
    """What each heavy import adds to a fresh interpreter of this venv, in KiB."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *IMPORTS], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


def run(repeats: int, idle: float) -> list[dict]:
    """`repeats` agent starts per registry source on one bed: start-up time and idle memory of each."""
    records = []
    with Bed(nodes=1, mode="p2p") as bed:
        mesh = Mesh(bed, namespaces={"shop": True})
        for i in range(PODS):
            bed.add_pod(f"pod-{i}", 1, namespace="shop", labels={"app": "idle"})
        mesh.write_registry()
        bed.run(bed.fabric, ["ip", "addr", "add", f"{API_HOST}/24", "dev", "br0"])
        with in_netns(bed.fabric):  # the server's thread, and so its sockets, live in the fabric namespace
            api = KubeAPIServer(API_HOST, API_PORT, objects=mesh.objects())
            api.start()
        try:
            for source in SOURCES:
                mesh.kubeconfig = api.write_kubeconfig(bed.logdir / "kubeconfig") if source == "kubernetes" else None
                records += [_measure_start(mesh, bed.nodes[0], idle, source, repeat) for repeat in range(repeats)]
        finally:
            api.close()
    return records


def _measure_start(mesh: Mesh, node: Node, idle: float, source: str, repeat: int) -> dict:
    """Starts the node's agent, times it to ready, lets it idle, reads its memory and stops it."""
    started = time.monotonic()
    proc = mesh.start_agent(node)
    startup = time.monotonic() - started
    startup += _ready(mesh, node, READY_TIMEOUT - startup)
    cpu = _cpu_with_children(proc.pid)
    time.sleep(idle)
    record = {"source": source, "repeat": repeat, "startup_s": round(startup, 3), "startup_cpu_s": round(cpu, 3),
              "pid": proc.pid, **memory(proc.pid),
              # the ztunnel worker processes (--workers, default the CPUs), each with its registry replica
              "worker_vmrss_kib": [rss_kib(pid) for pid in process_tree(proc.pid)[1:]]}
    mesh.stop_agent(node)
    workers = ", ".join(mib(kib) for kib in record["worker_vmrss_kib"]) or "none"
    print(f"{source} registry, repeat {repeat}: ready after {startup:.2f} s, VmRSS {mib(record['vmrss_kib'])}, "
          f"its workers {workers}")
    return record


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(records: list[dict], imports: dict) -> str:
    """The figures as text: per source start-up and memory, its last run's mappings; import costs."""
    lines = []
    for source in SOURCES:
        runs = [r for r in records if r["source"] == source]
        startup, rss, last = summary([r["startup_s"] for r in runs]), summary([r["vmrss_kib"] for r in runs]), runs[-1]
        cpu = summary([r["startup_cpu_s"] for r in runs])
        lines += [f"{source} registry: start-up to ready min {startup['min']:.2f} s, median {startup['median']:.2f} s, "
                  f"max {startup['max']:.2f} s ({startup['repeats']} starts); CPU until ready (agent and loader) "
                  f"median {cpu['median']:.2f} s",
                  f"  idle VmRSS: min {mib(rss['min'])}, median {mib(rss['median'])}, max {mib(rss['max'])}; "
                  f"VmHWM {mib(last['vmhwm_kib'])}; its workers' VmRSS (last run) "
                  + (", ".join(mib(kib) for kib in last["worker_vmrss_kib"]) or "none") + "; smaps_rollup "
                  + ", ".join(f"{k} {mib(v)}" for k, v in last["smaps_rollup_kib"].items()),
                  "  compiler libraries mapped: " + (", ".join(f"{Path(p).name} {mib(k)}" for p, k in
                                                               last["compiler_libraries_kib"].items()) or "none"),
                  "  largest mappings (resident):"]
        lines += [f"  {mib(kib):>10}  {name}" for name, kib in last["top_mappings_kib"]]
    lines.append(f"imports in a fresh interpreter (bare interpreter {mib(imports['interpreter_kib'])}, "
                 f"{imports['modules']} modules in all, bcc imported: {imports['bcc_imported']}):")
    lines += [f"  {mib(kib):>10}  + {name}" for name, kib in imports["added_kib"]]
    lines.append(f"  {mib(imports['total_kib']):>10}  total")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the measurement, prints it and writes the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="agent starts")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds the agent idles before it is measured")
    args = parser.parse_args(argv)
    records = run(args.repeats, args.idle)
    imports = import_costs()
    print(report(records, imports))
    out = write_report(RESULTS / f"agent-memory-{utc_stamp()}.json", records, imports=imports, pods=PODS,
                       idle_s=args.idle)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
