"""W11: durable workflows on PostgreSQL (fsync on), ours and DBOS Transact's
in the same run.

1,000 executions of a 10-step workflow (each step ``x + 1``), 50 at a time
(a semaphore around ``start`` + ``result``), on one runner. Per round:

1. ours, counting pass: 200 executions through the peer's counting wire
   proxy (`benchmarks._peer.wire_counter`) -> ``sql_statements_per_step``
   (every statement the server is asked to run, BEGIN/COMMIT and the
   runner's background work included, over the pass's steps);
2. ours, timed: a fresh runner on the same tables, 1,000 executions ->
   ``steps_per_s``, ``client_cpu_per_step``, start -> first step p50 with
   50 running; then 20 executions started one at a time ->
   ``start_to_first_step_p50_idle``;
3. the peer, ``BENCH_W11_MODE=direct`` (its fastest mode, an asyncio
   semaphore of 50 around ``start_workflow_async``), when its venv exists.

Three rounds (one with ``--quick``), alternating; the medians are emitted
with ``"round": "median"`` and the ratios ours / peer. Figures only.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
import uuid
from functools import partial
from typing import Any

import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import WorkflowContext, workflow

from ._common import bench_dsn, drop_tables, emit, percentile, progress
from ._peer import run_peer, wire_counter

W = "W11"
STEPS = 10
FIRST_STEP: dict[int, float] = {}


async def add_one(x: int) -> int:
    if x % 1000 == 0:  # the first step of execution ``key`` gets key * 1000
        FIRST_STEP.setdefault(x // 1000, time.perf_counter())
    return x + 1


async def _ten(ctx: WorkflowContext, key: int) -> int:
    x = key * 1000
    for _ in range(STEPS):
        x = await ctx.step(add_one, x)
    return x


VARIANTS = {
    # Each step's result commits before the next step starts (as DBOS).
    "strict": workflow(name="w11_strict")(_ten),
    # Up to 16 consecutive steps per advance, committed together.
    "batched": workflow(name="w11_batched", steps_per_checkpoint=16)(_ten),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _many(
    runner: tc.Runner, keys: range, concurrency: int, variant: str
) -> tuple[float, list[float]]:
    """Run the executions ``keys``, ``concurrency`` at a time; (wall seconds,
    start -> first step latencies)."""
    flows = VARIANTS[variant].client(runner)
    limit = trio.Semaphore(concurrency)
    started: dict[int, float] = {}

    async def one(key: int) -> None:
        async with limit:
            started[key] = time.perf_counter()
            handle = await flows.start(key, execution_id=f"e{key}")
            await handle.result()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    wall = time.perf_counter() - t0
    return wall, [FIRST_STEP[key] - started[key] for key in keys]


def _storage(dsn: str, prefix: str) -> PostgresStorage:
    return PostgresStorage(dsn, table_prefix=prefix)


async def ours(
    dsn: str, prefix: str, variant: str, *, n: int, warmup: int, probes: int
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    config = tc.ShardingConfig(shards_per_group=16)
    counter = wire_counter("127.0.0.1", 5432)
    if counter is not None:
        progress(f"w11 ours ({variant}): counting pass")
        counted = f"{dsn} port={counter.port} sslmode=disable"
        async with tc.open_runner(
            entities=[VARIANTS[variant].entity],
            storage=_storage(counted, prefix),
            config=config,
        ) as runner:
            await _many(
                runner, range(1, 11), 10, variant
            )  # tables and connections warm
            before = counter.snapshot()
            counter.reset_texts()
            await _many(runner, range(100_000, 100_000 + warmup), 50, variant)
            after = counter.snapshot()
        steps = warmup * STEPS
        figures["sql_statements_per_step"] = (
            after["statements"] - before["statements"]
        ) / steps
        figures["round_trips_per_step"] = (
            after["round_trips"] - before["round_trips"]
        ) / steps
        for text, count in counter.top_texts(12):
            progress(f"  {count / steps:7.3f}/step  {text}")
        counter.stop()
    progress(f"w11 ours ({variant}): timed run")
    async with tc.open_runner(
        entities=[VARIANTS[variant].entity],
        storage=_storage(dsn, prefix),
        config=config,
    ) as runner:
        await _many(runner, range(200_000, 200_050), 50, variant)  # warm
        cpu0 = _cpu()
        wall, loaded = await _many(runner, range(1, n + 1), 50, variant)
        cpu = _cpu() - cpu0
        figures["steps_per_s"] = n * STEPS / wall
        figures["client_cpu_per_step"] = cpu / (n * STEPS) * 1e6
        figures["start_to_first_step_p50_loaded"] = percentile(loaded, 50) * 1e3
        idle = []
        for i in range(probes):
            await trio.sleep(0.05)
            _, [latency] = await _many(
                runner, range(300_000 + i, 300_001 + i), 1, variant
            )
            idle.append(latency)
        figures["start_to_first_step_p50_idle"] = percentile(idle, 50) * 1e3
        figures["start_to_first_step_p99_idle"] = percentile(idle, 99) * 1e3
    return figures


PEER_FIGURES = {
    "steps_per_s": "steps_per_s",
    "client_cpu_per_step": "client_cpu_per_step",
    "sql_statements_per_step": "sql_statements_per_step",
    "start_to_first_step_p50_idle": "start_to_first_step_p50_idle",
    "start_to_first_step_p50_loaded": "start_to_first_step_p50_loaded",
}
UNITS = {
    "steps_per_s": "steps/s",
    "client_cpu_per_step": "us/step",
    "sql_statements_per_step": "statements/step",
    "round_trips_per_step": "round trips/step",
    "start_to_first_step_p50_idle": "ms",
    "start_to_first_step_p99_idle": "ms",
    "start_to_first_step_p50_loaded": "ms",
}


def peer(*, n: int, warmup: int, probes: int) -> dict[str, Any]:
    progress("w11 peer: DBOS Transact, direct mode")
    raw = run_peer(
        "w11.py",
        {
            "BENCH_W11_MODE": "direct",
            "BENCH_W11_N": str(n),
            "BENCH_W11_WARMUP": str(warmup),
            "BENCH_W11_PROBES": str(probes),
            "BENCH_DB": os.environ.get("BENCH_DB", "bench_dbos_w11"),
        },
        seconds=900,
    )
    figures = {}
    for record in raw:
        name = PEER_FIGURES.get(record.get("figure", ""))
        if name is not None and record.get("value") is not None:
            figures[name] = float(record["value"])
    return figures


def main(*, quick: bool = False) -> None:
    rounds = 1 if quick else 3
    n, warmup, probes = (200, 50, 5) if quick else (1000, 200, 20)
    dsn = bench_dsn()
    results: dict[str, list[dict[str, Any]]] = {
        "ours_strict": [],
        "ours_batched": [],
        "dbos": [],
    }
    for round_ in range(rounds):
        for variant in VARIANTS:
            prefix = f"bench_w11_{uuid.uuid4().hex[:8]}"
            FIRST_STEP.clear()
            try:
                mine = trio.run(
                    partial(
                        ours, dsn, prefix, variant, n=n, warmup=warmup, probes=probes
                    )
                )
            finally:
                drop_tables(dsn, prefix)
            system = f"ours_{variant}"
            results[system].append(mine)
            for figure, value in mine.items():
                emit(W, figure, value, UNITS[figure], system=system, round=round_)
        theirs = peer(n=n, warmup=warmup, probes=probes)
        results["dbos"].append(theirs)
        for figure, value in theirs.items():
            emit(W, figure, value, UNITS[figure], system="dbos", round=round_)
    medians: dict[str, dict[str, float]] = {}
    for system, runs in results.items():
        names = {name for run in runs for name in run}
        medians[system] = {
            name: statistics.median(run[name] for run in runs if name in run)
            for name in sorted(names)
        }
        for name, value in medians[system].items():
            emit(
                W,
                name,
                value,
                UNITS[name],
                system=system,
                round="median",
                rounds=len(runs),
            )
    theirs_m = medians["dbos"]
    for variant in VARIANTS:
        mine_m = medians[f"ours_{variant}"]
        for name in (
            "steps_per_s",
            "sql_statements_per_step",
            "start_to_first_step_p50_idle",
            "client_cpu_per_step",
        ):
            if name in mine_m and name in theirs_m and theirs_m[name]:
                ratio = mine_m[name] / theirs_m[name]
                emit(W, f"{name}_ours_over_dbos", ratio, "ratio", variant=variant)


if __name__ == "__main__":
    main()
