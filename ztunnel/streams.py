"""The one seam for bytes: a `Stream` (a TCP connection, or an HBONE tunnel stream) and `splice`.

Every path through the ztunnel (outbound plaintext, outbound HBONE, inbound HBONE, inbound
plaintext) ends in `splice(a, b)`: relay both ways with backpressure, pass half-closes on, and
reset both sides when either breaks. Stream kinds only implement the small protocol below.

Bytes are pushed, not pulled: each stream hands what it receives to a `Receiver` the moment it
arrives (from the event loop's read callback), and the receiver writes it to the other stream
there and then; a full send buffer on one side pauses reading on the other. No task wakes up per
message, which is most of a small message's cost in Python. Between two TCP sockets
(same-node and plaintext paths) the relay is splice(2), in the kernel.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
from typing import Any, Callable, Protocol

from ztunnel.errors import ProxyError

PIPE_SIZE = 1024 * 1024  # bytes in flight per direction of a kernel splice (fs.pipe-max-size)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# SO_LINGER on with a zero timeout: close() sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


class Receiver(Protocol):
    """Where a stream delivers what it receives, as it arrives."""

    def data(self, data: bytes | bytearray) -> None: ...

    def eof(self) -> None:
        """The peer half-closed: nothing more will arrive."""

    def error(self, error: OSError) -> None:
        """The stream broke (reset, TLS failure, tunnel gone)."""


class Stream(Protocol):
    """A bidirectional byte stream with half-close, as `splice` relays them."""

    async def open(self) -> None:
        """Makes the stream ready to write (and to start), delivering nothing yet."""

    def start(self, receiver: Receiver, writable: Callable[[bool], None]) -> None:
        """Starts delivering received bytes to `receiver`; `writable(False)` is called when this
        stream's send buffer is full (stop writing to it), `writable(True)` when it has room."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write(self, data: bytes | bytearray) -> None: ...

    def write_eof(self) -> None:
        """Half-close: no more data will be written."""

    async def drain(self) -> None:
        """Waits until what was written has left for the peer (for a tunnel: within its windows)."""

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
    hands the socket to an event-loop transport.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() != 0.0:  # Python's own record: accepted or connected ones already are
            sock.setblocking(False)  # an ioctl each time
        self.sock = sock
        self._transport: asyncio.Transport | None = None
        self._protocol = _TcpProtocol()

    @property
    def opened(self) -> bool:
        """Handed to an event-loop transport (bytes pass through Python)."""
        return self._transport is not None

    async def open(self) -> None:
        if self._transport is None:
            transport, _ = await asyncio.get_running_loop().create_connection(lambda: self._protocol, sock=self.sock)
            self._transport = transport  # type: ignore[assignment]
            transport.pause_reading()

    def start(self, receiver: Receiver, writable: Callable[[bool], None]) -> None:
        self._protocol.start(receiver, writable)
        self.resume_reading()  # paused since open()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()  # idempotent, also once closing

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def write(self, data: bytes | bytearray) -> None:
        if self._transport is None:
            raise RuntimeError(f"{self!r}: write() before open()")
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        if self._transport is None:
            self.sock.shutdown(socket.SHUT_WR)
        elif not self._transport.is_closing():
            self._transport.write_eof()

    async def drain(self) -> None:
        pass  # close() sends what is still buffered before the FIN

    def abort(self) -> None:
        if self._transport is None:
            reset_socket(self.sock)
        else:
            _linger_reset(self.sock)
            self._transport.abort()

    def close(self) -> None:
        if self._transport is None:
            self.sock.close()
        else:
            self._transport.close()

    def kernel_socket(self) -> Any:
        return self.sock


class _TcpProtocol(asyncio.Protocol):
    """An opened TcpStream's side of its transport: received bytes straight to the receiver.
    What arrives before the stream is started (the transport may read once before it is
    paused) is kept and delivered first."""

    def __init__(self) -> None:
        self._receiver: Receiver | None = None
        self._writable: Callable[[bool], None] | None = None
        self._early: list[Callable[[Receiver], None]] = []  # deliveries waiting for start()
        self._ended = False

    def start(self, receiver: Receiver, writable: Callable[[bool], None]) -> None:
        self._receiver, self._writable = receiver, writable
        for deliver in self._early:
            deliver(receiver)
        self._early.clear()

    def _to_receiver(self, deliver: Callable[[Receiver], None]) -> None:
        if self._receiver is None:
            self._early.append(deliver)
        else:
            deliver(self._receiver)

    def data_received(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.data(data)
        else:
            self._early.append(lambda receiver: receiver.data(data))

    def eof_received(self) -> bool:
        self._ended = True
        self._to_receiver(lambda receiver: receiver.eof())
        return True  # keep the socket open for what we still send (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self._to_receiver(lambda receiver: receiver.error(exc))
        elif exc is None and not self._ended:
            error = ConnectionResetError(0, "closed")
            self._to_receiver(lambda receiver: receiver.error(error))

    def pause_writing(self) -> None:
        if self._writable is not None:
            self._writable(False)

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable(True)


async def connect_tcp(ip: str, port: int, timeout: float) -> TcpStream:
    """A TCP connection to ip:port, with OS errors turned into a ConnectError that says why."""
    address = f"{ip}:{port}"
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    except OSError as e:  # out of descriptors or memory: ours to fix, not the upstream's
        raise ConnectError("resources", f"no socket for a connection to {address}: {e.strerror or e}") from None
    sock.setblocking(False)
    no_delay(sock)
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


def reset_socket(sock: socket.socket) -> None:
    """Closes a socket we still own with a RST, so its peer fails at once instead of reading a
    clean EOF; a no-op for a socket already closed (or handed to a transport that closed it)."""
    if sock.fileno() != -1:
        _linger_reset(sock)
        sock.close()


def _linger_reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # the socket is already gone; there is nothing left to reset


def no_delay(sock: socket.socket) -> None:
    """Nagle off: a small write (a short reply, an HTTP/2 frame) must not wait for the peer's
    delayed ACK, 40 ms per exchange (measured). uvloop sets it on every TCP transport, asyncio
    only on sockets created with proto IPPROTO_TCP, so the ztunnel sets it on every socket it
    accepts or connects."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    """Relays both directions until both have ended; returns why the connection ended.

    `count_sent` sees bytes client -> upstream, `count_received` upstream -> client, as they
    are written, so live byte counts are always current.
    """
    if isinstance(client, TcpStream) and isinstance(upstream, TcpStream):
        return await _kernel_splice(client, upstream, count_sent, count_received)
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    sent = _Direction(client, upstream, "client", "upstream", count_sent, outcome)
    received = _Direction(upstream, client, "upstream", "client", count_received, outcome)
    sent.other, received.other = received, sent  # the second to end finishes the splice
    for stream, direction in ((client, sent), (upstream, received)):
        try:
            await stream.open()
        except OSError as e:
            direction.error(e)
    if not outcome.done():
        # a full send buffer on one stream pauses reading on the other
        client.start(sent, received.sink_writable)
        upstream.start(received, sent.sink_writable)
    reason = await outcome
    if reason == "closed":
        # What was written must leave before the streams are closed: a tunnel stream closed
        # with data still waiting for the peer's windows would be reset.
        try:
            await asyncio.gather(client.drain(), upstream.drain())
            return reason
        except OSError as e:
            reason = str(StreamReset(f"reset while sending its last bytes ({e.strerror or e})"))
    client.abort()
    upstream.abort()
    return reason


class _Direction:
    """One direction of a splice: receives from `source` and writes to `sink` as bytes arrive."""

    def __init__(self, source: Stream, sink: Stream, source_side: str, sink_side: str,
                 count: Callable[[int], None], outcome: asyncio.Future[str]) -> None:
        self.source, self.sink = source, sink
        self.source_side, self.sink_side = source_side, sink_side
        self.count, self.outcome = count, outcome
        self.other: _Direction | None = None
        self.ended = False

    def data(self, data: bytes | bytearray) -> None:
        if not self.outcome.done():
            self.sink.write(data)
            self.count(len(data))

    def eof(self) -> None:
        if self.outcome.done():
            return
        try:
            self.sink.write_eof()
        except OSError as e:
            self.finish(str(StreamReset.of(self.sink_side, e)))
            return
        self.ended = True
        if self.other is not None and self.other.ended:
            self.finish("closed")

    def error(self, error: OSError) -> None:
        self.finish(str(StreamReset.of(self.source_side, error)))

    def sink_writable(self, writable: bool) -> None:
        """Backpressure: the sink's send buffer filled up, or has room again."""
        if writable:
            self.source.resume_reading()
        else:
            self.source.pause_reading()

    def finish(self, reason: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(reason)


async def _kernel_splice(client: TcpStream, upstream: TcpStream, count_sent: Callable[[int], None],
                         count_received: Callable[[int], None]) -> str:
    directions = {
        asyncio.create_task(_kernel_copy(client, upstream, "client", "upstream", count_sent)),
        asyncio.create_task(_kernel_copy(upstream, client, "upstream", "client", count_received)),
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


async def _kernel_copy(reader: TcpStream, writer: TcpStream, reader_side: str, writer_side: str,
                       count: Callable[[int], None]) -> None:
    """One direction between two sockets with splice(2), until EOF, which it passes on
    (half-close): socket -> pipe -> socket, the pages moved rather than copied, never through
    Python's memory."""
    source, sink = reader.sock.fileno(), writer.sock.fileno()
    readable = _Readiness(source, writable=False)
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


async def _pump(source: int, sink: int, pipe_out: int, pipe_in: int, readable: _Readiness,
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
                # watched meanwhile, or its pending bytes would wake the loop on every pass;
                # nor is the sink's afterwards: a socket is nearly always writable.
                readable.stop()
                writable = _Readiness(sink, writable=True)
                try:
                    await writable.wait()
                finally:
                    writable.stop()
                continue
            except OSError as e:
                raise StreamReset.of(writer_side, e) from None
            buffered -= moved
            count(moved)


class _Readiness:
    """Waits for a socket to be readable (or writable), staying registered with the event loop
    between waits until `stop()`: registering and unregistering for every message costs two
    epoll_ctl calls (and in uvloop a poll handle) each time."""

    def __init__(self, fd: int, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        self._fd, self._loop = fd, loop
        self._add, self._remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False

    async def wait(self) -> None:
        if not self._watching:
            self._add(self._fd, self._wake)
            self._watching = True
        self._waiter = self._loop.create_future()
        await self._waiter

    def stop(self) -> None:
        if self._watching:
            self._remove(self._fd)
            self._watching = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
