"""Why a connection could not be served: the one list of failure reasons, and the error base.

Every failure the ztunnel records has a reason code from `REASONS`. Each reason says whose
fault it is, whether another attempt (another endpoint) could succeed, and the Istio/Envoy
response flag that telemetry shows for it; metrics, the access log and retries derive from
this table, never from their own lists. str(error) is the sentence for people; the code is for
counters and filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# local: this node's ztunnel (shutting down, out of resources, a bug). client: the connection's
# own initiator (a pod, or a peer ztunnel's request) asked for something that cannot be served.
# peer: the ztunnel or TLS peer at the other end misbehaved or could not be trusted.
# upstream: the destination could not be reached. policy: a rule refused the connection.
Fault = Literal["local", "client", "peer", "upstream", "policy"]


@dataclass(frozen=True)
class FailureReason:
    """One row of the failure table."""

    code: str
    fault: Fault
    # True when the failure happened before any byte of the client's reached an upstream, so
    # another endpoint may be tried with the client none the wiser
    retriable: bool
    flag: str  # Istio/Envoy response flag: UF upstream failure, NR no route, DENY by policy, ...
    summary: str


def _table(*rows: FailureReason) -> dict[str, FailureReason]:
    return {row.code: row for row in rows}


REASONS: dict[str, FailureReason] = _table(
    FailureReason("connect_refused", "upstream", True, "UF", "the upstream refused the TCP connection"),
    FailureReason("connect_timeout", "upstream", True, "UF", "the upstream did not answer in time"),
    FailureReason("connect_failed", "upstream", True, "UF", "connecting to the upstream failed"),
    FailureReason("status", "upstream", True, "UF", "the peer ztunnel answered the CONNECT with an error"),
    FailureReason("closed", "peer", True, "UF", "the HBONE connection ended before the CONNECT was answered"),
    FailureReason("protocol", "peer", False, "UF", "the peer does not speak HBONE"),
    FailureReason("tls", "peer", False, "UF", "the TLS handshake failed or was refused"),
    FailureReason("peer_rejected", "peer", False, "UF", "the peer's certificate was not the identity expected"),
    FailureReason("wrong_identity", "peer", False, "UF", "the peer proved another identity than expected"),
    FailureReason("no_spiffe_id", "peer", False, "UF", "the peer's certificate carries no SPIFFE ID"),
    FailureReason("no_certificate", "peer", False, "UF", "the peer presented no certificate"),
    FailureReason("wrong_trust_domain", "peer", False, "UF", "the peer's identity is of another trust domain"),
    FailureReason("no_certificate_issued", "local", False, "UF", "this node has no certificate for the source yet"),
    FailureReason("no_endpoint", "upstream", False, "NR", "the Service has no ready endpoint"),
    FailureReason("no_service_port", "client", False, "NR", "the Service does not expose the port dialled"),
    FailureReason("not_local", "client", False, "NR", "the destination is not an enrolled workload on this node"),
    FailureReason("wrong_authority", "client", False, "NR",
                  "the CONNECT named another address than the connection was made to"),
    FailureReason("not_captured", "client", False, "NR",
                  "the connection reached the outbound port without capture (not from an enrolled pod of this node)"),
    FailureReason("self_loop", "client", False, "NR", "the destination is one of this node's own ztunnel ports"),
    FailureReason("strict_mtls", "policy", False, "DENY", "STRICT mTLS refused plaintext"),
    FailureReason("policy_denied", "policy", False, "DENY", "an AuthorizationPolicy denied the connection"),
    FailureReason("policy_changed", "policy", False, "DENY",
                  "a policy change no longer allows the open connection, so it was closed"),
    FailureReason("handshake_limit", "local", False, "UO", "too many TLS handshakes were under way"),
    FailureReason("upstream_overflow", "policy", False, "UO",
                  "the Service's connection limit (maxConnections) from this node was reached"),
    FailureReason("rate_limited", "policy", False, "RL", "the Service's connection rate limit was reached"),
    FailureReason("client_reset", "client", False, "DC", "the client left before the tunnel opened"),
    FailureReason("shutdown", "local", False, "LR", "the ztunnel was shutting down"),
    FailureReason("resources", "local", False, "LR", "the ztunnel ran out of descriptors or memory"),
    FailureReason("internal", "local", False, "LR", "an unexpected error in the ztunnel (a bug: see its log)"),
)


def failure_reason(code: str | None) -> FailureReason:
    """The row for `code`; an unknown code is reported as `internal` rather than lost."""
    return REASONS.get(code or "", REASONS["internal"])


class ProxyError(Exception):
    """A connection could not be served. `reason` is a code of `REASONS`; str(error) is a
    sentence an operator can act on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def info(self) -> FailureReason:
        return failure_reason(self.reason)
