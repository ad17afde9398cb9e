"""Unit tests for registry/traffic.py and its place in the registry file: DestinationRule,
TCPRoute and TrafficSplit read into each Service's TrafficPolicy, malformed ones refused with the
object and field named, and locality (trafficDistribution, endpoint nodes and zones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.kubefile import FileSource, build_state
from registry.model import Backend, OutlierSettings, RegistryError, RegistryState, Service, TrafficPolicy

SERVICES = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
     "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": 9080}]}}
    for name, ip in (("reviews", "10.96.0.30"), ("reviews-v2", "10.96.0.31"), ("ratings", "10.96.0.32"))
]


def destination_rule(spec: dict[str, Any], name: str = "reviews", namespace: str = "shop",
                     created: str | None = None, api_version: str = "networking.istio.io/v1") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        metadata["creationTimestamp"] = created
    return {"apiVersion": api_version, "kind": "DestinationRule", "metadata": metadata, "spec": spec}


def tcp_route(spec: dict[str, Any], name: str = "reviews-canary", created: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "shop"}
    if created:
        metadata["creationTimestamp"] = created
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute", "metadata": metadata, "spec": spec}


def traffic_split(spec: dict[str, Any], version: str = "v1alpha4", name: str = "reviews-split") -> dict[str, Any]:
    return {"apiVersion": f"split.smi-spec.io/{version}", "kind": "TrafficSplit",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def reviews(*objects: dict[str, Any]) -> Service:
    service = build_state([*SERVICES, *objects]).service_by_key("shop/reviews")
    assert service is not None
    return service


def rejected(obj: dict[str, Any]) -> str:
    with pytest.raises(RegistryError) as caught:
        build_state([*SERVICES, obj])
    return str(caught.value)


CANARY = {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
          "rules": [{"backendRefs": [{"name": "reviews", "port": 9080, "weight": 90},
                                     {"name": "reviews-v2", "port": 9080, "weight": 10}]}]}


# --- DestinationRule ---


def test_a_destination_rule_sets_limits_timeout_outlier_detection_and_balancer() -> None:
    traffic = reviews(destination_rule({"host": "reviews", "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "500ms"}},
        "outlierDetection": {"consecutive5xxErrors": 7, "interval": "10s", "baseEjectionTime": "1m",
                             "maxEjectionPercent": 30},
        "loadBalancer": {"simple": "LEAST_REQUEST"}}})).traffic
    assert traffic.max_connections == 100
    assert traffic.connect_timeout == 0.5
    assert traffic.outlier == OutlierSettings(consecutive_failures=7, base_ejection_time=60.0,
                                              max_ejection_time=300.0, max_ejection_percent=30)
    assert traffic.load_balancer == "LEAST_REQUEST"
    assert traffic.configured_by == ("DestinationRule shop/reviews",)
    assert traffic.warnings == ()


@pytest.mark.parametrize("host", ["reviews", "reviews.shop", "reviews.shop.svc", "reviews.shop.svc.cluster.local",
                                  "*.shop.svc.cluster.local", "*"])
def test_a_host_names_its_service_short_qualified_or_by_wildcard(host: str) -> None:
    rule = destination_rule({"host": host, "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}}})
    assert reviews(rule).traffic.max_connections == 3


@pytest.mark.parametrize("host", ["ratings", "reviews.other", "*.other.svc.cluster.local"])
def test_a_host_naming_another_service_leaves_it_alone(host: str) -> None:
    rule = destination_rule({"host": host, "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}}})
    assert reviews(rule).traffic == TrafficPolicy()


def test_a_short_host_is_in_the_rules_namespace() -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}}},
                            namespace="other")
    assert reviews(rule).traffic.max_connections is None


@pytest.mark.parametrize("version", ["networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"])
def test_older_destination_rule_versions_are_read(version: str) -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
                            api_version=version)
    assert reviews(rule).traffic.load_balancer == "RANDOM"


@pytest.mark.parametrize("simple, balancer", [("ROUND_ROBIN", "ROUND_ROBIN"), ("LEAST_CONN", "LEAST_REQUEST"),
                                              ("RANDOM", "RANDOM"), ("UNSPECIFIED", "ROUND_ROBIN")])
def test_istios_balancer_names(simple: str, balancer: str) -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": simple}}})
    assert reviews(rule).traffic.load_balancer == balancer


@pytest.mark.parametrize("detection, failures", [
    ({}, 5),  # Envoy's consecutive_5xx default
    ({"consecutiveGatewayErrors": 3}, 3),  # both detectors count a failed connect: the lower trips first
    ({"consecutiveGatewayErrors": 8}, 5),
    ({"consecutiveGatewayErrors": 8, "consecutive5xxErrors": 0}, 8),
    ({"consecutiveGatewayErrors": 2, "consecutive5xxErrors": 4}, 2),
    ({"consecutive5xxErrors": 0}, 0),  # off: never ejected
])
def test_the_lower_of_the_two_error_thresholds_ejects(detection: dict[str, int], failures: int) -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"outlierDetection": detection}})
    outlier = reviews(rule).traffic.outlier
    assert outlier.consecutive_failures == failures
    assert (outlier.base_ejection_time, outlier.max_ejection_percent) == (30.0, 50)


def test_a_base_ejection_time_above_the_cap_raises_the_cap() -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"outlierDetection": {"baseEjectionTime": "10m"}}})
    outlier = reviews(rule).traffic.outlier
    assert (outlier.base_ejection_time, outlier.max_ejection_time) == (600.0, 600.0)


@pytest.mark.parametrize("text, seconds", [("10s", 10.0), ("1.5s", 1.5), ("500ms", 0.5), ("1m", 60.0),
                                           ("1h30m", 5400.0), ("250us", None)])
def test_durations_as_istio_writes_them(text: str, seconds: float | None) -> None:
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": text}}}})
    if seconds is None:
        assert "connectTimeout: must be at least 1ms" in rejected(rule)
    else:
        assert reviews(rule).traffic.connect_timeout == seconds


TCP = "spec.trafficPolicy.connectionPool.tcp"
OUTLIER = "spec.trafficPolicy.outlierDetection"


@pytest.mark.parametrize("policy, message", [
    ({"connectionPool": {"tcp": {"maxConnections": -1}}},
     f"{TCP}.maxConnections: must be a positive integer, got -1"),
    ({"connectionPool": {"tcp": {"maxConnections": "100"}}},
     f'{TCP}.maxConnections: must be a positive integer, got "100"'),
    ({"connectionPool": {"tcp": {"connectTimeout": "10"}}},
     f'{TCP}.connectTimeout: must be a duration like "10s", "500ms" or "1m", got "10"'),
    ({"connectionPool": {"tcp": {"connectTimeout": 5}}},
     f'{TCP}.connectTimeout: must be a duration like "10s", "500ms" or "1m", got 5'),
    ({"connectionPool": {"tcp": {"maxConnection": 5}}}, f"{TCP}.maxConnection: unknown field"),
    ({"outlierDetection": {"consecutiveGatewayErrors": -2}},
     f"{OUTLIER}.consecutiveGatewayErrors: must be at least 0, got -2"),
    ({"outlierDetection": {"consecutive5xxErrors": True}},
     f"{OUTLIER}.consecutive5xxErrors: must be at least 0, got true"),
    ({"outlierDetection": {"interval": "soon"}}, f'{OUTLIER}.interval: must be a duration'),
    ({"outlierDetection": {"baseEjectionTime": "0s"}}, f'{OUTLIER}.baseEjectionTime: must be at least 1ms'),
    ({"outlierDetection": {"maxEjectionPercent": 101}},
     f"{OUTLIER}.maxEjectionPercent: must be an integer 0-100, got 101"),
    ({"outlierDetection": {"consecutiveErrors": 5}}, f"{OUTLIER}.consecutiveErrors: removed from Istio's API"),
    ({"loadBalancer": {"simple": "PASSTHROUGH"}}, "spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH is not "
                                                  "supported"),
    ({"loadBalancer": {"simple": "FASTEST"}},
     'spec.trafficPolicy.loadBalancer.simple: must be one of ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, '
     'UNSPECIFIED, got "FASTEST"'),
    ({"portLevelSettings": [{"port": {"number": 80}, "connectionPool": {"tcp": {"maxConnections": 0}}}]},
     "spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.maxConnections: must be a positive integer, got 0"),
    ({"retries": {}}, "spec.trafficPolicy.retries: unknown field"),
])
def test_a_malformed_destination_rule_names_the_object_and_field(policy: dict[str, Any], message: str) -> None:
    error = rejected(destination_rule({"host": "reviews", "trafficPolicy": policy}))
    assert error.startswith(f"DestinationRule shop/reviews: {message}"), error


@pytest.mark.parametrize("spec, message", [
    ({}, "spec.host: required"),
    ({"host": "rev*ews"}, 'spec.host: a wildcard may only be the first label ("*.shop.svc.cluster.local"), got '
                          '"rev*ews"'),
    ({"host": "reviews", "trafficPolicy": []}, "spec.trafficPolicy: must be a mapping, got a list"),
])
def test_a_destination_rule_without_a_usable_host_or_policy_is_refused(spec: dict[str, Any], message: str) -> None:
    assert rejected(destination_rule(spec)) == f"DestinationRule shop/reviews: {message}"


def test_what_l4_cannot_apply_is_a_warning_naming_the_field() -> None:
    traffic = reviews(destination_rule({"host": "reviews", "subsets": [{"name": "v1"}], "exportTo": ["."],
                                        "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 5, "idleTimeout": "1h"}, "http": {"http1MaxPendingRequests": 1}},
        "tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 1}}}]}})).traffic
    assert traffic.max_connections == 5  # the top level applies to every port
    assert traffic.warnings == (
        "DestinationRule shop/reviews: spec.subsets: not applied at L4",
        "DestinationRule shop/reviews: spec.trafficPolicy.tls: not applied (amesh carries every connection in "
        "mutual TLS over HBONE)",
        "DestinationRule shop/reviews: spec.trafficPolicy.connectionPool.http: not applied at L4",
        "DestinationRule shop/reviews: spec.trafficPolicy.connectionPool.tcp.idleTimeout: not applied yet",
        "DestinationRule shop/reviews: spec.trafficPolicy.portLevelSettings[0]: not applied (amesh shapes a Service "
        "as a whole: the top-level trafficPolicy applies to every port)",
    )


def test_of_several_rules_for_a_host_the_oldest_trafficpolicy_wins_whole() -> None:
    older = destination_rule({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
                             name="older", created="2026-01-01T00:00:00Z")
    newer = destination_rule({"host": "reviews.shop.svc.cluster.local", "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 9}}}}, name="newer", created="2026-02-01T00:00:00Z")
    subsets_only = destination_rule({"host": "reviews", "subsets": []}, name="subsets",
                                    created="2025-01-01T00:00:00Z")
    traffic = reviews(newer, subsets_only, older).traffic
    assert (traffic.load_balancer, traffic.max_connections) == ("RANDOM", None)
    assert traffic.configured_by == ("DestinationRule shop/older",)
    assert ("DestinationRule shop/newer: spec.trafficPolicy: shadowed by the older DestinationRule shop/older for "
            "this host (as Istio merges rules: the first rule's trafficPolicy wins)") in traffic.warnings


def test_an_exact_host_wins_over_an_older_wildcard() -> None:
    wildcard = destination_rule({"host": "*.shop.svc.cluster.local", "trafficPolicy": {
        "loadBalancer": {"simple": "RANDOM"}}}, name="all", created="2025-01-01T00:00:00Z")
    exact = destination_rule({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}},
                             created="2026-01-01T00:00:00Z")
    assert reviews(wildcard, exact).traffic.load_balancer == "LEAST_REQUEST"


def test_annotations_and_a_destination_rule_both_shape_the_service() -> None:
    annotated = {**SERVICES[0], "metadata": {**SERVICES[0]["metadata"], "annotations": {
        "amesh.io/connect-retries": "1", "amesh.io/connection-rate-limit": "20/s"}}}
    state = build_state([annotated, destination_rule({"host": "reviews", "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 4}}}})])
    traffic = state.services[0].traffic
    assert (traffic.connect_attempts, traffic.connection_rate, traffic.max_connections) == (2, 20.0, 4)
    assert traffic.configured_by == ("Service shop/reviews", "DestinationRule shop/reviews")


# --- TCPRoute and TrafficSplit ---


def test_a_tcp_route_on_a_service_splits_it_by_weight() -> None:
    traffic = reviews(tcp_route(CANARY)).traffic
    assert traffic.split == (Backend("shop/reviews", 90, 9080), Backend("shop/reviews-v2", 10, 9080))
    assert traffic.configured_by == ("TCPRoute shop/reviews-canary",)


def test_a_backend_weight_defaults_to_1_and_group_and_kind_to_service() -> None:
    route = tcp_route({"parentRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                       "rules": [{"backendRefs": [{"name": "reviews-v2", "port": 9080}]}]})
    assert reviews(route).traffic.split == (Backend("shop/reviews-v2", 1, 9080),)


def test_a_route_for_a_gateway_or_another_namespace_is_not_the_mesh_s() -> None:
    gateway = tcp_route({**CANARY, "parentRefs": [{"name": "edge"}]}, name="gateway")
    consumer = tcp_route({**CANARY, "parentRefs": [{"group": "", "kind": "Service", "name": "reviews",
                                                     "namespace": "other"}]}, name="consumer")
    assert reviews(gateway, consumer).traffic == TrafficPolicy()


def test_a_backend_naming_no_service_is_a_warning() -> None:
    split = traffic_split({"service": "reviews", "backends": [{"service": "reviews", "weight": 9},
                                                              {"service": "reviews-v3", "weight": 1}]})
    traffic = reviews(split).traffic
    assert [b.service for b in traffic.split] == ["shop/reviews", "shop/reviews-v3"]
    assert traffic.warnings == ("TrafficSplit shop/reviews-split: backend shop/reviews-v3 is no Service of the "
                                "registry",)


def test_only_the_first_rule_of_a_tcp_route_is_used() -> None:
    route = tcp_route({**CANARY, "rules": [*CANARY["rules"], {"backendRefs": [{"name": "ratings", "port": 9080}]}]})
    traffic = reviews(route).traffic
    assert [b.service for b in traffic.split] == ["shop/reviews", "shop/reviews-v2"]
    assert traffic.warnings == ("TCPRoute shop/reviews-canary: spec.rules[1]: never used (a TCP connection has "
                                "nothing to match; the first rule takes every connection)",)


def test_of_two_splits_of_a_service_the_oldest_wins() -> None:
    older = tcp_route(CANARY, name="older", created="2026-01-01T00:00:00Z")
    newer = tcp_route({**CANARY, "rules": [{"backendRefs": [{"name": "ratings", "port": 9080}]}]}, name="newer",
                      created="2026-03-01T00:00:00Z")
    traffic = reviews(newer, older).traffic
    assert traffic.split[1].service == "shop/reviews-v2"
    assert traffic.warnings == ("TCPRoute shop/newer: not applied: the older TCPRoute shop/older splits shop/reviews",)


BACKEND = "spec.rules[0].backendRefs[0]"


@pytest.mark.parametrize("ref, message", [
    ({"name": "reviews-v2", "port": 9080, "weight": -1}, f"{BACKEND}.weight: must be an integer 0-1000000, got -1"),
    ({"name": "reviews-v2", "port": 9080, "weight": "10"},
     f'{BACKEND}.weight: must be an integer 0-1000000, got "10"'),
    ({"name": "reviews-v2"}, f"{BACKEND}.port: required for a Service backend"),
    ({"name": "reviews-v2", "port": 0}, f"{BACKEND}.port: must be an integer 1-65535, got 0"),
    ({"port": 9080}, f"{BACKEND}.name: required"),
    ({"name": "reviews-v2", "port": 9080, "namespace": "other"},
     f"{BACKEND}.namespace: a backend in another namespace (other) needs a ReferenceGrant"),
    ({"name": "bucket", "port": 9080, "group": "storage.k8s.io", "kind": "Bucket"},
     f'{BACKEND}: must name a Service (group "", kind Service), got group "storage.k8s.io" kind "Bucket"'),
    ({"name": "reviews-v2", "port": 9080, "wieght": 3}, f"{BACKEND}.wieght: unknown field"),
])
def test_a_malformed_backend_ref_names_the_route_and_field(ref: dict[str, Any], message: str) -> None:
    error = rejected(tcp_route({**CANARY, "rules": [{"backendRefs": [ref]}]}))
    assert error.startswith(f"TCPRoute shop/reviews-canary: {message}"), error


@pytest.mark.parametrize("spec, message", [
    ({"parentRefs": CANARY["parentRefs"]}, "spec.rules: required: at least one rule with backendRefs"),
    ({**CANARY, "rules": [{}]}, "spec.rules[0].backendRefs: required: at least one backend"),
    ({**CANARY, "parentRefs": [{"group": "", "kind": "Service"}]}, "spec.parentRefs[0].name: required"),
    ({**CANARY, "parentRefs": "reviews"}, "spec.parentRefs: must be a list, got \"reviews\""),
])
def test_a_malformed_tcp_route_names_the_field(spec: dict[str, Any], message: str) -> None:
    assert rejected(tcp_route(spec)).startswith(f"TCPRoute shop/reviews-canary: {message}")


@pytest.mark.parametrize("version", ["v1alpha4", "v1alpha3", "v1alpha2"])
def test_a_traffic_split_splits_its_root_service(version: str) -> None:
    split = traffic_split({"service": "reviews", "backends": [{"service": "reviews", "weight": 99},
                                                              {"service": "reviews-v2", "weight": 1}]}, version)
    traffic = reviews(split).traffic
    assert traffic.split == (Backend("shop/reviews", 99), Backend("shop/reviews-v2", 1))
    assert traffic.configured_by == ("TrafficSplit shop/reviews-split",)


def test_a_v1alpha1_traffic_split_weighs_in_quantities() -> None:
    split = traffic_split({"service": "reviews.shop.svc.cluster.local",
                           "backends": [{"service": "reviews", "weight": "900m"},
                                        {"service": "reviews-v2", "weight": "100m"},
                                        {"service": "ratings", "weight": 1}]}, "v1alpha1")
    assert [b.weight for b in reviews(split).traffic.split] == [900, 100, 1000]


@pytest.mark.parametrize("version, spec, message", [
    ("v1alpha4", {"backends": [{"service": "reviews", "weight": 1}]}, "spec.service: required"),
    ("v1alpha4", {"service": "reviews"}, "spec.backends: required: at least one backend"),
    ("v1alpha4", {"service": "reviews", "backends": [{"service": "reviews"}]}, "spec.backends[0].weight: required"),
    ("v1alpha4", {"service": "reviews", "backends": [{"service": "reviews", "weight": 1.5}]},
     "spec.backends[0].weight: must be an integer 0-1000000, got 1.5"),
    ("v1alpha1", {"service": "reviews", "backends": [{"service": "reviews", "weight": "half"}]},
     'spec.backends[0].weight: must be a quantity like "500m" or "1", got "half"'),
    ("v1alpha4", {"service": "reviews.other", "backends": [{"service": "reviews", "weight": 1}]},
     'spec.service: must be a Service in the TrafficSplit\'s namespace shop, got "reviews.other"'),
    ("v1alpha4", {"service": "reviews", "backends": [{"service": "reviews", "weight": 1}],
                  "matches": [{"kind": "HTTPRouteGroup", "name": "api"}]}, "spec.matches: HTTP matches cannot be "
                                                                           "applied at L4"),
])
def test_a_malformed_traffic_split_names_the_field(version: str, spec: dict[str, Any], message: str) -> None:
    assert rejected(traffic_split(spec, version)).startswith(f"TrafficSplit shop/reviews-split: {message}")


# --- locality ---


def test_prefer_close_and_endpoint_nodes_and_zones() -> None:
    service = {**SERVICES[0], "spec": {**SERVICES[0]["spec"], "trafficDistribution": "PreferClose"}}
    nodes = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
             for name, labels in (("node-1", {"topology.kubernetes.io/zone": "zone-a"}), ("node-2", {}))]
    endpoint_slice = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": "reviews-1", "namespace": "shop",
                                   "labels": {"kubernetes.io/service-name": "reviews"}},
                      "ports": [{"name": "tcp", "port": 9080}],
                      "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-1"},
                                    {"addresses": ["10.244.2.5"], "nodeName": "node-2", "zone": "zone-b"},
                                    {"addresses": ["10.244.3.5"]}]}
    state = build_state([service, *nodes, endpoint_slice])
    reviews_service = state.services[0]
    assert reviews_service.traffic.prefer_close
    assert reviews_service.traffic.configured_by == ("Service shop/reviews",)
    assert [(e.node, e.zone) for e in reviews_service.endpoints] == [("node-1", "zone-a"), ("node-2", "zone-b"),
                                                                    (None, None)]
    # node-2's Node has no zone label: the zone its endpoints are in stands in
    assert (state.zone_of("node-1"), state.zone_of("node-2"), state.zone_of("node-3")) == ("zone-a", "zone-b", None)


def test_an_unknown_traffic_distribution_names_the_service_and_field() -> None:
    service = {**SERVICES[0], "spec": {**SERVICES[0]["spec"], "trafficDistribution": "Nearest"}}
    with pytest.raises(RegistryError, match=r'^Service shop/reviews: spec.trafficDistribution: must be one of '
                                            r'PreferClose, PreferSameZone, PreferSameNode, got "Nearest"$'):
        build_state([service])


# --- the registry file, end to end ---


def test_the_file_source_shapes_services_and_keeps_the_last_good_state_on_a_bad_rule(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    rule = destination_rule({"host": "reviews", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 50}}}})
    path.write_text(yaml.safe_dump_all([*SERVICES, rule, tcp_route(CANARY)]))
    states: list[RegistryState] = []
    source = FileSource(path, states.append, lambda e: None)
    state = source.load()
    traffic = state.service_by_key("shop/reviews").traffic  # type: ignore[union-attr]
    assert (traffic.max_connections, [b.weight for b in traffic.split]) == (50, [90, 10])
    rule["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] = -1
    path.write_text(yaml.safe_dump_all([*SERVICES, rule, tcp_route(CANARY)]))
    with pytest.raises(RegistryError, match=r"document 4 \(DestinationRule shop/reviews\): spec.trafficPolicy."
                                            r"connectionPool.tcp.maxConnections: must be a positive integer, got -1"):
        source.load()
    assert source.state is state  # the file's last good version stays in force
    assert source.last_error is not None and "maxConnections" in source.last_error
