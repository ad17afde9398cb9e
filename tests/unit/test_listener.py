"""The ztunnel's listening sockets: what asyncio does with the connections they accept."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ztunnel.listener import transparent_listener


def test_accepted_connections_send_small_writes_at_once():
    """TCP_NODELAY on accepted sockets: without it an HBONE frame or a short reply waits for the
    peer's delayed ACK (40 ms per exchange, measured)."""
    try:
        listener = transparent_listener(0, host="127.0.0.1")
    except PermissionError:
        pytest.skip("IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)")

    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_accept, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
            return nodelay

    assert asyncio.run(main()) == 1
