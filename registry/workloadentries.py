"""Istio WorkloadEntries: workloads outside Kubernetes that every node's agent knows of.

A WorkloadEntry (networking.istio.io v1, v1beta1 or v1alpha3) names an address, its ports by name,
labels, a service account and a network. As in Istio, a Service whose selector matches an entry's
labels (in the same namespace) gets it as one more endpoint; a Service's named targetPort is looked
up in the entry's ports, a numbered one is used as it is. An entry is never an enrolled pod: the
ztunnel reaches it as it reaches a loopback registration (registry/registrations.py) today, in
plaintext TCP straight to its address, and its workload has no node.

Health, kept by the registering client (`ameshctl register --kubeconfig ... --ttl S`):
- the client records the TTL on the object (the amesh.io/heartbeat-ttl annotation) and heartbeats
  by writing status.conditions [{type: Healthy, status: "True", lastProbeTime}] (Istio's shape)
  through the status subresource every TTL/3;
- Healthy=False makes the entry not ready, whoever wrote it;
- an entry without the annotation (written by a person or GitOps) is ready unless Healthy=False;
- an entry with a TTL is ready only while its last heartbeat is within the TTL.

"Within the TTL" is judged by the agent's own clock, never by comparing the client's and the
agent's clocks alone: a heartbeat counts from the moment the agent sees a lastProbeTime it had not
seen (`Heartbeats.observe`), and the entry is ready until that moment plus the TTL. The client's
timestamp only caps it: never past lastProbeTime + TTL + MAX_CLOCK_SKEW by the agent's clock, so an
agent that starts (or relists) and finds an entry whose client died long ago does not revive it
for a TTL. A relist showing the lastProbeTime already held changes nothing. A lapse needs no event:
`Heartbeats.lapsed` hands the sources the entries whose deadline passed, at the next expiry.
"""

from __future__ import annotations

import datetime as dt
import heapq
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from registry.model import Workload
from registry.objects import KubeObject, labels_field, list_field, mapping_field, show, string_field
from registry.registrations import RESERVED_PORTS, RegistrationError, parse_address, parse_port, parse_ttl

WORKLOAD_ENTRY_API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                               "networking.istio.io/v1alpha3")
GROUP, PLURAL = "networking.istio.io", "workloadentries"
TTL_ANNOTATION = "amesh.io/heartbeat-ttl"  # seconds ("3s", "30s", "2m") without a heartbeat before it lapses
HEALTHY = "Healthy"  # the condition type Istio's WorkloadEntry health checks write
# seconds the registering client's clock may be behind the agent's before its heartbeats count for
# less than a TTL; and how long past its lastProbeTime (+ TTL) a stale entry found at start-up lives
MAX_CLOCK_SKEW = 30.0
# a WorkloadEntry's workload name ("vm-1@WorkloadEntry"): a pod may have the entry's name in the same
# namespace, and "@" is in no pod name
WORKLOAD_SUFFIX = "@WorkloadEntry"
ENDPOINT_SOURCE = "WorkloadEntry"  # an entry's endpoint's source, as `ameshctl services` and `lookup` show it

EntryKey = tuple[str, str, str]  # ("WorkloadEntry", namespace, name)


@dataclass(frozen=True)
class Entry:
    """A WorkloadEntry as the rules read it: its workload (ready: what its Healthy condition says),
    its ports by name, its TTL and its last heartbeat's time."""

    workload: Workload
    named_ports: Mapping[str, int]
    ttl: float | None  # seconds; None: no heartbeats expected
    probe_time: float | None  # the Healthy condition's lastProbeTime, the client's clock; None: none
    network: str = ""


def is_entry(workload: Workload) -> bool:
    """Whether the workload stands for a WorkloadEntry (not a pod)."""
    return workload.name.endswith(WORKLOAD_SUFFIX)


def parse_time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 timestamp ("2026-12-02T01:38:26.123456Z"); ValueError."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return parsed.timestamp()


def format_time(seconds: float) -> str:
    """An RFC 3339 UTC timestamp with microseconds: heartbeats a fraction of a second apart differ."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _checked(obj: KubeObject, path: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """`parse(value)`, its RegistrationError turned into the object's error at `path`."""
    try:
        return parse(value)
    except RegistrationError as e:
        raise obj.fail(path, str(e).split(": ", 1)[-1]) from None


def read_workload_entry(obj: KubeObject, source: str) -> Entry:
    """The entry a WorkloadEntry object describes; RegistryError naming the object and field."""
    spec = mapping_field(obj, obj.raw.get("spec"), "spec", required=True)
    if spec.get("address") in (None, ""):
        raise obj.fail("spec.address", "required: the IPv4 address the workload is reached at")
    address = _checked(obj, "spec.address", parse_address, spec["address"])
    ports: dict[str, int] = {}
    for name, number in mapping_field(obj, spec.get("ports"), "spec.ports").items():
        if not isinstance(name, str) or not name:
            raise obj.fail("spec.ports", f"port names must be non-empty strings, got {show(name)}")
        ports[name] = _checked(obj, f"spec.ports.{name}", lambda v: parse_port(v, RESERVED_PORTS), number)
    account = string_field(obj, spec.get("serviceAccount"), "spec.serviceAccount") or "default"
    network = string_field(obj, spec.get("network"), "spec.network")
    string_field(obj, spec.get("locality"), "spec.locality")  # read, not used: see README
    annotations = labels_field(obj, obj.metadata.get("annotations"), "metadata.annotations")
    ttl_text = annotations.get(TTL_ANNOTATION)
    ttl = None if ttl_text is None else _checked(obj, f'metadata.annotations["{TTL_ANNOTATION}"]', parse_ttl,
                                                 ttl_text)
    healthy, probe_time = True, None
    status = mapping_field(obj, obj.raw.get("status"), "status")
    for i, condition in enumerate(list_field(obj, status.get("conditions"), "status.conditions")):
        condition = mapping_field(obj, condition, f"status.conditions[{i}]", required=True)
        if condition.get("type") != HEALTHY:
            continue
        healthy = condition.get("status") != "False"
        stamp = string_field(obj, condition.get("lastProbeTime"), f"status.conditions[{i}].lastProbeTime")
        try:
            probe_time = parse_time(stamp) if stamp else None
        except ValueError:
            raise obj.fail(f"status.conditions[{i}].lastProbeTime",
                           f"must be an RFC 3339 time like 2026-12-02T01:38:26Z, got {show(stamp)}") from None
    workload = Workload(name=obj.name + WORKLOAD_SUFFIX, namespace=obj.namespace, ip=address, node="",
                        service_account=account, labels=labels_field(obj, spec.get("labels"), "spec.labels"),
                        ready=healthy, enrolled=False, source=source)
    return Entry(workload, ports, ttl, probe_time, network)


@dataclass(frozen=True)
class _Heard:
    probe_time: float | None
    heard_at: float  # the agent's clock when it first saw probe_time
    ttl: float

    @property
    def deadline(self) -> float:
        """Until when the entry is ready: TTL after the agent saw the heartbeat, capped by its stamp."""
        if self.probe_time is None:
            return float("-inf")  # no heartbeat yet
        return min(self.heard_at + self.ttl, self.probe_time + self.ttl + MAX_CLOCK_SKEW)


class Heartbeats:
    """When each WorkloadEntry with a TTL was last heard from, by the agent's clock, and which have
    lapsed (sans-I/O: the clock is given). See the module for the rule."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._heard: dict[EntryKey, _Heard] = {}
        self._deadlines: list[tuple[float, EntryKey]] = []  # a heap; stale items are skipped

    def observe(self, key: EntryKey, entry: Entry) -> None:
        """Notes the entry's heartbeat: a lastProbeTime not seen before counts from now."""
        if entry.ttl is None:
            self._heard.pop(key, None)
            return
        held = self._heard.get(key)
        if held is not None and held.probe_time == entry.probe_time:
            if held.ttl == entry.ttl:
                return  # a relist, or a change elsewhere in the object: not a heartbeat
            heard = replace(held, ttl=entry.ttl)
        else:
            heard = _Heard(entry.probe_time, self.clock(), entry.ttl)
        self._heard[key] = heard
        if heard.probe_time is not None:
            heapq.heappush(self._deadlines, (heard.deadline, key))

    def ready(self, key: EntryKey, entry: Entry, now: float) -> bool:
        """Whether the entry is a ready endpoint at `now`: not Healthy=False, and with a TTL, heard
        from within it."""
        if not entry.workload.ready:
            return False
        if entry.ttl is None:
            return True
        held = self._heard.get(key)
        return held is not None and now <= held.deadline

    def forget(self, key: EntryKey) -> None:
        """The entry is gone (or rejected): its heartbeats with it."""
        self._heard.pop(key, None)

    def lapsed(self, now: float) -> list[EntryKey]:
        """The entries whose deadline passed since the last call (each once per heartbeat)."""
        lapsed = []
        while self._deadlines and self._deadlines[0][0] < now:
            deadline, key = heapq.heappop(self._deadlines)
            held = self._heard.get(key)
            if held is not None and held.deadline == deadline:
                lapsed.append(key)
        return lapsed

    def next_deadline(self) -> float | None:
        """The earliest deadline still to pass (stale heap items dropped), None if none."""
        while self._deadlines:
            deadline, key = self._deadlines[0]
            held = self._heard.get(key)
            if held is not None and held.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None


def entry_workload(key: EntryKey, entry: Entry, heartbeats: Heartbeats, now: float) -> Workload:
    """The entry's workload as the registry holds it, ready as its health is at `now`."""
    ready = heartbeats.ready(key, entry, now)
    return entry.workload if ready == entry.workload.ready else replace(entry.workload, ready=ready)


# --- what the registering client writes ---


def workload_entry(name: str, namespace: str, address: str, ports: Mapping[str, int], labels: Mapping[str, str],
                   service_account: str, network: str = "", ttl: float | None = None) -> dict[str, Any]:
    """The WorkloadEntry object `ameshctl register` creates (or updates) for a workload."""
    spec: dict[str, Any] = {"address": address, "ports": dict(ports), "labels": dict(labels),
                            "serviceAccount": service_account}
    if network:
        spec["network"] = network
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/managed-by": "ameshctl"}}
    if ttl is not None:
        metadata["annotations"] = {TTL_ANNOTATION: f"{ttl:g}s"}
    return {"apiVersion": WORKLOAD_ENTRY_API_VERSIONS[0], "kind": "WorkloadEntry", "metadata": metadata,
            "spec": spec}


def healthy_status(now: float, healthy: bool = True) -> dict[str, Any]:
    """The status a heartbeat writes: the Healthy condition probed at `now` (Istio's shape)."""
    condition = {"type": HEALTHY, "status": "True" if healthy else "False", "lastProbeTime": format_time(now),
                 "reason": "Heartbeat" if healthy else "Stopped", "message": "heartbeats from ameshctl register"}
    return {"status": {"conditions": [condition]}}
