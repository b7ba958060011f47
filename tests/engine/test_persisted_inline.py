"""Persisted calls run in their caller's task (`_engine._inline_persisted`):
when it is taken, and that it keeps every guarantee of a delivery in a task
of its own (interrupts, fencing by the lease, one recorded reply, a busy
entity, transactions)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import (
    PersistedRequest,
    ReplyOutcome,
    ReplyRecord,
    SaveResult,
    StorageSession,
    StorageTransaction,
)
from trio_cluster.storage import MemoryStorage

from ..helpers import Get, PatchingStorage, config, open_clocked_runner
from .test_persisted import LockLosingStorage
from .test_persisted_transactional import JournalStorage


@attrs.frozen
class Step:
    key: str
    seconds: float = 0.0


class Probe(tc.Entity):
    """Records, per run of a handler, the task it ran in and how it ended."""

    type_name = "Probe"

    tasks: list[tuple[str, trio.lowlevel.Task]] = []  # noqa: RUF012
    ends: list[tuple[str, str]] = []  # noqa: RUF012

    def __init__(self) -> None:
        self.applied: list[str] = []

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def step(self, msg: Step) -> list[str]:
        Probe.tasks.append((msg.key, trio.lowlevel.current_task()))
        try:
            if msg.seconds:
                await trio.sleep(msg.seconds)
        except trio.Cancelled:
            Probe.ends.append((msg.key, "cancelled"))
            raise
        self.applied.append(msg.key)
        Probe.ends.append((msg.key, "returned"))
        return list(self.applied)

    @tc.rpc
    async def applied_ids(self, msg: Get) -> list[str]:
        return list(self.applied)


@pytest.fixture(autouse=True)
def _fresh_probe() -> None:
    Probe.tasks.clear()
    Probe.ends.clear()


def counting_replies(storage: MemoryStorage) -> list[int]:
    """The request ids of every reply record ``storage`` is asked to save."""
    saved: list[int] = []
    original = storage._messages.save_replies

    def save_replies(replies: Sequence[ReplyRecord], now: float) -> list[ReplyOutcome]:
        saved.extend(reply.request_id for reply in replies)
        return original(replies, now)

    storage._messages.save_replies = save_replies  # type: ignore[method-assign]
    return saved


async def test_idle_entity_runs_the_request_in_the_callers_task(autojump_clock):
    storage = MemoryStorage()
    saved = counting_replies(storage)
    async with open_clocked_runner([Probe], config(), storage) as runner:
        ref = runner.client(Probe)("p")
        me = trio.lowlevel.current_task()
        assert await ref.step(Step("a")) == ["a"]
        assert await ref.step(Step("b", 1.0)) == ["a", "b"]  # one that suspends
        assert [task for _, task in Probe.tasks] == [me, me]
        # One reply record per request, and its reply stands for a duplicate.
        assert len(saved) == 2
        assert len(set(saved)) == 2
        assert await ref.step(Step("a")) == ["a"]
        assert len(saved) == 2
        assert runner.statistics().persisted_delivered == 2
        # A lone caller writes its request and its reply itself (`Batcher`).
        stats = runner._parts.persisted.statistics
        assert stats["saves_written_by_callers"] == 3
        assert stats["replies_written_by_callers"] == 2


async def test_callers_starting_together_are_written_as_one_batch(autojump_clock):
    # The first of a burst is alone for an instant: it must not write alone
    # (the others would wait behind it, and stay a group apart).
    async with open_clocked_runner([Probe]) as runner:
        stats = runner._parts.persisted.statistics
        before = stats["save_batches"], stats["reply_batches"]
        async with trio.open_nursery() as nursery:
            for index in range(20):
                ref = runner.client(Probe)(f"burst-{index}")
                nursery.start_soon(ref.step, Step("k"))
        stats = runner._parts.persisted.statistics
        assert (stats["save_batches"], stats["reply_batches"]) == (
            before[0] + 1,
            before[1] + 1,
        )
        assert stats["saves_written_by_callers"] == 0
        assert stats["replies_written_by_callers"] == 0


async def test_discard_and_deliver_at_keep_a_task_of_their_own(autojump_clock):
    class Later(tc.Entity):
        type_name = "LaterProbe"

        tasks: list[trio.lowlevel.Task] = []  # noqa: RUF012

        @tc.rpc(persisted=True, deliver_at=lambda m: m.seconds or None)
        async def step(self, msg: Step) -> None:
            Later.tasks.append(trio.lowlevel.current_task())

    async with open_clocked_runner([Later]) as runner:
        ref = runner.client(Later)("l")
        me = trio.lowlevel.current_task()
        await ref.step.discard(Step("x"))
        await ref.step(Step("y", runner.clock.now() + 1))
        await trio.sleep(1)
        assert len(Later.tasks) == 2
        assert me not in Later.tasks


async def test_busy_entity_queues_the_request(autojump_clock):
    async with open_clocked_runner([Probe]) as runner:
        ref = runner.client(Probe)("busy")
        callers: dict[str, trio.lowlevel.Task] = {}

        async def call(step: Step) -> None:
            callers[step.key] = trio.lowlevel.current_task()
            await ref.step(step)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, Step("first", 5.0))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, Step("second"))
        ran = dict(Probe.tasks)
        assert ran["first"] is callers["first"]  # idle: run by its caller
        assert ran["second"] is not callers["second"]  # busy: queued
        assert await ref.applied_ids(Get()) == ["first", "second"]


async def test_caller_cancelled_mid_handler_interrupts_it_and_records_it(
    autojump_clock,
):
    storage = MemoryStorage()
    saved = counting_replies(storage)
    async with open_clocked_runner([Probe], config(), storage) as runner:
        ref = runner.client(Probe)("c")
        me = trio.lowlevel.current_task()
        with trio.move_on_after(1) as scope:
            await ref.step(Step("slow", 10.0))
        assert scope.cancelled_caught
        assert Probe.tasks == [("slow", me)]
        assert Probe.ends == [("slow", "cancelled")]
        await trio.sleep(20)
        # The interruption is its one recorded reply: a duplicate gets it,
        # and the handler never runs again.
        with pytest.raises(tc.RequestInterruptedError), trio.fail_after(60):
            await ref.step(Step("slow", 10.0))
        assert len(saved) == 1
        assert await ref.applied_ids(Get()) == []
        assert Probe.ends == [("slow", "cancelled")]


async def test_caller_cancelled_while_its_reply_is_written_keeps_the_reply(
    autojump_clock,
):
    storage = MemoryStorage()
    saved = counting_replies(storage)
    failures = [1]

    async def slow_then_failing_reply(session: str, operation: str) -> None:
        if operation == "save_replies" and failures:
            failures.pop()
            await trio.sleep(2)
            raise OSError("connection lost")

    async with open_clocked_runner([Probe], config(), storage) as runner:
        ref = runner.client(Probe)("w")
        storage.fault_hook = slow_then_failing_reply
        attached: list[list[str]] = []
        done = trio.Event()

        async def duplicate() -> None:
            await trio.sleep(0.5)
            attached.append(await ref.step(Step("k")))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(duplicate)
            with trio.move_on_after(1) as scope:
                await ref.step(Step("k"))
            assert scope.cancelled_caught
            with trio.fail_after(60):
                await done.wait()
        # It ran to its end before the cancellation; the write failed once
        # and was retried: the handler's own reply is the one recorded, and
        # the caller attached to it got it.
        assert Probe.ends == [("k", "returned")]
        assert attached == [["k"]]
        assert saved == [saved[0]]
        assert await ref.step(Step("k")) == ["k"]


class SlowAfterSaving(PatchingStorage):
    """Memory storage whose first save of requests takes two seconds after
    it stored them (a commit whose acknowledgement is slow)."""

    slow = True

    def patch_session(self, session: StorageSession) -> None:
        original = session.messages.save_requests

        async def save_requests(
            requests: Sequence[PersistedRequest],
            *,
            now: float,
            transaction: StorageTransaction | None = None,
        ) -> list[SaveResult]:
            results = await original(requests, now=now, transaction=transaction)
            if self.slow:
                self.slow = False
                await trio.sleep(2)
            return results

        session.messages.save_requests = save_requests  # type: ignore[method-assign]


@pytest.mark.parametrize("stored", [False, True], ids=["unstored", "stored"])
async def test_caller_cancelled_while_its_request_is_written_gets_it_interrupted(
    autojump_clock: trio.testing.MockClock, stored: bool
) -> None:
    # The caller writes its request in its own task (the batcher is idle);
    # cancelled during that write, it cannot know whether the request was
    # stored. The flusher writes it again: stored or not the first time, it
    # is then delivered and interrupted at once, as for a caller cancelled
    # while the flusher wrote it, and never left claimed with nobody to run
    # it (a duplicate of itself, when the first write took effect).
    storage: MemoryStorage = SlowAfterSaving() if stored else MemoryStorage()
    first = [True]

    async def slow_first_save(session: str, operation: str) -> None:
        if operation == "save_requests" and first:
            first.clear()
            await trio.sleep(2)

    async with open_clocked_runner([Probe], config(), storage) as runner:
        ref = runner.client(Probe)("s")
        if not stored:
            storage.fault_hook = slow_first_save
        with trio.move_on_after(1) as scope:
            await ref.step(Step("k"))
        assert scope.cancelled_caught
        with pytest.raises(tc.RequestInterruptedError), trio.fail_after(60):
            await ref.step(Step("k"))
        assert Probe.tasks == []  # interrupted before its handler ran


async def test_lease_lost_mid_handler_records_nothing_and_runs_again(autojump_clock):
    storage = LockLosingStorage(lose_at=2.0)
    saved = counting_replies(storage)
    cfg = config(lease_duration=3.0, lease_refresh_interval=1.0)
    async with open_clocked_runner([Probe], cfg, storage) as runner:
        ref = runner.client(Probe)("l")
        me = trio.lowlevel.current_task()
        assert await ref.step(Step("once", 10.0)) == ["once"]
        # First run in the caller's task, stopped with its shard at t=2 (no
        # reply); the shard's next incarnation ran it again, in a task.
        assert Probe.tasks[0] == ("once", me)
        assert Probe.ends == [("once", "cancelled"), ("once", "returned")]
        assert Probe.tasks[1][1] is not me
        assert len(saved) == 1
        assert runner.statistics().failovers >= 1


class TxProbe(tc.Entity):
    type_name = "TxProbe"

    tasks: list[trio.lowlevel.Task] = []  # noqa: RUF012

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def step(self, msg: Step) -> str:
        TxProbe.tasks.append(trio.lowlevel.current_task())
        await tc.current_transaction().execute("write %s", [msg.key])
        await trio.sleep(msg.seconds)
        return f"ok {msg.key}"


async def test_transactional_handler_in_the_callers_task(autojump_clock):
    TxProbe.tasks.clear()
    storage = JournalStorage()
    saved = counting_replies(storage)
    async with open_clocked_runner([TxProbe], config(), storage) as runner:
        ref = runner.client(TxProbe)("t")
        me = trio.lowlevel.current_task()
        assert await ref.step(Step("a")) == "ok a"
        assert TxProbe.tasks == [me]
        # Its reply was written in its transaction, with its writes.
        assert storage.journal == ["write a"]
        assert len(saved) == 1
        assert await ref.step(Step("a")) == "ok a"
        assert len(saved) == 1
        # Cancelled in its transaction: rolled back, and interrupted.
        with trio.move_on_after(1):
            await ref.step(Step("b", 10.0))
        assert storage.journal == ["write a"]
        assert storage.rollbacks == 1
        with pytest.raises(tc.RequestInterruptedError), trio.fail_after(60):
            await ref.step(Step("b", 10.0))
        assert storage.journal == ["write a"]
        assert TxProbe.tasks == [me, me]
        assert len(saved) == 2
