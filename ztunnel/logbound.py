"""Log lines whose size and rate a remote peer cannot inflate.

Text a peer controls (an :authority, a header, an error naming them) is `cut()` to a fixed
length before it is logged or echoed; lines that a peer can trigger at will (a refused request,
a flood) go through a `RateLimitedLog`, which writes a few per second per reason and then one
line saying how many it dropped. A flood of bad requests thus costs a bounded number of log
bytes per second, whatever their size or count.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable

from ztunnel.limits import TokenBucket

CUT_LIMIT = 128  # characters of peer-controlled text kept in a log line or an answer
LOG_BURST = 5  # lines per reason written at once
LOG_PER_SECOND = 2.0  # lines per reason per second after the burst


def cut(text: str, limit: int = CUT_LIMIT) -> str:
    """`text` if at most `limit` characters, else its start and "...(N bytes)", N its UTF-8 size."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text.encode('utf-8', 'replace'))} bytes)"


class RateLimitedLog:
    """A logger's lines, each under a `reason` (e.g. "hbone.bad_request"), at most `burst` at
    once and `per_second` after that per reason. A dropped line is counted; the next line written
    for that reason is preceded by "log.suppressed reason=... lines=N". `suppressed` counts the
    dropped lines per reason, ever (a metric)."""

    def __init__(self, logger: logging.Logger, burst: int = LOG_BURST, per_second: float = LOG_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._burst, self._per_second, self._clock = burst, per_second, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: Counter[str] = Counter()  # dropped since the last line of each reason
        self.suppressed: Counter[str] = Counter()

    def log(self, level: int, reason: str, message: str, *args: Any,
            exc_info: bool | BaseException = False) -> bool:
        """Writes `message % args` at `level` unless `reason` is over its rate; True if written."""
        if not self._logger.isEnabledFor(level):
            return False
        bucket = self._buckets.get(reason)
        if bucket is None:
            bucket = self._buckets[reason] = TokenBucket(self._burst, self._per_second, self._clock)
        if not bucket.take():
            self._pending[reason] += 1
            self.suppressed[reason] += 1
            return False
        self._report(reason, level)
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True

    def flush(self) -> None:
        """Writes the count of every reason's lines dropped since its last line (e.g. at shutdown)."""
        for reason in list(self._pending):
            self._report(reason, logging.WARNING)

    def _report(self, reason: str, level: int) -> None:
        if dropped := self._pending.pop(reason, 0):
            self._logger.log(level, "log.suppressed reason=%s lines=%d", reason, dropped)
