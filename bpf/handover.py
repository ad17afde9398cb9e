"""Hands a running agent's capture datapath to the node's next agent, for upgrades without a gap.

The running agent serves a Unix socket in the abstract namespace of the node's network namespace
(HANDOVER_ADDRESS: no file, gone the moment its process is, so a killed agent leaves nothing to
mistake for a live one). A new agent that finds someone answering there takes over instead of
loading its own program and removing "leftovers":

  new -> old   connects (SOCK_SEQPACKET; the old agent checks the peer is its own user, root)
  old -> new   HandoverOffer: a JSON header naming the fds, and the fds (SCM_RIGHTS): both
               programs, the maps and the sk_lookup link
  new          puts its listeners in the sockmap, one update per slot (each SYN from then on is
               assigned to the new listener: there is no moment with no socket in a slot), holds
               the link (so the lookup program stays attached whichever agent dies first), and
               serves
  new -> old   DRAIN_REQUEST: the old agent drains (GOAWAY, its live connections to their end)
               and at its exit closes its fds only: the filters, the rule and the route stay,
               the new agent's now
  old          keeps answering at HANDOVER_ADDRESS until it exits (so an agent started after
               a new one that was killed mid-upgrade takes over from it again); the new agent
               takes the address once it is free.

If the new agent's connection ends before its DRAIN_REQUEST (it died while starting), the old
one puts its own listeners back in the sockmap and serves on: capture is back within the time
the kernel takes to close the dead agent's socket. Nothing here is specific to the program's
layout: the offer carries a signature of the program (source and build flags), and a new agent
refuses one that differs from what it would load (`HandoverError`).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger("amesh.bpf")

HANDOVER_ADDRESS = b"\0amesh/datapath-handover"  # abstract: one per network namespace
CONNECT_TIMEOUT = 2.0  # seconds for the running agent's offer (it answers from its event loop)
DRAIN_REQUEST = b"drain"
_HEADER_MAX = 4096  # bytes of the offer's JSON header
_MAX_FDS = 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandoverError(RuntimeError):
    """A running agent answered at HANDOVER_ADDRESS but its datapath cannot be taken over."""


@dataclass(frozen=True)
class HandoverOffer:
    """What a running agent hands over: fds by name and the signature of the program they run."""

    signature: str  # e.g. the SHA-256 of the source and its build flags
    fds: dict[str, int]

    def close(self) -> None:
        """Closes the received fds (the new agent keeps dups of those it uses)."""
        for fd in self.fds.values():
            os.close(fd)


def send_offer(channel: socket.socket, signature: str, fds: dict[str, int]) -> None:
    """The running agent's side: the header and the fds, in one message."""
    names = list(fds)
    header = json.dumps({"signature": signature, "fds": names}).encode()
    socket.send_fds(channel, [header], [fds[name] for name in names])


def receive_offer(channel: socket.socket) -> HandoverOffer:
    """The new agent's side: the offer waiting on `channel`; HandoverError if it is not whole."""
    fds = array.array("i")
    header, ancillary, flags, _ = channel.recvmsg(_HEADER_MAX, socket.CMSG_SPACE(fds.itemsize * _MAX_FDS),
                                                  socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    try:
        offer = json.loads(header) if header else {}
        names = offer.get("fds", [])
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or not names or len(names) != len(fds):
            raise ValueError(f"{len(fds)} fds for the names {names}")
        return HandoverOffer(str(offer["signature"]), dict(zip(names, fds)))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"the running agent's datapath handover was not understood ({e}): is it an amesh "
                            f"agent of a version that hands over its datapath?") from None


def take_over() -> tuple[socket.socket, HandoverOffer] | None:
    """The running agent's offer, and the connection to send it DRAIN_REQUEST on once we serve
    (closing it unsent gives the running agent its slots back); None if no agent runs here."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    channel.settimeout(CONNECT_TIMEOUT)
    try:
        channel.connect(HANDOVER_ADDRESS)
    except (ConnectionRefusedError, FileNotFoundError):
        channel.close()
        return None
    try:
        return channel, receive_offer(channel)
    except OSError as e:  # including the timeout
        channel.close()
        raise HandoverError(f"the agent running on this node accepted a datapath handover but sent nothing "
                            f"within {CONNECT_TIMEOUT} s ({e}): is it stuck?") from None
    except BaseException:
        channel.close()
        raise


def listen() -> socket.socket | None:
    """The running agent's listening socket at HANDOVER_ADDRESS (non-blocking), or None while
    another agent still holds the address."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        server.bind(HANDOVER_ADDRESS)
    except OSError as e:
        server.close()
        if e.errno == 98:  # EADDRINUSE: the agent we took over from is still draining
            return None
        raise
    server.listen(4)
    return server


def peer_is_us(channel: socket.socket) -> bool:
    """Whether the process at the other end runs as our user (an abstract socket has no file
    permissions: anyone in the namespace may connect, and the offer holds the capture maps)."""
    _, uid, _ = _UCRED.unpack(channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid == os.geteuid()
