"""Registry source: a file of Kubernetes objects (Namespaces, Nodes, Pods, Services,
EndpointSlices, Istio's AuthorizationPolicies, PeerAuthentications, DestinationRules and
WorkloadEntries, Gateway API TCPRoutes and SMI TrafficSplits).

`parse_objects` turns multi-document YAML, as `kubectl get -o yaml` prints it or as a person
writes it, into one `RegistryState`, or raises `RegistryError` naming the document, object and
field at fault; bad input never yields a partial state. `build_state` does the same for objects
already decoded (the dicts the Kubernetes API server returns), and is where every rule lives.
`FileSource` watches the file and re-parses it whenever it changes, keeping the last good state
while the file is broken.

Other kinds (ConfigMap, Deployment, ...) are ignored, so a whole `kubectl get` dump can be used.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import yaml

from registry.model import (
    CONNECT_RETRIES_ANNOTATION,
    CONNECTION_RATE_ANNOTATION,
    DEFAULT_CONNECT_ATTEMPTS,
    ENROLL_AMBIENT,
    ENROLL_LABEL,
    ENROLL_NONE,
    MAX_CONNECT_RETRIES,
    MTLS_MODE_LABEL,
    MTLS_MODES,
    AuthorizationPolicy,
    Endpoint,
    PeerAuthentication,
    RegistryError,
    RegistryState,
    Service,
    ServicePort,
    TrafficPolicy,
    Workload,
)
from registry.objects import (
    KubeObject,
    ipv4_field,
    labels_field,
    list_field,
    mapping_field,
    port_field,
    show,
    string_field,
)
from registry.policies import API_VERSIONS as POLICY_API_VERSIONS
from registry.policies import read_authorization_policy, read_peer_authentication
from registry.traffic import (
    DESTINATION_RULE_API_VERSIONS,
    TCP_ROUTE_API_VERSIONS,
    TRAFFIC_SPLIT_API_VERSIONS,
    DestinationRule,
    Split,
    read_destination_rule,
    read_tcp_route,
    read_traffic_split,
    shape_services,
)
from registry.workloadentries import (
    ENDPOINT_SOURCE,
    WORKLOAD_ENTRY_API_VERSIONS,
    Entry,
    Heartbeats,
    entry_workload,
    is_entry,
    read_workload_entry,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # how an EndpointSlice names its Service
PROTOCOLS = ("TCP", "UDP", "SCTP")
ZONE_LABEL = "topology.kubernetes.io/zone"  # a Node's zone
# Service.spec.trafficDistribution values that ask for close endpoints first; PreferSameZone and
# PreferSameNode (Kubernetes 1.33) are read as PreferClose, which tries the same node, then zone
CLOSE_DISTRIBUTIONS = ("PreferClose", "PreferSameZone", "PreferSameNode")

# The apiVersions each supported kind may carry; any other kind is skipped.
API_VERSIONS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Node": ("v1",),
    "Pod": ("v1",),
    "Service": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "AuthorizationPolicy": POLICY_API_VERSIONS,
    "PeerAuthentication": POLICY_API_VERSIONS,
    "DestinationRule": DESTINATION_RULE_API_VERSIONS,
    "TCPRoute": TCP_ROUTE_API_VERSIONS,
    "TrafficSplit": TRAFFIC_SPLIT_API_VERSIONS,
    "WorkloadEntry": WORKLOAD_ENTRY_API_VERSIONS,
}


# --- one reader per supported kind ---


@dataclass
class _Pod:
    obj: KubeObject
    workload: Workload  # enrolled is filled in once every Namespace has been read
    named_ports: dict[str, int]  # containerPort by name, for named service targetPorts


class _Serving(Protocol):
    """What a Service's selector reads of a pod: its workload and its named container ports."""

    workload: Workload
    named_ports: Mapping[str, int]


@dataclass(slots=True)
class _SliceEndpoint:
    ip: str
    ready: bool
    workload: str | None
    node: str | None
    zone: str | None


@dataclass(slots=True)
class _Slice:
    service_key: str  # "namespace/name" of the Service it belongs to
    ports: dict[str, int]  # endpoint port by port name
    endpoints: list[_SliceEndpoint]


def _read_pod(obj: KubeObject, source: str) -> _Pod | None:
    spec = mapping_field(obj, obj.raw.get("spec"), "spec")
    status = mapping_field(obj, obj.raw.get("status"), "status")
    ip = ipv4_field(obj, status.get("podIP"), "status.podIP")
    ipv4_field(obj, status.get("hostIP"), "status.hostIP")  # unused, but a wrong one hints at a mix-up
    node = string_field(obj, spec.get("nodeName"), "spec.nodeName")
    if not node:
        if not ip:
            return None  # pending and unscheduled: nothing to capture or route to yet
        raise obj.fail("spec.nodeName", "required")
    ready = False
    for i, condition in enumerate(list_field(obj, status.get("conditions"), "status.conditions")):
        condition = mapping_field(obj, condition, f"status.conditions[{i}]", required=True)
        if condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
    named_ports: dict[str, int] = {}
    for i, container in enumerate(list_field(obj, spec.get("containers"), "spec.containers")):
        container = mapping_field(obj, container, f"spec.containers[{i}]", required=True)
        for j, port in enumerate(list_field(obj, container.get("ports"), f"spec.containers[{i}].ports")):
            path = f"spec.containers[{i}].ports[{j}]"
            port = mapping_field(obj, port, path, required=True)
            number = port_field(obj, port.get("containerPort"), f"{path}.containerPort")
            name = string_field(obj, port.get("name"), f"{path}.name")
            if name in named_ports:
                problem = f'"{name}" is used twice; port names must be unique in a pod'
                raise obj.fail(f"{path}.name", problem)
            if name:
                named_ports[name] = number
    account = string_field(obj, spec.get("serviceAccountName"), "spec.serviceAccountName")
    workload = Workload(
        name=obj.name,
        namespace=obj.namespace,
        ip=ip,
        node=node,
        service_account=account or "default",
        labels=labels_field(obj, obj.metadata.get("labels"), "metadata.labels"),
        ready=ready,
        source=source,
    )
    return _Pod(obj, workload, named_ports)


def _read_service_port(obj: KubeObject, raw: object, path: str) -> ServicePort:
    raw = mapping_field(obj, raw, path, required=True)
    port = port_field(obj, raw.get("port"), f"{path}.port")
    target = raw.get("targetPort", port)
    if not isinstance(target, str):
        target = port_field(obj, target, f"{path}.targetPort")
    elif not target:
        raise obj.fail(f"{path}.targetPort", 'must be a port number or a port name, got ""')
    elif target.isdigit():
        problem = f'"{target}" is a name, not a number; write {target} without quotes'
        raise obj.fail(f"{path}.targetPort", problem)
    protocol = string_field(obj, raw.get("protocol"), f"{path}.protocol") or "TCP"
    if protocol not in PROTOCOLS:
        problem = f"must be one of {', '.join(PROTOCOLS)}, got {show(protocol)}"
        raise obj.fail(f"{path}.protocol", problem)
    name = string_field(obj, raw.get("name"), f"{path}.name")
    return ServicePort(port=port, target_port=target, name=name, protocol=protocol)


def _read_service(obj: KubeObject, source: str) -> Service:
    spec = mapping_field(obj, obj.raw.get("spec"), "spec")
    cluster_ip = spec.get("clusterIP")
    # "None" (or no address at all) makes a headless Service: clients resolve endpoints directly.
    cluster_ip = "" if cluster_ip == "None" else ipv4_field(obj, cluster_ip, "spec.clusterIP")
    ports: list[ServicePort] = []
    for i, raw in enumerate(list_field(obj, spec.get("ports"), "spec.ports")):
        port = _read_service_port(obj, raw, f"spec.ports[{i}]")
        # Endpoints map ports by name, so two ports sharing one (or both unnamed) would collide.
        if any(p.name == port.name for p in ports):
            problem = f"{show(port.name)} is used twice; each port of a Service needs its own name"
            raise obj.fail(f"spec.ports[{i}].name", problem)
        ports.append(port)
    return Service(
        name=obj.name,
        namespace=obj.namespace,
        cluster_ip=cluster_ip,
        ports=tuple(ports),
        selector=labels_field(obj, spec.get("selector"), "spec.selector"),
        source=source,
        traffic=_service_traffic(obj, spec),
    )


def _service_traffic(obj: KubeObject, spec: Mapping[str, Any]) -> TrafficPolicy:
    """What the Service itself says of its traffic: its amesh.io annotations, trafficDistribution."""
    traffic = TrafficPolicy(connect_attempts=1 + _connect_retries(obj), connection_rate=_connection_rate(obj),
                            prefer_close=_prefers_close(obj, spec))
    if traffic != TrafficPolicy():
        traffic = replace(traffic, configured_by=(obj.label,))
    return traffic


def _prefers_close(obj: KubeObject, spec: Mapping[str, Any]) -> bool:
    distribution = string_field(obj, spec.get("trafficDistribution"), "spec.trafficDistribution")
    if distribution and distribution not in CLOSE_DISTRIBUTIONS:
        problem = f"must be one of {', '.join(CLOSE_DISTRIBUTIONS)}, got {show(distribution)}"
        raise obj.fail("spec.trafficDistribution", problem)
    return bool(distribution)


_RATE = re.compile(r"^(\d+(?:\.\d+)?)/(s|min)$")


def _connection_rate(obj: KubeObject) -> float | None:
    """The Service's amesh.io/connection-rate-limit annotation ("20/s", "1200/min") per second."""
    annotations = labels_field(obj, obj.metadata.get("annotations"), "metadata.annotations")
    text = annotations.get(CONNECTION_RATE_ANNOTATION)
    if text is None:
        return None
    match = _RATE.match(text.strip())
    rate = float(match[1]) / (60 if match[2] == "min" else 1) if match else 0.0
    if not rate:
        problem = f'must be connections per second or minute above 0, like "20/s" or "1200/min", got {show(text)}'
        raise obj.fail(f'metadata.annotations["{CONNECTION_RATE_ANNOTATION}"]', problem)
    return rate


def _connect_retries(obj: KubeObject) -> int:
    """The Service's amesh.io/connect-retries annotation: "0" to "5"; absent, the default."""
    annotations = labels_field(obj, obj.metadata.get("annotations"), "metadata.annotations")
    text = annotations.get(CONNECT_RETRIES_ANNOTATION)
    if text is None:
        return DEFAULT_CONNECT_ATTEMPTS - 1
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_CONNECT_RETRIES):
        problem = f"must be a number of retries 0-{MAX_CONNECT_RETRIES} (0: none), got {show(text)}"
        raise obj.fail(f'metadata.annotations["{CONNECT_RETRIES_ANNOTATION}"]', problem)
    return int(text)


def _read_slice(obj: KubeObject) -> _Slice:
    labels = labels_field(obj, obj.metadata.get("labels"), "metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        problem = "required: it names the Service these endpoints belong to"
        raise obj.fail(f'metadata.labels["{SERVICE_NAME_LABEL}"]', problem)
    ports: dict[str, int] = {}
    for i, port in enumerate(list_field(obj, obj.raw.get("ports"), "ports")):
        port = mapping_field(obj, port, f"ports[{i}]", required=True)
        name = string_field(obj, port.get("name"), f"ports[{i}].name")
        ports[name] = port_field(obj, port.get("port"), f"ports[{i}].port")
    endpoints: list[_SliceEndpoint] = []
    for i, raw in enumerate(list_field(obj, obj.raw.get("endpoints"), "endpoints")):
        path = f"endpoints[{i}]"
        raw = mapping_field(obj, raw, path, required=True)
        addresses = list_field(obj, raw.get("addresses"), f"{path}.addresses")
        if not addresses:
            raise obj.fail(f"{path}.addresses", "required: at least one address")
        ip = ipv4_field(obj, addresses[0], f"{path}.addresses[0]")
        conditions = mapping_field(obj, raw.get("conditions"), f"{path}.conditions")
        ready = conditions.get("ready", True)
        if ready is None:  # Kubernetes: unknown readiness is treated as ready
            ready = True
        if not isinstance(ready, bool):
            raise obj.fail(f"{path}.conditions.ready", f"must be true or false, got {show(ready)}")
        target = mapping_field(obj, raw.get("targetRef"), f"{path}.targetRef")
        workload = None
        if target.get("kind") == "Pod":
            name = string_field(obj, target.get("name"), f"{path}.targetRef.name", required=True)
            namespace = string_field(obj, target.get("namespace"), f"{path}.targetRef.namespace")
            workload = f"{namespace or obj.namespace}/{name}"
        node = string_field(obj, raw.get("nodeName"), f"{path}.nodeName") or None
        zone = string_field(obj, raw.get("zone"), f"{path}.zone") or None
        endpoints.append(_SliceEndpoint(ip, ready, workload, node, zone))
    return _Slice(f"{obj.namespace}/{service}", ports, endpoints)


# --- the whole file ---


_NOT_AN_OBJECT = "must be a mapping (one Kubernetes object)"


def _objects(text: str) -> Iterator[KubeObject]:
    """Every object in the YAML text, with null documents skipped and Lists flattened."""
    documents: list[Any] = []
    try:
        documents.extend(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        # The document being read when the error struck is the one after those already read.
        where = f"document {len(documents) + 1}: YAML syntax error"
        if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
            raise RegistryError(f"{where}: {e}") from None
        message = f"{where} at line {e.problem_mark.line + 1}: {e.problem}"
        if e.context and e.context_mark is not None:  # where the broken construct began
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        raise RegistryError(message) from None
    except RecursionError:
        raise RegistryError(f"document {len(documents) + 1}: nested too deeply to read (lists or mappings "
                            "inside each other hundreds of levels deep)") from None
    except ValueError as e:  # an integer of thousands of digits (Python refuses to convert it)
        raise RegistryError(f"document {len(documents) + 1}: a value cannot be read: {e}") from None
    for index, document in enumerate(documents, start=1):
        where = f"document {index}"
        if document is None:
            continue
        if not isinstance(document, dict):
            raise RegistryError(f"{where}: {_NOT_AN_OBJECT}, got {show(document)}")
        if document.get("kind") != "List":
            yield KubeObject(document, where)
            continue
        items = document.get("items")
        if not isinstance(items, list):
            problem = f"must be a list of objects, got {show(items)}"
            raise RegistryError(f"{where} (List): items: {problem}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RegistryError(f"{where} items[{i}]: {_NOT_AN_OBJECT}, got {show(item)}")
            yield KubeObject(item, f"{where} items[{i}]")


def supported(obj: KubeObject) -> bool:
    """Whether amesh reads objects of this kind (others are skipped); RegistryError if it does but
    not at the object's apiVersion."""
    expected = API_VERSIONS.get(obj.kind)
    if expected is None:
        return False
    if obj.raw["apiVersion"] not in expected:
        problem = f"must be {' or '.join(expected)} for kind {obj.kind}, got {show(obj.raw['apiVersion'])}"
        raise obj.fail("apiVersion", problem)
    return True


def _check_unique_ips(owners: Iterable[tuple[KubeObject, str, str]]) -> None:
    """Raise when two objects claim one address (each with its field's path): the ztunnel could
    not tell them apart."""
    first: dict[str, KubeObject] = {}
    for obj, ip, path in owners:
        if not ip:
            continue
        other = first.setdefault(ip, obj)
        if other is not obj:
            raise obj.fail(path, f"{ip} is already used by {other.label} ({other.where})")


def _namespace_labels(obj: KubeObject) -> dict[str, str]:
    labels = labels_field(obj, obj.metadata.get("labels"), "metadata.labels")
    mode = labels.get(MTLS_MODE_LABEL)
    if mode is not None and mode not in MTLS_MODES:
        raise obj.fail(f'metadata.labels["{MTLS_MODE_LABEL}"]', f"must be one of {', '.join(MTLS_MODES)}, got {show(mode)}")
    return labels


def _enrolled(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """Istio's rule: the pod label wins ("none" opts out, "ambient" opts in), else the namespace."""
    mode = pod_labels.get(ENROLL_LABEL)
    if mode == ENROLL_NONE:
        return False
    return mode == ENROLL_AMBIENT or namespace_labels.get(ENROLL_LABEL) == ENROLL_AMBIENT


def _node_zone(obj: KubeObject) -> tuple[str, str] | None:
    """(node, zone) from a Node's topology.kubernetes.io/zone label, None without one."""
    zone = labels_field(obj, obj.metadata.get("labels"), "metadata.labels").get(ZONE_LABEL)
    return (obj.name, zone) if zone else None


def _zones(nodes: Mapping[str, str], slices: Iterable[_Slice]) -> dict[str, str]:
    """Each node's zone: its Node's label, else the zone its EndpointSlice endpoints give."""
    zones = {e.node: e.zone for s in slices for e in s.endpoints if e.node and e.zone}
    return {**zones, **nodes}


def _selected_endpoints(service: Service, pods: Iterable[_Serving], zones: Mapping[str, str]) -> tuple[Endpoint, ...]:
    """Endpoints of a Service with no EndpointSlice: its selector's pods that have an address."""
    if not service.selector:
        return ()  # a Service without a selector gets endpoints only from slices
    endpoints = []
    for pod in pods:
        w = pod.workload
        if w.namespace != service.namespace or not w.ip:
            continue
        if any(w.labels.get(key) != value for key, value in service.selector.items()):
            continue
        ports = {}
        for sp in service.ports:
            target = sp.target_port
            number = target if isinstance(target, int) else pod.named_ports.get(target)
            if number is not None:  # a pod lacking the named port cannot serve that service port
                ports[sp.name] = number
        endpoints.append(Endpoint(ip=w.ip, ports=ports, ready=w.ready, workload=w.key, node=w.node,
                                  zone=zones.get(w.node), source=ENDPOINT_SOURCE if is_entry(w) else ""))
    return tuple(endpoints)


def _sliced_endpoints(service: Service, slices: Iterable[_Slice], zones: Mapping[str, str]) -> tuple[Endpoint, ...]:
    """Endpoints of a Service from all its EndpointSlices, ports matched by name; an endpoint
    whose slice gives no zone takes its node's."""
    endpoints = []
    for s in slices:
        ports = {sp.name: s.ports[sp.name] for sp in service.ports if sp.name in s.ports}  # one for the slice
        endpoints += (Endpoint(ip=e.ip, ports=ports, ready=e.ready, workload=e.workload, node=e.node,
                               zone=e.zone or (zones.get(e.node) if e.node else None))
                      for e in s.endpoints)
    return tuple(endpoints)


def parse_objects(text: str, source: str = "file", generation: int = 0,
                  heartbeats: Heartbeats | None = None) -> RegistryState:
    """Parse multi-document Kubernetes YAML into a RegistryState; raise RegistryError if invalid."""
    return build_state(_objects(text), source, generation, heartbeats)  # type: ignore[arg-type]


def build_state(
    objects: Iterable[dict[Any, Any]], source: str = "file", generation: int = 0,
    heartbeats: Heartbeats | None = None,
) -> RegistryState:
    """Build a RegistryState from Kubernetes objects (dicts); raise RegistryError if invalid.

    Kinds other than those of API_VERSIONS are skipped. A RegistryError
    raised for one object carries `object_key` = (kind, namespace, name) of that object.
    WorkloadEntries' heartbeats are noted in `heartbeats` (kept from one build to the next by the
    caller, as the time each was first seen) and their health judged at its clock's now.
    """
    heartbeats = heartbeats if heartbeats is not None else Heartbeats()
    now = heartbeats.clock()
    seen: dict[tuple[str, str, str], KubeObject] = {}
    namespaces: dict[str, dict[str, str]] = {}
    pods: list[_Pod] = []
    entries: list[Entry] = []  # WorkloadEntries, their workloads' readiness at `now`
    serving: list[_Serving] = []  # pods and entries, in the order read: a selector's endpoints
    addresses: list[tuple[KubeObject, str, str]] = []  # pods' and entries' addresses, in the order read
    services: list[tuple[KubeObject, Service]] = []
    slices: dict[str, list[_Slice]] = {}
    authorization_policies: list[AuthorizationPolicy] = []
    peer_authentications: list[PeerAuthentication] = []
    destination_rules: list[DestinationRule] = []
    splits: list[Split] = []
    node_zones: dict[str, str] = {}
    for raw in objects:
        # The file reader hands over objects it has already located in their documents.
        obj = raw if isinstance(raw, KubeObject) else KubeObject(raw, "")
        if not supported(obj):
            continue
        other = seen.setdefault((obj.kind, obj.namespace, obj.name), obj)
        if other is not obj:
            problem = f"duplicate: {obj.label} is already defined in {other.where}"
            raise obj.fail("metadata.name", problem)
        if obj.kind == "Namespace":
            namespaces[obj.name] = _namespace_labels(obj)
        elif obj.kind == "Node":
            node_zones.update([zone] if (zone := _node_zone(obj)) else [])
        elif obj.kind == "Pod":
            pod = _read_pod(obj, source)
            if pod is not None:
                pods.append(pod)
                serving.append(pod)
                addresses.append((obj, pod.workload.ip, "status.podIP"))
        elif obj.kind == "WorkloadEntry":
            entry = read_workload_entry(obj, source)
            heartbeats.observe(obj.key, entry)  # type: ignore[arg-type]
            entry = replace(entry, workload=entry_workload(obj.key, entry, heartbeats, now))  # type: ignore[arg-type]
            entries.append(entry)
            serving.append(entry)
            addresses.append((obj, entry.workload.ip, "spec.address"))
        elif obj.kind == "Service":
            services.append((obj, _read_service(obj, source)))
        elif obj.kind == "AuthorizationPolicy":
            if (policy := read_authorization_policy(obj)) is not None:
                authorization_policies.append(policy)
        elif obj.kind == "PeerAuthentication":
            peer_authentications.append(read_peer_authentication(obj))
        elif obj.kind == "DestinationRule":
            destination_rules.append(read_destination_rule(obj))
        elif obj.kind == "TCPRoute":
            splits.extend(read_tcp_route(obj))
        elif obj.kind == "TrafficSplit":
            splits.append(read_traffic_split(obj))
        else:
            endpoint_slice = _read_slice(obj)
            slices.setdefault(endpoint_slice.service_key, []).append(endpoint_slice)
    _check_unique_ips(addresses)
    _check_unique_ips((obj, s.cluster_ip, "spec.clusterIP") for obj, s in services)
    # A pod's namespace may have no Namespace object; then only the pod's own label can enroll it.
    workloads = tuple(
        replace(w, enrolled=_enrolled(w.labels, namespaces.get(w.namespace, {})),
                mtls_mode=namespaces.get(w.namespace, {}).get(MTLS_MODE_LABEL, ""))
        for w in (p.workload for p in pods)
    ) + tuple(e.workload for e in entries)  # an entry is never enrolled
    zones = _zones(node_zones, (s for service_slices in slices.values() for s in service_slices))
    # As in Kubernetes, once a Service has EndpointSlices they alone list its pods; a slice
    # naming a Service the file lacks has nothing to serve and is left unused. As in Istio, the
    # WorkloadEntries its selector matches are endpoints either way.
    built = tuple(
        replace(s, endpoints=_sliced_endpoints(s, slices[s.key], zones) + _selected_endpoints(s, entries, zones))
        if s.key in slices
        else replace(s, endpoints=_selected_endpoints(s, serving, zones))
        for _, s in services
    )
    return RegistryState(workloads=workloads, services=shape_services(built, destination_rules, splits),
                         generation=generation, authorization_policies=tuple(authorization_policies),
                         peer_authentications=tuple(peer_authentications), node_zones=zones)


# --- watching the file ---

# (mtime_ns, size, inode): changes when the file is rewritten and when it is replaced by rename.
# A same-size rewrite within one kernel timestamp tick (a few ms) of the last read can go unseen.
StatVersion = tuple[int, int, int]
_UNREADABLE: StatVersion = (-1, -1, -1)  # the version of a file that cannot be stat'ed


class FileSource:
    """A registry source that re-reads a file of Kubernetes objects whenever it changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_state: Callable[[RegistryState], None],
        on_error: Callable[[RegistryError], None],
        poll_interval: float = 0.2,  # seconds between stat() calls; a change shows up within this
    ) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.last_error: str | None = None
        # wall-clock time the source last confirmed its good state is current (loaded, or found
        # unchanged); None until the first good load
        self.synced_at: float | None = None
        self._on_state = on_state
        self._on_error = on_error
        self._state: RegistryState | None = None
        self._generation = 0
        self._version: StatVersion | None = None  # the file version last parsed, good or bad
        # when each WorkloadEntry with a TTL was first seen with its lastProbeTime, kept across
        # re-reads; one lapsing makes the next poll build the state again
        self._heartbeats = Heartbeats()

    @property
    def state(self) -> RegistryState | None:
        """The last state parsed without error, or None before the first good parse."""
        return self._state

    @property
    def notice(self) -> str | None:
        """A file has nothing to say but its errors (`last_error`)."""
        return None

    @property
    def connected(self) -> bool:
        """True while the file's current version is the good state being served."""
        return self._state is not None and self.last_error is None

    def load(self) -> RegistryState:
        """Read and parse the file now; raise RegistryError (naming the path) if that fails."""
        return self._parse(self._stat())

    async def run(self) -> None:
        """Until cancelled, publish each good new version, report each bad one once."""
        while True:
            await asyncio.sleep(self.poll_interval)
            version = self._stat()
            if version == self._version and not self._heartbeats.lapsed(time.time()):
                if self.last_error is None:
                    self.synced_at = time.time()  # checked: the good state is still current
                continue
            try:
                state = self._parse(version)
            except RegistryError as e:
                self._on_error(e)
            else:
                self._on_state(state)

    def _stat(self) -> StatVersion:
        try:
            st = os.stat(self.path)
        except OSError:
            return _UNREADABLE  # reading the file will then say why
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _parse(self, version: StatVersion) -> RegistryState:
        # Stat before reading: a change made during the read then shows up as a new version.
        self._version = version
        try:
            text = self.path.read_text(encoding="utf-8")
            state = parse_objects(text, generation=self._generation + 1, heartbeats=self._heartbeats)
        except OSError as e:
            error = RegistryError(f"cannot read registry file {self.path}: {e.strerror or e}")
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 text (byte {e.start})"
            error = RegistryError(f"cannot read registry file {self.path}: {reason}")
        except RegistryError as e:
            error = RegistryError(f"{self.path}: {e}")
        else:
            self._generation = state.generation
            self._state = state
            self.last_error = None
            self.synced_at = time.time()
            return state
        self.last_error = str(error)
        raise error
