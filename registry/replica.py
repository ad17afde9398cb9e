"""A worker process's copy of the agent's registry state, kept current by deltas.

The agent's state (agent/node.py `NodeAgent.state`) is a source's state, an `IncrementalState` for
the Kubernetes source or a whole `RegistryState` the file source rebuilds, with the registrations
layer (registry/registrations.py `MergedState`) on top when there are registrations. The agent sends
each worker `state_delta(last_sent, state)` over its private channel; the worker's `Replica` applies
it and holds a state equal to the agent's for every reader: listings, lookups by address and key,
enrolled_on, policies, zones, generation.

What a delta costs: for the Kubernetes source and for registrations, the keys a state changed are in
its registry's ChangeLog (registry/changes.py), so the delta from one state to a later one costs the
changes in between, not the cluster's size: one pod changed at 50,000 pods is a delta of that pod and
the Services that list it. A whole comparison is made only where a state is small (a file's) or when
the two states are not of one registry's history (then it costs the size of both). The worker applies
a delta into persistent maps shared with its state before, as the agent's registry does, so applying
costs what changed too. Each delta names the state it was made from and the one it makes: a replica
refuses one made from another than it holds (a delta skipped or reordered on the channel), and the
agent sends that worker the whole state again (`state_delta(None, state)`).
"""

from __future__ import annotations

import gc
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import immutables

from registry.changes import ChangeLog
from registry.incremental import IncrementalState, _Index, _place_service, _place_workload
from registry.model import AuthorizationPolicy, PeerAuthentication, RegistryState, Service, Workload
from registry.registrations import MergedState, place_registered

EMPTY = RegistryState()
# A whole state of at least this many workloads and Services is frozen out of the cyclic garbage
# collector's sight once applied (see Replica.apply)
FREEZE_ITEMS = 5_000
_EMPTY_MAP: immutables.Map[str, Any] = immutables.Map()
_EMPTY_INCREMENTAL = IncrementalState(0, _EMPTY_MAP, _EMPTY_MAP, _EMPTY_MAP, _EMPTY_MAP, _EMPTY_MAP, (), (), {}, {})

T = TypeVar("T", Workload, Service)
Changes = Mapping[str, T | None]  # key -> its new version; None: gone
# a rebuilt listing's order: the key of an item the replica holds, or the item itself where keys repeat
Order = tuple[str | T, ...]
Policies = tuple[tuple[AuthorizationPolicy, ...], tuple[PeerAuthentication, ...],
                 Mapping[str, tuple[AuthorizationPolicy, ...]]]  # and the AuthorizationPolicies by namespace
# a state as a delta names it, for the replica to check it holds the one a delta was made from: its
# generation (each source numbers its states), the base's workloads and Services, the registered
# workloads and Services, and the registrations layer's place in its log (registrations change
# without a new generation)
Fingerprint = tuple[int, int, int, int, int, int]


class ReplicaError(RuntimeError):
    """A delta made from another state than the replica holds: the sender skipped or reordered one."""


@dataclass(frozen=True)
class RegisteredDelta:
    """What changed in the registrations layer: registered workloads by address, Services by key."""

    workloads: Changes[Workload]
    services: Changes[Service]


@dataclass(frozen=True)
class StateDelta:
    """What changed from one agent state to a later one, in size proportional to the change."""

    since: Fingerprint | None  # the state it was made from; None: made from nothing (the whole state)
    made: Fingerprint  # the state it makes
    # the base is a whole RegistryState the source rebuilds (the file source), its listings diffed by
    # key and order; else an IncrementalState, by key
    rebuilt: bool
    fresh: bool  # the base starts from an empty one (the state before had none or one of the other kind)
    generation: int
    workloads: Changes[Workload]
    services: Changes[Service]
    workload_order: Order[Workload] | None  # rebuilt only: the listing's order when it changed
    service_order: Order[Service] | None
    policies: Policies | None  # None: unchanged
    node_zones: Mapping[str, str] | None  # None: unchanged
    registered: RegisteredDelta | None  # None: no registrations on top

    def __reduce__(self) -> tuple[Callable[[bytes], StateDelta], tuple[bytes]]:
        """Pickled as one blob, made and read with the cyclic collector paused (see `_collector_paused`),
        and kept: a delta sent to every worker in step is pickled once, not once per worker."""
        data = self.__dict__.get("_pickled")
        if data is None:
            with _collector_paused():
                data = pickle.dumps(tuple(getattr(self, f.name) for f in fields(self)), pickle.HIGHEST_PROTOCOL)
            object.__setattr__(self, "_pickled", data)
        return _unpickled, (data,)


def state_delta(old: RegistryState | None, new: RegistryState) -> StateDelta:
    """What a replica holding `old` (None: nothing) must change to hold `new`."""
    old_base, old_layer = _split(old) if old is not None else (None, None)
    new_base, new_layer = _split(new)
    rebuilt = not isinstance(new_base, IncrementalState)
    fresh = old_base is None or isinstance(old_base, IncrementalState) == rebuilt  # none, or the other kind
    base: RegistryState = (EMPTY if rebuilt else _EMPTY_INCREMENTAL) if fresh else old_base  # type: ignore[assignment]
    workload_order = service_order = None
    if rebuilt:
        workloads = _changed({w.key for w in (*base.workloads, *new_base.workloads)}, base.workload_by_key,
                             new_base.workload_by_key)
        services = _changed({s.key for s in (*base.services, *new_base.services)}, base.service_by_key,
                            new_base.service_by_key)
        workload_order = _order(base.workloads, new_base.workloads)
        service_order = _order(base.services, new_base.services)
    else:
        assert isinstance(base, IncrementalState) and isinstance(new_base, IncrementalState)
        changed_workloads, changed_services = _keys(base._log, new_base._log, (base._workloads, new_base._workloads),
                                                    (base._services, new_base._services))
        workloads = _changed(changed_workloads, base._workloads.get, new_base._workloads.get)
        services = _changed(changed_services, base._services.get, new_base._services.get)
    policies = None
    if not (_same(base.authorization_policies, new_base.authorization_policies)
            and _same(base.peer_authentications, new_base.peer_authentications)):
        policies = (new_base.authorization_policies, new_base.peer_authentications,
                    new_base._policies_by_namespace)  # type: ignore[attr-defined]
    return StateDelta(
        since=_fingerprint(old) if old is not None else None, made=_fingerprint(new), rebuilt=rebuilt, fresh=fresh,
        generation=new_base.generation, workloads=workloads, services=services, workload_order=workload_order,
        service_order=service_order, policies=policies,
        node_zones=None if _same(base.node_zones, new_base.node_zones) else new_base.node_zones,
        registered=_registered_delta(old_layer, new_layer) if new_layer is not None else None)


class Replica:
    """The state a worker routes by, changed only by the agent's deltas, applied in the order made."""

    def __init__(self) -> None:
        self.state: RegistryState = EMPTY
        self._holds: Fingerprint = _fingerprint(EMPTY)  # the state as the last delta applied named it

    def apply(self, delta: StateDelta) -> RegistryState:
        """The state after `delta`, now `.state`; ReplicaError if it was made from another state.

        After a whole state of FREEZE_ITEMS or more, every object the process holds is frozen
        (gc.freeze): the state is most of them (about a million at 50,000 pods), none in a cycle, and
        one full collection over them took 1.5 s on this 2-core machine, against 12 ms frozen
        (bench/replica.py). Frozen objects are still freed by their reference counts when later deltas
        replace them; what the worker held before its first state is frozen with it."""
        current = self.state
        if delta.since is None:
            current = EMPTY
        elif delta.since != self._holds:
            raise ReplicaError(
                f"registry delta made from the state of generation {delta.since[0]} (workloads, Services, "
                f"registered workloads, registered Services, registrations' change: {delta.since[1:]}) but this "
                f"worker holds generation {self._holds[0]} ({self._holds[1:]}): the agent skipped or reordered a "
                "delta on the channel; it must send the whole state (state_delta(None, state))")
        with _collector_paused():
            self.state = _applied(current, delta)
        self._holds = delta.made
        if delta.since is None and len(delta.workloads) + len(delta.services) >= FREEZE_ITEMS:
            gc.freeze()
        return self.state


# --- making a delta ---

def _split(state: RegistryState) -> tuple[RegistryState, MergedState | None]:
    """The source's state and the registrations layer over it (None: no registrations)."""
    return (state._base, state) if isinstance(state, MergedState) else (state, None)


def _fingerprint(state: RegistryState) -> Fingerprint:
    base, layer = _split(state)
    if layer is None:
        return (state.generation, base.workload_count, base.service_count, 0, 0, 0)
    return (state.generation, base.workload_count, base.service_count, len(layer._registered_workloads),
            len(layer._registered_services), layer._log.serial if layer._log is not None else 0)


def _same(old: object, new: object) -> bool:
    return old is new or old == new


def _keys(old_log: ChangeLog | None, new_log: ChangeLog | None,
          workloads: tuple[Mapping[str, object], Mapping[str, object]],
          services: tuple[Mapping[str, object], Mapping[str, object]]) -> tuple[Iterable[str], Iterable[str]]:
    """The workload and Service keys that may differ between two states (each given as old and new
    maps): from the log when the new state follows the old in it, else every key of either."""
    if old_log is not None and new_log is not None:
        found = old_log.changes_to(new_log, limit=sum(len(m) for m in (*workloads, *services)))
        if found is not None:
            return found
    return ({*workloads[0].keys(), *workloads[1].keys()}, {*services[0].keys(), *services[1].keys()})


def _changed(keys: Iterable[str], old: Callable[[str], T | None],
             new: Callable[[str], T | None]) -> dict[str, T | None]:
    """Of `keys`, those whose item differs, with the new item (None: gone)."""
    changes: dict[str, T | None] = {}
    for key in keys:
        before, after = old(key), new(key)
        if before is not after and before != after:
            changes[key] = after
    return changes


def _order(old: tuple[T, ...], new: tuple[T, ...]) -> Order[T] | None:
    """A rebuilt listing's order: None if its keys are the old ones in the old order, else the keys,
    or the items themselves where two share a key (the replica could not tell them apart)."""
    keys = tuple(item.key for item in new)
    if len(set(keys)) < len(keys):
        return new
    return None if keys == tuple(item.key for item in old) else keys


def _registered_delta(old: MergedState | None, new: MergedState) -> RegisteredDelta:
    old_workloads = old._registered_workloads if old is not None else _EMPTY_MAP
    old_services = old._registered_services if old is not None else _EMPTY_MAP
    addresses, service_keys = _keys(old._log if old is not None else None, new._log,
                                    (old_workloads, new._registered_workloads),
                                    (old_services, new._registered_services))
    return RegisteredDelta(_changed(addresses, old_workloads.get, new._registered_workloads.get),
                           _changed(service_keys, old_services.get, new._registered_services.get))


# --- applying one ---

def _applied(current: RegistryState, delta: StateDelta) -> RegistryState:
    base, layer = _split(current)
    if delta.fresh:
        base = EMPTY if delta.rebuilt else _EMPTY_INCREMENTAL
    if delta.rebuilt:
        base = _apply_rebuilt(base, delta)
    else:
        assert isinstance(base, IncrementalState)  # as the delta's `fresh` says: the base before was one
        base = _apply_incremental(base, delta)
    return base if delta.registered is None else _apply_registered(base, layer, delta.registered)


def _apply_incremental(base: IncrementalState, delta: StateDelta) -> IncrementalState:
    workloads, ips, nodes = _Index(base._workloads), _Index(base._ips), _Index(base._nodes)
    for key, workload in delta.workloads.items():
        _place_workload(workloads, ips, nodes, key, workloads.map.get(key), workload)
    services, vips = _Index(base._services), _Index(base._vips)
    for key, service in delta.services.items():
        _place_service(services, vips, key, services.map.get(key), service)
    authorization, peer, by_namespace = delta.policies or (base.authorization_policies, base.peer_authentications,
                                                           base._policies_by_namespace)  # type: ignore[attr-defined]
    return IncrementalState(delta.generation, workloads.map.finish(), ips.map.finish(), nodes.map.finish(),
                            services.map.finish(), vips.map.finish(), authorization, peer,
                            base.node_zones if delta.node_zones is None else delta.node_zones, by_namespace)


def _apply_rebuilt(base: RegistryState, delta: StateDelta) -> RegistryState:
    # a RegistryState groups its AuthorizationPolicies by namespace itself
    authorization, peer, _ = delta.policies or (base.authorization_policies, base.peer_authentications, {})
    return RegistryState(
        workloads=_relisted(base.workloads, base.workload_by_key, delta.workloads, delta.workload_order),
        services=_relisted(base.services, base.service_by_key, delta.services, delta.service_order),
        generation=delta.generation, authorization_policies=authorization, peer_authentications=peer,
        node_zones=base.node_zones if delta.node_zones is None else delta.node_zones)


def _relisted(items: tuple[T, ...], held: Callable[[str], T | None], changes: Changes[T],
              order: Order[T] | None) -> tuple[T, ...]:
    """A rebuilt listing after its changes, in the order given (None: the order it had)."""
    if order is None:  # the same keys in the same order: only items replaced
        return tuple(changes.get(item.key) or item for item in items) if changes else items
    listing = []
    for entry in order:
        item = (changes[entry] if entry in changes else held(entry)) if isinstance(entry, str) else entry
        assert item is not None, f"the order names {entry}, which the delta removes"
        listing.append(item)
    return tuple(listing)


def _apply_registered(base: RegistryState, layer: MergedState | None, delta: RegisteredDelta) -> MergedState:
    by_address = layer._registered_workloads if layer is not None else _EMPTY_MAP
    by_key = layer._registered_workload_keys if layer is not None else _EMPTY_MAP
    for address, workload in delta.workloads.items():
        by_address, by_key = place_registered(by_address, by_key, address, workload)
    services = _Index(layer._registered_services if layer is not None else _EMPTY_MAP)
    for key, service in delta.services.items():
        services.put(key, service)
    return MergedState(base, by_address, by_key, services.map.finish())


# --- pickling ---

def _unpickled(data: bytes) -> StateDelta:
    with _collector_paused():
        return StateDelta(*pickle.loads(data))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while: a whole state is about a million small objects,
    none in a cycle (reference counts free them), and the collector, run again and again over the heap
    while they are made, would triple the time to read one (at 50,000 pods: 1.4 s instead of 0.34 s
    to unpickle, 0.55 s instead of 0.24 s to apply)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
