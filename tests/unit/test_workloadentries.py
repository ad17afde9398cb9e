"""Istio WorkloadEntries in the registry (registry/workloadentries.py): read from the file, the
incremental registry and the Kubernetes watch; a Service selecting one gets it as an endpoint;
heartbeats and the TTL as its health, judged by the agent's clock; a lapse without any event;
malformed entries refused naming the object and field."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.incremental import IncrementalRegistry
from registry.kubefile import FileSource, build_state
from registry.model import RegistryError, RegistryState
from registry.workloadentries import MAX_CLOCK_SKEW, TTL_ANNOTATION, Heartbeats, healthy_status, parse_time
from tests.kubeapi import KubeAPIServer
from tests.unit.test_kubernetes_source import namespace, pod, running, scenario, service, until

NOW = 1_800_000_000.0  # seconds since the epoch


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def entry(name: str = "vm-1", address: str = "192.168.7.20", ttl: str | None = None, probed: float | None = None,
          healthy: bool = True, app: str = "web", **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                           "metadata": {"name": name, "namespace": "shop"},
                           "spec": {"address": address, "ports": {"http": 9080}, "labels": {"app": app},
                                    "serviceAccount": "vm", **spec}}
    if ttl is not None:
        obj["metadata"]["annotations"] = {TTL_ANNOTATION: ttl}
    if probed is not None:
        obj["status"] = healthy_status(probed, healthy)["status"]
    return obj


def web(target: str | int = "http") -> dict[str, Any]:
    """Service shop/web selecting app=web, its port's targetPort named (the entries' "http") or numbered."""
    obj = service("web", "10.96.0.10")
    obj["spec"]["ports"][0]["targetPort"] = target
    return obj


def web_pod() -> dict[str, Any]:
    obj = pod("web-1", "10.244.1.5")
    obj["spec"]["containers"][0]["ports"][0]["name"] = "http"
    return obj


def endpoints(state: RegistryState, key: str = "shop/web") -> list[tuple[str, int, bool]]:
    found = state.service_by_key(key)
    assert found is not None
    return sorted((e.ip, e.ports.get("http", 0), e.ready) for e in found.endpoints)


def test_a_service_selecting_an_entry_gets_it_as_an_endpoint_on_its_named_port():
    state = build_state([namespace("shop"), web(), web_pod(), entry()])
    assert endpoints(state) == [("10.244.1.5", 8080, True), ("192.168.7.20", 9080, True)]
    vm = state.workload_by_ip("192.168.7.20")
    assert vm is not None and (vm.key, vm.node, vm.enrolled, vm.service_account) == (
        "shop/vm-1@WorkloadEntry", "", False, "vm")  # in an enrolled namespace, still never captured
    assert vm not in state.enrolled_on("node-1") and vm.labels == {"app": "web"}
    assert [(e.workload, e.source) for e in state.service_by_key("shop/web").endpoints] == [  # type: ignore[union-attr]
        ("shop/web-1", ""), ("shop/vm-1@WorkloadEntry", "WorkloadEntry")]
    assert endpoints(build_state([web(), entry(app="api")])) == []  # labels not selected
    assert endpoints(build_state([web(8443), entry()])) == [("192.168.7.20", 8443, True)]  # a number as it is


def test_entries_join_a_service_with_endpointslices_as_in_istio():
    registry = IncrementalRegistry()
    for obj in (web(), entry()):
        registry.apply(obj)
    registry.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                    "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["10.244.1.5"]}]})
    state = registry.commit()
    assert state is not None and endpoints(state) == [("10.244.1.5", 8080, True), ("192.168.7.20", 9080, True)]
    registry.apply(entry(app="api"))  # relabelled away
    state = registry.commit()
    assert state is not None and endpoints(state) == [("10.244.1.5", 8080, True)]


@pytest.mark.parametrize("change, message", [
    ({"address": "vm.example"}, 'WorkloadEntry shop/vm-1: spec.address: must be an IPv4 address, got'),
    ({"address": None}, "WorkloadEntry shop/vm-1: spec.address: required"),
    ({"address": "127.0.0.1"}, "WorkloadEntry shop/vm-1: spec.address: 127.0.0.1 is a loopback address"),
    ({"ports": {"http": 15008}}, "WorkloadEntry shop/vm-1: spec.ports.http: 15008 is one of the ztunnel's own ports"),
    ({"ports": {"http": "80"}}, "WorkloadEntry shop/vm-1: spec.ports.http: must be an integer 1-65535"),
    ({"labels": {"app": 7}}, "WorkloadEntry shop/vm-1: spec.labels"),
])
def test_a_malformed_entry_is_refused_naming_the_object_and_field(change: dict[str, Any], message: str):
    bad = entry()
    bad["spec"].update(change)
    with pytest.raises(RegistryError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build_state([bad])
    registry = IncrementalRegistry()  # the watch: that entry skipped, the rest kept
    registry.apply(web())
    registry.apply(entry(name="vm-2", address="192.168.7.21"))
    registry.apply(bad)
    state = registry.commit()
    assert state is not None and endpoints(state) == [("192.168.7.21", 9080, True)]
    assert list(registry.rejected) == [("WorkloadEntry", "shop", "vm-1")]
    assert registry.rejected[("WorkloadEntry", "shop", "vm-1")].startswith(message.split(", got")[0])


def test_bad_ttl_and_probe_time_are_refused_by_field():
    with pytest.raises(RegistryError, match=f'metadata.annotations\\["{TTL_ANNOTATION}"\\]: must be a duration'):
        build_state([entry(ttl="soon")])
    bad = entry(ttl="3s", probed=NOW)
    bad["status"]["conditions"][0]["lastProbeTime"] = "yesterday"
    with pytest.raises(RegistryError, match=r"status.conditions\[0\].lastProbeTime: must be an RFC 3339 time"):
        build_state([bad])


def test_an_entry_on_a_pods_address_is_refused_not_the_pod():
    registry = IncrementalRegistry()
    registry.apply(web_pod())
    registry.apply(entry(address="10.244.1.5"))
    state = registry.commit()
    assert state is not None and state.workload_by_ip("10.244.1.5").key == "shop/web-1"  # type: ignore[union-attr]
    assert "WorkloadEntry shop/vm-1: spec.address: 10.244.1.5 is already used by Pod shop/web-1" in \
        registry.rejected[("WorkloadEntry", "shop", "vm-1")]


def test_health_without_ttl_is_the_healthy_condition_alone():
    clock = Clock()
    beats = Heartbeats(clock)
    state = build_state([web(), entry(probed=NOW - 3600)], heartbeats=beats)
    assert endpoints(state) == [("192.168.7.20", 9080, True)]  # an old probe means nothing without a TTL
    state = build_state([web(), entry(probed=NOW, healthy=False)], heartbeats=beats)
    assert endpoints(state) == [("192.168.7.20", 9080, False)]


def test_a_heartbeat_counts_from_when_the_agent_sees_it_and_lapses_after_the_ttl():
    clock = Clock()
    registry = IncrementalRegistry(clock=clock)
    registry.apply(web())
    registry.apply(entry(ttl="3s"))  # no heartbeat yet (created, status not written): not ready
    assert endpoints(registry.commit()) == [("192.168.7.20", 9080, False)]  # type: ignore[arg-type]
    # the client's clock is 20 s behind the agent's: within the allowance, the TTL counts from now
    registry.apply(entry(ttl="3s", probed=NOW - 20))
    assert endpoints(registry.commit()) == [("192.168.7.20", 9080, True)]  # type: ignore[arg-type]
    assert registry.next_lapse() == NOW + 3
    clock.now = NOW + 2.9
    assert registry.commit() is None  # nothing changed
    registry.apply(entry(ttl="3s", probed=NOW - 20))  # a relist with the same heartbeat: not a new one
    assert registry.commit() is None
    clock.now = NOW + 3.01
    lapsed = registry.commit()  # no event: the commit finds the lapse
    assert lapsed is not None and endpoints(lapsed) == [("192.168.7.20", 9080, False)]
    assert not lapsed.workload_by_ip("192.168.7.20").ready  # type: ignore[union-attr]
    registry.apply(entry(ttl="3s", probed=NOW - 16.99))  # the next heartbeat revives it
    assert endpoints(registry.commit()) == [("192.168.7.20", 9080, True)]  # type: ignore[arg-type]
    assert registry.next_lapse() == NOW + 6.01
    registry.delete("WorkloadEntry", "shop", "vm-1")
    assert endpoints(registry.commit()) == [] and registry.next_lapse() is None  # type: ignore[arg-type]


def test_an_agent_starting_late_does_not_revive_an_entry_whose_client_died_long_ago():
    clock = Clock()
    registry = IncrementalRegistry(clock=clock)
    registry.apply(web())
    registry.apply(entry(ttl="3s", probed=NOW - 3 - MAX_CLOCK_SKEW - 1))
    registry.apply(entry(name="vm-2", address="192.168.7.21", ttl="3s", probed=NOW - 2))
    state = registry.commit()
    assert state is not None and endpoints(state) == [("192.168.7.20", 9080, False), ("192.168.7.21", 9080, True)]
    # a client whose clock runs ahead cannot buy more than one TTL from now
    clock.now = NOW + 1
    registry.apply(entry(name="vm-2", address="192.168.7.21", ttl="3s", probed=NOW + 3600))
    registry.commit()
    assert registry.next_lapse() == NOW + 1 + 3


def test_the_file_source_lapses_an_entry_without_the_file_changing(tmp_path: Path):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump_all([web(), entry(ttl="1s", probed=time.time())]))
    states: list[RegistryState] = []

    async def scene() -> None:
        source = FileSource(path, states.append, lambda e: None, poll_interval=0.05)
        assert endpoints(source.load()) == [("192.168.7.20", 9080, True)]
        task = asyncio.create_task(source.run())
        try:
            deadline = time.monotonic() + 3.0
            while not states and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(scene())
    assert states and endpoints(states[0]) == [("192.168.7.20", 9080, False)]


def test_parse_time_reads_kubernetes_and_protobuf_timestamps():
    assert parse_time("2027-01-15T08:00:00Z") == NOW
    assert parse_time("2027-01-15T08:00:00.250000Z") == NOW + 0.25
    assert parse_time("2027-01-15T09:00:00+01:00") == NOW
    with pytest.raises(ValueError):
        parse_time("2027-01-15T08:00:00")


@scenario
async def test_the_watch_lapses_an_entry_at_its_deadline_without_any_event(tmp_path: Path) -> None:
    with KubeAPIServer(bookmark_interval=0.5, objects=(namespace("shop"), web())) as api:
        async with running(api, tmp_path) as run:
            api.apply(entry(ttl="1s", probed=time.time()))
            await until(lambda: endpoints(run.state) == [("192.168.7.20", 9080, True)], what="the entry, ready")
            ready_at, events = time.monotonic(), dict(run.source.event_counts)
            await until(lambda: endpoints(run.state) == [("192.168.7.20", 9080, False)], 3.0, "the lapse")
            assert time.monotonic() - ready_at <= 1.5  # the TTL and the timer's margin, not a poll
            assert run.source.event_counts == events  # no event brought it
            live = copy.deepcopy(api.get("WorkloadEntry", "vm-1", "shop"))
            live["status"] = healthy_status(time.time())["status"]  # the client's next heartbeat
            api.apply(live)
            await until(lambda: endpoints(run.state) == [("192.168.7.20", 9080, True)], what="revived")
            assert api.get("WorkloadEntry", "vm-1", "shop") is not None
