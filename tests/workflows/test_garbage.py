"""An advance leaves no reference cycles: what it used is freed when it
ends, not left to the garbage collector, whose full collections scan every
object and stall the event loop (durable timers fired late: W12 in
``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import trio

from trio_cluster.workflows import Status, WorkflowContext, workflow

from ..helpers import config
from .helpers import open_clocked_runner


async def double(value: int) -> int:
    return 2 * value


@workflow(name="garbage_sleeper")
async def sleeper(ctx: WorkflowContext, value: int) -> int:
    doubled = await ctx.step(double, value)
    await ctx.sleep(3600)  # durable: the advance ends, the execution waits
    return await ctx.step(double, doubled)


@workflow(name="garbage_parallel")
async def parallel(ctx: WorkflowContext, value: int) -> int:
    results: list[int] = []

    async def branch(offset: int) -> None:
        results.append(await ctx.step(double, value + offset))
        await ctx.sleep(3600)

    async with ctx.open_nursery() as nursery:
        for offset in range(3):
            nursery.start_soon(branch, offset)
    return sum(results)


WORKFLOW_TYPES = {
    "Replay",
    "Scope",
    "WorkflowContext",
    "RunnerRuntime",
    "Yield",
    "Journal",
    "StepNursery",
}


async def test_advances_leave_no_cyclic_garbage(autojump_clock: Any) -> None:
    flows = [sleeper, parallel]
    async with open_clocked_runner([flow.entity for flow in flows], config()) as runner:
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            handles = [
                await flow.client(runner).start(key)
                for key in range(5)
                for flow in flows
            ]
            await trio.sleep(60)
            for handle in handles:
                assert (await handle.poll()).status is Status.WAITING
            for handle in handles:
                await handle.result()  # woken after an hour, and completed
            gc.collect()
            left = Counter(type(obj).__name__ for obj in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert not {name: left[name] for name in WORKFLOW_TYPES if left[name]}, left
