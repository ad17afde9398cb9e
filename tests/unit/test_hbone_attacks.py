"""HBONE under attack by a client holding a valid mesh certificate, on loopback mutual TLS: an
HboneServer on one side, a raw HTTP/2 client (tests.unit.h2peer.RawPeer) writing hostile frames
on the other, each attack with the figure it must stay under (issue 11). Every test also fails
on a task exception nobody retrieved."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import socket
import ssl
import time
import tracemalloc
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Coroutine

import pytest
import uvloop
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.unit.h2peer import RawPeer, frame_header
from tests.unit.test_hbone import echo, to_upstream
from ztunnel.hbone import ConnectHandler, ConnectRequest, HboneClientPool, HboneServer, PoolKey, Responder, hostport
from ztunnel.hbone.limits import MAX_CONCURRENT_STREAMS, MAX_HEADER_BLOCK
from ztunnel.hbone.session import H2Session
from ztunnel.identity import CertificateManager, FileCA, Identity
from ztunnel.streams import connect_tcp

TRUST_DOMAIN = "cluster.local"
CLIENT = Identity(TRUST_DOMAIN, "shop", "frontend")
SERVER = Identity(TRUST_DOMAIN, "shop", "cart")
TEST_TIMEOUT = 20.0  # seconds per test body
ENHANCE_YOUR_CALM, FRAME_SIZE_ERROR, REFUSED_STREAM, NO_ERROR = 0xB, 0x6, 0x7, 0x0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateManager:
    manager = CertificateManager(FileCA.load_or_create(tmp_path_factory.mktemp("ca")))
    manager.set_identities([CLIENT, SERVER])
    return manager


def run(body: Coroutine[None, None, None], loop_factory: Any = asyncio.new_event_loop) -> None:
    """Runs `body`; fails if any task exception went unretrieved meanwhile (or any other error
    reached the loop's exception handler)."""
    unhandled: list[dict[str, Any]] = []

    async def guarded() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        await asyncio.wait_for(body, TEST_TIMEOUT)
        gc.collect()  # a task dropped with its exception reports it when collected
        await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(guarded())
    assert not unhandled, [(c.get("message"), c.get("protocol") and c["protocol"]._app_protocol, "".join(__import__("traceback").format_exception(c["exception"])) if c.get("exception") else None) for c in unhandled]


@dataclass
class Served:
    """An HboneServer on a loopback listener, and the sessions it accepted."""

    server: HboneServer
    address: tuple[str, int]
    echo: str  # authority of an echo upstream
    sessions: list[H2Session] = field(default_factory=list)
    accepted: int = 0  # TCP connections, TLS or not


async def echo_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The echo upstream of tests.unit.test_hbone, for tunnels that may be torn down midway."""
    try:
        await echo(reader, writer)
    except ConnectionError:
        writer.close()


@asynccontextmanager
async def hbone_server(certs: CertificateManager, handler: ConnectHandler = to_upstream,
                       **options: float) -> AsyncIterator[Served]:
    """The server, and an echo upstream (`served.echo`) for its tunnels."""
    upstream = await asyncio.start_server(echo_upstream, "127.0.0.1", 0)
    served = Served(HboneServer(handler, **options), ("", 0), hostport(*upstream.sockets[0].getsockname()[:2]))
    tasks: set[asyncio.Task[None]] = set()

    async def serve(conn: socket.socket) -> None:
        try:
            session = await served.server.accept(conn, certs.server_context(SERVER), 5.0)
        except (ssl.SSLError, OSError, TimeoutError):
            return
        served.sessions.append(session)
        await served.server.serve(session)

    def accept_ready() -> None:
        conn, _ = listener.accept()
        served.accepted += 1
        task = asyncio.create_task(serve(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    served.address = listener.getsockname()[:2]
    asyncio.get_running_loop().add_reader(listener, accept_ready)
    try:
        yield served
    finally:
        asyncio.get_running_loop().remove_reader(listener)
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        upstream.close()


async def attacker(certs: CertificateManager, served: Served, preface: bool = True) -> RawPeer:
    return await RawPeer.connect(served.address, certs.client_context(CLIENT), preface)


async def canary_rtts(pool: HboneClientPool, served: Served, certs: CertificateManager,
                      stop: asyncio.Event) -> list[float]:
    """Round trips of 4 bytes through a tunnel every 10 ms until `stop`: seconds each."""
    stream = await pool.open(PoolKey(CLIENT.uri, SERVER.uri, served.address), certs.client_context(CLIENT),
                             served.echo, [], lambda cert: None)
    rtts = []
    while not stop.is_set():
        start = time.monotonic()
        stream.write(b"ping")
        await stream.drain()
        assert await stream.read(4) == b"ping"
        rtts.append(time.monotonic() - start)
        await asyncio.sleep(0.01)
    stream.close()
    return rtts


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ping_settings_flood_is_cut_within_a_second_and_others_keep_going(certs: CertificateManager,
                                                                          loop: str) -> None:
    """1 M PING + SETTINGS frames in 5 s used to cost 26 s of CPU and stall every tunnel: now a
    GOAWAY ENHANCE_YOUR_CALM within 1 s, and a tunnel on another session never waits 200 ms."""
    async def body() -> None:
        async with hbone_server(certs) as served:
            pool = HboneClientPool()
            stop = asyncio.Event()
            canary = asyncio.create_task(canary_rtts(pool, served, certs, stop))
            await asyncio.sleep(0.1)
            peer = await attacker(certs, served)
            block = (PingFrame(0, b"8 bytes!").serialize() + SettingsFrame(0).serialize()) * 5000
            start, sent_frames = time.monotonic(), 0
            while not peer.closed.is_set() and sent_frames < 1_000_000 and time.monotonic() - start < 5:
                peer.send(block)
                sent_frames += 10_000
                await peer.drain()
            await asyncio.wait_for(peer.closed.wait(), 5)
            stop.set()
            rtts = await canary
            assert peer.goaway is not None and peer.goaway.error_code == ENHANCE_YOUR_CALM
            assert peer.goaway_at is not None and peer.goaway_at - start < 1.0
            assert served.server.mitigations["ping_flood"] + served.server.mitigations["settings_flood"] == 1
            assert max(rtts) < 0.2, max(rtts)
            await peer.close()
            await pool.close()

    run(body(), uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop)


async def upstream_counter() -> tuple[asyncio.Server, list[int]]:
    """A TCP server that counts the connections it accepts (the pod behind the ztunnel)."""
    accepted: list[int] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await reader.read()
        writer.close()

    return await asyncio.start_server(hold, "127.0.0.1", 0), accepted


@pytest.mark.parametrize("pace", [0.0, 0.002], ids=["burst", "paced"])
def test_rapid_reset_connects_at_most_max_streams_upstream_and_ends_in_goaway(
        certs: CertificateManager, pace: float) -> None:
    """CVE-2023-44487: 5,000 HEADERS + RST_STREAM pairs used to make 5,000 upstream connects."""
    started: list[int] = []
    cancelled: list[int] = []

    async def connect_upstream(request: ConnectRequest, responder: Responder) -> None:
        started.append(request.stream_id)
        try:
            upstream = await connect_tcp(request.host, request.port, 5.0)
            try:
                await asyncio.sleep(5)  # e.g. a slow policy check: the reset comes meanwhile
                stream = await responder.accept()
                await stream.read(1)
            finally:
                upstream.close()
        except asyncio.CancelledError:
            cancelled.append(request.stream_id)
            raise

    async def body() -> None:
        upstream, connects = await upstream_counter()
        authority = hostport(*upstream.sockets[0].getsockname()[:2])
        async with hbone_server(certs, connect_upstream) as served:
            peer = await attacker(certs, served)
            for i in range(5000 if not pace else 500):
                if peer.closed.is_set():
                    break
                if pace:  # each handler starts (and connects upstream) before its stream's reset
                    peer.send(peer.connect_request(2 * i + 1, authority))
                    await peer.drain()
                    await asyncio.sleep(pace)
                    peer.send(peer.reset(2 * i + 1))
                else:
                    peer.send(peer.connect_request(2 * i + 1, authority) + peer.reset(2 * i + 1))
            await peer.drain()
            await asyncio.wait_for(peer.closed.wait(), 5)
            assert peer.goaway is not None and peer.goaway.error_code == ENHANCE_YOUR_CALM
            assert served.server.mitigations["rapid_reset"] == 1
            assert len(started) <= MAX_CONCURRENT_STREAMS, len(started)
            await asyncio.sleep(0.1)
            assert len(connects) <= MAX_CONCURRENT_STREAMS, len(connects)
            assert set(cancelled) == set(started)  # every handler stopped, none left connecting
            await peer.close()
        upstream.close()

    run(body())


def test_continuation_flood_is_cut_before_a_mebibyte_is_held(certs: CertificateManager) -> None:
    """HEADERS then 1 MiB CONTINUATION frames used to hold 64 MiB per connection, never closed."""
    async def body() -> None:
        async with hbone_server(certs) as served:
            peer = await attacker(certs, served)
            peer.send(SettingsFrame(0, flags=["ACK"]).serialize() * 2)  # our 1 MiB frame size applies
            block = peer.encoder.encode([(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
            peer.send(HeadersFrame(1, block[:4]).serialize())  # no END_HEADERS
            await asyncio.sleep(0.05)
            session, = served.sessions
            held = [0]

            async def watch() -> None:
                while not session.closed:
                    buffer = session.h2.incoming_buffer
                    held.append(len(session._received) + len(buffer._data)
                                + sum(len(f.data) for f in buffer._headers_buffer))
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            continuation = ContinuationFrame(1, b"\x00" * (1024 * 1024 - 1)).serialize()
            for _ in range(64):
                if peer.closed.is_set():
                    break
                peer.send(continuation)
                await peer.drain()
            await asyncio.wait_for(peer.closed.wait(), 5)
            await watcher
            assert peer.goaway is not None and peer.goaway.error_code == ENHANCE_YOUR_CALM
            assert served.server.mitigations["header_block_too_large"] == 1
            assert max(held) < 1024 * 1024, max(held)
            assert max(held) <= MAX_HEADER_BLOCK
            await peer.close()

    run(body())


def test_streams_beyond_the_limit_are_refused_one_by_one(certs: CertificateManager) -> None:
    """2,000 concurrent CONNECTs used to end the whole session with PROTOCOL_ERROR."""
    async def hold(request: ConnectRequest, responder: Responder) -> None:
        stream = await responder.accept()
        await stream.read(1)  # until the client ends or resets it

    async def body() -> None:
        async with hbone_server(certs, hold) as served:
            peer = await attacker(certs, served)
            peer.send(b"".join(peer.connect_request(2 * i + 1, "127.0.0.1:9") for i in range(2000)))
            await peer.drain()
            async with asyncio.timeout(10):
                while len(peer.statuses) + peer.resets(REFUSED_STREAM) < 2000:
                    await asyncio.sleep(0.01)
            assert list(peer.statuses.values()).count("200") == MAX_CONCURRENT_STREAMS
            assert peer.resets(REFUSED_STREAM) == 2000 - MAX_CONCURRENT_STREAMS
            assert served.server.mitigations["refused_stream"] == 2000 - MAX_CONCURRENT_STREAMS
            # The session lives on: a tunnel's end frees its place for a new CONNECT.
            first = min(peer.statuses)
            peer.send(peer.reset(first))
            await asyncio.sleep(0.05)
            peer.send(peer.connect_request(4001, "127.0.0.1:9"))
            async with asyncio.timeout(2):
                while 4001 not in peer.statuses:
                    await asyncio.sleep(0.01)
            assert peer.statuses[4001] == "200"
            assert peer.goaway is None and not peer.closed.is_set()
            await peer.close()

    run(body())


def test_frame_header_above_max_frame_size_is_refused_on_the_header(certs: CertificateManager) -> None:
    """A header announcing 16 MiB used to be answered only after 720 KiB of its body."""
    async def body() -> None:
        async with hbone_server(certs) as served:
            peer = await attacker(certs, served)
            peer.send(SettingsFrame(0, flags=["ACK"]).serialize() * 2)
            start = time.monotonic()
            peer.send(frame_header(16 * 1024 * 1024 - 1, 0x0, 0, 1) + b"\x00" * 1024)  # DATA, 1 KiB of it
            await peer.drain()
            await asyncio.wait_for(peer.closed.wait(), 2)
            assert peer.goaway is not None and peer.goaway.error_code == FRAME_SIZE_ERROR
            assert peer.goaway_at is not None and peer.goaway_at - start < 0.5
            assert served.server.mitigations["frame_too_large"] == 1
            await peer.close()

    run(body())


@pytest.mark.parametrize("deadline", ["preface_timeout", "idle_timeout"])
def test_server_sessions_end_at_their_deadlines(certs: CertificateManager, deadline: str) -> None:
    """mTLS connections that never sent the HTTP/2 preface used to stay open indefinitely; so
    did sessions without streams."""
    async def body() -> None:
        async with hbone_server(certs, **{deadline: 0.5}) as served:
            start = time.monotonic()
            peer = await attacker(certs, served, preface=deadline == "idle_timeout")
            if deadline == "idle_timeout":
                peer.send(peer.connect_request(1, served.echo) + peer.reset(1))
            await asyncio.wait_for(peer.closed.wait(), 2)
            assert 0.4 < time.monotonic() - start < 1.5
            assert served.server.mitigations[deadline] == 1
            if deadline == "idle_timeout":
                assert peer.goaway is not None and peer.goaway.error_code == NO_ERROR
            await peer.close()

    run(body())


def _rss() -> int:
    """Bytes of this process resident in memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_connections_before_tls_cost_little_memory(certs: CertificateManager) -> None:
    """Each TCP connection to 15008 used to allocate the session's 256 KiB read buffer before
    its TLS handshake (500 silent connections: +159 MiB)."""
    async def body() -> None:
        async with hbone_server(certs) as served:
            rss = _rss()
            tracemalloc.start()
            try:
                before = tracemalloc.take_snapshot()
                clients = [await asyncio.open_connection(*served.address) for _ in range(500)]
                async with asyncio.timeout(5):
                    while served.accepted < 500:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # every accept() under way, waiting for a ClientHello
                ours = [tracemalloc.Filter(True, "*/ztunnel/*"), tracemalloc.Filter(True, "*/h2/*")]
                grown = tracemalloc.take_snapshot().filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
            finally:
                tracemalloc.stop()
            size = sum(stat.size_diff for stat in grown)
            assert size < 500 * 16 * 1024, size  # was 500 x 256 KiB in one line alone
            assert _rss() - rss < 20 * 1024 * 1024, _rss() - rss
            for _, writer in clients:
                writer.close()

    run(body(), uvloop.new_event_loop)  # the agent's loop: asyncio's own TLS costs 256 KiB each


def test_busy_session_grows_its_buffer_and_gives_it_back(certs: CertificateManager) -> None:
    async def body() -> None:
        async with hbone_server(certs) as served:
            pool = HboneClientPool()
            stream = await pool.open(PoolKey(CLIENT.uri, SERVER.uri, served.address), certs.client_context(CLIENT),
                                     served.echo, [], lambda cert: None)
            session, = served.sessions
            assert session._read_map is None  # the handshake and a CONNECT fit the small one
            payload = b"x" * (4 * 1024 * 1024)
            stream.write(payload)
            received = bytearray()
            while len(received) < len(payload):
                received += await stream.read(1 << 20)
            assert session._read_map is not None
            stream.close()
            await pool.close()
            await session.wait_closed()
            assert session._read_map is None and session._read_buffer is None

    run(body())


def test_end_stream_connects_are_all_answered_and_every_handler_ends(certs: CertificateManager) -> None:
    """CONNECT with END_STREAM, refused (as to a non-local authority): 450 of 500 were answered,
    the other handlers died on an h2 error (closing, then resetting, a closed stream) and their
    records never ended, 500 task exceptions unretrieved (run() fails on any)."""
    ended: list[int] = []

    async def refuse_or_accept(request: ConnectRequest, responder: Responder) -> None:
        try:
            if request.stream_id % 4 == 1:
                responder.reject(400, f"{request.authority} is not a workload on this node")
            else:
                stream = await responder.accept()
                assert await stream.read(10) == b""  # the client ended its side with the CONNECT
        finally:
            ended.append(request.stream_id)

    async def body() -> None:
        async with hbone_server(certs, refuse_or_accept) as served:
            peer = await attacker(certs, served)
            for i in range(500):
                peer.send(peer.connect_request(2 * i + 1, "10.9.9.9:80", end_stream=True))
                if i % 50 == 49:
                    await peer.drain()
                    await asyncio.sleep(0.01)  # within MAX_CONCURRENT_STREAMS at a time
            async with asyncio.timeout(5):
                while len(peer.statuses) < 500 or len(ended) < 500:
                    await asyncio.sleep(0.01)
            assert sorted(peer.statuses.values()) == ["200"] * 250 + ["400"] * 250
            assert sorted(ended) == [2 * i + 1 for i in range(500)]
            assert peer.goaway is None
            await peer.close()

    run(body())


def test_client_reset_before_the_answer_cancels_the_handler(certs: CertificateManager) -> None:
    cancelled = asyncio.Event()

    async def slow(request: ConnectRequest, responder: Responder) -> None:
        try:
            await asyncio.sleep(10)  # e.g. an upstream connect that hangs
        except asyncio.CancelledError:
            cancelled.set()
            raise
        responder.reject(503, "never")

    async def body() -> None:
        async with hbone_server(certs, slow) as served:
            peer = await attacker(certs, served)
            peer.send(peer.connect_request(1, "127.0.0.1:9"))
            await asyncio.sleep(0.05)
            peer.send(peer.reset(1))
            await asyncio.wait_for(cancelled.wait(), 1)
            assert served.sessions[0].handlers == {}
            assert not peer.closed.is_set()
            await peer.close()

    run(body())


def test_refused_connects_write_at_most_64x_their_wire_size_to_the_log(
        certs: CertificateManager, caplog: pytest.LogCaptureFixture) -> None:
    """1,000 refused CONNECTs with a 4 KB HPACK-indexed :authority wrote 23.6 MiB of logs (1,830x)."""
    async def body() -> None:
        async with hbone_server(certs) as served:
            peer = await attacker(certs, served)
            # no port: refused (400) before any handler; 4,000 bytes still fit the HPACK table
            authority = "a" * 4000
            for i in range(1000):
                peer.send(peer.connect_request(2 * i + 1, authority))
                if i % 50 == 49:
                    await peer.drain()
                    await asyncio.sleep(0.005)
            async with asyncio.timeout(5):
                while len(peer.statuses) < 1000:
                    await asyncio.sleep(0.01)
            assert set(peer.statuses.values()) == {"400"}
            wire = peer.sent
            await peer.close()
        logged = sum(len(record.getMessage()) + 100 for record in caplog.records)  # +100: a line's prefix
        assert logged <= 64 * wire, (logged, wire)

    with caplog.at_level(logging.DEBUG, logger="amesh.ztunnel.hbone"):
        run(body())
