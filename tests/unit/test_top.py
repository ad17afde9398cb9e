"""ameshctl top's ranking: throughput over the last interval, busiest live connections first."""

from __future__ import annotations

from datetime import datetime, timezone

from agent.top import human_rate, rank


def conn(id: int, sent: int, received: int, state: str = "open", duration: float = 10.0,
         ended: float | None = None) -> dict:
    return {"id": id, "direction": "outbound", "source_workload": "shop/client", "source_ip": "10.244.1.10",
            "original_dst": "10.96.0.10:80", "service": "shop/web", "upstream_workload": "shop/server-b",
            "upstream": "10.244.2.10:8080", "security": "mtls", "bytes_sent": sent, "bytes_received": received,
            "duration": duration, "state": state, "kernel": {"client": {"rtt_ms": 0.25}},
            "ended": datetime.fromtimestamp(ended, timezone.utc).isoformat() if ended else None}


def test_rates_come_from_the_bytes_moved_in_the_interval_and_the_busiest_comes_first():
    previous = [conn(1, 1000, 1000), conn(2, 0, 0)]
    current = [conn(1, 2000, 1000), conn(2, 0, 8000), conn(3, 500, 0, duration=0.5)]
    rows = rank(previous, current, interval=2.0, now=0)
    assert [(r.id, r.sent_per_s, r.received_per_s) for r in rows] == [(2, 0, 4000), (3, 1000, 0), (1, 500, 0)]
    assert rows[0].rtt_ms == 0.25 and rows[0].endpoint == "shop/server-b"


def test_closed_connections_linger_briefly_below_live_ones_then_go():
    now = 1_000_000.0
    current = [conn(1, 10, 10), conn(2, 10, 10, state="closed", ended=now - 1), conn(3, 10, 10, state="closed",
                                                                                  ended=now - 60)]
    rows = rank(current, current, interval=1.0, now=now)
    assert [(r.id, r.sent_per_s) for r in rows] == [(1, 0), (2, 0)]


def test_rates_read_as_bits_per_second():
    assert human_rate(0) == "0 bit/s"
    assert human_rate(125_000) == "1.0 Mbit/s"
    assert human_rate(2.5e9 / 8) == "2.5 Gbit/s"
