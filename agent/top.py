"""`ameshctl top`: a live view of the node's connections, busiest first, like top(1).

`rank` (pure) turns two snapshots of /connections into rows with throughput; `run` draws them
with curses every interval until the user presses q (or Ctrl-C).
"""

from __future__ import annotations

import curses
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

RECENT_SECONDS = 5.0  # closed connections stay on screen this long, so short ones are seen


@dataclass(frozen=True)
class Row:
    id: int
    direction: str
    source: str
    destination: str
    endpoint: str
    security: str
    sent_per_s: float  # bytes per second over the last interval
    received_per_s: float
    total_bytes: int
    rtt_ms: float | None
    state: str


def rank(previous: list[dict], current: list[dict], interval: float, now: float) -> list[Row]:
    """Rows for the connections in `current`, busiest first: live ones, and those closed lately.

    Throughput is the bytes moved since `previous` over `interval` seconds; a connection new
    in `current` is measured over its whole life.
    """
    before = {c["id"]: c for c in previous}
    rows = []
    for c in current:
        if c["state"] in ("closed", "failed") and now - _ended(c) > RECENT_SECONDS:
            continue
        old = before.get(c["id"])
        span = interval if old else max(c["duration"], 1e-3)
        sent = c["bytes_sent"] - (old["bytes_sent"] if old else 0)
        received = c["bytes_received"] - (old["bytes_received"] if old else 0)
        if c["state"] in ("closed", "failed") and old and old["state"] == c["state"]:
            sent = received = 0  # ended before this interval: moved nothing in it
        client = (c.get("kernel") or {}).get("client")
        rows.append(Row(
            id=c["id"], direction=c["direction"],
            source=c["source_workload"] or c["source_ip"],
            destination=c["original_dst"] + (f" ({c['service']})" if c["service"] else ""),
            endpoint=c["upstream_workload"] or c["upstream"] or "-",
            security=c["security"] or "-",
            sent_per_s=sent / span, received_per_s=received / span,
            total_bytes=c["bytes_sent"] + c["bytes_received"],
            rtt_ms=client["rtt_ms"] if client else None, state=c["state"],
        ))
    return sorted(rows, key=lambda r: (r.state not in ("open", "connecting"), -(r.sent_per_s + r.received_per_s),
                                       -r.id))


def _ended(c: dict) -> float:
    return datetime.fromisoformat(c["ended"]).timestamp() if c.get("ended") else time.time()


def human_rate(bytes_per_s: float) -> str:
    """Bytes per second as bits per second with a unit, as network people read them."""
    bits = bytes_per_s * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:.0f} {unit}" if unit == "bit/s" else f"{bits:.1f} {unit}"
        bits /= 1000
    raise AssertionError("unreachable")


_COLUMNS = ("ID", "DIR", "SOURCE", "DESTINATION", "ENDPOINT", "SECURITY", "TX", "RX", "TOTAL", "RTT", "STATE")


def _cells(row: Row) -> list[str]:
    return [str(row.id), row.direction[:3], row.source, row.destination, row.endpoint, row.security,
            human_rate(row.sent_per_s), human_rate(row.received_per_s), str(row.total_bytes),
            f"{row.rtt_ms:.2f}ms" if row.rtt_ms is not None else "-", row.state]


def run(fetch: Callable[[], list[dict]], node: str, interval: float) -> None:
    """Draws the view every `interval` seconds until q is pressed."""
    curses.wrapper(_loop, fetch, node, interval)


def _loop(screen: "curses.window", fetch: Callable[[], list[dict]], node: str, interval: float) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))  # getch() waits at most one interval
    previous: list[dict] = []
    last = time.monotonic()
    while True:
        current = fetch()
        now = time.monotonic()
        rows = rank(previous, current, max(now - last, 1e-3), time.time())
        previous, last = current, now
        _draw(screen, rows, node)
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return


def _draw(screen: "curses.window", rows: list[Row], node: str) -> None:
    height, width = screen.getmaxyx()
    table = [list(_COLUMNS)] + [_cells(r) for r in rows[: max(0, height - 3)]]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    live = sum(1 for r in rows if r.state in ("open", "connecting"))
    tx, rx = sum(r.sent_per_s for r in rows), sum(r.received_per_s for r in rows)
    screen.erase()
    header = (f"amesh top - node {node} - {live} live connections - tx {human_rate(tx)} rx {human_rate(rx)}"
              f" - {time.strftime('%H:%M:%S')} - q quits")
    screen.addnstr(0, 0, header, width - 1)
    for y, line in enumerate(table, start=2):
        text = "  ".join(cell.ljust(w) for cell, w in zip(line, widths))
        screen.addnstr(y, 0, text, width - 1, curses.A_REVERSE if y == 2 else curses.A_NORMAL)
    screen.refresh()
