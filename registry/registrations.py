"""Workloads outside Kubernetes that join by registering: a name, an address, a port.

As in the simple service registries teams start with: register, look up, keep alive with
heartbeats, deregister. A name may have many instances (one per address and port). A registration is healthy while heartbeats (or the registration itself)
arrive within its TTL; then it expires and its endpoint stops receiving new connections, until a
heartbeat revives it. A registration joins the Service of the same name and namespace as one
more endpoint (serving each of the Service's ports on its one port), or, with no such Service,
stands as a headless one that `lookup` finds.

Pure: `RegistrationStore` takes the time from a clock it is given, and `merge` builds a new
`RegistryState`; the admin API is the only I/O around them.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from registry.model import Endpoint, RegistryState, Service, ServicePort, Workload

SOURCE = "registration"
DEFAULT_NAMESPACE = "default"
DEFAULT_TTL = 30.0  # seconds
MAX_TTL = 24 * 3600.0  # seconds
MAX_REGISTRATIONS = 10_000  # a bound, so a misbehaving client cannot grow the agent without end
FIELDS = ("name", "address", "port", "version", "namespace", "service_account", "ttl")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, as Service names
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


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

    def healthy(self, now: float) -> bool:
        return now - self.last_heartbeat <= self.ttl

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "address": self.address, "port": self.port,
                "version": self.version, "service_account": self.service_account, "ttl_s": self.ttl,
                "registered_at": self.registered_at, "last_heartbeat": self.last_heartbeat,
                "health": "healthy" if self.healthy(now) else "expired",
                "expires_in_s": round(self.last_heartbeat + self.ttl - now, 3)}


def parse_ttl(value: object) -> float:
    """Seconds from 30, 30.5, "30", "30s", "500ms", "2m" or "1h"; RegistrationError otherwise."""
    if isinstance(value, bool):
        raise RegistrationError(f"ttl: must be a duration like 30s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match[1]) * _UNITS[match[2]]
    else:
        raise RegistrationError(f"ttl: must be a duration like 30s, 500ms, 2m or 1h, got {value!r}")
    if not 1.0 <= seconds <= MAX_TTL:
        raise RegistrationError(f"ttl: must be between 1s and 24h, got {value!r}")
    return seconds


def _validate(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The checked fields of a registration request, with defaults; every problem at once."""
    if not isinstance(spec, Mapping):
        raise RegistrationError("the request body must be a JSON object")
    problems = []
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    out: dict[str, Any] = {}
    for field, default in (("name", None), ("namespace", DEFAULT_NAMESPACE), ("service_account", "default")):
        value = spec.get(field, default)
        if not isinstance(value, str) or not _DNS_LABEL.match(value):
            problems.append(f"{field}: must be a DNS label (lowercase letters, digits, '-'; at most 63), "
                            f"got {value!r}")
        out[field] = value
    address = spec.get("address")
    try:
        out["address"] = str(ipaddress.IPv4Address(address))  # type: ignore[arg-type]
    except (ipaddress.AddressValueError, ValueError, TypeError):
        problems.append(f"address: must be an IPv4 address, got {address!r}")
    port = spec.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(f"port: must be an integer 1-65535, got {port!r}")
    out["port"] = port
    version = spec.get("version", "")
    if not isinstance(version, str) or len(version) > 63:
        problems.append(f"version: must be a string of at most 63 characters, got {version!r}")
    out["version"] = version
    try:
        out["ttl"] = parse_ttl(spec.get("ttl", DEFAULT_TTL))
    except RegistrationError as e:
        problems.append(str(e))
    if problems:
        raise RegistrationError("; ".join(problems))
    return out


class RegistrationStore:
    """The registrations one agent holds, by "namespace/name"."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_key: dict[str, Registration] = {}
        self.generation = 0  # bumped by every change, so readers can tell when to rebuild

    def register(self, spec: Mapping[str, Any]) -> Registration:
        """Adds a registration; RegistrationError (400 bad field, 409 name taken) changes nothing."""
        fields = _validate(spec)
        key = f"{fields['namespace']}/{fields['name']}@{fields['address']}:{fields['port']}"
        if key in self._by_key:
            raise RegistrationError(f"{key} is already registered (send heartbeats to it, or deregister it first)",
                                    409)
        if len(self._by_key) >= MAX_REGISTRATIONS:
            raise RegistrationError(f"this agent holds {MAX_REGISTRATIONS} registrations already", 507)
        now = self._clock()
        registration = Registration(registered_at=now, last_heartbeat=now, **fields)
        self._by_key[key] = registration
        self.generation += 1
        return registration

    def heartbeat(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """Marks the instances of `name` (or the one at `instance`, "address:port") alive now,
        reviving expired ones; 404 if there are none."""
        now = self._clock()
        beaten = [replace(r, last_heartbeat=now) for r in self.find(namespace, name, instance)]
        for registration in beaten:
            self._by_key[registration.key] = registration
        self.generation += 1
        return beaten

    def deregister(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """Removes the instances of `name` (or the one at `instance`); 404 if there are none."""
        removed = [self._by_key.pop(r.key) for r in self.find(namespace, name, instance)]
        self.generation += 1
        return removed

    def find(self, namespace: str, name: str, instance: str | None = None) -> list[Registration]:
        """The instances of `name` (or the one at `instance`); RegistrationError 404 if none."""
        found = [r for r in self.all() if r.service_key == f"{namespace}/{name}"
                 and (instance is None or r.instance == instance)]
        if not found:
            where = f" at {instance}" if instance else ""
            raise RegistrationError(f"{namespace}/{name}{where} is not registered", 404)
        return found

    def all(self) -> list[Registration]:
        return sorted(self._by_key.values(), key=lambda r: r.key)

    def healthy_changes_at(self) -> float | None:
        """The next time a registration's health changes by itself (it expires); None if never."""
        now = self._clock()
        expiries = [r.last_heartbeat + r.ttl for r in self._by_key.values() if r.healthy(now)]
        return min(expiries, default=None)


def merge(state: RegistryState, registrations: list[Registration], now: float) -> RegistryState:
    """`state` with each registration added as a workload and as an endpoint of its Service."""
    if not registrations:
        return state
    by_service: dict[str, list[Registration]] = {}
    for registration in registrations:
        by_service.setdefault(registration.service_key, []).append(registration)
    services = []
    for service in state.services:
        joining = by_service.pop(service.key, [])
        extra = tuple(Endpoint(r.address, {p.name: r.port for p in service.ports}, r.healthy(now), r.key, SOURCE)
                      for r in joining)
        services.append(replace(service, endpoints=service.endpoints + extra) if extra else service)
    for joining in by_service.values():  # no Service of that name: a headless one, for lookup
        first = joining[0]
        ports = tuple(sorted({ServicePort(r.port, r.port, str(r.port)) for r in joining}, key=lambda p: p.port))
        endpoints = tuple(Endpoint(r.address, {str(r.port): r.port}, r.healthy(now), r.key, SOURCE) for r in joining)
        services.append(Service(first.name, first.namespace, "", ports, endpoints=endpoints, source=SOURCE))
    # One workload per address: a pod keeps its IP, and of two registrations at one address the
    # first (by name) stands for it.
    workloads, taken = list(state.workloads), {w.ip for w in state.workloads}
    for registration in registrations:
        if registration.address not in taken:
            taken.add(registration.address)
            workloads.append(_workload(registration, now))
    return replace(state, workloads=tuple(workloads), services=tuple(services))


def _workload(registration: Registration, now: float) -> Workload:
    labels = {"app": registration.name}
    if registration.version:
        labels["version"] = registration.version
    return Workload(f"{registration.name}@{registration.instance}", registration.namespace, registration.address,
                    node="",
                    service_account=registration.service_account, labels=labels, ready=registration.healthy(now),
                    enrolled=False, source=SOURCE)
