"""Test peers for an H2Session: an in-memory transport, and a raw HTTP/2 client over TLS that
writes whatever frames it is given (hyperframe and hpack, none of h2's checks), as an attacker
holding a mesh certificate would."""

from __future__ import annotations

import asyncio
import ssl
import struct
import time

from hpack import Decoder, Encoder
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CLIENT_SETTINGS = SettingsFrame(0).serialize()


class FakeTransport:
    """The transport an H2Session writes to, collecting the bytes."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.reading = True
        self.closing = False

    def get_extra_info(self, name: str) -> object:
        return ("192.0.2.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.sent += chunk

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """A raw 9-byte frame header, whatever the length."""
    return struct.pack(">HBBBL", length >> 8, length & 0xFF, kind, flags, stream_id)


class RawPeer:
    """An HTTP/2 client over mutual TLS that sends raw frames and records what it receives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = Encoder(), Decoder()
        self.frames: list[Frame] = []  # received, in order
        self.statuses: dict[int, str] = {}  # stream id -> :status answered
        self.goaway: GoAwayFrame | None = None
        self.goaway_at: float | None = None  # time.monotonic() of the GOAWAY
        self.closed = asyncio.Event()  # EOF or a reset from the server
        self.sent = 0  # bytes written
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, address: tuple[str, int], context: ssl.SSLContext, preface: bool = True) -> RawPeer:
        """Connected over TLS; with `preface`, the client preface and an empty SETTINGS sent."""
        reader, writer = await asyncio.open_connection(*address, ssl=context, server_hostname=None)
        peer = cls(reader, writer)
        if preface:
            peer.send(PREFACE + CLIENT_SETTINGS)
        return peer

    def headers(self, stream_id: int, headers: list[tuple[str, str]], flags: tuple[str, ...] = ("END_HEADERS",)) -> bytes:
        """A HEADERS frame, HPACK-encoded with this peer's encoder (so it must be sent, in order)."""
        frame = HeadersFrame(stream_id, self.encoder.encode(headers), flags=flags)
        return frame.serialize()

    def connect_request(self, stream_id: int, authority: str, end_stream: bool = False) -> bytes:
        flags = ("END_HEADERS", "END_STREAM") if end_stream else ("END_HEADERS",)
        return self.headers(stream_id, [(":method", "CONNECT"), (":authority", authority)], flags)

    @staticmethod
    def reset(stream_id: int, code: int = 8) -> bytes:  # 8: CANCEL
        return RstStreamFrame(stream_id, error_code=code).serialize()

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)
            self.sent += len(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass

    def resets(self, code: int) -> int:
        """RST_STREAM frames received with `code`."""
        return sum(1 for f in self.frames if isinstance(f, RstStreamFrame) and f.error_code == code)

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        buffer = bytearray()
        try:
            while data := await self.reader.read(1 << 20):
                buffer += data
                while len(buffer) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    frame.parse_body(memoryview(buffer[9:9 + length]))
                    del buffer[:9 + length]
                    self._received(frame)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed.set()

    def _received(self, frame: Frame) -> None:
        self.frames.append(frame)
        if isinstance(frame, GoAwayFrame) and self.goaway is None:
            self.goaway, self.goaway_at = frame, time.monotonic()
        elif isinstance(frame, HeadersFrame):
            self.statuses[frame.stream_id] = dict(self.decoder.decode(frame.data))[":status"]
