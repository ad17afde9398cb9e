"""The client side of HBONE: `HboneClientPool` opens CONNECT streams, reusing one mTLS session
per (source identity, destination identity, peer address, certificate), shares one handshake
between concurrent first opens, closes idle sessions and drops those whose peer stopped answering
HTTP/2 PINGs (ztunnel/hbone/keepalive.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from ztunnel.hbone.keepalive import KeepaliveSettings
from ztunnel.hbone.protocol import HboneError, hostport
from ztunnel.hbone.session import CONNECT_TIMEOUT, IDLE_TIMEOUT, H2Session, HboneStream

log = logging.getLogger("amesh.ztunnel.hbone")


@dataclass(frozen=True)
class PoolKey:
    """What a pooled session is for: source and destination identity (SPIFFE URIs), peer address,
    and which certificate of the source it presents.

    Streams share a session only when all match, so one mTLS connection never carries two
    workloads' traffic, and after a certificate renewal new streams go on a new session that
    presents the new certificate (sessions on the old one live on until idle).
    """

    source: str
    destination: str
    address: tuple[str, int]
    credential: str = ""  # e.g. the serial of the source's certificate


PeerVerifier = Callable[[bytes | None], None]  # gets the peer's certificate (DER); raises to refuse


class HboneClientPool:
    """Opens HBONE streams, reusing one mTLS session per `PoolKey` while it has stream capacity.

    Counters (plain integers, read at scrape time): `handshakes` (TLS sessions established, ever),
    `sessions` (live now) and `dead_peers` (sessions dropped for an unanswered PING); `mitigations`, the HTTP/2 limits its peers crossed, by name (as
    HboneServer's: a hostile server can flood a client too).
    """

    def __init__(
        self, idle_timeout: float = IDLE_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
        keepalive: KeepaliveSettings | None = KeepaliveSettings(),
    ) -> None:
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.handshakes = 0
        self.dead_peers = 0
        self.mitigations: Counter[str] = Counter()
        self._sessions: dict[PoolKey, list[H2Session]] = {}
        self._connecting: dict[PoolKey, asyncio.Task[H2Session]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"HboneClientPool(sessions={self.sessions}, handshakes={self.handshakes})"

    @property
    def sessions(self) -> int:
        """Live sessions."""
        return sum(len(sessions) for sessions in self._sessions.values())

    async def open(
        self,
        key: PoolKey,
        ssl_context: ssl.SSLContext,
        authority: str,
        headers: Sequence[tuple[str, str]],
        verify_peer: PeerVerifier,
    ) -> HboneStream:
        """A CONNECT stream to `authority` through the ztunnel at key.address; HboneError if not.

        `headers` go with the CONNECT (forwarded, traceparent); `verify_peer` sees the peer's
        certificate of each new session before any stream is sent on it.
        """
        while True:
            if self._closed:
                raise HboneError("closed", "the HBONE client pool is closed (ztunnel shutting down)")
            session = next((s for s in self._sessions.get(key, []) if s.has_capacity()), None)
            if session is not None:
                return await session.open_stream(authority, headers, self.connect_timeout)
            # Everyone who finds no session while one is being made waits for that one.
            connecting = self._connecting.get(key)
            if connecting is None:
                connecting = asyncio.create_task(self._connect(key, ssl_context, verify_peer))
                self._connecting[key] = connecting
                connecting.add_done_callback(lambda _: self._connecting.pop(key, None))
            await asyncio.shield(connecting)  # one waiter cancelled must not cancel the handshake

    async def close(self) -> None:
        """Closes every session (GOAWAY) and abandons handshakes under way."""
        self._closed = True
        connecting = list(self._connecting.values())
        for task in connecting:
            task.cancel()
        sessions = [s for group in self._sessions.values() for s in group]
        for session in sessions:
            session.close()
        await asyncio.gather(*connecting, return_exceptions=True)
        if sessions:
            # A peer that stopped reading would keep our GOAWAY, and the close, waiting forever.
            _, stuck = await asyncio.wait([asyncio.ensure_future(s.wait_closed()) for s in sessions],
                                          timeout=self.connect_timeout)
            if stuck:
                for session in sessions:
                    session.abort()
                await asyncio.gather(*stuck)

    async def _connect(
        self, key: PoolKey, ssl_context: ssl.SSLContext, verify_peer: PeerVerifier
    ) -> H2Session:
        """TCP, TLS, the peer check and the HTTP/2 preface; the session joins the pool."""
        ip, port = key.address
        peer = hostport(ip, port)
        try:
            async with asyncio.timeout(self.connect_timeout):
                # server_hostname=None: peers are checked by SPIFFE ID (verify_peer), and Python
                # sends no SNI for an IP address.
                session = H2Session(client_side=True, peer=peer, idle_timeout=self.idle_timeout,
                                     on_close=lambda s: self._drop(key, s), mitigations=self.mitigations,
                                     keepalive=self.keepalive)
                # a peer that drains (its agent is being replaced) sends a graceful GOAWAY: its
                # streams run on, new ones go on a fresh session (to the same address, now served
                # by the peer's new agent)
                session.on_going_away = lambda s: self._drop(key, s)
                # (uvloop returns its TLS protocol, not ours, as the second value)
                await asyncio.get_running_loop().create_connection(
                    lambda: session, ip, port, ssl=ssl_context, server_hostname=None)
                self.handshakes += 1
                tls = session.tls_object()
                assert tls is not None
                if tls.selected_alpn_protocol() != "h2":
                    raise HboneError(
                        "protocol",
                        f"{peer} did not agree to HTTP/2 (ALPN h2, got {tls.selected_alpn_protocol()}): "
                        f"is it a ztunnel's HBONE port, and does our TLS context offer h2?",
                    )
                try:
                    verify_peer(tls.getpeercert(binary_form=True))
                except Exception as e:
                    raise HboneError("peer_rejected", f"HBONE peer {peer} rejected: {e}") from None
                session.start()
                await session.wait_settings()
                if session.h2.remote_settings.max_concurrent_streams == 0:
                    raise HboneError(
                        "protocol", f"{peer} allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)"
                    )
        except BaseException as e:
            session.abort()
            if isinstance(e, HboneError) or not isinstance(e, Exception):  # e.g. cancelled
                raise
            raise _connect_error(e, peer, port, self.connect_timeout) from None
        self._sessions.setdefault(key, []).append(session)
        log.debug(
            "hbone.session_opened peer=%s source=%s destination=%s", peer, key.source, key.destination
        )
        return session

    def _drop(self, key: PoolKey, session: H2Session) -> None:
        self.dead_peers += session.keepalive_expired
        group = self._sessions.get(key, [])
        if session in group:
            group.remove(session)
        if not group:
            self._sessions.pop(key, None)


def _connect_error(error: Exception, peer: str, port: int, timeout: float) -> Exception:
    """The HboneError for an OS or TLS error while setting up a session to `peer`."""
    if isinstance(error, TimeoutError):
        return HboneError(
            "connect_timeout",
            f"HBONE connect to {peer} timed out after {timeout}s: is port {port} blocked between nodes?",
        )
    if isinstance(error, ConnectionRefusedError):
        return HboneError(
            "connect_refused", f"HBONE connect to {peer} refused: is the ztunnel on that node running?"
        )
    if isinstance(error, ssl.SSLError):
        return HboneError(
            "tls",
            f"TLS handshake with {peer} failed ({error.reason or error}): "
            f"do both nodes trust the same mesh CA?",
        )
    if isinstance(error, OSError):
        return HboneError("connect_failed", f"HBONE connect to {peer} failed: {error.strerror or error}")
    return error

