"""`ameshctl register --kubeconfig`: a workload outside Kubernetes registered cluster-wide, as an
Istio WorkloadEntry written through the API server (authenticated and authorized by Kubernetes
RBAC), kept healthy by this process's heartbeats.

The objects written are registry/workloadentries.py's (`workload_entry`, `healthy_status`); this
module only talks to the API server, with kubernetes_asyncio (in the CLI's process only: the agent
reads WorkloadEntries through its own watch). A heartbeat is a patch of the entry's status
subresource; every agent counts it from the moment it sees it (registry/workloadentries.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, Callable

import aiohttp
import click
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from registry.registrations import RegistrationError, parse_address, parse_port, parse_ttl
from registry.workloadentries import GROUP, PLURAL, WORKLOAD_ENTRY_API_VERSIONS, healthy_status, workload_entry

VERSION = WORKLOAD_ENTRY_API_VERSIONS[0].split("/")[1]
MERGE_PATCH = "application/merge-patch+json"  # custom resources take no strategic merge patch
HEARTBEATS_PER_TTL = 3  # a heartbeat every TTL/3: two may be lost before the entry lapses
# what a registering client must be allowed, for the error that says it is not
RBAC_NEEDED = ("get, create, update and delete workloadentries.networking.istio.io and patch "
               "workloadentries/status in the namespace (README: Registrations, the Role for registering clients)")


class EntryError(Exception):
    """The API server could not be reached or refused a request; the message says what to do.
    `status`: the HTTP status of a refusal, None when unreachable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def api_client(kubeconfig: str | None, in_cluster: bool) -> k8s.ApiClient:
    """A client of the API server: the kubeconfig given, or the pod's service account."""
    configuration = k8s.Configuration()
    try:
        if in_cluster:
            load_incluster_config(client_configuration=configuration)
        else:
            await load_kube_config(config_file=kubeconfig, client_configuration=configuration, persist_config=False)
    except (ConfigException, OSError) as e:
        where = "the in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig}"
        raise EntryError(f"cannot load {where}: {e}") from None
    return k8s.ApiClient(configuration)


class EntryWriter:
    """Writes one WorkloadEntry (`namespace`/`name`): creates or replaces it, heartbeats, deletes."""

    def __init__(self, api: k8s.ApiClient, namespace: str, name: str) -> None:
        self._objects = k8s.CustomObjectsApi(api)
        self._host = api.configuration.host
        self.namespace, self.name = namespace, name

    @property
    def label(self) -> str:
        return f"WorkloadEntry {self.namespace}/{self.name}"

    async def put(self, entry: dict[str, Any]) -> None:
        """Creates the entry, or replaces an existing one's labels, annotations and spec (its status,
        a subresource, stays)."""
        args = (GROUP, VERSION, self.namespace, PLURAL)
        try:
            await self._call("create", self._objects.create_namespaced_custom_object(*args, entry))
            return
        except EntryError as e:
            if e.status != 409:
                raise
        current = await self._call("get", self._objects.get_namespaced_custom_object(*args, self.name))
        replacement = {**entry, "metadata": {**entry["metadata"],
                                             "resourceVersion": current["metadata"]["resourceVersion"]}}
        await self._call("update", self._objects.replace_namespaced_custom_object(*args, self.name, replacement))

    async def heartbeat(self, now: float, healthy: bool = True) -> None:
        """Writes the Healthy condition probed at `now`; EntryError (status 404) if the entry is gone."""
        await self._call("heartbeat", self._objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, healthy_status(now, healthy),
            _content_type=MERGE_PATCH))

    async def delete(self) -> bool:
        """Deletes the entry; False if there was none."""
        try:
            await self._call("delete", self._objects.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name))
        except EntryError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def _call(self, verb: str, request: Any) -> Any:
        """The request's answer; EntryError saying what failed and what to do."""
        try:
            return await request
        except ApiException as e:
            message = f"the Kubernetes API server {self._host} refused to {verb} {self.label} ({e.status} {e.reason})"
            if e.status in (401, 403):
                message += f": the identity in use must be allowed to {RBAC_NEEDED}"
            elif e.status == 404:
                message += (": it is not there (deleted by someone else, or the API server serves no "
                            "WorkloadEntries: are Istio's CRDs installed?)")
            raise EntryError(message, e.status) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EntryError(f"cannot reach the Kubernetes API server {self._host} to {verb} {self.label}: "
                             f"{e or type(e).__name__}") from None


async def keep_alive(writer: EntryWriter, ttl: float, say: Callable[[str], None],
                     clock: Callable[[], float] = time.time) -> None:
    """Heartbeats every TTL/3 until SIGTERM or SIGINT, then deletes the entry. An API server out of
    reach is retried at the next beat (the entry lapses if that lasts a TTL); an entry deleted by
    someone else ends the heartbeats (recreating it would undo a deregistration)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        try:
            await writer.heartbeat(clock())
        except EntryError as e:
            if e.status == 404:
                raise
            say(f"heartbeat failed, trying again in {ttl / HEARTBEATS_PER_TTL:g}s: {e}")
        try:
            await asyncio.wait_for(stop.wait(), ttl / HEARTBEATS_PER_TTL)
        except asyncio.TimeoutError:
            pass
    if await writer.delete():
        say(f"deregistered {writer.label}")


def register_command(name: str, namespace: str, address: str, port: int, port_name: str, labels: dict[str, str],
                     service_account: str, network: str, ttl: str | None, kubeconfig: str | None, in_cluster: bool,
                     say: Callable[[str], None]) -> None:
    """`ameshctl register ... --kubeconfig`: writes the entry; with a TTL, heartbeats until stopped."""
    try:
        seconds = parse_ttl(ttl) if ttl is not None else None
        entry = workload_entry(name, namespace, parse_address(address), {port_name: parse_port(port)}, labels,
                               service_account, network, seconds)
    except RegistrationError as e:
        raise click.BadParameter(str(e)) from None

    async def run(writer: EntryWriter) -> None:
        await writer.put(entry)
        if seconds is None:
            say(f"registered {writer.label} at {address}:{port}: no TTL, ready until deregistered")
            return
        await writer.heartbeat(time.time())
        say(f"registered {writer.label} at {address}:{port}, heartbeating every {seconds / HEARTBEATS_PER_TTL:g}s; "
            f"it lapses {seconds:g}s after the last")
        await keep_alive(writer, seconds, say)

    _run(kubeconfig, in_cluster, namespace, name, run)


def entry_command(command: str, namespace: str, name: str, kubeconfig: str | None, in_cluster: bool,
                  say: Callable[[str], None]) -> None:
    """`ameshctl heartbeat|deregister NAME --kubeconfig`: one heartbeat, or the entry deleted."""
    async def run(writer: EntryWriter) -> None:
        if command == "heartbeat":
            await writer.heartbeat(time.time())
            say(f"alive: {writer.label}")
        elif await writer.delete():
            say(f"deregistered: {writer.label}")
        else:
            raise EntryError(f"{writer.label} is not registered")

    _run(kubeconfig, in_cluster, namespace, name, run)


def _run(kubeconfig: str | None, in_cluster: bool, namespace: str, name: str,
         act: Callable[[EntryWriter], Any]) -> None:
    """Runs `act` with a writer of the entry; an EntryError becomes the command's error."""
    async def main() -> None:
        async with await api_client(kubeconfig, in_cluster) as api:
            await act(EntryWriter(api, namespace, name))

    try:
        asyncio.run(main())
    except EntryError as e:
        raise click.ClickException(str(e)) from None
