"""OutboundProxy on loopback: splicing, byte counts, half-close, failures, balancing, draining.

The proxy listens on a plain 127.0.0.1 socket, so the accepted socket's local address is the
listener itself; each test injects the "original destination" a BPF capture would have given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from registry.model import Endpoint, RegistryState, Service, ServicePort, TrafficPolicy, Workload
from tests.unit.descriptors import descriptors_exhausted
from ztunnel.authz import Authorizer
from ztunnel.connections import ConnectionRecord, ConnectionTable
from ztunnel.errors import ProxyError
from ztunnel.hbone import HboneClientPool
from ztunnel.identity import CertificateManager, FileCA
from ztunnel.outbound import MeshTransport, OutboundProxy
from ztunnel.listener import NodeAddresses
from ztunnel.logbound import LOG_BURST
from ztunnel.routing import LoopError, Plan, Router, Upstream, guard_self_loop

VIP = "10.96.0.10"
OWN_PORTS = frozenset({15000, 15001})
NODE_ADDRESSES = frozenset({"127.0.0.1", "192.0.2.1"})
CLIENT = Workload(name="client", namespace="shop", ip="127.0.0.1", node="n1", enrolled=True)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tagged_echo(tag: bytes) -> Handler:
    """Echo everything, then after the client's EOF send `tag` and close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(tag)
            await writer.drain()
        except ConnectionResetError:
            pass  # the proxy resets upstreams of the connections it cancels
        writer.close()

    return handle


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say nothing until the client has finished sending, then report how much arrived."""
    received = await reader.read()
    writer.write(b"got %d bytes" % len(received))
    await writer.drain()
    writer.close()


async def reset_on_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reset the connection as soon as anything arrives."""
    await reader.read(1)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bed:
    """Upstream servers, a registry with one Service over them, a proxy, and its table."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.table = ConnectionTable()
        self.proxy: OutboundProxy | None = None
        self.tmp = tempfile.TemporaryDirectory()

    async def serve(self, handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def start_proxy(self, upstream_ports: list[int], dst_port: int = 80, source: Workload = CLIENT,
                          destination: tuple[str, int] | None = None, attempts: int = 3,
                          rate: float | None = None, max_connections: int | None = None) -> tuple[str, int]:
        """The proxy's address; it sees every connection as captured from `source` (its IP is
        what the registry says about 127.0.0.1) to `destination` (default: the Service)."""
        service = Service(
            name="web",
            namespace="shop",
            cluster_ip=VIP,
            ports=(ServicePort(port=80, target_port="http", name="http"),),
            endpoints=tuple(
                Endpoint(ip="127.0.0.1", ports={"http": p}, workload=f"shop/web-{i}")
                for i, p in enumerate(upstream_ports)
            ),
            traffic=TrafficPolicy(connect_attempts=attempts, connection_rate=rate, max_connections=max_connections),
        )
        state = RegistryState(workloads=(source,), services=(service,))
        certs = CertificateManager(FileCA.load_or_create(Path(self.tmp.name) / "ca"))
        transport = MeshTransport("n1", certs, HboneClientPool())
        self.proxy = OutboundProxy(
            lambda: state, self.table, Authorizer(), transport, OWN_PORTS, lambda: NODE_ADDRESSES, connect_timeout=2.0,
            original_destination=lambda _: destination or (VIP, dst_port)
        )
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        await self.proxy.start(listener)
        return self.proxy.address

    async def finish(self) -> list[ConnectionRecord]:
        """Close the proxy (waiting for its connections) and servers; the closed records, oldest first."""
        if self.proxy is not None:
            await self.proxy.close(grace=2.0)
        for server in self.servers:
            server.close()
            await server.wait_closed()
        self.tmp.cleanup()
        assert self.table.live() == []
        return self.table.recent()[::-1]


def run(test: Callable[[Bed], Awaitable[None]]) -> None:
    async def main() -> None:
        bed = Bed()
        try:
            await asyncio.wait_for(test(bed), 10)
        finally:
            await bed.finish()

    asyncio.run(main())


async def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send `payload`, half-close, and read the reply to its end while still sending."""
    reader, writer = await asyncio.open_connection(*address)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    _, reply = await asyncio.gather(send(), reader.read())
    writer.close()
    await writer.wait_closed()
    return reply


async def send_or_reset(address: tuple[str, int], payload: bytes) -> bytes:
    """One connection: send `payload`, half-close, read the reply to its end; b"reset" if reset."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 1.0)
    except ConnectionResetError:
        return b"reset"
    finally:
        writer.close()


async def expect_reset(reader: asyncio.StreamReader) -> None:
    """The proxy aborts the connection: the client gets a reset, well within a second."""
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 1.0)


def test_bytes_are_echoed_and_counted_exactly_both_ways() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # many 64 KiB reads, and backpressure on the way

    async def test(bed: Bed) -> None:
        port = await bed.serve(tagged_echo(b"|bye"))
        address = await bed.start_proxy([port])
        assert await exchange(address, payload) == payload + b"|bye"
        [record] = await bed.finish()
        assert (record.bytes_sent, record.bytes_received) == (len(payload), len(payload) + 4)
        assert (record.state, record.reason) == ("closed", "closed")
        assert record.original_dst == f"{VIP}:80"
        assert (record.service, record.upstream) == ("shop/web", f"127.0.0.1:{port}")
        assert (record.source_workload, record.upstream_workload) == ("shop/client", "shop/web-0")

    run(test)


def test_out_of_descriptors_the_listener_pauses_then_serves_its_backlog(caplog: pytest.LogCaptureFixture) -> None:
    async def test(bed: Bed) -> None:
        loop = asyncio.get_running_loop()
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye"))])
        clients = [socket.socket() for _ in range(2)]
        with descriptors_exhausted(16):  # the proxy cannot accept now
            for client in clients:
                client.setblocking(False)
                client.connect_ex(address)  # completes in the listener's backlog
            await asyncio.sleep(0.3)
            assert bed.table.live() == []
            failures = [r.getMessage() for r in caplog.records if "listener.accept_failed" in r.getMessage()]
            assert len(failures) == 1 and "Too many open files" in failures[0], failures  # paused, not spinning
        for client in clients:  # accepted once the retry delay has passed, and served in full
            with client:
                await loop.sock_sendall(client, b"hello")
                client.shutdown(socket.SHUT_WR)
                reply = b""
                while data := await asyncio.wait_for(loop.sock_recv(client, 100), 3):
                    reply += data
                assert reply == b"hello|bye"

    run(test)


def test_half_close_lets_the_server_reply_after_client_eof() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(reply_after_eof)])
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"hello")
        writer.write_eof()
        assert await reader.read() == b"got 5 bytes"
        writer.close()
        [record] = await bed.finish()
        assert (record.bytes_sent, record.bytes_received, record.reason) == (5, 11, "closed")

    run(test)


def test_refused_upstream_resets_client_promptly_and_fails_the_record() -> None:
    async def test(bed: Bed) -> None:
        dead = free_port()
        address = await bed.start_proxy([dead])
        reader, writer = await asyncio.open_connection(*address)
        started = time.monotonic()
        await expect_reset(reader)
        assert time.monotonic() - started < 1.0
        writer.close()
        [record] = await bed.finish()
        assert record.state == "failed"
        assert record.reason == f"upstream 127.0.0.1:{dead} refused the connection"

    run(test)


def test_the_agent_log_names_failed_connections_only(caplog: pytest.LogCaptureFixture) -> None:
    """Each connection is in the access log and metrics; at info level the agent's own log has
    a line only for a connection that failed, so a busy node's log stays readable."""
    caplog.set_level(logging.INFO, logger="amesh.ztunnel")

    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye")), free_port()], attempts=1)
        # the proxy alternates between the live upstream and the dead one
        outcomes = [await send_or_reset(address, b"ok") for _ in range(2)]
        assert sorted(outcomes) == [b"ok|bye", b"reset"]
        await bed.finish()

    run(test)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("conn.")]
    assert len(lines) == 1 and "state=failed" in lines[0] and "refused" in lines[0], lines


def test_a_flood_of_failed_connections_writes_a_few_log_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amesh.ztunnel")

    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([free_port()])
        for _ in range(40):
            reader, writer = await asyncio.open_connection(*address)
            await expect_reset(reader)
            writer.close()
        await bed.finish()

        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("conn.close")]
        assert len(lines) <= LOG_BURST + 2, lines  # the burst, and what the rate refilled meanwhile
        assert bed.table.failure_log.suppressed["conn.close connect_refused"] == 40 - len(lines)

    run(test)


def test_route_error_resets_client_and_names_the_cause() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b""))], dst_port=8081)
        reader, writer = await asyncio.open_connection(*address)
        await expect_reset(reader)
        writer.close()
        [record] = await bed.finish()
        assert (record.state, record.reason) == ("failed", "service shop/web does not expose port 8081")
        assert record.upstream is None

    run(test)


def test_upstream_reset_resets_client_and_is_recorded() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(reset_on_data)])
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"x")
        await expect_reset(reader)
        writer.close()
        [record] = await bed.finish()
        assert record.state == "closed"
        assert record.reason is not None and record.reason.startswith("upstream reset")

    run(test)


@pytest.mark.parametrize("source", [
    Workload(name="client", namespace="shop", ip="10.0.0.9", node="n1", enrolled=True),  # not this IP
    Workload(name="client", namespace="shop", ip="127.0.0.1", node="n1"),  # not enrolled
    Workload(name="client", namespace="shop", ip="127.0.0.1", node="n2", enrolled=True),  # another node's
], ids=["unknown source", "not enrolled", "another node"])
def test_a_connection_that_did_not_come_through_capture_is_refused_before_any_connect(source: Workload) -> None:
    async def test(bed: Bed) -> None:
        accepted = []
        port = await bed.serve(lambda reader, writer: accepted.append(writer) or writer.close())
        reader, writer = await asyncio.open_connection(*await bed.start_proxy([port], source=source))
        await expect_reset(reader)
        writer.close()
        [record] = await bed.finish()
        assert (record.state, record.failure) == ("failed", "not_captured")
        assert "without capture" in str(record.reason) and accepted == []

    run(test)


def test_a_captured_connection_to_the_nodes_own_ztunnel_port_is_refused_not_looped() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b""))], destination=("192.0.2.1", 15001))
        reader, writer = await asyncio.open_connection(*address)
        await expect_reset(reader)
        writer.close()
        # the same port on an address that is not the node's is an ordinary destination
        assert guard_self_loop_allows(Upstream("192.0.2.7", 15001, "passthrough"))
        [record] = await bed.finish()
        assert (record.state, record.failure) == ("failed", "self_loop")
        assert record.reason == ("192.0.2.1:15001 is this node's own ztunnel port 15001: "
                                 "connecting there would loop back into the ztunnel")

    run(test)


def guard_self_loop_allows(upstream: Upstream) -> bool:
    try:
        guard_self_loop(upstream, OWN_PORTS, lambda: NODE_ADDRESSES)
    except LoopError:
        return False
    return True


def test_an_unexpected_error_resets_the_client_ends_the_record_and_the_listener_serves_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    plan = Router.plan

    def buggy_plan(self: Router, *args: object) -> Plan:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in routing")
        return plan(self, *args)

    monkeypatch.setattr(Router, "plan", buggy_plan)

    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye"))])
        reader, writer = await asyncio.open_connection(*address)
        await expect_reset(reader)
        writer.close()
        assert await exchange(address, b"next") == b"next|bye"
        failed, served = await bed.finish()
        assert (failed.state, failed.failure) == ("failed", "internal")
        assert failed.reason == "internal error in the ztunnel: RuntimeError: a bug in routing"
        assert served.state == "closed"

    run(test)
    assert any("a bug in routing" in (r.exc_text or "") for r in caplog.records), "traceback not logged"


def test_a_dead_endpoint_costs_the_client_nothing_its_connects_are_retried_on_the_next() -> None:
    async def test(bed: Bed) -> None:
        dead = free_port()
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye")), dead])
        assert [await exchange(address, b"x") for _ in range(10)] == [b"x|bye"] * 10
        records = await bed.finish()
        retried = [r.attempts for r in records if len(r.attempts) > 1]
        assert len(retried) == 5 and retried[0] == [{"upstream": f"127.0.0.1:{dead}", "result": "connect_refused"},
                                                    {"upstream": retried[0][1]["upstream"], "result": "ok"}]
        assert bed.table.attempts == {"ok": 10, "connect_refused": 5}

    run(test)


def test_after_five_failures_in_a_row_the_breaker_keeps_new_connections_off_the_dead_endpoint() -> None:
    async def test(bed: Bed) -> None:
        dead = free_port()
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye")), dead])
        assert [await exchange(address, b"x") for _ in range(30)] == [b"x|bye"] * 30
        assert bed.table.attempts == {"ok": 30, "connect_refused": 5}  # then no connection tried it
        assert bed.proxy.shaper.outliers.state(("shop/web", f"127.0.0.1:{dead}")) == "OPEN"

    run(test)


def test_when_every_endpoint_is_dead_the_retry_budget_caps_the_attempts() -> None:
    async def test(bed: Bed) -> None:
        # five, so that with the breakers open on two (at most half) each connection still has three
        address = await bed.start_proxy([free_port() for _ in range(5)])
        for _ in range(100):
            reader, writer = await asyncio.open_connection(*address)
            await expect_reset(reader)
            writer.close()
        await bed.finish()
        attempts = bed.table.attempts
        # 100 first tries; retries within the floor (10/s over 10 s) and a fifth of 100: at most 220
        # connects, not 300; the connections that came after the budget ran out were reset at once
        assert attempts["connect_refused"] <= 100 + 100 + 20 and attempts["retry_budget_spent"] >= 30, attempts
        assert bed.table.failures == {"connect_refused": 100}

    run(test)


def test_over_the_services_rate_limit_a_connection_is_refused_at_once() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye"))], rate=5.0)
        outcomes = [await send_or_reset(address, b"x") for _ in range(15)]
        assert outcomes.count(b"x|bye") in (5, 6) and outcomes.count(b"reset") == 15 - outcomes.count(b"x|bye")
        records = await bed.finish()
        refused = [r for r in records if r.state == "failed"]
        assert {r.failure for r in refused} == {"rate_limited"} and refused[0].attempts == []
        assert "at most 5 new connections a second" in str(refused[0].reason)

    run(test)


async def held_open(bed: Bed, address: tuple[str, int], live: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection kept open (not half-closed), once the proxy counts `live` to the Service."""
    connection = await asyncio.open_connection(*address)
    connection[1].write(b"x")
    while bed.proxy.shaper.live.by_service.get("shop/web") != live:
        await asyncio.sleep(0.005)
    return connection


def test_over_the_services_connection_limit_a_connection_is_refused_at_once_until_one_ends() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(reply_after_eof)], max_connections=2)
        first = await held_open(bed, address, 1)
        await held_open(bed, address, 2)
        started = time.monotonic()
        assert await send_or_reset(address, b"x") == b"reset"
        assert time.monotonic() - started < 0.2
        first[1].write_eof()
        assert await first[0].read() == b"got 1 bytes"
        while bed.proxy.shaper.live.by_service.get("shop/web") != 1:
            await asyncio.sleep(0.005)
        assert await send_or_reset(address, b"x") == b"got 1 bytes"  # a place is free again
        refused = [r for r in bed.table.recent() if r.state == "failed"]
        assert [r.failure for r in refused] == ["upstream_overflow"] and refused[0].attempts == []
        assert str(refused[0].reason) == ("service shop/web has 2 live connections from this node, its limit "
                                          "(DestinationRule trafficPolicy.connectionPool.tcp.maxConnections)")

    run(test)


def test_a_connections_place_is_given_back_however_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    attempt = OutboundProxy._attempt
    broken: list[Exception | None] = [None]  # what every connect raises, if anything

    async def maybe_broken(self: OutboundProxy, *args: object) -> object:
        if broken[0] is not None:
            raise broken[0]
        return await attempt(self, *args)

    monkeypatch.setattr(OutboundProxy, "_attempt", maybe_broken)

    async def test(bed: Bed) -> None:
        dead = free_port()
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye")), dead], max_connections=5, rate=100.0)
        live = bed.proxy.shaper.live

        async def given_back() -> None:
            while live.by_service or live.endpoints("shop/web"):
                await asyncio.sleep(0.005)

        assert await send_or_reset(address, b"x") == b"x|bye"  # served, after a retry or not
        await given_back()
        reader, writer = await held_open(bed, address, 1)
        [record] = bed.table.live()
        record.cut("policy_changed", "cut")
        await expect_reset(reader)
        writer.close()
        await given_back()
        broken[0] = ProxyError("connect_refused", "refused")
        assert await send_or_reset(address, b"x") == b"reset"  # every attempt failed
        await given_back()
        broken[0] = RuntimeError("a bug in connecting")
        assert await send_or_reset(address, b"x") == b"reset"  # an unexpected error
        await given_back()
        broken[0] = None
        await held_open(bed, address, 1)
        await bed.proxy.close(grace=0.0)  # cancelled by the shutdown
        await given_back()
        assert [r.failure for r in bed.table.recent()] == [None, "internal", "connect_refused", "policy_changed", None]
        assert bed.table.recent()[0].reason == "cancelled: proxy shutting down"

    run(test)


def test_connections_alternate_between_two_upstreams() -> None:
    async def test(bed: Bed) -> None:
        ports = [await bed.serve(tagged_echo(b"A")), await bed.serve(tagged_echo(b"B"))]
        address = await bed.start_proxy(ports)
        tags = [await exchange(address, b"") for _ in range(4)]
        assert sorted(tags[:2]) == [b"A", b"B"]
        assert tags[2:] == tags[:2]

    run(test)


def test_close_drains_live_connections_then_cancels_the_rest() -> None:
    async def test(bed: Bed) -> None:
        address = await bed.start_proxy([await bed.serve(tagged_echo(b"|bye"))])
        idle_reader, idle_writer = await asyncio.open_connection(*address)
        busy_reader, busy_writer = await asyncio.open_connection(*address)
        for reader, writer in ((idle_reader, idle_writer), (busy_reader, busy_writer)):
            writer.write(b"x")  # a round trip proves the proxy has spliced this connection
            assert await reader.readexactly(1) == b"x"
        assert bed.proxy is not None

        closing = asyncio.create_task(bed.proxy.close(grace=0.5))
        await asyncio.sleep(0)  # let close() run to its first await; it stops accepting before that
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)

        busy_writer.write_eof()  # ends within the grace period
        assert await busy_reader.read() == b"|bye"
        busy_writer.close()
        await expect_reset(idle_reader)  # never ends by itself: cancelled when the grace runs out
        idle_writer.close()
        await closing

        idle, busy = sorted(await bed.finish(), key=lambda r: r.id)
        assert (busy.state, busy.reason) == ("closed", "closed")
        assert (idle.state, idle.reason) == ("closed", "cancelled: proxy shutting down")
        assert idle.ended is not None and busy.ended is not None and busy.ended < idle.ended

    run(test)


def test_table_keeps_a_bounded_newest_first_history() -> None:
    clock = iter(range(1_700_000_000, 1_800_000_000)).__next__
    table = ConnectionTable(closed_capacity=3, clock=lambda: float(clock()))
    records = [table.open("10.244.1.5", 40000 + i, f"{VIP}:80") for i in range(5)]
    for record in records[:4]:
        table.close(record, "closed", "closed")

    assert [r.id for r in table.recent()] == [4, 3, 2]
    assert [r.id for r in table.live()] == [5]
    assert [d["id"] for d in table.snapshot()] == [5, 4, 3, 2]
    first = table.recent()[-1].to_dict()
    assert first["started"] == "2023-11-14T22:13:21.000+00:00"
    assert first["duration"] == 5.0  # opened at tick 1, closed at tick 6 of the fake clock
    with pytest.raises(ValueError, match="not live"):
        table.close(records[0], "closed", "closed")


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 172.18.0.11
        /32 host LOCAL
"""


def test_the_nodes_own_addresses_are_its_local_routes(tmp_path: Path) -> None:
    trie = tmp_path / "fib_trie"
    trie.write_text(FIB_TRIE)
    now = [0.0]
    addresses = NodeAddresses(max_age=1.0, clock=lambda: now[0], path=str(trie))
    assert addresses() == {"10.244.1.1", "127.0.0.1", "172.18.0.11"}
    trie.write_text(FIB_TRIE.replace("172.18.0.11", "172.18.0.12"))
    assert "172.18.0.11" in addresses()  # read at most once per second
    now[0] = 1.0
    assert "172.18.0.12" in addresses() and "172.18.0.11" not in addresses()
