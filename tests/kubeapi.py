"""A test Kubernetes API server: list/watch of namespaces, nodes, pods, services, endpointslices,
Istio's authorizationpolicies, peerauthentications, destinationrules and workloadentries, Gateway API tcproutes
and SMI trafficsplits.

Faithful enough that the real kubectl and real Kubernetes client libraries work against it, so
registry/kubernetes.py can be tested against reconnects, expired resourceVersions (410 Gone),
bookmarks and API server restarts without a cluster. Plain HTTP, no auth.

    with KubeAPIServer() as api:            # background thread with its own event loop
        api.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {...}, ...})
        api.write_kubeconfig(tmp_path / "kubeconfig")
        api.cut_watches(); api.compact(); api.stop(); api.start()
        KubeAPIServer(security_versions=())  # Istio's CRDs not installed; serve_security_versions("v1") later
        KubeAPIServer(traffic_groups=())  # no DestinationRule/TCPRoute/TrafficSplit CRDs; serve_traffic_groups(...)

    python -m tests.kubeapi --host 127.0.0.1 --port 6443 --objects cluster.yaml

What it serves, as the real API does:
- discovery: /version, /api, /api/v1, /apis, /apis/discovery.k8s.io[/v1],
  /apis/security.istio.io[/v1, /v1beta1] and the traffic groups (legacy discovery: a request for
  aggregated discovery gets plain JSON, and kubectl falls back); /openapi/v3 describes only the
  custom resources' groups, as much as `kubectl apply` needs of a custom resource; the rest of
  /openapi is 404.
- collections /api/v1/{namespaces,pods,services}, /apis/discovery.k8s.io/v1/endpointslices,
  /apis/security.istio.io/{v1,v1beta1}/{authorizationpolicies,peerauthentications} (one object
  served at either version, as a CRD with conversion None; only the versions in
  security_versions, none of them when it is empty: 404, as without Istio's CRDs), and likewise
  /apis/networking.istio.io/{v1,v1beta1,v1alpha3}/{destinationrules,workloadentries} (a
  WorkloadEntry has a status subresource, .../{name}/status: GET, PUT, PATCH change only its
  status, and writes to the object, POST included, leave its status as it was),
  /apis/gateway.networking.k8s.io/v1alpha2/tcproutes, /apis/split.smi-spec.io/{v1alpha4..v1alpha1}/
  trafficsplits, each group only while it is in traffic_groups,
  namespaced as /.../namespaces/{ns}/{plural}[/{name}]: GET (list, with labelSelector,
  fieldSelector on metadata.name/metadata.namespace, limit/continue, resourceVersion and
  resourceVersionMatch=Exact answered from history), POST (409 AlreadyExists), PUT (404 if
  absent, 409 Conflict on a stale metadata.resourceVersion), PATCH (merge patch), DELETE (200
  with the object). Errors are metav1 Status bodies. Table output (Accept as=Table) for kubectl.
- watch (?watch=true): newline-delimited JSON events over a chunked response. Without
  resourceVersion (or "0"), ADDED for every current object first; with resourceVersion=N, the
  events after N from history; N older than the last compact() gives HTTP 200 and one ERROR
  event (410 Expired), then the stream ends. allowWatchBookmarks=true adds BOOKMARK events every
  bookmark_interval seconds and right after compact(); sendInitialEvents=true ends the initial
  ADDED events with the "k8s.io/initial-events-end" bookmark. timeoutSeconds ends the stream.
- service-account tokens: POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token (TokenRequest,
  boundObjectRef to a Pod) mints a JWT with the real claims; POST
  /apis/authentication.k8s.io/v1/tokenreviews answers for tokens this server minted (user, groups,
  the bound pod and its node in user.extra, the audiences) and `authenticated: false` with the
  error for expired, foreign, wrong-audience or invalidated (bound pod gone) tokens.
- not enforced: namespace existence for namespaced objects, authentication, validation beyond
  kind/name/namespace.

Controls for tests in other processes: POST /_test/apply (an object), /_test/delete
({kind, name, namespace}), /_test/cut-watches, /_test/compact.

All state lives on the server's event loop; the synchronous controls hop onto it with
asyncio.run_coroutine_threadsafe.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import copy
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml
from aiohttp import web

JSON = dict[str, Any]

SERVER_VERSION = "v1.32.0"
DEFAULT_BOOKMARK_INTERVAL = 1.0  # seconds; the real server sends one about every minute
CLOSE_CHECK_INTERVAL = 0.5  # seconds; how often an idle watch notices its client went away
CONTROL_TIMEOUT = 10.0  # seconds a synchronous control waits for the server's loop
SHUTDOWN_TIMEOUT = 0.5  # seconds stop() gives in-flight requests before closing them
LISTS_KEPT = 16  # paginated lists whose sorted answer is kept for their next pages
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclasses.dataclass(frozen=True)
class Resource:
    """One served resource type."""

    plural: str
    singular: str
    kind: str
    group: str
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    # a status subresource (.../{name}/status): writes to the object leave its status as it was,
    # writes to /status change nothing else (as a CRD with subresources.status)
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


SECURITY_GROUP = "security.istio.io"  # Istio's CRDs: served only in the versions a test asks for
SECURITY_VERSIONS = ("v1", "v1beta1")  # preferred first, as Istio's CRDs serve them
# the custom resources that shape traffic, each group served only while a test installs it
TRAFFIC_RESOURCES = {
    "networking.istio.io": (("v1", "v1beta1", "v1alpha3"), "destinationrules", "destinationrule", "DestinationRule"),
    "gateway.networking.k8s.io": (("v1alpha2",), "tcproutes", "tcproute", "TCPRoute"),
    "split.smi-spec.io": (("v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"), "trafficsplits", "trafficsplit",
                          "TrafficSplit"),
}
TRAFFIC_GROUPS = tuple(TRAFFIC_RESOURCES)
CUSTOM_GROUPS = (SECURITY_GROUP, *TRAFFIC_GROUPS)  # described in /openapi/v3 for kubectl apply

RESOURCES = (
    Resource("namespaces", "namespace", "Namespace", "", "v1", False, ("ns",)),
    Resource("nodes", "node", "Node", "", "v1", False, ("no",)),
    Resource("pods", "pod", "Pod", "", "v1", True, ("po",)),
    Resource("services", "service", "Service", "", "v1", True, ("svc",)),
    Resource("endpointslices", "endpointslice", "EndpointSlice", "discovery.k8s.io", "v1", True),
    *(Resource(plural, singular, kind, SECURITY_GROUP, version, True)
      for version in SECURITY_VERSIONS
      for plural, singular, kind in (("authorizationpolicies", "authorizationpolicy", "AuthorizationPolicy"),
                                     ("peerauthentications", "peerauthentication", "PeerAuthentication"))),
    *(Resource(plural, singular, kind, group, version, True)
      for group, (versions, plural, singular, kind) in TRAFFIC_RESOURCES.items() for version in versions),
    # Istio's WorkloadEntries, served with networking.istio.io's DestinationRules
    *(Resource("workloadentries", "workloadentry", "WorkloadEntry", "networking.istio.io", version, True, ("we",),
               status_subresource=True) for version in TRAFFIC_RESOURCES["networking.istio.io"][0]),
)
BY_KIND = {r.kind: r for r in reversed(RESOURCES)}  # each kind at its preferred (first listed) version
API_VERSIONS_OF_KIND = {kind: tuple(r.api_version for r in RESOURCES if r.kind == kind) for kind in BY_KIND}


def resource_for(kind: str) -> Resource:
    """The resource for a kind ("Pod") or plural ("pods"), case-insensitive; APIError if none."""
    for r in BY_KIND.values():
        if kind.lower() in (r.kind.lower(), r.plural, r.singular):
            return r
    served = ", ".join(BY_KIND)
    raise APIError(400, "BadRequest", f"unknown kind {kind!r}; served: {served}")


class APIError(Exception):
    """A request the API refuses; becomes a metav1 Status body."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(res: Resource, name: str) -> JSON:
    return {"name": name, "group": res.group, "kind": res.plural}


def _not_found(res: Resource, name: str) -> APIError:
    qualified = f"{res.plural}.{res.group}" if res.group else res.plural
    return APIError(404, "NotFound", f'{qualified} "{name}" not found', _details(res, name))


def _expired(message: str) -> APIError:
    return APIError(410, "Expired", message)


# --- selectors ---------------------------------------------------------------------------------

Requirement = Callable[[dict[str, str]], bool]
_SET_REQ = re.compile(r"^\s*(!?)\s*([^\s=!,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_REQ = re.compile(r"^\s*([^\s=!,()]+)\s*(==|=|!=)\s*([^\s=!,()]*)\s*$")
_EXISTS_REQ = re.compile(r"^\s*(!?)\s*([^\s=!,()]+)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str) -> list[Requirement]:
    """Requirements of a label selector: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    reqs: list[Requirement] = []
    for part in _split_selector(text or ""):
        if m := _SET_REQ.match(part):
            key, op = m.group(2), m.group(3)
            values = {v.strip() for v in m.group(4).split(",") if v.strip()}
            if op == "in":
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _EQ_REQ.match(part):
            key, op, value = m.groups()
            if op == "!=":
                reqs.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                reqs.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS_REQ.match(part):
            neg, key = m.groups()
            if neg:
                reqs.append(lambda labels, k=key: k not in labels)
            else:
                reqs.append(lambda labels, k=key: k in labels)
        else:
            raise APIError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return reqs


def parse_field_selector(text: str) -> list[Callable[[JSON], bool]]:
    """Requirements of a field selector on metadata.name / metadata.namespace (=, ==, !=)."""
    reqs: list[Callable[[JSON], bool]] = []
    for part in _split_selector(text or ""):
        m = _EQ_REQ.match(part)
        if not m or m.group(1) not in ("metadata.name", "metadata.namespace"):
            raise APIError(400, "BadRequest", f'field label not supported: "{part.strip()}"')
        field, op, value = m.groups()
        key = field.split(".", 1)[1]
        if op == "!=":
            reqs.append(lambda o, k=key, v=value: o["metadata"].get(k, "") != v)
        else:
            reqs.append(lambda o, k=key, v=value: o["metadata"].get(k, "") == v)
    return reqs


@dataclasses.dataclass
class Filter:
    """Which objects a list or watch request sees."""

    res: Resource
    namespace: str | None
    labels: list[Requirement]
    fields: list[Callable[[JSON], bool]]

    def matches(self, obj: JSON | None) -> bool:
        if obj is None or obj["kind"] != self.res.kind:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(r(labels) for r in self.labels) and all(f(obj) for f in self.fields)


# --- the store ---------------------------------------------------------------------------------

Key = tuple[str, str, str]  # (kind, namespace or "", name)


def _key(obj: JSON) -> Key:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


@dataclasses.dataclass(frozen=True)
class Change:
    """One change in history: the object after it (None if deleted) and before it."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON  # as sent in the watch event (for DELETED: the last state, with the delete's RV)
    old: JSON | None


class Store:
    """Objects, the global resourceVersion and the change history. Used only on the loop."""

    def __init__(self) -> None:
        self.objects: dict[Key, JSON] = {}
        self.rv = 1
        self.history: list[Change] = []
        self.compacted_rv = 1  # watches from an RV before this get 410 Gone
        self.listeners: list[Callable[[Change], None]] = []

    def _commit(self, type_: str, obj: JSON, old: JSON | None) -> Change:
        change = Change(self.rv, type_, obj, old)
        self.history.append(change)
        for listener in list(self.listeners):
            listener(change)
        return change

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def create(self, obj: JSON) -> JSON:
        key = _key(obj)
        res = BY_KIND[obj["kind"]]
        if key in self.objects:
            name = key[2]
            raise APIError(409, "AlreadyExists", f'{res.plural} "{name}" already exists',
                           _details(res, name))
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self._next_rv()
        meta.pop("deletionTimestamp", None)
        self.objects[key] = obj
        self._commit("ADDED", obj, None)
        return obj

    def replace(self, obj: JSON, check_rv: bool = True) -> JSON:
        key = _key(obj)
        res = BY_KIND[obj["kind"]]
        old = self.objects.get(key)
        if old is None:
            raise _not_found(res, key[2])
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        given = meta.get("resourceVersion")
        if check_rv and given and given != old["metadata"]["resourceVersion"]:
            raise APIError(
                409, "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{key[2]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                _details(res, key[2]))
        meta["uid"] = old["metadata"]["uid"]
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        meta["resourceVersion"] = self._next_rv()
        self.objects[key] = obj
        self._commit("MODIFIED", obj, old)
        return obj

    def apply(self, obj: JSON) -> JSON:
        return self.replace(obj, check_rv=False) if _key(obj) in self.objects else self.create(obj)

    def delete(self, res: Resource, namespace: str, name: str) -> JSON:
        old = self.objects.pop((res.kind, namespace, name), None)
        if old is None:
            raise _not_found(res, name)
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._commit("DELETED", gone, old)
        return gone

    def compact(self) -> None:
        self.history.clear()
        self.compacted_rv = self.rv

    def snapshot(self, rv: int) -> dict[Key, JSON]:
        """The objects as they were at rv (from history); 410 if history no longer reaches it."""
        if rv >= self.rv:
            return dict(self.objects)
        if rv < self.compacted_rv:
            raise _expired(f"too old resource version: {rv} ({self.compacted_rv})")
        objects = dict(self.objects)
        for change in reversed(self.history):
            if change.rv <= rv:
                break
            key = _key(change.obj)
            if change.old is None:
                objects.pop(key, None)
            else:
                objects[key] = change.old
        return objects


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _served_as(res: Resource, obj: JSON) -> JSON:
    """The object as served at res's version (Istio's versions have the same fields: conversion None)."""
    return obj if obj.get("apiVersion") == res.api_version else {**obj, "apiVersion": res.api_version}


def _bare(obj: JSON) -> JSON:
    """An object as a list item: without kind and apiVersion, as the real server lists them."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# --- Table output (kubectl's default printing) ------------------------------------------------

def _age(timestamp: str | None) -> str:
    """Like k8s.io/apimachinery duration.HumanDuration, shortened."""
    if not timestamp:
        return "<unknown>"
    created = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    s = int((dt.datetime.now(dt.timezone.utc) - created).total_seconds())
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    return f"{d}d{h % 24}h" if d < 8 and h % 24 else f"{d}d"


def _pod_cells(o: JSON) -> list[Any]:
    status = o.get("status") or {}
    containers = (o.get("spec") or {}).get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    return [f"{ready}/{len(containers)}", status.get("phase", "Pending"), restarts,
            status.get("podIP") or "<none>", (o.get("spec") or {}).get("nodeName") or "<none>"]


def _node_cells(o: JSON) -> list[Any]:
    conditions = (o.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ["Ready" if ready else "NotReady", "<none>",
            ((o.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")]


def _service_cells(o: JSON) -> list[Any]:
    spec = o.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", "<none>",
            ports or "<none>", selector or "<none>"]


def _slice_cells(o: JSON) -> list[Any]:
    ports = ",".join(str(p.get("port", "")) for p in o.get("ports") or [])
    addrs = [a for e in o.get("endpoints") or [] for a in e.get("addresses") or []]
    return [o.get("addressType", ""), ports or "<unset>", ",".join(addrs) or "<unset>"]


def _col(name: str, type_: str = "string", priority: int = 0, fmt: str = "") -> JSON:
    return {"name": name, "type": type_, "format": fmt, "description": name, "priority": priority}


# per kind: columns between Name and Age, and the function giving their cells
TABLE_COLUMNS: dict[str, tuple[list[JSON], Callable[[JSON], list[Any]]]] = {
    "Namespace": ([_col("Status")],
                  lambda o: [(o.get("status") or {}).get("phase", "Active")]),
    "Pod": ([_col("Ready"), _col("Status"), _col("Restarts", "integer"), _col("IP", priority=1),
             _col("Node", priority=1)], _pod_cells),
    "Service": ([_col("Type"), _col("Cluster-IP"), _col("External-IP"), _col("Port(s)"),
                 _col("Selector", priority=1)], _service_cells),
    "EndpointSlice": ([_col("AddressType"), _col("Ports"), _col("Endpoints")], _slice_cells),
    # as Istio's CRDs print them (additionalPrinterColumns)
    "AuthorizationPolicy": ([_col("Action")], lambda o: [(o.get("spec") or {}).get("action", "")]),
    "PeerAuthentication": ([_col("Mode")], lambda o: [((o.get("spec") or {}).get("mtls") or {}).get("mode", "")]),
    "Node": ([_col("Status"), _col("Roles"), _col("Version")], _node_cells),
    "DestinationRule": ([_col("Host")], lambda o: [(o.get("spec") or {}).get("host", "")]),
    "TCPRoute": ([], lambda o: []),
    "TrafficSplit": ([_col("Service")], lambda o: [(o.get("spec") or {}).get("service", "")]),
    "WorkloadEntry": ([_col("Address")], lambda o: [(o.get("spec") or {}).get("address", "")]),
}


def _table(res: Resource, objs: Iterable[JSON], include: str, headers: bool,
           list_meta: JSON | None = None) -> JSON:
    columns, cells = TABLE_COLUMNS[res.kind]
    # as the real server: Name, the always-shown columns, Age, then the -o wide ones
    defs = ([_col("Name", fmt="name")] + [c for c in columns if c["priority"] == 0]
            + [_col("Age")] + [c for c in columns if c["priority"] != 0])
    rows = []
    for o in objs:
        values = dict(zip([c["name"] for c in columns], cells(o)))
        values["Name"] = o["metadata"]["name"]
        values["Age"] = _age(o["metadata"].get("creationTimestamp"))
        row: JSON = {"cells": [values[c["name"]] for c in defs]}
        if include == "Object":
            row["object"] = o
        elif include != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": o["metadata"]}
        rows.append(row)
    table: JSON = {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                   "metadata": list_meta or {}, "rows": rows}
    if headers:
        table["columnDefinitions"] = defs
    return table


def _wants_table(request: web.Request) -> bool:
    """Whether the Accept header asks for a meta.k8s.io Table (first acceptable form wins)."""
    for part in request.headers.get("Accept", "").split(","):
        params = dict(p.strip().split("=", 1) for p in part.split(";")[1:] if "=" in p)
        media = part.split(";")[0].strip()
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
            return params.get("v") in ("v1", "v1beta1")
        if media in ("application/json", "*/*", "") and "as" not in params:
            return False
    return False


# --- discovery ---------------------------------------------------------------------------------

def _resource_list(group_version: str, served: Iterable[Resource]) -> JSON:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
             "kind": r.kind, "verbs": VERBS, "shortNames": list(r.short_names),
             **({"categories": ["all"]} if r.kind in ("Pod", "Service") else {})}
            for r in served if r.api_version == group_version
        ],
    }


def _group(name: str, served: Iterable[Resource]) -> JSON:
    """The APIGroup: its served versions, the first (preferred) first."""
    versions = list(dict.fromkeys(r.version for r in served if r.group == name))
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def _groups(served: Iterable[Resource]) -> list[str]:
    return sorted({r.group for r in served if r.group})


def _openapi_v3(group_version: str, served: Iterable[Resource]) -> JSON:
    """What `kubectl apply` reads of a custom resource's OpenAPI v3 document: each PATCH takes
    the fieldValidation parameter (so kubectl leaves validation to the server, which accepts
    any object here) and not strategic merge patch (so kubectl sends a JSON merge patch)."""
    paths = {}
    for r in served:
        if r.api_version != group_version:
            continue
        paths[f"/apis/{group_version}/namespaces/{{namespace}}/{r.plural}/{{name}}"] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "requestBody": {"content": {t: {"schema": {"type": "object"}} for t in
                                        ("application/json-patch+json", "application/merge-patch+json")}},
            "responses": {"200": {"description": "OK"}},
        }}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION},
            "paths": paths, "components": {"schemas": {}}}


# --- watches -----------------------------------------------------------------------------------

class _Cut:
    """Sentinel: abort the connection now."""


CUT = _Cut()


@dataclasses.dataclass(eq=False)
class _Watch:
    filter: Filter
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    def on_change(self, change: Change) -> None:
        was, now = self.filter.matches(change.old), self.filter.matches(
            None if change.type == "DELETED" else change.obj)
        if change.type == "DELETED":
            if was:
                self.queue.put_nowait(("DELETED", change.obj))
        elif was and now:
            self.queue.put_nowait(("MODIFIED", change.obj))
        elif now:
            self.queue.put_nowait(("ADDED", change.obj))
        elif was:  # no longer selected: the real server reports it as deleted
            self.queue.put_nowait(("DELETED", change.obj))


class _Handlers:
    """The aiohttp handlers over one Store; lives as long as the KubeAPIServer (across restarts)."""

    def __init__(self, store: Store, bookmark_interval: float, security_versions: Iterable[str],
                 traffic_groups: Iterable[str] = TRAFFIC_GROUPS) -> None:
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.security_versions = tuple(security_versions)  # of security.istio.io; (): no Istio CRDs
        self.traffic_groups = tuple(traffic_groups)  # of TRAFFIC_GROUPS, those whose CRDs are installed
        self.watches: set[_Watch] = set()
        self.watch_count = 0
        self.list_count = 0
        self.requests: collections.Counter[str] = collections.Counter()  # resource requests by verb
        self._last_lists: dict[tuple[Any, ...], tuple[list[JSON], list[tuple[str, ...]]]] = {}  # see _matching
        self.address = ""
        self.tokens = TokenAuthority(store)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=16 * 1024 * 1024)
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/openapi/v3", self._openapi_paths)
        app.router.add_get("/openapi/v3/apis/{group}/{version}", self._openapi_group_version)
        app.router.add_post("/_test/apply", self._test_apply)
        app.router.add_post("/_test/delete", self._test_delete)
        app.router.add_post("/_test/cut-watches", self._test_cut)
        app.router.add_post("/_test/compact", self._test_compact)
        app.router.add_post("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", self._token_request)
        app.router.add_post(f"/apis/{AUTHENTICATION_GROUP}/v1/tokenreviews", self._token_review)
        app.router.add_route("*", "/api/{rest:.*}", self._resource)
        app.router.add_route("*", "/apis/{rest:.*}", self._resource)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            return web.json_response(e.status(), status=e.code)
        except web.HTTPNotFound:
            e = APIError(404, "NotFound", "the server could not find the requested resource")
            return web.json_response(e.status(), status=404)

    # discovery

    def served(self) -> list[Resource]:
        """The resources served now: security.istio.io only in the versions installed, a traffic
        group only while installed."""
        return [r for r in RESOURCES if (r.version in self.security_versions if r.group == SECURITY_GROUP
                                         else r.group not in TRAFFIC_GROUPS or r.group in self.traffic_groups)]

    async def _version(self, request: web.Request) -> web.Response:
        major, minor, _ = SERVER_VERSION[1:].split(".")
        return web.json_response({
            "major": major, "minor": minor, "gitVersion": SERVER_VERSION + "-amesh-test",
            "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z",
            "goVersion": "go1.23.4", "compiler": "gc", "platform": "linux/amd64"})

    async def _openapi_paths(self, request: web.Request) -> web.Response:
        """The OpenAPI v3 index: only the custom resources' group versions are described."""
        served = {r.api_version for r in self.served() if r.group in CUSTOM_GROUPS}
        return web.json_response({"paths": {
            f"apis/{gv}": {"serverRelativeURL": f"/openapi/v3/apis/{gv}?hash={gv.replace('/', '-')}"}
            for gv in sorted(served)}})

    async def _openapi_group_version(self, request: web.Request) -> web.Response:
        group_version = f"{request.match_info['group']}/{request.match_info['version']}"
        if not any(r.api_version == group_version and r.group in CUSTOM_GROUPS for r in self.served()):
            raise web.HTTPNotFound()
        return web.json_response(_openapi_v3(group_version, self.served()))

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": self.address}]})

    async def _apis(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                  "groups": [_group(g, self.served()) for g in _groups(self.served())]})

    # test controls over HTTP

    async def _test_apply(self, request: web.Request) -> web.Response:
        return web.json_response(self.apply(await _body(request)))

    async def _test_delete(self, request: web.Request) -> web.Response:
        body = await _body(request)
        return web.json_response(self.delete(body["kind"], body["name"], body.get("namespace")))

    async def _test_cut(self, request: web.Request) -> web.Response:
        return web.json_response({"cut": self.cut_watches()})

    async def _test_compact(self, request: web.Request) -> web.Response:
        self.compact()
        return web.json_response({"compactedResourceVersion": str(self.store.compacted_rv)})

    # service-account tokens

    async def _token_request(self, request: web.Request) -> web.Response:
        """TokenRequest (serviceaccounts/{name}/token), as kubelet asks for a projected token."""
        body = await _body(request)
        spec = body.get("spec") or {}
        seconds = spec.get("expirationSeconds", DEFAULT_TOKEN_SECONDS)
        if not isinstance(seconds, int) or seconds < MIN_TOKEN_SECONDS:
            raise APIError(422, "Invalid", f"TokenRequest.authentication.k8s.io is invalid: spec.expirationSeconds: "
                           f"Invalid value: {seconds!r}: may not specify a duration less than 10 minutes")
        token, expires = self.tokens.mint(request.match_info["namespace"], request.match_info["name"],
                                          tuple(spec.get("audiences") or ()), seconds, spec.get("boundObjectRef"))
        return web.json_response({
            "kind": "TokenRequest", "apiVersion": f"{AUTHENTICATION_GROUP}/v1", "metadata": {"creationTimestamp": None},
            "spec": {**spec, "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": _timestamp(expires)}}, status=201)

    async def _token_review(self, request: web.Request) -> web.Response:
        """TokenReview: who a token belongs to, or authenticated false with the reason."""
        body = await _body(request)
        spec = body.get("spec") or {}
        status = self.tokens.review(str(spec.get("token") or ""), tuple(spec.get("audiences") or ()))
        return web.json_response({"kind": "TokenReview", "apiVersion": f"{AUTHENTICATION_GROUP}/v1",
                                  "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
                                 status=201)

    # controls (on the loop)

    def apply(self, obj: JSON) -> JSON:
        return self.store.apply(_validated(obj, None, None))

    def delete(self, kind: str, name: str, namespace: str | None) -> JSON:
        res = resource_for(kind)
        return self.store.delete(res, (namespace or "") if res.namespaced else "", name)

    def cut_watches(self) -> int:
        watches = list(self.watches)
        for w in watches:
            w.queue.put_nowait(CUT)
        return len(watches)

    def compact(self) -> None:
        self.store.compact()
        bookmark = self._bookmark()
        for w in self.watches:
            if w.bookmarks:
                w.queue.put_nowait(("BOOKMARK", bookmark))

    # resources

    def _route(self, request: web.Request) -> tuple[Resource, str | None, str | None]:
        """(resource, namespace or None for all, name or None) for a resource path (without a
        trailing /status: see `_status_route`)."""
        parts = [p for p in request.path.split("/") if p]
        if self._status_route(request):
            parts = parts[:-1]
        if parts[0] == "api":
            if len(parts) < 2 or parts[1] != "v1":
                raise web.HTTPNotFound()
            gv, rest = "v1", parts[2:]
        else:
            if len(parts) < 3:
                raise web.HTTPNotFound()
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        by_path = {(r.api_version, r.plural): r for r in self.served()}
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
            res = by_path.get((gv, rest[0]))
            if res is None or not res.namespaced or len(rest) > 2:
                raise web.HTTPNotFound()
            return res, ns, rest[1] if len(rest) == 2 else None
        res = by_path.get((gv, rest[0])) if rest else None
        if res is None or len(rest) > 2 or (len(rest) == 2 and res.namespaced):
            raise web.HTTPNotFound()
        return res, None, rest[1] if len(rest) == 2 else None

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        served = self.served()
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in _groups(served):
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1], served)})
        gv = "v1" if parts[0] == "api" else "/".join(parts[1:3])
        if (parts[0] == "api" and len(parts) == 2) or (parts[0] == "apis" and len(parts) == 3):
            if any(r.api_version == gv for r in served):
                return web.json_response(_resource_list(gv, served))
            raise web.HTTPNotFound()
        res, ns, name = self._route(request)
        status = self._status_route(request)
        if status and (name is None or not res.status_subresource):
            raise web.HTTPNotFound()
        method = request.method
        self.requests[_verb(method, name, _parse_bool(request.query.get("watch")))] += 1
        if name is None:
            if method == "GET":
                if _parse_bool(request.query.get("watch")):
                    return await self._watch(request, res, ns)
                return self._list(request, res, ns)
            if method == "POST" and (ns is not None or not res.namespaced):
                obj = _validated(await _body(request), res, ns)
                if res.status_subresource:
                    obj.pop("status", None)  # set through /status only
                obj = self.store.create(obj)
                return web.json_response(obj, status=201)
            raise APIError(405, "MethodNotAllowed", f"{method} is not supported on {res.plural}")
        key_ns = ns or ""
        if method == "GET":
            obj = self.store.objects.get((res.kind, key_ns, name))
            if obj is None:
                raise _not_found(res, name)
            return self._object_response(request, res, obj)
        if method == "PUT":
            obj = _validated(await _body(request), res, ns)
            if obj["metadata"]["name"] != name:
                raise APIError(400, "BadRequest",
                               "the name of the object does not match the name on the URL")
            return web.json_response(self.store.replace(_written(res, self.store.objects.get((res.kind, key_ns, name)),
                                                                 obj, status)))
        if method == "PATCH":
            current = self.store.objects.get((res.kind, key_ns, name))
            if current is None:
                raise _not_found(res, name)
            ctype = request.content_type
            if ctype not in ("application/merge-patch+json",
                             "application/strategic-merge-patch+json"):
                raise APIError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format: {ctype}")
            patched = merge_patch(_served_as(res, current), await _body(request))
            patched = _validated(patched, res, ns)
            patched["metadata"]["name"] = name
            return web.json_response(self.store.replace(_written(res, current, patched, status)))
        if method == "DELETE" and not status:
            return web.json_response(_served_as(res, self.store.delete(res, key_ns, name)))
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported on {res.plural}/{name}")

    @staticmethod
    def _status_route(request: web.Request) -> bool:
        """Whether the path is an object's status subresource: .../namespaces/{ns}/{plural}/{name}/status."""
        parts = [p for p in request.path.split("/") if p]
        return len(parts) >= 6 and parts[-1] == "status" and parts[-5] == "namespaces"

    def _object_response(self, request: web.Request, res: Resource, obj: JSON) -> web.Response:
        if _wants_table(request):
            include = request.query.get("includeObject", "Metadata")
            table = _table(res, [obj], include, True,
                           {"resourceVersion": obj["metadata"]["resourceVersion"]})
            return web.json_response(table)
        return web.json_response(_served_as(res, obj))

    def _filter(self, request: web.Request, res: Resource, ns: str | None) -> Filter:
        q = request.query
        return Filter(res, ns, parse_label_selector(q.get("labelSelector", "")),
                      parse_field_selector(q.get("fieldSelector", "")))

    def _matching(self, rv: int, res: Resource, ns: str | None, flt: Filter,
                  request: web.Request) -> tuple[list[JSON], list[tuple[str, ...]]]:
        """The objects a list matches at rv, in key order, and their (namespace, name) keys. The
        last answers (of lists of several kinds paging at once) are kept for the pages after the
        first, which ask at the same rv (as etcd serves each page as a key range, not by sorting
        the whole collection again)."""
        query = (rv, self.store.compacted_rv, res.kind, ns, request.query.get("labelSelector"),
                 request.query.get("fieldSelector"))
        if query in self._last_lists:
            return self._last_lists[query]
        matched = sorted((o for o in self.store.snapshot(rv).values() if flt.matches(o)), key=_key)
        answer = self._last_lists[query] = (matched, [_key(o)[1:] for o in matched])
        while len(self._last_lists) > LISTS_KEPT:
            del self._last_lists[next(iter(self._last_lists))]  # the oldest
        return answer

    def _list(self, request: web.Request, res: Resource, ns: str | None) -> web.Response:
        self.list_count += 1
        q = request.query
        flt = self._filter(request, res, ns)
        rv, start = self.store.rv, ""
        if token := q.get("continue"):
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                rv, start = int(state["rv"]), state["start"]
            except (ValueError, KeyError, TypeError):
                raise APIError(400, "BadRequest", "continue key is not valid") from None
            if rv < self.store.compacted_rv:
                raise _expired("The provided continue parameter is too old to display a "
                               "consistent list result. You can start a new list without the "
                               "continue parameter.")
        elif q.get("resourceVersionMatch") == "Exact":
            # without Exact, any resourceVersion means "not older than": the current state
            try:
                rv = int(q.get("resourceVersion", ""))
            except ValueError:
                raise APIError(400, "BadRequest", "resourceVersionMatch=Exact needs a "
                               "resourceVersion") from None
        matched, keys = self._matching(rv, res, ns, flt, request)
        begin = bisect.bisect_right(keys, tuple(start.split("/", 1))) if start else 0
        items = matched[begin:]
        meta: JSON = {"resourceVersion": str(rv)}
        limit = int(q.get("limit", "0") or 0)
        if limit > 0 and len(items) > limit:
            items = items[:limit]
            last = "/".join(keys[begin + limit - 1])
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": rv, "start": last}).encode()).decode()
            meta["remainingItemCount"] = len(matched) - begin - limit
        if _wants_table(request):
            include = q.get("includeObject", "Metadata")
            return web.json_response(_table(res, items, include, True, meta))
        return web.json_response({"kind": res.list_kind, "apiVersion": res.api_version,
                                  "metadata": meta, "items": [_bare(o) for o in items]})

    def _bookmark(self, extra_annotations: JSON | None = None) -> JSON:
        meta: JSON = {"resourceVersion": str(self.store.rv)}
        if extra_annotations:
            meta["annotations"] = extra_annotations
        return meta

    async def _watch(self, request: web.Request, res: Resource, ns: str | None) -> web.StreamResponse:
        self.watch_count += 1
        q = request.query
        flt = self._filter(request, res, ns)
        bookmarks = _parse_bool(q.get("allowWatchBookmarks"))
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        table = _wants_table(request)
        include = q.get("includeObject", "Metadata")
        rv_param = q.get("resourceVersion", "")
        initial_end = _parse_bool(q.get("sendInitialEvents"))

        # All on the loop with no await in between: the backlog and the registration see the
        # same state, so no change is lost or doubled.
        watch = _Watch(flt, bookmarks, request)
        backlog: list[tuple[str, JSON]] = []
        expired: APIError | None = None
        if rv_param in ("", "0") or initial_end:
            backlog = [("ADDED", o) for o in sorted(self.store.objects.values(), key=_key)
                       if flt.matches(o)]
            if initial_end and bookmarks:
                backlog.append(("BOOKMARK", self._bookmark({"k8s.io/initial-events-end": "true"})))
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise APIError(400, "BadRequest", "invalid resourceVersion") from None
            if since < self.store.compacted_rv:
                expired = _expired(
                    f"too old resource version: {since} ({self.store.compacted_rv})")
            else:
                for change in self.store.history:
                    if change.rv > since:
                        watch.on_change(change)
        if expired is None:
            self.store.listeners.append(watch.on_change)
            self.watches.add(watch)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if expired is not None:
                await _send(resp, {"type": "ERROR", "object": expired.status()})
                await resp.write_eof()
                return resp
            headers_sent = False

            async def emit(type_: str, obj: JSON) -> None:
                nonlocal headers_sent
                if type_ == "BOOKMARK":
                    obj = {"kind": res.kind, "apiVersion": res.api_version, "metadata": obj}
                elif table:
                    obj = _table(res, [obj], include, not headers_sent,
                                 {"resourceVersion": obj["metadata"]["resourceVersion"]})
                    headers_sent = True
                else:
                    obj = _served_as(res, obj)
                await _send(resp, {"type": type_, "object": obj})

            for type_, obj in backlog:
                await emit(type_, obj)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    await resp.write_eof()
                    return resp
                if bookmarks and now >= next_bookmark:
                    await emit("BOOKMARK", self._bookmark())
                    next_bookmark = now + self.bookmark_interval
                wait = CLOSE_CHECK_INTERVAL
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if bookmarks:
                    wait = min(wait, max(next_bookmark - now, 0))
                try:
                    item = await asyncio.wait_for(watch.queue.get(), max(wait, 0.001))
                except asyncio.TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        return resp  # the client went away
                    continue
                if item is CUT:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await emit(*item)
        except (ConnectionError, RuntimeError):
            return resp  # the client went away mid-write
        finally:
            self.watches.discard(watch)
            if watch.on_change in self.store.listeners:
                self.store.listeners.remove(watch.on_change)


def _parse_bool(value: str | None) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (clients send "True" too)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


async def _send(resp: web.StreamResponse, event: JSON) -> None:
    await resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


async def _body(request: web.Request) -> JSON:
    try:
        body = json.loads(await request.text())
    except ValueError as e:
        raise APIError(400, "BadRequest", f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "BadRequest", "the request body must be a JSON object")
    return body


def _written(res: Resource, current: JSON | None, new: JSON, to_status: bool) -> JSON:
    """What a PUT or PATCH of `new` stores, for a resource with a status subresource: written to
    /status, the current object with the new status (and the resourceVersion given, checked);
    written to the object, the new object with the current status."""
    if not res.status_subresource or current is None:
        return new
    if to_status:
        meta = {**current["metadata"]}
        if new["metadata"].get("resourceVersion"):
            meta["resourceVersion"] = new["metadata"]["resourceVersion"]
        return {**current, "metadata": meta, "status": new.get("status")}
    kept = {k: v for k, v in new.items() if k != "status"}
    if "status" in current:
        kept["status"] = current["status"]
    return kept


def _validated(obj: JSON, res: Resource | None, ns: str | None) -> JSON:
    """A copy of obj checked against the URL's resource and namespace, namespace filled in."""
    if not isinstance(obj, dict):
        raise APIError(400, "BadRequest", "an object must be a JSON object")
    obj = copy.deepcopy(obj)
    kind = obj.get("kind")
    if res is None:
        if obj.get("apiVersion") not in API_VERSIONS_OF_KIND.get(kind, ()):
            raise APIError(400, "BadRequest",
                           f"unsupported object {obj.get('apiVersion')}/{kind}; served: "
                           + ", ".join(f"{r.api_version}/{r.kind}" for r in RESOURCES))
        res = next(r for r in RESOURCES if r.api_version == obj["apiVersion"] and r.kind == kind)
    else:
        if kind not in (None, res.kind) or obj.get("apiVersion") not in (None, res.api_version):
            raise APIError(400, "BadRequest",
                           f"the API version in the data ({obj.get('apiVersion')}) and kind "
                           f"({kind}) do not match the URL ({res.api_version}/{res.kind})")
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise APIError(400, "BadRequest", "metadata must be an object")
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
    if not meta.get("name"):
        raise APIError(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required value")
    if res.namespaced:
        given = meta.get("namespace")
        if ns is not None and given not in (None, "", ns):
            raise APIError(400, "BadRequest", "the namespace of the provided object does not "
                           "match the namespace sent on the request")
        meta["namespace"] = ns or given or "default"
    else:
        meta.pop("namespace", None)
    obj.setdefault("metadata", meta)
    return obj


# --- service-account tokens: TokenRequest and TokenReview --------------------------------------

AUTHENTICATION_GROUP = "authentication.k8s.io"
TOKEN_ISSUER = "https://kubernetes.default.svc.cluster.local"  # the iss claim, and the audience by default
MIN_TOKEN_SECONDS = 600  # TokenRequest's floor for spec.expirationSeconds, as the real API validates it
DEFAULT_TOKEN_SECONDS = 3600
# user.extra keys of a token bound to a pod (Kubernetes 1.32 adds the node's when it knows it)
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _timestamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenAuthority:
    """Mints and reviews service-account tokens as the real API server does: JWTs with its
    claims (iss, sub, aud, exp, and the bound pod and node under "kubernetes.io"), signed with a
    key only this server holds (HS256 here, where the real one uses RS256: a token another server
    minted is foreign). A review checks the signature, expiry, audiences and that the bound pod
    still exists with the same uid. Used only on the server's loop."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._key = secrets.token_bytes(32)

    def mint(self, namespace: str, service_account: str, audiences: tuple[str, ...], seconds: float,
             bound: JSON | None = None) -> tuple[str, float]:
        """(token, expiry in Unix seconds); bound: a boundObjectRef naming a Pod (APIError otherwise)."""
        now = self._clock()
        claims: JSON = {"iss": TOKEN_ISSUER, "sub": f"system:serviceaccount:{namespace}:{service_account}",
                        "aud": list(audiences or (TOKEN_ISSUER,)), "iat": int(now), "nbf": int(now),
                        "exp": int(now + seconds), "jti": str(uuid.uuid4()),
                        "kubernetes.io": {"namespace": namespace, "serviceaccount": {
                            "name": service_account, "uid": _account_uid(namespace, service_account)}}}
        if bound:
            claims["kubernetes.io"].update(self._bound_pod(namespace, service_account, bound))
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{header}.{payload}.{self._sign(f'{header}.{payload}')}", now + seconds

    def _bound_pod(self, namespace: str, service_account: str, ref: JSON) -> JSON:
        if ref.get("kind") != "Pod":
            raise APIError(422, "Invalid", f"TokenRequest.authentication.k8s.io is invalid: spec.boundObjectRef.kind: "
                           f"Unsupported value: {ref.get('kind')!r}: this test server binds tokens to Pods only")
        name = str(ref.get("name") or "")
        pod = self._store.objects.get(("Pod", namespace, name))
        if pod is None:
            raise _not_found(BY_KIND["Pod"], name)
        uid = pod["metadata"]["uid"]
        if ref.get("uid") and ref["uid"] != uid:
            raise APIError(409, "Conflict", f"the UID in the bound object reference ({ref['uid']}) does not match "
                           f"the UID in record. The object might have been deleted and then recreated")
        if (pod.get("spec") or {}).get("serviceAccountName", "default") != service_account:
            raise APIError(400, "BadRequest", f'cannot bind token for serviceaccount "{service_account}" to pod '
                           "running with different serviceaccount name.")
        claims: JSON = {"pod": {"name": name, "uid": uid}}
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            claims["node"] = {"name": node}
        return claims

    def review(self, token: str, audiences: tuple[str, ...]) -> JSON:
        """A TokenReview's status for `token` checked against `audiences` (default: this server's)."""
        try:
            claims = self._verified(token)
        except ValueError as e:
            return {"authenticated": False, "user": {}, "error": f"[invalid bearer token, {e}]"}
        wanted = audiences or (TOKEN_ISSUER,)
        common = [a for a in claims["aud"] if a in wanted]
        if not common:
            return {"authenticated": False, "user": {}, "error": "[invalid bearer token, token audiences "
                    f"{json.dumps(claims['aud'])} is invalid for the target audiences {json.dumps(list(wanted))}]"}
        k8s = claims["kubernetes.io"]
        extra = {CREDENTIAL_ID_EXTRA: [f"JTI={claims['jti']}"]}
        if "pod" in k8s:
            pod = self._store.objects.get(("Pod", k8s["namespace"], k8s["pod"]["name"]))
            if pod is None or pod["metadata"]["uid"] != k8s["pod"]["uid"]:
                return {"authenticated": False, "user": {}, "error": "[invalid bearer token, service account token "
                        f"has been invalidated: pod {k8s['namespace']}/{k8s['pod']['name']} no longer exists]"}
            extra[POD_NAME_EXTRA] = [k8s["pod"]["name"]]
            extra[POD_UID_EXTRA] = [k8s["pod"]["uid"]]
            if "node" in k8s:
                extra[NODE_NAME_EXTRA] = [k8s["node"]["name"]]
        namespace = k8s["namespace"]
        return {"authenticated": True, "audiences": common, "user": {
            "username": claims["sub"], "uid": k8s["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": extra}}

    def _verified(self, token: str) -> JSON:
        """The claims of a token this server signed and that has not expired; ValueError otherwise."""
        parts = token.split(".")
        if len(parts) != 3 or not hmac.compare_digest(self._sign(f"{parts[0]}.{parts[1]}"), parts[2]):
            raise ValueError("token not signed by this API server")
        claims = json.loads(_unb64(parts[1]))
        if claims.get("iss") != TOKEN_ISSUER:
            raise ValueError("token issued by another issuer")
        if claims["exp"] <= self._clock():
            raise ValueError("service account token has expired")
        return claims

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


def _account_uid(namespace: str, name: str) -> str:
    """A stable uid for a ServiceAccount (this server keeps no ServiceAccount objects)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{name}"))


# --- the synchronous wrapper ------------------------------------------------------------------

def _verb(method: str, name: str | None, watch: bool) -> str:
    """The Kubernetes verb of a resource request, as the API server's audit log names it."""
    if method == "GET":
        return "watch" if watch else ("list" if name is None else "get")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


class KubeAPIServer:
    """The test API server in a background thread; every control is safe from any thread.

    apply/delete/compact/cut_watches take effect on the server's loop before they return.
    stop() closes the listening socket and every connection (keeping objects, RV and counters);
    start() listens again on the same port: an API server restart.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
                 objects: Iterable[JSON] = (),
                 security_versions: Iterable[str] = SECURITY_VERSIONS,
                 traffic_groups: Iterable[str] = TRAFFIC_GROUPS) -> None:
        self.host, self.port = host, port
        self._handlers = _Handlers(Store(), bookmark_interval, security_versions, traffic_groups)
        self._initial = list(objects)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # lifecycle

    def __enter__(self) -> "KubeAPIServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Listen (again); the first call starts the loop thread and loads the initial objects."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever,
                                            name="kubeapi", daemon=True)
            self._thread.start()
            for obj in self._initial:
                self.apply(obj)
        self._call(self._start())

    def stop(self) -> None:
        """Stop listening and close every connection; state is kept for start()."""
        if self._loop is not None:
            self._call(self._stop())

    def close(self) -> None:
        """Stop and end the loop thread."""
        if self._loop is None:
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()
        self._loop = self._thread = None

    async def _start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self._handlers.app(), shutdown_timeout=SHUTDOWN_TIMEOUT,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = runner.addresses[0][1]
        self._handlers.address = f"{self.host}:{self.port}"
        self._runner = runner

    async def _stop(self) -> None:
        if self._runner is None:
            return
        self._handlers.cut_watches()
        await asyncio.sleep(0)  # let the watches see the cut
        runner, self._runner = self._runner, None
        await runner.cleanup()

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "the server is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self._call(run())

    # state

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def resource_version(self) -> int:
        return self._handlers.store.rv

    @property
    def watch_count(self) -> int:
        return self._handlers.watch_count

    @property
    def list_count(self) -> int:
        return self._handlers.list_count

    @property
    def requests(self) -> dict[str, int]:
        """Resource requests served so far, by verb (list, watch, get, create, update, patch, delete)."""
        return dict(self._handlers.requests)

    @property
    def open_watches(self) -> int:
        return len(self._handlers.watches)

    def apply(self, obj: JSON) -> JSON:
        """Create or replace obj (by kind, namespace, name); returns the stored object."""
        return copy.deepcopy(self._on_loop(self._handlers.apply, obj))

    def delete(self, kind: str, name: str, namespace: str | None = None) -> JSON:
        """Delete an object ("Pod" or "pods"); returns it; APIError (404) if absent."""
        return copy.deepcopy(self._on_loop(self._handlers.delete, kind, name, namespace))

    def get(self, kind: str, name: str, namespace: str | None = None) -> JSON | None:
        """The stored object, or None."""
        res = resource_for(kind)
        key = (res.kind, (namespace or "") if res.namespaced else "", name)
        return copy.deepcopy(self._on_loop(self._handlers.store.objects.get, key))

    def serve_security_versions(self, *versions: str) -> None:
        """Serve security.istio.io in these versions from now on (none: Istio's CRDs not installed).

        Only discovery and routing change: stored objects stay, and open watches go on."""
        self._on_loop(setattr, self._handlers, "security_versions", versions)

    def serve_traffic_groups(self, *groups: str) -> None:
        """Serve these of TRAFFIC_GROUPS from now on (their CRDs installed); the others not."""
        self._on_loop(setattr, self._handlers, "traffic_groups", groups)

    def cut_watches(self) -> int:
        """Abort every open watch connection mid-stream; returns how many."""
        return self._on_loop(self._handlers.cut_watches)

    def compact(self) -> None:
        """Drop history up to now: watches and Exact lists from older RVs get 410 Gone."""
        self._on_loop(self._handlers.compact)

    def request_token(self, namespace: str, service_account: str, pod: str | None = None,
                      audiences: Iterable[str] = (), seconds: float = DEFAULT_TOKEN_SECONDS) -> str:
        """A service-account token as TokenRequest mints it, bound to `pod` when given; a test may
        ask for any lifetime (the HTTP API refuses less than 10 minutes)."""
        bound = {"kind": "Pod", "apiVersion": "v1", "name": pod} if pod else None
        token, _ = self._on_loop(self._handlers.tokens.mint, namespace, service_account, tuple(audiences),
                                 seconds, bound)
        return token

    def write_kubeconfig(self, path: str | Path) -> Path:
        """Write a kubeconfig for this server (no auth, current-context set); returns path."""
        path = Path(path)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kubeapi-test", "cluster": {"server": self.url}}],
            "users": [{"name": "kubeapi-test", "user": {}}],
            "contexts": [{"name": "kubeapi-test",
                          "context": {"cluster": "kubeapi-test", "user": "kubeapi-test"}}],
            "current-context": "kubeapi-test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


def load_objects(text: str) -> Iterator[JSON]:
    """Objects of multi-document YAML, `List` documents unpacked."""
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc.get("kind", "").endswith("List") and "items" in doc:
            yield from doc["items"]
        else:
            yield doc


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--objects", type=Path, help="multi-document YAML of initial objects")
    p.add_argument("--bookmark-interval", type=float, default=DEFAULT_BOOKMARK_INTERVAL,
                   help="seconds between BOOKMARK events")
    p.add_argument("--kubeconfig", type=Path, help="also write a kubeconfig here")
    args = p.parse_args(argv)
    objects = list(load_objects(args.objects.read_text())) if args.objects else []
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with KubeAPIServer(args.host, args.port, args.bookmark_interval, objects) as api:
        if args.kubeconfig:
            api.write_kubeconfig(args.kubeconfig)
        print(f"listening {api.url}", flush=True)
        done.wait()


if __name__ == "__main__":
    main()
