"""The hostile suite's bed, shared by the tests of one module, and the per-test checks around it.

Bed: two point-to-point nodes, an agent on each. Namespace "shop" is enrolled: client (sa client)
and server-a (sa web) on node-1, server-b (sa web) on node-2, both servers running
tests.podserver on 8080. Namespace "legacy" is not enrolled: pod "attacker" on node-1, the
hostile pod. Service shop/billing 10.96.0.30:80 selects no pod (the registration tests' bait).

`target` (per test) gives the test a `Target`: agents that are up (restarted when the previous
test failed or an agent died), a canary running from client through node-1's and node-2's agents
to server-b, and each agent's descriptors and memory as they were before the attack. The test
attacks, puts what it measured into `figures`, then hands its expectations to `Target.settled`,
which adds what must hold after any attack and fails naming every problem found.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import pytest

from tests.attacker import Canary, Vitals, mesh_client_context, wait_fds_at_most
from tests.bed import Bed, BedError, Node
from tests.mesh import Mesh, ServiceSpec

TARGET_PORT = 8080  # every server pod's tests.podserver
BAIT_SERVICE_IP = "10.96.0.30"
ATTACKER_IDENTITY = "spiffe://cluster.local/ns/legacy/sa/default"  # signed by the mesh CA
FD_SLACK = 4  # descriptors an agent may hold above its baseline once an attack is over
SETTLE_TIMEOUT = 2.0  # seconds for descriptors to come back after an attack (the bound)
CANARY_STALL_LIMIT = 1.0  # seconds any canary exchange may wait during an attack that is not a flood
FIGURES_ENV = "HOSTILE_FIGURES"  # a file each test appends its measured figures to, as JSON lines
UNRETRIEVED = "Task exception was never retrieved"


@dataclass
class Target:
    """The shared bed between tests: agents, canary, baselines."""

    mesh: Mesh
    dirty: bool = False  # restart the agents before the next test
    canary: Canary | None = None
    baseline: dict[str, Vitals] = field(default_factory=dict)  # node name -> before the attack
    log_offsets: dict[str, int] = field(default_factory=dict)  # node name -> agent log size before
    live_records: dict[str, int] = field(default_factory=dict)  # node name -> live connections before (the canary's)
    started: float = 0.0  # monotonic, when the attack could begin

    @property
    def bed(self) -> Bed:
        return self.mesh.bed

    def pid(self, node: Node | int | str) -> int:
        return self.mesh.agents[self.bed.node(node).name].pid

    def vitals(self, node: Node | int | str) -> Vitals:
        return Vitals.of(self.pid(node))

    def live(self, node: Node | int | str) -> int:
        """Connection records the node's ztunnel holds as live (connecting or open)."""
        return sum(1 for c in self.mesh.ctl_json(node, "connections") if c["state"] in ("connecting", "open"))

    def context(self, identity: str = ATTACKER_IDENTITY) -> ssl.SSLContext:
        """An mTLS client context with a valid mesh certificate, as a compromised node holds."""
        return mesh_client_context(self.mesh.ca_dir, identity)

    def prepare(self) -> None:
        """Agents up (restarted if the last test failed or one died) and a canary running; then
        the baselines. A canary that cannot start gets the agents restarted once more."""
        agents = self.mesh.agents
        if self.dirty or any(proc.poll() is not None for proc in agents.values()) or len(agents) < 2:
            self._restart_agents()
        try:
            self.canary = self._start_canary()
        except AssertionError:
            self._restart_agents()
            self.canary = self._start_canary()
        for node in self.bed.nodes:
            self.baseline[node.name] = self.vitals(node)
            self.live_records[node.name] = self.live(node)
            self.log_offsets[node.name] = self.mesh.agent_log(node).stat().st_size
        self.started = time.monotonic()

    def _restart_agents(self) -> None:
        for node in self.bed.nodes:
            if node.name in self.mesh.agents:
                self.mesh.stop_agent(node)
        for node in self.bed.nodes:
            self.mesh.start_agent(node)
        self.dirty = False

    def _start_canary(self) -> Canary:
        return Canary.start(self.bed, self.bed.pods["client"], self.bed.pods["server-b"].ip, TARGET_PORT)

    def finish(self, failed: bool) -> None:
        if self.canary is not None:
            self.bed.stop(self.canary.proc)
            self.canary = None
        if failed:
            self.dirty = True
            self.mesh.print_logs()

    def log_since_start(self, node: Node | int | str) -> bytes:
        """What the node's agent wrote (stdout and stderr: access log and its own log) in this test."""
        path = self.mesh.agent_log(node)
        with path.open("rb") as f:
            f.seek(self.log_offsets[self.bed.node(node).name])
            return f.read()

    def settled(self, node: Node | int | str, figures: dict, expected: Mapping[str, bool] | None = None, *,
                stall_limit: float = CANARY_STALL_LIMIT, fd_timeout: float = SETTLE_TIMEOUT) -> None:
        """Fails with every problem at once: each message of `expected` whose check is False (what
        the attack itself must cause), then what must hold after any attack on `node`'s agent: it
        runs, its descriptors and live connection records are back to the baseline within
        `fd_timeout`, the canary never broke nor waited over `stall_limit`, no task exception went
        unretrieved. Figures go in `figures`."""
        problems = [message for message, held in (expected or {}).items() if not held]
        name = self.bed.node(node).name
        proc = self.mesh.agents[name]
        if proc.poll() is not None:
            problems.append(f"the agent on {name} died (exit {proc.returncode}) during the attack")
            assert not problems, "\n".join(problems)
        base = self.baseline[name]
        back, fds, waited = wait_fds_at_most(proc.pid, base.fds + FD_SLACK, fd_timeout)
        now = self.vitals(node)
        assert self.canary is not None
        figures.update(fds_baseline=base.fds, fds_after=fds, fds_settle_s=round(waited, 2),
                       rss_growth_mib=round((now.rss_kib - base.rss_kib) / 1024, 1),
                       agent_cpu_s=round(now.cpu_s - base.cpu_s, 2),
                       canary_longest_wait_ms=round(self.canary.longest_wait(self.started) * 1000, 1),
                       canary_error=self.canary.error())
        if not back:
            problems.append(f"{name}'s agent holds {fds} descriptors {fd_timeout}s after the attack "
                            f"(baseline {base.fds})")
        # every connection the attack made ended its record: only the canary's stay live
        deadline = time.monotonic() + fd_timeout
        while (live := self.live(node)) > self.live_records[name] and time.monotonic() < deadline:
            time.sleep(0.05)
        figures["live_records_after"] = live
        if live > self.live_records[name]:
            problems.append(f"{name}'s ztunnel still holds {live} live connection records "
                            f"(before the attack {self.live_records[name]})")
        if figures["canary_error"] is not None:
            problems.append(f"the canary through the mesh broke: {figures['canary_error']}")
        if figures["canary_longest_wait_ms"] > stall_limit * 1000:
            problems.append(f"the canary waited {figures['canary_longest_wait_ms']} ms "
                            f"(limit {stall_limit * 1000:.0f} ms)")
        if UNRETRIEVED.encode() in self.log_since_start(node):
            problems.append(f'"{UNRETRIEVED}" in {name}\'s agent log')
        assert not problems, "\n".join(problems)


def build_mesh(bed: Bed) -> Mesh:
    """The bed's pods, the registry file and both agents (see the module docstring)."""
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=TARGET_PORT)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("server-a", 1, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("attacker", 1, namespace="legacy", labels={"app": "attacker"})
    mesh.services.append(ServiceSpec("billing", "shop", BAIT_SERVICE_IP, 80, TARGET_PORT, {"app": "billing"}))
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], TARGET_PORT)
    mesh.write_registry()
    return mesh


@pytest.fixture(scope="module")
def shared() -> Iterator[Target]:
    """One bed and mesh for the tests of a module, closed after them, pass or fail."""
    bed = Bed(2, "p2p")
    try:
        yield Target(build_mesh(bed))
    finally:
        try:
            bed.close()
        except BedError as e:
            pytest.fail(f"test bed teardown failed: {e}", pytrace=False)


_CALL_FAILED = pytest.StashKey[bool]()  # on each test item: whether the test itself failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Notes each test's outcome, so its fixtures know whether to restart the agents."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def target(shared: Target, request: pytest.FixtureRequest) -> Iterator[Target]:
    """The shared bed, its agents up and a canary running, baselines taken (see the docstring)."""
    shared.prepare()
    yield shared
    shared.finish(failed=request.node.stash.get(_CALL_FAILED, True))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict]:
    """What the test measured: printed after it, and appended to $HOSTILE_FIGURES, pass or fail."""
    measured: dict = {}
    yield measured
    line = {"test": request.node.name, "failed": request.node.stash.get(_CALL_FAILED, True), **measured}
    print("figures:", json.dumps(line))
    if path := os.environ.get(FIGURES_ENV):
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
