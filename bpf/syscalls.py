"""The bpf(2) system call through ctypes: maps driven by their file descriptors, and links.

The long-lived agent holds only descriptors of programs and maps a short-lived loader made
(bpf/loader.py), so it needs neither BCC nor LLVM: this module is all it uses to read and write
the maps and to attach the sk_lookup program. A map's key and value are ctypes types (a
c_uint32, a Structure mirroring the C struct); their sizes are checked against the kernel's
view of the map when it is opened, so a layout that drifted from bpf/capture.c fails at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Any, Generic, Iterator, TypeVar

# The bpf(2) system call number by architecture (asm/unistd.h).
SYS_BPF = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd (uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28

# enum bpf_map_type values amesh's tests create
BPF_MAP_TYPE_HASH = 1

# flags of BPF_MAP_UPDATE_ELEM
BPF_ANY = 0  # create or update
BPF_NOEXIST = 1  # create only
BPF_EXIST = 2  # update only

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """The kernel refused a bpf(2) command; `errno` says why."""


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64),  # or next_key, for BPF_MAP_GET_NEXT_KEY
                ("flags", ctypes.c_uint64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info: what the kernel says a map is."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Runs one bpf(2) command on `attr`; returns its result, raises BpfError on failure."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise BpfError(errno.ENOSYS, f"amesh does not know the bpf(2) system call's number on {platform.machine()}")
    result = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return result


def _address(value: Any) -> int:
    return 0 if value is None else ctypes.addressof(value)


def map_info(fd: int) -> MapInfo:
    """What the kernel says about the map behind `fd` (type, key and value sizes, name)."""
    info = MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return info


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attaches a program to a target (a network namespace's fd for sk_lookup); returns the
    link's fd, which detaches it when the last copy closes."""
    return bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd, target_fd, attach_type, 0))


K = TypeVar("K")  # a ctypes type: c_uint32, a Structure
V = TypeVar("V")


class BpfMap(Generic[K, V]):
    """A BPF map by its fd, with its key and value as ctypes types; owns the fd (`close()`)."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], name: str) -> None:
        """Takes `fd`; raises BpfError (EINVAL) when the kernel's key or value size differs from the types'."""
        self.fd, self.key_type, self.value_type, self.name = fd, key_type, value_type, name
        info = map_info(fd)
        expected = (ctypes.sizeof(key_type), ctypes.sizeof(value_type))
        if (info.key_size, info.value_size) != expected:
            raise BpfError(errno.EINVAL, f"map {name} holds {info.key_size}-byte keys and {info.value_size}-byte "
                                         f"values, not the {expected[0]} and {expected[1]} amesh's layout has")

    @classmethod
    def create(cls, map_type: int, key_type: type[K], value_type: type[V], max_entries: int,
               name: str) -> "BpfMap[K, V]":
        """A new map of `map_type` (needs CAP_BPF or root)."""
        fd = bpf(BPF_MAP_CREATE, _MapCreateAttr(map_type, ctypes.sizeof(key_type), ctypes.sizeof(value_type),
                                                max_entries, 0))
        return cls(fd, key_type, value_type, name)

    def _elem(self, cmd: int, key: K | None, value: Any = None, flags: int = 0) -> None:
        bpf(cmd, _MapElemAttr(self.fd, _address(key), _address(value), flags))

    def lookup(self, key: K) -> V | None:
        """The value under `key`, or None when there is none."""
        value = self.value_type()
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, value)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value

    def update(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        """Sets `key` to `value` (BPF_ANY, BPF_NOEXIST or BPF_EXIST)."""
        self._elem(BPF_MAP_UPDATE_ELEM, key, value, flags)

    def delete(self, key: K) -> bool:
        """Removes `key`; False when it was not there."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[K]:
        """Every key, in the kernel's order (a key removed meanwhile may restart the walk)."""
        key: K | None = None
        while True:
            next_key = self.key_type()
            try:
                self._elem(BPF_MAP_GET_NEXT_KEY, key, next_key)
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return  # past the last key
                raise
            yield next_key
            key = next_key

    def items(self) -> Iterator[tuple[K, V]]:
        """Every (key, value), skipping keys removed between the walk and the lookup."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        """Closes the fd (the map lives on while a program or another fd holds it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
