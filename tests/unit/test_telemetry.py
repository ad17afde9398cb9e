"""Istio-compatible labels and access-log lines, from connection records and the registry."""

from __future__ import annotations

from registry.model import RegistryState, Workload
from ztunnel.connections import ConnectionTable
from ztunnel.telemetry import ISTIO_LABELS, access_log_entry, istio_labels, workload_name

CLIENT = Workload("web-7d4b9c6f5-x2k9p", "shop", "10.244.1.10", "node-1", "web",
                  labels={"app": "web", "version": "v1", "pod-template-hash": "7d4b9c6f5"}, enrolled=True)
SERVER = Workload("db-0", "data", "10.244.2.10", "node-2", "db",
                  labels={"app.kubernetes.io/name": "db", "statefulset.kubernetes.io/pod-name": "db-0"}, enrolled=True)
STATE = RegistryState(workloads=(CLIENT, SERVER))


def test_workload_names_are_the_owning_controllers_as_istio_reports_them():
    assert workload_name(CLIENT) == "web"
    assert workload_name(SERVER) == "db"
    daemon = Workload("agent-8xk2q", "kube-system", "", "n", labels={"controller-revision-hash": "5d9f"})
    assert workload_name(daemon) == "agent"
    bare = Workload("web-7d4b9c6f5-x2k9p", "shop", "", "n", labels={"pod-template-hash": "other"})
    assert workload_name(bare) == "web-7d4b9c6f5-x2k9p"  # the hash does not match: not a Deployment's pod


def record(table: ConnectionTable, port: int, state: str = "closed", code: str | None = None):
    r = table.open("10.244.1.10", port, "10.96.0.10:80", CLIENT.key)
    r.service, r.upstream, r.upstream_workload = "data/db", f"10.244.2.10:{port}", SERVER.key
    r.security, r.source_identity = "mtls", "spiffe://cluster.local/ns/shop/sa/web"
    r.destination_identity = "spiffe://cluster.local/ns/data/sa/db"
    r.bytes_sent, r.bytes_received = 100, 250
    table.close(r, state, "closed" if state == "closed" else "upstream 10.244.2.10:9 refused the connection", code)
    return r


def test_istio_labels_name_both_workloads_and_never_a_port():
    table = ConnectionTable()
    labels = dict(zip(ISTIO_LABELS, istio_labels(record(table, 40000), STATE)))
    assert labels == {
        "reporter": "source", "source_workload": "web", "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/web", "source_app": "web", "source_version": "v1",
        "source_cluster": "Kubernetes", "destination_workload": "db", "destination_workload_namespace": "data",
        "destination_principal": "spiffe://cluster.local/ns/data/sa/db", "destination_app": "db",
        "destination_version": "unknown", "destination_service": "db.data.svc.cluster.local",
        "destination_service_name": "db", "destination_service_namespace": "data", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }
    series = {istio_labels(record(table, port), STATE) for port in range(1000, 2000)}
    assert len(series) == 1


def test_failures_carry_istio_response_flags():
    table = ConnectionTable()
    flags = {code: dict(zip(ISTIO_LABELS, istio_labels(record(table, 1, "failed", code), STATE)))["response_flags"]
             for code in ("connect_refused", "no_endpoint", "strict_mtls")}
    assert flags == {"connect_refused": "UF", "no_endpoint": "NR", "strict_mtls": "DENY"}


def test_access_log_lines_use_ztunnels_field_names_and_say_why_a_connection_failed():
    table = ConnectionTable()
    ok = access_log_entry(record(table, 40000))
    assert ok["src.addr"] == "10.244.1.10:40000" and ok["dst.addr"] == "10.244.2.10:40000"
    assert (ok["bytes_sent"], ok["bytes_recv"], ok["message"]) == (100, 250, "connection complete")
    assert ok["src.identity"].endswith("/sa/web") and "error" not in ok
    failed = access_log_entry(record(table, 9, "failed", "connect_refused"))
    assert failed["message"] == "connection failed" and failed["error.code"] == "connect_refused"
    assert "refused" in failed["error"]
