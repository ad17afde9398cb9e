"""One node's agent: wires the registry, identities, the capture datapath, the ztunnel's
listeners, telemetry and the admin API.

Lifecycle, in the order that keeps pods safe:

  start    readiness and metrics first (not ready yet); load the registry file (a bad file
           stops the start: nothing half-configured) or start watching the API server; the CA
           and this node's workload certificates; the three listeners; BPF loaded and attached
           (replacing what a killed agent left); serve.
  running  every registry or registration change, and every `resync_interval`, makes the
           certificates and the datapath match exactly the enrolled pods on this node.
  stop     close the listeners first (new SYNs of enrolled pods are dropped: fail closed),
           drain live connections, then remove every filter, rule and route.
  drain    (SIGUSR2, POST /drain) as stop, but first a graceful HTTP/2 GOAWAY on every HBONE
           session (peers open their new streams elsewhere), and live connections get
           `drain_deadline`, not `drain_grace`; a stop signal meanwhile does not shorten it.
  upgrade  an agent started where one runs takes its datapath over (bpf/handover.py) instead of
           loading its own: its listeners (SO_REUSEPORT, the same ports) replace the old ones
           in the sockmap, then it asks the old agent to drain; the old one removes nothing at
           its exit, and keeps offering the handover until then.

The datapath runs on its own thread: pyroute2's synchronous API drives its own event loop,
which cannot nest in ours, and its netlink round trips must not stall the proxy.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from agent.admin import AdminServer
from agent.config import AgentConfig
from agent.local import LocalPods
from agent.metrics import TelemetryServer
from agent.workers import WorkerSupervisor
from bpf import handover
from bpf.datapath import NodeDatapath, Slot, migrate_requests_on_close
from ca.client import ClusterCAClient
from registry.kubefile import FileSource
from registry.model import RegistryError, RegistryState
from registry.registrations import MergedRegistry, RegistrationStore
from ztunnel.connections import ConnectionTable, iso_utc
from ztunnel.authz import Authorizer
from ztunnel.dataplane import LISTENER_PORTS, PolicyEnforcer, build_proxies, write_access_log
from ztunnel.hbone import HBONE_PORT, HboneClientPool
from ztunnel.cawatch import CADirectoryWatch
from ztunnel.identity import CAError, CertificateManager, FileCA, Identity
from ztunnel.inbound import InboundHboneProxy
from ztunnel.listener import transparent_listener
from ztunnel.outbound import OutboundProxy
from ztunnel.server import CapturedListener
from ztunnel.snapshot import DataplaneCounters, DataplaneSnapshot, merge, take_snapshot

if TYPE_CHECKING:
    from registry.kubernetes import KubernetesSource

log = logging.getLogger("amesh.agent")

T = TypeVar("T")

HANDOVER_ADDRESS_RETRY = 0.5  # seconds between tries for the handover address the previous agent holds
EMPTY_STATE = RegistryState()  # one object: a new one per read would look like a new base state


class NodeAgent:
    """The running agent of one node; `run()` serves until SIGTERM or SIGINT."""

    def __init__(self, config: AgentConfig, log_level: str = "info") -> None:
        self.config = config
        self._log_level = log_level  # the workers' too
        self.started = time.time()
        self.table = ConnectionTable()
        self.registry: FileSource | KubernetesSource
        if config.registry_file is not None:
            self.registry = FileSource(config.registry_file, self._on_registry_state, self._on_registry_error,
                                       poll_interval=config.registry_poll_interval)
        else:
            # imported only here: an agent reading a registry file has no use for it
            from registry.kubernetes import KubernetesSource

            self.registry = KubernetesSource(self._on_registry_state, self._on_registry_error,
                                             kubeconfig=config.kubeconfig, node=config.node)
        self.datapath: NodeDatapath | None = None
        self._datapath_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
        self._reconcile_now = asyncio.Event()
        self._local = LocalPods(config.node, config.trust_domain)
        self._stopping = asyncio.Event()
        self._draining = asyncio.Event()
        self._proxies: dict[Slot, CapturedListener] = {}
        self._listeners: dict[Slot, Any] = {}  # the listening sockets, for a failed takeover's undo
        self._handover_channel: Any = None  # to the agent we took over from, until it drains
        self._handovers: asyncio.Task[None] | None = None
        self.certs: CertificateManager | None = None
        # the local CA's directory, re-read for a new signing root or trust bundle (a root rotation)
        self.ca_watch = CADirectoryWatch(config.ca_dir, config.trust_domain, config.ca_poll_interval)
        self.issuer: FileCA | ClusterCAClient | None = None
        self.pool = HboneClientPool()
        # what /metrics renders of this process's connections, folded as each closes (metrics off: nothing)
        self.counters = DataplaneCounters(self.table, lambda: self.state, config.cluster) if config.metrics else None
        self.registry_errors = 0
        self._telemetry: TelemetryServer | None = None
        if config.access_log:
            self.table.on_close.append(write_access_log)
        # with config.workers > 1, the worker processes that run the listeners (_start)
        self.workers: WorkerSupervisor | None = None
        self._admin: AdminServer | None = None
        self.registrations = RegistrationStore(reserved_ports={config.admin_port, *LISTENER_PORTS.values(),
                                                               config.metrics_port, config.readiness_port})
        self._merged = MergedRegistry(self.registrations)
        self.authorizer = Authorizer(config.mtls_mode, config.root_namespace)
        self._policy = PolicyEnforcer(self.authorizer, self.table)

    @property
    def state(self) -> RegistryState:
        """The registry snapshot the ztunnel routes by: the source's last good state plus the
        registrations. Read for every connection: a clock read and a heap peek while neither changes; a
        registration change (or expiry) costs that change, not a rebuild (registry/registrations.py)."""
        return self._merged.state(self.registry.state or EMPTY_STATE)

    @property
    def outbound(self) -> OutboundProxy | None:
        """The outbound listener, once serving (its breakers are shown and counted)."""
        proxy = self._proxies.get(Slot.OUTBOUND)
        return proxy if isinstance(proxy, OutboundProxy) else None

    @property
    def inbound_hbone(self) -> InboundHboneProxy | None:
        """The HBONE listener, once serving (its counters are metrics)."""
        proxy = self._proxies.get(Slot.INBOUND_HBONE)
        return proxy if isinstance(proxy, InboundHboneProxy) else None

    def registrations_changed(self) -> None:
        """Called after the admin API changed a registration: routing follows at once. (Capture
        and certificates need nothing: a registered workload is never an enrolled pod.)"""
        self._merged.state(self.registry.state or EMPTY_STATE)  # applied now, so changes never pile up
        if self.workers is not None:
            self.workers.poke()

    async def routing_in_force(self) -> None:
        """Returns once every worker routes by the current state (a registration answered only then)."""
        if self.workers is not None:
            await self.workers.publish_now()

    def local_enrolled_ips(self) -> list[str]:
        return list(self._local.of(self.state).ips)

    def local_identities(self) -> set[Identity]:
        """The identities this node serves: one per service account of its enrolled pods."""
        return set(self._local.of(self.state).identities)

    def renew_certificates(self) -> list[str]:
        """Makes every held certificate due now; the manager's task renews them at once."""
        assert self.certs is not None
        identities = sorted(self.local_identities(), key=str)
        for identity in identities:
            self.certs.renew_now(identity)
        return [i.uri for i in identities]

    async def _in_datapath_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._datapath_thread, fn, *args)

    def _on_registry_state(self, state: RegistryState) -> None:
        log.info("event=registry_updated generation=%d workloads=%d services=%d policies=%d", state.generation,
                 state.workload_count, state.service_count, len(state.authorization_policies))
        self._policy.check(self.state)  # each worker checks its own connections once the delta is in
        if self.workers is not None:
            self.workers.poke()
        self._reconcile_now.set()

    def _on_registry_error(self, error: RegistryError | str) -> None:
        self.registry_errors += 1
        log.error("event=registry_rejected source=%s error=%r action=\"keeping the last good state\"",
                  self._registry_name(), str(error))

    def _registry_name(self) -> str:
        return str(self.config.registry_file) if self.config.registry_file else "kubernetes"

    async def run(self) -> None:
        """Starts everything, serves until a stop signal, then removes what it added."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR2, self.request_drain, "SIGUSR2")
        try:
            await self._start()
            # What is loaded by now (the Kubernetes client models, the aiohttp and TLS code, the
            # registry) lives as long as the agent: frozen out of the collector's full passes,
            # which would otherwise walk ~100,000 objects (about 50 ms, a stall for every
            # connection in flight) each time.
            gc.collect()
            gc.freeze()
            log.info("event=ready node=%s listeners=%s admin=127.0.0.1:%d enrolled_local_pods=%d",
                     self.config.node, ",".join(str(p) for p in LISTENER_PORTS.values()), self.config.admin_port,
                     len(self.local_enrolled_ips()))
            assert self.certs is not None
            tasks = [asyncio.create_task(self.registry.run(), name="registry"),
                     asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                     asyncio.create_task(self.certs.run(), name="certificates")]
            if isinstance(self.issuer, FileCA):  # local-CA mode: its directory may change (a root rotation)
                tasks.append(asyncio.create_task(self.ca_watch.run(self.certs.set_issuer), name="ca-directory"))
            elif isinstance(self.issuer, ClusterCAClient):  # the ConfigMap's bundle may change (a root rotation)
                tasks.append(asyncio.create_task(self.issuer.trust.run(self._on_trust_bundle), name="trust-bundle"))
            if self.workers is not None:
                tasks.append(asyncio.create_task(self.workers.watch(), name="workers"))
            # offered until the agent exits: a successor may start while this one drains
            self._handovers = asyncio.create_task(self._offer_handovers(), name="handovers")
            stop = asyncio.create_task(self._stopping.wait())
            drain = asyncio.create_task(self._draining.wait())
            done, _ = await asyncio.wait([stop, drain, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in [*tasks, stop, drain]:
                task.cancel()
            await asyncio.gather(*tasks, stop, drain, return_exceptions=True)
            for task in done - {stop, drain}:
                task.result()  # a background task that died is the agent's failure
        finally:
            await self._stop()
            if self._handovers is not None:
                self._handovers.cancel()
                await asyncio.gather(self._handovers, return_exceptions=True)
            self._datapath_thread.shutdown()

    async def _start(self) -> None:
        self._telemetry = TelemetryServer(self)
        await self._telemetry.start(self.config.metrics_port, self.config.readiness_port)
        if isinstance(self.registry, FileSource):  # a bad file stops the start; the API server is waited for
            state = self.registry.load()
            log.info("event=registry_loaded source=%s generation=%d workloads=%d services=%d",
                     self._registry_name(), state.generation, len(state.workloads), len(state.services))
        config = self.config
        self.issuer = self._issuer()
        self.certs = CertificateManager(self.issuer, config.trust_domain, config.cert_lifetime)
        self.certs.set_identities(self.local_identities())
        await self.certs.renew_due_now()  # the cluster CA's first answers (each bounded by its timeout)
        sockets = {}
        taken = None
        try:
            if config.workers > 1:  # every worker's sockets; the sockmap gets the first one's
                self.workers = WorkerSupervisor(config, lambda: self.state, self.certs.credentials,
                                                self._set_sockmap, self._log_level)
                sockets = self.workers.sockmap_members
            else:
                for slot, port in LISTENER_PORTS.items():
                    sockets[slot] = transparent_listener(port)
            taken = await self._in_datapath_thread(handover.take_over)
            if taken is not None:
                log.info("event=taking_over reason=\"an agent runs on this node: its datapath is handed over\"")
            if taken is not None or self.workers is not None:  # a closing listener's queue goes to its group
                await self._in_datapath_thread(migrate_requests_on_close)
            self.datapath = await self._in_datapath_thread(NodeDatapath, sockets, HBONE_PORT, config.flow_accounting,
                                                           taken[1] if taken else None)
            if self.workers is not None:
                self.certs.on_change.append(self.workers.poke)
                await self.workers.start()
        except BaseException:
            if self.workers is not None:
                await self.workers.stop(0.0)
            for sock in sockets.values():
                sock.close()
            if taken is not None:
                taken[0].close()  # unasked to drain, the running agent takes its sockmap slots back
            raise
        self._listeners = sockets
        self._handover_channel = taken[0] if taken else None
        if self.workers is None:
            self._proxies = build_proxies(config, lambda: self.state, self.table, self.authorizer, self.certs,
                                          self.pool)
            for slot, proxy in self._proxies.items():
                await proxy.start(sockets[slot])
        await self._in_datapath_thread(self.datapath.sync, self.local_enrolled_ips())
        self._admin = AdminServer(self)
        await self._admin.start(self.config.admin_port)
        if self._handover_channel is not None:  # serving: the agent we took over from may drain
            with self._handover_channel as channel:
                channel.send(handover.DRAIN_REQUEST)
            self._handover_channel = None
            self.datapath.own()
            log.info("event=took_over reason=\"the previous agent drains\"")

    async def _offer_handovers(self) -> None:
        """Answers at handover.HANDOVER_ADDRESS until the agent exits, once the agent we took
        over from (if any) has let go of it."""
        loop = asyncio.get_running_loop()
        while (server := handover.listen()) is None:
            await asyncio.sleep(HANDOVER_ADDRESS_RETRY)
        with server:
            while True:
                channel, _ = await loop.sock_accept(server)
                with channel:
                    await self._hand_over(channel)

    async def _hand_over(self, channel: Any) -> None:
        """One new agent's takeover: our datapath's fds, then its drain request (or its death)."""
        if not handover.peer_is_us(channel):
            log.warning("event=handover_refused reason=\"the connecting process runs as another user\"")
            return
        assert self.datapath is not None
        handover.send_offer(channel, self.datapath.signature, self.datapath.handover_fds())
        log.info("event=handover_offered")
        try:
            message = await asyncio.get_running_loop().sock_recv(channel, len(handover.DRAIN_REQUEST))
        except OSError:
            message = b""
        if message == handover.DRAIN_REQUEST:
            self.datapath.hand_over()
            if self.workers is not None:
                self.workers.owns_sockmap = False
            self.request_drain("a new agent took over the node's datapath")
        elif not self._draining.is_set():
            log.warning("event=takeover_failed action=\"putting our listeners back in the sockmap\"")
            await self._in_datapath_thread(self.datapath.put_listeners, self._listeners)

    async def _set_sockmap(self, listeners: dict[Slot, Any]) -> None:
        """Points the sockmap's slots at `listeners` (another worker's, when one died)."""
        assert self.datapath is not None
        await self._in_datapath_thread(self.datapath.put_listeners, listeners)

    def _issuer(self) -> FileCA | ClusterCAClient:
        """The cluster CA's client with --ca-address; else the local root CA (the weaker trust model)."""
        config = self.config
        if config.ca_address is None:
            return self.ca_watch.load_or_create()
        assert config.ca_token_file is not None and config.trust_bundle is not None
        try:
            return ClusterCAClient(config.ca_address, config.ca_token_file, config.trust_bundle, config.trust_domain,
                                   poll_interval=config.ca_poll_interval)
        except ValueError as e:  # the address; a bundle that does not load is a CAError naming the file
            raise CAError(f"cannot use the cluster CA {config.ca_address}: {e}") from None

    def _on_trust_bundle(self, roots: tuple[Any, ...]) -> None:
        """A new trust bundle was read whole: every certificate is renewed, its contexts trusting it."""
        assert self.certs is not None and self.issuer is not None
        self.certs.set_issuer(self.issuer)

    def ca_status(self) -> dict:
        """Where this node's certificates come from, and (cluster CA) how its requests go."""
        if isinstance(self.issuer, FileCA):
            return {"mode": "local", "path": str(self.issuer.directory)}
        if self.issuer is None:
            return {"mode": "starting"}
        status = self.issuer.status()
        certificates = self.certs.certificates() if self.certs else []
        expiries = sorted(c["not_after"] for c in certificates if c["not_after"])
        return {**status, "first_expiry": expiries[0] if expiries else None, "trust_bundle": self.issuer.trust.status()}

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.config.resync_interval)
                periodic = False
            except asyncio.TimeoutError:
                periodic = True  # interfaces and routes may have changed: synced whatever the registry says
            self._reconcile_now.clear()
            assert self.datapath is not None and self.certs is not None
            state = self.state
            local = self._local.changed(state)
            if local is not None:  # a change on another node changes neither capture nor certificates
                self.certs.set_identities(local.identities)
            if local is not None or periodic:
                await self._in_datapath_thread(self.datapath.sync, self._local.of(state).ips)

    def request_drain(self, by: str) -> None:
        """Starts the drain (see the module docstring); asking again changes nothing."""
        if not self._draining.is_set():
            log.info("event=drain_requested by=%r deadline_s=%s live_connections=%d", by,
                     self.config.drain_deadline, len(self.table.live()))
            self._draining.set()

    async def _stop(self) -> None:
        draining = self._draining.is_set()
        grace = self.config.drain_deadline if draining else self.config.drain_grace
        log.info("event=stopping draining=%s grace_s=%s live_connections=%d", draining, grace,
                 len(self.table.live()))
        if draining and self.inbound_hbone is not None:
            self.inbound_hbone.go_away()
        if draining and self.workers is not None:
            await self.workers.go_away()
        if self._handover_channel is not None:  # a takeover that failed: the old agent serves on
            self._handover_channel.close()
            self._handover_channel = None
        if self._admin is not None:
            await self._admin.stop()
        if self._telemetry is not None:
            await self._telemetry.stop()
        # All listeners close at once (new connections are refused from here on), then the
        # live ones share one grace period.
        await asyncio.gather(*(proxy.close(grace=grace) for proxy in self._proxies.values()),
                             *([self.workers.stop(grace)] if self.workers is not None else []))
        await self.pool.close()
        if self.datapath is not None:
            await self._in_datapath_thread(self.datapath.close)
        log.info("event=stopped node=%s", self.config.node)

    async def flows(self, limit: int | None = None) -> list[dict]:
        """The capture program's per-flow counters, largest first (none before it is loaded)."""
        if self.datapath is None:
            return []
        return await self._in_datapath_thread(self.datapath.flows, limit)

    async def connections(self) -> list[dict]:
        """Live and recent connections, each with the BPF counters of its pod-facing flow (the
        packets the client sent, as the capture program counted them), when there is one."""
        flows = {(f["src"], f["dst"]): f for f in await self.flows() if f["proto"] == "tcp"}
        rows = merge(await self.dataplane_snapshots(rows=True)).rows
        for row in rows:
            flow = flows.get((f"{row['source_ip']}:{row['source_port']}", row["original_dst"]))
            row["flow"] = {"packets": flow["packets"], "bytes": flow["bytes"]} if flow else None
        return rows

    async def dataplane_snapshots(self, rows: bool = False) -> list[DataplaneSnapshot]:
        """The data-plane snapshot of each process running listeners (with connection rows if
        `rows`), for the node's views to merge: this one's, then each worker's, asked over its
        channel now, and what the workers that died had counted."""
        own = take_snapshot(self.table, self.counters, self.pool, self.outbound, self.inbound_hbone, self.state,
                            rows=rows)
        return [own, *(await self.workers.snapshots(rows) if self.workers is not None else [])]

    async def live_connections(self) -> int:
        """Connections open now on this node, over every process that runs listeners."""
        return sum(merge(await self.dataplane_snapshots()).live.values())

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether the node's capture is fully up, and what is missing if not."""
        problems = []
        if self.registry.state is None:
            problems.append("registry not loaded")
        if self.datapath is None:
            problems.append("BPF program not loaded")
        serving = self.workers is not None and any(w.serving for w in self.workers.workers)
        missing = [] if serving else [slot.name.lower() for slot in LISTENER_PORTS if slot not in self._proxies]
        if missing or self._stopping.is_set() or self._draining.is_set():
            problems.append("listeners not serving: " + ", ".join(missing or ["stopping"]))
        return not problems, problems

    async def status(self) -> dict:
        """The agent's own view of itself, for `ameshctl status`."""
        state = self.state
        datapath = await self._in_datapath_thread(self.datapath.status) if self.datapath else None
        dataplane = merge(await self.dataplane_snapshots())
        return {
            "node": self.config.node,
            "started": iso_utc(self.started),
            "uptime_s": round(time.time() - self.started, 3),
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            "registry": {
                "source": "file" if isinstance(self.registry, FileSource) else "kubernetes",
                "path": self._registry_name(),
                "connected": self.registry.connected,
                "synced_at": iso_utc(self.registry.synced_at) if self.registry.synced_at else None,
                # with workers, the oldest any of them routes by: a change shows here once it is in force
                "generation": min(state.generation, self.workers.routing_generation() or state.generation)
                              if self.workers is not None else state.generation,
                "workloads": len(state.workloads),
                "services": len(state.services),
                "registrations": len(self.registrations),
                "last_error": self.registry.last_error,
                "notice": self.registry.notice,
            },
            "ca": self.ca_status(),
            "listeners": {slot.name.lower(): f"0.0.0.0:{port}" for slot, port in LISTENER_PORTS.items()},
            "datapath": datapath,
            "hbone": {"handshakes": dataplane.hbone_handshakes, "sessions": dataplane.hbone_sessions,
                      "dead_peers": dataplane.hbone_dead_peers},
            "connections": {"live": sum(dataplane.live.values()), "recently_closed": dataplane.recently_closed,
                            "failures": dataplane.failures},
            "workers": {"count": self.config.workers, "restarts": self.workers.restarts,
                        "processes": self.workers.status()} if self.workers is not None else {"count": 1},
        }

