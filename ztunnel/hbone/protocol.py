"""HBONE's names on the wire: its port, the :authority of a CONNECT, the forwarded and
traceparent headers it carries, and the error of a tunnel that could not be opened."""

from __future__ import annotations

import errno
import ipaddress
import secrets

from ztunnel.errors import ProxyError
from ztunnel.logbound import cut

HBONE_PORT = 15008  # the port every node's ztunnel accepts HBONE on, as in Istio ambient
REASON_HEADER = "amesh-reason"  # response header saying why a CONNECT was not accepted


class HboneError(ProxyError):
    """An HBONE tunnel could not be opened. `reason` is one of: connect_refused, connect_timeout,
    connect_failed, tls, peer_rejected, policy_denied (answered 401), status (another answer;
    `status` holds it), protocol, closed."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(reason, message)
        self.status = status


def hostport(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets: the form of an :authority and of our messages."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """(host, port) of a CONNECT :authority `host:port` (IPv6 in brackets); ValueError if invalid."""
    host, sep, port = authority.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: where it ends and the port starts is a guess
    # at most 5 digits before int(): a port of thousands of digits must not reach the conversion
    if not (sep and host and port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"invalid :authority {cut(repr(authority))}: expected host:port with port 1-65535")
    return host, int(port)


def traceparent() -> str:
    """A new random W3C traceparent (version 00, sampled) to send with a CONNECT."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def forwarded_for(ip: str) -> str:
    """The RFC 7239 Forwarded value naming the original client: for=10.0.0.1, for="[::1]"."""
    address = ipaddress.ip_address(ip)
    return f'for="[{address}]"' if address.version == 6 else f"for={address}"


def parse_forwarded_for(value: str) -> str | None:
    """The client IP of the first `for=` in a Forwarded header, or None (absent, or not an IP
    such as for=unknown): the inverse of `forwarded_for`."""
    for element in value.split(",")[0].split(";"):
        name, _, node = element.strip().partition("=")
        if name.strip().lower() == "for":
            node = node.strip().strip('"')
            try:
                return str(ipaddress.ip_address(node[1:-1] if node.startswith("[") else node))
            except ValueError:
                return None
    return None


def header_value(text: str) -> str:
    """`text` on one line, as a header value must be."""
    return " ".join(text.split())


def code_name(code: int) -> str:
    """ErrorCodes.CANCEL -> "CANCEL"; h2 passes codes it does not know as plain ints."""
    return getattr(code, "name", str(code))


def reset_error(message: str) -> ConnectionResetError:
    """A ConnectionResetError whose strerror is `message` (ztunnel.streams.splice reports strerror)."""
    return ConnectionResetError(errno.ECONNRESET, message)

