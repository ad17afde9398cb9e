"""Fuzzing an HBONE server session's frame handling (H2Session over an in-memory transport) with
hypothesis: arbitrary bytes, arbitrary frames, and valid frame sequences from an h2 client, each
cut into reads at arbitrary points.

Invariants: a read never raises (a bad peer ends the connection cleanly, with GOAWAY); h2's
receive windows never go negative; what is buffered stays bounded; and from a valid client,
every DATA byte reaches its stream, in order, and the session stays up.

Bounded in `make test`; HYPOTHESIS_PROFILE=fuzz runs many more examples (`make fuzz`; the
profiles are in tests/fuzz/conftest.py).
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.h2peer import CLIENT_SETTINGS, PREFACE, FakeTransport
from ztunnel.hbone import HboneStream
from ztunnel.hbone.session import MAX_FRAME_SIZE, READ_CHUNK, H2Session


pytestmark = pytest.mark.fuzz

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


class Server:
    """A server H2Session on a FakeTransport, and the streams it was asked for."""

    def __init__(self) -> None:
        self.requests: list[HboneStream] = []
        self.session = H2Session(client_side=False, on_request=lambda stream, headers: self.requests.append(stream))
        self.transport = FakeTransport()
        self.session.connection_made(self.transport)  # type: ignore[arg-type]
        self.session.start()

    async def feed(self, wire: bytes, cuts: list[int]) -> None:
        """`wire` in reads cut at `cuts` (sizes), as the transport would hand it over, letting the
        loop run between reads; checks the invariants after each."""
        done, sizes = 0, iter(cuts)
        while done < len(wire) and not self.session.closed:
            while not self.transport.reading and not self.session.closed:
                await asyncio.sleep(0)  # a read pass used up its frames: the next pass resumes
            buffer = self.session.get_buffer(-1)
            size = max(1, min(next(sizes, len(wire)), len(buffer), len(wire) - done))
            buffer[:size] = wire[done:done + size]
            self.session.buffer_updated(size)
            buffer[:size] = b"\xee" * size  # the transport reuses its buffer
            done += size
            self.check()
        for _ in range(50):
            if self.transport.reading or self.session.closed:
                break
            await asyncio.sleep(0)
        self.check()

    def check(self) -> None:
        h2 = self.session.h2
        assert h2._inbound_flow_control_window_manager.current_window_size >= 0
        for stream in h2.streams.values():
            assert stream._inbound_window_manager.current_window_size >= 0
        assert len(self.session._received) <= MAX_FRAME_SIZE + 9 + READ_CHUNK


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream_id) + payload


frames = st.builds(
    frame,
    kind=st.integers(0, 12),
    flags=st.integers(0, 255),
    stream_id=st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    payload=st.binary(max_size=64),
)
cuts = st.lists(st.integers(1, 300), max_size=40)


@given(body=st.one_of(st.binary(max_size=2048), st.lists(frames, max_size=30).map(b"".join)),
       preface=st.booleans(), cut_at=cuts)
def test_arbitrary_bytes_end_cleanly(body: bytes, preface: bool, cut_at: list[int]) -> None:
    async def run() -> None:
        server = Server()
        await server.feed((PREFACE + CLIENT_SETTINGS if preface else b"") + body, cut_at)
        if server.session.closed:
            assert server.transport.closing  # ended cleanly: closed, after its GOAWAY if any

    asyncio.run(run())


@given(frames_sent=st.lists(st.one_of(
    st.tuples(st.just("data"), st.integers(0, 2), st.integers(1, 70_000), st.integers(0, 255)),
    st.tuples(st.just("ping"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("window"), st.integers(0, 2), st.integers(1, 1000), st.just(0)),
    st.tuples(st.just("end"), st.integers(0, 2), st.just(0), st.just(0)),
), max_size=25), cut_at=cuts)
def test_valid_frames_split_anywhere_deliver_every_byte(frames_sent: list[tuple[str, int, int, int]],
                                                         cut_at: list[int]) -> None:
    async def run() -> None:
        server = Server()
        peer = H2Connection(H2Configuration(client_side=True))
        peer.initiate_connection()
        await asyncio.sleep(0)  # the session writes what it queued at the end of the pass
        peer.receive_data(bytes(server.transport.sent))  # our SETTINGS: peer may send big frames
        assert peer.max_outbound_frame_size == MAX_FRAME_SIZE
        stream_ids = [1, 3, 5]
        for stream_id in stream_ids:
            peer.send_headers(stream_id, CONNECT)
        sent: dict[int, bytearray] = {stream_id: bytearray() for stream_id in stream_ids}
        ended: set[int] = set()
        for index, (action, which, size, pad) in enumerate(frames_sent):
            stream_id = stream_ids[which]
            if action == "ping":
                peer.ping(b"%08d" % index)
            elif stream_id in ended:
                continue
            elif action == "data":
                payload = bytes([index % 251]) * size
                pad_length = pad if pad and size + pad + 1 <= peer.max_outbound_frame_size else None
                peer.send_data(stream_id, payload, pad_length=pad_length)
                sent[stream_id] += payload
            elif action == "window":
                peer.increment_flow_control_window(size, stream_id)
            else:
                peer.end_stream(stream_id)
                ended.add(stream_id)
        await server.feed(peer.data_to_send(), cut_at)
        assert not server.session.closed, server.session._why_closed
        received = {stream.stream_id: bytes(stream._inbound) for stream in server.requests}
        assert received == {stream_id: bytes(data) for stream_id, data in sent.items()}
        assert {s.stream_id for s in server.requests if s._remote_ended} == ended

    asyncio.run(run())
