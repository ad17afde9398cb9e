"""HBONE on loopback: CONNECT tunnels over mutual TLS 1.3 between an HboneClientPool and an
HboneServer, with certificates from ztunnel.identity.

The server's default handler does what an inbound ztunnel does: connect to the requested
upstream (a TCP echo or "reply after EOF" server here) and splice it to the tunnel stream.
"""

from __future__ import annotations

import asyncio
import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Coroutine, Iterator

import pytest
import uvloop

from ztunnel.hbone import (
    STREAM_WINDOW,
    ConnectHandler,
    ConnectRequest,
    HboneClientPool,
    HboneError,
    HboneServer,
    H2Session,
    HboneStream,
    PeerVerifier,
    PoolKey,
    Responder,
    forwarded_for,
    hostport,
    parse_authority,
    parse_forwarded_for,
    traceparent,
)
from ztunnel.identity import (
    CertificateManager,
    FileCA,
    Identity,
    expect_identity,
    peer_identity,
)
from ztunnel.streams import ConnectError, connect_tcp, splice

from tests.unit.h2peer import FakeTransport

TRUST_DOMAIN = "cluster.local"
CLIENT = Identity(TRUST_DOMAIN, "shop", "frontend")
SERVER = Identity(TRUST_DOMAIN, "shop", "cart")
TEST_TIMEOUT = 10.0  # seconds per test body: a hang fails the test instead of stalling the run
CHUNK = 64 * 1024  # bytes per client write


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
loop_factory = LOOPS["asyncio"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on both event loops the agent can run on (`--event-loop`)."""
    global loop_factory
    loop_factory = LOOPS[request.param]
    yield
    loop_factory = LOOPS["asyncio"]


def run(body: Coroutine[None, None, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(body, TEST_TIMEOUT))


def accept_any(cert_der: bytes | None) -> None:
    """A verify_peer that takes any certificate the TLS context validated."""


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Pure parts: no sockets -------------------------------------------------------------------


@pytest.mark.parametrize("authority, expected", [
    ("10.244.2.10:8080", ("10.244.2.10", 8080)),
    ("[fd00::1]:443", ("fd00::1", 443)),
    ("cart.shop:1", ("cart.shop", 1)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
])
def test_parse_authority(authority: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority) == expected
    assert hostport(*expected) == authority


@pytest.mark.parametrize("authority", [
    "", "10.0.0.1", "10.0.0.1:", ":80", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:8o",
    "fd00::1:80", "[fd00::1]", "10.0.0.1:+80", "10.0.0.1:٨٠",
])
def test_parse_authority_rejects(authority: str) -> None:
    with pytest.raises(ValueError, match="expected host:port with port 1-65535"):
        parse_authority(authority)


def test_connect_request_parse() -> None:
    headers = [(":method", "CONNECT"), (":authority", "10.0.0.5:8080"), ("traceparent", "00-x")]
    request = ConnectRequest.parse(headers, stream_id=3)
    assert (request.host, request.port, request.stream_id) == ("10.0.0.5", 8080, 3)
    assert request.headers == {"traceparent": "00-x"}
    with pytest.raises(ValueError, match="only CONNECT, not GET"):
        ConnectRequest.parse([(":method", "GET"), (":authority", "a:1"), (":path", "/")], 1)
    with pytest.raises(ValueError, match="invalid :authority"):
        ConnectRequest.parse([(":method", "CONNECT")], 1)


def test_traceparent_is_random_w3c() -> None:
    first, second = traceparent(), traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first)
    assert first != second


def test_forwarded_for() -> None:
    assert forwarded_for("10.244.1.10") == "for=10.244.1.10"
    assert forwarded_for("::1") == 'for="[::1]"'
    with pytest.raises(ValueError):
        forwarded_for("not-an-ip")


@pytest.mark.parametrize("value, ip", [
    ("for=10.244.1.10", "10.244.1.10"),
    ('for="[fd00::7]"', "fd00::7"),
    ("proto=https; For=10.0.0.2;by=10.0.0.9, for=10.0.0.3", "10.0.0.2"),  # the first hop only
    ("for=unknown", None),
    ("for=_hidden", None),
    ("by=10.0.0.9", None),
    ("", None),
])
def test_parse_forwarded_for(value: str, ip: str | None) -> None:
    assert parse_forwarded_for(value) == ip


def test_forwarded_round_trip() -> None:
    for ip in ("10.244.1.10", "::1", "fd00::1:2"):
        assert parse_forwarded_for(forwarded_for(ip)) == ip


# --- Over mutual TLS on loopback ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateManager:
    manager = CertificateManager(FileCA.load_or_create(tmp_path_factory.mktemp("ca")))
    manager.set_identities([CLIENT, SERVER])
    return manager


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say nothing until the client has finished sending, then report how much arrived."""
    received = await reader.read()
    writer.write(b"got %d bytes" % len(received))
    writer.close()


async def to_upstream(request: ConnectRequest, responder: Responder) -> None:
    """What an inbound ztunnel does: connect to the requested upstream and splice."""
    try:
        upstream = await connect_tcp(request.host, request.port, 5.0)
    except ConnectError as e:
        responder.reject(503, str(e))
        return
    try:
        await splice(await responder.accept(), upstream, lambda n: None, lambda n: None)
    finally:
        upstream.close()


@dataclass
class Mesh:
    """One client pool and one HBONE server, plus upstreams behind the server."""

    certs: CertificateManager
    pool: HboneClientPool
    key: PoolKey
    echo: str  # authority of the echo upstream
    reply_after_eof: str
    requests: list[ConnectRequest] = field(default_factory=list)
    connections: set[asyncio.Task[None]] = field(default_factory=set)  # live serve() calls

    async def open(self, authority: str | None = None, verify_peer: PeerVerifier = accept_any) -> HboneStream:
        headers = [("forwarded", forwarded_for("127.0.0.1")), ("traceparent", traceparent())]
        return await self.pool.open(
            self.key, self.certs.client_context(CLIENT), authority or self.echo, headers, verify_peer
        )


@asynccontextmanager
async def mesh(
    certs: CertificateManager, handler: ConnectHandler = to_upstream, **pool_options: float
) -> AsyncIterator[Mesh]:
    upstreams = [await asyncio.start_server(serve, "127.0.0.1", 0) for serve in (echo, reply_after_eof)]
    upstream_authorities = [hostport(*s.sockets[0].getsockname()[:2]) for s in upstreams]

    async def record(request: ConnectRequest, responder: Responder) -> None:
        world.requests.append(request)
        await handler(request, responder)

    hbone = HboneServer(record)

    async def serve(conn: socket.socket) -> None:
        session = await hbone.accept(conn, certs.server_context(SERVER), 5.0)
        await hbone.serve(session)

    def accept_ready() -> None:
        # Each connection served in a task of its own, so a test can cancel it.
        conn, _ = listener.accept()
        task = asyncio.create_task(serve(conn))
        world.connections.add(task)
        task.add_done_callback(world.connections.discard)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    asyncio.get_running_loop().add_reader(listener, accept_ready)
    pool = HboneClientPool(**pool_options)
    key = PoolKey(CLIENT.uri, SERVER.uri, listener.getsockname()[:2])
    world = Mesh(certs, pool, key, *upstream_authorities)
    try:
        yield world
    finally:
        await pool.close()
        asyncio.get_running_loop().remove_reader(listener)
        listener.close()
        for s in upstreams:
            s.close()
        for task in list(world.connections):
            task.cancel()
        await asyncio.gather(*world.connections, return_exceptions=True)


async def send_all(stream: HboneStream, payload: bytes) -> None:
    for i in range(0, len(payload), CHUNK):
        stream.write(payload[i:i + CHUNK])
        await stream.drain()
    stream.write_eof()


async def read_all(stream: HboneStream) -> bytes:
    received = bytearray()
    while data := await stream.read(1024 * 1024):
        received += data
    return bytes(received)


async def echo_through(stream: HboneStream, payload: bytes) -> bytes:
    """Sends payload and EOF while reading the echo back, as two concurrent directions."""
    sender = asyncio.create_task(send_all(stream, payload))
    received = await read_all(stream)
    await sender
    return received


@pytest.mark.parametrize("size", [1, 64 * 1024, 32 * 1024 * 1024], ids=["1B", "64KiB", "32MiB"])
def test_echo_intact_both_ways(certs: CertificateManager, size: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(min(size, 65521))) * (size // 65521 + 1)
    payload = payload[:size]

    async def body() -> None:
        async with mesh(certs) as world:
            stream = await world.open()
            assert await echo_through(stream, payload) == payload  # 32 MiB: 8x the stream window
            stream.close()
            assert world.pool.handshakes == 1
            request, = world.requests
            assert request.authority == world.echo
            assert request.headers["forwarded"] == "for=127.0.0.1"
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", request.headers["traceparent"])
            assert peer_identity(request.peer_cert, TRUST_DOMAIN) == CLIENT

    run(body())


def test_half_close_server_replies_after_eof(certs: CertificateManager) -> None:
    async def body() -> None:
        async with mesh(certs) as world:
            stream = await world.open(world.reply_after_eof)
            stream.write(b"hello")
            await stream.drain()
            stream.write_eof()
            assert await read_all(stream) == b"got 5 bytes"
            stream.close()

    run(body())


def test_sequential_opens_reuse_one_session(certs: CertificateManager) -> None:
    async def body() -> None:
        async with mesh(certs) as world:
            for i in range(100):
                stream = await world.open()
                assert await echo_through(stream, b"%d" % i) == b"%d" % i
                stream.close()
            assert (world.pool.handshakes, world.pool.sessions) == (1, 1)
            assert len(world.requests) == 100

    run(body())


def test_concurrent_first_opens_share_one_handshake(certs: CertificateManager) -> None:
    async def body() -> None:
        async with mesh(certs) as world:
            streams = await asyncio.gather(*(world.open() for _ in range(20)))
            assert (world.pool.handshakes, world.pool.sessions) == (1, 1)
            assert len({s.stream_id for s in streams}) == 20
            for stream in streams:
                stream.close()

    run(body())


def test_concurrent_streams_share_one_session(certs: CertificateManager) -> None:
    payloads = [bytes([i]) * (256 * 1024 + i) for i in range(20)]

    async def one(world: Mesh, payload: bytes) -> bytes:
        stream = await world.open()
        try:
            return await echo_through(stream, payload)
        finally:
            stream.close()

    async def body() -> None:
        async with mesh(certs) as world:
            await one(world, b"warm")
            assert await asyncio.gather(*(one(world, p) for p in payloads)) == payloads
            assert (world.pool.handshakes, world.pool.sessions) == (1, 1)

    run(body())


def test_full_session_opens_another(certs: CertificateManager) -> None:
    async def hold(request: ConnectRequest, responder: Responder) -> None:
        await responder.accept()
        await asyncio.Event().wait()

    async def body() -> None:
        async with mesh(certs, hold) as world:
            # The server (h2's default) allows 100 concurrent streams per connection.
            streams = await asyncio.gather(*(world.open() for _ in range(120)))
            assert (world.pool.handshakes, world.pool.sessions) == (2, 2)
            assert sorted(s.stream_id for s in streams)[:3] == [1, 1, 3]  # two connections' streams
            for stream in streams:
                stream.close()

    run(body())


async def never_answers(request: ConnectRequest, responder: Responder) -> None:
    return None


async def fails(request: ConnectRequest, responder: Responder) -> None:
    raise RuntimeError("handler bug")


@pytest.mark.parametrize("handler, authority, status, reason", [
    (to_upstream, "127.0.0.1:{free}", 503, "upstream 127.0.0.1:{free} refused"),
    (never_answers, None, 503, "did not answer CONNECT"),
    (fails, None, 503, "failed handling CONNECT"),
    (to_upstream, "no-port", 400, "invalid :authority 'no-port'"),
    (to_upstream, "127.0.0.1:0", 400, "port 1-65535"),
], ids=["upstream-refused", "handler-silent", "handler-raises", "no-port", "port-0"])
def test_refused_connect_is_status_error(
    certs: CertificateManager, handler: ConnectHandler, authority: str | None, status: int, reason: str
) -> None:
    free = free_port()

    async def body() -> None:
        async with mesh(certs, handler) as world:
            with pytest.raises(HboneError) as caught:
                await world.open(authority and authority.format(free=free))
            assert (caught.value.reason, caught.value.status) == ("status", status)
            assert "answered CONNECT" in str(caught.value)
            assert reason.format(free=free) in str(caught.value)
            if status == 400:
                assert world.requests == []  # the handler never saw it
            # A refused stream does not cost the session.
            assert (world.pool.handshakes, world.pool.sessions) == (1, 1)

    run(body())


def test_peer_rejected_opens_no_stream(certs: CertificateManager) -> None:
    def expect_other(cert_der: bytes | None) -> None:
        expect_identity(peer_identity(cert_der, TRUST_DOMAIN), Identity(TRUST_DOMAIN, "shop", "payments"))

    async def body() -> None:
        async with mesh(certs) as world:
            with pytest.raises(HboneError) as caught:
                await world.open(verify_peer=expect_other)
            assert caught.value.reason == "peer_rejected"
            expected = f"{SERVER} but spiffe://cluster.local/ns/shop/sa/payments was expected"
            assert expected in str(caught.value)
            assert world.pool.sessions == 0
            await asyncio.sleep(0.05)
            assert world.requests == []

    run(body())


def test_untrusted_server_is_tls_error(certs: CertificateManager, tmp_path: Path) -> None:
    stranger = CertificateManager(FileCA.load_or_create(tmp_path))  # another root CA
    stranger.set_identities([CLIENT])

    async def body() -> None:
        async with mesh(certs) as world:
            pool = HboneClientPool()
            with pytest.raises(HboneError) as caught:
                await pool.open(world.key, stranger.client_context(CLIENT), world.echo, [], accept_any)
            assert caught.value.reason == "tls"
            assert "do both nodes trust the same mesh CA?" in str(caught.value)
            assert pool.sessions == 0
            await pool.close()

    run(body())


def test_connect_refused(certs: CertificateManager) -> None:
    async def body() -> None:
        pool = HboneClientPool()
        key = PoolKey(CLIENT.uri, SERVER.uri, ("127.0.0.1", free_port()))
        with pytest.raises(HboneError) as caught:
            await pool.open(key, certs.client_context(CLIENT), "10.0.0.1:80", [], accept_any)
        assert caught.value.reason == "connect_refused"
        assert f"HBONE connect to 127.0.0.1:{key.address[1]} refused" in str(caught.value)
        assert (pool.handshakes, pool.sessions) == (0, 0)
        await pool.close()

    run(body())


def test_server_abort_resets_client_stream(certs: CertificateManager) -> None:
    async def abort_after_one_byte(request: ConnectRequest, responder: Responder) -> None:
        stream = await responder.accept()
        await stream.read(1)
        stream.abort()

    async def body() -> None:
        async with mesh(certs, abort_after_one_byte) as world:
            stream = await world.open()
            stream.write(b"x")
            await stream.drain()
            with pytest.raises(ConnectionResetError, match=r"reset by 127\.0\.0\.1:\d+ \(CANCEL\)"):
                await stream.read(10)
            with pytest.raises(ConnectionResetError):
                await stream.drain()
            stream.close()
            await world.open()  # the session outlives the stream
            assert world.pool.handshakes == 1

    run(body())


def test_connection_loss_fails_streams_and_leaves_pool(certs: CertificateManager) -> None:
    async def hold(request: ConnectRequest, responder: Responder) -> None:
        await responder.accept()
        await asyncio.Event().wait()

    async def body() -> None:
        async with mesh(certs, hold) as world:
            streams = [await world.open() for _ in range(3)]
            connection, = world.connections
            connection.cancel()  # serve() ends: GOAWAY, and the connection closes
            for stream in streams:
                with pytest.raises(ConnectionResetError, match="GOAWAY"):
                    await stream.read(10)
            assert world.pool.sessions == 0
            await world.open()
            assert world.pool.handshakes == 2

    run(body())


def test_idle_session_expires(certs: CertificateManager) -> None:
    async def body() -> None:
        async with mesh(certs, idle_timeout=0.2) as world:
            stream = await world.open()
            assert await echo_through(stream, b"once") == b"once"
            stream.close()
            await asyncio.sleep(0.1)
            assert world.pool.sessions == 1  # not idle long enough yet
            await asyncio.sleep(0.3)
            assert world.pool.sessions == 0
            assert not world.connections  # the server saw the GOAWAY and the close
            stream = await world.open()
            assert (world.pool.handshakes, world.pool.sessions) == (2, 1)
            stream.close()

    run(body())


async def write_until_stalled(stream: HboneStream) -> int:
    """Writes until drain() stalls for 0.3 s (or 4 windows went out); the bytes written."""
    written = 0
    while written < 4 * STREAM_WINDOW:
        stream.write(b"z" * CHUNK)
        written += CHUNK
        try:
            await asyncio.wait_for(stream.drain(), 0.3)
        except TimeoutError:
            break
    return written


def test_slow_reader_backpressures_writer(certs: CertificateManager) -> None:
    release = asyncio.Event()
    received = bytearray()

    async def stalled(request: ConnectRequest, responder: Responder) -> None:
        stream = await responder.accept()
        await release.wait()
        received.extend(await read_all(stream))
        stream.write_eof()

    async def body() -> None:
        async with mesh(certs, stalled) as world:
            stream = await world.open()
            written = await write_until_stalled(stream)
            # The peer's stream window is all that may be in flight, plus the write that waits.
            assert STREAM_WINDOW <= written <= STREAM_WINDOW + CHUNK, written
            release.set()
            await stream.drain()
            stream.write_eof()
            assert await stream.read(1) == b""
            assert len(received) == written

    run(body())


def test_slow_upstream_backpressures_the_tunnel_through_splice(certs: CertificateManager) -> None:
    """The server side splices the tunnel to a TCP upstream that does not read: its full socket
    pauses the tunnel stream, whose unacknowledged bytes close the client's window."""
    release = asyncio.Event()
    received = bytearray()

    async def stalled_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        received.extend(await reader.read())
        writer.close()

    async def body() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited on accept
        upstream = await asyncio.start_server(stalled_upstream, sock=listener)
        async with mesh(certs) as world:
            stream = await world.open(hostport(*listener.getsockname()[:2]))
            written = await write_until_stalled(stream)
            # the window, the proxy's socket send buffer (at most 4 MiB) and little else
            assert STREAM_WINDOW <= written <= 2 * STREAM_WINDOW + 512 * 1024, written
            release.set()
            await stream.drain()
            stream.write_eof()
            assert await stream.read(1) == b""
        upstream.close()
        assert len(received) == written

    run(body())


@pytest.mark.parametrize("piece", [1, 7, 9, 1000, 1 << 20], ids=lambda n: f"{n}B-reads")
def test_received_frames_split_anywhere_reach_the_stream(piece: int) -> None:
    """DATA frames cut out of the byte stream by the session, and DATA that h2 parses (padded,
    END_STREAM), arrive in order whatever the read boundaries; both charge the receive window."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from ztunnel.hbone import H2Session

    async def body() -> None:
        requests: list[HboneStream] = []
        session = H2Session(client_side=False, on_request=lambda stream, headers: requests.append(stream))
        session.connection_made(FakeTransport())  # type: ignore[arg-type]
        session.h2.initiate_connection()
        peer = H2Connection(H2Configuration(client_side=True))
        peer.initiate_connection()
        peer.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        peer.send_data(1, b"a" * 1000)
        peer.send_data(1, b"b" * 100, pad_length=10)  # 111 flow-controlled bytes
        peer.send_data(1, b"")
        peer.send_data(1, b"c" * 500)
        peer.send_data(1, b"d" * 10, end_stream=True)
        wire = peer.data_to_send()
        done = 0
        while done < len(wire):
            # as a transport reads: into the session's one buffer, overwritten by every read
            buffer = session.get_buffer(-1)
            chunk = wire[done:done + min(piece, len(buffer))]
            buffer[:len(chunk)] = chunk
            session.buffer_updated(len(chunk))
            buffer[:len(chunk)] = b"\xff" * len(chunk)
            done += len(chunk)
        stream, = requests
        assert bytes(stream._inbound) == b"a" * 1000 + b"b" * 100 + b"c" * 500 + b"d" * 10
        assert stream._remote_ended and not session._received
        window = session.h2._inbound_flow_control_window_manager.current_window_size
        assert window == 65_535 - (1000 + 111 + 500 + 10)

    run(body())


def test_graceful_goaway_keeps_open_streams_and_sends_new_ones_to_a_fresh_session(certs: CertificateManager) -> None:
    sessions: list[H2Session] = []

    async def remember_session(request: ConnectRequest, responder: Responder) -> None:
        sessions.append(responder._session)
        await to_upstream(request, responder)

    async def body() -> None:
        async with mesh(certs, remember_session) as world:
            old = await world.open()
            old.write(b"before ")
            await old.drain()
            sessions[0].go_away()  # the server's agent drains
            await asyncio.sleep(0.05)
            assert world.pool.sessions == 0  # no new stream goes on the session going away
            new = await world.open()
            assert world.pool.handshakes == 2 and sessions[1] is not sessions[0]
            assert await echo_through(new, b"new") == b"new"
            new.close()
            # the stream open before the GOAWAY runs to its end, intact
            assert await echo_through(old, b"after") == b"before after"
            old.close()
            await asyncio.sleep(0.05)
            assert sessions[0].closed and not sessions[1].closed  # closed once its last stream ended
            assert len(world.connections) == 1

    run(body())
