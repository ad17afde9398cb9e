"""daemonset/: the agents and the cluster CA with the split Secret. Every manifest parses, the
commands are ones the CLI accepts, and the root key is mounted into the CA only."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from agent.cli import main
from ca.admission import AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, AUDIENCE
from ca.config import CA_NAMESPACE, CA_PORT, CA_SERVICE_ACCOUNT, METRICS_PORT

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset"
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
    """The options `ameshctl` would run the container's command with."""
    assert container["command"] == ["ameshctl"]
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
