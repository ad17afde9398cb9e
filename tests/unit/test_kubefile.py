"""Unit tests for registry/kubefile.py: parsing Kubernetes objects and watching the file."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.kubefile import FileSource, build_state, parse_objects
from registry.model import Endpoint, RegistryError, RegistryState, is_ipv4


def y(text: str) -> str:
    """YAML written indented inside a test, dedented."""
    return textwrap.dedent(text).lstrip("\n")


def namespace(name: str, mode: str | None = None) -> str:
    labels = f"\n  labels: {{amesh.io/dataplane-mode: {mode}}}" if mode else ""
    return y(f"""
        apiVersion: v1
        kind: Namespace
        metadata:
          name: {name}""") + labels + "\n"


def pod(
    name: str,
    ip: str | None,
    ns: str = "shop",
    labels: str = "{app: web}",
    ready: bool = True,
    ports: str = "[{name: http, containerPort: 8080}]",
    node: str | None = "node-1",
) -> str:
    return y(f"""
        apiVersion: v1
        kind: Pod
        metadata:
          name: {name}
          namespace: {ns}
          labels: {labels}
        spec:
          {f"nodeName: {node}" if node else "{}"}
          serviceAccountName: web-sa
          containers:
          - name: main
            ports: {ports}
        status:
          {f"podIP: {ip}" if ip else ""}
          hostIP: 192.168.0.1
          conditions:
          - {{type: Ready, status: "{ready}"}}
        """).replace("spec:\n  {}\n", "spec:\n")


def service(
    name: str = "web",
    ns: str = "shop",
    cluster_ip: str = "10.96.0.10",
    ports: str = "[{name: http, port: 80, targetPort: http}]",
    selector: str = "{app: web}",
) -> str:
    return y(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          clusterIP: {cluster_ip}
          ports: {ports}
          selector: {selector}
        """)


def endpoint_slice(name: str, endpoints: str, service_name: str = "web", ns: str = "shop") -> str:
    return y(f"""
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: {name}
          namespace: {ns}
          labels: {{kubernetes.io/service-name: {service_name}}}
        addressType: IPv4
        ports: [{{name: http, port: 9090}}]
        endpoints: {endpoints}
        """)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def by_key(state: RegistryState) -> dict[str, object]:
    return {w.key: w for w in state.workloads} | {"svc:" + s.key: s for s in state.services}


def parse_error(text: str) -> str:
    with pytest.raises(RegistryError) as info:
        parse_objects(text)
    return str(info.value)


# --- workloads and enrollment ---


def test_pod_fields() -> None:
    state = parse_objects(docs(namespace("shop"), pod("web-1", "10.244.1.5")), source="test", generation=7)
    w = state.workload_by_ip("10.244.1.5")
    assert w is not None
    assert (w.name, w.namespace, w.node, w.service_account) == ("web-1", "shop", "node-1", "web-sa")
    assert dict(w.labels) == {"app": "web"}
    assert w.ready and w.source == "test" and state.generation == 7


@pytest.mark.parametrize(
    ("ns_mode", "pod_mode", "enrolled"),
    [
        ("ambient", None, True),  # namespace enrolls its pods
        ("ambient", "none", False),  # pod opts out
        (None, "ambient", True),  # pod opts in without the namespace
        (None, None, False),  # nothing labelled
        ("none", None, False),
    ],
)
def test_enrollment(ns_mode: str | None, pod_mode: str | None, enrolled: bool) -> None:
    labels = f"{{app: web, amesh.io/dataplane-mode: {pod_mode}}}" if pod_mode else "{app: web}"
    state = parse_objects(docs(namespace("shop", ns_mode), pod("web-1", "10.244.1.5", labels=labels)))
    assert state.workloads[0].enrolled is enrolled


def test_pod_without_namespace_object() -> None:
    text = docs(pod("a", "10.244.1.5", ns="ghost"), pod("b", "10.244.1.6", ns="ghost",
                                                        labels="{amesh.io/dataplane-mode: ambient}"))
    assert [w.enrolled for w in parse_objects(text).workloads] == [False, True]


def test_pod_without_ip_is_a_workload_but_not_indexed() -> None:
    state = parse_objects(docs(namespace("shop", "ambient"), pod("web-1", None), service()))
    assert state.workloads[0].ip == "" and state.workloads[0].enrolled
    assert state.workload_by_ip("") is None
    assert state.enrolled_on("node-1") == ()
    assert state.services[0].endpoints == ()


def test_unscheduled_pod_is_skipped() -> None:
    assert parse_objects(pod("web-1", None, node=None)).workloads == ()


def test_pod_defaults() -> None:
    text = y("""
        apiVersion: v1
        kind: Pod
        metadata: {name: bare}
        spec: {nodeName: n1}
        status: {podIP: 10.0.0.1}
        """)
    w = parse_objects(text).workloads[0]
    assert (w.namespace, w.service_account, dict(w.labels), w.ready) == ("default", "default", {}, False)


# --- services and endpoints ---


def test_endpoints_from_selector() -> None:
    text = docs(
        pod("web-1", "10.244.1.5"),
        pod("web-2", "10.244.1.6", ready=False, ports="[{name: http, containerPort: 8081}]"),
        pod("web-3", "10.244.1.7", ports="[]"),  # lacks the named port
        pod("other", "10.244.1.8", labels="{app: other}"),
        pod("web-elsewhere", "10.244.1.9", ns="other"),
        pod("web-pending", None),
        service(ports="[{name: http, port: 80, targetPort: http}, {name: admin, port: 81, targetPort: 9000}]"),
    )
    svc = parse_objects(text).service_by_ip("10.96.0.10")
    assert svc is not None
    assert svc.endpoints == (
        Endpoint("10.244.1.5", {"http": 8080, "admin": 9000}, True, "shop/web-1", node="node-1"),
        Endpoint("10.244.1.6", {"http": 8081, "admin": 9000}, False, "shop/web-2", node="node-1"),
        Endpoint("10.244.1.7", {"admin": 9000}, True, "shop/web-3", node="node-1"),
    )


def test_service_port_defaults() -> None:
    svc = parse_objects(service(ports="[{port: 80}]")).services[0]
    p = svc.ports[0]
    assert (p.port, p.target_port, p.name, p.protocol) == (80, 80, "", "TCP")
    assert svc.port(80) is p and svc.port(81) is None


def test_service_without_selector_has_no_endpoints() -> None:
    text = docs(pod("web-1", "10.244.1.5"), service(selector="{}"))
    assert parse_objects(text).services[0].endpoints == ()


def test_headless_service() -> None:
    text = docs(pod("web-1", "10.244.1.5"), service(cluster_ip="None"))
    state = parse_objects(text)
    svc = state.services[0]
    assert svc.cluster_ip == "" and state.service_by_ip("") is None
    assert [e.ip for e in svc.endpoints] == ["10.244.1.5"]
    no_ip = service().replace("  clusterIP: 10.96.0.10\n", "")
    assert parse_objects(no_ip).services[0].cluster_ip == ""


def test_endpoint_slices_take_precedence_and_merge() -> None:
    text = docs(
        pod("web-1", "10.244.1.5"),  # selected, but slices exist: not an endpoint
        service(),
        endpoint_slice("web-a", "[{addresses: [10.244.2.1], targetRef: {kind: Pod, name: web-x}}]"),
        endpoint_slice("web-b", "[{addresses: [10.244.2.2], conditions: {ready: false}}]"),
        endpoint_slice("other", "[{addresses: [10.244.2.3]}]", service_name="other"),
    )
    svc = parse_objects(text).services[0]
    assert svc.endpoints == (
        Endpoint("10.244.2.1", {"http": 9090}, True, "shop/web-x"),
        Endpoint("10.244.2.2", {"http": 9090}, False, None),
    )


def test_slice_ports_match_service_ports_by_name() -> None:
    text = docs(service(ports="[{name: grpc, port: 90}]"), endpoint_slice("web-a", "[{addresses: [10.0.0.1]}]"))
    assert parse_objects(text).services[0].endpoints[0].ports == {}


def test_list_is_flattened_and_others_ignored() -> None:
    text = y("""
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {amesh.io/dataplane-mode: ambient}}}
        - apiVersion: v1
          kind: Pod
          metadata: {name: web-1, namespace: shop}
          spec: {nodeName: node-1}
          status: {podIP: 10.244.1.5}
        - {apiVersion: v1, kind: ConfigMap, metadata: {name: cfg}, data: {a: "1"}}
        ---
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        """)
    state = parse_objects(text)
    assert [(w.key, w.enrolled) for w in state.workloads] == [("shop/web-1", True)]
    assert state.services == ()


def test_empty_text() -> None:
    assert parse_objects("") == RegistryState()


# --- validation ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2\n", "document 1: YAML syntax error at line 2"),
        (docs(namespace("a"), "kind: Pod\nmetadata: {name: x\n"), (
            "document 2: YAML syntax error at line 8: expected ',' or '}', but got '<stream end>'"
            " (while parsing a flow mapping at line 7)"
        )),
        ("- a\n- b\n", "document 1: must be a mapping (one Kubernetes object), got a list"),
        ("kind: Pod\nmetadata: {name: x}\n", "document 1 (Pod): apiVersion: required"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "document 1 (object): kind: required"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "document 1 (Pod): metadata.name: required"),
        ("apiVersion: v1\nkind: Pod\n", "document 1 (Pod): metadata: required"),
        (
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n",
            'document 1 (EndpointSlice default/s): apiVersion: must be discovery.k8s.io/v1 for kind EndpointSlice, '
            'got "discovery.k8s.io/v1beta1"',
        ),
        (
            docs(namespace("shop"), namespace("x"), pod("web-1", "10.0.0.1", node=None)),
            "document 3 (Pod shop/web-1): spec.nodeName: required",
        ),
        (pod("web-1", "10.0.0.300"), 'document 1 (Pod shop/web-1): status.podIP: must be an IPv4 address, got "10.0.0.300"'),
        (pod("web-1", "fd00::1"), 'document 1 (Pod shop/web-1): status.podIP: must be an IPv4 address, got "fd00::1"'),
        (
            pod("web-1", "10.0.0.1").replace("hostIP: 192.168.0.1", "hostIP: node-1"),
            'document 1 (Pod shop/web-1): status.hostIP: must be an IPv4 address, got "node-1"',
        ),
        (
            pod("web-1", "10.0.0.1", labels="{version: 1}"),
            'document 1 (Pod shop/web-1): metadata.labels["version"]: must be a string, got 1 (quote it in YAML)',
        ),
        (pod("web-1", "10.0.0.1", labels="[a]"), "document 1 (Pod shop/web-1): metadata.labels: must be a mapping, got a list"),
        (
            pod("web-1", "10.0.0.1", ports="[{name: http, containerPort: 0}]"),
            "document 1 (Pod shop/web-1): spec.containers[0].ports[0].containerPort: must be an integer 1-65535, got 0",
        ),
        (
            pod("web-1", "10.0.0.1", ports="[{name: http, containerPort: 80}, {name: http, containerPort: 81}]"),
            'document 1 (Pod shop/web-1): spec.containers[0].ports[1].name: "http" is used twice',
        ),
        (
            docs(namespace("shop"), service(ports="[{name: http, port: eighty}]")),
            'document 2 (Service shop/web): spec.ports[0].port: must be an integer 1-65535, got "eighty"',
        ),
        (service(ports="[{name: http}]"), "document 1 (Service shop/web): spec.ports[0].port: must be an integer 1-65535, got null"),
        (service(ports="[{port: 70000}]"), "document 1 (Service shop/web): spec.ports[0].port: must be an integer 1-65535, got 70000"),
        (
            service(ports='[{port: 80, targetPort: "8080"}]'),
            'document 1 (Service shop/web): spec.ports[0].targetPort: "8080" is a name, not a number',
        ),
        (
            service(ports="[{port: 80, targetPort: true}]"),
            "document 1 (Service shop/web): spec.ports[0].targetPort: must be an integer 1-65535, got true",
        ),
        (
            service(ports="[{port: 80, protocol: HTTP}]"),
            'document 1 (Service shop/web): spec.ports[0].protocol: must be one of TCP, UDP, SCTP, got "HTTP"',
        ),
        (
            service(ports="[{port: 80}, {port: 81}]"),
            'document 1 (Service shop/web): spec.ports[1].name: "" is used twice',
        ),
        (service(cluster_ip="10.96.0"), 'document 1 (Service shop/web): spec.clusterIP: must be an IPv4 address, got "10.96.0"'),
        (service(selector="{app: 1}"), 'document 1 (Service shop/web): spec.selector["app"]: must be a string, got 1'),
        (
            endpoint_slice("s", "[{addresses: [10.0.0.x]}]"),
            'document 1 (EndpointSlice shop/s): endpoints[0].addresses[0]: must be an IPv4 address, got "10.0.0.x"',
        ),
        (endpoint_slice("s", "[{addresses: []}]"), "document 1 (EndpointSlice shop/s): endpoints[0].addresses: required"),
        (
            endpoint_slice("s", '[{addresses: [10.0.0.1], conditions: {ready: "yes"}}]'),
            'document 1 (EndpointSlice shop/s): endpoints[0].conditions.ready: must be true or false, got "yes"',
        ),
        (
            endpoint_slice("s", "[]").replace("  labels: {kubernetes.io/service-name: web}\n", ""),
            'document 1 (EndpointSlice shop/s): metadata.labels["kubernetes.io/service-name"]: required',
        ),
        (
            docs(pod("web-1", "10.0.0.1"), service(), pod("web-1", "10.0.0.2")),
            "document 3 (Pod shop/web-1): metadata.name: duplicate: Pod shop/web-1 is already defined in document 1",
        ),
        (
            docs(pod("web-1", "10.0.0.1"), pod("web-2", "10.0.0.1")),
            "document 2 (Pod shop/web-2): status.podIP: 10.0.0.1 is already used by Pod shop/web-1 (document 1)",
        ),
        (
            docs(service("a"), service("b")),
            "document 2 (Service shop/b): spec.clusterIP: 10.96.0.10 is already used by Service shop/a (document 1)",
        ),
        ("apiVersion: v1\nkind: List\nitems: [3]\n", "document 1 items[0]: must be a mapping (one Kubernetes object), got 3"),
        ("apiVersion: v1\nkind: List\nitems: {}\n", "document 1 (List): items: must be a list of objects"),
    ],
)
def test_validation_errors(text: str, expected: str) -> None:
    assert expected in parse_error(text)


def test_list_item_error_names_the_item() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 1.2.3.4}}\n"
    assert parse_error(text) == "document 1 items[0] (Pod default/p): spec.nodeName: required"


def test_same_name_in_different_namespaces_or_kinds_is_fine() -> None:
    text = docs(pod("web", "10.0.0.1"), pod("web", "10.0.0.2", ns="other"), service("web"), namespace("web"))
    assert len(parse_objects(text).workloads) == 2


# --- FileSource ---


GOOD = docs(namespace("shop", "ambient"), pod("web-1", "10.244.1.5"))
BETTER = docs(namespace("shop", "ambient"), pod("web-1", "10.244.1.5"), pod("web-2", "10.244.1.6"))
BAD = docs(namespace("shop", "ambient"), pod("web-1", "10.244.1.5"), pod("web-2", "not-an-ip"))


class Recorder:
    """FileSource callbacks that remember what they were given."""

    def __init__(self) -> None:
        self.states: list[RegistryState] = []
        self.errors: list[RegistryError] = []

    def source(self, path: Path) -> FileSource:
        return FileSource(path, self.states.append, self.errors.append, poll_interval=0.01)


async def wait_for(condition: Callable[[], object], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "no change seen within 1 s"
        await asyncio.sleep(0.005)


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD)
    source = Recorder().source(path)
    assert source.state is None
    state = source.load()
    assert state is source.state and state.generation == 1
    assert [w.key for w in state.workloads] == ["shop/web-1"]
    assert source.last_error is None and source.connected


def test_a_rejected_version_keeps_the_state_but_is_not_current(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD)
    source = Recorder().source(path)
    good = source.load()
    path.write_text(BAD)
    with pytest.raises(RegistryError):
        source.load()
    assert source.state is good and not source.connected


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    source = Recorder().source(path)
    expected = f"cannot read registry file {path}: No such file or directory"
    with pytest.raises(RegistryError, match=re.escape(expected)):
        source.load()
    assert source.state is None and source.last_error is not None


def test_load_bad_file_names_the_path_and_document(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(BAD)
    with pytest.raises(RegistryError) as info:
        Recorder().source(path).load()
    assert str(info.value).startswith(f"{path}: document 3 (Pod shop/web-2): status.podIP:")


def test_run_sees_rewrite_and_rename(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    source = recorder.source(path)
    source.load()

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        await asyncio.sleep(0.05)
        assert recorder.states == []  # nothing changed since load()
        path.write_text(BETTER)  # rewrite in place
        await wait_for(lambda: len(recorder.states) == 1)
        assert [w.key for w in recorder.states[0].workloads] == ["shop/web-1", "shop/web-2"]
        assert recorder.states[0].generation == 2
        new = tmp_path / "registry.yaml.tmp"
        new.write_text(GOOD)
        os.replace(new, path)  # how editors and kubectl-based scripts update atomically
        await wait_for(lambda: len(recorder.states) == 2)
        assert source.state is recorder.states[1] and source.state.generation == 3
        assert recorder.errors == []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_run_keeps_last_good_state_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    source = recorder.source(path)
    good = source.load()

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        path.write_text(BAD)
        await wait_for(lambda: recorder.errors)
        await asyncio.sleep(0.1)  # many more polls of the same bad version
        assert len(recorder.errors) == 1
        assert "document 3 (Pod shop/web-2): status.podIP" in str(recorder.errors[0])
        assert source.state is good and source.last_error == str(recorder.errors[0])
        assert recorder.states == []
        path.write_text(BETTER)
        await wait_for(lambda: recorder.states)
        assert source.last_error is None and source.state is recorder.states[0]
        assert source.state.generation == 2
        path.unlink()  # a vanished file is one more bad version, reported once
        await wait_for(lambda: len(recorder.errors) == 2)
        await asyncio.sleep(0.05)
        assert len(recorder.errors) == 2 and "No such file or directory" in str(recorder.errors[1])
        assert source.state is recorder.states[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(scenario())


def test_namespace_mtls_mode_label_reaches_its_workloads_and_bad_values_are_named():
    def namespace(mode: str) -> str:
        return (f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{amesh.io/mtls-mode: {mode}}}}}\n"
                "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n"
                "spec: {nodeName: node-1}\nstatus: {podIP: 10.244.1.10}\n")

    [web] = parse_objects(namespace("STRICT")).workloads
    assert web.mtls_mode == "STRICT"
    with pytest.raises(RegistryError) as error:
        parse_objects(namespace("strictest"))
    assert str(error.value) == ('document 1 (Namespace shop): metadata.labels["amesh.io/mtls-mode"]: '
                                'must be one of STRICT, PERMISSIVE, got "strictest"')


def annotated_service(annotations: dict[str, str]) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
             "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}]


@pytest.mark.parametrize("value, attempts", [(None, 3), ("0", 1), ("5", 6)])
def test_the_connect_retries_annotation_sets_a_services_attempts(value, attempts):
    annotations = {} if value is None else {"amesh.io/connect-retries": value}
    assert build_state(annotated_service(annotations)).services[0].traffic.connect_attempts == attempts


@pytest.mark.parametrize("value", ["6", "-1", "three", "1.5"])
def test_a_bad_connect_retries_annotation_names_the_service_and_annotation(value):
    with pytest.raises(RegistryError, match=r'Service shop/web.*metadata.annotations\["amesh.io/connect-retries"\]: '
                                            r'must be a number of retries 0-5'):
        build_state(annotated_service({"amesh.io/connect-retries": value}))


@pytest.mark.parametrize("value, rate", [(None, None), ("20/s", 20.0), ("1200/min", 20.0), ("0.5/s", 0.5)])
def test_the_connection_rate_annotation_sets_a_services_rate(value, rate):
    annotations = {} if value is None else {"amesh.io/connection-rate-limit": value}
    assert build_state(annotated_service(annotations)).services[0].traffic.connection_rate == rate


@pytest.mark.parametrize("value", ["20", "0/s", "20/h", "fast", "-3/s"])
def test_a_bad_connection_rate_annotation_names_the_service_and_annotation(value):
    with pytest.raises(RegistryError, match=r'Service shop/web.*metadata.annotations\["amesh.io/connection-rate-limit"\]'):
        build_state(annotated_service({"amesh.io/connection-rate-limit": value}))


def _ipaddress_reads(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


OCTETS = st.sampled_from(["0", "00", "7", "07", "99", "255", "256", "1000", "", " 1", "1\n", "x", "\u0661", "\x00"])


@given(st.one_of(st.lists(OCTETS, min_size=3, max_size=5).map(".".join), st.text("0123456789. x", max_size=16)))
def test_is_ipv4_accepts_exactly_what_ipaddress_does(text: str) -> None:
    assert is_ipv4(text) == _ipaddress_reads(text)
