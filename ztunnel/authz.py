"""Who may talk to whom: the one admission decision every entry point asks. Pure: no sockets,
no clock, no registry I/O.

Every connection that reaches an enrolled workload of this node is described once as a
`Connection` (inbound HBONE, inbound plaintext and the same-node path alike) and `admit()` answers
with a `Decision`, as Istio's ambient ztunnel decides (src/state.rs `assert_rbac`):

  1. plaintext, where the workload's PeerAuthentication (or namespace label, or the agent's
     default) says STRICT: denied
  2. a DENY policy that applies and matches: denied ("explicitly denied by ns/name")
  3. no ALLOW policy applies: allowed
  4. an ALLOW policy that applies matches: allowed
  5. otherwise denied ("no ALLOW policy matched")

A policy applies to a workload when it lives in the root namespace without a selector (mesh),
in the workload's namespace without a selector (namespace), or in either with a selector whose
labels the workload carries. Which policies apply to a workload is worked out once per registry
state and workload, not per connection.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Literal, Mapping

from registry.model import (
    ALLOW,
    DENY,
    MTLS_MODES,
    PERMISSIVE,
    STRICT,
    UNSET,
    AuthorizationPolicy,
    Match,
    PeerAuthentication,
    RegistryState,
    Rule,
    Workload,
)
from ztunnel.errors import ProxyError
from ztunnel.identity import Identity, workload_identity

DEFAULT_ROOT_NAMESPACE = "amesh-system"
Arrival = Literal["hbone", "plaintext", "same-node"]


@dataclass(frozen=True)
class Connection:
    """One connection as policy sees it. `source_identity` is what the peer proved (mTLS, or
    the local pod's own identity on the same node), never what it merely claimed; None for
    plaintext. `source_ip` is the client pod's address, None when an HBONE peer's claim of it
    could not be verified: then no source IP condition holds (ipBlocks nor notIpBlocks), so an
    ALLOW that names addresses does not admit it and a DENY that names them does not fire."""

    source_ip: str | None
    source_identity: Identity | None
    destination: Workload
    destination_port: int  # the workload's (target) port
    arrival: Arrival
    source_workload: str | None = None  # "namespace/name", for explanations only

    @cached_property
    def source_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return ipaddress.ip_address(self.source_ip) if self.source_ip else None

    @cached_property
    def destination_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.destination.ip)

    @cached_property
    def principal(self) -> str:
        """The principal as Istio writes it ("cluster.local/ns/shop/sa/web"); "" without identity."""
        identity = self.source_identity
        return "" if identity is None else f"{identity.trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"


@dataclass(frozen=True)
class Decision:
    """Allowed or not, why, and which policy (ns/name) and rule (index in spec.rules) decided;
    for a denial by no ALLOW matching, `tried` says why each applicable ALLOW policy did not."""

    allowed: bool
    reason: str
    policy: str | None = None
    rule: int | None = None
    tried: tuple[str, ...] = ()
    code: str = ""  # the failure reason of a denial: strict_mtls or policy_denied


class Denied(ProxyError):
    """A connection the policies do not admit; `decision` says which policy and rule."""

    def __init__(self, connection: Connection, decision: Decision) -> None:
        source = connection.source_workload or connection.source_ip or "an unverified source"
        identity = f" ({connection.source_identity.uri})" if connection.source_identity else ""
        super().__init__(decision.code, f"connection from {source}{identity} to {connection.destination.key} port "
                                        f"{connection.destination_port} denied: {decision.reason}")
        self.decision = decision


class Authorizer:
    """Admits connections by the policies of the registry state it is given.

    State kept: which policies apply to each workload, for the latest registry state only
    (policies and labels change only with the state, so the memo is dropped with it).
    """

    def __init__(self, default_mtls_mode: str = PERMISSIVE, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.default_mtls_mode = default_mtls_mode
        self.root_namespace = root_namespace
        self._memo_state: RegistryState | None = None
        self._memo: dict[str, tuple[tuple[AuthorizationPolicy, ...], tuple[AuthorizationPolicy, ...]]] = {}

    def admit(self, state: RegistryState, connection: Connection, explain: bool = False) -> Decision:
        """The decision for `connection`; with `explain`, a denial lists why each ALLOW failed."""
        destination = connection.destination
        if connection.arrival == "plaintext":
            mode, decided_by = self.mtls_mode(state, destination, connection.destination_port)
            if mode == STRICT:
                return Decision(False, f"plaintext refused: STRICT mTLS ({decided_by}) requires the client to be "
                                       "in the mesh", decided_by, code="strict_mtls")
        denies, allows = self._applicable(state, destination)
        for policy in denies:
            if (rule := _matching_rule(policy, connection)) is not None:
                return Decision(False, f"explicitly denied by {policy.key}", policy.key, rule.index,
                                code="policy_denied")
        if not allows:
            return Decision(True, "no ALLOW policy applies")
        for policy in allows:
            if (rule := _matching_rule(policy, connection)) is not None:
                return Decision(True, f"allowed by {policy.key}", policy.key, rule.index)
        tried = tuple(f"{p.key}: {_why_not(p, connection)}" for p in allows) if explain else ()
        return Decision(False, "no ALLOW policy matched", tried=tried, code="policy_denied")

    def check(self, state: RegistryState, connection: Connection) -> None:
        """Denied unless `connection` is admitted: what the listeners call."""
        decision = self.admit(state, connection)
        if not decision.allowed:
            raise Denied(connection, decision)

    def recheck(self, state: RegistryState, connection: Connection) -> Decision:
        """The decision for a connection admitted earlier, by the policies of `state` and its
        destination as `state` now has it (labels may have changed what selects it)."""
        destination = state.workload_by_key(connection.destination.key) or connection.destination
        return self.admit(state, replace(connection, destination=destination))

    def applicable(self, state: RegistryState, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The policies that apply to `workload`, DENY first."""
        denies, allows = self._applicable(state, workload)
        return denies + allows

    def mtls_mode(self, state: RegistryState, workload: Workload, port: int) -> tuple[str, str]:
        """(STRICT or PERMISSIVE, what decided it) for plaintext reaching `workload` on `port`:
        a PeerAuthentication selecting it (its port-level mode first), its namespace's (or the
        namespace label amesh.io/mtls-mode), the mesh's (root namespace), else the agent default."""
        levels = _peer_authentication_levels(state.peer_authentications, workload, self.root_namespace)
        selected, namespace_wide, mesh_wide = levels
        if selected is not None:
            if selected.port_modes.get(port, UNSET) != UNSET:
                return selected.port_modes[port], f"PeerAuthentication {selected.key} port {port}"
            if selected.mode != UNSET:
                return selected.mode, f"PeerAuthentication {selected.key}"
        if namespace_wide is not None and namespace_wide.mode != UNSET:
            return namespace_wide.mode, f"PeerAuthentication {namespace_wide.key}"
        if workload.mtls_mode in MTLS_MODES:
            return workload.mtls_mode, f"namespace {workload.namespace} label amesh.io/mtls-mode"
        if mesh_wide is not None and mesh_wide.mode != UNSET:
            return mesh_wide.mode, f"PeerAuthentication {mesh_wide.key}"
        return self.default_mtls_mode, "the agent's --mtls-mode"

    def _applicable(self, state: RegistryState, workload: Workload
                    ) -> tuple[tuple[AuthorizationPolicy, ...], tuple[AuthorizationPolicy, ...]]:
        if state is not self._memo_state:
            self._memo_state, self._memo = state, {}
        found = self._memo.get(workload.key)
        if found is None:
            policies = [p for namespace in {self.root_namespace, workload.namespace}
                        for p in state.authorization_policies_in(namespace) if self._applies(p, workload)]
            policies.sort(key=lambda p: p.key)  # a stable order, so explanations are too
            found = (tuple(p for p in policies if p.action == DENY), tuple(p for p in policies if p.action == ALLOW))
            self._memo[workload.key] = found
        return found

    def _applies(self, policy: AuthorizationPolicy, workload: Workload) -> bool:
        if policy.selector is None:
            return policy.namespace in (self.root_namespace, workload.namespace)
        return _selects(policy.selector, workload.labels)


def check_between(authorizer: Authorizer, state: RegistryState, source: Workload, destination: Workload,
                  port: int, trust_domain: str) -> dict[str, Any]:
    """What the data path would decide for a connection from `source` to `destination`:`port`
    now, without sending a packet (`ameshctl check`): the decision, the policy and rule that
    decided (in short), or why each ALLOW policy that applies did not match."""
    if not destination.enrolled:
        return {"allowed": True, "reason": f"{destination.key} is not in the mesh: no policy applies to it",
                "arrival": "plaintext", "applicable": []}
    if not source.enrolled:
        arrival: Arrival = "plaintext"
    else:
        arrival = "same-node" if source.node == destination.node else "hbone"
    identity = workload_identity(source, trust_domain) if source.enrolled else None
    decision = authorizer.admit(state, Connection(source.ip, identity, destination, port, arrival, source.key),
                                explain=True)
    applicable = authorizer.applicable(state, destination)
    deciding = next((p for p in applicable if p.key == decision.policy), None)
    rule = None
    if deciding is not None and decision.rule is not None:
        rule = f"spec.rules[{decision.rule}]: {deciding.summary[decision.rule]}"
    return {"allowed": decision.allowed, "reason": decision.reason, "policy": decision.policy, "rule": rule,
            "tried": list(decision.tried), "arrival": arrival,
            "source_identity": identity.uri if identity else None,
            "mtls_mode": authorizer.mtls_mode(state, destination, port)[0],
            "applicable": [p.key for p in applicable]}


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _peer_authentication_levels(policies: tuple[PeerAuthentication, ...], workload: Workload, root: str
                                ) -> tuple[PeerAuthentication | None, PeerAuthentication | None,
                                           PeerAuthentication | None]:
    """The workload-level, namespace-level and mesh-level PeerAuthentication of `workload`; at
    each level the oldest wins (creationTimestamp, then name), as in Istio."""
    selected, namespace_wide, mesh_wide = [], [], []
    for policy in policies:
        if policy.namespace == workload.namespace and policy.selector is not None:
            if _selects(policy.selector, workload.labels):
                selected.append(policy)
        elif policy.namespace == workload.namespace:
            namespace_wide.append(policy)
        elif policy.namespace == root and policy.selector is None:
            mesh_wide.append(policy)
    oldest = lambda found: min(found, key=lambda p: (p.created, p.name)) if found else None  # noqa: E731
    return oldest(selected), oldest(namespace_wide), oldest(mesh_wide)


def _matching_rule(policy: AuthorizationPolicy, connection: Connection) -> Rule | None:
    return next((rule for rule in policy.rules if _rule_holds(rule, connection)), None)


def _rule_holds(rule: Rule, connection: Connection) -> bool:
    return all(any(_match_holds(m, connection) for m in clause) if clause else True for clause in rule.clauses)


def _match_holds(match: Match, connection: Connection) -> bool:
    return not match.empty and _failed_field(match, connection) is None


def _failed_field(match: Match, connection: Connection) -> str | None:
    """The first field of `match` that `connection` fails, as a phrase; None if all hold. Each
    field is looked at only when the match lists it: most list one or two."""
    identity = connection.source_identity
    if match.namespaces or match.not_namespaces:
        namespace = identity.namespace if identity else ""
        failed = _field("namespace", namespace or "(none: plaintext)", match.namespaces, match.not_namespaces,
                        lambda p: p.matches(namespace))
        if failed:
            return failed
    if match.service_accounts or match.not_service_accounts:
        account = (identity.namespace, identity.service_account) if identity else None
        failed = _field("service account", "/".join(account) if account else "(none: plaintext)",
                        match.service_accounts, match.not_service_accounts, lambda sa: sa == account)
        if failed:
            return failed
    if match.principals or match.not_principals:
        principal = connection.principal
        failed = _field("principal", principal or "(none: plaintext)", match.principals, match.not_principals,
                        lambda p: p.matches(principal))
        if failed:
            return failed
    if match.source_ips or match.not_source_ips:
        source_ip = connection.source_address
        if source_ip is None:
            return "source ip is unverified: no address condition holds for it"
        failed = _field("source ip", connection.source_ip, match.source_ips, match.not_source_ips,
                        lambda n: source_ip in n)
        if failed:
            return failed
    if match.destination_ips or match.not_destination_ips:
        destination_ip = connection.destination_address
        failed = _field("destination ip", connection.destination.ip, match.destination_ips,
                        match.not_destination_ips, lambda n: destination_ip in n)
        if failed:
            return failed
    if match.destination_ports or match.not_destination_ports:
        port = connection.destination_port
        return _field("port", str(port), match.destination_ports, match.not_destination_ports, lambda p: p == port)
    return None


def _field(what: str, value: str, positive: tuple[Any, ...], negative: tuple[Any, ...],
           holds: Callable[[Any], bool]) -> str | None:
    """Why `value` fails "one of `positive` (if listed) and none of `negative`", or None."""
    if positive and not any(holds(v) for v in positive):
        return f"{what} {value} is not one of {_show(positive)}"
    if negative and any(holds(v) for v in negative):
        return f"{what} {value} is excluded by {_show(negative)}"
    return None


def _why_not(policy: AuthorizationPolicy, connection: Connection) -> str:
    """Why no rule of `policy` matches `connection`, rule by rule (its first failing clause)."""
    if not policy.rules:
        return "it has no rule that can match (an ALLOW policy without rules admits nothing)"
    reasons = []
    for rule in policy.rules:
        for clause in rule.clauses:
            if clause and not any(_match_holds(m, connection) for m in clause):
                reasons.append(f"rules[{rule.index}]: " + " and ".join(
                    _failed_field(m, connection) or "an item with nothing to match at L4" for m in clause))
                break
    return "; ".join(reasons)


def _show(values: tuple[object, ...]) -> str:
    shown = [("/".join(v) if isinstance(v, tuple) else str(v)) for v in values[:4]]
    return "[" + ", ".join(shown) + (f" +{len(values) - 4}" if len(values) > 4 else "") + "]"
