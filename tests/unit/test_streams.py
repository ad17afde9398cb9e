"""TcpStream and splice on loopback: Nagle off, and the kernel path between two sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest
import uvloop

from registry.model import RegistryState
from tests.unit.descriptors import descriptors_exhausted
from ztunnel.authz import Authorizer
from ztunnel.connections import ConnectionTable
from ztunnel.server import CapturedListener
from ztunnel.streams import ConnectError, TcpStream, connect_tcp, splice

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop: str, body) -> None:  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(body(), 20))


async def pair(listener: socket.socket) -> tuple[socket.socket, TcpStream]:
    """(our end, the proxy's TcpStream) of one loopback connection through `listener`."""
    loop = asyncio.get_running_loop()
    ours = socket.socket()
    ours.setblocking(False)
    await loop.sock_connect(ours, listener.getsockname())
    theirs, _ = await loop.sock_accept(listener)
    return ours, TcpStream(theirs)


async def spliced() -> tuple[socket.socket, socket.socket, TcpStream, TcpStream, socket.socket]:
    """A client and a server socket joined by two TcpStreams, as the proxy holds them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client, client_side = await pair(listener)
    upstream = await connect_tcp(*listener.getsockname()[:2], 5.0)
    server, _ = await asyncio.get_running_loop().sock_accept(listener)
    return client, server, client_side, upstream, listener


async def send_then_eof(sock: socket.socket, payload: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, payload)
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while data := await asyncio.get_running_loop().sock_recv(sock, 1 << 20):
        received += data
    return bytes(received)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_accepted_and_connected_sockets_send_small_writes_at_once(loop: str) -> None:
    """TCP_NODELAY on every socket the ztunnel accepts or connects: without it an HBONE frame or
    a short reply waits for the peer's delayed ACK (40 ms per exchange, measured)."""
    async def body() -> None:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(CapturedListener):
            async def serve_connection(self, conn: socket.socket, peer: tuple[str, int],
                                       destination: tuple[str, int]) -> None:
                accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                conn.close()

        listener = socket.create_server(("127.0.0.1", 0))
        probe = Probe(RegistryState, ConnectionTable(), Authorizer())
        await probe.start(listener)
        upstream = await connect_tcp(*listener.getsockname()[:2], 5.0)
        assert upstream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert await asyncio.wait_for(accepted, 5) == 1
        upstream.close()
        await probe.close()

    run(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_kernel_splice_carries_both_directions_intact_with_half_close(loop: str) -> None:
    up, down = os.urandom(8 * 1024 * 1024 + 3), os.urandom(3 * 1024 * 1024 + 5)

    async def body() -> None:
        client, server, client_side, upstream, listener = await spliced()
        sent, received = [], []
        relay = asyncio.create_task(splice(client_side, upstream, sent.append, received.append))

        async def server_side() -> bytes:  # replies only after the client's EOF arrived
            got = await read_to_eof(server)
            await send_then_eof(server, down)
            return got

        served, _, got = await asyncio.gather(server_side(), send_then_eof(client, up), read_to_eof(client))
        assert served == up and got == down
        assert await relay == "closed"
        assert (sum(sent), sum(received)) == (len(up), len(down))
        # the kernel moved the bytes: neither socket was ever handed to an asyncio stream
        assert not client_side.opened and not upstream.opened
        for sock in (client, server, client_side.sock, upstream.sock, listener):
            sock.close()

    run(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_kernel_splice_waits_for_a_full_receiver_without_spinning(loop: str) -> None:
    """A receiver that stops reading fills the sink socket: the relay waits for it to be writable
    (not polling, and not watching its source meanwhile), then delivers everything."""
    payload = os.urandom(8 * 1024 * 1024)

    async def body() -> None:
        client, server, client_side, upstream, listener = await spliced()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        relay = asyncio.create_task(splice(client_side, upstream, lambda n: None, lambda n: None))
        sending = asyncio.create_task(send_then_eof(client, payload))
        await asyncio.sleep(0.2)  # the server reads nothing: every buffer on the way fills up
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.2, "the relay spun while the receiver was full"
        assert await read_to_eof(server) == payload
        await sending
        server.shutdown(socket.SHUT_WR)
        assert await read_to_eof(client) == b""
        assert await relay == "closed"
        for sock in (client, server, client_side.sock, upstream.sock, listener):
            sock.close()

    run(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_kernel_splice_passes_a_reset_on(loop: str) -> None:
    async def body() -> None:
        client, server, client_side, upstream, listener = await spliced()
        relay = asyncio.create_task(splice(client_side, upstream, lambda n: None, lambda n: None))
        await asyncio.get_running_loop().sock_sendall(client, b"hello")
        assert await asyncio.get_running_loop().sock_recv(server, 5) == b"hello"
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()  # RST
        assert (await relay).startswith("upstream reset")
        with pytest.raises(ConnectionResetError):
            await read_to_eof(client)
        for sock in (client, listener):
            sock.close()

    run(loop, body)


def test_out_of_descriptors_a_connect_fails_with_a_reason_the_ztunnel_owns() -> None:
    """EMFILE when the upstream socket is made is our fault, not the upstream's: a ConnectError
    with reason "resources" (counted, the client reset), never a raw OSError escaping the path."""
    async def body() -> None:
        with descriptors_exhausted(8), pytest.raises(ConnectError) as failed:  # no descriptor for a socket
            await connect_tcp("127.0.0.1", 9, 1.0)
        assert failed.value.reason == "resources" and "Too many open files" in str(failed.value)
        assert failed.value.info.fault == "local"

    asyncio.run(body())
