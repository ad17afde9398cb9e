"""Reading Istio's security policies: the L4 subset of AuthorizationPolicy and PeerAuthentication
(security.istio.io/v1 and v1beta1) that Istio's ambient ztunnel enforces.

`read_authorization_policy` and `read_peer_authentication` turn one object into a frozen value
of registry.model or raise a RegistryError naming the object and the field. The shape follows
ztunnel's: a policy is an OR of rules; a rule is an AND of clauses (all `from` items, all `to`
items, each `when` condition); a clause is an OR of matches; a match ANDs its fields, each field
being "any of the listed values (or no list) and none of the `not` values". A match with no
field matches nothing.

What cannot be enforced at L4 is treated as Istio's ambient conversion treats it, with a warning
on the policy: a rule naming HTTP attributes (methods, paths, hosts, requestPrincipals,
remoteIpBlocks, other `when` keys) is dropped from an ALLOW policy (it never matches: more
restrictive than written) and kept without those attributes in a DENY policy (an item left
empty matches nothing). AUDIT and CUSTOM actions are refused; policies that name a `targetRef`
are for waypoints, not the ztunnel, and are skipped.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from registry.model import (
    ALLOW,
    DENY,
    PERMISSIVE,
    STRICT,
    UNSET,
    AuthorizationPolicy,
    Match,
    PeerAuthentication,
    Pattern,
    Rule,
)
from registry.objects import KubeObject, labels_field, list_field, mapping_field, show, string_field
from registry.objects import known_fields as _known_fields

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
MAX_SERVICE_ACCOUNTS = 16  # per source, as Istio's validation allows

# --- AuthorizationPolicy ---

_SPEC_FIELDS = ("selector", "action", "rules", "targetRef", "targetRefs", "provider")
_RULE_FIELDS = ("from", "to", "when")
# source field -> (Match field, kind of value); None: an HTTP attribute (L7)
_SOURCE_FIELDS: dict[str, tuple[str, str] | None] = {
    "principals": ("principals", "pattern"), "notPrincipals": ("not_principals", "pattern"),
    "namespaces": ("namespaces", "pattern"), "notNamespaces": ("not_namespaces", "pattern"),
    "serviceAccounts": ("service_accounts", "service_account"),
    "notServiceAccounts": ("not_service_accounts", "service_account"),
    "ipBlocks": ("source_ips", "network"), "notIpBlocks": ("not_source_ips", "network"),
    "requestPrincipals": None, "notRequestPrincipals": None, "remoteIpBlocks": None, "notRemoteIpBlocks": None,
}
_IGNORED_SOURCE_FIELDS = ("trustDomains", "notTrustDomains")  # not enforced by ztunnel either
_OPERATION_FIELDS: dict[str, tuple[str, str] | None] = {
    "ports": ("destination_ports", "port"), "notPorts": ("not_destination_ports", "port"),
    "hosts": None, "notHosts": None, "methods": None, "notMethods": None, "paths": None, "notPaths": None,
}
# when key -> (Match field for values, for notValues, kind of value)
_WHEN_KEYS = {
    "source.ip": ("source_ips", "not_source_ips", "network"),
    "source.namespace": ("namespaces", "not_namespaces", "pattern"),
    "source.principal": ("principals", "not_principals", "pattern"),
    "destination.ip": ("destination_ips", "not_destination_ips", "network"),
    "destination.port": ("destination_ports", "not_destination_ports", "port"),
}


def read_authorization_policy(obj: KubeObject) -> AuthorizationPolicy | None:
    """The policy in `obj`, or None for a waypoint policy (targetRef); RegistryError if invalid."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec")
    _known_fields(obj, spec, "spec", _SPEC_FIELDS)
    if spec.get("targetRef") is not None or spec.get("targetRefs") is not None:
        return None
    action = string_field(obj, spec.get("action"), "spec.action") or ALLOW
    if action not in (ALLOW, DENY):
        raise obj.fail("spec.action", f"{show(action)} is not supported: amesh enforces ALLOW and DENY at L4 "
                                      "(as Istio's ztunnel; AUDIT and CUSTOM need a waypoint)")
    selector = _selector(obj, spec.get("selector"), "spec.selector")
    rules, warnings, summary = [], [], []
    for i, raw_rule in enumerate(list_field(obj, spec.get("rules"), "spec.rules")):
        path = f"spec.rules[{i}]"
        reader = _RuleReader(obj, i, obj.namespace)
        rule = reader.read(mapping_field(obj, raw_rule, path))
        summary.append(reader.summary())
        warnings.extend(f"{field}: not enforced (ignored, as by Istio's ztunnel)" for field in reader.ignored)
        if reader.http_attributes:
            found = ", ".join(sorted(reader.http_attributes))
            if action == ALLOW:
                warnings.append(f"{path}: HTTP attributes ({found}) cannot be enforced at L4: in an ALLOW policy "
                                "this rule never matches (more restrictive than written; use a waypoint)")
                continue
            effect = ("enforced without them (more restrictive than written)" if _can_match(rule)
                      else "left with nothing to enforce at L4: it has no effect")
            warnings.append(f"{path}: HTTP attributes ({found}) cannot be enforced at L4: this DENY rule is {effect}")
        rules.append(rule)
    return AuthorizationPolicy(obj.namespace, obj.name, action, selector, tuple(rules), tuple(warnings),
                               tuple(summary))


def _can_match(rule: Rule) -> bool:
    """False when some clause has only empty matches, so the rule can never hold."""
    return all(not clause or any(not m.empty for m in clause) for clause in rule.clauses)


class _RuleReader:
    """Reads one rule into clauses, noting the HTTP attributes it names."""

    def __init__(self, obj: KubeObject, index: int, namespace: str) -> None:
        self.obj, self.index, self.namespace = obj, index, namespace
        self.path = f"spec.rules[{index}]"
        self.http_attributes: set[str] = set()
        self.ignored: list[str] = []  # paths of fields Istio accepts but ztunnel does not enforce
        self._parts: list[str] = []

    def read(self, raw: Mapping[str, Any]) -> Rule:
        obj, path = self.obj, self.path
        _known_fields(obj, raw, path, _RULE_FIELDS)
        clauses = []
        sources = list_field(obj, raw.get("from"), f"{path}.from")
        if sources:
            clauses.append(tuple(self._source(item, f"{path}.from[{j}]") for j, item in enumerate(sources)))
        operations = list_field(obj, raw.get("to"), f"{path}.to")
        if operations:
            clauses.append(tuple(self._operation(item, f"{path}.to[{j}]") for j, item in enumerate(operations)))
        for j, condition in enumerate(list_field(obj, raw.get("when"), f"{path}.when")):
            clauses.append((self._condition(condition, f"{path}.when[{j}]"),))
        return Rule(self.index, tuple(clauses))

    def summary(self) -> str:
        return "; ".join(self._parts) or "any connection"

    def _source(self, item: object, path: str) -> Match:
        source = mapping_field(self.obj, mapping_field(self.obj, item, path).get("source"), f"{path}.source")
        _known_fields(self.obj, source, f"{path}.source", (*_SOURCE_FIELDS, *_IGNORED_SOURCE_FIELDS))
        self.ignored += [f"{path}.source.{name}" for name in _IGNORED_SOURCE_FIELDS if source.get(name) is not None]
        if (source.get("serviceAccounts") or source.get("notServiceAccounts")) and any(
                source.get(name) for name in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
            raise self.obj.fail(f"{path}.source.serviceAccounts", "cannot be combined with principals or "
                                                                   "namespaces in one source (as in Istio)")
        return self._match(source, f"{path}.source", _SOURCE_FIELDS, "from")

    def _operation(self, item: object, path: str) -> Match:
        operation = mapping_field(self.obj, mapping_field(self.obj, item, path).get("operation"), f"{path}.operation")
        _known_fields(self.obj, operation, f"{path}.operation", tuple(_OPERATION_FIELDS))
        return self._match(operation, f"{path}.operation", _OPERATION_FIELDS, "to")

    def _match(self, raw: Mapping[str, Any], path: str, fields: Mapping[str, tuple[str, str] | None],
               part: str) -> Match:
        values: dict[str, tuple[Any, ...]] = {}
        for name, target in fields.items():
            if raw.get(name) is None:
                continue
            if target is None:
                self.http_attributes.add(name)
                continue
            match_field, kind = target
            values[match_field] = self._values(raw[name], f"{path}.{name}", kind)
            self._parts.append(f"{part} {name} {_short(values[match_field])}")
        return Match(**values)

    def _condition(self, raw: object, path: str) -> Match:
        condition = mapping_field(self.obj, raw, path)
        _known_fields(self.obj, condition, path, ("key", "values", "notValues"))
        key = string_field(self.obj, condition.get("key"), f"{path}.key", required=True)
        if condition.get("values") is None and condition.get("notValues") is None:
            raise self.obj.fail(path, "needs values or notValues")
        target = _WHEN_KEYS.get(key)
        if target is None:
            self.http_attributes.add(f"when {key}")
            return Match()
        positive, negative, kind = target
        values = {}
        for name, match_field in (("values", positive), ("notValues", negative)):
            if condition.get(name) is not None:
                values[match_field] = self._values(condition[name], f"{path}.{name}", kind)
                self._parts.append(f"when {key} {'not in' if name == 'notValues' else 'in'} "
                                   f"{_short(values[match_field])}")
        return Match(**values)

    def _values(self, raw: object, path: str, kind: str) -> tuple[Any, ...]:
        items = list_field(self.obj, raw, path)
        if not items:
            raise self.obj.fail(path, "must list at least one value (omit the field instead)")
        if kind == "service_account" and len(items) > MAX_SERVICE_ACCOUNTS:
            raise self.obj.fail(path, f"at most {MAX_SERVICE_ACCOUNTS} service accounts, got {len(items)}")
        return tuple(self._value(item, f"{path}[{i}]", kind) for i, item in enumerate(items))

    def _value(self, raw: object, path: str, kind: str) -> Any:
        if kind == "port":
            text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
            if not isinstance(text, str) or not text.isdigit() or not 1 <= int(text) <= 65535:
                raise self.obj.fail(path, f"must be a port 1-65535, got {show(raw)}")
            return int(text)
        text = string_field(self.obj, raw, path, required=True)
        if kind == "network":
            try:
                return ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise self.obj.fail(path, f"must be an IP address or CIDR block, got {show(raw)}") from None
        if kind == "service_account":
            namespace, _, name = text.rpartition("/")
            if "*" in text or not name or "/" in namespace:
                raise self.obj.fail(path, f'must be "namespace/name" or "name" (no wildcards), got {show(raw)}')
            return (namespace or self.namespace, name)
        if "*" in text[1:-1] or text.count("*") > 1 and text != "*":
            raise self.obj.fail(path, f'"*" may only stand alone, begin or end a value, got {show(raw)}')
        if kind == "pattern" and text.startswith("spiffe://"):
            raise self.obj.fail(path, f"principals are written without spiffe:// (e.g. cluster.local/ns/shop/"
                                      f"sa/web), got {show(raw)}")
        return Pattern(text)


def _short(values: tuple[Any, ...]) -> str:
    shown = [f"{v[0]}/{v[1]}" if isinstance(v, tuple) else str(v) for v in values[:3]]
    more = f" +{len(values) - 3}" if len(values) > 3 else ""
    return "[" + ", ".join(shown) + more + "]"


def _selector(obj: KubeObject, raw: object, path: str) -> Mapping[str, str] | None:
    selector = mapping_field(obj, raw, path)
    _known_fields(obj, selector, path, ("matchLabels",))
    labels = labels_field(obj, selector.get("matchLabels"), f"{path}.matchLabels")
    return labels or None  # no labels select every workload, as no selector does


# --- PeerAuthentication ---

_MODES = (STRICT, PERMISSIVE, UNSET, "DISABLE")


def read_peer_authentication(obj: KubeObject) -> PeerAuthentication:
    """The PeerAuthentication in `obj`; RegistryError if invalid."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec")
    _known_fields(obj, spec, "spec", ("selector", "mtls", "portLevelMtls"))
    selector = _selector(obj, spec.get("selector"), "spec.selector")
    warnings: list[str] = []
    mode = _mode(obj, spec.get("mtls"), "spec.mtls", warnings)
    port_modes = {}
    levels = mapping_field(obj, spec.get("portLevelMtls"), "spec.portLevelMtls")
    if levels and selector is None:
        raise obj.fail("spec.portLevelMtls", "needs spec.selector (as in Istio: port-level modes are per workload)")
    for port, raw in levels.items():
        path = f"spec.portLevelMtls[{port}]"
        text = str(port)
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise obj.fail(path, f"the key must be a port 1-65535, got {show(port)}")
        port_modes[int(text)] = _mode(obj, raw, path, warnings)
    created = string_field(obj, obj.metadata.get("creationTimestamp"), "metadata.creationTimestamp")
    return PeerAuthentication(obj.namespace, obj.name, selector, mode, port_modes, created, tuple(warnings))


def _mode(obj: KubeObject, raw: object, path: str, warnings: list[str]) -> str:
    mtls = mapping_field(obj, raw, path)
    _known_fields(obj, mtls, path, ("mode",))
    mode = string_field(obj, mtls.get("mode"), f"{path}.mode") or UNSET
    if mode not in _MODES:
        raise obj.fail(f"{path}.mode", f"must be one of {', '.join(_MODES)}, got {show(mode)}")
    if mode == "DISABLE":
        warnings.append(f"{path}.mode: DISABLE is read as PERMISSIVE (ambient mode cannot turn mTLS off)")
        return PERMISSIVE
    return mode
