"""What every ztunnel listener shares: serving captured connections on a socket the BPF
program delivers to, tracking each in the connection table, and draining on close.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Awaitable, Callable

from registry.model import RegistryState
from ztunnel.connections import ConnectionRecord, ConnectionTable, Direction, EndState
from ztunnel.errors import ProxyError
from ztunnel.streams import Stream, TcpStream, splice

log = logging.getLogger("amesh.ztunnel")


OriginalDestination = Callable[[asyncio.StreamWriter], tuple[str, int]]


def sockname_destination(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """The dialled address of a connection captured with bpf_sk_assign: its local address."""
    ip, port = writer.get_extra_info("sockname")[:2]
    return ip, port


class CapturedListener:
    """Serves one listening socket; subclasses implement `serve_connection`."""

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
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, an already bound and listening socket; the listener takes ownership."""
        self._server = await asyncio.start_server(self._handle, sock=sock)

    @property
    def address(self) -> tuple[str, int]:
        """The (ip, port) this listener serves."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{type(self).__name__} is not serving (start() not called, or closed)")
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
            TcpStream(reader, writer).abort()
            return
        peer = writer.get_extra_info("peername")
        if peer is None:  # the client reset before we got to look at the connection
            writer.close()
            return
        self.accepted(writer)
        task = asyncio.create_task(self.serve_connection(reader, writer, peer[:2], self._original_destination(writer)))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def accepted(self, writer: asyncio.StreamWriter) -> None:
        """Runs synchronously as the connection is accepted, before any of its bytes are read."""

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               peer: tuple[str, int], destination: tuple[str, int]) -> None:
        """Serves one accepted connection from `peer` that was dialled to `destination`."""
        raise NotImplementedError

    def open_record(self, state: RegistryState, source: tuple[str, int], destination: str,
                    direction: Direction) -> ConnectionRecord:
        """Starts tracking a connection from `source` (ip, port) to `destination` ("ip:port")."""
        workload = state.workload_by_ip(source[0])
        return self._table.open(source[0], source[1], destination, workload.key if workload else None, direction)

    async def proxy(self, record: ConnectionRecord, client: Stream,
                    open_upstream: Callable[[], Awaitable[Stream]]) -> None:
        """Opens the upstream and relays to it; when that fails the client is reset.

        A reset rather than a FIN: a clean EOF would look like an empty reply from a healthy
        server; ztunnel resets so the client fails fast and retries.
        """
        try:
            try:
                started = time.monotonic()
                upstream = await open_upstream()
                record.connect_duration = time.monotonic() - started
            except ProxyError as e:
                client.abort()
                self.end(record, "failed", str(e), e.reason)
                return
            except asyncio.CancelledError:
                client.abort()
                self.end(record, "failed", "cancelled: proxy shutting down", "shutdown")
                raise
            await self.relay(record, client, upstream)
        finally:
            client.close()

    async def relay(self, record: ConnectionRecord, client: Stream, upstream: Stream) -> None:
        """Splices an accepted client to its connected upstream until both ends have finished."""
        record.state = "open"
        record.sockets["client"] = client.kernel_socket()
        record.sockets["upstream"] = upstream.kernel_socket()
        log.info("conn.open %s", log_fields(record))
        # The record is ended before the sockets close, so it keeps their last TCP_INFO.
        try:
            self.end(record, "closed", await splice(client, upstream, record.count_sent, record.count_received))
        except asyncio.CancelledError:
            self.end(record, "closed", "cancelled: proxy shutting down")
            client.abort()
            upstream.abort()
            raise
        finally:
            upstream.close()

    def end(self, record: ConnectionRecord, state: EndState, reason: str, code: str | None = None) -> None:
        self._table.close(record, state, reason, code)
        log.info("conn.close %s", log_fields(record))


def log_fields(record: ConnectionRecord) -> str:
    """The record as key=value pairs for a log line, quoting values that contain spaces."""
    pairs = {
        "conn": record.id,
        "direction": record.direction,
        "src": f"{record.source_ip}:{record.source_port}",
        "src_workload": record.source_workload,
        "dst": record.original_dst,
        "service": record.service,
        "upstream": record.upstream,
        "upstream_workload": record.upstream_workload,
        "security": record.security,
        "src_identity": record.source_identity,
        "dst_identity": record.destination_identity,
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
