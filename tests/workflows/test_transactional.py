"""Transactional steps (`ctx.step(..., transactional=True)`) on memory
storage, in virtual time: a step's persisted sends commit with its result,
exactly once; a failed attempt's are rolled back. Plain steps run outside
the transaction. (SQL effects: `test_postgres.py`.)"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    Status,
    StepFailedError,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

from ..helpers import config
from .helpers import open_clocked_runner

RECEIVED: list[str] = []
ATTEMPTS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _clear() -> None:
    RECEIVED.clear()
    ATTEMPTS.clear()


@attrs.frozen
class Note:
    text: str


class Inbox(tc.Entity):
    type_name = "TxInbox"

    @tc.rpc(persisted=True)
    async def note(self, msg: Note) -> str:
        RECEIVED.append(msg.text)
        return msg.text


@attrs.frozen
class Send:
    name: str
    failures: int
    """Attempts that fail (after sending) before one succeeds."""


async def send_then_maybe_fail(send: Send) -> int:
    attempt = ATTEMPTS[send.name] = ATTEMPTS.get(send.name, 0) + 1
    inbox: Any = tc.current_runner().client(Inbox)("inbox")
    await inbox.note.discard(Note(f"{send.name} attempt {attempt}"))
    if attempt <= send.failures:
        raise ConnectionError(f"attempt {attempt} failed")
    return attempt


async def undo_send(send: Send, attempt: int) -> None:
    inbox: Any = tc.current_runner().client(Inbox)("inbox")
    await inbox.note.discard(Note(f"undo {send.name}"))


RETRY = tc.RetryPolicy(max_attempts=3, backoff=tc.Backoff(5, 5))


@workflow(name="tx_sends", retry=RETRY)
async def tx_sends(ctx: WorkflowContext, sends: list[Send]) -> list[int]:
    return [
        await ctx.step(
            send_then_maybe_fail,
            send,
            name=send.name,
            transactional=True,
            compensate=undo_send,
        )
        for send in sends
    ]


async def test_a_transactional_step_commits_its_sends_with_its_result_once(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([tx_sends.entity, Inbox]) as runner:
        result = await tx_sends.client(runner).execute([Send("a", 2), Send("b", 0)])
        assert result == [3, 1]
        await trio.sleep(10)
    # The two failed attempts of a sent nothing; its third attempt's send
    # committed with its result.
    assert RECEIVED == ["a attempt 3", "b attempt 1"]


async def test_a_failed_transactional_step_sends_nothing_and_its_saga_compensates(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([tx_sends.entity, Inbox]) as runner:
        flows = tx_sends.client(runner)
        handle = await flows.start([Send("a", 0), Send("b", 5)], execution_id="t2")
        with pytest.raises(WorkflowFailedError, match="attempt 3 failed"):
            await handle.result()
        await trio.sleep(10)
        assert (await handle.poll()).status is Status.COMPENSATED
    # b's three attempts sent nothing; a's compensation (transactional like
    # its step) sent its note with its record.
    assert RECEIVED == ["a attempt 1", "undo a"]


async def test_a_crash_before_the_commit_leaves_nothing_of_the_step(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    gate = trio.Event()

    async def slow(send: Send) -> int:
        await send_then_maybe_fail(send)
        await gate.wait()
        return 1

    @workflow(name="tx_crash")
    async def tx_crash(ctx: WorkflowContext, send: Send) -> int:
        return await ctx.step(slow, send, transactional=True)

    async with open_clocked_runner(
        [tx_crash.entity, Inbox], config(), storage
    ) as runner:
        await tx_crash.client(runner).start(Send("c", 0), execution_id="t3")
        await trio.sleep(5)
        assert ATTEMPTS == {"c": 1}
        runner.abort()  # the attempt sent, but its transaction never commits
    gate.set()
    async with open_clocked_runner(
        [tx_crash.entity, Inbox], config(), storage
    ) as runner:
        assert await tx_crash.client(runner).get("t3").result() == 1
        await trio.sleep(10)
    assert ATTEMPTS == {"c": 2}
    assert RECEIVED == ["c attempt 2"]


@workflow(name="plain_sends", retry=RETRY)
async def plain_sends(ctx: WorkflowContext, send: Send) -> int:
    return await ctx.step(send_then_maybe_fail, send)


async def test_a_plain_step_sends_at_once_on_every_attempt(autojump_clock: Any) -> None:
    async with open_clocked_runner([plain_sends.entity, Inbox]) as runner:
        assert await plain_sends.client(runner).execute(Send("p", 2)) == 3
        await trio.sleep(10)
    # Outside the transaction: every attempt's send is stored (at least once).
    assert sorted(RECEIVED) == ["p attempt 1", "p attempt 2", "p attempt 3"]


async def ask_inbox(text: str) -> str:
    # A persisted call that waits for its reply: refused in a transaction,
    # fine in a plain step.
    inbox: Any = tc.current_runner().client(Inbox)("inbox")
    return await inbox.note(Note(text))  # type: ignore[no-any-return]


async def ask_in_transaction(text: str) -> str:
    return await ask_inbox(text)


@workflow(name="calling", retry=tc.RetryPolicy(max_attempts=1))
async def calling(ctx: WorkflowContext, text: str) -> str:
    answer = await ctx.step(ask_inbox, text)
    try:
        await ctx.step(ask_in_transaction, text, transactional=True)
    except StepFailedError as exc:
        return f"{answer}; {exc.error_type}"
    return "unreachable"


async def test_a_plain_step_may_call_and_wait_a_transactional_one_may_not(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([calling.entity, Inbox]) as runner:
        assert (
            await calling.client(runner).execute("hi") == "hi; CallInTransactionError"
        )
