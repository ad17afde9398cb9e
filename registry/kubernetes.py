"""Registry source: the Kubernetes API server, through list and watch.

`KubernetesSource` lists Namespaces, Pods, Services, discovery.k8s.io/v1 EndpointSlices,
Istio's security.istio.io AuthorizationPolicies and PeerAuthentications, the custom resources that
shape traffic (Istio's networking.istio.io DestinationRules, Gateway API TCPRoutes, SMI
TrafficSplits), Istio's WorkloadEntries (registry/workloadentries.py: their heartbeats lapse on a
timer, without an event) and this node's own Node (for its zone), then watches each from
the list's resourceVersion (with bookmarks), and reads each object into a
`registry.incremental.IncrementalRegistry` as it arrives (the same rules as the registry file's
`build_state`, but an event recomputes only what it touches, and only what the rules use of an
object is kept, not its JSON); it publishes the registry's state after the initial sync and after
each burst of changes. Lists are read in pages (`list_page` objects each), so the initial list
never holds the whole cluster's JSON at once. A cut watch resumes from the last
resourceVersion seen; 410 Gone relists that kind; connection errors retry with capped
exponential backoff and jitter, while the last good state keeps serving. An object the rules
reject is skipped and reported, never the whole state.

Istio's, Gateway API's and SMI's kinds are custom resources: each is read at the first of its
apiVersions the server serves (security.istio.io v1, else v1beta1 from an older Istio). Where none
is served (the CRDs are not installed) the cluster has none of them: the source says so and looks
again every `discovery_interval`, and the rest of the registry is synced and served as usual. A
policy whose new version the rules reject would, if skipped, widen access (a DENY that vanishes,
an ALLOW that no longer restricts, STRICT no longer required), and a Service or traffic rule
would drop its limits, split or breaker settings, so for these kinds the last good version stays
in force until the object is deleted; an object never seen good is skipped.

Nodes: only this node's own Node is watched (a field selector on its name, given as `node`), for
its topology.kubernetes.io/zone label; a watch of every Node from every node would cost the API
server the square of the cluster's size. Other nodes' zones come from EndpointSlices.

Client. The requests are made by registry/kubeclient.py over aiohttp (configuration from a
kubeconfig or the in-cluster service account, its token read again whenever kubelet rotates it)
and this module does the protocol: list pages with limit/continue, each page's JSON read with one
json.loads and each item handed to the registry as the dict it is; watches from the list's
resourceVersion with allowWatchBookmarks, one json.loads per event line. It first ran on
kubernetes_asyncio (chosen over kr8s, whose watch has no bookmarks and restarts a 410 from the
same stale resourceVersion, and lightkube: no bookmarks, a second HTTP stack), with raw JSON
answers: only that library's configuration, authentication and URLs were used, and its client
package imports all of its ~850 generated API and model modules (33 MiB of an idle agent's
105 MiB) for the three calls this module makes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from registry.incremental import IncrementalRegistry
from registry.kubeclient import ClusterConfig, ConfigError, KubeClient, load_configuration
from registry.model import RegistryState
from registry.objects import CLUSTER_SCOPED
from registry.policies import API_VERSIONS as POLICY_API_VERSIONS
from registry.traffic import DESTINATION_RULE_API_VERSIONS, TCP_ROUTE_API_VERSIONS, TRAFFIC_SPLIT_API_VERSIONS
from registry.workloadentries import WORKLOAD_ENTRY_API_VERSIONS

log = logging.getLogger("amesh.registry")

SOURCE = "kubernetes"

# (kind, namespace, name); namespace is "" for a Namespace
ObjectKey = tuple[str, str, str]


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_versions: tuple[str, ...]  # preferred first; a later one is read when the server serves no earlier
    api: str  # "core" (served under /api), "discovery", or "custom" (a custom resource; both under /apis)
    plural: str  # the resource's name in its URL, listed across all namespaces
    # a custom resource (policy or traffic rule): its CRD may be absent (then none of it, and looked
    # for again), and a rejected version leaves the last good one in force
    policy: bool = False
    crds: str = ""  # whose CRDs serve it, for the notice when they are absent
    meaning: str = ""  # what the cluster goes without then
    own_node: bool = False  # only the Node named by the source's `node`


_ISTIO = "Istio's"


KINDS = (
    _Kind("Namespace", ("v1",), "core", "namespaces"),
    _Kind("Node", ("v1",), "core", "nodes", own_node=True),
    _Kind("Pod", ("v1",), "core", "pods"),
    _Kind("Service", ("v1",), "core", "services"),
    _Kind("EndpointSlice", ("discovery.k8s.io/v1",), "discovery", "endpointslices"),
    _Kind("AuthorizationPolicy", POLICY_API_VERSIONS, "custom", "authorizationpolicies", True, _ISTIO,
          "Istio policies"),
    _Kind("PeerAuthentication", POLICY_API_VERSIONS, "custom", "peerauthentications", True, _ISTIO, "Istio policies"),
    _Kind("DestinationRule", DESTINATION_RULE_API_VERSIONS, "custom", "destinationrules", True, _ISTIO,
          "DestinationRules (connection limits, outlier detection, balancers)"),
    _Kind("TCPRoute", TCP_ROUTE_API_VERSIONS, "custom", "tcproutes", True, "Gateway API's experimental",
          "TCPRoute splits"),
    _Kind("TrafficSplit", TRAFFIC_SPLIT_API_VERSIONS, "custom", "trafficsplits", True, "SMI's", "TrafficSplits"),
    _Kind("WorkloadEntry", WORKLOAD_ENTRY_API_VERSIONS, "custom", "workloadentries", True, _ISTIO,
          "WorkloadEntries (workloads outside Kubernetes)"),
)
LAPSE_MARGIN = 0.005  # seconds past a WorkloadEntry's heartbeat deadline the publisher wakes: lapsed by then


class _Gone(Exception):
    """The resourceVersion we hold is too old for the server (410): relist."""


class _ApiStatusError(Exception):
    """The API server answered with an error status other than 410."""


class _NotFound(_ApiStatusError):
    """404: the server does not serve the kind at that apiVersion (or the resource is gone)."""


class _NotServed(Exception):
    """A policy kind served at none of its apiVersions: Istio's CRDs are not installed."""


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: initial, doubling up to cap, x uniform(0.5, 1.5)."""

    initial: float = 0.5  # seconds
    cap: float = 30.0  # seconds
    _next: float = field(default=0.0, init=False, repr=False)  # the next base delay; 0: initial

    def delay(self) -> float:
        """The next delay to wait, in seconds; each call doubles the base up to the cap."""
        base = self._next or self.initial
        self._next = min(base * 2, self.cap)
        return base * random.uniform(0.5, 1.5)

    def reset(self) -> None:
        self._next = 0.0


class KubernetesSource:
    """A registry source that lists and watches the Kubernetes API server (every kind of KINDS,
    or those named in `kinds`: the cluster CA follows Pods only)."""

    def __init__(
        self,
        on_state: Callable[[RegistryState], None],
        on_error: Callable[[str], None],
        kubeconfig: str | None = None,
        *,
        context: str | None = None,
        configuration: ClusterConfig | None = None,  # ready-made, instead of loading one
        publish_interval: float = 0.0,  # seconds to wait for the rest of a burst; 0: the events already read
        backoff_initial: float = 0.5,  # seconds before the first retry after an error
        backoff_cap: float = 30.0,  # seconds; the longest wait between retries
        watch_timeout: float = 300.0,  # seconds; the server ends a watch after 1-2x this
        read_timeout: float = 120.0,  # seconds of silence before a watch is deemed dead
        connect_timeout: float = 10.0,  # seconds
        list_timeout: float = 60.0,  # seconds for one page of a list
        list_page: int = 500,  # objects per page of a list
        discovery_interval: float = 30.0,  # seconds between looks for policy kinds not served
        node: str | None = None,  # this node's name: its Node is watched for its zone; None: no Node
        kinds: tuple[str, ...] | None = None,  # the kinds to follow (e.g. ("Pod",)); None: all of KINDS
    ) -> None:
        self.kubeconfig = kubeconfig
        self.node = node
        self._kinds = tuple(k for k in KINDS if (node or not k.own_node) and (kinds is None or k.kind in kinds))
        self.context = context
        self.publish_interval = publish_interval
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.list_timeout = list_timeout
        self.list_page = list_page
        self.discovery_interval = discovery_interval
        # the last connection or API problem; None while every watch is healthy
        self._outage: str | None = None
        self._on_state = on_state
        self._on_error = on_error
        self._configuration = configuration
        self._state: RegistryState | None = None
        self._registry = IncrementalRegistry(SOURCE)
        self._rv: dict[str, str | None] = {k.kind: None for k in self._kinds}
        self._watching: dict[str, bool] = {k.kind: False for k in self._kinds}
        self._listed: set[str] = set()
        self._api_version: dict[str, str] = {k.kind: k.api_versions[0] for k in self._kinds}  # the one read
        self._not_served: set[str] = set()  # policy kinds the server serves at none of their versions
        self._healthy_at: float | None = None  # wall clock when last seen all-healthy
        self._changed = asyncio.Event()
        # ADDED/MODIFIED/DELETED events applied, by kind (not bookmarks, not list items)
        self.event_counts: dict[str, int] = {k.kind: 0 for k in self._kinds}
        self._outage_reported = False
        self._collector_paused = False  # the cyclic garbage collector paused for the initial sync (see run)

    # --- what the agent reads ---

    @property
    def state(self) -> RegistryState | None:
        """The last state published, or None before the initial sync."""
        return self._state

    @property
    def connected(self) -> bool:
        """True when the initial sync is done and every kind's watch is open (a policy kind the
        server does not serve has nothing to watch)."""
        return len(self._listed) == len(self._kinds) and all(
            watching or kind in self._not_served for kind, watching in self._watching.items())

    @property
    def last_error(self) -> str | None:
        """What `ameshctl status` shows as the registry's error: the API server problem, if any;
        else the objects rejected; None when there is none."""
        if self._outage is not None:
            return self._outage
        rejected = self._registry.rejected
        if rejected:
            first = next(iter(rejected.values()))
            more = f" (and {len(rejected) - 1} more; see the agent's log)" if len(rejected) > 1 else ""
            return f"rejected {first}{more}"
        return None

    @property
    def notice(self) -> str | None:
        """What is worth knowing but not wrong: the custom resource kinds the API server does not
        serve (a cluster without Istio's, Gateway API's or SMI's CRDs), while it is so."""
        if not self._not_served:
            return None
        by_meaning: dict[str, list[_Kind]] = {}
        for kind in self._kinds:
            if kind.kind in self._not_served:
                by_meaning.setdefault(kind.meaning, []).append(kind)
        sentences = []
        for meaning, kinds in by_meaning.items():
            versions = ", ".join(dict.fromkeys(v for k in kinds for v in k.api_versions))
            sentences.append(f"{' and '.join(k.kind for k in kinds)} not served by the Kubernetes API server "
                             f"{self._host()} at {versions} ({kinds[0].crds} CRDs not installed?): no {meaning} from "
                             "the cluster")
        return "; ".join(sentences) + f"; looking again every {self.discovery_interval:g} s"

    @property
    def synced_at(self) -> float | None:
        """Wall-clock time the source last knew it was current (synced, every watch healthy)."""
        if self.connected and self._state is not None:
            return time.time()
        return self._healthy_at

    @property
    def rejected(self) -> dict[ObjectKey, str]:
        """Objects whose current version the rules reject, with the reason and what was done
        (skipped, or the policy's last good version kept in force)."""
        return dict(self._registry.rejected)

    # --- running ---

    async def run(self) -> None:
        """Until cancelled: list and watch every kind, publishing each new state."""
        if self._configuration is None:
            self._configuration = load_configuration(self.kubeconfig, self.context)
        # The initial sync makes a few containers per field of every object it reads (millions at
        # 50,000 pods), none of them in a cycle, and the collector would walk them again and again:
        # a fifth of the sync's CPU at 10,000 pods. It is paused until the first state, which is
        # then frozen out of its full passes (as the agent freezes its start-up objects); an error
        # before that resumes it at once.
        self._collector_paused = gc.isenabled() and self._state is None
        if self._collector_paused:
            gc.disable()
        try:
            await self._follow_all(self._configuration)
        finally:
            self._resume_collector(freeze=False)

    async def _follow_all(self, configuration: ClusterConfig) -> None:
        async with KubeClient(configuration, self.connect_timeout) as client:
            tasks = [asyncio.create_task(self._publisher(), name="k8s-publish")]
            tasks += [asyncio.create_task(self._follow(kind, client), name=f"k8s-{kind.kind}") for kind in self._kinds]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for kind in self._kinds:
                    self._set_watching(kind.kind, False)

    async def _follow(self, kind: _Kind, client: KubeClient) -> None:
        """List then watch one kind forever, resuming, relisting and backing off as needed."""
        backoff = Backoff(self.backoff_initial, self.backoff_cap)
        gone_in_a_row = 0
        while True:
            try:
                if self._rv[kind.kind] is None:
                    await self._list_served(kind, client)
                    backoff.reset()
                progressed = await self._watch(kind, client)
                self._set_watching(kind.kind, False)
                gone_in_a_row = 0
                if progressed:
                    backoff.reset()
                    continue  # a watch the server ended: resume at once from where it stopped
                # ended without a single event or bookmark: do not spin on a server doing that
                await asyncio.sleep(backoff.delay())
            except _NotServed:
                self._set_not_served(kind)
                await asyncio.sleep(self.discovery_interval)
            except _Gone as e:
                self._set_watching(kind.kind, False)
                log.info("event=k8s_relist kind=%s rv=%s reason=%r", kind.kind, self._rv[kind.kind], str(e))
                self._rv[kind.kind] = None  # list again
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a fresh list was already too old: do not hammer the server
                    await asyncio.sleep(backoff.delay())
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, _ApiStatusError, ValueError, ConfigError) as e:
                self._set_watching(kind.kind, False)
                delay = backoff.delay()
                self._report_outage(kind.kind, _describe(e, self._host()), delay)
                await asyncio.sleep(delay)
            except Exception as e:  # a bug here must not stop the other kinds or the agent
                self._set_watching(kind.kind, False)
                delay = backoff.delay()
                log.exception("event=k8s_internal_error kind=%s", kind.kind)
                self._report_outage(kind.kind, f"internal error following {kind.kind}: {e!r}", delay)
                await asyncio.sleep(delay)

    async def _list_served(self, kind: _Kind, client: KubeClient) -> None:
        """List the kind at the first of its apiVersions the server serves; for a policy kind
        served at none, _NotServed (for the others, a 404 is an API server problem)."""
        for api_version in kind.api_versions:
            try:
                await self._list(kind, api_version, client)
                return
            except _NotFound:
                if not kind.policy:
                    raise
                log.debug("event=k8s_version_not_served kind=%s api_version=%s", kind.kind, api_version)
        raise _NotServed(kind.kind)

    def _set_not_served(self, kind: _Kind) -> None:
        """A policy kind the server does not serve: none of its objects (the API server deletes
        them with their CRD); the initial sync does not wait for it."""
        if kind.kind in self._not_served:
            return  # still not served: nothing changed
        log.warning("event=k8s_kind_not_served kind=%s api_versions=%s retry_in_s=%g", kind.kind,
                    ",".join(kind.api_versions), self.discovery_interval)
        for key in self._registry.keys(kind.kind):
            self._registry.delete(*key)
        self._listed.add(kind.kind)
        self._set_served(kind.kind, False)
        self._changed.set()

    async def _list(self, kind: _Kind, api_version: str, client: KubeClient) -> None:
        """List every object of one kind page by page into the registry; those it no longer
        lists (deleted while a watch was down) are deleted."""
        listed: set[tuple[str, str, str]] = set()
        rv = ""
        page = self._ask_page(client, kind, api_version, None)
        try:
            while True:
                body = await page
                meta = body.get("metadata") or {}
                rv = meta.get("resourceVersion") or rv
                token = meta.get("continue")
                if token:
                    # the next page is asked for before this one is read: the server prepares it while
                    # the registry reads these objects (one page ahead: two pages held at most)
                    page = self._ask_page(client, kind, api_version, token)
                    await asyncio.sleep(0)  # let the request go out before the reading below, which does not yield
                for item in body.get("items") or ():
                    item = _with_kind(item, kind.kind, api_version)
                    listed.add((kind.kind, *_ns_name(item)))
                    self._registry.apply(item)
                if not token:
                    break
        finally:
            if not page.done():
                page.cancel()  # asked for ahead, and not to be read: an error, or cancelled
            elif not page.cancelled():
                page.exception()  # seen, so asyncio does not log it as never retrieved
        for key in set(self._registry.keys(kind.kind)) - listed:
            self._registry.delete(*key)
        self._rv[kind.kind] = rv
        self._api_version[kind.kind] = api_version
        self._listed.add(kind.kind)
        self._set_served(kind.kind, True)
        log.info("event=k8s_listed kind=%s api_version=%s objects=%d rv=%s", kind.kind, api_version,
                 len(listed), rv)
        self._changed.set()

    def _ask_page(self, client: KubeClient, kind: _Kind, api_version: str,
                  token: str | None) -> asyncio.Future[dict[str, Any]]:
        """One page of a list (the first when `token` is None), asked for in a task of its own."""
        params = {**self._selector(kind), "limit": str(self.list_page)}
        if token:
            params["continue"] = token
        return asyncio.ensure_future(self._get_json(client, self._path(kind, api_version), params))

    async def _get_json(self, client: KubeClient, path: str, params: dict[str, str]) -> dict[str, Any]:
        status, data = await client.request("GET", path, params, timeout=self.list_timeout)
        _raise_for_status(status, data)
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("list response is not a JSON object")
        return body

    async def _watch(self, kind: _Kind, client: KubeClient) -> bool:
        """Watch one kind from its resourceVersion until the stream ends; True if it moved on."""
        rv = self._rv[kind.kind]
        params = {**self._selector(kind), "watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(int(self.watch_timeout * random.uniform(1.0, 2.0)))}
        if rv:
            params["resourceVersion"] = rv
        async with client.stream(self._path(kind, self._api_version[kind.kind]), params,
                                 self.read_timeout) as response:
            return await self._follow_stream(kind, response)

    async def _follow_stream(self, kind: _Kind, response: aiohttp.ClientResponse) -> bool:
        """Apply a watch's events until its stream ends; True if any arrived (an event or a bookmark)."""
        rv = self._rv[kind.kind]
        progressed = False
        try:
            if response.status != 200:
                data = await response.read()
                if response.status == 404 and kind.policy:
                    # no longer served at this version (its CRD removed or changed): list again,
                    # which finds out what is served
                    raise _Gone(f"{kind.kind} no longer served at {self._api_version[kind.kind]}")
                _raise_for_status(response.status, data)
            self._set_watching(kind.kind, True)
            log.info("event=k8s_watching kind=%s rv=%s", kind.kind, rv)
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                        ConnectionResetError) as e:
                    # cut mid-stream: like an end, resume from the last resourceVersion seen
                    log.info("event=k8s_watch_cut kind=%s rv=%s error=%r", kind.kind,
                             self._rv[kind.kind], str(e) or type(e).__name__)
                    return progressed
                if not line.endswith(b"\n"):  # the end, or a last line cut short (ignored)
                    log.info("event=k8s_watch_ended kind=%s rv=%s", kind.kind, self._rv[kind.kind])
                    return progressed
                if not line.strip():
                    continue
                self._apply(kind, json.loads(line))
                progressed = True
        finally:
            response.close()  # mid-stream: the connection cannot be reused

    def _apply(self, kind: _Kind, event: Any) -> None:
        """Apply one watch event to the cache and advance the resourceVersion."""
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ValueError(f"malformed watch event for {kind.kind}")
        kind_of_event, obj = event.get("type"), event["object"]
        if kind_of_event == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or "error"
            if code == 410:
                raise _Gone(message)
            raise _ApiStatusError(f"watch error {code}: {message}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind_of_event == "BOOKMARK":
            if rv:
                self._rv[kind.kind] = rv
            return
        obj = _with_kind(obj, kind.kind, self._api_version[kind.kind])
        key = _ns_name(obj)
        if kind_of_event in ("ADDED", "MODIFIED"):
            self._registry.apply(obj)
        elif kind_of_event == "DELETED":
            self._registry.delete(kind.kind, *key)
        else:
            raise ValueError(f"unknown watch event type {kind_of_event!r} for {kind.kind}")
        if rv:
            self._rv[kind.kind] = rv
        self.event_counts[kind.kind] += 1
        log.debug("event=k8s_event kind=%s type=%s object=%s/%s rv=%s", kind.kind, kind_of_event,
                  key[0], key[1], rv)
        self._changed.set()

    def _set_watching(self, kind: str, watching: bool) -> None:
        was = self.connected
        self._watching[kind] = watching
        self._connected_changed(was)

    def _set_served(self, kind: str, served: bool) -> None:
        was = self.connected
        if served:
            if kind in self._not_served:
                log.info("event=k8s_kind_served kind=%s api_version=%s", kind, self._api_version[kind])
            self._not_served.discard(kind)
        else:
            self._not_served.add(kind)
        self._connected_changed(was)

    def _connected_changed(self, was: bool) -> None:
        now = self.connected
        if was and not now:
            self._healthy_at = time.time()
        if now and not was:
            self._healthy_at = time.time()
            if self._outage is not None:
                log.info("event=k8s_reconnected server=%s", self._host())
            self._outage = None
            self._outage_reported = False

    def _resume_collector(self, freeze: bool) -> None:
        """Ends the initial sync's pause of the garbage collector; `freeze`: what is alive after one
        full collection (the registry just built) is left out of its passes from now on."""
        if self._collector_paused:
            self._collector_paused = False
            if freeze:
                gc.collect()
                gc.freeze()
            gc.enable()

    def _report_outage(self, kind: str, message: str, delay: float) -> None:
        self._resume_collector(freeze=False)
        self._outage = message
        log.warning("event=k8s_error kind=%s error=%r retry_in_s=%.2f", kind, message, delay)
        if not self._outage_reported:  # once per outage, not at every retry
            self._outage_reported = True
            self._on_error(message)

    def _host(self) -> str:
        return self._configuration.host if self._configuration else "the Kubernetes API server"

    # --- publishing ---

    async def _publisher(self) -> None:
        """After the initial sync and after each burst of changes, publish a new state if any."""
        while True:
            await self._change_or_lapse()
            await asyncio.sleep(self.publish_interval)  # let the rest of the burst arrive
            self._changed.clear()
            if len(self._listed) < len(self._kinds):
                continue  # not every kind listed yet: a partial state would drop workloads
            self._publish()

    async def _change_or_lapse(self) -> None:
        """Until an event arrives, or the next WorkloadEntry heartbeat lapses (no event says so: the
        commit after it finds the entry lapsed)."""
        deadline = self._registry.next_lapse()
        if deadline is None:
            await self._changed.wait()
            return
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.time()) + LAPSE_MARGIN)
        except asyncio.TimeoutError:
            self._changed.set()

    def _publish(self) -> None:
        state = self._registry.commit()
        for (kind, namespace, name), message in self._registry.take_reports():
            log.warning("event=k8s_object_rejected kind=%s namespace=%s name=%s error=%r", kind, namespace, name,
                        message)
            self._on_error(message)
        if state is None:
            if self._state is not None:
                return
            state = self._registry.state  # the first state is published even when empty
        self._state = state
        if self._healthy_at is None:
            self._healthy_at = time.time()
        log.info("event=k8s_state generation=%d workloads=%d services=%d authorization_policies=%d "
                 "peer_authentications=%d rejected=%d", state.generation, state.workload_count,
                 state.service_count, len(state.authorization_policies), len(state.peer_authentications),
                 len(self._registry.rejected))
        self._on_state(state)
        self._resume_collector(freeze=True)

    @staticmethod
    def _path(kind: _Kind, api_version: str) -> str:
        """The URL path that lists (and watches) `kind` at `api_version` across all namespaces."""
        return f"{'/api' if kind.api == 'core' else '/apis'}/{api_version}/{kind.plural}"

    def _selector(self, kind: _Kind) -> dict[str, str]:
        """The query that narrows a list or watch: for the Node, only this node's."""
        return {"fieldSelector": f"metadata.name={self.node}"} if kind.own_node else {}


def _with_kind(obj: dict[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    """The object with its kind and apiVersion, which list responses leave off their items (set in
    place: the dict was parsed from the response for the registry alone, and a copy per object
    would cost the initial list 70,000 of them at 50,000 pods)."""
    obj["kind"], obj["apiVersion"] = kind, api_version
    return obj


def _ns_name(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    if obj.get("kind") in CLUSTER_SCOPED:
        return "", str(meta.get("name") or "")
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _raise_for_status(status: int, data: bytes) -> None:
    """_Gone for 410, _NotFound for 404, _ApiStatusError for any other status but 200."""
    if status == 200:
        return
    message = _status_message(data, status)
    if status == 410:
        raise _Gone(message)
    raise (_NotFound if status == 404 else _ApiStatusError)(f"HTTP {status}: {message}")


def _status_message(data: bytes, status: int) -> str:
    try:
        body = json.loads(data)
        return str(body.get("message") or body.get("reason") or status)
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace") or str(status)


def _describe(error: BaseException, host: str) -> str:
    """One line saying what went wrong with the API server, for logs and `ameshctl status`."""
    if isinstance(error, asyncio.TimeoutError):
        return f"Kubernetes API server {host} timed out"
    if isinstance(error, ConfigError):  # a credential plugin failing: it says what to do
        return str(error)
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot reach the Kubernetes API server {host}: {error.os_error.strerror or error}"
    if isinstance(error, _ApiStatusError):
        return f"Kubernetes API server {host} refused the request: {error}"
    if isinstance(error, ValueError):
        return f"Kubernetes API server {host} sent something unreadable: {error}"
    return f"connection to the Kubernetes API server {host} failed: {error or type(error).__name__}"


__all__ = ["KubernetesSource", "Backoff"]
