"""pytest plumbing shared by all tests: teardown on SIGTERM, e2e skipping, the bed fixtures.

- SIGTERM (and SIGHUP) become KeyboardInterrupt, so pytest unwinds and fixture teardown still
  deletes every namespace a test built (a CI job timeout sends SIGTERM).
- Tests marked `e2e` (and everything under tests/e2e and tests/hostile) are skipped with a
  reason when the run cannot build namespaces: not root, or no iproute2.
- `make_bed(mode="p2p", nodes=2)` builds a test bed and closes it after the test, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.bed import Bed, BedError

E2E_DIRS = tuple(Path(__file__).resolve().parent / name for name in ("e2e", "hostile"))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def _e2e_unavailable() -> str | None:
    """Why e2e tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "e2e tests build network namespaces and need root (run as root or with sudo)"
    for tool in ("ip", "ss", "sysctl"):
        if shutil.which(tool) is None:
            return f"e2e tests need the `{tool}` command (iproute2/procps), not found on PATH"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _e2e_unavailable()
    for item in items:
        if any(d in Path(str(item.path)).resolve().parents for d in E2E_DIRS):
            item.add_marker(pytest.mark.e2e)
        if reason and item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def make_bed() -> Iterator[Callable[..., Bed]]:
    """A factory for test beds: `make_bed("bridge", nodes=3)`; all are closed after the test."""
    beds: list[Bed] = []

    def make(mode: str = "p2p", nodes: int = 2) -> Bed:
        bed = Bed(nodes, mode)
        beds.append(bed)
        return bed

    yield make
    errors = []
    for bed in reversed(beds):
        try:
            bed.close()
        except BedError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("test bed teardown failed:\n" + "\n".join(errors), pytrace=False)
