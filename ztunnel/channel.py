"""The private channel between a node's agent and one of its ztunnel worker processes.

A stream socketpair the agent makes and the worker inherits; each message is a frame: a 4-byte
big-endian length, then the message pickled. Pickle is safe here only because both ends are the
same program and the socket is never reachable by anyone else (no address: a socketpair).
What travels (the message classes below): agent -> worker the worker's setup, registry deltas,
credentials, GOAWAY, stop and snapshot requests; worker -> agent "serving", the generation applied, and snapshots.
`FrameDecoder` is the sans-I/O part; `Channel` moves its bytes on an event loop.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from registry.replica import StateDelta
from ztunnel.identity import Identity, WorkloadCredential

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30  # bytes; a whole registry state of a large cluster pickles to tens of MB
READ_SIZE = 1 << 20  # bytes per read from the socket


class ChannelError(RuntimeError):
    """The other end of a worker channel sent something that is not a frame of ours."""


@dataclass(frozen=True)
class Setup:
    """agent -> worker, first: who the worker is and how the node is configured."""

    config: AgentConfig
    index: int  # 0 .. workers-1


@dataclass(frozen=True)
class StateUpdate:
    """agent -> worker: the registry state the ztunnel routes by, as a delta (registry/replica.py)."""

    delta: StateDelta
    seq: int = 0  # numbers a worker's updates: Applied says which is in force


@dataclass(frozen=True)
class Credentials:
    """agent -> worker: every certificate and key of this node's identities now (each with the trust bundle)."""

    held: dict[Identity, WorkloadCredential]


@dataclass(frozen=True)
class GoAway:
    """agent -> worker: the node drains; every HBONE session gets a graceful GOAWAY."""


@dataclass(frozen=True)
class Stop:
    """agent -> worker: close the listeners, give live connections `grace` seconds, exit."""

    grace: float


@dataclass(frozen=True)
class SnapshotRequest:
    """agent -> worker: send the data plane's snapshot (answered by a Snapshot of the same id),
    with the connection rows if `rows`."""

    request_id: int
    rows: bool = False


@dataclass(frozen=True)
class Snapshot:
    """worker -> agent: the answer to SnapshotRequest `request_id`."""

    request_id: int
    snapshot: Any


@dataclass(frozen=True)
class Applied:
    """worker -> agent: the StateUpdate `seq` is in force; its registry generation."""

    seq: int
    generation: int


@dataclass(frozen=True)
class Serving:
    """worker -> agent: the listeners accept connections (the worker's pid, for people)."""

    pid: int


def encode(message: object) -> bytes:
    """One message as a frame."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a {type(message).__name__} of {len(body)} bytes exceeds the channel's frame limit "
                         f"of {MAX_FRAME} bytes")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Bytes from the channel in, whole messages out, however the stream split them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[object]:
        """The messages `data` completes (none while a frame is still partial)."""
        self._buffer += data
        messages, offset = [], 0
        while len(self._buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, offset)
            if length > MAX_FRAME:
                raise ChannelError(f"a worker channel frame announces {length} bytes, over the limit of "
                                   f"{MAX_FRAME}: the other end is not an amesh agent or worker of this version")
            end = offset + _LENGTH.size + length
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[offset + _LENGTH.size:end]))
            offset = end
        del self._buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a partial frame held."""
        return len(self._buffer)


class Channel:
    """One end of a worker channel on the running event loop: `send` messages, `receive` them."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._decoder = FrameDecoder()
        self._received: list[object] = []
        self._send_lock = asyncio.Lock()

    async def send(self, message: object) -> None:
        """Sends one message whole (messages of concurrent senders never interleave)."""
        frame = encode(message)
        async with self._send_lock:
            await asyncio.get_running_loop().sock_sendall(self._sock, frame)

    async def receive(self) -> object:
        """The next message; EOFError once the other end closed (a worker exited, or the agent)."""
        loop = asyncio.get_running_loop()
        while not self._received:
            self._take(await loop.sock_recv(self._sock, READ_SIZE))
        return self._received.pop(0)

    def receive_blocking(self) -> object:
        """The next message, waited for with no event loop (a worker's first, which names its loop)."""
        self._sock.setblocking(True)
        try:
            while not self._received:
                self._take(self._sock.recv(READ_SIZE))
        finally:
            self._sock.setblocking(False)
        return self._received.pop(0)

    def _take(self, data: bytes) -> None:
        if not data:
            raise EOFError("the other end of the worker channel closed it")
        self._received.extend(self._decoder.feed(data))

    def close(self) -> None:
        """Closes this end; the other one reads EOF."""
        self._sock.close()
