"""The admin API on 127.0.0.1:15000: JSON views of the agent for `ameshctl`, and POST
/certs/renew. It is bound to loopback (node-local operators only) and never shows key material.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import ADMIN_HOST

if TYPE_CHECKING:
    from agent.node import NodeAgent


class AdminServer:
    """Serves the agent's views (GET) and its few operator actions (POST) as JSON."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/workloads", self._workloads)
        app.router.add_get("/services", self._services)
        app.router.add_get("/connections", self._connections)
        app.router.add_get("/certs", self._certs)
        app.router.add_get("/flows", self._flows)
        app.router.add_post("/certs/renew", self._renew_certs)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, port: int) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, ADMIN_HOST, port, reuse_address=True).start()

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
        return web.json_response([{**_plain(s), "key": s.key}
                                  for s in sorted(self.agent.state.services, key=lambda s: s.key)])

    async def _certs(self, request: web.Request) -> web.Response:
        certs = self.agent.certs
        return web.json_response({"trust_domain": certs.trust_domain, "root_fingerprint": certs.root_fingerprint,
                                  "certificates": certs.certificates()})

    async def _renew_certs(self, request: web.Request) -> web.Response:
        """Renews every workload certificate now; live connections keep the ones they have."""
        renewed = self.agent.renew_certificates()
        return web.json_response({"renewing": renewed}, status=202)

    async def _connections(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.connections())

    async def _flows(self, request: web.Request) -> web.Response:
        """The capture program's per-flow counters, largest by bytes first; ?limit=N keeps N."""
        limit = request.query.get("limit")
        if limit is not None and not (limit.isdigit() and int(limit) > 0):
            raise web.HTTPBadRequest(text=f"limit must be a positive integer, not {limit!r}")
        return web.json_response(await self.agent.flows(int(limit) if limit else None))


def _plain(obj: object) -> dict:
    """A model dataclass as JSON-ready data."""
    return dataclasses.asdict(obj)
