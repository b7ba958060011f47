"""Persisted messages end to end on memory storage, in one runner."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import PersistedRequest, ReplyQuery, StorageSession
from trio_cluster.storage import MemoryStorage

from .helpers import Get, config

ORIGIN = 1_800_000_000.0


@attrs.frozen
class Deposit:
    tx_id: str
    amount: int


@attrs.frozen
class Later:
    text: str
    at: float


class Account(tc.Entity):
    type_name = "Account"
    concurrency = 2

    def __init__(self) -> None:
        self.balance = 0
        self.applied: list[str] = []

    @tc.rpc(persisted=True, primary_key=lambda m: m.tx_id)
    async def deposit(self, msg: Deposit) -> int:
        self.balance += msg.amount
        self.applied.append(msg.tx_id)
        return self.balance

    @tc.rpc(persisted=True)
    async def slow_deposit(self, msg: Deposit) -> int:
        await trio.sleep(10)
        self.balance += msg.amount
        self.applied.append(msg.tx_id)
        return self.balance

    @tc.rpc(persisted=True)
    async def crash(self, msg: Deposit) -> None:
        await trio.sleep(1)
        raise RuntimeError(f"crash {msg.tx_id}")

    @tc.rpc(persisted=True, deliver_at=lambda m: m.at)
    async def remind(self, msg: Later) -> float:
        from trio_cluster import current_runner

        self.applied.append(msg.text)
        return current_runner().clock.now()

    @tc.rpc
    async def applied_ids(self, msg: Get) -> list[str]:
        return list(self.applied)


class Ledger(tc.Entity):
    """Like Account, one handler at a time (FIFO applies to completion too)."""

    type_name = "Ledger"

    def __init__(self) -> None:
        self.applied: list[str] = []

    @tc.rpc(persisted=True)
    async def slow_append(self, msg: Deposit) -> None:
        await trio.sleep(10)
        self.applied.append(msg.tx_id)

    @tc.rpc
    async def applied_ids(self, msg: Get) -> list[str]:
        return list(self.applied)


def clock() -> tc.TrioWallClock:
    return tc.TrioWallClock(origin=ORIGIN)


async def test_persisted_call_returns_and_is_stored(autojump_clock):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Account)("alice")
        assert await ref.deposit(Deposit("t1", 10)) == 10
        assert await ref.deposit(Deposit("t2", 5)) == 15
        stats = runner.statistics()
        assert stats.persisted_delivered == 2
        assert stats.storage_claims >= 1


async def test_duplicate_primary_key_returns_the_original_reply(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        ref = runner.client(Account)("alice")
        assert await ref.deposit(Deposit("t1", 10)) == 10
        assert await ref.deposit(Deposit("t1", 10)) == 10  # not applied twice
        assert await ref.deposit(Deposit("t2", 1)) == 11
        assert await ref.applied_ids(Get()) == ["t1", "t2"]


async def test_duplicate_while_in_flight_attaches_to_the_original(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        ref = runner.client(Account)("bob")
        results: list[int] = []

        async def deposit() -> None:
            results.append(await ref.deposit(Deposit("same", 7)))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(deposit)
        assert results == [7] * 5
        assert await ref.applied_ids(Get()) == ["same"]


async def test_deliver_at_fires_on_time_without_polling(autojump_clock):
    # A huge poll interval proves delivery is driven by a timer.
    cfg = config(storage_poll_interval=3600.0)
    async with tc.open_runner(entities=[Account], config=cfg, clock=clock()) as runner:
        ref = runner.client(Account)("carol")
        at = runner.clock.now() + 42.5
        start = trio.current_time()
        delivered_at = await ref.remind(Later("hello", at))
        assert delivered_at == pytest.approx(at, abs=1e-6)
        assert trio.current_time() - start == pytest.approx(42.5, abs=1e-6)


async def test_deliver_at_accepts_aware_datetimes(autojump_clock):
    class Reminder(tc.Entity):
        type_name = "Reminder"

        @tc.rpc(persisted=True, deliver_at=lambda m: datetime.fromtimestamp(m.at, UTC))
        async def remind(self, msg: Later) -> str:
            return msg.text

    async with tc.open_runner(
        entities=[Reminder], config=config(), clock=clock()
    ) as runner:
        start = trio.current_time()
        assert (
            await runner.client(Reminder)("r").remind(
                Later("x", runner.clock.now() + 3)
            )
            == "x"
        )
        assert trio.current_time() - start == pytest.approx(3, abs=1e-6)


async def test_deliver_at_discard_then_wait(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        ref = runner.client(Account)("dan")
        now = runner.clock.now()
        await ref.remind.discard(Later("second", now + 20))
        await ref.remind.discard(Later("first", now + 10))
        await trio.sleep(15)
        assert await ref.applied_ids(Get()) == ["first"]
        await trio.sleep(10)
        assert await ref.applied_ids(Get()) == ["first", "second"]


async def test_crash_replays_sibling_persisted_requests(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        ref = runner.client(Account)("eve")
        results: dict[str, object] = {}

        async def slow() -> None:
            results["slow"] = await ref.slow_deposit(Deposit("s1", 3))

        async def crash() -> None:
            try:
                await ref.crash(Deposit("c1", 0))
            except tc.RemoteError as exc:
                results["crash"] = exc.message

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(crash)
        # slow_deposit was cancelled by the crash and replayed on the new
        # incarnation: applied exactly once, one reply.
        assert results == {"slow": 3, "crash": "crash c1"}
        assert await ref.applied_ids(Get()) == ["s1"]


async def test_unfinished_persisted_requests_survive_a_runner_restart(autojump_clock):
    storage = MemoryStorage()
    cfg = config(entity_termination_timeout=0.5)
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Ledger)("frank")
        for i in range(3):
            await ref.slow_append.discard(Deposit(f"s{i}", 1))
        await trio.sleep(1)
        # Shutting down cancels the running handler after 0.5 s: no reply.
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Ledger)("frank")
        await trio.sleep(40)
        # Replayed in their original order, each applied once.
        assert await ref.applied_ids(Get()) == ["s0", "s1", "s2"]


async def test_interrupting_a_persisted_call_records_the_interruption(autojump_clock):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Account)("gina")
        with trio.move_on_after(1):
            await ref.slow_deposit(Deposit("x", 5))
        await trio.sleep(20)
        assert await ref.applied_ids(Get()) == []


async def test_attached_caller_sees_interruption(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        ref = runner.client(Account)("hal")

        outcome: list[BaseException] = []

        async def second() -> None:
            await trio.sleep(0.5)
            try:
                await ref.deposit(Deposit("k", 1))
            except tc.RequestInterruptedError as exc:
                outcome.append(exc)

        # Occupy both permits so "k" stays queued, then interrupt it.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.slow_deposit, Deposit("a", 1))
            nursery.start_soon(ref.slow_deposit, Deposit("b", 1))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            with trio.move_on_after(1):
                await ref.deposit(Deposit("k", 1))
        assert len(outcome) == 1


async def test_unknown_entity_type_in_storage_gets_an_error_reply(autojump_clock):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        address = tc.EntityAddress("Ghost", tc.EntityId("g"), tc.ShardId("default", 1))
        async with storage.open_session(name="other", lease_duration=5) as session:
            await session.messages.save_requests(
                [
                    PersistedRequest(
                        request_id=1, address=address, tag="x", payload=b"\x80"
                    )
                ],
                now=runner.clock.now(),
            )
            await trio.sleep(10)
            [replies] = await session.messages.replies_for([ReplyQuery(1)])
        assert replies.final is not None
        # Decode with any handler's reply codec: it is a cluster error.
        handler = runner._registry.get("Account").handlers["deposit"]  # type: ignore[union-attr]
        with pytest.raises(tc.UnknownEntityTypeError, match="Ghost"):
            handler.reply.decode_exit(replies.final).unwrap()


async def test_malformed_stored_payload_gets_an_error_reply(autojump_clock):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        address = runner.client(Account).address_of("ivy")
        async with storage.open_session(name="other", lease_duration=5) as session:
            await session.messages.save_requests(
                [
                    PersistedRequest(
                        request_id=2,
                        address=address,
                        tag="deposit",
                        payload=b"\x81\xa1x\x01",
                    )
                ],
                now=runner.clock.now(),
            )
            await trio.sleep(10)
            [replies] = await session.messages.replies_for([ReplyQuery(2)])
        handler = runner._registry.get("Account").handlers["deposit"]  # type: ignore[union-attr]
        assert replies.final is not None
        with pytest.raises(tc.MalformedMessageError, match="required field missing"):
            handler.reply.decode_exit(replies.final).unwrap()


async def test_unencodable_message_is_refused_before_storing(autojump_clock):
    async with tc.open_runner(
        entities=[Account], config=config(), clock=clock()
    ) as runner:
        with pytest.raises(tc.MalformedMessageError):
            await runner.client(Account)("j").deposit(Deposit("t", "not an int"))  # type: ignore[arg-type]


async def test_oversized_message_is_refused(autojump_clock):
    cfg = config(max_message_size=64)
    async with tc.open_runner(entities=[Account], config=cfg, clock=clock()) as runner:
        with pytest.raises(tc.MessageTooLargeError):
            await runner.client(Account)("k").deposit(Deposit("t" * 100, 1))


async def test_lost_lock_replays_the_running_persisted_request(autojump_clock):
    storage = MemoryStorage()
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Ledger)("kim")
        results: list[str] = []

        async def append() -> None:
            await ref.slow_append(Deposit("only", 1))
            results.append("done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            await trio.sleep(2)  # the handler is half way through its 10 s
            # The runner's lock session ends: its next refresh finds the locks
            # gone, it stops serving (cancelling the handler), re-acquires the
            # shards at a new epoch and replays the stored request.
            storage.expire_session(str(runner.address))
        assert results == ["done"]
        assert await ref.applied_ids(Get()) == ["only"]
        assert runner.statistics().failovers >= 1


class LockLosingStorage(MemoryStorage):
    """MemoryStorage whose first refresh after ``lose_at`` reports every lock
    gone while the shards' epochs stay current, as PostgreSQL does when a lock
    session died and no other runner has taken the shards yet."""

    def __init__(self, lose_at: float) -> None:
        super().__init__()
        self.lose_at = lose_at
        self.lost = False

    @asynccontextmanager
    async def open_session(
        self, *, name: str, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        async with super().open_session(
            name=name, lease_duration=lease_duration
        ) as session:
            runners = session.runners
            original = runners.refresh

            async def refresh(shards: Collection[tc.ShardId]) -> set[tc.ShardId]:
                held = await original(shards)
                if not self.lost and trio.current_time() >= self.lose_at:
                    self.lost = True
                    return set()
                return held

            runners.refresh = refresh  # type: ignore[method-assign]
            yield session


async def test_shard_stopped_under_a_persisted_handler_records_nothing(autojump_clock):
    storage = LockLosingStorage(lose_at=2.0)
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Ledger)("lee")
        # Stopped at t=2 (handler cancelled), re-acquired, replayed: 2 + 10 s.
        await ref.slow_append(Deposit("only", 1))
        assert trio.current_time() == pytest.approx(12, abs=0.5)
        assert await ref.applied_ids(Get()) == ["only"]
        assert runner.statistics().failovers >= 1


async def test_lapsed_lease_replays_the_running_persisted_request(autojump_clock):
    # Refreshes hang from t=2 to t=6: the local lease lapses (the shard is
    # stopped, its handler cancelled) while the lock is still held. Nothing
    # may be recorded for the cancelled request: it must run again.
    storage = MemoryStorage()

    async def hang_refreshes(session: str, operation: str) -> None:
        if operation == "refresh" and 2 <= trio.current_time() < 6:
            await trio.sleep_until(6)

    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with tc.open_runner(
        entities=[Ledger], config=cfg, storage=storage, clock=clock()
    ) as runner:
        ref = runner.client(Ledger)("lee")
        storage.fault_hook = hang_refreshes
        await ref.slow_append(Deposit("only", 1))
        assert await ref.applied_ids(Get()) == ["only"]
        assert runner.statistics().failovers >= 1
        assert trio.current_time() > 12  # ran again after the lapse


async def test_janitor_deletes_finished_requests_after_retention(autojump_clock):
    cfg = config(
        retention_age=100.0,
        retention_interval=10.0,
        retention_batch_size=2,
        entity_max_idle=1000.0,  # keep the balance in memory throughout
    )

    async with tc.open_runner(entities=[Account], config=cfg, clock=clock()) as runner:
        ref = runner.client(Account)("zed")
        for i in range(5):
            assert await ref.deposit(Deposit(f"t{i}", 1)) == i + 1
        await trio.sleep(50)
        # Within retention, a duplicate gets the stored reply.
        assert await ref.deposit(Deposit("t0", 1)) == 1
        await trio.sleep(70)
        # Past retention, the request is gone: the same key runs again.
        assert await ref.deposit(Deposit("t0", 1)) == 6


async def test_reserved_singleton_names(autojump_clock):
    async def run() -> None:
        pass

    with pytest.raises(tc.EntityDefinitionError, match="reserved"):
        async with tc.open_runner(
            singletons=[tc.Singleton("trio_cluster.janitor", run)]
        ):
            pytest.fail("must not start")
