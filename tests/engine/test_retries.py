"""Attempts, retries and dead letters of persisted requests
(`trio_cluster._engine._attempts`) end to end on memory storage."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster import DeadLetter
from trio_cluster.storage import MemoryStorage

from ..helpers import config, open_clocked_runner


@attrs.frozen
class Job:
    key: str
    fail: int = 0
    """Runs that raise before one succeeds."""


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    reason: str


class Flaky(tc.Entity):
    type_name = "RetryFlaky"
    concurrency = 1
    runs: ClassVar[dict[str, int]] = {}
    release: ClassVar[trio.Event | None] = None

    @classmethod
    def reset(cls) -> None:
        cls.runs = {}
        cls.release = None

    def _count(self, key: str) -> int:
        runs = Flaky.runs[key] = Flaky.runs.get(key, 0) + 1
        return runs

    @tc.rpc(
        persisted=True,
        primary_key=lambda m: m.key,
        retry=tc.RetryPolicy(max_attempts=4, backoff=tc.Backoff(1.0, 10.0)),
        errors=[Refused],
    )
    async def work(self, msg: Job) -> int:
        runs = self._count(msg.key)
        if msg.fail < 0:
            raise Refused(reason="declared")
        if runs <= msg.fail:
            raise RuntimeError(f"boom {runs}")
        return runs

    @tc.rpc(
        persisted=True,
        primary_key=lambda m: m.key,
        retry=tc.RetryPolicy(max_attempts=5, non_retryable=(KeyError,)),
    )
    async def picky(self, msg: Job) -> int:
        self._count(msg.key)
        raise KeyError(msg.key)

    @tc.rpc(persisted=True)
    async def hold(self, msg: Job) -> None:
        """Runs until `release` is set (a handler its runners keep stopping)."""
        self._count(msg.key)
        await trio.sleep_forever()

    @tc.rpc(persisted=True)
    async def note(self, msg: Job) -> int:
        return self._count(msg.key)


class Brittle(tc.Entity):
    """Its defect policy is its handlers' default and spaces its restarts."""

    type_name = "RetryBrittle"
    defect_retry = tc.RetryPolicy(max_attempts=2, backoff=tc.Backoff(2.0, 2.0))

    @tc.rpc(persisted=True)
    async def fail(self, msg: Job) -> None:
        raise ValueError(msg.key)

    @tc.rpc
    async def crash(self, msg: Job) -> None:
        raise ValueError(msg.key)

    @tc.rpc
    async def ping(self, msg: Job) -> str:
        return msg.key


async def dead_letters(storage: MemoryStorage) -> list[DeadLetter]:
    async with storage.open_session(name="reader", lease_duration=5.0) as session:
        return await session.messages.dead_letters(limit=100)


async def test_a_failing_handler_is_retried_after_its_backoff(autojump_clock):
    Flaky.reset()
    async with open_clocked_runner([Flaky]) as runner:
        ref = runner.client(Flaky)("f")
        start = trio.current_time()
        assert await ref.work(Job("twice", fail=2)) == 3
        # Backoffs of 1 s then 2 s (no jitter in this policy).
        assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
        stats = runner.statistics()
        assert stats.persisted_retries == 2
        assert stats.dead_letters == {
            "exhausted": 0,
            "non_retryable": 0,
            "runner_lost": 0,
        }
        # Its reply is stored: a duplicate does not run it again.
        assert await ref.work(Job("twice", fail=2)) == 3
        assert Flaky.runs["twice"] == 3


async def test_a_discarded_message_is_retried_too(autojump_clock):
    Flaky.reset()
    async with open_clocked_runner([Flaky]) as runner:
        await runner.client(Flaky)("f").work.discard(Job("sent", fail=1))
        await trio.sleep(5)
        assert Flaky.runs["sent"] == 2


async def test_exhausted_attempts_dead_letter_the_request(autojump_clock):
    Flaky.reset()
    storage = MemoryStorage()
    async with open_clocked_runner([Flaky], config(), storage) as runner:
        ref = runner.client(Flaky)("f")
        with pytest.raises(tc.DeadLetteredError) as raised:
            await ref.work(Job("never", fail=99))
        error = raised.value
        assert error.attempts == 4
        assert error.error.startswith("RuntimeError: boom 4 (in RetryFlaky/f@")
        assert Flaky.runs["never"] == 4
        assert runner.statistics().dead_letters["exhausted"] == 1
        # Answered for good: a duplicate gets the same error, without a run.
        with pytest.raises(tc.DeadLetteredError):
            await ref.work(Job("never", fail=99))
        assert Flaky.runs["never"] == 4
    [letter] = await dead_letters(storage)
    assert (letter.request_id, letter.attempts) == (error.request_id, 4)
    assert (letter.entity_type, letter.entity_id, letter.tag) == (
        "RetryFlaky",
        "f",
        "work",
    )
    assert (letter.primary_key, letter.error) == ("never", error.error)


async def test_a_non_retryable_error_dead_letters_at_once(autojump_clock, caplog):
    Flaky.reset()
    async with open_clocked_runner([Flaky]) as runner:
        with pytest.raises(tc.DeadLetteredError, match="KeyError") as raised:
            await runner.client(Flaky)("f").picky(Job("k"))
        assert raised.value.attempts == 1
        assert Flaky.runs["k"] == 1
        assert runner.statistics().dead_letters["non_retryable"] == 1
        # The handler's final answer, not a crash: the entity was not
        # restarted (no crash logged, no restart backoff before the next call).
        before = trio.current_time()
        assert await runner.client(Flaky)("f").note(Job("n")) == 1
        assert trio.current_time() == before
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert [r.levelname for r in caplog.records if "dead-lettered" in r.getMessage()]


async def test_declared_errors_are_replies_not_failures(autojump_clock):
    Flaky.reset()
    async with open_clocked_runner([Flaky]) as runner:
        with pytest.raises(Refused):
            await runner.client(Flaky)("f").work(Job("declared", fail=-1))
        assert Flaky.runs["declared"] == 1
        assert runner.statistics().persisted_retries == 0


async def test_runners_that_keep_stopping_dead_letter_the_request_not_its_queue(
    autojump_clock,
):
    """``hold`` never finishes: each runner starts it and is shut down under
    it (its termination timeout cancels it: that attempt counts). ``note``
    waits behind it in the same mailbox: each graceful stop gives its claim
    back unrun, so it is never counted, and runs once ``hold`` is
    dead-lettered, without running, on the claim beyond its attempts."""
    Flaky.reset()
    storage = MemoryStorage()
    cfg = config(entity_termination_timeout=0.5)
    async with open_clocked_runner([Flaky], cfg, storage) as runner:
        ref = runner.client(Flaky)("f")
        await ref.hold.discard(Job("hold"))
        await ref.note.discard(Job("note"))
        await trio.sleep(1)
    for _ in range(2):
        async with open_clocked_runner([Flaky], cfg, storage):
            await trio.sleep(1)
    assert Flaky.runs == {"hold": 3}
    async with open_clocked_runner([Flaky], cfg, storage) as runner:
        await trio.sleep(1)
        assert Flaky.runs == {"hold": 3, "note": 1}
        assert runner.statistics().dead_letters["runner_lost"] == 1
    [letter] = await dead_letters(storage)
    assert letter.tag == "hold"
    assert letter.error == "its runner stopped during attempt 3"


async def test_defect_retry_is_the_types_policy_and_spaces_its_restarts(
    autojump_clock,
):
    async with open_clocked_runner([Brittle]) as runner:
        ref = runner.client(Brittle)("b")
        with pytest.raises(tc.DeadLetteredError) as raised:
            await ref.fail(Job("x"))
        assert raised.value.attempts == 2
        with pytest.raises(tc.RemoteError):  # volatile: not retried
            await ref.crash(Job("y"))
        start = trio.current_time()
        assert await ref.ping(Job("z")) == "z"  # waits for the restart
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)


def test_retry_options_are_checked():
    with pytest.raises(tc.EntityDefinitionError, match="persisted=True"):
        tc.rpc(retry=tc.RetryPolicy())
    with pytest.raises(tc.EntityDefinitionError, match="RetryPolicy"):
        tc.rpc(persisted=True, retry=3)  # type: ignore[call-overload]


async def test_dead_letters_can_be_listed_replayed_and_purged(autojump_clock):
    Flaky.reset()
    async with open_clocked_runner([Flaky]) as runner:
        ref = runner.client(Flaky)("f")
        for key in ("a", "b", "c"):
            with pytest.raises(tc.DeadLetteredError):
                await ref.picky(Job(key))
        queue = runner.dead_letters
        letters = await queue.list()
        assert [x.primary_key for x in letters] == ["a", "b", "c"]
        assert [x.primary_key async for x in queue.all()] == ["a", "b", "c"]
        first = letters[0]
        assert await queue.get(first.request_id) == first
        assert await queue.get(letters[-1].request_id + 1) is None
        # Replayed: a new request, run again (and dead-lettered again here,
        # since the handler still fails), at most once per dead letter.
        new_id = await queue.replay(first.request_id)
        assert new_id is not None
        assert new_id != first.request_id
        assert await queue.replay(first.request_id) is None
        await trio.sleep(1)
        assert Flaky.runs["a"] == 2
        replayed = await queue.get(first.request_id)
        assert replayed is not None
        assert replayed.replayed_as == new_id
        again = await queue.get(new_id)
        assert again is not None
        assert again.primary_key is None
        assert await queue.purge([first.request_id]) == 1
        assert await queue.purge_all(limit=1) == 1
        assert len(await queue.list()) == 2
        assert await queue.purge_all() == 2
        assert await queue.list() == []
        with pytest.raises(TypeError):
            await queue.get("1")  # type: ignore[arg-type]
