"""Notices a CA directory that changed (a root rotation step, a new Secret) and hands on the new CA.

An agent in local-CA mode (and a CA server) loads its signing root and trust bundle from a
directory (ztunnel/identity.py `FileCA`). `CADirectoryWatch.poll()` checks it cheaply: a stat of
its three files; only when one changed are they read, and only when their content differs from
the CA in use is a new `FileCA` loaded and returned. A directory that does not load (half-written,
a key that does not match, a bundle without the signing root) is refused: the error names the
file, it is logged once per content, and the last good CA keeps serving.

On Kubernetes the directory is a Secret volume: kubelet swaps all of its files at once (a
symlink to a new timestamped directory), and stat follows the symlinks, so the swap is seen as a
change of every file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ztunnel.connections import iso_utc
from ztunnel.identity import CA_CERT_FILE, CA_KEY_FILE, TRUST_BUNDLE_FILE, CAError, CAFiles, FileCA, fingerprint

log = logging.getLogger("amesh.ztunnel")

POLL_INTERVAL = 5.0  # seconds between checks of the directory: three stat calls each
WATCHED = (CA_KEY_FILE, CA_CERT_FILE, TRUST_BUNDLE_FILE)

# what stat says of one file: (inode, size, mtime ns, ctime ns, mode); None when it is absent,
# the errno when it cannot be stat'ed. ctime catches a chmod, the inode a rename over it.
FileStat = tuple[int, int, int, int, int] | int | None


def stat_files(directory: Path) -> tuple[FileStat, ...]:
    """The stat signature of the CA files in `directory`; equal signatures: nothing to read."""
    signature: list[FileStat] = []
    for name in WATCHED:
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            signature.append(None)
        except OSError as e:
            signature.append(e.errno)
        else:
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))
    return tuple(signature)


class CADirectoryWatch:
    """The CA of one directory, kept current: `load_or_create()` once, then `poll()` every few
    seconds (or `run(on_change)`). Call from one thread; the clock only stamps the status."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        interval: float = POLL_INTERVAL,  # seconds between polls in run()
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.interval = interval
        self._clock = clock
        self.ca: FileCA | None = None  # the last good CA: the one in use
        self._signature: tuple[FileStat, ...] | None = None  # of the files last read
        self._digest: str | None = None  # of the files the CA in use was loaded from
        self._refused_digest: str | None = None  # of the files last refused: logged once
        self.loaded_at: float | None = None
        self.reloads = 0  # new CAs handed on since the first load
        self.refusals = 0  # polls that found a changed directory that does not load
        self.last_error: str | None = None  # why the directory as it is now was refused

    def __repr__(self) -> str:
        return f"CADirectoryWatch(directory={str(self.directory)!r}, ca={self.ca!r})"

    def load_or_create(self) -> FileCA:
        """The CA in the directory at start (created when absent, as FileCA.load_or_create);
        CAError when it does not load: an agent does not start without a CA."""
        FileCA.load_or_create(self.directory, self.trust_domain, self._clock)  # creates it when absent
        # stat before reading: a change made after the stat differs from it at the next poll
        signature, files = stat_files(self.directory), CAFiles.read(self.directory)
        ca = FileCA.from_files(files, self.trust_domain, self._clock)
        self._signature, self._digest = signature, files.digest
        self._use(ca)
        return ca

    def poll(self) -> FileCA | None:
        """One check: the new CA when the directory's content changed and loads, else None (also
        when it changed but is refused: the last good CA stays in use, the error is kept)."""
        signature = stat_files(self.directory)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            files = CAFiles.read(self.directory)
        except CAError as e:
            self._refuse(str(e), None)
            return None
        if files.digest == self._digest:  # touched, or a refused change undone
            self.last_error = None
            return None
        if files.digest == self._refused_digest:
            return None
        try:
            ca = FileCA.from_files(files, self.trust_domain, self._clock)
        # Anything else a strange file makes the loader raise is refused too: the agent keeps
        # serving with the last good CA rather than lose the watch (and, with it, the agent).
        except Exception as e:
            self._refuse(str(e) if isinstance(e, CAError) else f"{self.directory}: {type(e).__name__}: {e}",
                         files.digest)
            return None
        self._digest, self._refused_digest, self.last_error = files.digest, None, None
        self.reloads += 1
        self._use(ca)
        return ca

    async def run(self, on_change: Callable[[FileCA], None]) -> None:
        """Polls every `interval` seconds forever, handing each new CA to `on_change`."""
        while True:
            await asyncio.sleep(self.interval)
            ca = self.poll()
            if ca is not None:
                on_change(ca)

    def status(self) -> dict[str, Any]:
        """For `ameshctl certs`: the directory, when its CA was loaded, and why a change was refused."""
        return {
            "directory": str(self.directory),
            "loaded_at": iso_utc(self.loaded_at) if self.loaded_at is not None else None,
            "reloads": self.reloads,
            "refusals": self.refusals,
            "last_error": self.last_error,
        }

    def _use(self, ca: FileCA) -> None:
        self.ca, self.loaded_at = ca, self._clock()
        log.info(
            "ca.loaded dir=%s signing_root=%s trust_bundle=%s",
            self.directory, ca.root_fingerprint, ",".join(fingerprint(root) for root in ca.roots),
        )

    def _refuse(self, error: str, digest: str | None) -> None:
        """Keeps the CA in use; logs the error once per refused content (None: unreadable)."""
        self.refusals += 1
        self.last_error = error
        if digest is None or digest != self._refused_digest:
            in_use = self.ca.root_fingerprint if self.ca else "none"
            log.error(
                "ca.refused dir=%s error=%r action=\"keeping the last good CA (signing root %s)\"",
                self.directory, error, in_use,
            )
        self._refused_digest = digest
