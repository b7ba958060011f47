"""Changing running workflows: `WorkflowContext.patched`, and replaying a
recorded journal against new code (`trio_cluster.testing.replay_workflow`,
`WorkflowHandle.history`), on memory storage in virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import replay_workflow
from trio_cluster.workflows import (
    NonDeterminismError,
    Status,
    WorkflowContext,
    WorkflowFailedError,
    WorkflowHistory,
    workflow,
)

from ..helpers import config
from .helpers import open_clocked_runner

LOG: list[str] = []
NO_RETRY = tc.RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


async def act(what: str) -> str:
    LOG.append(what)
    return what


@workflow(name="billing", retry=NO_RETRY)
async def billing_v1(ctx: WorkflowContext, order: str) -> str:
    await ctx.wait_signal("go", bool)
    await ctx.step(act, f"invoice {order}")
    await ctx.sleep(3600)
    await ctx.step(act, f"close {order}")
    return "v1"


@workflow(name="billing", retry=NO_RETRY)
async def billing_v2(ctx: WorkflowContext, order: str) -> str:
    await ctx.wait_signal("go", bool)
    await ctx.step(act, f"invoice {order}")
    if ctx.patched("tax"):
        await ctx.step(act, f"tax {order}")
        await ctx.sleep(3600)
        await ctx.step(act, f"close {order}")
        return "v2"
    await ctx.sleep(3600)
    await ctx.step(act, f"close {order}")
    return "v1"


async def test_patched_keeps_old_executions_on_the_old_branch(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([billing_v1.entity], config(), storage) as runner:
        flows = billing_v1.client(runner)
        past = await flows.start("a", execution_id="past")  # past the change
        await past.signal("go", True)
        await flows.start("b", execution_id="before")  # not there yet
        await trio.sleep(60)
        assert LOG == ["invoice a"]
        old_history = await past.history()
    # Deployed: v2. "past" ran v1 beyond the change: it stays on v1's
    # branch; "before" and new executions take v2's.
    async with open_clocked_runner([billing_v2.entity], config(), storage) as runner:
        flows = billing_v2.client(runner)
        await flows.get("before").signal("go", True)
        fresh = await flows.start("c", execution_id="fresh")
        await fresh.signal("go", True)
        assert await flows.get("past").result() == "v1"
        assert await flows.get("before").result() == "v2"
        assert await fresh.result() == "v2"
        past_history = await flows.get("past").history()
        fresh_history = await fresh.history()
    assert sorted(LOG) == sorted(
        [
            "invoice a",
            "close a",
            "invoice b",
            "tax b",
            "close b",
            "invoice c",
            "tax c",
            "close c",
        ]
    )
    # Each decision is recorded once per execution, and the call takes no
    # position: the old execution's journal has the old positions.
    assert past_history.journal.patches == (("tax", False),)
    assert fresh_history.journal.patches == (("tax", True),)
    assert [e.position for e in past_history.journal.entries] == [
        (0,),
        (1,),
        (2,),
        (3,),
    ]
    # The journals replay under the code that made them, and under v2...
    await replay_workflow(billing_v1, old_history)
    await replay_workflow(billing_v2, old_history)
    await replay_workflow(billing_v2, past_history)
    await replay_workflow(billing_v2, fresh_history)
    # ...but a v2 execution does not replay under v1 (a rollback would
    # suspend it).
    with pytest.raises(NonDeterminismError) as raised:
        await replay_workflow(billing_v1, fresh_history)
    assert raised.value.position == (2,)
    assert str(raised.value) == (
        "workflow 'fresh', operation 2: the journal recorded step 'act',"
        " the code asked for sleep 'sleep'"
    )


@workflow(name="shop", retry=NO_RETRY)
async def shop(ctx: WorkflowContext, order: str) -> str:
    found: dict[str, str] = {}

    async def look(where: str) -> None:
        found[where] = await ctx.step(act, f"look {where}")

    async with ctx.open_nursery() as nursery:
        for where in ("north", "south"):
            nursery.start_soon(look, where)
    await ctx.sleep(60)
    paid = await ctx.step(act, f"pay {order}")
    return f"{found['north']}/{found['south']}/{paid}"


@workflow(name="shop", retry=NO_RETRY)
async def shop_reordered(ctx: WorkflowContext, order: str) -> str:
    paid = await ctx.step(act, f"pay {order}")  # moved before the search
    found: dict[str, str] = {}

    async def look(where: str) -> None:
        found[where] = await ctx.step(act, f"look {where}")

    async with ctx.open_nursery() as nursery:
        for where in ("north", "south"):
            nursery.start_soon(look, where)
    await ctx.sleep(60)
    return f"{found['north']}/{found['south']}/{paid}"


@workflow(name="shop", retry=NO_RETRY)
async def shop_renamed(ctx: WorkflowContext, order: str) -> str:
    found: dict[str, str] = {}

    async def look(where: str) -> None:
        found[where] = await ctx.step(act, f"look {where}", name="search")

    async with ctx.open_nursery() as nursery:
        for where in ("north", "south"):
            nursery.start_soon(look, where)
    await ctx.sleep(60)
    paid = await ctx.step(act, f"pay {order}")
    return f"{found['north']}/{found['south']}/{paid}"


@workflow(name="shop", retry=NO_RETRY)
async def shop_longer(ctx: WorkflowContext, order: str) -> str:
    result = await shop.fn(ctx, order)
    await ctx.step(act, "thank you")
    return result


@workflow(name="shop", retry=NO_RETRY)
async def shop_shorter(ctx: WorkflowContext, order: str) -> str:
    await ctx.sleep(60)  # the search is gone
    return "nothing"


async def test_replay_workflow_flags_a_changed_order_or_kind(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([shop.entity]) as runner:
        handle = await shop.client(runner).start("o1", execution_id="s1")
        await trio.sleep(30)  # in its sleep
        waiting = await handle.history()
        assert await handle.result() == "look north/look south/pay o1"
        done = await handle.history()
    assert waiting.journal.status is Status.WAITING
    assert done.journal.status is Status.COMPLETED
    # The same code replays both, as objects and as bytes.
    for history in (waiting, done, WorkflowHistory.from_bytes(done.to_bytes())):
        await replay_workflow(shop, history)
    await replay_workflow(shop, done.to_bytes())
    # A longer workflow may replay an execution still waiting, not one done.
    await replay_workflow(shop_longer, waiting)
    cases = [
        (
            shop_renamed,
            done,
            "operation 0.0.0: the journal recorded step 'act', the code asked for step 'search'",
        ),
        (
            shop_longer,
            done,
            "operation 3: the journal recorded the workflow returning, the code asked for step 'act'",
        ),
        (
            shop_shorter,
            done,
            "operation 0: the journal recorded nursery 'nursery', the code asked for sleep 'sleep'",
        ),
    ]
    for code, history, message in cases:
        with pytest.raises(NonDeterminismError, match="operation") as raised:
            await replay_workflow(code, history)
        assert message in str(raised.value), (code, raised.value)
    # Reordered: the first operation is a step where a nursery was recorded.
    with pytest.raises(NonDeterminismError) as raised:
        await replay_workflow(shop_reordered, done)
    assert raised.value.position == (0,)
    assert raised.value.expected == "nursery 'nursery'"
    assert raised.value.got == "step 'act'"


async def test_replay_workflow_refuses_another_workflows_history(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([shop.entity]) as runner:
        handle = await shop.client(runner).start("o2")
        await handle.result()
        history = await handle.history()
    with pytest.raises(ValueError, match="of workflow 'shop', not 'billing'"):
        await replay_workflow(billing_v1, history)
    with pytest.raises(tc.MalformedMessageError, match="workflow history"):
        await replay_workflow(shop, b"\x93not a history")
    with pytest.raises(tc.MalformedMessageError):
        WorkflowHistory.from_bytes(b"")


async def test_patched_refuses_a_bad_change_id(autojump_clock: Any) -> None:
    @workflow(name="bad_patch", retry=NO_RETRY)
    async def bad_patch(ctx: WorkflowContext, n: int) -> bool:
        return ctx.patched("")

    async with open_clocked_runner([bad_patch.entity]) as runner:
        handle = await bad_patch.client(runner).start(1)
        with pytest.raises(WorkflowFailedError, match="change id"):
            await handle.result()
