"""A mesh on a test bed: the registry file describing the bed's pods, node agents, `ameshctl`.

Used by the e2e tests and `make demo`, so both drive amesh exactly as a user does: a YAML file
of Kubernetes objects, `ameshctl agent` in each node's namespace, `ameshctl ... -o json`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.bed import Bed, Node, Pod, netns_socket

AMESHCTL = str(Path(sys.executable).with_name("ameshctl"))  # the installed console script
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
METRICS_PORT = 15020
AGENT_START_TIMEOUT = 30.0  # seconds; compiling the BPF program takes about one


@dataclass
class ServiceSpec:
    name: str
    namespace: str
    cluster_ip: str
    port: int
    target_port: int | str
    selector: dict[str, str]
    port_name: str = "http"
    annotations: dict[str, str] = field(default_factory=dict)
    traffic_distribution: str | None = None  # spec.trafficDistribution ("PreferClose")


@dataclass
class Mesh:
    """The registry file and agents of one bed. Rewrite the file with `write_registry()`."""

    bed: Bed
    namespaces: dict[str, bool] = field(default_factory=dict)  # name -> enrolled (ambient)
    mtls_modes: dict[str, str] = field(default_factory=dict)  # namespace -> STRICT / PERMISSIVE label
    services: list[ServiceSpec] = field(default_factory=list)
    container_port: int = 8080  # every pod's "http" container port, for named target ports
    agents: dict[str, subprocess.Popen] = field(default_factory=dict)
    kubeconfig: Path | None = None  # set: agents watch this API server instead of the registry file
    policies: list[dict] = field(default_factory=list)  # AuthorizationPolicies, PeerAuthentications

    @property
    def registry_path(self) -> Path:
        return self.bed.logdir / "registry.yaml"

    def objects(self) -> list[dict]:
        """The Kubernetes objects describing the bed, as a cluster's API server would list them."""
        docs: list[dict] = []
        for name, ambient in self.namespaces.items():
            labels = {"amesh.io/dataplane-mode": "ambient"} if ambient else {}
            if name in self.mtls_modes:
                labels["amesh.io/mtls-mode"] = self.mtls_modes[name]
            docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
        for pod in self.bed.pods.values():
            docs.append(_pod_object(pod, self.container_port))
        for svc in self.services:
            docs.append({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": svc.name, "namespace": svc.namespace, "annotations": svc.annotations},
                "spec": {"clusterIP": svc.cluster_ip, "selector": svc.selector,
                         "ports": [{"name": svc.port_name, "port": svc.port, "targetPort": svc.target_port,
                                    "protocol": "TCP"}],
                         **({"trafficDistribution": svc.traffic_distribution} if svc.traffic_distribution else {})},
            })
        return docs + self.policies

    def write_registry(self, text: str | None = None) -> None:
        """Replaces the registry file at once (write and rename), as kubectl-driven tooling does."""
        path = self.registry_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text if text is not None else yaml.safe_dump_all(self.objects(), sort_keys=False))
        os.replace(tmp, path)

    @property
    def ca_dir(self) -> Path:
        """The root CA all agents of this mesh share (the first agent creates it)."""
        return self.bed.logdir / "ca"

    def start_agent(self, node: Node | str | int, *extra_args: str) -> subprocess.Popen:
        """Runs `ameshctl agent` in a node's namespace; returns once its admin API answers."""
        nd = self.bed.node(node)
        if self.kubeconfig is None and not self.registry_path.exists():
            self.write_registry()
        source = (["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig
                  else ["--registry-file", str(self.registry_path)])
        argv = [AMESHCTL, "agent", "--node", nd.name, *source, "--ca-dir", str(self.ca_dir), *extra_args]
        proc = self.bed.spawn(nd, argv, self.agent_log(nd))
        self.bed.wait_listening(nd, ADMIN_PORT, timeout=AGENT_START_TIMEOUT, proc=proc)
        self.agents[nd.name] = proc
        return proc

    def agent_log(self, node: Node | str | int) -> Path:
        return self.bed.logdir / f"agent-{self.bed.node(node).name}.log"

    def print_logs(self, lines: int = 60) -> None:
        """Prints the end of every agent's log; pytest shows it when the test failed."""
        for node in self.bed.nodes:
            path = self.agent_log(node)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                print(f"--- {path.name} (last {lines} lines) ---", *tail, sep="\n")

    def stop_agent(self, node: Node | str | int) -> int | None:
        """SIGTERM the node's agent (SIGKILL after the bed's grace); returns its exit code."""
        return self.bed.stop(self.agents.pop(self.bed.node(node).name))

    def ctl(self, node: Node | str | int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs `ameshctl ARGS` in a node's namespace."""
        return self.bed.run(self.bed.node(node), [AMESHCTL, *args], check=check)

    def ctl_json(self, node: Node | str | int, view: str, *args: str) -> object:
        return json.loads(self.ctl(node, view, *args, "-o", "json").stdout)

    def http(self, node: Node | str | int, port: int, path: str, method: str = "GET",
             body: object = None) -> tuple[int, str]:
        """An HTTP request to 127.0.0.1:PORT inside a node's namespace (JSON body): (status, body)."""
        sock = netns_socket(self.bed.node(node).netns)
        try:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.sock = sock
            payload = json.dumps(body) if body is not None else None
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            sock.close()

    def metrics(self, node: Node | str | int) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The agent's Prometheus samples by name: [(labels, value), ...]."""
        status, body = self.http(node, METRICS_PORT, "/metrics")
        assert status == 200, body
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return samples

    def access_log(self, node: Node | str | int) -> list[dict]:
        """The JSON access-log lines the node's agent wrote so far."""
        text = self.agent_log(node).read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_for(self, what: str, predicate, timeout: float = 5.0, interval: float = 0.05):
        """Polls `predicate()` until it returns something truthy; fails naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)


def _pod_object(pod: Pod, container_port: int) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)},
        "spec": {"nodeName": pod.node.name, "serviceAccountName": pod.service_account,
                 "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": container_port}]}]},
        "status": {"podIP": pod.ip, "hostIP": pod.node.ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def exchange(bed: Bed, pod: Pod, ip: str, port: int, payload: bytes, timeout: float = 5.0) -> tuple[str, bytes]:
    """One connection to a tests.podserver: sends `payload`, half-closes, reads to EOF.

    Returns the name the server answered with and the bytes it echoed back.
    """
    with bed.connect(pod, ip, port, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    name, _, echoed = bytes(received).partition(b"\n")
    return name.decode(), echoed


def tcp_route(namespace: str, name: str, parent: str, weights: dict[str, int], port: int = 80) -> dict:
    """A Gateway API TCPRoute splitting Service `parent` (the GAMMA pattern) to the backend
    Services of `weights` on `port`."""
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                     "rules": [{"backendRefs": [{"name": backend, "port": port, "weight": weight}
                                                for backend, weight in weights.items()]}]}}


def destination_rule(namespace: str, host: str, policy: dict) -> dict:
    """An Istio DestinationRule named after its Service `host`, with `policy` as its trafficPolicy."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": host, "namespace": namespace},
            "spec": {"host": f"{host}.{namespace}.svc.cluster.local", "trafficPolicy": policy}}
