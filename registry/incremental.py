"""The registry state kept current object by object, for the Kubernetes source.

`IncrementalRegistry` reads each object once, when its event arrives (ADDED/MODIFIED: `apply`,
DELETED: `delete`), keeps only what the rules use of it (a Workload, a Service, an EndpointSlice's
endpoints, a policy), and marks what the change touches: the workload, the workloads that claim
the same address, the Services whose selector matches the pod before or after, the Service an
EndpointSlice belongs to, the pods of a Namespace whose labels changed, the Services a traffic
rule names. `commit` recomputes only those and publishes an `IncrementalState`, whose indexes are
persistent maps (immutables.Map) shared with the snapshot before it: a reader keeps a consistent
view, and an event costs what it touches, not the cluster's size.

The rules are registry/kubefile.py's (`build_state`, which the file source still runs whole):
enrollment, opt-out, one address per workload, EndpointSlices over selectors, DestinationRules and
splits; an object the rules reject is skipped and reported, and for a policy, a Service or a traffic
rule the version before it stays in force. Where the whole-state rebuild depends on the order of the
API server's list (which of two pods claiming one address wins: the one listed first), the order
kept here is the order objects first appeared, the same as the rebuild's cache until a relist.

Two differences from the rebuild, both of inputs Kubernetes does not produce: a Service whose
cluster IP another Service already has is skipped (the API server's allocator never gives one
address twice, so a version before it is not kept in force), and a node given different zones by
different EndpointSlices takes one of them (the rebuild: the last read).
"""

from __future__ import annotations

import itertools
import sys
import time
import weakref
from collections import Counter
from dataclasses import replace
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping

import immutables

from registry.changes import ChangeLog
from registry.kubefile import (
    _enrolled,
    _namespace_labels,
    _node_zone,
    _read_pod,
    _read_service,
    _read_slice,
    _selected_endpoints,
    _Slice,
    _sliced_endpoints,
    supported,
)
from registry.model import (
    MTLS_MODE_LABEL,
    AuthorizationPolicy,
    PeerAuthentication,
    RegistryError,
    RegistryState,
    Service,
    Workload,
)
from registry.objects import KubeObject
from registry.policies import read_authorization_policy, read_peer_authentication
from registry.traffic import (
    read_destination_rule,
    read_tcp_route,
    read_traffic_split,
    rule_order,
    selects,
    service_fqdn,
    shaped,
    split_order,
)
from registry.workloadentries import WORKLOAD_SUFFIX, Entry, Heartbeats, entry_workload, is_entry, read_workload_entry

ObjectKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster-scoped kinds
NameKey = str  # "namespace/name"
# kinds whose rejected version leaves the last good one in force: dropping a policy could widen
# access; dropping a Service or a traffic rule, its limits, split or breaker settings
LAST_GOOD_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication", "DestinationRule", "TCPRoute",
                             "TrafficSplit", "Service"})
# Pods that have finished keep their status.podIP, which the cluster may already have given to a
# new pod: they have nothing to capture or route to, and would only collide with the new one.
TERMINAL_PHASES = ("Succeeded", "Failed")

_EMPTY: immutables.Map[Any, Any] = immutables.Map()
_USED_BY = " is already used by "  # in the rejection of an object whose address another has


class _Labels(dict):  # type: ignore[type-arg]
    """A label mapping shared by every object with the same labels (a Deployment's pods), held
    while one of them is."""

    __slots__ = ("__weakref__",)


_shared_labels: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], _Labels] = weakref.WeakValueDictionary()


def intern_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    """One shared copy of `labels`, keys and values interned: pods of one template share it."""
    key = tuple(sorted(labels.items()))
    shared = _shared_labels.get(key)
    if shared is None:
        shared = _Labels((sys.intern(k), sys.intern(v)) for k, v in key)
        _shared_labels[key] = shared
    return shared


def _evolved(w: Workload, **changes: Any) -> Workload:
    """dataclasses.replace for the registry's hot path: a copy of the frozen workload's fields
    with `changes`, every field kept (Workload has no __post_init__ to run). replace() calls the
    generated __init__, whose frozen setattr per field makes it six times as slow: 0.7 s of a
    50,000-pod sync, which builds each pod's workload twice (interned, then enrolled)."""
    new = object.__new__(Workload)
    new.__dict__.update(w.__dict__, **changes)
    return new


def _compact(w: Workload) -> Workload:
    """The workload with its strings interned and its labels shared."""
    return _evolved(w, namespace=sys.intern(w.namespace), node=sys.intern(w.node),
                    service_account=sys.intern(w.service_account), labels=intern_labels(w.labels))


class _Pod:
    """A pod as the rules read it: its workload (enrollment filled in), named ports, place in order;
    or a WorkloadEntry (`entry`), which Services select as they select pods."""

    __slots__ = ("workload", "named_ports", "seq", "entry")

    def __init__(self, workload: Workload, named_ports: Mapping[str, int], seq: int,
                 entry: Entry | None = None) -> None:
        self.workload = workload
        self.named_ports = named_ports
        self.seq = seq
        self.entry = entry


def _matches(selector: Mapping[str, str], workload: Workload | None) -> bool:
    return (workload is not None and bool(selector) and bool(workload.ip)
            and all(workload.labels.get(k) == v for k, v in selector.items()))


def _claimant(key: NameKey) -> str:
    """The object behind a workload key, as an error names it: "Pod shop/web-1", "WorkloadEntry shop/vm"."""
    return f"WorkloadEntry {key.removesuffix(WORKLOAD_SUFFIX)}" if key.endswith(WORKLOAD_SUFFIX) else f"Pod {key}"


def _winner(claims: dict[NameKey, int]) -> NameKey:
    """Of the objects claiming one address, the one that appeared first."""
    return min(claims, key=claims.__getitem__)


class IncrementalState(RegistryState):
    """A snapshot of the registry in persistent maps: the next one shares all but what changed.
    The tuples of every workload and Service, read by listings only, are built on first read."""

    _workloads: immutables.Map[NameKey, Workload]
    _ips: immutables.Map[str, Workload]
    _nodes: immutables.Map[str, immutables.Map[NameKey, Workload]]  # node -> its workloads
    _services: immutables.Map[NameKey, Service]
    _vips: immutables.Map[str, Service]
    # its place in its registry's ChangeLog, where registry/replica.py reads what changed since an
    # older snapshot; None for a copy no registry publishes (a worker's replica)
    _log: ChangeLog | None

    def __init__(self, generation: int, workloads: immutables.Map[NameKey, Workload],
                 ips: immutables.Map[str, Workload], nodes: immutables.Map[str, immutables.Map[NameKey, Workload]],
                 services: immutables.Map[NameKey, Service], vips: immutables.Map[str, Service],
                 authorization_policies: tuple[AuthorizationPolicy, ...],
                 peer_authentications: tuple[PeerAuthentication, ...], node_zones: Mapping[str, str],
                 policies_by_namespace: Mapping[str, tuple[AuthorizationPolicy, ...]],
                 log: ChangeLog | None = None) -> None:
        for name, value in (("generation", generation), ("_workloads", workloads), ("_ips", ips),
                            ("_nodes", nodes), ("_services", services), ("_vips", vips),
                            ("authorization_policies", authorization_policies),
                            ("peer_authentications", peer_authentications), ("node_zones", node_zones),
                            ("_policies_by_namespace", policies_by_namespace), ("_log", log)):
            object.__setattr__(self, name, value)

    @cached_property
    def workloads(self) -> tuple[Workload, ...]:  # type: ignore[override]
        return tuple(w for _, w in sorted(self._workloads.items()))  # by key, as the API server lists

    @cached_property
    def services(self) -> tuple[Service, ...]:  # type: ignore[override]
        return tuple(s for _, s in sorted(self._services.items()))

    @property
    def workload_count(self) -> int:
        return len(self._workloads)

    @property
    def service_count(self) -> int:
        return len(self._services)

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._ips.get(ip)

    def workload_by_key(self, key: str) -> Workload | None:
        return self._workloads.get(key)

    def service_by_ip(self, ip: str) -> Service | None:
        return self._vips.get(ip)

    def service_by_key(self, key: str) -> Service | None:
        return self._services.get(key)

    def enrolled_on(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self._nodes.get(node, _EMPTY).values() if w.enrolled and w.ip)


class _Index:
    """A persistent map being changed during one commit."""

    def __init__(self, base: immutables.Map[Any, Any]) -> None:
        self.map = base.mutate()

    def put(self, key: Any, value: Any) -> None:
        if value is None:
            self.map.pop(key, None)
        else:
            self.map[key] = value

    def readdress(self, old_ip: str | None, new_ip: str | None, old: Any, new: Any) -> None:
        """An index by address: `old` leaves its address (unless another holds it now), `new` takes its own."""
        if old_ip and self.map.get(old_ip) is old:
            del self.map[old_ip]
        if new_ip:
            self.map[new_ip] = new


def _place_workload(workloads: _Index, ips: _Index, nodes: _Index, key: NameKey, old: Workload | None,
                    new: Workload | None) -> None:
    """A workload's new version (None: gone) into the indexes by key, by address and by node."""
    workloads.put(key, new)
    ips.readdress(old and old.ip, new and new.ip, old, new)
    for w, put in ((old, None), (new, new)):
        if w is not None:
            on_node = nodes.map.get(w.node, _EMPTY).set(w.key, put) if put else \
                nodes.map.get(w.node, _EMPTY).delete(w.key)
            nodes.put(w.node, on_node or None)


def _place_service(services: _Index, vips: _Index, key: NameKey, old: Service | None, new: Service | None) -> None:
    """A Service's new version (None: gone) into the indexes by key and by cluster IP."""
    services.put(key, new)
    vips.readdress(old and old.cluster_ip, new and new.cluster_ip, old, new)


class IncrementalRegistry:
    """The registry's objects and the state they make, changed object by object (see the module)."""

    def __init__(self, source: str = "kubernetes", clock: Callable[[], float] = time.time) -> None:
        self.source = source
        # WorkloadEntries' heartbeats, by the agent's clock: an entry lapses at commit, no event needed
        self.heartbeats = Heartbeats(clock)
        self._order = itertools.count()
        self._seq: dict[ObjectKey, int] = {}  # every object present (accepted or not): its place
        self._namespaces: dict[str, Mapping[str, str]] = {}  # name -> labels
        self._pods: dict[NameKey, _Pod] = {}  # and WorkloadEntries, by their workload key
        self._pods_in: dict[str, set[NameKey]] = {}  # namespace -> its pods
        self._ip_claims: dict[str, dict[NameKey, int]] = {}  # pod address -> pods with it -> place
        self._read_services: dict[NameKey, tuple[Service, int]] = {}  # as read, without endpoints
        # (namespace, label, value) -> the Services whose selector's first label that is: a pod
        # with labels L can be picked only by Services under one of L's labels
        self._selecting: dict[tuple[str, str, str], set[NameKey]] = {}
        self._vip_claims: dict[str, dict[NameKey, int]] = {}
        self._slices: dict[NameKey, tuple[_Slice, int]] = {}
        self._slices_of: dict[NameKey, set[NameKey]] = {}  # Service -> its EndpointSlices
        self._slice_zones: dict[str, Counter[str]] = {}  # node -> the zones slices give it
        self._own_zones: dict[str, str] = {}  # node -> zone, from Node objects
        self._policies: dict[ObjectKey, Any] = {}  # the version in force of each last-good kind object
        self._rules_by_host: dict[str, set[ObjectKey]] = {}  # FQDN or wildcard -> DestinationRules
        self._wildcard_hosts: set[str] = set()  # the hosts of _rules_by_host with a rule that are wildcards
        self._splits_of: dict[NameKey, set[ObjectKey]] = {}  # Service -> the TCPRoutes/TrafficSplits splitting it
        self._split_by_backend: dict[NameKey, Counter[NameKey]] = {}  # backend -> the Services split onto it
        self.rejected: dict[ObjectKey, str] = {}  # the reason and what was done, for each
        self._reports: list[tuple[ObjectKey, str]] = []  # rejections not yet reported
        self._dirty_workloads: set[NameKey] = set()
        self._dirty_services: set[NameKey] = set()
        self._zones_dirty = False
        self._policies_dirty = False
        self._zones: Mapping[str, str] = {}
        self._generation = 0
        self._log = ChangeLog()  # the place of the state last published
        self.state = IncrementalState(0, _EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, (), (), {}, {}, self._log)

    # --- events ---

    def apply(self, raw: dict[str, Any]) -> None:
        """An object added or modified (with its kind and apiVersion); a rejected one is noted."""
        try:
            obj = KubeObject(raw, "")
        except RegistryError as e:  # no kind or name: no object to blame or replace
            self._reject(("object", "", ""), str(e))
            return
        key = (obj.kind, obj.namespace, obj.name)
        if key not in self._seq:
            self._seq[key] = next(self._order)
        try:
            if not supported(obj):
                return
            self._read(obj)
        except RegistryError as e:
            if key[0] in LAST_GOOD_KINDS and self._in_force(key):
                self._reject(key, f"{e} (the version before it stays in force)")
            else:
                self._set(key, None)
                self._reject(key, f"{e} (object skipped)")
        else:
            self._accept(key)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """An object deleted: it leaves nothing in force behind it."""
        key = (kind, namespace, name)
        self._seq.pop(key, None)
        if self.rejected.pop(key, None) is not None:
            self._reports = [r for r in self._reports if r[0] != key]
        self._set(key, None)

    def keys(self, kind: str) -> list[ObjectKey]:
        """The keys of every object of `kind` present (accepted or not), for a relist to compare."""
        return [key for key in self._seq if key[0] == kind]

    def take_reports(self) -> list[tuple[ObjectKey, str]]:
        """The rejections found since the last call, each reported once."""
        reports, self._reports = self._reports, []
        return reports

    def _read(self, obj: KubeObject) -> None:
        key, kind = (obj.kind, obj.namespace, obj.name), obj.kind
        if kind == "Namespace":
            self._set(key, _namespace_labels(obj))
        elif kind == "Node":
            zone = _node_zone(obj)
            self._set(key, zone[1] if zone else None)
        elif kind == "Pod":
            if (obj.raw.get("status") or {}).get("phase") in TERMINAL_PHASES:
                self._set(key, None)
                return
            pod = _read_pod(obj, self.source)
            self._set(key, pod and (_compact(pod.workload), pod.named_ports))
        elif kind == "Service":
            service = _read_service(obj, self.source)
            self._set(key, replace(service, namespace=sys.intern(service.namespace),
                                   selector=intern_labels(service.selector)))
        elif kind == "EndpointSlice":
            self._set(key, _read_slice(obj))
        elif kind == "AuthorizationPolicy":
            self._set(key, read_authorization_policy(obj) or False)  # False: a waypoint policy, nothing here
        elif kind == "PeerAuthentication":
            self._set(key, read_peer_authentication(obj))
        elif kind == "DestinationRule":
            self._set(key, read_destination_rule(obj))
        elif kind == "TCPRoute":
            self._set(key, tuple(read_tcp_route(obj)))
        elif kind == "WorkloadEntry":
            entry = read_workload_entry(obj, self.source)
            self.heartbeats.observe(key, entry)
            self._set(key, entry)
        else:
            self._set(key, (read_traffic_split(obj),))

    def _in_force(self, key: ObjectKey) -> bool:
        if key[0] == "Service":
            return f"{key[1]}/{key[2]}" in self._read_services
        return key in self._policies

    def _accept(self, key: ObjectKey) -> None:
        if self.rejected.pop(key, None) is not None:
            self._reports = [r for r in self._reports if r[0] != key]

    def _reject(self, key: ObjectKey, message: str) -> None:
        if self.rejected.get(key) != message:  # report each problem once
            self.rejected[key] = message
            self._reports.append((key, message))

    # --- one object's version (None: gone) into the indexes, marking what it touches ---

    def _set(self, key: ObjectKey, value: Any) -> None:
        kind, namespace, name = key
        name_key = f"{namespace}/{name}"
        if kind == "Namespace":
            self._set_namespace(name, value)
        elif kind == "Node":
            self._set_zone(self._own_zones, name, value)
        elif kind == "Pod":
            self._set_pod(name_key, value)
        elif kind == "Service":
            self._set_service(name_key, value, self._seq.get(key, -1))
        elif kind == "EndpointSlice":
            self._set_slice(name_key, value, self._seq.get(key, -1))
        elif kind == "WorkloadEntry":
            self._set_entry(key, value)
        else:
            self._set_policy(key, value)

    def _set_namespace(self, name: str, labels: Mapping[str, str] | None) -> None:
        if self._namespaces.get(name) == labels:
            return
        if labels is None:
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = labels
        for pod_key in self._pods_in.get(name, ()):
            pod = self._pods[pod_key]
            if pod.entry is None:  # an entry is never enrolled
                pod.workload = self._enrollment(pod.workload)
                self._dirty_workloads.add(pod_key)

    def _enrollment(self, w: Workload) -> Workload:
        namespace = self._namespaces.get(w.namespace, {})
        enrolled, mtls_mode = _enrolled(w.labels, namespace), namespace.get(MTLS_MODE_LABEL, "")
        if (enrolled, mtls_mode) == (w.enrolled, w.mtls_mode):
            return w
        return _evolved(w, enrolled=enrolled, mtls_mode=mtls_mode)

    def _set_zone(self, zones: dict[str, str], node: str, zone: str | None) -> None:
        if zones.get(node) == zone:
            return
        if zone is None:
            del zones[node]
        else:
            zones[node] = zone
        self._zones_dirty = True

    def _set_pod(self, key: NameKey, value: tuple[Workload, Mapping[str, int]] | None) -> None:
        pod = None
        if value is not None:
            pod = _Pod(self._enrollment(value[0]), value[1], self._seq[("Pod", *key.split("/", 1))])
        self._put_serving(key, pod)

    def _set_entry(self, key: ObjectKey, entry: Entry | None) -> None:
        workload_key = f"{key[1]}/{key[2]}{WORKLOAD_SUFFIX}"
        if entry is None:
            self.heartbeats.forget(key)
            self._put_serving(workload_key, None)
            return
        workload = _compact(entry_workload(key, entry, self.heartbeats, self.heartbeats.clock()))
        self._put_serving(workload_key, _Pod(workload, entry.named_ports, self._seq[key], entry))

    def _lapse(self) -> None:
        """Marks the WorkloadEntries whose heartbeat lapsed since the last commit not ready."""
        now = self.heartbeats.clock()
        for key in self.heartbeats.lapsed(now):
            pod = self._pods.get(f"{key[1]}/{key[2]}{WORKLOAD_SUFFIX}")
            if pod is not None and pod.entry is not None:
                pod.workload = replace(pod.workload, ready=self.heartbeats.ready(key, pod.entry, now))
                self._dirty_workloads.add(pod.workload.key)

    def next_lapse(self) -> float | None:
        """When the next WorkloadEntry's heartbeat lapses (the clock's time), None if none will."""
        return self.heartbeats.next_deadline()

    def _put_serving(self, key: NameKey, pod: _Pod | None) -> None:
        """A pod's or an entry's new version (None: gone) into the indexes by namespace and address."""
        old = self._pods.pop(key, None)
        namespace = key.split("/", 1)[0]
        if old is not None:
            self._pods_in[namespace].discard(key)
            self._unclaim(self._ip_claims, old.workload.ip, key, self._dirty_workloads)
        if pod is not None:
            seq = pod.seq
            self._pods[key] = pod
            self._pods_in.setdefault(namespace, set()).add(key)
            self._claim(self._ip_claims, pod.workload.ip, key, seq, self._dirty_workloads)
        self._dirty_workloads.add(key)

    @staticmethod
    def _claim(claims: dict[str, dict[NameKey, int]], ip: str, key: NameKey, seq: int, dirty: set[NameKey]) -> None:
        if ip:
            holders = claims.setdefault(ip, {})
            holders[key] = seq
            dirty.update(holders)

    @staticmethod
    def _unclaim(claims: dict[str, dict[NameKey, int]], ip: str, key: NameKey, dirty: set[NameKey]) -> None:
        if ip:
            holders = claims[ip]
            del holders[key]
            dirty.update(holders)
            if not holders:
                del claims[ip]

    def _set_service(self, key: NameKey, service: Service | None, seq: int) -> None:
        old = self._read_services.pop(key, None)
        if old is not None:
            if old[0].selector:
                self._selecting[(old[0].namespace, *min(old[0].selector.items()))].discard(key)
            self._unclaim(self._vip_claims, old[0].cluster_ip, key, self._dirty_services)
        if service is not None:
            self._read_services[key] = (service, seq)
            if service.selector:
                self._selecting.setdefault((service.namespace, *min(service.selector.items())), set()).add(key)
            self._claim(self._vip_claims, service.cluster_ip, key, seq, self._dirty_services)
        self._dirty_services.add(key)

    def _set_slice(self, key: NameKey, endpoint_slice: _Slice | None, seq: int) -> None:
        old = self._slices.pop(key, None)
        for slice_, change in ((old and old[0], -1), (endpoint_slice, 1)):
            if slice_ is None:
                continue
            if change > 0:
                self._slices[key] = (slice_, seq)
                self._slices_of.setdefault(slice_.service_key, set()).add(key)
            else:
                self._slices_of[slice_.service_key].discard(key)
            self._dirty_services.add(slice_.service_key)
            for endpoint in slice_.endpoints:
                if endpoint.node and endpoint.zone:
                    self._count_zone(endpoint.node, endpoint.zone, change)

    def _count_zone(self, node: str, zone: str, change: int) -> None:
        counts = self._slice_zones.setdefault(node, Counter())
        before = max(counts, default=None)
        counts[zone] += change
        if counts[zone] <= 0:
            del counts[zone]
        if max(counts, default=None) != before:
            self._zones_dirty = True
        if not counts:
            del self._slice_zones[node]

    def _set_policy(self, key: ObjectKey, value: Any) -> None:
        kind = key[0]
        old = self._policies.pop(key, None)
        if value is not None:
            self._policies[key] = value
        if kind in ("AuthorizationPolicy", "PeerAuthentication"):
            self._policies_dirty = self._policies_dirty or old != value
        elif kind == "DestinationRule":
            for rule, change in ((old, -1), (value, 1)):
                if rule is not None:
                    rules = self._rules_by_host.setdefault(rule.host, set())
                    (rules.add if change > 0 else rules.discard)(key)
                    if rule.host.startswith("*"):
                        (self._wildcard_hosts.add if rules else self._wildcard_hosts.discard)(rule.host)
                    self._dirty_services.update(self._services_named(rule.host))
        else:
            for splits, change in ((old, -1), (value, 1)):
                for split in splits or ():
                    splitting = self._splits_of.setdefault(split.service, set())
                    (splitting.add if change > 0 else splitting.discard)(key)
                    for backend in split.backends:
                        onto = self._split_by_backend.setdefault(backend.service, Counter())
                        onto[split.service] += change
                        if onto[split.service] <= 0:
                            del onto[split.service]
                    self._dirty_services.add(split.service)

    def _services_named(self, host: str) -> Iterable[NameKey]:
        """The Services a DestinationRule's host names: one FQDN, or all a wildcard matches."""
        if not host.startswith("*"):
            labels = host.split(".")
            return [f"{labels[1]}/{labels[0]}"] if len(labels) > 2 else []
        return [k for k, (s, _) in self._read_services.items() if selects(host, s)]

    # --- publishing ---

    def commit(self) -> IncrementalState | None:
        """The new state after the events since the last commit, or None if nothing changed."""
        state = self.state
        self._lapse()
        workloads, ips, nodes = _Index(state._workloads), _Index(state._ips), _Index(state._nodes)
        changed_workloads: set[NameKey] = set()
        changed_services: set[NameKey] = set()
        for key in self._dirty_workloads:
            old, new = workloads.map.get(key), self._workload(key)
            if old == new:
                continue
            changed_workloads.add(key)
            _place_workload(workloads, ips, nodes, key, old, new)
            self._reselect(old, new)
        self._dirty_workloads = set()
        changed = bool(changed_workloads)
        zones = self._zones
        if self._zones_dirty:  # rare: a node's zone is known once
            self._zones_dirty = False
            zones = {**{node: max(counts) for node, counts in self._slice_zones.items()}, **self._own_zones}
            if zones != self._zones:  # every endpoint may take its node's zone
                self._zones, changed = zones, True
                self._dirty_services.update(self._read_services)
                self._dirty_services.update(state._services.keys())
        services, vips = _Index(state._services), _Index(state._vips)
        present = {key: self._present(key) for key in self._dirty_services}
        for key, now in list(present.items()):
            if now != (key in state._services):  # a split naming it as a backend warns or no longer does
                for split_service in self._split_by_backend.get(key, ()):
                    present.setdefault(split_service, self._present(split_service))
        for key, now in present.items():
            old, new = services.map.get(key), self._service(key, zones) if now else None
            if old == new:
                continue
            changed = True
            changed_services.add(key)
            _place_service(services, vips, key, old, new)
        self._dirty_services = set()
        authorization, peer, by_namespace = (state.authorization_policies, state.peer_authentications,
                                             state._policies_by_namespace)  # type: ignore[attr-defined]
        if self._policies_dirty:
            self._policies_dirty, changed = False, True
            authorization, peer, by_namespace = self._security_policies()
        if not changed:
            return None
        self._generation += 1
        self._log = self._log.record(changed_workloads, changed_services)
        self.state = IncrementalState(self._generation, workloads.map.finish(), ips.map.finish(), nodes.map.finish(),
                                      services.map.finish(), vips.map.finish(), authorization, peer, self._zones,
                                      by_namespace, self._log)
        return self.state

    def _workload(self, key: NameKey) -> Workload | None:
        """The pod's workload as the state holds it: None if gone, or if a pod before it has its address."""
        pod = self._pods.get(key)
        if pod is None:
            return None
        w = pod.workload
        rejected, field = ("Pod", w.namespace, w.name), "status.podIP"
        if pod.entry is not None:
            rejected, field = ("WorkloadEntry", w.namespace, w.name.removesuffix(WORKLOAD_SUFFIX)), "spec.address"
        if w.ip and (first := _winner(self._ip_claims[w.ip])) != key:
            self._reject(rejected, f"{rejected[0]} {rejected[1]}/{rejected[2]}: {field}: {w.ip}{_USED_BY}"
                                   f"{_claimant(first)} () (object skipped)")
            return None
        if _USED_BY in self.rejected.get(rejected, ""):
            self._accept(rejected)
        return w

    def _reselect(self, old: Workload | None, new: Workload | None) -> None:
        """Marks the Services whose selector picked the workload before or picks it now: for a pod,
        those without EndpointSlices (with slices, a Service's pods are its slices'); for a
        WorkloadEntry, every one."""
        workload: Workload = new or old  # type: ignore[assignment]
        namespace, pod = workload.namespace, not is_entry(workload)
        labels = {*(old.labels.items() if old else ()), *(new.labels.items() if new else ())}
        for label in labels:
            for service_key in self._selecting.get((namespace, *label), ()):
                if pod and self._slices_of.get(service_key):
                    continue
                selector = self._read_services[service_key][0].selector
                if _matches(selector, old) or _matches(selector, new):
                    self._dirty_services.add(service_key)

    def _selected(self, service: Service, entries_only: bool = False) -> list[_Pod]:
        """The pods and WorkloadEntries (or the entries alone) in the state a Service's selector
        picks, in order: a scan of its namespace's, made only for a Service without EndpointSlices
        (or, for its entries, with them)."""
        picked = []
        for key in self._pods_in.get(service.namespace, ()):
            pod = self._pods[key]
            w = pod.workload
            if entries_only and pod.entry is None:
                continue
            if _matches(service.selector, w) and _winner(self._ip_claims[w.ip]) == key:
                picked.append(pod)
        return sorted(picked, key=lambda p: p.seq)

    def _present(self, key: NameKey) -> bool:
        """Whether the Service is in the state: read, and first with its cluster IP."""
        read = self._read_services.get(key)
        if read is None:
            return False
        ip, rejected = read[0].cluster_ip, ("Service", *key.split("/", 1))
        if ip and (first := _winner(self._vip_claims[ip])) != key:
            self._reject(rejected, f"Service {key}: spec.clusterIP: {ip}{_USED_BY}Service {first} () (object skipped)")
            return False
        if _USED_BY in self.rejected.get(rejected, ""):  # type: ignore[arg-type]
            self._accept(rejected)  # type: ignore[arg-type]
        return True

    def _service(self, key: NameKey, zones: Mapping[str, str]) -> Service:
        service = self._read_services[key][0]
        slice_keys = self._slices_of.get(key)
        if slice_keys:
            ordered = sorted((self._slices[k] for k in slice_keys), key=lambda s: s[1])
            endpoints = (_sliced_endpoints(service, (s for s, _ in ordered), zones)
                         + _selected_endpoints(service, self._selected(service, entries_only=True), zones))
        else:
            endpoints = _selected_endpoints(service, self._selected(service), zones)
        service = replace(service, endpoints=endpoints)
        fqdn = service_fqdn(service)
        rule_keys = set(self._rules_by_host.get(fqdn, ()))
        rule_keys.update(k for host in self._wildcard_hosts for k in self._rules_by_host[host])
        rules = sorted((r for r in (self._policies[k] for k in rule_keys) if selects(r.host, service)), key=rule_order)
        splits = sorted((s for k in self._splits_of.get(key, ()) for s in self._policies[k] if s.service == key),
                        key=split_order)
        return shaped(service, rules, splits, _Known(self))

    def _security_policies(self) -> tuple[tuple[AuthorizationPolicy, ...], tuple[PeerAuthentication, ...],
                                          dict[str, tuple[AuthorizationPolicy, ...]]]:
        in_order = sorted(((self._seq.get(k, -1), k, v) for k, v in self._policies.items()
                           if k[0] in ("AuthorizationPolicy", "PeerAuthentication") and v), key=lambda t: t[0])
        authorization = tuple(v for _, k, v in in_order if k[0] == "AuthorizationPolicy")
        by_namespace: dict[str, list[AuthorizationPolicy]] = {}
        for policy in authorization:
            by_namespace.setdefault(policy.namespace, []).append(policy)
        return (authorization, tuple(v for _, k, v in in_order if k[0] == "PeerAuthentication"),
                {ns: tuple(ps) for ns, ps in by_namespace.items()})


class _Known:
    """The Service keys of the registry being committed, for a split's backends."""

    def __init__(self, registry: IncrementalRegistry) -> None:
        self._registry = registry

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._registry._read_services and self._registry._present(key)
