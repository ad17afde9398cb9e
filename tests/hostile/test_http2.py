"""HTTP/2 attacks by a holder of a valid mesh certificate on an agent's HBONE listener (issue 11):
control-frame floods, rapid reset, CONTINUATION floods, too many streams, sessions that never
speak, CONNECTs that end early, log amplification, and the CONNECT refusals that must keep holding.

The attacker is pod "attacker" on node-1 (not enrolled: nothing captures it on its way out)
connecting to server-b's 15008 on node-2 with a certificate the mesh CA signed; node-2's agent
answers. The canary crosses that agent too. Bed and checks: tests/hostile/conftest.py.
"""

from __future__ import annotations

import time

import hpack
import pytest

from tests.attacker import (
    FRAME_HEADER,
    REFUSED_STREAM,
    H2Attacker,
    connect_frame,
    continuation_frame,
    passive_opens,
    ping_frame,
    rst_stream_frame,
    settings_frame,
    tls_connect,
    wait_all_closed,
)
from tests.hostile.conftest import TARGET_PORT, Target

pytestmark = pytest.mark.hostile

HBONE_PORT = 15008
MAX_CONCURRENT_STREAMS = 100  # what the agent's HTTP/2 SETTINGS allow per session (the bound)
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3  # its SETTINGS identifier (RFC 9113 6.5.2)
ANSWER_TIMEOUT = 5.0  # seconds for a burst of requests to be answered
FLOOD_FRAMES = 1_000_000  # the flood: 1 M PING + SETTINGS frames in 5 s
FLOOD_SECONDS = 5.0
FLOOD_CUTOFF = 1.0  # seconds within which a flood must be cut off
FLOOD_CANARY_LIMIT = 0.2  # seconds the canary may wait while another session floods the agent
RAPID_RESETS = 5_000
HEADER_BLOCK_LIMIT = 1024 * 1024  # bytes of header block a session may send before it is cut off
HEADER_BLOCK_CAP = 8 * 1024 * 1024  # bytes the attack sends at most when nothing cuts it off
PACE = 16 * 1024  # bytes written at a time, with a pause, so what was sent is what the agent read
OVERSIZE_BODY_LIMIT = 4 * PACE  # bytes of an oversized frame's body sent before it must be refused
OVERSIZE_BODY_CAP = 2 * 1024 * 1024  # bytes of it the attack sends at most
SILENT_SESSIONS = 50
PREFACE_DEADLINE = 5.0  # seconds an mTLS connection may stay without sending the HTTP/2 preface
CLOSE_MARGIN = 1.5  # seconds past a deadline before a connection counts as left open
EARLY_END_REQUESTS = 500
BATCH = 50  # requests in flight at once where the attack is not about concurrency
BATCH_WAIT = 0.5  # seconds a batch may take to be answered (an agent answers one in milliseconds)
LOG_REQUESTS = 1_000
LONG_AUTHORITY = 4_000  # characters of :authority (fits HPACK's 4 KiB table: indexed after the first)
LOG_AMPLIFICATION_LIMIT = 64  # bytes of log per byte on the wire, at most


def open_session(target: Target) -> H2Attacker:
    """An mTLS HTTP/2 session from the attacker pod to server-b's 15008 with a mesh certificate."""
    bed = target.bed
    return H2Attacker.open(bed.pods["attacker"].netns, bed.pods["server-b"].ip, HBONE_PORT, target.context())


def server_b_authority(target: Target) -> str:
    return f"{target.bed.pods['server-b'].ip}:{TARGET_PORT}"


def stream_ids(count: int, first: int = 1) -> list[int]:
    """`count` client stream ids (odd, increasing) from `first`."""
    return list(range(first, first + 2 * count, 2))


def test_a_ping_and_settings_flood_is_cut_off_and_other_tunnels_keep_flowing(target: Target, figures: dict):
    attacker = open_session(target)
    pair = ping_frame() + settings_frame()
    started, flood_start = time.monotonic(), attacker.bytes_sent

    def frames_sent() -> int:
        return (attacker.bytes_sent - flood_start) // len(pair) * 2

    try:
        # at the rate (FLOOD_FRAMES in FLOOD_SECONDS), so the agent reads what is sent
        while not attacker.ended and (elapsed := time.monotonic() - started) < FLOOD_SECONDS:
            due = min(FLOOD_FRAMES, int(FLOOD_FRAMES * elapsed / FLOOD_SECONDS) + 2048) - frames_sent()
            if due > 0:
                attacker.send(pair * (due // 2), FLOOD_SECONDS - elapsed)
            attacker.pump(lambda: attacker.ended, 0.01)
        figures.update(frames_sent=frames_sent(), goaway=attacker.goaway,
                       cut_off_after_s=round(attacker.ended_at - started, 2) if attacker.ended_at else None)
    finally:
        attacker.close()
    cut_off = figures["cut_off_after_s"]
    target.settled(2, figures, {
        f"a PING/SETTINGS flood of {figures['frames_sent']} frames was not cut off within {FLOOD_CUTOFF}s "
        f"(cut off after {cut_off}s)": cut_off is not None and cut_off <= FLOOD_CUTOFF,
    }, stall_limit=FLOOD_CANARY_LIMIT)


def test_rapid_reset_makes_at_most_max_concurrent_streams_upstream_connects_and_a_goaway(
        target: Target, figures: dict):
    server = target.bed.pods["server-b"]
    before = passive_opens(server)
    attacker = open_session(target)
    authority = server_b_authority(target)
    try:
        burst = b"".join(connect_frame(attacker.encoder, sid, authority) + rst_stream_frame(sid)
                         for sid in stream_ids(RAPID_RESETS))
        attacker.send(burst, ANSWER_TIMEOUT)
        attacker.pump(lambda: attacker.goaway is not None, ANSWER_TIMEOUT)
        figures["goaway"] = attacker.goaway
    finally:
        attacker.close()
    # connects the agent started before the session ended may still be arriving: wait until none do
    upstream, deadline = passive_opens(server) - before, time.monotonic() + 3.0
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = passive_opens(server) - before
        if now == upstream:
            break
        upstream = now
    figures["upstream_connects"] = upstream
    target.settled(2, figures, {
        f"{RAPID_RESETS} reset streams made {upstream} upstream connections (limit {MAX_CONCURRENT_STREAMS})":
            upstream <= MAX_CONCURRENT_STREAMS,
        f"rapid reset of {RAPID_RESETS} streams got no GOAWAY": attacker.goaway is not None,
    })


def _paced(attacker: H2Attacker, data: bytes) -> int:
    """Writes `data` PACE bytes at a time, letting the agent read each, until the agent ends the
    session, all is written or FLOOD_SECONDS pass; returns the bytes written."""
    started, written = time.monotonic(), 0
    view = memoryview(data)
    while written < len(data) and not attacker.ended and time.monotonic() - started < FLOOD_SECONDS:
        if not attacker.send(view[written:written + PACE], 1.0):
            break
        written = min(len(data), written + PACE)
        attacker.pump(lambda: attacker.ended, 0.002)
    return written


def test_a_continuation_flood_is_cut_off_before_a_mebibyte_of_header_block(target: Target, figures: dict):
    attacker = open_session(target)
    block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple("x-pad", "a" * 4000)] * 4, huffman=False)
    frame_payload = (block * (attacker.max_frame_size // len(block) + 1))[:attacker.max_frame_size]
    try:
        attacker.send(connect_frame(attacker.encoder, 1, server_b_authority(target), end_headers=False), 2.0)
        frame = continuation_frame(1, frame_payload)  # frames as large as the agent allows
        header_bytes = _paced(attacker, frame * (HEADER_BLOCK_CAP // len(frame) + 1))
        figures.update(frame_size=attacker.max_frame_size, header_block_bytes_at_cutoff=header_bytes,
                       cut_off=attacker.ended, goaway=attacker.goaway)
    finally:
        attacker.close()
    target.settled(2, figures, {
        f"a CONTINUATION flood was not cut off within {HEADER_BLOCK_LIMIT} bytes of header block "
        f"(sent {header_bytes} bytes, {'cut off' if attacker.ended else 'still open'})":
            attacker.ended and header_bytes <= HEADER_BLOCK_LIMIT,
    })


def test_a_frame_larger_than_max_frame_size_is_refused_on_its_header(target: Target, figures: dict):
    attacker = open_session(target)
    announced = 16 * 1024 * 1024 - 1  # bytes: the largest length a frame header can carry
    try:
        header = FRAME_HEADER.pack(announced >> 8, announced & 0xFF, 0x0, 0, 1)  # DATA on stream 1
        body_bytes = _paced(attacker, header + bytes(OVERSIZE_BODY_CAP)) - len(header)
        figures.update(max_frame_size=attacker.max_frame_size, announced=announced,
                       body_bytes_at_cutoff=body_bytes, cut_off=attacker.ended, goaway=attacker.goaway)
    finally:
        attacker.close()
    target.settled(2, figures, {
        f"a frame header announcing {announced} bytes (limit {attacker.max_frame_size}) was not refused "
        f"before {OVERSIZE_BODY_LIMIT} bytes of its body (sent {body_bytes}, "
        f"{'cut off' if attacker.ended else 'still open'})": attacker.ended and body_bytes <= OVERSIZE_BODY_LIMIT,
    })


def test_streams_beyond_max_concurrent_streams_are_refused_one_by_one_and_the_session_lives(
        target: Target, figures: dict):
    attacker = open_session(target)
    ids = stream_ids(2_000)
    authority = server_b_authority(target)
    try:
        attacker.send(b"".join(connect_frame(attacker.encoder, sid, authority) for sid in ids), ANSWER_TIMEOUT)
        attacker.pump(lambda: attacker.answered(ids), ANSWER_TIMEOUT)
        tunnelled = sorted(sid for sid, status in attacker.responses.items() if status == 200)
        refused = [sid for sid, code in attacker.resets.items() if code == REFUSED_STREAM]
        alive = not attacker.ended and attacker.alive()
        figures.update(tunnelled=len(tunnelled), refused=len(refused), goaway=attacker.goaway, session_alive=alive,
                       announced_max_concurrent_streams=attacker.remote_settings.get(SETTINGS_MAX_CONCURRENT_STREAMS))
    finally:
        attacker.close()
    target.settled(2, figures, {
        f"{len(tunnelled)} streams tunnelled, not the first {MAX_CONCURRENT_STREAMS}":
            tunnelled == ids[:MAX_CONCURRENT_STREAMS],
        f"{len(refused)} of the {len(ids) - MAX_CONCURRENT_STREAMS} excess streams refused (REFUSED_STREAM)":
            len(refused) == len(ids) - MAX_CONCURRENT_STREAMS,
        f"the session did not survive {len(ids)} CONNECTs (GOAWAY {attacker.goaway})": alive,
    })


def test_mtls_connections_that_never_send_the_preface_are_closed(target: Target, figures: dict):
    bed, context = target.bed, target.context()
    socks = []
    try:
        for _ in range(SILENT_SESSIONS):
            socks.append(tls_connect(bed.pods["attacker"].netns, bed.pods["server-b"].ip, HBONE_PORT, context))
        closed, waited = wait_all_closed(socks, PREFACE_DEADLINE + CLOSE_MARGIN)
        figures.update(closed=closed, waited_s=round(waited, 2))
    finally:
        for sock in socks:
            sock.close()
    target.settled(2, figures, {
        f"{SILENT_SESSIONS - closed} of {SILENT_SESSIONS} mTLS connections without an HTTP/2 preface "
        f"still open after {PREFACE_DEADLINE + CLOSE_MARGIN}s": closed == SILENT_SESSIONS,
    })


def _in_batches(attacker: H2Attacker, count: int, frame_for, figures: dict) -> int:
    """Sends `count` requests (`frame_for(stream_id)`), BATCH at a time, each batch given up to
    BATCH_WAIT to be answered before the next goes; returns how many were answered (a response
    or a reset)."""
    ids = stream_ids(count)
    for start in range(0, count, BATCH):
        batch = ids[start:start + BATCH]
        if not attacker.send(b"".join(frame_for(sid) for sid in batch), BATCH_WAIT):
            break
        attacker.pump(lambda: attacker.answered(batch), BATCH_WAIT)
    answered = sum(1 for sid in ids if sid in attacker.responses or sid in attacker.resets)
    figures.update(requests=count, answered=answered, goaway=attacker.goaway)
    return answered


def test_connects_that_end_their_stream_at_once_are_all_answered_and_leave_no_live_record(
        target: Target, figures: dict):
    attacker = open_session(target)
    authority = f"{target.bed.pods['server-a'].ip}:{TARGET_PORT}"  # a pod of node-1: not node-2's
    try:
        answered = _in_batches(attacker, EARLY_END_REQUESTS,
                               lambda sid: connect_frame(attacker.encoder, sid, authority, end_stream=True), figures)
    finally:
        attacker.close()
    source = target.bed.pods["attacker"].ip

    def live() -> list[dict]:
        return [c for c in target.mesh.ctl_json(2, "connections")
                if c["source_ip"] == source and c["state"] in ("connecting", "open")]

    deadline = time.monotonic() + 2.0
    while (left := live()) and time.monotonic() < deadline:
        time.sleep(0.2)
    figures["live_records_left"] = len(left)
    figures["unretrieved_task_exceptions"] = target.log_since_start(2).count(b"Task exception was never retrieved")
    target.settled(2, figures, {
        f"{answered} of {EARLY_END_REQUESTS} CONNECTs with END_STREAM answered": answered == EARLY_END_REQUESTS,
        f"{len(left)} connection records still live after every CONNECT ended": not left,
    })


def test_refused_connects_with_a_long_authority_write_a_bounded_log(target: Target, figures: dict):
    attacker = open_session(target)
    authority = "a" * (LONG_AUTHORITY - len(":8080")) + ":8080"  # no such workload: refused with 400
    try:
        answered = _in_batches(attacker, LOG_REQUESTS,
                               lambda sid: connect_frame(attacker.encoder, sid, authority), figures)
        wire = attacker.bytes_sent
    finally:
        attacker.close()
    time.sleep(0.5)  # the access log is written as each connection ends
    logged = len(target.log_since_start(2))
    figures.update(wire_bytes=wire, log_bytes=logged, amplification=round(logged / wire, 1))
    target.settled(2, figures, {
        f"{answered} of {LOG_REQUESTS} refused CONNECTs answered": answered == LOG_REQUESTS,
        f"{LOG_REQUESTS} refused CONNECTs ({wire} bytes on the wire) wrote {logged} bytes of log "
        f"({figures['amplification']}x, limit {LOG_AMPLIFICATION_LIMIT}x)": logged <= LOG_AMPLIFICATION_LIMIT * wire,
    })


def test_connects_to_loopback_the_admin_port_the_node_or_another_pod_are_answered_400(
        target: Target, figures: dict):
    bed = target.bed
    authorities = ["127.0.0.1:8080", "127.0.0.1:15000", f"{bed.node(2).ip}:15000", f"{bed.node(2).ip}:8080",
                   f"{bed.pods['server-a'].ip}:{TARGET_PORT}"]
    attacker = open_session(target)
    try:
        ids = stream_ids(len(authorities))
        attacker.send(b"".join(connect_frame(attacker.encoder, sid, authority)
                               for sid, authority in zip(ids, authorities)), ANSWER_TIMEOUT)
        attacker.pump(lambda: attacker.answered(ids), ANSWER_TIMEOUT)
        answers = {authority: attacker.responses.get(sid) for sid, authority in zip(ids, authorities)}
        alive = attacker.alive()
        figures.update(answers=answers, session_alive=alive)
    finally:
        attacker.close()
    target.settled(2, figures, {
        **{f"CONNECT {authority} answered {status}, not 400": status == 400 for authority, status in answers.items()},
        "the session did not survive the refusals": alive,
    })
