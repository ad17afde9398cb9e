"""Counting the system calls of running processes: `perf stat` on the kernel's syscall
tracepoints, and the counts as a table of calls per GB and per connection.

perf stat counts in the kernel (a tracepoint increments a counter; nothing is copied to user
space per call), so the traced processes run at their normal speed and batch as they normally
do. `strace -c -f -p` stops the process twice per call, which slows a proxy several times over
and changes what each read finds waiting, hence the counts; `perf trace` copies every call
through a ring buffer and loses events under load. Counters follow threads and children
created after the start (inherited), and count those that ended before the stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRACEPOINTS = Path("/sys/kernel/tracing/events/syscalls")
TOTAL_EVENT = "raw_syscalls:sys_enter"  # every system call, whichever it is
# The calls a proxy's event loop and relay make; the rest is counted in the total only.
WATCHED = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
           "recvmmsg", "sendmmsg", "splice", "epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl",
           "poll", "ppoll", "select", "pselect6", "accept", "accept4", "connect", "socket", "close",
           "shutdown", "setsockopt", "getsockopt", "getsockname", "getpeername", "fcntl", "pipe2",
           "ioctl", "futex", "mmap", "munmap", "brk", "madvise", "mprotect", "openat", "newfstatat",
           "fstat", "lseek", "getpid", "gettid", "rt_sigprocmask", "rt_sigaction", "sched_yield",
           "nanosleep", "clock_nanosleep", "getrandom", "eventfd2", "timerfd_settime")
STOP_TIMEOUT = 10.0  # seconds for perf to print its counts after SIGINT
ATTACH_SECONDS = 0.3  # perf has opened its counters (or failed) by then
ATTACH_TRIES = 5  # perf fails when a thread it found ends before it attaches (stunnel's per connection)


def watched_events() -> list[str]:
    """The tracepoint names of WATCHED that this kernel has, then the total's."""
    have = [name for name in WATCHED if (TRACEPOINTS / f"sys_enter_{name}").is_dir()]
    return [f"syscalls:sys_enter_{name}" for name in have] + [TOTAL_EVENT]


def parse_counts(output: str) -> dict[str, int]:
    """perf stat -x, output -> {syscall name or "total": count}; uncounted events are left out."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue  # "<not counted>", "<not supported>", blank and comment lines
        event = fields[2]
        name = "total" if event == TOTAL_EVENT else event.removeprefix("syscalls:sys_enter_")
        counts[name] = counts.get(name, 0) + int(fields[0])
    return counts


@dataclass
class SyscallCount:
    """`perf stat` counting the watched system calls of `pids` (and their threads) until stop()."""

    pids: list[int]

    def __post_init__(self) -> None:
        argv = ["perf", "stat", "-x,", "-e", ",".join(watched_events()), "-p", ",".join(map(str, self.pids))]
        for _ in range(ATTACH_TRIES):
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True)
            try:
                _, err = self._proc.communicate(timeout=ATTACH_SECONDS)
            except subprocess.TimeoutExpired:
                return  # attached and counting
        raise RuntimeError(f"perf stat could not attach to pids {self.pids} in {ATTACH_TRIES} tries: "
                           f"{err.strip()[-300:]!r}")

    def stop(self) -> dict[str, int]:
        """Stops counting: {syscall: calls, "total": every call, "other": the unwatched ones}."""
        self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise RuntimeError(f"perf stat on pids {self.pids} printed nothing {STOP_TIMEOUT:g} s after SIGINT")
        counts = parse_counts(err)
        if "total" not in counts:
            raise RuntimeError(f"perf stat on pids {self.pids} counted nothing (is tracefs mounted at "
                               f"{TRACEPOINTS.parent.parent}?): {err.strip()[-300:]!r}")
        # perf enables its counters one after the other, so at the edges the total can miss a
        # few calls the others saw: the unwatched rest is never below zero
        counts["other"] = max(0, counts["total"] - sum(v for k, v in counts.items() if k != "total"))
        return {name: count for name, count in counts.items() if count}


def perf_available() -> bool:
    """perf is installed and this kernel has the syscall tracepoints."""
    return TRACEPOINTS.is_dir() and any(os.access(os.path.join(d, "perf"), os.X_OK)
                                        for d in os.environ.get("PATH", "").split(os.pathsep))


def rates(counts: dict[str, int], units: float) -> dict[str, float]:
    """Counts divided by `units` (GB moved, or connections made)."""
    return {name: count / units for name, count in counts.items()}


def table(columns: dict[str, dict[str, float]], top: int = 12) -> str:
    """A Markdown table: one row per syscall (the `top` largest over all columns, then other
    and total), one column per measurement (e.g. "amesh-cross per GB")."""
    names = sorted({n for c in columns.values() for n in c if n not in ("total", "other")},
                   key=lambda n: -max(c.get(n, 0.0) for c in columns.values()))
    shown = names[:top]
    lines = ["| syscall | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in [*shown, "other (the rest)", "total"]:
        key = "other" if name.startswith("other") else name
        cells = []
        for column in columns.values():
            value = column.get(key, 0.0)
            if key == "other":  # the unwatched calls plus the watched ones not shown
                value += sum(column.get(n, 0.0) for n in names[top:])
            cells.append(f"{value:,.0f}" if value >= 100 else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
