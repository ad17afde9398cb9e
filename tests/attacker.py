"""Attacker tooling for the hostile-input suite: what a hostile pod, or a node holding a mesh
certificate, sends to an agent, and how the agent is watched meanwhile. Every wait is bounded.

- `mesh_client_context`: a TLS 1.3 client context (ALPN h2) with a certificate the mesh CA
  signed, as a compromised node would hold.
- `H2Attacker`: one such mTLS connection writing raw HTTP/2 frames (hyperframe, HPACK) and
  reading what comes back on a non-blocking socket, so a flood never deadlocks against the
  agent's answers: answers per stream, resets, GOAWAY, and when the agent ended the session.
- `Vitals`: an agent process's descriptors, resident memory and CPU time, from /proc.
- `passive_opens`: TCP connections accepted so far inside a namespace (the destination pod's
  server side of every upstream connect the agent made to it).
- `Canary` (and `python -m tests.attacker canary --ip IP --port PORT`, run inside a pod): one
  long-lived connection through the mesh that exchanges a small message every CANARY_INTERVAL
  and prints each wait, so a test reads the longest wait of any time window afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import os
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.bed import Bed, Pod, in_netns, netns_socket
from ztunnel.identity import CertificateManager, FileCA, Identity

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client connection preface (RFC 9113 3.4)
FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length (split), type, flags, stream id
_SETTINGS, _PING, _GOAWAY, _HEADERS, _RST_STREAM, _DATA = 0x4, 0x6, 0x7, 0x1, 0x3, 0x0
_ACK = 0x1
REFUSED_STREAM = 0x7  # RFC 9113 7
READ_SIZE = 256 * 1024  # bytes per recv while draining the agent's answers
CANARY_MESSAGE = b"canary-0123456789"  # bytes per exchange: small, as the canary
CANARY_INTERVAL = 0.01  # seconds between the canary's exchanges
CANARY_TIMEOUT = 10.0  # seconds one exchange may take before the canary reports it broken


def mesh_client_context(ca_dir: Path, identity: str) -> ssl.SSLContext:
    """An mTLS client context holding a certificate for `identity` from the mesh CA in `ca_dir`."""
    parsed = Identity.parse(identity)
    certs = CertificateManager(FileCA.load_or_create(ca_dir, parsed.trust_domain), parsed.trust_domain)
    certs.set_identities([parsed])
    return certs.client_context(parsed)


def tls_connect(netns: str, ip: str, port: int, context: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    """A TLS connection from inside `netns` to ip:port, handshake done, socket blocking."""
    raw = netns_socket(netns)
    try:
        raw.settimeout(timeout)
        raw.connect((ip, port))
        return context.wrap_socket(raw, server_hostname=None)
    except BaseException:
        raw.close()
        raise


# --- frames the attacker sends (a fresh HPACK encoder per connection keeps the table in step) ---


def connect_frame(encoder: hpack.Encoder, stream_id: int, authority: str, *, end_stream: bool = False,
                  end_headers: bool = True) -> bytes:
    """HEADERS opening a CONNECT to `authority` (HPACK-indexed, so a repeat costs a few bytes)."""
    frame = HeadersFrame(stream_id, data=encoder.encode([(":method", "CONNECT"), (":authority", authority)]))
    for flag in (["END_HEADERS"] if end_headers else []) + (["END_STREAM"] if end_stream else []):
        frame.flags.add(flag)
    return frame.serialize()


def continuation_frame(stream_id: int, block: bytes, *, end_headers: bool = False) -> bytes:
    """CONTINUATION carrying more of a header block (without END_HEADERS: more is to come)."""
    frame = ContinuationFrame(stream_id, data=block)
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame.serialize()


def rst_stream_frame(stream_id: int, code: int = 0x8) -> bytes:
    """RST_STREAM, CANCEL (0x8) by default: what a client that gave up sends."""
    return RstStreamFrame(stream_id, error_code=code).serialize()


def ping_frame(payload: bytes = b"attacker") -> bytes:
    """PING (8 bytes of payload): the agent must answer each with a PING ACK."""
    return PingFrame(0, opaque_data=payload).serialize()


def settings_frame(settings: dict[int, int] | None = None, *, ack: bool = False) -> bytes:
    """SETTINGS (empty unless `settings`): the agent must acknowledge each one that is not an ACK."""
    return SettingsFrame(0, settings=settings or {}, flags=["ACK"] if ack else []).serialize()


@dataclass
class H2Attacker:
    """One mTLS HTTP/2 connection to an agent's HBONE listener, driven frame by frame.

    `send()` writes while reading, so neither side's buffers stall the other; everything received
    is parsed as it arrives: `responses` (stream -> :status), `resets` (stream -> error code),
    `goaway` (its error code) and `ended_at` (monotonic time the agent ended the session: GOAWAY,
    EOF or reset). The agent's SETTINGS are acknowledged, so its limits apply to what we send.
    """

    sock: ssl.SSLSocket
    encoder: hpack.Encoder = field(default_factory=hpack.Encoder)
    decoder: hpack.Decoder = field(default_factory=hpack.Decoder)
    responses: dict[int, int] = field(default_factory=dict)
    resets: dict[int, int] = field(default_factory=dict)
    goaway: int | None = None
    ended_at: float | None = None
    frames_received: int = 0
    bytes_sent: int = 0  # application bytes written into TLS
    settings_seen: bool = False
    remote_settings: dict[int, int] = field(default_factory=dict)  # the agent's, by SettingCodes value
    pings_acked: int = 0
    _inbox: bytearray = field(default_factory=bytearray)
    _replies: bytearray = field(default_factory=bytearray)  # our SETTINGS ACKs, sent before the next write

    @classmethod
    def open(cls, netns: str, ip: str, port: int, context: ssl.SSLContext, timeout: float = 5.0) -> H2Attacker:
        """TLS to ip:port from `netns`, then the preface and an empty SETTINGS; waits for the
        agent's SETTINGS (AssertionError after `timeout` if it never sends them)."""
        attacker = cls(tls_connect(netns, ip, port, context, timeout))
        attacker.sock.setblocking(False)
        attacker.send(PREFACE + settings_frame(), timeout)
        attacker.pump(lambda: attacker.settings_seen, timeout)
        assert attacker.settings_seen, f"the agent sent no HTTP/2 SETTINGS within {timeout}s"
        attacker.send(b"", timeout)  # our ACK: from here on its limits apply to what we send
        return attacker

    @property
    def max_frame_size(self) -> int:
        """The largest frame the agent accepts (SETTINGS_MAX_FRAME_SIZE, RFC 9113 default 16 KiB)."""
        return self.remote_settings.get(0x5, 16_384)

    def answered(self, stream_ids: Iterable[int]) -> bool:
        """Whether every one of the streams got a response or a reset."""
        return all(sid in self.responses or sid in self.resets for sid in stream_ids)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, timeout: float) -> bool:
        """Writes all of `data` (reading meanwhile) unless the session ends or `timeout` passes
        first; True if it was all written."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while not self.ended:
                if self._replies:
                    pending, self._replies = bytes(self._replies), bytearray()
                    view = memoryview(pending + bytes(view))
                if not view:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for _, events in selector.select(min(left, 0.5)):
                    if events & selectors.EVENT_READ:
                        self._read_available()
                    if events & selectors.EVENT_WRITE and not self.ended:
                        view = view[self._write(view):]
        return False

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Reads until `until()` holds, the session ends or `timeout` passes; returns `until()`."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while not until() and not self.ended:
                if self._replies:
                    self.send(b"", max(0.0, deadline - time.monotonic()))
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if selector.select(min(left, 0.5)) or self.sock.pending():
                    self._read_available()
        return until()

    def alive(self, timeout: float = 2.0) -> bool:
        """Whether the session still answers: a PING is acknowledged within `timeout`."""
        before = self.pings_acked
        self.send(ping_frame(b"alive?!!"), timeout)
        return self.pump(lambda: self.pings_acked > before, timeout)

    def _write(self, view: memoryview) -> int:
        try:
            written = self.sock.send(view[:READ_SIZE])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return 0
        except (ConnectionError, ssl.SSLError, OSError):
            self._end()
            return 0
        self.bytes_sent += written
        return written

    def _read_available(self) -> None:
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (ConnectionError, ssl.SSLError, OSError):
                self._end()
                return
            if not data:
                self._end()
                return
            self._inbox += data
            self._parse()

    def _end(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()

    def _parse(self) -> None:
        inbox, offset = self._inbox, 0
        while len(inbox) - offset >= 9:
            high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(inbox, offset)
            length = (high << 8) | low
            if len(inbox) - offset - 9 < length:
                break
            body = memoryview(inbox)[offset + 9:offset + 9 + length]
            self.frames_received += 1
            if kind == _PING and flags & _ACK:
                self.pings_acked += 1
            elif kind in (_SETTINGS, _HEADERS, _RST_STREAM, _GOAWAY):
                self._on_frame(inbox[offset:offset + 9], body)
            body.release()
            offset += 9 + length
        del inbox[:offset]

    def _on_frame(self, header: bytes, body: memoryview) -> None:
        frame, _ = Frame.parse_frame_header(memoryview(header))
        frame.parse_body(body)
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.settings_seen = True
            self.remote_settings.update(frame.settings)
            self._replies += settings_frame(ack=True)
        elif isinstance(frame, HeadersFrame):
            headers = dict(self.decoder.decode(frame.data))
            if ":status" in headers:
                self.responses[frame.stream_id] = int(headers[":status"])
        elif isinstance(frame, RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame.error_code
            self._end()


# --- watching an agent and a pod ---


@dataclass(frozen=True)
class Vitals:
    """What an agent process holds at one moment."""

    fds: int
    rss_kib: int  # VmRSS
    cpu_s: float  # user + system time

    @classmethod
    def of(cls, pid: int) -> Vitals:
        """Read from /proc/PID; FileNotFoundError if the process is gone."""
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        # fields after the command name (which may hold spaces); utime and stime are 14th and 15th
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return cls(fds, rss, (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"))


def wait_fds_at_most(pid: int, limit: int, timeout: float) -> tuple[bool, int, float]:
    """Polls the process's descriptor count until it is at most `limit` or `timeout` passes:
    (reached, last count, seconds waited)."""
    start = time.monotonic()
    while True:
        fds = Vitals.of(pid).fds
        waited = time.monotonic() - start
        if fds <= limit or waited >= timeout:
            return fds <= limit, fds, waited
        time.sleep(0.05)


def passive_opens(pod: Pod) -> int:
    """TCP connections accepted so far in the pod's namespace (Tcp PassiveOpens of /proc/net/snmp)."""
    with in_netns(pod.netns):
        lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()
                 if line.startswith("Tcp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("PassiveOpens")])


def post_raw(netns: str, port: int, path: str, body: bytes, timeout: float = 5.0) -> tuple[int, str]:
    """POSTs `body` as it is (JSON or not) to 127.0.0.1:PORT inside `netns`: (status, body)."""
    sock = netns_socket(netns)
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.sock = sock
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        sock.close()


def wait_all_closed(socks: list[socket.socket], timeout: float) -> tuple[int, float]:
    """Waits until the peer closed (EOF or reset) each socket, or `timeout`: (closed, seconds)."""
    start = time.monotonic()
    open_socks = set(socks)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while open_socks:
            left = start + timeout - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(min(left, 0.5)):
                sock = key.fileobj
                try:
                    if sock.recv(4096):  # type: ignore[union-attr]
                        continue  # the agent wrote something (an alert): wait for the close
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    pass
                selector.unregister(sock)
                open_socks.discard(sock)  # type: ignore[arg-type]
    return len(socks) - len(open_socks), time.monotonic() - start


@dataclass
class Canary:
    """A canary process in a pod, exchanging CANARY_MESSAGE with an echo server through the mesh.

    Its log has one line per exchange, "<monotonic start> <seconds waited>", or "error ..." once
    it broke; CLOCK_MONOTONIC is the same for every process, so windows line up with the test's.
    """

    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, bed: Bed, pod: Pod, ip: str, port: int, timeout: float = 5.0) -> Canary:
        """Starts it and waits for its first exchange (AssertionError after `timeout`)."""
        log = bed.logdir / f"canary-{len(list(bed.logdir.glob('canary-*')))}.log"
        proc = bed.spawn(pod, [sys.executable, "-m", "tests.attacker", "canary", "--ip", ip, "--port", str(port)],
                         log)
        canary = cls(proc, log)
        deadline = time.monotonic() + timeout
        while not canary._exchanges():
            problem = canary.error() or (time.monotonic() >= deadline and f"no exchange within {timeout}s")
            if problem:
                bed.stop(proc)
                raise AssertionError(f"the canary from {pod.name} to {ip}:{port} did not start: {problem}")
            time.sleep(0.02)
        return canary

    def _lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def _exchanges(self) -> list[tuple[float, float]]:
        out = []
        for line in self._lines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("error"):
                out.append((float(parts[0]), float(parts[1])))
        return out

    def error(self) -> str | None:
        """Why the canary broke (its connection failed or an exchange timed out), or None."""
        errors = [line for line in self._lines() if line.startswith("error")]
        if errors:
            return errors[0]
        if self.proc.poll() is not None:
            return f"error: canary exited with code {self.proc.returncode}"
        return None

    def longest_wait(self, since: float) -> float:
        """The longest wait (seconds) of the exchanges started at or after `since`, counting the
        one in progress now."""
        exchanges = [(t, w) for t, w in self._exchanges() if t >= since]
        longest = max((w for _, w in exchanges), default=0.0)
        all_exchanges = self._exchanges()
        last_end = all_exchanges[-1][0] + all_exchanges[-1][1] if all_exchanges else since
        in_progress = time.monotonic() - max(last_end, since) - CANARY_INTERVAL
        return max(longest, in_progress)


def _run_canary(ip: str, port: int) -> int:
    """The canary process: exchanges until SIGTERM; prints each wait; "error ..." if it breaks."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sock = socket.create_connection((ip, port), timeout=CANARY_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                raise ConnectionError("closed before the server named itself")
            banner += chunk
        while True:
            started = time.monotonic()
            sock.sendall(CANARY_MESSAGE)
            echoed = b""
            while len(echoed) < len(CANARY_MESSAGE):
                chunk = sock.recv(len(CANARY_MESSAGE) - len(echoed))
                if not chunk:
                    raise ConnectionError("closed by the mesh")
                echoed += chunk
            print(f"{started:.6f} {time.monotonic() - started:.6f}", flush=True)
            time.sleep(CANARY_INTERVAL)
    except (OSError, ConnectionError) as e:
        print(f"error {time.monotonic():.6f} {e!r}", flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    canary = commands.add_parser("canary", help="one long-lived connection exchanging small messages")
    canary.add_argument("--ip", required=True)
    canary.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    return _run_canary(args.ip, args.port)


if __name__ == "__main__":
    sys.exit(main())
