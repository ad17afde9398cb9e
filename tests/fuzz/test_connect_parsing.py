"""Fuzzing the CONNECT parsing an HBONE server does on every request from a peer: ConnectRequest.parse,
parse_authority and parse_forwarded_for (ztunnel/hbone.py) take whatever a mesh-certificate holder
sends, and answer a request or a ValueError whose text names what was wrong (it becomes the 400).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ztunnel.hbone import ConnectRequest, forwarded_for, hostport, parse_authority, parse_forwarded_for

pytestmark = pytest.mark.fuzz

AUTHORITY_ALPHABET = "0123456789abcdef.:[]-_ %\x00\u0663"  # digits, IPv6 brackets, an Arabic-Indic three
authorities = st.one_of(
    st.text(),
    st.text(alphabet=AUTHORITY_ALPHABET, max_size=48),
    st.builds(hostport, st.ip_addresses().map(str), st.integers(-5, 70_000)),
    # a port of thousands of digits: past Python's int-from-text limit of 4300 digits
    st.integers(0, 6000).map(lambda digits: "10.0.0.1:" + "9" * digits),
)
header_names = st.one_of(st.sampled_from([":method", ":authority", ":path", ":scheme", "forwarded",
                                          "traceparent", ":status"]), st.text(max_size=12))
header_values = st.one_of(st.sampled_from(["CONNECT", "GET"]), authorities, st.text(max_size=40))
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)


def _is_our_refusal(error: ValueError) -> bool:
    """A 400's text says which part of the request was wrong, in amesh's words."""
    text = str(error)
    return text.startswith("invalid :authority") or text.startswith("HBONE accepts only CONNECT")


@given(authorities)
@example("10.0.0.1:" + "9" * 5000)
def test_parse_authority_answers_a_host_and_port_or_says_what_is_wrong(authority: str):
    try:
        host, port = parse_authority(authority)
    except ValueError as e:
        assert _is_our_refusal(e), str(e)[:200]
        return
    assert host and 1 <= port <= 65535
    assert parse_authority(hostport(host, port)) == (host, port)


@given(header_lists, st.integers(1, 2**31 - 1))
def test_connect_request_parse_accepts_only_a_connect_to_host_and_port(headers, stream_id: int):
    try:
        request = ConnectRequest.parse(headers, stream_id)
    except ValueError as e:
        assert _is_our_refusal(e), str(e)[:200]
        return
    assert dict(h for h in headers if h[0] == ":method")[":method"] == "CONNECT"
    assert 1 <= request.port <= 65535 and request.host and request.stream_id == stream_id
    assert not any(name.startswith(":") for name in request.headers)


@given(st.one_of(st.text(), st.text(alphabet='for=[]";,:. 0123456789abcdefunknown', max_size=60)))
def test_parse_forwarded_for_answers_an_ip_address_or_none(value: str):
    ip = parse_forwarded_for(value)
    assert ip is None or str(ipaddress.ip_address(ip)) == ip


@given(st.ip_addresses())
def test_forwarded_for_round_trips(address):
    assert parse_forwarded_for(forwarded_for(str(address))) == str(address)
