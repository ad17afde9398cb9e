"""The datapath handover's messages over a real Unix socket pair: the fds arrive by name and are
the same open files; a reply that is not a whole offer is refused with its reason, closing what
came; the peer check knows our own user."""

from __future__ import annotations

import os
import socket

import pytest

from bpf.handover import HandoverError, peer_is_us, receive_offer, send_offer


def pipe_fds() -> dict[str, int]:
    read, write = os.pipe()
    return {"reader": read, "writer": write}


def test_an_offer_arrives_with_its_signature_and_the_same_open_files_by_name():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sent = pipe_fds()
    with ours, theirs:
        send_offer(ours, "abc123", sent)
        offer = receive_offer(theirs)
        assert peer_is_us(theirs)
    try:
        assert offer.signature == "abc123" and list(offer.fds) == ["reader", "writer"]
        os.write(offer.fds["writer"], b"through the handed-over pipe")
        assert os.read(sent["reader"], 100) == b"through the handed-over pipe"
    finally:
        offer.close()
        for fd in sent.values():
            os.close(fd)


@pytest.mark.parametrize("header", [b"not json", b'{"fds": ["a", "b", "c"], "signature": "x"}', b'{"fds": ["a", "b"]}'],
                         ids=["not JSON", "more names than fds", "no signature"])
def test_an_offer_that_is_not_whole_is_refused_and_its_fds_closed(header: bytes):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sent = pipe_fds()
    before = len(os.listdir("/proc/self/fd"))
    with ours, theirs:
        socket.send_fds(ours, [header], list(sent.values()))
        with pytest.raises(HandoverError, match="was not understood .*hands over its datapath"):
            receive_offer(theirs)
    assert len(os.listdir("/proc/self/fd")) == before - 2  # the two socket ends; no received fd leaked
    for fd in sent.values():
        os.close(fd)


def test_an_agent_that_closes_without_an_offer_is_refused():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    with theirs, pytest.raises(HandoverError, match="was not understood"):
        receive_offer(theirs)
