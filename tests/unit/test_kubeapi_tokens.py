"""Unit tests for the test API server's service-account tokens: TokenRequest bound to a pod, and
TokenReview answering for the tokens it minted (and refusing expired, foreign, wrong-audience
and invalidated ones), over real HTTP on loopback as the cluster CA asks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from tests.kubeapi import KubeAPIServer

AGENT_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "amesh-agent-x1", "namespace": "amesh-system"},
    "spec": {"nodeName": "node-1", "serviceAccountName": "amesh-agent", "containers": [{"name": "agent"}]},
    "status": {"phase": "Running"},
}
TOKEN_PATH = "/api/v1/namespaces/amesh-system/serviceaccounts/amesh-agent/token"


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(objects=[AGENT_POD]) as server:
        yield server


def post(api: KubeAPIServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(api.url + path, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def token_request(api: KubeAPIServer, **spec: Any) -> tuple[int, dict[str, Any]]:
    return post(api, TOKEN_PATH, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})


def review(api: KubeAPIServer, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    status, body = post(api, "/apis/authentication.k8s.io/v1/tokenreviews", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token, **({"audiences": audiences} if audiences is not None else {})}})
    assert status == 201 and body["kind"] == "TokenReview"
    return body["status"]


def bound_token(api: KubeAPIServer, audiences: list[str], seconds: int = 600) -> str:
    uid = api.get("Pod", "amesh-agent-x1", "amesh-system")["metadata"]["uid"]
    status, body = token_request(api, audiences=audiences, expirationSeconds=seconds,
                                 boundObjectRef={"kind": "Pod", "apiVersion": "v1", "name": "amesh-agent-x1",
                                                 "uid": uid})
    assert status == 201, body
    return body["status"]["token"]


def test_a_bound_token_reviews_as_its_service_account_with_pod_and_node(api: KubeAPIServer) -> None:
    token = bound_token(api, ["amesh-ca"])
    status = review(api, token, ["amesh-ca"])
    uid = api.get("Pod", "amesh-agent-x1", "amesh-system")["metadata"]["uid"]
    assert status["authenticated"] is True and status["audiences"] == ["amesh-ca"]
    assert status["user"]["username"] == "system:serviceaccount:amesh-system:amesh-agent"
    assert "system:serviceaccounts:amesh-system" in status["user"]["groups"]
    extra = status["user"]["extra"]
    assert extra["authentication.kubernetes.io/pod-name"] == ["amesh-agent-x1"]
    assert extra["authentication.kubernetes.io/pod-uid"] == [uid]
    assert extra["authentication.kubernetes.io/node-name"] == ["node-1"]


def test_a_token_for_another_audience_is_not_authenticated(api: KubeAPIServer) -> None:
    token = bound_token(api, ["vault"])
    status = review(api, token, ["amesh-ca"])
    assert status["authenticated"] is False
    assert 'token audiences ["vault"] is invalid for the target audiences ["amesh-ca"]' in status["error"]
    # without audiences in the review, the API server's own audience is meant: still not this token's
    assert review(api, token)["authenticated"] is False


def test_expired_foreign_and_invalidated_tokens_are_not_authenticated(api: KubeAPIServer) -> None:
    expired = api.request_token("amesh-system", "amesh-agent", "amesh-agent-x1", ["amesh-ca"], seconds=0.5)
    with KubeAPIServer(objects=[AGENT_POD]) as other:
        foreign = other.request_token("amesh-system", "amesh-agent", "amesh-agent-x1", ["amesh-ca"])
    time.sleep(1.0)
    assert "service account token has expired" in review(api, expired, ["amesh-ca"])["error"]
    assert "not signed by this API server" in review(api, foreign, ["amesh-ca"])["error"]
    assert "not signed by this API server" in review(api, "not-a-jwt", ["amesh-ca"])["error"]
    live = bound_token(api, ["amesh-ca"])
    api.delete("Pod", "amesh-agent-x1", "amesh-system")
    api.apply(AGENT_POD)  # the same name again: a new pod (new uid) the token is not bound to
    status = review(api, live, ["amesh-ca"])
    assert status["authenticated"] is False and "has been invalidated" in status["error"]


def test_token_request_is_validated_as_the_real_api_does(api: KubeAPIServer) -> None:
    status, body = token_request(api, audiences=["amesh-ca"], expirationSeconds=60)
    assert status == 422 and "less than 10 minutes" in body["message"]
    status, body = post(api, "/api/v1/namespaces/amesh-system/serviceaccounts/other/token", {
        "spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "amesh-agent-x1"}}})
    assert status == 400 and "different serviceaccount name" in body["message"]
    status, body = token_request(api, boundObjectRef={"kind": "Pod", "apiVersion": "v1", "name": "gone"})
    assert status == 404 and body["reason"] == "NotFound"
    status, body = token_request(api, boundObjectRef={"kind": "Pod", "apiVersion": "v1", "name": "amesh-agent-x1",
                                                      "uid": "00000000-0000-0000-0000-000000000000"})
    assert status == 409
    # unbound, default audience: authenticated for the API server itself, with no pod in extra
    status, body = token_request(api)
    assert status == 201 and body["status"]["expirationTimestamp"].endswith("Z")
    unbound = review(api, body["status"]["token"])
    assert unbound["authenticated"] is True
    assert "authentication.kubernetes.io/pod-name" not in unbound["user"]["extra"]
