"""A mesh on a test bed: the registry file describing the bed's pods, node agents, `ameshctl`.

Used by the e2e tests and `make demo`, so both drive amesh exactly as a user does: a YAML file
of Kubernetes objects, `ameshctl agent` in each node's namespace, `ameshctl ... -o json`.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from prometheus_client.parser import text_string_to_metric_families

from ca.admission import AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT as AGENT_ACCOUNT, AUDIENCE as CA_AUDIENCE
from ca.config import CA_PORT
from ca.config import METRICS_PORT as CA_METRICS_PORT
from tests.bed import Bed, Node, Pod, in_netns, netns_socket
from tests.kubeapi import KubeAPIServer

AMESHCTL = str(Path(sys.executable).with_name("ameshctl"))  # the installed console script
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
METRICS_PORT = 15020
# agents that run the ztunnel in their own process: for tests of what is per worker by design
# (round-robin turns, split turns and limit shares, one HBONE session per peer and worker)
SINGLE_PROCESS = ("--workers", "1")
AGENT_START_TIMEOUT = 30.0  # seconds; compiling the BPF program takes about one
CONTROL_PLANE_IP, API_PORT = "172.18.0.1", 6443  # on the fabric bridge: the control plane's node network


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
    # set (by ControlPlane): agents ask the cluster CA instead of holding the root CA themselves
    control_plane: ControlPlane | None = None
    policies: list[dict] = field(default_factory=list)  # AuthorizationPolicies, PeerAuthentications
    # None: a node's agent is the venv's ameshctl, the spawned process. Else the argv of a container
    # runtime's run of an image's ameshctl (tests/e2e/test_image.py): the runtime needs the host's
    # cgroup mounts, and its agent is no child of the spawned process, so it is waited for by port
    agent_container: Callable[[Node], list[str]] | None = None
    agent_args: tuple[str, ...] = ()  # given to every agent this mesh starts, before start_agent's own


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
        """Replaces the registry file at once (write and rename), as kubectl-driven tooling does;
        with a control plane, makes the API server hold exactly these objects instead."""
        if self.control_plane is not None:
            self.control_plane.publish(list(yaml.safe_load_all(text)) if text is not None else self.objects())
            return
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
        ca = self.control_plane.agent_args(nd) if self.control_plane else ["--ca-dir", str(self.ca_dir)]
        runtime = self.agent_container(nd) if self.agent_container else None
        argv = [*(runtime or [AMESHCTL]), "agent", "--node", nd.name, *source, *ca, *self.agent_args, *extra_args]
        proc = self.bed.spawn(nd, argv, self.agent_log(nd), host_mounts=runtime is not None)
        self.bed.wait_listening(nd, ADMIN_PORT, timeout=AGENT_START_TIMEOUT, proc=None if runtime else proc)
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
        return _samples(body)

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


@dataclass
class ControlPlane:
    """A bed's control plane in its fabric namespace (the node network): the test API server and
    the cluster CA (`ameshctl ca serve`), the only process holding the root key. Each node has an
    agent pod (amesh-system/amesh-agent-<node>) in the API server, and its agent a token bound to
    that pod, as kubelet projects it. Build it with `ControlPlane.start(mesh)`; `close()` ends both."""

    mesh: Mesh
    api: KubeAPIServer
    ca: subprocess.Popen | None = None
    published: set[tuple[str, str, str]] = field(default_factory=set)  # (kind, namespace, name) of the mesh's objects
    ca_options: tuple[str, ...] = ()  # more `ameshctl ca serve` flags
    bundle_versions: int = 0  # versions of the ConfigMap volume written so far

    @classmethod
    def start(cls, mesh: Mesh, ca_options: tuple[str, ...] = ()) -> ControlPlane:
        """The API server (holding the mesh's objects) and the CA, listening on CONTROL_PLANE_IP."""
        bed = mesh.bed
        bed.run(bed.fabric, ["ip", "addr", "replace", f"{CONTROL_PLANE_IP}/24", "dev", "br0"])
        with in_netns(bed.fabric):  # the server's thread, and so its sockets, live in the fabric namespace
            api = KubeAPIServer(CONTROL_PLANE_IP, API_PORT, objects=[_agent_pod(node) for node in bed.nodes])
            api.start()
        plane = cls(mesh, api, ca_options=ca_options)
        try:
            plane.publish(mesh.objects())
            mesh.kubeconfig = api.write_kubeconfig(bed.logdir / "kubeconfig")
            mesh.control_plane = plane
            bed.run(bed.fabric, [AMESHCTL, "ca", "init", str(plane.secret_dir)])
            plane.publish_trust_bundle((plane.secret_dir / "ca.crt").read_bytes())  # the certificate only
            plane.start_ca()
        except BaseException:
            plane.close()
            raise
        return plane

    @property
    def secret_dir(self) -> Path:
        """The Secret amesh-ca (ca.key, ca.crt), mounted only into the CA."""
        return self.mesh.bed.logdir / "amesh-ca-secret"

    @property
    def trust_bundle(self) -> Path:
        """The ConfigMap amesh-trust-bundle (ca.crt only), mounted into every agent."""
        return self.mesh.bed.logdir / "amesh-trust-bundle" / "ca.crt"

    def publish_trust_bundle(self, pem: bytes) -> None:
        """Makes `pem` the ConfigMap's ca.crt as kubelet updates a ConfigMap volume: the files in a
        new timestamped directory, the ..data symlink renamed to point at it (ca.crt is a symlink
        through ..data), so agents see the whole new file at once."""
        volume = self.trust_bundle.parent
        self.bundle_versions += 1
        version = f"..v{self.bundle_versions}"
        (volume / version).mkdir(parents=True)
        (volume / version / self.trust_bundle.name).write_bytes(pem)
        if not self.trust_bundle.is_symlink():
            self.trust_bundle.symlink_to(Path("..data") / self.trust_bundle.name)
        (volume / "..data_tmp").symlink_to(version)
        os.replace(volume / "..data_tmp", volume / "..data")

    @property
    def ca_address(self) -> str:
        return f"{CONTROL_PLANE_IP}:{CA_PORT}"

    def start_ca(self) -> subprocess.Popen:
        """Runs `ameshctl ca serve` in the fabric namespace; returns once it listens."""
        bed = self.mesh.bed
        argv = [AMESHCTL, "ca", "serve", "--ca-dir", str(self.secret_dir), "--listen", self.ca_address,
                "--metrics-port", str(CA_METRICS_PORT), "--kubeconfig", str(self.mesh.kubeconfig), *self.ca_options]
        self.ca = bed.spawn(bed.fabric, argv, bed.logdir / "ca.log")
        bed.wait_listening(bed.fabric, CA_PORT, timeout=AGENT_START_TIMEOUT, proc=self.ca)
        return self.ca

    def stop_ca(self) -> None:
        if self.ca is not None:
            self.mesh.bed.stop(self.ca)
            self.ca = None

    def token_file(self, node: Node | str | int) -> Path:
        return self.mesh.bed.logdir / "tokens" / self.mesh.bed.node(node).name

    def write_token(self, node: Node | str | int, token: str | None = None) -> str:
        """Projects a token for the node's agent (bound to its pod, audience amesh-ca), or `token`."""
        nd = self.mesh.bed.node(node)
        if token is None:
            token = self.api.request_token(AGENT_NAMESPACE, AGENT_ACCOUNT, f"amesh-agent-{nd.name}", [CA_AUDIENCE])
        path = self.token_file(nd)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(token)
        os.replace(tmp, path)  # as kubelet swaps a projected token: never half-written
        return token

    def agent_args(self, node: Node) -> list[str]:
        """`ameshctl agent` flags for asking the cluster CA (the token projected first)."""
        if not self.token_file(node).exists():
            self.write_token(node)
        return ["--ca-address", self.ca_address, "--ca-token-file", str(self.token_file(node)),
                "--trust-bundle", str(self.trust_bundle)]

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Until every running agent has synced from the API server and holds a valid certificate
        for each identity it serves (the cluster CA answered)."""
        mesh = self.mesh

        def synced(node: str) -> bool:
            if not mesh.ctl_json(node, "status")["registry"]["connected"]:
                return False
            serves = {(w["namespace"], w["service_account"]) for w in mesh.ctl_json(node, "workloads")
                      if w["local"] and w["enrolled"]}
            states = [c["state"] for c in mesh.ctl_json(node, "certs")["certificates"]]
            return states == ["valid"] * len(serves)

        for node in mesh.agents:
            mesh.wait_for(f"{node}'s sync and certificates", lambda: synced(node), timeout)

    def publish(self, objects: list[dict]) -> None:
        """The API server holds exactly `objects` of the mesh (besides the agent pods) from now on."""
        keys = set()
        for obj in objects:
            stored = self.api.apply(obj)
            keys.add((stored["kind"], stored["metadata"].get("namespace", ""), stored["metadata"]["name"]))
        for kind, namespace, name in self.published - keys:
            self.api.delete(kind, name, namespace or None)
        self.published = keys

    def ca_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The CA's Prometheus samples by name."""
        sock = netns_socket(self.mesh.bed.fabric)
        try:
            sock.settimeout(5)
            sock.connect((CONTROL_PLANE_IP, CA_METRICS_PORT))
            connection = http.client.HTTPConnection(CONTROL_PLANE_IP, CA_METRICS_PORT, timeout=5)
            connection.sock = sock
            connection.request("GET", "/metrics")
            return _samples(connection.getresponse().read().decode())
        finally:
            sock.close()

    def close(self) -> None:
        try:
            self.stop_ca()
        finally:
            self.api.close()


def _agent_pod(node: Node) -> dict:
    """The node's agent as the DaemonSet's pod: host network, the agents' service account."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"amesh-agent-{node.name}", "namespace": AGENT_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "amesh-agent"}},
        "spec": {"nodeName": node.name, "serviceAccountName": AGENT_ACCOUNT, "hostNetwork": True,
                 "containers": [{"name": "agent"}]},
        "status": {"phase": "Running", "podIP": node.ip, "hostIP": node.ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def claimed_pod(mesh: Mesh, like: str, name: str, service_account: str, ip: str) -> dict:
    """A pod object as bed pod `like`'s (its node) but named `name`, running as `service_account`
    at `ip`: what a compromised node's registry may claim."""
    pod = _pod_object(mesh.bed.pods[like], mesh.container_port)
    pod["metadata"]["name"] = name
    pod["spec"]["serviceAccountName"] = service_account
    pod["status"]["podIP"] = ip
    return pod


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
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # a reset that arrived between the send and the half-close leaves the socket
            # unconnected: it is the same refusal as a reset seen while reading
            if exc.errno != errno.ENOTCONN:
                raise
            raise ConnectionResetError(errno.ECONNRESET, "connection reset before the half-close") from exc
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
