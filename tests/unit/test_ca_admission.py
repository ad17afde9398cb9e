"""The cluster CA's pure decision: may the agent of node N have identity I (no sockets)."""

from __future__ import annotations

import pytest

from ca.admission import AdmissionPolicy, PodsByNode, Review, admit, classify_token_error
from registry.model import Workload
from ztunnel.identity import Identity

POLICY = AdmissionPolicy("cluster.local")
WEB = Identity("cluster.local", "shop", "web")
PODS = PodsByNode([
    Workload("server-a", "shop", "10.244.1.10", "node-1", "web"),
    Workload("client", "shop", "10.244.1.11", "node-1", "client"),
    Workload("server-b", "shop", "10.244.2.10", "node-2", "web"),
    Workload("db", "shop", "10.244.3.10", "node-3", "db"),
    Workload("amesh-agent-1", "amesh-system", "172.18.0.11", "node-1", "amesh-agent"),
    Workload("amesh-agent-4", "amesh-system", "172.18.0.14", "node-4", "amesh-agent"),
])


def agent_review(pod: str = "amesh-agent-1", node: str | None = "node-1", **changes: object) -> Review:
    fields: dict = {"authenticated": True, "username": "system:serviceaccount:amesh-system:amesh-agent",
                    "audiences": ("amesh-ca",), "pod_name": pod, "pod_uid": "u-1", "node_name": node}
    fields.update(changes)
    return Review(**fields)


def test_signs_an_identity_of_a_pod_on_the_agents_node() -> None:
    decision = admit(POLICY, agent_review(), WEB, PODS)
    assert (decision.allowed, decision.reason, decision.node) == (True, "signed", "node-1")


def test_refuses_an_identity_whose_pods_run_only_on_other_nodes_naming_them() -> None:
    decision = admit(POLICY, agent_review(), Identity("cluster.local", "shop", "db"), PODS)
    assert (decision.allowed, decision.reason) == (False, "identity_on_other_node")
    assert "node node-1 runs no pod with service account db" in decision.message
    assert "node-3" in decision.message


def test_refuses_a_service_account_no_pod_runs_as() -> None:
    decision = admit(POLICY, agent_review(), Identity("cluster.local", "shop", "ghost"), PODS)
    assert (decision.allowed, decision.reason) == (False, "unknown_service_account")
    assert "no pod with service account ghost in namespace shop runs anywhere" in decision.message


def test_the_same_account_in_another_namespace_is_another_identity() -> None:
    decision = admit(POLICY, agent_review(), Identity("cluster.local", "other", "web"), PODS)
    assert decision.reason == "unknown_service_account"


def test_the_node_comes_from_the_ca_watch_when_the_token_does_not_name_it() -> None:
    assert admit(POLICY, agent_review("amesh-agent-4", node=None), WEB, PODS).reason == "identity_on_other_node"
    decision = admit(POLICY, agent_review("amesh-agent-9", node=None), WEB, PODS)
    assert (decision.allowed, decision.reason) == (False, "agent_node_unknown")


@pytest.mark.parametrize("error, reason", [
    ("[invalid bearer token, service account token has expired]", "token_expired"),
    ('[invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["amesh-ca"]]',
     "token_wrong_audience"),
    ("[invalid bearer token, token not signed by this API server]", "token_invalid"),
    ("", "token_invalid"),
])
def test_a_token_the_api_server_did_not_authenticate_is_refused_with_its_error(error: str, reason: str) -> None:
    decision = admit(POLICY, Review(authenticated=False, error=error), WEB, PODS)
    assert (decision.allowed, decision.reason) == (False, reason)
    assert classify_token_error(error) == reason
    assert (error or "no reason given") in decision.message


def test_refuses_tokens_of_other_accounts_unbound_tokens_and_other_audiences() -> None:
    other = agent_review(username="system:serviceaccount:shop:web")
    assert admit(POLICY, other, WEB, PODS).reason == "not_agent"
    assert "system:serviceaccount:shop:web" in admit(POLICY, other, WEB, PODS).message
    assert admit(POLICY, agent_review(pod=None), WEB, PODS).reason == "token_not_bound_to_pod"
    assert admit(POLICY, agent_review(audiences=("vault",)), WEB, PODS).reason == "token_wrong_audience"


def test_refuses_another_trust_domain() -> None:
    decision = admit(POLICY, agent_review(), Identity("other.local", "shop", "web"), PODS)
    assert (decision.allowed, decision.reason) == (False, "wrong_trust_domain")


def test_a_pod_moved_off_the_node_takes_the_identity_with_it() -> None:
    moved = PodsByNode([Workload("server-a", "shop", "10.244.2.11", "node-2", "web"),
                        Workload("server-b", "shop", "10.244.2.10", "node-2", "web")])
    assert admit(POLICY, agent_review(), WEB, PODS).allowed
    assert admit(POLICY, agent_review(), WEB, moved).reason == "identity_on_other_node"


def test_review_from_a_token_review_status() -> None:
    review = Review.from_status({"authenticated": True, "audiences": ["amesh-ca"], "user": {
        "username": "system:serviceaccount:amesh-system:amesh-agent",
        "extra": {"authentication.kubernetes.io/pod-name": ["amesh-agent-1"],
                  "authentication.kubernetes.io/pod-uid": ["u-1"],
                  "authentication.kubernetes.io/node-name": ["node-1"]}}})
    assert review == agent_review()
    assert Review.from_status({"authenticated": False, "error": "boom", "user": {}}) == \
        Review(authenticated=False, error="boom")
