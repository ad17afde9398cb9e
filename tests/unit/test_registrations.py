"""Registrations: validation, TTL expiry and heartbeats with a fake clock, merging into the registry."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from registry.kubefile import build_state
from registry.model import Endpoint, RegistryState, Service, ServicePort, Workload
from registry.registrations import (SOURCE, MergedRegistry, Registration, RegistrationError, RegistrationStore,
                                    parse_ttl)
from tests.unit.clock import Clock

VM = {"name": "billing", "address": "192.168.7.20", "port": 8443, "version": "v3", "namespace": "shop", "ttl": "30s"}
WEB = Service("billing", "shop", "10.96.0.20", (ServicePort(80, "https", "https"),),
              endpoints=(Endpoint("10.244.1.10", {"https": 8443}),), source="file")
POD = Workload("web-1", "shop", "10.244.1.10", "node-1", enrolled=True)


def test_registration_expires_after_its_ttl_and_a_heartbeat_revives_it():
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    base = RegistryState(services=(WEB,))
    store.register(VM)
    assert merged.state(base).service_by_ip("10.96.0.20").endpoints[1].ready
    clock.now += 30  # healthy up to and including its TTL
    assert merged.state(base).workload_by_ip("192.168.7.20").ready
    clock.now += 0.5
    expired = merged.state(base)
    assert not expired.service_by_ip("10.96.0.20").endpoints[1].ready
    assert not expired.workload_by_ip("192.168.7.20").ready
    assert store.get("shop/billing@192.168.7.20:8443").to_dict(clock.now)["health"] == "expired"
    [revived] = store.heartbeat("shop", "billing")
    assert revived.healthy(clock.now) and revived.to_dict(clock.now)["health"] == "healthy"
    assert merged.state(base).service_by_ip("10.96.0.20").endpoints[1].ready


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown field(s) colour (known: "),
    ({"address": "192.168.7.300"}, "address: must be an IPv4 address, got '192.168.7.300'"),
    ({"address": None}, "address: must be an IPv4 address written as a string"),
    ({"port": 0}, "port: must be an integer 1-65535, got 0"),
    ({"port": "8443"}, "port: must be an integer 1-65535, got '8443'"),
    ({"port": True}, "port: must be an integer 1-65535, got True"),
    ({"port": 8443.0}, "port: must be an integer 1-65535, got 8443.0"),
    ({"name": "Billing_API"}, "name: must be a DNS label"),
    ({"namespace": ""}, "namespace: must be a DNS label"),
    ({"ttl": "forever"}, "ttl: must be a duration like 30s"),
    ({"ttl": "0s"}, "ttl: must be between 1s and 24h"),
    ({"ttl": float("nan")}, "ttl: must be between 1s and 24h"),
    ({"version": 3}, "version: must be a string"),
])
def test_bad_input_is_refused_with_the_field_named_and_changes_nothing(change, message):
    store = RegistrationStore(Clock())
    with pytest.raises(RegistrationError) as refused:
        store.register({**VM, **change})
    assert refused.value.status == 400 and message in str(refused.value)
    assert len(store) == 0 and store.take_changes() == []


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("0.0.0.0", "the unspecified address"),
    ("0.1.2.3", "in 0.0.0.0/8 ('this network')"),
    ("169.254.169.254", "a link-local address (where cloud metadata services answer)"),
    ("224.0.0.1", "a multicast address"),
    ("239.255.255.250", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("240.0.0.1", "a reserved address (240.0.0.0/4)"),
])
def test_addresses_no_other_node_can_reach_are_refused_saying_why(address, why):
    with pytest.raises(RegistrationError) as refused:
        RegistrationStore(Clock()).register({**VM, "address": address})
    assert refused.value.status == 400
    assert str(refused.value) == (f"address: {address} is {why}; a registration must name an address other "
                                  "nodes can reach")


@pytest.mark.parametrize("address", [2130706433, 3232237332, ["192.168.7.20"], {"ip": "192.168.7.20"}, True, 1.5])
def test_an_address_that_is_not_a_string_is_refused(address):
    # ipaddress.IPv4Address(2130706433) is 127.0.0.1, and 3232237332 is 192.168.7.20: both refused
    with pytest.raises(RegistrationError) as refused:
        RegistrationStore(Clock()).register({**VM, "address": address})
    assert refused.value.status == 400
    assert str(refused.value).startswith("address: must be an IPv4 address written as a string like")


@pytest.mark.parametrize("port", [15000, 15001, 15006, 15008, 15020, 15021])
def test_the_ztunnels_ports_are_refused_on_every_address(port):
    with pytest.raises(RegistrationError) as refused:
        RegistrationStore(Clock()).register({**VM, "port": port})
    assert refused.value.status == 400
    assert f"port: {port} is one of the ztunnel's own ports (15000, 15001, 15006, 15008, 15020, 15021)" in str(
        refused.value)


def test_the_agents_configured_ports_are_the_ones_refused():
    store = RegistrationStore(Clock(), reserved_ports={16000})
    with pytest.raises(RegistrationError, match="port: 16000 is one of the ztunnel's own ports"):
        store.register({**VM, "port": 16000})
    assert store.register({**VM, "port": 15000}).port == 15000


def test_huge_and_deep_values_are_cut_in_the_error():
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    spec = {**VM, "name": deep, "version": "v" * 60_000, "x" * 60_000: 1,
            **{f"extra{i}": i for i in range(100)}}
    with pytest.raises(RegistrationError) as refused:
        RegistrationStore(Clock()).register(spec)
    message = str(refused.value)
    assert len(message) < 1200 and "name: must be a DNS label" in message and "and 96 more" in message


def test_every_problem_is_named_at_once():
    with pytest.raises(RegistrationError) as refused:
        RegistrationStore(Clock()).register({"name": "x", "address": "nowhere", "port": 70000})
    assert "address:" in str(refused.value) and "port:" in str(refused.value)


def test_duplicates_conflict_but_more_instances_of_a_name_are_welcome():
    store = RegistrationStore(Clock())
    store.register(VM)
    with pytest.raises(RegistrationError) as conflict:
        store.register(VM)
    assert conflict.value.status == 409
    store.register({**VM, "address": "192.168.7.21"})
    assert [r.instance for r in store.find("shop", "billing")] == ["192.168.7.20:8443", "192.168.7.21:8443"]
    [removed] = store.deregister("shop", "billing", "192.168.7.20:8443")
    assert removed.address == "192.168.7.20"
    with pytest.raises(RegistrationError) as missing:
        store.heartbeat("shop", "billing", "192.168.7.20:8443")
    assert missing.value.status == 404


@pytest.mark.parametrize("instance", ["192.168.7.20", "192.168.7.20:", "192.168.7.300:80", "host:80",
                                      "192.168.7.20:99999999", "192.168.7.20:0", "192.168.7.20:65536",
                                      "١٩٢.168.7.20:80", "x" * 10_000])
def test_a_bad_instance_is_refused_naming_it(instance):
    store = RegistrationStore(Clock())
    store.register(VM)
    with pytest.raises(RegistrationError) as refused:
        store.heartbeat("shop", "billing", instance)
    assert refused.value.status == 400 and str(refused.value).startswith("instance: must be ADDRESS:PORT")
    assert len(str(refused.value)) < 200


def test_ttls_are_seconds_or_durations_with_a_unit():
    assert [parse_ttl(v) for v in (30, 2.5, "45", "1500ms", "2m", "1h")] == [30, 2.5, 45, 1.5, 120, 3600]


def test_registrations_join_the_service_of_their_name_and_stand_as_headless_services_otherwise():
    clock = Clock()
    store = RegistrationStore(clock)
    store.register(VM)
    store.register({**VM, "name": "ledger", "address": "192.168.7.30", "port": 9000})
    state = MergedRegistry(store, clock).state(RegistryState(workloads=(POD,), services=(WEB,)))
    billing = state.service_by_ip("10.96.0.20")
    assert billing.endpoints[1] == Endpoint("192.168.7.20", {"https": 8443}, True, "shop/billing@192.168.7.20:8443",
                                            "registration")
    ledger = state.service_by_key("shop/ledger")
    assert (ledger.cluster_ip, ledger.source, ledger.endpoints[0].ports) == ("", "registration", {"9000": 9000})
    assert {s.key for s in state.services} == {"shop/billing", "shop/ledger"}
    vm = state.workload_by_ip("192.168.7.20")
    assert (vm.source, vm.ready, vm.enrolled, vm.labels) == ("registration", True, False,
                                                             {"app": "billing", "version": "v3"})
    assert state.workload_by_key("shop/billing@192.168.7.20:8443") == vm
    assert state.enrolled_on("node-1") == (POD,) and len(state.workloads) == 3


def test_a_pod_keeps_its_address_and_the_first_registration_at_an_address_stands_for_it():
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    base = RegistryState(workloads=(POD,))
    store.register({**VM, "address": POD.ip})
    store.register({**VM, "name": "ledger", "port": 9000})
    store.register({**VM, "name": "audit", "port": 9100})
    state = merged.state(base)
    assert state.workload_by_ip(POD.ip) is POD and state.workload_by_ip(VM["address"]).labels["app"] == "ledger"
    assert POD.ip not in [w.ip for w in state.workloads if w.source == SOURCE]
    store.deregister("shop", "ledger")
    assert merged.state(base).workload_by_ip(VM["address"]).labels["app"] == "audit"


def test_nothing_registered_leaves_the_base_state_itself():
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    base = RegistryState(services=(WEB,))
    assert merged.state(base) is base
    store.register(VM)
    assert merged.state(base) is merged.state(base)  # nothing changed: the same snapshot
    store.deregister("shop", "billing")
    assert merged.state(base) is base


def full_merge(state: RegistryState, registrations: list[Registration], now: float) -> RegistryState:
    """The definition the incremental state must equal: every registration, in registration
    order, folded into `state` at once."""
    by_service: dict[str, list[Registration]] = {}
    for registration in registrations:
        by_service.setdefault(registration.service_key, []).append(registration)
    services = []
    for service in state.services:
        joining = by_service.pop(service.key, [])
        extra = tuple(Endpoint(r.address, {p.name: r.port for p in service.ports}, r.healthy(now), r.key, SOURCE)
                      for r in joining)
        services.append(replace(service, endpoints=service.endpoints + extra) if extra else service)
    for joining in by_service.values():
        first = joining[0]
        ports = tuple(sorted({ServicePort(r.port, r.port, str(r.port)) for r in joining}, key=lambda p: p.port))
        endpoints = tuple(Endpoint(r.address, {str(r.port): r.port}, r.healthy(now), r.key, SOURCE) for r in joining)
        services.append(Service(first.name, first.namespace, "", ports, endpoints=endpoints, source=SOURCE))
    workloads, taken = list(state.workloads), {w.ip for w in state.workloads}
    for r in registrations:
        if r.address not in taken:
            taken.add(r.address)
            labels = {"app": r.name, **({"version": r.version} if r.version else {})}
            workloads.append(Workload(f"{r.name}@{r.instance}", r.namespace, r.address, "", r.service_account, labels,
                                      r.healthy(now), False, SOURCE))
    return RegistryState(workloads=tuple(workloads), services=tuple(services))


def assert_same(merged: RegistryState, expected: RegistryState) -> None:
    assert sorted(merged.workloads, key=lambda w: w.key) == sorted(expected.workloads, key=lambda w: w.key)
    assert sorted(merged.services, key=lambda s: s.key) == sorted(expected.services, key=lambda s: s.key)
    for workload in expected.workloads:
        assert merged.workload_by_ip(workload.ip) == expected.workload_by_ip(workload.ip)
        assert merged.workload_by_key(workload.key) == expected.workload_by_key(workload.key)
    for service in expected.services:
        assert merged.service_by_key(service.key) == service
        assert merged.service_by_ip(service.cluster_ip) == expected.service_by_ip(service.cluster_ip)
    assert merged.enrolled_on("node-1") == expected.enrolled_on("node-1")


@pytest.mark.parametrize("seed", range(40))
def test_the_state_kept_by_change_equals_a_full_merge_after_any_sequence(seed):
    rng = random.Random(seed)
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    two_ports = replace(WEB, ports=(ServicePort(80, "http", "http"), ServicePort(443, "https", "https")))
    bases = [RegistryState(), RegistryState(workloads=(POD,), services=(WEB,)),
             RegistryState(workloads=(POD,), services=(replace(WEB),)),  # a new state, equal Services
             RegistryState(workloads=(replace(POD, ip="192.168.7.1"),), services=(two_ports,))]
    base = rng.choice(bases)
    order: list[str] = []  # registration keys, in registration order: the reference
    for _ in range(300):
        op = rng.random()
        name, address, port = rng.choice(["billing", "ledger", "audit"]), f"192.168.7.{rng.randrange(4)}", \
            rng.choice([80, 8443])
        if op < 0.45:
            try:
                order.append(store.register({"name": name, "namespace": "shop", "address": address, "port": port,
                                             "ttl": rng.choice([1, 5, 20])}).key)
            except RegistrationError:
                pass
        elif op < 0.6:
            try:
                gone = {r.key for r in store.deregister("shop", name, rng.choice([None, f"{address}:{port}"]))}
                order = [k for k in order if k not in gone]
            except RegistrationError:
                pass
        elif op < 0.75:
            try:
                store.heartbeat("shop", name, rng.choice([None, f"{address}:{port}"]))
            except RegistrationError:
                pass
        elif op < 0.8:
            base = rng.choice(bases)
        clock.now += rng.choice([0, 0.5, 2, 7])
        if rng.random() < 0.5:  # changes pile up between reads, or not
            assert_same(merged.state(base), full_merge(base, [store.get(k) for k in order], clock.now))
    assert_same(merged.state(base), full_merge(base, [store.get(k) for k in order], clock.now))


def test_an_expiry_is_noticed_however_many_heartbeats_came_before_it():
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    base = RegistryState(services=(WEB,))
    store.register({**VM, "ttl": 1})
    store.register({**VM, "address": "192.168.7.21", "ttl": 30})
    assert merged.state(base).workload_by_ip("192.168.7.20").ready
    clock.now += 2  # the first expires, unseen yet, while the second's heartbeats pile up
    for _ in range(3000):
        clock.now += 0.001
        store.heartbeat("shop", "billing", "192.168.7.21:8443")
    state = merged.state(base)
    assert not state.workload_by_ip("192.168.7.20").ready and state.workload_by_ip("192.168.7.21").ready
    clock.now += 31
    assert not merged.state(base).workload_by_ip("192.168.7.21").ready


def test_a_new_base_state_rebuilds_only_the_registered_services_whose_service_changed():
    clock = Clock()
    store = RegistrationStore(clock)
    merged = MergedRegistry(store, clock)
    store.register(VM)
    store.register({**VM, "name": "ledger"})
    before = merged.state(RegistryState(workloads=(POD,), services=(WEB,)))
    pod_moved = merged.state(RegistryState(workloads=(replace(POD, ip="10.244.1.11"),), services=(replace(WEB),)))
    assert pod_moved.service_by_key("shop/billing") is before.service_by_key("shop/billing")
    assert pod_moved.service_by_key("shop/ledger") is before.service_by_key("shop/ledger")
    resized = replace(WEB, ports=(ServicePort(80, "http", "http"),))
    after = merged.state(RegistryState(services=(resized,)))
    assert after.service_by_key("shop/billing").endpoints[1].ports == {"http": 8443}
    assert after.service_by_key("shop/ledger") is before.service_by_key("shop/ledger")


def test_a_merged_state_answers_every_question_of_its_base_state_that_registrations_do_not_change():
    """MergedState overrides RegistryState's reads; one it forgets would answer from an empty
    default (policies lost while anything is registered). Every public name is checked."""
    policy_state = build_state([
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-all", "namespace": "shop"}, "spec": {}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}])
    base = RegistryState(workloads=(POD,), services=(WEB,), generation=7,
                         authorization_policies=policy_state.authorization_policies,
                         peer_authentications=policy_state.peer_authentications, node_zones={POD.node: "zone-a"})
    clock = Clock()
    store = RegistrationStore(clock)
    store.register({**VM, "name": "ledger", "address": "192.168.7.30", "port": 9000})
    merged = MergedRegistry(store, clock).state(base)
    assert merged is not base
    for name in (n for n in dir(RegistryState) if not n.startswith("_")):
        value = getattr(base, name)
        if name in ("workloads", "services", "workload_count", "service_count"):
            continue  # registrations add to these
        if callable(value):
            argument = {"workload_by_ip": POD.ip, "workload_by_key": POD.key, "service_by_ip": WEB.cluster_ip,
                        "service_by_key": WEB.key, "enrolled_on": POD.node, "authorization_policies_in": "shop",
                        "zone_of": POD.node}
            assert name in argument, f"a new RegistryState method {name}: add it here and to MergedState"
            assert getattr(merged, name)(argument[name]) == value(argument[name]), name
        else:
            assert getattr(merged, name) == value, name
