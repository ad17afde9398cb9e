"""Admission decisions for connections reaching enrolled workloads. Pure: no I/O, no clock."""

from __future__ import annotations

from registry.model import Workload
from ztunnel.errors import ProxyError

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"


class Refused(ProxyError):
    """The destination's policy does not admit this connection."""


def mtls_mode(destination: Workload, default: str) -> str:
    """The mode for plaintext reaching `destination`: its namespace's label, else the agent's."""
    return destination.mtls_mode or default


def admit_plaintext(destination: Workload, default_mode: str) -> None:
    """Raises Refused when plaintext may not reach `destination` (STRICT mTLS)."""
    if mtls_mode(destination, default_mode) == STRICT:
        raise Refused("strict_mtls", f"plaintext to {destination.key} refused: STRICT mTLS requires HBONE "
                                     "(the client is not in the mesh)")
