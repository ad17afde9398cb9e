"""The node's capture datapath: the BPF program, its tc attachments and the routing it needs.

`NodeDatapath` is the one place that changes kernel state for amesh: it has bpf/capture.c
compiled and loaded by BCC in a short-lived child process (bpf/loader.py: the agent never maps
LLVM) and drives the programs and maps by their fds (bpf/syscalls.py). It attaches the tc
program (pyroute2) at tc ingress of the interfaces packets enter the node by, and its sk_lookup
program to the node's network namespace (a link that goes away with the agent), keeps the map
of enrolled pod addresses and the sockmap of the ztunnel's listeners, and installs the policy
rule and local route that deliver marked packets to them. Everything it adds carries a fixed
priority or table number, so a later agent finds and replaces what a killed one left.
It also reads the program's per-flow counters back (`flows()`), through pure conversion helpers.

A new agent started where one runs takes the running one's datapath over (bpf/handover.py):
it adopts the loaded programs, maps and sk_lookup link, replaces the listeners in the sockmap
with its own, and leaves the filters, rule and route in place; the old agent then drains and
at its exit closes only its fds (`hand_over()`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bpf.handover import HandoverOffer
from bpf.loader import LoadError, Loaded, LoadRequest, ProgramSpec, load
from bpf.slots import Slot
from bpf.syscalls import BpfError, BpfMap, link_create

log = logging.getLogger("amesh.bpf")

SOURCE = Path(__file__).with_name("capture.c")

# The mark, rule priority, route table and tc filter priority are amesh's signature in the
# node: fixed numbers so that cleanup after a crash can find exactly what amesh added.
CAPTURE_MARK = 0x00A30000
CAPTURE_MARK_MASK = 0x00FF0000
ROUTE_TABLE = 15001
RULE_PRIORITY = 15001
FILTER_PRIORITY = 15001
TC_INGRESS = "ffff:fff2"
# uapi enum values (uapi/linux/bpf.h): the tc program type, the sk_lookup program type and its
# attach type.
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36


class DatapathError(RuntimeError):
    """The kernel refused a change amesh needs (BPF load, tc attach, rule or route)."""


@dataclass(frozen=True)
class Attachment:
    """An interface the capture program is attached to."""

    ifindex: int
    ifname: str
    kind: str  # link kind: "veth", "bridge", "vxlan", "" for a physical NIC, ...


class FlowKey(ctypes.Structure):
    """capture.c's struct flow_key: a flow's 5-tuple as the packet carries it."""

    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowStats(ctypes.Structure):
    """capture.c's struct flow_stats: one flow's counters."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("first_seen", ctypes.c_uint64),
                ("last_seen", ctypes.c_uint64), ("tcp_flags", ctypes.c_uint64), ("captured", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


# capture.c's maps as its BPF_HASH and BPF_TABLE lines declare them: name -> (key, value).
MAP_LAYOUTS: dict[str, tuple[type, type]] = {
    "enrolled_pods": (ctypes.c_uint32, ctypes.c_uint8),  # pod IPv4 (network order) -> 1
    "flows": (FlowKey, FlowStats),
    "listeners": (ctypes.c_uint32, ctypes.c_int),  # slot -> socket (written as the socket's fd)
}
TC_PROGRAM, LOOKUP_PROGRAM = "capture", "capture_listener_lookup"
PROGRAMS = (ProgramSpec(TC_PROGRAM, BPF_PROG_TYPE_SCHED_CLS),
            ProgramSpec(LOOKUP_PROGRAM, BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP))


def capture_cflags(hbone_port: int, flow_accounting: bool) -> tuple[str, ...]:
    """The build flags of capture.c for this agent's settings."""
    return (f"-DCAPTURE_MARK={CAPTURE_MARK:#x}", f"-DHBONE_PORT={hbone_port}",
            f"-DFLOW_ACCOUNTING={int(flow_accounting)}", *(f"-D{slot.name}_SLOT={slot.value}" for slot in Slot))


def program_signature(cflags: tuple[str, ...]) -> str:
    """What identifies a loaded capture program for a handover: its source and build flags."""
    return hashlib.sha256(SOURCE.read_bytes() + "\0".join(cflags).encode()).hexdigest()


LINK = "listener_lookup_link"  # the sk_lookup link's name in a handover


class CaptureProgram:
    """bpf/capture.c loaded by a short-lived child (bpf/loader.py), or adopted from the agent that
    ran before: its programs' fds and its maps."""

    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        try:
            self._maps = {name: BpfMap(self._loaded.maps[name], key, value, name)
                          for name, (key, value) in MAP_LAYOUTS.items()}
        except BpfError as exc:
            self.close()
            raise DatapathError(f"loading {SOURCE.name} failed: {exc.strerror}") from exc
        self.tc_program_fd = self._loaded.programs[TC_PROGRAM]
        self.flows = self._maps["flows"]

    @classmethod
    def load(cls, cflags: tuple[str, ...]) -> CaptureProgram:
        """Compiles and loads capture.c with `cflags` (in the loader child)."""
        started = time.monotonic()
        try:
            loaded = load(LoadRequest(str(SOURCE), cflags, PROGRAMS, tuple(MAP_LAYOUTS)))
        except LoadError as exc:
            raise DatapathError(str(exc)) from exc
        log.info("event=bpf_loaded source=%s seconds=%.3f", SOURCE.name, time.monotonic() - started)
        return cls(loaded)

    @classmethod
    def adopt(cls, offer: HandoverOffer) -> CaptureProgram:
        """The running agent's program, from its handover (the offer's fds become ours)."""
        fds = dict(offer.fds)
        return cls(Loaded({p.name: fds.pop(p.name) for p in PROGRAMS}, {m: fds.pop(m) for m in MAP_LAYOUTS}))

    def handover_fds(self) -> dict[str, int]:
        """The fds a new agent needs to take this program over, by name."""
        return {**self._loaded.programs, **self._loaded.maps}

    def set_listener(self, slot: Slot, sock: socket.socket) -> None:
        """Puts one of the ztunnel's listening sockets in the sockmap SYNs are assigned from."""
        try:
            self._maps["listeners"].update(ctypes.c_uint32(slot), ctypes.c_int(sock.fileno()))
        except BpfError as exc:
            raise DatapathError(f"putting the {slot.name.lower()} listener in the sockmap failed: "
                                f"{errno.errorcode.get(exc.errno, exc.errno)}") from exc

    def attach_listener_lookup(self, above_fd: int) -> int:
        """Attaches capture_listener_lookup to the calling thread's network namespace; returns
        the link's fd (closing it detaches), numbered above `above_fd`."""
        try:
            with open("/proc/thread-self/ns/net", "rb") as netns:
                fd = link_create(self._loaded.programs[LOOKUP_PROGRAM], netns.fileno(), BPF_SK_LOOKUP)
        except BpfError as exc:
            raise DatapathError(f"attaching the sk_lookup program to the node's network namespace failed: "
                                f"{exc.strerror}") from exc
        return _moved_above(fd, above_fd)

    def set_enrolled(self, ips: Iterable[str]) -> None:
        """Makes the enrolled-pods map hold exactly `ips`."""
        enrolled = self._maps["enrolled_pods"]
        wanted = {_ip_key(ip) for ip in ips}
        try:
            present = {key.value for key in enrolled.keys()}
            for key in present - wanted:
                enrolled.delete(ctypes.c_uint32(key))
            for key in wanted - present:
                enrolled.update(ctypes.c_uint32(key), ctypes.c_uint8(1))
        except BpfError as exc:
            raise DatapathError(f"updating the enrolled_pods map failed: {exc.strerror}") from exc

    def close(self) -> None:
        """Closes the programs' and maps' fds (attached programs stay until detached)."""
        self._loaded.close()


# Byte order, in one place: the program keeps addresses and ports as the packet carries them
# (network order); a ctypes integer field reads those same bytes as a host-order integer.

def _moved_above(fd: int, above_fd: int) -> int:
    """`fd` renumbered above `above_fd` (close-on-exec); the old number is closed."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above_fd + 1)
    finally:
        os.close(fd)


def _ip_key(ip: str) -> int:
    """A dotted IPv4 address as the program's u32 (its four bytes in network order)."""
    return socket.htonl(int(ipaddress.IPv4Address(ip)))


def _key_ip(value: int) -> str:
    """The program's u32 address back to dotted form."""
    return str(ipaddress.IPv4Address(socket.ntohl(value)))


def _key_port(value: int) -> int:
    """The program's u16 port (network order) as a number."""
    return socket.ntohs(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
# The TCP flag byte's bits, in the order a connection usually shows them.
TCP_FLAGS = (("SYN", 0x02), ("ACK", 0x10), ("PSH", 0x08), ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80),
             ("FIN", 0x01), ("RST", 0x04))


def tcp_flags_text(bits: int) -> str:
    """The OR of a flow's TCP flag bytes as "SYN,ACK,FIN"; "" for none (UDP)."""
    return ",".join(name for name, bit in TCP_FLAGS if bits & bit)


def monotonic_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC (bpf_ktime_get_ns), in ns; read once per snapshot."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def monotonic_to_iso(ns: int, offset_ns: int) -> str:
    """A CLOCK_MONOTONIC time in ns as ISO 8601 UTC with milliseconds, as the admin API shows times."""
    wall = _EPOCH + timedelta(microseconds=(ns + offset_ns) // 1000)  # integers: no float rounding
    return wall.isoformat(timespec="milliseconds")


def flow_record(key: Any, stats: Any, offset_ns: int) -> dict:
    """One entry of the flows map (objects with the C structs' fields) as JSON-ready data."""
    return {
        "src": f"{_key_ip(key.saddr)}:{_key_port(key.sport)}",
        "dst": f"{_key_ip(key.daddr)}:{_key_port(key.dport)}",
        "proto": PROTOCOLS.get(key.proto, str(key.proto)),
        "packets": stats.packets,
        "bytes": stats.bytes,
        "first_seen": monotonic_to_iso(stats.first_seen, offset_ns),
        "last_seen": monotonic_to_iso(stats.last_seen, offset_ns),
        "flags": tcp_flags_text(stats.tcp_flags),
        "captured": bool(stats.captured),
    }


def flow_records(entries: Iterable[tuple[Any, Any]], offset_ns: int, limit: int | None = None) -> list[dict]:
    """Map entries as records, largest by bytes first, at most `limit` of them."""
    ranked = sorted(entries, key=lambda kv: kv[1].bytes, reverse=True)
    return [flow_record(k, v, offset_ns) for k, v in ranked[:limit]]


class NodeDatapath:
    """Capture for one node: `sync()` it with the enrolled local pods, `close()` to remove it."""

    def __init__(self, listeners: Mapping[Slot, socket.socket], hbone_port: int, flow_accounting: bool = True,
                 offer: HandoverOffer | None = None) -> None:
        """Loads the program with `listeners` in its sockmap; `hbone_port` selects INBOUND_HBONE;
        `flow_accounting` turns the per-flow counters on. With `offer` (the running agent's
        handover) adopts its program, maps and link instead, touching nothing else."""
        self._ipr = IPRoute()
        self._attached: dict[int, Attachment] = {}
        self._enrolled: tuple[str, ...] = ()
        self._not_routed_here: tuple[str, ...] = ()
        self._listener_lookup_link: int | None = None
        self.program: CaptureProgram | None = None
        # whether close() removes the filters, rule and route: not while an adopted datapath's
        # previous agent still owns them (own()), nor once a new agent took them over (hand_over())
        self.owner = offer is None
        # The link dies with the last fd to it; numbered above the listeners, it is closed after
        # them when the agent is killed (a process's files close in fd order), so there is no
        # moment with the listeners still in the sockmap and the lookup gone, which would let
        # capture() pass a SYN to a TIME_WAIT socket with no one to pick the listener.
        above = max((sock.fileno() for sock in listeners.values()), default=2)
        cflags = capture_cflags(hbone_port, flow_accounting)
        self.signature = program_signature(cflags)  # what a handover of this datapath is checked by
        try:
            if offer is not None:
                self._adopt(offer, above)
            else:
                removed = remove_leftovers(self._ipr)
                if removed:
                    log.info("event=leftovers_removed items=%s", ",".join(removed))
                self.program = CaptureProgram.load(cflags)
            assert self.program is not None
            for slot, sock in listeners.items():  # one map update per slot: SYNs go to the new listener
                self.program.set_listener(slot, sock)
            if offer is None:
                self._listener_lookup_link = self.program.attach_listener_lookup(above)
                self._install_routing()
        except BaseException:
            self.close()
            raise

    def _adopt(self, offer: HandoverOffer, above_fd: int) -> None:
        """Takes the running agent's program, maps and sk_lookup link from its handover."""
        if offer.signature != self.signature:
            offer.close()
            raise DatapathError(
                f"the agent running on this node has another capture program than this one ({SOURCE.name} or its "
                f"settings changed), so its datapath cannot be handed over: stop it first (capture pauses, fail "
                f"closed, until this agent is ready), or upgrade with the same --flow-accounting")
        fds = dict(offer.fds)
        link = fds.pop(LINK)
        try:
            self.program = CaptureProgram.adopt(HandoverOffer(offer.signature, fds))
        except BaseException:
            os.close(link)
            raise
        self._listener_lookup_link = _moved_above(link, above_fd)
        log.info("event=datapath_taken_over programs=%s", ",".join(p.name for p in PROGRAMS))

    def handover_fds(self) -> dict[str, int]:
        """The fds of the program, maps and sk_lookup link, for a new agent's takeover."""
        assert self.program is not None and self._listener_lookup_link is not None
        return {**self.program.handover_fds(), LINK: self._listener_lookup_link}

    def put_listeners(self, listeners: Mapping[Slot, socket.socket]) -> None:
        """Puts `listeners` in the sockmap again (a new agent died before it could serve)."""
        assert self.program is not None
        for slot, sock in listeners.items():
            self.program.set_listener(slot, sock)

    def own(self) -> None:
        """The agent we took over from was told to drain: the node's capture is ours to remove."""
        self.owner = True

    def hand_over(self) -> None:
        """A new agent serves the node now: close() will only close our fds."""
        self.owner = False

    def _install_routing(self) -> None:
        lo = self._ipr.link_lookup(ifname="lo")[0]
        try:
            self._ipr.rule("add", fwmark=CAPTURE_MARK, fwmask=CAPTURE_MARK_MASK, table=ROUTE_TABLE,
                           priority=RULE_PRIORITY)
            self._ipr.route("replace", dst="0.0.0.0/0", type="local", scope="host", table=ROUTE_TABLE, oif=lo)
        except NetlinkError as exc:
            raise DatapathError(f"installing the capture rule and route failed: {exc}") from exc

    def sync(self, pod_ips: Iterable[str]) -> None:
        """Captures exactly the local enrolled pods at `pod_ips`: updates the map and attachments.

        With any pod enrolled the program sits on every interface packets can enter the node
        by (inbound capture needs the uplink and other pods' interfaces too); with none, on none.
        """
        ips = tuple(sorted(set(pod_ips)))
        wanted = {a.ifindex: a for a in self._ingress_interfaces()} if ips else {}
        not_routed = tuple(ip for ip in ips if not self._routed_here(ip))
        # Order matters for fail-closed: attach before enrolling a pod, un-enroll before
        # detaching, so a pod is never half captured.
        for ifindex in wanted.keys() - self._attached.keys():
            self._attach(wanted[ifindex])
        self.program.set_enrolled(ips)
        for ifindex in self._attached.keys() - wanted.keys():
            self._detach(self._attached.pop(ifindex))
        for ip in set(not_routed) - set(self._not_routed_here):
            log.warning("event=pod_not_routed_here pod_ip=%s reason=\"the node has no direct route to this pod\"", ip)
        self._enrolled, self._not_routed_here = ips, not_routed

    def _ingress_interfaces(self) -> list[Attachment]:
        """Every interface packets enter the node by: all but loopback and bridge ports.

        A bridge port is skipped for its bridge: at a port bpf_sk_assign is accepted but the
        packet is never delivered (KERNEL-NOTES), at the bridge device it is.
        """
        found = []
        for link in self._ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name == "lo" or link.get_attr("IFLA_MASTER"):
                continue
            info = link.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
            found.append(Attachment(link["index"], name, kind))
        return found

    def _routed_here(self, pod_ip: str) -> bool:
        """Whether the node delivers to `pod_ip` directly (its veth or bridge), not via a gateway."""
        try:
            route = self._ipr.route("get", dst=pod_ip)[0]
        except NetlinkError:
            return False
        return route.get_attr("RTA_GATEWAY") is None and route.get_attr("RTA_OIF") is not None

    def _attach(self, attachment: Attachment) -> None:
        try:
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in self._ipr.get_qdiscs(attachment.ifindex)):
                self._ipr.tc("add", "clsact", attachment.ifindex)
            self._ipr.tc("replace-filter", "bpf", attachment.ifindex, ":1", fd=self.program.tc_program_fd,
                         name=TC_PROGRAM, parent=TC_INGRESS, classid=1, direct_action=True, prio=FILTER_PRIORITY)
        except NetlinkError as exc:
            raise DatapathError(f"attaching to {attachment.ifname} failed: {exc}") from exc
        self._attached[attachment.ifindex] = attachment
        log.info("event=attached ifname=%s kind=%s", attachment.ifname, attachment.kind)

    def _detach(self, attachment: Attachment) -> None:
        _remove_filter(self._ipr, attachment.ifindex)
        log.info("event=detached ifname=%s", attachment.ifname)

    @property
    def attached_count(self) -> int:
        """How many interfaces the program is attached to (safe to read from any thread)."""
        return len(self._attached)

    def status(self) -> dict:
        """What is captured now, for the admin API."""
        return {
            "attached": [{"ifname": a.ifname, "ifindex": a.ifindex, "kind": a.kind} for a in self._attached.values()],
            "enrolled_pod_ips": list(self._enrolled),
            "pods_not_routed_here": list(self._not_routed_here),
            "mark": f"{CAPTURE_MARK:#x}/{CAPTURE_MARK_MASK:#x}",
            "route_table": ROUTE_TABLE,
        }

    def flows(self, limit: int | None = None) -> list[dict]:
        """The program's per-flow counters, largest by bytes first, at most `limit` of them."""
        # Key by key bytes: when LRU eviction removes the key an iteration stands on, the
        # kernel restarts it from the first key, so an entry can come twice.
        entries = {bytes(key): (key, stats) for key, stats in self.program.flows.items()}
        return flow_records(entries.values(), monotonic_offset_ns(), limit)

    def close(self) -> None:
        """Removes every filter, qdisc, rule and route this datapath added and the sk_lookup link,
        then closes the programs' and maps' fds; unless it is not the `owner`, which only closes its
        fds (the other agent holds its own to the same objects)."""
        if self.owner:
            for attachment in self._attached.values():
                self._detach(attachment)
        self._attached.clear()
        if self._listener_lookup_link is not None:
            os.close(self._listener_lookup_link)
            self._listener_lookup_link = None
        if self.owner:
            remove_leftovers(self._ipr)
        self._ipr.close()
        if self.program is not None:
            self.program.close()
            self.program = None


MIGRATE_REQUESTS = Path("/proc/sys/net/ipv4/tcp_migrate_req")  # of the calling thread's namespace


def migrate_requests_on_close() -> None:
    """Makes a closing listener hand its queued connections (accepted by the kernel, not yet by
    the agent, and half-open ones) to another listener of its SO_REUSEPORT group, instead of
    resetting them: the old agent's listeners close while the new agent's serve the same ports."""
    try:
        if MIGRATE_REQUESTS.read_text().strip() != "1":
            MIGRATE_REQUESTS.write_text("1")
            log.info("event=sysctl_set name=net.ipv4.tcp_migrate_req value=1")
    except OSError as exc:
        raise DatapathError(f"setting net.ipv4.tcp_migrate_req failed ({exc.strerror}): without it the old "
                            f"agent's queued connections are reset when its listeners close") from exc


def remove_leftovers(ipr: IPRoute) -> list[str]:
    """Removes amesh's filters, rule and route from the node; returns what was there."""
    removed = []
    for link in ipr.get_links():
        if _remove_filter(ipr, link["index"]):
            removed.append(f"filter@{link.get_attr('IFLA_IFNAME')}")
    while True:
        try:
            ipr.rule("del", priority=RULE_PRIORITY, table=ROUTE_TABLE)
        except NetlinkError:
            break
        removed.append(f"rule:{RULE_PRIORITY}")
    for route in ipr.route("dump", table=ROUTE_TABLE):
        if route.get_attr("RTA_TABLE") == ROUTE_TABLE:
            ipr.route("del", **_route_key(route))
            removed.append(f"route:table{ROUTE_TABLE}")
    return removed


def _route_key(route) -> dict:
    return {"dst": route.get_attr("RTA_DST") or "0.0.0.0", "dst_len": route["dst_len"],
            "type": route["type"], "scope": route["scope"], "table": ROUTE_TABLE,
            "oif": route.get_attr("RTA_OIF")}


def _remove_filter(ipr: IPRoute, ifindex: int) -> bool:
    """Deletes amesh's filter on an interface, and its clsact qdisc when nothing else uses it."""
    try:
        filters = ipr.get_filters(ifindex, parent=TC_INGRESS)
    except NetlinkError:
        return False  # no clsact, or the interface went away with its pod
    ours = [f for f in filters if f["info"] >> 16 == FILTER_PRIORITY]
    if not ours:
        return False
    try:
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=TC_INGRESS, prio=FILTER_PRIORITY)
        others = ipr.get_filters(ifindex, parent=TC_INGRESS) + ipr.get_filters(ifindex, parent="ffff:fff3")
        if not others:
            ipr.tc("del", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise DatapathError(f"removing the filter on ifindex {ifindex} failed: {exc}") from exc
    return True
