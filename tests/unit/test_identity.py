"""Identities and certificates: SPIFFE IDs, the file CA, rotation timing, and real mTLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import stat
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.identity import (
    CAError,
    CertificateManager,
    FileCA,
    Identity,
    IdentityError,
    IssuedCertificate,
    IssueError,
    expect_identity,
    peer_identity,
)

T0 = 1_750_000_000.0  # a whole second: X.509 times have one-second resolution
TIMEOUT = 2.0  # seconds for any single network step on loopback
HOUR = 3600.0
ALICE = Identity("cluster.local", "shop", "web")
BOB = Identity("cluster.local", "shop", "db")


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FixedJitter(random.Random):
    """Jitter that always picks `factor`, so backoff delays are exact."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0.8, 1.2)
        return self.factor


class FlakyIssuer:
    """A FileCA that fails with IssueError while `failing` is set."""

    def __init__(self, ca: FileCA) -> None:
        self.ca = ca
        self.failing = False
        self.trust_bundle = ca.trust_bundle
        self.root_fingerprint = ca.root_fingerprint

    def issue(self, identity: Identity, public_key: object, lifetime: timedelta) -> IssuedCertificate:
        if self.failing:
            raise IssueError("CA unreachable")
        return self.ca.issue(identity, public_key, lifetime)  # type: ignore[arg-type]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def ca(ca_dir: Path) -> FileCA:
    return FileCA.load_or_create(ca_dir)


@pytest.fixture
def manager(ca: FileCA) -> CertificateManager:
    m = CertificateManager(ca)
    m.set_identities([ALICE, BOB])
    return m


def fake_manager(ca_dir: Path, **kwargs: object) -> tuple[CertificateManager, FakeClock, FlakyIssuer]:
    clock = FakeClock()
    issuer = FlakyIssuer(FileCA.load_or_create(ca_dir, clock=clock))
    kwargs.setdefault("rng", FixedJitter())
    return CertificateManager(issuer, clock=clock, **kwargs), clock, issuer  # type: ignore[arg-type]


# --- SPIFFE IDs ------------------------------------------------------------------------------


def test_identity_uri_round_trips() -> None:
    assert ALICE.uri == str(ALICE) == "spiffe://cluster.local/ns/shop/sa/web"
    assert Identity.parse("spiffe://cluster.local/ns/shop/sa/web") == ALICE


@pytest.mark.parametrize(
    "uri",
    [
        "https://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop",
        "spiffe://cluster.local/ns/shop/sa/web/extra",
        "spiffe://cluster.local/sa/web/ns/shop",
        "spiffe://Cluster.Local/ns/shop/sa/web",
        "spiffe://cluster.local:8443/ns/shop/sa/web",
        "spiffe:///ns/shop/sa/web",
        "spiffe://cluster.local/ns//sa/web",
        "spiffe://cluster.local/ns/../sa/web",
        "spiffe://cluster.local/ns/shop/sa/web?x=1",
    ],
)
def test_parse_rejects_anything_but_a_workload_spiffe_id(uri: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE ID") as info:
        Identity.parse(uri)
    assert repr(uri) in str(info.value)


# --- FileCA ----------------------------------------------------------------------------------


def test_creates_private_files_and_a_root_ca(ca_dir: Path, ca: FileCA) -> None:
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]  # no temporaries left
    for name in ("ca.key", "ca.crt"):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert root.public_bytes(serialization.Encoding.PEM) == ca.root_pem
    assert root.fingerprint(hashes.SHA256()).hex(":").upper() == ca.root_fingerprint
    common_name = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "amesh root CA cluster.local"
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "amesh"
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (constraints.ca, constraints.path_length) == (True, 0)
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.not_valid_after_utc - root.not_valid_before_utc > timedelta(days=3649)
    serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)  # PKCS8 PEM


def test_reload_keeps_the_root(ca_dir: Path, ca: FileCA) -> None:
    assert FileCA.load_or_create(ca_dir).root_fingerprint == ca.root_fingerprint


def test_key_never_shown(ca_dir: Path, ca: FileCA) -> None:
    key_pem = (ca_dir / "ca.key").read_bytes().decode()
    body = "".join(key_pem.splitlines()[1:-1])
    for text in (repr(ca), str(ca)):
        assert "PRIVATE" not in text and body[:40] not in text
    assert ca.root_fingerprint in repr(ca)


@pytest.mark.parametrize("missing", ["ca.key", "ca.crt"])
def test_only_one_file_present_is_an_error(ca_dir: Path, ca: FileCA, missing: str) -> None:
    (ca_dir / missing).unlink()
    with pytest.raises(CAError, match=f"{missing} does not") as info:
        FileCA.load_or_create(ca_dir)
    assert str(ca_dir) in str(info.value)


def test_key_of_another_ca_is_an_error(tmp_path: Path, ca_dir: Path, ca: FileCA) -> None:
    FileCA.load_or_create(tmp_path / "other")
    os.replace(tmp_path / "other" / "ca.key", ca_dir / "ca.key")
    with pytest.raises(CAError, match="does not belong to .*public keys differ"):
        FileCA.load_or_create(ca_dir)


def test_group_readable_key_is_an_error(ca_dir: Path, ca: FileCA) -> None:
    (ca_dir / "ca.key").chmod(0o640)
    with pytest.raises(CAError, match=r"mode 0640.*chmod 600 .*ca\.key"):
        FileCA.load_or_create(ca_dir)


def test_leaf_certificate_as_root_is_an_error(ca_dir: Path, ca: FileCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(ALICE, key.public_key(), timedelta(hours=1)).certificate
    (ca_dir / "ca.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (ca_dir / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(CAError, match="not a CA certificate"):
        FileCA.load_or_create(ca_dir)


def test_leaf_profile(ca_dir: Path) -> None:
    clock = FakeClock()
    ca = FileCA.load_or_create(ca_dir, clock=clock)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(ALICE, key.public_key(), timedelta(hours=5))
    leaf = issued.certificate
    root = x509.load_pem_x509_certificate(ca.root_pem)
    leaf.verify_directly_issued_by(root)
    assert issued.chain_pem == leaf.public_bytes(serialization.Encoding.PEM) + ca.root_pem
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "amesh")])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(ALICE.uri)]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert 0 < leaf.serial_number < 2**128
    assert leaf.not_valid_before_utc.timestamp() == T0 - 60  # clock skew allowance
    assert leaf.not_valid_after_utc.timestamp() == T0 + 5 * HOUR
    assert leaf.signature_hash_algorithm is not None and leaf.signature_hash_algorithm.name == "sha256"
    again = ca.issue(ALICE, key.public_key(), timedelta(hours=5)).certificate
    assert again.serial_number != leaf.serial_number


def test_issue_refuses_another_trust_domain(ca: FileCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(IssueError, match="trust domain cluster.local, not for spiffe://other.local/"):
        ca.issue(Identity("other.local", "shop", "web"), key.public_key(), timedelta(hours=1))


# --- peer_identity / expect_identity without TLS ---------------------------------------------


def _self_signed(*sans: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_peer_without_certificate() -> None:
    with pytest.raises(IdentityError, match="no certificate") as info:
        peer_identity(None, "cluster.local")
    assert info.value.reason == "no_certificate"


@pytest.mark.parametrize(
    "sans",
    [
        (),
        (x509.DNSName("web.shop.svc"),),
        (x509.UniformResourceIdentifier("https://web.shop"),),
        (x509.UniformResourceIdentifier(ALICE.uri), x509.UniformResourceIdentifier(BOB.uri)),
    ],
)
def test_peer_without_one_spiffe_id(sans: tuple[x509.GeneralName, ...]) -> None:
    with pytest.raises(IdentityError, match="CN=stranger") as info:
        peer_identity(_self_signed(*sans), "cluster.local")
    assert info.value.reason == "no_spiffe_id"


def test_expect_identity() -> None:
    expect_identity(ALICE, ALICE)
    with pytest.raises(IdentityError) as info:
        expect_identity(BOB, ALICE)
    assert info.value.reason == "wrong_identity"
    assert str(info.value) == f"peer presented {BOB} but {ALICE} was expected"


# --- mutual TLS on loopback ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[bytes | None]]]:
    """An echo server on 127.0.0.1; yields its port and the peer certificates it accepted."""
    peers: list[bytes | None] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1], peers


async def connect(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=None), TIMEOUT
    )


def peer_der(writer: asyncio.StreamWriter) -> bytes | None:
    """The peer's certificate as DER, as the HBONE code reads it."""
    return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"


def refused(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> Exception:
    """The error the client sees when the handshake fails; the server must not have accepted it."""

    async def attempt() -> Exception:
        async with serving(server_context) as (port, peers):
            try:
                reader, writer = await connect(port, client_context)
                # TLS 1.3: the client finishes first, so a rejected client certificate shows up here
                await ping(reader, writer)
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as e:
                assert peers == []
                return e
        raise AssertionError("the handshake was expected to fail but data went through")

    return asyncio.run(attempt())


def test_mutual_tls_proves_both_identities(manager: CertificateManager) -> None:
    async def session() -> None:
        async with serving(manager.server_context(BOB)) as (port, peers):
            reader, writer = await connect(port, manager.client_context(ALICE))
            await ping(reader, writer)
            tls = writer.get_extra_info("ssl_object")
            assert tls.version() == "TLSv1.3"
            assert tls.selected_alpn_protocol() == "h2"
            assert peer_identity(peer_der(writer), "cluster.local") == BOB
            assert peer_identity(peers[0], "cluster.local") == ALICE
            writer.close()

    asyncio.run(session())


def test_client_without_certificate_is_refused(manager: CertificateManager, ca: FileCA) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.root_pem.decode())
    refused(manager.server_context(BOB), anonymous)


def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, ca: FileCA, manager: CertificateManager
) -> None:
    stranger = CertificateManager(FileCA.load_or_create(tmp_path / "other-ca"))
    stranger.set_identities([ALICE])
    # their server: our client does not trust it
    error = refused(stranger.server_context(ALICE), manager.client_context(ALICE))
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert "self-signed certificate in certificate chain" in str(error)  # the chain ends in their root
    # their client, made to trust our server so that it is our server's check that refuses it
    client = stranger.client_context(ALICE)
    client.load_verify_locations(cadata=ca.root_pem.decode())
    refused(manager.server_context(BOB), client)


def test_expired_certificate_is_refused(ca_dir: Path, manager: CertificateManager) -> None:
    two_days_ago = FakeClock(time.time() - 48 * HOUR)
    stale = CertificateManager(
        FileCA.load_or_create(ca_dir, clock=two_days_ago),
        lifetime=timedelta(hours=1),
        clock=two_days_ago,
    )
    stale.set_identities([ALICE])
    error = refused(stale.server_context(ALICE), manager.client_context(BOB))
    assert isinstance(error, ssl.SSLCertVerificationError) and "expired" in str(error)
    refused(manager.server_context(BOB), stale.client_context(ALICE))


def test_other_trust_domain_passes_tls_but_not_peer_identity(
    ca_dir: Path, manager: CertificateManager
) -> None:
    # Same root, other trust domain: OpenSSL accepts the chain, peer_identity must not.
    foreign = Identity("other.local", "shop", "web")
    other = CertificateManager(FileCA.load_or_create(ca_dir, "other.local"), trust_domain="other.local")
    other.set_identities([foreign])

    async def session() -> None:
        async with serving(other.server_context(foreign)) as (port, _):
            reader, writer = await connect(port, manager.client_context(ALICE))
            await ping(reader, writer)
            with pytest.raises(IdentityError) as info:
                peer_identity(peer_der(writer), "cluster.local")
            writer.close()
        assert info.value.reason == "wrong_trust_domain"
        assert "other.local" in str(info.value) and "cluster.local was expected" in str(info.value)

    asyncio.run(session())


def test_wrong_identity_is_detected_after_handshake(manager: CertificateManager) -> None:
    async def session() -> None:
        async with serving(manager.server_context(BOB)) as (port, _):
            reader, writer = await connect(port, manager.client_context(ALICE))
            peer = peer_identity(peer_der(writer), "cluster.local")
            writer.close()
        with pytest.raises(IdentityError, match=f"presented {BOB} but {ALICE} was expected") as info:
            expect_identity(peer, ALICE)
        assert info.value.reason == "wrong_identity"

    asyncio.run(session())


# --- CertificateManager: rotation decisions with a fake clock -----------------------------------


def test_renewal_is_due_exactly_at_half_life(ca_dir: Path) -> None:
    m, clock, _ = fake_manager(ca_dir, lifetime=timedelta(hours=24))
    m.set_identities([ALICE])
    half = T0 + 12 * HOUR
    assert m.next_wakeup(T0) == half
    assert m.renew_due(half - 0.001) == []
    assert m.renew_due(half) == [ALICE]
    clock.now = half
    assert m.renew(ALICE)
    assert m.issued_count == 2
    assert m.next_wakeup(clock.now) == half + 12 * HOUR


def test_renew_now_makes_it_due_immediately(ca_dir: Path) -> None:
    m, _, _ = fake_manager(ca_dir)
    m.set_identities([ALICE, BOB])
    m.renew_now(BOB)
    assert m.renew_due(T0) == [BOB]
    assert m.next_wakeup(T0) == T0
    with pytest.raises(KeyError, match="spiffe://cluster.local/ns/x/sa/y"):
        m.renew_now(Identity("cluster.local", "x", "y"))


def test_failed_issue_backs_off_exponentially_then_recovers(ca_dir: Path) -> None:
    m, clock, issuer = fake_manager(ca_dir, retry_initial=1.0, retry_max=60.0)
    issuer.failing = True
    m.set_identities([ALICE])  # recorded, not raised
    delays = []
    for _ in range(8):
        wake = m.next_wakeup(clock.now)
        assert wake is not None
        delays.append(wake - clock.now)
        clock.now = wake
        assert m.renew_due(clock.now) == [ALICE]
        assert m.renew(ALICE) is False
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    [row] = m.certificates()
    assert row["state"] == "pending" and row["serial"] is None
    assert (row["issue_failures"], row["last_error"]) == (9, "CA unreachable")
    with pytest.raises(IssueError, match="no certificate for .* yet: CA unreachable"):
        m.server_context(ALICE)

    issuer.failing = False
    clock.now = m.next_wakeup(clock.now)  # type: ignore[assignment]
    assert m.renew(ALICE)
    [row] = m.certificates()
    assert (row["state"], row["issue_failures"], row["last_error"]) == ("valid", 0, None)
    assert m.next_wakeup(clock.now) == clock.now + 12 * HOUR


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_backoff_is_jittered(ca_dir: Path, factor: float) -> None:
    m, _, issuer = fake_manager(ca_dir, retry_initial=10.0, rng=FixedJitter(factor))
    issuer.failing = True
    m.set_identities([ALICE])
    assert m.next_wakeup(T0) == pytest.approx(T0 + 10.0 * factor)


def test_failed_renewal_keeps_the_old_certificate(ca_dir: Path) -> None:
    m, clock, issuer = fake_manager(ca_dir)
    m.set_identities([ALICE])
    context = m.server_context(ALICE)
    issuer.failing = True
    clock.now = T0 + 12 * HOUR
    assert m.renew(ALICE) is False
    assert m.server_context(ALICE) is context
    [row] = m.certificates()
    assert (row["state"], row["issue_failures"]) == ("renewing", 1)
    assert m.next_wakeup(clock.now) == clock.now + 1.0


def test_states_valid_renewing_expired(ca_dir: Path) -> None:
    m, _, _ = fake_manager(ca_dir, lifetime=timedelta(hours=24))
    m.set_identities([BOB, ALICE])
    rows = m.certificates(T0)
    assert [r["identity"] for r in rows] == sorted([ALICE.uri, BOB.uri])
    assert {r["state"] for r in rows} == {"valid"}
    assert rows[0]["not_before"] == "2025-06-15T15:05:40Z"  # T0 less the clock-skew minute
    assert rows[0]["not_after"] == "2025-06-16T15:06:40Z"
    assert int(rows[0]["serial"], 16) > 0
    assert {r["state"] for r in m.certificates(T0 + 12 * HOUR)} == {"renewing"}
    assert {r["state"] for r in m.certificates(T0 + 24 * HOUR)} == {"expired"}
    assert "PRIVATE" not in json.dumps(m.certificates()) + repr(m)


def test_set_identities_issues_new_and_forgets_old(ca_dir: Path) -> None:
    m, _, _ = fake_manager(ca_dir)
    m.set_identities([ALICE, BOB])
    m.set_identities([BOB, ALICE])  # nothing new: nothing issued
    assert m.issued_count == 2
    m.set_identities([BOB])
    assert [r["identity"] for r in m.certificates()] == [BOB.uri]
    with pytest.raises(KeyError, match=f"no certificate is held for {ALICE}"):
        m.client_context(ALICE)
    assert m.renew_due(T0 + 100 * HOUR) == [BOB]
    m.set_identities([])
    assert m.next_wakeup(T0) is None
    with pytest.raises(ValueError, match="outside trust domain cluster.local: spiffe://other.local/"):
        m.set_identities([Identity("other.local", "a", "b")])


def test_contexts_are_cached_per_certificate(manager: CertificateManager) -> None:
    server, client = manager.server_context(BOB), manager.client_context(ALICE)
    assert manager.server_context(BOB) is server and manager.client_context(ALICE) is client
    assert manager.server_context(ALICE) is not server

    async def session() -> None:
        async with serving(server) as (port, _):
            reader, writer = await connect(port, client)
            await ping(reader, writer)
            assert manager.renew(BOB) and manager.renew(ALICE)
            assert manager.server_context(BOB) is not server
            assert manager.client_context(ALICE) is not client
            await ping(reader, writer)  # the connection made with the old contexts carries on
            writer.close()
        async with serving(manager.server_context(BOB)) as (port, _):
            reader, writer = await connect(port, manager.client_context(ALICE))
            await ping(reader, writer)
            writer.close()

    asyncio.run(session())


def test_no_key_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = FileCA.load_or_create(tmp_path / "ca")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    def files() -> set[Path]:
        return set(tmp_path.rglob("*"))

    before = files()
    m = CertificateManager(ca)
    m.set_identities([ALICE, BOB])
    m.server_context(ALICE), m.client_context(BOB)
    m.renew(ALICE)
    assert files() == before
    assert os.listdir(work) == []


def test_run_renews_on_its_own(ca: FileCA) -> None:
    m = CertificateManager(ca, lifetime=timedelta(seconds=2))
    m.set_identities([ALICE])
    first = m.certificates()[0]["serial"]

    async def scenario() -> None:
        task = asyncio.create_task(m.run())
        try:
            deadline = time.monotonic() + 1.5
            while m.certificates()[0]["serial"] == first:
                assert time.monotonic() < deadline, "run() did not renew at half-life"
                await asyncio.sleep(0.02)
            # renew_now wakes the sleeping loop at once
            renewed = m.issued_count
            m.renew_now(ALICE)
            await asyncio.sleep(0.05)
            assert m.issued_count == renewed + 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
