"""A ztunnel worker process: one of the node's `--workers N`, started by the agent (agent/workers.py).

It runs the three listeners (ztunnel/dataplane.py) on its own event loop, on listening sockets
the agent made and passed to it (members of each port's SO_REUSEPORT group), and routes by a
registry replica and credentials the agent sends over the private channel (ztunnel/channel.py).
It holds no Kubernetes client and no CA, and changes nothing in the kernel: the agent keeps the
control plane. It dies with the agent (PR_SET_PDEATHSIG), and ignores the stop signals a process
group gets: the agent stops it (Stop), so that a node's workers drain together.

    python -m ztunnel.worker --parent PID --channel FD --listener OUTBOUND=FD ... --log-level info
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket

from bpf.slots import Slot
from registry.replica import Replica
from ztunnel.authz import Authorizer
from ztunnel.channel import (Applied, Channel, Credentials, GoAway, Serving, Setup, Snapshot, SnapshotRequest,
                             StateUpdate, Stop)
from ztunnel.connections import ConnectionTable
from ztunnel.dataplane import PolicyEnforcer, build_proxies, write_access_log
from ztunnel.hbone import HboneClientPool
from ztunnel.identity import CredentialReplica
from ztunnel.inbound import InboundHboneProxy
from ztunnel.outbound import OutboundProxy
from ztunnel.snapshot import DataplaneCounters, DataplaneSnapshot, take_snapshot

log = logging.getLogger("amesh.worker")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ZtunnelWorker:
    """One worker's data plane: its own connection table (ids unique per node), HBONE pool,
    handshake limiter and shares of the node's limits, fed by the agent's messages."""

    def __init__(self, setup: Setup, channel: Channel, listeners: dict[Slot, socket.socket]) -> None:
        config = setup.config
        self.index = setup.index
        self._channel = channel
        self._listeners = listeners
        self.table = ConnectionTable(first_id=setup.index + 1, id_step=config.workers)
        if config.access_log:
            self.table.on_close.append(write_access_log)
        self.replica = Replica()
        self.counters = DataplaneCounters(self.table, lambda: self.replica.state, config.cluster) if config.metrics \
            else None
        self.certs = CredentialReplica(config.trust_domain)
        self.pool = HboneClientPool()
        authorizer = Authorizer(config.mtls_mode, config.root_namespace)
        self._policies = PolicyEnforcer(authorizer, self.table)
        self.proxies = build_proxies(config, lambda: self.replica.state, self.table, authorizer, self.certs,
                                     self.pool)
        self._stop: Stop | None = None
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Serves once the first state and credentials are in, until Stop or the agent's end."""
        for _ in range(2):  # the agent sends both right after Setup
            self._handle(await self._channel.receive())
        for slot, proxy in self.proxies.items():
            await proxy.start(self._listeners[slot])
        gc.collect()
        gc.freeze()  # as the agent does: what is loaded by now lives as long as the process
        await self._channel.send(Applied(0, self.replica.state.generation))
        await self._channel.send(Serving(os.getpid()))
        log.info("event=worker_serving pid=%d", os.getpid())
        messages = asyncio.create_task(self._serve_messages())
        try:
            await self._stopped.wait()
            grace = self._stop.grace if self._stop is not None else 0.0
            log.info("event=worker_stopping grace_s=%s live_connections=%d", grace, len(self.table.live()))
            await asyncio.gather(*(proxy.close(grace=grace) for proxy in self.proxies.values()))
            await self.pool.close()
        finally:
            messages.cancel()
            await asyncio.gather(messages, return_exceptions=True)
            self._channel.close()

    async def _serve_messages(self) -> None:
        try:
            while True:
                message = await self._channel.receive()
                if isinstance(message, SnapshotRequest):
                    await self._channel.send(Snapshot(message.request_id, self.snapshot(message.rows)))
                else:
                    self._handle(message)
                if isinstance(message, StateUpdate):
                    await self._channel.send(Applied(message.seq, self.replica.state.generation))
        except (EOFError, ConnectionError):
            log.warning("event=agent_gone action=\"closing the listeners and exiting\"")
            self._stopped.set()

    def snapshot(self, rows: bool) -> DataplaneSnapshot:
        """This worker's share of the node's counters and (if `rows`) connections, for the agent to merge."""
        outbound, inbound = self.proxies[Slot.OUTBOUND], self.proxies[Slot.INBOUND_HBONE]
        assert isinstance(outbound, OutboundProxy) and isinstance(inbound, InboundHboneProxy)
        return take_snapshot(self.table, self.counters, self.pool, outbound, inbound, self.replica.state, rows=rows)

    def _handle(self, message: object) -> None:
        if isinstance(message, StateUpdate):
            self._policies.check(self.replica.apply(message.delta))
        elif isinstance(message, Credentials):
            self.certs.update(message.held)
        elif isinstance(message, GoAway):
            hbone = self.proxies[Slot.INBOUND_HBONE]
            assert isinstance(hbone, InboundHboneProxy)
            hbone.go_away()
        elif isinstance(message, Stop):
            self._stop = message
            self._stopped.set()
        else:
            raise TypeError(f"worker {self.index}: the agent sent an unknown message {type(message).__name__}")



def die_with_parent(parent: int) -> None:
    """SIGKILL when the agent's thread that started us ends; exit now if the agent is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the agent died before prctl: no one would kill us
        raise SystemExit(f"the agent (pid {parent}) is gone: a worker without it exits")


def main(argv: list[str] | None = None) -> None:
    """The worker process's entry point (its arguments: the module docstring)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # the process group's stop signals: the agent stops us
    parser = argparse.ArgumentParser(prog="python -m ztunnel.worker")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[], help="SLOT=FD")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    channel_sock = socket.socket(fileno=args.channel)
    listeners = {Slot[name]: socket.socket(fileno=int(fd))
                 for name, _, fd in (item.partition("=") for item in args.listener)}
    from agent.cli import EVENT_LOOPS
    from agent.logs import setup_logging

    channel = Channel(channel_sock)
    try:
        setup = channel.receive_blocking()
    except EOFError:
        raise SystemExit("the agent closed the worker channel before sending the setup") from None
    if not isinstance(setup, Setup):
        raise SystemExit(f"the agent sent {type(setup).__name__} first, not Setup")
    setup_logging(args.log_level, worker=setup.index)

    with asyncio.Runner(loop_factory=EVENT_LOOPS[setup.config.event_loop]) as runner:
        runner.run(ZtunnelWorker(setup, channel, listeners).run())


if __name__ == "__main__":
    main()
