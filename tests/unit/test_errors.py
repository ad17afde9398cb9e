"""The failure table is the one list of reasons: every code the ztunnel raises or records is in
it, and every row is used somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from ztunnel.errors import REASONS, ProxyError, failure_reason

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("ztunnel", "agent", "registry") for p in (ROOT / folder).rglob("*.py")
           if p.name != "errors.py"]
# a ProxyError (or subclass) built with a literal code, or a record ended with one
_RAISED = re.compile(r"(?:(?<!Assertion)Error|NotLocal|Refused|__init__)\(\s*\"([a-z_]+)\"")
_ENDED = re.compile(r"self\.end\([^\n]*\"(failed)\"[^\n]*,\s*\"([a-z_]+)\"\)")


def codes_in_source() -> set[str]:
    codes: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        codes.update(_RAISED.findall(text))
        codes.update(code for _, code in _ENDED.findall(text))
    return codes


def test_every_code_in_the_source_is_in_the_table():
    codes = codes_in_source()
    assert codes, "the pattern found no code at all: it is out of date"
    assert codes <= set(REASONS), sorted(codes - set(REASONS))


def test_every_row_of_the_table_is_used():
    text = "".join(path.read_text() for path in SOURCES)
    unused = [code for code in REASONS if f'"{code}"' not in text]
    assert unused == [], unused


def test_an_unknown_code_is_reported_as_internal_and_rows_are_consistent():
    assert failure_reason("no such code").code == "internal"
    assert ProxyError("connect_refused", "x").info.retriable
    for code, row in REASONS.items():
        assert row.code == code and row.flag and row.summary
        assert not (row.retriable and row.fault in ("policy", "client")), code  # retrying cannot help
