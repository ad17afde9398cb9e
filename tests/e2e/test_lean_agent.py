"""The running agent captures with programs a short-lived child loaded: it maps no compiler.

Bed: one point-to-point node, an enrolled client and server. The agent is up and capturing (a
connection to the server goes through its ztunnel), yet its process maps none of libbcc,
libLLVM or libclang-cpp, and the loader child that compiled the programs
is gone.
"""

from __future__ import annotations

from pathlib import Path

from tests.mesh import Mesh, exchange

COMPILER_LIBRARIES = ("libbcc", "libLLVM", "libclang")


def test_the_capturing_agent_maps_no_compiler_and_keeps_no_loader_child(make_bed):
    bed = make_bed("p2p", nodes=1)
    mesh = Mesh(bed, namespaces={"shop": True})
    bed.add_pod("client", 1, namespace="shop", labels={"app": "client"})
    server = bed.add_pod("server", 1, namespace="shop", labels={"app": "server"})
    bed.start_podserver(server, 8080)
    agent = mesh.start_agent(1)
    try:
        assert exchange(bed, bed.pods["client"], server.ip, 8080, b"hello") == ("server", b"hello")
        [conn] = mesh.wait_for("the captured connection", lambda: mesh.ctl_json(1, "connections"))
        assert conn["source_workload"] == "shop/client"

        children = [c for task in Path(f"/proc/{agent.pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        # its ztunnel worker processes (--workers, 2 on this machine) are the only children it keeps
        workers = [c for c in children if b"ztunnel.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]
        for pid in (agent.pid, *workers):
            mapped = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                      if len(line.split()) == 6}
            assert not [path for path in mapped if any(lib in path for lib in COMPILER_LIBRARIES)], pid
        assert sorted(workers) == sorted(children) and len(workers) == len(mesh.ctl_json(1, "status")["workers"][
            "processes"]), f"the agent has child processes {children} besides its workers {workers}: the BPF " \
                           f"loader should have exited"
    finally:
        mesh.print_logs()
