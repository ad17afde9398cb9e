"""bench/syscalls.py: perf stat's CSV read into counts, and the counts as a table."""

from bench.syscalls import parse_counts, rates, table

PERF_OUTPUT = """\
1200,,syscalls:sys_enter_read,3001234567,100.00,,
<not counted>,,syscalls:sys_enter_splice,0,100.00,,
300,,syscalls:sys_enter_epoll_ctl,3001234567,100.00,,

2000,,raw_syscalls:sys_enter,3001234567,100.00,,
"""


def test_counts_by_syscall_and_total() -> None:
    assert parse_counts(PERF_OUTPUT) == {"read": 1200, "epoll_ctl": 300, "total": 2000}


def test_table_shows_top_calls_then_the_rest_and_total() -> None:
    per_gb = rates({"read": 1200, "epoll_ctl": 300, "write": 100, "other": 400, "total": 2000}, 2.0)
    lines = table({"amesh per GB": per_gb}, top=2).splitlines()
    assert lines[2:] == ["| read | 600 |", "| epoll_ctl | 150 |", "| other (the rest) | 250 |", "| total | 1,000 |"]
