"""The admin API on 127.0.0.1:15000: read-only JSON views of the agent, for `ameshctl`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import ADMIN_HOST

if TYPE_CHECKING:
    from agent.node import NodeAgent


class AdminServer:
    """Serves /status, /workloads, /services and /connections of one agent."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/workloads", self._workloads)
        app.router.add_get("/services", self._services)
        app.router.add_get("/connections", self._connections)
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

    async def _connections(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.table.snapshot())


def _plain(obj: object) -> dict:
    """A model dataclass as JSON-ready data."""
    return dataclasses.asdict(obj)
