"""`ameshctl`: runs the node agent, and shows what a running agent sees through its admin API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import uvloop

from agent import views
from agent.config import ADMIN_HOST, ADMIN_PORT, DEFAULT_CA_DIR, METRICS_PORT, READINESS_PORT, AgentConfig, default
from ca.config import CA_PORT
from ca.config import METRICS_PORT as CA_METRICS_PORT
from ztunnel.cawatch import POLL_INTERVAL as CA_POLL_INTERVAL
from ztunnel.identity import DEFAULT_LIFETIME, DEFAULT_TRUST_DOMAIN
from ztunnel.telemetry import DEFAULT_CLUSTER

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="table for people, json for scripts")
EVENT_LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
LIMIT = click.option("--limit", type=click.IntRange(1), default=None, help="show at most N, largest first")


@click.group()
@click.option("--admin", default=f"http://{ADMIN_HOST}:{ADMIN_PORT}", envvar="AMESH_ADMIN", show_default=True,
              help="admin API of the agent to ask (it listens on the node's loopback)")
@click.pass_context
def main(ctx: click.Context, admin: str) -> None:
    """amesh: an eBPF-accelerated ambient service mesh agent."""
    ctx.obj = admin.rstrip("/")


@main.command()
@click.option("--node", required=True, help="Kubernetes node name this agent serves (spec.nodeName)")
@click.option("--registry-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML file of Kubernetes objects (Namespaces, Pods, Services, EndpointSlices), re-read on "
                   "change; without it the agent lists and watches the Kubernetes API server")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG",
              help="kubeconfig for the API server (default: in-cluster service account)")
@click.option("--admin-port", default=ADMIN_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--drain-grace", default=default("drain_grace"), show_default=True, type=click.FloatRange(0),
              help="seconds live connections get to finish on shutdown")
@click.option("--drain-deadline", default=default("drain_deadline"), show_default=True, type=click.FloatRange(0),
              help="seconds live connections get to finish when the agent drains (SIGUSR2, POST /drain, or an "
                   "upgrade: a new agent took over the node)")
@click.option("--max-handshakes-per-source", default=default("max_handshakes_per_source"), show_default=True,
              type=click.IntRange(1), help="TLS handshakes on the HBONE port under way at once from one address")
@click.option("--max-handshakes", default=default("max_handshakes"), show_default=True, type=click.IntRange(1),
              help="TLS handshakes on the HBONE port under way at once in all; the excess is refused at once")
@click.option("--mtls-mode", default=default("mtls_mode"), show_default=True,
              type=click.Choice(["PERMISSIVE", "STRICT"]),
              help="for plaintext reaching enrolled pods whose namespace has no amesh.io/mtls-mode label")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True,
              help="SPIFFE trust domain of workload identities")
@click.option("--root-namespace", default=default("root_namespace"), show_default=True,
              help="namespace whose AuthorizationPolicies and PeerAuthentications apply mesh-wide")
@click.option("--ca-dir", default=DEFAULT_CA_DIR, show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory of the root CA (ca.key, ca.crt, trust-bundle.pem); created there when absent")
@click.option("--ca-poll-interval", default=default("ca_poll_interval"), show_default=True,
              type=click.FloatRange(0.1), help="seconds between checks of --ca-dir (with --ca-address: of "
              "--trust-bundle) for a new root or trust bundle")
@click.option("--ca-address", default=None, help="the cluster CA (ameshctl ca serve) as HOST:PORT; without it the "
              "agent signs with the local root CA in --ca-dir (the weaker trust model: the node holds the root key)")
@click.option("--ca-token-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="projected service-account token (audience amesh-ca) shown to the cluster CA; re-read per request")
@click.option("--trust-bundle", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM root certificate(s) the cluster CA and the mesh's peers are checked against")
@click.option("--cert-lifetime", default=int(DEFAULT_LIFETIME.total_seconds()), show_default=True,
              type=click.IntRange(60), help="seconds a workload certificate is valid (renewed at half-life)")
@click.option("--metrics-port", default=METRICS_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="Prometheus metrics at :PORT/metrics")
@click.option("--readiness-port", default=READINESS_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="readiness at :PORT/healthz/ready")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="one JSON line per closed connection on stdout")
@click.option("--metrics/--no-metrics", default=True, show_default=True, help="Prometheus metrics on --metrics-port")
@click.option("--flow-accounting/--no-flow-accounting", default=True, show_default=True,
              help="per-flow packet and byte counters in the BPF program (ameshctl flows)")
@click.option("--cluster", default=DEFAULT_CLUSTER, show_default=True, help="cluster name in metric labels")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--event-loop", default="uvloop", show_default=True, type=click.Choice(sorted(EVENT_LOOPS)),
              help="the asyncio event loop the agent and its ztunnel run on")
@click.option("--workers", default=default("workers"), show_default=True, type=click.IntRange(1, 256),
              help="ztunnel worker processes sharing the node's listeners (default: the CPUs the agent may use, "
                   "at most 8); 1 runs the ztunnel in the agent's process")
def agent(log_level: str, cert_lifetime: int, **options: Any) -> None:
    """Run the node agent in the foreground (in the node's network namespace, as root)."""
    from agent.logs import setup_logging
    from agent.node import NodeAgent
    from agent.workers import WorkerError
    from bpf.datapath import DatapathError
    from bpf.handover import HandoverError
    from registry.model import RegistryError
    from ztunnel.identity import CAError

    setup_logging(log_level)
    if options["ca_address"] and not (options["ca_token_file"] and options["trust_bundle"]):
        raise click.UsageError("--ca-address needs --ca-token-file and --trust-bundle")
    # every other option is an AgentConfig field of the same name
    config = AgentConfig(cert_lifetime=timedelta(seconds=cert_lifetime), **options)
    try:
        with asyncio.Runner(loop_factory=EVENT_LOOPS[config.event_loop]) as runner:
            runner.run(NodeAgent(config, log_level).run())
    except (RegistryError, DatapathError, CAError, HandoverError, WorkerError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc}") from exc


def _call(admin: str, path: str, method: str = "GET", body: object = None) -> Any:
    url = admin + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            text = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            pass  # not one of our JSON errors: show it as it came
        raise AdminError(exc.code, f"{method} {path} refused ({exc.code}): {text}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(
            f"cannot reach the amesh admin API at {admin} ({reason}); is `ameshctl agent` running "
            "in this network namespace?") from exc


class AdminError(click.ClickException):
    """The agent answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _show(admin: str, path: str, output: str, render) -> None:
    data = _call(admin, path)
    click.echo(json.dumps(data, indent=2) if output == "json" else render(data))


VIEWS = {  # command -> (admin API path, table renderer, help)
    "status": ("/status", views.status, "The agent's registry, datapath attachments and connection counts."),
    "workloads": ("/workloads", views.workloads,
                  "Workloads in the registry, and which are enrolled and captured on this node."),
    "services": ("/services", views.services, "Services with their ports and endpoints."),
    "connections": ("/connections", views.connections,
                    "Live and recently closed connections through this node's ztunnel."),
    "certs": ("/certs", views.certs,
              "Workload certificates this node holds (one per service account of its enrolled pods)."),
    # a fourth element: options passed to the admin API as query parameters
    "policies": ("/policies", views.policies,
                 "AuthorizationPolicies and PeerAuthentications in force: action, scope, rules, warnings."),
    "check": ("/check", views.check, "What policy decides now for a connection from one workload to another "
              "on a port, without sending a packet: the policy and rule that decide, or why each ALLOW did "
              "not match.", [click.option("--from", "from", required=True, help="source workload NAMESPACE/POD"),
                             click.option("--to", required=True, help="destination workload NAMESPACE/POD"),
                             click.option("--port", required=True, type=click.IntRange(1, 65535),
                                          help="destination (target) port")]),
    "flows": ("/flows", views.flows, "Per-flow packet and byte counters of the capture program (each direction "
              "its own flow, captured or not).", [LIMIT]),
}


def _add_view_command(name: str, path: str, render, help: str, query_options=()) -> None:
    @click.pass_obj
    def show(admin: str, output: str, **query) -> None:
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        _show(admin, f"{path}?{params}" if params else path, output, render)

    for option in (*query_options, OUTPUT):
        show = option(show)
    main.command(name=name, help=help)(show)


for _name, (_path, _render, _help, *_query_options) in VIEWS.items():
    _add_view_command(_name, _path, _render, _help, *_query_options)


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60), help="seconds between refreshes")
@click.pass_obj
def top(admin: str, interval: float) -> None:
    """A live view of this node's connections, busiest first (q quits)."""
    from agent import top as live_view

    node = _call(admin, "/status")["node"]
    live_view.run(lambda: _call(admin, "/connections"), node, interval)


def _through_the_api_server(command):
    """The options that send a registration command to the API server (a WorkloadEntry) instead
    of the agent's loopback admin API."""
    command = click.option("--in-cluster", is_flag=True,
                           help="through the API server, as this pod's service account")(command)
    return click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False),
                        help="through this kubeconfig's API server: an Istio WorkloadEntry every node's agent reads "
                             "(the agent's loopback API is for agents with --registry-file)")(command)


@main.command()
@click.argument("name")
@click.option("--address", required=True, help="IPv4 address the workload is reached at")
@click.option("--port", required=True, type=int, help="port it serves")
@click.option("--version", default="", help="version label")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--service-account", default="default", show_default=True)
@click.option("--ttl", default=None,
              help="expires without a heartbeat for this long (default 30s on the loopback API; through the API "
                   "server, none: the entry stays ready until deregistered)")
@click.option("--keepalive", is_flag=True,
              help="stay in the foreground sending heartbeats every ttl/3; deregister on Ctrl-C or SIGTERM (through "
                   "the API server, implied by --ttl)")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="a label of the WorkloadEntry, which Service selectors match (default app=NAME, version=VERSION)")
@click.option("--port-name", default="http", show_default=True,
              help="the WorkloadEntry's name for --port: a Service's targetPort of that name maps to it")
@click.option("--network", default="", help="the WorkloadEntry's spec.network (amesh assumes one network)")
@_through_the_api_server
@click.pass_obj
def register(admin: str, name: str, address: str, port: int, version: str, namespace: str, service_account: str,
             ttl: str | None, keepalive: bool, labels: tuple[str, ...], port_name: str, network: str,
             kubeconfig: str | None, in_cluster: bool) -> None:
    """Register a workload outside Kubernetes (a VM, a laptop) as NAME."""
    if kubeconfig or in_cluster:
        from agent import entries

        entries.register_command(name, namespace, address, port, port_name, _labels(name, version, labels),
                                 service_account, network, ttl, kubeconfig, in_cluster, _say)
        return
    spec = {"name": name, "address": address, "port": port, "version": version, "namespace": namespace,
            "service_account": service_account, "ttl": ttl or "30s"}
    registered = _call(admin, "/registrations", "POST", spec)
    click.echo(f"registered {namespace}/{name} at {address}:{port}, expires without heartbeats in {registered['ttl_s']:g}s")
    if keepalive:
        _keep_alive(admin, spec, registered["ttl_s"] / 3)


def _labels(name: str, version: str, given: tuple[str, ...]) -> dict[str, str]:
    """A WorkloadEntry's labels: app=NAME (and version=VERSION) unless --label gives others."""
    labels = {"app": name, **({"version": version} if version else {})}
    for text in given:
        key, equals, value = text.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"must be KEY=VALUE, got {text!r}", param_hint="--label")
        labels[key] = value
    return labels


def _say(line: str) -> None:
    """A line of a long-running command's output, flushed at once (its output is often a log file)."""
    click.echo(line)
    sys.stdout.flush()


def _keep_alive(admin: str, spec: dict, interval: float) -> None:
    """Heartbeats until interrupted; registers again if the agent forgot us (it restarted)."""
    path = f"/registrations/{spec['namespace']}/{spec['name']}"
    instance = urllib.parse.urlencode({"instance": f"{spec['address']}:{spec['port']}"})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(interval)
            try:
                _call(admin, f"{path}/heartbeat?{instance}", "POST")
            except AdminError as e:
                if e.status != 404:
                    raise
                _call(admin, "/registrations", "POST", spec)
    except (KeyboardInterrupt, SystemExit):
        _call(admin, f"{path}?{instance}", "DELETE")
        click.echo(f"deregistered {spec['namespace']}/{spec['name']}")


def _add_instance_command(name: str, method: str, suffix: str, done: str, help: str) -> None:
    """A command acting on the registered instances of NAME (or the one given by --instance)."""

    @main.command(name=name, help=help)
    @click.argument("service")
    @click.option("-n", "--namespace", default="default", show_default=True)
    @click.option("--instance", default=None, help="address:port of one instance (default: every instance)")
    @_through_the_api_server
    @click.pass_obj
    def act(admin: str, service: str, namespace: str, instance: str | None, kubeconfig: str | None,
            in_cluster: bool) -> None:
        if kubeconfig or in_cluster:
            from agent import entries

            if instance:
                raise click.BadParameter("a WorkloadEntry is one instance: name it as SERVICE", param_hint="--instance")
            entries.entry_command(name, namespace, service, kubeconfig, in_cluster, _say)
            return
        query = "?" + urllib.parse.urlencode({"instance": instance}) if instance else ""
        changed = _call(admin, f"/registrations/{namespace}/{service}{suffix}{query}", method)
        click.echo(f"{done}: {', '.join(r['address'] + ':' + str(r['port']) for r in changed)}")


_add_instance_command("heartbeat", "POST", "/heartbeat", "alive",
                      "Tell the agent a registered workload is alive (revives an expired registration); with "
                      "--kubeconfig, write one heartbeat to its WorkloadEntry.")
_add_instance_command("deregister", "DELETE", "", "deregistered",
                      "Remove a registration: its endpoints stop receiving new connections at once; with "
                      "--kubeconfig, delete its WorkloadEntry.")


@main.command()
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@OUTPUT
@click.pass_obj
def lookup(admin: str, name: str, namespace: str, output: str) -> None:
    """Where NAME is served: its endpoints from Kubernetes, the file and registrations, with health."""
    _show(admin, f"/lookup/{namespace}/{name}", output, views.lookup)


@main.group()
def ca() -> None:
    """The mesh's certificate authority: create its root, serve it as the cluster CA."""


@ca.command(name="init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
def ca_init(directory: Path, trust_domain: str) -> None:
    """Create the mesh's root CA (ca.key, ca.crt) in DIRECTORY, or show the one already there."""
    from ztunnel.identity import CAError, FileCA

    try:
        ca = FileCA.load_or_create(directory, trust_domain)
    except CAError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"root CA in {directory}: SHA-256 fingerprint {ca.root_fingerprint}")


@ca.group(name="rotate")
def ca_rotate() -> None:
    """Replace the root CA without dropping a connection: prepare, activate, finish (status shows where
    a rotation stands). DIRECTORY is the agents' --ca-dir; on Kubernetes, the Secret's files (README)."""


ROTATION_DIRECTORY = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
TRUST_BUNDLE_OUT = click.option("--trust-bundle-out", default=None, type=click.Path(dir_okay=False, path_type=Path),
                                help="also write DIRECTORY's trust bundle (root certificates only) to this file, "
                                "for the agents of the cluster CA (the ConfigMap amesh-trust-bundle's ca.crt)")
# With the cluster CA, after each step that changed DIRECTORY: the order of the two updates, and why
KUBERNETES_ORDER = {
    "prepare": "the Secret, then the ConfigMap; wait until every agent trusts the new root before activate",
    "activate": "the Secret first; once the CA signs with the new root (its log: event=ca_root_changed; metric "
                "amesh_ca_server_signing_root), the ConfigMap, whose change makes every agent renew from the CA",
    "finish": "the Secret, then the ConfigMap: agents refuse the old root once their bundle drops it",
}
CERT_LIFETIME = click.option("--cert-lifetime", default=int(DEFAULT_LIFETIME.total_seconds()), show_default=True,
                             type=click.IntRange(60), help="seconds the agents' certificates live (their "
                             "--cert-lifetime): finish waits that long after activate")


def _rotation_step(directory: Path, step: str, decide, trust_bundle_out: Path | None) -> None:
    """Carries out one rotation step on DIRECTORY; prints what it did, the bundle, how to publish
    it on Kubernetes, and what comes next; writes the bundle to `trust_bundle_out` when given."""
    from ztunnel.identity import CAError, fingerprint
    from ztunnel.rotation import RotationError, run_step, short

    try:
        plan, ca = run_step(directory, lambda files: decide(files, time.time()), time.time)
    except (CAError, RotationError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(plan.done)
    for root in ca.roots:
        role = "signs" if fingerprint(root) == ca.root_fingerprint else "trusted"
        click.echo(f"  {role:8} {fingerprint(root)} (ROOT {short(fingerprint(root))})")
    if trust_bundle_out is not None:
        _write_replacing(trust_bundle_out, ca.trust_bundle)
        click.echo(f"trust bundle written to {trust_bundle_out}")
    if (plan.writes or plan.removes) and step in KUBERNETES_ORDER:
        click.echo(f"with the cluster CA on Kubernetes, update {KUBERNETES_ORDER[step]}:")
        click.echo(f"  kubectl -n amesh-system create secret generic amesh-ca --from-file={directory}/ "
                   "--dry-run=client -o yaml | kubectl replace -f -")
        click.echo(f"  kubectl -n amesh-system create configmap amesh-trust-bundle --from-file=ca.crt={directory}/"
                   "trust-bundle.pem --dry-run=client -o yaml | kubectl replace -f -")
    click.echo(f"next: {plan.next}")


def _write_replacing(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file renamed over it: readers see all or nothing."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write the trust bundle to {path}: {exc.strerror}") from exc


@ca_rotate.command(name="prepare")
@ROTATION_DIRECTORY
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True, help="named in the new root")
@TRUST_BUNDLE_OUT
def ca_rotate_prepare(directory: Path, trust_domain: str, trust_bundle_out: Path | None) -> None:
    """Step 1: make a new root and add it to the trust bundle; the old root still signs."""
    from ztunnel import rotation
    from ztunnel.identity import new_root, private_pem

    def new_pair() -> tuple[bytes, Any]:
        key, root = new_root(trust_domain, time.time())
        return private_pem(key), root

    _rotation_step(directory, "prepare", lambda files, now: rotation.prepare(files, now, new_pair), trust_bundle_out)


def _add_rotation_command(name: str, help: str) -> None:
    """`ca rotate NAME DIRECTORY [--cert-lifetime]`: the step of ztunnel/rotation.py by that name."""

    @ca_rotate.command(name=name, help=help)
    @ROTATION_DIRECTORY
    @CERT_LIFETIME
    @TRUST_BUNDLE_OUT
    def command(directory: Path, cert_lifetime: int, trust_bundle_out: Path | None) -> None:
        from ztunnel import rotation

        decide = getattr(rotation, name)
        _rotation_step(directory, name, lambda files, now: decide(files, now, timedelta(seconds=cert_lifetime)),
                       trust_bundle_out)


_add_rotation_command("activate", "Step 2: sign with the new root (agents renew at once); the old root stays trusted.")


@ca_rotate.command(name="finish")
@ROTATION_DIRECTORY
@CERT_LIFETIME
@click.option("--force", is_flag=True, help="finish before the old root's certificates can have expired "
              "(after checking that `ameshctl certs` on every node shows only the new ROOT)")
@TRUST_BUNDLE_OUT
def ca_rotate_finish(directory: Path, cert_lifetime: int, force: bool, trust_bundle_out: Path | None) -> None:
    """Step 3: drop the old root from the trust bundle; certificates it signed are refused."""
    from ztunnel import rotation

    lifetime = timedelta(seconds=cert_lifetime)
    _rotation_step(directory, "finish", lambda files, now: rotation.finish(files, now, lifetime, force),
                   trust_bundle_out)


_add_rotation_command("status", "Where a rotation in DIRECTORY stands and what to run next (changes nothing).")


@ca.command(name="serve")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory holding the root CA's ca.key and ca.crt (the Secret, mounted only here)")
@click.option("--listen", default=f"0.0.0.0:{CA_PORT}", show_default=True, help="HOST:PORT to serve CSRs on (HTTPS)")
@click.option("--metrics-port", default=CA_METRICS_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="Prometheus metrics at :PORT/metrics and readiness at :PORT/healthz/ready (plain HTTP)")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG",
              help="kubeconfig for the API server (default: in-cluster service account)")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--cert-lifetime", default=int(DEFAULT_LIFETIME.total_seconds()), show_default=True,
              type=click.IntRange(60), help="the longest a workload certificate may be valid, seconds")
@click.option("--agent-service-account", default="amesh-system/amesh-agent", show_default=True,
              help="NAMESPACE/NAME of the agents' service account: only its pod-bound tokens may ask")
@click.option("--ca-poll-interval", default=CA_POLL_INTERVAL, show_default=True, type=click.FloatRange(0.1),
              help="seconds between checks of --ca-dir for a root rotation step (a new signing root or bundle)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def ca_serve(ca_dir: Path, listen: str, metrics_port: int, kubeconfig: str | None, trust_domain: str,
             cert_lifetime: int, agent_service_account: str, ca_poll_interval: float, log_level: str) -> None:
    """Run the cluster CA: sign CSRs of agents for identities of pods on their own node."""
    from agent.logs import setup_logging
    from ca.config import CAConfig
    from ca.server import ClusterCA
    from ztunnel.identity import CAError

    setup_logging(log_level)
    host, _, port = listen.rpartition(":")
    agent_namespace, _, agent_account = agent_service_account.partition("/")
    if not host or not port.isdigit() or not agent_account:
        raise click.UsageError("--listen is HOST:PORT and --agent-service-account NAMESPACE/NAME")
    config = CAConfig(ca_dir, host, int(port), metrics_port, kubeconfig, trust_domain,
                      timedelta(seconds=cert_lifetime), agent_namespace, agent_account, ca_poll_interval)
    try:
        server = ClusterCA(config)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_until_signal(server.run()))
    except CAError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start the cluster CA: {exc}") from exc


async def _serve_until_signal(serving: Any) -> None:
    """Runs `serving` until SIGTERM or SIGINT."""
    task = asyncio.ensure_future(serving)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


@main.command(name="renew-certs")
@click.pass_obj
def renew_certs(admin: str) -> None:
    """Renew every workload certificate of this node now (live connections are not cut)."""
    renewing = _call(admin, "/certs/renew", method="POST")["renewing"]
    click.echo("renewing: " + (", ".join(renewing) or "no certificates held"))


if __name__ == "__main__":
    sys.exit(main())
