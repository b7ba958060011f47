"""Two runners on one storage: persisted messages travel through storage alone
(notifications, with polling as the fallback), and shards are split."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage

from .helpers import config
from .test_persisted import Account, Deposit, Ledger, clock


def runner_config(port: int, **overrides: object) -> tc.ShardingConfig:
    return config(runner_address=tc.RunnerAddress("127.0.0.1", port), **overrides)


async def open_pair(
    stack: AsyncExitStack, storage: MemoryStorage, **overrides: object
) -> tuple[tc.Runner, tc.Runner]:
    entities = [Account, Ledger]
    first = await stack.enter_async_context(
        tc.open_runner(
            entities=entities,
            config=runner_config(1, **overrides),
            storage=storage,
            clock=clock(),
        )
    )
    second = await stack.enter_async_context(
        tc.open_runner(
            entities=entities,
            config=runner_config(2, **overrides),
            storage=storage,
            clock=clock(),
        )
    )
    with trio.fail_after(5):
        # Both runners poll membership; wait until the shards are split.
        while first.statistics().shards + second.statistics().shards != 8 or not (  # noqa: ASYNC110
            first.statistics().shards and second.statistics().shards
        ):
            await trio.sleep(0.05)
    return first, second


def remote_id(sender: tc.Runner, cls: type[tc.Entity]) -> str:
    """An entity id whose shard the sender does not serve."""
    client = sender.client(cls)
    for i in range(1000):
        if client.address_of(f"e{i}").shard not in sender._sharding.hosts:
            return f"e{i}"
    raise AssertionError("no remote shard")


async def test_shards_are_split_between_runners(autojump_clock):
    async with AsyncExitStack() as stack:
        first, second = await open_pair(stack, MemoryStorage())
        assert not set(first._sharding.hosts) & set(second._sharding.hosts)
        assert first.statistics().runners == 2


async def test_persisted_call_to_another_runner_goes_through_storage(autojump_clock):
    async with AsyncExitStack() as stack:
        first, second = await open_pair(
            stack, MemoryStorage(), storage_poll_interval=3600.0
        )
        entity = remote_id(first, Account)
        start = trio.current_time()
        assert await first.client(Account)(entity).deposit(Deposit("t1", 5)) == 5
        assert await first.client(Account)(entity).deposit(Deposit("t1", 5)) == 5
        # Woken by notifications, not by the (hour-long) poll.
        assert trio.current_time() - start < 1
        assert second.statistics().persisted_delivered == 1
        assert first.statistics().persisted_delivered == 0


async def test_polling_delivers_when_notifications_fail(autojump_clock):
    storage = MemoryStorage()

    async def no_notifications(session: str, operation: str) -> None:
        if operation == "wait_notifications":
            raise OSError("listener down")

    async with AsyncExitStack() as stack:
        first, _ = await open_pair(stack, storage, storage_poll_interval=2.0)
        storage.fault_hook = no_notifications
        entity = remote_id(first, Ledger)
        start = trio.current_time()
        await first.client(Ledger)(entity).slow_append(Deposit("p", 1))
        # Up to one poll for the owner to claim, 10 s of handler, up to one
        # poll for the sender to fetch the reply.
        assert 10 < trio.current_time() - start <= 14.5


def applied_on_owner(runners: tuple[tc.Runner, tc.Runner], entity: str) -> list[str]:
    """Read a Ledger's history from whichever runner holds it in memory."""
    for runner in runners:
        address = runner.client(Ledger).address_of(entity)
        host = runner._sharding.hosts.get(address.shard)
        if host is not None:
            slot = host.slots.get(address)
            instance = None if slot is None else slot.instance
            return [] if instance is None else list(instance.applied)  # type: ignore[attr-defined]
    raise AssertionError("no runner serves the shard")


async def test_interrupt_reaches_the_other_runner_through_storage(autojump_clock):
    async with AsyncExitStack() as stack:
        runners = await open_pair(stack, MemoryStorage())
        entity = remote_id(runners[0], Ledger)
        with trio.move_on_after(2):
            await runners[0].client(Ledger)(entity).slow_append(Deposit("x", 1))
        await trio.sleep(20)  # long enough for the handler to have finished
        assert applied_on_owner(runners, entity) == []


async def test_save_failures_reach_the_caller_as_persistence_errors(autojump_clock):
    storage = MemoryStorage()

    async def failing_saves(session: str, operation: str) -> None:
        if operation == "save_requests":
            raise OSError("disk full")

    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        storage.fault_hook = failing_saves
        with pytest.raises(tc.PersistenceError) as info:
            await runner.client(Account)("a").deposit(Deposit("t", 1))
        assert isinstance(info.value.__cause__, OSError)
        storage.fault_hook = None
        assert await runner.client(Account)("a").deposit(Deposit("t", 1)) == 1


async def test_reply_writes_are_retried_until_they_succeed(autojump_clock):
    storage = MemoryStorage()
    failures = 3

    async def flaky_replies(session: str, operation: str) -> None:
        nonlocal failures
        if operation == "save_replies" and failures:
            failures -= 1
            raise OSError("connection reset")

    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        storage.fault_hook = flaky_replies
        assert await runner.client(Account)("a").deposit(Deposit("t", 7)) == 7
        assert failures == 0


async def test_lost_lock_session_stops_shards_at_once(autojump_clock):
    storage = MemoryStorage()
    cfg = config(lease_duration=30.0, lease_refresh_interval=10.0)
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
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
