"""Root rotation: trust bundles of several roots, the watch of a CA directory, and the three steps
(prepare, activate, finish) with a fake clock, including steps out of order, interrupted steps
and broken directories; and real mutual TLS between certificates of the old and the new root."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from agent import views
from agent.cli import main
from tests.unit.test_identity import ALICE, BOB, T0, FakeClock, connect, ping, refused, serving
from ztunnel.cawatch import CADirectoryWatch
from ztunnel.identity import (
    CAError,
    CertificateManager,
    FileCA,
    IssuedCertificate,
    IssueError,
    fingerprint,
    new_root,
    private_pem,
)
from ztunnel.rotation import (
    ACTIVATED,
    NONE,
    PREPARED,
    RotationError,
    RotationFiles,
    activate,
    finish,
    prepare,
    run_step,
    short,
    status,
)

HOUR = 3600.0
DAY = timedelta(days=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca_dir(tmp_path: Path, clock: FakeClock) -> Path:
    directory = tmp_path / "ca"
    FileCA.load_or_create(directory, clock=clock)
    return directory


def new_pair(clock: FakeClock):
    def make() -> tuple[bytes, x509.Certificate]:
        key, root = new_root("cluster.local", clock())
        return private_pem(key), root
    return make


def step(ca_dir: Path, clock: FakeClock, name: str, **options: object) -> tuple[str, FileCA]:
    """Runs one rotation step on `ca_dir` at the fake clock's time; returns its 'done' and the CA."""
    decide = {
        "prepare": lambda files: prepare(files, clock(), new_pair(clock)),
        "activate": lambda files: activate(files, clock()),
        "finish": lambda files: finish(files, clock(), DAY, bool(options.get("force"))),
        "status": lambda files: status(files, clock(), DAY),
    }[name]
    plan, ca = run_step(ca_dir, decide, clock)
    return plan.done, ca


def bundle_of(ca: FileCA) -> list[str]:
    return [fingerprint(root) for root in ca.roots]


# --- trust bundles ---------------------------------------------------------------------------


def test_a_directory_without_a_bundle_trusts_its_root_alone(ca_dir: Path) -> None:
    ca = FileCA.load_or_create(ca_dir)
    assert bundle_of(ca) == [ca.root_fingerprint]
    assert ca.trust_bundle == ca.root_pem


def test_the_bundle_holds_every_root_and_leaves_chain_to_the_signing_one(ca_dir: Path, tmp_path: Path) -> None:
    other = FileCA.load_or_create(tmp_path / "other")
    ours = FileCA.load_or_create(ca_dir)
    (ca_dir / "trust-bundle.pem").write_bytes(other.root_pem + ours.root_pem)
    ca = FileCA.load_or_create(ca_dir)
    assert bundle_of(ca) == [other.root_fingerprint, ours.root_fingerprint]
    assert ca.trust_bundle == other.root_pem + ours.root_pem
    issued = ca.issue(ALICE, new_root("cluster.local", T0)[0].public_key(), timedelta(hours=1))
    assert issued.chain_pem.endswith(ours.root_pem)


@pytest.mark.parametrize("content, error", [
    (b"", "holds no PEM certificate"),
    (b"not pem at all\n", "holds no PEM certificate"),
    ("cut", "2 PEM blocks but 1 whole certificates: it is cut short"),
    ("key", "holds something else"),
    ("leaf", "is not a CA certificate"),
    ("without signing root", "does not hold the signing root"),
])
def test_a_broken_bundle_is_refused_naming_the_file(ca_dir: Path, tmp_path: Path, content, error: str) -> None:
    ours = FileCA.load_or_create(ca_dir)
    other = FileCA.load_or_create(tmp_path / "other")
    key, root = new_root("cluster.local", T0)
    contents = {
        "cut": ours.root_pem + other.root_pem[:-40],
        "key": ours.root_pem + private_pem(key),
        "leaf": ours.root_pem + ours.issue(ALICE, key.public_key(), timedelta(hours=1)).chain_pem[:-len(ours.root_pem)],
        "without signing root": other.root_pem,
    }
    (ca_dir / "trust-bundle.pem").write_bytes(contents.get(content, content))
    with pytest.raises(CAError, match=error) as info:
        FileCA.load_or_create(ca_dir)
    assert str(ca_dir / "trust-bundle.pem") in str(info.value)


def test_a_bundle_without_its_pair_is_not_taken_for_an_empty_directory(tmp_path: Path, ca_dir: Path) -> None:
    empty = tmp_path / "restored"
    empty.mkdir()
    (empty / "trust-bundle.pem").write_bytes((ca_dir / "ca.crt").read_bytes())
    with pytest.raises(CAError, match="trust-bundle.pem exists but ca.key and ca.crt do not"):
        FileCA.load_or_create(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["trust-bundle.pem"]  # no new root made


# --- the three steps -------------------------------------------------------------------------


def test_a_whole_rotation_step_by_step(ca_dir: Path, clock: FakeClock) -> None:
    old = FileCA.load_or_create(ca_dir).root_fingerprint
    assert RotationFiles.read(ca_dir).step == NONE

    done, ca = step(ca_dir, clock, "prepare")
    files = RotationFiles.read(ca_dir)
    assert files.step == PREPARED and files.next_root is not None
    new = fingerprint(files.next_root)
    assert ca.root_fingerprint == old and bundle_of(ca) == [old, new]  # trusted, not signing
    assert f"made a new root CA {short(new)}" in done

    clock.now += HOUR
    done, ca = step(ca_dir, clock, "activate")
    assert RotationFiles.read(ca_dir).step == ACTIVATED
    assert ca.root_fingerprint == new and bundle_of(ca) == [new, old]  # the old one still trusted, the signer first
    assert not (ca_dir / "next-ca.key").exists() and not (ca_dir / "next-ca.crt").exists()
    record = json.loads((ca_dir / "rotation.json").read_text())
    assert record == {"retiring": [old], "activated_at": "2025-06-15T16:06:40Z"}

    clock.now += DAY.total_seconds() + HOUR
    done, ca = step(ca_dir, clock, "finish")
    assert RotationFiles.read(ca_dir).step == NONE
    assert ca.root_fingerprint == new and bundle_of(ca) == [new]
    assert f"dropped the retiring root {short(old)}" in done
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key", "trust-bundle.pem"]


def test_each_step_run_again_changes_nothing(ca_dir: Path, clock: FakeClock) -> None:
    for name, again in (("prepare", "already prepared"), ("activate", "already activated"),
                        ("finish", "no rotation is under way")):
        step(ca_dir, clock, name, force=True)
        before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
        done, _ = step(ca_dir, clock, name, force=True)
        assert done.startswith(again)
        assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


@pytest.mark.parametrize("done, name, error", [
    ([], "activate", r"no new root is prepared .*run `ameshctl ca rotate prepare .*` first"),
    (["prepare"], "finish", r"prepared but does not sign yet: run `ameshctl ca rotate activate"),
    (["prepare", "activate"], "prepare", r"is not finished: run `ameshctl ca rotate finish"),
])
def test_a_step_out_of_order_is_refused_and_changes_nothing(
    ca_dir: Path, clock: FakeClock, done: list[str], name: str, error: str
) -> None:
    for earlier in done:
        step(ca_dir, clock, earlier)
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    with pytest.raises(RotationError, match=error):
        step(ca_dir, clock, name)
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


def test_finish_waits_for_the_old_roots_certificates_to_expire_unless_forced(ca_dir: Path, clock: FakeClock) -> None:
    step(ca_dir, clock, "prepare")
    step(ca_dir, clock, "activate")
    clock.now += DAY.total_seconds()  # the last old-root leaf, issued just before, may still be valid
    with pytest.raises(RotationError, match=r"may still be in use until 2025-06-16T15:16:40Z .* --force"):
        step(ca_dir, clock, "finish")
    assert RotationFiles.read(ca_dir).step == ACTIVATED
    _, ca = step(ca_dir, clock, "finish", force=True)
    assert len(ca.roots) == 1


def test_prepare_refuses_a_broken_directory_and_writes_nothing(ca_dir: Path, clock: FakeClock) -> None:
    (ca_dir / "ca.key").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        step(ca_dir, clock, "prepare")
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("crash_after, seen_as", [
    (1, "prepared: "), (2, "prepared: "),  # rotation.json, then ca.key: ca.crt still the old root
    (3, "the activate step"), (4, "the activate step"),  # ca.crt, then the bundle (the signer first)
    (5, "the activate step"),  # next-ca.key removed
])
def test_an_activate_stopped_after_any_file_completes_when_run_again(
    ca_dir: Path, clock: FakeClock, crash_after: int, seen_as: str
) -> None:
    old = FileCA.load_or_create(ca_dir).root_fingerprint
    step(ca_dir, clock, "prepare")
    new = fingerprint(RotationFiles.read(ca_dir).next_root)  # type: ignore[arg-type]
    plan = activate(RotationFiles.read(ca_dir), clock())
    # carry out only the first `crash_after` changes, as a crash would leave them
    changes = [("write", name, data) for name, data in plan.writes] + [("remove", name, b"") for name in plan.removes]
    for kind, name, data in changes[:crash_after]:
        if kind == "write":
            (ca_dir / name).write_bytes(data)
        else:
            (ca_dir / name).unlink()
    assert RotationFiles.read(ca_dir).step == PREPARED  # next-ca.crt goes last
    assert status(RotationFiles.read(ca_dir), clock()).done.startswith(seen_as)
    _, ca = step(ca_dir, clock, "activate")
    assert ca.root_fingerprint == new and bundle_of(ca) == [new, old]
    assert json.loads((ca_dir / "rotation.json").read_text())["retiring"] == [old]
    assert RotationFiles.read(ca_dir).step == ACTIVATED


def test_a_prepare_that_stopped_before_the_bundle_is_completed(ca_dir: Path, clock: FakeClock) -> None:
    plan = prepare(RotationFiles.read(ca_dir), clock(), new_pair(clock))
    for name, data in plan.writes[:2]:  # next-ca.key and next-ca.crt, not the bundle
        (ca_dir / name).write_bytes(data)
    with pytest.raises(RotationError, match="prepare stopped short"):
        step(ca_dir, clock, "activate")
    done, ca = step(ca_dir, clock, "prepare")
    assert "an earlier prepare stopped before it" in done and len(ca.roots) == 2


def test_a_malformed_rotation_record_is_named(ca_dir: Path, clock: FakeClock) -> None:
    step(ca_dir, clock, "prepare")
    step(ca_dir, clock, "activate")
    (ca_dir / "rotation.json").write_text('{"retiring": "AB:CD"}')
    with pytest.raises(CAError, match=r"rotation.json is not a rotation record"):
        step(ca_dir, clock, "finish", force=True)


def test_no_step_runs_on_a_directory_without_a_ca(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(CAError, match=r"holds no root CA .*ameshctl ca init"):
        step(tmp_path / "nothing", clock, "prepare")
    assert not (tmp_path / "nothing").exists()


def test_the_cli_walks_through_the_steps(ca_dir: Path) -> None:
    runner = CliRunner()
    prepared = runner.invoke(main, ["ca", "rotate", "prepare", str(ca_dir)])
    assert prepared.exit_code == 0, prepared.output
    assert "next: wait until every agent trusts the new root" in prepared.output
    assert prepared.output.count("  trusted ") == 1 and prepared.output.count("  signs ") == 1
    early = runner.invoke(main, ["ca", "rotate", "finish", str(ca_dir)])
    assert early.exit_code == 1 and "run `ameshctl ca rotate activate" in early.output
    assert runner.invoke(main, ["ca", "rotate", "activate", str(ca_dir)]).exit_code == 0
    waiting = runner.invoke(main, ["ca", "rotate", "finish", str(ca_dir)])
    assert waiting.exit_code == 1 and "--force" in waiting.output
    finished = runner.invoke(main, ["ca", "rotate", "finish", "--force", str(ca_dir)])
    assert finished.exit_code == 0 and "next: nothing" in finished.output


# --- the watch of a CA directory -------------------------------------------------------------


def test_the_watch_hands_on_a_changed_directory_once(ca_dir: Path, clock: FakeClock) -> None:
    watch = CADirectoryWatch(ca_dir, "cluster.local", clock=clock)
    first = watch.load_or_create()
    assert watch.poll() is None  # nothing changed
    os.utime(ca_dir / "ca.crt")  # touched, same content: not a new CA
    assert watch.poll() is None
    step(ca_dir, clock, "prepare")
    new = watch.poll()
    assert new is not None and len(new.roots) == 2 and new.root_fingerprint == first.root_fingerprint
    assert watch.poll() is None and watch.ca is new and watch.reloads == 1


def test_the_watch_refuses_a_broken_directory_and_keeps_the_last_good_ca(
    ca_dir: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    watch = CADirectoryWatch(ca_dir, "cluster.local", clock=clock)
    good = watch.load_or_create()
    good_bundle = (ca_dir / "ca.crt").read_bytes()
    (ca_dir / "trust-bundle.pem").write_bytes(good_bundle[:-30])  # caught half-written
    with caplog.at_level(logging.ERROR, "amesh.ztunnel"):
        assert watch.poll() is None
        os.utime(ca_dir / "trust-bundle.pem", ns=(1, 1))  # changed stat, same content: not logged again
        assert watch.poll() is None
    assert watch.ca is good and str(ca_dir / "trust-bundle.pem") in (watch.last_error or "")
    [logged] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "ca.refused" in logged and "keeping the last good CA" in logged
    assert watch.status()["refusals"] == 1
    (ca_dir / "trust-bundle.pem").write_bytes(good_bundle)  # written whole: taken
    assert watch.poll() is not None and watch.last_error is None


# --- certificates across a rotation ----------------------------------------------------------


def test_a_new_issuer_renews_every_certificate_at_once(ca_dir: Path, clock: FakeClock) -> None:
    watch = CADirectoryWatch(ca_dir, "cluster.local", clock=clock)
    manager = CertificateManager(watch.load_or_create(), clock=clock)
    manager.set_identities([ALICE, BOB])
    assert manager.renew_due(clock()) == []
    step(ca_dir, clock, "prepare")
    manager.set_issuer(watch.poll())  # type: ignore[arg-type]
    assert manager.renew_due(clock()) == [BOB, ALICE]
    for identity in manager.renew_due(clock()):
        manager.renew(identity)
    rows = manager.certificates()
    assert {len(r["trusts"]) for r in rows} == {2}
    assert [r["signing"] for r in manager.roots()] == [True, False]


def test_a_certificate_whose_chain_leads_to_no_root_of_the_bundle_is_not_taken(ca_dir: Path, tmp_path: Path) -> None:
    class StrayIssuer:  # signs with one CA, hands out the bundle of another
        def __init__(self) -> None:
            self.signer = FileCA.load_or_create(ca_dir)
            other = FileCA.load_or_create(tmp_path / "other")
            self.trust_bundle, self.root_fingerprint = other.trust_bundle, other.root_fingerprint

        def issue(self, identity, public_key, lifetime) -> IssuedCertificate:
            return self.signer.issue(identity, public_key, lifetime)

    manager = CertificateManager(StrayIssuer())
    manager.set_identities([ALICE])
    [row] = manager.certificates()
    assert row["state"] == "pending" and "leads to none of the roots of its trust bundle" in row["last_error"]
    with pytest.raises(IssueError):
        manager.server_context(ALICE)


def test_old_and_new_roots_talk_during_the_rotation_and_the_old_is_refused_after(
    ca_dir: Path, clock: FakeClock
) -> None:
    """Real mutual TLS between two nodes: `lagging` follows prepare but keeps its old-root
    certificate after activate (it has not renewed yet); `current` renews at every step."""
    clock.now = time.time()  # real TLS judges validity by the real clock
    lagging = CertificateManager(FileCA.load_or_create(ca_dir, clock=clock), clock=clock)
    lagging.set_identities([ALICE])
    current = CertificateManager(FileCA.load_or_create(ca_dir, clock=clock), clock=clock)
    current.set_identities([BOB])

    async def talks(server: CertificateManager, server_id, client: CertificateManager, client_id) -> None:
        async with serving(server.server_context(server_id)) as (port, _):
            reader, writer = await connect(port, client.client_context(client_id))
            await ping(reader, writer)
            writer.close()

    def follow(manager: CertificateManager, identity) -> None:
        manager.set_issuer(FileCA.load_or_create(ca_dir, clock=clock))
        manager.renew(identity)

    step(ca_dir, clock, "prepare")
    follow(lagging, ALICE)
    follow(current, BOB)
    step(ca_dir, clock, "activate")
    follow(current, BOB)
    assert current.certificates()[0]["root"] != lagging.certificates()[0]["root"]
    asyncio.run(talks(current, BOB, lagging, ALICE))  # a new-root server, an old-root client
    asyncio.run(talks(lagging, ALICE, current, BOB))  # and the other way
    step(ca_dir, clock, "finish", force=True)
    follow(current, BOB)
    refused(current.server_context(BOB), lagging.client_context(ALICE))  # fails unless refused


def test_certs_table_shows_the_bundle_each_certificates_root_and_a_refused_directory(
    ca_dir: Path, clock: FakeClock
) -> None:
    step(ca_dir, clock, "prepare")
    step(ca_dir, clock, "activate")
    watch = CADirectoryWatch(ca_dir, "cluster.local", clock=clock)
    manager = CertificateManager(watch.load_or_create(), clock=clock)
    manager.set_identities([ALICE])
    (ca_dir / "ca.crt").write_bytes(b"")  # refused: the table says so
    watch.poll()
    table = views.certs({"trust_domain": manager.trust_domain, "root_fingerprint": manager.root_fingerprint,
                         "trust_bundle": manager.roots(), "ca_directory": watch.status(),
                         "certificates": manager.certificates()})
    new, old = (r["fingerprint"] for r in manager.roots())
    assert f"trust bundle: {short(old)} trusted" in table and f"trust bundle: {short(new)} signs" in table
    assert f"valid    {short(new)}" in table
    assert f"CA directory {ca_dir} refused, last good CA kept: {ca_dir / 'ca.crt'} is not a PEM certificate" in table


def test_the_watch_sees_a_secret_volume_swap_its_files_at_once(
    tmp_path: Path, ca_dir: Path, clock: FakeClock
) -> None:
    """A Kubernetes Secret volume as kubelet writes it: each file a symlink through ..data to a
    timestamped directory, and an update a new directory that ..data is renamed to point at."""
    volume = tmp_path / "secret"
    volume.mkdir()

    def publish(version: str) -> None:
        (volume / version).mkdir()
        for source in ca_dir.iterdir():
            (volume / version / source.name).write_bytes(source.read_bytes())
            (volume / version / source.name).chmod(0o400)
            if not (volume / source.name).is_symlink():
                (volume / source.name).symlink_to(Path("..data") / source.name)
        (volume / "..data_tmp").symlink_to(version)
        os.replace(volume / "..data_tmp", volume / "..data")

    publish("..v1")
    watch = CADirectoryWatch(volume, "cluster.local", clock=clock)
    first = watch.load_or_create()
    step(ca_dir, clock, "prepare")  # the operator's copy, then put back into the Secret
    publish("..v2")
    prepared = watch.poll()
    assert prepared is not None and len(prepared.roots) == 2 and prepared.root_fingerprint == first.root_fingerprint
    step(ca_dir, clock, "activate")  # the symlinks stay as they are; only what ..data points at changes
    publish("..v3")
    activated = watch.poll()
    assert activated is not None and activated.root_fingerprint == fingerprint(prepared.roots[1])
