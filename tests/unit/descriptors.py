"""A test helper: run a block with the process out of file descriptors (EMFILE)."""

from __future__ import annotations

import os
import resource
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def descriptors_exhausted(spare: int) -> Iterator[None]:
    """Lowers the descriptor limit to `spare` above those open, then fills them; restores both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + spare, hard))
    try:
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass  # EMFILE: nothing more can be opened
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
