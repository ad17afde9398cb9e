"""The outbound listener: proxies connections captured from local pods to their upstreams.

The BPF program hands each captured SYN to our transparent listener, so the accepted socket's
local address is the address the pod dialled. `Router` turns that into an upstream; this module
only connects, moves bytes, and records what happened.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable

from registry.model import RegistryState
from ztunnel.connections import ConnectionRecord, ConnectionTable, EndState
from ztunnel.routing import RouteError, Router, Upstream

log = logging.getLogger("amesh.ztunnel")

COPY_CHUNK = 64 * 1024  # bytes per read; few syscalls for bulk data, bounded memory per connection
# SO_LINGER on with a zero timeout: close() sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)

OriginalDestination = Callable[[asyncio.StreamWriter], tuple[str, int]]


def sockname_destination(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """The dialled address of a connection captured with bpf_sk_assign: its local address."""
    ip, port = writer.get_extra_info("sockname")[:2]
    return ip, port


class UpstreamConnectError(Exception):
    """Connecting to the chosen upstream failed; `reason` is a short machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _StreamReset(Exception):
    """One side of a spliced connection broke off; the message names the side."""

    @classmethod
    def of(cls, side: str, error: OSError) -> _StreamReset:
        return cls(f"{side} reset ({error.strerror or error})")


class OutboundProxy:
    """Accepts captured connections on one listening socket and splices each to its upstream."""

    def __init__(
        self,
        state_getter: Callable[[], RegistryState],
        table: ConnectionTable,
        connect_timeout: float = 5.0,
        original_destination: OriginalDestination = sockname_destination,
    ) -> None:
        self._state_getter = state_getter
        self._table = table
        self._connect_timeout = connect_timeout
        self._original_destination = original_destination
        self._router = Router()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, an already bound and listening socket; the proxy takes ownership."""
        self._server = await asyncio.start_server(self._handle, sock=sock)

    @property
    def address(self) -> tuple[str, int]:
        """The (ip, port) the proxy listens on."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("outbound proxy is not serving (start() not called, or closed)")
        ip, port = self._server.sockets[0].getsockname()[:2]
        return ip, port

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give live connections `grace` seconds to end, then cancel the rest."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        handlers = set(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would log every task close() cancels as an
        # error ("Exception in callback"), so each connection runs in a task we own instead.
        if self._closing:
            # Accepted just before close() but handed to us after it: nobody would wait for it.
            _reset(writer)
            return
        task = asyncio.create_task(self._proxy(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _proxy(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername")
        if peer is None:  # the client reset before we got to look at the connection
            client_writer.close()
            return
        src_ip, src_port = peer[:2]
        dst_ip, dst_port = self._original_destination(client_writer)
        state = self._state_getter()
        source = state.workload_by_ip(src_ip)
        record = self._table.open(
            src_ip, src_port, f"{dst_ip}:{dst_port}", source.key if source is not None else None
        )
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                upstream = self._router.route(state, dst_ip, dst_port)
                record.service = upstream.service
                record.upstream = upstream.address
                record.upstream_workload = upstream.workload
                upstream_reader, upstream_writer = await self._connect(upstream)
            except (RouteError, UpstreamConnectError) as e:
                # Reset rather than FIN: a clean EOF would look like an empty reply from a
                # healthy server; ztunnel resets so the client fails fast and retries.
                _reset(client_writer)
                self._end(record, "failed", str(e))
                return
            record.state = "open"
            log.info("conn.open %s", _fields(record))
            reason = await self._splice(record, client_reader, client_writer, upstream_reader, upstream_writer)
            self._end(record, "closed", reason)
        except asyncio.CancelledError:
            _reset(client_writer)
            if upstream_writer is not None:
                _reset(upstream_writer)
            self._end(record, "closed" if record.state == "open" else "failed", "cancelled: proxy shutting down")
            raise
        finally:
            client_writer.close()
            if upstream_writer is not None:
                upstream_writer.close()

    def _end(self, record: ConnectionRecord, state: EndState, reason: str) -> None:
        self._table.close(record, state, reason)
        log.info("conn.close %s", _fields(record))

    async def _connect(self, upstream: Upstream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection to `upstream`, translating OS errors into UpstreamConnectError."""
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(upstream.ip, upstream.port), self._connect_timeout
            )
        except ConnectionRefusedError:
            raise UpstreamConnectError(
                "connect_refused", f"upstream {upstream.address} refused the connection"
            ) from None
        except TimeoutError:
            raise UpstreamConnectError(
                "connect_timeout", f"connect to {upstream.address} timed out after {self._connect_timeout}s"
            ) from None
        except OSError as e:
            raise UpstreamConnectError(
                "connect_failed", f"connect to {upstream.address} failed: {e.strerror or e}"
            ) from None

    async def _splice(
        self,
        record: ConnectionRecord,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> str:
        """Copy both directions until both have ended; returns why the connection ended."""

        def count_sent(n: int) -> None:
            record.bytes_sent += n

        def count_received(n: int) -> None:
            record.bytes_received += n

        directions = {
            asyncio.create_task(_copy(client_reader, upstream_writer, "client", "upstream", count_sent)),
            asyncio.create_task(_copy(upstream_reader, client_writer, "upstream", "client", count_received)),
        }
        try:
            done, _ = await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Either one direction broke (the other would never end by itself) or we are being
            # cancelled; both leave nothing worth waiting for.
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
        for task in done:
            error = task.exception()
            if error is not None:
                _reset(client_writer)
                _reset(upstream_writer)
                return str(error)
        return "closed"


async def _copy(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    reader_side: str,
    writer_side: str,
    count: Callable[[int], None],
) -> None:
    """Copy one direction until EOF, then pass the EOF on (half-close) and return."""
    while True:
        try:
            data = await reader.read(COPY_CHUNK)
        except OSError as e:
            raise _StreamReset.of(reader_side, e) from None
        if not data:
            break
        writer.write(data)
        count(len(data))
        try:
            await writer.drain()  # backpressure: a slow reader on the other side pauses us here
        except OSError as e:
            raise _StreamReset.of(writer_side, e) from None
    try:
        writer.write_eof()
    except OSError as e:
        raise _StreamReset.of(writer_side, e) from None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close abortively, so the peer sees a reset instead of a clean end of stream."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.is_closing():
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # the socket is already gone; there is nothing left to reset
    writer.transport.abort()


def _fields(record: ConnectionRecord) -> str:
    """The record as key=value pairs for a log line, quoting values that contain spaces."""
    pairs = {
        "conn": record.id,
        "src": f"{record.source_ip}:{record.source_port}",
        "src_workload": record.source_workload,
        "dst": record.original_dst,
        "service": record.service,
        "upstream": record.upstream,
        "upstream_workload": record.upstream_workload,
        "state": record.state,
        "sent": record.bytes_sent,
        "received": record.bytes_received,
        "duration": f"{record.duration():.3f}s",
        "reason": record.reason,
    }
    return " ".join(f"{k}={_quote(v)}" for k, v in pairs.items() if v is not None)


def _quote(value: object) -> str:
    text = str(value)
    return f'"{text}"' if " " in text or '"' in text else text
