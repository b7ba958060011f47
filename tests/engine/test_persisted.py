"""Persisted messages (`trio_cluster._engine._persisted`) end to end on memory
storage: in one runner, between two runners through storage alone
(notifications, with polling as the fallback), and under lost locks."""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import (
    Notification,
    NotificationsMissed,
    PersistedRequest,
    ReplyQuery,
    RunnerInfo,
    StorageSession,
)
from trio_cluster.storage import MemoryStorage

from ..helpers import (
    Account,
    Add,
    Deposit,
    FailFirst,
    Get,
    Later,
    Ledger,
    PatchingStorage,
    RefreshPatchingStorage,
    config,
    deposit_beside_a_bad_one,
    open_clocked_runner,
    open_pair,
    remote_id,
)
from ..memory_cluster import Tally, Where, open_cluster


async def test_persisted_call_returns_and_is_stored(autojump_clock):
    storage = MemoryStorage()
    async with open_clocked_runner([Account], config(), storage) as runner:
        ref = runner.client(Account)("alice")
        assert await ref.deposit(Deposit("t1", 10)) == 10
        assert await ref.deposit(Deposit("t2", 5)) == 15
        stats = runner.statistics()
        assert stats.persisted_delivered == 2
        assert stats.storage_claims >= 1


async def test_duplicate_primary_key_returns_the_original_reply(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
        ref = runner.client(Account)("alice")
        assert await ref.deposit(Deposit("t1", 10)) == 10
        assert await ref.deposit(Deposit("t1", 10)) == 10  # not applied twice
        assert await ref.deposit(Deposit("t2", 1)) == 11
        assert await ref.applied_ids(Get()) == ["t1", "t2"]


async def test_duplicate_while_in_flight_attaches_to_the_original(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
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
    async with open_clocked_runner([Account], cfg) as runner:
        ref = runner.client(Account)("carol")
        at = runner.clock.now() + 42.5
        start = trio.current_time()
        delivered_at = await ref.remind(Later("hello", at))
        assert delivered_at == pytest.approx(at, abs=1e-6)
        assert trio.current_time() - start == pytest.approx(42.5, abs=1e-6)


class SlowClaims(PatchingStorage):
    """Every claim takes 0.1 s (a round trip behind other traffic)."""

    def patch_session(self, session: StorageSession) -> None:
        messages = session.messages
        claim = messages.claim

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await trio.sleep(0.1)
            return await claim(*args, **kwargs)

        messages.claim = slow  # type: ignore[method-assign]


async def test_timers_are_claimed_early_and_fire_on_time(autojump_clock):
    # W12: a wake-up was claimed once due, so the claim's round trip (and
    # its wait for a connection) was added to every timer's lateness. A
    # timer is now claimed up to EARLY seconds before its time and fires
    # from memory.
    cfg = config(storage_poll_interval=3600.0)
    async with open_clocked_runner([Account], cfg, SlowClaims()) as runner:
        ref = runner.client(Account)("erin")
        now = runner.clock.now()
        times = [now + 5.0, now + 5.05, now + 5.1, now + 7.0]
        delivered: dict[int, float] = {}

        async def remind(i: int) -> None:
            delivered[i] = await ref.remind(Later(f"t{i}", times[i]))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(len(times)):
                    nursery.start_soon(remind, i)
        assert [delivered[i] for i in range(len(times))] == pytest.approx(
            times, abs=1e-6
        )
        assert await ref.applied_ids(Get()) == ["t0", "t1", "t2", "t3"]


async def test_an_early_claimed_timer_can_be_interrupted(autojump_clock):
    cfg = config(storage_poll_interval=3600.0)
    async with open_clocked_runner([Account], cfg) as runner:
        ref = runner.client(Account)("fay")
        at = runner.clock.now() + 1.0
        with trio.move_on_after(0.9):  # claimed early by now (EARLY = 1 s)
            await ref.remind(Later("never", at))
        await trio.sleep(2.0)
        assert "never" not in await ref.applied_ids(Get())
        assert runner.statistics().persisted_in_flight == 0


async def test_deliver_at_accepts_aware_datetimes(autojump_clock):
    class Reminder(tc.Entity):
        type_name = "Reminder"

        @tc.rpc(persisted=True, deliver_at=lambda m: datetime.fromtimestamp(m.at, UTC))
        async def remind(self, msg: Later) -> str:
            return msg.text

    async with open_clocked_runner([Reminder]) as runner:
        start = trio.current_time()
        assert (
            await runner.client(Reminder)("r").remind(
                Later("x", runner.clock.now() + 3)
            )
            == "x"
        )
        assert trio.current_time() - start == pytest.approx(3, abs=1e-6)


async def test_deliver_at_discard_then_wait(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
        ref = runner.client(Account)("dan")
        now = runner.clock.now()
        await ref.remind.discard(Later("second", now + 20))
        await ref.remind.discard(Later("first", now + 10))
        await trio.sleep(15)
        assert await ref.applied_ids(Get()) == ["first"]
        await trio.sleep(10)
        assert await ref.applied_ids(Get()) == ["first", "second"]


async def test_crash_replays_sibling_persisted_requests(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
        ref = runner.client(Account)("eve")
        results: dict[str, object] = {}

        async def slow() -> None:
            results["slow"] = await ref.slow_deposit(Deposit("s1", 3))

        async def crash() -> None:
            try:
                await ref.crash(Deposit("c1", 0))
            except tc.DeadLetteredError as exc:
                results["crash"] = (exc.attempts, exc.error.split(" (in ")[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(crash)
        # slow_deposit was cancelled by the crash and replayed on the new
        # incarnation: applied exactly once, one reply. The crashing request
        # was attempted three times (the default policy), then dead-lettered.
        assert results == {"slow": 3, "crash": (3, "RuntimeError: crash c1")}
        assert await ref.applied_ids(Get()) == ["s1"]


async def test_unfinished_persisted_requests_survive_a_runner_restart(autojump_clock):
    storage = MemoryStorage()
    cfg = config(entity_termination_timeout=0.5)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("frank")
        for i in range(3):
            await ref.slow_append.discard(Deposit(f"s{i}", 1))
        await trio.sleep(1)
        # Shutting down cancels the running handler after 0.5 s: no reply.
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("frank")
        await trio.sleep(40)
        # Replayed in their original order, each applied once.
        assert await ref.applied_ids(Get()) == ["s0", "s1", "s2"]


async def test_interrupting_a_persisted_call_records_the_interruption(autojump_clock):
    storage = MemoryStorage()
    async with open_clocked_runner([Account], config(), storage) as runner:
        ref = runner.client(Account)("gina")
        with trio.move_on_after(1):
            await ref.slow_deposit(Deposit("x", 5))
        await trio.sleep(20)
        assert await ref.applied_ids(Get()) == []


async def test_attached_caller_sees_interruption(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
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
    async with open_clocked_runner([Account], config(), storage) as runner:
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
    async with open_clocked_runner([Account], config(), storage) as runner:
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


class CutNotifications(PatchingStorage):
    """MemoryStorage whose notifications can be cut: while `cut`, every
    notification is dropped; once `restored` is set, the next wait returns
    `NotificationsMissed`, as a backend whose connection came back."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = False
        self.restored = trio.Event()

    def patch_session(self, session: StorageSession) -> None:
        messages = session.messages
        original = messages.wait_notifications

        async def drop_all() -> None:
            while True:
                await original()

        async def wait() -> list[Notification]:
            while True:
                if self.cut:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drop_all)
                        await self.restored.wait()
                        nursery.cancel_scope.cancel()
                    self.cut = False
                    return [NotificationsMissed()]
                notifications = await original()
                if not self.cut:
                    return notifications

        messages.wait_notifications = wait  # type: ignore[method-assign]


async def test_nothing_is_polled_and_missed_notifications_are_read_again(
    autojump_clock,
):
    # Storage announces every loss of its notifications: the runner never
    # polls it, and reads everything again when told some were missed.
    storage = CutNotifications()
    async with open_clocked_runner([Account], config(), storage) as runner:
        address = runner.client(Account).address_of("ivy")
        storage.cut = True
        async with storage.open_session(name="other", lease_duration=5) as session:
            request = PersistedRequest(
                request_id=3, address=address, tag="deposit", payload=b"\x81\xa1x\x01"
            )
            await session.messages.save_requests([request], now=runner.clock.now())
            await trio.sleep(60)  # twelve safety-net polls, were there any
            [replies] = await session.messages.replies_for([ReplyQuery(3)])
            assert replies.final is None  # never claimed
            storage.restored.set()
            await trio.sleep(0.5)
            [replies] = await session.messages.replies_for([ReplyQuery(3)])
        assert replies.final is not None  # claimed and answered at once


async def test_unencodable_message_is_refused_before_storing(autojump_clock):
    async with open_clocked_runner([Account]) as runner:
        with pytest.raises(tc.MalformedMessageError):
            await runner.client(Account)("j").deposit(Deposit("t", "not an int"))  # type: ignore[arg-type]


async def test_oversized_message_is_refused(autojump_clock):
    cfg = config(max_message_size=64)
    async with open_clocked_runner([Account], cfg) as runner:
        with pytest.raises(tc.MessageTooLargeError):
            await runner.client(Account)("k").deposit(Deposit("t" * 100, 1))


async def test_lost_lock_replays_the_running_persisted_request(autojump_clock):
    storage = MemoryStorage()
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
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


class LockLosingStorage(RefreshPatchingStorage):
    """MemoryStorage whose first refresh after ``lose_at`` reports every lock
    gone while the shards' epochs stay current, as PostgreSQL does when a lock
    session died and no other runner has taken the shards yet."""

    def __init__(self, lose_at: float) -> None:
        super().__init__()
        self.lose_at = lose_at
        self.lost = False

    async def refreshed(
        self, answer: tuple[set[tc.ShardId], list[RunnerInfo]]
    ) -> tuple[set[tc.ShardId], list[RunnerInfo]]:
        await trio.lowlevel.checkpoint()
        if not self.lost and trio.current_time() >= self.lose_at:
            self.lost = True
            return set(), answer[1]
        return answer


class LateRefreshStorage(RefreshPatchingStorage):
    """MemoryStorage whose lease refreshes between ``start`` and ``end``
    renew the session (its locks stay held) but answer only at ``end``, as a
    statement whose answer waited unread: the runner's local leases lapse
    while the locks are still held."""

    def __init__(self, start: float, end: float) -> None:
        super().__init__()
        self.start, self.end = start, end

    async def refreshed(
        self, answer: tuple[set[tc.ShardId], list[RunnerInfo]]
    ) -> tuple[set[tc.ShardId], list[RunnerInfo]]:
        if self.start <= trio.current_time() < self.end:
            await trio.sleep_until(self.end)
        else:
            await trio.lowlevel.checkpoint()
        return answer


async def test_shard_stopped_under_a_persisted_handler_records_nothing(autojump_clock):
    storage = LockLosingStorage(lose_at=2.0)
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("lee")
        # Stopped at t=2 (handler cancelled), re-acquired, replayed: 2 + 10 s.
        await ref.slow_append(Deposit("only", 1))
        assert trio.current_time() == pytest.approx(12, abs=0.5)
        assert await ref.applied_ids(Get()) == ["only"]
        assert runner.statistics().failovers >= 1


async def test_lapsed_lease_replays_the_running_persisted_request(autojump_clock):
    # Refreshes answer late from t=2 to t=6: the local lease lapses (the
    # shard is stopped, its handler cancelled) while the lock is still held.
    # Nothing may be recorded for the cancelled request: it must run again.
    storage = LateRefreshStorage(2, 6)
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("lee")
        await ref.slow_append(Deposit("only", 1))
        assert await ref.applied_ids(Get()) == ["only"]
        assert runner.statistics().failovers >= 1
        assert trio.current_time() > 12  # ran again after the lapse


async def test_a_detached_handler_stops_at_the_lapse_and_its_scope_is_not_moved(
    autojump_clock,
):
    # A handler in a task of the shard's nursery (a discard: nobody waits
    # here) keeps its own deadline through the lease extensions (the
    # nursery's deadline is the lease's), and still stops when the lease
    # lapses (refreshes answer late from t=2 to t=6, lease 3 s).
    storage = LateRefreshStorage(2, 6)
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("dee")
        await ref.slow_append.discard(Deposit("only", 1))
        address = runner.client(Ledger).address_of("dee")
        host = runner._parts.sharding.table.hosts[address.shard]
        with trio.fail_after(1):
            while not host.running:  # noqa: ASYNC110
                await trio.sleep(0.01)
        [(scope, own)] = host.scopes.items()
        assert own is None  # in the shard's nursery: not moved
        assert scope.deadline == math.inf
        before = host.lease_deadline
        await trio.sleep_until(1.5)  # an extension at t=1
        assert host.lease_deadline > before
        assert scope.deadline == math.inf
        await trio.sleep_until(8)  # the lease lapsed meanwhile
        assert not host.running  # cancelled, before its 10 s were up
        assert runner.statistics().failovers >= 1
        with trio.fail_after(60):
            while await ref.applied_ids(Get()) != ["only"]:  # noqa: ASYNC110
                await trio.sleep(1)  # replayed on the next epoch


class Picky(tc.Entity):
    type_name = "Picky"

    @tc.rpc(persisted=True, primary_key=lambda m: m.amount)  # not a str
    async def keyed(self, msg: Add) -> None:
        pass


async def test_bad_primary_key_and_deliver_at_values(autojump_clock):
    class Timed(tc.Entity):
        type_name = "Timed"

        @tc.rpc(persisted=True, deliver_at=lambda m: datetime(2030, 1, 1))  # naive
        async def naive(self, msg: Add) -> None:
            pass

        @tc.rpc(persisted=True, deliver_at=lambda m: "soon")  # type: ignore[arg-type,return-value]
        async def nonsense(self, msg: Add) -> None:
            pass

    async with tc.open_runner(entities=[Picky, Timed], config=config()) as runner:
        with pytest.raises(tc.EntityDefinitionError, match="non-empty str"):
            await runner.client(Picky)("p").keyed(Add(1))
        with pytest.raises(tc.EntityDefinitionError, match="naive datetime"):
            await runner.client(Timed)("t").naive(Add(1))
        with pytest.raises(
            tc.EntityDefinitionError, match="aware datetime, Unix seconds"
        ):
            await runner.client(Timed)("t").nonsense(Add(1))


async def test_persisted_delivery_survives_failing_claims(autojump_clock):
    storage = MemoryStorage()

    async def claims_fail_for_a_while(session: str, operation: str) -> None:
        if operation == "claim" and trio.current_time() < 3:
            raise OSError("database restarting")

    async with open_clocked_runner([Account], config(), storage) as runner:
        storage.fault_hook = claims_fail_for_a_while
        # A delayed message is found by claiming (no fast path): due at t=1,
        # claimable once claims work again (t=3, retried each second).
        at = runner.clock.now() + 1
        with trio.fail_after(10):
            delivered_at = await runner.client(Account)("a").remind(Later("x", at))
        assert delivered_at >= at + 2
        assert trio.current_time() <= 4.5


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
        host = runner._parts.sharding.table.hosts.get(address.shard)
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

    async with open_clocked_runner([Account], config(), storage) as runner:
        storage.fault_hook = failing_saves
        with pytest.raises(tc.PersistenceError) as info:
            await runner.client(Account)("a").deposit(Deposit("t", 1))
        assert isinstance(info.value.__cause__, OSError)
        storage.fault_hook = None
        assert await runner.client(Account)("a").deposit(Deposit("t", 1)) == 1


async def test_reply_writes_are_retried_until_they_succeed(autojump_clock):
    storage = MemoryStorage()
    flaky_replies = FailFirst("save_replies", 3, "connection reset")
    async with open_clocked_runner([Account], config(), storage) as runner:
        storage.fault_hook = flaky_replies
        assert await runner.client(Account)("a").deposit(Deposit("t", 7)) == 7
        assert flaky_replies.left == 0


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


@attrs.frozen
class Job:
    name: str
    at: float


class Worker(tc.Entity):
    type_name = "Worker"
    done: ClassVar[list[tuple[str, float]]] = []
    all_done: ClassVar[trio.Event | None] = None
    expected: ClassVar[int] = 0

    @tc.rpc(persisted=True, deliver_at=lambda m: m.at)
    async def work(self, msg: Job) -> None:
        await trio.sleep(1)
        Worker.done.append((msg.name, trio.current_time()))
        if len(Worker.done) == Worker.expected and Worker.all_done is not None:
            Worker.all_done.set()

    @tc.rpc
    async def ping(self, msg: Get) -> None:
        pass


async def test_recorded_replies_refill_an_exhausted_budget(autojump_clock):
    Worker.done, Worker.all_done, Worker.expected = [], trio.Event(), 6
    # A poll interval of an hour: only the wake-up after each recorded reply
    # can make the read loop claim the rest in time.
    cfg = config(max_persisted_in_flight=2, storage_poll_interval=3600.0)
    async with open_clocked_runner([Worker], cfg) as runner:
        client = runner.client(Worker)
        start = trio.current_time()
        at = runner.clock.now() + 1  # stored unclaimed, claimed at that time
        for i in range(6):
            await client(f"w{i}").work.discard(Job(f"j{i}", at))
        with trio.fail_after(30):
            await Worker.all_done.wait()
        finished = sorted(t - start for _, t in Worker.done)
        # Two at a time: claimed at 1 s, done at 2 s, then 3 s, then 4 s.
        assert finished[1] <= 2.5
        assert finished[2] >= 2.5  # the budget held the third one back
        assert finished[-1] <= 5
        assert runner.statistics().persisted_in_flight == 0


@attrs.frozen
class Enter:
    n: int


class Gated(tc.Entity):
    """Persisted handlers that wait for ``opened``, noting what ran."""

    type_name = "Gated"
    opened: ClassVar[trio.Event | None] = None
    ran: ClassVar[list[tuple[str, int]]] = []

    @tc.rpc(persisted=True)
    async def enter(self, msg: Enter) -> None:
        Gated.ran.append((self.id, msg.n))
        assert Gated.opened is not None
        await Gated.opened.wait()


async def test_a_burst_of_local_sends_stays_within_the_in_flight_budget(
    autojump_clock,
):
    # Regression (W12): a local send saved its request already claimed and
    # delivered it at once, beyond `max_persisted_in_flight`: 100,000
    # workflow starts stored at once were 100,000 activations in memory, and
    # the runner stalled and lost its lock session. Beyond the budget a send
    # is saved unclaimed; the read loop admits it as replies free the budget.
    Gated.opened, Gated.ran = trio.Event(), []
    cfg = config(max_persisted_in_flight=4, storage_poll_interval=3600.0)
    async with open_clocked_runner([Gated], cfg) as runner:
        client = runner.client(Gated)
        peak = 0

        async def sender(entity: str) -> None:
            nonlocal peak
            for n in range(3):  # in order, one after the other
                await client(entity).enter.discard(Enter(n))
                peak = max(peak, runner.statistics().persisted_in_flight)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(sender, f"e{i}")
        await trio.testing.wait_all_tasks_blocked()
        peak = max(peak, runner.statistics().persisted_in_flight)
        assert peak <= 4
        Gated.opened.set()
        with trio.fail_after(30):
            while len(Gated.ran) < 30:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.1)
        # Per-entity order held although some were claimed from storage.
        for i in range(10):
            assert [n for e, n in Gated.ran if e == f"e{i}"] == [0, 1, 2]
        assert runner.statistics().persisted_in_flight == 0


BAD_KEYS = [
    ("a\x00b", tc.InvalidIdError),
    # The key is the message's own field: the message cannot be encoded.
    ("lone \ud800 surrogate", tc.MalformedMessageError),
]


@pytest.mark.parametrize(("bad_key", "error"), BAD_KEYS)
async def test_a_key_storage_cannot_hold_fails_only_its_own_call(
    autojump_clock, bad_key, error
):
    # Regression: on PostgreSQL a NUL in one primary key failed the whole
    # batched save, so every concurrent persisted call failed.
    async with tc.open_runner(entities=[Account], config=config()) as runner:
        outcomes = await deposit_beside_a_bad_one(runner, bad_key)
    innocent = [o for o in outcomes[:-1] if not isinstance(o, int)]
    assert innocent == [], f"{len(innocent)} innocent calls failed: {innocent[:1]}"
    assert isinstance(outcomes[-1], error)


@pytest.mark.parametrize("bad_id", ["a\x00b", "\udfff", "", " padded", "x" * 256])
async def test_an_entity_id_storage_cannot_hold_is_a_typed_error(
    autojump_clock, bad_id
):
    async with tc.open_runner(entities=[Account], config=config()) as runner:
        with pytest.raises(tc.InvalidIdError):
            runner.client(Account)(bad_id)
        with pytest.raises(ValueError, match="entity id"):  # a ValueError too
            runner.client(Account)(bad_id)
