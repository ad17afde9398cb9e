"""A small Kubernetes API client over aiohttp: configuration, authentication, TLS and requests.

What the agent's list/watch (registry/kubernetes.py) and the cluster CA's TokenReview need, and
no more: `load_configuration` reads a kubeconfig (server, certificate-authority[-data],
insecure-skip-tls-verify, tls-server-name, proxy-url; a user's token, tokenFile, client-certificate[-data]
and client-key[-data], username/password, or an exec credential plugin) or the in-cluster
service account (KUBERNETES_SERVICE_HOST/PORT, the token and ca.crt the pod has mounted), and
`KubeClient` makes the requests, JSON in and out. It replaces kubernetes_asyncio in those
processes: its client package imports all of its ~850 generated API and model modules (33 MiB of
an idle agent's memory) for the three calls amesh makes, whose answers amesh reads as raw JSON.

Credentials are looked at before each request: a token file (the in-cluster one, which kubelet
rotates by swapping a symlink) is read again whenever it changed, an exec plugin runs again when
its credential expires or the server answered 401. Not supported: the auth-provider plugins
(gcp, azure, oidc), which kubectl itself dropped in 1.26 for exec plugins, and exec plugins that
answer with a client certificate instead of a token: either gets an error naming the user.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

import aiohttp
import yaml

log = logging.getLogger("amesh.registry")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# bytes; the longest line (one watch event) a response may carry: etcd stores objects up to 1.5 MiB
READ_BUFFER = 1024 * 1024  # aiohttp allows lines of twice its read buffer
EXEC_TIMEOUT = 60.0  # seconds an exec credential plugin may take
EXEC_EARLY = 10.0  # seconds before its expiry an exec credential is asked for again


class ConfigError(Exception):
    """The kubeconfig or in-cluster configuration cannot be used; the message says which file and field."""


class Credentials(Protocol):
    """Where a request's Authorization header comes from."""

    async def authorization(self) -> str | None:
        """The header's value for the next request, or None to send none."""

    def rejected(self) -> None:
        """The server answered 401: the next request asks for a fresh credential."""


class NoCredentials:
    """Anonymous requests (a kubeconfig user with nothing, or one that authenticates by certificate only)."""

    async def authorization(self) -> str | None:
        return None

    def rejected(self) -> None:
        pass


@dataclass(frozen=True)
class StaticCredentials:
    """A header given once: a kubeconfig's token or username and password."""

    header: str

    async def authorization(self) -> str | None:
        return self.header

    def rejected(self) -> None:
        pass


class TokenFile:
    """A bearer token in a file, read again whenever the file changes (kubelet rotates a projected token)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._header: str | None = None

    async def authorization(self) -> str | None:
        self.refresh()
        return self._header

    def rejected(self) -> None:
        self._version = None  # read it again, changed or not

    def refresh(self) -> str | None:
        """The header from the file as it is now; the one before while the file cannot be read or is empty."""
        try:
            st = os.stat(self.path)  # follows the ..data symlink kubelet swaps
        except OSError as e:
            log.warning("event=k8s_token_unreadable path=%s error=%r", self.path, str(e))
            return self._header  # keep the token we have
        version = (st.st_mtime_ns, st.st_size, st.st_ino)
        if version == self._version:
            return self._header
        try:
            token = Path(self.path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("event=k8s_token_unreadable path=%s error=%r", self.path, str(e))
            return self._header
        if not token:
            return self._header  # caught mid-write; the next request looks again
        if self._header is not None:
            log.info("event=k8s_token_reloaded path=%s", self.path)
        self._version = version
        self._header = f"Bearer {token}"
        return self._header


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate and key, as files or as PEM text (a kubeconfig's *-data fields)."""

    certificate: str
    key: str
    as_data: bool = False


class ExecPlugin:
    """A kubeconfig exec credential plugin (client.authentication.k8s.io ExecCredential): its
    token, run again before it expires or after a 401."""

    def __init__(self, spec: Mapping[str, Any], user: str, base: Path) -> None:
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise ConfigError(f"kubeconfig user {user!r}: exec.command: required")
        if "/" in command and not os.path.isabs(command):
            command = str(base / command)  # relative to the kubeconfig, as kubectl resolves it
        self.argv = [command, *(str(a) for a in spec.get("args") or ())]
        try:
            self.env = {str(e["name"]): str(e["value"]) for e in spec.get("env") or ()}
        except (KeyError, TypeError):
            raise ConfigError(f"kubeconfig user {user!r}: exec.env: each entry needs a name and a value") from None
        self.api_version = str(spec.get("apiVersion") or "client.authentication.k8s.io/v1")
        self.user = user
        self._header: str | None = None
        self._expires = 0.0  # Unix seconds; 0: ask the plugin at the next request
        self._lock = asyncio.Lock()

    async def authorization(self) -> str | None:
        async with self._lock:
            if self._header is None or time.time() >= self._expires - EXEC_EARLY:
                self._header, self._expires = await self._run()
        return self._header

    def rejected(self) -> None:
        self._expires = 0.0

    async def _run(self) -> tuple[str, float]:
        request = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(request)}
        try:
            process = await asyncio.create_subprocess_exec(*self.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                           stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise ConfigError(f"kubeconfig user {self.user!r}: the exec plugin {self.argv[0]} could not run: "
                              f"{e.strerror or e}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), EXEC_TIMEOUT)
        except BaseException as e:  # timed out, or cancelled: the plugin is not left behind
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(e, asyncio.TimeoutError):
                raise ConfigError(f"kubeconfig user {self.user!r}: the exec plugin {self.argv[0]} did not answer "
                                  f"within {EXEC_TIMEOUT:g} s") from None
            raise
        if process.returncode != 0:
            raise ConfigError(f"kubeconfig user {self.user!r}: the exec plugin {self.argv[0]} exited with "
                              f"{process.returncode}: {err.decode(errors='replace').strip()[:300]}")
        try:
            status = json.loads(out)["status"]
            token, expires = status["token"], status.get("expirationTimestamp")
            until = _parse_time(expires) if expires else float("inf")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"kubeconfig user {self.user!r}: the exec plugin {self.argv[0]} printed no "
                              "ExecCredential with status.token and a readable expirationTimestamp (amesh takes a "
                              "token from exec plugins, not a client certificate)") from None
        return f"Bearer {token}", until


def _parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to talk to it."""

    host: str  # "https://10.96.0.1:443"
    credentials: Credentials
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    client_certificate: ClientCertificate | None = None
    verify: bool = True  # False: insecure-skip-tls-verify
    server_name: str | None = None  # tls-server-name: the name to check the server's certificate for
    proxy: str | None = None  # proxy-url: an HTTP proxy the requests go through (CONNECT for https)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings for an https host (None for http); ConfigError when a file is unusable."""
        if not self.host.startswith("https:"):
            return None
        context = ssl.create_default_context()
        try:
            if self.ca_file or self.ca_data:
                context.load_verify_locations(cafile=self.ca_file, cadata=self.ca_data)
            if self.client_certificate is not None:
                _load_client_certificate(context, self.client_certificate)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError(f"the TLS settings for the Kubernetes API server {self.host} cannot be loaded "
                              f"(certificate authority {self.ca_file or 'data'}): {e}") from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _load_client_certificate(context: ssl.SSLContext, cert: ClientCertificate) -> None:
    if not cert.as_data:
        context.load_cert_chain(cert.certificate, cert.key)
        return
    # ssl loads a chain from files only: a private directory for the moment it takes
    with tempfile.TemporaryDirectory(prefix="amesh-kube-") as directory:
        paths = []
        for name, pem in (("client.crt", cert.certificate), ("client.key", cert.key)):
            path = os.path.join(directory, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
                f.write(pem)
            paths.append(path)
        context.load_cert_chain(*paths)


def in_cluster(environ: Mapping[str, str] = os.environ, sa_dir: str = SERVICE_ACCOUNT_DIR) -> bool:
    """True when running in a pod: the API service address is set and a token is mounted."""
    return bool(environ.get("KUBERNETES_SERVICE_HOST")) and os.path.isfile(f"{sa_dir}/token")


def load_configuration(kubeconfig: str | None = None, context: str | None = None,
                       environ: Mapping[str, str] = os.environ, sa_dir: str = SERVICE_ACCOUNT_DIR) -> ClusterConfig:
    """In-cluster in a pod when no kubeconfig is given (nor KUBECONFIG), else the kubeconfig
    (KUBECONFIG may list several files, merged as kubectl does: the first to name an entry wins)."""
    paths = kubeconfig or environ.get("KUBECONFIG")
    if not paths and in_cluster(environ, sa_dir):
        config = _in_cluster(environ, sa_dir)
        log.info("event=k8s_config mode=in-cluster server=%s", config.host)
        return config
    files = [p for p in (paths or os.path.expanduser("~/.kube/config")).split(os.pathsep) if p]
    config = _kubeconfig(files, context)
    log.info("event=k8s_config mode=kubeconfig path=%s server=%s", os.pathsep.join(files), config.host)
    return config


def _in_cluster(environ: Mapping[str, str], sa_dir: str) -> ClusterConfig:
    host, port = environ["KUBERNETES_SERVICE_HOST"], environ.get("KUBERNETES_SERVICE_PORT", "")
    if not port:
        raise ConfigError("KUBERNETES_SERVICE_HOST is set but KUBERNETES_SERVICE_PORT is not: the pod's API "
                          "service environment is incomplete")
    token = TokenFile(f"{sa_dir}/token")
    if token.refresh() is None:
        raise ConfigError(f"the service-account token {sa_dir}/token is empty or unreadable")
    ca = f"{sa_dir}/ca.crt"
    if not os.path.isfile(ca):
        raise ConfigError(f"the service account's certificate authority {ca} is missing")
    return ClusterConfig(f"https://{f'[{host}]' if ':' in host else host}:{port}", token, ca_file=ca)


def _kubeconfig(files: list[str], context_name: str | None) -> ClusterConfig:
    merged: dict[str, dict[str, Any]] = {"clusters": {}, "users": {}, "contexts": {}}
    current: str | None = None
    base: dict[tuple[str, str], Path] = {}  # (section, name) -> the directory relative paths start from
    for file in files:
        try:
            document = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
        except OSError as e:
            if len(files) > 1 and isinstance(e, FileNotFoundError):
                continue  # kubectl skips the missing files of a KUBECONFIG list
            raise ConfigError(f"the kubeconfig {file} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"the kubeconfig {file} is not valid YAML: {e}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"the kubeconfig {file} is not a mapping")
        current = current or document.get("current-context") or None
        for section in merged:
            for entry in document.get(section) or ():
                name = entry.get("name") if isinstance(entry, dict) else None
                if isinstance(name, str) and name not in merged[section]:
                    merged[section][name] = entry.get(section[:-1]) or {}
                    base[(section, name)] = Path(file).resolve().parent
    where = ", ".join(files)
    name = context_name or current
    if not name:
        raise ConfigError(f"the kubeconfig {where} sets no current-context: name one (--context) or set it "
                          "with `kubectl config use-context`")
    context = merged["contexts"].get(name)
    if context is None:
        raise ConfigError(f"the kubeconfig {where} has no context {name!r}")
    cluster_name, user_name = context.get("cluster"), context.get("user")
    cluster = merged["clusters"].get(cluster_name)
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"the kubeconfig {where}: context {name!r} names cluster {cluster_name!r}, which has no "
                          "server")
    user = merged["users"].get(user_name, {}) if user_name else {}
    cluster_dir = base[("clusters", cluster_name)]
    user_dir = base.get(("users", user_name), cluster_dir)
    return ClusterConfig(
        host=str(cluster["server"]).rstrip("/"),
        credentials=_credentials(user, str(user_name), user_dir),
        ca_file=_path(cluster.get("certificate-authority"), cluster_dir),
        ca_data=_data(cluster.get("certificate-authority-data"), f"cluster {cluster_name!r}"),
        client_certificate=_client_certificate(user, str(user_name), user_dir),
        verify=not cluster.get("insecure-skip-tls-verify", False),
        server_name=cluster.get("tls-server-name") or None,
        proxy=cluster.get("proxy-url") or None,
    )


def _credentials(user: Mapping[str, Any], name: str, base: Path) -> Credentials:
    if "auth-provider" in user:
        provider = (user["auth-provider"] or {}).get("name", "?")
        raise ConfigError(f"kubeconfig user {name!r} authenticates with the auth-provider plugin {provider!r}, "
                          "which amesh does not run (kubectl dropped auth-provider in 1.26): use an exec plugin "
                          "(e.g. kubelogin for OIDC) or a token")
    if user.get("exec"):
        return ExecPlugin(user["exec"], name, base)
    if user.get("token"):
        return StaticCredentials(f"Bearer {user['token']}")
    if user.get("tokenFile"):
        return TokenFile(str(_path(user["tokenFile"], base)))
    if user.get("username") is not None and user.get("password") is not None:
        basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
        return StaticCredentials(f"Basic {basic}")
    return NoCredentials()


def _client_certificate(user: Mapping[str, Any], name: str, base: Path) -> ClientCertificate | None:
    data = _data(user.get("client-certificate-data"), f"user {name!r}"), _data(user.get("client-key-data"),
                                                                                f"user {name!r}")
    files = _path(user.get("client-certificate"), base), _path(user.get("client-key"), base)
    if data[0] and data[1]:
        return ClientCertificate(data[0], data[1], as_data=True)
    if files[0] and files[1]:
        return ClientCertificate(files[0], files[1])
    if any(data) or any(files):
        raise ConfigError(f"kubeconfig user {name!r} gives a client certificate without its key, or a key "
                          "without its certificate")
    return None


def _path(value: Any, base: Path) -> str | None:
    """A file a kubeconfig names; relative to the kubeconfig's own directory, as kubectl reads it."""
    return str(base / os.path.expanduser(str(value))) if value else None


def _data(value: Any, owner: str) -> str | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except ValueError:
        raise ConfigError(f"kubeconfig {owner}: a *-data field is not base64 PEM") from None


class KubeClient:
    """Requests to one API server: one aiohttp session, credentials and TLS from a ClusterConfig."""

    def __init__(self, config: ClusterConfig, connect_timeout: float = 10.0) -> None:
        self.config = config
        self.connect_timeout = connect_timeout  # seconds
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        context = self.config.ssl_context()
        connector = aiohttp.TCPConnector(ssl=context if context is not None else False)
        self._session = aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFFER,
                                              headers={"Accept": "application/json",
                                                       "User-Agent": "amesh"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None, *,
                      body: Any = None, timeout: float = 60.0) -> tuple[int, bytes]:
        """One request answered whole: its status and body (`body`, when given, sent as JSON)."""
        data = json.dumps(body).encode() if body is not None else None
        async with self.open(method, path, params, data=data,
                             timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout)) as response:
            return response.status, await response.read()

    def stream(self, path: str, params: Mapping[str, str], read_timeout: float) -> Any:
        """A GET whose body is read as it comes (a watch): an async context manager of the response."""
        return self.open("GET", path, params, timeout=aiohttp.ClientTimeout(sock_connect=self.connect_timeout,
                                                                             sock_read=read_timeout))

    @contextlib.asynccontextmanager
    async def open(self, method: str, path: str, params: Mapping[str, str] | None, *, data: bytes | None = None,
                   timeout: aiohttp.ClientTimeout) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request, its credential asked for first; a 401 tells the credential to look again."""
        assert self._session is not None, "KubeClient used outside `async with`"
        headers = {"Content-Type": "application/json"} if data is not None else {}
        authorization = await self.config.credentials.authorization()
        if authorization:
            headers["Authorization"] = authorization
        response = await self._session.request(method, self.config.host + path, params=params, data=data,
                                               headers=headers, timeout=timeout, proxy=self.config.proxy,
                                               server_hostname=self.config.server_name)
        try:
            if response.status == 401:
                self.config.credentials.rejected()
            yield response
        finally:
            response.release()


__all__ = ["ClusterConfig", "ConfigError", "KubeClient", "TokenFile", "in_cluster", "load_configuration"]
