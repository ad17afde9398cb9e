"""Reading the objects users already write about how connections to a Service are shaped, into
its `TrafficPolicy` (registry/model.py):

- Istio's networking.istio.io DestinationRule (v1, v1beta1, v1alpha3): connection limit and
  connect timeout, outlier detection, load balancer;
- a Gateway API TCPRoute (gateway.networking.k8s.io/v1alpha2) whose parentRef is a Service (the
  GAMMA pattern) and an SMI TrafficSplit (split.smi-spec.io v1alpha1-v1alpha4): a weighted split.

Each reader turns one object into a frozen value or raises a RegistryError naming the object and
the field's path. `shape_services` then gives each Service the settings of the rules that select
it. What amesh reads but cannot carry out at L4 is a warning on the Service's policy, shown by
`ameshctl services`; a field no version of the kind has is an error, as the kind's CRD schema
would refuse it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, Container, Iterable, Mapping

from registry.model import Backend, LoadBalancer, OutlierSettings, Service, TrafficPolicy
from registry.objects import KubeObject, known_fields, list_field, mapping_field, show, string_field

DESTINATION_RULE_API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                                 "networking.istio.io/v1alpha3")
TCP_ROUTE_API_VERSIONS = ("gateway.networking.k8s.io/v1alpha2",)
TRAFFIC_SPLIT_API_VERSIONS = ("split.smi-spec.io/v1alpha4", "split.smi-spec.io/v1alpha3",
                              "split.smi-spec.io/v1alpha2", "split.smi-spec.io/v1alpha1")
CLUSTER_DOMAIN = "cluster.local"  # the DNS suffix of Services in a host's FQDN
MAX_WEIGHT = 1_000_000  # Gateway API's bound on a backendRef weight
# Istio's names for the balancers; LEAST_CONN is LEAST_REQUEST's old name (P2C on live
# connections either way at L4); UNSPECIFIED is the default
_BALANCERS: dict[str, LoadBalancer | None] = {
    "ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
    "RANDOM": "RANDOM", "UNSPECIFIED": None,
}


# --- durations, as Istio writes them ("10s", "1.5s", "500ms", "1m", "1h30m") ---

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MIN_DURATION = 0.001  # seconds: Istio refuses durations under 1ms


def duration_field(obj: KubeObject, value: object, path: str) -> float | None:
    """A duration ("10s", "500ms", "1m30s") in seconds, at least 1ms; None when absent."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise obj.fail(path, f'must be a duration like "10s", "500ms" or "1m", got {show(value)}')
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds < MIN_DURATION:
        raise obj.fail(path, f"must be at least 1ms, got {show(value)}")
    return seconds


def count_field(obj: KubeObject, value: object, path: str, *, least: int, most: int | None = None) -> int | None:
    """An integer from `least` to `most` (no bound: None); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        if most is not None:
            wanted = f"an integer {least}-{most}"
        else:
            wanted = "a positive integer" if least == 1 else f"at least {least}"
        raise obj.fail(path, f"must be {wanted}, got {show(value)}")
    return value


# --- which Service a host names ---


def host_fqdn(host: str, namespace: str) -> str:
    """The FQDN a DestinationRule's host stands for: a short name is in the rule's namespace."""
    labels = host.split(".")
    if len(labels) == 1:
        return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"
    if len(labels) == 2:
        return f"{host}.svc.{CLUSTER_DOMAIN}"
    if len(labels) == 3 and labels[2] == "svc":
        return f"{host}.{CLUSTER_DOMAIN}"
    return host


def service_fqdn(service: Service) -> str:
    return f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}"


# --- DestinationRule ---

_DR_SPEC_FIELDS = ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector")
_PORT_LEVEL_FIELDS = ("connectionPool", "outlierDetection", "loadBalancer", "tls")
_POLICY_FIELDS = (*_PORT_LEVEL_FIELDS, "portLevelSettings", "tunnel", "proxyProtocol")
_TCP_FIELDS = ("maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout")
_OUTLIER_FIELDS = ("consecutiveGatewayErrors", "consecutive5xxErrors", "consecutiveErrors", "interval",
                   "baseEjectionTime", "maxEjectionPercent", "minHealthPercent", "splitExternalLocalOriginErrors",
                   "consecutiveLocalOriginFailures")
_BALANCER_FIELDS = ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup")
DEFAULT_CONSECUTIVE_5XX = 5  # Envoy's consecutive_5xx when outlierDetection leaves it unset


@dataclass(frozen=True)
class TrafficSettings:
    """One trafficPolicy; None: it leaves that setting at the default."""

    max_connections: int | None
    connect_timeout: float | None  # seconds
    outlier: OutlierSettings | None
    load_balancer: LoadBalancer | None


@dataclass(frozen=True)
class DestinationRule:
    """What one DestinationRule says about its host's connections; None: the rule leaves it."""

    namespace: str
    name: str
    host: str  # FQDN, or a wildcard one ("*.shop.svc.cluster.local")
    created: str  # metadata.creationTimestamp: of rules for one host, the oldest wins
    policy: TrafficSettings | None  # None: no trafficPolicy (a rule of only subsets leaves it to others)
    warnings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"DestinationRule {self.namespace}/{self.name}"


def read_destination_rule(obj: KubeObject) -> DestinationRule:
    """The DestinationRule in `obj`; RegistryError naming the field if it is malformed."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec", required=True)
    known_fields(obj, spec, "spec", _DR_SPEC_FIELDS)
    host = string_field(obj, spec.get("host"), "spec.host", required=True)
    if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
        problem = f'a wildcard may only be the first label ("*.shop.svc.cluster.local"), got {show(host)}'
        raise obj.fail("spec.host", problem)
    warnings = [f"{obj.label}: spec.{name}: not applied at L4" for name in ("subsets", "workloadSelector")
                if spec.get(name) is not None]
    list_field(obj, spec.get("exportTo"), "spec.exportTo")  # every client of the node shares one view
    created = string_field(obj, obj.metadata.get("creationTimestamp"), "metadata.creationTimestamp")
    fqdn = host if host.startswith("*") else host_fqdn(host, obj.namespace)
    if spec.get("trafficPolicy") is None:
        return DestinationRule(obj.namespace, obj.name, fqdn, created, None, tuple(warnings))
    path = "spec.trafficPolicy"
    raw_policy = mapping_field(obj, spec["trafficPolicy"], path)
    policy = _PolicyReader(obj, warnings).read(raw_policy, path, _POLICY_FIELDS)
    for i, raw in enumerate(list_field(obj, raw_policy.get("portLevelSettings"), f"{path}.portLevelSettings")):
        level_path = f"{path}.portLevelSettings[{i}]"
        level = mapping_field(obj, raw, level_path, required=True)
        # checked as strictly as the top level, so a mistake there is found now, not when used
        _PolicyReader(obj, []).read({k: v for k, v in level.items() if k != "port"}, level_path, _PORT_LEVEL_FIELDS)
        warnings.append(f"{obj.label}: {level_path}: not applied (amesh shapes a Service as a whole: the top-level "
                        "trafficPolicy applies to every port)")
    return DestinationRule(obj.namespace, obj.name, fqdn, created, policy, tuple(warnings))


class _PolicyReader:
    """Reads one trafficPolicy (or one portLevelSettings entry), noting what L4 cannot apply."""

    def __init__(self, obj: KubeObject, warnings: list[str]) -> None:
        self.obj, self.warnings = obj, warnings

    def _ignored(self, raw: Mapping[str, Any], path: str, names: tuple[str, ...], why: str) -> None:
        self.warnings += [f"{self.obj.label}: {path}.{name}: {why}" for name in names if raw.get(name) is not None]

    def read(self, policy: Mapping[str, Any], path: str, fields: tuple[str, ...]) -> TrafficSettings:
        obj = self.obj
        known_fields(obj, policy, path, fields)
        self._ignored(policy, path, ("tls", "tunnel", "proxyProtocol"),
                      "not applied (amesh carries every connection in mutual TLS over HBONE)")
        pool = mapping_field(obj, policy.get("connectionPool"), f"{path}.connectionPool")
        known_fields(obj, pool, f"{path}.connectionPool", ("tcp", "http"))
        self._ignored(pool, f"{path}.connectionPool", ("http",), "not applied at L4")
        tcp_path = f"{path}.connectionPool.tcp"
        tcp = mapping_field(obj, pool.get("tcp"), tcp_path)
        known_fields(obj, tcp, tcp_path, _TCP_FIELDS)
        self._ignored(tcp, tcp_path, ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"), "not applied yet")
        return TrafficSettings(
            max_connections=count_field(obj, tcp.get("maxConnections"), f"{tcp_path}.maxConnections", least=1),
            connect_timeout=duration_field(obj, tcp.get("connectTimeout"), f"{tcp_path}.connectTimeout"),
            outlier=self._outlier(policy.get("outlierDetection"), f"{path}.outlierDetection"),
            load_balancer=self._balancer(policy.get("loadBalancer"), f"{path}.loadBalancer"),
        )

    def _outlier(self, raw: object, path: str) -> OutlierSettings | None:
        obj = self.obj
        if raw is None:
            return None
        detection = mapping_field(obj, raw, path)
        known_fields(obj, detection, path, _OUTLIER_FIELDS)
        self._ignored(detection, path, ("minHealthPercent", "splitExternalLocalOriginErrors",
                                        "consecutiveLocalOriginFailures"), "not applied")
        if detection.get("consecutiveErrors") is not None:
            raise obj.fail(f"{path}.consecutiveErrors", "removed from Istio's API: write consecutiveGatewayErrors "
                                                        "or consecutive5xxErrors")
        gateway = count_field(obj, detection.get("consecutiveGatewayErrors"), f"{path}.consecutiveGatewayErrors",
                              least=0)
        errors_5xx = count_field(obj, detection.get("consecutive5xxErrors"), f"{path}.consecutive5xxErrors", least=0)
        # At L4 a failed connect is both a gateway error and a 5xx error to Envoy, whose two detectors
        # run side by side: the lower threshold ejects first. 0 turns one off; both off: 0, no ejection.
        thresholds = [n for n in (gateway, DEFAULT_CONSECUTIVE_5XX if errors_5xx is None else errors_5xx) if n]
        duration_field(obj, detection.get("interval"), f"{path}.interval")  # event-driven: nothing to sweep
        base = duration_field(obj, detection.get("baseEjectionTime"), f"{path}.baseEjectionTime")
        percent = count_field(obj, detection.get("maxEjectionPercent"), f"{path}.maxEjectionPercent", least=0,
                              most=100)
        defaults = OutlierSettings()
        base = defaults.base_ejection_time if base is None else base
        return OutlierSettings(
            consecutive_failures=min(thresholds, default=0),
            base_ejection_time=base,
            max_ejection_time=max(defaults.max_ejection_time, base),  # Envoy: the cap is never below the base
            max_ejection_percent=defaults.max_ejection_percent if percent is None else percent,
        )

    def _balancer(self, raw: object, path: str) -> LoadBalancer | None:
        obj = self.obj
        balancer = mapping_field(obj, raw, path)
        known_fields(obj, balancer, path, _BALANCER_FIELDS)
        self._ignored(balancer, path, ("consistentHash",), "not applied (no hash key at L4 yet)")
        self._ignored(balancer, path, ("localityLbSetting",),
                      "not applied: say spec.trafficDistribution: PreferClose on the Service")
        self._ignored(balancer, path, ("warmupDurationSecs", "warmup"), "not applied")
        simple = string_field(obj, balancer.get("simple"), f"{path}.simple")
        if not simple:
            return None
        if simple == "PASSTHROUGH":
            raise obj.fail(f"{path}.simple", "PASSTHROUGH is not supported: amesh connects to the Service's "
                                             "endpoints, never to the address the client dialled")
        if simple not in _BALANCERS:
            raise obj.fail(f"{path}.simple", f"must be one of {', '.join(_BALANCERS)}, got {show(simple)}")
        return _BALANCERS[simple]


# --- weighted splits: TCPRoute (GAMMA) and TrafficSplit (SMI) ---


@dataclass(frozen=True)
class Split:
    """A weighted split of one Service's connections, as one TCPRoute or TrafficSplit says it."""

    label: str  # "TCPRoute shop/reviews-canary"
    service: str  # "namespace/name" of the Service split
    created: str  # metadata.creationTimestamp: of splits for one Service, the oldest wins
    backends: tuple[Backend, ...]
    warnings: tuple[str, ...] = ()


_ROUTE_SPEC_FIELDS = ("parentRefs", "rules", "hostnames")
_PARENT_FIELDS = ("group", "kind", "name", "namespace", "port", "sectionName")
_BACKEND_FIELDS = ("group", "kind", "name", "namespace", "port", "weight")


def read_tcp_route(obj: KubeObject) -> list[Split]:
    """The splits a TCPRoute makes of the Services it names as parents (none when its parents are
    Gateways: a route for a gateway is not the mesh's); RegistryError naming the field."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec", required=True)
    known_fields(obj, spec, "spec", _ROUTE_SPEC_FIELDS)
    parents = []
    warnings: list[str] = []
    for i, raw in enumerate(list_field(obj, spec.get("parentRefs"), "spec.parentRefs")):
        path = f"spec.parentRefs[{i}]"
        parent = mapping_field(obj, raw, path, required=True)
        known_fields(obj, parent, path, _PARENT_FIELDS)
        if not _is_service(obj, parent, path, default_group="gateway.networking.k8s.io", default_kind="Gateway"):
            continue
        name = string_field(obj, parent.get("name"), f"{path}.name", required=True)
        namespace = string_field(obj, parent.get("namespace"), f"{path}.namespace") or obj.namespace
        if namespace != obj.namespace:
            # GAMMA: a route in another namespace than its Service's is its consumers' (only for
            # clients in the route's namespace); amesh shapes a Service alike for every client
            warnings.append(f"{obj.label}: {path}: a consumer route (for clients in {obj.namespace} only) is not "
                            "applied: amesh applies producer routes, in the Service's own namespace")
            continue
        parents.append(f"{namespace}/{name}")
    rules = list_field(obj, spec.get("rules"), "spec.rules")
    if not rules:
        raise obj.fail("spec.rules", "required: at least one rule with backendRefs")
    # A TCP connection carries nothing to choose a rule by: as in Istio, the first rule takes them all
    warnings += [f"{obj.label}: spec.rules[{i}]: never used (a TCP connection has nothing to match; the first rule "
                 "takes every connection)" for i in range(1, len(rules))]
    backends = []
    for i, raw in enumerate(rules):
        path = f"spec.rules[{i}]"
        rule = mapping_field(obj, raw, path, required=True)
        known_fields(obj, rule, path, ("backendRefs", "name"))
        refs = list_field(obj, rule.get("backendRefs"), f"{path}.backendRefs")
        if not refs:
            raise obj.fail(f"{path}.backendRefs", "required: at least one backend")
        read = [_backend_ref(obj, ref, f"{path}.backendRefs[{j}]") for j, ref in enumerate(refs)]
        if i == 0:
            backends = read
    created = string_field(obj, obj.metadata.get("creationTimestamp"), "metadata.creationTimestamp")
    return [Split(obj.label, parent, created, tuple(backends), tuple(warnings)) for parent in parents]


def _is_service(obj: KubeObject, ref: Mapping[str, Any], path: str, *, default_group: str, default_kind: str) -> bool:
    group = string_field(obj, ref.get("group"), f"{path}.group") if "group" in ref else default_group
    kind = string_field(obj, ref.get("kind"), f"{path}.kind") or default_kind
    return group in ("", "core") and kind == "Service"


def _backend_ref(obj: KubeObject, raw: object, path: str) -> Backend:
    ref = mapping_field(obj, raw, path, required=True)
    known_fields(obj, ref, path, _BACKEND_FIELDS)
    if not _is_service(obj, ref, path, default_group="", default_kind="Service"):
        raise obj.fail(path, f"must name a Service (group \"\", kind Service), got group {show(ref.get('group'))} "
                             f"kind {show(ref.get('kind'))}")
    name = string_field(obj, ref.get("name"), f"{path}.name", required=True)
    namespace = string_field(obj, ref.get("namespace"), f"{path}.namespace") or obj.namespace
    if namespace != obj.namespace:
        raise obj.fail(f"{path}.namespace", f"a backend in another namespace ({namespace}) needs a ReferenceGrant, "
                                            "which amesh does not read: put the route beside its backends")
    if ref.get("port") is None:
        raise obj.fail(f"{path}.port", "required for a Service backend")
    port = count_field(obj, ref.get("port"), f"{path}.port", least=1, most=65535)
    weight = count_field(obj, ref.get("weight"), f"{path}.weight", least=0, most=MAX_WEIGHT)
    return Backend(f"{namespace}/{name}", 1 if weight is None else weight, port)


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def read_traffic_split(obj: KubeObject) -> Split:
    """The split an SMI TrafficSplit makes of its root Service; RegistryError naming the field."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec", required=True)
    known_fields(obj, spec, "spec", ("service", "backends", "matches"))
    if spec.get("matches") is not None:
        raise obj.fail("spec.matches", "HTTP matches cannot be applied at L4: a split with matches would take "
                                       "every connection, not only the matched requests")
    service = _smi_service(obj, spec.get("service"), "spec.service")
    quantities = obj.raw["apiVersion"].endswith("/v1alpha1")  # v1alpha1 weights are quantities ("500m")
    backends = []
    entries = list_field(obj, spec.get("backends"), "spec.backends")
    if not entries:
        raise obj.fail("spec.backends", "required: at least one backend")
    for i, raw in enumerate(entries):
        path = f"spec.backends[{i}]"
        entry = mapping_field(obj, raw, path, required=True)
        known_fields(obj, entry, path, ("service", "weight"))
        name = _smi_service(obj, entry.get("service"), f"{path}.service")
        weight = (_quantity_weight(obj, entry.get("weight"), f"{path}.weight") if quantities
                  else count_field(obj, entry.get("weight"), f"{path}.weight", least=0, most=MAX_WEIGHT))
        if weight is None:
            raise obj.fail(f"{path}.weight", "required")
        backends.append(Backend(f"{obj.namespace}/{name}", weight))
    created = string_field(obj, obj.metadata.get("creationTimestamp"), "metadata.creationTimestamp")
    return Split(obj.label, f"{obj.namespace}/{service}", created, tuple(backends))


def _smi_service(obj: KubeObject, value: object, path: str) -> str:
    """A Service in the TrafficSplit's namespace, by name (or its FQDN, as SMI allows)."""
    text = string_field(obj, value, path, required=True)
    name, _, rest = text.partition(".")
    if rest and host_fqdn(text, obj.namespace) != f"{name}.{obj.namespace}.svc.{CLUSTER_DOMAIN}":
        raise obj.fail(path, f"must be a Service in the TrafficSplit's namespace {obj.namespace}, got {show(text)}")
    return name


def _quantity_weight(obj: KubeObject, value: object, path: str) -> int | None:
    """A v1alpha1 weight ("500m", "1", 100) in thousandths, so every backend's is comparable."""
    if value is None:
        return None
    match = _QUANTITY.match(str(value)) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if match is None:
        raise obj.fail(path, f'must be a quantity like "500m" or "1", got {show(value)}')
    return round(float(match[1]) * (1 if match[2] else 1000))


# --- giving each Service its settings ---


def shape_services(services: Iterable[Service], rules: Iterable[DestinationRule],
                   splits: Iterable[Split]) -> tuple[Service, ...]:
    """Each Service with the settings of the DestinationRule and the split that select it.

    DestinationRules as Istio merges those of one host: an exact host before a wildcard, then
    the oldest first; the first with a trafficPolicy gives the whole of it, a later one's
    trafficPolicy is shadowed (a warning). Splits: the oldest TCPRoute or TrafficSplit wins; a
    backend naming no Service of the registry is a warning."""
    services = tuple(services)
    known = {s.key for s in services}
    ordered_rules = sorted(rules, key=rule_order)
    splits_by_service: dict[str, list[Split]] = {}
    for split in sorted(splits, key=split_order):
        splits_by_service.setdefault(split.service, []).append(split)
    return tuple(shaped(s, [r for r in ordered_rules if selects(r.host, s)], splits_by_service.get(s.key, []),
                         known) for s in services)


def rule_order(rule: DestinationRule) -> tuple[bool, str, str, str]:
    """The order Istio merges the DestinationRules of one host in: exact hosts first, then the oldest."""
    return (rule.host.startswith("*"), rule.created, rule.namespace, rule.name)


def split_order(split: Split) -> tuple[str, str]:
    """The order the splits of one Service are tried in: the oldest wins."""
    return (split.created, split.label)


def selects(host: str, service: Service) -> bool:
    """Whether a DestinationRule's host (an FQDN or a wildcard one) names `service`."""
    return fnmatch.fnmatchcase(service_fqdn(service), host) if host.startswith("*") else host == service_fqdn(service)


def shaped(service: Service, rules: list[DestinationRule], splits: list[Split], known: Container[str]) -> Service:
    """`service` with the settings of the rules selecting it (in rule_order) and of its splits (in
    split_order); `known` holds the key of every Service of the registry."""
    traffic = service.traffic
    configured = list(traffic.configured_by)
    warnings = list(traffic.warnings)
    winner = next((r for r in rules if r.policy), None)
    for rule in rules:
        warnings += rule.warnings
        if rule.policy and winner is not None and rule is not winner:
            warnings.append(f"{rule.label}: spec.trafficPolicy: shadowed by the older {winner.label} for this "
                            "host (as Istio merges rules: the first rule's trafficPolicy wins)")
    if winner is not None and winner.policy is not None:
        configured.append(winner.label)
        policy, defaults = winner.policy, TrafficPolicy()
        traffic = replace(traffic, max_connections=policy.max_connections, connect_timeout=policy.connect_timeout,
                          outlier=policy.outlier or defaults.outlier,
                          load_balancer=policy.load_balancer or defaults.load_balancer)
    if splits:
        first = splits[0]
        configured.append(first.label)
        warnings += first.warnings
        warnings += [f"{s.label}: not applied: the older {first.label} splits {service.key}" for s in splits[1:]]
        warnings += [f"{first.label}: backend {b.service} is no Service of the registry" for b in first.backends
                     if b.service not in known]
        traffic = replace(traffic, split=first.backends)
    return replace(service, traffic=replace(traffic, configured_by=tuple(configured), warnings=tuple(warnings)))
