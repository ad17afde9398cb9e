"""Unit tests for registry/kubernetes.py: list/watch against the test API server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import yaml

from registry.kubefile import build_state
from registry.kubeclient import TokenFile, load_configuration
from registry.kubernetes import KINDS, Backoff, KubernetesSource
from registry.model import RegistryState
from tests.kubeapi import BY_KIND, KubeAPIServer
from ztunnel.authz import Authorizer, Connection
from ztunnel.identity import Identity

DEADLINE = 1.5  # seconds a change may take to show up in the published state ("within ~1 s")


# --- objects ---


def namespace(name: str, mode: str | None = "ambient") -> dict[str, Any]:
    labels = {"amesh.io/dataplane-mode": mode} if mode else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ip: str, ns: str = "shop", ready: bool = True, app: str = "web",
        node: str = "node-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "hostIP": "192.168.0.1",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def service(name: str, cluster_ip: str, ns: str = "shop", app: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": app},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpoint_slice(name: str, service_name: str, ips: list[str], ns: str = "shop",
                   ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


def deny_policy(name: str = "deny-client", principal: str = "cluster.local/ns/shop/sa/client",
                version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}}


def strict_mtls(version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}


def malformed(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy with an action amesh refuses."""
    return {**policy, "spec": {**policy["spec"], "action": "AUDIT"}}


# --- harness ---


class Run:
    """A running source and what it published and reported."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.states: list[RegistryState] = []
        self.errors: list[str] = []

    @property
    def state(self) -> RegistryState:
        assert self.source.state is not None
        return self.source.state


async def until(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> None:
    """Poll `condition` every 20 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (AssertionError, AttributeError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(api: KubeAPIServer, tmp_path: Path, **options: Any) -> AsyncIterator[Run]:
    """Start a KubernetesSource on `api` (through a kubeconfig), wait for the first state."""
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    options = {"backoff_initial": 0.05, "backoff_cap": 0.2, "node": "node-1", **options}
    run: Run
    source = KubernetesSource(lambda s: run.states.append(s), lambda e: run.errors.append(e),
                              kubeconfig=str(kubeconfig), **options)
    run = Run(source)
    task = asyncio.create_task(source.run())
    try:
        await until(lambda: source.state is not None and source.connected, 5.0, "initial sync")
        yield run
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scenario(coro_fn: Callable[..., Any]) -> Callable[..., None]:
    """Run an async test under asyncio.run with an overall timeout."""
    def test(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(coro_fn(tmp_path), 30))
    test.__name__ = coro_fn.__name__
    test.__doc__ = coro_fn.__doc__
    return test


def server(*objects: dict[str, Any]) -> KubeAPIServer:
    return KubeAPIServer(bookmark_interval=0.5, objects=objects)


def ips(state: RegistryState) -> dict[str, str]:
    return {w.key: w.ip for w in state.workloads}


# --- pure parts ---


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.delay() for _ in range(10)]
    bases = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for delay, base in zip(delays, bases):
        assert 0.5 * base <= delay <= 1.5 * base
    backoff.reset()
    assert 0.25 <= backoff.delay() <= 0.75


def test_in_cluster_config_reads_the_token_again_when_it_rotates(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("first\n")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    async def main() -> None:
        conf = load_configuration(None, environ=environ, sa_dir=str(sa))
        assert conf.host == "https://10.96.0.1:443" and conf.ca_file == f"{sa}/ca.crt"
        assert await conf.credentials.authorization() == "Bearer first"
        # kubelet writes a new file and swaps it in
        (sa / "token.new").write_text("second")
        os.replace(sa / "token.new", sa / "token")
        assert await conf.credentials.authorization() == "Bearer second"
        (sa / "token").unlink()  # unreadable for a moment: keep the token we have
        assert await conf.credentials.authorization() == "Bearer second"

    asyncio.run(main())


def test_kubeconfig_wins_over_in_cluster(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t")
    (sa / "ca.crt").write_text("x")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
               "KUBECONFIG": str(tmp_path / "kubeconfig")}
    with KubeAPIServer() as api:
        api.write_kubeconfig(tmp_path / "kubeconfig")
        conf = load_configuration(None, environ=environ, sa_dir=str(sa))
        assert conf.host == api.url


def test_the_daemonsets_cluster_role_reads_every_kind_the_source_follows() -> None:
    manifest = Path(__file__).resolve().parents[2] / "daemonset" / "amesh.yaml"
    [role] = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "ClusterRole"]
    granted = {(group, resource) for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for kind in KINDS:
        resource = BY_KIND[kind.kind]
        assert (resource.group, resource.plural) in granted, f"the ClusterRole does not let the agent read {kind.kind}"


def test_token_file_ignores_an_empty_file_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("")
    token = TokenFile(str(path))
    assert token.refresh() is None
    path.write_text("t")
    assert token.refresh() == "Bearer t"


# --- against the test API server ---


@scenario
async def test_initial_sync(tmp_path: Path) -> None:
    """After the initial list of all four kinds, one state with everything in it."""
    with server(namespace("shop"), pod("web-1", "10.244.1.5"), service("web", "10.96.0.10"),
                endpoint_slice("web-abc", "web", ["10.244.1.5"])) as api:
        async with running(api, tmp_path) as run:
            assert len(run.states) == 1
            state = run.state
            (w,) = state.workloads
            assert (w.key, w.ip, w.node, w.enrolled, w.ready, w.source) == (
                "shop/web-1", "10.244.1.5", "node-1", True, True, "kubernetes")
            (svc,) = state.services
            assert svc.cluster_ip == "10.96.0.10"
            assert [(e.ip, dict(e.ports)) for e in svc.endpoints] == [("10.244.1.5", {"http": 8080})]
            assert run.source.connected and run.source.last_error is None
            assert time.time() - run.source.synced_at < 1  # type: ignore[operator]
            assert run.errors == []


@scenario
async def test_lists_are_read_in_pages(tmp_path: Path) -> None:
    """Each kind is listed `list_page` objects at a time (the next page asked for ahead): every
    object arrives, in as many requests as pages."""
    with server(namespace("shop"), *(pod(f"web-{i}", f"10.244.1.{i + 1}") for i in range(7))) as api:
        async with running(api, tmp_path, list_page=2) as run:
            assert sorted(ips(run.state)) == sorted(f"shop/web-{i}" for i in range(7))
            assert api.requests["list"] == len(KINDS) - 1 + 4  # Pods in 4 pages, every other kind in one
            assert run.errors == []


@scenario
async def test_the_garbage_collector_is_paused_for_the_initial_sync_only(tmp_path: Path) -> None:
    """Paused while the initial lists are read (it would walk their objects again and again), on
    again once the first state is out, and at once when the server cannot be reached."""
    collecting_at_first_state: list[bool] = []
    with server(namespace("shop"), pod("web-1", "10.244.1.5")) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        source = KubernetesSource(lambda s: collecting_at_first_state.append(gc.isenabled()), print,
                                  kubeconfig=str(kubeconfig), node="node-1")
        task = asyncio.create_task(source.run())
        await until(lambda: source.state is not None, what="initial sync")
        assert gc.isenabled()
        api.stop()  # a second source, started while the server is down
        errors: list[str] = []
        down = KubernetesSource(lambda s: None, errors.append, kubeconfig=str(kubeconfig), backoff_initial=0.05)
        task_down = asyncio.create_task(down.run())
        try:
            await until(lambda: errors, what="outage reported")
            assert gc.isenabled()  # an agent waiting for its API server collects as usual
        finally:
            for t in (task, task_down):
                t.cancel()
            await asyncio.gather(task, task_down, return_exceptions=True)
    assert collecting_at_first_state == [False]  # paused until the first state was handed over
    assert gc.isenabled()


@scenario
async def test_a_failing_credential_plugin_is_an_outage_that_names_it(tmp_path: Path) -> None:
    with server(namespace("shop")) as api:
        path = api.write_kubeconfig(tmp_path / "kubeconfig")
        config = yaml.safe_load(path.read_text())
        config["users"][0]["user"] = {"exec": {"command": sys.executable,
                                               "args": ["-c", "import sys; sys.exit('session expired: log in')"]}}
        path.write_text(yaml.safe_dump(config))
        errors: list[str] = []
        source = KubernetesSource(lambda s: None, errors.append, kubeconfig=str(path), backoff_initial=0.05)
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: errors, what="outage reported")
            assert errors == [f"kubeconfig user 'kubeapi-test': the exec plugin {sys.executable} exited with 1: "
                              "session expired: log in"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@scenario
async def test_pod_create_ip_change_readiness_and_delete(tmp_path: Path) -> None:
    with server(namespace("shop")) as api:
        async with running(api, tmp_path) as run:
            assert run.state.workloads == ()
            api.apply(pod("web-1", "10.244.1.5"))
            await until(lambda: ips(run.state) == {"shop/web-1": "10.244.1.5"}, what="created")
            api.apply(pod("web-1", "10.244.1.9"))
            await until(lambda: ips(run.state) == {"shop/web-1": "10.244.1.9"}, what="new IP")
            assert run.state.workload_by_ip("10.244.1.5") is None
            api.apply(pod("web-1", "10.244.1.9", ready=False))
            await until(lambda: not run.state.workloads[0].ready, what="not ready")
            api.delete("Pod", "web-1", "shop")
            await until(lambda: run.state.workloads == (), what="deleted")
            generations = [s.generation for s in run.states]
            assert generations == sorted(set(generations))
            assert run.errors == []


@scenario
async def test_namespace_label_flip_enrolls_and_unenrolls(tmp_path: Path) -> None:
    with server(namespace("shop", None), pod("web-1", "10.244.1.5")) as api:
        async with running(api, tmp_path) as run:
            assert not run.state.workloads[0].enrolled
            api.apply(namespace("shop", "ambient"))
            await until(lambda: run.state.workloads[0].enrolled, what="enrolled")
            api.apply(namespace("shop", None))
            await until(lambda: not run.state.workloads[0].enrolled, what="unenrolled")


@scenario
async def test_endpointslice_update(tmp_path: Path) -> None:
    with server(namespace("shop"), service("web", "10.96.0.10"),
                endpoint_slice("web-abc", "web", ["10.244.1.5"])) as api:
        async with running(api, tmp_path) as run:
            def endpoints() -> list[tuple[str, bool]]:
                return [(e.ip, e.ready) for e in run.state.services[0].endpoints]
            assert endpoints() == [("10.244.1.5", True)]
            api.apply(endpoint_slice("web-abc", "web", ["10.244.1.5", "10.244.2.7"]))
            await until(lambda: endpoints() == [("10.244.1.5", True), ("10.244.2.7", True)])
            api.apply(endpoint_slice("web-abc", "web", ["10.244.2.7"], ready=False))
            await until(lambda: endpoints() == [("10.244.2.7", False)])


@scenario
async def test_unchanged_state_is_not_published_again(tmp_path: Path) -> None:
    with server(namespace("shop"), pod("web-1", "10.244.1.5")) as api:
        async with running(api, tmp_path) as run:
            # a change the mesh does not look at: a new resourceVersion, the same state
            changed = pod("web-1", "10.244.1.5")
            changed["metadata"]["annotations"] = {"note": "x"}
            api.apply(changed)
            await until(lambda: run.source.event_counts["Pod"] == 1)
            await asyncio.sleep(0.2)  # longer than the publish interval
            assert len(run.states) == 1


@scenario
async def test_watch_cut_mid_stream_resumes_without_missing_or_repeating(tmp_path: Path) -> None:
    with server(namespace("shop")) as api:
        async with running(api, tmp_path) as run:
            lists, watches = api.list_count, api.watch_count
            for i in range(5):
                api.apply(pod(f"p{i}", f"10.244.1.{i + 1}"))
            assert api.cut_watches() == len(KINDS)  # after those five events, in the same stream
            for i in range(5, 10):
                api.apply(pod(f"p{i}", f"10.244.1.{i + 1}"))
            await until(lambda: len(run.state.workloads) == 10, what="ten pods")
            await until(lambda: run.source.connected, what="watching again")
            assert api.watch_count > watches  # it watched again...
            assert api.list_count == lists  # ...from where it was, without listing again
            assert run.source.event_counts["Pod"] == 10  # none missed, none applied twice
            assert ips(run.state) == {f"shop/p{i}": f"10.244.1.{i + 1}" for i in range(10)}
            assert run.errors == []  # a cut watch is not an outage


@scenario
async def test_expired_resource_version_relists_to_the_servers_state(tmp_path: Path) -> None:
    objects = {
        ("Namespace", "shop"): namespace("shop"),
        ("Pod", "old"): pod("old", "10.244.1.5"),
        ("Pod", "keep"): pod("keep", "10.244.1.6"),
        ("Service", "web"): service("web", "10.96.0.10"),
    }
    with server(*objects.values()) as api:
        async with running(api, tmp_path) as run:
            lists = api.list_count
            api.stop()  # cut every watch and keep them away while history is compacted
            api.delete("Pod", "old", "shop")
            del objects[("Pod", "old")]
            objects[("Pod", "new")] = pod("new", "10.244.1.7")
            objects[("Service", "web")] = service("web", "10.96.0.11")
            for obj in list(objects.values())[-2:]:
                api.apply(obj)
            api.compact()
            api.start()
            expected = build_state(objects.values(), "kubernetes", 0)
            await until(lambda: (run.state.workloads, run.state.services)
                        == (expected.workloads, expected.services), 5.0, "relisted state")
            # every kind relists after its 410, each in its own time: the state above may be whole
            # (Pods and Services relisted) before the kinds it does not show have relisted
            await until(lambda: api.list_count >= lists + len(KINDS), 5.0, "every kind relisted after its 410")
            await until(lambda: run.source.connected, what="watching again")


@scenario
async def test_server_down_keeps_the_last_state_then_catches_up(tmp_path: Path) -> None:
    with server(namespace("shop"), pod("web-1", "10.244.1.5")) as api:
        async with running(api, tmp_path) as run:
            lists = api.list_count
            before = run.state
            api.stop()
            await until(lambda: not run.source.connected, what="disconnected")
            api.apply(pod("web-2", "10.244.1.6"))  # a change while the agent cannot see
            down_since = run.source.synced_at
            await until(lambda: len(run.errors) == 1 and run.source.last_error, what="reported")
            await asyncio.sleep(1.0)  # retries go on, backing off
            assert run.source.state is before  # still serving the last good state
            assert run.source.synced_at == down_since  # and not claiming it is current
            assert "cannot reach the Kubernetes API server" in run.errors[0]
            assert len(run.errors) == 1  # once per outage, not at every retry
            api.start()
            await until(lambda: "shop/web-2" in ips(run.state), 3.0, "caught up")
            await until(lambda: run.source.connected, what="watching again")
            assert run.source.last_error is None
            assert api.list_count == lists  # history reached back: resumed, no relist
            assert time.time() - run.source.synced_at < 1  # type: ignore[operator]


@scenario
async def test_invalid_object_is_skipped_and_reported(tmp_path: Path) -> None:
    bad = pod("bad", "10.244.1.5")
    bad["status"]["podIP"] = "10.244.1.500"
    with server(namespace("shop"), pod("web-1", "10.244.1.6"), bad) as api:
        async with running(api, tmp_path) as run:
            assert list(ips(run.state)) == ["shop/web-1"]  # the rest of the cluster serves
            assert run.errors == [
                "Pod shop/bad: status.podIP: must be an IPv4 address, got \"10.244.1.500\""
                " (object skipped)"]
            assert set(run.source.rejected) == {("Pod", "shop", "bad")}
            # a second pod claiming a taken address is the one skipped
            api.apply(pod("twin", "10.244.1.6"))
            await until(lambda: len(run.errors) == 2, what="conflict reported")
            assert "Pod shop/twin: status.podIP: 10.244.1.6 is already used by Pod shop/web-1" \
                in run.errors[1]
            api.apply(pod("bad", "10.244.1.5"))  # fixed
            await until(lambda: "shop/bad" in ips(run.state), what="fixed pod")
            api.delete("Pod", "twin", "shop")
            await until(lambda: run.source.rejected == {}, what="nothing rejected")
            assert sorted(ips(run.state)) == ["shop/bad", "shop/web-1"]


@scenario
async def test_finished_pods_are_left_out(tmp_path: Path) -> None:
    done = pod("job-1", "10.244.1.5")
    done["status"]["phase"] = "Succeeded"
    with server(namespace("shop"), done, pod("web-1", "10.244.1.5")) as api:
        async with running(api, tmp_path) as run:
            assert list(ips(run.state)) == ["shop/web-1"]
            assert run.errors == []


# --- Istio's policies ---


def policy_names(state: RegistryState) -> list[str]:
    return sorted(p.key for p in state.authorization_policies) + sorted(p.key for p in state.peer_authentications)


def client_allowed(state: RegistryState) -> bool:
    """Whether the policies admit shop/client's identity to shop/web-1 over HBONE."""
    web = state.workload_by_key("shop/web-1")
    assert web is not None
    connection = Connection("10.244.1.9", Identity("cluster.local", "shop", "client"), web, 8080, "hbone")
    return Authorizer().admit(state, connection).allowed


@scenario
async def test_policies_are_listed_and_followed_at_v1(tmp_path: Path) -> None:
    with server(namespace("shop"), pod("web-1", "10.244.1.5"), deny_policy(), strict_mtls()) as api:
        async with running(api, tmp_path) as run:
            assert policy_names(run.state) == ["shop/deny-client", "shop/default"]
            assert run.state.peer_authentications[0].mode == "STRICT"
            assert not client_allowed(run.state)
            api.apply(deny_policy("deny-other", "cluster.local/ns/other/sa/default"))
            await until(lambda: "shop/deny-other" in policy_names(run.state), what="new policy")
            api.delete("AuthorizationPolicy", "deny-client", "shop")
            await until(lambda: client_allowed(run.state), what="deny-client deleted")
            assert policy_names(run.state) == ["shop/deny-other", "shop/default"]
            assert run.errors == [] and run.source.last_error is None


@scenario
async def test_policies_are_read_at_v1beta1_from_a_server_without_v1(tmp_path: Path) -> None:
    with KubeAPIServer(bookmark_interval=0.5, security_versions=("v1beta1",),
                       objects=(namespace("shop"), pod("web-1", "10.244.1.5"), deny_policy(version="v1beta1"))) as api:
        async with running(api, tmp_path) as run:
            assert policy_names(run.state) == ["shop/deny-client"]
            api.apply(strict_mtls("v1beta1"))
            await until(lambda: "shop/default" in policy_names(run.state), what="watched at v1beta1")
            assert run.source.connected and run.source.last_error is None


@scenario
async def test_without_istios_crds_the_registry_syncs_and_policies_follow_once_they_are_installed(
        tmp_path: Path) -> None:
    with KubeAPIServer(bookmark_interval=0.5, security_versions=(),
                       objects=(namespace("shop"), pod("web-1", "10.244.1.5"), deny_policy())) as api:
        async with running(api, tmp_path, discovery_interval=0.2) as run:  # synced and connected
            assert ips(run.state) == {"shop/web-1": "10.244.1.5"}
            assert policy_names(run.state) == []
            assert run.source.last_error is None  # not an error: a notice
            assert run.source.notice == (
                f"AuthorizationPolicy and PeerAuthentication not served by the Kubernetes API server {api.url} "
                "at security.istio.io/v1, security.istio.io/v1beta1 (Istio's CRDs not installed?): no Istio "
                "policies from the cluster; looking again every 0.2 s")
            assert run.errors == []
            api.serve_security_versions("v1", "v1beta1")
            await until(lambda: policy_names(run.state) == ["shop/deny-client"], what="policies once served")
            await until(lambda: run.source.connected and run.source.notice is None, what="watching them")
            api.apply(strict_mtls())
            await until(lambda: "shop/default" in policy_names(run.state), what="watched")


@scenario
async def test_a_malformed_version_of_a_policy_leaves_the_last_good_one_in_force(tmp_path: Path) -> None:
    with server(namespace("shop"), pod("web-1", "10.244.1.5"), deny_policy(), strict_mtls()) as api:
        async with running(api, tmp_path) as run:
            in_force = run.state.authorization_policies
            api.apply(malformed(deny_policy()))
            await until(lambda: len(run.errors) == 1, what="rejection reported")
            assert run.errors == [
                'AuthorizationPolicy shop/deny-client: spec.action: "AUDIT" is not supported: amesh enforces ALLOW '
                "and DENY at L4 (as Istio's ztunnel; AUDIT and CUSTOM need a waypoint) "
                "(the version before it stays in force)"]
            assert run.source.rejected == {("AuthorizationPolicy", "shop", "deny-client"): run.errors[0]}
            assert run.source.last_error == f"rejected {run.errors[0]}"
            # a later change elsewhere rebuilds the state: the DENY still denies
            api.apply(pod("web-2", "10.244.1.6"))
            await until(lambda: "shop/web-2" in ips(run.state), what="another change")
            assert run.state.authorization_policies == in_force and not client_allowed(run.state)
            peer = strict_mtls()
            peer["spec"]["mtls"]["mode"] = "OFF"
            api.apply(peer)
            await until(lambda: len(run.errors) == 2, what="PeerAuthentication rejection reported")
            assert run.state.peer_authentications[0].mode == "STRICT"
            assert len(run.states) == 2  # nothing the mesh reads changed but web-2
            # deleted: only now is it gone
            api.delete("AuthorizationPolicy", "deny-client", "shop")
            await until(lambda: client_allowed(run.state), what="deleted policy gone")
            assert ("AuthorizationPolicy", "shop", "deny-client") not in run.source.rejected
            # a malformed new policy was never in force: skipped and reported
            api.apply(malformed(deny_policy("new")))
            await until(lambda: len(run.errors) == 3, what="new policy rejected")
            assert run.errors[2].startswith("AuthorizationPolicy shop/new: spec.action:")
            assert run.errors[2].endswith("(object skipped)")
            assert client_allowed(run.state) and policy_names(run.state) == ["shop/default"]
            # fixed: the new version is in force
            api.apply(deny_policy("new"))
            await until(lambda: not client_allowed(run.state), what="fixed policy in force")


@scenario
async def test_policies_go_with_their_crds(tmp_path: Path) -> None:
    with server(namespace("shop"), pod("web-1", "10.244.1.5"), deny_policy()) as api:
        async with running(api, tmp_path, discovery_interval=0.2) as run:
            assert policy_names(run.state) == ["shop/deny-client"]
            api.serve_security_versions()  # Istio's CRDs removed
            api.cut_watches()  # as the API server ends the watches of a removed CRD
            await until(lambda: policy_names(run.state) == [], what="policies gone")
            assert "not served by the Kubernetes API server" in str(run.source.notice)
            await until(lambda: run.source.connected, what="the other kinds watched again")
            assert ips(run.state) == {"shop/web-1": "10.244.1.5"}
