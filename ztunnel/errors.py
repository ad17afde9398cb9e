"""The ztunnel's error base: why a connection could not be served, for people and counters."""

from __future__ import annotations


class ProxyError(Exception):
    """A connection could not be served. `reason` is a short code for counters and filters;
    str(error) is a sentence an operator can act on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
