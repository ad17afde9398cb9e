"""Workload identities for the ztunnel: SPIFFE IDs, the node's CA, certificate rotation, TLS contexts.

- `Identity` is a SPIFFE ID, spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
- `FileCA` is the root CA of a directory: the signing root (ca.key, ca.crt) and the trust bundle,
  every root peers may be signed by (trust-bundle.pem; absent, ca.crt alone; during a root
  rotation, ztunnel/rotation.py, the old and the new). It signs workload certificates for public
  keys it is handed and never sees a workload's private key. `CAFiles` is that directory read at
  one moment (ztunnel/cawatch.py compares them to notice a change).
- `CertificateManager` holds one key and certificate per identity the node serves, renews them at
  half-life (backing off when the issuer fails) and hands out mutual-TLS 1.3 `ssl.SSLContext`s
  that trust every root of the issuer's bundle; a new issuer (`set_issuer`) renews them all.
  Its timing decisions (`renew_due`, `next_wakeup`) are pure and take `now`, so tests drive them
  with a fake clock; `run()` only sleeps and calls them.
- `peer_identity` / `expect_identity` turn the peer's certificate into an `Identity` once OpenSSL has
  validated the chain, with errors that say what was presented and what was expected.

Workload private keys exist only in this process: they are handed to OpenSSL through an anonymous
memory file (memfd) and never written to disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.model import Workload
from ztunnel.errors import ProxyError

log = logging.getLogger("amesh.ztunnel")

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_LIFETIME = timedelta(hours=24)  # workload certificates; renewed at half-life, so 12 h of slack
ROOT_LIFETIME = timedelta(days=3650)  # ~10 years: replacing the root reissues every certificate
# Leaves start this long before "now" so a peer whose clock runs slightly behind ours does not
# reject a certificate that is, to it, not yet valid.
CLOCK_SKEW = timedelta(seconds=60)
SERIAL_BITS = 128  # random, positive: unpredictable serials, well under RFC 5280's 20 octets
# run() re-reads the wall clock at least this often (seconds): NTP steps and suspend/resume move
# the wall clock the certificates are judged by, which a single long sleep would not notice.
MAX_SLEEP = 60.0
JITTER = (0.8, 1.2)  # retry delays are multiplied by a factor in this range so agents spread out

ORGANIZATION = "amesh"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
TRUST_BUNDLE_FILE = "trust-bundle.pem"  # every root peers may be signed by; absent: ca.crt alone

# SPIFFE ID syntax (spiffe/spiffe standards/SPIFFE-ID.md): the trust domain is lowercase letters,
# digits, dots, dashes and underscores; path segments also allow uppercase, and may not be . or ..
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SPIFFE_ID = re.compile(r"spiffe://([^/]*)/ns/([^/]*)/sa/([^/]*)")
_FORM = "spiffe://<trust domain>/ns/<namespace>/sa/<service account>"


def check_trust_domain(trust_domain: str) -> None:
    """ValueError unless `trust_domain` is valid in a SPIFFE ID."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(
            f"trust domain {trust_domain!r} is not valid: use lowercase letters, digits, '.', '-' "
            "and '_'"
        )


@dataclass(frozen=True)
class Identity:
    """A workload's SPIFFE ID: spiffe://<trust domain>/ns/<namespace>/sa/<service account>."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        for what, value in (("namespace", self.namespace), ("service account", self.service_account)):
            if not _SEGMENT.fullmatch(value) or value in (".", ".."):
                raise ValueError(
                    f"{what} {value!r} is not valid in a SPIFFE ID: use letters, digits, '.', '-' "
                    "and '_' (and not '.' or '..')"
                )

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """The Identity a SPIFFE ID names; ValueError for anything not of the form above."""
        match = _SPIFFE_ID.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not a workload SPIFFE ID of the form {_FORM}")
        try:
            return cls(*match.groups())
        except ValueError as e:
            raise ValueError(f"{uri!r} is not a valid SPIFFE ID: {e}") from None


class IdentityError(ProxyError):
    """The peer did not prove the identity we needed: the peer's (or its CA's) fault, not ours.

    `reason` is a short code for counters and filters ("no_certificate", "no_spiffe_id",
    "wrong_trust_domain", "wrong_identity"); str(error) names what was presented and expected.
    """


class IssueError(ProxyError):
    """The issuer could not sign a certificate (CA unreachable, misconfigured, refused)."""

    def __init__(self, message: str) -> None:
        super().__init__("no_certificate_issued", message)


class CAError(Exception):
    """The CA files cannot be used; the message names the file and what to do about it."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed workload certificate and the chain to present with it (leaf first, then root)."""

    certificate: x509.Certificate
    chain_pem: bytes


class Issuer(Protocol):
    """Signs workload certificates; the CertificateManager's only view of a CA."""

    @property
    def trust_bundle(self) -> bytes:
        """PEM of every root CA certificate peers may be signed by (during a root rotation the
        old and the new); the certificates it issues chain to one of them."""
        ...

    @property
    def root_fingerprint(self) -> str:
        """SHA-256 fingerprint of the root it signs with now."""
        ...

    def issue(
        self, identity: Identity, public_key: CertificatePublicKeyTypes, lifetime: timedelta
    ) -> IssuedCertificate:
        """A certificate for `identity` over `public_key`; IssueError when it cannot sign."""
        ...


@runtime_checkable
class RemoteIssuer(Protocol):
    """An issuer across the network (the cluster CA): it signs a CSR, so it sees no private key
    and gets proof that the asker holds the key. Each call is a round trip that may take up to its
    timeout, so the CertificateManager makes it in a worker thread, never on the event loop."""

    @property
    def trust_bundle(self) -> bytes:
        """As Issuer.trust_bundle: PEM of every root CA certificate peers may be signed by."""
        ...

    @property
    def root_fingerprint(self) -> str:
        """As Issuer.root_fingerprint."""
        ...

    def issue_request(
        self, identity: Identity, request: x509.CertificateSigningRequest, lifetime: timedelta
    ) -> IssuedCertificate:
        """A certificate for the CSR `request` of `identity`; IssueError when it is not signed."""
        ...


def signing_request(
    identity: Identity, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateSigningRequest:
    """A PKCS#10 CSR for `identity` (its SPIFFE ID the only SAN), signed by `key`."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def requested_key(
    request: x509.CertificateSigningRequest, identity: Identity
) -> CertificatePublicKeyTypes:
    """The public key of a CSR that is signed by its own key and asks for exactly `identity`
    (one URI SAN, nothing else); IssueError naming what is wrong otherwise."""
    if not request.is_signature_valid:
        raise IssueError(f"the CSR for {identity} is not signed by the key it carries")
    try:
        names = list(request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    if names != [x509.UniformResourceIdentifier(identity.uri)]:
        found = ", ".join(str(getattr(n, "value", n)) for n in names) or "none"
        raise IssueError(
            f"the CSR must name exactly one SAN, the URI {identity.uri}, but names: {found}"
        )
    return request.public_key()  # type: ignore[return-value]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER as uppercase hex pairs joined by ':' (as openssl prints it)."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


@dataclass(frozen=True)
class CAFiles:
    """A CA directory's files as read at one moment: what a FileCA is loaded from, and what a
    watch of the directory compares to tell a real change from a touch."""

    directory: Path
    key_pem: bytes = field(repr=False)  # the signing root's private key: never shown
    key_mode: int  # permission bits of ca.key
    cert_pem: bytes
    bundle_pem: bytes | None  # trust-bundle.pem; None when absent (the bundle is then ca.crt alone)

    @classmethod
    def read(cls, directory: Path) -> CAFiles:
        """The files of the CA in `directory`; CAError naming the file that cannot be read."""
        directory = Path(directory)
        key_path = directory / CA_KEY_FILE
        try:
            with open(key_path, "rb") as f:  # mode and bytes of the same file, even mid-replace
                key_mode = os.fstat(f.fileno()).st_mode & 0o777
                key_pem = f.read()
        except OSError as e:
            raise CAError(f"cannot read {key_path}: {e.strerror}") from None
        cert_pem = _read(directory / CA_CERT_FILE)
        bundle_path = directory / TRUST_BUNDLE_FILE
        bundle_pem = _read(bundle_path) if bundle_path.exists() else None
        return cls(directory, key_pem, key_mode, cert_pem, bundle_pem)

    @property
    def digest(self) -> str:
        """SHA-256 over everything a FileCA is made of: equal digests load the same CA."""
        h = hashlib.sha256(b"%o" % self.key_mode)
        for part in (self.key_pem, self.cert_pem, self.bundle_pem):
            h.update(b"-" if part is None else b"%d:" % len(part) + part)
        return h.hexdigest()


class FileCA:
    """A root CA whose key and certificate live in `directory` (ca.key, ca.crt), created if absent,
    with the bundle of every root peers may be signed by (trust-bundle.pem; absent: ca.crt alone).

    During a root rotation (ztunnel/rotation.py) the bundle holds the old and the new root while
    ca.key and ca.crt are one of them: every agent accepts both, each signs with one.
    """

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        certificate: x509.Certificate,
        trust_domain: str,
        clock: Callable[[], float],
        roots: tuple[x509.Certificate, ...] = (),  # the trust bundle; empty: the signing root alone
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self._key = key  # never logged or shown: __repr__ below leaves it out
        self._certificate = certificate
        self._clock = clock
        self._aki = _authority_key_identifier(certificate)
        self.root_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.root_fingerprint = fingerprint(certificate)
        self.roots = roots or (certificate,)
        self.trust_bundle = b"".join(root.public_bytes(serialization.Encoding.PEM) for root in self.roots)

    def __repr__(self) -> str:
        return (
            f"FileCA(directory={str(self.directory)!r}, trust_domain={self.trust_domain!r}, "
            f"root_fingerprint={self.root_fingerprint!r}, roots={len(self.roots)})"
        )

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        clock: Callable[[], float] = time.time,
    ) -> FileCA:
        """The CA in `directory`; a new ECDSA P-256 root is created there when neither file exists."""
        check_trust_domain(trust_domain)  # before touching any file
        directory = Path(directory)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        have_key, have_cert = key_path.exists(), cert_path.exists()
        if not have_key and not have_cert:
            bundle_path = directory / TRUST_BUNDLE_FILE
            if bundle_path.exists():  # a new root would not be in it: restoring is what was meant
                raise CAError(
                    f"{bundle_path} exists but {key_path.name} and {cert_path.name} do not: restore "
                    f"them, or remove {bundle_path.name} too to create a new root CA"
                )
            key, certificate = new_root(trust_domain, clock())
            write_ca_files(directory, [(CA_KEY_FILE, private_pem(key)), (CA_CERT_FILE, certificate_pem(certificate))])
            log.info(
                "ca.created dir=%s trust_domain=%s fingerprint=%s",
                directory, trust_domain, fingerprint(certificate),
            )
            return cls(directory, key, certificate, trust_domain, clock)
        if have_key != have_cert:
            present, missing = (key_path, cert_path) if have_key else (cert_path, key_path)
            raise CAError(
                f"{present} exists but {missing} does not: restore {missing.name}, or remove "
                f"{present.name} to create a new root CA (every workload certificate will change)"
            )
        return cls.from_files(CAFiles.read(directory), trust_domain, clock)

    @classmethod
    def from_files(
        cls, files: CAFiles, trust_domain: str = DEFAULT_TRUST_DOMAIN, clock: Callable[[], float] = time.time
    ) -> FileCA:
        """The CA these files hold, checked: a private, matching, unexpired signing pair, and a
        bundle of whole CA certificates that holds the signing root; CAError naming the file."""
        check_trust_domain(trust_domain)
        key, certificate = _load_root(files, clock())
        return cls(files.directory, key, certificate, trust_domain, clock, _load_bundle(files, certificate))

    def issue(
        self, identity: Identity, public_key: CertificatePublicKeyTypes, lifetime: timedelta
    ) -> IssuedCertificate:
        """A leaf for `identity`: SAN = its SPIFFE ID only, server+client auth, ECDSA-SHA256."""
        if identity.trust_domain != self.trust_domain:
            raise IssueError(
                f"this CA issues for trust domain {self.trust_domain}, not for {identity}"
            )
        if lifetime <= timedelta(0):
            raise IssueError(f"certificate lifetime must be positive, got {lifetime}")
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(secrets.randbelow(2**SERIAL_BITS - 1) + 1)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, key_agreement=True), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        try:
            certificate = builder.sign(self._key, hashes.SHA256())
        except (TypeError, ValueError) as e:  # e.g. a public key type X.509 cannot carry
            raise IssueError(f"cannot sign a certificate for {identity}: {e}") from None
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self.root_pem
        return IssuedCertificate(certificate=certificate, chain_pem=chain)


def _key_usage(**usages: bool) -> x509.KeyUsage:
    """A KeyUsage with the named bits set and every other bit clear."""
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )
    return x509.KeyUsage(**{name: usages.get(name, False) for name in names})


def _authority_key_identifier(root: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI for leaves signed by `root`: its SKI when it has one (roots made elsewhere may not)."""
    try:
        ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = root.public_key()
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def new_root(trust_domain: str, now_s: float) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed ECDSA P-256 root for `trust_domain`, valid from `now_s` for ROOT_LIFETIME."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.fromtimestamp(now_s, timezone.utc)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"amesh root CA {trust_domain}"),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbelow(2**SERIAL_BITS - 1) + 1)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        # pathlen 0: this root signs workload leaves only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, the form ca.key holds."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_ca_files(directory: Path, files: Iterable[tuple[str, bytes]], remove: Iterable[str] = ()) -> None:
    """Writes `files` (name, bytes) into `directory` (made 0700 if absent), each 0600, then removes
    the names in `remove`: renames and removals happen in the order given, after every file is
    whole on disk, so a crash leaves the directory at a step boundary of the caller's choosing."""
    # mode applies only to directories we create; umask can only remove bits from 0700
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = [(_stage(directory / name, data), directory / name) for name, data in files]
    for temporary, final in staged:
        os.rename(temporary, final)
    for name in remove:
        (directory / name).unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames and removals themselves durable
    finally:
        os.close(dir_fd)


def _stage(path: Path, data: bytes) -> Path:
    """`data` written and synced to a new 0600 file next to `path`; returns the temporary name."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL with mode 0600: the file is private from its first byte, and never someone else's
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def _load_root(
    files: CAFiles, now_s: float
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, x509.Certificate]:
    """The signing key and certificate of the CA files, checked to be a private, usable, matching pair."""
    key_path = files.directory / CA_KEY_FILE
    if files.key_mode & 0o077:
        raise CAError(
            f"{key_path} is accessible by group or others (mode {files.key_mode:04o}); the root key "
            f"must be private: run chmod 600 {key_path}"
        )
    return load_signing_pair(files.key_pem, key_path, files.cert_pem, files.directory / CA_CERT_FILE, now_s)


def load_signing_pair(
    key_pem: bytes, key_path: Path, cert_pem: bytes, cert_path: Path, now_s: float
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, x509.Certificate]:
    """A root key and its CA certificate from PEM, checked to be usable, matching and unexpired;
    CAError naming the file at fault (the paths are only for the messages)."""
    certificate = load_ca_certificate(cert_pem, cert_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise CAError(f"{key_path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError(f"{key_path} holds a {type(key).__name__}; amesh signs with ECDSA or RSA keys")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise CAError(
            f"{key_path} does not belong to {cert_path} (their public keys differ): restore the "
            "matching pair, or remove both files to create a new root CA"
        )
    if certificate.not_valid_after_utc.timestamp() <= now_s:
        raise CAError(
            f"{cert_path} expired at {_iso(certificate.not_valid_after_utc)}: remove {key_path.name} "
            f"and {cert_path.name} to create a new root CA"
        )
    return key, certificate


def load_ca_certificate(pem: bytes, path: Path) -> x509.Certificate:
    """The one CA certificate in `pem` (the contents of `path`); CAError naming `path` otherwise."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise CAError(f"{path} is not a PEM certificate: {e}") from None
    _check_is_ca(certificate, str(path))
    return certificate


def load_roots(pem: bytes, path: Path) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM bundle (the contents of `path`), in order, duplicates dropped;
    CAError naming `path` for anything else in it, a certificate cut short, or no certificate."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CAError(f"{path} holds no PEM certificate: {e}") from None
    # The parser skips a block cut short at the end (a file caught half-written) without a word,
    # and text between blocks: every BEGIN must have given one whole certificate.
    blocks = pem.count(b"-----BEGIN ")
    if blocks != len(certificates) or pem.count(b"-----END ") != blocks:
        raise CAError(
            f"{path} has {blocks} PEM blocks but {len(certificates)} whole certificates: it is cut "
            "short or holds something else (a key?); it must hold only root CA certificates"
        )
    roots: dict[str, x509.Certificate] = {}
    for certificate in certificates:
        _check_is_ca(certificate, f"{path} ({certificate.subject.rfc4514_string()}, {fingerprint(certificate)})")
        roots.setdefault(fingerprint(certificate), certificate)
    return tuple(roots.values())


def _check_is_ca(certificate: x509.Certificate, what: str) -> None:
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAError(
            f"{what} is not a CA certificate (its BasicConstraints do not say CA:true), "
            "so peers would not accept certificates it signs"
        )


def _load_bundle(files: CAFiles, signing: x509.Certificate) -> tuple[x509.Certificate, ...]:
    """The roots of trust-bundle.pem, which must hold the signing root; (signing,) without the file."""
    if files.bundle_pem is None:
        return (signing,)
    path = files.directory / TRUST_BUNDLE_FILE
    roots = load_roots(files.bundle_pem, path)
    if fingerprint(signing) not in {fingerprint(root) for root in roots}:
        raise CAError(
            f"{path} does not hold the signing root {files.directory / CA_CERT_FILE} "
            f"({fingerprint(signing)}), so peers would refuse every certificate it signs: add "
            f"{CA_CERT_FILE} to it, or remove {path.name} to trust {CA_CERT_FILE} alone"
        )
    return roots


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peer_identity(cert_der: bytes | None, trust_domain: str) -> Identity:
    """The SPIFFE identity in the peer's leaf certificate, which must belong to `trust_domain`.

    Takes the DER that `SSLObject.getpeercert(binary_form=True)` returns. It does not validate the
    chain: the SSL context (CERT_REQUIRED, trusting only our root) has done that already.
    """
    if cert_der is None:
        raise IdentityError(
            "no_certificate",
            f"peer presented no certificate; one from trust domain {trust_domain} was expected",
        )
    try:
        certificate = x509.load_der_x509_certificate(cert_der)
    except ValueError as e:
        raise IdentityError("no_spiffe_id", f"peer certificate cannot be parsed ({e})") from None
    subject = certificate.subject.rfc4514_string() or "(empty subject)"
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        # An X.509-SVID carries exactly one URI SAN; with several, which one is the identity?
        found = "none" if not uris else ", ".join(uris)
        raise IdentityError(
            "no_spiffe_id",
            f"peer certificate ({subject}) must carry exactly one SPIFFE ID as URI SAN, found: {found}",
        )
    try:
        identity = Identity.parse(uris[0])
    except ValueError as e:
        raise IdentityError("no_spiffe_id", f"peer certificate ({subject}): {e}") from None
    if identity.trust_domain != trust_domain:
        raise IdentityError(
            "wrong_trust_domain",
            f"peer presented {identity} from trust domain {identity.trust_domain}, but trust "
            f"domain {trust_domain} was expected",
        )
    return identity


def workload_identity(workload: Workload, trust_domain: str) -> Identity:
    """The SPIFFE identity a workload runs as: its namespace and service account."""
    return Identity(trust_domain, workload.namespace, workload.service_account)


def expect_identity(peer: Identity, expected: Identity) -> None:
    """IdentityError("wrong_identity") unless the peer is exactly the workload we meant to reach."""
    if peer != expected:
        raise IdentityError("wrong_identity", f"peer presented {peer} but {expected} was expected")


@dataclass(frozen=True)
class WorkloadCredential:
    """One identity's certificate chain and key (PEM) and the trust bundle its contexts trust: what
    a ztunnel worker process builds its TLS contexts from, sent to it over the agent's private
    channel (agent/workers.py), never written to a file."""

    serial: str  # hex, as CertificateManager.serial: a new one on every issue
    chain_and_key_pem: bytes = field(repr=False)
    trust_bundle: bytes = field(repr=False)


@dataclass(frozen=True)
class _Held:
    """One successfully issued certificate and the TLS contexts built from it (they hold the key)."""

    issued: IssuedCertificate
    renew_at: float  # wall-clock seconds: half-way from issue to not_after
    root: str  # fingerprint of the root of the trust bundle the certificate's chain leads to
    trusts: tuple[str, ...]  # fingerprints of the roots the two contexts accept peers from
    server: ssl.SSLContext = field(repr=False)
    client: ssl.SSLContext = field(repr=False)
    credential: WorkloadCredential = field(repr=False)  # what the contexts were built from, for worker processes

    @property
    def not_after(self) -> float:
        return self.issued.certificate.not_valid_after_utc.timestamp()


@dataclass
class _Slot:
    """Everything the manager knows about one identity."""

    held: _Held | None = None  # None until the first issue succeeds
    due_at: float = -math.inf  # when to attempt the next issue (wall-clock seconds)
    failures: int = 0  # failed attempts since the last success; drives the backoff
    last_error: str | None = None


class CertificateManager:
    """Keys, certificates and mutual-TLS contexts for the identities this node serves, kept fresh.

    Each issue uses a new ECDSA P-256 key made here; the key goes into OpenSSL through a memfd
    and is kept only inside the two SSLContexts built from the certificate. Call the methods
    from the event loop's thread. With a RemoteIssuer the manager sends a CSR, and every issue
    happens in run(), in a worker thread: set_identities only makes the new identities due.
    """

    def __init__(
        self,
        issuer: Issuer | RemoteIssuer,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        lifetime: timedelta = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.time,
        retry_initial: float = 1.0,  # seconds before the first retry after a failed issue
        retry_max: float = 60.0,  # seconds: the backoff stops doubling here
        rng: random.Random | None = None,  # jitter source; tests pass a predictable one
    ) -> None:
        check_trust_domain(trust_domain)
        self._issuer = issuer
        self._trust_domain = trust_domain
        self._lifetime = lifetime
        self._clock = clock
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._rng = rng if rng is not None else random.Random()
        self._slots: dict[Identity, _Slot] = {}
        self._wake: asyncio.Event | None = None  # made by run(), on the loop that runs it
        self._remote = isinstance(issuer, RemoteIssuer)
        self._issuer_changes = 0  # set_issuer calls: an issue begun before one is renewed again
        self.issued_count = 0
        self.on_change: list[Callable[[], None]] = []  # told when a certificate is issued or dropped

    def credentials(self) -> dict[Identity, WorkloadCredential]:
        """The credential of every identity that holds a certificate now (key material: for the
        node's own worker processes only)."""
        return {identity: slot.held.credential for identity, slot in self._slots.items() if slot.held is not None}

    def _changed(self) -> None:
        for hook in self.on_change:
            hook()

    def __repr__(self) -> str:
        return f"CertificateManager(trust_domain={self._trust_domain!r}, identities={len(self._slots)})"

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def root_fingerprint(self) -> str:
        return self._issuer.root_fingerprint

    def set_issuer(self, issuer: Issuer | RemoteIssuer) -> None:
        """Issue from `issuer` from now on (a new signing root or trust bundle; the same remote
        issuer again once its bundle changed): every held certificate is renewed at once, so new
        connections present its chain and trust its bundle; live connections keep the TLS
        sessions they have."""
        self._issuer = issuer
        self._issuer_changes += 1
        for slot in self._slots.values():
            slot.due_at = -math.inf
        log.info(
            "cert.issuer_changed signing_root=%s trust_bundle=%s renewing=%d",
            issuer.root_fingerprint, ",".join(r["fingerprint"] for r in self.roots()), len(self._slots),
        )
        self._poke()

    def roots(self) -> list[dict[str, Any]]:
        """The roots of the issuer's trust bundle for people: fingerprint, subject, expiry, signing."""
        return [
            {
                "fingerprint": fingerprint(root),
                "subject": root.subject.rfc4514_string(),
                "not_after": _iso(root.not_valid_after_utc),
                "signing": fingerprint(root) == self._issuer.root_fingerprint,
            }
            for root in x509.load_pem_x509_certificates(self._issuer.trust_bundle)
        ]

    def set_identities(self, identities: Iterable[Identity]) -> None:
        """Hold certificates for exactly these identities: issue the new ones now, drop the rest."""
        wanted = set(identities)
        foreign = sorted(str(i) for i in wanted if i.trust_domain != self._trust_domain)
        if foreign:
            raise ValueError(
                f"identities outside trust domain {self._trust_domain}: {', '.join(foreign)}"
            )
        for identity in sorted(set(self._slots) - wanted, key=str):
            del self._slots[identity]
            log.info("cert.dropped identity=%s", identity)
            self._changed()
        for identity in sorted(wanted - set(self._slots), key=str):
            self._slots[identity] = _Slot()
            if not self._remote:  # a remote issuer's round trip waits for run()
                self.renew(identity)
        self._poke()

    def renew_now(self, identity: Identity) -> None:
        """Make `identity` due for renewal immediately; run() wakes up and renews it."""
        self._slot(identity).due_at = -math.inf
        self._poke()

    def renew_due(self, now: float) -> list[Identity]:
        """The identities whose certificate should be (re)issued at `now`."""
        return sorted((i for i, slot in self._slots.items() if slot.due_at <= now), key=str)

    def next_wakeup(self, now: float) -> float | None:
        """The wall-clock time of the next renewal (`now` if one is due); None with no identities."""
        if not self._slots:
            return None
        return max(now, min(slot.due_at for slot in self._slots.values()))

    def renew(self, identity: Identity) -> bool:
        """One attempt to issue a new key and certificate for `identity`; False (recorded) on failure."""
        slot = self._slot(identity)
        now = self._clock()
        try:
            held = self._issue(identity, now)
        # Any issuer failure, even an issuer bug, is recorded and retried: it must not stop the
        # renewal of other identities or end run().
        except Exception as e:
            return self._failed(identity, slot, now, e)
        return self._issued(identity, held, slot, now)

    async def renew_in_thread(self, identity: Identity) -> bool:
        """renew(), with the issuer called in a worker thread: a remote CA's round trip (or its
        timeout) never stalls the connections on the event loop."""
        slot = self._slot(identity)
        now = self._clock()
        changes = self._issuer_changes
        try:
            held = await asyncio.to_thread(self._issue, identity, now)
        except Exception as e:
            return self._failed(identity, slot, now, e)
        if self._slots.get(identity) is not slot:
            return False  # dropped (set_identities) while the CA was asked
        self._issued(identity, held, slot, now)
        if changes != self._issuer_changes:  # asked under the old bundle: its contexts may trust it
            self.renew_now(identity)
        return True

    async def renew_due_now(self) -> None:
        """Renews every identity due now: remote ones concurrently in worker threads."""
        due = self.renew_due(self._clock())
        if self._remote:
            await asyncio.gather(*(self.renew_in_thread(identity) for identity in due))
        else:
            for identity in due:
                self.renew(identity)

    def _failed(self, identity: Identity, slot: _Slot, now: float, error: Exception) -> bool:
        """Records a failed issue and schedules the retry (the certificate held keeps serving)."""
        slot.failures += 1
        slot.last_error = str(error) if isinstance(error, IssueError) else f"{type(error).__name__}: {error}"
        delay = self._retry_delay(slot.failures)
        slot.due_at = now + delay
        log.warning(
            "cert.issue_failed identity=%s failures=%d retry_in=%.1fs error=%r",
            identity, slot.failures, delay, slot.last_error,
            exc_info=not isinstance(error, IssueError),
        )
        return False

    def _issued(self, identity: Identity, held: _Held, slot: _Slot, now: float) -> bool:
        """Holds the new certificate; one from another root than the issuer's signing root (a
        cluster CA that has not yet taken the root its agents' bundle lists first, mid-rotation)
        serves, as its root is trusted, but is asked for again with backoff until that root signs."""
        signing = self._issuer.root_fingerprint
        if held.root == signing:
            self._slots[identity] = _Slot(held=held, due_at=held.renew_at)
        else:
            failures = slot.failures + 1
            delay = self._retry_delay(failures)
            error = (f"issued by root {held.root}, not by {signing}, the signing root of the trust bundle: "
                     f"asking again in {delay:.1f}s (the CA may not have taken the new root yet)")
            self._slots[identity] = _Slot(held=held, due_at=now + delay, failures=failures, last_error=error)
            log.warning("cert.issued_by_other_root identity=%s failures=%d error=%r", identity, failures, error)
        self.issued_count += 1
        log.info(
            "cert.issued identity=%s serial=%x not_after=%s",
            identity,
            held.issued.certificate.serial_number,
            _iso(held.issued.certificate.not_valid_after_utc),
        )
        self._changed()
        return True

    def _issue(self, identity: Identity, now: float) -> _Held:
        key = ec.generate_private_key(ec.SECP256R1())
        if isinstance(self._issuer, RemoteIssuer):
            issued = self._issuer.issue_request(identity, signing_request(identity, key), self._lifetime)
        else:
            issued = self._issuer.issue(identity, key.public_key(), self._lifetime)
        not_after = issued.certificate.not_valid_after_utc.timestamp()
        if not_after <= now:  # would make the half-life below lie in the past: renewal in a loop
            raise IssueError(
                f"issuer returned a certificate for {identity} that expired at "
                f"{_iso(issued.certificate.not_valid_after_utc)}"
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        bundle = self._issuer.trust_bundle
        roots = x509.load_pem_x509_certificates(bundle)
        root = _issuing_root(issued.chain_pem, roots)
        if root is None:  # peers trusting only the bundle would refuse it: keep the one we have
            raise IssueError(
                f"issuer returned a certificate for {identity} whose chain leads to none of the "
                f"roots of its trust bundle ({', '.join(fingerprint(r) for r in roots)})"
            )
        # Half-life from when we received it rather than from not_before: issuers backdate
        # not_before for clock skew, which for short lifetimes would put the half-life in the past.
        return _Held(
            issued=issued,
            renew_at=now + (not_after - now) / 2,
            root=fingerprint(root),
            trusts=tuple(fingerprint(r) for r in roots),
            server=_tls_context(True, bundle, issued.chain_pem + key_pem),
            client=_tls_context(False, bundle, issued.chain_pem + key_pem),
            credential=WorkloadCredential(f"{issued.certificate.serial_number:x}", issued.chain_pem + key_pem, bundle),
        )

    def _retry_delay(self, failures: int) -> float:
        """Seconds before retry number `failures`: doubling from retry_initial, capped, jittered."""
        # Jitter after the cap: agents stuck at the cap would otherwise retry in lockstep.
        delay = min(self._retry_max, self._retry_initial * 2 ** (failures - 1))
        return delay * self._rng.uniform(*JITTER)

    def server_context(self, identity: Identity) -> ssl.SSLContext:
        """The context for accepting mTLS as `identity` (client certificates required)."""
        return self._held(identity).server

    def client_context(self, identity: Identity) -> ssl.SSLContext:
        """The context for connecting with mTLS as `identity` (pass server_hostname=None)."""
        return self._held(identity).client

    def serial(self, identity: Identity) -> str:
        """The serial (hex) of the certificate held for `identity` now; it changes on renewal."""
        return f"{self._held(identity).issued.certificate.serial_number:x}"

    def certificates(self, now: float | None = None) -> list[dict[str, Any]]:
        """One JSON-ready summary per identity, sorted by identity; no key material."""
        now = self._clock() if now is None else now
        rows = []
        for identity, slot in sorted(self._slots.items(), key=lambda item: str(item[0])):
            held = slot.held
            certificate = held.issued.certificate if held else None
            rows.append({
                "identity": identity.uri,
                "serial": f"{certificate.serial_number:x}" if certificate else None,
                "not_before": _iso(certificate.not_valid_before_utc) if certificate else None,
                "not_after": _iso(certificate.not_valid_after_utc) if certificate else None,
                "state": _state(slot, now),
                "root": held.root if held else None,
                "trusts": list(held.trusts) if held else [],
                "issue_failures": slot.failures,
                "last_error": slot.last_error,
            })
        return rows

    async def run(self) -> None:
        """Renew certificates as they come due, forever; cancel the task to stop."""
        self._wake = asyncio.Event()
        try:
            while True:
                await self.renew_due_now()
                # Cleared only now: pokes made while renewing were just served by the loop above.
                self._wake.clear()
                wake_at = self.next_wakeup(self._clock())
                timeout = MAX_SLEEP if wake_at is None else min(MAX_SLEEP, wake_at - self._clock())
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, timeout))
                except TimeoutError:
                    pass
        finally:
            self._wake = None

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _slot(self, identity: Identity) -> _Slot:
        slot = self._slots.get(identity)
        if slot is None:
            raise KeyError(f"no certificate is held for {identity}: it is not among the identities set")
        return slot

    def _held(self, identity: Identity) -> _Held:
        slot = self._slot(identity)
        if slot.held is None:
            raise IssueError(f"no certificate for {identity} yet: {slot.last_error}")
        return slot.held


class CredentialReplica:
    """A ztunnel worker process's copy of the node's credentials: the part of CertificateManager
    its listeners use (trust_domain, server_context, client_context, serial), kept as the agent
    sends `WorkloadCredential`s; it issues nothing and holds no CA."""

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain
        self._held: dict[Identity, tuple[WorkloadCredential, ssl.SSLContext, ssl.SSLContext]] = {}

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def update(self, credentials: dict[Identity, WorkloadCredential]) -> None:
        """Holds exactly `credentials`: contexts are built for the new or renewed ones only."""
        held = {}
        for identity, credential in credentials.items():
            kept = self._held.get(identity)
            if kept is not None and kept[0] == credential:
                held[identity] = kept
            else:
                held[identity] = (credential, _tls_context(True, credential.trust_bundle, credential.chain_and_key_pem),
                                  _tls_context(False, credential.trust_bundle, credential.chain_and_key_pem))
        self._held = held

    def _entry(self, identity: Identity) -> tuple[WorkloadCredential, ssl.SSLContext, ssl.SSLContext]:
        entry = self._held.get(identity)
        if entry is None:
            raise IssueError(f"no certificate for {identity} in this worker process yet: the agent has sent none")
        return entry

    def server_context(self, identity: Identity) -> ssl.SSLContext:
        """The context for accepting mTLS as `identity` (client certificates required)."""
        return self._entry(identity)[1]

    def client_context(self, identity: Identity) -> ssl.SSLContext:
        """The context for connecting with mTLS as `identity` (pass server_hostname=None)."""
        return self._entry(identity)[2]

    def serial(self, identity: Identity) -> str:
        """The serial (hex) of the certificate held for `identity` now; it changes on renewal."""
        return self._entry(identity)[0].serial


def _state(slot: _Slot, now: float) -> str:
    """For people: pending (never issued), expired, renewing (due or retrying) or valid."""
    if slot.held is None:
        return "pending"
    if now >= slot.held.not_after:
        return "expired"
    if now >= slot.due_at or slot.failures:
        return "renewing"
    return "valid"


def _issuing_root(chain_pem: bytes, roots: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The root among `roots` that a chain (leaf first) leads to: its last certificate is that
    root, or was signed by it; None when no root fits."""
    last = x509.load_pem_x509_certificates(chain_pem)[-1]
    for root in roots:
        if root == last:
            return root
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):  # another issuer, key type or signature
            continue
        return root
    return None


def _tls_context(server_side: bool, trust_bundle: bytes, chain_and_key_pem: bytes) -> ssl.SSLContext:
    """A mutual-TLS 1.3 context speaking h2 that trusts only the roots in `trust_bundle`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    # Peers are identified by the SPIFFE ID in their certificate (peer_identity), not a hostname.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED  # on the server side: a client certificate is required
    context.load_verify_locations(cadata=trust_bundle.decode("ascii"))
    load_chain_and_key(context, chain_and_key_pem)
    return context


def load_chain_and_key(context: ssl.SSLContext, chain_and_key_pem: bytes) -> None:
    """Loads a certificate chain and its key into `context` without writing the key to disk."""
    # ssl can only load a key from a path; an anonymous memory file keeps the key off the disk.
    fd = os.memfd_create("amesh-workload-cert", os.MFD_CLOEXEC)
    try:
        view = memoryview(chain_and_key_pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
