"""Workflows' determinism, sagas and signals (`trio_cluster.workflows`), on
memory storage in virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    NonDeterminismError,
    SignalTimeoutError,
    Status,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

from ..helpers import config
from .helpers import open_clocked_runner

LOG: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


async def reserve(item: str) -> str:
    LOG.append(f"reserve {item}")
    return f"r-{item}"


async def release(item: str, reservation: str) -> None:
    LOG.append(f"release {item} {reservation}")


async def pay(amount: int) -> str:
    LOG.append(f"pay {amount}")
    if amount > 100:
        raise ValueError("card declined")
    return "paid"


NO_RETRY = tc.RetryPolicy(max_attempts=1)


@workflow(name="saga", retry=NO_RETRY)
async def saga(ctx: WorkflowContext, amount: int) -> str:
    await ctx.step(reserve, "a", compensate=release)
    await ctx.step(reserve, "b", compensate=release)
    await ctx.step(pay, amount)
    return "done"


async def test_a_failing_saga_compensates_in_reverse_order(autojump_clock: Any) -> None:
    async with open_clocked_runner([saga.entity]) as runner:
        flows = saga.client(runner)
        assert await flows.execute(5) == "done"
        assert LOG == ["reserve a", "reserve b", "pay 5"]
        LOG.clear()
        with pytest.raises(WorkflowFailedError, match="card declined") as raised:
            await flows.execute(500)
        assert raised.value.compensated
        assert LOG == [
            "reserve a",
            "reserve b",
            "pay 500",
            "release b r-b",
            "release a r-a",
        ]
        info = await flows.get(flows.execution_id(500)).poll()
        assert info.status is Status.COMPENSATED
        assert info.compensated == ((1,), (0,))
        assert info.error is not None
        assert info.error.type == "StepFailedError"


FLAKY_RELEASES: list[str] = []


async def flaky_release(item: str, reservation: str) -> None:
    FLAKY_RELEASES.append(item)
    if FLAKY_RELEASES.count(item) < 2:
        raise ConnectionError("later")
    LOG.append(f"release {item}")


@workflow(name="interruptible", retry=tc.RetryPolicy(backoff=tc.Backoff(1, 1)))
async def interruptible(ctx: WorkflowContext, item: str) -> str:
    await ctx.step(reserve, item, compensate=flaky_release)
    await ctx.step(reserve, item + "2", compensate=flaky_release)
    approved = await ctx.wait_signal("approved", bool)
    return f"approved={approved}"


async def test_interrupt_runs_compensations_each_recorded_once(
    autojump_clock: Any,
) -> None:
    FLAKY_RELEASES.clear()
    async with open_clocked_runner([interruptible.entity]) as runner:
        flows = interruptible.client(runner)
        handle = await flows.start("x", execution_id="i1")
        await trio.sleep(10)
        assert (await handle.poll()).status is Status.WAITING
        await handle.interrupt("customer cancelled")
        with pytest.raises(WorkflowFailedError, match="customer cancelled"):
            await handle.result()
        # Each compensation ran until it succeeded (at least once), newest
        # step first, and is recorded once.
        assert FLAKY_RELEASES == ["x2", "x2", "x", "x"]
        assert LOG == ["reserve x", "reserve x2", "release x2", "release x"]
        info = await handle.poll()
        assert (info.status, info.compensated) == (Status.COMPENSATED, ((1,), (0,)))
        # A signal or interrupt after the end changes nothing.
        await handle.signal("approved", True)
        await handle.interrupt()
        assert (await handle.poll()).status is Status.COMPENSATED


@workflow(name="approval")
async def approval(ctx: WorkflowContext, item: str) -> str:
    try:
        approved = await ctx.wait_signal("approved", bool, timeout=3600)
    except SignalTimeoutError:
        return "timed out"
    return f"approved={approved}"


async def test_signals_complete_waits_with_durable_timeouts(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([approval.entity, interruptible.entity]) as runner:
        flows = approval.client(runner)
        handle = await flows.start("a", execution_id="s1")
        await trio.sleep(60)
        assert (await handle.poll()).status is Status.WAITING
        start = trio.current_time()
        await handle.signal("approved", True)
        await handle.signal("approved", False)  # the first one counts
        assert await handle.result() == "approved=True"
        assert trio.current_time() == start
        # Sent before the wait: the wait finds it.
        early = flows.get("s2")
        await early.signal("approved", False)
        await flows.start("b", execution_id="s2")
        assert await early.result() == "approved=False"
        # No signal: the durable timeout.
        start = trio.current_time()
        assert await flows.execute("c", execution_id="s3") == "timed out"
        assert trio.current_time() - start == 3600
        # Without a timeout, it waits with nothing scheduled.
        other = await interruptible.client(runner).start("y", execution_id="s4")
        await trio.sleep(600)
        info = await other.poll()
        assert (info.status, info.waiting_until) == (Status.WAITING, None)
        await other.signal("approved", True)
        assert await other.result() == "approved=True"


@workflow(name="recorded")
async def recorded(ctx: WorkflowContext, n: int) -> list[float]:
    before = ctx.now().timestamp()
    draw = ctx.random().random()
    ident = ctx.new_id()
    await ctx.sleep(600)
    again = ctx.random().random()
    return [before, draw, float(int(ident)), again, ctx.now().timestamp()]


async def test_now_random_and_ids_are_recorded(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([recorded.entity], config(), storage) as runner:
        handle = await recorded.client(runner).start(1)
        await trio.sleep(60)
    await trio.sleep(1000)
    async with open_clocked_runner([recorded.entity], config(), storage) as runner:
        first = await recorded.client(runner).get(handle.execution_id).result()
        assert first[4] - first[0] >= 600
        # Replayed again (a second execution with the same code): each value
        # comes from its own journal, the same on every replay.
        assert await recorded.client(runner).get(handle.execution_id).result() == first


@workflow(name="evolving", retry=NO_RETRY)
async def evolving_v1(ctx: WorkflowContext, item: str) -> str:
    await ctx.step(reserve, item)
    await ctx.sleep(3600)
    return "v1"


async def pay_item(item: str) -> str:
    LOG.append(f"pay {item}")
    return "paid"


@workflow(name="evolving", retry=NO_RETRY)
async def evolving_v2(ctx: WorkflowContext, item: str) -> str:
    await ctx.step(pay_item, item)  # a changed first step
    await ctx.sleep(3600)
    return "v2"


async def test_a_changed_step_suspends_the_execution_until_resumed(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([evolving_v1.entity], config(), storage) as runner:
        await evolving_v1.client(runner).start("z", execution_id="e1")
        await trio.sleep(60)
    # Deployed: code whose first step differs from the journal's.
    async with open_clocked_runner([evolving_v2.entity], config(), storage) as runner:
        handle = evolving_v2.client(runner).get("e1")
        await trio.sleep(3600)
        info = await handle.poll()
        assert info.status is Status.SUSPENDED
        assert info.steps == 2  # the journal as it was
        assert info.problem is not None
        assert "operation 0" in info.problem
        assert "step 'reserve'" in info.problem
        assert "step 'pay_item'" in info.problem
        await handle.resume()  # same code: suspended again
        await trio.sleep(1)
        assert (await handle.poll()).status is Status.SUSPENDED
    # The fixed code replays it to the end; nothing ran twice.
    async with open_clocked_runner([evolving_v1.entity], config(), storage) as runner:
        handle = evolving_v1.client(runner).get("e1")
        await handle.resume()
        assert await handle.result() == "v1"
    assert LOG == ["reserve z"]


def test_non_determinism_error_names_both_operations() -> None:
    error = NonDeterminismError("e", (3, 1, 0), "step 'a'", "sleep 'sleep'")
    assert isinstance(error, tc.ClusterError)
    assert (error.position, error.expected, error.got) == (
        (3, 1, 0),
        "step 'a'",
        "sleep 'sleep'",
    )
    assert "operation 3.1.0" in str(error)
