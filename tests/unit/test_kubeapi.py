"""Unit tests for tests/kubeapi.py, the test Kubernetes API server, with the real kubectl.

They need only loopback. The kubectl tests skip with a reason when kubectl is not installed.
Every subprocess is bounded in time and killed in a finally.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests.kubeapi import APIError, KubeAPIServer, parse_label_selector

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")
KUBECTL_TIMEOUT = 20.0  # seconds for one kubectl run; they take well under one here
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not found on PATH (apt-get install -y kubernetes-client)")

NAMESPACE = {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "shop", "labels": {"amesh.io/dataplane-mode": "ambient"}}}
POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"nodeName": "node-1", "serviceAccountName": "web",
             "containers": [{"name": "web", "image": "example/web:1"}]},
    "status": {"phase": "Running", "podIP": "10.244.1.5", "hostIP": "10.0.0.1",
               "conditions": [{"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "web", "image": "example/web:1", "imageID": "x",
                                      "ready": True, "restartCount": 0}]},
}
SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                    "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-abc", "namespace": "shop",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}],
         "ports": [{"port": 8080, "protocol": "TCP"}]}

DENY_POLICY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny-client", "namespace": "shop"},
               "spec": {"action": "DENY",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]}}
STRICT_MTLS = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": labels or {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "example/c:1"}]}}


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.3) as server:
        for obj in (NAMESPACE, POD, SERVICE, SLICE):
            server.apply(obj)
        yield server


@pytest.fixture
def kubectl(api: KubeAPIServer, tmp_path: Path) -> Callable[..., str]:
    """Run the real kubectl against api; returns stdout, fails the test on a non-zero exit."""
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH (apt-get install -y kubernetes-client)")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")

    def run(*args: str) -> str:
        proc = subprocess.run(
            [KUBECTL, "--kubeconfig", str(kubeconfig), "--request-timeout=10s", *args],
            capture_output=True, text=True, timeout=KUBECTL_TIMEOUT, env=_kubectl_env(tmp_path))
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    return run


def _kubectl_env(tmp_path: Path) -> dict[str, str]:
    """kubectl's discovery cache in the test's directory, not in ~/.kube."""
    return {**os.environ, "KUBECACHEDIR": str(tmp_path / "kube-cache"), "HOME": str(tmp_path)}


# --- raw HTTP helpers ---------------------------------------------------------------------------

def request(api: KubeAPIServer, method: str, path: str,
            body: dict | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    """One request; (status, JSON body), for errors too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Watch:
    """A raw streaming watch request, read one event (line) at a time."""

    def __init__(self, api: KubeAPIServer, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()

    def next(self) -> dict | None:
        """The next event, or None at the end of the stream."""
        line = self.resp.readline()
        return json.loads(line) if line else None

    def until(self, pred: Callable[[dict], bool]) -> dict:
        while (event := self.next()) is not None:
            if pred(event):
                return event
        raise AssertionError("the stream ended before the expected event")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def watches() -> Iterator[Callable[[KubeAPIServer, str], Watch]]:
    opened: list[Watch] = []

    def open_watch(api: KubeAPIServer, path: str) -> Watch:
        opened.append(Watch(api, path))
        return opened[-1]

    yield open_watch
    for w in opened:
        w.close()


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- kubectl -----------------------------------------------------------------------------------

@needs_kubectl
def test_kubectl_get_pods_all_namespaces(kubectl: Callable[..., str]) -> None:
    lines = kubectl("get", "pods", "-A").splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert lines[1].split()[:5] == ["shop", "web-1", "1/1", "Running", "0"]


@needs_kubectl
def test_kubectl_get_pods_json_is_what_was_applied(
        api: KubeAPIServer, kubectl: Callable[..., str]) -> None:
    listed = json.loads(kubectl("get", "pods", "-n", "shop", "-o", "json"))
    [item] = listed["items"]
    assert item["spec"] == POD["spec"] and item["status"] == POD["status"]
    assert item["metadata"]["labels"] == POD["metadata"]["labels"]
    stored = api.get("Pod", "web-1", "shop")
    assert item["metadata"]["uid"] == stored["metadata"]["uid"]
    assert item["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


@needs_kubectl
def test_kubectl_get_namespaces_services_and_endpointslices(kubectl: Callable[..., str]) -> None:
    assert kubectl("get", "namespaces").split()[3:5] == ["shop", "Active"]
    lines = kubectl("get", "endpointslices", "-A").splitlines()
    assert lines[1].split()[:5] == ["shop", "web-abc", "IPv4", "8080", "10.244.1.5"]
    svc = kubectl("get", "svc", "web", "-n", "shop", "-o", "wide").splitlines()[1].split()
    assert svc[:5] == ["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP"]
    assert svc[-1] == "app=web"
    assert kubectl("get", "pods", "-l", "app=nope", "-A") == ""  # "No resources found" on stderr
    assert kubectl("get", "pods", "-n", "shop", "-l", "app=web", "-o", "name") == "pod/web-1\n"


@needs_kubectl
def test_kubectl_watch_sees_add_modify_delete(api: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(kubeconfig), "get", "pods", "-n", "shop", "--watch",
         "-o", "json", "--output-watch-events"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_kubectl_env(tmp_path))
    events: list[dict] = []
    reader = threading.Thread(target=_read_json_stream, args=(proc.stdout, events), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(events) >= 1, KUBECTL_TIMEOUT)
        api.apply(pod("web-2"))
        api.apply(pod("web-2", app="web", tier="front"))
        api.delete("Pod", "web-2", "shop")
        wait_for(lambda: len(events) >= 4, KUBECTL_TIMEOUT)
    finally:
        proc.kill()
        proc.wait(5)
        reader.join(5)
    seen = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
    assert seen == [("ADDED", "web-1"), ("ADDED", "web-2"), ("MODIFIED", "web-2"),
                    ("DELETED", "web-2")]
    assert events[2]["object"]["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert api.watch_count == 1


def _read_json_stream(stream: Any, out: list[dict]) -> None:
    """Append each JSON document of a stream of concatenated documents (as kubectl prints)."""
    decoder, buf = json.JSONDecoder(), ""
    for line in iter(stream.readline, b""):
        buf += line.decode()
        while buf.strip():
            try:
                doc, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            out.append(doc)
            buf = buf.lstrip()[end:]


@needs_kubectl
def test_kubectl_table_watch_and_label(api: KubeAPIServer, kubectl: Callable[..., str],
                                       tmp_path: Path) -> None:
    assert kubectl("label", "pod", "web-1", "-n", "shop", "tier=front") == "pod/web-1 labeled\n"
    assert api.get("Pod", "web-1", "shop")["metadata"]["labels"]["tier"] == "front"
    out = kubectl("get", "pods", "-n", "shop", "--watch", "--request-timeout=1s")
    # the watch ends with the request timeout; the table printed the current pod first
    assert out.splitlines()[1].split()[:2] == ["web-1", "1/1"]
    assert kubectl("delete", "pod", "web-1", "-n", "shop") == 'pod "web-1" deleted\n'
    assert api.get("Pod", "web-1", "shop") is None


@needs_kubectl
def test_kubectl_apply_get_and_delete_an_authorization_policy(
        api: KubeAPIServer, kubectl: Callable[..., str], tmp_path: Path) -> None:
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(yaml.safe_dump(DENY_POLICY))
    assert kubectl("apply", "-f", str(manifest)) == "authorizationpolicy.security.istio.io/deny-client created\n"
    api.apply(STRICT_MTLS)
    lines = kubectl("get", "authorizationpolicies", "-A").splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "ACTION", "AGE"]
    assert lines[1].split()[:3] == ["shop", "deny-client", "DENY"]
    assert kubectl("get", "peerauthentications", "-n", "shop").splitlines()[1].split()[:2] == ["default", "STRICT"]
    changed = {**DENY_POLICY, "spec": {**DENY_POLICY["spec"], "action": "ALLOW"}}
    manifest.write_text(yaml.safe_dump(changed))
    assert kubectl("apply", "-f", str(manifest)) == "authorizationpolicy.security.istio.io/deny-client configured\n"
    assert api.get("AuthorizationPolicy", "deny-client", "shop")["spec"] == changed["spec"]
    # one object, served at either version
    [item] = json.loads(kubectl("get", "authorizationpolicies.v1beta1.security.istio.io", "-n", "shop",
                                "-o", "json"))["items"]
    assert (item["apiVersion"], item["spec"]["action"]) == ("security.istio.io/v1beta1", "ALLOW")
    assert kubectl("delete", "-f", str(manifest)) == 'authorizationpolicy.security.istio.io "deny-client" deleted\n'
    assert api.get("AuthorizationPolicy", "deny-client", "shop") is None


# --- list and write semantics -------------------------------------------------------------------

def test_list_shape_and_resource_version(api: KubeAPIServer) -> None:
    status, body = request(api, "GET", "/api/v1/namespaces/shop/pods")
    assert status == 200
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    [item] = body["items"]
    assert "kind" not in item and "apiVersion" not in item
    assert item["metadata"]["uid"] and item["metadata"]["creationTimestamp"]
    status, body = request(api, "GET", "/apis/discovery.k8s.io/v1/endpointslices")
    assert body["kind"] == "EndpointSliceList" and len(body["items"]) == 1
    assert api.list_count == 2


def test_writes_and_status_errors(api: KubeAPIServer) -> None:
    rv = api.resource_version
    status, body = request(api, "POST", "/api/v1/namespaces/shop/pods", pod("web-2"))
    assert status == 201 and body["metadata"]["resourceVersion"] == str(rv + 1)
    status, body = request(api, "POST", "/api/v1/namespaces/shop/pods", pod("web-2"))
    assert (status, body["kind"], body["status"], body["reason"], body["code"]) == \
        (409, "Status", "Failure", "AlreadyExists", 409)
    status, body = request(api, "PUT", "/api/v1/namespaces/shop/pods/nope", pod("nope"))
    assert (status, body["reason"]) == (404, "NotFound")
    assert body["message"] == 'pods "nope" not found'
    stale = pod("web-2")
    stale["metadata"]["resourceVersion"] = str(rv)
    status, body = request(api, "PUT", "/api/v1/namespaces/shop/pods/web-2", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    status, body = request(api, "DELETE", "/api/v1/namespaces/shop/pods/web-2")
    assert status == 200 and body["kind"] == "Pod" and body["metadata"]["name"] == "web-2"
    assert api.resource_version == rv + 2
    with pytest.raises(APIError) as e:
        api.delete("pods", "web-2", "shop")
    assert e.value.code == 404


def test_selectors_and_paging(api: KubeAPIServer) -> None:
    for i in range(5):
        api.apply(pod(f"p{i}", app="batch", idx=str(i % 2)))
    _, body = request(api, "GET", "/api/v1/pods?labelSelector=app%3Dbatch,idx%3D1")
    assert [o["metadata"]["name"] for o in body["items"]] == ["p1", "p3"]
    _, body = request(api, "GET", "/api/v1/pods?fieldSelector=metadata.name%3Dp4")
    assert [o["metadata"]["name"] for o in body["items"]] == ["p4"]
    names, path = [], "/api/v1/namespaces/shop/pods?labelSelector=app%3Dbatch&limit=2"
    while True:
        _, body = request(api, "GET", path)
        names += [o["metadata"]["name"] for o in body["items"]]
        if not body["metadata"].get("continue"):
            break
        path = f"/api/v1/namespaces/shop/pods?labelSelector=app%3Dbatch&limit=2" \
               f"&continue={body['metadata']['continue']}"
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    assert parse_label_selector("a in (x, y),!b")[0]({"a": "y"})


def test_exact_list_from_history_then_410_after_compact(api: KubeAPIServer) -> None:
    before = api.resource_version
    api.delete("Pod", "web-1", "shop")
    _, body = request(api, "GET", f"/api/v1/pods?resourceVersion={before}"
                                  "&resourceVersionMatch=Exact")
    assert [o["metadata"]["name"] for o in body["items"]] == ["web-1"]
    api.compact()
    status, body = request(api, "GET", f"/api/v1/pods?resourceVersion={before}"
                                       "&resourceVersionMatch=Exact")
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)


# --- watch -------------------------------------------------------------------------------------

def test_watch_without_rv_sends_current_objects_then_changes(api: KubeAPIServer, watches) -> None:
    w = watches(api, "/api/v1/namespaces/shop/pods?watch=true")
    assert w.resp.status == 200
    assert w.resp.getheader("Transfer-Encoding") == "chunked"
    first = w.next()
    assert first["type"] == "ADDED" and first["object"]["kind"] == "Pod"
    assert first["object"]["apiVersion"] == "v1"
    api.apply(pod("web-2"))
    event = w.next()
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "web-2")
    assert event["object"]["metadata"]["resourceVersion"] == str(api.resource_version)


def test_watch_from_rv_replays_history_with_selector(api: KubeAPIServer, watches) -> None:
    rv = api.resource_version
    api.apply(pod("a", app="web"))
    api.apply(pod("b", app="other"))
    api.apply(pod("a", app="other"))  # leaves the selection: a DELETED event
    api.delete("Pod", "b", "shop")
    w = watches(api, f"/api/v1/namespaces/shop/pods?watch=1&resourceVersion={rv}"
                     "&labelSelector=app%3Dweb&timeoutSeconds=1")
    events = []
    while (event := w.next()) is not None:
        events.append((event["type"], event["object"]["metadata"]["name"]))
    assert events == [("ADDED", "a"), ("DELETED", "a")]


def test_watch_with_compacted_rv_gets_410_event_then_end(api: KubeAPIServer, watches) -> None:
    old = api.resource_version
    api.apply(pod("web-2"))
    api.compact()
    w = watches(api, f"/api/v1/pods?watch=true&resourceVersion={old}")
    assert w.resp.status == 200
    event = w.next()
    assert event["type"] == "ERROR"
    assert (event["object"]["kind"], event["object"]["code"], event["object"]["reason"]) == \
        ("Status", 410, "Expired")
    assert w.next() is None
    # from the compaction point on, a watch works
    w2 = watches(api, f"/api/v1/pods?watch=true&resourceVersion={api.resource_version}")
    api.delete("Pod", "web-2", "shop")
    assert w2.next()["type"] == "DELETED"


def test_cut_watches_aborts_open_streams(api: KubeAPIServer, watches) -> None:
    streams = [watches(api, "/api/v1/pods?watch=true"),
               watches(api, "/apis/discovery.k8s.io/v1/endpointslices?watch=true")]
    for w in streams:
        assert w.next()["type"] == "ADDED"
    assert api.open_watches == 2
    assert api.cut_watches() == 2
    for w in streams:
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            w.resp.read()  # the chunked body never got its last chunk
    wait_for(lambda: api.open_watches == 0)


def test_timeout_seconds_ends_the_stream(api: KubeAPIServer, watches) -> None:
    start = time.monotonic()
    w = watches(api, f"/api/v1/pods?watch=true&resourceVersion={api.resource_version}"
                     "&timeoutSeconds=1")
    assert w.next() is None
    assert 0.9 <= time.monotonic() - start < 3


def test_bookmarks_periodic_and_after_compact(watches) -> None:
    with KubeAPIServer(bookmark_interval=0.2) as api:
        api.apply(POD)
        w = watches(api, f"/api/v1/pods?watch=true&resourceVersion={api.resource_version}"
                         "&allowWatchBookmarks=true")
        event = w.next()
        assert event == {"type": "BOOKMARK", "object": {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": str(api.resource_version)}}}
    with KubeAPIServer(bookmark_interval=60) as api:
        api.apply(POD)
        w = watches(api, "/api/v1/pods?watch=true&allowWatchBookmarks=true")
        assert w.next()["type"] == "ADDED"
        api.apply(pod("web-2"))
        api.compact()
        assert w.next()["type"] == "ADDED"
        event = w.next()
        assert event["type"] == "BOOKMARK"
        assert event["object"]["metadata"]["resourceVersion"] == str(api.resource_version)


def test_policy_watch_at_either_version_with_bookmarks_and_410(api: KubeAPIServer, watches) -> None:
    api.apply(DENY_POLICY)
    v1beta1 = watches(api, "/apis/security.istio.io/v1beta1/authorizationpolicies?watch=true"
                           "&allowWatchBookmarks=true")
    event = v1beta1.next()
    assert (event["type"], event["object"]["apiVersion"]) == ("ADDED", "security.istio.io/v1beta1")
    rv = api.resource_version
    api.delete("AuthorizationPolicy", "deny-client", "shop")
    event = v1beta1.next()
    assert (event["type"], event["object"]["apiVersion"]) == ("DELETED", "security.istio.io/v1beta1")
    bookmark = v1beta1.until(lambda e: e["type"] == "BOOKMARK")
    assert bookmark["object"]["apiVersion"] == "security.istio.io/v1beta1"
    api.compact()
    expired = watches(api, f"/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies?watch=true"
                           f"&resourceVersion={rv}")
    assert expired.next()["object"]["code"] == 410


def test_security_istio_io_is_served_only_in_the_versions_installed() -> None:
    with KubeAPIServer(security_versions=(), traffic_groups=()) as api:
        _, body = request(api, "GET", "/apis")
        assert [g["name"] for g in body["groups"]] == ["discovery.k8s.io"]
        status, body = request(api, "GET", "/apis/security.istio.io/v1/authorizationpolicies")
        assert (status, body["reason"]) == (404, "NotFound")
        api.serve_security_versions("v1beta1")  # an Istio that serves only v1beta1
        _, body = request(api, "GET", "/apis")
        assert body["groups"][1]["preferredVersion"]["groupVersion"] == "security.istio.io/v1beta1"
        assert request(api, "GET", "/apis/security.istio.io/v1/peerauthentications")[0] == 404
        status, body = request(api, "GET", "/apis/security.istio.io/v1beta1/peerauthentications")
        assert (status, body["kind"]) == (200, "PeerAuthenticationList")
        api.serve_security_versions("v1", "v1beta1")
        _, body = request(api, "GET", "/apis/security.istio.io")
        assert [v["version"] for v in body["versions"]] == ["v1", "v1beta1"]
        assert body["preferredVersion"]["version"] == "v1"
        _, body = request(api, "GET", "/apis/security.istio.io/v1")
        assert sorted(r["name"] for r in body["resources"]) == ["authorizationpolicies", "peerauthentications"]


TRAFFIC_OBJECTS = [
    {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
     "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"host": "web", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 10}}}}},
    {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
     "metadata": {"name": "web-canary", "namespace": "shop"},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
              "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 90}]}]}},
    {"apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
     "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"service": "web", "backends": [{"service": "web", "weight": 1}]}},
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "a"}},
     "status": {"conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kubeletVersion": "v1.32.0"}}},
]


@needs_kubectl
def test_kubectl_applies_and_gets_the_traffic_kinds_and_nodes(
        api: KubeAPIServer, kubectl: Callable[..., str], tmp_path: Path) -> None:
    manifest = tmp_path / "traffic.yaml"
    manifest.write_text(yaml.safe_dump_all(TRAFFIC_OBJECTS[:3]))
    assert kubectl("apply", "-f", str(manifest)).splitlines() == [
        "destinationrule.networking.istio.io/web created", "tcproute.gateway.networking.k8s.io/web-canary created",
        "trafficsplit.split.smi-spec.io/web created"]
    api.apply(TRAFFIC_OBJECTS[3])  # kubelet registers its Node
    assert kubectl("get", "destinationrules", "-n", "shop").splitlines()[1].split()[:2] == ["web", "web"]
    assert kubectl("get", "tcproutes", "-A").splitlines()[1].split()[:2] == ["shop", "web-canary"]
    assert kubectl("get", "nodes").splitlines()[1].split()[:2] == ["node-1", "Ready"]
    rule = {**TRAFFIC_OBJECTS[0], "spec": {"host": "web", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}}
    manifest.write_text(yaml.safe_dump(rule))
    assert kubectl("apply", "-f", str(manifest)) == "destinationrule.networking.istio.io/web configured\n"
    assert api.get("DestinationRule", "web", "shop")["spec"] == rule["spec"]  # type: ignore[index]
    assert kubectl("delete", "trafficsplit", "web", "-n", "shop") == 'trafficsplit.split.smi-spec.io "web" deleted\n'


WORKLOAD_ENTRY = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                  "metadata": {"name": "vm-1", "namespace": "shop"},
                  "spec": {"address": "192.168.7.20", "ports": {"http": 8080}, "labels": {"app": "web"}},
                  "status": {"conditions": [{"type": "Healthy", "status": "True"}]}}
ENTRIES = "/apis/networking.istio.io/v1/namespaces/shop/workloadentries"
MERGE_PATCH = "application/merge-patch+json"


def test_workload_entries_have_a_status_subresource(api: KubeAPIServer, watches) -> None:
    status, created = request(api, "POST", ENTRIES, WORKLOAD_ENTRY)
    assert status == 201 and "status" not in created  # set through /status only, as a CRD's
    watch = watches(api, f"{ENTRIES}?watch=true&resourceVersion={created['metadata']['resourceVersion']}")
    healthy = {"status": {"conditions": [{"type": "Healthy", "status": "True",
                                          "lastProbeTime": "2026-12-02T01:00:00.000000Z"}]}}
    status, patched = request(api, "PATCH", f"{ENTRIES}/vm-1/status", healthy, MERGE_PATCH)
    assert status == 200 and patched["status"] == healthy["status"] and patched["spec"] == WORKLOAD_ENTRY["spec"]
    assert watch.until(lambda e: e["type"] == "MODIFIED")["object"]["status"] == healthy["status"]
    # a write to the object leaves its status; a write to /status leaves the rest
    moved = {"spec": {"address": "192.168.7.21"}, "status": {"conditions": []}}
    status, patched = request(api, "PATCH", f"{ENTRIES}/vm-1", moved, MERGE_PATCH)
    assert (patched["spec"]["address"], patched["status"]) == ("192.168.7.21", healthy["status"])
    stale = {**patched, "spec": {"address": "10.0.0.9"}, "status": {"conditions": []}}
    status, put = request(api, "PUT", f"{ENTRIES}/vm-1/status", stale)
    assert (status, put["spec"]["address"], put["status"]) == (200, "192.168.7.21", {"conditions": []})
    status, body = request(api, "PUT", f"{ENTRIES}/vm-1/status", stale)  # the resourceVersion is old now
    assert (status, body["reason"]) == (409, "Conflict")
    assert request(api, "GET", f"{ENTRIES}/vm-1/status")[1]["status"] == {"conditions": []}
    assert request(api, "GET", "/api/v1/namespaces/shop/pods/web-1/status")[0] == 404  # pods: no subresource here
    assert request(api, "DELETE", f"{ENTRIES}/vm-1")[0] == 200
    assert request(api, "GET", f"{ENTRIES}/vm-1")[0] == 404


@needs_kubectl
def test_kubectl_applies_and_gets_workload_entries(
        api: KubeAPIServer, kubectl: Callable[..., str], tmp_path: Path) -> None:
    manifest = tmp_path / "entry.yaml"
    manifest.write_text(yaml.safe_dump(WORKLOAD_ENTRY))
    assert kubectl("apply", "-f", str(manifest)) == "workloadentry.networking.istio.io/vm-1 created\n"
    header, row = kubectl("get", "workloadentries.networking.istio.io", "-A").splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "ADDRESS", "AGE"] and row.split()[:3] == ["shop", "vm-1",
                                                                                            "192.168.7.20"]
    assert kubectl("get", "we", "vm-1", "-n", "shop", "-o", "jsonpath={.spec.ports.http}") == "8080"
    assert kubectl("delete", "workloadentry", "vm-1", "-n", "shop") == \
        'workloadentry.networking.istio.io "vm-1" deleted\n'


def test_a_traffic_group_is_served_only_while_its_crds_are_installed() -> None:
    with KubeAPIServer(traffic_groups=("networking.istio.io",)) as api:
        _, body = request(api, "GET", "/apis")
        assert "gateway.networking.k8s.io" not in [g["name"] for g in body["groups"]]
        assert request(api, "GET", "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes")[0] == 404
        for version in ("v1", "v1beta1", "v1alpha3"):
            status, body = request(api, "GET", f"/apis/networking.istio.io/{version}/destinationrules")
            assert (status, body["kind"]) == (200, "DestinationRuleList")
        api.serve_traffic_groups("gateway.networking.k8s.io", "split.smi-spec.io")
        assert request(api, "GET", "/apis/networking.istio.io/v1/destinationrules")[0] == 404
        for version in ("v1alpha4", "v1alpha1"):
            assert request(api, "GET", f"/apis/split.smi-spec.io/{version}/trafficsplits")[0] == 200


def test_send_initial_events_ends_with_bookmark(api: KubeAPIServer, watches) -> None:
    w = watches(api, "/api/v1/namespaces/shop/pods?watch=true&sendInitialEvents=true"
                     "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan")
    assert w.next()["type"] == "ADDED"
    event = w.next()
    assert event["type"] == "BOOKMARK"
    assert event["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# --- restart, controls, CLI --------------------------------------------------------------------

def test_stop_refuses_connections_and_start_keeps_state(api: KubeAPIServer, watches) -> None:
    url, rv = api.url, api.resource_version
    w = watches(api, "/api/v1/pods?watch=true")
    assert w.next()["type"] == "ADDED"
    api.stop()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        w.resp.read()
    with pytest.raises(urllib.error.URLError) as e:
        urllib.request.urlopen(url + "/version", timeout=2)
    assert isinstance(e.value.reason, ConnectionRefusedError)
    api.start()
    assert api.url == url and api.resource_version == rv
    _, body = request(api, "GET", "/api/v1/pods")
    assert body["metadata"]["resourceVersion"] == str(rv)
    assert [o["metadata"]["name"] for o in body["items"]] == ["web-1"]
    assert api.apply(pod("web-2"))["metadata"]["resourceVersion"] == str(rv + 1)


def test_discovery_documents(api: KubeAPIServer) -> None:
    _, body = request(api, "GET", "/api/v1")
    by_name = {r["name"]: r for r in body["resources"]}
    assert by_name["pods"]["kind"] == "Pod" and by_name["pods"]["shortNames"] == ["po"]
    assert by_name["namespaces"]["namespaced"] is False
    _, body = request(api, "GET", "/apis")
    assert body["groups"][0]["name"] == "discovery.k8s.io"
    _, body = request(api, "GET", "/apis/discovery.k8s.io/v1")
    assert body["resources"][0]["name"] == "endpointslices"
    status, body = request(api, "GET", "/openapi/v2")
    assert status == 404 and body["kind"] == "Status"


def test_cli_serves_objects_and_http_controls(tmp_path: Path) -> None:
    objects = tmp_path / "cluster.yaml"
    objects.write_text(yaml.safe_dump_all([NAMESPACE, POD]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kubeapi", "--host", "127.0.0.1", "--port", str(port),
         "--objects", str(objects)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout.readline().strip() == f"listening http://127.0.0.1:{port}"
        client = _Remote(port)
        _, body = request(client, "GET", "/api/v1/pods")
        assert [o["metadata"]["name"] for o in body["items"]] == ["web-1"]
        w = Watch(client, "/api/v1/namespaces/shop/pods?watch=true")
        assert w.next()["type"] == "ADDED"
        status, body = request(client, "POST", "/_test/apply", pod("web-2"))
        assert status == 200 and body["metadata"]["resourceVersion"] == "4"
        assert w.next()["object"]["metadata"]["name"] == "web-2"
        request(client, "POST", "/_test/delete", {"kind": "Pod", "name": "web-2",
                                                  "namespace": "shop"})
        assert w.next()["type"] == "DELETED"
        assert request(client, "POST", "/_test/compact")[0] == 200
        status, body = request(client, "POST", "/_test/cut-watches")
        assert body == {"cut": 1}
        w.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait(5)


class _Remote:
    """What request() and Watch need of a server in another process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
