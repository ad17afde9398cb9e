"""The worker model's pure parts: the channel's framing, the supervisor's decisions (restart
backoff, whose sockets the sockmap holds after a death), a worker's credential replica (real
mTLS on loopback between the agent's manager and a replica), id numbering and limit shares."""

from __future__ import annotations

import asyncio
import pickle
import socket
from pathlib import Path

import pytest

from agent.config import MAX_DEFAULT_WORKERS, AgentConfig, default_workers
from agent.workers import RestartBackoff, sockmap_worker_after
from registry.model import RegistryState
from registry.replica import Replica, state_delta
from ztunnel.channel import (MAX_FRAME, Channel, ChannelError, Credentials, FrameDecoder, Setup, Stop, StateUpdate,
                             encode)
from ztunnel.connections import ConnectionTable
from ztunnel.identity import CertificateManager, CredentialReplica, FileCA, IssueError, peer_identity
from ztunnel.limits import worker_share

from tests.unit.test_identity import ALICE, BOB, connect, peer_der, ping, serving


def test_frames_come_out_whole_however_the_stream_splits_them() -> None:
    messages = [Setup(AgentConfig(node="node-1", workers=2), 1), Stop(2.5), StateUpdate(state_delta(None, RegistryState()))]
    stream = b"".join(encode(m) for m in messages)
    for size in (1, 3, 7, len(stream)):
        decoder, out = FrameDecoder(), []
        for start in range(0, len(stream), size):
            out.extend(decoder.feed(stream[start:start + size]))
        assert out == messages and decoder.pending == 0


def test_a_partial_frame_waits_for_the_rest() -> None:
    decoder = FrameDecoder()
    frame = encode(Stop(1.0))
    assert decoder.feed(frame[:-1]) == [] and decoder.pending == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [Stop(1.0)]


def test_a_frame_over_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(ChannelError, match="over the limit"):
        FrameDecoder().feed((MAX_FRAME + 1).to_bytes(4, "big") + b"x")


def test_a_channel_carries_messages_both_ways_and_ends_with_eof() -> None:
    async def exchange() -> None:
        left, right = socket.socketpair()
        agent, worker = Channel(left), Channel(right)
        big = b"x" * (3 << 20)  # larger than one read and than the socket's buffer
        sent = asyncio.gather(agent.send(Stop(0.5)), agent.send(StateUpdate(big)))  # type: ignore[arg-type]
        first, second = await worker.receive(), await worker.receive()
        await sent
        assert first == Stop(0.5) and second.delta == big
        agent.close()
        with pytest.raises(EOFError):
            await worker.receive()
        worker.close()

    asyncio.run(exchange())


def test_the_placeholder_replica_takes_the_whole_state() -> None:
    state = RegistryState()
    replica = Replica()
    assert replica.apply(pickle.loads(pickle.dumps(state_delta(None, state)))) == state == replica.state


def test_a_stable_worker_restarts_at_once_and_a_crash_loop_backs_off() -> None:
    backoff = RestartBackoff(initial=0.5, maximum=4.0, stable_after=10.0)
    assert backoff.next(0, ran_for=60.0) == (0.0, 1)
    assert backoff.next(1, ran_for=0.2) == (0.5, 2)
    assert backoff.next(2, ran_for=0.2) == (1.0, 3)
    assert backoff.next(5, ran_for=0.2) == (4.0, 6)  # capped
    assert backoff.next(5, ran_for=10.0) == (0.0, 1)  # a stable run starts the count again


def test_the_sockmap_moves_only_off_a_dead_worker_and_only_to_a_live_one() -> None:
    assert sockmap_worker_after(current=0, dead=1, live=[0, 2]) == 0  # it held another's: unchanged
    assert sockmap_worker_after(current=0, dead=0, live=[2, 1]) == 1  # the lowest live worker's
    assert sockmap_worker_after(current=0, dead=0, live=[]) == 0  # none lives: the dead one's queue SYNs


def test_worker_ids_interleave_and_stay_unique_per_node() -> None:
    tables = [ConnectionTable(first_id=k + 1, id_step=3) for k in range(3)]
    ids = [tables[k].open("10.0.0.1", 1000 + n, "10.0.0.2:80").id for n in range(3) for k in range(3)]
    assert sorted(ids) == list(range(1, 10))
    assert [(i - 1) % 3 for i in ids] == [0, 1, 2] * 3  # an id names its worker


def test_limits_are_shared_out_rounding_up() -> None:
    assert worker_share(10, 1) == 10
    assert worker_share(10, 4) == 3
    assert worker_share(1, 8) == 1
    assert default_workers() <= MAX_DEFAULT_WORKERS and default_workers() >= 1


def test_a_replica_serves_mtls_with_the_managers_credentials(tmp_path: Path) -> None:
    manager = CertificateManager(FileCA.load_or_create(tmp_path / "ca"))
    changes: list[None] = []
    manager.on_change.append(lambda: changes.append(None))
    manager.set_identities([ALICE, BOB])
    assert len(changes) == 2
    replica = CredentialReplica("cluster.local")
    with pytest.raises(IssueError, match="no certificate"):
        replica.client_context(ALICE)
    replica.update(pickle.loads(pickle.dumps(Credentials(manager.credentials()))).held)
    assert replica.serial(ALICE) == manager.serial(ALICE)
    context = replica.server_context(BOB)
    replica.update(manager.credentials())
    assert replica.server_context(BOB) is context  # unchanged credentials keep their contexts

    async def session() -> None:
        async with serving(replica.server_context(BOB)) as (port, peers):
            reader, writer = await connect(port, manager.client_context(ALICE))
            await ping(reader, writer)
            assert peer_identity(peer_der(writer), "cluster.local") == BOB
            assert peer_identity(peers[0], "cluster.local") == ALICE
            writer.close()

    asyncio.run(session())
    manager.renew(BOB)
    replica.update(manager.credentials())
    assert replica.serial(BOB) == manager.serial(BOB) and replica.server_context(BOB) is not context
    manager.set_identities([ALICE])
    replica.update(manager.credentials())
    with pytest.raises(IssueError):
        replica.serial(BOB)
