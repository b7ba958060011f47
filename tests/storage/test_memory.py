"""Tests of `MemoryStorage`: the conformance suite plus memory-specific behaviour.

The memory-specific tests cover what the contract leaves to the backend: fault
injection, exact lease timing on virtual time, machine id policy, argument
validation, and the cost of claiming.
"""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

from trio_cluster import PersistenceError
from trio_cluster.abc import (
    MessagesAvailable,
    RepliesAvailable,
    ReplyOutcome,
    ReplyQuery,
    ReplyRecord,
    RequestsInterrupted,
    RunnerInfo,
    SaveResult,
    Storage,
    StorageSession,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.storage._memory import _storage as _memory
from trio_cluster.storage._memory._messages import MessageStore, _ShardQueue
from trio_cluster.testing import StorageConformance
from trio_cluster.testing._conformance._base import (
    BASE,
    SHARD,
    SHARD2,
    acquire,
    address,
    final,
    info,
    replies,
    request,
    shard,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from trio.testing import MockClock

LEASE = 0.5
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


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
async def a(storage: MemoryStorage) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name="a", lease_duration=LEASE) as session:
        yield session


@pytest.fixture
async def b(storage: MemoryStorage) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name="b", lease_duration=LEASE) as session:
        yield session


# ----------------------------------------------------------------------
# Sessions and fault injection


async def test_kill_session_frees_locks_and_fails_further_calls(
    storage, a, b, autojump_clock
):
    with trio.fail_after(TIMEOUT):
        await a.runners.register(info(7001))
        epochs = await acquire(a.runners, SHARD)
        storage.kill_session("a")
        assert await b.runners.acquire([SHARD]) == {SHARD: epochs[SHARD] + 1}
        assert await b.runners.live_runners() == []
        with pytest.raises(PersistenceError, match="'a' was killed"):
            await a.runners.refresh([SHARD])
        with pytest.raises(PersistenceError):
            await a.messages.save_requests([request(1)], now=BASE)
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
            await session.messages.claim({}, now=BASE, limit=1)


async def test_open_session_validates_arguments(storage, a):
    with pytest.raises(TypeError, match="name must be a str"):
        storage.open_session(name=_any(b"x"), lease_duration=1.0)
    for wrong_type in (True, "1", None):
        with pytest.raises(TypeError, match="lease_duration must be a number"):
            storage.open_session(name="x", lease_duration=_any(wrong_type))
    for wrong_value in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive and finite"):
            storage.open_session(name="x", lease_duration=wrong_value)
    with pytest.raises(ValueError, match="'a' is already open"):
        storage.open_session(name="a", lease_duration=1.0)
    first = storage.open_session(name="x", lease_duration=1.0)
    second = storage.open_session(name="x", lease_duration=1.0)
    async with first:
        with pytest.raises(ValueError, match="'x' is already open"):
            async with second:
                pass  # pragma: no cover


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
        await a.messages.claim({SHARD: 1}, now=BASE, limit=1)
    assert isinstance(failure.value.__cause__, OSError)
    assert (await b.messages.claim({SHARD: 1}, now=BASE, limit=1)).stale_shards == {
        SHARD
    }
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
    assert (await a.messages.claim({SHARD: 1}, now=BASE, limit=1)).requests == []


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
        await acquire(a.runners, SHARD)
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
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: a.messages.save_requests([request(1)], now=BASE),
        lambda: a.messages.claim({SHARD: epoch}, now=BASE, limit=10),
        lambda: a.messages.save_replies([final(1, epoch)], now=BASE),
        lambda: a.messages.replies_for([ReplyQuery(1)]),
        lambda: a.messages.ack_chunks([(1, 0)]),
        lambda: a.messages.interrupt([1]),
        lambda: a.messages.wait_notifications(),  # something is pending
        lambda: a.messages.delete_processed(older_than=BASE, limit=1),
        lambda: a.messages.clear_address(address()),
        lambda: a.runners.register(info(7001)),
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


# ----------------------------------------------------------------------
# Leases on virtual time


async def test_lease_lapses_strictly_after_its_duration(a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        await acquire(a.runners, SHARD)
        await trio.sleep(LEASE)
        assert await b.runners.acquire([SHARD]) == {}
        await trio.sleep(0.001)
        assert SHARD in await b.runners.acquire([SHARD])


async def test_only_runner_storage_calls_heartbeat(a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire(a.runners, SHARD))[SHARD]
        for _ in range(10):
            await trio.sleep(LEASE / 2)
            await a.runners.refresh([])
            await a.messages.claim({SHARD: epoch}, now=BASE, limit=1)
        assert await b.runners.acquire([SHARD]) == {}
        for _ in range(4):
            await trio.sleep(LEASE / 2)
            await a.messages.claim({SHARD: epoch}, now=BASE, limit=1)
        assert SHARD in await b.runners.acquire([SHARD])


async def test_expire_session(storage, a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        await a.runners.register(info(7001))
        epochs = await acquire(a.runners, SHARD)
        storage.expire_session("a")
        assert await b.runners.live_runners() == []
        assert (await b.runners.shard_owners())[0].runner is None
        assert await b.runners.acquire([SHARD]) == {SHARD: epochs[SHARD] + 1}
        assert await a.runners.refresh([SHARD]) == set()
        assert [r.address.port for r in await b.runners.live_runners()] == [7001]
        # An expired session still receives notifications.
        storage.expire_session("a")
        await b.messages.save_requests([request(1)], now=BASE)
        assert await a.messages.wait_notifications() == [
            MessagesAvailable(frozenset({SHARD}))
        ]
        with pytest.raises(KeyError):
            storage.expire_session("nobody")


async def test_expired_session_keeps_its_machine_id(storage, a, b, autojump_clock):
    with trio.fail_after(TIMEOUT):
        assert await a.runners.register(info(7001)) == 0
        storage.expire_session("a")
        assert await b.runners.register(info(7002)) == 1
        await a.runners.refresh([])
        machine_ids = [r.machine_id for r in await b.runners.live_runners()]
        assert machine_ids == [0, 1]


# ----------------------------------------------------------------------
# Registry policy


async def test_machine_ids_are_smallest_free_and_reused(storage, a, b):
    assert await a.runners.register(info(7001)) == 0
    assert await b.runners.register(info(7002)) == 1
    assert await a.runners.register(info(7001, weight=2.0)) == 0  # re-register keeps it
    await a.runners.unregister()
    assert await b.runners.register(info(7002, weight=2.0)) == 1  # even with 0 free
    async with storage.open_session(name="c", lease_duration=LEASE) as c:
        assert await c.runners.register(info(7003)) == 0
    assert await a.runners.register(info(7001)) == 0


async def test_same_address_from_another_session_takes_over(a, b):
    await a.runners.register(info(7001))
    await b.runners.register(info(7001, weight=5.0))
    # The displaced registration's id stays reserved while its session lives.
    assert await a.runners.live_runners() == [
        attrs.evolve(info(7001, weight=5.0), machine_id=1)
    ]


async def test_no_free_machine_id(storage, monkeypatch):
    monkeypatch.setattr(_memory, "MACHINE_IDS", 4)
    async with AsyncExitStack() as stack:
        for i in range(4):
            session = await stack.enter_async_context(
                storage.open_session(name=f"r{i}", lease_duration=LEASE)
            )
            await session.runners.register(info(i + 1))
        extra = await stack.enter_async_context(
            storage.open_session(name="extra", lease_duration=LEASE)
        )
        with pytest.raises(PersistenceError, match="no free machine id"):
            await extra.runners.register(info(9999))
        assert len(await extra.runners.live_runners()) == 4


# ----------------------------------------------------------------------
# Messages: details the contract leaves open


async def test_retry_of_fast_path_save_reports_claimed(a):
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    saved = request(1, claim_epoch=epoch, primary_key="k")
    assert await a.messages.save_requests([saved], now=BASE) == [
        SaveResult(1, False, claimed=True)
    ]
    assert await a.messages.save_requests([saved], now=BASE) == [
        SaveResult(1, True, claimed=True)
    ]
    # Another request with the same key is delivered by whoever claimed it.
    same_key = request(2, claim_epoch=epoch, primary_key="k")
    assert await a.messages.save_requests([same_key], now=BASE) == [SaveResult(1, True)]


async def test_reply_naming_another_shard_is_refused(a):
    epochs = await acquire(a.runners, SHARD, SHARD2)
    await a.messages.save_requests([request(1)], now=BASE)
    wrong = final(1, epochs[SHARD2], shard_id=SHARD2)
    assert await a.messages.save_replies([wrong], now=BASE) == [
        ReplyOutcome.STALE_EPOCH
    ]


async def test_claim_with_a_clock_behind_the_saver(a):
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    await a.messages.save_requests([request(1, deliver_at=BASE + 10)], now=BASE + 20)
    batch = await a.messages.claim({SHARD: epoch}, now=BASE, limit=10)
    assert (batch.requests, batch.next_deliver_at) == ([], BASE + 10)
    assert [
        c.request_id
        for c in (
            await a.messages.claim({SHARD: epoch}, now=BASE + 10, limit=10)
        ).requests
    ] == [1]


async def test_claim_skips_deleted_requests(a):
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    batch = [
        request(1, deliver_at=BASE + 5),
        request(2, entity="e2"),
        request(3, entity="e2", deliver_at=BASE + 5),
        request(4, entity="e2", deliver_at=BASE + 9),
    ]
    await a.messages.save_requests(batch, now=BASE)
    await a.messages.save_requests([request(5)], now=BASE)
    assert await a.messages.clear_address(address("e2")) == 3
    batch = await a.messages.claim({SHARD: epoch}, now=BASE + 5, limit=10)
    assert ([c.request_id for c in batch.requests], batch.next_deliver_at) == (
        [1, 5],
        None,
    )


async def test_claim_merges_shards_by_save_order(a):
    epochs = await acquire(a.runners, SHARD, SHARD2)
    await a.messages.save_requests(
        [
            request(1),
            request(2, shard_id=SHARD2),
            request(3),
            request(4, shard_id=SHARD2),
        ],
        now=BASE,
    )
    batch = await a.messages.claim(epochs, now=BASE, limit=3)
    assert ([c.request_id for c in batch.requests], batch.more) == ([1, 2, 3], True)


async def test_notifications_are_coalesced(a, b):
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    await a.messages.save_requests(
        [request(1), request(2, deliver_at=BASE + 7)], now=BASE
    )
    await a.messages.save_requests(
        [request(3, shard_id=SHARD2, deliver_at=BASE + 3)], now=BASE
    )
    await a.messages.save_requests(
        [request(4, shard_id=SHARD2, deliver_at=BASE + 9)], now=BASE
    )
    await a.messages.save_replies([final(1, epoch)], now=BASE)
    await a.messages.interrupt([2, 404])
    await a.messages.save_replies([final(2, epoch)], now=BASE)
    await a.messages.interrupt([2])  # finished: no notification
    expected = [
        MessagesAvailable(frozenset({SHARD, SHARD2}), BASE + 3),
        RepliesAvailable(frozenset({1, 2})),
        RequestsInterrupted(frozenset({2}), frozenset({SHARD})),
    ]
    assert await b.messages.wait_notifications() == expected
    assert await a.messages.wait_notifications() == expected
    await a.messages.interrupt([1])  # finished: no notification
    await a.messages.save_requests([request(1)], now=BASE)  # duplicate: nothing saved
    await a.messages.save_requests([request(5)], now=BASE)
    assert await b.messages.wait_notifications() == [
        MessagesAvailable(frozenset({SHARD}))
    ]


async def test_retention_heap_drops_garbage(storage, a, monkeypatch):
    monkeypatch.setattr(MessageStore, "COMPACT_AFTER", 3)
    epoch = (await acquire(a.runners, SHARD))[SHARD]
    ids = range(1, 21)  # odd ids for entity e1, even ones for e0
    await a.messages.save_requests(
        [request(i, entity=f"e{i % 2}") for i in ids], now=BASE
    )
    await a.messages.save_replies([final(i, epoch) for i in ids], now=BASE)
    assert await a.messages.clear_address(address("e0")) == 10  # garbage stays
    assert len(storage._messages._processed) == 20
    # Skips the garbage entries of 2, 4 and 6 while deleting 1, 3, 5 and 7.
    assert await a.messages.delete_processed(older_than=BASE + 1, limit=4) == 4
    assert await a.messages.clear_address(address("e1")) == 6  # compacts
    assert storage._messages._processed == []
    await a.messages.save_requests([request(21)], now=BASE)
    await a.messages.save_replies([final(21, epoch)], now=BASE + 1)
    assert await a.messages.delete_processed(older_than=BASE + 2, limit=10) == 1
    assert (await replies(a.messages, 21)).known is False


async def test_claim_touches_only_nonempty_requested_shards(a, monkeypatch):
    """A runner holding 300 shards claims often: empty shards must cost one
    lookup, and requests claimed at this epoch must not be looked at."""
    shards = [shard(n) for n in range(1, 301)]
    epochs = await a.runners.acquire(shards)
    await a.messages.save_requests(
        [request(i, claim_epoch=epochs[SHARD]) for i in range(1, 5001)], now=BASE
    )
    await a.messages.save_requests([request(9001, shard_id=shard(300))], now=BASE)
    heads = []
    original = _ShardQueue.head

    def head(queue: _ShardQueue, now: float) -> int | None:
        heads.append(len(queue.ready))
        return original(queue, now)

    monkeypatch.setattr(_ShardQueue, "head", head)
    batch = await a.messages.claim(epochs, now=BASE, limit=100)
    assert [c.request_id for c in batch.requests] == [9001]
    # shard 1 (5000 in flight, nothing ready) and shard 300 once before and
    # once after claiming its request; never a scan of the in-flight ones.
    assert heads == [0, 1, 0]
    heads.clear()
    assert (await a.messages.claim(epochs, now=BASE, limit=100)).requests == []
    assert heads == [0, 0]


# ----------------------------------------------------------------------
# Argument validation


def _any(value: object) -> Any:
    """Pass a deliberately ill-typed value past mypy."""
    return value


BAD_CALLS = [
    (
        lambda s: s.messages.save_requests(_any(request(1)), now=BASE),
        TypeError,
        "requests must be a sequence of PersistedRequest",
    ),
    (
        lambda s: s.messages.save_requests(["x"], now=BASE),
        TypeError,
        "only PersistedRequest",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(request(1), request_id=_any("1"))], now=BASE
        ),
        TypeError,
        "PersistedRequest.request_id must be int",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(request(1), request_id=True)], now=BASE
        ),
        TypeError,
        "request_id must be int",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(request(1), primary_key=_any(3))], now=BASE
        ),
        TypeError,
        "primary_key must be str or None",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(request(1), stream=_any(1))], now=BASE
        ),
        TypeError,
        "stream must be bool",
    ),
    (
        lambda s: s.messages.save_requests([request(1, deliver_at=math.nan)], now=BASE),
        ValueError,
        "deliver_at must be finite",
    ),
    (
        lambda s: s.messages.save_requests([], now=_any("now")),
        TypeError,
        "now must be a float",
    ),
    (
        lambda s: s.messages.save_requests([], now=math.inf),
        ValueError,
        "now must be finite",
    ),
    (
        lambda s: s.messages.claim(_any([SHARD]), now=BASE, limit=1),
        TypeError,
        "mapping of ShardId",
    ),
    (
        lambda s: s.messages.claim({_any("x:1"): 1}, now=BASE, limit=1),
        TypeError,
        "keys must be ShardId",
    ),
    (
        lambda s: s.messages.claim({SHARD: _any("1")}, now=BASE, limit=1),
        TypeError,
        "must be an int",
    ),
    (
        lambda s: s.messages.claim({}, now=BASE, limit=-1),
        ValueError,
        "limit must be >= 0",
    ),
    (
        lambda s: s.messages.claim({}, now=BASE, limit=_any(1.5)),
        TypeError,
        "limit must be an int",
    ),
    (
        lambda s: s.messages.save_replies([], now=_any(None)),
        TypeError,
        "now must be a float",
    ),
    (
        lambda s: s.messages.save_replies(
            [ReplyRecord(1, SHARD, 1, b"", sequence=-1)], now=BASE
        ),
        ValueError,
        "sequence must be >= 0",
    ),
    (
        lambda s: s.messages.save_replies(
            [ReplyRecord(1, SHARD, 1, _any("x"))], now=BASE
        ),
        TypeError,
        "ReplyRecord.payload must be bytes",
    ),
    (
        lambda s: s.messages.replies_for([ReplyQuery(1, _any(None))]),
        TypeError,
        "after_sequence must be int",
    ),
    (
        lambda s: s.messages.ack_chunks([_any((1, 2, 3))]),
        TypeError,
        r"\(int, int\) pairs",
    ),
    (
        lambda s: s.messages.ack_chunks([(1, _any("2"))]),
        TypeError,
        "sequence must be an int",
    ),
    (lambda s: s.messages.interrupt(_any("123")), TypeError, "sequence of int"),
    (lambda s: s.messages.interrupt([False]), TypeError, "request id must be an int"),
    (
        lambda s: s.messages.clear_address(_any("Counter/e1")),
        TypeError,
        "must be an EntityAddress",
    ),
    (
        lambda s: s.messages.delete_processed(older_than=BASE, limit=-5),
        ValueError,
        "limit must be >= 0",
    ),
    (
        lambda s: s.runners.register(_any("10.0.0.1:7001")),
        TypeError,
        "must be a RunnerInfo",
    ),
    (
        lambda s: s.runners.register(RunnerInfo(info(1).address, _any(["g"]))),
        TypeError,
        "RunnerInfo.groups must be tuple",
    ),
    (
        lambda s: s.runners.register(RunnerInfo(info(1).address, _any((1,)))),
        TypeError,
        "RunnerInfo.groups must contain only str",
    ),
    (lambda s: s.runners.acquire([SHARD, _any("g:2")]), TypeError, "only ShardId"),
    (lambda s: s.runners.refresh(_any(SHARD)), TypeError, "sequence of ShardId"),
    (lambda s: s.runners.release(_any({SHARD: 1})), TypeError, "sequence of ShardId"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_CALLS)
async def test_bad_arguments_are_rejected(a, call, error, message):
    with pytest.raises(error, match=message):
        await call(a)


async def test_a_displaced_registration_keeps_its_machine_id_reserved(autojump_clock):
    storage = MemoryStorage()
    address = info(1)
    async with storage.open_session(name="old", lease_duration=5.0) as old:
        old_id = await old.runners.register(address)
        async with storage.open_session(name="new", lease_duration=5.0) as new:
            new_id = await new.runners.register(address)
            # The old session may still mint Snowflake ids with its id.
            assert new_id != old_id
            assert [r.machine_id for r in await new.runners.live_runners()] == [new_id]
            async with storage.open_session(name="third", lease_duration=5.0) as third:
                other = info(2)
                assert await third.runners.register(other) not in {old_id, new_id}
    async with storage.open_session(name="later", lease_duration=5.0) as later:
        assert await later.runners.register(address) == old_id  # freed on close
