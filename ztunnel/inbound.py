"""The inbound listeners: connections to enrolled pods on this node, captured at the node.

- HBONE (15008): another node's ztunnel tunnelling to a local pod. TLS 1.3 with the certificate
  of the pod whose address was dialled, the client's certificate required (our root, our trust
  domain), then each CONNECT: 400 for a bad request or an :authority that is not that local
  workload, 401 when policy denies it, 503 when the pod cannot be reached, 200 once it is
  connected. The peer's SPIFFE
  identity is recorded on the connection.
- plaintext (15006): TCP that reached an enrolled pod without the mesh (from a pod that is
  not enrolled, or from outside). PERMISSIVE delivers it, recorded as plaintext; STRICT
  refuses it. Traffic the node itself sends (kubelet probes) is never captured, so never
  refused.

Both ask `ztunnel.authz` whether the connection is admitted (a denied CONNECT is answered 401,
denied plaintext is reset) before anything reaches the pod.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from typing import Callable

from registry.model import RegistryState, Workload
from ztunnel.authz import Authorizer, Connection, Denied
from ztunnel.connections import ConnectionRecord, ConnectionTable
from ztunnel.errors import ProxyError
from ztunnel.hbone import ConnectRequest, HboneServer, Responder, hostport, parse_forwarded_for
from ztunnel.hbone.session import H2Session
from ztunnel.identity import CertificateManager, CredentialReplica, Identity, peer_identity, workload_identity
from ztunnel.server import CapturedListener
from ztunnel.limits import HandshakeLimiter
from ztunnel.logbound import cut
from ztunnel.streams import TcpStream, connect_tcp, reset_socket


AUTHORITY_LIMIT = 64  # characters of a CONNECT's :authority kept on its record; "ip:port" needs 47 at most


class NotLocal(ProxyError):
    """The destination is not an enrolled workload on this node (stale capture or bad request)."""


def local_destination(state: RegistryState, node: str, ip: str) -> Workload:
    """The enrolled workload on `node` at `ip`, or NotLocal."""
    workload = state.workload_by_ip(ip)
    if workload is None or not workload.enrolled or workload.node != node:
        raise NotLocal("not_local", f"{ip} is not an enrolled workload on node {node}")
    return workload


class InboundPlaintextProxy(CapturedListener):
    """Delivers plaintext captured on its way to a local pod, unless policy refuses it (STRICT
    mTLS, or an AuthorizationPolicy: plaintext has no identity, only its source address)."""

    def __init__(self, state_getter: Callable[[], RegistryState], table: ConnectionTable, authorizer: Authorizer,
                 node: str, connect_timeout: float = 5.0) -> None:
        super().__init__(state_getter, table, authorizer, connect_timeout)
        self._node = node

    async def serve_connection(self, conn: socket.socket, peer: tuple[str, int],
                               destination: tuple[str, int]) -> None:
        state = self._state_getter()
        record = self.open_record(state, peer, hostport(*destination), "inbound")
        record.security, record.upstream = "plaintext", hostport(*destination)
        await self.proxy(record, TcpStream(conn), lambda: self._open_upstream(state, record, *destination))

    async def _open_upstream(self, state: RegistryState, record: ConnectionRecord, dst_ip: str,
                             dst_port: int) -> TcpStream:
        destination = local_destination(state, self._node, dst_ip)
        record.upstream_workload = destination.key
        self.admit(state, record, Connection(record.source_ip, None, destination, dst_port, "plaintext",
                                             record.source_workload))
        return await connect_tcp(dst_ip, dst_port, self._connect_timeout)


class InboundHboneProxy(CapturedListener):
    """Terminates HBONE for the enrolled pods of this node.

    Trust: the pod a tunnel reaches is always the one whose address the TCP connection was made
    to (and whose certificate was served); a CONNECT may choose only the port (any other IP is
    answered 400, as Istio's ztunnel does). The source a peer names in `forwarded: for=` is
    believed only when the workload at that address carries the identity the peer proved;
    otherwise it is counted in `unverified_sources` and the connection is recorded with the
    peer's identity and its own address (attributed to the workload there only if that one
    carries the proved identity, as when an Istio ztunnel dials from the client pod's address).
    """

    def __init__(self, state_getter: Callable[[], RegistryState], table: ConnectionTable, authorizer: Authorizer,
                 node: str, certs: CertificateManager | CredentialReplica, handshakes: HandshakeLimiter,
                 connect_timeout: float = 5.0) -> None:
        super().__init__(state_getter, table, authorizer, connect_timeout)
        self._node = node
        self._certs = certs
        self._handshakes = handshakes
        self.unverified_sources = 0  # CONNECTs whose forwarded source was not believed
        self.mitigations: Counter[str] = Counter()  # HTTP/2 limits peers crossed, over all sessions
        self._sessions: set[H2Session] = set()  # served now
        self.going_away = False  # draining: every session, also one accepted from now on, gets GOAWAY

    def go_away(self) -> None:
        """Graceful GOAWAY on every HBONE session, now and from now on: peers open their new
        streams elsewhere (on a fresh session, which reaches the node's new agent), and the
        streams open here run to their end."""
        self.going_away = True
        for session in list(self._sessions):
            session.go_away()

    async def serve_connection(self, conn: socket.socket, peer: tuple[str, int],
                               destination: tuple[str, int]) -> None:
        dst_ip, dst_port = destination
        state = self._state_getter()

        async def handle(request: ConnectRequest, responder: Responder) -> None:
            # the registry (and its policies) as of this CONNECT: a pooled session outlives many
            await self._tunnel(self._state_getter(), served, served_id, client, peer, request, responder)

        server = HboneServer(handle, mitigations=self.mitigations)
        session = None
        refused = self._handshakes.admit(peer[0])
        try:
            if refused is not None:
                raise ProxyError("handshake_limit", f"TLS handshake from {hostport(*peer)} refused at once: {refused}")
            served = local_destination(state, self._node, dst_ip)
            # The certificate is the dialled pod's, so TLS starts only now that we know it.
            served_id = workload_identity(served, self._certs.trust_domain)
            session = await server.accept(conn, self._certs.server_context(served_id), self._connect_timeout)
            tls = session.tls_object()
            client = peer_identity(tls.getpeercert(binary_form=True) if tls else None, self._certs.trust_domain)
        except (ProxyError, ssl.SSLError, OSError, TimeoutError) as e:
            # Nothing reached the pod. Recorded as a failed connection so refusals show up.
            record = self.open_record(state, peer, hostport(dst_ip, dst_port), "inbound")
            record.security = "mtls"
            error = e if isinstance(e, ProxyError) else _tls_error(e, hostport(*peer))
            if session is not None:
                session.abort()
            reset_socket(conn)  # closed already unless the handshake succeeded or never started
            self.end(record, "failed", str(error), error.reason)
            return
        finally:
            if refused is None:
                self._handshakes.done(peer[0])
        self._sessions.add(session)
        if self.going_away:
            asyncio.get_running_loop().call_soon(session.go_away)  # once serve() has started it
        try:
            await server.serve(session)
        finally:
            self._sessions.discard(session)

    async def _tunnel(self, state: RegistryState, served: Workload, served_id: Identity, client: Identity,
                      peer: tuple, request: ConnectRequest, responder: Responder) -> None:
        """Carries one CONNECT out; its record ends exactly once, however the stream ends."""
        claimed = parse_forwarded_for(request.headers.get("forwarded", ""))
        # an Istio ztunnel peer dials from the client pod's own address and sends no forwarded
        source = (verified_source(state, claimed, client, self._certs.trust_domain)
                  or verified_source(state, peer[0], client, self._certs.trust_domain))
        if claimed is not None and (source is None or source.ip != claimed):
            self.unverified_sources += 1
        # HBONE carries the client's address (forwarded: for=) but not its port: 0 says unknown.
        record = self._table.open(source.ip if source else peer[0], 0, cut(request.authority, AUTHORITY_LIMIT),
                                  source.key if source else None, direction="inbound")
        record.security, record.source_identity = "mtls", client.uri
        record.upstream, record.upstream_workload = hostport(served.ip, request.port), served.key
        record.destination_identity = served_id.uri
        try:
            if request.host != served.ip:
                raise NotLocal("wrong_authority", f"CONNECT {cut(request.authority, AUTHORITY_LIMIT)} names another "
                                                  f"address than {served.ip} ({served.key}), whose HBONE port "
                                                  "this connection was made to: only the port may differ")
            self.admit(state, record, Connection(source.ip if source else None, client, served, request.port,
                                                 "hbone", record.source_workload))
            upstream = await connect_tcp(served.ip, request.port, self._connect_timeout)
        except ProxyError as e:
            self.end(record, "failed", str(e), e.reason)
            responder.reject(_status(e), str(e))
            return
        except asyncio.CancelledError:  # the client reset the stream (or the session ended)
            self.end(record, "failed", "the client reset the CONNECT before the tunnel opened", "client_reset")
            raise
        except Exception as e:
            self.end_unexpected(record, e)
            raise  # HboneServer answers 503
        try:
            stream = await responder.accept()
        except (ConnectionError, asyncio.CancelledError) as e:
            upstream.abort()
            self.end(record, "failed", f"the client left before the tunnel opened ({e or 'cancelled'})",
                     "client_reset")
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        await self.relay(record, stream, upstream)


def _status(error: ProxyError) -> int:
    """The HTTP answer to a CONNECT that cannot be served: 400 for a CONNECT to something we do
    not serve, 401 for a policy denial (as ztunnel answers), 503 when the pod cannot be reached."""
    if isinstance(error, NotLocal):
        return 400
    return 401 if isinstance(error, Denied) else 503


def verified_source(state: RegistryState, claimed_ip: str | None, proved: Identity,
                    trust_domain: str) -> Workload | None:
    """The workload a peer says the connection comes from, if the registry shows it at
    `claimed_ip` with the identity the peer proved; None for no claim or one not borne out."""
    workload = state.workload_by_ip(claimed_ip) if claimed_ip else None
    if workload is None or workload_identity(workload, trust_domain) != proved:
        return None
    return workload


def _tls_error(error: Exception, peer: str) -> ProxyError:
    """An OpenSSL or socket failure during the handshake, as a reason an operator can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return ProxyError("tls", f"TLS handshake from {peer} refused: its certificate failed verification "
                                 f"({error.verify_message})")
    if isinstance(error, ssl.SSLError):
        detail = (error.reason or str(error)).replace("_", " ").lower()
        return ProxyError("tls", f"TLS handshake from {peer} refused: {detail}")
    if isinstance(error, TimeoutError):
        return ProxyError("tls", f"TLS handshake from {peer} timed out")
    return ProxyError("tls", f"TLS handshake from {peer} failed: {error}")
