"""Fuzzing the registry file parser (registry/kubefile.py) with what an operator's file or an API
server's list may hold: any YAML text, any objects, and valid objects with one field replaced by
anything. It answers a RegistryState or a RegistryError naming the document, object and field,
never another exception; a valid file parses the same whatever its YAML formatting.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from registry.kubefile import build_state, parse_objects
from registry.model import RegistryError

pytestmark = pytest.mark.fuzz

# what YAML can decode to (safe_load): the JSON values plus dates and any hashable keys
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.dates(),
    lambda inner: (st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(max_size=10) | st.integers() | st.booleans(), inner, max_size=3)),
    max_leaves=10,
)
YAML_FRAGMENTS = ["---\n", "- ", ": ", "kind: Pod\n", "apiVersion: v1\n", "metadata: {name: a}\n", "&a ", "*a ",
                  "[", "]", "{", "}", "!!python/object:os.system ", "'", '"', "\t", "? ", "items: ", "kind: List\n",
                  "9" * 5000, "\n  "]
yaml_texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=6), max_size=25).map("".join),
    st.integers(1, 3000).map(lambda depth: "a: " + "[" * depth + "]" * depth + "\n"),
)

SHOP = {"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"amesh.io/dataplane-mode": "ambient"}}}


def pod(name: str, ip: str, node: str = "node-1") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "serviceAccountName": "web",
                     "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "hostIP": "172.18.0.11", "conditions": [{"type": "Ready", "status": "True"}]}}


def service(name: str, ip: str, port: int, target: int | str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}}


def endpoint_slice(service_name: str, ip: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": "web-0"}}]}


# what shapes traffic to shop/web: a DestinationRule, a TCPRoute, a TrafficSplit and a Node's zone
TRAFFIC = [
    {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
     "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"host": "web", "trafficPolicy": {
         "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "500ms"}},
         "outlierDetection": {"consecutive5xxErrors": 3, "interval": "10s", "baseEjectionTime": "1m",
                              "maxEjectionPercent": 30},
         "loadBalancer": {"simple": "LEAST_REQUEST"},
         "portLevelSettings": [{"port": {"number": 80}, "connectionPool": {"tcp": {"maxConnections": 1}}}]}}},
    {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
     "metadata": {"name": "web-canary", "namespace": "shop"},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
              "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 90},
                                         {"group": "", "kind": "Service", "name": "web-v2", "port": 80}]}]}},
    {"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
     "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"service": "web", "backends": [{"service": "web", "weight": "900m"},
                                             {"service": "web-v2", "weight": 1}]}},
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "a"}}},
]

# valid files: a namespace, pods with distinct addresses, a service, maybe a slice for it, maybe
# the objects that shape its traffic
valid_objects = st.builds(
    lambda count, port, target, sliced, shaped: [
        SHOP, *(pod(f"web-{i}", f"10.244.1.{10 + i}", f"node-{1 + i % 2}") for i in range(count)),
        service("web", "10.96.0.10", port, target), *([endpoint_slice("web", "10.244.1.10")] if sliced else []),
        *(TRAFFIC if shaped else [])],
    st.integers(0, 5), st.integers(1, 65535), st.sampled_from(["http", 8080, 9090]), st.booleans(), st.booleans())


def _paths(value, prefix=()):
    """Every (path, value) inside nested dicts and lists."""
    yield prefix, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _paths(inner, (*prefix, key))


@st.composite
def mutated_objects(draw) -> list:
    """A valid file's objects with one value somewhere replaced by anything YAML can hold."""
    objects = json.loads(json.dumps(draw(valid_objects)))  # a deep copy
    paths = [p for p, _ in _paths(objects) if p]
    path = draw(st.sampled_from(paths))
    parent = objects
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(yaml_values)
    return objects


# "document 2: ...", "document 1 items[0] (Pod shop/a): ...", "Pod shop/a: spec.nodeName: ...":
# which document, which object, then what is wrong
_FROM_FILE = re.compile(r"^document \d+( items\[\d+\])?(: | \([^)]*\): )\S")
_FROM_API = re.compile(r"^(object|[A-Za-z]+( [^:]*)?): \S")  # the name is known once read


def _check_file(text: str) -> None:
    try:
        parse_objects(text)
    except RegistryError as e:
        assert _FROM_FILE.match(str(e)), f"the error does not name the document: {str(e)[:200]!r}"


@given(yaml_texts)
@example("port: " + "9" * 5000 + "\n")
@example("a: " + "[" * 2000 + "]" * 2000 + "\n")
def test_any_text_parses_or_fails_with_a_registry_error_naming_the_document(text: str):
    _check_file(text)


@given(st.lists(yaml_values, max_size=3) | st.lists(mutated_objects().map(tuple), max_size=1).map(
    lambda files: list(files[0]) if files else []))
def test_any_documents_parse_or_fail_with_a_registry_error_naming_the_document(documents: list):
    _check_file(yaml.safe_dump_all(documents))


@given(mutated_objects())
def test_objects_from_an_api_server_build_a_state_or_fail_naming_the_object_and_field(objects: list):
    try:
        build_state([o for o in objects if isinstance(o, dict)])
    except RegistryError as e:
        assert _FROM_API.match(str(e)), f"the error does not name the object: {str(e)[:200]!r}"


@given(valid_objects, st.sampled_from(["block", "flow", "json", "list"]))
def test_a_valid_file_parses_the_same_whatever_its_formatting(objects: list, style: str):
    text = yaml.safe_dump_all(objects, sort_keys=False)
    if style == "flow":
        reformatted = yaml.safe_dump_all(objects, default_flow_style=True, sort_keys=True)
    elif style == "json":  # JSON is YAML: one document per object
        reformatted = "---\n".join(json.dumps(o) + "\n" for o in objects)
    else:  # one List of every object, as `kubectl get -o yaml` prints
        reformatted = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects})
    assert parse_objects(reformatted) == parse_objects(text)
