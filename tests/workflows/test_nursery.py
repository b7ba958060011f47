"""Parallel steps (`WorkflowContext.open_nursery`) on memory storage, in
virtual time: positions by start order whatever finishes first, recorded
results replayed, Trio's failure and cancellation rules, compensations in
reverse order of position."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    Kind,
    Status,
    StepFailedError,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

from ..helpers import config
from .helpers import open_clocked_runner

LOG: list[str] = []
NO_RETRY = tc.RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


@attrs.frozen
class Job:
    name: str
    seconds: float
    fail: bool = False


class OutOfStockError(Exception):
    pass


async def work(job: Job) -> str:
    LOG.append(f"start {job.name}")
    await trio.sleep(job.seconds)
    if job.fail:
        LOG.append(f"fail {job.name}")
        raise OutOfStockError(job.name)
    LOG.append(f"done {job.name}")
    return f"r-{job.name}"


async def undo(job: Job, result: str) -> None:
    LOG.append(f"undo {job.name}")


@workflow(name="fan_out", retry=NO_RETRY)
async def fan_out(ctx: WorkflowContext, jobs: list[Job]) -> dict[str, str]:
    results: dict[str, str] = {}

    async def one(job: Job) -> None:
        results[job.name] = await ctx.step(work, job, compensate=undo)
        # A second step in the same task: it runs in the next advance.
        results[job.name] += "+" + await ctx.step(work, Job(job.name + "'", 0))

    await ctx.step(work, Job("first", 0), compensate=undo)
    async with ctx.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    await ctx.step(work, Job("last", 0), compensate=undo)
    return results


async def test_parallel_steps_run_together_and_are_numbered_by_start_order(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    jobs = [Job("a", 30), Job("b", 10), Job("c", 20)]
    async with open_clocked_runner([fan_out.entity], config(), storage) as runner:
        start = trio.current_time()
        handle = await fan_out.client(runner).start(jobs, execution_id="f1")
        assert await handle.result() == {
            "a": "r-a+r-a'",
            "b": "r-b+r-b'",
            "c": "r-c+r-c'",
        }
        # The three first steps ran concurrently (30 s, not 60 s).
        assert trio.current_time() - start == 30
        assert LOG[:2] == ["start first", "done first"]
        assert sorted(LOG[2:5]) == ["start a", "start b", "start c"]
        history = await handle.history()
    entries = history.journal.entries
    # Recorded in the order they finished...
    recorded = [e.name for e in entries]
    assert recorded.index("nursery") == 1
    finished = [e.position for e in entries if e.kind is Kind.STEP][1:4]
    assert finished == [(1, 1, 0), (1, 2, 0), (1, 0, 0)]  # b, c, a
    # ...at positions by start order, whatever finished first.
    positions = {e.position: e for e in entries}
    assert positions[(0,)].kind is Kind.STEP
    assert positions[(1,)].kind is Kind.NURSERY
    for index in range(3):
        assert positions[(1, index, 0)].value is not None
        assert positions[(1, index, 1)].name == "work"
    assert positions[(2,)].name == "work"
    assert len(entries) == 9
    # A restarted runner replays everything from the journal: nothing runs.
    LOG.clear()
    async with open_clocked_runner([fan_out.entity], config(), storage) as runner:
        handle = fan_out.client(runner).get("f1")
        await handle.resume()  # not suspended: does nothing
        assert (await handle.poll()).status is Status.COMPLETED
    assert LOG == []


async def test_a_crash_mid_nursery_reruns_only_unrecorded_steps(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    jobs = [Job("a", 1000), Job("b", 5)]
    async with open_clocked_runner([fan_out.entity], config(), storage) as runner:
        handle = await fan_out.client(runner).start(jobs, execution_id="f2")
        await trio.sleep(100)
        # first is committed; a and b run in one advance: b finished, but
        # nothing of the advance is committed while a runs.
        assert LOG[:2] == ["start first", "done first"]
        assert sorted(LOG[2:4]) == ["start a", "start b"]
        assert LOG[4:] == ["done b"]
        runner.abort()
    LOG.clear()
    async with open_clocked_runner([fan_out.entity], config(), storage) as runner:
        handle = fan_out.client(runner).get("f2")
        assert (await handle.result())["a"] == "r-a+r-a'"
    # first is not run again; a and b are (at least once); each once more.
    assert sorted(LOG) == sorted(
        [
            "start a",
            "start b",
            "done b",
            "done a",
            "start a'",
            "done a'",
            "start b'",
            "done b'",
            "start last",
            "done last",
        ]
    )


async def test_a_failing_parallel_step_cancels_its_siblings_and_compensates_in_reverse(
    autojump_clock: Any,
) -> None:
    jobs = [Job("a", 5), Job("b", 10, fail=True), Job("c", 50), Job("d", 1)]
    async with open_clocked_runner([fan_out.entity]) as runner:
        handle = await fan_out.client(runner).start(jobs, execution_id="f3")
        with pytest.raises(WorkflowFailedError) as raised:
            await handle.result()
        info = await handle.poll()
        assert info.status is Status.COMPENSATED
        assert info.error is not None
        # Trio's rule: the nursery raised an ExceptionGroup.
        assert info.error.type == "ExceptionGroup"
        assert "StepFailedError: step 'work' failed: OutOfStockError: b" in (
            raised.value.error
        )
        # c was cancelled when b failed: never recorded, never compensated.
        assert "done c" not in LOG
        assert "fail b" in LOG
        # Compensated newest position first: d (1.3.0), a (1.0.0), first (0).
        assert info.compensated == ((1, 3, 0), (1, 0, 0), (0,))
        assert [line for line in LOG if line.startswith("undo")] == [
            "undo d",
            "undo a",
            "undo first",
        ]


@workflow(name="catching", retry=NO_RETRY)
async def catching(ctx: WorkflowContext, jobs: list[Job]) -> str:
    done: list[str] = []

    async def one(job: Job) -> None:
        done.append(await ctx.step(work, job))

    failed: list[str] = []
    try:
        async with ctx.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(one, job)
    except* StepFailedError as group:
        failed = [exc.message for exc in group.exceptions]
    return f"failed {failed}, done {sorted(done)}"


async def test_a_caught_failure_replays_the_same_way(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    jobs = [Job("a", 1), Job("b", 10, fail=True), Job("c", 1)]
    async with open_clocked_runner([catching.entity], config(), storage) as runner:
        handle = await catching.client(runner).start(jobs, execution_id="c1")
        assert await handle.result() == "failed ['b'], done ['r-a', 'r-c']"
        assert (await handle.poll()).steps == 4
    LOG.clear()
    async with open_clocked_runner([catching.entity], config(), storage) as runner:
        handle = catching.client(runner).get("c1")
        assert await handle.result() == "failed ['b'], done ['r-a', 'r-c']"
    assert LOG == []


@workflow(name="racing", retry=NO_RETRY)
async def racing(ctx: WorkflowContext, jobs: list[Job]) -> str:
    winner: list[str] = []

    async def one(job: Job) -> None:
        winner.append(await ctx.step(work, job))
        nursery.cancel_scope.cancel()

    async with ctx.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    await ctx.sleep(3600)  # a durable timer: the next advance replays the race
    return winner[0]


async def test_a_race_cancels_the_losers_and_replays_the_same_winner(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    jobs = [Job("slow", 100), Job("fast", 1)]
    async with open_clocked_runner([racing.entity], config(), storage) as runner:
        handle = await racing.client(runner).start(jobs, execution_id="r1")
        assert await handle.result() == "r-fast"
        history = await handle.history()
    assert "done slow" not in LOG
    assert [e.position for e in history.journal.entries] == [(0,), (0, 1, 0), (1,)]


async def flaky(job: Job) -> str:
    LOG.append(f"try {job.name} at {trio.current_time():.0f}")
    attempts = sum(1 for line in LOG if line.startswith(f"try {job.name} "))
    if job.fail and attempts < 3:
        raise ConnectionError("later")
    return job.name


@workflow(
    name="retrying_fan",
    retry=tc.RetryPolicy(max_attempts=5, backoff=tc.Backoff(100, 100)),
)
async def retrying_fan(ctx: WorkflowContext, jobs: list[Job]) -> list[str]:
    out: dict[int, str] = {}

    async def one(index: int, job: Job) -> None:
        out[index] = await ctx.step(flaky, job)
        out[index] += await ctx.step(flaky, Job(job.name + "2", 0))

    async with ctx.open_nursery() as nursery:
        for index, job in enumerate(jobs):
            nursery.start_soon(one, index, job)
    return [out[i] for i in range(len(jobs))]


async def test_parallel_steps_retry_each_on_its_own_timer(autojump_clock: Any) -> None:
    async with open_clocked_runner([retrying_fan.entity]) as runner:
        start = trio.current_time()
        result = await retrying_fan.client(runner).execute(
            [Job("x", 0, fail=True), Job("y", 0)]
        )
        assert result == ["xx2", "yy2"]
    tries = [
        (line.split()[1], float(line.split()[3]) - start)
        for line in LOG
        if line.startswith("try")
    ]
    # y and y2 ran at once (the advance after y did not wait for x's retry
    # timer); x retried at 100 and 200, then x2.
    assert ("y", 0) in tries
    assert ("y2", 0) in tries
    assert [t for name, t in tries if name == "x"] == [0, 100, 200]
    assert [t for name, t in tries if name == "x2"] == [200]


@workflow(name="misused", retry=NO_RETRY)
async def misused(ctx: WorkflowContext, jobs: list[Job]) -> str:
    async with trio.open_nursery() as nursery:  # not ctx.open_nursery()
        for job in jobs:
            nursery.start_soon(ctx.step, work, job)
    return "unreachable"


async def test_ctx_in_a_plain_trio_nursery_suspends_the_execution(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([misused.entity]) as runner:
        handle = await misused.client(runner).start([Job("a", 1)], execution_id="m1")
        await trio.sleep(10)
        info = await handle.poll()
        assert info.status is Status.SUSPENDED
        assert info.problem is not None
        assert "ctx.open_nursery()" in info.problem
        assert info.steps == 0
    assert LOG == []
