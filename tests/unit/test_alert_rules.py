"""The Prometheus rules and the Grafana dashboard in daemonset/ against promtool and against the
metrics the agent exports on :15020/metrics.

- `promtool check rules` and `promtool test rules` on the alerting/recording rules.
- Every PromQL expression of the dashboard (panel targets and variable queries) is put into a
  temporary recording rule file that `promtool check rules` must accept.
- Every metric name used by the dashboard and the rules is one the agent exports (EXPORTED), so
  neither can drift from the agent; the rules may also use `up` and their own recorded series.

promtool comes from Debian's `prometheus` package (`make test` installs it); without it the
promtool tests are skipped with that reason, the pure-Python checks still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "daemonset" / "prometheus-alerts.yaml"
RULES_TEST = ROOT / "daemonset" / "prometheus-alerts-test.yaml"
DASHBOARD = ROOT / "daemonset" / "grafana-dashboard.json"

ISTIO_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_service_name", "destination_service_namespace", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
}
# What the agent exports (name: its own labels). Every series also has job, instance and node.
EXPORTED: dict[str, set[str]] = {
    "istio_tcp_connections_opened_total": ISTIO_LABELS,
    "istio_tcp_connections_closed_total": ISTIO_LABELS,
    "istio_tcp_sent_bytes_total": ISTIO_LABELS,
    "istio_tcp_received_bytes_total": ISTIO_LABELS,
    "amesh_connection_failures_total": {"reason"},
    "amesh_connect_duration_seconds": {"security"},  # histogram
    "amesh_connections_live": {"direction"},
    "amesh_registry_workloads": set(),
    "amesh_registry_services": set(),
    "amesh_registry_last_sync_age_seconds": set(),
    "amesh_registry_errors_total": set(),
    "amesh_bpf_attached_interfaces": set(),
    "amesh_worker_restarts_total": set(),
    "amesh_certificate_expiry_timestamp_seconds": {"identity"},
    "amesh_upstream_connect_attempts_total": {"result"},
    "amesh_endpoint_ejections_total": {"service"},
    "amesh_endpoint_ejected": {"service"},
    "amesh_hbone_mitigations_total": {"kind", "side"},
    "amesh_hbone_unverified_sources_total": set(),
    "amesh_log_lines_suppressed_total": {"reason"},
    "amesh_split_connections_total": {"service", "backend"},
    "amesh_service_connections_live": {"service"},
    "amesh_ca_requests_total": {"result"},
    "amesh_hbone_dead_peers_total": set(),
    "amesh_ready": set(),
    "process_cpu_seconds_total": set(),
    "process_resident_memory_bytes": set(),
    "process_open_fds": set(),
}
HISTOGRAMS = {"amesh_connect_duration_seconds"}
EXPORTED_SERIES = set(EXPORTED) | {
    f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
SCRAPE_SERIES = {"up"}  # written by Prometheus for every target, used by the rules only

GRAFANA_RANGES = ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}",
                  "$__range", "${__range}")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                   "or", "unless", "offset", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers that are not functions, aggregations,
    keywords, label names or inside strings, label matchers or ranges)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group()
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or unit of a number: 1e3, 5m
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    if "__name__" in expr:
        names.add("__name__")  # selecting by __name__ would hide a name from this check
    return names


def grafana_to_promql(expr: str) -> str:
    """Grafana's interpolation for a check: ranges become 5m, variables (in matchers) `.*`."""
    for macro in GRAFANA_RANGES:
        expr = expr.replace(macro, "5m")
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_exprs(dashboard: dict) -> dict[str, str]:
    """record name -> expression, for every panel target and every label_values() variable."""
    exprs = {}
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            exprs[f"dashboard:panel{panel['id']}_{target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query, re.S)
        assert m, f"variable {var['name']}: only label_values(expr, label) is used: {query!r}"
        exprs[f"dashboard:var_{var['name']}"] = m.group(1)
    return exprs


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package (`make test` does)")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# --- the rules -----------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(RULES_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_have_for_severity_and_templated_annotations() -> None:
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "AmeshConnectionFailureRatioHigh", "AmeshCertificateExpiringSoon", "AmeshRegistryStale",
        "AmeshAgentNotReady",
    }
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("for"), name
        assert alert.get("labels", {}).get("severity") in {"info", "warning", "critical"}, name
        for key in ("summary", "description"):
            assert "{{ $labels.instance }}" in alert["annotations"][key], (name, key)


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing, quiet = set(), set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts <= firing, f"alerts never tested firing: {sorted(alerts - firing)}"
    # Each group also holds agents whose alert must stay quiet; the ones checked at a time
    # before `for` elapsed (or with nothing firing) are listed here.
    assert alerts - {"AmeshAgentNotReady"} <= quiet, sorted(alerts - quiet)


def test_rules_use_only_exported_metrics() -> None:
    rules = load_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        used = metric_names(rule["expr"])
        unknown = used - EXPORTED_SERIES - SCRAPE_SERIES - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


# --- the dashboard -------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"node", "instance", "namespace"} <= set(variables)
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] and panel["title"] and panel["gridPos"], panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]


def test_dashboard_exprs_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs(load_dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": name, "expr": grafana_to_promql(expr)} for name, expr in exprs.items()
    ]}]}
    rule_file = tmp_path / "dashboard-exprs.yaml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr + rule_file.read_text()
    assert f"{len(exprs)} rules found" in result.stdout, result.stdout


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = dashboard_exprs(load_dashboard())
    used = set()
    for name, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{name} selects no metric: {expr}"
        unknown = names - EXPORTED_SERIES
        assert not unknown, f"{name}: {sorted(unknown)} not exported by the agent: {expr}"
        used |= names
    # the dashboard shows every metric the agent exports
    missing = set(EXPORTED) - HISTOGRAMS - used
    missing |= {h for h in HISTOGRAMS if f"{h}_bucket" not in used}
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"


def test_dashboard_filters_by_job_node_and_instance() -> None:
    for name, expr in dashboard_exprs(load_dashboard()).items():
        if name.startswith("dashboard:var_"):
            continue
        for selector in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr):
            for matcher in ('job="amesh"', 'node=~"$node"', 'instance=~"$instance"'):
                assert matcher in selector, f"{name}: {matcher} missing in {{{selector}}}"


def test_metric_names_extractor() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, security) (rate(a_bucket{job="x", le=~"1e3|foo"}[5m])))'
            ' / ignoring (reason) group_left sum without (reason) (b_total offset 5m) > bool 1e3'
            ' or on (instance) c:recorded and d unless max(e) by (node) - time()')
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded", "d", "e"}
    assert metric_names('{__name__="sneaky"}') == {"__name__"}
    assert grafana_to_promql('rate(x{node=~"$node", i=~"${instance}"}[$__rate_interval])') == \
        'rate(x{node=~".*", i=~".*"}[5m])'
