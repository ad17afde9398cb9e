"""Prometheus metrics on :15020/metrics and readiness on :15021/healthz/ready, for one agent.

Counting stays off the data plane's hot path, as prometheus_client's docs advise for custom
collectors: the ztunnel counts bytes with plain integers on its connection records; a record is
folded into per-label-set totals once, when it closes; live connections are added at scrape
time, when each process running listeners takes its snapshot (ztunnel/snapshot.py) and the
agent renders their merge. Series carry Istio's TCP metric names and labels (see
ztunnel/telemetry.py), plus amesh's own, and the process collector's CPU, memory and file
descriptors.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ztunnel.snapshot import CONNECT_BUCKETS, DataplaneSnapshot, merge
from ztunnel.telemetry import ISTIO_LABELS

if TYPE_CHECKING:
    from agent.node import NodeAgent

_ISTIO_COUNTERS = (  # name, help, index into a label set's totals (IstioTotals)
    ("istio_tcp_connections_opened", "Connections opened (Istio-compatible).", 0),
    ("istio_tcp_connections_closed", "Connections closed (Istio-compatible).", 1),
    # As in Istio: "sent" are the response bytes (destination to source), "received" the request bytes.
    ("istio_tcp_sent_bytes", "Bytes sent in response, destination to source (Istio-compatible).", 3),
    ("istio_tcp_received_bytes", "Bytes received in requests, source to destination (Istio-compatible).", 2),
)


class AgentCollector:
    """A prometheus_client collector of one node: the data plane's series rendered from `snapshot`
    (the merge of every process's, set before each scrape), the control plane's read from the agent."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        self.snapshot = DataplaneSnapshot()  # no data plane counted yet

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        yield from _istio(snapshot)
        yield from _connections(snapshot)
        yield from self._control_plane()
        yield from _hbone(snapshot)
        ready, _ = self.agent.readiness()
        yield GaugeMetricFamily("amesh_ready", "1 when the BPF programs, the listeners and the registry are up.",
                                value=1 if ready else 0)

    def _control_plane(self) -> Iterator[Metric]:
        agent = self.agent
        state = agent.state
        yield GaugeMetricFamily("amesh_registry_workloads", "Workloads in the registry.", value=state.workload_count)
        yield GaugeMetricFamily("amesh_registry_services", "Services in the registry.", value=state.service_count)
        synced = agent.registry.synced_at
        yield GaugeMetricFamily("amesh_registry_last_sync_age_seconds", "Seconds since the registry last "
                                "confirmed a good, current state.", value=time.time() - synced if synced else float("nan"))
        yield CounterMetricFamily("amesh_registry_errors", "Registry inputs rejected.", value=agent.registry_errors)
        attached = agent.datapath.attached_count if agent.datapath else 0
        yield GaugeMetricFamily("amesh_bpf_attached_interfaces", "Interfaces the capture program is attached "
                                "to.", value=attached)
        yield CounterMetricFamily("amesh_worker_restarts", "ztunnel worker processes restarted after they died.",
                                  value=agent.workers.restarts if agent.workers else 0)
        expiry = GaugeMetricFamily("amesh_certificate_expiry_timestamp_seconds", "When each workload "
                                   "certificate expires (Unix time).", labels=["identity"])
        for cert in agent.certs.certificates() if agent.certs else []:
            if cert["not_after"]:
                expiry.add_metric([cert["identity"]], datetime.fromisoformat(cert["not_after"]).timestamp())
        yield expiry
        yield from _ca_requests(agent)


def _istio(snapshot: DataplaneSnapshot) -> Iterator[Metric]:
    for name, help_text, index in _ISTIO_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=ISTIO_LABELS)
        for labels, values in snapshot.istio.items():
            family.add_metric(labels, values[index])
        yield family


def _connections(snapshot: DataplaneSnapshot) -> Iterator[Metric]:
    yield _counter_by("amesh_connection_failures", "Connections that could not be served, by reason.", "reason",
                      snapshot.failures)
    ejections = CounterMetricFamily("amesh_endpoint_ejections", "Times outlier detection ejected an endpoint "
                                    "(its breaker opened), by destination service.", labels=["service"])
    ejected = GaugeMetricFamily("amesh_endpoint_ejected", "Endpoints whose breaker is open or half-open now, "
                                "by destination service.", labels=["service"])
    for service, count in sorted(snapshot.ejections.items()):
        ejections.add_metric([service], count)
        ejected.add_metric([service], len(snapshot.ejected.get(service, ())))
    yield ejections
    yield ejected
    yield from _traffic(snapshot)
    yield _counter_by("amesh_upstream_connect_attempts", "Upstream connects tried, by result: ok, the failure's "
                      "reason, or retry_budget_spent for a retry the budget refused.", "result", snapshot.attempts)
    connect = HistogramMetricFamily("amesh_connect_duration_seconds", "Time to connect the upstream of a "
                                    "connection (TCP, or HBONE through the peer node).", labels=["security"])
    for security, histogram in sorted(snapshot.connect.items()):
        buckets = [(str(bound), count) for bound, count in zip(CONNECT_BUCKETS, histogram.buckets)]
        connect.add_metric([security], buckets + [("+Inf", histogram.count)], histogram.sum)
    yield connect
    live = GaugeMetricFamily("amesh_connections_live", "Connections open now.", labels=["direction"])
    for direction, count in snapshot.live.items():
        live.add_metric([direction], count)
    yield live


def _traffic(snapshot: DataplaneSnapshot) -> Iterator[Metric]:
    """Live connections per destination Service (what maxConnections caps) and each split's
    connections per backend; the refusals are amesh_connection_failures_total's
    upstream_overflow and rate_limited."""
    live = GaugeMetricFamily("amesh_service_connections_live", "Outbound connections from this node open or "
                             "connecting now, by destination service.", labels=["service"])
    split = CounterMetricFamily("amesh_split_connections", "Connections a weighted split sent to each backend "
                                "since its weights last changed, by split service and backend service.",
                                labels=["service", "backend"])
    for service, count in sorted(snapshot.service_live.items()):
        live.add_metric([service], count)
    for (service, backend), count in snapshot.split_picks.items():
        split.add_metric([service, backend], count)
    yield live
    yield split


def _hbone(snapshot: DataplaneSnapshot) -> Iterator[Metric]:
    """The HBONE pools' and listeners' counters, and the data plane's suppressed log lines."""
    yield CounterMetricFamily("amesh_hbone_handshakes", "mTLS sessions the HBONE pool opened.",
                              value=snapshot.hbone_handshakes)
    yield GaugeMetricFamily("amesh_hbone_sessions", "Live pooled HBONE sessions.", value=snapshot.hbone_sessions)
    yield CounterMetricFamily("amesh_hbone_dead_peers", "Pooled HBONE sessions dropped because the peer "
                              "answered no HTTP/2 PING within the keepalive timeout.", value=snapshot.hbone_dead_peers)
    mitigations = CounterMetricFamily("amesh_hbone_mitigations", "HTTP/2 limits HBONE peers crossed (floods, "
                                      "rapid reset, oversized frames, refused streams, deadlines), by kind.",
                                      labels=["kind", "side"])
    for side, counts in (("server", snapshot.server_mitigations), ("client", snapshot.client_mitigations)):
        for kind, count in sorted(counts.items()):
            mitigations.add_metric([kind, side], count)
    yield mitigations
    yield _counter_by("amesh_log_lines_suppressed", "Agent log lines not written because their reason was over "
                      "its rate (the access log keeps every connection).", "reason", snapshot.log_suppressed)
    yield CounterMetricFamily("amesh_hbone_unverified_sources", "Inbound CONNECTs whose claimed source "
                              "(forwarded: for=) is not a workload with the identity the peer proved.",
                              value=snapshot.unverified_sources)


def _counter_by(name: str, help_text: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family with one series per value of `label`, in sorted order."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def _ca_requests(agent: "NodeAgent") -> Iterator[Metric]:
    """amesh_ca_requests_total{result}: the agent's requests to the cluster CA (none in local-CA mode)."""
    yield _counter_by("amesh_ca_requests", "Certificate requests to the cluster CA, by result: signed, the CA's "
                      "refusal reason, unreachable, bad_response or local_files.", "result",
                      agent.ca_status().get("requests", {}))


class TelemetryServer:
    """Serves /metrics on the metrics port (unless metrics are off) and /healthz/ready on the
    readiness port."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        metrics = web.Application()
        self._collector = AgentCollector(agent)
        if agent.config.metrics:
            self.registry.register(self._collector)
            ProcessCollector(registry=self.registry)
            metrics.router.add_get("/metrics", self._metrics)
        readiness = web.Application()
        readiness.router.add_get("/healthz/ready", self._ready)
        self._runners = [web.AppRunner(metrics, access_log=None), web.AppRunner(readiness, access_log=None)]

    async def start(self, metrics_port: int, readiness_port: int) -> None:
        # all addresses of the node: Prometheus and the kubelet scrape and probe from outside
        for runner, port in zip(self._runners, (metrics_port, readiness_port)):
            await runner.setup()
            await web.TCPSite(runner, "0.0.0.0", port, reuse_address=True, reuse_port=True).start()  # as admin's

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # set and rendered with no await between: a concurrent scrape cannot swap it meanwhile
        self._collector.snapshot = merge(await self.agent.dataplane_snapshots())
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, request: web.Request) -> web.Response:
        ready, problems = self.agent.readiness()
        return web.json_response({"ready": ready, "problems": problems}, status=200 if ready else 503)
