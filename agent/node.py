"""One node's agent: wires the registry, the capture datapath, the ztunnel and the admin API.

Lifecycle, in the order that keeps pods safe:

  start    load the registry (a bad file stops the start: nothing half-configured), open the
           outbound listener, load and attach BPF (replacing what a killed agent left), serve.
  running  every registry change, and every `resync_interval`, makes the datapath capture
           exactly the enrolled pods on this node.
  stop     close the listener first (new SYNs of enrolled pods are dropped: fail closed),
           drain live connections, then remove every filter, rule and route.

The datapath runs on its own thread: pyroute2's synchronous API drives its own event loop,
which cannot nest in ours, and its netlink round trips must not stall the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from agent.admin import AdminServer
from agent.config import AgentConfig
from bpf.datapath import NodeDatapath
from registry.kubefile import FileSource
from registry.model import RegistryError, RegistryState
from ztunnel.connections import ConnectionTable, iso_utc
from ztunnel.listener import transparent_listener
from ztunnel.outbound import OutboundProxy

log = logging.getLogger("amesh.agent")

T = TypeVar("T")


class NodeAgent:
    """The running agent of one node; `run()` serves until SIGTERM or SIGINT."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self.table = ConnectionTable()
        self.registry = FileSource(config.registry_file, self._on_registry_state, self._on_registry_error,
                                   poll_interval=config.registry_poll_interval)
        self.datapath: NodeDatapath | None = None
        self._datapath_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
        self._reconcile_now = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: socket.socket | None = None
        self._proxy: OutboundProxy | None = None
        self._admin: AdminServer | None = None

    @property
    def state(self) -> RegistryState:
        """The registry snapshot the ztunnel routes by (the last good one)."""
        return self.registry.state or RegistryState()

    def local_enrolled_ips(self) -> list[str]:
        return sorted(w.ip for w in self.state.enrolled_on(self.config.node))

    async def _in_datapath_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._datapath_thread, fn, *args)

    def _on_registry_state(self, state: RegistryState) -> None:
        log.info("event=registry_updated generation=%d workloads=%d services=%d", state.generation,
                 len(state.workloads), len(state.services))
        self._reconcile_now.set()

    def _on_registry_error(self, error: RegistryError) -> None:
        log.error("event=registry_rejected path=%s error=%r action=\"keeping the last good state\"",
                  self.config.registry_file, str(error))

    async def run(self) -> None:
        """Starts everything, serves until a stop signal, then removes what it added."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self._start()
            log.info("event=ready node=%s outbound_port=%d admin=127.0.0.1:%d enrolled_local_pods=%d",
                     self.config.node, self.config.outbound_port, self.config.admin_port,
                     len(self.local_enrolled_ips()))
            tasks = [asyncio.create_task(self.registry.run(), name="registry"),
                     asyncio.create_task(self._reconcile_loop(), name="reconcile")]
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in done - {stop}:
                task.result()  # a background task that died is the agent's failure
        finally:
            await self._stop()
            self._datapath_thread.shutdown()

    async def _start(self) -> None:
        state = self.registry.load()
        log.info("event=registry_loaded path=%s generation=%d workloads=%d services=%d",
                 self.config.registry_file, state.generation, len(state.workloads), len(state.services))
        self._listener = transparent_listener(self.config.outbound_port)
        self.datapath = await self._in_datapath_thread(NodeDatapath, self._listener)
        self._proxy = OutboundProxy(lambda: self.state, self.table, connect_timeout=self.config.connect_timeout)
        await self._proxy.start(self._listener)
        await self._in_datapath_thread(self.datapath.sync, self.local_enrolled_ips())
        self._admin = AdminServer(self)
        await self._admin.start(self.config.admin_port)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.config.resync_interval)
            except asyncio.TimeoutError:
                pass
            self._reconcile_now.clear()
            assert self.datapath is not None
            await self._in_datapath_thread(self.datapath.sync, self.local_enrolled_ips())

    async def _stop(self) -> None:
        log.info("event=stopping drain_grace_s=%s live_connections=%d", self.config.drain_grace,
                 len(self.table.live()))
        if self._admin is not None:
            await self._admin.stop()
        if self._proxy is not None:
            await self._proxy.close(grace=self.config.drain_grace)
        if self._listener is not None:
            self._listener.close()
        if self.datapath is not None:
            await self._in_datapath_thread(self.datapath.close)
        log.info("event=stopped node=%s", self.config.node)

    async def status(self) -> dict:
        """The agent's own view of itself, for `ameshctl status`."""
        state = self.state
        datapath = await self._in_datapath_thread(self.datapath.status) if self.datapath else None
        return {
            "node": self.config.node,
            "started": iso_utc(self.started),
            "uptime_s": round(time.time() - self.started, 3),
            "registry": {
                "source": "file",
                "path": str(self.config.registry_file),
                "generation": state.generation,
                "workloads": len(state.workloads),
                "services": len(state.services),
                "last_error": self.registry.last_error,
            },
            "listeners": {"outbound": f"0.0.0.0:{self.config.outbound_port}"},
            "datapath": datapath,
            "connections": {"live": len(self.table.live()), "recently_closed": len(self.table.recent())},
        }
