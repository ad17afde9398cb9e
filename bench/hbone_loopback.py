"""HBONE tunnel throughput on loopback, one process: an HboneClientPool and an HboneServer
on 127.0.0.1, one CONNECT stream, N bytes written by the client and counted by the server's
handler. Measures the ztunnel's DATA path (TLS, HTTP/2 framing, flow control) without BPF or
namespaces; both ends share one core, so the figure is a relative one (before/after a change).

    python -m bench.hbone_loopback [--gib 1] [--repeats 3] [--event-loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from ztunnel.hbone import ConnectRequest, HboneClientPool, HboneServer, PoolKey, Responder
from ztunnel.identity import CertificateManager, FileCA, Identity

CLIENT = Identity("cluster.local", "bench", "client")
SERVER = Identity("cluster.local", "bench", "server")
CHUNK = 256 * 1024  # bytes per client write, as a splice of a busy socket hands over


async def one_run(certs: CertificateManager, size: int) -> tuple[float, float]:
    """Seconds (wall clock, and CPU of this process) to send `size` bytes through one tunnel
    until the server has counted them all: the CPU figure is the one to compare on a busy
    machine."""
    done = asyncio.get_running_loop().create_future()

    async def count(request: ConnectRequest, responder: Responder) -> None:
        stream = await responder.accept()
        received = 0
        while data := await stream.read(4 * 1024 * 1024):
            received += len(data)
        done.set_result(received)

    server = HboneServer(count)
    listener = await server.listen("127.0.0.1", 0, certs.server_context(SERVER))
    address = listener.sockets[0].getsockname()[:2]
    pool = HboneClientPool()
    try:
        stream = await pool.open(PoolKey(CLIENT.uri, SERVER.uri, address), certs.client_context(CLIENT),
                                 "127.0.0.1:9", [], lambda cert: None)
        payload = b"x" * CHUNK
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(size // CHUNK):
            stream.write(payload)
            await stream.drain()
        stream.write_eof()
        assert await done == size // CHUNK * CHUNK
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        stream.close()
        return elapsed, cpu
    finally:
        await pool.close()
        listener.close()


def main() -> None:
    """Prints seconds, MiB/s and CPU seconds of each repeat, then the best."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="uvloop")
    options = parser.parse_args()
    size = int(options.gib * 1024 ** 3)
    with tempfile.TemporaryDirectory() as ca:
        certs = CertificateManager(FileCA.load_or_create(Path(ca)))
        certs.set_identities([CLIENT, SERVER])
        factory = uvloop.new_event_loop if options.event_loop == "uvloop" else asyncio.new_event_loop
        times, cpus = [], []
        for _ in range(options.repeats):
            with asyncio.Runner(loop_factory=factory) as runner:
                elapsed, cpu = runner.run(one_run(certs, size))
            times.append(elapsed)
            cpus.append(cpu)
            print(f"{elapsed:.2f} s  {size / elapsed / 2 ** 20:.0f} MiB/s  {cpu:.2f} s CPU")
        print(f"best of {options.repeats} ({options.event_loop}): {size / min(times) / 2 ** 20:.0f} MiB/s, "
              f"{min(cpus):.2f} s CPU per {options.gib:g} GiB")


if __name__ == "__main__":
    main()
