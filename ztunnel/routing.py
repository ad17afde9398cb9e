"""Where a captured outbound connection goes: a Service backend, a known pod, or straight through.

Pure logic over one `RegistryState` snapshot; no sockets. The only state kept between calls is
the round-robin position of each (service, port), so the caller keeps one `Router` for the life
of the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Literal

from registry.model import Endpoint, RegistryState, Service, Workload
from ztunnel.errors import ProxyError

UpstreamKind = Literal["service", "workload", "passthrough"]


@dataclass(frozen=True)
class Upstream:
    """The address to connect to for one connection, and what it belongs to."""

    ip: str
    port: int
    kind: UpstreamKind
    service: str | None = None  # "namespace/name" when the client dialled a Service IP
    workload: str | None = None  # "namespace/name" of the destination pod, when known

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Plan:
    """Where a connection may go, in order: the balancer's choice first, then other endpoints of
    the same Service (in rotation order) that a failed connect may be retried on; `attempts`
    bounds how many of them are tried."""

    candidates: tuple[Upstream, ...]
    attempts: int = 1
    pool: int = 1  # ready endpoints the Service has for the port (ejected ones included)
    rate_limit: float | None = None  # the Service's new connections per second from this node

    @property
    def first(self) -> Upstream:
        return self.candidates[0]


class RouteError(ProxyError):
    """The registry says the destination cannot be served; the client's request, not our fault."""


class Router:
    """Chooses an upstream for (destination IP, port), balancing Service traffic round-robin."""

    def __init__(self) -> None:
        # One ever-increasing counter per (service key, port), taken modulo the candidates of
        # the moment: when endpoints come or go the rotation carries on from where it was
        # instead of restarting at the first endpoint, which would overload it.
        self._turns: dict[tuple[str, int], int] = {}

    def plan(self, state: RegistryState, dst_ip: str, dst_port: int,
             unavailable: Callable[[str], Collection[str]] = lambda service: ()) -> Plan:
        """Where a connection to `dst_ip`:`dst_port` may go; RouteError if nothing can serve it.
        A pod or an address outside the registry has one candidate; a Service its ready
        endpoints but those `unavailable(service key)` names ("ip:port": ejected by outlier
        detection), the balancer's choice first, at most the Service's connect attempts."""
        service = state.service_by_ip(dst_ip)
        if service is not None:
            return self._to_service(state, service, dst_port, unavailable)
        workload = state.workload_by_ip(dst_ip)
        if workload is not None:
            return Plan((Upstream(dst_ip, dst_port, "workload", workload=workload.key),))
        return Plan((Upstream(dst_ip, dst_port, "passthrough"),))

    def _to_service(self, state: RegistryState, service: Service, port: int,
                    unavailable: Callable[[str], Collection[str]]) -> Plan:
        service_port = service.port(port)
        if service_port is None:
            raise RouteError("no_service_port", f"service {service.key} does not expose port {port}")
        candidates = sorted(
            (ep for ep in service.endpoints if ep.ready and service_port.name in ep.ports),
            key=lambda ep: (ep.ip, ep.ports[service_port.name]),
        )
        if not candidates:
            raise RouteError("no_endpoint", f"service {service.key} has no ready endpoint for port {port}")
        pool = len(candidates)
        # ejected endpoints are passed over; were all of them (never by ejection alone, which
        # leaves half), every ready endpoint is tried rather than none
        if excluded := unavailable(service.key):
            candidates = [ep for ep in candidates
                          if f"{ep.ip}:{ep.ports[service_port.name]}" not in excluded] or candidates
        turn_key = (service.key, port)
        turn = self._turns.get(turn_key, 0)
        self._turns[turn_key] = turn + 1
        # the rotation from this turn on: a retry goes where the next connection would have gone
        attempts = min(service.traffic.connect_attempts, len(candidates))
        chosen = (candidates[(turn + i) % len(candidates)] for i in range(attempts))
        return Plan(tuple(Upstream(endpoint.ip, endpoint.ports[service_port.name], "service", service=service.key,
                                   workload=_endpoint_workload(state, endpoint)) for endpoint in chosen), attempts, pool,
                    service.traffic.connection_rate)


def _endpoint_workload(state: RegistryState, endpoint: Endpoint) -> str | None:
    """The pod behind an endpoint: as the endpoint names it, else as the registry knows its IP."""
    if endpoint.workload is not None:
        return endpoint.workload
    workload = state.workload_by_ip(endpoint.ip)
    return workload.key if workload is not None else None


class LoopError(ProxyError):
    """The connection would come back to the ztunnel itself; refused before any socket opens."""


def captured_source(state: RegistryState, node: str, ip: str) -> Workload:
    """The enrolled workload of `node` at `ip`: the only sources the capture program hands to
    the outbound listener. Anything else dialled the listener's port directly (a node address
    on port 15001, from a pod outside the mesh or from the ztunnel itself): serving it would
    proxy a connection that was never captured, and connecting onwards to ourselves loops."""
    workload = state.workload_by_ip(ip)
    if workload is None or not workload.enrolled or workload.node != node:
        raise LoopError("not_captured", f"connection from {ip} reached the outbound listener without capture: "
                                        f"only enrolled pods of node {node} are proxied outbound")
    return workload


def guard_self_loop(upstream: Upstream, own_ports: Collection[int],
                    node_addresses: Callable[[], Collection[str]]) -> None:
    """LoopError when `upstream` is one of this node's addresses on a port the ztunnel serves.
    The node's addresses are asked for only for those ports, which traffic almost never uses."""
    if upstream.port in own_ports and upstream.ip in node_addresses():
        raise LoopError("self_loop", f"{upstream.address} is this node's own ztunnel port {upstream.port}: "
                                     "connecting there would loop back into the ztunnel")
