"""`ameshctl`: runs the node agent, and shows what a running agent sees through its admin API."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click

from agent import views
from agent.config import ADMIN_HOST, ADMIN_PORT, AgentConfig

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
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def agent(node: str, registry_file: Path, admin_port: int, drain_grace: float, log_level: str) -> None:
    """Run the node agent in the foreground (in the node's network namespace, as root)."""
    from agent.logs import setup_logging
    from agent.node import NodeAgent
    from bpf.datapath import DatapathError
    from registry.model import RegistryError

    setup_logging(log_level)
    config = AgentConfig(node=node, registry_file=registry_file, admin_port=admin_port, drain_grace=drain_grace)
    try:
        asyncio.run(NodeAgent(config).run())
    except (RegistryError, DatapathError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc}") from exc


def _get(admin: str, path: str) -> object:
    url = admin + path
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{url} answered {exc.code}: {exc.read().decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(
            f"cannot reach the amesh admin API at {admin} ({reason}); is `ameshctl agent` running "
            "in this network namespace?") from exc


def _show(admin: str, path: str, output: str, render) -> None:
    data = _get(admin, path)
    click.echo(json.dumps(data, indent=2) if output == "json" else render(data))


VIEWS = {  # command -> (admin API path, table renderer, help)
    "status": ("/status", views.status, "The agent's registry, datapath attachments and connection counts."),
    "workloads": ("/workloads", views.workloads,
                  "Workloads in the registry, and which are enrolled and captured on this node."),
    "services": ("/services", views.services, "Services with their ports and endpoints."),
    "connections": ("/connections", views.connections,
                    "Live and recently closed connections through this node's ztunnel."),
}


def _add_view_command(name: str, path: str, render, help: str) -> None:
    @main.command(name=name, help=help)
    @OUTPUT
    @click.pass_obj
    def show(admin: str, output: str) -> None:
        _show(admin, path, output, render)


for _name, (_path, _render, _help) in VIEWS.items():
    _add_view_command(_name, _path, _render, _help)


if __name__ == "__main__":
    sys.exit(main())
