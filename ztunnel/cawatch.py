"""Notices files that changed (a root rotation step, a new Secret or ConfigMap) and hands on what
they now hold: a CA directory (`CADirectoryWatch`) or a trust bundle file (`TrustBundleWatch`).

An agent in local-CA mode (and the cluster CA) loads its signing root and trust bundle from a
directory (ztunnel/identity.py `FileCA`); an agent asking the cluster CA loads only the bundle of
root certificates. `poll()` checks the files cheaply: a stat of each; only when one changed are
they read, and only when their content differs from what is in use is it loaded and returned.
Content that does not load (half-written, a key that does not match, a bundle without the
signing root, a certificate cut short) is refused: the error names the file, it is logged once
per content, and the last good content stays in use.

On Kubernetes the files are a Secret or ConfigMap volume: kubelet swaps all of its files at once
(the ..data symlink renamed to a new timestamped directory), and stat follows the symlinks, so
the swap is seen as a change of every file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from cryptography import x509

from ztunnel.connections import iso_utc
from ztunnel.identity import CA_CERT_FILE, CA_KEY_FILE, TRUST_BUNDLE_FILE, CAError, CAFiles, FileCA
from ztunnel.identity import certificate_pem, fingerprint, load_roots

log = logging.getLogger("amesh.ztunnel")

POLL_INTERVAL = 5.0  # seconds between checks of the files: one stat call per file each
WATCHED = (CA_KEY_FILE, CA_CERT_FILE, TRUST_BUNDLE_FILE)

# what stat says of one file: (inode, size, mtime ns, ctime ns, mode); None when it is absent,
# the errno when it cannot be stat'ed. ctime catches a chmod, the inode a rename over it.
FileStat = tuple[int, int, int, int, int] | int | None

T = TypeVar("T")


def stat_paths(paths: tuple[Path, ...]) -> tuple[FileStat, ...]:
    """The stat signature of `paths` (symlinks followed); equal signatures: nothing to read."""
    signature: list[FileStat] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            signature.append(None)
        except OSError as e:
            signature.append(e.errno)
        else:
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))
    return tuple(signature)


class FileWatch(ABC, Generic[T]):
    """What some files hold, kept current: `start()` once, then `poll()` every few seconds (or
    `run(on_change)`). Call from one thread; the clock only stamps the status. A subclass says
    how the files are read (`_read`), checked and loaded (`_load`), and shown in log lines."""

    kind: ClassVar[str]  # the log event prefix: "ca", "trust_bundle"
    noun: ClassVar[str]  # what is kept when a change is refused, for the log line

    def __init__(self, paths: tuple[Path, ...], interval: float, clock: Callable[[], float]) -> None:
        self.paths = paths
        self.interval = interval  # seconds between polls in run()
        self._clock = clock
        self.current: T | None = None  # the last good content: the one in use
        self._signature: tuple[FileStat, ...] | None = None  # of the files last read
        self._digest: str | None = None  # of the files the content in use was loaded from
        self._refused_digest: str | None = None  # of the files last refused: logged once
        self.loaded_at: float | None = None
        self.reloads = 0  # new contents handed on since the first load
        self.refusals = 0  # polls that found changed files that do not load
        self.last_error: str | None = None  # why the files as they are now were refused

    @abstractmethod
    def _read(self) -> tuple[str, Any]:
        """(digest, content) of the files now; CAError naming a file that cannot be read."""

    @abstractmethod
    def _load(self, content: Any) -> T:
        """What `content` holds, checked; CAError naming the file at fault."""

    @abstractmethod
    def _where(self) -> str:
        """The files, for log lines: `dir=...` or `file=...`."""

    @abstractmethod
    def _describe(self, value: T) -> str:
        """`value` for log lines: its roots' fingerprints."""

    def start(self) -> T:
        """The content of the files now; CAError when it does not load (nothing to fall back on)."""
        # stat before reading: a change made after the stat differs from it at the next poll
        signature = stat_paths(self.paths)
        digest, content = self._read()
        value = self._load(content)
        self._signature, self._digest = signature, digest
        self._use(value)
        return value

    def poll(self) -> T | None:
        """One check: the new content when the files changed and load, else None (also when they
        changed but are refused: the last good content stays in use, the error is kept)."""
        signature = stat_paths(self.paths)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            digest, content = self._read()
        except CAError as e:
            self._refuse(str(e), None)
            return None
        if digest == self._digest:  # touched, or a refused change undone
            self.last_error = None
            return None
        if digest == self._refused_digest:
            return None
        try:
            value = self._load(content)
        # Anything else a strange file makes the loader raise is refused too: the process keeps
        # serving with the last good content rather than lose the watch (and, with it, itself).
        except Exception as e:
            self._refuse(str(e) if isinstance(e, CAError) else f"{self._where()}: {type(e).__name__}: {e}", digest)
            return None
        self._digest, self._refused_digest, self.last_error = digest, None, None
        self.reloads += 1
        self._use(value)
        return value

    async def run(self, on_change: Callable[[T], None]) -> None:
        """Polls every `interval` seconds forever, handing each new content to `on_change`."""
        while True:
            await asyncio.sleep(self.interval)
            value = self.poll()
            if value is not None:
                on_change(value)

    def status(self) -> dict[str, Any]:
        """For `ameshctl certs`: when the content was loaded, and why a change was refused."""
        return {
            "loaded_at": iso_utc(self.loaded_at) if self.loaded_at is not None else None,
            "reloads": self.reloads,
            "refusals": self.refusals,
            "last_error": self.last_error,
        }

    def _use(self, value: T) -> None:
        self.current, self.loaded_at = value, self._clock()
        log.info("%s.loaded %s %s", self.kind, self._where(), self._describe(value))

    def _refuse(self, error: str, digest: str | None) -> None:
        """Keeps the content in use; logs the error once per refused content (None: unreadable)."""
        self.refusals += 1
        self.last_error = error
        if digest is None or digest != self._refused_digest:
            in_use = self._describe(self.current) if self.current is not None else "none"
            log.error("%s.refused %s error=%r action=\"keeping the last good %s (%s)\"",
                      self.kind, self._where(), error, self.noun, in_use)
        self._refused_digest = digest


class CADirectoryWatch(FileWatch[FileCA]):
    """The CA of one directory (ca.key, ca.crt, trust-bundle.pem), kept current."""

    kind, noun = "ca", "CA"

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        interval: float = POLL_INTERVAL,  # seconds between polls in run()
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        super().__init__(tuple(self.directory / name for name in WATCHED), interval, clock)

    def __repr__(self) -> str:
        return f"CADirectoryWatch(directory={str(self.directory)!r}, ca={self.ca!r})"

    @property
    def ca(self) -> FileCA | None:
        """The last good CA: the one in use."""
        return self.current

    def load_or_create(self) -> FileCA:
        """The CA in the directory at start (created when absent, as FileCA.load_or_create);
        CAError when it does not load: an agent does not start without a CA."""
        FileCA.load_or_create(self.directory, self.trust_domain, self._clock)  # creates it when absent
        return self.start()

    def status(self) -> dict[str, Any]:
        return {"directory": str(self.directory), **super().status()}

    def _read(self) -> tuple[str, CAFiles]:
        files = CAFiles.read(self.directory)
        return files.digest, files

    def _load(self, content: CAFiles) -> FileCA:
        return FileCA.from_files(content, self.trust_domain, self._clock)

    def _where(self) -> str:
        return f"dir={self.directory}"

    def _describe(self, value: FileCA) -> str:
        return f"signing_root={value.root_fingerprint} trust_bundle={','.join(fingerprint(r) for r in value.roots)}"


class TrustBundleWatch(FileWatch[tuple[x509.Certificate, ...]]):
    """The root certificates of one PEM file (the ConfigMap amesh-trust-bundle), kept current.
    The first root is the one the CA signs with (ztunnel/rotation.py keeps it first)."""

    kind, noun = "trust_bundle", "trust bundle"

    def __init__(self, path: Path, interval: float = POLL_INTERVAL, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        super().__init__((self.path,), interval, clock)

    def __repr__(self) -> str:
        return f"TrustBundleWatch(path={str(self.path)!r}, roots={len(self.current or ())})"

    @property
    def bundle(self) -> bytes:
        """The PEM of the roots in use."""
        return b"".join(certificate_pem(root) for root in self.current or ())

    def status(self) -> dict[str, Any]:
        return {"file": str(self.path), **super().status()}

    def _read(self) -> tuple[str, bytes]:
        try:
            pem = self.path.read_bytes()
        except OSError as e:
            raise CAError(f"cannot read the trust bundle {self.path}: {e.strerror}") from None
        return hashlib.sha256(pem).hexdigest(), pem

    def _load(self, content: bytes) -> tuple[x509.Certificate, ...]:
        if b"PRIVATE KEY" in content:
            raise CAError(f"{self.path} holds a private key: give agents the root certificate only")
        return load_roots(content, self.path)

    def _where(self) -> str:
        return f"file={self.path}"

    def _describe(self, value: tuple[x509.Certificate, ...]) -> str:
        return f"roots={','.join(fingerprint(root) for root in value)}"
