"""One ztunnel worker against two: new connections per second, 4-stream throughput, CPU per
connection and per GB (the agent's whole process tree), 64-byte round-trip latency, cross-node
and same-node, interleaved in one run; then system calls per GB and per new connection for
amesh and for stunnel in the same run.

    python -m bench.workers [--workers 1,2] [--repeats N] [--quick] [--no-syscalls]

Bed: bench.run's (two point-to-point nodes; the enrolled client on node-1 reaches server on
node-2 and same on node-1; the stunnel pair between the plain pods). Each repeat runs every
worker count in turn (repeat 1 of each, then repeat 2, ...), restarting both agents with
`--workers N`; after warming up (0.5 s of new connections on each path, which also makes the
pooled HBONE connections), on amesh-cross and amesh-same:

    new-conn   fresh connection + one 64-byte echo, back to back: conn/s; CPU per connection
    bulk-4     iperf3 -P 4: Gbit/s at the receiver; CPU per GB received
    rr-64B     one connection, back-to-back 64-byte round trips: p50, p99

CPU is utime+stime of both agents' process trees (the agent and its worker processes), per
node and split into the agent process itself (control plane; with one worker it carries the
data plane too) and its workers (the data plane): the workers' CPU per connection and per GB is
what one core carries, whatever the clients on this 2-core machine take.

The syscall run (one short extra measurement per worker count, and stunnel's): `perf stat`
counts the system calls of both agents' trees (or both stunnels) during an iperf3 -P 4 run and
during back-to-back new connections (bench/syscalls.py says why perf stat, not strace).

Writes bench/results/workers-<UTC time>.json and .md (not with --quick: one short repeat that
checks the harness). Without an `ameshctl agent --workers` option (before the worker processes
are merged) only --workers 1 runs, as today's single process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench import syscalls
from bench.bed import (RESULTS, iperf3, new_connections, percentile, process_tree, summary, tree_cpu,
                       utc_stamp, write_report)
from bench.echo import raise_open_files
from bench.run import SETUP_MESSAGE, Bench, Settings, Target, round_trips
from tests.bed import Bed
from tests.mesh import AMESHCTL

AGENT_FLAGS = ("--no-access-log",)
PATHS = ("amesh-cross", "amesh-same")
WARMUP_SECONDS = 0.5  # of new connections on each path after the agents (re)start
RR_SIZE = 64  # bytes per round trip
MIN_RATE_SPEEDUP = 1.6  # 2 workers' cross-node conn/s over one worker's (issue 17's target)
MAX_LATENCY_RATIO = 1.05  # 2 workers' 64-byte p50 over one worker's: no regression
DEFAULT = Settings(repeats=3, bulk_seconds=5.0, rr_seconds=3.0, conn_seconds=3.0)
QUICK = Settings(repeats=1, bulk_seconds=1.0, rr_seconds=0.5, rr_max=5_000, conn_seconds=1.0, quick=True)
SYSCALL_SECONDS = {False: 3.0, True: 1.0}  # per syscall measurement, by quick


def workers_option() -> bool:
    """This ameshctl's agent has the --workers option."""
    out = subprocess.run([AMESHCTL, "agent", "--help"], capture_output=True, text=True, timeout=60)
    return "--workers" in out.stdout


def agent_flags(workers: int, supported: bool) -> tuple[str, ...]:
    """The agents' flags for `workers` worker processes."""
    if supported:
        return (*AGENT_FLAGS, "--workers", str(workers))
    if workers != 1:
        raise SystemExit(f"ameshctl agent has no --workers option (the worker processes are not on this "
                         f"branch): cannot run {workers} workers; run with --workers 1")
    return AGENT_FLAGS  # today's single process


class WorkersBench(Bench):
    """bench.run's bed and agents, restarted with a worker count per configuration."""

    def __init__(self, bed: Bed, settings: Settings, counts: list[int], supported: bool) -> None:
        self.counts, self.supported = counts, supported
        super().__init__(bed, settings, agent_flags(counts[0], supported))
        self.workers = counts[0]

    def use(self, workers: int) -> None:
        """Restarts both agents with `workers` workers and warms their paths up."""
        self.workers, self.agent_flags = workers, agent_flags(workers, self.supported)
        self.restart_agents()
        for name in PATHS:
            path = self.paths[name]
            new_connections(self.bed, path.client, path.ip, path.echo_port, WARMUP_SECONDS, SETUP_MESSAGE)

    def agent_pids(self) -> list[int]:
        """The agents' pids, node-1's first (their workers are found under them)."""
        return [self.mesh.agents[node.name].pid for node in self.bed.nodes]

    def put(self, scenario: str, path: str, metric: str, unit: str, value: float) -> None:
        """One measured value of the worker count in use."""
        self.figures.setdefault((scenario, path, f"{self.workers}w", metric, unit), []).append(value)

    def cpu_split(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        """CPU seconds between two tree_cpu readings: per node, its agent process and its workers."""
        out = {}
        for node, root in zip(self.bed.nodes, self.agent_pids()):
            tree = set(process_tree(root)) & set(after)
            used = {pid: after[pid] - before.get(pid, 0.0) for pid in tree}
            out[f"{node.name} agent"] = used.get(root, 0.0)
            out[f"{node.name} workers"] = sum(v for pid, v in used.items() if pid != root)
        return out

    def record_cpu(self, scenario: str, path: str, split: dict[str, float], units: float, unit: str,
                   scale: float) -> float:
        """CPU per unit: in total, and per node for its agent process and for its workers."""
        total = sum(split.values()) / units * scale
        self.put(scenario, path, "CPU, both trees", unit, total)
        for part, seconds in split.items():
            self.put(scenario, path, f"CPU, {part}", unit, seconds / units * scale)
        return total

    # -- scenarios ------------------------------------------------------------------------------

    def new_conn(self, path: Target) -> str:
        """New connections back to back: conn/s, p50, CPU per connection."""
        before = tree_cpu(self.agent_pids())
        times = new_connections(self.bed, path.client, path.ip, path.echo_port, self.settings.conn_seconds,
                                SETUP_MESSAGE)
        split = self.cpu_split(before, tree_cpu(self.agent_pids()))
        rate = len(times) / self.settings.conn_seconds
        self.put("new-conn", path.name, "rate", "conn/s", rate)
        self.put("new-conn", path.name, "p50", "ms", percentile(times, 50) * 1e3)
        cpu = self.record_cpu("new-conn", path.name, split, len(times), "ms/conn", 1e3)
        return f"{rate:6.0f} conn/s  CPU {cpu:.3f} ms/conn"

    def bulk(self, path: Target) -> str:
        """iperf3 -P 4: Gbit/s, CPU per GB."""
        before = tree_cpu(self.agent_pids())
        gbps, moved = iperf3(self.bed, path.client, path.ip, path.iperf_port, self.settings.bulk_seconds, 4)
        split = self.cpu_split(before, tree_cpu(self.agent_pids()))
        self.put("bulk-4", path.name, "4 streams", "Gbit/s", gbps)
        cpu = self.record_cpu("bulk-4", path.name, split, moved / 1e9, "s/GB", 1.0)
        return f"{gbps:6.2f} Gbit/s  CPU {cpu:.3f} s/GB"

    def rr(self, path: Target) -> str:
        """64-byte round trips on one connection: p50, p99."""
        s = self.settings
        times = round_trips(self.bed, path.client, path.ip, path.echo_port, RR_SIZE, s.rr_seconds, s.rr_max)
        p50, p99 = percentile(times, 50) / 1e3, percentile(times, 99) / 1e3
        self.put("rr-64B", path.name, "p50", "µs", p50)
        self.put("rr-64B", path.name, "p99", "µs", p99)
        return f"p50 {p50:.1f} µs  p99 {p99:.1f} µs"

    def run(self) -> list[dict]:
        for repeat in range(1, self.settings.repeats + 1):
            for workers in self.counts:
                self.use(workers)
                for scenario in (self.new_conn, self.bulk, self.rr):
                    for name in PATHS:
                        line = scenario(self.paths[name])
                        print(f"  repeat {repeat} workers {workers} {scenario.__name__:8} {name:11} {line}",
                              flush=True)
        records = [{"scenario": sc, "path": path, "config": config, "metric": metric, "unit": unit,
                    **summary(values)} for (sc, path, config, metric, unit), values in self.figures.items()]
        add_ratios(records, self.counts[0])
        return records

    # -- system calls ---------------------------------------------------------------------------

    def count_syscalls(self, pids: list[int], path: Target, seconds: float) -> dict[str, dict]:
        """System calls of `pids` during a 4-stream iperf3 run and during new connections."""
        counting = syscalls.SyscallCount(pids)
        _, moved = iperf3(self.bed, path.client, path.ip, path.iperf_port, seconds, 4)
        bulk = counting.stop()
        counting = syscalls.SyscallCount(pids)
        made = len(new_connections(self.bed, path.client, path.ip, path.echo_port, seconds, SETUP_MESSAGE))
        conn = counting.stop()
        return {"bytes": moved, "connections": made, "bulk_calls": bulk, "conn_calls": conn,
                "per_gb": syscalls.rates(bulk, moved / 1e9), "per_connection": syscalls.rates(conn, made)}

    def syscall_run(self, seconds: float) -> dict[str, dict]:
        """Syscalls per GB and per connection: stunnel's pair, then amesh per worker count."""
        stunnel = self.paths["stunnel"]
        runs = {"stunnel": self.count_syscalls([p.pid for p in stunnel.proxies], stunnel, seconds)}
        for workers in self.counts:
            self.use(workers)
            pids = [p for pid in self.agent_pids() for p in process_tree(pid)]
            for name in PATHS:
                runs[f"{name} {workers}w"] = self.count_syscalls(pids, self.paths[name], seconds)
                print(f"  syscalls {name} workers {workers}: "
                      f"{runs[f'{name} {workers}w']['per_gb']['total']:,.0f} per GB, "
                      f"{runs[f'{name} {workers}w']['per_connection']['total']:,.1f} per connection", flush=True)
        return runs


def add_ratios(records: list[dict], base_workers: int) -> None:
    """vs_base: each median over the same figure's median with `base_workers` workers."""
    base = {(r["scenario"], r["path"], r["metric"]): r["median"] for r in records if r["config"] == f"{base_workers}w"}
    for r in records:
        other = base.get((r["scenario"], r["path"], r["metric"]))
        r["vs_base"] = r["median"] / other if other else None


def figures_table(records: list[dict], counts: list[int]) -> str:
    """One row per scenario, path and metric; a column per worker count and its ratio to the first."""
    configs = [f"{n}w" for n in counts]
    index = {(r["scenario"], r["path"], r["metric"], r["config"]): r for r in records}
    rows = list(dict.fromkeys((r["scenario"], r["path"], r["metric"], r["unit"]) for r in records))
    head = " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in counts)
    ratios = " | ".join(f"{c}/{configs[0]}" for c in configs[1:])
    lines = [f"| scenario | path | metric | unit | {head} |" + (f" {ratios} |" if ratios else ""),
             "|---|---|---|---|" + "---|" * (len(configs) * 2 - 1)]
    for scenario, path, metric, unit in rows:
        cells = []
        for config in configs:
            r = index.get((scenario, path, metric, config))
            cells.append("n/a" if r is None else f"{_fmt(r['median'])} ({_fmt(r['min'])}-{_fmt(r['max'])})")
        for config in configs[1:]:
            r = index.get((scenario, path, metric, config))
            cells.append("" if r is None or r["vs_base"] is None else f"{r['vs_base']:.2f}")
        lines.append(f"| {scenario} | {path} | {metric} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(records: list[dict], counts: list[int]) -> list[tuple[str, str, bool]]:
    """Issue 17's targets, where the run has both 1 and 2 workers."""
    if 1 not in counts or 2 not in counts:
        return []
    med = {(r["scenario"], r["path"], r["metric"], r["config"]): r["median"] for r in records}
    one, two = med[("new-conn", "amesh-cross", "rate", "1w")], med[("new-conn", "amesh-cross", "rate", "2w")]
    out = [(f"2 workers >= {MIN_RATE_SPEEDUP}x one worker's new conn/s cross-node",
            f"{two:.0f} vs {one:.0f} conn/s = {two / one:.2f}x", two >= MIN_RATE_SPEEDUP * one)]
    for path in PATHS:
        one, two = med[("rr-64B", path, "p50", "1w")], med[("rr-64B", path, "p50", "2w")]
        out.append((f"64-byte RR p50 with 2 workers within {MAX_LATENCY_RATIO - 1:.0%} of one worker's ({path})",
                    f"{two:.1f} vs {one:.1f} µs = {two / one:.3f}x", two <= MAX_LATENCY_RATIO * one))
    return out


def capacity(records: list[dict]) -> str:
    """What one core of workers carries, from the workers' CPU per connection and per GB (with
    one worker, the agent process is the worker): cross-node, a connection costs the source
    node's workers and the destination's; a node that is as often one as the other pays both."""
    med = {(r["scenario"], r["path"], r["metric"], r["config"]): r["median"] for r in records}
    lines = ["| workers | cross-node conn/s per core (node-1 / node-2 / both ends) | cross-node Gbit/s per core "
             "(node-1 / node-2 / both) | same-node conn/s per core | same-node Gbit/s per core |",
             "|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in records):
        part = "workers" if config != "1w" else "agent"

        def data_plane(scenario: str, path: str, node: str) -> float:
            return med.get((scenario, path, f"CPU, {node} {part}", config), 0.0)

        conn1, conn2 = data_plane("new-conn", "amesh-cross", "node-1"), data_plane("new-conn", "amesh-cross", "node-2")
        gb1, gb2 = data_plane("bulk-4", "amesh-cross", "node-1"), data_plane("bulk-4", "amesh-cross", "node-2")
        same_conn, same_gb = data_plane("new-conn", "amesh-same", "node-1"), data_plane("bulk-4", "amesh-same", "node-1")
        lines.append(f"| {config[:-1]} | {_per(1e3, conn1)} / {_per(1e3, conn2)} / {_per(1e3, conn1 + conn2)} | "
                     f"{_per(8, gb1)} / {_per(8, gb2)} / {_per(8, gb1 + gb2)} | {_per(1e3, same_conn)} | "
                     f"{_per(8, same_gb)} |")
    return "\n".join(lines)


def _per(numerator: float, cost: float) -> str:
    """numerator / cost as a rate (1000 ms / ms per connection; 8 Gbit / s per GB)."""
    return "n/a" if not cost else f"{numerator / cost:,.0f}" if numerator / cost >= 100 else f"{numerator / cost:.1f}"


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def syscall_tables(runs: dict[str, dict]) -> str:
    """The syscall run as two tables: calls per GB, calls per connection."""
    per_gb = {f"{name} per GB": run["per_gb"] for name, run in runs.items()}
    per_conn = {f"{name} per conn": run["per_connection"] for name, run in runs.items()}
    return "\n\n".join([syscalls.table(per_gb), syscalls.table(per_conn)])


def markdown(records: list[dict], counts: list[int], runs: dict[str, dict] | None) -> str:
    """Every table of the run, as printed and written to the .md file."""
    parts = [figures_table(records, counts), "CPU of the data plane per core (the workers; with 1 worker, the agent):",
             capacity(records)]
    met = targets(records, counts)
    if met:
        parts.append("\n".join(["| target | measured (medians) | met |", "|---|---|---|",
                                *(f"| {name} | {measured} | {'yes' if ok else '**no**'} |" for name, measured, ok in met)]))
    if runs:
        parts.append("System calls (perf stat, one run each):\n\n" + syscall_tables(runs))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, the first is the base (default 1,2)")
    parser.add_argument("--repeats", type=int, default=DEFAULT.repeats)
    parser.add_argument("--quick", action="store_true", help="one short repeat: checks the harness, not speed")
    parser.add_argument("--no-syscalls", action="store_true", help="skip the perf stat run")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    supported = workers_option()
    for n in counts:
        agent_flags(n, supported)  # refuse an impossible count before building the bed
    settings = QUICK if args.quick else Settings(**{**DEFAULT.__dict__, "repeats": args.repeats})
    count_syscalls = not args.no_syscalls
    if count_syscalls and not syscalls.perf_available():
        raise SystemExit(f"perf is not on PATH or {syscalls.TRACEPOINTS} is missing: install perf "
                         "(linux-perf) or run with --no-syscalls")
    raise_open_files()
    print(f"workers {counts}: {settings.repeats} repeats{' (quick: checks the harness, not speed)' if settings.quick else ''}",
          flush=True)
    started = time.monotonic()
    with Bed(nodes=2, mode="p2p") as bed:
        bench = WorkersBench(bed, settings, counts, supported)
        records = bench.run()
        runs = bench.syscall_run(SYSCALL_SECONDS[settings.quick]) if count_syscalls else None
    text = markdown(records, counts, runs)
    print(f"\n{text}")
    if not settings.quick:
        stem = RESULTS / f"workers-{utc_stamp()}"
        write_report(stem.with_suffix(".json"), records, quick=False, workers=counts, syscalls=runs,
                     settings=settings.__dict__, seconds=round(time.monotonic() - started))
        stem.with_suffix(".md").write_text(text + "\n")
        print(f"\nwritten to {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
