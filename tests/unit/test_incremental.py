"""The incremental registry (registry/incremental.py) against a from-scratch rebuild.

After every event of a random sequence (pods added, deleted, moved, relabelled, made ready or not,
finished; Services and their selectors; EndpointSlices; Namespaces enrolled and not; this node's
zone; policies, DestinationRules and splits; WorkloadEntries added, deleted, moved, relabelled,
heartbeating or not, Healthy or not, with a TTL or not, and the clock moving on so that their
heartbeats lapse; now and then a malformed object) the incremental state must equal `build_state`
of the same objects with each object it rejects skipped, as the Kubernetes source rebuilt it
before, both judging entries' health by the same heartbeats at the same time.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from registry.incremental import TERMINAL_PHASES, IncrementalRegistry, IncrementalState
from registry.kubefile import build_state
from registry.model import ENROLL_LABEL, RegistryError, RegistryState
from registry.objects import CLUSTER_SCOPED
from registry.workloadentries import TTL_ANNOTATION, Heartbeats, healthy_status
from tests.unit.clock import Clock

NAMESPACES = ("shop", "pay", "ops")
NODES = ("node-a", "node-b", "node-c")
ZONES = {"node-a": "zone-1", "node-b": "zone-2", "node-c": "zone-1"}
SERVICES = ("web", "api", "db", "cache")
APPS = ("web", "api", "db")

Key = tuple[str, str, str]


def _key(obj: dict[str, Any]) -> Key:
    kind, meta = obj["kind"], obj["metadata"]
    return (kind, "" if kind in CLUSTER_SCOPED else meta.get("namespace", "default"), meta["name"])


class World:
    """The cluster's objects in the order the API server's cache keeps them, and random changes."""

    def __init__(self, rng: random.Random, clock: Clock) -> None:
        self.rng = rng
        self.clock = clock
        self.objects: dict[Key, dict[str, Any]] = {}

    def event(self) -> tuple[str, dict[str, Any]]:
        """One random change: ("apply", object), ("delete", object), or ("tick", {}): time passes."""
        rng = self.rng
        if rng.random() < 0.05:
            self.clock.now += rng.uniform(0.0, 4.0)  # seconds: TTLs of 2-10 s lapse now and then
            return "tick", {}
        maker = rng.choice([self.pod] * 8 + [self.endpoint_slice] * 4 + [self.service] * 2 + [self.entry] * 3 +
                           [self.namespace, self.node, self.policy, self.rule])
        obj = maker()
        key = _key(obj)
        if key in self.objects and rng.random() < 0.15:
            return "delete", self.objects.pop(key)
        if rng.random() < 0.02:  # malformed: rejected one by one
            obj = {**obj, "metadata": {**obj["metadata"], "labels": {"bad": 7}}}
        self.objects[key] = obj
        return "apply", obj

    def pod(self) -> dict[str, Any]:
        rng = self.rng
        labels = {"app": rng.choice(APPS)}
        if rng.random() < 0.1:
            labels[ENROLL_LABEL] = rng.choice(("none", "ambient"))
        status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": rng.choice(("True", "False"))}]}
        spec: dict[str, Any] = {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
                                "serviceAccountName": rng.choice(("", "web", "api"))}
        if rng.random() < 0.9:
            spec["nodeName"] = rng.choice(NODES)
            status["podIP"] = f"10.1.0.{rng.randrange(1, 250)}"  # now and then two pods collide on one
        if rng.random() < 0.05:
            status["phase"] = rng.choice(TERMINAL_PHASES)
        return {"apiVersion": "v1", "kind": "Pod", "spec": spec, "status": status,
                "metadata": {"name": f"pod-{rng.randrange(12)}", "namespace": rng.choice(NAMESPACES),
                             "labels": labels}}

    def entry(self) -> dict[str, Any]:
        """A WorkloadEntry: its heartbeat fresh, old or absent; Healthy or not; with a TTL or not."""
        rng = self.rng
        # now and then a pod's range (a collision, one of them refused), now and then malformed
        address = rng.choices((f"10.2.0.{rng.randrange(1, 250)}", f"10.1.0.{rng.randrange(1, 250)}", "vm.example"),
                              (0.87, 0.1, 0.03))[0]
        spec = {"address": address, "ports": {"http": rng.choice((8080, 9090))},
                "labels": {"app": rng.choice(APPS)}, "serviceAccount": rng.choice(("vm", "web"))}
        metadata: dict[str, Any] = {"name": f"vm-{rng.randrange(6)}", "namespace": rng.choice(NAMESPACES)}
        if rng.random() < 0.6:
            metadata["annotations"] = {TTL_ANNOTATION: f"{rng.choice((2, 5, 10))}s"}
        entry = {"apiVersion": rng.choice(("networking.istio.io/v1", "networking.istio.io/v1beta1")),
                 "kind": "WorkloadEntry", "metadata": metadata, "spec": spec}
        if rng.random() < 0.8:  # a heartbeat now, a little while ago, or long ago (a client that died)
            probed = self.clock.now - rng.choice((0.0, 0.0, 1.5, 60.0))
            entry["status"] = healthy_status(probed, healthy=rng.random() < 0.85)["status"]
        return entry

    def service(self) -> dict[str, Any]:
        rng = self.rng
        index, namespace = rng.randrange(len(SERVICES)), rng.choice(NAMESPACES)
        target: Any = rng.choice(("http", 8080, 9090))
        spec: dict[str, Any] = {"clusterIP": f"10.96.{NAMESPACES.index(namespace)}.{index + 1}",
                                "ports": [{"name": "http", "port": 80, "targetPort": target}]}
        if rng.random() < 0.8:
            spec["selector"] = {"app": rng.choice(APPS)}
        if rng.random() < 0.2:
            spec["trafficDistribution"] = "PreferClose"
        return {"apiVersion": "v1", "kind": "Service", "spec": spec,
                "metadata": {"name": SERVICES[index], "namespace": namespace}}

    def endpoint_slice(self) -> dict[str, Any]:
        rng = self.rng
        service, namespace = rng.choice(SERVICES), rng.choice(NAMESPACES)
        endpoints = []
        for _ in range(rng.randrange(4)):
            node, pod = rng.choice(NODES), rng.randrange(12)
            endpoint: dict[str, Any] = {"addresses": [f"10.1.0.{rng.randrange(1, 250)}"], "nodeName": node,
                                        "conditions": {"ready": rng.random() < 0.8},
                                        "targetRef": {"kind": "Pod", "name": f"pod-{pod}", "namespace": namespace}}
            if rng.random() < 0.5:
                endpoint["zone"] = ZONES[node]
            endpoints.append(endpoint)
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{service}-{rng.randrange(2)}", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": service}},
                "ports": [{"name": "http", "port": rng.choice((8080, 9090))}], "endpoints": endpoints}

    def namespace(self) -> dict[str, Any]:
        labels = {ENROLL_LABEL: "ambient"} if self.rng.random() < 0.6 else {}
        if self.rng.random() < 0.3:
            labels["amesh.io/mtls-mode"] = self.rng.choice(("STRICT", "PERMISSIVE"))
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.rng.choice(NAMESPACES),
                                                                       "labels": labels}}

    def node(self) -> dict[str, Any]:
        labels = {"topology.kubernetes.io/zone": self.rng.choice(("zone-1", "zone-3"))} if self.rng.random() < 0.7 else {}
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": labels}}

    def policy(self) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.5:
            return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                    "metadata": {"name": f"pa-{rng.randrange(2)}", "namespace": rng.choice(NAMESPACES)},
                    "spec": {"mtls": {"mode": rng.choice(("STRICT", "PERMISSIVE"))}}}
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": f"ap-{rng.randrange(3)}", "namespace": rng.choice(NAMESPACES)},
                "spec": {"action": rng.choice(("ALLOW", "DENY")),
                         "rules": [{"from": [{"source": {"namespaces": [rng.choice(NAMESPACES)]}}]}]}}

    def rule(self) -> dict[str, Any]:
        rng = self.rng
        namespace, created = rng.choice(NAMESPACES), f"2024-01-0{rng.randrange(1, 9)}T00:00:00Z"
        metadata = {"name": f"rule-{rng.randrange(3)}", "namespace": namespace, "creationTimestamp": created}
        if rng.random() < 0.5:
            host = rng.choice((rng.choice(SERVICES), f"*.{namespace}.svc.cluster.local"))
            return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": metadata,
                    "spec": {"host": host, "trafficPolicy": {"connectionPool": {"tcp": {
                        "maxConnections": rng.randrange(1, 100)}}}}}
        backends = [{"service": rng.choice(SERVICES), "weight": rng.randrange(1, 10)} for _ in range(2)]
        return {"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit", "metadata": metadata,
                "spec": {"service": rng.choice(SERVICES), "backends": backends}}


def rebuild(objects: dict[Key, dict[str, Any]], heartbeats: Heartbeats) -> tuple[RegistryState, set[Key]]:
    """The state a whole rebuild makes of the objects (in cache order), and the keys it skips."""
    kept = {key: obj for key, obj in objects.items()
            if not (key[0] == "Pod" and obj.get("status", {}).get("phase") in TERMINAL_PHASES)}
    skipped: set[Key] = set()
    while True:
        try:
            return build_state(kept.values(), "kubernetes", heartbeats=heartbeats), skipped
        except RegistryError as e:
            key = e.object_key  # type: ignore[attr-defined]
            del kept[key]
            skipped.add(key)


def content(state: RegistryState) -> tuple[Any, ...]:
    """What readers see of a state, listings in key order."""
    return (sorted(state.workloads, key=lambda w: w.key), sorted(state.services, key=lambda s: s.key),
            state.authorization_policies, state.peer_authentications, dict(state.node_zones))


def check_indexes(state: IncrementalState) -> None:
    """The lookups agree with the listings."""
    for w in state.workloads:
        assert state.workload_by_key(w.key) == w
        assert not w.ip or state.workload_by_ip(w.ip) == w
    for s in state.services:
        assert state.service_by_key(s.key) == s
        assert not s.cluster_ip or state.service_by_ip(s.cluster_ip) == s
    for node in NODES:
        assert sorted(w.key for w in state.enrolled_on(node)) == sorted(
            w.key for w in state.workloads if w.node == node and w.enrolled and w.ip)


def apply_event(world: World, registry: IncrementalRegistry) -> tuple[str, dict[str, Any] | None]:
    """One random change of the world, applied to the registry and committed: (action, object)."""
    action, obj = world.event()
    if action == "apply":
        registry.apply(obj)
    elif action == "delete":
        registry.delete(*_key(obj))
    registry.commit()
    return action, obj


def run_events(seed: int, count: int) -> None:
    clock = Clock()
    world, registry = World(random.Random(seed), clock), IncrementalRegistry(clock=clock)
    for step in range(count):
        action, obj = apply_event(world, registry)
        expected, skipped = rebuild(world.objects, registry.heartbeats)
        what = f"event {step}: {action} {_key(obj) if obj else clock.now}"
        assert content(registry.state) == content(expected), what
        assert set(registry.rejected) == skipped, what
        if step % 50 == 0:
            check_indexes(registry.state)


# one long sequence per run (about 30 s); a seed does not shrink, so a failure is reported as found
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(st.integers(min_value=0, max_value=2**32))
def test_the_incremental_state_equals_a_rebuild_after_every_one_of_5000_events(seed: int) -> None:
    run_events(seed, 5000)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=150))
def test_the_incremental_state_equals_a_rebuild_after_short_sequences(seed: int, count: int) -> None:
    run_events(seed, count)
