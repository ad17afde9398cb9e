"""ameshctl without a running mesh: start-up refusals and the tables it prints."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import click
import yaml
from click.testing import CliRunner

from agent import views
from agent.cli import main
from registry.model import Backend, Endpoint, OutlierSettings, Service, ServicePort, TrafficPolicy, Workload
from ztunnel.connections import ConnectionTable

GOOD_NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_agent_refuses_a_malformed_registry_before_touching_the_node(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(GOOD_NAMESPACE + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
                    "spec: {clusterIP: 10.96.0.10, ports: [{port: eighty}]}\n")
    result = run("agent", "--node", "node-1", "--registry-file", str(path))
    assert result.exit_code == 1
    assert "document 2 (Service shop/web): spec.ports[0].port" in result.output
    assert "eighty" in result.output


def test_agent_names_a_missing_registry_file(tmp_path):
    path = tmp_path / "absent.yaml"
    result = run("agent", "--node", "node-1", "--registry-file", str(path))
    assert result.exit_code == 1
    assert str(path) in result.output


def test_views_say_where_the_agent_cannot_be_reached():
    result = run("--admin", "http://127.0.0.1:9", "connections")
    assert result.exit_code == 1
    assert "cannot reach the amesh admin API at http://127.0.0.1:9" in result.output


def test_connections_table_shows_source_destination_endpoint_bytes_and_failures():
    table = ConnectionTable()
    ok = table.open("10.244.1.10", 40000, "10.96.0.10:80", "shop/client")
    ok.service, ok.upstream, ok.upstream_workload = "shop/web", "10.244.2.10:8080", "shop/server-b"
    ok.security, ok.destination_identity = "mtls", "spiffe://cluster.local/ns/shop/sa/web"
    ok.bytes_sent, ok.bytes_received = 1024, 1033
    table.close(ok, "closed", "closed")
    bad = table.open("10.244.1.10", 40002, "10.96.0.10:81", "shop/client")
    table.close(bad, "failed", "service shop/web does not expose port 81")
    text = views.connections(table.snapshot())
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["ID", "DIR", "SOURCE", "WORKLOAD", "SOURCE"]
    failed_row, ok_row = lines[1], lines[2]  # newest first
    for cell in ("shop/client", "10.244.1.10:40000", "10.96.0.10:80 (shop/web)", "10.244.2.10:8080 (shop/server-b)",
                 "mtls", "spiffe://cluster.local/ns/shop/sa/web", "1024", "1033", "closed"):
        assert cell in ok_row
    assert "failed" in failed_row and "service shop/web does not expose port 81" in failed_row
    assert views.connections([]) == "no connections"


def test_services_table_counts_ready_endpoints():
    service = Service("web", "shop", "10.96.0.10", (ServicePort(80, "http", "http"),),
                      endpoints=(Endpoint("10.244.1.11", {"http": 8080}),
                                 Endpoint("10.244.2.10", {"http": 8080}, ready=False)))
    row = views.services([dataclasses.asdict(service)]).splitlines()[1]
    for cell in ("shop", "web", "10.96.0.10", "80->http (http)", "1/2", "10.244.1.11, 10.244.2.10 (not ready)"):
        assert cell in row


def test_services_table_shows_live_connections_of_the_limit_and_the_split_counts():
    traffic = TrafficPolicy(max_connections=100, load_balancer="LEAST_REQUEST", prefer_close=True,
                            split=(Backend("shop/web-v1", 90), Backend("shop/web-v2", 10)))
    service = Service("web", "shop", "10.96.0.10", (ServicePort(80, "http", "http"),),
                      endpoints=(Endpoint("10.244.1.11", {"http": 8080}),), traffic=traffic)
    view = {**dataclasses.asdict(service), "connections": 7}
    view["endpoints"][0]["connections"] = 3
    view["traffic"]["split"][0]["connections"], view["traffic"]["split"][1]["connections"] = 812, 88
    row = views.services([view]).splitlines()[1]
    for cell in ("10.244.1.11 (3 live)", "7/100", "web-v1 812 / web-v2 88"):
        assert cell in row


def test_services_table_shows_the_configured_traffic_policy_in_short_and_what_is_not_applied():
    traffic = TrafficPolicy(connect_attempts=2, connection_rate=20.0, max_connections=100, connect_timeout=0.5,
                            outlier=OutlierSettings(consecutive_failures=3, base_ejection_time=60.0),
                            load_balancer="LEAST_REQUEST", prefer_close=True,
                            split=(Backend("shop/web", 90, 80), Backend("shop/web-canary", 10, 80)),
                            warnings=("DestinationRule shop/web: spec.subsets: not applied at L4",))
    service = Service("web", "shop", "10.96.0.10", (ServicePort(80, "http", "http"),), traffic=traffic)
    lines = views.services([dataclasses.asdict(service)]).splitlines()
    assert ("attempts 2, rate 20/s, max 100 conns, timeout 500ms, eject after 3 for 60s (max 50%), least-request, "
            "prefer close, split web 90 / web-canary 10") in lines[1]
    assert lines[-2:] == ["not applied:", "  shop/web: DestinationRule shop/web: spec.subsets: not applied at L4"]
    plain = views.services([dataclasses.asdict(replace(service, traffic=TrafficPolicy()))]).splitlines()
    assert plain[1].split()[-2:] == ["-", "file"] and len(plain) == 2


def test_workloads_table_marks_enrollment_and_capture():
    workload = Workload("client", "shop", "10.244.1.10", "node-1", "client", enrolled=True)
    row = views.workloads([{**dataclasses.asdict(workload), "captured": True}]).splitlines()[1]
    assert row.split() == ["shop", "client", "10.244.1.10", "node-1", "client", "yes", "yes", "yes", "file"]


def test_daemonset_runs_the_agent_with_options_the_cli_accepts():
    manifest = Path(__file__).resolve().parents[2] / "daemonset" / "amesh.yaml"
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "DaemonSet"]
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["amesh-entrypoint", "ameshctl"]  # the image's: kernel headers, then ameshctl
    name, *args = container["args"]
    command = main.get_command(click.Context(main), name)
    params = command.make_context(name, args).params
    assert params["node"] == "$(NODE_NAME)" and params["drain_grace"] == 5.0
    assert params["registry_file"] is None  # the API server
    assert params["ca_address"] == "amesh-ca.amesh-system.svc:15012"  # no root key on the node: the cluster CA
    rules = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "ClusterRole"][0]["rules"]
    granted = {(group, resource) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {("", "namespaces"), ("", "pods"), ("", "services"), ("", "nodes"),
                       ("discovery.k8s.io", "endpointslices"),
                       ("security.istio.io", "authorizationpolicies"), ("security.istio.io", "peerauthentications"),
                       ("networking.istio.io", "destinationrules"), ("networking.istio.io", "workloadentries"),
                       ("gateway.networking.k8s.io", "tcproutes"),
                       ("split.smi-spec.io", "trafficsplits")}


def test_ca_init_creates_a_private_root_and_shows_the_same_one_again(tmp_path):
    first = run("ca", "init", str(tmp_path / "ca"))
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert run("ca", "init", str(tmp_path / "ca")).output == first.output
    (tmp_path / "ca" / "ca.crt").unlink()
    broken = run("ca", "init", str(tmp_path / "ca"))
    assert broken.exit_code == 1 and "ca.crt does not" in broken.output


def test_the_status_table_shows_a_registry_notice_only_when_there_is_one():
    from agent import views

    data = {"node": "node-1", "started": "2026-12-01T00:00:00+00:00", "uptime_s": 5.0, "event_loop": "uvloop",
            "registry": {"source": "kubernetes", "path": None, "generation": 3, "workloads": 2, "services": 1,
                         "registrations": 0, "connected": True, "synced_at": "now", "last_error": None,
                         "notice": "AuthorizationPolicy and PeerAuthentication not served"},
            "listeners": {"outbound": "0.0.0.0:15001"}, "datapath": None,
            "connections": {"live": 0, "recently_closed": 0, "failures": {}}}
    lines = {line.split("  ")[0]: line for line in views.status(data).splitlines()}
    assert lines["registry error"].endswith(" none")
    assert lines["registry notice"].endswith(" AuthorizationPolicy and PeerAuthentication not served")
    data["registry"]["notice"] = None
    assert "registry notice" not in views.status(data)
