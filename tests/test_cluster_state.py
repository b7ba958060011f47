"""`current_cluster_state` (`trio_cluster._cluster_state`): the runner, entity,
shard epoch and singleton, on every path entity code runs on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

import attrs
import pytest
import trio
import trio.lowlevel

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import config, runner_config


@attrs.frozen
class Note:
    label: str


class Probe(tc.Entity):
    """Records `current_cluster_state()` under a label, on each path."""

    type_name = "state.Probe"
    seen: ClassVar[list[tuple[str, tc.ClusterState]]] = []

    @classmethod
    def record(cls, label: str) -> None:
        cls.seen.append((label, tc.current_cluster_state()))

    async def on_start(self) -> None:
        Probe.record("on_start")

    async def on_stop(self) -> None:
        Probe.record("on_stop")

    @tc.rpc
    async def quick(self, msg: Note) -> None:
        """Cannot suspend: runs in one step, in the caller's task."""
        Probe.record(msg.label)

    @tc.rpc
    async def slow(self, msg: Note) -> None:
        """Suspends: runs in the caller's task under a cancel scope (inline),
        or in a task of the shard (sent with ``discard``)."""
        await trio.lowlevel.checkpoint()
        Probe.record(msg.label)

    @tc.rpc(persisted=True)
    async def kept(self, msg: Note) -> None:
        await trio.lowlevel.checkpoint()
        Probe.record(msg.label)

    @tc.stream
    async def items(self, msg: Note) -> AsyncIterator[int]:
        Probe.record(msg.label)
        yield 1


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    Probe.seen.clear()


def states(label: str) -> list[tc.ClusterState]:
    return [state for seen, state in Probe.seen if seen == label]


async def test_entity_code_sees_its_runner_address_and_shard_epoch(autojump_clock):
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        await runner.wait_shards_acquired()
        probe = runner.client(Probe)("p1")
        await probe.quick(Note("inline, one step"))
        await probe.slow(Note("inline, in a scope"))
        await probe.slow.discard(Note("detached"))
        await probe.kept(Note("persisted"))
        async with probe.items(Note("stream")) as items:
            assert [item async for item in items] == [1]
        await trio.sleep(0.1)  # the detached one has run
        epoch = runner.served_shards()[probe.address.shard]
        expected = tc.ClusterState(
            runner=runner.address,
            address=probe.address,
            shard_epoch=epoch,
            singleton=None,
        )
        labels = [
            "on_start",
            "inline, one step",
            "inline, in a scope",
            "detached",
            "persisted",
            "stream",
        ]
        for label in labels:
            assert states(label) == [expected], label
    assert states("on_stop") == [expected]


async def test_singletons_and_their_tasks_see_their_name_and_epoch(autojump_clock):
    seen: list[tc.ClusterState] = []
    called = trio.Event()

    async def watch() -> None:
        seen.append(tc.current_cluster_state())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _record(seen))
        # Entity code it calls is the entity's, not the singleton's.
        await tc.current_runner().client(Probe)("from-singleton").quick(Note("x"))
        called.set()
        await trio.sleep_forever()

    singleton = tc.Singleton("state.watch", watch)
    async with tc.open_runner(
        entities=[Probe], config=config(), singletons=[singleton]
    ) as runner:
        with trio.fail_after(5):
            await called.wait()
        shard = singleton.shard(runner.config.shards_per_group)
        expected = tc.ClusterState(
            runner=runner.address,
            address=None,
            shard_epoch=runner.served_shards()[shard],
            singleton="state.watch",
        )
        assert seen == [expected, expected]
        (from_singleton,) = states("x")
        assert from_singleton.singleton is None
        assert from_singleton.address == runner.client(Probe)("from-singleton").address


async def _record(seen: list[tc.ClusterState]) -> None:
    await trio.lowlevel.checkpoint()
    seen.append(tc.current_cluster_state())


async def test_tasks_of_the_runner_see_no_entity(autojump_clock):
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        plain = tc.ClusterState(
            runner=runner.address, address=None, shard_epoch=None, singleton=None
        )
        assert tc.current_cluster_state() == plain
        seen: list[tc.ClusterState] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_record, seen)
        assert seen == [plain]
        # Back in the caller after an entity call: no entity.
        await runner.client(Probe)("p").quick(Note("y"))
        assert tc.current_cluster_state() == plain


async def test_outside_a_runner_it_raises():
    with pytest.raises(tc.NoCurrentRunnerError):
        tc.current_cluster_state()


async def test_the_epoch_is_the_new_lease_after_the_shard_moves(autojump_clock):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Probe], config=config(), storage=storage
    ) as first:
        await first.client(Probe)("p").quick(Note("first"))
        first_epoch = states("first")[0].shard_epoch
    async with tc.open_runner(
        entities=[Probe], config=config(), storage=storage
    ) as second:
        await second.client(Probe)("p").quick(Note("second"))
        (state,) = states("second")
        assert state.address is not None
        assert first_epoch is not None
        assert state.shard_epoch == second.served_shards()[state.address.shard]
        assert state.shard_epoch > first_epoch


async def test_a_call_from_another_runner_sees_the_owner(autojump_clock):
    storage, network = MemoryStorage(), MemoryNetwork()

    def runner(port: int) -> AbstractAsyncContextManager[tc.Runner]:
        return tc.open_runner(
            entities=[Probe],
            config=runner_config(port),
            storage=storage,
            transport=MemoryTransport(network),
        )

    async with runner(1) as first, runner(2) as second:
        with trio.fail_after(5):
            while first.statistics().runners < 2 or not second.served_shards():  # noqa: ASYNC110
                await trio.sleep(0.1)
        client = first.client(Probe)
        probe = next(
            client(f"p{n}")
            for n in range(100)
            if first.owner_of(client(f"p{n}")) == second.address
        )
        await probe.slow(Note("remote"))
        (state,) = states("remote")
        assert state == tc.ClusterState(
            runner=second.address,
            address=probe.address,
            shard_epoch=second.served_shards()[probe.address.shard],
            singleton=None,
        )


async def test_the_state_carries_the_call_metadata(autojump_clock):
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        probe = runner.client(Probe)("p1")
        with tc.with_metadata(tenant="acme"):
            assert tc.current_cluster_state().metadata == {"tenant": "acme"}
            await probe.quick(Note("with metadata"))
            await probe.kept(Note("persisted, with metadata"))
        await probe.quick(Note("without"))
        assert dict(states("with metadata")[0].metadata) == {"tenant": "acme"}
        persisted = states("persisted, with metadata")[0]
        assert dict(persisted.metadata) == {"tenant": "acme"}
        assert dict(states("without")[0].metadata) == {}
