"""What a cluster's registry costs one agent: the time to a complete registry, the memory it
holds, the delay from an API change to the agent's routing following it, and the API requests.

    python -m bench.registry --pods 10000 --services 2000 [--events 1000] [--tree DIR] [--label NAME]

The test API server (tests/kubeapi.py, in this process) serves `pods` pods spread over 100 nodes
(node-0, the measured agent's node, has 1 in 100), `services` Services in 20 namespaces, each
selecting its pods, and one EndpointSlice per Service listing them. One agent (agent.node.NodeAgent
with its Kubernetes source and registrations layer, no BPF: what routing reads) runs in its own
process from the code in `tree` (default: this one; `git archive main` gives the "before") and
reports, from its own view, when each expected effect is in the state routing reads: this process
announces an expectation on the agent's stdin ("pod shop-3/pod-17 has IP 10.200.0.4"), makes the
change in the API server, and the agent, after each state it publishes, prints the monotonic time
it first sees the effect. The clock is the machine's CLOCK_MONOTONIC, shared by both processes.

Events, in turn: a pod's IP changes, a pod's readiness flips, an EndpointSlice gains an endpoint.
Half the changed pods are on the measured node's neighbours, one in 100 on the node itself.
Figures: start to complete registry (the agent process started to its first state with every
pod and Service), the agent's resident memory after sync (and before its source started), the
delay p50/p99/max over the events, and the requests the agent made of the API server by verb.
With the time to complete, the CPU spent until then by the agent process and by the test API
server (a thread of this process), which share the machine's cores: on a busy machine the wall
time says more about the other work than about either.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TREE = Path(__file__).resolve().parent.parent
NODES = 100
NAMESPACES = 20
NODE = "node-0"  # the measured agent's node
EFFECT_TIMEOUT = 30.0  # seconds an effect may take before the run fails


def _ip(base: int, i: int) -> str:
    return f"10.{base + i // 65536}.{i // 256 % 256}.{i % 256}"


def pod(i: int, services: int, ip: str | None = None, ready: bool = True) -> dict[str, Any]:
    """Pod `i`: behind Service i % services, on node i % 100."""
    s = i % services
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": f"ns-{s % NAMESPACES}",
                         "labels": {"app": f"svc-{s}", "pod-template-hash": "5d8f7c9b6"}},
            "spec": {"nodeName": f"node-{i % NODES}", "serviceAccountName": f"sa-{s % 50}",
                     "containers": [{"name": "app", "image": "registry.example/app:1.0",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip or _ip(16, i), "hostIP": f"192.168.0.{i % NODES + 1}",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def service(s: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{s}", "namespace": f"ns-{s % NAMESPACES}"},
            "spec": {"clusterIP": _ip(96, s), "selector": {"app": f"svc-{s}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def endpoint(i: int, ip: str | None = None) -> dict[str, Any]:
    return {"addresses": [ip or _ip(16, i)], "conditions": {"ready": True}, "nodeName": f"node-{i % NODES}",
            "targetRef": {"kind": "Pod", "name": f"pod-{i}", "namespace": f"ns-{i % NAMESPACES}"}}


def endpoint_slice(s: int, members: list[int], extra: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"svc-{s}-abcde", "namespace": f"ns-{s % NAMESPACES}",
                         "labels": {"kubernetes.io/service-name": f"svc-{s}"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [endpoint(i) for i in members] + [endpoint(0, ip) for ip in extra]}


def cluster(pods: int, services: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": f"ns-{n}", "labels": {"amesh.io/dataplane-mode": "ambient"}}} for n in range(NAMESPACES)]
    objects.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    objects += (pod(i, services) for i in range(pods))
    objects += (service(s) for s in range(services))
    objects += (endpoint_slice(s, list(range(s, pods, services))) for s in range(services))
    return objects


# --- the agent side (its own process) ---


def serve_agent(tree: str, kubeconfig: str, workdir: str) -> None:
    """Runs the agent's registry and reports sync, memory and each expected effect on stdout."""
    sys.path.insert(0, tree)
    import asyncio
    import gc

    import logging

    from agent.config import AgentConfig
    from agent.node import NodeAgent

    logging.basicConfig(level=os.environ.get("BENCH_AGENT_LOG", "WARNING"), stream=sys.stderr)

    async def main() -> None:
        agent = NodeAgent(AgentConfig(node=NODE, kubeconfig=kubeconfig, ca_dir=Path(workdir) / "ca"))
        source = agent.registry
        expected: dict[str, tuple[str, str, str, Any]] = {}  # id -> (what, key, field, value)
        published = source._on_state
        rss_before = _rss_kib(os.getpid())

        def effect(what: str, key: str, field: str, value: Any) -> bool:
            state = agent.state  # what routing reads: the source's state and the registrations
            if what == "pod":
                w = state.workload_by_key(key)
                return w is not None and getattr(w, field) == value
            s = state.service_by_key(key)
            return s is not None and any(e.ip == value for e in s.endpoints)

        def on_state(state: Any) -> None:
            published(state)
            now = time.monotonic()
            # (the code before the incremental registry has no workload_count: it counts its tuples)
            counts = (getattr(state, "workload_count", None) or len(state.workloads),
                      getattr(state, "service_count", None) or len(state.services))
            if not synced and counts[0] >= want[0] and counts[1] >= want[1]:
                synced.append(now)
                print(json.dumps({"synced": now, "source_started": source_started, "generation": state.generation,
                                  "cpu_s": time.process_time(), "source_cpu_s": time.process_time() - source_cpu}),
                      flush=True)
            for ident, expectation in list(expected.items()):
                if effect(*expectation):
                    del expected[ident]
                    print(json.dumps({"applied": ident, "at": now}), flush=True)

        synced: list[float] = []
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        want = [int(x) for x in (await stdin.readline()).split()]
        source._on_state = on_state
        source_started, source_cpu = time.monotonic(), time.process_time()
        task = asyncio.create_task(source.run())
        while True:
            line = (await stdin.readline()).decode()
            if not line or line.strip() == "stop":
                break
            command = json.loads(line)
            if command.get("rss"):
                gc.collect()
                print(json.dumps({"rss_kib": _rss_kib(os.getpid()), "rss_before_source_kib": rss_before,
                                  "agent": sys.modules["registry.kubernetes"].__file__}), flush=True)
                continue
            expected[command["id"]] = (command["what"], command["key"], command["field"], command["value"])
            print(json.dumps({"expecting": command["id"]}), flush=True)
        task.cancel()

    asyncio.run(main())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- this side: the API server and the changes ---


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(pods: int, services: int, events: int, tree: Path) -> dict[str, Any]:
    sys.path.insert(0, str(TREE))
    from tests.kubeapi import KubeAPIServer

    objects = cluster(pods, services)
    with KubeAPIServer(objects=objects, bookmark_interval=60.0) as api, tempfile.TemporaryDirectory() as workdir:
        kubeconfig = Path(workdir) / "kubeconfig"
        api.write_kubeconfig(kubeconfig)
        before = api.requests
        started, server_cpu = time.monotonic(), time.process_time()  # this process: the API server's thread
        agent = subprocess.Popen([sys.executable, "-m", "bench.registry", "--agent", str(tree), str(kubeconfig),
                                  workdir], cwd=TREE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert agent.stdin is not None and agent.stdout is not None

            def send(message: object) -> dict[str, Any]:
                agent.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")  # type: ignore
                agent.stdin.flush()  # type: ignore[union-attr]
                return json.loads(agent.stdout.readline())  # type: ignore[union-attr]

            sync = send(f"{pods} {services}")
            synced, server_cpu = sync["synced"], time.process_time() - server_cpu
            time.sleep(1.0)
            memory = send({"rss": True})
            delays: dict[str, list[float]] = {"pod_ip": [], "readiness": [], "endpoint_added": []}
            slices_extra: dict[int, list[str]] = {}
            for n in range(events):
                i = (n * 7919) % pods  # spread over nodes and Services
                s = i % services
                key = f"ns-{s % NAMESPACES}/pod-{i}"
                kind = ("pod_ip", "readiness", "endpoint_added")[n % 3]
                if kind == "pod_ip":
                    ip = _ip(200, n)
                    expectation, change = ("pod", key, "ip", ip), pod(i, services, ip=ip)
                elif kind == "readiness":
                    expectation, change = ("pod", key, "ready", False), pod(i, services, ready=False)
                else:
                    ip = _ip(210, n)
                    slices_extra.setdefault(s, []).append(ip)
                    expectation = ("service", f"ns-{s % NAMESPACES}/svc-{s}", "endpoints", ip)
                    change = endpoint_slice(s, list(range(s, pods, services)), slices_extra[s])
                what, obj_key, field, value = expectation
                assert send({"id": n, "what": what, "key": obj_key, "field": field, "value": value})["expecting"] == n
                at = time.monotonic()
                api.apply(change)
                answer = json.loads(agent.stdout.readline())
                assert answer.get("applied") == n, answer
                delays[kind].append(answer["at"] - at)
                if kind != "pod_ip":  # back as it was, not measured, so the next change of it is a change
                    api.apply(pod(i, services) if kind == "readiness" else change)
            after = api.requests
            agent.stdin.write("stop\n")
            agent.stdin.flush()
        finally:
            agent.kill()  # our own child, by its handle
            agent.wait()
    every = [d for values in delays.values() for d in values]
    requests = {verb: after.get(verb, 0) - before.get(verb, 0) for verb in sorted(set(after) | set(before))}
    return {"pods": pods, "services": services, "events": len(every), "code": str(tree),
            "complete_registry_s": round(synced - started, 3),
            "source_start_to_complete_s": round(synced - sync["source_started"], 3),
            "agent_cpu_to_complete_s": round(sync["cpu_s"], 3),  # Python's start and imports included
            "source_cpu_to_complete_s": round(sync["source_cpu_s"], 3),
            "api_server_cpu_to_complete_s": round(server_cpu, 3),  # the test API server's, in this process
            "rss_after_sync_mib": round(memory["rss_kib"] / 1024, 1),
            "rss_before_source_mib": round(memory["rss_before_source_kib"] / 1024, 1),
            "effect_ms": {name: _summary(values) for name, values in [("all", every), *delays.items()] if values},
            "api_requests_by_verb": requests}


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5) * 1e3, 2), "p99": round(percentile(values, 0.99) * 1e3, 2),
            "max": round(max(values) * 1e3, 2), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--services", type=int, default=2_000)
    p.add_argument("--events", type=int, default=1_000)
    p.add_argument("--tree", type=Path, default=TREE, help="the agent code to measure (default: this tree)")
    p.add_argument("--label", default="", help="a name for the run in the results (e.g. before, after)")
    p.add_argument("--out", type=Path, default=TREE / "bench" / "results", help="where the JSON result goes")
    p.add_argument("--agent", nargs=3, metavar=("TREE", "KUBECONFIG", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.agent:
        serve_agent(*args.agent)
        return 0
    result = {"label": args.label, **run(args.pods, args.services, args.events, args.tree.resolve())}
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"registry-{args.pods}-{args.services}{'-' + args.label if args.label else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
