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
from ztunnel.authz import Authorizer, Connection
from ztunnel.connections import ConnectionRecord, ConnectionTable, Direction, EndState
from ztunnel.errors import ProxyError
from ztunnel.hbone import hostport
from ztunnel.logbound import cut
from ztunnel.streams import Stream, no_delay, reset_socket, splice

log = logging.getLogger("amesh.ztunnel")


ACCEPT_BATCH = 64  # connections accepted per wakeup at most, so a SYN flood cannot starve the loop
ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after the process ran out of descriptors
OriginalDestination = Callable[[socket.socket], tuple[str, int]]


def sockname_destination(conn: socket.socket) -> tuple[str, int]:
    """The dialled address of a connection captured with bpf_sk_assign: its local address (the
    SYN reached us unchanged)."""
    ip, port = conn.getsockname()[:2]
    return ip, port


class CapturedListener:
    """Serves one listening socket; subclasses implement `serve_connection`."""

    def __init__(
        self,
        state_getter: Callable[[], RegistryState],
        table: ConnectionTable,
        authorizer: Authorizer,
        connect_timeout: float = 5.0,
        original_destination: OriginalDestination = sockname_destination,
    ) -> None:
        self._state_getter = state_getter
        self._table = table
        self._authorizer = authorizer
        self._connect_timeout = connect_timeout
        self._original_destination = original_destination
        self._sock: socket.socket | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, an already bound and listening socket; the listener takes ownership."""
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()  # asked once: asking costs a getpid(2) each time
        # Raw accepted sockets, not asyncio.start_server's streams: the HBONE listener picks the
        # TLS certificate by the dialled address before a byte is read, and a stream would
        # already be reading the ClientHello into a plain buffer.
        self._loop.add_reader(sock, self._accept_ready)

    @property
    def address(self) -> tuple[str, int]:
        """The (ip, port) this listener serves."""
        if self._sock is None:
            raise RuntimeError(f"{type(self).__name__} is not serving (start() not called, or closed)")
        ip, port = self._sock.getsockname()[:2]
        return ip, port

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give live connections `grace` seconds to end, then cancel the rest."""
        if self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock)
        self._sock.close()
        self._sock = None
        handlers = set(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _accept_ready(self) -> None:
        """Accepts every connection waiting in the backlog, each served in a task we own."""
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # reset while in the backlog
            except OSError as e:
                # Out of descriptors or memory: keep serving the connections we have, and stop
                # trying for a while rather than spin on a backlog we cannot take from.
                log.warning("listener.accept_failed address=%s error=%r retry_in=%ss",
                            self.address, str(e), ACCEPT_RETRY_DELAY)
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._sock)
                loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            conn.setblocking(False)
            no_delay(conn)
            task = self._loop.create_task(self._serve(conn, peer[:2]))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock, self._accept_ready)

    async def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """The listener boundary: whatever goes wrong in serving one connection ends that
        connection with a reset and a counted reason, never the listener or the loop."""
        try:
            destination = self._original_destination(conn)
        except OSError:  # the client reset before we got to look at the connection
            conn.close()
            return
        try:
            await self.serve_connection(conn, peer, destination)
        except asyncio.CancelledError:
            reset_socket(conn)
            raise
        except Exception:
            # A bug, or a failure no path expected (the paths end their own records): the
            # client must not wait on a half-served connection.
            self._table.failure_log.log(logging.ERROR, "conn.unexpected_error",
                                        "conn.unexpected_error src=%s dst=%s", hostport(*peer),
                                        hostport(*destination), exc_info=True)
            reset_socket(conn)
            self._table.failures["internal"] += 1

    async def serve_connection(self, conn: socket.socket, peer: tuple[str, int],
                               destination: tuple[str, int]) -> None:
        """Serves one accepted connection from `peer` that was dialled to `destination`; owns `conn`."""
        raise NotImplementedError

    def open_record(self, state: RegistryState, source: tuple[str, int], destination: str,
                    direction: Direction) -> ConnectionRecord:
        """Starts tracking a connection from `source` (ip, port) to `destination` ("ip:port")."""
        workload = state.workload_by_ip(source[0])
        return self._table.open(source[0], source[1], destination, workload.key if workload else None, direction)

    def admit(self, state: RegistryState, record: ConnectionRecord, connection: Connection) -> None:
        """Raises Denied unless the policies admit `connection`; the record keeps what was
        decided on, so a policy change can decide again for the live connection."""
        record.admitted = connection
        self._authorizer.check(state, connection)

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
            except Exception as e:
                client.abort()
                self.end_unexpected(record, e)
                return
            await self.relay(record, client, upstream)
        finally:
            client.close()

    async def relay(self, record: ConnectionRecord, client: Stream, upstream: Stream) -> None:
        """Splices an accepted client to its connected upstream until both ends have finished."""
        record.state = "open"
        record.sockets["client"] = client.kernel_socket()
        record.sockets["upstream"] = upstream.kernel_socket()
        # cut() cancels this task: the splice stops wherever it waits (in the kernel or not)
        relaying = asyncio.current_task()
        assert relaying is not None
        record.abort = relaying.cancel
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn.open %s", log_fields(record))
        # The record is ended before the sockets close, so it keeps their last TCP_INFO.
        try:
            if record.cut_reason is not None:  # cut while it was still connecting
                raise asyncio.CancelledError
            self.end(record, "closed", await splice(client, upstream, record.count_sent, record.count_received))
        except asyncio.CancelledError:
            client.abort()
            upstream.abort()
            if record.cut_reason is None:
                self.end(record, "closed", "cancelled: proxy shutting down")
                raise
            code, reason = record.cut_reason
            self.end(record, "failed", reason, code)
            relaying.uncancel()  # our own cut, not the task's owner cancelling: it ends normally
        except Exception as e:
            client.abort()
            upstream.abort()
            self.end_unexpected(record, e)
        finally:
            upstream.close()

    def end(self, record: ConnectionRecord, state: EndState, reason: str, code: str | None = None) -> None:
        self._table.close(record, state, reason, code)
        # Every connection is in the access log and the metrics; the agent's own log says only
        # what failed, unless asked for more (--log-level debug).
        if state == "failed":
            self._table.failure_log.log(logging.INFO, f"conn.close {record.failure}", "conn.close %s",
                                        LazyFields(record))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("conn.close %s", log_fields(record))

    def end_unexpected(self, record: ConnectionRecord, error: Exception) -> None:
        """Ends a connection that an unexpected exception broke, with the traceback in the log."""
        self._table.failure_log.log(logging.ERROR, "conn.unexpected_error", "conn.unexpected_error conn=%d",
                                    record.id, exc_info=error)
        self.end(record, "failed", f"internal error in the ztunnel: {type(error).__name__}: {error}", "internal")


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


class LazyFields:
    """A record's log fields, formatted only if the line is written."""

    def __init__(self, record: ConnectionRecord) -> None:
        self.record = record

    def __str__(self) -> str:
        return log_fields(self.record)


def _quote(value: object) -> str:
    text = cut(str(value))  # a peer's :authority or error text must not grow the log
    return f'"{text}"' if " " in text or '"' in text else text
