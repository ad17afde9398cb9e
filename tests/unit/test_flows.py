"""Per-flow counters without a kernel: the map entries' conversion, the table and `ameshctl flows --limit`."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from click.testing import CliRunner

from agent import cli, views
from bpf.datapath import (_ip_key, _key_ip, _key_port, flow_record, flow_records, monotonic_offset_ns,
                          monotonic_to_iso, tcp_flags_text)


def wire_u32(*octets: int) -> int:
    """Four bytes in packet order as BCC hands a u32 map field to Python on this host."""
    return int.from_bytes(bytes(octets), sys.byteorder)


def wire_u16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def entry(src=(10, 244, 1, 10), sport=40000, dst=(10, 244, 1, 11), dport=8080, proto=6, packets=3, nbytes=180,
          first=1_000_000_000, last=2_500_000_000, flags=0x13, captured=0):
    key = SimpleNamespace(saddr=wire_u32(*src), daddr=wire_u32(*dst), sport=wire_u16(sport),
                          dport=wire_u16(dport), proto=proto)
    stats = SimpleNamespace(packets=packets, bytes=nbytes, first_seen=first, last_seen=last, tcp_flags=flags,
                            captured=captured)
    return key, stats


def test_addresses_and_ports_convert_from_network_order_both_ways():
    assert _key_ip(wire_u32(10, 244, 1, 10)) == "10.244.1.10"
    assert _ip_key("10.244.1.10") == wire_u32(10, 244, 1, 10)
    assert _key_ip(_ip_key("192.168.255.1")) == "192.168.255.1"
    assert _key_port(wire_u16(15008)) == 15008
    assert _key_port(wire_u16(1)) == 1


def test_tcp_flags_are_named_in_connection_order():
    assert tcp_flags_text(0x02) == "SYN"
    assert tcp_flags_text(0x02 | 0x10 | 0x01) == "SYN,ACK,FIN"
    assert tcp_flags_text(0xFF) == "SYN,ACK,PSH,URG,ECE,CWR,FIN,RST"
    assert tcp_flags_text(0) == ""


def test_monotonic_times_become_wall_clock_iso_utc():
    offset = 1_700_000_000_000_000_000 - 5_000_000_000  # monotonic 5 s == 2023-11-14T22:13:20Z
    assert monotonic_to_iso(5_000_000_000, offset) == "2023-11-14T22:13:20.000+00:00"
    assert monotonic_to_iso(5_123_999_999, offset) == "2023-11-14T22:13:20.123+00:00"  # truncated, not rounded
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert abs(now + monotonic_offset_ns() - time.time_ns()) < 1_000_000_000


def test_a_map_entry_becomes_a_json_ready_record():
    key, stats = entry(captured=1)
    assert flow_record(key, stats, offset_ns=0) == {
        "src": "10.244.1.10:40000", "dst": "10.244.1.11:8080", "proto": "tcp", "packets": 3, "bytes": 180,
        "first_seen": "1970-01-01T00:00:01.000+00:00", "last_seen": "1970-01-01T00:00:02.500+00:00",
        "flags": "SYN,ACK,FIN", "captured": True}
    udp = flow_record(*entry(proto=17, flags=0, dport=53), offset_ns=0)
    assert (udp["proto"], udp["flags"], udp["captured"], udp["dst"]) == ("udp", "", False, "10.244.1.11:53")


def test_records_are_sorted_by_bytes_and_limited():
    entries = [entry(sport=1, nbytes=10), entry(sport=2, nbytes=30), entry(sport=3, nbytes=20)]
    assert [r["bytes"] for r in flow_records(entries, 0)] == [30, 20, 10]
    assert [r["src"] for r in flow_records(entries, 0, limit=2)] == ["10.244.1.10:2", "10.244.1.10:3"]


def test_flows_table_has_the_columns_and_a_row_per_flow():
    records = flow_records([entry(captured=1), entry(proto=17, flags=0, dport=53, nbytes=60)], 0)
    lines = views.flows(records).splitlines()
    assert lines[0].split() == ["SOURCE", "DESTINATION", "PACKETS", "BYTES", "FIRST", "SEEN", "LAST", "SEEN",
                                "FLAGS", "CAPTURED"]
    assert lines[1].split() == ["10.244.1.10:40000", "10.244.1.11:8080", "3", "180", "1970-01-01T00:00:01.000+00:00",
                                "1970-01-01T00:00:02.500+00:00", "SYN,ACK,FIN", "yes"]
    assert lines[2].split()[1:3] == ["10.244.1.11:53", "(udp)"] and lines[2].split()[-2:] == ["-", "no"]
    assert views.flows([]) == "no flows"


def test_flows_command_passes_limit_to_the_admin_api(monkeypatch):
    asked = []
    monkeypatch.setattr(cli, "_call", lambda admin, path, method="GET": asked.append(path) or [])
    for args in (["flows"], ["flows", "--limit", "5", "-o", "json"]):
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 0, result.output
    assert asked == ["/flows", "/flows?limit=5"]
    assert CliRunner().invoke(cli.main, ["flows", "--limit", "0"]).exit_code == 2
