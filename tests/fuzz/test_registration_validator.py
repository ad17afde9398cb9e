"""Fuzzing the registration validator (registry/registrations.py) with what a client can POST to
/registrations: any JSON value gives a registration or a RegistrationError with a 4xx/5xx status,
never another exception, and an accepted address is one a workload can have.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from registry.registrations import FIELDS, RegistrationError, RegistrationStore, parse_ttl

pytestmark = pytest.mark.fuzz

VALID = {"name": "billing", "namespace": "shop", "address": "10.1.2.3", "port": 8080, "version": "v1",
         "service_account": "billing", "ttl": "30s"}
# what json.loads can hand over: null, booleans, numbers, strings, arrays, objects
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.integers(),
                      st.text(alphabet="0123456789.x ", max_size=18), json_values)
# near-valid requests: each field kept, dropped, or replaced by anything, plus unknown fields
specs = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={name: st.one_of(st.just(VALID[name]), json_values) for name in FIELDS}),
    st.builds(lambda address, rest: {**VALID, **rest, "address": address}, addresses,
              st.dictionaries(st.sampled_from(FIELDS + ("weight",)), json_values, max_size=2)),
)


def _ordinary(address: str) -> bool:
    """An address a workload can be reached at: not the node itself, nobody, or everybody."""
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast
                or ip == ipaddress.IPv4Address("255.255.255.255"))


@given(specs)
def test_any_request_is_a_registration_or_a_registration_error(spec):
    try:
        registration = RegistrationStore(clock=lambda: 1000.0).register(spec)
    except RegistrationError as e:
        assert 400 <= e.status < 600 and str(e)
        return
    assert registration.name == spec["name"] and 1 <= registration.port <= 65535
    json.dumps(registration.to_dict(1000.0))  # the answer the admin API sends back


@given(st.builds(lambda address: {**VALID, "address": address}, addresses))
@example({**VALID, "address": "127.0.0.1"})
@example({**VALID, "address": "169.254.169.254"})
@example({**VALID, "address": 167772161})
def test_an_accepted_address_is_a_string_no_workload_is_barred_from(spec):
    try:
        registration = RegistrationStore(clock=lambda: 1000.0).register(spec)
    except RegistrationError as e:
        assert "address" in str(e), str(e)
        return
    assert isinstance(spec["address"], str), f"accepted the {type(spec['address']).__name__} {spec['address']!r}"
    assert _ordinary(registration.address), f"accepted {registration.address}"


@given(json_values)
def test_parse_ttl_answers_seconds_in_range_or_a_registration_error(value):
    try:
        seconds = parse_ttl(value)
    except RegistrationError as e:
        assert str(e).startswith("ttl: ")
        return
    assert 1.0 <= seconds <= 24 * 3600.0
