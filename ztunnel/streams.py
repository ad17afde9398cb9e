"""The one seam for bytes: a `Stream` (a TCP connection, or an HBONE tunnel stream) and `splice`.

Every path through the ztunnel (outbound plaintext, outbound HBONE, inbound HBONE, inbound
plaintext) ends in `splice(a, b)`: copy both ways with backpressure, pass half-closes on, and
reset both sides when either breaks. Stream kinds only implement the small protocol below.
Between two TCP sockets (same-node and plaintext paths) the copy is splice(2), in the kernel.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
from typing import Any, Awaitable, Callable, Protocol

from ztunnel.errors import ProxyError

COPY_CHUNK = 256 * 1024  # bytes per read; few syscalls for bulk data, bounded memory per connection
PIPE_SIZE = 1024 * 1024  # bytes in flight per direction of a kernel splice (fs.pipe-max-size)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# SO_LINGER on with a zero timeout: close() sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


class Stream(Protocol):
    """A bidirectional byte stream with half-close, as the ztunnel splices them."""

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at end of stream; OSError (ConnectionError) when it broke."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Waits until the peer has taken enough of what was written (backpressure)."""

    def write_eof(self) -> None:
        """Half-close: no more data will be written."""

    def abort(self) -> None:
        """Ends the stream abruptly, so the peer sees a reset rather than a clean end."""

    def close(self) -> None: ...

    def kernel_socket(self) -> Any:
        """The TCP socket underneath, for TCP_INFO (for a tunnel: the tunnel's own socket)."""


class TcpStream:
    """A `Stream` over one connected TCP socket.

    It starts as the bare socket: `splice` moves bytes between two TcpStreams inside the kernel
    (splice(2) through a pipe), so same-node and plaintext connections never copy a byte into
    Python. Where Python must see the bytes (the plaintext side of an HBONE tunnel), `open()`
    first turns it into an asyncio stream.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        # Nagle off: a small write (a short reply, an HTTP/2 frame) must not wait for the
        # peer's delayed ACK, 40 ms per exchange (measured)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Hands the socket to an asyncio stream, for read/write/drain; once."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(sock=self.sock)

    async def read(self, n: int) -> bytes:
        await self.open()
        assert self.reader is not None
        return await self.reader.read(n)

    def write(self, data: bytes) -> None:
        if self.writer is None:
            raise RuntimeError(f"{self!r}: write() before open()")
        self.writer.write(data)

    async def drain(self) -> None:
        if self.writer is not None:
            await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer is None:
            self.sock.shutdown(socket.SHUT_WR)
        elif self.writer.can_write_eof():
            self.writer.write_eof()

    def abort(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # the socket is already gone; there is nothing left to reset
        if self.writer is None:
            self.sock.close()
        else:
            self.writer.transport.abort()

    def close(self) -> None:
        if self.writer is None:
            self.sock.close()
        else:
            self.writer.close()

    def kernel_socket(self) -> Any:
        return self.sock


async def connect_tcp(ip: str, port: int, timeout: float) -> TcpStream:
    """A TCP connection to ip:port, with OS errors turned into a ConnectError that says why."""
    address = f"{ip}:{port}"
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException as e:
        sock.close()
        if isinstance(e, ConnectionRefusedError):
            raise ConnectError("connect_refused", f"upstream {address} refused the connection") from None
        if isinstance(e, TimeoutError):
            raise ConnectError("connect_timeout", f"connect to {address} timed out after {timeout}s") from None
        if isinstance(e, OSError):
            raise ConnectError("connect_failed", f"connect to {address} failed: {e.strerror or e}") from None
        raise
    return TcpStream(sock)


class ConnectError(ProxyError):
    """Connecting to the chosen upstream failed."""


class StreamReset(Exception):
    """One side of a spliced connection broke off; the message names the side."""

    @classmethod
    def of(cls, side: str, error: OSError) -> "StreamReset":
        return cls(f"{side} reset ({error.strerror or error})")


async def splice(
    client: Stream,
    upstream: Stream,
    count_sent: Callable[[int], None],
    count_received: Callable[[int], None],
) -> str:
    """Copies both directions until both have ended; returns why the connection ended.

    `count_sent` sees bytes client -> upstream, `count_received` upstream -> client, as they
    are written, so live byte counts are always current.
    """
    if isinstance(client, TcpStream) and isinstance(upstream, TcpStream):
        copy: Callable[..., Awaitable[None]] = _kernel_copy  # both are sockets: the kernel moves the bytes
    else:
        copy = _copy
        for stream in (client, upstream):
            if isinstance(stream, TcpStream):
                await stream.open()
    directions = {
        asyncio.create_task(copy(client, upstream, "client", "upstream", count_sent)),
        asyncio.create_task(copy(upstream, client, "upstream", "client", count_received)),
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
            client.abort()
            upstream.abort()
            return str(error)
    return "closed"


async def _copy(reader: Stream, writer: Stream, reader_side: str, writer_side: str,
                count: Callable[[int], None]) -> None:
    """Copies one direction until EOF, then passes the EOF on (half-close) and returns."""
    while True:
        try:
            data = await reader.read(COPY_CHUNK)
        except OSError as e:
            raise StreamReset.of(reader_side, e) from None
        if not data:
            break
        writer.write(data)
        count(len(data))
        try:
            await writer.drain()  # backpressure: a slow reader on the other side pauses us here
        except OSError as e:
            raise StreamReset.of(writer_side, e) from None
    try:
        writer.write_eof()
    except OSError as e:
        raise StreamReset.of(writer_side, e) from None


async def _kernel_copy(reader: TcpStream, writer: TcpStream, reader_side: str, writer_side: str,
                       count: Callable[[int], None]) -> None:
    """`_copy` between two sockets with splice(2): socket -> pipe -> socket, the pages moved
    rather than copied, and never through Python's memory."""
    source, sink = reader.sock.fileno(), writer.sock.fileno()
    readable = _Readable(source)
    try:
        # The pipe (two descriptors) is made once bytes arrive: an idle connection holds none.
        await readable.wait()
        try:
            pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # out of descriptors
            raise StreamReset(f"no pipe to splice {reader_side} to {writer_side} ({e.strerror})") from None
        try:
            await _pump(source, sink, pipe_out, pipe_in, readable, reader_side, writer_side, count)
        finally:
            os.close(pipe_in)
            os.close(pipe_out)
    finally:
        readable.stop()
    try:
        writer.write_eof()
    except OSError as e:
        raise StreamReset.of(writer_side, e) from None


async def _pump(source: int, sink: int, pipe_out: int, pipe_in: int, readable: _Readable,
                reader_side: str, writer_side: str, count: Callable[[int], None]) -> None:
    """Moves bytes source -> pipe -> sink until the source's EOF has gone through."""
    try:
        capacity = fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above fs.pipe-max-size: the default 64 KiB pipe still works
        capacity = fcntl.fcntl(pipe_in, fcntl.F_GETPIPE_SZ)
    buffered, ended = 0, False  # bytes in the pipe; the source sent its FIN
    while not ended or buffered:
        if not ended and buffered < capacity:
            try:
                moved = os.splice(source, pipe_in, capacity - buffered, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # nothing to read, or the pipe's page slots are full
                if not buffered:
                    await readable.wait()
                    continue
            except OSError as e:
                raise StreamReset.of(reader_side, e) from None
            else:
                ended = moved == 0
                buffered += moved
        if buffered:
            try:
                moved = os.splice(pipe_out, sink, buffered, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # backpressure: the sink's buffer is full. The source's readiness is not
                # watched meanwhile, or its pending bytes would wake the loop on every pass.
                readable.stop()
                await _writable(sink)
                continue
            except OSError as e:
                raise StreamReset.of(writer_side, e) from None
            buffered -= moved
            count(moved)


class _Readable:
    """Waits for a socket to be readable, staying registered with the event loop between waits:
    registering and unregistering for every message costs two epoll_ctl calls (and in uvloop
    a poll handle) each time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False

    async def wait(self) -> None:
        if not self._watching:
            self._loop.add_reader(self._fd, self._wake)
            self._watching = True
        self._waiter = self._loop.create_future()
        await self._waiter

    def stop(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def _writable(fd: int) -> None:
    """Waits until `fd` is writable (registered only meanwhile: a socket is nearly always
    writable, and would otherwise wake the loop on every pass)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
