"""The admission decision, table-driven from the semantics of Istio's ambient ztunnel: policies
read from YAML as users write them, connections described as the listeners describe them."""

from __future__ import annotations

import pytest
import yaml

from registry.kubefile import build_state
from registry.model import RegistryError, RegistryState, Workload
from ztunnel.authz import Authorizer, Connection
from ztunnel.identity import Identity
from ztunnel.inbound import verified_source

WEB = Workload("web-0", "shop", "10.244.2.10", "node-2", "web", labels={"app": "web"}, enrolled=True)
DB = Workload("db-0", "data", "10.244.2.20", "node-2", "db", labels={"app": "db"}, enrolled=True)
CLIENT = Identity("cluster.local", "shop", "client")
OTHER = Identity("cluster.local", "other", "default")


def policies(text: str) -> RegistryState:
    """The workloads above plus the policies in `text` (YAML documents)."""
    state = build_state(_objects(text))
    return RegistryState(workloads=(WEB, DB), authorization_policies=state.authorization_policies,
                         peer_authentications=state.peer_authentications)


def _objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def policy(name: str, spec: str, namespace: str = "shop", kind: str = "AuthorizationPolicy") -> str:
    indented = "\n".join("  " + line for line in spec.strip().splitlines())
    return (f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n{indented}\n---\n")


def connect(identity: Identity | None = CLIENT, to: Workload = WEB, port: int = 8080, source_ip: str = "10.244.1.10",
            arrival: str = "hbone") -> Connection:
    return Connection(source_ip, identity, to, port, arrival)  # type: ignore[arg-type]


def decide(state: RegistryState, connection: Connection, **authorizer: str) -> tuple[bool, str]:
    decision = Authorizer(**authorizer).admit(state, connection)
    return decision.allowed, decision.reason


ALLOW_CLIENT = policy("allow-client", """
selector: {matchLabels: {app: web}}
action: ALLOW
rules:
- from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
  to: [{operation: {ports: ["8080"]}}]
""")


def test_no_policy_allows_and_an_allow_policy_admits_only_what_it_names():
    assert decide(policies(""), connect(OTHER)) == (True, "no ALLOW policy applies")
    state = policies(ALLOW_CLIENT)
    assert decide(state, connect()) == (True, "allowed by shop/allow-client")
    assert decide(state, connect(OTHER)) == (False, "no ALLOW policy matched")
    assert decide(state, connect(port=9090)) == (False, "no ALLOW policy matched")
    assert decide(state, connect(OTHER, to=DB)) == (True, "no ALLOW policy applies")  # not selected


def test_deny_beats_allow():
    state = policies(ALLOW_CLIENT + policy("deny-client", """
action: DENY
rules: [{from: [{source: {namespaces: ["shop"]}}]}]
"""))
    assert decide(state, connect()) == (False, "explicitly denied by shop/deny-client")


@pytest.mark.parametrize("spec, allowed", [
    ("{}", False),  # ALLOW without rules admits nothing
    ("rules: [{}]", True),  # one empty rule admits everything
])
def test_an_allow_policy_without_rules_denies_all_and_an_empty_rule_allows_all(spec, allowed):
    assert decide(policies(policy("p", spec)), connect())[0] is allowed


def test_allow_with_an_http_attribute_never_matches_and_says_so():
    text = policy("allow-get", """
rules:
- from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
  to: [{operation: {methods: [GET]}}]
""")
    state = policies(text)
    assert decide(state, connect()) == (False, "no ALLOW policy matched")
    [warning] = state.authorization_policies[0].warnings
    assert "spec.rules[0]: HTTP attributes (methods)" in warning and "never matches" in warning


def test_deny_with_an_http_attribute_still_denies_on_its_l4_part_and_an_l7_only_deny_has_no_effect():
    state = policies(policy("deny-80", """
action: DENY
rules: [{to: [{operation: {ports: ["8080"], methods: [GET]}}]}]
""") + policy("deny-get", """
action: DENY
rules: [{to: [{operation: {methods: [GET]}}]}]
"""))
    assert decide(state, connect(port=8080)) == (False, "explicitly denied by shop/deny-80")
    assert decide(state, connect(port=9090)) == (True, "no ALLOW policy applies")
    warnings = {p.name: p.warnings for p in state.authorization_policies}
    assert "enforced without them" in warnings["deny-80"][0]
    assert "no effect" in warnings["deny-get"][0]


@pytest.mark.parametrize("rule, connection, allowed", [
    ("{from: [{source: {notPrincipals: [cluster.local/ns/other/*]}}]}", connect(OTHER), False),
    ("{from: [{source: {notPrincipals: [cluster.local/ns/other/*]}}]}", connect(), True),
    ("{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}", connect(source_ip="10.244.1.99"), True),
    ("{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}", connect(source_ip="10.244.3.1"), False),
    ("{from: [{source: {notIpBlocks: [10.244.1.10]}}]}", connect(), False),
    ("{to: [{operation: {notPorts: ['8080']}}]}", connect(port=8080), False),
    ("{from: [{source: {serviceAccounts: [client]}}]}", connect(), True),  # the policy's namespace
    ("{from: [{source: {serviceAccounts: [other/client]}}]}", connect(), False),
    ("{from: [{source: {namespaces: ['sh*']}}]}", connect(), True),
    ("{from: [{source: {principals: ['*/sa/client']}}]}", connect(), True),
    ("{when: [{key: source.namespace, values: [shop]}]}", connect(), True),
    ("{when: [{key: source.principal, notValues: ['cluster.local/ns/shop/sa/client']}]}", connect(), False),
    ("{when: [{key: destination.port, values: ['8080']}]}", connect(port=8080), True),
    ("{when: [{key: destination.ip, values: [10.244.2.0/24]}]}", connect(), True),
    ("{when: [{key: source.ip, notValues: [10.244.1.10]}]}", connect(), False),
    # a plaintext connection has no identity: principal and namespace rules never match it
    ("{from: [{source: {principals: ['*']}}]}", connect(None, arrival="plaintext"), False),
    ("{from: [{source: {namespaces: ['*']}}]}", connect(None, arrival="plaintext"), False),
    ("{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}", connect(None, arrival="plaintext"), True),
    # from, to and when are ANDed; items within one are ORed
    ("{from: [{source: {namespaces: [x]}}, {source: {namespaces: [shop]}}], to: [{operation: {ports: ['1']}}]}",
     connect(), False),
    ("{from: [{source: {namespaces: [x]}}, {source: {namespaces: [shop]}}], to: [{operation: {ports: ['8080']}}]}",
     connect(), True),
])
def test_each_l4_field_decides(rule, connection, allowed):
    state = policies(policy("p", f"rules: [{rule}]"))
    assert decide(state, connection)[0] is allowed


def test_a_deny_of_notprincipals_star_refuses_only_plaintext():
    state = policies(policy("require-mtls", "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]"))
    assert decide(state, connect(None, arrival="plaintext")) == (False, "explicitly denied by shop/require-mtls")
    assert decide(state, connect())[0]


def test_mesh_wide_policies_live_in_the_root_namespace_and_selectors_there_reach_every_namespace():
    state = policies(policy("deny-other", "action: DENY\nrules: [{from: [{source: {namespaces: [other]}}]}]",
                            namespace="istio-system")
                     + policy("db-only-data", "selector: {matchLabels: {app: db}}\nrules: [{from: [{source: "
                              "{namespaces: [data]}}]}]", namespace="istio-system"))
    root = {"root_namespace": "istio-system"}
    assert decide(state, connect(OTHER), **root) == (False, "explicitly denied by istio-system/deny-other")
    assert decide(state, connect(CLIENT, to=DB), **root) == (False, "no ALLOW policy matched")
    assert decide(state, connect(CLIENT), **root)[0]  # the selector does not pick web
    # with another root namespace these policies are just policies of a namespace with no workloads
    assert decide(state, connect(OTHER)) == (True, "no ALLOW policy applies")


def test_a_policy_of_another_namespace_does_not_apply():
    state = policies(policy("p", "{}", namespace="data"))
    assert decide(state, connect()) == (True, "no ALLOW policy applies")
    assert decide(state, connect(to=DB)) == (False, "no ALLOW policy matched")


def test_explain_says_why_each_allow_policy_did_not_match():
    state = policies(ALLOW_CLIENT + policy("allow-admin", "rules: [{from: [{source: {namespaces: [admin]}}]}]"))
    decision = Authorizer().admit(state, connect(OTHER, port=9090), explain=True)
    assert decision.tried == (
        "shop/allow-admin: rules[0]: namespace other is not one of [admin]",
        "shop/allow-client: rules[0]: principal cluster.local/ns/other/sa/default is not one of "
        "[cluster.local/ns/shop/sa/client]",
    )


PLAINTEXT = connect(None, arrival="plaintext")


@pytest.mark.parametrize("text, connection, expected", [
    ("", PLAINTEXT, (True, "PERMISSIVE", "the agent's --mtls-mode")),
    (policy("ns", "mtls: {mode: STRICT}", kind="PeerAuthentication"), PLAINTEXT,
     (False, "STRICT", "PeerAuthentication shop/ns")),
    (policy("ns", "mtls: {mode: STRICT}", kind="PeerAuthentication")
     + policy("web", "selector: {matchLabels: {app: web}}\nmtls: {mode: PERMISSIVE}", kind="PeerAuthentication"),
     PLAINTEXT, (True, "PERMISSIVE", "PeerAuthentication shop/web")),
    (policy("ns", "mtls: {mode: STRICT}", kind="PeerAuthentication")
     + policy("web", "selector: {matchLabels: {app: web}}\nportLevelMtls: {9090: {mode: PERMISSIVE}}",
              kind="PeerAuthentication"),
     connect(None, port=9090, arrival="plaintext"), (True, "PERMISSIVE", "PeerAuthentication shop/web port 9090")),
    (policy("ns", "mtls: {mode: STRICT}", kind="PeerAuthentication")
     + policy("web", "selector: {matchLabels: {app: web}}\nportLevelMtls: {9090: {mode: PERMISSIVE}}",
              kind="PeerAuthentication"),
     PLAINTEXT, (False, "STRICT", "PeerAuthentication shop/ns")),  # UNSET at workload level inherits
    (policy("mesh", "mtls: {mode: STRICT}", namespace="amesh-system", kind="PeerAuthentication"), PLAINTEXT,
     (False, "STRICT", "PeerAuthentication amesh-system/mesh")),
    (policy("ns", "mtls: {mode: DISABLE}", kind="PeerAuthentication"), PLAINTEXT,
     (True, "PERMISSIVE", "PeerAuthentication shop/ns")),
    (policy("ns", "mtls: {mode: STRICT}", kind="PeerAuthentication"), connect(),  # mTLS is never refused
     (True, "STRICT", "PeerAuthentication shop/ns")),
])
def test_peer_authentication_levels_decide_plaintext(text, connection, expected):
    state = policies(text)
    authorizer = Authorizer()
    allowed, mode, decided_by = expected
    assert authorizer.mtls_mode(state, WEB, connection.destination_port) == (mode, decided_by)
    assert authorizer.admit(state, connection).allowed is allowed


def test_the_namespace_label_still_works_below_a_namespace_peer_authentication():
    labelled = Workload(**{**WEB.__dict__, "mtls_mode": "STRICT"})
    state = RegistryState(workloads=(labelled,))
    assert Authorizer().mtls_mode(state, labelled, 8080) == ("STRICT", "namespace shop label amesh.io/mtls-mode")
    state = RegistryState(workloads=(labelled,), peer_authentications=policies(
        policy("ns", "mtls: {mode: PERMISSIVE}", kind="PeerAuthentication")).peer_authentications)
    assert Authorizer().mtls_mode(state, labelled, 8080) == ("PERMISSIVE", "PeerAuthentication shop/ns")


@pytest.mark.parametrize("spec, kind, message", [
    ("action: AUDIT", "AuthorizationPolicy", 'spec.action: "AUDIT" is not supported'),
    ("action: ALLOW\nrulez: []", "AuthorizationPolicy", "spec.rulez: unknown field"),
    ("rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]", "AuthorizationPolicy",
     "spec.rules[0].from[0].source.ipBlocks[0]: must be an IP address or CIDR block"),
    ("rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]", "AuthorizationPolicy",
     "principals are written without spiffe://"),
    ("rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]", "AuthorizationPolicy",
     "cannot be combined with principals"),
    ("rules: [{to: [{operation: {ports: ['0']}}]}]", "AuthorizationPolicy", "must be a port 1-65535"),
    ("rules: [{when: [{key: source.ip}]}]", "AuthorizationPolicy", "spec.rules[0].when[0]: needs values"),
    ("portLevelMtls: {8080: {mode: STRICT}}", "PeerAuthentication", "spec.portLevelMtls: needs spec.selector"),
    ("mtls: {mode: strict}", "PeerAuthentication", "spec.mtls.mode: must be one of"),
])
def test_a_malformed_policy_is_rejected_naming_the_object_and_field(spec, kind, message):
    with pytest.raises(RegistryError) as error:
        build_state(_objects(policy("bad", spec, kind=kind)))
    assert f"{kind} shop/bad" in str(error.value) and message in str(error.value), str(error.value)


def test_a_waypoint_policy_is_not_the_ztunnels():
    state = policies(policy("waypoint", "targetRefs: [{kind: Service, name: web}]\nrules: [{}]"))
    assert state.authorization_policies == ()


def test_a_claimed_source_is_believed_only_with_the_identity_the_registry_gives_it():
    client = Workload("client", "shop", "10.244.1.10", "node-1", "client", enrolled=True)
    state = RegistryState(workloads=(client,))
    proved = Identity("cluster.local", "shop", "client")
    assert verified_source(state, "10.244.1.10", proved, "cluster.local") == client
    assert verified_source(state, "10.244.1.10", Identity("cluster.local", "shop", "web"), "cluster.local") is None
    assert verified_source(state, "10.244.1.99", proved, "cluster.local") is None  # nobody there
    assert verified_source(state, None, proved, "cluster.local") is None  # no claim
