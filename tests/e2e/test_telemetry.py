"""Seeing every connection: Prometheus metrics (Istio-compatible), the access log, the kernel's
view of each connection, readiness, a real Prometheus scraping an agent, bounded cardinality.

Bed: two point-to-point nodes with agents. Namespace "shop" is enrolled: client (sa client,
app=client, version=v1) on node-1, server-b (sa web, app=web, version=v2) on node-2, behind
Service shop/web 10.96.0.10:80 -> 8080 and shop/down 10.96.0.11:80 -> 9 (nothing listens).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
import time
import urllib.parse
from typing import Iterator

import pytest

from tests.mesh import SINGLE_PROCESS, AMESHCTL, Mesh, ServiceSpec, exchange

SERVICE_IP, DOWN_IP = "10.96.0.10", "10.96.0.11"
TARGET_PORT = 8080
READINESS_PORT = 15021
SERVICE_FQDN = "web.shop.svc.cluster.local"


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=2)
    # /metrics counts this process only until the dataplane-telemetry merge sums the workers
    mesh = Mesh(bed, namespaces={"shop": True}, container_port=TARGET_PORT, agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client", "version": "v1"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web", "version": "v2"})
    mesh.services.append(ServiceSpec("web", "shop", SERVICE_IP, 80, "http", {"app": "web"}))
    mesh.services.append(ServiceSpec("down", "shop", DOWN_IP, 80, 9, {"app": "web"}))
    bed.start_podserver(bed.pods["server-b"], TARGET_PORT)
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def series(samples: dict, name: str, **labels: str) -> list[float]:
    return [value for sample_labels, value in samples.get(name, [])
            if all(sample_labels.get(k) == v for k, v in labels.items())]


def send_payloads(mesh: Mesh, count: int) -> tuple[list[bytes], int, int]:
    """`count` connections through the Service; returns the payloads and bytes sent/received."""
    payloads = [os.urandom(1000 * (i + 1) + i) for i in range(count)]
    for payload in payloads:
        assert exchange(mesh.bed, mesh.bed.pods["client"], SERVICE_IP, 80, payload) == ("server-b", payload)
    reply_overhead = len(b"server-b\n")
    return payloads, sum(map(len, payloads)), sum(len(p) + reply_overhead for p in payloads)


def test_byte_counts_agree_exactly_in_metrics_cli_and_access_log(mesh: Mesh):
    payloads, sent, received = send_payloads(mesh, 5)
    conns = mesh.wait_for("5 closed connections", lambda: len(
        cs := [c for c in mesh.ctl_json(1, "connections") if c["state"] == "closed"]) == 5 and cs)
    assert sum(c["bytes_sent"] for c in conns) == sent and sum(c["bytes_received"] for c in conns) == received

    source = dict(reporter="source", source_workload="client", source_workload_namespace="shop",
                  source_principal="spiffe://cluster.local/ns/shop/sa/client", source_app="client", source_version="v1",
                  destination_workload="server-b", destination_workload_namespace="shop",
                  destination_principal="spiffe://cluster.local/ns/shop/sa/web", destination_app="web",
                  destination_version="v2", destination_service=SERVICE_FQDN, destination_service_name="web",
                  destination_service_namespace="shop", request_protocol="tcp", response_flags="-",
                  connection_security_policy="mutual_tls")
    samples = mesh.metrics(1)
    # Istio's naming: "sent" bytes are the response (server to client), "received" the request
    assert series(samples, "istio_tcp_received_bytes_total", **source) == [sent]
    assert series(samples, "istio_tcp_sent_bytes_total", **source) == [received]
    assert series(samples, "istio_tcp_connections_opened_total", **source) == [5]
    assert series(samples, "istio_tcp_connections_closed_total", **source) == [5]
    inbound = mesh.wait_for("node-2's closed totals", lambda: series(
        m := mesh.metrics(2), "istio_tcp_connections_closed_total", reporter="destination") == [5] and m)
    assert series(inbound, "istio_tcp_received_bytes_total", reporter="destination", source_workload="client",
                  destination_workload="server-b", connection_security_policy="mutual_tls") == [sent]
    assert series(inbound, "istio_tcp_sent_bytes_total", reporter="destination") == [received]

    log = mesh.access_log(1)
    assert [(e["bytes_sent"], e["bytes_recv"]) for e in log] == [(len(p), len(p) + 9) for p in payloads]
    for entry in log:
        assert entry["src.workload"] == "shop/client" and entry["dst.workload"] == "shop/server-b"
        assert entry["src.identity"] == "spiffe://cluster.local/ns/shop/sa/client"
        assert entry["dst.service"] == "shop/web" and entry["message"] == "connection complete"
        assert entry["duration"].endswith("ms") and entry["start"].endswith("+00:00")
    assert [e["bytes_sent"] for e in mesh.access_log(2)] == [len(p) for p in payloads]


def test_a_refused_upstream_is_counted_with_its_reason(mesh: Mesh):
    with pytest.raises(ConnectionError):
        exchange(mesh.bed, mesh.bed.pods["client"], DOWN_IP, 80, b"x")
    node2 = mesh.wait_for("the refusal on node-2", lambda: series(
        m := mesh.metrics(2), "amesh_connection_failures_total", reason="connect_refused") == [1] and m)
    assert series(node2, "istio_tcp_connections_closed_total", reporter="destination", response_flags="UF") == [1]
    node1 = mesh.metrics(1)
    assert sum(series(node1, "amesh_connection_failures_total")) == 1
    assert series(node1, "istio_tcp_connections_opened_total", reporter="source", response_flags="UF",
                  destination_service="down.shop.svc.cluster.local") == [1]
    [entry] = mesh.access_log(1)
    assert entry["message"] == "connection failed" and "refused" in entry["error"]


def test_agent_metrics_readiness_and_process_figures(mesh: Mesh):
    status, body = mesh.http(1, READINESS_PORT, "/healthz/ready")
    assert (status, json.loads(body)) == (200, {"ready": True, "problems": []})
    samples = mesh.metrics(1)
    assert series(samples, "amesh_ready") == [1]
    assert series(samples, "amesh_registry_workloads") == [2] and series(samples, "amesh_registry_services") == [2]
    assert 0 <= series(samples, "amesh_registry_last_sync_age_seconds")[0] < 60
    assert series(samples, "amesh_bpf_attached_interfaces")[0] >= 2
    expiry = series(samples, "amesh_certificate_expiry_timestamp_seconds",
                    identity="spiffe://cluster.local/ns/shop/sa/client")
    assert expiry and 23 * 3600 < expiry[0] - time.time() <= 24 * 3600
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert series(samples, name)[0] > 0, name


def test_connections_show_the_kernels_view_of_both_sockets(mesh: Mesh):
    bed = mesh.bed
    with bed.connect(bed.pods["client"], SERVICE_IP, 80, timeout=5) as sock:
        assert sock.recv(100) == b"server-b\n"
        [live] = mesh.ctl_json(1, "connections")
        assert live["state"] == "open"
        for side in ("client", "upstream"):
            kernel = live["kernel"][side]
            assert kernel["state"] == "ESTABLISHED" and kernel["rtt_ms"] > 0, kernel
        assert live["connect_duration"] > 0
    [closed] = mesh.wait_for("the connection to close", lambda: [
        c for c in mesh.ctl_json(1, "connections") if c["state"] == "closed"])
    assert closed["kernel"]["client"]["segs_out"] > 0 and closed["kernel"]["upstream"]["segs_out"] > 0
    # the capture program's counters of the same connection's pod-facing flow
    assert closed["flow"]["packets"] >= 3 and closed["flow"]["bytes"] > 0
    table = mesh.ctl(1, "connections").stdout
    assert "RTT" in table.splitlines()[0]


def test_metric_series_stay_bounded_over_a_thousand_ports(mesh: Mesh):
    bed = mesh.bed
    server_b = bed.pods["server-b"]
    for port in range(20000, 21000):
        with pytest.raises(ConnectionError):
            exchange(bed, bed.pods["client"], server_b.ip, port, b"x", timeout=5)
    samples = mesh.wait_for("1000 failures counted", lambda: sum(series(
        m := mesh.metrics(1), "istio_tcp_connections_closed_total")) == 1000 and m)
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total", "amesh_connection_failures_total"):
        assert len(samples[name]) <= 2, samples[name]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package (make test installs it)")
def test_a_real_prometheus_scrapes_the_agent_and_sees_what_was_sent(mesh: Mesh):
    bed = mesh.bed
    config = bed.logdir / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      "scrape_configs:\n- job_name: amesh\n  static_configs: [{targets: ['127.0.0.1:15020']}]\n")
    proc = bed.spawn(bed.node(1), ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={bed.logdir / 'tsdb'}",
                                   "--web.listen-address=127.0.0.1:9090"], bed.logdir / "prometheus.log")
    bed.wait_listening(bed.node(1), 9090, timeout=30, proc=proc)
    _, sent, received = send_payloads(mesh, 3)

    def query(expr: str) -> float | None:
        status, body = mesh.http(1, 9090, "/api/v1/query?query=" + urllib.parse.quote(expr))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result else None

    source = 'reporter="source",destination_service="%s"' % SERVICE_FQDN
    mesh.wait_for("Prometheus to scrape the closed connections",
                  lambda: query(f"sum(istio_tcp_connections_closed_total{{{source}}})") == 3, timeout=20)
    assert query(f"sum(istio_tcp_received_bytes_total{{{source}}})") == sent
    assert query(f"sum(istio_tcp_sent_bytes_total{{{source}}})") == received
    assert query('up{job="amesh"}') == 1


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (make test installs it)")
def test_top_shows_a_live_connection_in_a_terminal_and_quits_on_q(mesh: Mesh):
    bed = mesh.bed
    sock = bed.connect(bed.pods["client"], SERVICE_IP, 80, timeout=5)
    stop = threading.Event()

    def trickle() -> None:  # a live connection with steady traffic both ways
        while not stop.is_set():
            sock.sendall(b"x" * 4096)
            sock.recv(65536)
            time.sleep(0.01)

    sender = threading.Thread(target=trickle)
    sender.start()
    tmux = ["tmux", "-L", f"{bed.prefix}top", "-f", "/dev/null"]
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "30",
                        shlex.join(["ip", "netns", "exec", bed.node(1).netns, AMESHCTL, "top", "--interval", "0.3"])],
                       check=True, timeout=10)

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True,
                                  timeout=10).stdout

        try:
            shown = mesh.wait_for("top to show the live connection", lambda: (
                "shop/client" in (text := screen()) and "shop/server-b" in text and "bit/s" in text) and text)
        except AssertionError as e:
            raise AssertionError(f"{e}; the terminal shows:\n{screen()}") from None
        assert "amesh top - node node-1 - 1 live connections" in shown, shown
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True, timeout=10)
        mesh.wait_for("top to quit", lambda: subprocess.run([*tmux, "has-session", "-t", "top"],
                                                             capture_output=True, timeout=10).returncode != 0)
    finally:
        stop.set()
        sender.join(timeout=5)
        sock.close()
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
