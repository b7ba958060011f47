"""WF: durable workflow steps on PostgreSQL (fsync on), first slice.

Same run, same runner:

1. ``durable_call``: sequential calls of a transactional handler that saves
   durable state (what each step's advance costs at least) -> msgs/s;
2. ``steps``: ``EXECUTIONS`` workflows of ``STEPS`` trivial steps each, run
   concurrently -> steps/s, and ``steps_over_durable_calls`` (the ratio);
3. ``first_step``: from ``start()`` to the first step running, sequential
   starts -> p50, p99 (seconds).

Figures only (JSON lines); never a gate.
"""

from __future__ import annotations

import time
import uuid

import attrs
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import WorkflowContext, workflow

from ._common import bench_dsn, drop_tables, emit, percentile, progress

STEPS = 20
FIRST_STEP: dict[str, float] = {}


@attrs.frozen
class Count:
    value: int = 0


@attrs.frozen
class Bump:
    pass


class Counter(tc.Entity):
    type_name = "bench.WfCounter"
    state = tc.durable(Count)

    @tc.rpc(persisted=True, transactional=True)
    async def bump(self, msg: Bump) -> int:
        self.state = Count(self.state.value + 1)
        return self.state.value


async def work(n: int) -> int:
    return n + 1


async def first_work(key: str) -> str:
    FIRST_STEP.setdefault(key, time.perf_counter())
    return key


@workflow(name="bench_steps")
async def many_steps(ctx: WorkflowContext, key: str) -> int:
    total = 0
    for _ in range(STEPS):
        total = await ctx.step(work, total)
    return total


@workflow(name="bench_first")
async def first(ctx: WorkflowContext, key: str) -> str:
    return await ctx.step(first_work, key)


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    executions = 10 if quick else 50
    calls = 100 if quick else 500
    starts = 10 if quick else 50
    storage = PostgresStorage(dsn, table_prefix=prefix)
    config = tc.ShardingConfig(shards_per_group=16)
    async with tc.open_runner(
        entities=[Counter, many_steps.entity, first.entity],
        storage=storage,
        config=config,
    ) as runner:
        progress("wf: durable calls")
        counter = runner.client(Counter)("c")
        await counter.bump(Bump())
        t0 = time.perf_counter()
        for _ in range(calls):
            await counter.bump(Bump())
        call_rate = calls / (time.perf_counter() - t0)
        emit("wf", "durable_call_msgs_per_s", call_rate, "msgs/s", calls=calls)

        progress("wf: steps")
        flows = many_steps.client(runner)
        t0 = time.perf_counter()
        handles = [await flows.start(f"x{i}") for i in range(executions)]
        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(handle.result)
        step_rate = executions * STEPS / (time.perf_counter() - t0)
        emit(
            "wf",
            "steps_per_s",
            step_rate,
            "steps/s",
            executions=executions,
            steps=STEPS,
        )
        emit("wf", "steps_over_durable_calls", step_rate / call_rate, "ratio")

        progress("wf: start to first step")
        starter = first.client(runner)
        latencies = []
        for i in range(starts):
            key = f"f{i}"
            t0 = time.perf_counter()
            started = await starter.start(key)
            await started.result()
            latencies.append(FIRST_STEP[key] - t0)
        emit("wf", "first_step_p50", percentile(latencies, 50), "s", starts=starts)
        emit("wf", "first_step_p99", percentile(latencies, 99), "s", starts=starts)


def main(*, quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"bench_wf_{uuid.uuid4().hex[:8]}"
    try:
        trio.run(lambda: run(dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)


if __name__ == "__main__":
    main()
