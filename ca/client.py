"""The agent's side of the cluster CA: a RemoteIssuer that sends CSRs to `ameshctl ca serve`.

Each request reads the projected service-account token from its file again (kubelet rotates
it). The trust bundle (the root certificates only: the agent never holds the root key) is
followed by a TrustBundleWatch (ztunnel/cawatch.py), which the agent polls: a changed bundle is
taken whole or refused whole. The CA's TLS certificate must chain to that bundle and carry the
CA's SPIFFE ID. Calls block
(http.client), so the CertificateManager makes them in a worker thread. Every outcome is counted
by result for amesh_ca_requests_total, and the last success and failure are kept for
`ameshctl status`.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.config import CA_NAMESPACE, CA_SERVICE_ACCOUNT, PATH
from ztunnel.cawatch import POLL_INTERVAL, TrustBundleWatch
from ztunnel.identity import (
    Identity,
    IdentityError,
    IssuedCertificate,
    IssueError,
    expect_identity,
    fingerprint,
    peer_identity,
)

REQUEST_TIMEOUT = 10.0  # seconds for connect, TLS handshake and answer of one request
# results of requests the CA did not answer (as opposed to its refusals, which name a reason)
UNANSWERED = ("unreachable", "bad_response", "local_files")
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


class ClusterCAClient:
    """Asks the cluster CA at `address` (host:port) for certificates; a RemoteIssuer."""

    def __init__(self, address: str, token_file: Path, trust_bundle_file: Path, trust_domain: str,
                 timeout: float = REQUEST_TIMEOUT, clock: Callable[[], float] = time.time,
                 poll_interval: float = POLL_INTERVAL) -> None:  # seconds between checks of the bundle
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"CA address {address!r} must be host:port")
        self.address = address
        self._host, self._port = host.strip("[]"), int(port)
        self.token_file = token_file
        self.ca_identity = Identity(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()  # requests run in worker threads, the views on the loop
        self.results: Counter[str] = Counter()  # by result: "signed", the CA's refusal reason, or ours
        self.last_success: float | None = None
        self.last_error: str | None = None  # of the latest request, None when it got a certificate
        self.last_result: str | None = None  # the latest request's result label
        self.failing_since: float | None = None  # the first failure since the last success
        self.trust = TrustBundleWatch(trust_bundle_file, poll_interval, clock)
        self.trust.start()  # CAError naming the file: the agent does not start without a bundle

    def __repr__(self) -> str:
        return f"ClusterCAClient(address={self.address!r}, token_file={str(self.token_file)!r})"

    @property
    def trust_bundle(self) -> bytes:
        """The PEM of the bundle's roots as last read whole (a refused change keeps them)."""
        return self.trust.bundle

    @property
    def root_fingerprint(self) -> str:
        """The bundle's first root: the one the CA signs with (a rotation keeps it first)."""
        roots = self.trust.current
        assert roots  # start() loaded at least one, and a change without any is refused
        return fingerprint(roots[0])

    def issue_request(self, identity: Identity, request: x509.CertificateSigningRequest,
                      lifetime: timedelta) -> IssuedCertificate:
        """The CA's certificate for `request`; IssueError saying why not (counted by result)."""
        try:
            issued = self._ask(identity, request, lifetime)
        except _Failed as e:
            with self._lock:
                self.results[e.result] += 1
                self.last_result, self.last_error = e.result, str(e)
                if self.failing_since is None:
                    self.failing_since = self._clock()
            raise IssueError(str(e)) from None
        with self._lock:
            self.results["signed"] += 1
            self.last_result, self.last_success = "signed", self._clock()
            self.last_error = self.failing_since = None
        return issued

    def _ask(self, identity: Identity, request: x509.CertificateSigningRequest,
             lifetime: timedelta) -> IssuedCertificate:
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise _Failed("local_files", f"cannot read the CA token {self.token_file}: {e}") from None
        if not token:
            raise _Failed("local_files", f"the service-account token file {self.token_file} is empty")
        body = json.dumps({"identity": identity.uri, "lifetime_s": lifetime.total_seconds(),
                           "csr": request.public_bytes(serialization.Encoding.PEM).decode("ascii")})
        status, answer = self._post(body, token)
        if status != 200:
            reason = answer.get("reason", "bad_response")
            raise _Failed(reason, f"the cluster CA {self.address} refused {identity} ({reason}): "
                          f"{answer.get('error', status)}")
        return self._checked(identity, request, answer)

    def _post(self, body: str, token: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) from the CA, after checking its certificate's identity."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # the CA is known by its SPIFFE ID, checked below
        context.load_verify_locations(cadata=self.trust_bundle.decode("ascii"))
        connection = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=context)
        try:
            connection.connect()
            expect_identity(peer_identity(connection.sock.getpeercert(binary_form=True), self.ca_identity.trust_domain),
                            self.ca_identity)
            connection.request("POST", PATH, body, {"Content-Type": "application/json",
                                                    "Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            data = response.read()
        except IdentityError as e:
            raise _Failed("bad_response", f"the cluster CA {self.address} is not who it should be: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Failed("unreachable", f"cannot reach the cluster CA {self.address}: {e}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(data)
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise _Failed("bad_response", f"the cluster CA {self.address} answered HTTP {response.status} with "
                          f"something unreadable: {e}") from None
        return response.status, answer

    def _checked(self, identity: Identity, request: x509.CertificateSigningRequest,
                 answer: dict[str, Any]) -> IssuedCertificate:
        """The issued certificate, once it is for `identity` and over the CSR's key."""
        try:
            chain_pem = str(answer["certificate_chain"]).encode("ascii")
            leaf = x509.load_pem_x509_certificate(chain_pem)
            expect_identity(peer_identity(leaf.public_bytes(serialization.Encoding.DER), identity.trust_domain),
                            identity)
        except (KeyError, ValueError, IdentityError) as e:
            raise _Failed("bad_response", f"the cluster CA {self.address} sent no usable certificate: {e}") from None
        if leaf.public_key().public_bytes(*_SPKI) != request.public_key().public_bytes(*_SPKI):
            raise _Failed("bad_response", f"the cluster CA {self.address} signed a key other than the one sent")
        return IssuedCertificate(certificate=leaf, chain_pem=chain_pem)

    def status(self) -> dict[str, Any]:
        """For `ameshctl status`: where the CA is and how the latest requests went."""
        with self._lock:
            return {"mode": "cluster", "address": self.address, "last_success": self.last_success,
                    "last_result": self.last_result, "last_error": self.last_error,
                    "failing_since": self.failing_since, "unanswered": self.last_result in UNANSWERED,
                    "requests": dict(self.results)}


class _Failed(Exception):
    """A request that got no certificate; `result` is its metric label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result
