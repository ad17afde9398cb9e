"""The benchmark's echo server: echoes every byte back on each connection, no greeting, and holds
tens of thousands of idle connections (open-file limit raised, listen backlog 16384).

    python -m bench.echo --port 7000

Prints "listening" once bound; serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys

from tests.podserver import run_until_signalled

READ_SIZE = 64 * 1024  # bytes per read
BACKLOG = 16384  # connections waiting to be accepted; the idle scenario opens 10,000 quickly
OPEN_FILES = 65536  # RLIMIT_NOFILE wanted: one descriptor per held connection and some spare


class Echo(asyncio.Protocol):
    """Writes back what it reads; closes when the client does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


def raise_open_files(wanted: int = OPEN_FILES, pid: int = 0) -> int:
    """Raise process `pid`'s (0: this one's) RLIMIT_NOFILE towards `wanted`, or else to its hard
    limit (lifting the hard limit needs CAP_SYS_RESOURCE); return the soft limit now in force."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    for limit in ((wanted, max(wanted, hard)), (hard, hard)):
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, host, port, reuse_address=True, backlog=BACKLOG)
    await run_until_signalled(server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--host", default="0.0.0.0")
    args = p.parse_args(argv)
    raise_open_files()
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
