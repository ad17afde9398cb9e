"""A rogue HBONE server for the e2e tests: real TLS from the mesh's own CA, the wrong identity.

    python -m tests.impostor --ca-dir DIR --identity spiffe://cluster.local/ns/shop/sa/other

Listens on 0.0.0.0:15008 inside a pod, presents a valid certificate for `--identity` and
accepts every CONNECT (echoing the tunnel's bytes), so the only thing that can stop a client
is its own check of the server's identity. Prints "listening" once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from ztunnel.hbone import HBONE_PORT, ConnectRequest, HboneServer, Responder
from ztunnel.identity import CertificateManager, FileCA, Identity


async def _echo(request: ConnectRequest, responder: Responder) -> None:
    stream = await responder.accept()
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def serve(ca_dir: Path, identity: Identity) -> None:
    certs = CertificateManager(FileCA.load_or_create(ca_dir, identity.trust_domain), identity.trust_domain)
    certs.set_identities([identity])
    server = await HboneServer(_echo).listen("0.0.0.0", HBONE_PORT, certs.server_context(identity))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("listening", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ca-dir", type=Path, required=True)
    parser.add_argument("--identity", type=Identity.parse, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.ca_dir, args.identity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
