"""Workloads outside Kubernetes that join by registering: a name, an address, a port.

As in the simple service registries teams start with: register, look up, keep alive with
heartbeats, deregister. A name may have many instances (one per address and port). A
registration is healthy while heartbeats (or the registration itself) arrive within its TTL;
then it expires and its endpoint stops receiving new connections, until a heartbeat revives it.
A registration joins the Service of the same name and namespace as one more endpoint (serving
each of the Service's ports on its one port), or, with no such Service, stands as a headless one
that `lookup` finds.

Pure: `RegistrationStore` takes the time from a clock it is given, and `MergedRegistry` keeps
the `RegistryState` of a base state plus the registrations, change by change; the admin API is
the only I/O around them.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
import reprlib
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Collection, Iterable, Mapping

import immutables

from registry.changes import ChangeLog
from registry.model import (
    AuthorizationPolicy,
    Endpoint,
    PeerAuthentication,
    RegistryState,
    Service,
    ServicePort,
    Workload,
)

SOURCE = "registration"
DEFAULT_NAMESPACE = "default"
DEFAULT_TTL = 30.0  # seconds
MAX_TTL = 24 * 3600.0  # seconds
MAX_REGISTRATIONS = 10_000  # a bound, so a misbehaving client cannot grow the agent without end
FIELDS = ("name", "address", "port", "version", "namespace", "service_account", "ttl")
# The ztunnel's own ports: admin API, outbound, inbound plaintext, HBONE, metrics, readiness
# (the agent passes the ones it was started with). A registration on one of them, at any
# address, would make the ztunnel connect to itself (a loop, or the loopback-only admin API
# reached from a pod) or to another node's agent rather than to a workload. Istio reserves
# these ports from applications the same way.
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15008, 15020, 15021})
# Addresses a registration may never name, with the reason: none of them is a workload another
# node can reach, and the ztunnel, connecting from the node itself, would reach the node's own
# services (loopback), a cloud's metadata service (link-local 169.254.169.254) or no one.
# 0.0.0.0/8 ("this network", RFC 1122 3.2.1.3) and 240.0.0.0/4 (reserved, RFC 1112) are never
# destinations; 255.255.255.255 is the limited broadcast address.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_REFUSED_ADDRESSES = (
    (lambda a: a.is_unspecified, "the unspecified address"),
    (lambda a: a in _THIS_NETWORK, "in 0.0.0.0/8 ('this network')"),
    (lambda a: a.is_loopback, "a loopback address"),
    (lambda a: a.is_link_local, "a link-local address (where cloud metadata services answer)"),
    (lambda a: a.is_multicast, "a multicast address"),
    (lambda a: a == _BROADCAST, "the broadcast address"),
    (lambda a: a.is_reserved, "a reserved address (240.0.0.0/4)"),
)

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, as Service names
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_INSTANCE = re.compile(r"^([0-9.]{7,15}):([0-9]{1,5})$")
# Values echoed in error messages are cut: a request body may hold 64 KiB in one field, or
# nest lists a thousand deep (reprlib's own limits stop the recursion).
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80  # characters
_SHOWN.maxlevel = 3  # nesting levels
_MAX_NAMES_SHOWN = 5  # unknown field names listed in one error


class RegistrationError(ValueError):
    """A registration request that cannot be taken; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Registration:
    name: str
    namespace: str
    address: str
    port: int
    version: str
    service_account: str
    ttl: float  # seconds without a heartbeat before it expires
    registered_at: float  # wall clock
    last_heartbeat: float

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def instance(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def key(self) -> str:
        """Unique per instance: "namespace/name@address:port" (also its workload key)."""
        return f"{self.service_key}@{self.instance}"

    @property
    def expires_at(self) -> float:
        return self.last_heartbeat + self.ttl

    def healthy(self, now: float) -> bool:
        return now <= self.expires_at

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "address": self.address, "port": self.port,
                "version": self.version, "service_account": self.service_account, "ttl_s": self.ttl,
                "registered_at": self.registered_at, "last_heartbeat": self.last_heartbeat,
                "health": "healthy" if self.healthy(now) else "expired",
                "expires_in_s": round(self.expires_at - now, 3)}


def shown(value: object) -> str:
    """`value` as an error message shows it: its repr, cut to a few levels and characters."""
    return _SHOWN.repr(value)


def _cut(text: str) -> str:
    """`text` (from a URL) cut to what an error message shows."""
    return text if len(text) <= _SHOWN.maxstring else text[:_SHOWN.maxstring - 3] + "..."


def parse_ttl(value: object) -> float:
    """Seconds from 30, 30.5, "30", "30s", "500ms", "2m" or "1h"; RegistrationError otherwise."""
    if isinstance(value, bool):
        raise RegistrationError(f"ttl: must be a duration like 30s, got {shown(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match[1]) * _UNITS[match[2]]
    else:
        raise RegistrationError(f"ttl: must be a duration like 30s, 500ms, 2m or 1h, got {shown(value)}")
    if not 1.0 <= seconds <= MAX_TTL:
        raise RegistrationError(f"ttl: must be between 1s and 24h, got {shown(value)}")
    return seconds


def parse_address(value: object) -> str:
    """The dotted IPv4 address a registration may name; RegistrationError saying why not."""
    if not isinstance(value, str):  # ipaddress would take 2130706433 for 127.0.0.1
        raise RegistrationError(f"address: must be an IPv4 address written as a string like \"192.168.7.20\", "
                                f"got {shown(value)}")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise RegistrationError(f"address: must be an IPv4 address, got {shown(value)}") from None
    for refused, what in _REFUSED_ADDRESSES:
        if refused(address):
            raise RegistrationError(f"address: {address} is {what}; a registration must name an address "
                                    "other nodes can reach")
    return str(address)


def parse_port(value: object, reserved: Collection[int] = RESERVED_PORTS) -> int:
    """A workload's port number; RegistrationError for anything else or a ztunnel port."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RegistrationError(f"port: must be an integer 1-65535, got {shown(value)}")
    if value in reserved:
        raise RegistrationError(f"port: {value} is one of the ztunnel's own ports "
                                f"({', '.join(map(str, sorted(reserved)))}), on every node; a registration "
                                "must name a workload's port")
    return value


def parse_instance(text: str) -> str:
    """"address:port" of a query's instance=, normalised; RegistrationError if it is not one."""
    match = _INSTANCE.match(text)
    if match is not None and 1 <= int(match[2]) <= 65535:
        try:
            return f"{ipaddress.IPv4Address(match[1])}:{int(match[2])}"
        except ValueError:
            pass
    raise RegistrationError(f"instance: must be ADDRESS:PORT like 192.168.7.20:8443, got {shown(text)}")


def _validate(spec: Mapping[str, Any], reserved_ports: Collection[int]) -> dict[str, Any]:
    """The checked fields of a registration request, with defaults; every problem at once."""
    if not isinstance(spec, Mapping):
        raise RegistrationError("the request body must be a JSON object")
    problems = []
    unknown = sorted(str(name) for name in set(spec) - set(FIELDS))
    if unknown:
        names = ", ".join(_cut(name) for name in unknown[:_MAX_NAMES_SHOWN])
        more = f" and {len(unknown) - _MAX_NAMES_SHOWN} more" if len(unknown) > _MAX_NAMES_SHOWN else ""
        problems.append(f"unknown field(s) {names}{more} (known: {', '.join(FIELDS)})")
    out: dict[str, Any] = {}
    for field, default in (("name", None), ("namespace", DEFAULT_NAMESPACE), ("service_account", "default")):
        value = spec.get(field, default)
        if not isinstance(value, str) or not _DNS_LABEL.match(value):
            problems.append(f"{field}: must be a DNS label (lowercase letters, digits, '-'; at most 63), "
                            f"got {shown(value)}")
        out[field] = value
    version = spec.get("version", "")
    if not isinstance(version, str) or len(version) > 63:
        problems.append(f"version: must be a string of at most 63 characters, got {shown(version)}")
    out["version"] = version
    for field, default, parse in (("address", None, parse_address),
                                  ("port", None, lambda v: parse_port(v, reserved_ports)),
                                  ("ttl", DEFAULT_TTL, parse_ttl)):
        try:
            out[field] = parse(spec.get(field, default))
        except RegistrationError as e:
            problems.append(str(e))
    if problems:
        raise RegistrationError("; ".join(problems))
    return out


class RegistrationStore:
    """The registrations one agent holds, indexed by instance, by name and by address.

    Each change is also noted (see `take_changes`) so that `MergedRegistry` can follow it
    without looking at the other registrations.
    """

    def __init__(self, clock: Callable[[], float] = time.time,
                 reserved_ports: Iterable[int] = RESERVED_PORTS) -> None:
        self._clock = clock
        self._reserved_ports = frozenset(reserved_ports)
        self._by_key: dict[str, Registration] = {}
        # The same registrations by "namespace/name" and by address, each in registration order
        # (a heartbeat keeps a registration's place; registering again puts it last).
        self._by_service: dict[str, dict[str, Registration]] = {}
        self._by_address: dict[str, dict[str, Registration]] = {}
        # (expires at, key), a heap; an entry whose registration has had a heartbeat since, or
        # is gone, is stale and skipped when it comes to the top.
        self._expiries: list[tuple[float, str]] = []
        # key -> (the registration as last known, whether it took a new place in its order):
        # the changes since the last `take_changes`.
        self._changes: dict[str, tuple[Registration, bool]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def register(self, spec: Mapping[str, Any]) -> Registration:
        """Adds a registration; RegistrationError (400 bad field, 409 name taken) changes nothing."""
        fields = _validate(spec, self._reserved_ports)
        key = f"{fields['namespace']}/{fields['name']}@{fields['address']}:{fields['port']}"
        if key in self._by_key:
            raise RegistrationError(f"{key} is already registered (send heartbeats to it, or deregister it first)",
                                    409)
        if len(self._by_key) >= MAX_REGISTRATIONS:
            raise RegistrationError(f"this agent holds {MAX_REGISTRATIONS} registrations already", 507)
        now = self._clock()
        registration = Registration(registered_at=now, last_heartbeat=now, **fields)
        self._put(registration)
        self._changes.pop(key, None)  # changes apply in order: this one comes after the others
        self._changes[key] = (registration, True)
        return registration

    def heartbeat(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """Marks the instances of `name` (or the one at `instance`, "address:port") alive now,
        reviving expired ones; 404 if there are none."""
        now = self._clock()
        beaten = []
        for registration in self.find(namespace, name, instance):
            alive = replace(registration, last_heartbeat=now)
            self._put(alive)
            if not registration.healthy(now):  # revived: its endpoint and workload are ready again
                self._changes.setdefault(alive.key, (alive, False))
            beaten.append(alive)
        return beaten

    def deregister(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """Removes the instances of `name` (or the one at `instance`); 404 if there are none."""
        removed = self.find(namespace, name, instance)
        for registration in removed:
            key = registration.key
            del self._by_key[key]
            for index, group in ((self._by_service, registration.service_key),
                                 (self._by_address, registration.address)):
                del index[group][key]
                if not index[group]:
                    del index[group]
            self._changes[key] = (registration, False)
        return removed

    def find(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """The instances of `name` (or the one at `instance`); RegistrationError 400 for a bad
        instance, 404 if none."""
        instances = self._by_service.get(f"{namespace}/{name}", {})
        if instance is None:
            found = list(instances.values())
        else:
            at = instances.get(f"{namespace}/{name}@{parse_instance(instance)}")
            found = [at] if at else []
        if not found:
            where = f" at {_cut(instance)}" if instance else ""
            raise RegistrationError(f"{_cut(f'{namespace}/{name}')}{where} is not registered", 404)
        return found

    def get(self, key: str) -> Registration | None:
        """The registration "namespace/name@address:port", if there is one."""
        return self._by_key.get(key)

    def all(self) -> list[Registration]:
        return sorted(self._by_key.values(), key=lambda r: r.key)

    def service_keys(self) -> Iterable[str]:
        """Every "namespace/name" with registered instances."""
        return self._by_service.keys()

    def of_service(self, service_key: str) -> Iterable[Registration]:
        """The instances registered as "namespace/name", in registration order."""
        return self._by_service.get(service_key, {}).values()

    def at_address(self, address: str) -> Registration | None:
        """The first registration at `address` still registered: the one that stands for it."""
        return next(iter(self._by_address.get(address, {}).values()), None)

    def take_changes(self) -> list[tuple[Registration, bool]]:
        """Each registration changed since the last call (registered, deregistered, revived or
        expired), as last known, with whether it took a new place in the registration order."""
        now = self._clock()
        while self._expiries and self._expiries[0][0] < now:
            _, key = heapq.heappop(self._expiries)
            registration = self._by_key.get(key)  # None, or healthy after a heartbeat: a stale entry
            if registration is not None and not registration.healthy(now) and key not in self._changes:
                self._changes[key] = (registration, False)
        if not self._changes:  # the usual case: read for every connection
            return []
        changes, self._changes = list(self._changes.values()), {}
        return changes

    def _put(self, registration: Registration) -> None:
        key = registration.key
        self._by_key[key] = registration
        self._by_service.setdefault(registration.service_key, {})[key] = registration
        self._by_address.setdefault(registration.address, {})[key] = registration
        heapq.heappush(self._expiries, (registration.expires_at, key))
        self._compact_expiries()

    def _compact_expiries(self) -> None:
        """Keeps the heap at most about twice the registrations: rebuilt in one pass (O(n),
        ~5 ms at 10,000) once heartbeats have left more stale entries than live ones, so at most
        once per 1,024 + n heartbeats."""
        if len(self._expiries) > 2 * len(self._by_key) + 1024:
            self._expiries = [(r.expires_at, r.key) for r in self._by_key.values()]
            heapq.heapify(self._expiries)


class MergedState(RegistryState):
    """A base state with registrations' workloads and Services on top, held in persistent maps
    so the next snapshot shares all but what changed; the tuples of every workload and
    Service, read only by listings and counts, are built on first read."""

    _base: RegistryState
    _registered_workloads: immutables.Map[str, Workload]  # address -> the workload registered there
    _registered_workload_keys: immutables.Map[str, Workload]  # the same by workload key
    # "namespace/name" -> a base Service with registered endpoints added, or a headless one
    _registered_services: immutables.Map[str, Service]
    # its place in its MergedRegistry's ChangeLog (keys: addresses of registered workloads, Service
    # keys), where registry/replica.py reads what changed since an older snapshot; None for a copy
    # no registry publishes (a worker's replica)
    _log: ChangeLog | None

    def __init__(self, base: RegistryState, workloads: immutables.Map[str, Workload],
                 workload_keys: immutables.Map[str, Workload], services: immutables.Map[str, Service],
                 log: ChangeLog | None = None) -> None:
        for name, value in (("generation", base.generation), ("_base", base), ("_registered_workloads", workloads),
                            ("_registered_workload_keys", workload_keys), ("_registered_services", services),
                            ("_log", log)):
            object.__setattr__(self, name, value)

    @cached_property
    def workloads(self) -> tuple[Workload, ...]:  # type: ignore[override]
        return self._base.workloads + tuple(w for w in self._registered_workloads.values()
                                            if self._base.workload_by_ip(w.ip) is None)

    @cached_property
    def services(self) -> tuple[Service, ...]:  # type: ignore[override]
        registered = self._registered_services
        return (tuple(registered.get(s.key, s) for s in self._base.services)
                + tuple(s for s in registered.values() if self._base.service_by_key(s.key) is None))

    def workload_by_ip(self, ip: str) -> Workload | None:
        # A pod keeps its address: a registration there adds no workload.
        return self._base.workload_by_ip(ip) or self._registered_workloads.get(ip)

    def workload_by_key(self, key: str) -> Workload | None:
        return self._base.workload_by_key(key) or self._registered_workload_keys.get(key)

    def service_by_ip(self, ip: str) -> Service | None:
        service = self._base.service_by_ip(ip)  # a registration never makes a Service with a cluster IP
        return self._registered_services.get(service.key, service) if service else None

    def service_by_key(self, key: str) -> Service | None:
        return self._registered_services.get(key) or self._base.service_by_key(key)

    def enrolled_on(self, node: str) -> tuple[Workload, ...]:
        return self._base.enrolled_on(node)  # a registered workload is never enrolled

    # Policies come from the base state alone: a registration never carries one.
    @property
    def authorization_policies(self) -> tuple[AuthorizationPolicy, ...]:  # type: ignore[override]
        return self._base.authorization_policies

    @property
    def peer_authentications(self) -> tuple[PeerAuthentication, ...]:  # type: ignore[override]
        return self._base.peer_authentications

    def authorization_policies_in(self, namespace: str) -> tuple[AuthorizationPolicy, ...]:
        return self._base.authorization_policies_in(namespace)

    @property
    def node_zones(self) -> Mapping[str, str]:  # type: ignore[override]
        return self._base.node_zones  # a registration says nothing of nodes


class MergedRegistry:
    """The registry state of a base state plus a store's registrations, kept current by change:
    each registration change touches its one Service and its one address, and the next
    snapshot shares everything else with the last. A new base state (the file or the API server
    changed) rebuilds only the registered Services whose Service in it changed (their ports and
    first endpoints come from it): a pod's churn costs nothing here."""

    def __init__(self, store: RegistrationStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._base: RegistryState | None = None
        self._snapshot: RegistryState | None = None
        # "namespace/name" -> registration key -> its endpoint, in registration order
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self._headless_ports: dict[str, Counter[int]] = {}  # "namespace/name" -> port -> instances
        self._workloads: immutables.Map[str, Workload] = immutables.Map()  # by address
        self._workload_keys: immutables.Map[str, Workload] = immutables.Map()  # by workload key
        self._services: immutables.Map[str, Service] = immutables.Map()  # by "namespace/name"
        self._log = ChangeLog()  # the place of the snapshot last made

    def state(self, base: RegistryState) -> RegistryState:
        """`base` with every registration added as a workload and an endpoint of its Service."""
        changes = self._store.take_changes()
        if base is self._base and not changes and self._snapshot is not None:
            return self._snapshot
        now = self._clock()
        rebuilt: set[str] = set()
        if base is not self._base:  # the registered Services whose base Service changed start again from it
            old, self._base = self._base, base
            rebuilt = {key for key in self._store.service_keys()
                       if old is None or old.service_by_key(key) != base.service_by_key(key)}
            for service_key in rebuilt:
                self._endpoints.pop(service_key, None)
                self._headless_ports.pop(service_key, None)
                for registration in self._store.of_service(service_key):
                    self._change_endpoint(registration, True, now)
        for registration, placed in changes:
            if registration.service_key not in rebuilt:
                self._change_endpoint(registration, placed, now)
        services = rebuilt | {registration.service_key for registration, _ in changes}
        with self._services.mutate() as changed_services:
            for service_key in services:
                service = self._service(service_key)
                if service is not None:
                    changed_services[service_key] = service
                elif service_key in changed_services:
                    del changed_services[service_key]
            self._services = changed_services.finish()
        addresses = {registration.address for registration, _ in changes}
        for address in addresses:
            self._change_workload(address, now)
        self._log = self._log.record(addresses, services)
        self._snapshot = (MergedState(base, self._workloads, self._workload_keys, self._services, self._log)
                          if self._workloads or self._services else base)
        return self._snapshot

    def _change_endpoint(self, registration: Registration, placed: bool, now: float) -> None:
        """Follows one registration in its Service's endpoints: removed if it is no longer
        registered, last if it took a new place, else where it was."""
        key, service_key = registration.key, registration.service_key
        current = self._store.get(key)
        endpoints = self._endpoints.setdefault(service_key, {})
        had = endpoints.pop(key, None) if placed or current is None else endpoints.get(key)
        if current is not None:
            endpoints[key] = self._endpoint(current, now)
        if had is None and current is not None:
            self._headless_ports.setdefault(service_key, Counter())[registration.port] += 1
        elif had is not None and current is None:
            ports = self._headless_ports[service_key]
            ports[registration.port] -= 1
            if ports[registration.port] == 0:
                del ports[registration.port]
        if not endpoints:
            del self._endpoints[service_key]
            self._headless_ports.pop(service_key, None)

    def _endpoint(self, registration: Registration, now: float) -> Endpoint:
        assert self._base is not None
        service = self._base.service_by_key(registration.service_key)
        ports = ({p.name: registration.port for p in service.ports} if service
                 else {str(registration.port): registration.port})
        return Endpoint(registration.address, ports, registration.healthy(now), registration.key, SOURCE)

    def _service(self, service_key: str) -> Service | None:
        """The Service registrations make of "namespace/name": the base's with their endpoints
        added, or a headless one; None without registrations."""
        assert self._base is not None
        endpoints = tuple(self._endpoints.get(service_key, {}).values())
        if not endpoints:
            return None
        service = self._base.service_by_key(service_key)
        if service is not None:
            return replace(service, endpoints=service.endpoints + endpoints)
        namespace, _, name = service_key.partition("/")
        ports = tuple(ServicePort(port, port, str(port)) for port in sorted(self._headless_ports[service_key]))
        return Service(name, namespace, "", ports, endpoints=endpoints, source=SOURCE)

    def _change_workload(self, address: str, now: float) -> None:
        """Follows the workload at one address: the first registration still there stands for it."""
        standing = self._store.at_address(address)
        self._workloads, self._workload_keys = place_registered(
            self._workloads, self._workload_keys, address, _workload(standing, now) if standing else None)


def place_registered(by_address: immutables.Map[str, Workload], by_key: immutables.Map[str, Workload],
                     address: str, workload: Workload | None) -> tuple[immutables.Map[str, Workload],
                                                                        immutables.Map[str, Workload]]:
    """The indexes of registered workloads by address and by key with `workload` (None: none)
    standing for `address`."""
    old = by_address.get(address)
    if old is not None:
        by_key = by_key.delete(old.key)
    if workload is None:
        return (by_address.delete(address) if old is not None else by_address), by_key
    return by_address.set(address, workload), by_key.set(workload.key, workload)


def _workload(registration: Registration, now: float) -> Workload:
    labels = {"app": registration.name}
    if registration.version:
        labels["version"] = registration.version
    return Workload(f"{registration.name}@{registration.instance}", registration.namespace, registration.address,
                    node="", service_account=registration.service_account, labels=labels,
                    ready=registration.healthy(now), enrolled=False, source=SOURCE)
