"""The agent run from the OCI image (`make image`), as the DaemonSet runs it: podman, privileged,
in the node's network namespace (hostNetwork), a PID namespace of its own, the image's own kernel
headers.

The smoke scenario of `make demo`: an enrolled pod on node-1 reaches a Service whose pods are on
both nodes, through the agents (HBONE between the nodes), and stopping the agents leaves the
nodes as they were. Skipped with the reason when the image archive or podman is missing.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.bed import Node
from tests.e2e.test_capture import SERVICE_IP, SERVICE_PORT, build_mesh, closed_connections, datapath_state
from tests.mesh import Mesh, exchange

ROOT = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
ARCHIVE = ROOT / "build" / f"amesh-{VERSION}.oci.tar"
IMAGE = f"docker.io/library/amesh:{VERSION}"  # the archive's name (image/build.sh), not buildah's local one
PODMAN = shutil.which("podman")
# runc, not Debian's default crun: crun refuses a machine with hybrid cgroups (v1 controllers and a
# v2 tree at /sys/fs/cgroup/unified, as here): "crun: cgroups in hybrid mode not supported"
RUNTIME = "runc"
# podman's defaults for root (nofile 1048576, nproc 4194304) need CAP_SYS_RESOURCE, which root
# here lacks: "setrlimit `RLIMIT_NOFILE`: Operation not permitted"; so this process's own open
# files limit, and a process count far above the agent's needs that this machine allows
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NPROC = 32768
PODMAN_TIMEOUT = 120.0  # seconds for `podman load` of the archive (a few hundred MB)

pytestmark = pytest.mark.skipif(
    PODMAN is None or shutil.which(RUNTIME) is None or not ARCHIVE.exists(),
    reason=f"no image archive {ARCHIVE.relative_to(ROOT)}, podman or {RUNTIME}: run `make image` first")


def container_name(node: Node) -> str:
    return f"amesh-agent-{node.netns}"


def podman_agent(mesh: Mesh) -> Callable[[Node], list[str]]:
    """`podman run` of the image's ameshctl for a node, with the bed's files at the same paths.
    Mesh starts it in the node's network namespace, so `--network host` is the node's network, as
    hostNetwork is (`--network ns:PATH` would set podman's default net.* sysctls, which runc
    refuses in a namespace the container does not own)."""
    logdir = str(mesh.bed.logdir)

    def command(node: Node) -> list[str]:
        return [PODMAN, "--runtime", RUNTIME, "run", "--rm", "--name", container_name(node), "--privileged",
                "--ulimit", f"nofile={NOFILE}:{NOFILE}", "--ulimit", f"nproc={NPROC}:{NPROC}", "--network", "host",
                "--volume", f"{logdir}:{logdir}", IMAGE, "ameshctl"]
    return command


@pytest.fixture
def image_mesh(make_bed) -> Iterator[Mesh]:
    load = subprocess.run([PODMAN, "load", "-i", str(ARCHIVE)], capture_output=True, text=True,
                          timeout=PODMAN_TIMEOUT)
    assert load.returncode == 0, f"podman load -i {ARCHIVE}: {load.stderr}"
    mesh = build_mesh(make_bed("p2p", nodes=2))
    mesh.agent_container = podman_agent(mesh)
    try:
        yield mesh
    finally:
        mesh.print_logs()
        for node in mesh.bed.nodes:  # a container left by a killed `podman run`
            subprocess.run([PODMAN, "rm", "--force", "--ignore", container_name(node)], capture_output=True,
                           timeout=PODMAN_TIMEOUT)


def test_the_agent_from_the_image_meshes_a_connection_across_nodes(image_mesh: Mesh) -> None:
    mesh, bed = image_mesh, image_mesh.bed
    before = {node.name: datapath_state(node.netns) for node in bed.nodes}
    for node in bed.nodes:
        mesh.start_agent(node)
    served = set()
    for i in range(4):
        payload = os.urandom(1024 * (i + 1))
        name, echoed = exchange(bed, bed.pods["client"], SERVICE_IP, SERVICE_PORT, payload)
        assert echoed == payload
        served.add(name)
    assert served == {"server-a", "server-b"}
    inbound = mesh.wait_for("2 inbound connections on node-2", lambda: len(cs := closed_connections(mesh, 2)) == 2 and cs)
    assert {(c["security"], c["source_workload"], c["upstream_workload"]) for c in inbound} == {
        ("mtls", "shop/client", "shop/server-b")}
    for node in bed.nodes:
        assert mesh.stop_agent(node) == 0
    assert {node.name: datapath_state(node.netns) for node in bed.nodes} == before
