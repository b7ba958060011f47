"""Checkpoints (`workflow(steps_per_checkpoint=..., advance_seconds=...)`):
an advance goes on past a step, its journal committed as it goes; what a
crash runs again, on memory storage, in virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster import ConfigError, DurableStateError
from trio_cluster._durable import checkpoint_state
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import WorkflowContext, workflow

from ..helpers import config
from .helpers import open_clocked_runner

CALLS: list[str] = []
GATE: list[trio.Event] = []


async def step(n: int) -> int:
    CALLS.append(f"step {n}")
    return n


async def gated(n: int) -> int:
    CALLS.append(f"gated {n}")
    await GATE[0].wait()
    return n


async def five(ctx: WorkflowContext, key: str) -> int:
    total = 0
    for n in range(4):
        total += await ctx.step(step, n)
    return total + await ctx.step(gated, 4)


strict = workflow(name="cp_strict")(five)
batched = workflow(name="cp_batched", steps_per_checkpoint=3)(five)
ADVANCES: list[int] = []


async def crash(runner: tc.Runner, wf: Any, key: str) -> None:
    """Start ``key``, let it reach the gated step, then abort the runner."""
    await wf.client(runner).start(key, execution_id=key)
    await trio.sleep(5)
    assert CALLS[-1] == "gated 4"
    runner.abort()


async def finish(storage: MemoryStorage, wf: Any, key: str) -> int:
    GATE[:] = [trio.Event()]
    GATE[0].set()
    async with open_clocked_runner([wf.entity], config(), storage) as runner:
        handle = wf.client(runner).get(key)
        result: int = await handle.result()
        assert (await handle.poll()).steps == 5
        return result


async def test_each_step_commits_before_the_next_in_one_advance(
    autojump_clock: Any,
) -> None:
    CALLS.clear()
    GATE[:] = [trio.Event()]
    storage = MemoryStorage()
    async with open_clocked_runner([strict.entity], config(), storage) as runner:
        await crash(runner, strict, "s1")
    assert await finish(storage, strict, "s1") == 10
    # Every step committed before the next started: only the one running
    # at the crash runs again.
    assert [*(f"step {n}" for n in range(4)), "gated 4", "gated 4"] == CALLS


async def test_steps_not_checkpointed_yet_run_again_after_a_crash(
    autojump_clock: Any,
) -> None:
    CALLS.clear()
    GATE[:] = [trio.Event()]
    storage = MemoryStorage()
    async with open_clocked_runner([batched.entity], config(), storage) as runner:
        await crash(runner, batched, "b1")
    assert await finish(storage, batched, "b1") == 10
    # Steps 0-2 were committed (a checkpoint of 3) before step 3 started;
    # step 3 and the gated one were not: they run again, the others never.
    assert [
        *(f"step {n}" for n in range(4)),
        "gated 4",
        "step 3",
        "gated 4",
    ] == CALLS


@workflow(name="cp_long", advance_seconds=2.0)
async def long(ctx: WorkflowContext, key: str) -> int:
    total = 0
    for n in range(6):
        total += await ctx.step(slow, n)
    return total


async def slow(n: int) -> int:
    ADVANCES.append(int(trio.current_time()))
    await trio.sleep(1.0)
    return n


async def test_an_advance_ends_after_advance_seconds_and_a_wake_goes_on(
    autojump_clock: Any,
) -> None:
    ADVANCES.clear()
    async with open_clocked_runner([long.entity], config(), MemoryStorage()) as runner:
        flows = long.client(runner)
        assert await flows.execute("l1", execution_id="l1") == 15
        info = await flows.get("l1").poll()
        assert info.steps == 6
        # Advances of 2 s: steps 0-1, 2-3, 4-5 (each later one woken by a
        # wake message, whose token the journal counts), then the end's.
        history = await flows.get("l1").history()
        assert history.journal.wake == 3
    # Each step started once, in order, one second apart (plus commits).
    assert len(ADVANCES) == 6
    assert sorted(ADVANCES) == ADVANCES


def test_steps_per_checkpoint_and_advance_seconds_are_checked() -> None:
    with pytest.raises(ConfigError):
        workflow(name="bad1", steps_per_checkpoint=0)(five)
    with pytest.raises(ConfigError):
        workflow(name="bad2", steps_per_checkpoint=True)(five)
    with pytest.raises(ConfigError):
        workflow(name="bad3", advance_seconds=-1.0)(five)


async def test_checkpoint_state_outside_a_transactional_handler_is_refused() -> None:
    with pytest.raises(DurableStateError):
        await checkpoint_state()
