"""The agent's configuration: one dataclass with every knob, its unit and its default."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from datetime import timedelta
from pathlib import Path

from ztunnel.authz import DEFAULT_ROOT_NAMESPACE
from ztunnel.cawatch import POLL_INTERVAL
from ztunnel.identity import DEFAULT_LIFETIME, DEFAULT_TRUST_DOMAIN
from ztunnel.telemetry import DEFAULT_CLUSTER

ADMIN_HOST = "127.0.0.1"  # the admin API changes nothing but is still node-local only
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
METRICS_PORT = 15020
READINESS_PORT = 15021
DEFAULT_CA_DIR = Path("/var/lib/amesh/ca")
MAX_DEFAULT_WORKERS = 8  # worker processes by default at most: past that the agent's fan-out of registry deltas grows


def default_workers() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count), at most MAX_DEFAULT_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class AgentConfig:
    """How one node's agent runs; built from `ameshctl agent` flags."""

    node: str  # the Kubernetes node name this agent serves (spec.nodeName of its pods)
    # a file of Kubernetes objects; None: list and watch the Kubernetes API server (in-cluster
    # configuration, or `kubeconfig`)
    registry_file: Path | None = None
    kubeconfig: str | None = None
    admin_port: int = ADMIN_PORT
    # how enrolled pods whose namespace has no amesh.io/mtls-mode label treat plaintext that
    # reaches them directly: PERMISSIVE delivers it, STRICT refuses it
    mtls_mode: str = "PERMISSIVE"
    # where mesh-wide AuthorizationPolicies and PeerAuthentications live (Istio's root namespace)
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # the root CA's ca.key and ca.crt (created there, mode 0600, when both are absent); every
    # agent of a cluster must use the same root
    ca_dir: Path = DEFAULT_CA_DIR
    # the cluster CA (`ameshctl ca serve`) as host:port; None: the local root CA in ca_dir, the
    # weaker trust model of the embedded demo and test beds (this node holds the root key)
    ca_address: str | None = None
    # the projected service-account token (audience amesh-ca) the agent shows the cluster CA,
    # re-read for every request (kubelet rotates it), and the root certificates it checks the
    # CA's TLS and its peers against: both needed with ca_address
    ca_token_file: Path | None = None
    trust_bundle: Path | None = None
    cert_lifetime: timedelta = DEFAULT_LIFETIME  # workload certificates; renewed at half-life
    # seconds between checks of ca_dir for a new signing root or trust bundle (a root rotation)
    ca_poll_interval: float = POLL_INTERVAL
    metrics_port: int = METRICS_PORT
    readiness_port: int = READINESS_PORT
    access_log: bool = True  # one JSON line per closed connection on stdout
    metrics: bool = True  # Prometheus metrics (off: nothing counted beyond the connection table)
    flow_accounting: bool = True  # per-flow packet and byte counters in the BPF program
    cluster: str = DEFAULT_CLUSTER  # the source_cluster/destination_cluster metric label
    # seconds between registry file checks: a label flipped in the file applies within ~1 s
    registry_poll_interval: float = 0.2
    # seconds between full datapath reconciliations, which also pick up pod interfaces that
    # appeared after the pod was registered
    resync_interval: float = 2.0
    connect_timeout: float = 5.0  # seconds for one upstream connect (TCP or HBONE), and a TLS handshake
    # seconds a client waits in all while its upstream connect is tried and retried on other endpoints
    connect_deadline: float = 10.0
    # TLS handshakes on the HBONE port under way at once from one source address, and in all:
    # the excess is refused at once. A handshake is the most an unauthenticated client can make
    # the ztunnel do; a peer node's pool makes one per identity pair, so 64 covers its bursts.
    max_handshakes_per_source: int = 64
    max_handshakes: int = 512
    # seconds live connections get to finish on shutdown before they are cut; below the
    # usual 3 s between SIGTERM and SIGKILL of process supervisors and our test bed
    drain_grace: float = 2.0
    # seconds a draining agent (SIGUSR2, POST /drain, or replaced by a new agent on the node)
    # keeps its live connections before it cuts the rest and exits: much longer than drain_grace,
    # since the node's new agent serves every new connection meanwhile; a DaemonSet's
    # terminationGracePeriodSeconds must exceed it
    drain_deadline: float = 60.0
    # "uvloop" (libuv, the default) or "asyncio" (the standard library's selector loop): uvloop
    # carries the same connections with less CPU per byte and per connection (bench/README.md)
    event_loop: str = "uvloop"
    # ztunnel worker processes sharing the listeners through SO_REUSEPORT (agent/workers.py); 1 runs
    # the ztunnel in the agent's own process, as before workers existed
    workers: int = default_workers()


def default(field_name: str) -> object:
    """The default of an AgentConfig field, so the CLI states each default once, here."""
    field = next(f for f in fields(AgentConfig) if f.name == field_name)
    if field.default is MISSING:
        raise ValueError(f"AgentConfig.{field_name} has no default")
    return field.default
