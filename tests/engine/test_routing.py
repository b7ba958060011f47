"""Routing (`trio_cluster._engine._routing`): a group nobody hosts, a
partitioned owner, a client-only runner."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.transport import MemoryTransport

from ..helpers import Add, Elsewhere, Get, config
from ..memory_cluster import Tally, open_cluster


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
        await cluster.settled()  # the client takes no shards from anyone
        for i in range(10):
            where = await client.client(Tally)(f"e{i}").add(Add(1))
            assert where.runner != str(client.address)
            assert (
                await client.client(Tally)(f"e{i}").add_persisted(Add(1))
            ).total == 2
        assert client.statistics().remote_calls == 10
