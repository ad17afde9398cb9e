"""A tiny TCP server for test-bed pods: names itself, then echoes until the client half-closes.

    python -m tests.podserver --port 8080 --name server-a

Per connection: writes b"server-a\\n", then echoes every byte it receives; when the client
half-closes (EOF) it closes its side too. So a client learns which endpoint served it, can
compare byte counts, and sees its half-close honoured. Prints "listening" once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

READ_SIZE = 64 * 1024  # bytes per read; big enough that bulk transfers are not syscall-bound


async def _serve_one(
    name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        writer.write(name + b"\n")
        await writer.drain()
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the client went away; nothing to report to it
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def run_until_signalled(server: asyncio.AbstractServer) -> None:
    """Says "listening" (what the bed waits for), then serves until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("listening", flush=True)
    async with server:
        await stop.wait()


async def serve(host: str, port: int, name: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = await asyncio.start_server(
        lambda r, w: _serve_one(name.encode(), r, w), host, port, reuse_address=True, backlog=1024
    )
    await run_until_signalled(server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--name", default=None, help="written back first on each connection")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.name or f"podserver-{args.port}"))
    except OSError as e:
        print(f"podserver: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
