"""Sharding (`trio_cluster._engine._sharding`): shard groups, the split between
runners, failover, graceful leave, rebalancing, lost lock sessions."""

from __future__ import annotations

import itertools
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
    RefreshPatchingStorage,
    config,
    open_clocked_runner,
    open_pair,
)
from ..memory_cluster import Cluster, Nap, Tally, open_cluster


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


async def test_a_slow_handler_holds_up_only_its_own_shard_when_its_runner_leaves(
    autojump_clock,
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        leaving, staying = cluster.runners[2], cluster.runners[1]
        shard_of = staying.client(Tally).address_of
        mine = [f"e{i}" for i in range(200) if cluster.owner(f"e{i}") is leaving]
        napping = mine[0]
        other = next(e for e in mine if shard_of(e).shard != shard_of(napping).shard)
        Tally.naps_finished = 0
        napped_at: list[float] = []

        async def nap() -> None:
            await leaving.client(Tally)(napping).nap(Nap(8.0))
            napped_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(nap)
            await trio.sleep(0.5)
            stopped_at = trio.current_time()
            cluster.stop(2)
            where = await staying.client(Tally)(other).add(Add(1))
            answered = trio.current_time() - stopped_at
        assert where.runner == "127.0.0.1:1"
        # Its shard was taken over while the other one still drained (the
        # whole runner's stop took as long as the nap).
        assert answered < 2.0
        assert napped_at
        assert napped_at[0] - stopped_at > 7.0
        assert Tally.naps_finished == 1
        assert staying.statistics().failovers == 0


async def test_a_runner_displaced_from_its_address_leaves_the_newer_registration_alone(
    autojump_clock,
):
    storage = MemoryStorage()
    address = tc.RunnerAddress("127.0.0.1", 1)
    async with (
        storage.open_session(name="newer", lease_duration=30.0) as newer,
        AsyncExitStack() as stack,
    ):
        network = MemoryNetwork()
        await stack.enter_async_context(
            tc.open_runner(
                entities=[Counter],
                config=config(runner_address=address),
                storage=storage,
                transport=MemoryTransport(network),
            )
        )
        # A newer process registers at the same address (this one was
        # frozen, say): the newest registration wins.
        machine_id = await newer.runners.register(
            RunnerInfo(address=address, groups=("default",))
        )
        await stack.aclose()  # the displaced runner shuts down
        [live] = await newer.runners.live_runners()
        assert (live.groups, live.machine_id) == (("default",), machine_id)


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


class HangingRefreshStorage(RefreshPatchingStorage):
    """MemoryStorage whose lease refreshes hang from ``hang_at`` on (a frozen
    lock connection), and which records every release call."""

    def __init__(self, hang_at: float) -> None:
        super().__init__()
        self.hang_at = hang_at
        self.releases: list[list[tc.ShardId]] = []

    def patch_session(self, session: StorageSession) -> None:
        super().patch_session(session)
        runners = session.runners
        release = runners.release

        async def recorded_release(shards: Collection[tc.ShardId]) -> None:
            self.releases.append(list(shards))
            await release(shards)

        runners.release = recorded_release  # type: ignore[method-assign]

    async def refreshed(
        self, answer: tuple[set[tc.ShardId], list[RunnerInfo]]
    ) -> tuple[set[tc.ShardId], list[RunnerInfo]]:
        # Storage renewed the session; the answer never comes back.
        if trio.current_time() >= self.hang_at:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return answer


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


class Drained(tc.Entity):
    """Handlers that outlive several leases; each run is logged with its
    runner and its interval."""

    type_name = "cluster.Drained"
    runs: list[tuple[str, str, float, float | None]] = []  # noqa: RUF012

    async def _work(self, msg: Slow) -> str:
        here = str(tc.current_runner().address)
        run = [self.id, here, trio.current_time(), None]
        try:
            await trio.sleep(msg.seconds)
            run[3] = trio.current_time()
        finally:
            Drained.runs.append((run[0], run[1], run[2], run[3]))  # type: ignore[arg-type]
        return here

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def write(self, msg: Slow) -> str:
        return await self._work(msg)

    @tc.rpc
    async def read(self, msg: Slow) -> str:
        return await self._work(msg)


async def start_drained(
    hosts: trio.Nursery,
    storage: MemoryStorage,
    network: MemoryNetwork,
    port: int,
    **extra: Any,
) -> tc.Runner:
    """A runner of `Drained` on port ``port``, with a long termination
    timeout (30 s), served in ``hosts``."""
    runner: tc.Runner = await hosts.start(
        partial(
            tc.serve_runner,
            [Drained],
            config(
                runner_address=tc.RunnerAddress("127.0.0.1", port),
                entity_termination_timeout=30.0,
            ),
            storage,
            MemoryTransport(network),
            **extra,
        )
    )
    return runner


async def test_a_draining_shard_keeps_its_lease_until_its_handlers_finish(
    autojump_clock,
):
    # Regression (issue 11, item 1): a shard that moved away stopped having
    # its lease extended, so while its handlers still ran (gracefully, within
    # the termination timeout) the lease lapsed: they were cut at one lease,
    # the lock was freed, and the newcomer ran the same entities at once.
    Drained.runs = []
    async with AsyncExitStack() as stack:
        storage, network = MemoryStorage(), MemoryNetwork()
        hosts = await stack.enter_async_context(trio.open_nursery())
        stack.callback(hosts.cancel_scope.cancel)
        start = partial(start_drained, hosts, storage, network)

        first = await start(1)
        await first.wait_shards_acquired()
        work = 12.0  # more than two leases (5 s), less than the timeout
        results: dict[str, str] = {}

        async def call(key: str, persisted: bool, turn: int = 1) -> None:
            entity = first.client(Drained)(key)
            message = Slow(f"{key}/{turn}", work)
            results[key] = await (entity.write if persisted else entity.read)(message)

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(call, f"w{i}", True)
                nursery.start_soon(call, f"r{i}", False)
            await trio.sleep(0.5)
            second = await start(2)
            # A second round while the first still drains: the newcomer must
            # not start these before the old owner's runs ended.
            await trio.sleep(1.0)
            for i in range(16):
                nursery.start_soon(call, f"w{i}", True, 2)
        await second.wait_shards_acquired()
        moved = [
            key
            for key in results
            if first.client(Drained).address_of(key).shard in second.served_shards()
        ]
        assert moved, "runner 2 took no entity"
        # Every first-round run finished where it started, uncut.
        first_round = [run for run in Drained.runs if run[2] < 0.5]
        assert len(first_round) == 32
        assert all(end is not None for *_, end in first_round)
        assert all(runner == "127.0.0.1:1" for _, runner, _, _ in first_round)
        # No entity ran on two runners at once.
        for key in moved:
            spans = sorted(
                (start, end, runner)
                for entity, runner, start, end in Drained.runs
                if entity == key
            )
            for (_, end, _), (begin, _, _) in itertools.pairwise(spans):
                assert end is not None, (key, spans)
                assert end <= begin, (key, spans)
        assert first.statistics().failovers == 0


class LosingOnAcquireStorage(PatchingStorage):
    """MemoryStorage that ends a runner's lock session right after its first
    acquisition committed, before the runner starts the shards it got (the
    lock session dropped while the answer was on its way)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.lost_after: list[tc.ShardId] = []

    def patch_session(self, session: StorageSession) -> None:
        runners = session.runners
        acquire = runners.acquire
        name = self.name

        async def losing_acquire(shards: Collection[tc.ShardId]) -> Any:
            epochs = await acquire(shards)
            if epochs and not self.lost_after:
                self.lost_after = list(epochs)
                self.expire_session(name)
                # The runner hears of the loss before the answer arrives.
                await trio.testing.wait_all_tasks_blocked()
            return epochs

        runners.acquire = losing_acquire  # type: ignore[method-assign]


class ShardLog(tc.abc.RunnerListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, tc.ShardId, int]] = []

    def shard_acquired(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int
    ) -> None:
        self.events.append(("acquired", shard, epoch))

    def handler_started(
        self, runner: tc.RunnerAddress, address: Any, handler: str, epoch: int
    ) -> None:
        self.events.append(("handler", address.shard, epoch))


async def test_a_shard_whose_lock_is_lost_while_it_starts_is_never_served(
    autojump_clock,
):
    # A split-brain race in shard start (issue 11, item 11): the lock session
    # ended while the acquisition's answer was on its way, and the runner
    # heard of the loss first (so the forced stop found nothing to stop); it
    # then served the shards it "got" until its next refresh, while any other
    # runner could lock them. They must never serve at that epoch, and come
    # back at a new one.
    address = tc.RunnerAddress("127.0.0.1", 1)
    storage = LosingOnAcquireStorage(str(address))
    listener = ShardLog()
    async with tc.open_runner(
        entities=[Counter],
        storage=storage,
        config=config(
            runner_address=address, lease_duration=30.0, lease_refresh_interval=10.0
        ),
        listeners=[listener],
    ) as runner:
        await runner.wait_shards_acquired()
        lost = set(storage.lost_after)
        assert len(lost) == 8
        # Not one shard was announced (nor ran a handler) at the lost epoch 1.
        assert [e for e in listener.events if e[2] == 1] == []
        assert all(epoch == 2 for epoch in runner.served_shards().values())
        assert await runner.client(Counter)("c").add(Add(1)) == 1


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


class StopLog(tc.abc.RunnerListener):
    def __init__(self) -> None:
        self.stops: list[tuple[tc.ShardId, bool]] = []

    def shard_stopping(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int, *, graceful: bool
    ) -> None:
        self.stops.append((shard, graceful))


async def test_a_lost_lock_escalates_a_drain_once(autojump_clock):
    # A draining shard whose lock is lost is stopped forced at once (its
    # handlers cancelled), told once, and counted as one failover.
    Drained.runs = []
    storage, network = MemoryStorage(), MemoryNetwork()
    listener = StopLog()
    async with trio.open_nursery() as hosts:
        start = partial(start_drained, hosts, storage, network)

        first = await start(1, listeners=[listener])
        await first.wait_shards_acquired()
        refused: list[str] = []

        async def read(key: str) -> None:
            try:
                await first.client(Drained)(key).read(Slow(key, 20.0))
            except tc.EntityNotAssignedError:
                refused.append(key)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(read, f"d{i}")
            await trio.sleep(0.5)
            second = await start(2)
            await trio.sleep(2.0)  # draining now (graceful stops told)
            draining = {shard for shard, graceful in listener.stops if graceful}
            assert draining
            storage.expire_session("127.0.0.1:1")
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
        forced = [shard for shard, graceful in listener.stops if not graceful]
        # Every draining shard escalated once (and the others, served, forced
        # once too: the whole session was lost).
        assert sorted(map(str, forced)) == sorted(set(map(str, forced)))
        assert draining <= set(forced)
        # The handlers of the draining shards were cancelled at the loss.
        cut = [
            run
            for run in Drained.runs
            if first.client(Drained).address_of(run[0]).shard in draining
        ]
        assert cut
        assert all(end is None for *_, end in cut)
        assert sorted(refused) == sorted(run[0] for run in Drained.runs)
        assert first.statistics().failovers == len(forced)
        await second.wait_shards_acquired()
        hosts.cancel_scope.cancel()


async def test_a_lost_lock_session_logs_one_line_not_one_per_shard(
    autojump_clock, caplog
):
    # A lost session stopped every shard with a warning each: one runner of
    # 1,000 shards wrote 1,000 lines for one event (issue 12, item 8).
    storage = MemoryStorage()
    cfg = config(lease_duration=30.0, lease_refresh_interval=10.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        await runner.wait_shards_acquired()
        caplog.clear()
        storage.expire_session(str(runner.address))
        await trio.testing.wait_all_tasks_blocked()
        lines = [
            r.getMessage() for r in caplog.records if r.name == "trio_cluster.sharding"
        ]
        assert runner.statistics().failovers == 8
    lost = [line for line in lines if line.startswith("lost the lock")]
    assert len(lost) == 1, lines
    assert "8 shard(s)" in lost[0]


async def test_a_peer_whose_connection_drops_first_is_taken_over_before_the_next_poll(
    autojump_clock,
):
    # A killed process's connections drop at once; its storage session ends a
    # little later (PostgreSQL frees its locks milliseconds after the socket
    # closes). The poll the dropped connection triggers still sees it live:
    # the survivor polls again soon, not one whole poll interval later.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(
            stack, [1, 2], membership_poll_interval=5.0, lease_duration=30.0
        )
        survivor, dying = cluster.runners[1], cluster.runners[2]
        await survivor.client(Tally)(cluster.remote_id(survivor)).add(Add(1))
        killed_at = trio.current_time()
        cluster.network.kill(dying.address)
        await trio.sleep(0.03)
        assert survivor.statistics().runners == 2  # polled: still live
        cluster.storage.kill_session(str(dying.address))
        cluster.scopes[2].cancel()
        del cluster.runners[2]
        with trio.fail_after(1.0):
            await survivor.wait_shards_acquired()
            while survivor.statistics().shards < 8:  # noqa: ASYNC110
                await trio.sleep(0.001)
        assert trio.current_time() - killed_at < 0.2


async def test_shards_still_locked_after_a_peer_left_are_retried_before_the_next_poll(
    autojump_clock,
):
    # The dead peer has left the live runners, but some of its shards are not
    # free yet at the first acquisition: they are tried again soon, not one
    # whole poll interval later.
    partial = [False]

    class SlowToFree(PatchingStorage):
        first = True

        def patch_session(self, session: StorageSession) -> None:
            if not SlowToFree.first:
                return
            SlowToFree.first = False  # the survivor's session (opened first)
            runners = session.runners
            acquire = runners.acquire

            async def half(shards: Collection[tc.ShardId]) -> dict[tc.ShardId, int]:
                if partial[0]:
                    partial[0] = False
                    shards = sorted(shards, key=str)[: len(shards) // 2]
                return await acquire(shards)

            runners.acquire = half  # type: ignore[method-assign]

    async with AsyncExitStack() as stack:
        cluster = Cluster(stack, membership_poll_interval=5.0, lease_duration=30.0)
        cluster.storage = SlowToFree()
        for port in (1, 2):
            await cluster.start(port)
        await cluster.settled()
        survivor = cluster.runners[1]
        await survivor.client(Tally)(cluster.remote_id(survivor)).add(Add(1))
        partial[0] = True
        killed_at = trio.current_time()
        cluster.kill(2)
        with trio.fail_after(1.0):
            while survivor.statistics().shards < 8:  # noqa: ASYNC110
                await trio.sleep(0.001)
        assert not partial[0]  # the first acquisition got half
        assert trio.current_time() - killed_at < 0.2


async def test_quick_polls_after_a_dropped_connection_stop_if_the_peer_stays_live(
    autojump_clock,
):
    # A frozen or partitioned peer keeps its storage session (its locks) until
    # its lease runs out: the survivor goes back to polling at the interval,
    # until that lease would have ended (the peer is alive after all).
    sessions: list[list[float]] = []

    class Counting(PatchingStorage):
        def patch_session(self, session: StorageSession) -> None:
            runners = session.runners
            live_runners = runners.live_runners
            polls: list[float] = []
            sessions.append(polls)

            async def counted() -> list[RunnerInfo]:
                polls.append(trio.current_time())
                return await live_runners()

            runners.live_runners = counted  # type: ignore[method-assign]

    async with AsyncExitStack() as stack:
        cluster = Cluster(stack, membership_poll_interval=1.0, lease_duration=30.0)
        cluster.storage = Counting()
        for port in (1, 2):
            await cluster.start(port)
        await cluster.settled()
        survivor = cluster.runners[1]
        await survivor.client(Tally)(cluster.remote_id(survivor)).add(Add(1))
        polls = sessions[0]  # the survivor's
        cut_at = trio.current_time()
        cluster.network.kill(cluster.runners[2].address)
        await trio.sleep(10.0)
        assert survivor.statistics().runners == 2
        since = [t - cut_at for t in polls if t >= cut_at]
        # At once, then after 10, 20, 40, 80 and 160 ms...
        assert 4 <= sum(t < 0.5 for t in since) <= 8
        # ... then at the interval again...
        assert sum(t >= 0.5 for t in since) <= 11
        # ... until the peer's lease (30 s) would have ended: then no more.
        await trio.sleep(30.0)
        since = [t - cut_at for t in polls if t >= cut_at]
        assert max(since) <= 32.0
        assert survivor.statistics().runners == 2


async def test_an_idle_runner_only_refreshes_and_hears_a_join_at_once(
    autojump_clock,
):
    # Nothing is polled: each lease refresh lists the live runners, and the
    # assignment is read again only when something changed.
    operations: list[tuple[str, str, float]] = []

    async def record(session: str, operation: str) -> None:
        operations.append((session, operation, trio.current_time()))

    async with AsyncExitStack() as stack:
        cluster = Cluster(stack)
        for port in (1, 2):
            await cluster.start(port)
        await cluster.settled()
        first = cluster.runners[1]
        cluster.storage.fault_hook = record
        await trio.sleep(20.0)
        runner_operations = {
            "register",
            "unregister",
            "live_runners",
            "acquire",
            "refresh",
            "release",
            "release_all",
            "shard_owners",
        }
        mine = [
            (op, t)
            for name, op, t in operations
            if name == str(first.address) and op in runner_operations
        ]
        assert {op for op, _ in mine} == {"refresh"}
        assert 18 <= len(mine) <= 21  # one a second
        # A third runner joins: storage announces it, the first reads the
        # runners at once, and the assignment moves.
        operations.clear()
        joined_at = trio.current_time()
        await cluster.start(3)
        with trio.fail_after(5):
            while first.statistics().runners < 3:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert trio.current_time() - joined_at <= 0.1
        await cluster.settled()
        assert cluster.runners[3].statistics().shards > 0


class _Rounds(trio.abc.Instrument):
    """Counts the scheduler's rounds (one wait for I/O each)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def test_acquired_shards_are_served_in_the_next_scheduling_round(
    autojump_clock,
):
    # Under load one scheduling round takes tens of milliseconds: a runner
    # taking over a dead runner's shards must not spend several of them per
    # start (a starting task per shard that waits for the shard's own task
    # to run and then runs again itself took three).
    rounds = _Rounds()
    acquired_in: list[int] = []

    class Noting(PatchingStorage):
        def patch_session(self, session: StorageSession) -> None:
            runners = session.runners
            acquire = runners.acquire

            async def noted(shards: Collection[tc.ShardId]) -> dict[tc.ShardId, int]:
                epochs = await acquire(shards)
                acquired_in.append(rounds.count)
                return epochs

            runners.acquire = noted  # type: ignore[method-assign]

    class Served(tc.abc.RunnerListener):
        def __init__(self) -> None:
            self.rounds: list[int] = []

        def shard_acquired(
            self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int
        ) -> None:
            self.rounds.append(rounds.count)

    served = Served()
    trio.lowlevel.add_instrument(rounds)
    try:
        async with tc.open_runner(
            entities=[Counter],
            storage=Noting(),
            config=config(runner_address=tc.RunnerAddress("127.0.0.1", 1)),
            listeners=[served],
        ) as runner:
            await runner.wait_shards_acquired()
    finally:
        trio.lowlevel.remove_instrument(rounds)
    [acquired] = acquired_in
    assert len(served.rounds) == 8
    assert set(served.rounds) == {acquired + 1}
