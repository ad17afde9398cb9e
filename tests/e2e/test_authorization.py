"""Who may talk to whom, end to end: Istio AuthorizationPolicy and PeerAuthentication from the
registry file, enforced alike across nodes (inbound HBONE answers 401) and on one node (the
same-node path), on plaintext (reset), on live connections when a policy changes, and
`ameshctl check` agreeing with the data path in every case.

Bed: two point-to-point nodes, an agent on each. Namespace "shop" is enrolled: client (sa client),
intruder (sa intruder) and server-a (sa web, app=web) on node-1, server-b (sa web, app=web) on
node-2, which serves ports 8080 and 9090. Namespace "legacy" is not enrolled: pod "plain" on node-1.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from tests.mesh import SINGLE_PROCESS, Mesh, exchange

PORT, OTHER_PORT = 8080, 9090


@pytest.fixture
def mesh(make_bed) -> Iterator[Mesh]:
    bed = make_bed("p2p", nodes=2)
    mesh = Mesh(bed, namespaces={"shop": True, "legacy": False}, container_port=PORT,
                # /metrics counts this process only until the dataplane-telemetry merge sums the workers
                agent_args=SINGLE_PROCESS)
    bed.add_pod("client", 1, namespace="shop", service_account="client", labels={"app": "client"})
    bed.add_pod("intruder", 1, namespace="shop", service_account="intruder", labels={"app": "intruder"})
    bed.add_pod("server-a", 1, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("server-b", 2, namespace="shop", service_account="web", labels={"app": "web"})
    bed.add_pod("plain", 1, namespace="legacy")
    for name in ("server-a", "server-b"):
        bed.start_podserver(bed.pods[name], PORT)
    bed.start_podserver(bed.pods["server-b"], OTHER_PORT)
    mesh.write_registry()
    mesh.start_agent(1)
    mesh.start_agent(2)
    yield mesh
    mesh.print_logs()


def policy(name: str, spec: dict, kind: str = "AuthorizationPolicy", namespace: str = "shop") -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def allow_from(name: str, *service_accounts: str) -> dict:
    principals = [f"cluster.local/ns/shop/sa/{sa}" for sa in service_accounts]
    return policy(name, {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                         "rules": [{"from": [{"source": {"principals": principals}}]}]})


def apply(mesh: Mesh, *policies: dict) -> None:
    """Puts `policies` in the registry file and waits until both agents run on them."""
    before = {node: mesh.ctl_json(node, "status")["registry"]["generation"] for node in (1, 2)}
    mesh.policies = list(policies)
    mesh.write_registry()
    for node, generation in before.items():
        mesh.wait_for(f"node-{node} to load the policies",
                      lambda: mesh.ctl_json(node, "status")["registry"]["generation"] > generation)


def attempt(mesh: Mesh, source: str, target: str, port: int = PORT) -> tuple[str, float]:
    """("ok", seconds) when `source` reached `target`:`port` and heard it, ("refused", seconds) if reset."""
    bed = mesh.bed
    started = time.monotonic()
    try:
        name, echoed = exchange(bed, bed.pods[source], bed.pods[target].ip, port, b"hi", timeout=3)
    except ConnectionError:
        return "refused", time.monotonic() - started
    assert (name, echoed) == (target, b"hi")
    return "ok", time.monotonic() - started


def check(mesh: Mesh, source: str, target: str, port: int = PORT) -> dict:
    """`ameshctl check` on the destination's node."""
    node = mesh.bed.pods[target].node.name
    return mesh.ctl_json(node, "check", "--from", f"{mesh.bed.pods[source].namespace}/{source}",
                              "--to", f"shop/{target}", "--port", str(port))


def agrees(mesh: Mesh, source: str, target: str, port: int = PORT) -> str:
    """The data path's outcome, after checking that `ameshctl check` predicted it."""
    predicted = check(mesh, source, target, port)
    outcome, seconds = attempt(mesh, source, target, port)
    assert predicted["allowed"] == (outcome == "ok"), (source, target, port, predicted)
    if outcome == "refused":
        assert seconds < 1.0, f"a denied client must fail promptly, took {seconds:.2f}s"
    return outcome


def test_the_same_allow_policy_decides_cross_node_and_same_node_connections(mesh: Mesh):
    apply(mesh, allow_from("web-from-intruder", "intruder"))
    assert agrees(mesh, "client", "server-b") == "refused"  # across nodes: inbound HBONE answers 401
    assert agrees(mesh, "client", "server-a") == "refused"  # same node: never crosses a listener
    assert agrees(mesh, "intruder", "server-b") == "ok"
    denied = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "failed"]
    assert [(c["failure"], c["source_workload"]) for c in denied] == [("policy_denied", "shop/client")], denied
    assert "no ALLOW policy matched" in denied[0]["reason"]
    # the server pod never saw the denied client: node-2 delivered only intruder's connection
    delivered = [c["source_workload"] for c in mesh.ctl_json(2, "connections") if c["state"] == "closed"]
    assert delivered == ["shop/intruder"], delivered
    outbound = [c for c in mesh.ctl_json(1, "connections") if c["state"] == "failed"]
    # the source side counts it as a denial too (the destination answered 401), not an upstream failure
    assert [c["failure"] for c in outbound if "with 401" in c["reason"]] == ["policy_denied"], outbound
    explained = check(mesh, "client", "server-b")
    assert explained["tried"] == ["shop/web-from-intruder: rules[0]: principal cluster.local/ns/shop/sa/client "
                                  "is not one of [cluster.local/ns/shop/sa/intruder]"], explained

    apply(mesh, allow_from("web-from-clients", "intruder", "client"))
    assert agrees(mesh, "client", "server-b") == "ok"
    assert agrees(mesh, "client", "server-a") == "ok"
    assert check(mesh, "client", "server-b")["rule"] == (
        "spec.rules[0]: from principals [cluster.local/ns/shop/sa/intruder, cluster.local/ns/shop/sa/client]")

    # a DENY beats the ALLOW, for its port only
    apply(mesh, allow_from("web-from-clients", "intruder", "client"),
          policy("no-client-on-8080", {"action": "DENY", "rules": [{
              "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}],
              "to": [{"operation": {"ports": [str(PORT)]}}]}]}))
    assert agrees(mesh, "client", "server-b") == "refused"
    assert check(mesh, "client", "server-b")["reason"] == "explicitly denied by shop/no-client-on-8080"
    assert agrees(mesh, "client", "server-b", OTHER_PORT) == "ok"
    samples = mesh.metrics(2)["istio_tcp_connections_opened_total"]
    assert any(labels["response_flags"] == "DENY" for labels, _ in samples), samples


def test_peer_authentication_levels_decide_plaintext_from_outside_the_mesh(mesh: Mesh):
    strict_namespace = policy("strict", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication")
    apply(mesh, strict_namespace)
    assert agrees(mesh, "plain", "server-b") == "refused"
    assert agrees(mesh, "client", "server-b") == "ok"  # over mTLS
    [refused] = [c for c in mesh.ctl_json(2, "connections") if c["state"] == "failed"]
    assert refused["failure"] == "strict_mtls" and "PeerAuthentication shop/strict" in refused["reason"]

    apply(mesh, strict_namespace, policy("web-plaintext-9090", {
        "selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {OTHER_PORT: {"mode": "PERMISSIVE"}}},
        kind="PeerAuthentication"))
    assert agrees(mesh, "plain", "server-b", OTHER_PORT) == "ok"
    assert agrees(mesh, "plain", "server-b", PORT) == "refused"

    apply(mesh, strict_namespace, policy("web-permissive", {
        "selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}, kind="PeerAuthentication"))
    assert agrees(mesh, "plain", "server-b", PORT) == "ok"


def test_a_live_connection_is_cut_within_a_second_of_a_policy_that_no_longer_allows_it(mesh: Mesh):
    bed = mesh.bed
    live = {target: bed.connect(bed.pods["client"], bed.pods[target].ip, PORT, timeout=3)
            for target in ("server-b", "server-a")}  # across nodes, and on one node
    try:
        for target, sock in live.items():
            assert sock.recv(100) == f"{target}\n".encode()
        apply(mesh, allow_from("web-from-intruder", "intruder"))
        applied = time.monotonic()
        for target, sock in live.items():
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                while time.monotonic() - applied < 3:
                    sock.sendall(b"still there?")
                    if not sock.recv(100):
                        raise ConnectionResetError("closed")
                    time.sleep(0.05)
            assert time.monotonic() - applied < 1.0, f"{target}: cut after {time.monotonic() - applied:.2f}s"
    finally:
        for sock in live.values():
            sock.close()
    for node in (1, 2):
        cut = mesh.wait_for(f"node-{node} to record the cut", lambda: [
            c for c in mesh.ctl_json(node, "connections") if c["failure"] == "policy_changed"])
        assert cut[0]["reason"].startswith("closed: policy changed (no ALLOW policy matched)"), cut
    log = mesh.access_log(2)
    assert any(e.get("error.code") == "policy_changed" for e in log), log


def test_a_malformed_policy_keeps_the_policies_in_force_and_says_why(mesh: Mesh):
    apply(mesh, allow_from("web-from-intruder", "intruder"))
    assert agrees(mesh, "client", "server-b") == "refused"
    mesh.policies = [policy("web-open", {"action": "AUDIT", "rules": [{}]})]
    mesh.write_registry()
    status = mesh.wait_for("the bad policy to be reported", lambda: (
        s := mesh.ctl_json(2, "status"))["registry"]["last_error"] and s)
    assert "(AuthorizationPolicy shop/web-open): spec.action" in status["registry"]["last_error"], status
    assert agrees(mesh, "client", "server-b") == "refused"  # still the policy in force
    shown = mesh.ctl_json(2, "policies")["authorization_policies"]
    assert [p["key"] for p in shown] == ["shop/web-from-intruder"], shown


def test_ameshctl_policies_lists_each_policy_with_its_scope_rules_and_warnings(mesh: Mesh):
    apply(mesh, policy("get-only", {"selector": {"matchLabels": {"app": "web"}}, "rules": [{
        "from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"methods": ["GET"]}}]}]}))
    [shown] = mesh.ctl_json(1, "policies")["authorization_policies"]
    assert (shown["action"], shown["scope"], shown["enforced_rules"]) == ("ALLOW", "workloads with app=web", 0)
    assert "HTTP attributes (methods)" in shown["warnings"][0]
    table = mesh.ctl(1, "policies").stdout
    assert "get-only" in table and "never matches" in table
    assert agrees(mesh, "client", "server-b") == "refused"  # the rule that names GET never matches
