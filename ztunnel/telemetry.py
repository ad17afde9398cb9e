"""What a connection looks like to telemetry: Istio's TCP metric labels and access-log fields.

Pure functions of a `ConnectionRecord` and the registry, so Prometheus, the access log and
their tests agree. Label values follow Istio's so that dashboards and alerts written for
Istio's ztunnel work unchanged; none of them carries a port number, an address or a
connection id, so the number of series is bounded by workloads and services, not traffic.
"""

from __future__ import annotations

import re
from typing import Any

from registry.model import RegistryState, Workload
from ztunnel.connections import ConnectionRecord, iso_utc
from ztunnel.errors import failure_reason

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's default cluster id

# Istio's TCP metrics' labels, in Istio's order.
ISTIO_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_service_name", "destination_service_namespace", "destination_cluster", "request_protocol",
    "response_flags", "connection_security_policy",
)


# The suffixes Kubernetes controllers add to a pod's name, found by the labels they set.
_DEPLOYMENT_POD = re.compile(r"^(?P<name>.+)-(?P<hash>[a-z0-9]+)-[a-z0-9]{5}$")
_DAEMONSET_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{5}$")
_STATEFULSET_POD = re.compile(r"^(?P<name>.+)-\d+$")


def workload_name(workload: Workload) -> str:
    """The name of the controller that owns a pod (Deployment, DaemonSet, StatefulSet), as
    Istio's `*_workload` labels give it; the pod's own name when it has none."""
    labels = workload.labels
    if "pod-template-hash" in labels:
        match = _DEPLOYMENT_POD.match(workload.name)
        if match and match["hash"] == labels["pod-template-hash"]:
            return match["name"]
    if "statefulset.kubernetes.io/pod-name" in labels and (match := _STATEFULSET_POD.match(workload.name)):
        return match["name"]
    if "controller-revision-hash" in labels and (match := _DAEMONSET_POD.match(workload.name)):
        return match["name"]
    return workload.name


def _app(workload: Workload) -> str:
    return workload.labels.get("app.kubernetes.io/name") or workload.labels.get("app") or UNKNOWN


def _version(workload: Workload) -> str:
    return workload.labels.get("app.kubernetes.io/version") or workload.labels.get("version") or UNKNOWN


def _workload_labels(side: str, workload: Workload | None, principal: str | None) -> dict[str, str]:
    return {
        f"{side}_workload": workload_name(workload) if workload else UNKNOWN,
        f"{side}_workload_namespace": workload.namespace if workload else UNKNOWN,
        f"{side}_principal": principal or UNKNOWN,
        f"{side}_app": _app(workload) if workload else UNKNOWN,
        f"{side}_version": _version(workload) if workload else UNKNOWN,
    }


def _workload(state: RegistryState, key: str | None) -> Workload | None:
    return state.workload_by_key(key) if key else None


def istio_labels(record: ConnectionRecord, state: RegistryState, cluster: str = DEFAULT_CLUSTER) -> tuple[str, ...]:
    """The label values, in ISTIO_LABELS order, of the Istio TCP series `record` counts in."""
    service_namespace, _, service_name = (record.service or "").partition("/")
    labels = {
        "reporter": "source" if record.direction == "outbound" else "destination",
        **_workload_labels("source", _workload(state, record.source_workload), record.source_identity),
        "source_cluster": cluster,
        **_workload_labels("destination", _workload(state, record.upstream_workload), record.destination_identity),
        "destination_service": f"{service_name}.{service_namespace}.svc.cluster.local" if record.service else UNKNOWN,
        "destination_service_name": service_name or UNKNOWN,
        "destination_service_namespace": service_namespace or UNKNOWN,
        "destination_cluster": cluster,
        "request_protocol": "tcp",
        "response_flags": failure_reason(record.failure).flag if record.state == "failed" else "-",
        "connection_security_policy": "mutual_tls" if record.security in ("mtls", "same-node") else "unknown",
    }
    return tuple(labels[name] for name in ISTIO_LABELS)


def access_log_entry(record: ConnectionRecord) -> dict[str, Any]:
    """One JSON access-log line for a closed connection, with Istio ztunnel's field names."""
    entry: dict[str, Any] = {
        "start": iso_utc(record.started),
        "message": "connection complete" if record.state == "closed" else "connection failed",
        "direction": record.direction,
        "src.addr": f"{record.source_ip}:{record.source_port}" if record.source_port else record.source_ip,
        "src.workload": record.source_workload,
        "src.identity": record.source_identity,
        "dst.addr": record.upstream or record.original_dst,
        "dst.original": record.original_dst,
        "dst.service": record.service,
        "dst.workload": record.upstream_workload,
        "dst.identity": record.destination_identity,
        "security": record.security,
        "bytes_sent": record.bytes_sent,
        "bytes_recv": record.bytes_received,
        "duration": f"{round(record.duration() * 1000)}ms",
        "connection_id": record.id,
    }
    if len(record.attempts) > 1:  # retried on other endpoints
        entry["upstream.attempts"] = [f"{a['upstream']} {a['result']}" for a in record.attempts]
    if record.state == "failed":
        entry["error"] = record.reason
        entry["error.code"] = record.failure
    return {k: v for k, v in entry.items() if v is not None}
