"""`Runner.new_id`, `Runner.owner_of` and `Runner.is_local`
(`trio_cluster._engine._views`)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage

from .helpers import Add, Get, config, runner_config
from .memory_cluster import Tally, open_cluster


async def test_new_ids_are_unique_increasing_and_carry_the_machine_id(
    autojump_clock,
):
    storage = MemoryStorage()
    async with (
        tc.open_runner(config=runner_config(1), storage=storage) as first,
        tc.open_runner(config=runner_config(2), storage=storage) as second,
    ):
        ids = [first.new_id() for _ in range(5000)]  # past one millisecond's 4096
        assert all(isinstance(flake, tc.Snowflake) for flake in ids)
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert {flake.machine_id for flake in ids} == {first.machine_id}
        others = {second.new_id() for _ in range(100)}
        assert first.machine_id != second.machine_id
        assert not others & set(ids)


async def test_new_ids_never_repeat_persisted_request_ids(autojump_clock):
    """One generator for both: ids from `new_id` interleaved with the ids of
    persisted requests are all distinct."""
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Tally], config=config(), storage=storage
    ) as runner:
        made = []
        for n in range(20):
            made.append(runner.new_id().value)
            await runner.client(Tally)(f"e{n}").add_persisted(Add(1))
        stored = list(storage._messages._requests)  # the persisted request ids
        assert len(stored) == 20
        assert not set(made) & set(stored)
        assert sorted(made + stored) == sorted(set(made + stored))


async def test_a_runner_taking_over_in_the_same_millisecond_mints_new_ids(
    autojump_clock,
):
    """A runner closes and another opens on the same storage at the same
    (virtual) time: the newcomer gets another machine id, so its persisted
    requests are not taken for its predecessor's (same ids) and answered
    with their replies."""
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Tally], config=config(), storage=storage
    ) as first:
        before = await first.client(Tally)("a").add_persisted(Add(1))
        first_id = first.machine_id
    async with tc.open_runner(
        entities=[Tally], config=config(), storage=storage
    ) as second:
        assert second.machine_id != first_id
        after = await second.client(Tally)("b").add_persisted(Add(5))
    assert (before.total, after.total) == (1, 5)
    assert len(storage._messages._requests) == 2


async def test_new_id_after_shutdown_raises(autojump_clock):
    async with tc.open_runner(config=config()) as runner:
        runner.new_id()
    assert runner.machine_id is None
    with pytest.raises(tc.RunnerClosedError):
        runner.new_id()


async def test_ownership_agrees_with_where_calls_run_and_follows_a_failover(
    autojump_clock,
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first, second = cluster.runners[1], cluster.runners[2]
        handles = [first.client(Tally)(f"e{n}") for n in range(40)]
        owners = set()
        for handle in handles:
            owner = first.owner_of(handle)
            # Every runner agrees, by handle or by address.
            assert second.owner_of(handle.address) == owner
            where = await first.client(Tally)(handle.id).add(Add(1))
            assert where.runner == str(owner)
            assert first.is_local(handle) == (owner == first.address)
            assert second.is_local(handle.address) == (owner == second.address)
            owners.add(owner)
        assert owners == {first.address, second.address}

        moved = [h for h in handles if first.owner_of(h) == second.address]
        cluster.kill(2)
        with trio.fail_after(5):
            await cluster.settled()
        for handle in moved:
            assert first.owner_of(handle) == first.address
            assert first.is_local(handle)
            where = await first.client(Tally)(handle.id).add(Add(1))
            assert where.runner == str(first.address)


async def test_ownership_for_unhosted_groups_and_stopping_shards(autojump_clock):
    class Elsewhere(tc.Entity):
        type_name = "ownership.Elsewhere"
        shard_group = "nobody"

        @tc.rpc
        async def ping(self, msg: Get) -> None:
            pass

    async with tc.open_runner(entities=[Tally], config=config()) as runner:
        await runner.wait_shards_acquired()
        handle = runner.client(Tally)("x")
        assert runner.owner_of(handle) == runner.address
        assert runner.is_local(handle)
        # No live runner hosts this group: no owner.
        nowhere = runner.client(Elsewhere)("y")
        assert runner.owner_of(nowhere) is None
        assert not runner.is_local(nowhere)
        # A shard stopping here is no longer local.
        runner._parts.sharding.table.hosts.clear()
        assert not runner.is_local(handle)
