"""Structured log lines: `ts=... level=... logger=... event=... key=value`, one per event."""

from __future__ import annotations

import logging
import sys
import time


class _KeyValueFormatter(logging.Formatter):
    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} "
                f"{self._tag}{record.getMessage()}")
        if record.exc_info:
            line += " traceback=" + repr(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "info", worker: int | None = None) -> None:
    """Sends amesh's logs to stderr as key=value lines; a worker process's carry `worker=<k>`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter("" if worker is None else f"worker={worker} "))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every admin request at info; keep the agent's log about the data plane
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
