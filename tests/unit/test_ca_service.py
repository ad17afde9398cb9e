"""The cluster CA end to end on loopback: `ClusterCA` with its pod watch and TokenReview against the
test API server, and the agent's ClusterCAClient, over real HTTPS; and the CertificateManager
asking a remote issuer without stalling its event loop."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.client import ClusterCAClient
from ca.config import CAConfig
from ca.server import ClusterCA, RequestError, SigningRequest
from tests.kubeapi import KubeAPIServer
from tests.unit.clock import Clock
from ztunnel.identity import (
    CA_CERT_FILE,
    CAError,
    CertificateManager,
    FileCA,
    Identity,
    IssuedCertificate,
    IssueError,
    signing_request,
)

WEB = Identity("cluster.local", "shop", "web")
DB = Identity("cluster.local", "shop", "db")
START_TIMEOUT = 10.0  # seconds for the CA to list the pods and listen
CA_POLL = 0.1  # seconds between the CA's checks of its directory (default 5)


def pod(name: str, namespace: str, node: str, account: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip}}


OBJECTS = [pod("agent-1", "amesh-system", "node-1", "amesh-agent", "172.18.0.11"),
           pod("web-1", "shop", "node-1", "web", "10.244.1.10"),
           pod("db-1", "shop", "node-2", "db", "10.244.2.10")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeAPIServer, ClusterCA, Path]]:
    root = FileCA.load_or_create(tmp_path / "secret")
    bundle = tmp_path / "bundle" / CA_CERT_FILE
    bundle.parent.mkdir()
    bundle.write_bytes(root.root_pem)
    with KubeAPIServer(objects=OBJECTS) as api:
        config = CAConfig(tmp_path / "secret", "127.0.0.1", free_port(), free_port(),
                          str(api.write_kubeconfig(tmp_path / "kubeconfig")), ca_poll_interval=CA_POLL)
        server = ClusterCA(config)
        loop = asyncio.new_event_loop()
        task = loop.create_task(server.run())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not ready(config.metrics_port):
                assert time.monotonic() < deadline, "the CA did not become ready"
                time.sleep(0.05)
            yield api, server, bundle
        finally:
            loop.call_soon_threadsafe(task.cancel)
            time.sleep(0.2)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=1) as response:
            return json.load(response)["ready"]
    except OSError:
        return False


def client_for(server: ClusterCA, bundle: Path, token: str, tmp_path: Path) -> ClusterCAClient:
    token_file = tmp_path / "token"
    token_file.write_text(token)
    return ClusterCAClient(f"127.0.0.1:{server.config.port}", token_file, bundle, "cluster.local")


def request_for(identity: Identity) -> x509.CertificateSigningRequest:
    return signing_request(identity, ec.generate_private_key(ec.SECP256R1()))


def test_the_ca_signs_for_the_node_running_the_pod_and_refuses_others(cluster, tmp_path: Path) -> None:
    api, server, bundle = cluster
    client = client_for(server, bundle, api.request_token("amesh-system", "amesh-agent", "agent-1", ["amesh-ca"]),
                        tmp_path)
    request = request_for(WEB)
    issued = client.issue_request(WEB, request, timedelta(hours=1))
    assert issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    assert issued.certificate.issuer == server.root._certificate.subject
    with pytest.raises(IssueError, match=r"refused spiffe://cluster.local/ns/shop/sa/db \(identity_on_other_node\):"
                                         r" node node-1 runs no pod with service account db .*node-2"):
        client.issue_request(DB, request_for(DB), timedelta(hours=1))
    assert client.results == {"signed": 1, "identity_on_other_node": 1}
    assert server.results == {"signed": 1, "identity_on_other_node": 1}

    # the pod moves: node-1 can no longer obtain its identity; the token file is re-read each time
    api.apply(pod("web-1", "shop", "node-2", "web", "10.244.2.11"))
    time.sleep(0.3)  # the CA's watch follows
    with pytest.raises(IssueError, match="identity_on_other_node"):
        client.issue_request(WEB, request_for(WEB), timedelta(hours=1))
    client.token_file.write_text(api.request_token("amesh-system", "amesh-agent", "agent-1", ["vault"]))
    with pytest.raises(IssueError, match="token_wrong_audience"):
        client.issue_request(DB, request_for(DB), timedelta(hours=1))
    assert client.status()["last_error"] and client.status()["failing_since"]


def test_a_csr_for_another_identity_than_asked_is_refused(cluster, tmp_path: Path) -> None:
    api, server, bundle = cluster
    client = client_for(server, bundle, api.request_token("amesh-system", "amesh-agent", "agent-1", ["amesh-ca"]),
                        tmp_path)
    with pytest.raises(IssueError, match=r"\(bad_csr\): the CSR must name exactly one SAN, the URI "
                                         r"spiffe://cluster.local/ns/shop/sa/web, but names: spiffe://.*/sa/db"):
        client.issue_request(WEB, request_for(DB), timedelta(hours=1))
    assert server.results == {"bad_csr": 1}


def test_an_unreachable_ca_is_a_clear_error_and_counted(cluster, tmp_path: Path) -> None:
    api, server, bundle = cluster
    token_file = tmp_path / "token"
    token_file.write_text("x")
    client = ClusterCAClient(f"127.0.0.1:{free_port()}", token_file, bundle, "cluster.local", timeout=1.0)
    with pytest.raises(IssueError, match=r"cannot reach the cluster CA 127\.0\.0\.1:\d+"):
        client.issue_request(WEB, request_for(WEB), timedelta(hours=1))
    assert client.results == {"unreachable": 1}


def test_a_ca_whose_certificate_is_not_from_the_bundle_is_not_trusted(cluster, tmp_path: Path) -> None:
    api, server, _ = cluster
    other = tmp_path / "other.crt"
    other.write_bytes(FileCA.load_or_create(tmp_path / "other").root_pem)
    client = client_for(server, other, "x", tmp_path)
    with pytest.raises(IssueError, match="cannot reach the cluster CA .*CERTIFICATE_VERIFY_FAILED"):
        client.issue_request(WEB, request_for(WEB), timedelta(hours=1))


def test_a_trust_bundle_holding_a_key_is_refused(tmp_path: Path) -> None:
    FileCA.load_or_create(tmp_path / "secret")
    both = tmp_path / "both.pem"
    both.write_bytes((tmp_path / "secret" / "ca.crt").read_bytes() + (tmp_path / "secret" / "ca.key").read_bytes())
    with pytest.raises(CAError, match="holds a private key: give agents the root certificate only"):
        ClusterCAClient("127.0.0.1:1", tmp_path / "token", both, "cluster.local")


class SlowRemoteIssuer:
    """A remote issuer over a FileCA that takes `delay` seconds per answer, as a far CA does."""

    def __init__(self, ca: FileCA, delay: float) -> None:
        self.ca, self.delay = ca, delay
        self.trust_bundle, self.root_fingerprint = ca.trust_bundle, ca.root_fingerprint
        self.failing = False

    def issue_request(self, identity: Identity, request: x509.CertificateSigningRequest,
                      lifetime: timedelta) -> IssuedCertificate:
        time.sleep(self.delay)
        if self.failing:
            raise IssueError("CA unreachable")
        return self.ca.issue(identity, request.public_key(), lifetime)  # type: ignore[arg-type]


def test_a_remote_issue_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    issuer = SlowRemoteIssuer(FileCA.load_or_create(tmp_path / "ca"), delay=0.5)
    manager = CertificateManager(issuer)

    async def scenario() -> tuple[int, list[dict]]:
        manager.set_identities([WEB, DB])  # returns at once: the round trips wait for run()
        assert [c["state"] for c in manager.certificates()] == ["pending", "pending"]
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await manager.renew_due_now()
        ticker.cancel()
        return ticks, manager.certificates()

    ticks, certificates = asyncio.run(scenario())
    assert [c["state"] for c in certificates] == ["valid", "valid"]
    assert ticks >= 20  # 0.5 s of issuing (both at once) while the loop kept running every 10 ms


def test_a_failing_remote_issuer_keeps_the_certificate_held_and_backs_off(tmp_path: Path) -> None:
    issuer = SlowRemoteIssuer(FileCA.load_or_create(tmp_path / "ca"), delay=0.0)
    clock = Clock(time.time())
    manager = CertificateManager(issuer, clock=clock, retry_initial=1.0, retry_max=4.0, rng=random.Random(7))

    async def scenario() -> None:
        manager.set_identities([WEB])
        await manager.renew_due_now()
        serial = manager.serial(WEB)
        issuer.failing = True
        delays = []
        for _ in range(4):
            clock.now = manager.next_wakeup(clock.now)
            await manager.renew_due_now()
            delays.append(manager.next_wakeup(clock.now) - clock.now)
        assert manager.serial(WEB) == serial  # still serving the one it has
        [row] = manager.certificates()
        assert (row["state"], row["issue_failures"], row["last_error"]) == ("renewing", 4, "CA unreachable")
        # doubling from 1 s up to the 4 s cap, each jittered by 0.8-1.2
        for delay, base in zip(delays, (1.0, 2.0, 4.0, 4.0)):
            assert 0.8 * base <= delay <= 1.2 * base
        issuer.failing = False
        clock.now = manager.next_wakeup(clock.now)
        await manager.renew_due_now()
        assert manager.serial(WEB) != serial and manager.certificates()[0]["state"] == "valid"

    asyncio.run(scenario())


def csr_body(identity: str, request: x509.CertificateSigningRequest, **extra: object) -> bytes:
    pem = request.public_bytes(serialization.Encoding.PEM).decode()
    return json.dumps({"identity": identity, "csr": pem, **extra}).encode()


@pytest.mark.parametrize("body, reason, message", [
    (b"{", "bad_request", "must be JSON with identity, csr"),
    (b'{"identity": "spiffe://cluster.local/ns/shop/sa/web"}', "bad_request", "'csr'"),
    (b'{"identity": "web", "csr": "x"}', "bad_request", "is not a workload SPIFFE ID"),
    (b'{"identity": "spiffe://cluster.local/ns/shop/sa/web", "csr": "x"}', "bad_csr", "cannot be read"),
])
def test_unreadable_requests_are_refused_before_any_review(body: bytes, reason: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as refused:
        SigningRequest.parse(body, timedelta(hours=24))
    assert refused.value.reason == reason


def test_a_request_gets_at_most_the_cas_lifetime_and_a_strong_key_only() -> None:
    parsed = SigningRequest.parse(csr_body(WEB.uri, request_for(WEB), lifetime_s=7 * 86400), timedelta(hours=24))
    assert (parsed.identity, parsed.lifetime) == (WEB, timedelta(hours=24))
    weak = signing_request(WEB, ec.generate_private_key(ec.SECP192R1()))  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="ECDSA P-256/P-384 or RSA of at least 2048 bits"):
        SigningRequest.parse(csr_body(WEB.uri, weak), timedelta(hours=24))
    small = signing_request(WEB, rsa.generate_private_key(65537, 1024))  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="RSA of at least 2048 bits"):
        SigningRequest.parse(csr_body(WEB.uri, small), timedelta(hours=24))
