"""agent/local.py: a pod change on another node costs this node no capture sync and no
certificate work; a change of its own enrolled pods does."""

from __future__ import annotations

from typing import Any

from agent.local import LocalPods
from registry.incremental import IncrementalRegistry
from registry.model import ENROLL_LABEL

NODE = "node-a"


def pod(name: str, node: str, ip: str, account: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "serviceAccountName": account},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def registry_with(*pods: dict[str, Any]) -> IncrementalRegistry:
    registry = IncrementalRegistry()
    registry.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "shop", "labels": {ENROLL_LABEL: "ambient"}}})
    for p in pods:
        registry.apply(p)
    registry.commit()
    return registry


def test_a_pod_change_on_another_node_changes_neither_capture_nor_certificates() -> None:
    registry = registry_with(pod("web-1", NODE, "10.1.0.1"), pod("api-1", "node-b", "10.1.1.1", "api"))
    local = LocalPods(NODE, "cluster.local")
    first = local.changed(registry.state)
    assert first is not None and first.ips == ("10.1.0.1",)
    assert [i.uri for i in first.identities] == ["spiffe://cluster.local/ns/shop/sa/web"]
    node_map = registry.state._nodes[NODE]
    for change in (pod("api-1", "node-b", "10.1.1.2", "api"), pod("api-2", "node-c", "10.1.2.1", "db")):
        registry.apply(change)
        assert registry.commit() is not None  # the cluster changed...
        assert local.changed(registry.state) is None  # ...but not this node: no sync, no certificate
        assert registry.state._nodes[NODE] is node_map  # and this node's index was not rebuilt
    registry.delete("Pod", "shop", "api-1")
    registry.commit()
    assert local.changed(registry.state) is None


def test_a_local_pod_change_is_carried_out() -> None:
    registry = registry_with(pod("web-1", NODE, "10.1.0.1"))
    local = LocalPods(NODE, "cluster.local")
    local.changed(registry.state)
    registry.apply(pod("db-1", NODE, "10.1.0.2", "db"))
    registry.commit()
    changed = local.changed(registry.state)
    assert changed is not None and changed.ips == ("10.1.0.1", "10.1.0.2")
    assert {i.uri for i in changed.identities} == {"spiffe://cluster.local/ns/shop/sa/web",
                                                    "spiffe://cluster.local/ns/shop/sa/db"}
    registry.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})  # unenrolled
    registry.commit()
    changed = local.changed(registry.state)
    assert changed is not None and changed.ips == () and not changed.identities
