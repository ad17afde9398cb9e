"""One HTTP/2 connection over TLS and its CONNECT streams: `H2Session`, an asyncio
BufferedProtocol driving h2's sans-I/O `H2Connection`, and `HboneStream`, one tunnelled TCP
connection, a `ztunnel.streams.Stream`.

- `H2Session` only moves bytes between h2 and one TLS connection: the transport's reads feed
  `receive_data` and the events go to streams, and `flush()` is the one place that takes
  `data_to_send()`; those frames are written once per pass of the event loop, or with the next
  DATA frame, so a burst of them is one TLS write.
- DATA frames on open streams skip h2's frame objects both ways (h2 4.4 formats every received
  DATA payload into a log string, even with logging off, which cost half a receiver's CPU):
  `HboneStream` writes the 9-byte header in front of the payload and `H2Session._receive` cuts
  them out of the received bytes. h2 still sees every other frame and keeps stream state and the
  flow-control windows, which both paths charge.
- Every frame header is seen by the session before h2 sees the frame, so the limits of
  `ztunnel.hbone.limits` (control-frame budgets, header block size, frame size, rapid reset)
  are checked on the header alone, and h2 is fed one header block at a time.
- Flow control is end to end: received data is acknowledged only as the consumer reads it, so a
  slow reader stops its sender through the HTTP/2 windows and at most STREAM_WINDOW bytes wait
  unread per stream; `drain()` waits for the peer's send windows.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import ssl
import struct
from collections import Counter
from typing import Any, Callable, Sequence

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from h2.stream import StreamState

from ztunnel.hbone.keepalive import Keepalive, KeepaliveAction, KeepaliveSettings
from ztunnel.hbone.limits import CONTINUATION, DATA, GOAWAY, HEADERS, MAX_CONCURRENT_STREAMS, PUSH_PROMISE, FrameGuard
from ztunnel.hbone.protocol import REASON_HEADER, HboneError, code_name, header_value, hostport, reset_error
from ztunnel.logbound import RateLimitedLog, cut
from ztunnel.streams import Receiver

log = logging.getLogger("amesh.ztunnel.hbone")
limited_log = RateLimitedLog(log)  # lines a peer can trigger at will

STREAM_WINDOW = 4 * 1024 * 1024  # bytes a peer may send on one stream before we read any of it
# bytes; 4x the stream window so one slow stream cannot stall the rest of the connection
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024  # bytes per DATA frame we accept: bulk data in few frames
IDLE_TIMEOUT = 60.0  # seconds a pooled session may carry no stream before it is closed
CONNECT_TIMEOUT = 5.0  # seconds for TCP + TLS + the peer's SETTINGS, and again for a CONNECT answer
READ_CHUNK = 256 * 1024  # bytes per socket read once a session is busy: a few frames per wakeup
# bytes of a session's first read buffer: a TLS record's worth, for the SETTINGS and CONNECTs of
# a quiet session; a read that fills it grows it to READ_CHUNK (no large buffer before TLS and
# the first frames, so a connection that only handshakes, or not even that, costs little)
SMALL_READ_CHUNK = 16 * 1024
# seconds a server session waits after TLS for the client's preface and SETTINGS: a client that
# says nothing holds a descriptor and a TLS state for nothing
PREFACE_TIMEOUT = 5.0
# seconds a server session may carry no stream before GOAWAY: longer than the clients' pool
# IDLE_TIMEOUT, so a client normally closes first and never races a stream against our GOAWAY
SERVER_IDLE_TIMEOUT = 2 * IDLE_TIMEOUT
# frames handed to h2 per read callback (~5-20 us each): then reading pauses until the next pass
# of the event loop, so one connection's burst cannot stall the others for more than a few ms
H2_FRAMES_PER_PASS = 256
REASON_LIMIT = 256  # characters of a refusal's reason sent in the amesh-reason header
ACK_BATCH = 16 * 1024  # received bytes a stream consumes before handing them back to the windows
# bytes of queued frames joined into one TLS write; above it the payloads are not worth copying
_JOIN_LIMIT = 16 * 1024
_RFC_INITIAL_WINDOW = 65_535  # bytes; every HTTP/2 connection window starts here (RFC 9113 6.9.2)
_CLIENT_PREFACE = 24  # bytes of "PRI * HTTP/2.0..." a client sends before its first frame
_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, split), type, flags, stream id
_END_HEADERS = 0x4  # flag: the header block ends with this frame
# A graceful GOAWAY (RFC 9113 6.8): NO_ERROR and the highest stream id, "open no new streams",
# with every stream already open served to its end. Sent and read past h2, whose connection
# state machine takes any GOAWAY as the end of the connection and refuses the open streams' frames.
_GOAWAY_PAYLOAD = struct.Struct(">LL")  # last stream id, error code
_LAST_STREAM_ID = 2**31 - 1
# h2 stream states in which the peer may still send DATA
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


class HboneStream:
    """One tunnelled TCP connection: a CONNECT stream of an HTTP/2 session, as a `Stream`.

    Received bytes are either pushed to a receiver as they arrive (`start()`, as splice does)
    or read with `read()`. The stream is finished once both sides have sent END_STREAM, or
    either side reset it. Call `drain()` before `close()`: closing a stream that is not finished
    resets it, and what was not yet sent is lost, as when a socket is closed with unread data.
    """

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._inbound = bytearray()  # received, not read yet; HTTP/2 bounds it to STREAM_WINDOW
        self._outbound = bytearray()  # written, waiting for the peer's send windows
        self._eof_written = False  # write_eof() was called
        self._local_ended = False  # our END_STREAM went out (after all of _outbound)
        self._remote_ended = False
        self._error: ConnectionResetError | None = None
        self._readable = asyncio.Event()  # data, END_STREAM or a reset arrived
        self._progress = asyncio.Event()  # some of _outbound went out, or the stream broke
        self._response: asyncio.Future[list[tuple[str, str]]] | None = None  # client side only
        self._receiver: Receiver | None = None  # pushed to, once started
        self._paused = False  # the receiver's sink is full: keep what arrives in _inbound
        self._eof_delivered = False
        self._on_writable: Callable[[bool], None] | None = None
        self._writable = True  # as last reported to _on_writable
        self._unacked = 0  # bytes consumed but not yet handed back to the peer's windows
        self.answered = False  # server side: our answer to the CONNECT went out (or could not)

    def __repr__(self) -> str:
        return f"HboneStream(peer={self.peer}, stream_id={self.stream_id})"

    @property
    def peer(self) -> str:
        """The ip:port of the ztunnel at the other end."""
        return self._session.peer

    async def open(self) -> None:
        pass  # open since the CONNECT was answered

    def start(self, receiver: Receiver, writable: Callable[[bool], None]) -> None:
        """Pushes received bytes to `receiver` from now on, as they arrive; `writable` hears
        when our send side fills up (the peer's windows or the connection's buffer) or drains."""
        self._receiver, self._on_writable = receiver, writable
        self._deliver()

    def pause_reading(self) -> None:
        """What arrives now waits in the stream, unacknowledged: the peer's windows stop it."""
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._deliver()

    async def read(self, n: int) -> bytes | bytearray:
        """Up to n bytes; b"" after the peer's END_STREAM; ConnectionResetError on a reset."""
        while not self._inbound:
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        if n >= len(self._inbound):
            data = self._inbound  # handed over whole, not copied; we fill a new one
            self._inbound = bytearray()
        else:
            with memoryview(self._inbound) as view:
                data = bytes(view[:n])
            del self._inbound[:n]
        self._consumed(len(data))  # only now may the peer send more
        return data

    def write(self, data: bytes) -> None:
        """Queues data; it goes out as the peer's windows allow. A broken stream drops it and
        `drain()` raises, as asyncio's StreamWriter does."""
        if self._eof_written:
            raise RuntimeError(f"{self!r}: write() after write_eof()")
        if self._error is None and data:
            if not self._outbound and len(data) <= self._sendable():
                self._session.send_data(self.stream_id, bytes(data))  # the common case: no copy
                self._progress.set()
            else:
                self._outbound += data
                self.send_pending()

    async def drain(self) -> None:
        """Waits until everything written is within the peer's HTTP/2 windows and the socket."""
        while self._outbound and self._error is None:
            self._progress.clear()
            await self._progress.wait()
        if self._error is not None:
            raise self._error
        await self._session.drain()

    def write_eof(self) -> None:
        """END_STREAM, sent after what is still queued."""
        if self._error is not None:
            raise self._error
        if not self._eof_written:
            self._eof_written = True
            self.send_pending()

    def abort(self) -> None:
        """RST_STREAM (CANCEL): the peer's reads raise ConnectionResetError."""
        if self._error is None and not self.finished:
            self._session.reset(self.stream_id, ErrorCodes.CANCEL)
            self.fail(reset_error(f"HBONE stream {self.stream_id} to {self.peer} aborted locally"))

    def close(self) -> None:
        """Releases the stream; resets it if it is not finished."""
        self.abort()
        self._discard_inbound()

    @property
    def broken(self) -> bool:
        """Reset by either side, or its connection is gone."""
        return self._error is not None

    @property
    def finished(self) -> bool:
        """Both sides sent END_STREAM."""
        return self._local_ended and self._remote_ended

    # The session calls the methods below, as its read loop sees frames for this stream.

    def _sendable(self) -> int:
        """Bytes one DATA frame may carry now: the peer's windows and its frame size limit."""
        h2 = self._session.h2
        return min(h2.local_flow_control_window(self.stream_id), h2.max_outbound_frame_size)

    def send_pending(self) -> None:
        """Sends queued data (then END_STREAM), within the peer's windows and frame size."""
        sent = False
        while self._outbound and self._error is None:
            size = min(len(self._outbound), self._sendable())
            if size <= 0:
                break  # a WINDOW_UPDATE or new SETTINGS will call us again
            with memoryview(self._outbound) as view:
                chunk = bytes(view[:size])
            del self._outbound[:size]
            self._session.send_data(self.stream_id, chunk)
            sent = True
        if self._eof_written and not self._outbound and not self._local_ended and self._error is None:
            self._session.h2.end_stream(self.stream_id)
            self._local_ended = sent = True
            self._session.flush()
        if sent:
            self._progress.set()
            if self.finished:
                self._session.forget(self)
        self.report_writable()  # data left waiting for the windows, or all of it went

    def report_writable(self) -> None:
        """Tells the started owner when writes should stop (data waits for the peer's windows,
        or the connection's send buffer is full) and when they may go on."""
        if self._on_writable is not None:
            writable = not self._outbound and not self._session.write_paused
            if writable != self._writable:
                self._writable = writable
                self._on_writable(writable)

    def receive(self, data: bytes | memoryview) -> None:
        """Payload of a DATA frame (a view of the session's read buffer, reused after this)."""
        if self._receiver is not None and not self._paused and not self._inbound:
            chunk = bytes(data)
            self._receiver.data(chunk)
            self._consumed(len(chunk))
        else:
            self._inbound += data
            self._readable.set()

    def remote_end(self) -> None:
        self._remote_ended = True
        self._readable.set()
        self._deliver()
        if self.finished:
            self._session.forget(self)

    def _deliver(self) -> None:
        """Pushes what waited (data, then the end of stream) to the receiver, unless paused."""
        receiver = self._receiver
        if receiver is None or self._paused or self._error is not None:
            return
        if self._inbound:
            data, self._inbound = self._inbound, bytearray()
            receiver.data(data)
            self._consumed(len(data))
        if self._remote_ended and not self._eof_delivered:
            self._eof_delivered = True
            receiver.eof()

    def _consumed(self, size: int) -> None:
        # Handed back in batches: an h2 call per small message costs more than the message.
        # All streams' unreturned bytes stay far below the connection window: ACK_BATCH x h2's
        # limit of 100 concurrent streams is a tenth of CONNECTION_WINDOW.
        self._unacked += size
        if self._unacked >= ACK_BATCH:
            self._session.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0

    def respond(self, headers: list[tuple[str, str]]) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_result(headers)

    def fail(self, error: ConnectionResetError) -> None:
        """The stream broke: readers and writers see `error`, buffered data is dropped."""
        if self._error is not None:
            return
        self._error = error
        self._outbound.clear()
        self._discard_inbound()
        self._readable.set()
        self._progress.set()
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._session.forget(self)
        if self._receiver is not None:
            self._receiver.error(error)

    def kernel_socket(self) -> Any:
        """The TCP socket of the session carrying this stream (shared with its other streams)."""
        return self._session.kernel_socket()

    def _discard_inbound(self) -> None:
        """Drops unread data, handing its share (and what was consumed but not yet handed back)
        of the connection window back to the peer."""
        self._session.acknowledge(self.stream_id, len(self._inbound) + self._unacked)
        self._inbound.clear()
        self._unacked = 0


class H2Session(asyncio.BufferedProtocol):
    """One HTTP/2 connection over a TLS transport, and its streams: the transport's protocol.

    Received bytes land in one buffer of the session (no stream reader, no task per read) and go
    straight to `_receive`: a small one at first, an anonymous mapping of READ_CHUNK once a read
    fills it (returned to the OS when the session ends, where a freed heap block would stay in
    the process). Nothing is read until `start()`, so the owner can check the peer's certificate
    first (unless `autostart`). Client sessions (client_side=True) open streams with
    `open_stream`; server sessions hand each incoming request to `on_request`, refuse streams
    beyond MAX_CONCURRENT_STREAMS one by one (REFUSED_STREAM), tell `on_reset` of a stream the
    client reset, and give the client PREFACE_TIMEOUT for its SETTINGS. `on_close` is told once
    when the connection is gone. With `keepalive` settings a session PINGs a peer it has not
    heard from for their interval and drops the connection when nothing answers within their
    timeout (`keepalive_expired` then says so): a peer whose node vanished is found.

    What the peer sends is held to `ztunnel.hbone.limits` (a `FrameGuard`): crossing a limit ends
    the connection with GOAWAY (ENHANCE_YOUR_CALM, FRAME_SIZE_ERROR for a frame above our
    SETTINGS_MAX_FRAME_SIZE, judged on its header) and counts the limit's name in `mitigations`
    (a Counter, shared with the owner), as do refused streams ("refused_stream"), the deadlines
    ("preface_timeout", "idle_timeout") and read passes cut short ("read_yield").
    """

    def __init__(
        self,
        *,
        client_side: bool,
        peer: str = "",  # "": the remote address, once connected
        idle_timeout: float | None = None,
        on_request: Callable[[HboneStream, list[tuple[str, str]]], None] | None = None,
        on_close: Callable[[H2Session], None] | None = None,
        on_reset: Callable[[HboneStream], None] | None = None,
        autostart: bool = False,  # start() as soon as connected, not waiting for the owner
        preface_timeout: float | None = None,  # server side: seconds for the client's SETTINGS
        mitigations: Counter[str] | None = None,
        keepalive: KeepaliveSettings | None = None,
    ) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=client_side, header_encoding="utf-8"))
        self.peer = peer
        self._client_side = client_side
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._preface_timeout = preface_timeout
        self._preface_timer: asyncio.TimerHandle | None = None
        self._keepalive_settings = keepalive
        self._keepalive: Keepalive | None = None  # from start()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.keepalive_expired = False  # dropped because the peer answered no PING
        # a graceful GOAWAY was sent or received: no new streams, the open ones run to their end
        self.going_away = False
        self.on_going_away: Callable[[H2Session], None] | None = None  # told when the peer's arrives
        self._on_request, self._on_close, self._on_reset = on_request, on_close, on_reset
        self._autostart = autostart
        self._streams: dict[int, HboneStream] = {}
        self._read_buffer: memoryview | None = None  # allocated by the first read
        self._read_map: mmap.mmap | None = None  # backs the READ_CHUNK buffer, once grown
        self._received = bytearray()  # received bytes not yet a whole frame, or not yet handled
        self._data_stream: HboneStream | None = None  # of the DATA frame being received
        self._data_left = 0  # bytes of its payload still to come
        self._preface_left = 0 if client_side else _CLIENT_PREFACE  # for h2, before any frame
        self.guard = FrameGuard()
        self.mitigations: Counter[str] = Counter() if mitigations is None else mitigations
        self._head_charged = False  # the partial frame at the start of _received is in `guard`
        self._pass_frames = 0  # frames handed to h2 in this read pass
        self._yielded = False  # this pass hit H2_FRAMES_PER_PASS: reading waits for the next one
        self._backlog_scheduled = False  # a call of _receive_backlog is due
        loop = self._loop = asyncio.get_running_loop()
        self._settings_received = loop.create_future()
        self._lost = loop.create_future()  # the transport is gone
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []  # frames to write at the end of this event-loop pass
        self._write_scheduled = False
        self.write_paused = False  # the transport's buffer is above its high-water mark
        self._write_resumed: asyncio.Future[None] | None = None
        # server side: the CONNECT handlers running, by stream id
        self.handlers: dict[int, asyncio.Task[None]] = {}
        self.closed = False
        self._why_closed = ""
        self.failure: OSError | None = None  # the socket or TLS error that ended the connection

    def kernel_socket(self) -> Any:
        """The TCP socket under this session's TLS."""
        return self._transport.get_extra_info("socket") if self._transport else None

    def tls_object(self) -> ssl.SSLObject | None:
        """The TLS connection: the negotiated protocol and the peer's certificate."""
        return self._transport.get_extra_info("ssl_object") if self._transport else None

    def __repr__(self) -> str:
        return f"H2Session(peer={self.peer}, streams={len(self._streams)}, closed={self.closed})"

    # asyncio.BufferedProtocol: the transport calls these.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._transport = transport
        self.peer = self.peer or hostport(*transport.get_extra_info("peername")[:2])
        if self._autostart:
            self.start()
        else:
            transport.pause_reading()  # until start()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(SMALL_READ_CHUNK))
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer = self._read_buffer
        assert buffer is not None
        if self.closed:
            return  # what a closing transport still hands over
        if self._keepalive is not None:
            self._keepalive.heard(self._loop.time())
        self._pass_frames = 0
        self._receive_guarded(buffer[:nbytes])
        if nbytes == len(buffer) and self._read_map is None and not self.closed:
            # A busy session: reads of READ_CHUNK from now on, in a mapping of its own.
            self._read_map = mmap.mmap(-1, READ_CHUNK)
            self._read_buffer = memoryview(self._read_map)
        elif self.closed:
            self._release_read_buffer()

    def _release_read_buffer(self) -> None:
        """Gives the READ_CHUNK mapping back to the OS (called outside reads: no view of it is
        in use); a read after it gets a small buffer."""
        if self._read_map is not None and self._read_buffer is not None:
            self._read_buffer.release()
            mapping, self._read_map, self._read_buffer = self._read_map, None, None
            try:
                mapping.close()
            except BufferError:
                pass  # a view of it outlived the read (a traceback): unmapped when that goes

    def _receive_guarded(self, view: memoryview) -> None:
        """`_receive`, ending the connection on the peer's protocol error, and pausing reading
        until the next pass of the event loop if this one used up its frames."""
        try:
            self._receive(view)
        except ProtocolError as e:
            self.flush()  # h2 queued a GOAWAY that tells the peer what it did wrong
            self._terminate(f"broken by an HTTP/2 protocol error from the peer ({cut(str(e))})")
            return
        # What the frames of this read made h2 send (WINDOW_UPDATEs, SETTINGS ACKs, PING
        # answers) goes out now, in one write: left for the end of the pass, it would cost the
        # event loop a pass of its own after every read.
        self.flush()
        self._write_out()
        if self._yielded and not self.closed:
            self._backlog_scheduled = True
            self.mitigations["read_yield"] += 1
            assert self._transport is not None
            self._transport.pause_reading()
            self._loop.call_soon(self._receive_backlog)
        self._yielded = False

    def _receive_backlog(self) -> None:
        """Next pass: handles what the last one left in _received, then reads again."""
        self._backlog_scheduled = False
        if self.closed:
            return
        self._pass_frames = 0
        self._receive_guarded(memoryview(b""))
        if not self._backlog_scheduled and not self.closed and self._transport is not None:
            self._transport.resume_reading()

    def eof_received(self) -> bool:
        self._terminate("closed by the peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):  # includes ssl.SSLError
            self.failure = exc
            self._terminate(f"lost ({cut(str(getattr(exc, 'reason', None) or exc.strerror or exc))})")
        else:
            self._terminate("closed by the peer")
        self._resume_writers()
        self._release_read_buffer()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._report_writable()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_writers()
        self._report_writable()

    def _report_writable(self) -> None:
        for stream in list(self._streams.values()):
            stream.report_writable()

    def _resume_writers(self) -> None:
        if self._write_resumed is not None and not self._write_resumed.done():
            self._write_resumed.set_result(None)

    # The owner calls these.

    def start(self) -> None:
        """Sends the preface and our SETTINGS, raises the connection window, starts reading."""
        assert self._transport is not None, "not connected"
        self.h2.initiate_connection()  # advertises h2's MAX_CONCURRENT_STREAMS, 100, which is ours
        # h2 enforces its own stream limit by ending the whole connection (TooManyStreamsError);
        # we refuse a stream beyond ours alone (REFUSED_STREAM, RFC 9113 5.1.2), so h2's limit is
        # one above it: only a stream we refuse at once (h2 sees one header block at a time) reaches it.
        self.h2.local_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS + 1
        self.h2.local_settings.acknowledge()
        # Pending until the peer ACKs them; h2 then applies them (window, frame size) itself.
        self.h2.update_settings({
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _RFC_INITIAL_WINDOW)
        self.flush()
        if not self.closed:
            self._transport.resume_reading()
        self._arm_idle_timer()
        if self._keepalive_settings is not None and not self.closed:
            self._keepalive = Keepalive(self._keepalive_settings, self._loop.time())
            self._keepalive_timer = self._loop.call_at(self._keepalive.due(self._loop.time())[1],
                                                       self._keepalive_check)
        if self._preface_timeout is not None and not self.closed:
            self._preface_timer = self._loop.call_later(
                self._preface_timeout, self._preface_expired)

    def _preface_expired(self) -> None:
        if not self._settings_received.done():
            self.mitigations["preface_timeout"] += 1
            limited_log.log(logging.INFO, "hbone.preface_timeout", "hbone.preface_timeout peer=%s timeout=%ss",
                            self.peer, self._preface_timeout)
            self.close()

    def _keepalive_check(self) -> None:
        """Carries out the keepalive's decision: a PING, or the end of a session to a dead peer."""
        keepalive = self._keepalive
        assert keepalive is not None
        if self.closed:
            return
        now = self._loop.time()
        action, again = keepalive.due(now)
        if action is KeepaliveAction.DEAD:
            self.keepalive_expired = True
            log.warning("event=hbone_peer_dead peer=%s timeout_s=%s action=\"dropping the session; new "
                        "connections open a fresh one\"", self.peer, keepalive.settings.timeout)
            self._terminate(f"dropped: it answered no HTTP/2 PING within {keepalive.settings.timeout}s "
                            f"(is its node gone?)")
            assert self._transport is not None
            self._transport.abort()  # nothing would ever acknowledge a graceful close
            return
        if action is KeepaliveAction.PING:
            self.h2.ping(bytes(8))  # any answer proves the peer alive: no payload to match
            self.flush()
            keepalive.pinged(now)
        self._keepalive_timer = self._loop.call_at(again, self._keepalive_check)

    async def wait_settings(self) -> None:
        """Waits for the peer's first SETTINGS (its stream limit and windows)."""
        await asyncio.wait({self._settings_received, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        if self._settings_received.done():
            return
        if isinstance(self.failure, ssl.SSLError):
            raise self.failure  # e.g. the peer's TLS alert that it does not trust our certificate
        raise HboneError(
            "closed",
            f"HBONE connection to {self.peer} {self._why_closed} before its HTTP/2 SETTINGS: "
            f"does it trust this node's certificate?",
        )

    def has_capacity(self) -> bool:
        """Open, not going away, and below the peer's MAX_CONCURRENT_STREAMS."""
        return (not self.closed and not self.going_away
                and len(self._streams) < self.h2.remote_settings.max_concurrent_streams)

    def go_away(self) -> None:
        """Graceful GOAWAY: the peer opens no new streams here; those open run to their end, and
        the session closes when the last one has (at once, without any)."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self.flush()
        self._queue(_FRAME_HEADER.pack(0, _GOAWAY_PAYLOAD.size, GOAWAY, 0, 0),
                    _GOAWAY_PAYLOAD.pack(_LAST_STREAM_ID, ErrorCodes.NO_ERROR))
        if not self._streams:
            self.close()

    def _peer_goes_away(self, payload: memoryview) -> bool:
        """A GOAWAY frame's payload from the peer: True if it was a graceful one (NO_ERROR and the
        highest stream id, RFC 9113's "shutdown imminent"), which we keep from h2; False leaves it
        to h2 (the end of the connection, as any other GOAWAY is)."""
        if len(payload) < _GOAWAY_PAYLOAD.size:
            return False
        last_stream_id, code = _GOAWAY_PAYLOAD.unpack_from(payload)
        if code != ErrorCodes.NO_ERROR or last_stream_id & _LAST_STREAM_ID != _LAST_STREAM_ID:
            return False
        if not self.going_away:
            self.going_away = True
            log.debug("hbone.going_away peer=%s streams=%d", self.peer, len(self._streams))
            if self.on_going_away is not None:
                self.on_going_away(self)
            if not self._streams:
                self.close()
        return True

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], timeout: float
    ) -> HboneStream:
        """Sends CONNECT `authority` and returns the stream once the peer answers 200."""
        stream_id = self.h2.get_next_available_stream_id()
        stream = HboneStream(self, stream_id)
        self.guard.streams_opened += 1  # the server may answer and reset it
        stream._response = self._loop.create_future()
        self._add(stream)
        self.h2.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority), *headers])
        self.flush()
        try:
            async with asyncio.timeout(timeout):
                response = dict(await stream._response)
        except ConnectionResetError as e:
            raise HboneError(
                "closed", f"{e.strerror} before answering CONNECT {authority}"
            ) from None
        except TimeoutError:
            stream.abort()
            raise HboneError(
                "connect_timeout",
                f"{self.peer} did not answer CONNECT {authority} within {timeout}s: "
                f"is its ztunnel overloaded or stuck connecting to {authority}?",
            ) from None
        except BaseException:
            stream.abort()  # cancelled: nobody will use the stream
            raise
        status = response[":status"]
        if status != "200":
            stream.abort()
            reason = response.get(REASON_HEADER, "no reason given")
            # 401 is the destination's policy refusing (as Istio's ztunnel answers): counted as a
            # denial on this side too, not as an upstream failure
            raise HboneError(
                "policy_denied" if status == "401" else "status",
                f"{self.peer} answered CONNECT {authority} with {status}: {reason}", status=int(status),
            )
        return stream

    def answer(self, stream: HboneStream, status: int, reason: str = "") -> None:
        """Sends the response to a CONNECT; any status but 200 also ends and releases the stream.
        Never raises: a stream the client reset, or whose connection ended, is only released."""
        stream.answered = True
        final = status != 200
        if stream._error is None and not self.closed:
            headers = [(":status", str(status))]
            if reason:
                headers.append((REASON_HEADER, header_value(cut(reason, REASON_LIMIT))))
            try:
                self.h2.send_headers(stream.stream_id, headers, end_stream=final)
                h2_stream = self.h2.streams.get(stream.stream_id)
                if final and h2_stream is not None and not h2_stream.closed:
                    # RFC 9113 8.1: a complete response may be followed by RST_STREAM(NO_ERROR) so
                    # the client stops sending (a client that sent END_STREAM already has).
                    self.h2.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except StreamClosedError:  # reset by the client in the frames h2 has seen
                final = True
            self.flush()
        if final:
            stream.fail(reset_error(f"CONNECT stream {stream.stream_id} answered {status}"))

    def acknowledge(self, stream_id: int, size: int) -> None:
        """`size` received bytes were consumed: the peer may send that many more."""
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM, unless the stream is closed already (both ends done, or reset by the peer)."""
        if not self.closed:
            try:
                self.h2.reset_stream(stream_id, code)
            except StreamClosedError:
                return
            self.flush()

    def flush(self) -> None:
        """Queues whatever h2 has queued (every frame but DATA on an open stream) for the next
        write."""
        if data := self.h2.data_to_send():
            self._queue(data)

    def send_data(self, stream_id: int, payload: bytes) -> None:
        """Writes one DATA frame without END_STREAM, charged to h2's send windows; the caller
        checked that they and the peer's frame size allow it, and that the stream may send."""
        self.flush()  # what h2 queued before (the CONNECT, a WINDOW_UPDATE) goes first
        size = len(payload)
        self.h2.outbound_flow_control_window -= size
        self.h2.streams[stream_id].outbound_flow_control_window -= size
        self.guard.data_frames_sent += 1  # the peer's allowance of WINDOW_UPDATEs
        # at once, with the frames queued before it: a message waits for nothing, and the
        # transport's backpressure is felt by the next read. Not through _queue: a write
        # scheduled for the end of the pass would find nothing left to write.
        self._outgoing += (_FRAME_HEADER.pack(size >> 8, size & 0xFF, DATA, 0, stream_id), payload)
        self._write_out()

    def _queue(self, *frames: bytes) -> None:
        # Frames other than DATA (HEADERS, WINDOW_UPDATE, SETTINGS ACK, END_STREAM, resets) wait
        # for the end of this pass of the event loop, the next DATA frame or drain(): a burst of
        # them is one TLS write and one send(), not one per frame.
        self._outgoing += frames
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._write_scheduled = False
        frames = self._outgoing
        if not frames:
            return
        self._outgoing = []
        if self._transport is None or self._transport.is_closing():
            return
        if sum(map(len, frames)) <= _JOIN_LIMIT:
            self._transport.write(b"".join(frames))  # one TLS record, not one per frame
        else:
            self._transport.writelines(frames)  # bulk: no copy of the payloads

    async def drain(self) -> None:
        """Writes what is queued, then waits while the transport's send buffer is above its
        high-water mark."""
        self._write_out()
        while self.write_paused and not self.closed:
            if self._write_resumed is None or self._write_resumed.done():  # one future for all waiters
                self._write_resumed = self._loop.create_future()
            await self._write_resumed

    def forget(self, stream: HboneStream) -> None:
        """The stream is finished or broken; a session left without streams may go idle."""
        if self._streams.pop(stream.stream_id, None) is not None and not self._streams:
            if self.going_away:
                self.close()
            else:
                self._arm_idle_timer()

    def close(self) -> None:
        """GOAWAY, then closes the connection; streams still open see ConnectionResetError."""
        if self.closed:
            return
        self.h2.close_connection()
        self.flush()
        self._terminate("closed locally")

    def abort(self) -> None:
        """Drops the connection at once, without flushing what is queued."""
        self._terminate("aborted locally")
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Waits until the connection is gone (the peer closed, or close() was called)."""
        await self._lost

    def _add(self, stream: HboneStream) -> None:
        self._streams[stream.stream_id] = stream
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _arm_idle_timer(self) -> None:
        if self._idle_timeout is not None and not self.closed:
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._expire)

    def _expire(self) -> None:
        if not self._streams:
            if not self._client_side:  # a pool closing its idle sessions is routine
                self.mitigations["idle_timeout"] += 1
            log.debug("hbone.idle peer=%s idle_timeout=%ss", self.peer, self._idle_timeout)
            self.close()

    def _receive(self, view: memoryview) -> None:
        """Takes received bytes (a view of the read buffer, copied before it is reused): DATA
        frames for our open streams go straight to them, as they arrive; all else goes to h2 in
        order and as whole frames (a partial one waits)."""
        if self._preface_left:
            preface, view = view[:self._preface_left], view[self._preface_left:]
            self._preface_left -= len(preface)
            self._h2_receive(bytes(preface))  # h2 checks it
        if self._data_left:  # the rest of a DATA frame whose start went to its stream
            rest, view = view[:self._data_left], view[self._data_left:]
            self._deliver(rest)
        buffer = self._received
        if buffer:
            buffer += view
            with memoryview(buffer) as joined:
                done = self._frames(joined)
            del buffer[:done]
        else:
            done = self._frames(view)
            buffer += view[done:]

    def _frames(self, view: memoryview) -> int:
        """Handles the frames in `view` (and the start of a last DATA frame); returns the bytes
        used. The guard judges each frame header once, when it is first seen (a partial frame's
        on the read that brought its header); h2 gets whole frames, in batches that end with each
        header block (so it sees one request at a time, which we admit or refuse before the
        next), and at most H2_FRAMES_PER_PASS per pass."""
        end = len(view)
        start = done = 0  # view[start:done] are whole frames h2 has not seen yet
        charged, self._head_charged = self._head_charged, False  # the first frame is judged
        guard = self.guard
        while end - done >= 9 and not self.closed:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(view, done)
            length = high << 8 | low
            if length > self.h2.max_inbound_frame_size:
                if start < done:  # a SETTINGS ACK among them that h2 has not seen raises the limit
                    self._h2_receive(bytes(view[start:done]))
                    start = done
                    continue
                self._calm("frame_too_large", ErrorCodes.FRAME_SIZE_ERROR)  # before its payload
                break
            if kind == DATA and length and not flags and not guard.in_header_block:
                if start < done:
                    self._h2_receive(bytes(view[start:done]))
                    start = done
                if self._claim_data(stream_id & 0x7FFFFFFF, length):
                    payload_end = min(done + 9 + length, end)
                    self._deliver(view[done + 9:payload_end])
                    start = done = payload_end
                    charged = False
                    continue
            if not charged:
                if self._pass_frames >= H2_FRAMES_PER_PASS:
                    self._yielded = True  # the rest waits in _received for the next pass
                    break
                self._pass_frames += 1
                if (limit := guard.frame(kind, flags, length)) is not None:
                    self._calm(limit)
                    break
            charged = False
            next_frame = done + 9 + length
            if next_frame > end:
                self._head_charged = True
                break
            frame_start, done = done, next_frame
            if kind == GOAWAY and self._peer_goes_away(view[frame_start + 9:done]):
                if start < frame_start:
                    self._h2_receive(bytes(view[start:frame_start]))
                start = done
                continue
            if kind in (HEADERS, PUSH_PROMISE, CONTINUATION) and flags & _END_HEADERS:
                self._h2_receive(bytes(view[start:done]))
                start = done
        if start < done and not self.closed:
            self._h2_receive(bytes(view[start:done]))
        return done

    def _claim_data(self, stream_id: int, size: int) -> bool:
        """Takes a DATA frame (no flags) of `size` bytes for its stream, charging h2's receive
        windows; False, leaving it to h2, unless the stream is open for it and the windows allow."""
        stream = self._streams.get(stream_id)
        h2_stream = self.h2.streams.get(stream_id)
        if (stream is None or stream._remote_ended or stream._error is not None
                or h2_stream is None or h2_stream.state_machine.state not in _RECEIVING):
            return False
        connection_window = self.h2._inbound_flow_control_window_manager
        stream_window = h2_stream._inbound_window_manager
        if size > connection_window.current_window_size or size > stream_window.current_window_size:
            return False  # h2 answers the peer's flow-control violation
        connection_window.window_consumed(size)
        stream_window.window_consumed(size)
        self._data_stream, self._data_left = stream, size
        return True

    def _deliver(self, payload: memoryview) -> None:
        """Payload of the DATA frame being received, to its stream (or straight back to the peer's
        windows if the stream broke meanwhile)."""
        stream = self._data_stream
        assert stream is not None
        self._data_left -= len(payload)
        if stream._error is None:
            stream.receive(payload)
        else:
            self.acknowledge(stream.stream_id, len(payload))

    def _h2_receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if self.closed:
                break  # a limit crossed by an earlier event ended the connection: the rest is moot
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, RemoteSettingsChanged) and not self._settings_received.done():
            self._settings_received.set_result(None)
        if isinstance(event, (RemoteSettingsChanged, WindowUpdated)):
            # A window grew (connection or stream WINDOW_UPDATE, new initial window): send what waited.
            grown = getattr(event, "stream_id", 0)
            for stream in [s for s in self._streams.values() if grown in (0, s.stream_id)]:
                stream.send_pending()
        elif isinstance(event, ConnectionTerminated):
            self._terminate(f"ended by the peer (GOAWAY {code_name(event.error_code)})")
        elif isinstance(event, RequestReceived) and self._on_request is not None:
            if self.h2.open_inbound_streams > MAX_CONCURRENT_STREAMS:  # h2 counts this one
                self.mitigations["refused_stream"] += 1
                self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            stream = HboneStream(self, event.stream_id)
            self._add(stream)
            self._on_request(stream, event.headers)
        elif isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:  # released or reset already: give the window straight back
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if event.data:
                stream.receive(event.data)
            if padding := event.flow_controlled_length - len(event.data):
                self.h2.acknowledge_received_data(padding, event.stream_id)
        elif (stream := self._streams.get(getattr(event, "stream_id", 0))) is None:
            return  # a late frame for a stream we released
        elif isinstance(event, ResponseReceived):
            stream.respond(event.headers)
        elif isinstance(event, StreamEnded):
            stream.remote_end()
        elif isinstance(event, StreamReset):
            code = code_name(event.error_code)
            stream.fail(reset_error(f"HBONE stream {stream.stream_id} reset by {self.peer} ({code})"))
            if not self._client_side:
                if self._on_reset is not None:
                    self._on_reset(stream)
                if (limit := self.guard.stream_reset(stream.answered)) is not None:
                    self._calm(limit)

    def _calm(self, limit: str, code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        """The peer crossed `limit`: GOAWAY with `code` and the limit's name, and the end."""
        self.mitigations[limit] += 1
        limited_log.log(logging.WARNING, f"hbone.limit.{limit}", "hbone.limit peer=%s limit=%s", self.peer, limit)
        try:
            self.h2.close_connection(error_code=code, additional_data=limit.encode())
        except ProtocolError:
            pass  # h2 had closed the connection already
        self.flush()
        self._terminate(f"ended: the peer crossed the HTTP/2 limit {limit}")

    def _terminate(self, why: str) -> None:
        """The connection is gone: fail every stream, close the socket, tell the owner once."""
        if self.closed:
            return
        self.closed = True
        self._why_closed = why
        for timer in (self._idle_timer, self._preface_timer, self._keepalive_timer):
            if timer is not None:
                timer.cancel()
        error = reset_error(f"HBONE connection to {self.peer} {why}")
        for stream in list(self._streams.values()):
            stream.fail(error)
        self._write_out()  # a GOAWAY, resets
        if self._transport is not None:
            self._transport.close()
        log.debug("hbone.session_closed peer=%s why=%r", self.peer, why)
        if self._on_close is not None:
            self._on_close(self)

