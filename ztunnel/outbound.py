"""The outbound listener: proxies connections captured from local pods to their upstreams.

The BPF program hands each captured SYN to our transparent listener, so the accepted socket's
local address is the address the pod dialled. `Router` turns that into an upstream, and the
upstream's enrollment decides how to reach it:

  enrolled, on another node   HBONE: an mTLS HTTP/2 CONNECT to its node's ztunnel (port 15008),
                              as the source workload's identity, checking the destination's
  enrolled, on this node      same-node: admitted by the destination's policies as an inbound
                              connection would be, then connected directly, both identities recorded
  not enrolled                plaintext TCP
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Callable, Collection

from registry.model import RegistryState, Workload
from ztunnel.authz import Authorizer, Connection
from ztunnel.connections import ConnectionRecord, ConnectionTable
from ztunnel.errors import ProxyError
from ztunnel.hbone import HBONE_PORT, HboneClientPool, HboneError, PoolKey, forwarded_for, hostport, traceparent
from ztunnel.identity import CertificateManager, CredentialReplica, expect_identity, peer_identity, workload_identity
from ztunnel.limits import Hold
from ztunnel.routing import Upstream, captured_source, guard_self_loop
from ztunnel.server import CapturedListener, OriginalDestination, sockname_destination
from ztunnel.shaping import TrafficShaper
from ztunnel.streams import Stream, TcpStream, connect_tcp


@dataclass
class MeshTransport:
    """What the ztunnel needs to reach enrolled workloads: its node, certificates, HBONE pool."""

    node: str
    certs: CertificateManager | CredentialReplica  # the agent's, or a worker process's copy
    pool: HboneClientPool


class OutboundProxy(CapturedListener):
    """Accepts captured connections on one listening socket and splices each to its upstream.

    `own_ports` are the ports the agent serves on the node's addresses (`node_addresses()`):
    a captured connection to one of them is refused, as it would loop back into the ztunnel.

    A connect that fails before any byte of the client's went upstream (refused, timed out,
    HBONE answered 503 or not at all) is retried on the next endpoint of the Router's plan, while
    the retry budget of the destination Service allows and within `connect_deadline` seconds in
    all; the client sees a working connection, or a reset once every attempt has failed. Each
    outcome feeds the endpoint's breaker (`shaper.outliers`), which takes failing endpoints out of the
    plans of new connections for a while.

    Before any connect, `shaper` (ztunnel/shaping.py) decides: the plan, and the connection's
    place among the destination Service's live connections (over the Service's maxConnections,
    or its rate limit, it is refused at once). The place, and the endpoint's count LEAST_REQUEST
    balances on, are given back when the connection ends, whichever way.
    """

    def __init__(
        self,
        state_getter: Callable[[], RegistryState],
        table: ConnectionTable,
        authorizer: Authorizer,
        transport: MeshTransport,
        own_ports: Collection[int],
        node_addresses: Callable[[], Collection[str]],
        connect_timeout: float = 5.0,
        connect_deadline: float = 10.0,
        original_destination: OriginalDestination = sockname_destination,
        workers: int = 1,  # the node's worker processes: this one holds its share of the per-Service limits
    ) -> None:
        super().__init__(state_getter, table, authorizer, connect_timeout, original_destination)
        self._transport = transport
        self.shaper = TrafficShaper(transport.node, workers=workers)  # its breakers, live counts and splits: read by views, metrics
        self._own_ports = own_ports
        self._node_addresses = node_addresses
        self._connect_deadline = connect_deadline

    async def serve_connection(self, conn: socket.socket, peer: tuple[str, int],
                               destination: tuple[str, int]) -> None:
        state = self._state_getter()
        record = self.open_record(state, peer, hostport(*destination), "outbound")
        hold = self.shaper.live.hold()
        try:
            await self.proxy(record, TcpStream(conn), lambda: self._open_upstream(state, record, hold, *destination))
        finally:
            hold.release()

    async def _open_upstream(self, state: RegistryState, record: ConnectionRecord, hold: Hold, dst_ip: str,
                             dst_port: int) -> Stream:
        source = captured_source(state, self._transport.node, record.source_ip)
        attempts = self.shaper.admit(state, dst_ip, dst_port, hold, self._table.attempts, record.attempts,
                                     self._connect_deadline)
        for route in attempts:
            timeout = attempts.timeout(route, self._connect_timeout)
            try:
                stream = await self._attempt(state, record, source, route, timeout)
            except ProxyError as e:
                if attempts.failed(route, e):
                    continue
                raise
            except BaseException:  # cancelled, or a bug the listener boundary reports
                attempts.abandoned(route)
                raise
            attempts.succeeded(route)
            return stream
        raise AssertionError("a plan has at least one candidate")

    async def _attempt(self, state: RegistryState, record: ConnectionRecord, source: Workload, route: Upstream,
                       timeout: float) -> Stream:
        """One connect to `route` within `timeout` seconds (the per-try timeout, within the deadline)."""
        record.service, record.upstream, record.upstream_workload = route.service, route.address, route.workload
        guard_self_loop(route, self._own_ports, self._node_addresses)
        target = state.workload_by_ip(route.ip)
        if target is None or not target.enrolled:
            record.security = "plaintext"
            return await connect_tcp(route.ip, route.port, timeout)
        try:
            async with asyncio.timeout(timeout):
                return await self._to_enrolled(state, record, source, target, route.port, timeout)
        except TimeoutError:
            raise HboneError("connect_timeout", f"connect to {route.address} ({target.key}) did not complete "
                                                f"within {timeout:.1f}s") from None

    async def _to_enrolled(self, state: RegistryState, record: ConnectionRecord, source: Workload,
                           target: Workload, port: int, timeout: float) -> Stream:
        transport = self._transport
        trust_domain = transport.certs.trust_domain
        source_id, target_id = workload_identity(source, trust_domain), workload_identity(target, trust_domain)
        record.source_identity, record.destination_identity = source_id.uri, target_id.uri
        if target.node == transport.node:
            # never crosses an inbound listener, so the destination's policies are decided here
            record.security = "same-node"
            self.admit(state, record, Connection(source.ip, source_id, target, port, "same-node", source.key))
            return await connect_tcp(target.ip, port, timeout)
        record.security = "mtls"

        def verify(cert_der: bytes | None) -> None:
            expect_identity(peer_identity(cert_der, trust_domain), target_id)

        return await transport.pool.open(
            PoolKey(source_id.uri, target_id.uri, (target.ip, HBONE_PORT), transport.certs.serial(source_id)),
            transport.certs.client_context(source_id),
            hostport(target.ip, port),
            [("forwarded", forwarded_for(record.source_ip)), ("traceparent", traceparent())],
            verify,
        )
