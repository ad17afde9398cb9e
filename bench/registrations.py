"""What a registration costs the agent: the worst event-loop stall and the CPU per admin API
call while registrations come, beat and go at an agent that already holds thousands.

    python -m bench.registrations [--before REV] [--count 10000] [--measured 300] [--rounds 2]

Each run starts a real agent's admin API (NodeAgent + AdminServer, no BPF) in its own process,
with a registry file of one Service, and fills it with `count` - `measured` registrations
(100 names of 100 instances) made in-process. Then this process registers the last `measured`
ones one after another over HTTP, sends each a heartbeat and deregisters it, while the agent's
loop plays the connections: a task that every 1 ms reads the agent's state and looks a Service
up, as each captured connection does. Its lateness is the stall every connection on the node
would see; its lateness over 2 s before the calls ("idle") is the machine's own noise. "State
CPU" is the most CPU spent in one read of the agent's state or one application of a
registration change. The code at REV (default: where this branch left main, as `git archive`
gives it) and this tree's run interleaved, `rounds` times each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent
PORT = 15990  # the admin API of the agent under test, on 127.0.0.1
SERVICE_IP = "10.96.0.30"
REGISTRY = f"""\
apiVersion: v1
kind: Service
metadata: {{name: svc-0, namespace: shop}}
spec: {{clusterIP: {SERVICE_IP}, ports: [{{port: 80, targetPort: 8080}}]}}
"""
TICK = 0.001  # seconds between the stand-in connections' state reads
IDLE = 2.0  # seconds measured before the calls start


def spec(i: int) -> dict:
    """Registration number `i`: 100 names, each with instances at distinct addresses."""
    return {"name": f"svc-{i % 100}", "namespace": "shop", "address": f"10.1.{i // 250}.{i % 250 + 1}",
            "port": 8080, "ttl": "1h"}


def calls(count: int, measured: int) -> list[tuple[str, str, str | None, int]]:
    """The measured admin API calls: (method, path, body, expected status)."""
    last = [spec(i) for i in range(count - measured, count)]
    instance = "/registrations/shop/{name}{action}?instance={address}:{port}"
    return ([("POST", "/registrations", json.dumps(s), 201) for s in last]
            + [("POST", instance.format(action="/heartbeat", **s), None, 200) for s in last]
            + [("DELETE", instance.format(action="", **s), None, 200) for s in last])


async def serve(count: int, measured: int, workdir: Path) -> None:
    """The agent side: preloads, serves, and prints its figures when stdin says stop."""
    from agent.admin import AdminServer  # from the tree on sys.path[0]
    from agent.config import AgentConfig
    from agent.node import NodeAgent

    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    agent = NodeAgent(AgentConfig(node="node-1", registry_file=registry, ca_dir=workdir / "ca", admin_port=PORT))
    agent.registry.load()
    for i in range(count - measured):
        agent.registrations.register(spec(i))
    agent.state.service_by_ip(SERVICE_IP)  # the preload applied before measuring
    admin = AdminServer(agent)
    await admin.start(PORT)
    gc.collect()
    gc.freeze()  # as the agent does once started
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    # seconds: each tick's lateness (wall clock); the CPU of each state read or registration
    # change applied (thread time: what the registry code costs, without the machine's preemptions)
    stalls, state_work = [], []
    apply_change = agent.registrations_changed

    def timed_apply_change() -> None:  # where the code after the change applies it (before: at the next read)
        start = time.thread_time()
        apply_change()
        state_work.append(time.thread_time() - start)

    agent.registrations_changed = timed_apply_change

    async def connections() -> None:
        while True:
            start, cpu_start = time.perf_counter(), time.thread_time()
            agent.state.service_by_ip(SERVICE_IP)
            state_work.append(time.thread_time() - cpu_start)
            await asyncio.sleep(TICK)
            stalls.append(time.perf_counter() - start - TICK)

    ticker = asyncio.create_task(connections())
    await asyncio.sleep(IDLE)  # the machine's own noise: the stalls of an agent nobody calls
    idle = max(stalls)
    stalls.clear()
    state_work.clear()
    cpu = time.process_time()
    print("ready", flush=True)
    await stdin.readline()
    cpu = time.process_time() - cpu
    ticker.cancel()
    await admin.stop()
    stalls.sort()
    print(json.dumps({"idle_stall_max_ms": idle * 1e3, "stall_max_ms": stalls[-1] * 1e3,
                      "stall_p99_ms": stalls[len(stalls) * 99 // 100] * 1e3,
                      "state_cpu_max_ms": max(state_work) * 1e3, "cpu_ms": cpu * 1e3,
                      "agent": sys.modules["agent.node"].__file__}), flush=True)


def run(tree: Path, count: int, measured: int) -> dict:
    """One run against the agent code in `tree`: its figures and the client's."""
    with tempfile.TemporaryDirectory() as workdir:
        agent = subprocess.Popen([sys.executable, "-m", "bench.registrations", "--serve", str(tree), workdir,
                                  str(count), str(measured)], cwd=TREE, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert agent.stdout.readline().strip() == "ready"
            client = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
            latencies = []
            for method, path, body, status in calls(count, measured):
                start = time.perf_counter()
                client.request(method, path, body, {"Content-Type": "application/json"})
                response = client.getresponse()
                response.read()
                latencies.append(time.perf_counter() - start)
                assert response.status == status, (method, path, response.status)
            agent.stdin.write("stop\n")
            agent.stdin.flush()
            figures = json.loads(agent.stdout.readline())
        finally:
            agent.kill()  # our own child, by its handle
            agent.wait()
    return {**figures, "latency_mean_ms": sum(latencies) / len(latencies) * 1e3,
            "cpu_per_call_ms": figures["cpu_ms"] / len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="the git revision to compare with (default: where this branch left main)")
    parser.add_argument("--count", type=int, default=10_000, help="registrations the agent ends with")
    parser.add_argument("--measured", type=int, default=300, help="the last ones, made over HTTP and measured")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # TREE WORKDIR COUNT MEASURED: the agent side
    args = parser.parse_args()
    if args.serve:
        tree, workdir, count, measured = args.serve
        sys.path.insert(0, tree)
        import uvloop  # the agent's default event loop
        uvloop.run(serve(int(count), int(measured), Path(workdir)))
        return
    revision = args.before or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=TREE, check=True,
                                             capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(["git", "archive", revision, "agent", "registry", "ztunnel", "bpf"],
                                 cwd=TREE, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        print(f"{args.measured} registrations, then a heartbeat and a deregistration of each, over HTTP into an "
              f"agent holding {args.count - args.measured}")
        print(f"{'code':<8} {'idle stall max':>14} {'stall max':>10} {'stall p99':>10} {'state CPU max':>15} "
              f"{'CPU/call':>17} "
              f"{'latency mean':>13}")
        for _ in range(args.rounds):
            for name, tree in ((revision[:8], Path(before)), ("this", TREE)):
                f = run(tree, args.count, args.measured)
                assert f["agent"].startswith(str(tree)), f["agent"]
                print(f"{name:<8} {f['idle_stall_max_ms']:>12.2f}ms {f['stall_max_ms']:>8.2f}ms "
                      f"{f['stall_p99_ms']:>8.2f}ms "
                      f"{f['state_cpu_max_ms']:>13.2f}ms {f['cpu_per_call_ms']:>15.3f}ms "
                      f"{f['latency_mean_ms']:>11.3f}ms", flush=True)


if __name__ == "__main__":
    main()
