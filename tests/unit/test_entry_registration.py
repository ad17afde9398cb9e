"""`ameshctl register|heartbeat|deregister --kubeconfig` (agent/entries.py) against the test API
server: the WorkloadEntry written, heartbeats through its status subresource, the TTL on the
object, deletion on SIGTERM and by deregister; refusals that say what to do."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from registry.workloadentries import TTL_ANNOTATION, parse_time
from tests.kubeapi import KubeAPIServer

AMESHCTL = str(Path(sys.executable).with_name("ameshctl"))
TIMEOUT = 10.0  # seconds for one command


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([AMESHCTL, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert not check or done.returncode == 0, done.stderr
    return done


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def probe_time(api: KubeAPIServer) -> float | None:
    entry = api.get("WorkloadEntry", "vm-1", "shop")
    conditions = ((entry or {}).get("status") or {}).get("conditions") or []
    return next((parse_time(c["lastProbeTime"]) for c in conditions if c["type"] == "Healthy"
                 and c["status"] == "True"), None)


@pytest.fixture
def api(tmp_path: Path) -> Any:
    with KubeAPIServer() as server:
        server.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")  # type: ignore[attr-defined]
        yield server


def test_register_with_a_ttl_heartbeats_until_stopped_then_deletes_the_entry(api: KubeAPIServer) -> None:
    proc = subprocess.Popen([AMESHCTL, "register", "vm-1", "--address", "192.168.7.20", "--port", "9080", "-n", "shop",
                             "--version", "v2", "--label", "tier=vm", "--service-account", "vm", "--ttl", "1.5s",
                             "--kubeconfig", str(api.kubeconfig)],  # type: ignore[attr-defined]
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for(lambda: probe_time(api))
        entry = api.get("WorkloadEntry", "vm-1", "shop")
        assert entry is not None and entry["spec"] == {
            "address": "192.168.7.20", "ports": {"http": 9080}, "serviceAccount": "vm",
            "labels": {"app": "vm-1", "version": "v2", "tier": "vm"}}
        assert entry["metadata"]["annotations"] == {TTL_ANNOTATION: "1.5s"}
        later = wait_for(lambda: (t := probe_time(api)) and t > first and t, 2.0)  # the next beat, TTL/3 later
        assert 0.3 < later - first < 1.0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["registered WorkloadEntry shop/vm-1 at 192.168.7.20:9080, heartbeating every 0.5s; "
                                "it lapses 1.5s after the last", "deregistered WorkloadEntry shop/vm-1"]
    assert api.get("WorkloadEntry", "vm-1", "shop") is None


def test_register_without_a_ttl_writes_the_entry_once_and_updates_it(api: KubeAPIServer) -> None:
    kubeconfig = str(api.kubeconfig)  # type: ignore[attr-defined]
    args = ("register", "vm-1", "--address", "192.168.7.20", "--port", "9080", "-n", "shop", "--kubeconfig", kubeconfig)
    assert ctl(*args).stdout == "registered WorkloadEntry shop/vm-1 at 192.168.7.20:9080: no TTL, ready until " \
                                "deregistered\n"
    entry = api.get("WorkloadEntry", "vm-1", "shop")
    assert entry is not None and "annotations" not in entry["metadata"] and "status" not in entry
    assert ctl("heartbeat", "vm-1", "-n", "shop", "--kubeconfig", kubeconfig).stdout == \
        "alive: WorkloadEntry shop/vm-1\n"
    assert probe_time(api) is not None
    ctl("register", "vm-1", "--address", "192.168.7.21", "--port", "9081", "--port-name", "grpc", "-n", "shop",
        "--kubeconfig", kubeconfig)  # again: replaced, its status kept
    entry = api.get("WorkloadEntry", "vm-1", "shop")
    assert entry is not None and (entry["spec"]["address"], entry["spec"]["ports"]) == ("192.168.7.21", {"grpc": 9081})
    assert probe_time(api) is not None
    assert ctl("deregister", "vm-1", "-n", "shop", "--kubeconfig", kubeconfig).stdout == \
        "deregistered: WorkloadEntry shop/vm-1\n"
    assert api.get("WorkloadEntry", "vm-1", "shop") is None
    again = ctl("deregister", "vm-1", "-n", "shop", "--kubeconfig", kubeconfig, check=False)
    assert again.returncode == 1 and "Error: WorkloadEntry shop/vm-1 is not registered" in again.stderr


def test_refusals_say_what_is_wrong(api: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = str(api.kubeconfig)  # type: ignore[attr-defined]
    bad = ctl("register", "vm-1", "--address", "127.0.0.1", "--port", "9080", "--kubeconfig", kubeconfig, check=False)
    assert bad.returncode == 2 and "127.0.0.1 is a loopback address" in bad.stderr
    gone = ctl("heartbeat", "vm-1", "-n", "shop", "--kubeconfig", kubeconfig, check=False)
    assert gone.returncode == 1 and "refused to heartbeat WorkloadEntry shop/vm-1 (404 Not Found): it is not there" \
        in gone.stderr
    api.close()
    down = ctl("register", "vm-1", "--address", "192.168.7.20", "--port", "9080", "--kubeconfig", kubeconfig,
               check=False)
    assert down.returncode == 1 and "cannot reach the Kubernetes API server" in down.stderr
    missing = ctl("deregister", "vm-1", "--kubeconfig", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 1 and f"cannot load kubeconfig {tmp_path / 'nowhere'}" in missing.stderr
