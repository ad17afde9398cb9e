"""The ztunnel's three listeners as one process runs them: the single-process agent, or each
worker process (ztunnel/worker.py). Built here once so both run the same data plane."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable

from agent.config import INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, AgentConfig
from bpf.slots import Slot
from registry.model import RegistryState
from ztunnel.authz import Authorizer
from ztunnel.connections import ConnectionRecord, ConnectionTable
from ztunnel.hbone import HBONE_PORT, HboneClientPool
from ztunnel.identity import CertificateManager, CredentialReplica
from ztunnel.inbound import InboundHboneProxy, InboundPlaintextProxy
from ztunnel.limits import HandshakeLimiter, worker_share
from ztunnel.listener import NodeAddresses
from ztunnel.outbound import MeshTransport, OutboundProxy
from ztunnel.server import CapturedListener
from ztunnel.telemetry import access_log_entry

log = logging.getLogger("amesh.agent")

LISTENER_PORTS = {
    Slot.OUTBOUND: OUTBOUND_PORT,
    Slot.INBOUND_HBONE: HBONE_PORT,
    Slot.INBOUND_PLAINTEXT: INBOUND_PLAINTEXT_PORT,
}


def build_proxies(config: AgentConfig, state: Callable[[], RegistryState], table: ConnectionTable,
                  authorizer: Authorizer, certs: CertificateManager | CredentialReplica,
                  pool: HboneClientPool) -> dict[Slot, CapturedListener]:
    """The outbound, HBONE and inbound-plaintext listeners of one process, not yet started. With
    `config.workers` processes each holds its share of the node's handshake and per-Service limits."""
    workers, timeout = config.workers, config.connect_timeout
    transport = MeshTransport(config.node, certs, pool)
    own_ports = frozenset([*LISTENER_PORTS.values(), config.admin_port, config.metrics_port, config.readiness_port])
    handshakes = HandshakeLimiter(worker_share(config.max_handshakes_per_source, workers),
                                  worker_share(config.max_handshakes, workers))
    return {
        Slot.OUTBOUND: OutboundProxy(state, table, authorizer, transport, own_ports, NodeAddresses(),
                                     connect_timeout=timeout, connect_deadline=config.connect_deadline,
                                     workers=workers),
        Slot.INBOUND_HBONE: InboundHboneProxy(state, table, authorizer, config.node, certs, handshakes,
                                              connect_timeout=timeout),
        Slot.INBOUND_PLAINTEXT: InboundPlaintextProxy(state, table, authorizer, config.node,
                                                      connect_timeout=timeout),
    }


class PolicyEnforcer:
    """Cuts the live connections of `table` that the policies no longer allow, when they change
    (as Istio's ztunnel does); each process that runs listeners has one for its own table."""

    def __init__(self, authorizer: Authorizer, table: ConnectionTable) -> None:
        self._authorizer = authorizer
        self._table = table
        self._in_force: tuple[tuple[object, ...], tuple[object, ...]] = ((), ())

    def check(self, state: RegistryState) -> None:
        """Decides again for every live connection policy admitted, if `state`'s policies changed."""
        policies = (state.authorization_policies, state.peer_authentications)
        if policies == self._in_force:
            return
        self._in_force = policies
        for record in self._table.live():
            if record.admitted is None:
                continue
            decision = self._authorizer.recheck(state, record.admitted)
            if not decision.allowed:
                log.info("event=policy_revoked conn=%d reason=%r", record.id, decision.reason)
                record.cut("policy_changed", f"closed: policy changed ({decision.reason})")


def write_access_log(record: ConnectionRecord) -> None:
    """One JSON line on stdout for a closed connection (the workers inherit the agent's stdout)."""
    sys.stdout.write(json.dumps(access_log_entry(record), separators=(",", ":")) + "\n")
    sys.stdout.flush()
