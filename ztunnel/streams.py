"""The one seam for bytes: a `Stream` (a TCP connection, or an HBONE tunnel stream) and `splice`.

Every path through the ztunnel (outbound plaintext, outbound HBONE, inbound HBONE, inbound
plaintext) ends in `splice(a, b)`: copy both ways with backpressure, pass half-closes on, and
reset both sides when either breaks. Stream kinds only implement the small protocol below.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable, Protocol

from ztunnel.errors import ProxyError

COPY_CHUNK = 256 * 1024  # bytes per read; few syscalls for bulk data, bounded memory per connection
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
    """A `Stream` over asyncio's StreamReader/StreamWriter pair of one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    def abort(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None and not self.writer.is_closing():
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # the socket is already gone; there is nothing left to reset
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    def kernel_socket(self) -> Any:
        return self.writer.get_extra_info("socket")


async def connect_tcp(ip: str, port: int, timeout: float) -> TcpStream:
    """A TCP connection to ip:port, with OS errors turned into a ConnectError that says why."""
    address = f"{ip}:{port}"
    try:
        return TcpStream(*await asyncio.wait_for(asyncio.open_connection(ip, port), timeout))
    except ConnectionRefusedError:
        raise ConnectError("connect_refused", f"upstream {address} refused the connection") from None
    except TimeoutError:
        raise ConnectError("connect_timeout", f"connect to {address} timed out after {timeout}s") from None
    except OSError as e:
        raise ConnectError("connect_failed", f"connect to {address} failed: {e.strerror or e}") from None


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
    directions = {
        asyncio.create_task(_copy(client, upstream, "client", "upstream", count_sent)),
        asyncio.create_task(_copy(upstream, client, "upstream", "client", count_received)),
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
