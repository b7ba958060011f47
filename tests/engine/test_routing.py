"""Routing (`trio_cluster._engine._routing`): a group nobody hosts, a
partitioned owner, a client-only runner."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.transport import MemoryTransport

from ..helpers import Add, Boom, Count, Counter, Elsewhere, Get, TooBig, config
from ..memory_cluster import Nap, Tally, open_cluster


async def test_group_hosted_by_no_runner_fails_fast(autojump_clock):
    async with tc.open_runner(entities=[Elsewhere], config=config()) as runner:
        start = trio.current_time()
        with pytest.raises(tc.EntityNotAssignedError, match="Elsewhere/x@batch:"):
            await runner.client(Elsewhere)("x").ping(Get())
        assert trio.current_time() == start
        with pytest.raises(tc.EntityNotAssignedError):
            await runner.client(Elsewhere)("x").ping.discard(Get())


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
        # The others see the client (a live runner), and it takes no shard
        # from anyone.
        with trio.fail_after(5):
            while any(  # noqa: ASYNC110
                runner.statistics().runners != 3 for runner in cluster.runners.values()
            ):
                await trio.sleep(0.01)
        stats = [runner.statistics() for runner in cluster.runners.values()]
        assert sum(s.shards for s in stats) == 8
        assert all(s.shards == s.shards_assigned for s in stats)
        for i in range(10):
            where = await client.client(Tally)(f"e{i}").add(Add(1))
            assert where.runner != str(client.address)
            assert (
                await client.client(Tally)(f"e{i}").add_persisted(Add(1))
            ).total == 2
        assert client.statistics().remote_calls == 10


class Whoami(tc.Entity):
    type_name = "Whoami"

    @tc.stream
    async def runners(self, msg: Count) -> AsyncIterator[str]:
        for _ in range(msg.upto):
            yield str(tc.current_runner().address)


@pytest.mark.parametrize("kind", ["stream", "call", "discard"])
async def test_handlers_see_their_runner_whoever_calls(autojump_clock, kind):
    # Regression (stream): a stream opened from a task outside the runner's
    # context started its producer where `current_runner()` failed.
    seen: list[str] = []
    async with (
        trio.open_nursery() as nursery,
        tc.open_runner(entities=[Whoami, Tally], config=config()) as runner,
    ):
        await runner.wait_shards_acquired()

        async def use() -> None:
            if kind == "stream":
                async with runner.client(Whoami)("a").runners(Count(2)) as items:
                    seen.extend([item async for item in items])
            elif kind == "call":
                where = await runner.client(Tally)("a").add(Add(1))
                seen.append(where.runner)
            else:
                await runner.client(Tally)("a").add.discard(Add(1))
                await trio.testing.wait_all_tasks_blocked()
                where = await runner.client(Tally)("a").add(Add(1))
                seen.append(where.runner)

        # A task with an empty context: not the runner's, not the test's.
        contextvars.Context().run(nursery.start_soon, use)
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [str(runner.address)] * (2 if kind == "stream" else 1)


def _nowait(handler: Any, message: object) -> Any:
    """``handler.call_nowait(message)``: internal, so not on the typed
    handles (`BoundRpc`)."""
    return handler.call_nowait(message)


async def test_call_nowait_runs_a_call_at_once_or_would_block(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        tallies = first.client(Tally)
        local = next(f"e{i}" for i in range(1000) if cluster.owner(f"e{i}") is first)
        here = tallies(local)
        assert _nowait(here.add, Add(2)).total == 2  # not awaited: it ran
        # What could wait is left to `call` (nothing happened): a handler
        # that can suspend, a persisted one, an entity served elsewhere, an
        # entity busy with another request.
        with pytest.raises(trio.WouldBlock):
            _nowait(here.nap, Nap(1))
        with pytest.raises(trio.WouldBlock):
            _nowait(here.add_persisted, Add(1))
        with pytest.raises(trio.WouldBlock):
            _nowait(tallies(cluster.remote_id(first)).add, Add(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(here.nap, Nap(1))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):
                _nowait(here.add, Add(1))
        assert (await here.add(Add(0))).total == 2


async def test_call_nowait_raises_and_counts_as_call_does(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        await runner.wait_shards_acquired()
        counter = runner.client(Counter)("a")
        with pytest.raises(TooBig):
            _nowait(counter.add, Add(2000))
        assert _nowait(counter.add, Add(1)) == 1
        with pytest.raises(tc.RemoteError, match="KeyError"):
            _nowait(counter.boom, Boom("x"))
        nowait = runner.statistics()
        with pytest.raises(TooBig):
            await counter.add(Add(2000))
        assert await counter.add(Add(1)) == 1  # restarted after the crash
        with pytest.raises(tc.RemoteError, match="KeyError"):
            await counter.boom(Boom("x"))
        awaited = runner.statistics()
    assert nowait.errors_by_type == {"declared": 1, "RemoteError": 1}
    assert awaited.errors_by_type == {"declared": 2, "RemoteError": 2}
    assert nowait.call_latency["volatile"].count == 3
    assert awaited.call_latency["volatile"].count == 6
