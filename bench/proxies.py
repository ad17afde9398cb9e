"""The mTLS proxies amesh is compared with: an stunnel4 pair and an HAProxy pair on a test bed.

Each pair is a client-side proxy in the client pod (plaintext on 127.0.0.1, the application
connects there) and a server-side proxy in the server pod (TLS on the pod's address, plaintext
to the application on 127.0.0.1). Both sides present ECDSA P-256 certificates from one
throwaway CA, require and verify the peer's, and speak TLS 1.3 only: the same security
properties as amesh's HBONE hop, without the HTTP/2 tunnel or the capture.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.bed import Bed, Pod

LIFETIME = timedelta(days=1)  # the certificates live for one benchmark run


@dataclass(frozen=True)
class Forward:
    """One forwarded port: the client app connects to 127.0.0.1:local in the client pod, the
    server-side proxy accepts TLS on `tls` and connects to 127.0.0.1:target in the server pod."""

    local: int
    tls: int
    target: int


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certificates(directory: Path, server_ip: str) -> dict[str, Path]:
    """A CA and two leaves (server with the server pod's IP in its SAN, client): ECDSA P-256.

    Returns paths {"ca", "server", "client"}; each leaf file holds certificate then key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("bench CA")).issuer_name(_name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, san, usage in (("server", x509.IPAddress(ipaddress.ip_address(server_ip)), ExtendedKeyUsageOID.SERVER_AUTH),
                             ("client", x509.DNSName("client.bench"), ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(f"bench {role}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[role] = directory / f"{role}.pem"
        paths[role].write_bytes(_pem(key, cert))
        paths[role].chmod(0o600)
    return paths


def stunnel_config(side: str, forwards: list[Forward], server_ip: str, certs: dict[str, Path]) -> str:
    """stunnel.conf for the "client" or "server" side of the pair."""
    lines = ["foreground = yes", "pid =", "debug = warning",
             # Nagle off on both legs, as amesh's ztunnel and HAProxy do
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1", ""]
    for f in forwards:
        lines += [f"[p{f.target}]", f"cert = {certs[side]}", f"CAfile = {certs['ca']}",
                  "verifyChain = yes", "sslVersionMin = TLSv1.3"]
        if side == "client":
            lines += ["client = yes", f"accept = 127.0.0.1:{f.local}", f"connect = {server_ip}:{f.tls}"]
        else:
            lines += ["requireCert = yes", f"accept = 0.0.0.0:{f.tls}", f"connect = 127.0.0.1:{f.target}"]
        lines.append("")
    return "\n".join(lines)


def haproxy_config(side: str, forwards: list[Forward], server_ip: str, certs: dict[str, Path]) -> str:
    """haproxy.cfg (mode tcp) for the "client" or "server" side of the pair."""
    tls = f"ssl crt {certs[side]} ca-file {certs['ca']} verify required ssl-min-ver TLSv1.3"
    lines = ["global", "    maxconn 4096", "",
             "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h",
             "    timeout server 1h", ""]
    for f in forwards:
        if side == "client":
            bind, server = f"127.0.0.1:{f.local}", f"{server_ip}:{f.tls} {tls}"
        else:
            bind, server = f"0.0.0.0:{f.tls} {tls}", f"127.0.0.1:{f.target}"
        lines += [f"listen p{f.target}", f"    bind {bind}", f"    server upstream {server}", ""]
    return "\n".join(lines)


def start_pair(bed: Bed, kind: str, client: Pod, server: Pod, forwards: list[Forward],
               certs: dict[str, Path]) -> list[subprocess.Popen]:
    """Starts the `kind` ("stunnel" or "haproxy") pair; returns [client side, server side] once both listen."""
    procs = []
    for side, pod in (("server", server), ("client", client)):
        config = bed.logdir / f"{kind}-{side}.conf"
        if kind == "stunnel":
            config.write_text(stunnel_config(side, forwards, server.ip, certs))
            argv = ["stunnel4", str(config)]
        else:
            config.write_text(haproxy_config(side, forwards, server.ip, certs))
            argv = ["haproxy", "-db", "-f", str(config)]
        proc = bed.spawn(pod, argv, bed.logdir / f"{kind}-{side}.log")
        for f in forwards:
            bed.wait_listening(pod, f.local if side == "client" else f.tls, timeout=10, proc=proc)
        procs.append(proc)
    return procs[::-1]
