"""Hostile registrations through the admin API (issue 11): addresses that would point the mesh at
the node itself or at no real workload, bodies that are not JSON objects, and a registration of
the admin port into a Service. Bed and checks: tests/hostile/conftest.py.
"""

from __future__ import annotations

import socket

import pytest

from tests.attacker import post_raw
from tests.hostile.conftest import BAIT_SERVICE_IP, TARGET_PORT, Target
from tests.mesh import ADMIN_PORT

pytestmark = pytest.mark.hostile

BAD_ADDRESSES = {
    "loopback": "127.0.0.1",
    "unspecified": "0.0.0.0",
    "link-local-cloud-metadata": "169.254.169.254",
    "multicast": "224.0.0.251",
    "broadcast": "255.255.255.255",
    "a-json-number": 167772161,  # 10.0.0.1 as an integer
}
DEEP_JSON = 50_000  # levels of nesting in a body that must answer 4xx, not 500
REPLY_WAIT = 2.0  # seconds a probe through the bait Service waits for an answer


def _deregister(target: Target, status: int) -> None:
    """Removes what an accepted registration added, so the next test starts from the same state."""
    if status < 300:
        target.mesh.ctl(1, "deregister", "billing", "-n", "shop")


@pytest.mark.parametrize("address", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_a_registration_with_an_address_no_workload_can_have_is_refused(target: Target, figures: dict, address):
    spec = {"name": "billing", "namespace": "shop", "address": address, "port": TARGET_PORT}
    status, body = target.mesh.http(1, ADMIN_PORT, "/registrations", "POST", spec)
    _deregister(target, status)
    figures.update(status=status, answer=body[:200])
    target.settled(1, figures, {
        f"registering address {address!r} answered {status}: {body[:200]}": 400 <= status < 500 and "address" in body,
    })


def test_a_deeply_nested_json_body_is_refused_not_a_server_error(target: Target, figures: dict):
    body = b"[" * DEEP_JSON + b"]" * DEEP_JSON
    status, answer = post_raw(target.bed.node(1).netns, ADMIN_PORT, "/registrations", body)
    figures.update(status=status, answer=answer[:200])
    target.settled(1, figures, {
        f"a {DEEP_JSON}-deep JSON body answered {status}: {answer[:200]}": 400 <= status < 500,
    })


def test_registering_the_admin_port_into_a_service_never_lets_a_pod_reach_the_admin_api(
        target: Target, figures: dict):
    bed = target.bed
    spec = {"name": "billing", "namespace": "shop", "address": "127.0.0.1", "port": ADMIN_PORT}
    status, _ = target.mesh.http(1, ADMIN_PORT, "/registrations", "POST", spec)
    reply = b""
    try:
        with bed.connect(bed.pods["client"], BAIT_SERVICE_IP, 80, timeout=REPLY_WAIT) as sock:
            sock.sendall(b"GET /status HTTP/1.0\r\nHost: bait\r\n\r\n")
            while chunk := sock.recv(65536):
                reply += chunk
    except (ConnectionError, TimeoutError, socket.timeout):
        pass  # refused or reset: what the mesh should do
    finally:
        _deregister(target, status)
    figures.update(registration_status=status, reply=reply[:80].decode(errors="replace"))
    target.settled(1, figures, {
        f"a pod reached node-1's admin API through {BAIT_SERVICE_IP}:80 (registration answered {status})":
            not reply.startswith(b"HTTP/"),
    })
