"""A closed test bed of network namespaces: a fabric, N Kubernetes-like nodes and their pods.

Used by the e2e tests, the demo and the benchmarks. Everything lives in namespaces this module
creates, joined only to each other; the root namespace is never touched (no interface, route,
rule, qdisc or sysctl changes there, not even transiently).

Layout (node i = 1..N, pod k = 0.. on each node):

    am<pid>-fab  bridge br0, ports n1..nN  (veth peers of each node's eth0)
    am<pid>-n<i> eth0 172.18.0.(10+i)/24, ip_forward=1, routes to the other nodes' pod CIDRs,
                 no default route (a Service IP like 10.96.0.10 is unreachable)
    am<pid>-<pod> eth0 10.244.i.(10+k), host side veth<k> in the node namespace

Two pod networking modes, chosen per bed:

    "p2p"    (Calico style) pod eth0 ip/32, default via 169.254.1.1; host veth has no address,
             proxy_arp=1 and a /32 route to the pod.
    "bridge" (flannel style) node bridge cni0 10.244.i.1/24; host veths are its ports;
             pod eth0 ip/24, default via 10.244.i.1.

Names carry the creating process's pid, so a bed left behind by a killed run is recognised and
removed (`Bed.sweep_stale`, called whenever a Bed is created).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

log = logging.getLogger("amesh.testbed")

REPO_ROOT = Path(__file__).resolve().parents[1]
NETNS_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts named namespaces

MODES = ("p2p", "bridge")
FABRIC_BRIDGE = "br0"
NODE_IFNAME = "eth0"
POD_IFNAME = "eth0"
NODE_BRIDGE = "cni0"  # bridge mode only
P2P_GATEWAY = "169.254.1.1"  # Calico's fake next hop; answered by proxy ARP on the host veth
NODE_NET = ipaddress.IPv4Network("172.18.0.0/24")
NODE_HOST_BASE = 10  # node i gets 172.18.0.(10+i)
POD_HOST_BASE = 10  # pod k on node i gets 10.244.i.(10+k)
MAX_NODES = 200
MAX_PODS_PER_NODE = 240

CMD_TIMEOUT = 15.0  # seconds for one `ip`/`sysctl` command; they normally take milliseconds
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for processes the bed started

# A stale bed's namespaces: am<pid>-... or, for a second live bed in one process, am<pid>b<k>-...
_NAME_RE = re.compile(r"^am(\d+)(?:b\d+)?-")
_POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_RESERVED_POD_NAME_RE = re.compile(r"^(fab|n\d+)$")  # would collide with fabric/node namespaces

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class BedError(RuntimeError):
    """The test bed could not be built, used or torn down; the message names the command."""


# --------------------------------------------------------------------------------------------
# Commands


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CMD_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise BedError naming the command and its stderr."""
    cmd = shlex.join(argv)
    log.debug("run cmd=%r", cmd)
    try:
        cp = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise BedError(f"timed out after {timeout}s: {cmd}") from None
    except FileNotFoundError as e:
        raise BedError(f"cannot run {cmd}: {e}") from None
    if check and cp.returncode != 0:
        detail = (cp.stderr or cp.stdout).strip()
        raise BedError(f"command failed (exit {cp.returncode}): {cmd}\n{detail}")
    return cp


def _ip_batch(netns: str, lines: Sequence[str]) -> None:
    """Run `ip` commands (without the leading `ip`) inside `netns`, stopping at the first error."""
    script = "\n".join(lines) + "\n"
    cp = _run(["ip", "-n", netns, "-batch", "-"], input=script, check=False)
    if cp.returncode != 0:
        listing = "\n".join(f"  {n}: ip -n {netns} {line}" for n, line in enumerate(lines, 1))
        raise BedError(
            f"ip batch failed in netns {netns} (exit {cp.returncode}):\n{listing}\n"
            f"{cp.stderr.strip()}"
        )


def _sysctl(netns: str, settings: Mapping[str, str | int]) -> None:
    """Set sysctls inside `netns` (never in the calling process's namespace)."""
    pairs = [f"{k}={v}" for k, v in settings.items()]
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *pairs])


def list_netns() -> list[str]:
    """Names of the named network namespaces (`ip netns list` reads the same directory)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Entering a namespace from this process


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


def _netns_path(netns: str) -> str:
    if not netns or "/" in netns and not netns.startswith("/"):
        raise BedError(f"bad network namespace name {netns!r}")
    return netns if netns.startswith("/") else str(NETNS_DIR / netns)


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Move the calling thread into network namespace `netns` for the block, then back.

    Only this thread moves; sockets created inside keep the namespace after the block.
    """
    target = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, netns)
            try:
                yield
            finally:
                # If this fails the thread stays inside the bed (never the other way round).
                _setns(home, "back to the original namespace")
        finally:
            os.close(home)
    finally:
        os.close(target)


def netns_socket(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket created inside network namespace `netns` (it stays there for its lifetime)."""
    with in_netns(netns):
        return socket.socket(family, type, proto)


def _netns_of(where: object) -> str:
    """A namespace name from a name, a Pod, a Node or anything with `.netns`."""
    if isinstance(where, str):
        return where
    netns = getattr(where, "netns", None)
    if not isinstance(netns, str):
        raise TypeError(f"expected a netns name, Pod or Node, got {where!r}")
    return netns


# --------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Node:
    """One Kubernetes node: a namespace with eth0 on the fabric and a pod CIDR."""

    index: int  # 1-based
    name: str  # Kubernetes node name, e.g. "node-1"
    netns: str
    ip: str  # on eth0, 172.18.0.(10+index)
    pod_cidr: str  # 10.244.<index>.0/24
    gateway: str  # the pods' default gateway: 169.254.1.1 (p2p) or 10.244.<index>.1 (bridge)
    ifname: str = NODE_IFNAME


@dataclass(frozen=True)
class Pod:
    """One pod: a namespace with eth0, joined to its node by a veth pair."""

    name: str
    netns: str
    ip: str
    node: Node
    host_ifname: str  # the veth end in the node's namespace
    namespace: str = "default"  # Kubernetes namespace, for registry entries
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    ifname: str = POD_IFNAME

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --------------------------------------------------------------------------------------------
# Root-namespace snapshot (to prove a bed leaves it alone)

_VOLATILE = [
    re.compile(r"\s*valid_lft \S+ preferred_lft \S+"),
    re.compile(r" expires \d+sec"),
    re.compile(r" \w+_timer +[\d.]+"),  # bridge timers in `ip -d link`
]


def netns_snapshot(netns: str | None = None) -> dict[str, str]:
    """Links, addresses, routes, rules, qdiscs and tc filters of a namespace (None = this one).

    Counters and lifetimes are stripped so two snapshots compare equal unless something changed.
    """
    pre = ["ip"] if netns is None else ["ip", "-n", netns]
    tc = ["tc"] if netns is None else ["tc", "-n", netns]
    cmds = {
        "links": pre + ["-d", "link", "show"],
        "addrs": pre + ["addr", "show"],
        "routes4": pre + ["-4", "route", "show", "table", "all"],
        "routes6": pre + ["-6", "route", "show", "table", "all"],
        "rules4": pre + ["-4", "rule", "show"],
        "rules6": pre + ["-6", "rule", "show"],
        "qdiscs": tc + ["qdisc", "show"],
    }
    snap = {}
    for key, argv in cmds.items():
        out = _run(argv).stdout
        for rx in _VOLATILE:
            out = rx.sub("", out)
        snap[key] = out
    links = _run(pre + ["-o", "link", "show"]).stdout
    for ifname in re.findall(r"^\d+: ([^:@\s]+)", links, flags=re.M):
        for hook in ("ingress", "egress"):
            snap[f"filters {ifname} {hook}"] = _run(
                tc + ["filter", "show", "dev", ifname, hook], check=False
            ).stdout
    return snap


# --------------------------------------------------------------------------------------------
# The bed


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for the block so teardown is not cut short; they fire after."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Bed:
    """A fabric, `nodes` node namespaces and the pods added to them; `close()` removes it all."""

    _live_prefixes: set[str] = set()
    _prefix_lock = threading.Lock()

    def __init__(self, nodes: int = 2, mode: str = "p2p", *, sweep: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
        self.mode = mode
        self.nodes: list[Node] = []
        self.pods: dict[str, Pod] = {}
        self.namespaces: list[str] = []  # every namespace this bed created (or began to)
        self._procs: list[subprocess.Popen] = []
        self._logs: dict[int, Path] = {}  # pid -> log file, for error messages
        self._logdir: Path | None = None
        self._pods_per_node: dict[int, int] = {}
        self._closed = False
        self._lock = threading.Lock()
        self.prefix = self._claim_prefix()
        if sweep:
            self.sweep_stale()
        atexit.register(self.close)
        try:
            self.fabric = self._make_fabric()
            for i in range(1, nodes + 1):
                self.nodes.append(self._make_node(i))
            self._route_between_nodes()
        except BaseException:
            self._close_quietly()
            raise
        log.info("bed up prefix=%s mode=%s nodes=%d", self.prefix, mode, nodes)

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "Bed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        return (f"<Bed {self.prefix} mode={self.mode} nodes={len(self.nodes)} "
                f"pods={len(self.pods)} {state}>")

    @classmethod
    def _claim_prefix(cls) -> str:
        pid = os.getpid()
        with cls._prefix_lock:
            prefix, k = f"am{pid}-", 1
            while prefix in cls._live_prefixes:
                k += 1
                prefix = f"am{pid}b{k}-"
            cls._live_prefixes.add(prefix)
            return prefix

    def close(self) -> None:
        """Stop the processes the bed started and delete its namespaces. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        with _signals_deferred():
            for proc in reversed(self._procs):
                try:
                    self.stop(proc)
                except Exception as e:  # keep tearing down; report at the end
                    errors.append(f"stop pid {proc.pid}: {e}")
            present = set(list_netns())
            for ns in reversed(self.namespaces):
                if ns not in present:
                    continue
                cp = _run(["ip", "netns", "delete", ns], check=False)
                if cp.returncode != 0:
                    errors.append(f"ip netns delete {ns}: {cp.stderr.strip()}")
            if self._logdir is not None:
                shutil.rmtree(self._logdir, ignore_errors=True)
            with self._prefix_lock:
                self._live_prefixes.discard(self.prefix)
            atexit.unregister(self.close)
        left = [ns for ns in self.namespaces if ns in set(list_netns())]
        if left:
            errors.append(f"namespaces still present: {left}")
        if errors:
            raise BedError(f"bed {self.prefix} teardown incomplete:\n  " + "\n  ".join(errors))
        log.info("bed closed prefix=%s", self.prefix)

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:
            log.exception("teardown after a failed build prefix=%s", self.prefix)

    @classmethod
    def sweep_stale(cls) -> list[str]:
        """Delete namespaces named am<pid>-... whose creating process is gone; return their names.

        Processes still running inside such a namespace were started by that dead bed and are
        killed (SIGKILL, by pid) so the namespace really goes away.
        """
        me = os.getpid()
        swept = []
        for ns in list_netns():
            m = _NAME_RE.match(ns)
            if not m:
                continue
            pid = int(m.group(1))
            if pid == me or _pid_alive(pid):
                continue
            cp = _run(["ip", "netns", "pids", ns], check=False)
            for tok in cp.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(tok), signal.SIGKILL)
            cp = _run(["ip", "netns", "delete", ns], check=False)
            if cp.returncode == 0:
                swept.append(ns)
                log.warning("swept stale namespace netns=%s dead_pid=%d", ns, pid)
            else:
                log.warning("cannot sweep netns=%s err=%r", ns, cp.stderr.strip())
        return swept

    # -- building ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BedError(f"bed {self.prefix} is closed")

    def _add_netns(self, suffix: str) -> str:
        ns = self.prefix + suffix
        if ns in self.namespaces or ns in list_netns():
            raise BedError(f"network namespace {ns} already exists")
        self.namespaces.append(ns)  # recorded first, so a half-made one is still deleted
        _run(["ip", "netns", "add", ns])
        return ns

    def _make_fabric(self) -> str:
        fab = self._add_netns("fab")
        _ip_batch(fab, [
            "link set lo up",
            f"link add {FABRIC_BRIDGE} type bridge stp_state 0",
            f"link set {FABRIC_BRIDGE} up",
        ])
        return fab

    def _make_node(self, i: int) -> Node:
        ns = self._add_netns(f"n{i}")
        ip = str(NODE_NET.network_address + NODE_HOST_BASE + i)
        pod_cidr = f"10.244.{i}.0/24"
        gateway = P2P_GATEWAY if self.mode == "p2p" else f"10.244.{i}.1"
        # The veth is created from the fabric side with its peer placed straight into the node.
        _ip_batch(self.fabric, [
            f"link add n{i} type veth peer name {NODE_IFNAME} netns {ns}",
            f"link set n{i} master {FABRIC_BRIDGE} up",
        ])
        # Forwarding before any pod veth exists, so every interface inherits it.
        _sysctl(ns, {"net.ipv4.ip_forward": 1})
        lines = [
            "link set lo up",
            f"addr add {ip}/{NODE_NET.prefixlen} dev {NODE_IFNAME}",
            f"link set {NODE_IFNAME} up",
        ]
        if self.mode == "p2p":
            # Proxy ARP only answers for an address the node routes out of *another* interface.
            # Calico's nodes reach 169.254.1.1 by their default route; ours have none, so this
            # one host route points it at the uplink (where nothing answers it, as on a real
            # node). The kernel here has no dummy device to park it on instead.
            lines += [f"route add {P2P_GATEWAY}/32 dev {NODE_IFNAME} scope link"]
        else:
            lines += [
                f"link add {NODE_BRIDGE} type bridge stp_state 0",
                # A fixed MAC: otherwise the bridge takes its lowest port's MAC, which changes as
                # pods come and go and strands the pods' ARP entries for the gateway.
                f"link set {NODE_BRIDGE} address 02:a5:0a:f4:{i:02x}:01",
                f"addr add {gateway}/24 dev {NODE_BRIDGE}",
                f"link set {NODE_BRIDGE} up",
            ]
        _ip_batch(ns, lines)
        self._pods_per_node[i] = 0
        return Node(index=i, name=f"node-{i}", netns=ns, ip=ip, pod_cidr=pod_cidr, gateway=gateway)

    def _route_between_nodes(self) -> None:
        for node in self.nodes:
            lines = [
                f"route add {other.pod_cidr} via {other.ip} dev {NODE_IFNAME}"
                for other in self.nodes
                if other is not node
            ]
            if lines:
                _ip_batch(node.netns, lines)

    def set_node_link(self, node: Node | int | str, up: bool) -> None:
        """Cuts (or restores) a node's link to the fabric, at the fabric's port: to the other
        nodes it vanishes without a reset or a FIN, as a node that lost power does."""
        self._check_open()
        _ip_batch(self.fabric, [f"link set n{self.node(node).index} {'up' if up else 'down'}"])

    def node(self, ref: Node | int | str) -> Node:
        """A node by Node, 1-based index, Kubernetes name ("node-1") or netns name."""
        if isinstance(ref, Node):
            return ref
        for n in self.nodes:
            if ref in (n.index, n.name, n.netns):
                return n
        names = [n.name for n in self.nodes]
        raise KeyError(f"no node {ref!r} in bed {self.prefix} (nodes: {names})")

    def add_pod(
        self,
        name: str,
        node: Node | int | str,
        *,
        namespace: str = "default",
        service_account: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> Pod:
        """Create pod `name` on `node`: its namespace, veth pair, address and routes."""
        self._check_open()
        if not _POD_NAME_RE.match(name) or _RESERVED_POD_NAME_RE.match(name):
            raise ValueError(f"bad pod name {name!r}: use [a-z0-9-], not 'fab' or 'n<digits>'")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists in bed {self.prefix}")
        nd = self.node(node)
        k = self._pods_per_node[nd.index]
        if k >= MAX_PODS_PER_NODE:
            raise BedError(f"node {nd.name} is full ({MAX_PODS_PER_NODE} pods)")
        self._pods_per_node[nd.index] = k + 1
        ip = f"10.244.{nd.index}.{POD_HOST_BASE + k}"
        host_if = f"veth{k}"
        ns = self._add_netns(name)

        _ip_batch(nd.netns, [f"link add {host_if} type veth peer name {POD_IFNAME} netns {ns}"])
        if self.mode == "p2p":
            # Proxy ARP answers the pod's ARP for 169.254.1.1 (given the node's route for it
            # via eth0); proxy_delay=0 answers at once instead of after up to 0.8 s.
            _sysctl(nd.netns, {
                f"net.ipv4.conf.{host_if}.proxy_arp": 1,
                f"net.ipv4.neigh.{host_if}.proxy_delay": 0,
            })
            _ip_batch(nd.netns, [
                f"link set {host_if} up",
                f"route add {ip}/32 dev {host_if} scope link",
            ])
            _ip_batch(ns, [
                "link set lo up",
                f"addr add {ip}/32 dev {POD_IFNAME}",
                f"link set {POD_IFNAME} up",
                f"route add {P2P_GATEWAY} dev {POD_IFNAME} scope link",
                f"route add default via {P2P_GATEWAY} dev {POD_IFNAME}",
            ])
        else:
            _ip_batch(nd.netns, [f"link set {host_if} master {NODE_BRIDGE} up"])
            _ip_batch(ns, [
                "link set lo up",
                f"addr add {ip}/24 dev {POD_IFNAME}",
                f"link set {POD_IFNAME} up",
                f"route add default via {nd.gateway} dev {POD_IFNAME}",
            ])
        pod = Pod(
            name=name, netns=ns, ip=ip, node=nd, host_ifname=host_if, namespace=namespace,
            service_account=service_account, labels=dict(labels or {}),
        )
        self.pods[name] = pod
        log.info("pod up name=%s node=%s ip=%s netns=%s", name, nd.name, ip, ns)
        return pod

    def pods_on(self, node: Node | int | str) -> list[Pod]:
        """The pods on one node, in creation order."""
        nd = self.node(node)
        return [p for p in self.pods.values() if p.node.index == nd.index]

    # -- processes and commands ----------------------------------------------------------------

    def _enter_argv(self, netns: str | Pod | Node, host_mounts: bool) -> list[str]:
        ns = _netns_of(netns)
        if host_mounts:
            return ["nsenter", f"--net={_netns_path(ns)}", "--"]
        return ["ip", "netns", "exec", ns]

    def spawn(
        self,
        netns: str | Pod | Node,
        argv: Sequence[str],
        log_path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO | None = None,
        cwd: str | os.PathLike[str] | None = REPO_ROOT,
        host_mounts: bool = False,
    ) -> subprocess.Popen:
        """Start `argv` inside a namespace; the bed stops it on close.

        Output goes to `log_path` (appended) if given, else to `stdout` if given (e.g.
        subprocess.PIPE), else to this process's stdout/stderr. The repository root is put
        on PYTHONPATH. The process leads its own process group, so stopping it also stops
        its children.

        By default it runs under `ip netns exec`, which mounts a fresh /sys showing the
        namespace's interfaces but hides the host's /sys/fs/cgroup and /sys/fs/bpf mounts.
        host_mounts=True enters only the network namespace (nsenter --net) and keeps them,
        for programs that attach cgroup hooks or pin BPF objects.
        """
        self._check_open()
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
        )
        logf = open(log_path, "ab") if log_path is not None else None
        try:
            proc = subprocess.Popen(
                [*self._enter_argv(netns, host_mounts), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf if logf is not None else stdout,
                stderr=subprocess.STDOUT if (logf is not None or stdout is not None) else None,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if logf is not None:
                logf.close()  # the child has its own copy
        self._procs.append(proc)
        if log_path is not None:
            self._logs[proc.pid] = Path(log_path)
        log.info("spawned pid=%d netns=%s argv=%r", proc.pid, _netns_of(netns), shlex.join(argv))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM `proc`'s process group, SIGKILL it after `grace` seconds; return exit code."""
        if proc.returncode is not None:
            return proc.returncode
        pgid = proc.pid  # start_new_session: the child leads a group with its own pid
        _killpg(pgid, signal.SIGTERM)
        if not _wait_exited(proc, grace):
            _killpg(pgid, signal.SIGKILL)
            if not _wait_exited(proc, 5.0):
                raise BedError(f"pid {proc.pid} survived SIGKILL for 5s")
        if proc.returncode is not None:
            return proc.returncode  # reaped meanwhile (a concurrent poll()); leave the group be
        # The leader is a zombie now, so its pid (= pgid) cannot have been reused: clear out
        # any children left in the group, then reap.
        _killpg(pgid, signal.SIGKILL)
        rc = proc.wait(timeout=5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        return rc

    def run(
        self,
        netns: str | Pod | Node,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        *,
        host_mounts: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a namespace and wait for it; output captured as text."""
        self._check_open()
        return _run([*self._enter_argv(netns, host_mounts), *argv],
                    check=check, timeout=timeout, input=input)

    def wait_listening(
        self,
        netns: str | Pod | Node,
        port: int,
        timeout: float = 5.0,
        proc: subprocess.Popen | None = None,
    ) -> None:
        """Wait until a TCP socket listens on `port` inside the namespace (checked with `ss`).

        With `proc`, the listener must belong to it (or its process group), and an early exit
        fails at once, showing the end of its log.
        """
        ns = _netns_of(netns)
        deadline = time.monotonic() + timeout
        while True:
            ss = ["ss", "-H", "-l", "-t", "-n", "-p", "sport", "=", f":{port}"]
            out = self.run(ns, ss).stdout
            if proc is None and out.strip():
                return
            if proc is not None and any(
                _in_group(int(pid), proc.pid) for pid in re.findall(r"pid=(\d+)", out)
            ):
                return
            if proc is not None and proc.poll() is not None:
                raise BedError(f"pid {proc.pid} exited (code {proc.returncode}) before listening "
                               f"on port {port} in netns {ns}{self._log_tail(proc)}")
            if time.monotonic() >= deadline:
                tail = self._log_tail(proc) if proc is not None else ""
                raise BedError(f"nothing listening on port {port} in netns {ns} "
                               f"after {timeout}s{tail}")
            time.sleep(0.02)

    def _log_tail(self, proc: subprocess.Popen, lines: int = 20) -> str:
        path = self._logs.get(proc.pid)
        if path is None:
            return ""
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {path} (last {lines} lines) ---\n" + "\n".join(text)

    def start_podserver(
        self,
        where: Pod | Node,
        port: int = 8080,
        name: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> subprocess.Popen:
        """Run tests.podserver in a pod (or node), replying with `name` (default its name).

        Returns once it listens. Without `log_path` its output goes to a file in `bed.logdir`.
        """
        if log_path is None:
            log_path = self.logdir / f"podserver-{where.name}-{port}-{len(self._procs)}.log"
        argv = [sys.executable, "-m", "tests.podserver", "--port", str(port),
                "--name", name or where.name]
        proc = self.spawn(where, argv, log_path)
        self.wait_listening(where, port, timeout=timeout, proc=proc)
        return proc

    @property
    def logdir(self) -> Path:
        """A directory for logs of processes the bed starts; removed by close()."""
        if self._logdir is None:
            self._logdir = Path(tempfile.mkdtemp(prefix=self.prefix))
        return self._logdir

    def connect(
        self, pod: str | Pod | Node, ip: str, port: int, timeout: float = 2.0
    ) -> socket.socket:
        """A TCP connection from inside `pod` to ip:port; the socket keeps `timeout`."""
        self._check_open()
        sock = netns_socket(_netns_of(pod))
        try:
            sock.settimeout(timeout)
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock


def _in_group(pid: int, leader: int) -> bool:
    """Whether `pid` is `leader` or in the process group `leader` leads."""
    if pid == leader:
        return True
    try:
        return os.getpgid(pid) == leader
    except ProcessLookupError:
        return False


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for child `proc` to exit, leaving it unreaped (a zombie)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            proc.poll()  # reaped by someone else; let Popen record it
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
