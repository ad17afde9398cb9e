"""The Kubernetes source and the objects that shape traffic: DestinationRules, TCPRoutes and
TrafficSplits followed from the test API server into each Service's TrafficPolicy, a malformed
version leaving the last good one in force, absent CRDs a notice, and this node's zone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from registry.model import TrafficPolicy
from tests.kubeapi import TRAFFIC_GROUPS, KubeAPIServer
from tests.unit.test_kubernetes_source import namespace, pod, running, scenario, server, service, until


def destination_rule(max_connections: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"host": "web.shop.svc.cluster.local",
                     "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": max_connections}}}}}


def canary_route(weight: int, stable: Any = None) -> dict[str, Any]:
    stable = 100 - weight if stable is None else stable
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": "web-canary", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": stable},
                                                {"name": "web-canary", "port": 80, "weight": weight}]}]}}


def traffic_split(weight: int) -> dict[str, Any]:
    return {"apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"service": "api", "backends": [{"service": "api", "weight": 100 - weight},
                                                   {"service": "api-canary", "weight": weight}]}}


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
                                                            "labels": {"topology.kubernetes.io/zone": zone}}}


OBJECTS = (namespace("shop"), pod("web-1", "10.244.1.5"), service("web", "10.96.0.10"),
           service("web-canary", "10.96.0.11"), service("api", "10.96.0.12"), service("api-canary", "10.96.0.13"))


def traffic(run: Any, key: str = "shop/web") -> TrafficPolicy:
    return run.state.service_by_key(key).traffic


@scenario
async def test_a_destination_rule_from_the_api_server_shapes_its_service_and_a_bad_version_keeps_the_last_good(
        tmp_path: Path) -> None:
    with server(*OBJECTS, destination_rule(10)) as api:
        async with running(api, tmp_path) as run:
            assert traffic(run).max_connections == 10
            assert traffic(run).configured_by == ("DestinationRule shop/web",)
            api.apply(destination_rule(20))
            await until(lambda: traffic(run).max_connections == 20, what="new maxConnections")
            api.apply(destination_rule(-1))
            await until(lambda: len(run.errors) == 1, what="rejection reported")
            assert run.errors == [
                "DestinationRule shop/web: spec.trafficPolicy.connectionPool.tcp.maxConnections: must be a positive "
                "integer, got -1 (the version before it stays in force)"]
            assert run.source.last_error == f"rejected {run.errors[0]}"  # what `ameshctl status` shows
            assert traffic(run).max_connections == 20
            api.apply(pod("web-2", "10.244.1.6"))  # a later rebuild keeps it too
            await until(lambda: run.state.workload_by_key("shop/web-2") is not None, what="another change")
            assert traffic(run).max_connections == 20
            api.delete("DestinationRule", "web", "shop")  # only a delete takes it away
            await until(lambda: traffic(run) == TrafficPolicy(), what="rule deleted")
            assert run.source.rejected == {}


@scenario
async def test_tcp_route_and_traffic_split_weights_follow_their_objects(tmp_path: Path) -> None:
    with server(*OBJECTS, canary_route(10), traffic_split(1)) as api:
        async with running(api, tmp_path) as run:
            assert [b.weight for b in traffic(run).split] == [90, 10]
            assert [(b.service, b.weight) for b in traffic(run, "shop/api").split] == [("shop/api", 99),
                                                                                      ("shop/api-canary", 1)]
            api.apply(canary_route(50))
            await until(lambda: [b.weight for b in traffic(run).split] == [50, 50], what="weight change")
            api.apply(canary_route(50, stable="half"))
            await until(lambda: len(run.errors) == 1, what="rejection reported")
            assert run.errors[0].startswith("TCPRoute shop/web-canary: spec.rules[0].backendRefs[0].weight: must be "
                                            "an integer 0-1000000")
            assert [b.weight for b in traffic(run).split] == [50, 50]
            api.delete("TrafficSplit", "api", "shop")
            await until(lambda: traffic(run, "shop/api").split == (), what="split deleted")


@scenario
async def test_a_malformed_service_annotation_keeps_the_services_last_good_version(tmp_path: Path) -> None:
    annotated = service("web", "10.96.0.10")
    annotated["metadata"]["annotations"] = {"amesh.io/connection-rate-limit": "20/s"}
    with server(*OBJECTS[:2], annotated) as api:
        async with running(api, tmp_path) as run:
            assert traffic(run).connection_rate == 20.0
            annotated["metadata"]["annotations"] = {"amesh.io/connection-rate-limit": "fast"}
            api.apply(annotated)
            await until(lambda: len(run.errors) == 1, what="rejection reported")
            assert run.errors[0].startswith('Service shop/web: metadata.annotations["amesh.io/connection-rate-limit"]')
            assert run.errors[0].endswith("(the version before it stays in force)")
            assert traffic(run).connection_rate == 20.0


@scenario
async def test_without_the_traffic_crds_the_registry_syncs_and_rules_follow_once_installed(tmp_path: Path) -> None:
    with KubeAPIServer(bookmark_interval=0.5, traffic_groups=(),
                       objects=(*OBJECTS, destination_rule(10), canary_route(10))) as api:
        async with running(api, tmp_path, discovery_interval=0.2) as run:
            assert traffic(run) == TrafficPolicy()
            assert run.source.last_error is None and run.errors == []
            notice = str(run.source.notice)
            for text in ("DestinationRule not served", "networking.istio.io/v1alpha3", "TCPRoute not served",
                         "(Gateway API's experimental CRDs not installed?): no TCPRoute splits from the cluster",
                         "TrafficSplit not served", "split.smi-spec.io/v1alpha1", "looking again every 0.2 s"):
                assert text in notice
            api.serve_traffic_groups(*TRAFFIC_GROUPS)
            await until(lambda: traffic(run).max_connections == 10 and traffic(run).split, what="rules once served")
            await until(lambda: run.source.connected and run.source.notice is None, what="watching them")


@scenario
async def test_only_this_nodes_node_is_watched_for_its_zone(tmp_path: Path) -> None:
    with server(*OBJECTS, node("node-1", "zone-a"), node("node-2", "zone-b")) as api:
        async with running(api, tmp_path, node="node-1") as run:
            assert run.state.node_zones == {"node-1": "zone-a"}
            api.apply(node("node-1", "zone-c"))
            await until(lambda: run.state.zone_of("node-1") == "zone-c", what="zone change")
            api.apply(node("node-2", "zone-d"))
            api.apply(pod("web-2", "10.244.1.6"))
            await until(lambda: run.state.workload_by_key("shop/web-2") is not None, what="another change")
            assert run.state.node_zones == {"node-1": "zone-c"}
