"""The admin API on 127.0.0.1:15000: JSON views of the agent for `ameshctl` (including the
policies in force and `check`, a policy decision without a packet), POST /certs/renew and the
registrations. It is bound to loopback (node-local operators only) and never shows key material.
Whatever a request holds, the answer is a 4xx naming the problem, never a 500: bodies are cut at
MAX_BODY before they are parsed, JSON too deep for the parser is refused, and query parameters
are checked before use.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from aiohttp import web

from agent.config import ADMIN_HOST
from registry.model import AuthorizationPolicy
from registry.registrations import RegistrationError, shown
from ztunnel.authz import check_between
from ztunnel.connections import iso_utc
from ztunnel.outliers import OutlierDetector
from ztunnel.shaping import TrafficShaper

if TYPE_CHECKING:
    from agent.node import NodeAgent

T = TypeVar("T")

# The answer to a loopback registration when the agent follows the API server: there, one node's
# registration would reach no other node's pods; a WorkloadEntry reaches every agent.
KUBERNETES_REGISTRATION = (
    "this agent reads its registry from the Kubernetes API server, where a registration on one node's loopback "
    "would reach no other node: register through the API server instead, with `ameshctl register NAME --address "
    "ADDRESS --port PORT --kubeconfig FILE --ttl 30s` (or --in-cluster), which writes an Istio WorkloadEntry every "
    "agent reads (README: Registrations); loopback registrations are for agents with --registry-file")
MAX_BODY = 64 * 1024  # bytes; a registration is a flat object of a few short fields (~200 bytes)
_LIMIT = re.compile(r"^[1-9][0-9]{0,8}$")  # ?limit=N: ASCII digits, no more than int() takes at once


class AdminServer:
    """Serves the agent's views (GET) and its few operator actions (POST) as JSON."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        app = web.Application(middlewares=[_registration_errors], client_max_size=MAX_BODY)
        app.router.add_get("/status", self._status)
        app.router.add_get("/workloads", self._workloads)
        app.router.add_get("/services", self._services)
        app.router.add_get("/connections", self._connections)
        app.router.add_get("/certs", self._certs)
        app.router.add_get("/flows", self._flows)
        app.router.add_post("/certs/renew", self._renew_certs)
        app.router.add_get("/registrations", self._registrations)
        app.router.add_post("/registrations", self._register)
        app.router.add_post("/registrations/{namespace}/{name}/heartbeat", self._heartbeat)
        app.router.add_delete("/registrations/{namespace}/{name}", self._deregister)
        app.router.add_get("/lookup/{namespace}/{name}", self._lookup)
        app.router.add_get("/policies", self._policies)
        app.router.add_get("/check", self._check)
        app.router.add_post("/drain", self._drain)
        self.app = app
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, port: int) -> None:
        await self._runner.setup()
        # reuse_port: a new agent serves beside this one until this one drains (an upgrade)
        await web.TCPSite(self._runner, ADMIN_HOST, port, reuse_address=True, reuse_port=True).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.status())

    async def _workloads(self, request: web.Request) -> web.Response:
        captured = set(self.agent.local_enrolled_ips())
        node = self.agent.config.node
        return web.json_response([
            {**_plain(w), "key": w.key, "local": w.node == node, "captured": w.ip in captured}
            for w in sorted(self.agent.state.workloads, key=lambda w: w.key)
        ])

    async def _services(self, request: web.Request) -> web.Response:
        """Services with their endpoints, each with its breaker (outlier detection) state and
        live connections from this node; the Service's live connections and its split's counts."""
        outbound = self.agent.outbound
        # before the listener serves, nothing has been decided: an empty shaper says so
        shaper = outbound.shaper if outbound else TrafficShaper(self.agent.config.node)
        services = []
        for service in sorted(self.agent.state.services, key=lambda s: s.key):
            view = {**_plain(service), "key": service.key}
            live = shaper.live.endpoints(service.key)
            for endpoint in view["endpoints"]:
                endpoint["breaker"] = breaker_view(shaper.outliers, service.key, endpoint)
                endpoint["connections"] = sum(live.get(f"{endpoint['ip']}:{port}", 0)
                                              for port in endpoint["ports"].values())
            view["connections"] = shaper.live.by_service.get(service.key, 0)
            picks = shaper.router.splits.picks(service.key)
            for backend in view["traffic"]["split"]:
                backend["connections"] = picks.get(backend["service"], 0)
            services.append(view)
        return web.json_response(services)

    async def _certs(self, request: web.Request) -> web.Response:
        certs = self.agent.certs
        return web.json_response({"trust_domain": certs.trust_domain, "root_fingerprint": certs.root_fingerprint,
                                  "trust_bundle": certs.roots(), "ca_directory": self.agent.ca_watch.status(),
                                  "ca": self.agent.ca_status(), "certificates": certs.certificates()})

    async def _renew_certs(self, request: web.Request) -> web.Response:
        """Renews every workload certificate now; live connections keep the ones they have."""
        renewed = self.agent.renew_certificates()
        return web.json_response({"renewing": renewed}, status=202)

    async def _registrations(self, request: web.Request) -> web.Response:
        now = time.time()
        return web.json_response([r.to_dict(now) for r in self.agent.registrations.all()])

    async def _register(self, request: web.Request) -> web.Response:
        if self.agent.config.registry_file is None:
            raise RegistrationError(KUBERNETES_REGISTRATION)
        spec = _json(await _body(request))
        registration = self._registration_call(lambda: self.agent.registrations.register(spec))
        await self.agent.routing_in_force()
        return web.json_response(registration.to_dict(time.time()), status=201)

    async def _heartbeat(self, request: web.Request) -> web.Response:
        beaten = self._registration_call(lambda: self.agent.registrations.heartbeat(
            request.match_info["namespace"], request.match_info["name"], request.query.get("instance")))
        await self.agent.routing_in_force()
        return web.json_response([r.to_dict(time.time()) for r in beaten])

    async def _deregister(self, request: web.Request) -> web.Response:
        removed = self._registration_call(lambda: self.agent.registrations.deregister(
            request.match_info["namespace"], request.match_info["name"], request.query.get("instance")))
        await self.agent.routing_in_force()
        return web.json_response([r.to_dict(time.time()) for r in removed])

    def _registration_call(self, change: Callable[[], T]) -> T:
        """Runs a registry change (a RegistrationError changes nothing) and applies it."""
        result = change()
        self.agent.registrations_changed()
        return result

    async def _lookup(self, request: web.Request) -> web.Response:
        """A service's endpoints, from Kubernetes or the file and from registrations, with health."""
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        service = self.agent.state.service_by_key(key)
        if service is None:
            return web.json_response({"error": f"no service {key}"}, status=404)
        return web.json_response({**_plain(service), "key": key})

    async def _policies(self, request: web.Request) -> web.Response:
        """The AuthorizationPolicies and PeerAuthentications in force, with their warnings."""
        state, root = self.agent.state, self.agent.authorizer.root_namespace
        return web.json_response({
            "root_namespace": root,
            "authorization_policies": [policy_view(p, root) for p in sorted(state.authorization_policies,
                                                                            key=lambda p: p.key)],
            "peer_authentications": [{**_plain(p), "key": p.key}
                                     for p in sorted(state.peer_authentications, key=lambda p: p.key)],
        })

    async def _check(self, request: web.Request) -> web.Response:
        """?from=NS/POD&to=NS/POD&port=N: the decision the data path would make now."""
        state, query = self.agent.state, request.query
        workloads = {}
        for side in ("from", "to"):
            key = query.get(side, "")
            workloads[side] = state.workload_by_key(key)
            if workloads[side] is None:
                raise web.HTTPBadRequest(text=f"{side}: no workload {key!r} in the registry (give it as namespace/pod)")
        port = query.get("port", "")
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise web.HTTPBadRequest(text=f"port: must be 1-65535, not {port!r}")
        return web.json_response(check_between(self.agent.authorizer, state, workloads["from"], workloads["to"],
                                               int(port), self.agent.certs.trust_domain))

    async def _drain(self, request: web.Request) -> web.Response:
        """Starts the drain (as SIGUSR2 does): 202, and what is still live."""
        self.agent.request_drain("admin API")
        return web.json_response({"draining": True, "deadline_s": self.agent.config.drain_deadline,
                                  "live_connections": await self.agent.live_connections()}, status=202)

    async def _connections(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.connections())

    async def _flows(self, request: web.Request) -> web.Response:
        """The capture program's per-flow counters, largest by bytes first; ?limit=N keeps N."""
        limit = request.query.get("limit")
        if limit is not None and not _LIMIT.match(limit):
            raise web.HTTPBadRequest(text=f"limit must be a positive integer below 10^9, not {shown(limit)}")
        return web.json_response(await self.agent.flows(int(limit) if limit else None))


@web.middleware
async def _registration_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """A refused registration request answers its 4xx with {"error": why}."""
    try:
        return await handler(request)
    except RegistrationError as e:
        return web.json_response({"error": str(e)}, status=e.status)


def breaker_view(outliers: OutlierDetector, service: str, endpoint: dict[str, Any]) -> str:
    """An endpoint's breaker: CLOSED, HALF-OPEN or "OPEN until <UTC time>", the worst of its ports."""
    states = []
    for port in endpoint["ports"].values():
        key = (service, f"{endpoint['ip']}:{port}")
        state = outliers.state(key)
        if state == "OPEN":
            until = time.time() + (outliers.ejected_until(key) or 0.0) - time.monotonic()
            return f"OPEN until {iso_utc(until)}"
        states.append(state)
    return "HALF-OPEN" if "HALF-OPEN" in states else "CLOSED"


def policy_view(policy: AuthorizationPolicy, root_namespace: str) -> dict[str, Any]:
    """An AuthorizationPolicy for people: its scope in words and each rule in short."""
    if policy.selector:
        scope = "workloads with " + ",".join(f"{k}={v}" for k, v in sorted(policy.selector.items()))
        scope += " in every namespace" if policy.namespace == root_namespace else ""
    else:
        scope = "mesh" if policy.namespace == root_namespace else "namespace"
    return {"namespace": policy.namespace, "name": policy.name, "key": policy.key, "action": policy.action,
            "scope": scope, "rules": list(policy.summary), "enforced_rules": len(policy.rules),
            "warnings": list(policy.warnings)}


async def _body(request: web.Request) -> bytes:
    """The request's body; 413 beyond MAX_BODY (aiohttp stops reading there, whatever
    Content-Length said)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RegistrationError(f"the request body is larger than {MAX_BODY // 1024} KiB", 413) from None


def _json(body: bytes) -> object:
    """`body` parsed as JSON (UTF-8, -16 or -32, whatever the Content-Type's charset says)."""
    try:
        return json.loads(body)
    except RecursionError:  # the C parser counts nesting against the interpreter's recursion limit
        raise RegistrationError("the request body nests JSON too deeply: a registration is one flat object") \
            from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise RegistrationError(f"the request body must be JSON: {e}") from None


def _plain(obj: object) -> dict:
    """A model dataclass as JSON-ready data."""
    return dataclasses.asdict(obj)
