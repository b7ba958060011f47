"""W1: volatile RPC, one runner, one process, memory storage."""

from __future__ import annotations

from functools import partial

import trio

import trio_cluster as tc

from ._common import (
    Counter,
    Increment,
    concurrent,
    emit,
    ids,
    progress,
    sequential,
    summary,
)


async def run(*, quick: bool = False, serialize: bool = True) -> None:
    sequential_calls = 1000 if quick else 5000
    concurrent_calls = 4000 if quick else 20000
    names = ids()
    config = tc.ShardingConfig(serialize_local_calls=serialize)
    mode = "serialized" if serialize else "direct"
    async with tc.open_runner(entities=[Counter], config=config) as runner:
        await runner.wait_shards_acquired()
        client = runner.client(Counter)
        refs = [client(name) for name in names]
        one = Increment(1)

        async def call(i: int) -> object:
            return await refs[i % len(refs)].increment(one)

        progress(f"W1 sequential ({mode}): {sequential_calls} calls")
        rate, latencies = await sequential(call, sequential_calls)
        stats = summary(latencies[len(names) :] or latencies)
        emit(
            "W1",
            "sequential_msgs_per_s",
            rate,
            "msg/s",
            storage="memory",
            mode=mode,
            n=sequential_calls,
        )
        emit("W1", "sequential_p50", stats["p50_us"], "us", mode=mode)
        emit("W1", "sequential_p99", stats["p99_us"], "us", mode=mode)
        progress(f"W1 concurrent ({mode}): {concurrent_calls} calls, 100 callers")
        rate, latencies = await concurrent(call, concurrent_calls, 100)
        stats = summary(latencies)
        emit(
            "W1",
            "concurrent_msgs_per_s",
            rate,
            "msg/s",
            storage="memory",
            mode=mode,
            callers=100,
            n=concurrent_calls,
        )
        emit("W1", "concurrent_p50", stats["p50_us"], "us", mode=mode)
        emit("W1", "concurrent_p99", stats["p99_us"], "us", mode=mode)


def main(quick: bool = False) -> None:
    trio.run(partial(run, quick=quick))
    trio.run(partial(run, quick=quick, serialize=False))
