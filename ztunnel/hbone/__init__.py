"""HBONE: TCP connections carried between ztunnels as HTTP/2 CONNECT streams over mutual TLS.

As in Istio's ambient ztunnel, each node listens on port 15008. A client opens one mTLS
connection per (source identity, destination identity, peer address) and runs many CONNECT
streams on it, one per proxied TCP connection; each stream is an `HboneStream`, a
`ztunnel.streams.Stream` the ztunnel splices like a TCP socket.

The package, by concern (other code imports from `ztunnel.hbone` only):
- `protocol`: the port, the error, and the header values (:authority, forwarded, traceparent).
- `session`: `H2Session`, one HTTP/2 connection over TLS driving h2, and its `HboneStream`s.
- `limits`: `FrameGuard`, the pure limits a session applies to what its peer sends (control-frame
  budgets, header block size, rapid reset, read budget per pass), after nghttp2 and Envoy.
- `pool`: `HboneClientPool`, the client side. `server`: `HboneServer`, the server side.
"""

from ztunnel.hbone.pool import HboneClientPool, PeerVerifier, PoolKey
from ztunnel.hbone.protocol import (
    HBONE_PORT,
    REASON_HEADER,
    HboneError,
    forwarded_for,
    hostport,
    parse_authority,
    parse_forwarded_for,
    traceparent,
)
from ztunnel.hbone.server import ConnectHandler, ConnectRequest, HboneServer, Responder
from ztunnel.hbone.session import STREAM_WINDOW, H2Session, HboneStream

__all__ = [
    "HBONE_PORT", "REASON_HEADER", "STREAM_WINDOW", "ConnectHandler", "ConnectRequest", "H2Session",
    "HboneClientPool", "HboneError", "HboneServer", "HboneStream", "PeerVerifier", "PoolKey", "Responder",
    "forwarded_for", "hostport", "parse_authority", "parse_forwarded_for", "traceparent",
]
