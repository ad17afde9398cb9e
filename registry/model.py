"""The workload and service model every registry source produces and the ztunnel reads.

A source builds a whole `RegistryState` and swaps it in at once, so readers always see one
consistent snapshot and never a half-applied change. Registrations (registry/registrations.py)
are layered on a source's state change by change instead: their `MergedState` is a RegistryState
too, whose indexes are persistent maps shared between one snapshot and the next.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # registry.policies reads objects through registry.objects, which imports this module
    from registry.policies import AuthorizationPolicy, PeerAuthentication

ENROLL_LABEL = "amesh.io/dataplane-mode"
ENROLL_AMBIENT = "ambient"
ENROLL_NONE = "none"
# Namespace label choosing how enrolled pods there treat plaintext that reaches them directly:
# STRICT refuses it, PERMISSIVE delivers it (marked as not mutually authenticated). Unset: the
# agent's default (--mtls-mode).
MTLS_MODE_LABEL = "amesh.io/mtls-mode"
MTLS_MODES = ("STRICT", "PERMISSIVE")


class RegistryError(ValueError):
    """The registry input is invalid; the message names the document, object and field."""


@dataclass(frozen=True)
class Workload:
    """One pod (or, later, a registered workload outside Kubernetes)."""

    name: str
    namespace: str
    ip: str
    node: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    enrolled: bool = False
    source: str = "file"
    mtls_mode: str = ""  # "STRICT", "PERMISSIVE", or "" for the agent's default

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    """A port a Service exposes and the endpoint port it maps to."""

    port: int
    target_port: int | str  # a number, or the name of a container port on each endpoint
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Endpoint:
    """One backend of a Service: an address and its port numbers by service-port name."""

    ip: str
    ports: Mapping[str, int]  # service-port name -> endpoint port
    ready: bool = True
    workload: str | None = None  # "namespace/name" of the pod behind it, when known
    source: str = ""  # where it came from when not from its Service's source ("registration")


@dataclass(frozen=True)
class Service:
    """A Service reached through its cluster IP."""

    name: str
    namespace: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    endpoints: tuple[Endpoint, ...] = ()
    source: str = "file"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self, number: int) -> ServicePort | None:
        """The service port exposed as `number`, if any."""
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True)
class RegistryState:
    """One consistent snapshot of the mesh: workloads and services, indexed by address."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    generation: int = 0
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()

    def __post_init__(self) -> None:
        # A pod that has no address yet must not claim "" as its address.
        object.__setattr__(self, "_by_ip", {w.ip: w for w in self.workloads if w.ip})
        object.__setattr__(self, "_by_vip", {s.cluster_ip: s for s in self.services if s.cluster_ip})
        object.__setattr__(self, "_by_key", {w.key: w for w in self.workloads})
        object.__setattr__(self, "_services_by_key", {s.key: s for s in self.services})
        by_namespace: dict[str, list[AuthorizationPolicy]] = {}
        for policy in self.authorization_policies:
            by_namespace.setdefault(policy.namespace, []).append(policy)
        object.__setattr__(self, "_policies_by_namespace", {ns: tuple(ps) for ns, ps in by_namespace.items()})

    def authorization_policies_in(self, namespace: str) -> tuple[AuthorizationPolicy, ...]:
        """The AuthorizationPolicies of one namespace."""
        return self._policies_by_namespace.get(namespace, ())  # type: ignore[attr-defined]

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)  # type: ignore[attr-defined]

    def workload_by_key(self, key: str) -> Workload | None:
        """The workload "namespace/name"."""
        return self._by_key.get(key)  # type: ignore[attr-defined]

    def service_by_ip(self, ip: str) -> Service | None:
        return self._by_vip.get(ip)  # type: ignore[attr-defined]

    def service_by_key(self, key: str) -> Service | None:
        """The Service "namespace/name"."""
        return self._services_by_key.get(key)  # type: ignore[attr-defined]

    def enrolled_on(self, node: str) -> tuple[Workload, ...]:
        """Enrolled workloads scheduled on `node` that have an address."""
        return tuple(w for w in self.workloads if w.node == node and w.enrolled and w.ip)


def is_ipv4(text: str) -> bool:
    """True when `text` is a dotted IPv4 address."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
