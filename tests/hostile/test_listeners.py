"""Attacks on the listeners before any HTTP/2: a self-loop through 15001, silent and slow
connections to 15008, garbage instead of TLS (issue 11). Bed and checks: tests/hostile/conftest.py.
"""

from __future__ import annotations

import os
import socket
import ssl
import time

import pytest

from tests.attacker import Vitals, wait_all_closed
from tests.hostile.conftest import Target

pytestmark = pytest.mark.hostile

OUTBOUND_PORT = 15001
HBONE_PORT = 15008
HANDSHAKE_DEADLINE = 5.0  # seconds the agent gives a TLS handshake (the bound)
CLOSE_MARGIN = 1.5  # seconds past a deadline before a connection counts as left open
SILENT_CONNECTIONS = 500
SILENT_MEMORY_LIMIT_MIB = 20  # what 500 unauthenticated connections may cost, at most
REFUSAL_WAIT = 2.0  # seconds a refused client may wait for its refusal (and descriptors to settle)


def _answer(sock: socket.socket) -> str:
    """How a connection that sent a request ended within its timeout: refused, reset, closed,
    answered or hanging."""
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = sock.recv(100)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "hanging"
    return f"answered {data[:40]!r}" if data else "closed"


@pytest.mark.parametrize("source, node", [("attacker", 2), ("client", 1)],
                         ids=["unenrolled-pod-to-another-node", "enrolled-pod-to-its-own-node"])
def test_a_connection_to_a_node_address_on_the_outbound_port_is_refused_without_looping(
        target: Target, figures: dict, source: str, node: int):
    bed = target.bed
    pid = target.pid(node)
    started = time.monotonic()
    try:
        sock = bed.connect(bed.pods[source], bed.node(node).ip, OUTBOUND_PORT, timeout=REFUSAL_WAIT)
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:  # the refusal's reset can beat connect() back to the client
        outcome = "reset"
    except TimeoutError:
        outcome = "hanging"
    else:
        with sock:
            outcome = _answer(sock)
    figures.update(outcome=outcome, answered_in_s=round(time.monotonic() - started, 2))
    peak = 0
    deadline = time.monotonic() + REFUSAL_WAIT  # after the client left: the loop must not go on
    while time.monotonic() < deadline:
        peak = max(peak, Vitals.of(pid).fds)
        time.sleep(0.05)
    figures["fds_peak"] = peak
    target.settled(node, figures, {  # the 2 s have passed already: the descriptors must be back now
        f"the client's connection was {outcome}, not refused": outcome in ("refused", "reset", "closed"),
    }, fd_timeout=0.1)


def test_silent_connections_to_the_hbone_port_cost_little_memory_and_are_closed_by_the_deadline(
        target: Target, figures: dict):
    bed, server = target.bed, target.bed.pods["server-b"]
    pid = target.pid(2)
    socks = []
    refused_at_once = 0  # the handshake cap's reset can beat connect() back to the client
    try:
        for _ in range(SILENT_CONNECTIONS):
            try:
                socks.append(bed.connect(bed.pods["attacker"], server.ip, HBONE_PORT))
            except ConnectionResetError:
                refused_at_once += 1
        opened = time.monotonic()
        peak = target.baseline["node-2"].rss_kib
        while time.monotonic() - opened < 1.0:  # the agent accepts them all (or refuses the excess)
            peak = max(peak, Vitals.of(pid).rss_kib)
            time.sleep(0.05)
        closed, waited = wait_all_closed(socks, HANDSHAKE_DEADLINE + CLOSE_MARGIN - 1.0)
        closed += refused_at_once
        figures.update(closed=closed, refused_at_connect=refused_at_once, closed_within_s=round(waited + 1.0, 2),
                       rss_peak_growth_mib=round((peak - target.baseline["node-2"].rss_kib) / 1024, 1))
    finally:
        for sock in socks:
            sock.close()
    growth = figures["rss_peak_growth_mib"]
    target.settled(2, figures, {
        f"{SILENT_CONNECTIONS - closed} of {SILENT_CONNECTIONS} silent connections still open "
        f"{HANDSHAKE_DEADLINE + CLOSE_MARGIN}s after they were made": closed == SILENT_CONNECTIONS,
        f"{SILENT_CONNECTIONS} silent connections cost the agent {growth} MiB (limit {SILENT_MEMORY_LIMIT_MIB})":
            growth < SILENT_MEMORY_LIMIT_MIB,
    })
    assert figures["rss_growth_mib"] < SILENT_MEMORY_LIMIT_MIB, (
        f"the agent kept {figures['rss_growth_mib']} MiB after the silent connections closed")


def test_garbage_instead_of_a_tls_handshake_is_closed_at_once(target: Target, figures: dict):
    bed, server = target.bed, target.bed.pods["server-b"]
    with bed.connect(bed.pods["attacker"], server.ip, HBONE_PORT) as sock:
        sock.sendall(os.urandom(4096))
        closed, waited = wait_all_closed([sock], REFUSAL_WAIT)
    figures.update(closed=closed, closed_within_s=round(waited, 2))
    target.settled(2, figures, {
        f"a connection sending garbage instead of TLS still open after {REFUSAL_WAIT}s": closed == 1,
    })


def _client_hello() -> bytes:
    """The first flight of a TLS 1.3 client, as bytes to dribble out."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_a_client_hello_sent_a_byte_per_second_is_closed_by_the_handshake_deadline(target: Target, figures: dict):
    bed, server = target.bed, target.bed.pods["server-b"]
    hello = _client_hello()
    started = time.monotonic()
    with bed.connect(bed.pods["attacker"], server.ip, HBONE_PORT) as sock:
        sock.settimeout(1.0)
        sent = 0
        closed = False
        while not closed and time.monotonic() - started < HANDSHAKE_DEADLINE + CLOSE_MARGIN:
            try:
                sock.sendall(hello[sent:sent + 1])
                sent += 1
                closed = sock.recv(100) == b""  # a byte a second: each wait is that second
            except TimeoutError:
                continue
            except OSError:
                closed = True
    figures.update(bytes_sent=sent, closed=closed, closed_after_s=round(time.monotonic() - started, 2))
    target.settled(2, figures, {
        f"a slowloris handshake was still open after {HANDSHAKE_DEADLINE + CLOSE_MARGIN}s": closed,
    })
