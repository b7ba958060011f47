"""Group commit (`trio_cluster._engine._batching.Batcher`): a batch that
storage refuses because of one item's data is written apart, so only that
item fails (issue 11, item 9); a failure of storage itself fails the batch,
as before."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster._engine import _persisted
from trio_cluster._engine._batching import Batcher
from trio_cluster._registry import Handler
from trio_cluster.abc import (
    ReplyOutcome,
    ReplyRecord,
    StorageSession,
    StorageTransaction,
)

from ..helpers import (
    Account,
    Deposit,
    PatchingStorage,
    TaskSteps,
    deposit_beside_a_bad_one,
    open_clocked_runner,
)

BAD = 13


class FakeStorage:
    """A batch write: each item's result is twice the item; an item equal
    to `BAD` makes the whole write fail with ``refusal``."""

    def __init__(self, refusal: Exception) -> None:
        self.refusal = refusal
        self.writes: list[list[int]] = []

    async def flush(self, items: Sequence[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        self.writes.append(list(items))
        if BAD in items:
            raise self.refusal
        return [2 * item for item in items]


async def submit_all(batcher: Batcher[int, int], items: list[int]) -> list[object]:
    """Submit ``items`` concurrently (one batch); every outcome, in order."""
    outcomes: list[object] = [None] * len(items)

    async def submit(index: int) -> None:
        try:
            outcomes[index] = await batcher.submit(items[index])
        except Exception as exc:
            outcomes[index] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        for index in range(len(items)):
            nursery.start_soon(submit, index)
        await trio.testing.wait_all_tasks_blocked()
        while any(outcome is None for outcome in outcomes):
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return outcomes


REFUSALS = [
    tc.StorageRefusedError("value too long (SQLSTATE 22001)"),
    # What every backend raises for an argument it refuses before storing
    # anything (the contract's checks), e.g. memory storage.
    TypeError("PersistedRequest.primary_key must be str or None, got 13"),
    ValueError("PersistedRequest.deliver_at must be finite, got nan"),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda e: type(e).__name__)
async def test_one_refused_item_fails_alone(autojump_clock, refusal):
    # Regression: every item of the batch failed (or, for TypeError and
    # ValueError, the batcher's task died, and with it the runner).
    storage = FakeStorage(refusal)
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    items = list(range(1, 40))
    outcomes = await submit_all(batcher, items)
    assert outcomes[items.index(BAD)] is refusal
    innocent = [o for i, o in zip(items, outcomes, strict=True) if i != BAD]
    assert innocent == [2 * i for i in items if i != BAD]
    # Halving: about two writes per level, not one write per item.
    assert len(storage.writes) <= 2 * 6 + 2
    assert batcher.items == len(items) - 1


async def test_abandoned_items_are_followed_up_and_a_failing_follow_up_harms_none(
    autojump_clock, caplog
):
    storage = FakeStorage(tc.PersistenceError("unused"))
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    followed: list[int] = []

    def boom(result: int) -> None:
        raise RuntimeError("follow-up failed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        first, second, third = (batcher.enqueue(i) for i in (1, 2, 3))
        first.abandoned = followed.append
        second.abandoned = boom
        await third.done.wait()
        later = await batcher.submit(4)
        nursery.cancel_scope.cancel()
    assert followed == [2]
    assert Batcher.result(third) == 6
    assert later == 8  # the batcher's task survived the failing follow-up
    assert "acting on an abandoned item failed" in caplog.text


async def test_a_failure_of_storage_fails_its_batch_without_retrying(
    autojump_clock,
):
    storage = FakeStorage(tc.PersistenceError("connection lost"))
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    items = list(range(1, 40))
    outcomes = dict(zip(items, await submit_all(batcher, items), strict=True))
    # Each item was written once; the batch holding BAD failed whole, as a
    # lost connection must (nobody can tell which item was at fault).
    assert sorted(i for write in storage.writes for i in write) == items
    [failed_batch] = [write for write in storage.writes if BAD in write]
    for item in items:
        if item in failed_batch:
            assert outcomes[item] is storage.refusal
        else:
            assert outcomes[item] == 2 * item


async def test_cancelled_while_writing_apart_every_caller_gets_an_error(
    autojump_clock,
):
    storage = FakeStorage(tc.StorageRefusedError("refused"))
    first_half = trio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        if len(storage.writes) == 1:  # the whole was refused: hang in a half
            first_half.set()
            await trio.sleep_forever()
        return await storage.flush(items)

    batcher: Batcher[int, int] = Batcher(flush, max_batch=64, name="test")
    outcomes: dict[int, object] = {}

    async def submit(item: int) -> None:
        try:
            outcomes[item] = await batcher.submit(item)
        except tc.ClusterError as exc:
            outcomes[item] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as callers:
            for item in range(BAD - 3, BAD + 4):
                callers.start_soon(submit, item)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as flusher:
                flusher.start_soon(batcher.run)
                await first_half.wait()
                flusher.cancel_scope.cancel()
    # Nobody is left waiting: the half being written and the half not yet
    # written both failed.
    assert len(outcomes) == 7
    assert all(isinstance(o, tc.PersistenceError) for o in outcomes.values())


# ----------------------------------------------------------------------
# End to end: persisted calls and replies on memory storage


async def test_a_request_storage_refuses_fails_only_its_own_call(
    autojump_clock, monkeypatch
):
    # The API edge lets through (by this test's patch) a primary key that is
    # not a str; memory storage's checks refuse it, for the whole batch.
    # Regression (issue 11, item 9): that TypeError killed the batcher's
    # task and so the runner, failing every concurrent call.
    def unchecked_key(handler: Handler, message: Deposit) -> object:
        return message.tx_id

    monkeypatch.setattr(_persisted, "_primary_key", unchecked_key)
    async with open_clocked_runner([Account]) as runner:
        outcomes = await deposit_beside_a_bad_one(runner, 13)  # type: ignore[arg-type]
        innocent = [o for o in outcomes[:-1] if not isinstance(o, int)]
        assert innocent == [], f"{len(innocent)} innocent calls failed: {innocent[:1]}"
        assert isinstance(outcomes[-1], tc.MalformedMessageError)
        assert "storage refused" in str(outcomes[-1])
        assert isinstance(outcomes[-1].__cause__, TypeError)
        assert await runner.client(Account)("z").deposit(Deposit("later", 1)) == 1


@attrs.frozen
class Text:
    text: str


class Parrot(tc.Entity):
    type_name = "BatchParrot"

    @tc.rpc(persisted=True)
    async def say(self, msg: Text) -> str:
        return msg.text

    @tc.rpc(persisted=True, transactional=True)
    async def say_in_transaction(self, msg: Text) -> str:
        return msg.text


class RefusingReplies(PatchingStorage):
    """Memory storage that refuses, for its data, every reply batch holding
    a reply with ``poison`` in it (as PostgreSQL refuses a value)."""

    def patch_session(self, session: StorageSession) -> None:
        save_replies = session.messages.save_replies

        async def refusing(
            replies: Sequence[ReplyRecord],
            *,
            now: float,
            transaction: StorageTransaction | None = None,
        ) -> list[ReplyOutcome]:
            if any(b"poison" in reply.payload for reply in replies):
                await trio.lowlevel.checkpoint()
                raise tc.StorageRefusedError("value refused (SQLSTATE 22000)")
            return await save_replies(replies, now=now, transaction=transaction)

        session.messages.save_replies = refusing  # type: ignore[method-assign]


async def say_all(
    say: Callable[[Text], Awaitable[str]], texts: list[str]
) -> list[object]:
    outcomes: list[object] = [None] * len(texts)

    async def one(index: int) -> None:
        try:
            outcomes[index] = await say(Text(texts[index]))
        except tc.ClusterError as exc:
            outcomes[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(texts)):
            nursery.start_soon(one, index)
    return outcomes


@pytest.mark.parametrize("handler", ["say", "say_in_transaction"])
async def test_a_reply_storage_refuses_becomes_an_error_reply(autojump_clock, handler):
    # Regression (issue 11, item 9): the refusal was retried as a storage
    # failure, forever (in a transaction too: the request ran again and
    # again), and the caller never got an answer; the other replies of its
    # batch failed with it.
    texts = [f"t{i}" for i in range(20)] + ["poison"]
    async with open_clocked_runner([Parrot], storage=RefusingReplies()) as runner:
        with trio.fail_after(60):
            outcomes = await say_all(
                getattr(runner.client(Parrot)("p"), handler), texts
            )
        assert outcomes[:-1] == texts[:-1]
        assert isinstance(outcomes[-1], tc.MalformedMessageError)
        assert "storage refused" in str(outcomes[-1])
        assert await runner.client(Parrot)("p").say(Text("after")) == "after"


class TaskRecordingStorage(FakeStorage):
    """`FakeStorage` that also records which task wrote each batch, and how
    many writes were in flight at once; its writes take one second."""

    def __init__(self) -> None:
        super().__init__(tc.PersistenceError("unused"))
        self.tasks: list[trio.lowlevel.Task] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def flush(self, items: Sequence[int]) -> list[int]:
        self.tasks.append(trio.lowlevel.current_task())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(1)
            return await super().flush(items)
        finally:
            self.in_flight -= 1


async def test_a_lone_item_submitted_here_is_written_by_its_submitter(
    autojump_clock,
):
    storage = TaskRecordingStorage()
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        assert await batcher.submit(1, here=True) == 2
        assert storage.tasks == [trio.lowlevel.current_task()]
        # Without ``here``, the flusher writes it.
        assert await batcher.submit(2) == 4
        assert storage.tasks[1] is not trio.lowlevel.current_task()
        nursery.cancel_scope.cancel()
    assert (batcher.written_here, batcher.batches, batcher.items) == (1, 2, 2)


async def test_items_submitted_during_a_write_here_wait_and_go_as_one_batch(
    autojump_clock,
):
    storage = TaskRecordingStorage()
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    results: dict[int, int] = {}

    async def submit(item: int) -> None:
        results[item] = await batcher.submit(item, here=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        nursery.start_soon(submit, 1)
        await trio.testing.wait_all_tasks_blocked()
        for item in (2, 3, 4):  # the first is being written: these queue
            nursery.start_soon(submit, item)
        await trio.sleep(5)  # both writes take a second each
        assert results == {1: 2, 2: 4, 3: 6, 4: 8}
        assert [sorted(write) for write in storage.writes] == [[1], [2, 3, 4]]
        assert storage.most_in_flight == 1  # never two writes at once
        nursery.cancel_scope.cancel()
    assert batcher.written_here == 1


async def test_a_write_here_without_others_first_starts_before_any_other_task_runs(
    autojump_clock,
):
    # The reply of the only call waiting is written at once: no scheduling
    # pass for a burst (`others_first` is for requests).
    events: list[str] = []

    async def flush(items: Sequence[int]) -> list[int]:
        events.append("write")
        await trio.sleep(1)
        return [2 * item for item in items]

    async def other_task() -> None:
        events.append("other task")

    batcher: Batcher[int, int] = Batcher(flush, max_batch=64, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        await trio.testing.wait_all_tasks_blocked()
        pending = batcher.enqueue(1, here=True)
        nursery.start_soon(other_task)  # runnable from now
        await batcher.wait_written(pending, others_first=False)
        assert batcher.result(pending) == 2
        nursery.cancel_scope.cancel()
    assert events == ["write", "other task"]
    assert batcher.written_here == 1


async def test_the_task_that_wrote_the_last_item_itself_writes_its_next_at_once(
    autojump_clock,
):
    # A lone caller calling again is not the first of a burst: no pass.
    # Once the flusher wrote a batch (others came), the pass is back.
    counter = TaskSteps(trio.lowlevel.current_task())
    passes: dict[int, int] = {}  # item -> its writer's yields before the write
    before = 0

    async def flush(items: Sequence[int]) -> list[int]:
        if trio.lowlevel.current_task() is counter.task:
            passes[items[0]] = counter.steps - before
        await trio.sleep(1)
        return [2 * item for item in items]

    async def write_here(item: int) -> None:
        nonlocal before
        before = counter.steps
        pending = batcher.enqueue(item, here=True)
        await batcher.wait_written(pending)
        assert batcher.result(pending) == 2 * item

    batcher: Batcher[int, int] = Batcher(flush, max_batch=64, name="test")
    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            await trio.testing.wait_all_tasks_blocked()
            await write_here(1)  # the first: after a pass
            await write_here(2)  # this task wrote the last item: at once
            await write_here(3)
            assert await batcher.submit(4) == 8  # the flusher's
            await write_here(5)  # after a pass again
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert passes == {1: 1, 2: 0, 3: 0, 5: 1}
    assert batcher.written_here == 4


async def test_a_submitter_cancelled_during_its_write_here_leaves_it_to_the_flusher(
    autojump_clock,
):
    # Whether the cancelled write took effect is unknown: the flusher writes
    # the item again and its follow-up gets that result.
    storage = TaskRecordingStorage()
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    followed: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        with trio.move_on_after(0.5) as scope:
            await batcher.submit(5, abandoned=followed.append, here=True)
        assert scope.cancelled_caught
        await trio.sleep(5)  # the flusher's write takes a second
        nursery.cancel_scope.cancel()
    assert followed == [10]
    assert storage.tasks[0] is trio.lowlevel.current_task()
    assert storage.tasks[1] is not trio.lowlevel.current_task()
    assert batcher.written_here == 0


async def test_a_refused_item_written_here_fails_alone_and_the_batcher_goes_on(
    autojump_clock,
):
    storage = FakeStorage(tc.StorageRefusedError("value too long"))
    batcher: Batcher[int, int] = Batcher(storage.flush, max_batch=64, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        with pytest.raises(tc.StorageRefusedError):
            await batcher.submit(BAD, here=True)
        assert await batcher.submit(2, here=True) == 4
        nursery.cancel_scope.cancel()
    assert storage.writes == [[BAD], [2]]


@pytest.mark.parametrize("here", [True, False])
async def test_a_storage_session_closed_under_a_write_fails_it_with_persistence_error(
    autojump_clock, here
):
    # Found by the simulator: a runner shutting down closed its storage
    # session under a caller's write, and the caller got the storage's own
    # `trio.ClosedResourceError` instead of a `ClusterError`.
    async def closed(items: Sequence[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("storage session 'r' is closed")

    batcher: Batcher[int, int] = Batcher(closed, max_batch=64, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        with pytest.raises(tc.PersistenceError, match="storage session is closed"):
            await batcher.submit(1, here=here)
        # The batcher goes on (the next write may find storage again).
        with pytest.raises(tc.PersistenceError, match="storage session is closed"):
            await batcher.submit(2, here=here)
        nursery.cancel_scope.cancel()
