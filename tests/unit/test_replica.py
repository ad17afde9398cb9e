"""A worker's replica (registry/replica.py) against the agent's own state.

Over random event sequences (tests/unit/test_incremental.py's world: pods, Services, EndpointSlices,
Namespaces, policies, traffic rules) with registrations registered, beaten, deregistered and expired
on top, the agent's state (the source's state merged with the registrations, as agent/node.py makes
it) is sent now and then: a replica fed `state_delta(last sent, current)`, pickled as the channel
carries it, must hold a state no reader can tell from the agent's. The Kubernetes source's
IncrementalState, the file source's whole rebuilds and the agent's empty state before its source's
first one all take part; states are skipped between sends.
"""

from __future__ import annotations

import copy
import gc
import pickle
import random
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import registry as cluster
from registry.changes import ChangeLog
from registry.incremental import IncrementalRegistry
from registry.model import RegistryState, Workload
from registry.registrations import MergedRegistry, RegistrationError, RegistrationStore
from registry.replica import EMPTY, FREEZE_ITEMS, RegisteredDelta, Replica, ReplicaError, state_delta
from tests.unit.clock import Clock
from tests.unit.test_incremental import NAMESPACES, NODES, SERVICES, World, _key, apply_event, rebuild


def view(state: RegistryState, ips: set[str], keys: set[str]) -> dict[str, Any]:
    """Everything a reader of `state` can see, lookups asked for `ips` and `keys`."""
    return {
        "generation": state.generation, "workloads": state.workloads, "services": state.services,
        "counts": (state.workload_count, state.service_count),
        "policies": (state.authorization_policies, state.peer_authentications,
                     {ns: state.authorization_policies_in(ns) for ns in NAMESPACES}),
        "zones": (dict(state.node_zones), {node: state.zone_of(node) for node in NODES}),
        "enrolled": {node: state.enrolled_on(node) for node in NODES},
        "by_ip": {ip: (state.workload_by_ip(ip), state.service_by_ip(ip)) for ip in ips},
        "by_key": {key: (state.workload_by_key(key), state.service_by_key(key)) for key in keys},
    }


def assert_same(replica: RegistryState, agent: RegistryState, where: str) -> None:
    ips = {w.ip for s in (replica, agent) for w in s.workloads} | {
        s.cluster_ip for state in (replica, agent) for s in state.services}
    keys = {item.key for s in (replica, agent) for item in (*s.workloads, *s.services)}
    assert view(replica, ips, keys) == view(agent, ips, keys), where


class Registrations:
    """Random registration traffic on a fake clock: registers, heartbeats, deregisters, time passing."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.clock = rng, Clock()
        self.store = RegistrationStore(self.clock)
        self.merged = MergedRegistry(self.store, self.clock)

    def change(self) -> None:
        rng = self.rng
        name, namespace = rng.choice((*SERVICES, "billing")), rng.choice(NAMESPACES)
        # now and then at a pod's address (the pod keeps it), else a VM's
        address = f"10.1.0.{rng.randrange(1, 250)}" if rng.random() < 0.3 else f"192.168.7.{rng.randrange(1, 6)}"
        try:
            action = rng.random()
            if action < 0.4:
                self.store.register({"name": name, "namespace": namespace, "address": address,
                                     "port": rng.choice((8080, 9090)), "ttl": rng.choice((5, 30)),
                                     "version": rng.choice(("", "v2"))})
            elif action < 0.6:
                self.store.heartbeat(namespace, name)
            elif action < 0.8:
                self.store.deregister(namespace, name)
            else:
                self.clock.now += rng.choice((1, 10))  # some expire
        except RegistrationError:  # taken, or nothing to beat or remove
            pass


# test_incremental.py's world, and the registries that follow it, are made and read only here
def new_world(rng: random.Random) -> World:
    return World(rng, Clock())


def new_registry(world: World) -> IncrementalRegistry:
    """A registry to follow `world`'s objects."""
    return IncrementalRegistry(clock=world.clock)


def rebuilt(world: World, registry: IncrementalRegistry) -> RegistryState:
    """The file source's state of the world's objects: a whole rebuild."""
    return rebuild(world.objects, registry.heartbeats)[0]


def next_event(world: World, registry: IncrementalRegistry) -> str:
    """One random change of the world, applied to the registry and committed; what it was."""
    action, obj = apply_event(world, registry)
    return f"{action} {_key(obj) if obj else ''}"


def run_sends(seed: int, count: int, source: str) -> None:
    """`count` events, the agent's state sent to one replica after about two events in three."""
    rng = random.Random(seed)
    world = new_world(rng)
    registry, registrations = new_registry(world), Registrations(rng)
    replica, sent, synced_at = Replica(), None, rng.randrange(count // 4 + 1)
    base: RegistryState = EMPTY  # the agent's state before its source has one
    for step in range(count):
        event = next_event(world, registry)
        if rng.random() < 0.3:
            registrations.change()
        if step >= synced_at:
            base = registry.state if source == "kubernetes" else rebuilt(world, registry)
        agent = registrations.merged.state(base)
        if rng.random() < 0.35:  # this state is never sent: the next delta skips it
            continue
        replica.apply(pickle.loads(pickle.dumps(state_delta(sent, agent))))
        sent = agent
        assert_same(replica.state, agent, f"event {step}: {event}")


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=300))
def test_a_replica_fed_deltas_equals_the_agents_state_over_kubernetes_events(seed: int, count: int) -> None:
    run_sends(seed, count, "kubernetes")


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=200))
def test_a_replica_fed_deltas_equals_the_agents_state_over_file_rebuilds(seed: int, count: int) -> None:
    run_sends(seed, count, "file")


def test_a_replica_follows_a_long_kubernetes_sequence() -> None:
    run_sends(20261202, 2000, "kubernetes")


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_states_of_two_registries_are_compared_whole(seed: int) -> None:
    """A state of another registry's history (a source started again) has no log to the old one."""
    rng = random.Random(seed)
    world = new_world(rng)
    first = new_registry(world)
    for _ in range(100):
        next_event(world, first)
    replica, again = Replica(), new_registry(world)
    replica.apply(state_delta(None, first.state))
    for obj in world.objects.values():
        again.apply(obj)
    again.commit()
    for _ in range(10):
        next_event(world, again)
    replica.apply(pickle.loads(pickle.dumps(state_delta(first.state, again.state))))
    assert_same(replica.state, again.state, "after the other registry's state")
    # and back: an older state of the first registry, which does not follow the newer one
    replica.apply(state_delta(again.state, first.state))
    assert_same(replica.state, first.state, "back to the first registry's state")
    # and to a whole rebuilt state (the file source's kind) and back: each starts the base afresh
    whole = rebuilt(world, again)
    replica.apply(state_delta(first.state, whole))
    assert_same(replica.state, whole, "after a rebuilt state")
    replica.apply(state_delta(whole, again.state))
    assert_same(replica.state, again.state, "after the rebuilt state, an incremental one")


def test_the_change_log_gives_the_keys_changed_on_the_way_to_a_later_place() -> None:
    first = ChangeLog()
    second = first.record({"shop/a"}, {"shop/web"})
    third = second.record({"shop/b", "shop/a"}, set())
    fourth = third.record(set(), set())
    assert first.changes_to(fourth, limit=10) == ({"shop/a", "shop/b"}, {"shop/web"})
    assert second.changes_to(second, limit=0) == (set(), set())
    assert third.changes_to(first, limit=10) is None  # an older place does not follow a newer one
    assert first.changes_to(ChangeLog(), limit=10) is None  # nor another log's
    assert first.changes_to(fourth, limit=3) is None  # 4 keys on the way: cheaper to compare whole


def test_a_skipped_delta_is_refused_naming_both_states() -> None:
    registry, replica = IncrementalRegistry(), Replica()
    states = []
    for i in range(3):
        registry.apply(cluster.pod(i, 1))
        states.append(registry.commit())
    replica.apply(state_delta(None, states[0]))
    with pytest.raises(ReplicaError) as refused:
        replica.apply(state_delta(states[1], states[2]))
    assert str(refused.value) == (
        "registry delta made from the state of generation 2 (workloads, Services, registered workloads, "
        "registered Services, registrations' change: (2, 0, 0, 0, 0)) but this worker holds generation 1 "
        "((1, 0, 0, 0, 0)): the agent skipped or reordered a delta on the channel; it must send the whole "
        "state (state_delta(None, state))")
    assert replica.state.workload_count == 1  # unchanged
    replica.apply(state_delta(None, states[2]))  # the whole state puts it right
    assert_same(replica.state, states[2], "after the whole state")


def test_a_skipped_change_of_registrations_alone_is_refused() -> None:
    """A registration's expiry or revival changes no generation and no count: the layer's place does."""
    registrations, base = Registrations(random.Random(1)), RegistryState()
    registrations.store.register({"name": "billing", "address": "192.168.7.20", "port": 8443, "ttl": 5})
    registered = registrations.merged.state(base)
    replica = Replica()
    replica.apply(state_delta(None, registered))
    registrations.clock.now += 10
    expired = registrations.merged.state(base)
    registrations.store.heartbeat("default", "billing")
    revived = registrations.merged.state(base)
    with pytest.raises(ReplicaError, match="the agent skipped or reordered a delta"):
        replica.apply(state_delta(expired, revived))
    replica.apply(state_delta(registered, expired))
    replica.apply(state_delta(expired, revived))
    assert replica.state.workload_by_ip("192.168.7.20").ready


# --- at cluster scale ---

PODS, SERVICE_COUNT = 10_000, 2_000


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """A replica of a large state freezes what the process holds (as a worker wants): not pytest's."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def large() -> tuple[IncrementalRegistry, Registrations]:
    registry = IncrementalRegistry()
    for obj in cluster.cluster(PODS, SERVICE_COUNT):
        registry.apply(obj)
    registry.commit()
    registrations = Registrations(random.Random(7))
    registrations.store.register({"name": "svc-3", "namespace": "ns-3", "address": "192.168.7.20", "port": 8443})
    return registry, registrations


def median_seconds(fn: Callable[[], object], runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def test_one_pod_changed_at_10000_pods_is_a_small_cheap_delta(large: tuple[IncrementalRegistry, Registrations]) -> None:
    registry, registrations = large
    before = registrations.merged.state(registry.state)
    replica = Replica()
    whole = state_delta(None, before)
    replica.apply(pickle.loads(pickle.dumps(whole)))
    registry.apply(cluster.pod(17, SERVICE_COUNT, ip="10.200.0.17"))  # a pod's IP changes
    registry.commit()
    after = registrations.merged.state(registry.state)
    delta = state_delta(before, after)
    assert list(delta.workloads) == ["ns-17/pod-17"] and not delta.services
    assert delta.registered == RegisteredDelta({}, {}) and delta.policies is None and delta.node_zones is None
    size = len(pickle.dumps(delta))
    assert size < 1500, f"{size} bytes"  # one Workload, not the cluster
    one, full = median_seconds(lambda: state_delta(before, after)), median_seconds(lambda: state_delta(None, after))
    assert one < full / 50, f"one pod's delta {one * 1e6:.0f} us, the whole state's {full * 1e6:.0f} us"
    applied = pickle.loads(pickle.dumps(delta))

    def apply_to_a_copy() -> None:
        copy.copy(replica).apply(applied)  # the replica itself stays before the delta

    one_apply, whole_apply = median_seconds(apply_to_a_copy), median_seconds(lambda: Replica().apply(whole), runs=3)
    assert one_apply < whole_apply / 50, f"apply one {one_apply * 1e6:.0f} us, whole {whole_apply * 1e6:.0f} us"
    replica.apply(applied)
    assert replica.state.workload_by_ip("10.200.0.17").name == "pod-17"
    assert replica.state.workload_by_key("ns-17/pod-17").ip == "10.200.0.17"
    assert replica.state.service_by_key("ns-3/svc-3") == after.service_by_key("ns-3/svc-3")


def test_the_whole_state_survives_a_pickle_round_trip(large: tuple[IncrementalRegistry, Registrations]) -> None:
    registry, registrations = large
    agent = registrations.merged.state(registry.state)
    replica = Replica()
    replica.apply(pickle.loads(pickle.dumps(state_delta(None, agent))))
    ips = {w.ip for w in agent.workloads[:200]} | {"192.168.7.20", "10.96.0.3"}
    keys = {w.key for w in agent.workloads[:200]} | {"ns-3/svc-3"}
    assert view(replica.state, ips, keys) == view(agent, ips, keys)
    # the worker's copy stays as lean as the agent's: pods of one template share one label mapping
    assert len({id(w.labels) for w in replica.state.workloads}) == SERVICE_COUNT + 1  # and the registration's


def test_a_delta_sent_to_many_workers_is_pickled_once() -> None:
    delta = state_delta(None, RegistryState(workloads=tuple(Workload(f"pod-{i}", "shop", f"10.1.0.{i}", "node-a")
                                                            for i in range(3))))
    first, again = pickle.dumps(delta), pickle.dumps(delta)
    assert first == again and delta.__reduce__()[1][0] is delta.__reduce__()[1][0]
    assert pickle.loads(first) == delta


def test_a_large_whole_state_is_frozen_out_of_the_collectors_sight_and_the_collector_left_as_found(
        large: tuple[IncrementalRegistry, Registrations]) -> None:
    registry, registrations = large
    whole = pickle.dumps(state_delta(None, registrations.merged.state(registry.state)))
    small = pickle.dumps(state_delta(None, RegistryState(workloads=registry.state.workloads[:FREEZE_ITEMS - 1])))
    gc.unfreeze()
    Replica().apply(pickle.loads(small))
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    replica = Replica()
    replica.apply(pickle.loads(whole))
    assert gc.get_freeze_count() > PODS and gc.isenabled()
    gc.disable()  # a caller's choice is kept
    try:
        replica.apply(pickle.loads(whole))
        assert not gc.isenabled()
    finally:
        gc.enable()
