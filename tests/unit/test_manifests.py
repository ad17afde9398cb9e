"""daemonset/: the agents and the cluster CA with the split Secret. Every manifest parses, the
commands are ones the CLI accepts, and the root key is mounted into the CA only. The kustomize base
renders and validates against the Kubernetes 1.32 schemas (kubernetes-validate ships them: no
download). (That the ClusterRole grants every kind the agent watches: test_kubernetes_source.py.)"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

from agent.cli import main
from agent.config import METRICS_PORT as AGENT_METRICS_PORT
from ca.admission import AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, AUDIENCE
from ca.config import CA_NAMESPACE, CA_PORT, CA_SERVICE_ACCOUNT, METRICS_PORT

from tests.kubeapi import KubeAPIServer

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
KUBERNETES_VERSION = "1.32.0"  # the schemas the manifests are checked against
KUBECTL = shutil.which("kubectl")
KUBECTL_TIMEOUT = 20.0  # seconds; rendering takes well under one
MANIFESTS = ("amesh.yaml", "cluster-ca.yaml")  # what `kubectl apply` takes (the rest: Prometheus, Grafana)


def documents() -> list[dict]:
    docs = []
    for name in MANIFESTS:
        docs += [d for d in yaml.safe_load_all((DAEMONSET / name).read_text()) if d is not None]
    return docs


def one(kind: str, name: str) -> dict:
    [doc] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def params(container: dict, *group: str) -> dict:
    """The options `ameshctl` would run the container's command with (through the image's
    entrypoint or not)."""
    assert container["command"] in (["ameshctl"], [image_entrypoint(), "ameshctl"]), container["command"]
    args = container["args"]
    command: click.Command = main
    for _ in range(len(group) + 1):
        name, *args = args
        command = command.get_command(click.Context(command), name)  # type: ignore[attr-defined]
    return command.make_context("ameshctl", args).params


def test_every_manifest_is_a_named_kubernetes_object() -> None:
    for doc in documents():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace" and not doc["kind"].startswith("Cluster"):
            assert doc["metadata"]["namespace"] == "amesh-system", doc["metadata"]


def test_the_root_key_secret_is_mounted_into_the_ca_only() -> None:
    secrets = [(d["kind"], d["metadata"]["name"], v["secret"]["secretName"]) for d in documents()
               if d["kind"] in ("DaemonSet", "Deployment") for v in d["spec"]["template"]["spec"]["volumes"]
               if "secret" in v]
    assert secrets == [("Deployment", "amesh-ca", "amesh-ca")]


def test_the_ca_deployment_serves_with_the_key_from_the_secret() -> None:
    deployment = one("Deployment", "amesh-ca")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    options = params(container, "ca")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(options["ca_dir"]) == mounts["ca"] and deployment["spec"]["replicas"] == 2
    [secret] = [v["secret"] for v in spec["volumes"] if v["name"] == "ca"]
    assert secret["defaultMode"] & 0o077 == 0  # the CA refuses a root key group or others may read
    assert (spec["serviceAccountName"], deployment["metadata"]["namespace"]) == (CA_SERVICE_ACCOUNT, CA_NAMESPACE)
    assert options["listen"].endswith(f":{CA_PORT}") and options["metrics_port"] == METRICS_PORT
    assert options["agent_service_account"] == f"{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}"
    service = one("Service", "amesh-ca")
    assert {p["port"] for p in service["spec"]["ports"]} == {CA_PORT, METRICS_PORT}
    rules = one("ClusterRole", "amesh-ca")["rules"]
    granted = {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {("authentication.k8s.io", "tokenreviews", "create"), ("", "pods", "list"), ("", "pods", "watch")} <= granted


def test_agents_ask_the_ca_with_a_projected_token_and_the_root_certificate_only() -> None:
    daemonset = one("DaemonSet", "amesh-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert (spec["serviceAccountName"], daemonset["metadata"]["namespace"]) == (AGENT_SERVICE_ACCOUNT, AGENT_NAMESPACE)
    [container] = spec["containers"]
    options = params(container)
    assert options["ca_address"] == f"amesh-ca.{CA_NAMESPACE}.svc:{CA_PORT}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    [source] = volumes["ca-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == AUDIENCE and token["expirationSeconds"] <= 3600
    assert str(options["ca_token_file"]) == f"{mounts['ca-token']}/{token['path']}"
    assert volumes["trust-bundle"]["configMap"]["name"] == "amesh-trust-bundle"
    assert str(options["trust_bundle"]) == f"{mounts['trust-bundle']}/ca.crt"


def image_entrypoint() -> str:
    """The name the Containerfile installs image/entrypoint.sh as (on the image's PATH)."""
    [target] = re.findall(r"^COPY image/entrypoint.sh (\S+)$", (ROOT / "Containerfile").read_text(), re.M)
    return Path(target).name


def rendered() -> list[dict]:
    """`kubectl kustomize daemonset/`: what `kubectl apply -k daemonset/` would send."""
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH (apt-get install -y kubernetes-client)")
    proc = subprocess.run([KUBECTL, "kustomize", str(DAEMONSET)], capture_output=True, text=True,
                          timeout=KUBECTL_TIMEOUT)
    assert proc.returncode == 0, f"kubectl kustomize daemonset/: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def names(docs: list[dict]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def test_the_kustomize_base_is_every_manifest_kubectl_applies() -> None:
    kustomization = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    assert tuple(kustomization["resources"]) == MANIFESTS
    assert names(rendered()) == names(documents())


def test_every_rendered_object_validates_against_the_kubernetes_schemas() -> None:
    for doc in rendered():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type"])
def test_a_broken_daemonset_fails_the_validation(breakage: str) -> None:
    """The check above can fail: one mistake of each kind in the agent DaemonSet is caught."""
    daemonset = copy.deepcopy(one("DaemonSet", "amesh-agent"))
    spec = daemonset["spec"]
    if breakage == "misspelt field":
        spec["updateStrategy"]["rollingUpdate"]["maxSurges"] = spec["updateStrategy"]["rollingUpdate"].pop("maxSurge")
    else:
        spec["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_the_daemonset_upgrades_with_a_surge_and_declares_no_host_port() -> None:
    """maxSurge 1 / maxUnavailable 0: the new agent starts beside the old one. A hostNetwork pod's
    container ports are host ports, and the scheduler would never place the second pod."""
    daemonset = one("DaemonSet", "amesh-agent")
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                   "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert [c["name"] for c in spec["containers"] if c.get("ports")] == []


@pytest.mark.parametrize("kind, name, port", [("DaemonSet", "amesh-agent", AGENT_METRICS_PORT),
                                              ("Deployment", "amesh-ca", METRICS_PORT)])
def test_prometheus_scrapes_the_metrics_port(kind: str, name: str, port: int) -> None:
    annotations = one(kind, name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}


def test_kubectl_apply_dry_run_takes_what_the_test_api_server_serves(tmp_path: Path) -> None:
    """`kubectl apply --dry-run=client` against tests/kubeapi.py, for the kinds it serves (it has
    no apps/v1, rbac or ServiceAccount: the schema test above covers those)."""
    served = {"Namespace", "Service"}
    docs = [d for d in rendered() if d["kind"] in served]
    assert {d["kind"] for d in docs} == served
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    with KubeAPIServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        proc = subprocess.run(
            [KUBECTL, "--kubeconfig", str(kubeconfig), "apply", "--dry-run=client", "--validate=false", "-f", str(path)],
            capture_output=True, text=True, timeout=KUBECTL_TIMEOUT,
            env={**os.environ, "KUBECACHEDIR": str(tmp_path / "kube-cache"), "HOME": str(tmp_path)})
    assert proc.returncode == 0, f"kubectl apply --dry-run=client: {proc.stderr}"
    assert sorted(proc.stdout.splitlines()) == sorted(
        f"{d['kind'].lower()}/{d['metadata']['name']} created (dry run)" for d in docs)
