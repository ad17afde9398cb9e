"""Prometheus metrics on :15020/metrics and readiness on :15021/healthz/ready, for one agent.

Counting stays off the data plane's hot path, as prometheus_client's docs advise for custom
collectors: the ztunnel counts bytes with plain integers on its connection records; a record is
folded into per-label-set totals once, when it closes; live connections are added at scrape
time. Series carry Istio's TCP metric names and labels (see ztunnel/telemetry.py), plus amesh's
own, and the process collector's CPU, memory and file descriptors.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ztunnel.connections import ConnectionRecord
from ztunnel.telemetry import ISTIO_LABELS, istio_labels

if TYPE_CHECKING:
    from agent.node import NodeAgent

# seconds; upstream connects range from ~0.1 ms (same node) to seconds (a timing-out peer)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_ISTIO_COUNTERS = (  # name, help, index into a label set's totals
    ("istio_tcp_connections_opened", "Connections opened (Istio-compatible).", 0),
    ("istio_tcp_connections_closed", "Connections closed (Istio-compatible).", 1),
    # As in Istio: "sent" are the response bytes (destination to source), "received" the request bytes.
    ("istio_tcp_sent_bytes", "Bytes sent in response, destination to source (Istio-compatible).", 3),
    ("istio_tcp_received_bytes", "Bytes received in requests, source to destination (Istio-compatible).", 2),
)


class _ConnectHistogram:
    """Bucket counts of upstream connect durations, for one label value."""

    def __init__(self) -> None:
        self.buckets = [0] * len(CONNECT_BUCKETS)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(CONNECT_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.count += 1
        self.sum += seconds


class AgentCollector:
    """A prometheus_client collector over one agent's connection table, registry and datapath."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        self._closed: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._connect: dict[str, _ConnectHistogram] = defaultdict(_ConnectHistogram)
        # A connection's labels are fixed at its first scrape, so its bytes move from the live
        # sum to the closed totals under the same series even if the registry changed meanwhile.
        self._live_labels: dict[int, tuple[str, ...]] = {}
        agent.table.on_close.append(self.fold)

    def _labels(self, record: ConnectionRecord) -> tuple[str, ...]:
        labels = self._live_labels.get(record.id)
        if labels is None:
            labels = istio_labels(record, self.agent.state, self.agent.config.cluster)
        return labels

    def fold(self, record: ConnectionRecord) -> None:
        """Adds a connection that just ended to the totals."""
        totals = self._closed[self._labels(record)]
        self._live_labels.pop(record.id, None)
        totals[0] += 1
        totals[1] += 1
        totals[2] += record.bytes_sent
        totals[3] += record.bytes_received
        if record.connect_duration is not None:
            self._connect[record.security or "unknown"].observe(record.connect_duration)

    def collect(self) -> Iterator[Metric]:
        yield from self._istio()
        yield from self._connections()
        yield from self._agent()

    def _istio(self) -> Iterator[Metric]:
        totals = {labels: list(values) for labels, values in self._closed.items()}
        for record in self.agent.table.live():
            if record.state != "open":
                continue  # still being routed: its series is not known yet
            labels = self._live_labels.setdefault(record.id, self._labels(record))
            values = totals.setdefault(labels, [0, 0, 0, 0])
            values[0] += 1
            values[2] += record.bytes_sent
            values[3] += record.bytes_received
        for name, help_text, index in _ISTIO_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=ISTIO_LABELS)
            for labels, values in totals.items():
                family.add_metric(labels, values[index])
            yield family

    def _connections(self) -> Iterator[Metric]:
        table = self.agent.table
        failures = CounterMetricFamily("amesh_connection_failures", "Connections that could not be served, "
                                       "by reason.", labels=["reason"])
        for reason, count in sorted(table.failures.items()):
            failures.add_metric([reason], count)
        yield failures
        outbound = self.agent.outbound
        outliers = outbound.shaper.outliers if outbound else None
        ejections = CounterMetricFamily("amesh_endpoint_ejections", "Times outlier detection ejected an endpoint "
                                        "(its breaker opened), by destination service.", labels=["service"])
        ejected = GaugeMetricFamily("amesh_endpoint_ejected", "Endpoints whose breaker is open or half-open now, "
                                    "by destination service.", labels=["service"])
        for service, count in sorted((outliers.ejections_total if outliers else {}).items()):
            ejections.add_metric([service], count)
            ejected.add_metric([service], outliers.ejected(service))  # type: ignore[union-attr]
        yield ejections
        yield ejected
        yield from self._traffic()
        attempts = CounterMetricFamily("amesh_upstream_connect_attempts", "Upstream connects tried, by result: ok, "
                                       "the failure's reason, or retry_budget_spent for a retry the budget "
                                       "refused.", labels=["result"])
        for result, count in sorted(table.attempts.items()):
            attempts.add_metric([result], count)
        yield attempts
        connect = HistogramMetricFamily("amesh_connect_duration_seconds", "Time to connect the upstream of a "
                                        "connection (TCP, or HBONE through the peer node).", labels=["security"])
        for security, histogram in sorted(self._connect.items()):
            buckets = [(str(bound), count) for bound, count in zip(CONNECT_BUCKETS, histogram.buckets)]
            connect.add_metric([security], buckets + [("+Inf", histogram.count)], histogram.sum)
        yield connect
        live = GaugeMetricFamily("amesh_connections_live", "Connections open now.", labels=["direction"])
        by_direction = {"outbound": 0, "inbound": 0}
        for record in table.live():
            by_direction[record.direction] += 1
        for direction, count in by_direction.items():
            live.add_metric([direction], count)
        yield live

    def _traffic(self) -> Iterator[Metric]:
        """Live connections per destination Service (what maxConnections caps) and each split's
        connections per backend; the refusals are amesh_connection_failures_total's
        upstream_overflow and rate_limited."""
        outbound = self.agent.outbound
        live = GaugeMetricFamily("amesh_service_connections_live", "Outbound connections from this node open or "
                                 "connecting now, by destination service.", labels=["service"])
        split = CounterMetricFamily("amesh_split_connections", "Connections a weighted split sent to each backend "
                                    "since its weights last changed, by split service and backend service.",
                                    labels=["service", "backend"])
        if outbound is not None:
            for service, count in sorted(outbound.shaper.live.by_service.items()):
                live.add_metric([service], count)
            for service in self.agent.state.services:
                for backend, count in sorted(outbound.shaper.router.splits.picks(service.key).items()):
                    split.add_metric([service.key, backend], count)
        yield live
        yield split

    def _agent(self) -> Iterator[Metric]:
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
        yield CounterMetricFamily("amesh_hbone_handshakes", "mTLS sessions the HBONE pool opened.",
                                  value=agent.pool.handshakes)
        yield GaugeMetricFamily("amesh_hbone_sessions", "Live pooled HBONE sessions.", value=agent.pool.sessions)
        yield CounterMetricFamily("amesh_hbone_dead_peers", "Pooled HBONE sessions dropped because the peer "
                                  "answered no HTTP/2 PING within the keepalive timeout.", value=agent.pool.dead_peers)
        inbound = agent.inbound_hbone
        mitigations = CounterMetricFamily("amesh_hbone_mitigations", "HTTP/2 limits HBONE peers crossed (floods, "
                                          "rapid reset, oversized frames, refused streams, deadlines), by kind.",
                                          labels=["kind", "side"])
        for side, counts in (("server", inbound.mitigations if inbound else {}), ("client", agent.pool.mitigations)):
            for kind, count in sorted(counts.items()):
                mitigations.add_metric([kind, side], count)
        yield mitigations
        suppressed = CounterMetricFamily("amesh_log_lines_suppressed", "Agent log lines not written because "
                                         "their reason was over its rate (the access log keeps every connection).",
                                         labels=["reason"])
        for reason, count in sorted(agent.table.failure_log.suppressed.items()):
            suppressed.add_metric([reason], count)
        yield suppressed
        yield CounterMetricFamily("amesh_hbone_unverified_sources", "Inbound CONNECTs whose claimed source "
                                  "(forwarded: for=) is not a workload with the identity the peer proved.",
                                  value=inbound.unverified_sources if inbound else 0)
        ready, _ = agent.readiness()
        yield GaugeMetricFamily("amesh_ready", "1 when the BPF programs, the listeners and the registry are up.",
                                value=1 if ready else 0)


def _ca_requests(agent: "NodeAgent") -> Iterator[Metric]:
    """amesh_ca_requests_total{result}: the agent's requests to the cluster CA (none in local-CA mode)."""
    requests = CounterMetricFamily("amesh_ca_requests", "Certificate requests to the cluster CA, by result: signed, "
                                   "the CA's refusal reason, unreachable, bad_response or local_files.",
                                   labels=["result"])
    for result, count in sorted(agent.ca_status().get("requests", {}).items()):
        requests.add_metric([result], count)
    yield requests


class TelemetryServer:
    """Serves /metrics on the metrics port (unless metrics are off) and /healthz/ready on the
    readiness port."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        metrics = web.Application()
        if agent.config.metrics:
            self.registry.register(AgentCollector(agent))
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
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, request: web.Request) -> web.Response:
        ready, problems = self.agent.readiness()
        return web.json_response({"ready": ready, "problems": problems}, status=200 if ready else 503)
