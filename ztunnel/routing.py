"""Where a captured outbound connection goes: a Service backend, a known pod, or straight through.

Pure logic over one `RegistryState` snapshot; no sockets. The state kept between calls is the
round-robin position of each (service, port) and the weighted round-robin of each split Service
(ztunnel/balancing.py), so the caller keeps one `Router` for the life of the proxy; the live
connection counts LEAST_REQUEST reads and the random source are given to it.

A Service's plan, from its TrafficPolicy:
  split         a weighted split picks a backend Service (smooth weighted round-robin); the
                connection balances over that backend's endpoints, and its retries go to that
                backend's other endpoints first, then to the other backends, heaviest first, so a
                dead canary costs the client nothing. A backend's own split is not followed.
  prefer_close  endpoints on this node, then in its zone, then the rest: farther ones only when
                the closer ones are ejected or absent (a retry goes on to the next tier)
  load_balancer the first endpoint of a tier: ROUND_ROBIN, RANDOM or LEAST_REQUEST (power of two
                choices over the live connections from this node); retries take the tier's
                others in rotation order after it
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Collection, Iterator, Literal, Mapping

from registry.model import Backend, Endpoint, OutlierSettings, RegistryState, Service, Workload
from ztunnel.balancing import Place, WeightedSplits, balance, locality_tiers
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

    @cached_property  # read by the breakers and the live counts at every attempt
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Pool:
    """The endpoints of one Service a plan draws on: how many, and that Service's settings."""

    size: int  # ready endpoints the Service has for the port (ejected ones included)
    outlier: OutlierSettings = OutlierSettings()
    connect_timeout: float | None = None  # seconds per attempt; None: the listener's


@dataclass(frozen=True)
class Plan:
    """Where a connection may go, in order: the balancer's choice first, then the endpoints a
    failed connect may be retried on; `attempts` bounds how many of them are tried."""

    candidates: tuple[Upstream, ...]
    attempts: int = 1
    pools: Mapping[str, Pool] = field(default_factory=dict)  # by the Service key of the candidates
    service: str | None = None  # the Service dialled (a split's own key, not its backend's)
    rate_limit: float | None = None  # the dialled Service's new connections per second from this node
    max_connections: int | None = None  # the dialled Service's live connections from this node at once

    @property
    def first(self) -> Upstream:
        return self.candidates[0]

    def pool(self, service: str) -> Pool:
        """The pool of a candidate's Service."""
        return self.pools[service]


@dataclass(frozen=True)
class _Ready:
    """One Service's ready endpoints for one port, as plans use them, ordered by address."""

    upstreams: tuple[Upstream, ...]
    addresses: tuple[str, ...]  # each one's "ip:port"
    places: tuple[Place, ...]  # each one's node and zone
    pool: Pool


class RouteError(ProxyError):
    """The registry says the destination cannot be served; the client's request, not our fault."""


Load = Callable[[str], Mapping[str, int]]  # service key -> live connections from this node by "ip:port"
Unavailable = Callable[[str], Collection[str]]  # service key -> its endpoints ("ip:port") not to plan


class Router:
    """Chooses the upstreams for (destination IP, port): a Service's by its TrafficPolicy."""

    def __init__(self, node: str = "", rng: random.Random | None = None) -> None:
        # One ever-increasing counter per (service key, port), taken modulo the candidates of
        # the moment: when endpoints come or go the rotation carries on from where it was
        # instead of restarting at the first endpoint, which would overload it.
        self._turns: dict[tuple[str, int], int] = {}
        self.splits = WeightedSplits()  # read by views and metrics: connections per backend
        self._node = node  # this node, for PreferClose (its zone: as the registry says)
        self._random = rng if rng is not None else random.Random()
        # Each Service's ready endpoints sorted, formatted and placed once per registry state,
        # not per connection: (id of the Service, port) -> (that Service, its endpoints).
        self._ready: dict[tuple[int, int], tuple[Service, _Ready | None]] = {}
        self._ready_state: RegistryState | None = None

    def plan(self, state: RegistryState, dst_ip: str, dst_port: int,
             unavailable: Unavailable = lambda service: (), load: Load = lambda service: {}) -> Plan:
        """Where a connection to `dst_ip`:`dst_port` may go; RouteError if nothing can serve it.
        A pod or an address outside the registry has one candidate; a Service its ready
        endpoints but those `unavailable(service key)` names ("ip:port": ejected by outlier
        detection), the balancer's choice first, at most the Service's connect attempts."""
        service = state.service_by_ip(dst_ip)
        if service is not None:
            if state is not self._ready_state:
                self._ready.clear()
                self._ready_state = state
            return self._to_service(state, service, dst_port, unavailable, load)
        workload = state.workload_by_ip(dst_ip)
        if workload is not None:
            return Plan((Upstream(dst_ip, dst_port, "workload", workload=workload.key),))
        return Plan((Upstream(dst_ip, dst_port, "passthrough"),))

    def _to_service(self, state: RegistryState, service: Service, port: int, unavailable: Unavailable,
                    load: Load) -> Plan:
        if service.port(port) is None:
            raise RouteError("no_service_port", f"service {service.key} does not expose port {port}")
        traffic = service.traffic
        pools: dict[str, Pool] = {}
        if traffic.split:
            backends = self.splits.order(service.key, traffic.split)
            routes: Iterator[Upstream] = itertools.chain.from_iterable(
                self._endpoints(state, _backend(state, service, b), b.port or port, unavailable, load, pools)
                for b in backends)
        else:
            routes = self._endpoints(state, service, port, unavailable, load, pools)
        candidates = tuple(itertools.islice(routes, traffic.connect_attempts))
        if not candidates:
            if traffic.split:
                names = ", ".join(f"{b.service} (weight {b.weight})" for b in traffic.split)
                raise RouteError("no_endpoint", f"service {service.key} is split to {names}: none of weight above "
                                                f"0 has a ready endpoint for port {port}")
            raise RouteError("no_endpoint", f"service {service.key} has no ready endpoint for port {port}")
        return Plan(candidates, len(candidates), pools, service.key, traffic.connection_rate, traffic.max_connections)

    def _endpoints(self, state: RegistryState, service: Service | None, port: int, unavailable: Unavailable,
                   load: Load, pools: dict[str, Pool]) -> Iterator[Upstream]:
        """`service`'s ready endpoints for `port` in the order one connection tries them; notes
        the Service's pool in `pools` before the first."""
        ready = self._ready_endpoints(state, service, port) if service is not None else None
        if service is None or ready is None:
            return
        traffic, key = service.traffic, service.key
        pools[key] = ready.pool
        positions: list[int] | range = range(len(ready.upstreams))
        # ejected endpoints are passed over; were all of them (never by ejection alone, which
        # leaves half), every ready endpoint is tried rather than none
        if excluded := unavailable(key):
            positions = [i for i in positions if ready.addresses[i] not in excluded] or positions
        turn_key = (key, port)
        turn = self._turns.get(turn_key, 0)
        self._turns[turn_key] = turn + 1
        tiers = ([[positions[j] for j in tier] for tier in
                  locality_tiers([ready.places[i] for i in positions], self._node, state.zone_of(self._node))]
                 if traffic.prefer_close else [positions])
        live = load(key) if traffic.load_balancer == "LEAST_REQUEST" else {}
        for tier in tiers:
            # the rotation from this turn on: a retry goes where the next connection would have gone
            for j in balance([ready.addresses[i] for i in tier], traffic.load_balancer, turn, self._random, live):
                yield ready.upstreams[tier[j]]

    def _ready_endpoints(self, state: RegistryState, service: Service, port: int) -> _Ready | None:
        """`service`'s ready endpoints for `port` (None if none), worked out once per registry state."""
        cached = self._ready.get((id(service), port))
        if cached is not None and cached[0] is service:
            return cached[1]
        service_port = service.port(port)
        ready = None
        if service_port is not None:
            name = service_port.name
            endpoints = sorted((ep for ep in service.endpoints if ep.ready and name in ep.ports),
                               key=lambda ep: (ep.ip, ep.ports[name]))
            if endpoints:
                upstreams = tuple(Upstream(ep.ip, ep.ports[name], "service", service=service.key,
                                           workload=_endpoint_workload(state, ep)) for ep in endpoints)
                ready = _Ready(upstreams, tuple(u.address for u in upstreams),
                               tuple(_place(state, ep) for ep in endpoints),
                               Pool(len(endpoints), service.traffic.outlier, service.traffic.connect_timeout))
        self._ready[(id(service), port)] = (service, ready)
        return ready


def _backend(state: RegistryState, parent: Service, backend: Backend) -> Service | None:
    """The Service a split's backend names: the split Service itself (its own endpoints), or another."""
    return parent if backend.service == parent.key else state.service_by_key(backend.service)


def _place(state: RegistryState, endpoint: Endpoint) -> Place:
    """An endpoint's node (as its EndpointSlice says, else its pod's) and zone."""
    if endpoint.node is not None:
        return endpoint.node, endpoint.zone
    workload = state.workload_by_ip(endpoint.ip)
    return (workload.node if workload is not None else None), endpoint.zone


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
