"""Unit tests for registry/kubeclient.py: kubeconfig forms, credentials, and TLS against a real
HTTPS server on loopback that checks the client's certificate."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import os
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from registry.kubeclient import ConfigError, KubeClient, load_configuration


def kubeconfig(path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def authorization(path: Path) -> str | None:
    return asyncio.run(load_configuration(str(path)).credentials.authorization())


def test_token_basic_and_token_file_users(tmp_path: Path) -> None:
    assert authorization(kubeconfig(tmp_path / "a", "http://h", {"token": "abc"})) == "Bearer abc"
    assert authorization(kubeconfig(tmp_path / "b", "http://h", {"username": "me", "password": "pw"})) == \
        f"Basic {base64.b64encode(b'me:pw').decode()}"
    (tmp_path / "tok").write_text("from-file\n")
    assert authorization(kubeconfig(tmp_path / "c", "http://h", {"tokenFile": "tok"})) == "Bearer from-file"
    assert authorization(kubeconfig(tmp_path / "d", "http://h", {})) is None


def test_relative_files_are_read_from_the_kubeconfigs_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = kubeconfig(tmp_path / "sub" / "config", "https://h:6443/", {"client-certificate": "c.crt",
                                                                      "client-key": "c.key"},
                      {"certificate-authority": "ca.crt"})
    conf = load_configuration(None, environ={"KUBECONFIG": str(path)})
    assert conf.host == "https://h:6443"
    assert conf.ca_file == str(tmp_path / "sub" / "ca.crt")
    assert conf.client_certificate is not None and conf.client_certificate.key == str(tmp_path / "sub" / "c.key")


def test_several_kubeconfig_files_merge_the_first_naming_an_entry_wins(tmp_path: Path) -> None:
    first = kubeconfig(tmp_path / "first", "http://first", {"token": "one"})
    second = kubeconfig(tmp_path / "second", "http://second", {"token": "two"})
    conf = load_configuration(f"{tmp_path / 'missing'}{os.pathsep}{first}{os.pathsep}{second}")
    assert conf.host == "http://first"


@pytest.mark.parametrize(("user", "context", "message"), [
    ({"auth-provider": {"name": "oidc"}}, None, "auth-provider plugin 'oidc', which amesh does not run"),
    ({"client-certificate-data": "eA=="}, None, "a client certificate without its key"),
    ({"token": "t"}, "other", "has no context 'other'"),
])
def test_unusable_kubeconfigs_say_what_is_wrong(tmp_path: Path, user: dict[str, Any], context: str | None,
                                                message: str) -> None:
    path = kubeconfig(tmp_path / "config", "http://h", user)
    with pytest.raises(ConfigError, match=message):
        load_configuration(str(path), context)


def test_a_missing_kubeconfig_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"the kubeconfig {tmp_path}/nope cannot be read"):
        load_configuration(str(tmp_path / "nope"))


def test_exec_plugin_token_is_asked_for_again_when_it_expires_or_is_refused(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(f"""import json, os, sys
calls = {str(calls)!r}
n = len(open(calls).read()) if os.path.exists(calls) else 0
open(calls, "a").write("x")
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
expiry = "2000-01-01T00:00:00Z" if n == 0 else "2999-01-01T00:00:00Z"
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                  "status": {{"token": f"{{os.environ['PREFIX']}}-{{n}}", "expirationTimestamp": expiry}}}}))
""")
    path = kubeconfig(tmp_path / "config", "http://h", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(plugin)],
        "env": [{"name": "PREFIX", "value": "tok"}]}})
    credentials = load_configuration(str(path)).credentials

    async def main() -> None:
        assert await credentials.authorization() == "Bearer tok-0"  # already expired: asked again next time
        assert await credentials.authorization() == "Bearer tok-1"
        assert await credentials.authorization() == "Bearer tok-1"  # good until 2999
        credentials.rejected()  # the server answered 401
        assert await credentials.authorization() == "Bearer tok-2"

    asyncio.run(main())


def test_a_failing_exec_plugin_is_named_with_its_output(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", "http://h", {"exec": {
        "command": sys.executable, "args": ["-c", "import sys; sys.exit('login required')"]}})
    with pytest.raises(ConfigError, match="exited with 1: login required"):
        asyncio.run(load_configuration(str(path)).credentials.authorization())


# --- TLS against a real server ---


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey],
                 ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("kube.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer[1], hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA and the server's and the client's certificates and keys, as files."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {"ca.crt": _pem(_certificate("test-ca", ca_key, ("test-ca", ca_key), ca=True)),
             "server.crt": _pem(_certificate("kube-apiserver", server_key, ("test-ca", ca_key))),
             "server.key": _key_pem(server_key),
             "client.crt": _pem(_certificate("amesh-agent", client_key, ("test-ca", ca_key))),
             "client.key": _key_pem(client_key)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


async def _serve_tls(pki: dict[str, Path]) -> tuple[web.AppRunner, int]:
    """An HTTPS server that requires a client certificate from the CA and answers who called."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.crt"]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(pki["server.crt"], pki["server.key"])

    async def whoami(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert")  # type: ignore[union-attr]
        subject = dict(item[0] for item in peer["subject"])
        return web.json_response({"cn": subject["commonName"], "authorization": request.headers.get("Authorization"),
                                  "limit": request.query.get("limit")})

    app = web.Application()
    app.router.add_get("/api/v1/whoami", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]


def _call(path: Path, pki: dict[str, Path]) -> dict[str, Any]:
    """What the server saw of a request made with the kubeconfig at `path` (its server's port: PORT)."""
    async def main() -> dict[str, Any]:
        runner, port = await _serve_tls(pki)
        try:
            live = path.with_name(f"{path.name}-{port}")
            live.write_text(path.read_text().replace("PORT", str(port)))
            async with KubeClient(load_configuration(str(live))) as client:
                status, body = await client.request("GET", "/api/v1/whoami", {"limit": "5"}, timeout=5)
            assert status == 200, body
            return json.loads(body)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_client_certificate_and_ca_as_data_over_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    def data(name: str) -> str:
        return base64.b64encode(pki[name].read_bytes()).decode()
    path = kubeconfig(tmp_path / "config", "https://127.0.0.1:PORT",
                      {"client-certificate-data": data("client.crt"), "client-key-data": data("client.key"),
                       "token": "also-a-token"}, {"certificate-authority-data": data("ca.crt")})
    assert _call(path, pki) == {"cn": "amesh-agent", "authorization": "Bearer also-a-token", "limit": "5"}
    # the key was written for ssl to load it and removed: nothing left behind in the temporary directory
    assert not list(Path(tempfile.gettempdir()).glob("amesh-kube-*"))


def test_client_certificate_files_and_tls_server_name(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = kubeconfig(tmp_path / "config", "https://127.0.0.1:PORT",
                      {"client-certificate": str(pki["client.crt"]), "client-key": str(pki["client.key"])},
                      {"certificate-authority": str(pki["ca.crt"]), "tls-server-name": "kube.test"})
    assert _call(path, pki)["cn"] == "amesh-agent"
    path.write_text(path.read_text().replace("kube.test", "wrong.test"))  # checked for that name, not the IP
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        _call(path, pki)


def test_a_server_certificate_from_another_ca_is_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    other = tmp_path / "other-ca.crt"
    key = ec.generate_private_key(ec.SECP256R1())
    other.write_bytes(_pem(_certificate("other", key, ("other", key), ca=True)))
    path = kubeconfig(tmp_path / "config", "https://127.0.0.1:PORT",
                      {"client-certificate": str(pki["client.crt"]), "client-key": str(pki["client.key"])},
                      {"certificate-authority": str(other)})
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        _call(path, pki)


def test_insecure_skip_tls_verify(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = kubeconfig(tmp_path / "config", "https://127.0.0.1:PORT",
                      {"client-certificate": str(pki["client.crt"]), "client-key": str(pki["client.key"])},
                      {"insecure-skip-tls-verify": True})
    assert _call(path, pki)["cn"] == "amesh-agent"


def test_requests_go_through_the_clusters_proxy_url(tmp_path: Path) -> None:
    """proxy-url: the request reaches the proxy, asked for the API server's URL (which does not resolve)."""
    async def main() -> dict[str, Any]:
        async def proxy(request: web.Request) -> web.Response:
            return web.json_response({"url": str(request.url)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            path = kubeconfig(tmp_path / "config", "http://kube.invalid:6443", {"token": "t"},
                              {"proxy-url": f"http://127.0.0.1:{runner.addresses[0][1]}"})
            async with KubeClient(load_configuration(str(path))) as client:
                status, body = await client.request("GET", "/api/v1/pods", timeout=5)
            assert status == 200, body
            return json.loads(body)
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == {"url": "http://kube.invalid:6443/api/v1/pods"}
