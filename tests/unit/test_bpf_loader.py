"""The BPF loader child and the bpf(2) map wrapper the agent drives its maps with.

The loader's failures (a child that hangs, dies or answers nothing) need no privileges. Creating
maps and loading programs needs root (CAP_BPF): those tests are skipped without it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys
import time

import pytest

from bpf.loader import LoadError, LoadRequest, ProgramSpec, load
from bpf.syscalls import BPF_EXIST, BPF_MAP_TYPE_HASH, BPF_NOEXIST, BpfError, BpfMap, map_info

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating BPF maps and loading programs needs root")

BPF_PROG_TYPE_SCHED_CLS = 3
COUNTER_SOURCE = """
#include <uapi/linux/bpf.h>
BPF_HASH(counts, u32, u64, 16);
int count_packets(struct __sk_buff *skb)
{
    u32 key = skb->ifindex;
    u64 one = 1, *value = counts.lookup_or_try_init(&key, &one);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 0;
}
"""
REQUEST = LoadRequest("counter.c", (), (ProgramSpec("count_packets", BPF_PROG_TYPE_SCHED_CLS),), ("counts",))


class Pair(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


@needs_root
def test_a_hash_map_is_updated_read_walked_and_emptied_by_syscalls():
    table = BpfMap.create(BPF_MAP_TYPE_HASH, ctypes.c_uint32, Pair, 8, "pairs")
    try:
        assert map_info(table.fd).key_size == 4 and map_info(table.fd).value_size == 16
        assert table.lookup(ctypes.c_uint32(1)) is None
        assert list(table.keys()) == []
        for key in (1, 2, 3):
            table.update(ctypes.c_uint32(key), Pair(key * 10, key * 100))
        assert (table.lookup(ctypes.c_uint32(2)).packets, table.lookup(ctypes.c_uint32(2)).bytes) == (20, 200)
        assert sorted((k.value, v.packets) for k, v in table.items()) == [(1, 10), (2, 20), (3, 30)]

        with pytest.raises(BpfError) as exists:
            table.update(ctypes.c_uint32(1), Pair(0, 0), BPF_NOEXIST)
        assert exists.value.errno == errno.EEXIST
        with pytest.raises(BpfError) as missing:
            table.update(ctypes.c_uint32(9), Pair(0, 0), BPF_EXIST)
        assert missing.value.errno == errno.ENOENT
        table.update(ctypes.c_uint32(1), Pair(11, 0), BPF_EXIST)
        assert table.lookup(ctypes.c_uint32(1)).packets == 11

        assert table.delete(ctypes.c_uint32(2)) is True
        assert table.delete(ctypes.c_uint32(2)) is False
        assert sorted(k.value for k in table.keys()) == [1, 3]
        for key in list(table.keys()):
            table.delete(key)
        assert list(table.items()) == []
    finally:
        os.close(table.fd)


@needs_root
def test_a_layout_that_differs_from_the_kernels_map_is_refused_by_name():
    table = BpfMap.create(BPF_MAP_TYPE_HASH, ctypes.c_uint32, ctypes.c_uint64, 4, "ints")
    try:
        with pytest.raises(BpfError, match="map flows holds 4-byte keys and 8-byte values, not the 4 and 16"):
            BpfMap(table.fd, ctypes.c_uint32, Pair, "flows")
    finally:
        os.close(table.fd)


@needs_root
def test_the_child_compiles_loads_and_hands_over_fds_the_caller_owns(tmp_path):
    source = tmp_path / "counter.c"
    source.write_text(COUNTER_SOURCE)
    loaded = load(LoadRequest(str(source), REQUEST.cflags, REQUEST.programs, REQUEST.maps))
    try:
        counts = BpfMap(loaded.maps["counts"], ctypes.c_uint32, ctypes.c_uint64, "counts")
        assert map_info(counts.fd).name == b"counts"
        counts.update(ctypes.c_uint32(7), ctypes.c_uint64(1))  # the map outlived the child that made it
        assert counts.lookup(ctypes.c_uint32(7)).value == 1
        for fd in (*loaded.programs.values(), *loaded.maps.values()):
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # never leaked into the agent's children
        assert "bcc" not in sys.modules
    finally:
        loaded.close()
    assert loaded.programs == loaded.maps == {}


@needs_root
def test_a_compile_error_carries_the_compilers_message(tmp_path):
    source = tmp_path / "counter.c"
    source.write_text(COUNTER_SOURCE.replace("u64 one = 1", "u64 one = ONE"))
    with pytest.raises(LoadError) as failed:
        load(LoadRequest(str(source), REQUEST.cflags, REQUEST.programs, REQUEST.maps))
    message = str(failed.value)
    assert message.startswith("loading counter.c failed: Failed to compile BPF module")
    assert "use of undeclared identifier 'ONE'" in message


def python_child(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_a_hanging_child_is_stopped_at_the_timeout():
    with pytest.raises(LoadError, match=r"did not load counter.c within 0.5 s and was stopped"):
        load(REQUEST, timeout=0.5, command=python_child("import time; time.sleep(30)"))


def test_a_hanging_child_whose_output_another_process_holds_is_still_stopped_in_time():
    started = time.monotonic()
    code = "import subprocess, time; subprocess.Popen(['sleep', '3']); time.sleep(30)"
    with pytest.raises(LoadError, match=r"did not load counter.c within 0.5 s and was stopped"):
        load(REQUEST, timeout=0.5, command=python_child(code))
    assert time.monotonic() - started < 2.5


def test_a_child_killed_by_a_signal_is_named_so():
    with pytest.raises(LoadError, match="was killed by SIGKILL before handing over counter.c's programs"):
        load(REQUEST, command=python_child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))


def test_a_child_failing_shows_its_last_words_first():
    code = "import sys; print('detail one', file=sys.stderr); sys.exit('loading counter.c failed: no luck')"
    with pytest.raises(LoadError) as failed:
        load(REQUEST, command=python_child(code))
    assert str(failed.value) == "loading counter.c failed: no luck:\ndetail one"


def test_a_child_that_exits_without_answering_is_an_error():
    with pytest.raises(LoadError, match="exited without handing over counter.c's programs"):
        load(REQUEST, command=python_child("pass"))


def test_a_reply_with_the_wrong_fds_is_refused():
    code = ("import socket, sys; s = socket.socket(fileno=int(sys.argv[-1])); "
            "socket.send_fds(s, [b'[\"count_packets\", \"counts\"]'], [0])")
    with pytest.raises(LoadError, match=r"reply for counter.c is not the 2 fds asked for"):
        load(REQUEST, command=python_child(code))


def test_a_childs_warnings_are_logged_and_its_fds_are_the_callers(caplog):
    code = ("import os, socket, sys; s = socket.socket(fileno=int(sys.argv[-1])); "
            "print('counter.c:3: warning: unused variable', file=sys.stderr); "
            "socket.send_fds(s, [b'[\"count_packets\", \"counts\"]'], [os.open('/dev/null', os.O_RDONLY)] * 2)")
    with caplog.at_level("WARNING", logger="amesh.bpf"):
        loaded = load(REQUEST, command=python_child(code))
    try:
        assert set(loaded.programs) == {"count_packets"} and set(loaded.maps) == {"counts"}
        assert all(fd > 2 for fd in (*loaded.programs.values(), *loaded.maps.values()))  # copies, not ours
    finally:
        loaded.close()
    assert "event=bpf_loader_output source=counter.c output='counter.c:3: warning: unused variable'" in caplog.text
