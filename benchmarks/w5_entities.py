"""W5: 100,000 entities in one runner: memory per idle entity, activation
rate with 100 callers, and the time to shut them all down gracefully."""

from __future__ import annotations

import gc
import os
import time
from functools import partial

import trio

import trio_cluster as tc

from ._common import Counter, Increment, concurrent, emit, progress


class LongLivedCounter(Counter):
    """W5's Counter: ``max_idle`` one hour, so nothing is passivated."""

    type_name = "LongLivedCounter"
    max_idle = 3600.0


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def run(*, quick: bool = False) -> None:
    entities = 20_000 if quick else 100_000
    warmup = 1_000
    config = tc.ShardingConfig(serialize_local_calls=True)
    started = False
    shutdown_started = 0.0
    async with tc.open_runner(entities=[LongLivedCounter], config=config) as runner:
        await runner.wait_shards_acquired()
        client = runner.client(LongLivedCounter)
        one = Increment(1)

        async def warm(i: int) -> object:
            return await client(f"warmup-{i}").increment(one)

        await concurrent(warm, warmup, 100)
        gc.collect()
        before = rss_bytes()
        progress(f"W5 activating {entities} entities with 100 callers")

        async def activate(i: int) -> object:
            return await client(f"counter-{i}").increment(one)

        rate, _ = await concurrent(activate, entities, 100)
        gc.collect()
        after = rss_bytes()
        assert runner.statistics().entities == entities + warmup
        emit(
            "W5",
            "activations_per_s",
            rate,
            "activations/s",
            storage="memory",
            callers=100,
            n=entities,
        )
        emit("W5", "rss_per_entity", (after - before) / entities, "bytes", n=entities)
        progress("W5 graceful shutdown")
        started = True
        shutdown_started = time.perf_counter()
    if started:
        emit(
            "W5",
            "shutdown_s",
            time.perf_counter() - shutdown_started,
            "s",
            n=entities + warmup,
        )


def main(quick: bool = False) -> None:
    trio.run(partial(run, quick=quick))
