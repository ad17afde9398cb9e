"""Root rotation with the cluster CA: the agents' watch of their trust bundle file (the ConfigMap
amesh-trust-bundle), and the CA following its directory (the Secret amesh-ca) through prepare,
activate and a broken directory, with real TLS between the agent's client and the CA."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from agent.cli import main

from ca.client import ClusterCAClient
from tests.unit.test_ca_service import WEB, client_for, cluster, request_for  # noqa: F401 (cluster: a fixture)
from ztunnel import rotation
from ztunnel.cawatch import TrustBundleWatch
from ztunnel.identity import (
    CAError,
    CertificateManager,
    FileCA,
    IssueError,
    certificate_pem,
    fingerprint,
    load_roots,
    new_root,
    private_pem,
)

WAIT = 5.0  # seconds for the CA's watch (polling every 0.1 s) to take a changed directory


def publish(volume: Path, version: str, pem: bytes) -> Path:
    """Writes `pem` as kubelet updates a ConfigMap volume: a new timestamped directory, the
    ..data symlink renamed to point at it, ca.crt a symlink through ..data; returns ca.crt."""
    (volume / version).mkdir(parents=True)
    (volume / version / "ca.crt").write_bytes(pem)
    if not (volume / "ca.crt").is_symlink():
        (volume / "ca.crt").symlink_to(Path("..data") / "ca.crt")
    (volume / "..data_tmp").symlink_to(version)
    os.replace(volume / "..data_tmp", volume / "..data")
    return volume / "ca.crt"


def roots(tmp_path: Path, *names: str) -> list[FileCA]:
    return [FileCA.load_or_create(tmp_path / name) for name in names]


def fingerprints(certificates: tuple[x509.Certificate, ...] | None) -> list[str]:
    return [fingerprint(c) for c in certificates or ()]


@pytest.mark.parametrize("broken, error", [
    (lambda a, b: a.root_pem + b.root_pem[:-40], "has 2 PEM blocks but 1 whole certificates: it is cut short"),
    (lambda a, b: a.root_pem + (a.directory / "ca.key").read_bytes(), "holds a private key"),
    (lambda a, b: b"", "holds no PEM certificate"),
])
def test_a_broken_bundle_is_refused_naming_the_file_and_the_last_good_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken, error: str
) -> None:
    old, new = roots(tmp_path, "old", "new")
    path = tmp_path / "bundle.pem"
    path.write_bytes(old.root_pem)
    watch = TrustBundleWatch(path)
    assert fingerprints(watch.start()) == [old.root_fingerprint]
    path.write_bytes(broken(old, new))
    with caplog.at_level(logging.ERROR, "amesh.ztunnel"):
        assert watch.poll() is None
        os.utime(path, ns=(1, 1))  # looked at again, the same content: still refused, not logged again
        assert watch.poll() is None
    assert fingerprints(watch.current) == [old.root_fingerprint] and watch.bundle == old.root_pem
    assert watch.last_error is not None and str(path) in watch.last_error and error in watch.last_error
    assert watch.refusals == 1 and watch.status()["file"] == str(path)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "trust_bundle.refused" in caplog.text and "keeping the last good trust bundle" in caplog.text
    path.write_bytes(old.root_pem + new.root_pem)  # fixed: taken whole, the error gone
    assert fingerprints(watch.poll()) == [old.root_fingerprint, new.root_fingerprint]
    assert watch.last_error is None and watch.reloads == 1


def test_a_missing_bundle_is_refused_and_the_last_good_is_kept(tmp_path: Path) -> None:
    (old,) = roots(tmp_path, "old")
    path = tmp_path / "bundle.pem"
    path.write_bytes(old.root_pem)
    watch = TrustBundleWatch(path)
    watch.start()
    path.unlink()
    assert watch.poll() is None and watch.bundle == old.root_pem
    assert watch.last_error == f"cannot read the trust bundle {path}: No such file or directory"


def test_the_watch_follows_a_configmap_volume_swapping_its_data_symlink(tmp_path: Path) -> None:
    old, new = roots(tmp_path, "old", "new")
    volume = tmp_path / "amesh-trust-bundle"
    path = publish(volume, "..2026_12_01_v1", old.root_pem)
    watch = TrustBundleWatch(path)
    watch.start()
    assert watch.poll() is None  # nothing changed
    publish(volume, "..2026_12_01_v2", old.root_pem + new.root_pem)  # prepare
    assert fingerprints(watch.poll()) == [old.root_fingerprint, new.root_fingerprint]
    publish(volume, "..2026_12_01_v3", new.root_pem + old.root_pem)  # activate: the signer first
    assert fingerprints(watch.poll()) == [new.root_fingerprint, old.root_fingerprint]
    assert watch.poll() is None and watch.reloads == 2


def test_the_client_refuses_a_bundle_cut_short_at_start_naming_the_file(tmp_path: Path) -> None:
    old, new = roots(tmp_path, "old", "new")
    path = tmp_path / "bundle.pem"
    path.write_bytes(old.root_pem + new.root_pem[:-40])  # the parser alone drops the second block silently
    with pytest.raises(CAError, match=f"{path} has 2 PEM blocks but 1 whole certificates"):
        ClusterCAClient("127.0.0.1:1", tmp_path / "token", path, "cluster.local")


def wait_until(what: str, condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ca_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return response.read().decode()


def new_pair() -> tuple[bytes, x509.Certificate]:
    key, root = new_root("cluster.local", time.time())
    return private_pem(key), root


def rotate_secret(secret: Path, name: str, *args: object) -> FileCA:
    """One `ameshctl ca rotate` step on the CA's Secret; returns the CA it leaves."""
    _, ca = rotation.run_step(secret, lambda files: getattr(rotation, name)(files, time.time(), *args), time.time)
    return ca


def agent_of(api, server, bundle: Path, tmp_path: Path) -> tuple[ClusterCAClient, CertificateManager]:
    """node-1's client of the CA and its certificate manager, holding WEB's certificate."""
    token = api.request_token("amesh-system", "amesh-agent", "agent-1", ["amesh-ca"])
    client = client_for(server, bundle, token, tmp_path)
    certs = CertificateManager(client)
    certs.set_identities([WEB])
    asyncio.run(certs.renew_due_now())
    return client, certs


def test_the_ca_and_its_agents_follow_a_rotation_and_a_broken_directory_is_refused(cluster, tmp_path: Path) -> None:
    api, server, bundle = cluster
    secret = server.config.ca_dir
    client, certs = agent_of(api, server, bundle, tmp_path)
    old = server.root.root_fingerprint
    assert [(c["root"], c["trusts"]) for c in certs.certificates()] == [(old, [old])]

    def step(name: str, *args: object) -> FileCA:
        """One rotation step on the Secret, and its bundle into the ConfigMap."""
        ca = rotate_secret(secret, name, *args)
        bundle.write_bytes(ca.trust_bundle)
        assert client.trust.poll() is not None  # the agent's watch: then certs.set_issuer, as the agent does
        certs.set_issuer(client)
        return ca

    prepared = step("prepare", new_pair)
    new = fingerprint(prepared.roots[1])
    wait_until("the CA to take the prepared bundle", lambda: server.watch.reloads == 1)
    asyncio.run(certs.renew_due_now())  # renewed at once: trusting both, still from the old root
    assert [(c["root"], c["trusts"]) for c in certs.certificates()] == [(old, [old, new])]

    only_new = tmp_path / "only-new.pem"
    only_new.write_bytes(certificate_pem(prepared.roots[1]))
    new_only_client = ClusterCAClient(client.address, client.token_file, only_new, "cluster.local")
    with pytest.raises(IssueError, match="CERTIFICATE_VERIFY_FAILED"):  # the CA still serves from the old root
        new_only_client.issue_request(WEB, request_for(WEB), timedelta(hours=1))

    step("activate")
    wait_until("the CA to sign with the new root", lambda: server.root.root_fingerprint == new)
    asyncio.run(certs.renew_due_now())
    assert [(c["root"], c["trusts"]) for c in certs.certificates()] == [(new, [new, old])]
    assert client.root_fingerprint == new
    new_only_client.issue_request(WEB, request_for(WEB), timedelta(hours=1))  # its serving certificate too
    assert f'amesh_ca_server_signing_root{{fingerprint="{new}"}} 1.0' in ca_metrics(server.config.metrics_port)

    # a poll may have caught a rotation step's files half written (refused, then read whole): only
    # refusals after this one count
    refused_before = server.watch.refusals
    (secret / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\n")  # a Secret edited by hand, badly
    wait_until("the CA to refuse its directory", lambda: server.watch.refusals > refused_before
               and str(secret / "ca.crt") in (server.watch.last_error or ""))
    issued = client.issue_request(WEB, request_for(WEB), timedelta(hours=1))  # the last good root signs
    assert fingerprint(x509.load_pem_x509_certificates(issued.chain_pem)[-1]) == new
    metrics = ca_metrics(server.config.metrics_port)
    assert f"amesh_ca_server_root_refusals_total {server.watch.refusals}.0" in metrics
    assert "amesh_ca_server_root_reloads_total 2.0" in metrics


def test_each_step_writes_the_bundle_for_the_agents_and_says_how_to_publish_it(tmp_path: Path) -> None:
    (old,) = roots(tmp_path, "ca")
    out = tmp_path / "configmap" / "ca.crt"
    out.parent.mkdir()
    runner = CliRunner()

    def rotate(*args: str) -> str:
        result = runner.invoke(main, ["ca", "rotate", *args, "--trust-bundle-out", str(out), str(old.directory)])
        assert result.exit_code == 0, result.output
        assert out.read_bytes() == (old.directory / "trust-bundle.pem").read_bytes()
        return result.output

    prepared = rotate("prepare")
    assert fingerprints(load_roots(out.read_bytes(), out))[0] == old.root_fingerprint
    assert f"trust bundle written to {out}" in prepared
    assert "update the Secret, then the ConfigMap; wait until every agent trusts the new root" in prepared
    assert (f"kubectl -n amesh-system create configmap amesh-trust-bundle --from-file=ca.crt={old.directory}/"
            "trust-bundle.pem --dry-run=client -o yaml | kubectl replace -f -") in prepared
    activated = rotate("activate")
    new = FileCA.load_or_create(old.directory).root_fingerprint
    assert fingerprints(load_roots(out.read_bytes(), out)) == [new, old.root_fingerprint]  # the signer first
    assert "update the Secret first; once the CA signs with the new root" in activated
    assert "kubectl" not in rotate("status")  # changes nothing: nothing to publish
    finished = rotate("finish", "--force")
    assert fingerprints(load_roots(out.read_bytes(), out)) == [new] and "kubectl" in finished


def test_a_certificate_from_another_root_than_the_bundles_first_serves_and_is_asked_for_again(
    cluster, tmp_path: Path
) -> None:
    api, server, bundle = cluster
    secret = server.config.ca_dir
    old, new = rotate_secret(secret, "prepare", new_pair).roots
    bundle.write_bytes(certificate_pem(new) + certificate_pem(old))  # the ConfigMap of activate, too early
    wait_until("the CA to take the prepared bundle", lambda: server.watch.reloads == 1)
    client, certs = agent_of(api, server, bundle, tmp_path)
    [row] = certs.certificates()
    assert (row["root"], row["state"], row["issue_failures"]) == (fingerprint(old), "renewing", 1)
    assert f"not by {fingerprint(new)}, the signing root of the trust bundle: asking again" in row["last_error"]
    assert certs.next_wakeup(time.time()) <= time.time() + 1.2  # the first retry: 1 s, jittered
    certs.client_context(WEB)  # it serves meanwhile: its root is trusted

    rotate_secret(secret, "activate")
    wait_until("the CA to sign with the new root", lambda: server.root.root_fingerprint == fingerprint(new))
    certs.renew_now(WEB)  # the retry's time come
    asyncio.run(certs.renew_due_now())
    [row] = certs.certificates()
    assert (row["root"], row["state"], row["issue_failures"], row["last_error"]) == (fingerprint(new), "valid", 0, None)


class BundleReadBeforeAChange:
    """A remote issuer over a FileCA whose bundle, read in the worker thread, is the one of just
    before a change: the change lands while that issue is still on its way back to the loop."""

    def __init__(self, ca: FileCA) -> None:
        self.ca, self.bundle, self.root_fingerprint = ca, ca.trust_bundle, ca.root_fingerprint
        self.asked, self.read, self.changed = threading.Event(), threading.Event(), threading.Event()

    @property
    def trust_bundle(self) -> bytes:
        bundle = self.bundle
        if self.asked.is_set() and not self.read.is_set():  # the issue's read, once the CA answered
            self.read.set()
            self.changed.wait(5)  # the test changes the bundle meanwhile
        return bundle

    def issue_request(self, identity, request: x509.CertificateSigningRequest, lifetime: timedelta):
        self.asked.set()
        return self.ca.issue(identity, request.public_key(), lifetime)


def test_an_issue_under_way_when_the_bundle_changes_is_renewed_again(tmp_path: Path) -> None:
    old, new = roots(tmp_path, "old", "new")
    issuer = BundleReadBeforeAChange(old)
    certs = CertificateManager(issuer)

    async def scenario() -> None:
        certs.set_identities([WEB])
        issuing = asyncio.create_task(certs.renew_due_now())
        assert await asyncio.to_thread(issuer.read.wait, 5)
        issuer.bundle = old.root_pem + new.root_pem
        certs.set_issuer(issuer)
        issuer.changed.set()
        await issuing
        assert certs.certificates()[0]["trusts"] == [old.root_fingerprint]  # the bundle it was issued under
        assert certs.next_wakeup(time.time()) <= time.time()  # so it is due again at once
        await certs.renew_due_now()

    asyncio.run(scenario())
    assert certs.certificates()[0]["trusts"] == [old.root_fingerprint, new.root_fingerprint]
