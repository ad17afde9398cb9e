"""The agent's ztunnel worker processes (`--workers N` > 1): started, fed, restarted, stopped.

Each worker (ztunnel/worker.py) gets, per listener slot, its own transparent listening socket,
all of a port's sockets one SO_REUSEPORT group; the capture program's sockmap holds one member
per slot and the kernel spreads the SYNs assigned to it over the group (README, "The worker
model"). The agent keeps its copy of every worker's sockets, so a dead worker's stay valid while
the sockmap still points at them; once it points at a live worker's, the dead one's close, and
net.ipv4.tcp_migrate_req moves their queued connections to the group's other members.

Over each worker's channel (ztunnel/channel.py) the agent sends the setup, then the registry
state as deltas and the node's credentials whenever they change (a poll of both every
PUBLISH_INTERVAL, and at once on a poke), GOAWAY on drain, Stop, and snapshot requests.

Decisions are pure and tested without processes: `RestartBackoff` (how long a dead worker
waits before it is started again) and `sockmap_worker_after` (whose sockets the sockmap holds
after a death, and so whether the dead worker's close now or are kept for its restart).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Collection

from agent.config import AgentConfig
from bpf.slots import Slot
from registry.model import RegistryState
from registry.replica import state_delta
from ztunnel.channel import Applied, Channel, Credentials, GoAway, Serving, Setup, Snapshot, SnapshotRequest, StateUpdate, Stop
from ztunnel.connections import iso_utc
from ztunnel.dataplane import LISTENER_PORTS
from ztunnel.identity import Identity, WorkloadCredential
from ztunnel.listener import transparent_listener
from ztunnel.snapshot import DataplaneSnapshot, merge, retire

log = logging.getLogger("amesh.workers")

PUBLISH_INTERVAL = 0.05  # seconds between checks for a new registry state (registration expiry) or credentials
START_TIMEOUT = 30.0  # seconds for a worker to serve after it is started (imports and the first state)
STOP_MARGIN = 2.0  # seconds past the drain grace a stopping worker gets before it is killed
APPLY_TIMEOUT = 1.0  # seconds a registration call waits for the workers to have it in force
APPLY_POLL = 0.002  # seconds between checks of their acknowledgements
SNAPSHOT_TIMEOUT = 1.0  # seconds a scrape waits for one worker's snapshot before it goes without it


class WorkerError(RuntimeError):
    """A ztunnel worker process could not be started (the agent stops: nothing half-started)."""


@dataclass(frozen=True)
class RestartBackoff:
    """How long a dead worker waits before it is started again: at once after a stable run, then
    doubling from `initial` for each further death that follows its start within `stable_after`,
    up to `maximum`: a worker that crashes as it starts does not eat the node's CPU."""

    initial: float = 0.5  # seconds before the second restart of a crash loop
    maximum: float = 30.0  # seconds
    stable_after: float = 10.0  # seconds a worker must have run for its death to count as a new failure

    def next(self, quick_deaths: int, ran_for: float) -> tuple[float, int]:
        """(seconds to wait, quick deaths in a row now) for a worker that died after `ran_for` seconds."""
        deaths = 1 if ran_for >= self.stable_after else quick_deaths + 1
        return (0.0 if deaths == 1 else min(self.maximum, self.initial * 2 ** (deaths - 2))), deaths


def sockmap_worker_after(current: int, dead: int, live: Collection[int]) -> int:
    """The worker whose sockets the sockmap holds after worker `dead` died, given the ones still
    `live`: unchanged unless it held the dead one's; then the lowest live one; with none live the
    dead one's still (its sockets stay open and queue SYNs for its restart: better than none)."""
    if current != dead or not live:
        return current
    return min(live)


@dataclass
class WorkerProcess:
    """One worker slot and the process serving it now."""

    index: int
    sockets: dict[Slot, socket.socket]
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    serving: bool = False
    started: float = 0.0  # time.time() of the last start
    restarts: int = 0
    quick_deaths: int = 0
    last_exit: int | None = None  # the last process's exit status (negative: the signal)
    applied_generation: int | None = None  # the registry generation the worker said it routes by
    sent_seq: int = 0  # the last StateUpdate's number
    applied_seq: int = 0  # the last one the worker said is in force
    sent_state: RegistryState | None = None
    sent_credentials: dict[Identity, WorkloadCredential] | None = None
    served: asyncio.Event = field(default_factory=asyncio.Event)
    last_snapshot: DataplaneSnapshot | None = None  # its last answer, stood in when it does not answer in time


class WorkerSupervisor:
    """The node's `config.workers` worker processes and their listening sockets."""

    def __init__(self, config: AgentConfig, state: Callable[[], RegistryState],
                 credentials: Callable[[], dict[Identity, WorkloadCredential]],
                 set_sockmap: Callable[[dict[Slot, socket.socket]], Awaitable[None]], log_level: str = "info",
                 backoff: RestartBackoff = RestartBackoff()) -> None:
        self._config = config
        self._state = state
        self._credentials = credentials
        self._set_sockmap = set_sockmap
        self._log_level = log_level
        self._backoff = backoff
        self.workers = [WorkerProcess(k, self._new_sockets()) for k in range(config.workers)]
        self.sockmap_worker = 0
        # the sockmap slots' sockets now (NodeDatapath is loaded with them; a failed takeover puts them back)
        self.sockmap_members: dict[Slot, socket.socket] = dict(self.workers[0].sockets)
        self.owns_sockmap = True  # False once a new agent took the node over: a death changes the sockmap no more
        self.restarts = 0
        self._stopping = False
        self._poke = asyncio.Event()
        self._sending = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._requests = itertools.count(1)
        self._answers: dict[int, asyncio.Future[Any]] = {}
        # the counters of workers that died, as last read: the node's totals never go down
        self._retired = DataplaneSnapshot()

    @staticmethod
    def _new_sockets() -> dict[Slot, socket.socket]:
        return {slot: transparent_listener(port) for slot, port in LISTENER_PORTS.items()}

    async def start(self) -> None:
        """Starts every worker and returns once each serves; WorkerError if one cannot."""
        for worker in self.workers:
            await self._spawn(worker)
        self._tasks = [asyncio.create_task(self._keep(worker), name=f"worker-{worker.index}")
                       for worker in self.workers]
        self._tasks.append(asyncio.create_task(self._publish(), name="worker-publish"))
        try:
            await asyncio.wait_for(asyncio.gather(*(worker.served.wait() for worker in self.workers)), START_TIMEOUT)
        except TimeoutError:
            late = [w.index for w in self.workers if not w.serving]
            raise WorkerError(f"ztunnel worker(s) {late} did not serve within {START_TIMEOUT} s of their start "
                               f"(their log lines, worker=<k>, say why)") from None

    async def watch(self) -> None:
        """Runs while the workers are kept; a failure to keep one (the sockmap could not be moved)
        raises here, to stop the agent rather than serve on with a worker missing."""
        await asyncio.gather(*self._tasks)

    def poke(self) -> None:
        """The registry state or the credentials changed: sent now, not at the next poll."""
        self._poke.set()

    async def _spawn(self, worker: WorkerProcess) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(sock.fileno() for sock in worker.sockets.values())]
        argv = [sys.executable, "-m", "ztunnel.worker", "--parent", str(os.getpid()), "--channel",
                str(theirs.fileno()), "--log-level", self._log_level,
                *(f"--listener={slot.name}={sock.fileno()}" for slot, sock in worker.sockets.items())]
        try:
            worker.process = await asyncio.create_subprocess_exec(*argv, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        worker.channel, worker.serving, worker.started = Channel(ours), False, time.time()
        worker.applied_generation, worker.sent_seq, worker.applied_seq = None, 0, 0
        worker.served.clear()
        state, credentials = self._state(), self._credentials()
        await worker.channel.send(Setup(self._config, worker.index))
        await worker.channel.send(StateUpdate(state_delta(None, state)))
        await worker.channel.send(Credentials(credentials))
        worker.sent_state, worker.sent_credentials = state, credentials
        log.info("event=worker_started worker=%d pid=%d", worker.index, worker.process.pid)

    async def _keep(self, worker: WorkerProcess) -> None:
        """Reads the worker's messages until it exits, then restarts it (until the agent stops)."""
        while True:
            assert worker.process is not None and worker.channel is not None
            reader = asyncio.create_task(self._read(worker, worker.channel))
            status = await worker.process.wait()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            worker.channel.close()
            worker.serving, worker.last_exit = False, status
            if self._stopping:
                return
            ran_for = time.time() - worker.started
            if worker.last_snapshot is not None:
                self._retired = merge([self._retired, retire(worker.last_snapshot)])
                worker.last_snapshot = None
            await self._after_death(worker)
            delay, worker.quick_deaths = self._backoff.next(worker.quick_deaths, ran_for)
            log.warning("event=worker_died worker=%d pid=%d status=%d ran_s=%.1f restart_in_s=%.1f", worker.index,
                        worker.process.pid, status, ran_for, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            worker.restarts += 1
            self.restarts += 1
            await self._spawn(worker)

    async def _after_death(self, worker: WorkerProcess) -> None:
        """Points the sockmap at a live worker's sockets if it held the dead one's, then closes
        the dead one's (their queued connections migrate); its restart gets new ones."""
        live = [w.index for w in self.workers if w.serving]
        chosen = sockmap_worker_after(self.sockmap_worker, worker.index, live)
        if chosen == worker.index:
            return  # no worker serves: its sockets stay in the sockmap, queueing SYNs for its restart
        if chosen != self.sockmap_worker and self.owns_sockmap:
            members = self.workers[chosen].sockets
            await self._set_sockmap(members)
            self.sockmap_members.clear()
            self.sockmap_members.update(members)
            self.sockmap_worker = chosen
            log.info("event=sockmap_moved from_worker=%d to_worker=%d", worker.index, chosen)
        for sock in worker.sockets.values():
            sock.close()
        worker.sockets = self._new_sockets()

    async def _read(self, worker: WorkerProcess, channel: Channel) -> None:
        try:
            while True:
                message = await channel.receive()
                if isinstance(message, Serving):
                    worker.serving = True
                    worker.served.set()
                elif isinstance(message, Applied):
                    worker.applied_generation, worker.applied_seq = message.generation, message.seq
                elif isinstance(message, Snapshot):
                    answer = self._answers.pop(message.request_id, None)
                    if answer is not None and not answer.done():
                        answer.set_result(message.snapshot)
        except (EOFError, ConnectionError):
            return  # it exited: _keep sees its status

    async def _publish(self) -> None:
        """Sends each worker the registry delta and credentials it lacks, at once on a poke."""
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), PUBLISH_INTERVAL)
            except TimeoutError:
                pass
            self._poke.clear()
            await self._send_changes()

    async def _send_changes(self) -> None:
        """One round of deltas and credentials; one at a time, so no worker gets a delta twice."""
        async with self._sending:
            state, credentials = self._state(), self._credentials()
            deltas: dict[int, Any] = {}  # one delta per base state: workers in step share it
            for worker in self.workers:
                if worker.channel is None or worker.sent_state is None:
                    continue
                try:
                    if worker.sent_state is not state:
                        base = worker.sent_state
                        delta = deltas.get(id(base)) or deltas.setdefault(id(base), state_delta(base, state))
                        worker.sent_seq += 1
                        await worker.channel.send(StateUpdate(delta, worker.sent_seq))
                        worker.sent_state = state
                    if worker.sent_credentials != credentials:
                        await worker.channel.send(Credentials(credentials))
                        worker.sent_credentials = credentials
                except (ConnectionError, OSError):
                    continue  # it is dying: its restart is sent everything anew

    async def publish_now(self) -> None:
        """Sends the current state now and returns once every serving worker has it in force (or
        APPLY_TIMEOUT passed: a stuck worker does not hold the admin API)."""
        await self._send_changes()
        deadline = time.monotonic() + APPLY_TIMEOUT
        while time.monotonic() < deadline and any(w.serving and w.applied_seq < w.sent_seq for w in self.workers):
            await asyncio.sleep(APPLY_POLL)

    async def _broadcast(self, message: object) -> None:
        for worker in self.workers:
            if worker.channel is not None and worker.process is not None and worker.process.returncode is None:
                try:
                    await worker.channel.send(message)
                except (ConnectionError, OSError):
                    pass  # it died meanwhile: nothing to tell it

    async def go_away(self) -> None:
        """Every worker sends a graceful HTTP/2 GOAWAY on its HBONE sessions (the node drains)."""
        await self._broadcast(GoAway())

    async def snapshots(self, rows: bool = False) -> list[DataplaneSnapshot]:
        """Each worker's data-plane snapshot (with connection rows if `rows`), asked now, and the
        counters of the workers that died. A worker that does not answer within SNAPSHOT_TIMEOUT
        stands in with its last answer, without its rows: counters never go down for a slow scrape."""
        loop = asyncio.get_running_loop()
        asked = []
        for worker in self.workers:
            if not worker.serving or worker.channel is None:
                continue
            request_id = next(self._requests)
            answer = self._answers[request_id] = loop.create_future()
            try:
                await worker.channel.send(SnapshotRequest(request_id, rows))
            except (ConnectionError, OSError):
                del self._answers[request_id]
                continue
            asked.append((worker, request_id, answer))
        answers = [answer for _, _, answer in asked]
        done, _ = await asyncio.wait(answers, timeout=SNAPSHOT_TIMEOUT) if answers else ((), ())
        for _, request_id, answer in asked:
            self._answers.pop(request_id, None)
            answer.cancel()
        answered = {worker.index: answer.result() for worker, _, answer in asked if answer in done}
        snapshots = []
        for worker in self.workers:
            if worker.index in answered:
                worker.last_snapshot = answered[worker.index]
                snapshots.append(worker.last_snapshot)
            elif worker.last_snapshot is not None:  # its rows would show connections as they were
                snapshots.append(replace(worker.last_snapshot, rows=[]))
        return [*snapshots, self._retired]

    async def stop(self, grace: float) -> None:
        """Stops every worker (their live connections get `grace` seconds) and closes every
        listening socket; a worker still running STOP_MARGIN seconds after that is killed."""
        self._stopping = True
        await self._broadcast(Stop(grace))
        for worker in self.workers:
            for sock in worker.sockets.values():
                sock.close()  # with the workers' copies closed too, the listeners are gone: fail closed
        processes = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        if processes:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in processes], timeout=grace + STOP_MARGIN)
            for process in processes:
                if process.returncode is None:
                    log.warning("event=worker_killed pid=%d reason=\"still running past the drain grace\"", process.pid)
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.close()

    def routing_generation(self) -> int | None:
        """The oldest registry generation a serving worker routes by (None before any says)."""
        generations = [w.applied_generation for w in self.workers if w.serving and w.applied_generation is not None]
        return min(generations) if generations else None

    def status(self) -> list[dict[str, Any]]:
        """One row per worker, for `ameshctl status`."""
        return [{"worker": w.index, "pid": w.process.pid if w.process else None,
                 "state": "serving" if w.serving else "stopped" if self._stopping else
                          "restarting" if w.last_exit is not None else "starting",
                 "started": iso_utc(w.started) if w.started else None, "restarts": w.restarts,
                 "last_exit": w.last_exit, "sockmap": w.index == self.sockmap_worker} for w in self.workers]
