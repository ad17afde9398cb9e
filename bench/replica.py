"""What keeping a worker's copy of the registry costs: the deltas the agent sends its workers.

    python -m bench.replica --pods 10000 --services 2000 [--events 300] [--label NAME]

The agent's side, in this process: the cluster of bench/registry.py (pods over 100 nodes, Services
selecting them, one EndpointSlice each) goes into an IncrementalRegistry with the registrations layer
over it, as agent/node.py makes its state; the whole state is made into a delta for a new worker;
then, in turn, a pod's IP changes, a pod's readiness flips, an EndpointSlice gains an endpoint, and
after each commit the delta from the state before is made and pickled, as the channel carries it.
The worker's side, in a child process holding nothing else: it reads the pickled deltas one by one,
unpickles and applies each to its Replica (registry/replica.py). Figures: for the whole state and for
each kind of change, the time to make the delta and to pickle it, its size, the time to unpickle and
apply it; the worker's resident memory before and after the whole state; and what one full garbage
collection costs the worker with its state frozen (as Replica.apply leaves it) and not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable

from bench.registry import _ip, _rss_kib, cluster, endpoint_slice, percentile, pod
from registry.incremental import IncrementalRegistry
from registry.registrations import MergedRegistry, RegistrationStore
from registry.replica import Replica, state_delta

TREE = Path(__file__).resolve().parent.parent
KINDS = ("pod_ip", "readiness", "endpoint_added")
_LENGTH = struct.Struct("!I")  # each pickled delta in the file is preceded by its length in bytes


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def summary(values: list[float], unit: float = 1e6) -> dict[str, float]:
    """p50, p99 and max, multiplied by `unit` (1e6: seconds to microseconds)."""
    return {"p50": round(percentile(values, 0.5) * unit, 1), "p99": round(percentile(values, 0.99) * unit, 1),
            "max": round(max(values) * unit, 1)}


def agent_side(pods: int, services: int, events: int, out: IO[bytes]) -> dict[str, Any]:
    """Makes and pickles the deltas into `out`; their figures."""
    registry, merged = IncrementalRegistry(), MergedRegistry(RegistrationStore())
    for obj in cluster(pods, services):
        registry.apply(obj)
    registry.commit()
    state = merged.state(registry.state)
    whole, make = timed(lambda: state_delta(None, state))
    data, dump = timed(lambda: pickle.dumps(whole, pickle.HIGHEST_PROTOCOL))
    out.write(_LENGTH.pack(len(data)) + data)
    whole_figures = {"make_ms": round(make * 1e3, 1), "pickle_ms": round(dump * 1e3, 1), "bytes": len(data)}
    figures: dict[str, dict[str, list[float]]] = {kind: {"make": [], "pickle": [], "bytes": []} for kind in KINDS}
    slices_extra: dict[int, list[str]] = {}
    for n in range(events):
        i = (n * 7919) % pods  # spread over nodes and Services, as bench/registry.py
        s, kind = i % services, KINDS[n % 3]
        if kind == "pod_ip":
            change = pod(i, services, ip=_ip(200, n))
        elif kind == "readiness":
            change = pod(i, services, ready=False)
        else:
            slices_extra.setdefault(s, []).append(_ip(210, n))
            change = endpoint_slice(s, list(range(s, pods, services)), slices_extra[s])
        registry.apply(change)
        registry.commit()
        before, state = state, merged.state(registry.state)
        delta, make = timed(lambda: state_delta(before, state))
        data, dump = timed(lambda: pickle.dumps(delta, pickle.HIGHEST_PROTOCOL))
        out.write(_LENGTH.pack(len(data)) + data)
        for name, value in (("make", make), ("pickle", dump), ("bytes", len(data))):
            figures[kind][name].append(value)
    return {"whole_state": whole_figures,
            "one_change": {kind: {"make_us": summary(values["make"]), "pickle_us": summary(values["pickle"]),
                                  "bytes": summary(values["bytes"], 1), "n": len(values["make"])}
                           for kind, values in figures.items()},
            "workloads": state.workload_count}


def worker_side(path: str) -> dict[str, Any]:
    """Applies the deltas of the file at `path` to a new Replica, as a worker process would."""
    rss_start = _rss_kib_self()
    replica = Replica()
    times: dict[str, list[float]] = {kind: [] for kind in ("whole", *KINDS)}
    unpickle: dict[str, list[float]] = {kind: [] for kind in times}
    with open(path, "rb") as deltas:
        n = -1
        while header := deltas.read(_LENGTH.size):
            data = deltas.read(_LENGTH.unpack(header)[0])
            kind = "whole" if n < 0 else KINDS[n % 3]
            delta, load = timed(lambda: pickle.loads(data))
            del data
            _, apply = timed(lambda: replica.apply(delta))
            del delta
            times[kind].append(apply)
            unpickle[kind].append(load)
            if n < 0:
                rss_whole = _rss_kib_self()
            n += 1
    _, frozen = timed(gc.collect)
    gc.unfreeze()
    _, unfrozen = timed(gc.collect)
    [whole_apply], [whole_load] = times.pop("whole"), unpickle.pop("whole")
    return {"whole_state": {"unpickle_ms": round(whole_load * 1e3, 1), "apply_ms": round(whole_apply * 1e3, 1)},
            "one_change": {kind: {"unpickle_us": summary(unpickle[kind]), "apply_us": summary(times[kind])}
                           for kind in KINDS},
            "rss_start_mib": round(rss_start / 1024, 1), "rss_after_whole_state_mib": round(rss_whole / 1024, 1),
            "rss_end_mib": round(_rss_kib_self() / 1024, 1),
            "full_collection_ms": {"state_frozen": round(frozen * 1e3, 1), "not_frozen": round(unfrozen * 1e3, 1)},
            "workloads": replica.state.workload_count}


def _rss_kib_self() -> int:
    return _rss_kib(os.getpid())


def run(pods: int, services: int, events: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="amesh-deltas-") as out:
        agent = agent_side(pods, services, events, out)
        out.flush()
        worker = json.loads(subprocess.run([sys.executable, "-m", "bench.replica", "--worker", out.name], cwd=TREE,
                                           check=True, capture_output=True, text=True).stdout)
    assert worker.pop("workloads") == agent.pop("workloads"), "the worker's replica lacks workloads"
    return {"pods": pods, "services": services, "events": events, "agent": agent, "worker": worker}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--services", type=int, default=2_000)
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--label", default="", help="a name for the run in the results")
    p.add_argument("--out", type=Path, default=TREE / "bench" / "results", help="where the JSON result goes")
    p.add_argument("--worker", metavar="DELTAS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_side(args.worker)))
        return 0
    text = json.dumps({"label": args.label, **run(args.pods, args.services, args.events)}, indent=2) + "\n"
    path = args.out / f"replica-{args.pods}-{args.services}{'-' + args.label if args.label else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
