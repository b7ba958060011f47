"""Runners routing to each other over the memory transport, on virtual time:
remote calls, streams, interrupts, broadcasts, rebalancing and failover."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import config


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Count:
    upto: int


@attrs.frozen
class Nap:
    seconds: float


@attrs.frozen
class Where:
    runner: str
    total: int


class Tally(tc.Entity):
    type_name = "cluster.Tally"
    naps_finished = 0

    def __init__(self) -> None:
        self.total = 0

    @tc.rpc
    async def add(self, msg: Add) -> Where:
        self.total += msg.amount
        return Where(str(tc.current_runner().address), self.total)

    @tc.rpc
    async def nap(self, msg: Nap) -> None:
        await trio.sleep(msg.seconds)
        Tally.naps_finished += 1

    @tc.rpc(persisted=True)
    async def add_persisted(self, msg: Add) -> Where:
        self.total += msg.amount
        return Where(str(tc.current_runner().address), self.total)

    @tc.stream
    async def count(self, msg: Count) -> AsyncIterator[int]:
        for n in range(msg.upto):
            yield n


class Cluster:
    """Runners on one memory storage and one memory network."""

    def __init__(self, stack: AsyncExitStack, **overrides: Any) -> None:
        self.stack = stack
        self.singleton_runs: list[str] = []
        self.singleton_active: list[str] = []
        self.storage = MemoryStorage()
        self.network = MemoryNetwork()
        self.overrides = overrides
        self.runners: dict[int, tc.Runner] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.received: list[tuple[str, int]] = []

    async def start(self, port: int) -> tc.Runner:
        nursery = await self.stack.enter_async_context(trio.open_nursery())
        # Stop the runner when the stack unwinds (callbacks run first).
        self.stack.callback(nursery.cancel_scope.cancel)
        runner: tc.Runner = await nursery.start(self._serve, port)

        self.runners[port] = runner
        return runner

    async def _serve(
        self, port: int, *, task_status: trio.TaskStatus[tc.Runner]
    ) -> None:
        async def note(msg: Add) -> None:
            self.received.append((str(tc.current_runner().address), msg.amount))

        with trio.CancelScope() as scope:
            self.scopes[port] = scope
            async with tc.open_runner(
                entities=[Tally],
                config=config(
                    runner_address=tc.RunnerAddress("127.0.0.1", port),
                    **self.overrides,
                ),
                storage=self.storage,
                transport=MemoryTransport(self.network),
                broadcasts=[tc.Broadcast("note", note)],
                singletons=[tc.Singleton("watchdog", self._watchdog)],
            ) as runner:
                task_status.started(runner)
                await trio.sleep_forever()

    async def _watchdog(self) -> None:
        here = str(tc.current_runner().address)
        self.singleton_runs.append(here)
        self.singleton_active.append(here)
        assert len(self.singleton_active) == 1, self.singleton_active
        try:
            await trio.sleep_forever()
        finally:
            self.singleton_active.remove(here)

    def kill(self, port: int) -> None:
        """As a SIGKILL: connections and lock session gone, tasks stopped."""
        runner = self.runners.pop(port)
        self.network.kill(runner.address)
        self.storage.kill_session(str(runner.address))
        self.scopes[port].cancel()

    def stop(self, port: int) -> None:
        """A graceful shutdown (cancelling the runner's scope)."""
        del self.runners[port]
        self.scopes[port].cancel()

    async def settled(self) -> None:
        """Wait until every runner sees all the others and serves its share."""
        with trio.fail_after(30):
            while not self.is_settled():  # noqa: ASYNC110
                await trio.sleep(0.01)

    def is_settled(self) -> bool:
        total = 0
        for runner in self.runners.values():
            stats = runner.statistics()
            if (
                stats.runners != len(self.runners)
                or stats.shards != stats.shards_assigned
            ):
                return False
            total += stats.shards
        return total == 8

    def owner(self, entity: str) -> tc.Runner:
        for runner in self.runners.values():
            if runner.client(Tally).address_of(entity).shard in runner._sharding.hosts:
                return runner
        raise AssertionError(f"nobody serves {entity}")

    def remote_id(self, sender: tc.Runner) -> str:
        for i in range(1000):
            if self.owner(f"e{i}") is not sender:
                return f"e{i}"
        raise AssertionError("no remote entity")


async def open_cluster(
    stack: AsyncExitStack, ports: list[int], **overrides: Any
) -> Cluster:
    cluster = Cluster(stack, **overrides)
    for port in ports:
        await cluster.start(port)
    await cluster.settled()
    return cluster


async def test_volatile_calls_run_on_the_owner(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        tally = first.client(Tally)(entity)
        assert await tally.add(Add(2)) == Where(str(owner.address), 2)
        assert await tally.add(Add(3)) == Where(str(owner.address), 5)
        assert first.statistics().remote_calls == 2
        latency = first.statistics().call_latency["volatile"]
        assert latency.count == 2


async def test_many_concurrent_remote_calls_keep_per_entity_order(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        seen: list[int] = []

        async def add(n: int) -> None:
            seen.append((await first.client(Tally)(entity).add(Add(1))).total)

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(add, n)
        assert sorted(seen) == list(range(1, 201))


async def test_remote_discard_and_persisted_calls(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        tally = first.client(Tally)(entity)
        await tally.add.discard(Add(10))
        answer = await tally.add_persisted(Add(1))
        assert answer == Where(str(cluster.owner(entity).address), 11)


async def test_remote_stream(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        async with first.client(Tally)(entity).count(Count(50)) as items:
            assert [item async for item in items] == list(range(50))


async def test_cancelling_a_remote_call_interrupts_the_handler(autojump_clock):
    Tally.naps_finished = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        with trio.move_on_after(1):
            await first.client(Tally)(entity).nap(Nap(10))
        await trio.sleep(20)
        assert Tally.naps_finished == 0
        await first.client(Tally)(entity).nap(Nap(0.5))
        assert Tally.naps_finished == 1


async def test_broadcast_reaches_every_runner_once(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        assert await cluster.runners[2].broadcast("note", Add(7)) == 3
        with trio.fail_after(5):
            while len(cluster.received) < 3:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await trio.sleep(1)
        assert sorted(cluster.received) == [
            (f"127.0.0.1:{port}", 7) for port in (1, 2, 3)
        ]


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
                served = [set(r._sharding.hosts) for r in cluster.runners.values()]
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


async def test_partitioned_owner_calls_fail_typed_then_recover(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], send_retry_timeout=0.5)
        first, second = cluster.runners[1], cluster.runners[2]
        entity = cluster.remote_id(first)
        cluster.network.partition(first.address, second.address)
        with pytest.raises((tc.EntityNotAssignedError, tc.RunnerUnavailableError)):
            await first.client(Tally)(entity).add(Add(1))
        cluster.network.heal(first.address, second.address)
        where = await first.client(Tally)(entity).add(Add(1))
        assert where.runner == str(second.address)


async def test_unknown_entity_type_on_the_owner_is_a_typed_error(autojump_clock):
    class Stranger(tc.Entity):
        type_name = "cluster.Stranger"

        @tc.rpc
        async def hello(self, msg: Add) -> int:
            return msg.amount

    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        # A runner that knows Stranger, the other does not (a rolling deploy).
        lonely = await stack.enter_async_context(
            tc.open_runner(
                entities=[Tally, Stranger],
                config=config(runner_address=tc.RunnerAddress("127.0.0.1", 9)),
                storage=cluster.storage,
                transport=MemoryTransport(cluster.network),
            )
        )
        cluster.runners[9] = lonely
        await cluster.settled()
        client = lonely.client(Stranger)
        for i in range(100):
            address = client.address_of(f"s{i}")
            if address.shard not in lonely._sharding.hosts:
                break
        with pytest.raises(tc.UnknownEntityTypeError):
            await client(f"s{i}").hello(Add(1))


async def test_client_only_runner_sends_every_call_to_the_others(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        client = await stack.enter_async_context(
            tc.open_runner(
                entities=[Tally],
                config=config(
                    runner_address=tc.RunnerAddress("127.0.0.1", 50), shard_groups=()
                ),
                storage=cluster.storage,
                transport=MemoryTransport(cluster.network),
            )
        )
        await client.wait_shards_acquired()
        assert client.statistics().shards == 0
        await cluster.settled()  # the client takes no shards from anyone
        for i in range(10):
            where = await client.client(Tally)(f"e{i}").add(Add(1))
            assert where.runner != str(client.address)
            assert (
                await client.client(Tally)(f"e{i}").add_persisted(Add(1))
            ).total == 2
        assert client.statistics().remote_calls == 10


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


async def test_persisted_calls_use_direct_notices_not_storage_polls(autojump_clock):
    async def no_notifications(session: str, operation: str) -> None:
        if operation == "wait_notifications":
            raise OSError("listener down")

    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], storage_poll_interval=3600.0)
        cluster.storage.fault_hook = no_notifications
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        started = trio.current_time()
        answer = await first.client(Tally)(entity).add_persisted(Add(4))
        assert answer == Where(str(cluster.owner(entity).address), 4)
        # Neither the owner's claim nor the caller's reply waited for a poll.
        assert trio.current_time() - started < 1.0


async def test_singleton_restarts_on_a_survivor_when_its_runner_dies(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        with trio.fail_after(5):
            while not cluster.singleton_active:  # noqa: ASYNC110
                await trio.sleep(0.01)
        [first_host] = cluster.singleton_active
        port = int(first_host.rsplit(":", 1)[1])
        runs = len(cluster.singleton_runs)
        cluster.kill(port)
        with trio.fail_after(1):
            while len(cluster.singleton_runs) == runs:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert cluster.singleton_active != [first_host]
        assert len(cluster.singleton_active) == 1


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
