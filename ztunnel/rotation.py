"""Root rotation without a maintenance window: the three steps that change a CA directory.

    prepare   a new root (next-ca.key, next-ca.crt) joins trust-bundle.pem; every agent comes to
              trust the old and the new root, and the old one still signs
    activate  the new root becomes the signing root (ca.key, ca.crt) and moves to the front of
              the bundle; the old one stays in it, so the certificates it signed keep being
              accepted while every agent renews its own (at once, when it notices the change)
    finish    the old root leaves the bundle: certificates it signed are refused from then on

From activate to finish, rotation.json records which root is retiring and when activation
happened, so finish can tell when the last certificate the old root signed has expired.

Each step is a pure function of the directory as read (`RotationFiles`), the time and, for
prepare, a maker of new roots. It returns a `Plan`: files to write and to remove, in an order
that leaves the directory at a step boundary whatever the moment a crash stops it (re-running the
step completes it), and sentences saying what it did and what the operator does next. A step
already done plans nothing; a step out of order is a `RotationError` that names the step to run.
Agents re-read the directory on their own (ztunnel/cawatch.py).

The bundle lists the signing root first at every step: agents of the cluster CA see only the
bundle (the ConfigMap amesh-trust-bundle), so that is how they know which root signs, and why
activate changes the bundle too: that change is what makes them renew every certificate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from ztunnel.identity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_LIFETIME,
    TRUST_BUNDLE_FILE,
    CAError,
    CAFiles,
    FileCA,
    certificate_pem,
    fingerprint,
    load_ca_certificate,
    load_roots,
    load_signing_pair,
    write_ca_files,
)

NEXT_KEY_FILE = "next-ca.key"  # the prepared root, trusted but not signing yet
NEXT_CERT_FILE = "next-ca.crt"
ROTATION_FILE = "rotation.json"  # from activate to finish: the retiring root, when activated
# finish waits this long beyond one certificate lifetime after activation: agents notice a
# changed directory within seconds, a changed Secret mount within about two minutes, and the
# certificates they issued from the old root until then live one lifetime more
FINISH_MARGIN = timedelta(minutes=10)

NONE, PREPARED, ACTIVATED = "none", "prepared", "activated"  # where a rotation is


class RotationError(Exception):
    """The step cannot run on the directory as it is; the message says which step to run."""


@dataclass(frozen=True)
class RotationRecord:
    """rotation.json: the roots that leave the bundle at finish, and when the new one began signing."""

    retiring: tuple[str, ...]  # SHA-256 fingerprints
    activated_at: float  # wall-clock seconds

    def to_json(self) -> bytes:
        return json.dumps({"retiring": list(self.retiring), "activated_at": _iso(self.activated_at)},
                          indent=2).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, path: Path) -> RotationRecord:
        """The record in `data` (the contents of `path`); CAError naming `path` when malformed."""
        try:
            doc = json.loads(data)
            retiring = doc["retiring"]
            activated = datetime.strptime(doc["activated_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            if not isinstance(retiring, list) or not retiring or not all(isinstance(f, str) for f in retiring):
                raise ValueError("retiring must list the fingerprints of the roots to drop")
        except (ValueError, KeyError, TypeError) as e:
            raise CAError(f"{path} is not a rotation record ({type(e).__name__}: {e}); it is written by "
                          "`ameshctl ca rotate activate`, which can write it again") from None
        return cls(tuple(retiring), activated.timestamp())


@dataclass(frozen=True)
class RotationFiles:
    """A CA directory as the rotation steps see it, read at one moment."""

    directory: Path
    ca_files: CAFiles  # the signing pair and bundle, as an agent loads them
    signing: x509.Certificate  # ca.crt
    bundle: tuple[x509.Certificate, ...]  # trust-bundle.pem, or ca.crt alone without it
    next_root: x509.Certificate | None  # next-ca.crt
    next_key_pem: bytes | None = field(repr=False)  # next-ca.key
    record: RotationRecord | None  # rotation.json

    @classmethod
    def read(cls, directory: Path) -> RotationFiles:
        """The rotation files of `directory`; CAError naming a file that is unreadable or malformed."""
        directory = Path(directory)
        if not (directory / CA_CERT_FILE).exists():
            raise CAError(f"{directory} holds no root CA ({CA_CERT_FILE} is absent): create one with "
                          f"`ameshctl ca init {directory}`, or name the directory the agents use")
        ca_files = CAFiles.read(directory)
        signing = load_ca_certificate(ca_files.cert_pem, directory / CA_CERT_FILE)
        bundle = (load_roots(ca_files.bundle_pem, directory / TRUST_BUNDLE_FILE)
                  if ca_files.bundle_pem is not None else (signing,))
        next_cert = _optional(directory / NEXT_CERT_FILE)
        record = _optional(directory / ROTATION_FILE)
        return cls(
            directory=directory,
            ca_files=ca_files,
            signing=signing,
            bundle=bundle,
            next_root=load_ca_certificate(next_cert, directory / NEXT_CERT_FILE) if next_cert is not None else None,
            next_key_pem=_optional(directory / NEXT_KEY_FILE),
            record=RotationRecord.parse(record, directory / ROTATION_FILE) if record is not None else None,
        )

    @property
    def step(self) -> str:
        """NONE, PREPARED (a next root exists) or ACTIVATED (a retiring root is recorded)."""
        if self.next_root is not None:
            return PREPARED
        return ACTIVATED if self.record is not None else NONE

    def trusts(self, root: x509.Certificate) -> bool:
        return root in self.bundle

    def check_whole(self, now: float) -> None:
        """CAError unless the signing pair and bundle load as an agent loads them."""
        FileCA.from_files(self.ca_files, clock=lambda: now)


@dataclass(frozen=True)
class Plan:
    """What a step changes, in order (renames first, then removals), and what to tell the operator."""

    done: str  # what the step did, or that it was done already
    next: str  # what the operator does next
    writes: tuple[tuple[str, bytes], ...] = ()
    removes: tuple[str, ...] = ()


NewRoot = Callable[[], tuple[bytes, x509.Certificate]]  # a fresh root: its key as PEM, its certificate


def prepare(files: RotationFiles, now: float, new_root: NewRoot) -> Plan:
    """Step 1: a new root in next-ca.key/next-ca.crt, added to the bundle; the old one still signs."""
    if files.step == ACTIVATED:
        assert files.record is not None
        raise RotationError(f"the rotation activated at {_iso(files.record.activated_at)} is not finished: "
                            f"run `ameshctl ca rotate finish {files.directory}` before preparing another")
    if files.step == PREPARED:
        assert files.next_root is not None
        if files.next_root == files.signing:
            raise RotationError(f"activating the prepared root in {files.directory} was interrupted: run "
                                f"`ameshctl ca rotate activate {files.directory}` again to complete it")
        if files.trusts(files.next_root):
            return Plan(f"already prepared: the new root {_fp(files.next_root)} is in "
                        f"{TRUST_BUNDLE_FILE} next to the signing root {_fp(files.signing)}",
                        _after_prepare(files.directory, files.next_root))
        return Plan(f"added the prepared root {_fp(files.next_root)} to {TRUST_BUNDLE_FILE} "
                    "(an earlier prepare stopped before it)", _after_prepare(files.directory, files.next_root),
                    writes=((TRUST_BUNDLE_FILE, _pem(files.bundle + (files.next_root,))),))
    files.check_whole(now)
    key_pem, root = new_root()
    return Plan(
        f"made a new root CA {_fp(root)} ({NEXT_KEY_FILE}, {NEXT_CERT_FILE}) and added it to "
        f"{TRUST_BUNDLE_FILE}: agents trust it as they re-read the directory; the signing root "
        f"{_fp(files.signing)} still signs every certificate",
        _after_prepare(files.directory, root),
        # the bundle last: an agent that reads the directory mid-way sees the old bundle, whole
        writes=((NEXT_KEY_FILE, key_pem), (NEXT_CERT_FILE, certificate_pem(root)),
                (TRUST_BUNDLE_FILE, _pem(files.bundle + (root,)))),
    )


def activate(files: RotationFiles, now: float, lifetime: timedelta = DEFAULT_LIFETIME) -> Plan:
    """Step 2: the prepared root becomes ca.key/ca.crt; the old root stays trusted until finish."""
    if files.step == NONE:
        raise RotationError(f"no new root is prepared in {files.directory} ({NEXT_CERT_FILE} is absent): run "
                            f"`ameshctl ca rotate prepare {files.directory}` first")
    if files.step == ACTIVATED:
        assert files.record is not None
        return Plan(f"already activated at {_iso(files.record.activated_at)}: {_fp(files.signing)} "
                    f"signs, {', '.join(map(short, files.record.retiring))} is still trusted",
                    _after_activate(files.directory, files.signing, files.record, now, lifetime))
    new = files.next_root
    assert new is not None
    if not files.trusts(new):
        raise RotationError(f"{files.directory / NEXT_CERT_FILE} is not in {TRUST_BUNDLE_FILE} (prepare stopped "
                            f"short): run `ameshctl ca rotate prepare {files.directory}` again, and activate "
                            "once every agent trusts it")
    interrupted = new == files.signing  # ca.crt written, next-ca.* not yet removed
    if interrupted:
        if files.record is None:
            raise RotationError(f"{files.directory / CA_CERT_FILE} is already the prepared root but "
                                f"{ROTATION_FILE} is missing, so the retiring root is unknown: write it as "
                                f'{{"retiring": ["<old root fingerprint>"], "activated_at": "{_iso(now)}"}}')
        record = files.record
    else:
        record = RotationRecord((fingerprint(files.signing),), now)
    # rotation.json first, the new pair next, the prepared files last: a crash anywhere leaves
    # next-ca.crt in place, so the directory still reads as prepared and activate runs again
    writes: tuple[tuple[str, bytes], ...] = ((ROTATION_FILE, record.to_json()),)
    if files.next_key_pem is not None:
        load_signing_pair(files.next_key_pem, files.directory / NEXT_KEY_FILE, certificate_pem(new),
                          files.directory / NEXT_CERT_FILE, now)
        writes += ((CA_KEY_FILE, files.next_key_pem), (CA_CERT_FILE, certificate_pem(new)))
    elif not interrupted:
        raise RotationError(f"{files.directory / NEXT_CERT_FILE} exists without {NEXT_KEY_FILE}: restore "
                            f"{NEXT_KEY_FILE}, or remove {NEXT_CERT_FILE} and its root from {TRUST_BUNDLE_FILE} "
                            "and prepare again")
    writes += ((TRUST_BUNDLE_FILE, _pem((new,) + files.bundle)),)  # the signing root first
    return Plan(
        f"the new root {_fp(new)} signs now ({CA_KEY_FILE}, {CA_CERT_FILE}; the old key is gone): "
        "agents renew every certificate with it as they re-read the directory; the old root "
        f"{', '.join(map(short, record.retiring))} stays in {TRUST_BUNDLE_FILE}, so the certificates it signed "
        "keep being accepted",
        _after_activate(files.directory, new, record, now, lifetime),
        writes=writes, removes=(NEXT_KEY_FILE, NEXT_CERT_FILE),
    )


def finish(files: RotationFiles, now: float, lifetime: timedelta = DEFAULT_LIFETIME, force: bool = False) -> Plan:
    """Step 3: the retiring root leaves the bundle, once every certificate it signed can have expired
    (earlier only with `force`, after the operator checked every node)."""
    if files.step == PREPARED:
        assert files.next_root is not None
        raise RotationError(f"the new root {_fp(files.next_root)} is prepared but does not sign yet: "
                            f"run `ameshctl ca rotate activate {files.directory}` first (finish drops the "
                            "old root, which still signs every certificate)")
    if files.step == NONE:
        return Plan(f"no rotation is under way in {files.directory}: {_fp(files.signing)} signs and "
                    f"the bundle holds {_fingerprints(files.bundle)}",
                    f"nothing; to replace the root, run `ameshctl ca rotate prepare {files.directory}`")
    record = files.record
    assert record is not None
    files.check_whole(now)
    if fingerprint(files.signing) in record.retiring:
        raise RotationError(f"{files.directory / ROTATION_FILE} lists the signing root {_fp(files.signing)} "
                            "as retiring: dropping it would make every certificate refused; fix the record")
    expired_by = _expired_by(record, lifetime)
    if now < expired_by and not force:
        raise RotationError(
            f"certificates signed by the retiring root may still be in use until {_iso(expired_by)} "
            f"(activated at {_iso(record.activated_at)}, certificates live {lifetime.total_seconds() / 3600:g} h): "
            f"once `ameshctl certs` on every node shows ROOT {_fp(files.signing)} for every certificate, run "
            f"finish with --force; or run finish after {_iso(expired_by)}")
    kept = tuple(root for root in files.bundle if fingerprint(root) not in record.retiring)
    return Plan(
        f"dropped the retiring root {', '.join(map(short, record.retiring))} from {TRUST_BUNDLE_FILE}: "
        f"certificates it signed are refused as agents re-read the directory; the bundle holds {_fingerprints(kept)}",
        f"nothing: the rotation is complete once every agent's `ameshctl certs` lists only "
        f"{_fingerprints(kept)} in its trust bundle",
        # the bundle first: a crash before rotation.json is removed leaves it activated, finish again
        writes=((TRUST_BUNDLE_FILE, _pem(kept)),), removes=(ROTATION_FILE,),
    )


def status(files: RotationFiles, now: float, lifetime: timedelta = DEFAULT_LIFETIME) -> Plan:
    """Where a rotation stands and what to run next, changing nothing."""
    if files.step == PREPARED:
        assert files.next_root is not None
        if files.next_root == files.signing or not files.trusts(files.next_root):
            step = "activate" if files.next_root == files.signing else "prepare"
            return Plan(f"the {step} step in {files.directory} stopped short",
                        f"run `ameshctl ca rotate {step} {files.directory}` again to complete it")
        return Plan(f"prepared: {_fp(files.next_root)} is trusted, {_fp(files.signing)} signs",
                    _after_prepare(files.directory, files.next_root))
    if files.step == ACTIVATED:
        assert files.record is not None
        return Plan(f"activated at {_iso(files.record.activated_at)}: {_fp(files.signing)} signs, "
                    f"{', '.join(map(short, files.record.retiring))} is still trusted",
                    _after_activate(files.directory, files.signing, files.record, now, lifetime))
    return finish(files, now, lifetime)


def run_step(directory: Path, step: Callable[[RotationFiles], Plan], clock: Callable[[], float]) -> tuple[Plan, FileCA]:
    """Reads `directory`, decides `step` on it, carries the plan out, and loads the result as an
    agent will (a CAError then means the step left something agents refuse)."""
    plan = step(RotationFiles.read(directory))
    if plan.writes or plan.removes:
        write_ca_files(Path(directory), plan.writes, plan.removes)
    return plan, FileCA.from_files(CAFiles.read(Path(directory)), clock=clock)


def short(fingerprint_hex: str) -> str:
    """The first 8 bytes of a fingerprint, as `ameshctl certs` shows a certificate's root."""
    return fingerprint_hex[:23]


def _after_prepare(directory: Path, new: x509.Certificate) -> str:
    return (f"wait until every agent trusts the new root: `ameshctl certs` on each node lists "
            f"{_fp(new)} in its trust bundle (agents re-read the directory every few seconds; "
            f"a Kubernetes Secret reaches them within about two minutes), then run "
            f"`ameshctl ca rotate activate {directory}`")


def _after_activate(directory: Path, new: x509.Certificate, record: RotationRecord, now: float,
                    lifetime: timedelta) -> str:
    expired_by = _expired_by(record, lifetime)
    when = ("now" if now >= expired_by
            else f"after {_iso(expired_by)}, when every certificate the old root signed has expired")
    return (f"check that `ameshctl certs` on every node shows ROOT {_fp(new)} for every "
            f"certificate; then run `ameshctl ca rotate finish --force {directory}`, or "
            f"`ameshctl ca rotate finish {directory}` {when}")


def _expired_by(record: RotationRecord, lifetime: timedelta) -> float:
    return record.activated_at + (lifetime + FINISH_MARGIN).total_seconds()


def _optional(path: Path) -> bytes | None:
    """The bytes of `path`, None when it does not exist; CAError naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def _pem(roots: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(certificate_pem(root) for root in dict.fromkeys(roots))


def _fingerprints(roots: tuple[x509.Certificate, ...]) -> str:
    return ", ".join(_fp(root) for root in roots)


def _fp(root: x509.Certificate) -> str:
    """A root in prose: its short fingerprint (`ameshctl certs` shows the same)."""
    return short(fingerprint(root))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
