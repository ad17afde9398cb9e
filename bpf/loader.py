"""Compiles and loads BPF programs in a short-lived child process, which hands their fds back.

BCC compiles C with clang and LLVM inside the process that imports it: an agent that loaded its
programs itself kept libLLVM, libclang-cpp and libbcc mapped and the compiler's heap resident
(about 140 MiB of its 240) for its whole life. `load()` runs `python -m bpf.loader` instead: the
child imports bcc, compiles the source, loads the programs (the verifier runs here), and sends
the fds of the programs and maps asked for over a Unix socket (SCM_RIGHTS), then exits. The
kernel objects live on as long as the caller holds a fd; the caller owns them (`Loaded.close()`)
and drives them with bpf(2) (bpf/syscalls.py), so it never imports bcc.

A compile or verifier error is the child's failure: its stderr (clang's diagnostics, the
verifier's log) ends in the LoadError. A child that dies or hangs is bounded by `timeout`.
Nothing here is specific to one program, so a later agent generation can load its own set and
take over the same way.
"""

from __future__ import annotations

import array
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field

log = logging.getLogger("amesh.bpf")

LOAD_TIMEOUT = 30.0  # seconds; compiling bpf/capture.c takes about 1 s on an idle node
KILL_GRACE = 1.0  # seconds to collect a killed child's last output
ERROR_TAIL_LINES = 60  # of the child's stderr in a LoadError: a verifier log runs to thousands
_HEADER_MAX = 4096  # bytes; the child's reply names its fds in JSON


class LoadError(RuntimeError):
    """The loader child could not compile or load the programs, or did not answer in time."""


@dataclass(frozen=True)
class ProgramSpec:
    """A function of the source to load as a program of `prog_type` (enum bpf_prog_type)."""

    name: str
    prog_type: int
    attach_type: int = -1  # enum bpf_attach_type when the type needs one at load time; -1 none


@dataclass(frozen=True)
class LoadRequest:
    """What the child compiles and which fds it hands back."""

    source: str  # path of the C file
    cflags: tuple[str, ...]
    programs: tuple[ProgramSpec, ...]
    maps: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoadRequest":
        data = json.loads(text)
        return cls(data["source"], tuple(data["cflags"]), tuple(ProgramSpec(**p) for p in data["programs"]),
                   tuple(data["maps"]))


@dataclass
class Loaded:
    """The fds of loaded programs and maps, by name; the holder owns them."""

    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        """Closes every fd still held (a program attached somewhere stays loaded)."""
        for fds in (self.programs, self.maps):
            for fd in fds.values():
                os.close(fd)
            fds.clear()


def load(request: LoadRequest, timeout: float = LOAD_TIMEOUT, command: tuple[str, ...] | None = None) -> Loaded:
    """Runs the loader child on `request` and returns the fds it sent (close-on-exec here).

    `command` replaces `python -m bpf.loader` (it gets the socket's fd number as its last argument).
    """
    argv = command or (sys.executable, "-m", "bpf.loader")
    name = os.path.basename(request.source)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            child = subprocess.Popen([*argv, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        finally:
            theirs.close()
        try:
            _, stderr = child.communicate(request.to_json(), timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            try:
                _, stderr = child.communicate(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:  # its stderr is held open elsewhere (a process it started)
                child.wait()
                stderr = ""
            raise LoadError(f"the BPF loader (pid {child.pid}) did not load {name} within {timeout:g} s and was "
                            f"stopped; is the node overloaded?{_tail(stderr)}") from None
        if child.returncode != 0:
            *diagnostics, summary = stderr.strip().splitlines() or [""]
            if child.returncode > 0 and summary:  # the child's own failure: its last line says what
                raise LoadError(summary + _tail("\n".join(diagnostics)))
            how = (f"was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0
                   else f"exited with code {child.returncode}")
            raise LoadError(f"the BPF loader (pid {child.pid}) {how} before handing over {name}'s programs"
                            f"{_tail(stderr)}")
        if stderr.strip():  # loaded, with the compiler's warnings: shown as BCC in-process showed them
            log.warning("event=bpf_loader_output source=%s output=%r", name, stderr.strip())
        return _receive(ours, request, name)


def _tail(text: str) -> str:
    """The end of a child's stderr, as the last part of an error message ("" when empty)."""
    lines = text.strip().splitlines()[-ERROR_TAIL_LINES:]
    return ":\n" + "\n".join(lines) if lines else ""


def _receive(channel: socket.socket, request: LoadRequest, name: str) -> Loaded:
    """The child's reply, already queued on `channel`: a JSON header and one fd per name."""
    wanted = [p.name for p in request.programs] + list(request.maps)
    fds = array.array("i")
    try:
        header, ancillary, flags, _ = channel.recvmsg(_HEADER_MAX, socket.CMSG_SPACE(fds.itemsize * len(wanted)),
                                                      socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    except BlockingIOError:  # the child's end is still open somewhere (a grandchild): no reply
        header, ancillary, flags = b"", [], 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not header and not fds:
        raise LoadError(f"the BPF loader exited without handing over {name}'s programs")
    complete = not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) and len(fds) == len(wanted)
    if not complete or header != json.dumps(wanted).encode():
        for fd in fds:
            os.close(fd)
        raise LoadError(f"the BPF loader's reply for {name} is not the {len(wanted)} fds asked for ({wanted})")
    by_name = dict(zip(wanted, fds))
    return Loaded({p.name: by_name[p.name] for p in request.programs}, {m: by_name[m] for m in request.maps})


def _compile_and_load(request: LoadRequest) -> list[int]:
    """In the child: the fds of the programs and maps of `request`, in its order."""
    from bcc import BPF, lib  # the reason this runs in a child: it maps libbcc, libLLVM and libclang

    bpf = BPF(src_file=request.source.encode(), cflags=list(request.cflags))
    fds = [bpf.load_func(p.name.encode(), p.prog_type, attach_type=p.attach_type).fd for p in request.programs]
    for map_name in request.maps:
        fd = lib.bpf_table_fd(bpf.module, map_name.encode())
        if fd < 0:
            raise LookupError(f"{os.path.basename(request.source)} has no map named {map_name}")
        fds.append(fd)
    return fds


def main(argv: list[str]) -> int:
    """The child: reads a LoadRequest on stdin, sends the fds on the socket whose number is argv[-1]."""
    request = LoadRequest.from_json(sys.stdin.read())
    with socket.socket(fileno=int(argv[-1])) as channel:
        try:
            fds = _compile_and_load(request)
        except Exception as exc:  # BCC raises bare Exception for compile and verifier errors
            print(f"loading {os.path.basename(request.source)} failed: {exc}", file=sys.stderr)
            return 1
        names = [p.name for p in request.programs] + list(request.maps)
        socket.send_fds(channel, [json.dumps(names).encode()], fds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
