"""Registrations: validation, TTL expiry and heartbeats with a fake clock, merging into the registry."""

from __future__ import annotations

import pytest

from registry.model import Endpoint, RegistryState, Service, ServicePort
from registry.registrations import RegistrationError, RegistrationStore, merge, parse_ttl

VM = {"name": "billing", "address": "192.168.7.20", "port": 8443, "version": "v3", "namespace": "shop", "ttl": "30s"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_registration_expires_after_its_ttl_and_a_heartbeat_revives_it():
    clock = Clock()
    store = RegistrationStore(clock)
    [registration] = [store.register(VM)]
    assert registration.healthy(clock.now) and store.healthy_changes_at() == 1030.0
    clock.now += 30.5
    assert not registration.healthy(clock.now) and store.healthy_changes_at() is None
    [revived] = store.heartbeat("shop", "billing")
    assert revived.healthy(clock.now) and revived.to_dict(clock.now)["health"] == "healthy"


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown field(s) colour"),
    ({"address": "192.168.7.300"}, "address: must be an IPv4 address, got '192.168.7.300'"),
    ({"address": None}, "address: must be an IPv4 address, got None"),
    ({"port": 0}, "port: must be an integer 1-65535, got 0"),
    ({"port": "8443"}, "port: must be an integer 1-65535, got '8443'"),
    ({"port": True}, "port: must be an integer 1-65535, got True"),
    ({"name": "Billing_API"}, "name: must be a DNS label"),
    ({"namespace": ""}, "namespace: must be a DNS label"),
    ({"ttl": "forever"}, "ttl: must be a duration like 30s"),
    ({"ttl": "0s"}, "ttl: must be between 1s and 24h"),
    ({"version": 3}, "version: must be a string"),
])
def test_bad_input_is_refused_with_the_field_named_and_changes_nothing(change, message):
    store = RegistrationStore(Clock())
    with pytest.raises(RegistrationError) as refused:
        store.register({**VM, **change})
    assert refused.value.status == 400 and message in str(refused.value)
    assert store.all() == [] and store.generation == 0


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


def test_ttls_are_seconds_or_durations_with_a_unit():
    assert [parse_ttl(v) for v in (30, 2.5, "45", "1500ms", "2m", "1h")] == [30, 2.5, 45, 1.5, 120, 3600]


def test_merge_adds_endpoints_to_the_service_of_that_name_and_headless_services_otherwise():
    clock = Clock()
    store = RegistrationStore(clock)
    store.register(VM)
    store.register({**VM, "name": "ledger", "address": "192.168.7.30", "port": 9000})
    web = Service("billing", "shop", "10.96.0.20", (ServicePort(80, "https", "https"),),
                  endpoints=(Endpoint("10.244.1.10", {"https": 8443}),), source="file")
    state = merge(RegistryState(services=(web,)), store.all(), clock.now)
    billing, ledger = state.services
    assert billing.endpoints[1] == Endpoint("192.168.7.20", {"https": 8443}, True, "shop/billing@192.168.7.20:8443",
                                            "registration")
    assert (ledger.cluster_ip, ledger.source, ledger.endpoints[0].ports) == ("", "registration", {"9000": 9000})
    vm = state.workload_by_ip("192.168.7.20")
    assert (vm.source, vm.ready, vm.enrolled, vm.labels) == ("registration", True, False,
                                                             {"app": "billing", "version": "v3"})
    clock.now += 31
    assert not merge(RegistryState(services=(web,)), store.all(), clock.now).services[0].endpoints[1].ready
