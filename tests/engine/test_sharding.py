"""Sharding (`trio_cluster._engine._sharding`): shard groups, the split between
runners, failover, graceful leave, rebalancing, lost lock sessions."""

from __future__ import annotations

from collections.abc import Collection
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import RunnerInfo, StorageSession
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import (
    Add,
    Counter,
    Elsewhere,
    Get,
    Ledger,
    PatchingStorage,
    config,
    open_clocked_runner,
    open_pair,
)
from ..memory_cluster import Tally, open_cluster


async def test_a_second_group_is_served_when_configured(autojump_clock):
    cfg = config(shard_groups=("default", "batch"))
    async with tc.open_runner(entities=[Elsewhere], config=cfg) as runner:
        assert await runner.client(Elsewhere)("x").ping(Get()) == "pong"
        assert runner.statistics().shards == 16


async def test_shards_are_split_between_runners(autojump_clock):
    async with AsyncExitStack() as stack:
        first, second = await open_pair(stack, MemoryStorage())
        assert not set(first.served_shards()) & set(second.served_shards())
        assert first.statistics().runners == 2


async def test_lost_lock_session_stops_shards_at_once(autojump_clock):
    storage = MemoryStorage()
    cfg = config(lease_duration=30.0, lease_refresh_interval=10.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        await runner.wait_shards_acquired()
        before = trio.current_time()
        storage.expire_session(str(runner.address))
        await trio.testing.wait_all_tasks_blocked()
        # Not at the next refresh (10 s away): at once.
        assert runner.statistics().failovers == 8
        assert trio.current_time() == before
        # It comes back at new epochs on its next poll.
        await runner.wait_shards_acquired()
        assert trio.current_time() - before <= 0.3


async def test_killed_runner_entities_answer_again_within_a_second(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        caller = cluster.runners[1]
        moved = [
            f"e{i}" for i in range(100) if cluster.owner(f"e{i}") is cluster.runners[3]
        ]
        assert moved
        for entity in moved:
            await caller.client(Tally)(entity).add(Add(1))
        killed_at = trio.current_time()
        cluster.kill(3)
        answered: dict[str, float] = {}

        async def call(entity: str) -> None:
            where = await caller.client(Tally)(entity).add(Add(1))
            assert where.runner != "127.0.0.1:3"
            answered[entity] = trio.current_time() - killed_at

        async with trio.open_nursery() as nursery:
            for entity in moved:
                nursery.start_soon(call, entity)
        assert max(answered.values()) < 1.0
        await cluster.settled()


async def test_graceful_leave_hands_shards_over_at_once(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        leaving = cluster.runners[2]
        entity = cluster.remote_id(cluster.runners[1])
        assert cluster.owner(entity) is leaving
        stopped_at = trio.current_time()
        cluster.stop(2)
        where = await cluster.runners[1].client(Tally)(entity).add(Add(1))
        assert where.runner == "127.0.0.1:1"
        assert trio.current_time() - stopped_at < 1.0
        assert cluster.runners[1].statistics().failovers == 0


async def test_join_rebalances_without_serving_a_shard_twice(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        clashes: list[str] = []

        async def watch() -> None:
            while True:
                served = [set(r.served_shards()) for r in cluster.runners.values()]
                clashes.extend(
                    str(sorted(mine & theirs))
                    for i, mine in enumerate(served)
                    for theirs in served[i + 1 :]
                    if mine & theirs
                )
                await trio.sleep(0.001)

        watcher = await stack.enter_async_context(trio.open_nursery())
        stack.callback(watcher.cancel_scope.cancel)
        watcher.start_soon(watch)
        caller = cluster.runners[1]
        ids = [f"e{i}" for i in range(40)]
        for entity in ids:
            await caller.client(Tally)(entity).add_persisted(Add(1))
        await cluster.start(2)
        await cluster.start(3)
        await cluster.settled()
        for entity in ids:
            assert (await caller.client(Tally)(entity).add_persisted(Add(1))).total >= 1
        assert clashes == []

        shards = [r.statistics().shards for r in cluster.runners.values()]
        assert sorted(shards) in ([2, 3, 3], [2, 2, 4])


@attrs.frozen
class Slow:
    key: str
    seconds: float


class Journal(tc.Entity):
    type_name = "cluster.Journal"
    applied: list[str] = []  # noqa: RUF012 - shared by every instance, on purpose

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def write(self, msg: Slow) -> str:
        await trio.sleep(msg.seconds)
        Journal.applied.append(msg.key)
        return str(tc.current_runner().address)


async def test_rebalance_drains_in_flight_persisted_work_and_bumps_epochs(
    autojump_clock,
):
    Journal.applied = []
    async with AsyncExitStack() as stack:
        storage, network = MemoryStorage(), MemoryNetwork()
        runners: list[tc.Runner] = []
        for port in (1, 2):
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            runners.append(
                await nursery.start(
                    partial(
                        tc.serve_runner,
                        [Journal],
                        config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
                        storage,
                        MemoryTransport(network),
                    )
                )
            )
            if port == 1:
                await runners[0].wait_shards_acquired()
        first = runners[0]
        before = {o.shard: o.epoch for o in await owners(storage)}
        # Runner 1 alone held every shard; runner 2 takes some: each moved
        # shard's in-flight write finishes on runner 1 (drained) or runs
        # once on runner 2, never both.
        keys = [f"k{i}" for i in range(20)]
        results: dict[str, str] = {}

        async def write(key: str) -> None:
            results[key] = await first.client(Journal)(key).write(Slow(key, 2.0))

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(write, key)
        assert sorted(results) == sorted(keys)
        assert sorted(Journal.applied) == sorted(keys)  # each applied exactly once
        after = {o.shard: o.epoch for o in await owners(storage)}
        moved = [s for s in after if after[s] != before.get(s)]
        assert moved, "runner 2 took no shard"
        assert all(after[s] == before[s] + 1 for s in moved if s in before)


async def owners(storage: MemoryStorage) -> list[Any]:
    async with storage.open_session(name="observer", lease_duration=5.0) as session:
        return [o for o in await session.runners.shard_owners() if o.runner is not None]


class HangingRefreshStorage(PatchingStorage):
    """MemoryStorage whose lease refreshes hang from ``hang_at`` on (a frozen
    lock connection), and which records every release call."""

    def __init__(self, hang_at: float) -> None:
        super().__init__()
        self.hang_at = hang_at
        self.releases: list[list[tc.ShardId]] = []

    def patch_session(self, session: StorageSession) -> None:
        runners = session.runners
        refresh, release = runners.refresh, runners.release

        async def hanging_refresh(shards: Collection[tc.ShardId]) -> set[tc.ShardId]:
            if trio.current_time() >= self.hang_at:
                await trio.sleep_forever()
            return await refresh(shards)

        async def recorded_release(shards: Collection[tc.ShardId]) -> None:
            self.releases.append(list(shards))
            await release(shards)

        runners.refresh = hanging_refresh  # type: ignore[method-assign]
        runners.release = recorded_release  # type: ignore[method-assign]


async def test_shards_whose_leases_lapse_together_are_released_together(
    autojump_clock,
):
    # Regression: each lapsed shard released its lock with a storage call of
    # its own (one task and one statement per shard when a whole runner's
    # leases lapse at once).
    storage = HangingRefreshStorage(hang_at=3.0)
    async with tc.open_runner(
        entities=[Counter], storage=storage, config=config()
    ) as runner:
        await runner.wait_shards_acquired()
        assert len(runner.served_shards()) == 8
        with trio.fail_after(30):
            while not storage.releases:  # noqa: ASYNC110
                await trio.sleep(0.1)
        # The eight leases lapsed at one deadline: one release, of all eight.
        assert [len(shards) for shards in storage.releases] == [8]


async def test_a_registered_runner_the_assignment_cannot_use_is_left_out(
    autojump_clock,
):
    # Regression (issue 11, item 6): a registration read back from storage
    # with a weight or groups no runner would register (written by another
    # program, or by hand) raised out of the assignment poll, and every
    # runner of the cluster died, on every restart.
    storage = MemoryStorage()
    async with open_clocked_runner([Counter], config(), storage) as runner:
        await runner.wait_shards_acquired()
        async with storage.open_session(name="odd", lease_duration=60) as odd:
            odd_address = tc.RunnerAddress("10.9.9.9", 1)
            await odd.runners.register(
                RunnerInfo(odd_address, ("default",), weight=0.0)
            )
            await trio.sleep(10)  # many assignment polls
            assert odd_address in {r.address for r in runner.live_runners()}
            assert len(runner.served_shards()) == 8  # it was left out
            assert await runner.client(Counter)("c").add(Add(2)) == 2
