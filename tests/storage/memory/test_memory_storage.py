"""Tests of `MemoryStorage` (``storage/_memory/_storage.py``): the
conformance suite plus memory-specific behaviour.

The memory-specific tests cover what the contract leaves to the backend: fault
injection and the entry steps of every operation. Leases and the registry
are in ``test_memory_runners.py``, the message store's own details in
``test_memory_store.py``, argument checks in ``test_validation.py``; the
fixtures in ``conftest.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.storage.memory.conftest import LEASE
from trio_cluster import PersistenceError
from trio_cluster.abc import (
    ReplyQuery,
    Storage,
    StorageSession,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    SHARD2,
    StorageConformance,
    acquire_shards,
    entity_address,
    final_reply,
    persisted_request,
    runner_info,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio.testing import MockClock


TIMEOUT = 10


class TestMemoryConformance(StorageConformance):
    @pytest.fixture
    def storage(self) -> Storage:
        return MemoryStorage()

    @pytest.fixture
    def lease_duration(self) -> float:
        return LEASE

    @pytest.fixture
    def clock(self, autojump_clock: MockClock) -> MockClock:
        return autojump_clock


# ----------------------------------------------------------------------
# Sessions and fault injection


async def test_kill_session_frees_locks_and_fails_further_calls(
    storage, a, b, autojump_clock
):
    with trio.fail_after(TIMEOUT):
        await a.runners.register(runner_info(7001))
        epochs = await acquire_shards(a.runners, SHARD)
        storage.kill_session("a")
        assert await b.runners.acquire([SHARD]) == {SHARD: epochs[SHARD] + 1}
        assert await b.runners.live_runners() == []
        with pytest.raises(PersistenceError, match="'a' was killed"):
            await a.runners.refresh([SHARD])
        with pytest.raises(PersistenceError):
            await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        with pytest.raises(KeyError, match="no open storage session named 'a'"):
            storage.kill_session("a")
        # The name is free again: a restarted runner opens a new session.
        async with storage.open_session(name="a", lease_duration=LEASE) as again:
            assert await again.runners.acquire([SHARD]) == {}


async def test_kill_session_wakes_a_pending_wait(storage, a, autojump_clock):
    with trio.fail_after(TIMEOUT):
        raised = []

        async def wait() -> None:
            with pytest.raises(PersistenceError) as excinfo:
                await a.messages.wait_notifications()
            raised.append(excinfo.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            storage.kill_session("a")
        assert len(raised) == 1


async def test_closed_session_raises_closed_resource_error(storage, autojump_clock):
    with trio.fail_after(TIMEOUT):

        async def wait(session: StorageSession) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await session.messages.wait_notifications()

        async with (
            trio.open_nursery() as nursery,
            storage.open_session(name="a", lease_duration=LEASE) as session,
        ):
            nursery.start_soon(wait, session)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.ClosedResourceError, match="'a' is closed"):
            await session.runners.acquire([SHARD])
        with pytest.raises(trio.ClosedResourceError):
            await session.messages.claim({}, now=BASE_TIME, limit=1)


async def test_fault_hook_failure_is_a_persistence_error(storage, a, b):
    calls = []

    async def hook(session_name: str, operation: str) -> None:
        calls.append((session_name, operation))
        if (session_name, operation) in {("a", "claim"), ("c", "open_session")}:
            raise OSError("connection reset")

    storage.fault_hook = hook
    with pytest.raises(
        PersistenceError, match="claim failed in storage session 'a'"
    ) as failure:
        await a.messages.claim({SHARD: 1}, now=BASE_TIME, limit=1)
    assert isinstance(failure.value.__cause__, OSError)
    assert (
        await b.messages.claim({SHARD: 1}, now=BASE_TIME, limit=1)
    ).stale_shards == {SHARD}
    await a.runners.refresh([])
    with pytest.raises(PersistenceError) as failure:
        async with storage.open_session(name="c", lease_duration=LEASE):
            pass  # pragma: no cover
    assert isinstance(failure.value.__cause__, OSError)
    assert calls == [
        ("a", "claim"),
        ("b", "claim"),
        ("a", "refresh"),
        ("c", "open_session"),
    ]
    storage.fault_hook = None
    assert (await a.messages.claim({SHARD: 1}, now=BASE_TIME, limit=1)).requests == []


async def test_fault_hook_failing_a_statement_is_the_transactions_failure(storage, a):
    async def hook(session_name: str, operation: str) -> None:
        if operation == "execute":
            raise OSError("connection reset")

    async with a.messages.open_transaction() as clean:
        with pytest.raises(PersistenceError, match="has no SQL"):
            await clean.execute("SELECT 1")
        assert clean.failure is None  # the statement's fault, not storage's
    storage.fault_hook = hook
    async with a.messages.open_transaction() as broken:
        with pytest.raises(PersistenceError, match="execute failed") as failure:
            await broken.execute("SELECT 1")
        assert broken.failure is failure.value
        with pytest.raises(PersistenceError):
            await broken.execute("SELECT 2")
        assert broken.failure is failure.value  # the first failure stays


async def test_fault_hook_hang_respects_the_callers_deadline(
    storage, a, b, autojump_clock
):
    async def hook(session_name: str, operation: str) -> None:
        if session_name == "a":
            await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        await acquire_shards(a.runners, SHARD)
        storage.fault_hook = hook
        start = trio.current_time()
        with trio.move_on_after(2 * LEASE) as scope:
            await a.runners.refresh([SHARD])
        assert scope.cancelled_caught
        assert trio.current_time() - start == 2 * LEASE
        # The hung refresh never reached storage, so the lease lapsed.
        assert SHARD in await b.runners.acquire([SHARD])


async def test_kill_during_a_hanging_operation(storage, a, autojump_clock):
    async def hook(session_name: str, operation: str) -> None:
        await trio.sleep(1)

    with trio.fail_after(TIMEOUT):
        storage.fault_hook = hook
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expect_killed, a)
            await trio.sleep(0.5)
            storage.kill_session("a")


async def _expect_killed(session: StorageSession) -> None:
    with pytest.raises(PersistenceError, match="was killed"):
        await session.runners.acquire([SHARD])


async def test_every_operation_checkpoints(a):
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: a.messages.save_requests([persisted_request(1)], now=BASE_TIME),
        lambda: a.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=10),
        lambda: a.messages.save_replies([final_reply(1, epoch)], now=BASE_TIME),
        lambda: a.messages.replies_for([ReplyQuery(1)]),
        lambda: a.messages.ack_chunks([(1, 0)]),
        lambda: a.messages.interrupt([1]),
        lambda: a.messages.wait_notifications(),  # something is pending
        lambda: a.messages.delete_processed(older_than=BASE_TIME, limit=1),
        lambda: a.messages.clear_address(entity_address()),
        lambda: a.runners.register(runner_info(7001)),
        lambda: a.runners.live_runners(),
        lambda: a.runners.acquire([SHARD2]),
        lambda: a.runners.refresh([SHARD2]),
        lambda: a.runners.release([SHARD2]),
        lambda: a.runners.release_all(),
        lambda: a.runners.shard_owners(),
        lambda: a.runners.unregister(),
    ]
    for operation in operations:
        with trio.testing.assert_checkpoints():
            await operation()
