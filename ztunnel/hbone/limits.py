"""What an HTTP/2 peer may make a session do: the pure limits `H2Session` applies to every frame
header it receives, before h2 parses the frame.

A peer holding a mesh certificate can otherwise make the receiving ztunnel spend CPU and memory
for nothing: frames that cost the receiver work and answer frames but carry no data (PING,
SETTINGS, RST_STREAM, WINDOW_UPDATE, PRIORITY, empty DATA, unknown types), streams opened and reset at once
(CVE-2023-44487, "rapid reset": each one an upstream connect), header blocks grown across
CONTINUATION frames (h2 bounds their count, 64, not their bytes: 64 MiB at our frame size).
The anchors, read for the numbers' shape:
- nghttp2 (lib/nghttp2_session.c): incoming RST_STREAM through a token bucket (burst 1000, 33
  per second) before GOAWAY ENHANCE_YOUR_CALM; a cap on queued outbound ACKs. (Ours are bounded
  per stream instead, as Envoy bounds WINDOW_UPDATE: a busy session resets streams at any rate.)
- Envoy's http2_protocol_options: max_inbound_priority_frames_per_stream (100 per stream
  opened), max_inbound_window_update_frames_per_data_frame_sent (10 per DATA frame sent),
  max_consecutive_inbound_frames_with_empty_payload; premature-reset accounting (streams reset
  before the answer, against streams opened).
- h2o and nghttp2 both bound a header block's bytes, not its frame count.
A verdict is the name of the limit crossed (a `Counter` key, and the GOAWAY's debug data); the
session answers it with GOAWAY and closes. Time comes from an injected clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ztunnel.limits import TokenBucket

# frame types (RFC 9113 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1  # flag on DATA and HEADERS
END_HEADERS = 0x4  # flag on HEADERS, PUSH_PROMISE, CONTINUATION: the header block ends here

# bytes of one header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs): h2's advertised
# SETTINGS_MAX_HEADER_LIST_SIZE; a CONNECT's headers are a few hundred bytes
MAX_HEADER_BLOCK = 64 * 1024
MAX_CONCURRENT_STREAMS = 100  # streams a peer may have open on one session (h2's and Envoy's default)
# premature resets (streams the peer reset before we answered) tolerated before the ratio check:
# fewer than MAX_CONCURRENT_STREAMS, so a rapid reset cannot start as many upstream connects
RAPID_RESET_MIN = 50
# WINDOW_UPDATE frames tolerated: a base, and more per stream opened and per DATA frame we sent
# (Envoy's shape: a peer only needs them as it receives our data)
WINDOW_UPDATES_BASE = 100
WINDOW_UPDATES_PER_STREAM = 2
WINDOW_UPDATES_PER_DATA_FRAME = 10
PRIORITY_PER_STREAM = 100  # PRIORITY frames tolerated per stream opened, plus one stream's worth
# RST_STREAM frames tolerated: a base, and two per stream (one reset each way, or a response and
# a reset): proportional, like WINDOW_UPDATE, so that resets at any rate are fine while each
# costs the peer a stream (whose early resets the rapid-reset check judges), and a flood is not
RST_STREAMS_BASE = 100
RST_STREAMS_PER_STREAM = 2


@dataclass(frozen=True)
class Budget:
    """A token bucket: `burst` frames at once, refilled at `per_second`."""

    burst: int  # frames
    per_second: float  # frames per second


# Frames that carry no data and that amesh's own peers send a handful of per session (SETTINGS
# and their ACKs at the start, no PING yet): a flood of any trips in well under a second, a
# well-behaved peer never comes near.
BUDGETS = {
    "ping": Budget(100, 10.0),
    "settings": Budget(32, 2.0),
    "empty_data": Budget(100, 10.0),  # DATA without payload or END_STREAM: no use at all
    "extension": Budget(100, 10.0),  # frame types h2 ignores (RFC 9113 5.5): amesh sends none
}
_BUDGETED = {PING: "ping", SETTINGS: "settings"}


class FrameGuard:
    """The limits of one HTTP/2 connection, fed every received frame header and stream event.

    Each method returns None, or the name of the limit the peer crossed (e.g. "ping_flood"):
    the session then ends the connection with GOAWAY ENHANCE_YOUR_CALM. The session counts
    `data_frames_sent` (the peer's allowance of WINDOW_UPDATEs grows with it).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = {name: TokenBucket(b.burst, b.per_second, clock) for name, b in BUDGETS.items()}
        self.data_frames_sent = 0
        # HEADERS frames seen (a stream each, a response, or trailers), and streams we opened
        self.streams_opened = 0
        self.window_updates = 0
        self.rst_streams = 0
        self.priorities = 0
        self.premature_resets = 0
        self.header_block = 0  # bytes of the header block being received (or the last one)
        self.in_header_block = False  # a HEADERS or PUSH_PROMISE awaits its END_HEADERS

    def frame(self, kind: int, flags: int, length: int) -> str | None:
        """A received frame header (type, flags, payload length), before its payload is read; the
        session checks the length against SETTINGS_MAX_FRAME_SIZE, which h2 keeps."""
        if kind in (HEADERS, PUSH_PROMISE, CONTINUATION):
            if kind == HEADERS:
                self.streams_opened += 1
            # a CONTINUATION outside a block is h2's protocol error to report
            self.header_block = length if kind != CONTINUATION else self.header_block + length
            self.in_header_block = not flags & END_HEADERS
            if self.header_block > MAX_HEADER_BLOCK:
                return "header_block_too_large"
        elif kind == WINDOW_UPDATE:
            self.window_updates += 1
            allowed = (WINDOW_UPDATES_BASE + WINDOW_UPDATES_PER_STREAM * self.streams_opened
                       + WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames_sent)
            if self.window_updates > allowed:
                return "window_update_flood"
        elif kind == RST_STREAM:
            self.rst_streams += 1
            if self.rst_streams > RST_STREAMS_BASE + RST_STREAMS_PER_STREAM * self.streams_opened:
                return "rst_stream_flood"
        elif kind == PRIORITY:
            self.priorities += 1
            if self.priorities > PRIORITY_PER_STREAM * (1 + self.streams_opened):
                return "priority_flood"
        elif kind == DATA:
            if not length and not flags & END_STREAM and not self._buckets["empty_data"].take():
                return "empty_data_flood"
        elif kind > CONTINUATION:
            if not self._buckets["extension"].take():
                return "extension_flood"
        elif (name := _BUDGETED.get(kind)) is not None and not self._buckets[name].take():
            return f"{name}_flood"
        return None

    def stream_reset(self, answered: bool) -> str | None:
        """The peer reset one of its streams; `answered`: after we answered its CONNECT."""
        if answered:
            return None
        self.premature_resets += 1
        if self.premature_resets > RAPID_RESET_MIN and 2 * self.premature_resets > self.streams_opened:
            return "rapid_reset"
        return None
