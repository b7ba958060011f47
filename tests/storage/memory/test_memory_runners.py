"""Tests of the runner half of `MemoryStorage` (``storage/_memory/_runners.py``):
exact lease timing on virtual time, and the machine id policy of the registry."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

from tests.storage.memory.conftest import LEASE
from trio_cluster import PersistenceError
from trio_cluster.abc import (
    MessagesAvailable,
    RunnersChanged,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.storage._memory import _runners
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    acquire_shards,
    persisted_request,
    runner_info,
)

if TYPE_CHECKING:
    pass


TIMEOUT = 10


# ----------------------------------------------------------------------
# Leases on virtual time


async def test_lease_lapses_strictly_after_its_duration(a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        await acquire_shards(a.runners, SHARD)
        await trio.sleep(LEASE)
        assert await b.runners.acquire([SHARD]) == {}
        await trio.sleep(0.001)
        assert SHARD in await b.runners.acquire([SHARD])


async def test_only_runner_storage_calls_heartbeat(a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        for _ in range(10):
            await trio.sleep(LEASE / 2)
            await a.runners.refresh([])
            await a.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=1)
        assert await b.runners.acquire([SHARD]) == {}
        for _ in range(4):
            await trio.sleep(LEASE / 2)
            await a.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=1)
        assert SHARD in await b.runners.acquire([SHARD])


async def test_expire_session(storage, a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        await a.runners.register(runner_info(7001))
        epochs = await acquire_shards(a.runners, SHARD)
        storage.expire_session("a")
        assert await b.runners.live_runners() == []
        assert (await b.runners.shard_owners())[0].runner is None
        assert await b.runners.acquire([SHARD]) == {SHARD: epochs[SHARD] + 1}
        assert await a.runners.refresh([SHARD]) == set()
        assert [r.address.port for r in await b.runners.live_runners()] == [7001]
        # An expired session still receives notifications (the first: its
        # own registration).
        storage.expire_session("a")
        await b.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        assert await a.messages.wait_notifications() == [
            RunnersChanged(),
            MessagesAvailable(frozenset({SHARD})),
        ]
        with pytest.raises(KeyError):
            storage.expire_session("nobody")


async def test_expired_session_keeps_its_machine_id(storage, a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        assert await a.runners.register(runner_info(7001)) == 0
        storage.expire_session("a")
        assert await b.runners.register(runner_info(7002)) == 1
        await a.runners.refresh([])
        machine_ids = [r.machine_id for r in await b.runners.live_runners()]
        assert machine_ids == [0, 1]


# ----------------------------------------------------------------------
# Registry policy


async def test_machine_ids_are_handed_out_least_recently_used_first(
    storage, a, b, monkeypatch
):
    monkeypatch.setattr(_runners, "MACHINE_IDS", 4)
    assert await a.runners.register(runner_info(7001)) == 0
    assert await b.runners.register(runner_info(7002)) == 1
    assert (
        await a.runners.register(runner_info(7001, weight=2.0)) == 0
    )  # re-register keeps it
    await a.runners.unregister()
    assert (
        await b.runners.register(runner_info(7002, weight=2.0)) == 1
    )  # even with 0 free
    # A newcomer does not get the id just freed (a runner taking over in
    # the same millisecond would mint its predecessor's request ids): the
    # ids never handed out come first, then the one freed longest ago.
    async with storage.open_session(name="c", lease_duration=LEASE) as c:
        assert await c.runners.register(runner_info(7003)) == 2
    assert await a.runners.register(runner_info(7001)) == 3
    await a.runners.unregister()
    assert await a.runners.register(runner_info(7001)) == 0
    await a.runners.unregister()
    assert await a.runners.register(runner_info(7001)) == 2


async def test_same_address_from_another_session_takes_over(a, b):
    await a.runners.register(runner_info(7001))
    await b.runners.register(runner_info(7001, weight=5.0))
    # The displaced registration's id stays reserved while its session lives.
    assert await a.runners.live_runners() == [
        attrs.evolve(runner_info(7001, weight=5.0), machine_id=1)
    ]


async def test_no_free_machine_id(storage, monkeypatch):
    monkeypatch.setattr(_runners, "MACHINE_IDS", 4)
    async with AsyncExitStack() as stack:
        for i in range(4):
            session = await stack.enter_async_context(
                storage.open_session(name=f"r{i}", lease_duration=LEASE)
            )
            await session.runners.register(runner_info(i + 1))
        extra = await stack.enter_async_context(
            storage.open_session(name="extra", lease_duration=LEASE)
        )
        with pytest.raises(PersistenceError, match="no free machine id"):
            await extra.runners.register(runner_info(9999))
        assert len(await extra.runners.live_runners()) == 4


async def test_a_displaced_registration_keeps_its_machine_id_reserved(
    autojump_clock, monkeypatch
):
    monkeypatch.setattr(_runners, "MACHINE_IDS", 3)
    storage = MemoryStorage()
    address = runner_info(1)
    async with storage.open_session(name="old", lease_duration=5.0) as old:
        old_id = await old.runners.register(address)
        async with storage.open_session(name="new", lease_duration=5.0) as new:
            new_id = await new.runners.register(address)
            # The old session may still mint Snowflake ids with its id.
            assert new_id != old_id
            assert [r.machine_id for r in await new.runners.live_runners()] == [new_id]
            async with storage.open_session(name="third", lease_duration=5.0) as third:
                other = runner_info(2)
                assert await third.runners.register(other) not in {old_id, new_id}
    async with storage.open_session(name="later", lease_duration=5.0) as later:
        # Freed on close (and handed out longest ago of the three).
        assert await later.runners.register(address) == old_id
