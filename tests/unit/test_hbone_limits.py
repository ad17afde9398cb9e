"""The pure limits of an HBONE session (ztunnel.hbone.limits) and the bounded log
(ztunnel.logbound), with a fake clock; and an H2Session over an in-memory transport, fed frames
by h2 and hyperframe, for the read pass budget and the frame size check."""

from __future__ import annotations

import asyncio
import logging

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import SettingsFrame

from tests.unit.h2peer import FakeTransport, frame_header
from tests.unit.clock import Clock
from ztunnel.hbone import HboneStream
from ztunnel.hbone.limits import (
    BUDGETS,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_HEADER_BLOCK,
    PING,
    PRIORITY,
    PRIORITY_PER_STREAM,
    RAPID_RESET_MIN,
    RST_STREAM,
    RST_STREAMS_BASE,
    SETTINGS,
    WINDOW_UPDATE,
    WINDOW_UPDATES_BASE,
    WINDOW_UPDATES_PER_DATA_FRAME,
    FrameGuard,
)
from ztunnel.hbone.session import H2_FRAMES_PER_PASS, H2Session
from ztunnel.limits import TokenBucket
from ztunnel.logbound import RateLimitedLog, cut


@pytest.mark.parametrize("kind, flags, name", [
    (PING, 0, "ping"), (SETTINGS, 0, "settings"), (SETTINGS, 1, "settings"),
    (DATA, 0, "empty_data"), (0x20, 0, "extension"),
])
def test_budgeted_frames_trip_after_their_burst_and_refill_with_time(kind: int, flags: int, name: str) -> None:
    clock = Clock()
    guard = FrameGuard(clock)
    budget = BUDGETS[name]
    assert all(guard.frame(kind, flags, 0) is None for _ in range(budget.burst))
    assert guard.frame(kind, flags, 0) == f"{name}_flood"
    clock.now += 1.0  # a second: per_second more
    assert all(guard.frame(kind, flags, 0) is None for _ in range(int(budget.per_second)))
    assert guard.frame(kind, flags, 0) == f"{name}_flood"


def test_data_with_payload_or_end_stream_is_not_budgeted() -> None:
    guard = FrameGuard(Clock())
    assert all(guard.frame(DATA, 0, 1) is None for _ in range(10_000))
    assert all(guard.frame(DATA, END_STREAM, 0) is None for _ in range(10_000))


def test_window_updates_are_allowed_per_data_frame_sent() -> None:
    guard = FrameGuard(Clock())
    assert all(guard.frame(WINDOW_UPDATE, 0, 4) is None for _ in range(WINDOW_UPDATES_BASE))
    assert guard.frame(WINDOW_UPDATE, 0, 4) == "window_update_flood"
    guard = FrameGuard(Clock())
    guard.data_frames_sent = 1000
    allowed = WINDOW_UPDATES_BASE + WINDOW_UPDATES_PER_DATA_FRAME * 1000
    assert all(guard.frame(WINDOW_UPDATE, 0, 4) is None for _ in range(allowed))
    assert guard.frame(WINDOW_UPDATE, 0, 4) == "window_update_flood"


def test_rst_streams_are_allowed_per_stream_opened() -> None:
    guard = FrameGuard(Clock())
    for _ in range(10_000):  # each stream answered and reset both ways, at any rate
        guard.frame(HEADERS, END_HEADERS, 20)
        assert guard.frame(RST_STREAM, 0, 4) is None and guard.frame(RST_STREAM, 0, 4) is None
    assert all(guard.frame(RST_STREAM, 0, 4) is None for _ in range(RST_STREAMS_BASE))
    assert guard.frame(RST_STREAM, 0, 4) == "rst_stream_flood"


def test_priority_frames_are_allowed_per_stream_opened() -> None:
    guard = FrameGuard(Clock())
    assert guard.frame(HEADERS, END_HEADERS, 20) is None
    assert all(guard.frame(PRIORITY, 0, 5) is None for _ in range(2 * PRIORITY_PER_STREAM))
    assert guard.frame(PRIORITY, 0, 5) == "priority_flood"


def test_header_block_bytes_are_bounded_across_continuations() -> None:
    guard = FrameGuard(Clock())
    assert guard.frame(HEADERS, 0, 1000) is None and guard.in_header_block
    assert guard.frame(CONTINUATION, 0, MAX_HEADER_BLOCK - 1000) is None
    assert guard.frame(CONTINUATION, 0, 1) == "header_block_too_large"
    guard = FrameGuard(Clock())
    assert guard.frame(HEADERS, 0, 1000) is None
    assert guard.frame(CONTINUATION, END_HEADERS, 1000) is None and not guard.in_header_block
    assert guard.frame(HEADERS, END_HEADERS, MAX_HEADER_BLOCK) is None  # a new block starts at 0
    assert guard.frame(HEADERS, END_HEADERS, MAX_HEADER_BLOCK + 1) == "header_block_too_large"


def test_rapid_reset_counts_resets_before_the_answer_against_streams_opened() -> None:
    guard = FrameGuard(Clock())
    for _ in range(1000):  # streams reset after their answer: ordinary churn
        guard.frame(HEADERS, END_HEADERS, 20)
        assert guard.stream_reset(answered=True) is None
    for _ in range(RAPID_RESET_MIN + 1):  # a few early cancels among many streams
        guard.frame(HEADERS, END_HEADERS, 20)
        assert guard.stream_reset(answered=False) is None
    guard = FrameGuard(Clock())
    verdicts = []
    for _ in range(RAPID_RESET_MIN + 1):
        guard.frame(HEADERS, END_HEADERS, 20)
        verdicts.append(guard.stream_reset(answered=False))
    assert verdicts == [None] * RAPID_RESET_MIN + ["rapid_reset"]


def test_cut_keeps_short_text_and_names_the_size_of_long_text() -> None:
    assert cut("10.0.0.1:80") == "10.0.0.1:80"
    assert cut("a" * 128) == "a" * 128
    assert cut("a" * 4000) == "a" * 128 + "...(4000 bytes)"
    assert cut("é" * 10, 4) == "éééé...(20 bytes)"


def test_token_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(2, 0.5, clock)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 1.0
    assert not bucket.take()  # half a token
    clock.now += 1.0
    assert bucket.take()


def test_rate_limited_log_drops_beyond_its_rate_and_then_says_how_many(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.logbound")
    limited = RateLimitedLog(logger, burst=3, per_second=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.logbound"):
        written = [limited.log(logging.INFO, "bad", "bad request %d", i) for i in range(100)]
        assert limited.log(logging.INFO, "other", "another reason")  # its own budget
        clock.now += 1.0
        assert limited.log(logging.INFO, "bad", "bad request again")
        assert not limited.log(logging.DEBUG, "bad", "below the level")  # not counted as dropped
    assert written == [True] * 3 + [False] * 97
    assert [r.getMessage() for r in caplog.records] == [
        "bad request 0", "bad request 1", "bad request 2", "another reason",
        "log.suppressed reason=bad lines=97", "bad request again"]
    assert limited.suppressed == {"bad": 97}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.logbound"):
        assert not limited.log(logging.INFO, "bad", "dropped")
        limited.flush()
    assert [r.getMessage() for r in caplog.records] == ["log.suppressed reason=bad lines=1"]


def feed(session: H2Session, wire: bytes) -> None:
    """Hands `wire` to the session as its transport would, one read buffer at a time."""
    done = 0
    while done < len(wire):
        buffer = session.get_buffer(-1)
        chunk = wire[done:done + len(buffer)]
        buffer[:len(chunk)] = chunk
        session.buffer_updated(len(chunk))
        done += len(chunk)


def server_session() -> tuple[H2Session, FakeTransport, list[HboneStream]]:
    requests: list[HboneStream] = []
    session = H2Session(client_side=False, on_request=lambda stream, headers: requests.append(stream))
    transport = FakeTransport()
    session.connection_made(transport)  # type: ignore[arg-type]
    session.start()
    return session, transport, requests


def test_a_read_pass_hands_h2_a_bounded_number_of_frames() -> None:
    """Refused requests in one 16 KiB read (~2,000 HEADERS): 256 in this pass, reading paused,
    the rest on the next passes of the loop, then reading resumes."""
    async def body() -> None:
        session, transport, requests = server_session()
        peer = H2Connection(H2Configuration(client_side=True))
        peer.initiate_connection()
        for stream_id in range(1, 2001, 2):
            peer.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        wire = peer.data_to_send()
        assert len(wire) < len(session.get_buffer(-1))
        feed(session, wire)
        assert session.mitigations["read_yield"] == 1 and not transport.reading
        assert session.guard.streams_opened < H2_FRAMES_PER_PASS
        for _ in range(10):
            await asyncio.sleep(0)
        assert session.guard.streams_opened == 1000 and transport.reading
        assert len(requests) == 100 and session.mitigations["refused_stream"] == 900
        assert not session.closed

    asyncio.run(body())


def test_a_big_frame_right_after_the_settings_ack_that_allows_it_is_taken() -> None:
    """Our SETTINGS_MAX_FRAME_SIZE (1 MiB) applies once the peer ACKs it; a frame above h2's
    16 KiB default in the same read as the ACK is not refused for it."""
    async def body() -> None:
        session, transport, requests = server_session()
        peer = H2Connection(H2Configuration(client_side=True))
        peer.initiate_connection()
        peer.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        wire = peer.data_to_send() + SettingsFrame(0, flags=["ACK"]).serialize() * 2
        payload = b"p" * (64 * 1024)
        wire += frame_header(len(payload), DATA, 0, 1) + payload
        feed(session, wire)
        assert not session.closed, session._why_closed
        stream, = requests
        assert bytes(stream._inbound) == payload

    asyncio.run(body())
