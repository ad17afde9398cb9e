"""The cluster CA's configuration: its ports, names and `CAConfig`, the one home of its knobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ca.admission import AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT
from ztunnel.cawatch import POLL_INTERVAL
from ztunnel.identity import DEFAULT_LIFETIME, DEFAULT_TRUST_DOMAIN

# istiod serves certificates on 15012 and its monitoring on 15014; the cluster CA does the same
# job, so it takes the same ports (and they are free on every node: the CA runs as a pod).
CA_PORT = 15012
METRICS_PORT = 15014
CA_NAMESPACE = AGENT_NAMESPACE  # the CA runs beside the agents
CA_SERVICE_ACCOUNT = "amesh-ca"  # the serving certificate's identity, which agents check
PATH = "/v1/certificates"
MAX_BODY = 16 * 1024  # bytes; a P-256 CSR in PEM is ~500 bytes, the JSON around it a few more


@dataclass(frozen=True)
class CAConfig:
    """How the cluster CA runs; built from `ameshctl ca serve` flags."""

    ca_dir: Path  # ca.key and ca.crt: the root, mounted from the Secret (never created here)
    host: str = "0.0.0.0"
    port: int = CA_PORT
    metrics_port: int = METRICS_PORT
    kubeconfig: str | None = None  # None: in-cluster service account
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_lifetime: timedelta = DEFAULT_LIFETIME  # the longest a workload certificate may live
    agent_namespace: str = AGENT_NAMESPACE  # the agents' service account: the only one that may ask
    agent_service_account: str = AGENT_SERVICE_ACCOUNT
    ca_poll_interval: float = POLL_INTERVAL  # seconds between checks of ca_dir for a rotation step
