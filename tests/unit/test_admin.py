"""The admin API against hostile requests: the real aiohttp app of a real (not started) agent,
served on loopback by aiohttp's test server. Every answer is a 4xx naming the problem, never a 500."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.admin import MAX_BODY, AdminServer
from agent.config import AgentConfig
from agent.node import NodeAgent

REGISTRY = """\
apiVersion: v1
kind: Service
metadata: {name: billing, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: billing}
  ports: [{port: 80, targetPort: 8080}]
"""
VM = {"name": "billing", "namespace": "shop", "address": "192.168.7.20", "port": 8080}


@pytest.fixture
def agent(tmp_path: Path) -> NodeAgent:
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY)
    agent = NodeAgent(AgentConfig(node="node-1", registry_file=registry, ca_dir=tmp_path / "ca"))
    agent.registry.load()
    return agent


def against(agent: NodeAgent, check: Callable[[TestClient], Awaitable[None]]) -> None:
    """Runs `check` with a client of the agent's admin app on a loopback port."""
    async def run() -> None:
        async with TestClient(TestServer(AdminServer(agent).app, host="127.0.0.1")) as client:
            await check(client)
    asyncio.run(run())


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


async def chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("body, headers, status, error", [
    (deep(50_000), {}, 413, "the request body is larger than 64 KiB"),  # the attack: 500 before
    (deep(30_000), {}, 400, "the request body nests JSON too deeply"),
    (b'{"name": ' + deep(2_000) + b"}", {}, 400, "the request body nests JSON too deeply"),
    (deep(900), {}, 400, "the request body must be a JSON object"),
    (b"{" * 30_000, {}, 400, "the request body must be JSON: "),
    (b'{"port": ' + b"9" * 50_000 + b"}", {}, 400, "the request body must be JSON: Exceeds the limit"),
    (b'{"name": "\xff"}', {}, 400, "the request body must be JSON: "),
    (b"", {}, 400, "the request body must be JSON: Expecting value"),
    (json.dumps({**VM, "pad": "x" * MAX_BODY}).encode(), {}, 413, "the request body is larger than 64 KiB"),
    (json.dumps({**VM, "address": "127.0.0.1", "port": 15000}).encode(), {"Content-Type": "text/plain; charset=nope"},
     400, "address: 127.0.0.1 is a loopback address; a registration must name an address other nodes can reach; "
          "port: 15000 is one of the ztunnel's own ports"),
    (json.dumps({**VM, "address": 2130706433}).encode(), {}, 400,
     "address: must be an IPv4 address written as a string"),
])
def test_a_hostile_registration_body_answers_4xx_and_changes_nothing(agent, body, headers, status, error):
    async def check(client: TestClient) -> None:
        response = await client.post("/registrations", data=body, headers=headers)
        assert response.status == status
        assert (await response.json())["error"].startswith(error)
        assert len(agent.registrations) == 0
    against(agent, check)


def test_a_body_too_large_is_refused_also_without_a_content_length(agent):
    async def check(client: TestClient) -> None:
        response = await client.post("/registrations", data=chunks(b" " * (4 * MAX_BODY)))
        assert response.status == 413 and "larger than 64 KiB" in (await response.json())["error"]
    against(agent, check)


@pytest.mark.parametrize("method, path, status, error", [
    ("POST", "/registrations/shop/billing/heartbeat?instance=192.168.7.20", 400, "instance: must be ADDRESS:PORT"),
    ("POST", "/registrations/shop/billing/heartbeat?instance=" + "9" * 7000, 400, "instance: must be ADDRESS:PORT"),
    ("DELETE", "/registrations/shop/billing?instance=192.168.7.20:99999999", 400, "instance: must be ADDRESS:PORT"),
    ("DELETE", "/registrations/shop/" + "x" * 7000, 404, "shop/xxxx"),
    ("GET", "/flows?limit=\u00b2", 400, "limit must be a positive integer"),
    ("GET", "/flows?limit=" + "9" * 5000, 400, "limit must be a positive integer"),
])
def test_hostile_query_parameters_and_paths_answer_4xx(agent, method, path, status, error):
    async def check(client: TestClient) -> None:
        assert (await client.post("/registrations", json=VM)).status == 201
        response = await client.request(method, path)
        assert response.status == status
        text = await response.text()
        assert error in text and len(text) < 400
    against(agent, check)


def test_a_registration_made_through_the_api_is_looked_up_and_routed(agent):
    async def check(client: TestClient) -> None:
        assert (await client.post("/registrations", json=VM)).status == 201
        found = await (await client.get("/lookup/shop/billing")).json()
        assert [(e["ip"], e["ports"], e["source"]) for e in found["endpoints"]] == [
            ("192.168.7.20", {"": 8080}, "registration")]
        assert agent.state.service_by_ip("10.96.0.30").endpoints[0].ip == "192.168.7.20"
        beaten = await client.post("/registrations/shop/billing/heartbeat?instance=192.168.7.20:8080")
        assert beaten.status == 200 and len(await beaten.json()) == 1
        assert (await client.delete("/registrations/shop/billing")).status == 200
        assert agent.state.service_by_ip("10.96.0.30").endpoints == ()
    against(agent, check)


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of the kinds a hostile client sends: the right fields with wrong values."""
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**64, 1.5, float("inf"), 2130706433])
    if kind in (1, 2):
        return rng.choice(["", "billing", "127.0.0.1", "192.168.7.20", "10.0.0.1:80", "30s", "\u0000", "é" * 70,
                           "1e309", "-5s", "224.0.0.1", "Billing"])
    if kind in (3, 4):
        return rng.choice([8080, 15008, 65536, "8080", 30, "1h", "0.0.0.0"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    fields = list(VM) + ["ttl", "version", "service_account", "extra"]
    return {rng.choice(fields): random_json(rng, depth + 1) for _ in range(rng.randrange(7))}


def test_random_bodies_never_answer_500(agent):
    rng = random.Random(11)

    async def check(client: TestClient) -> None:
        for _ in range(300):
            body = random_json(rng)
            if isinstance(body, dict) and rng.random() < 0.7:
                body = {**VM, **body}  # mostly good fields, some of them spoilt
            text = json.dumps(body)  # NaN and Infinity included, as Python's json reads them
            response = await client.post("/registrations", data=text)
            assert response.status in (201, 400, 409), (text, response.status, await response.text())
            assert "error" in await response.json() or response.status == 201
    against(agent, check)


def test_an_agent_following_the_api_server_refuses_a_loopback_registration_pointing_to_workload_entries(tmp_path):
    agent = NodeAgent(AgentConfig(node="node-1", kubeconfig=str(tmp_path / "kubeconfig"), ca_dir=tmp_path / "ca"))

    async def check(client: TestClient) -> None:
        response = await client.post("/registrations", json=VM)
        assert response.status == 400
        error = (await response.json())["error"]
        assert error.startswith("this agent reads its registry from the Kubernetes API server")
        assert "ameshctl register NAME --address ADDRESS --port PORT --kubeconfig FILE --ttl 30s" in error
        assert "WorkloadEntry" in error and len(agent.registrations) == 0
    against(agent, check)
