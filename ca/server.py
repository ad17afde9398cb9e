"""`ameshctl ca serve`: the cluster CA, the only process that holds the mesh's root key.

It loads the root (ca.key, ca.crt) from a directory (the Secret mounted only into its own
Deployment), watches the cluster's pods (registry.kubernetes.KubernetesSource, Pods only) and
serves one endpoint over HTTPS on CA_PORT:

    POST /v1/certificates  Authorization: Bearer <the agent's projected token (audience amesh-ca)>
        {"identity": "spiffe://<td>/ns/<ns>/sa/<sa>", "csr": "<PKCS#10 PEM>", "lifetime_s": 86400}
    200 {"certificate_chain": "<leaf PEM><root PEM>"}
    4xx/503 {"error": "<sentence>", "reason": "<code of ca.admission.REASONS>"}

Each request: the CSR must be signed by its key and name exactly the identity asked for; the
token goes to the Kubernetes TokenReview API; ca.admission.admit decides from the review and the
pods seen now. The CA never sees a private key, and keeps no state but its pod watch, so several
replicas can serve from the same Secret. Its serving certificate is a leaf of the same root for
its own SPIFFE ID (spiffe://<td>/ns/amesh-system/sa/amesh-ca), which agents check against the trust
bundle they are given (the root certificates only). Metrics and readiness are plain HTTP on
METRICS_PORT.

The CA follows its directory (ztunnel/cawatch.py CADirectoryWatch, as a local-CA agent does): at
each root rotation step (ztunnel/rotation.py) it signs with the directory's signing root from then
on, and re-makes its serving certificate from it, which agents trusting the old and the new root
accept alike. A directory that does not load is refused (logged, amesh_ca_server_root_refusals),
and the last good root keeps signing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ca.admission import AdmissionPolicy, Decision, PodsByNode, Review, admit
from ca.config import CA_NAMESPACE, CA_SERVICE_ACCOUNT, MAX_BODY, PATH, CAConfig
from registry.kubeclient import ConfigError, KubeClient, load_configuration
from registry.kubernetes import KubernetesSource
from registry.model import RegistryState
from ztunnel.cawatch import CADirectoryWatch
from ztunnel.identity import (
    CA_KEY_FILE,
    CAError,
    FileCA,
    Identity,
    IssueError,
    fingerprint,
    load_chain_and_key,
    requested_key,
)

log = logging.getLogger("amesh.ca")

REVIEW_TIMEOUT = 5.0  # seconds for one TokenReview round trip to the API server

_STATUS = {  # HTTP status of each refusal: the asker's fault (4xx) or the CA's (503)
    "bad_request": 400, "bad_csr": 400, "wrong_trust_domain": 400,
    "token_expired": 401, "token_wrong_audience": 401, "token_invalid": 401,
    "not_agent": 403, "token_not_bound_to_pod": 403, "agent_node_unknown": 403,
    "unknown_service_account": 403, "identity_on_other_node": 403,
    "not_synced": 503, "review_failed": 503,
}


class RequestError(Exception):
    """A request refused before admission (unreadable body, CSR or identity)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SigningRequest:
    """One parsed request: the identity asked for, the CSR's verified public key, the lifetime."""

    identity: Identity
    public_key: CertificatePublicKeyTypes
    lifetime: timedelta

    @classmethod
    def parse(cls, body: bytes, max_lifetime: timedelta) -> SigningRequest:
        """The request in `body`; RequestError naming what is wrong with it otherwise."""
        try:
            fields = json.loads(body)
            uri, csr_pem = fields["identity"], fields["csr"]
            lifetime_s = float(fields.get("lifetime_s", max_lifetime.total_seconds()))
            if not isinstance(uri, str) or not isinstance(csr_pem, str):
                raise TypeError("identity and csr must be strings")
        except (ValueError, KeyError, TypeError) as e:
            raise RequestError("bad_request", f"the request must be JSON with identity, csr (PEM) and optionally "
                               f"lifetime_s: {e}") from None
        try:
            identity = Identity.parse(uri)
        except ValueError as e:
            raise RequestError("bad_request", str(e)) from None
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            public_key = requested_key(csr, identity)
        except ValueError as e:
            raise RequestError("bad_csr", f"the CSR for {identity} cannot be read: {e}") from None
        except IssueError as e:
            raise RequestError("bad_csr", str(e)) from None
        if not _strong(public_key):
            raise RequestError("bad_csr", f"the CSR for {identity} carries a {type(public_key).__name__} key: send "
                               "ECDSA P-256/P-384 or RSA of at least 2048 bits")
        if lifetime_s <= 0:
            raise RequestError("bad_request", f"lifetime_s must be positive, got {lifetime_s:g}")
        return cls(identity, public_key, min(max_lifetime, timedelta(seconds=lifetime_s)))


def _strong(key: CertificatePublicKeyTypes) -> bool:
    """Whether the CA signs certificates over `key`: ECDSA P-256 or P-384, or RSA >= 2048 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1))
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


class ClusterCA:
    """The running CA: its root, serving certificate, pod watch, TokenReview client and listeners."""

    def __init__(self, config: CAConfig) -> None:
        self.config = config
        if not (config.ca_dir / CA_KEY_FILE).exists():
            raise CAError(f"no root CA key in {config.ca_dir}: mount the Secret holding ca.key and ca.crt there "
                          "(create them with `ameshctl ca init DIR`)")
        self.watch = CADirectoryWatch(config.ca_dir, config.trust_domain, config.ca_poll_interval)
        self.root: FileCA = self.watch.load_or_create()
        self.policy = AdmissionPolicy(config.trust_domain, config.agent_namespace, config.agent_service_account)
        self.identity = Identity(config.trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
        self.results: Counter[str] = Counter()  # requests by reason code ("signed" or a refusal)
        self._pods: PodsByNode | None = None  # None until the pod watch's initial sync
        self.pod_count = 0
        self._api: KubeClient | None = None  # for TokenReviews
        self._serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._serving.minimum_version = ssl.TLSVersion.TLSv1_3
        self._runners: list[web.AppRunner] = []
        self._next_renewal = 0.0  # seconds from the last serving-certificate issue to the next
        self._renewed = asyncio.Event()  # set when a new root re-made the serving certificate early

    def __repr__(self) -> str:
        return f"ClusterCA(root={self.root!r}, port={self.config.port})"

    def renew_serving_certificate(self) -> float:
        """Issues the CA's own serving certificate (new key); returns seconds until its half-life."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.root.issue(self.identity, key.public_key(), self.config.cert_lifetime)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        load_chain_and_key(self._serving, issued.chain_pem + key_pem)  # new handshakes use it at once
        log.info("event=ca_serving_cert identity=%s serial=%x", self.identity, issued.certificate.serial_number)
        return self.config.cert_lifetime.total_seconds() / 2

    async def run(self) -> None:
        """Serves until cancelled."""
        configuration = load_configuration(self.config.kubeconfig)
        source = KubernetesSource(self._on_pods, lambda error: log.warning("event=ca_pods_error error=%r", str(error)),
                                  configuration=configuration, kinds=("Pod",))
        async with KubeClient(configuration) as api:
            self._api = api
            await self._start()
            log.info("event=ca_serving listen=%s:%d root_fingerprint=%s trust_domain=%s", self.config.host,
                     self.config.port, self.root.root_fingerprint, self.config.trust_domain)
            try:
                await asyncio.gather(source.run(), self._renew_serving_forever(), self.watch.run(self.use_root))
            finally:
                for runner in self._runners:
                    await runner.cleanup()

    async def _start(self) -> None:
        self._next_renewal = self.renew_serving_certificate()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self._sign)
        metrics = web.Application()
        metrics.router.add_get("/metrics", self._metrics)
        metrics.router.add_get("/healthz/ready", self._ready)
        for application, port, tls in ((app, self.config.port, self._serving), (metrics, self.config.metrics_port, None)):
            runner = web.AppRunner(application, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.config.host, port, ssl_context=tls, reuse_address=True).start()
            self._runners.append(runner)

    def use_root(self, root: FileCA) -> None:
        """Signs with `root` from now on (a rotation step changed the directory), its own serving
        certificate too: handshakes under way finish with the old one, new ones get the new."""
        previous, self.root = self.root, root
        log.info("event=ca_root_changed signing_root=%s previous=%s trust_bundle=%s", root.root_fingerprint,
                 previous.root_fingerprint, ",".join(fingerprint(r) for r in root.roots))
        self._next_renewal = self.renew_serving_certificate()
        self._renewed.set()

    async def _renew_serving_forever(self) -> None:
        while True:
            self._renewed.clear()
            try:
                await asyncio.wait_for(self._renewed.wait(), self._next_renewal)
            except asyncio.TimeoutError:
                self._next_renewal = self.renew_serving_certificate()

    def _on_pods(self, state: RegistryState) -> None:
        self._pods = PodsByNode(state.workloads)
        self.pod_count = len(state.workloads)

    async def _sign(self, request: web.Request) -> web.Response:
        try:
            parsed = SigningRequest.parse(await request.read(), self.config.cert_lifetime)
        except RequestError as e:
            return self._refusal(Decision.refuse(e.reason, str(e)), None)
        except web.HTTPRequestEntityTooLarge:
            return self._refusal(Decision.refuse("bad_request", f"the request is over {MAX_BODY} bytes"), None)
        decision = await self._decide(request.headers.get("Authorization", ""), parsed.identity)
        if not decision.allowed:
            return self._refusal(decision, parsed.identity)
        issued = self.root.issue(parsed.identity, parsed.public_key, parsed.lifetime)
        self._record(decision, parsed.identity)
        return web.json_response({"certificate_chain": issued.chain_pem.decode("ascii")})

    async def _decide(self, authorization: str, identity: Identity) -> Decision:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Decision.refuse("token_invalid", "the request carries no bearer token: send the agent's projected "
                                   f"service-account token (audience {self.policy.audience}) as Authorization: Bearer")
        if self._pods is None:
            return Decision.refuse("not_synced", "the CA has not yet listed the cluster's pods; retry shortly")
        try:
            review = await self._review(token.strip())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, ConfigError) as e:
            return Decision.refuse("review_failed", f"the CA could not ask the Kubernetes TokenReview API: {e!r}")
        return admit(self.policy, review, identity, self._pods)

    async def _review(self, token: str) -> Review:
        """The TokenReview API's verdict on `token` for the CA's audience."""
        assert self._api is not None
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.policy.audience]}}
        status, data = await self._api.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body,
                                               timeout=REVIEW_TIMEOUT)
        if status not in (200, 201):
            raise ValueError(f"TokenReview answered HTTP {status}: {data[:200]!r}")
        return Review.from_status(json.loads(data).get("status") or {})

    def _record(self, decision: Decision, identity: Identity | None) -> None:
        """Counts and logs one decision."""
        self.results[decision.reason] += 1
        log.info("event=ca_decision result=%s node=%s identity=%s message=%r", decision.reason,
                 decision.node or "-", identity or "-", decision.message)

    def _refusal(self, decision: Decision, identity: Identity | None) -> web.Response:
        """The JSON answer to a refused request, counted and logged."""
        self._record(decision, identity)
        return web.json_response({"error": decision.message, "reason": decision.reason},
                                 status=_STATUS[decision.reason])

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        registry.register(_Collector(self))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self._pods is not None
        return web.json_response({"ready": ready, "problems": [] if ready else ["pods not listed yet"]},
                                 status=200 if ready else 503)


class _Collector:
    """The CA's metrics at scrape time: requests by result, pods watched."""

    def __init__(self, ca: ClusterCA) -> None:
        self.ca = ca

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("amesh_ca_server_requests", "Certificate requests the cluster CA answered, "
                                       "by result: signed, or the reason it refused.", labels=["result"])
        for result, count in sorted(self.ca.results.items()):
            requests.add_metric([result], count)
        yield requests
        yield GaugeMetricFamily("amesh_ca_pods", "Pods the cluster CA sees scheduled now.", value=self.ca.pod_count)
        watch = self.ca.watch
        yield CounterMetricFamily("amesh_ca_server_root_reloads", "New signing roots or trust bundles the cluster "
                                  "CA took from its directory (root rotation steps).", value=watch.reloads)
        yield CounterMetricFamily("amesh_ca_server_root_refusals", "Checks that found the CA directory changed but "
                                  "not loadable; the last good root keeps signing.", value=watch.refusals)
        root = GaugeMetricFamily("amesh_ca_server_signing_root", "1 for the root the cluster CA signs with now, "
                                 "by SHA-256 fingerprint.", labels=["fingerprint"])
        root.add_metric([self.ca.root.root_fingerprint], 1)
        yield root
