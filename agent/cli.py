"""`ameshctl`: runs the node agent, and shows what a running agent sees through its admin API."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import click

from agent import views
from agent.config import ADMIN_HOST, ADMIN_PORT, DEFAULT_CA_DIR, AgentConfig
from ztunnel.identity import DEFAULT_LIFETIME, DEFAULT_TRUST_DOMAIN

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="table for people, json for scripts")


@click.group()
@click.option("--admin", default=f"http://{ADMIN_HOST}:{ADMIN_PORT}", envvar="AMESH_ADMIN", show_default=True,
              help="admin API of the agent to ask (it listens on the node's loopback)")
@click.pass_context
def main(ctx: click.Context, admin: str) -> None:
    """amesh: an eBPF-accelerated ambient service mesh agent."""
    ctx.obj = admin.rstrip("/")


@main.command()
@click.option("--node", required=True, help="Kubernetes node name this agent serves (spec.nodeName)")
@click.option("--registry-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML file of Kubernetes objects (Namespaces, Pods, Services, EndpointSlices); re-read on change")
@click.option("--admin-port", default=ADMIN_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--drain-grace", default=2.0, show_default=True, type=click.FloatRange(0),
              help="seconds live connections get to finish on shutdown")
@click.option("--mtls-mode", default="PERMISSIVE", show_default=True, type=click.Choice(["PERMISSIVE", "STRICT"]),
              help="for plaintext reaching enrolled pods whose namespace has no amesh.io/mtls-mode label")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True,
              help="SPIFFE trust domain of workload identities")
@click.option("--ca-dir", default=DEFAULT_CA_DIR, show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory of the root CA (ca.key, ca.crt); created there when absent")
@click.option("--cert-lifetime", default=int(DEFAULT_LIFETIME.total_seconds()), show_default=True,
              type=click.IntRange(60), help="seconds a workload certificate is valid (renewed at half-life)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def agent(node: str, registry_file: Path, admin_port: int, drain_grace: float, mtls_mode: str, trust_domain: str,
          ca_dir: Path, cert_lifetime: int, log_level: str) -> None:
    """Run the node agent in the foreground (in the node's network namespace, as root)."""
    from agent.logs import setup_logging
    from agent.node import NodeAgent
    from bpf.datapath import DatapathError
    from registry.model import RegistryError
    from ztunnel.identity import CAError

    setup_logging(log_level)
    config = AgentConfig(node=node, registry_file=registry_file, admin_port=admin_port, drain_grace=drain_grace,
                         mtls_mode=mtls_mode, trust_domain=trust_domain, ca_dir=ca_dir,
                         cert_lifetime=timedelta(seconds=cert_lifetime))
    try:
        asyncio.run(NodeAgent(config).run())
    except (RegistryError, DatapathError, CAError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc}") from exc


def _call(admin: str, path: str, method: str = "GET") -> object:
    url = admin + path
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{url} answered {exc.code}: {exc.read().decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(
            f"cannot reach the amesh admin API at {admin} ({reason}); is `ameshctl agent` running "
            "in this network namespace?") from exc


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
}


def _add_view_command(name: str, path: str, render, help: str) -> None:
    @main.command(name=name, help=help)
    @OUTPUT
    @click.pass_obj
    def show(admin: str, output: str) -> None:
        _show(admin, path, output, render)


for _name, (_path, _render, _help) in VIEWS.items():
    _add_view_command(_name, _path, _render, _help)


@main.command(name="ca-init")
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


@main.command(name="renew-certs")
@click.pass_obj
def renew_certs(admin: str) -> None:
    """Renew every workload certificate of this node now (live connections are not cut)."""
    renewing = _call(admin, "/certs/renew", method="POST")["renewing"]
    click.echo("renewing: " + (", ".join(renewing) or "no certificates held"))


if __name__ == "__main__":
    sys.exit(main())
