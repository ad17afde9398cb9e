"""The server side of HBONE: `HboneServer` serves accepted mTLS connections, each CONNECT to
a handler of its own through a `Responder`."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from ztunnel.hbone.protocol import parse_authority
from ztunnel.hbone.session import PREFACE_TIMEOUT, SERVER_IDLE_TIMEOUT, H2Session, HboneStream, limited_log
from ztunnel.logbound import cut


@dataclass
class ConnectRequest:
    """A CONNECT received by an HboneServer: where the client wants to go, and who asks."""

    authority: str  # host:port as sent
    host: str
    port: int
    headers: dict[str, str]  # the regular (non-pseudo) headers, e.g. forwarded, traceparent
    stream_id: int
    peer_cert: bytes | None = field(default=None, repr=False)  # the client's certificate, DER

    @classmethod
    def parse(
        cls, headers: Sequence[tuple[str, str]], stream_id: int, peer_cert: bytes | None = None
    ) -> ConnectRequest:
        """The request in `headers`; ValueError (the text of a 400 answer) if it is no valid CONNECT."""
        pseudo = {name: value for name, value in headers if name.startswith(":")}
        method = pseudo.get(":method")
        if method != "CONNECT":
            raise ValueError(f"HBONE accepts only CONNECT, not {method}")
        authority = pseudo.get(":authority", "")
        host, port = parse_authority(authority)
        regular = {name: value for name, value in headers if not name.startswith(":")}
        return cls(authority, host, port, regular, stream_id, peer_cert)


class Responder:
    """Answers one CONNECT: `await accept()` for the stream, or `reject(status, reason)`.

    None of them raises an h2 error, whatever the client did meanwhile: a CONNECT that came with
    END_STREAM is answered (accept's stream then reads EOF at once), a stream the client reset or
    whose connection ended is only released. accept() alone says so, with ConnectionResetError
    (there is no tunnel to hand over); answering twice is the handler's bug (RuntimeError).
    """

    def __init__(self, session: H2Session, stream: HboneStream) -> None:
        self._session = session
        self._stream = stream
        self.answered: int | None = None  # the status sent, once sent

    async def accept(self) -> HboneStream:
        """Answers 200 and returns the tunnel stream; ConnectionResetError if the client reset the
        stream or its connection is gone."""
        self._answer(200, "")
        if self._stream._error is not None:
            raise self._stream._error
        await self._session.drain()
        return self._stream

    def reject(self, status: int, reason: str) -> None:
        """Answers `status` (not 200) with `reason` in the amesh-reason header, and ends the stream."""
        if status == 200:
            raise ValueError("reject() needs an error status; accept() answers 200")
        self._answer(status, reason)

    def settle(self, reason: str) -> None:
        """Answers 503 with `reason` if nothing was answered yet (a no-op on a stream gone)."""
        if self.answered is None:
            self._answer(503, reason)

    def _answer(self, status: int, reason: str) -> None:
        if self.answered is not None:
            raise RuntimeError(
                f"CONNECT stream {self._stream.stream_id} was already answered {self.answered}"
            )
        self.answered = status
        self._session.answer(self._stream, status, reason)  # sends nothing on a stream gone


ConnectHandler = Callable[[ConnectRequest, Responder], Awaitable[None]]


class HboneServer:
    """Serves HBONE connections: each valid CONNECT runs `handler` in its own task.

    The handler answers through its Responder; an accepted stream lives while the handler runs
    and is closed when it returns. Requests that are not a CONNECT to host:port get 400 without
    the handler; a handler that fails, or returns without answering, gets its client a 503.

    The handler task is cancelled (it sees asyncio.CancelledError at its next await) when the
    client resets its stream before the answer (its upstream connect is then abandoned, the
    rapid-reset pattern costs nothing) and when the connection ends. A handler that owns a
    record must therefore end it in a `finally`, not only after the awaits it expects to finish.

    Sessions are held to `ztunnel.hbone.limits` and to two deadlines: PREFACE_TIMEOUT after TLS
    for the client's SETTINGS, `idle_timeout` without a stream (then GOAWAY). `mitigations`
    counts, over all sessions, each limit crossed and each deadline hit, by name:
    frame_too_large, header_block_too_large, ping_flood, settings_flood, rst_stream_flood,
    empty_data_flood, extension_flood, window_update_flood, priority_flood, rapid_reset (each a GOAWAY and the
    connection's end), refused_stream (one stream refused, over MAX_CONCURRENT_STREAMS),
    preface_timeout, idle_timeout, read_yield (a read pass cut short by H2_FRAMES_PER_PASS).
    Pass `mitigations` to count into a Counter that outlives this server (e.g. a listener's,
    when each accepted connection gets a server of its own).
    """

    def __init__(self, handler: ConnectHandler, idle_timeout: float = SERVER_IDLE_TIMEOUT,
                 preface_timeout: float = PREFACE_TIMEOUT, mitigations: Counter[str] | None = None) -> None:
        self._handler = handler
        self._idle_timeout, self._preface_timeout = idle_timeout, preface_timeout
        self.mitigations: Counter[str] = Counter() if mitigations is None else mitigations

    async def accept(self, conn: socket.socket, context: ssl.SSLContext, handshake_timeout: float) -> H2Session:
        """Server-side TLS on an accepted socket; the session is not served until `serve()`, so
        the caller can check the client's certificate (`tls_object()`) first. ssl.SSLError,
        OSError or TimeoutError if the handshake fails or does not start and end within
        `handshake_timeout`; the socket is then closed.

        TLS state (the event loop's TLS protocol reserves a 256 KiB read buffer, asyncio's and
        uvloop's alike) and the session exist only once the client has sent something: a
        connection that stays silent costs its socket and this coroutine, nothing more."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(handshake_timeout):
                await _readable(conn)
                session = self._session()
                # (uvloop returns its TLS protocol, not ours, as the second value)
                await loop.connect_accepted_socket(
                    lambda: session, conn, ssl=context, ssl_handshake_timeout=handshake_timeout)
        except BaseException:
            conn.close()
            raise
        return session

    async def serve(self, session: H2Session) -> None:
        """Serves an accepted session until its connection ends, then cancels its handlers."""
        session.start()
        try:
            await session.wait_closed()
        finally:
            session.close()
            handlers = list(session.handlers.values())
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def listen(self, host: str, port: int, context: ssl.SSLContext) -> asyncio.Server:
        """Serves every TLS connection to host:port, however its certificate (a standalone
        server, as tests use; the ztunnel accepts and checks connections itself)."""
        return await asyncio.get_running_loop().create_server(
            lambda: self._session(autostart=True), host, port, ssl=context, reuse_address=True)

    def _session(self, autostart: bool = False) -> H2Session:
        def on_request(stream: HboneStream, headers: list[tuple[str, str]]) -> None:
            tls = session.tls_object()
            peer_cert = tls.getpeercert(binary_form=True) if tls is not None else None
            try:
                request = ConnectRequest.parse(headers, stream.stream_id, peer_cert)
            except ValueError as e:
                limited_log.log(logging.INFO, "hbone.bad_request", "hbone.bad_request peer=%s stream=%d reason=%r",
                                session.peer, stream.stream_id, cut(str(e)))
                session.answer(stream, 400, str(e))
                return
            task = asyncio.create_task(self._run(request, Responder(session, stream), stream))
            session.handlers[stream.stream_id] = task
            task.add_done_callback(lambda _: session.handlers.pop(stream.stream_id, None))

        def on_reset(stream: HboneStream) -> None:
            task = session.handlers.get(stream.stream_id)
            if task is not None and not stream.answered:
                task.cancel()  # nobody waits for its answer: stop its upstream connect

        def on_close(session: H2Session) -> None:
            for task in session.handlers.values():
                task.cancel()

        session = H2Session(client_side=False, on_request=on_request, on_close=on_close, on_reset=on_reset,
                            autostart=autostart, idle_timeout=self._idle_timeout,
                            preface_timeout=self._preface_timeout, mitigations=self.mitigations)
        return session

    async def _run(self, request: ConnectRequest, responder: Responder, stream: HboneStream) -> None:
        try:
            await self._handler(request, responder)
        except Exception as e:
            where = (cut(request.authority), request.stream_id)
            if isinstance(e, ConnectionError):  # the client or the connection went away: routine
                limited_log.log(logging.INFO, "hbone.handler_reset", "hbone.handler_reset authority=%s stream=%d "
                                "error=%r", *where, cut(str(e)))
            else:
                limited_log.log(logging.ERROR, "hbone.handler_failed", "hbone.handler_failed authority=%s stream=%d "
                                "error=%r", *where, cut(str(e)), exc_info=True)
            responder.settle(f"the ztunnel failed handling CONNECT {request.authority}")
        else:
            responder.settle(f"the ztunnel did not answer CONNECT {request.authority}")
        finally:
            stream.close()


async def _readable(conn: socket.socket) -> None:
    """Returns once `conn` has bytes to read (or its end)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
