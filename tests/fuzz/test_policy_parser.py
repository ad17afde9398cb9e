"""Fuzzing the policy parser (registry/policies.py, through the registry's build_state) with what
a cluster may hold: any spec for an AuthorizationPolicy or PeerAuthentication, and valid policies
with one field replaced by anything. It answers a state or a RegistryError naming the object,
never another exception; and any policy it accepts can be evaluated for any connection.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.kubefile import build_state
from registry.model import RegistryError, RegistryState, Workload
from ztunnel.authz import Authorizer, Connection
from ztunnel.identity import Identity

pytestmark = pytest.mark.fuzz

KEYS = ["selector", "matchLabels", "action", "rules", "from", "to", "when", "source", "operation", "principals",
        "notPrincipals", "namespaces", "serviceAccounts", "ipBlocks", "notIpBlocks", "ports", "notPorts",
        "methods", "key", "values", "notValues", "mtls", "mode", "portLevelMtls", "targetRefs"]
VALUES = ["ALLOW", "DENY", "AUDIT", "STRICT", "PERMISSIVE", "DISABLE", "*", "shop", "a*", "*/sa/web",
          "cluster.local/ns/shop/sa/web", "10.0.0.0/8", "10.0.0.300", "8080", "0", "source.ip",
          "destination.port", "request.headers[x]", "spiffe://x", "web", "other/web", "::1"]
specs = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.sampled_from(VALUES) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.integers(0, 9000),
                                                                inner, max_size=4),
    max_leaves=14,
)
WEB = Workload("web-0", "shop", "10.244.2.10", "node-2", "web", labels={"app": "web"}, enrolled=True)
CONNECTIONS = [
    Connection("10.244.1.10", Identity("cluster.local", "shop", "client"), WEB, 8080, "hbone"),
    Connection(None, Identity("cluster.local", "other", "default"), WEB, 9090, "hbone"),
    Connection("10.9.9.9", None, WEB, 8080, "plaintext"),
]


def _policy(kind: str, spec: object) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec}


@given(kind=st.sampled_from(["AuthorizationPolicy", "PeerAuthentication"]), spec=specs)
def test_any_spec_is_a_policy_or_a_registry_error_naming_it_and_any_policy_can_decide(kind, spec):
    parses_or_names_itself(kind, spec)


def parses_or_names_itself(kind: str, spec: object) -> None:
    """`spec` is refused naming the policy, or accepted as a policy that decides any connection."""
    try:
        state = build_state([_policy(kind, spec)])
    except RegistryError as e:
        assert f"{kind} shop/p" in str(e), str(e)
        return
    state = RegistryState(workloads=(WEB,), authorization_policies=state.authorization_policies,
                          peer_authentications=state.peer_authentications)
    for connection in CONNECTIONS:
        decision = Authorizer().admit(state, connection, explain=True)
        assert decision.allowed or decision.code in ("policy_denied", "strict_mtls")


VALID = [
    _policy("AuthorizationPolicy", {
        "selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"], "ipBlocks": ["10.0.0.0/8"]}},
                            {"source": {"serviceAccounts": ["client"]}}],
                   "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
                   "when": [{"key": "source.namespace", "values": ["shop"], "notValues": ["x*"]}]}]}),
    _policy("AuthorizationPolicy", {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}),
    _policy("PeerAuthentication", {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
                                   "portLevelMtls": {8080: {"mode": "PERMISSIVE"}}}),
]


def _leaves(value, path=()):
    """The paths of every value inside nested dicts and lists."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _leaves(inner, (*path, key))


def _replaced(document: dict, path: tuple, value: object) -> dict:
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


@given(data=st.data())
def test_a_valid_policy_with_one_field_replaced_by_anything_still_parses_or_fails_naming_it(data):
    document = data.draw(st.sampled_from(VALID))
    path = data.draw(st.sampled_from([p for p in _leaves(document["spec"]) if p]))
    value = data.draw(specs)
    changed = _replaced(document, ("spec", *path), value)
    parses_or_names_itself(changed["kind"], changed["spec"])
