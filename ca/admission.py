"""Node-scoped issuance, decided without I/O: may the agent that sent this token have identity I?

The agent proves who it is with a projected service-account token (audience `amesh-ca`) that the
CA hands to the Kubernetes TokenReview API. A token bound to a pod comes back with that pod and,
from Kubernetes 1.30 on, its node in user.extra. The CA signs identity
spiffe://<td>/ns/<ns>/sa/<sa> only when:

1. the token is authenticated for the CA's audience (not expired, not foreign, not invalidated);
2. it belongs to the agents' service account and is bound to a pod: the agent pod;
3. that pod's node is known (from the token, else from the CA's own watch of pods);
4. the identity is in the CA's trust domain and a pod with service account <sa> in namespace
   <ns> is scheduled on that node right now (the CA's watch of pods).

So a compromised node can obtain only the identities of pods the API server has placed on it,
as with Istio's istiod and ztunnel. `admit` is pure: the review, the request and the pods are
values, and the answer is a Decision whose reason is a short code for metrics and whose message
names what was refused and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from registry.model import Workload
from ztunnel.identity import Identity

AUDIENCE = "amesh-ca"  # the audience agents' projected tokens are minted for, and reviewed against
AGENT_NAMESPACE = "amesh-system"
AGENT_SERVICE_ACCOUNT = "amesh-agent"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_SERVICE_ACCOUNT_USER = "system:serviceaccount:"

# Reason codes, in the order the checks run; "signed" for a certificate issued.
REASONS = ("bad_request", "bad_csr", "token_expired", "token_wrong_audience", "token_invalid", "not_agent",
           "token_not_bound_to_pod", "agent_node_unknown", "wrong_trust_domain", "unknown_service_account",
           "identity_on_other_node", "not_synced", "review_failed", "signed")


@dataclass(frozen=True)
class Review:
    """What the TokenReview API said about a token (its status), reduced to what admission reads."""

    authenticated: bool
    error: str = ""  # the API server's reason when not authenticated
    username: str = ""  # system:serviceaccount:<namespace>:<name>
    audiences: tuple[str, ...] = ()
    pod_name: str | None = None  # the pod the token is bound to
    pod_uid: str | None = None
    node_name: str | None = None  # that pod's node, when the API server says it

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> Review:
        """A Review from a TokenReview's status object (authentication.k8s.io/v1)."""
        user = status.get("user") or {}
        extra = user.get("extra") or {}

        def first(key: str) -> str | None:
            values = extra.get(key) or []
            return str(values[0]) if values else None

        return cls(authenticated=bool(status.get("authenticated")), error=str(status.get("error") or ""),
                   username=str(user.get("username") or ""), audiences=tuple(status.get("audiences") or ()),
                   pod_name=first(POD_NAME_EXTRA), pod_uid=first(POD_UID_EXTRA), node_name=first(NODE_NAME_EXTRA))


@dataclass(frozen=True)
class Decision:
    """The answer to one request: signed, or refused with a reason code and a sentence."""

    allowed: bool
    reason: str  # one of REASONS
    message: str
    node: str | None = None  # the asking agent's node, once known

    @classmethod
    def refuse(cls, reason: str, message: str, node: str | None = None) -> Decision:
        return cls(False, reason, message, node)


@dataclass(frozen=True)
class AdmissionPolicy:
    """Who may ask: the agents' service account, and the trust domain the CA signs for."""

    trust_domain: str
    agent_namespace: str = AGENT_NAMESPACE
    agent_service_account: str = AGENT_SERVICE_ACCOUNT
    audience: str = AUDIENCE

    @property
    def agent_user(self) -> str:
        return f"{_SERVICE_ACCOUNT_USER}{self.agent_namespace}:{self.agent_service_account}"


class PodsByNode:
    """The pods scheduled now, indexed for admission: service accounts by node, nodes by service
    account, and each pod's node. Built from the CA's watch of pods (the registry's workloads)."""

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self._accounts: dict[str, set[tuple[str, str]]] = {}
        self._nodes: dict[tuple[str, str], set[str]] = {}
        self._pod_node: dict[tuple[str, str], str] = {}
        for w in workloads:
            account = (w.namespace, w.service_account)
            self._accounts.setdefault(w.node, set()).add(account)
            self._nodes.setdefault(account, set()).add(w.node)
            self._pod_node[(w.namespace, w.name)] = w.node

    def node_of(self, namespace: str, name: str) -> str | None:
        """The node pod namespace/name is scheduled on, if the CA sees it."""
        return self._pod_node.get((namespace, name))

    def runs_on(self, node: str, namespace: str, service_account: str) -> bool:
        return (namespace, service_account) in self._accounts.get(node, set())

    def nodes_running(self, namespace: str, service_account: str) -> list[str]:
        return sorted(self._nodes.get((namespace, service_account), set()))


def classify_token_error(error: str) -> str:
    """The reason code for a token the TokenReview API did not authenticate, from its error text
    (the API server's messages: "... has expired", "token audiences ... is invalid ...")."""
    if "expired" in error:
        return "token_expired"
    if "audience" in error:
        return "token_wrong_audience"
    return "token_invalid"


def admit(policy: AdmissionPolicy, review: Review, requested: Identity, pods: PodsByNode) -> Decision:
    """Whether to sign `requested` for the agent whose token got `review`, given the pods now."""
    if not review.authenticated:
        return Decision.refuse(classify_token_error(review.error),
                               f"the Kubernetes API server did not authenticate the agent's token: "
                               f"{review.error or 'no reason given'}")
    if policy.audience not in review.audiences:
        return Decision.refuse("token_wrong_audience",
                               f"the agent's token is not for audience {policy.audience} (it is for "
                               f"{', '.join(review.audiences) or 'no audience'}): project the token with "
                               f"audience {policy.audience}")
    if review.username != policy.agent_user:
        return Decision.refuse("not_agent", f"the token belongs to {review.username or 'nobody'}, not to the agents' "
                               f"service account {policy.agent_namespace}/{policy.agent_service_account}")
    if review.pod_name is None:
        return Decision.refuse("token_not_bound_to_pod",
                               "the agent's token is not bound to a pod, so it says nothing about a node: use a "
                               "projected service-account token, not a Secret's")
    node = review.node_name or pods.node_of(policy.agent_namespace, review.pod_name)
    if node is None:
        return Decision.refuse("agent_node_unknown",
                               f"the agent pod {policy.agent_namespace}/{review.pod_name} is not scheduled on any "
                               "node the CA sees")
    if requested.trust_domain != policy.trust_domain:
        return Decision.refuse("wrong_trust_domain",
                               f"this CA signs for trust domain {policy.trust_domain}, not {requested}", node)
    if pods.runs_on(node, requested.namespace, requested.service_account):
        return Decision(True, "signed", f"signed {requested} for node {node}", node)
    elsewhere = pods.nodes_running(requested.namespace, requested.service_account)
    if not elsewhere:
        return Decision.refuse("unknown_service_account",
                               f"no pod with service account {requested.service_account} in namespace "
                               f"{requested.namespace} runs anywhere, so node {node} may not have {requested}", node)
    return Decision.refuse("identity_on_other_node",
                           f"node {node} runs no pod with service account {requested.service_account} in namespace "
                           f"{requested.namespace} (such pods run on {', '.join(elsewhere)}), so it may not have "
                           f"{requested}", node)
