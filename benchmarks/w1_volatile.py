"""W1: volatile RPC, one runner, one process, memory storage."""

from __future__ import annotations

from functools import partial

import trio

import trio_cluster as tc

from ._common import (
    Counter,
    concurrent,
    emit_phase,
    ids,
    progress,
    round_robin,
    sequential,
)


async def run(*, quick: bool = False, serialize: bool = True) -> None:
    sequential_calls = 1000 if quick else 5000
    concurrent_calls = 4000 if quick else 20000
    names = ids()
    config = tc.ShardingConfig(serialize_local_calls=serialize)
    mode = "serialized" if serialize else "direct"
    async with tc.open_runner(entities=[Counter], config=config) as runner:
        await runner.wait_shards_acquired()
        call = round_robin(runner, Counter, names)

        progress(f"W1 sequential ({mode}): {sequential_calls} calls")
        rate, latencies = await sequential(call, sequential_calls)
        emit_phase(
            "W1",
            "sequential",
            rate,
            latencies[len(names) :] or latencies,
            {"mode": mode},
            storage="memory",
            n=sequential_calls,
        )
        progress(f"W1 concurrent ({mode}): {concurrent_calls} calls, 100 callers")
        rate, latencies = await concurrent(call, concurrent_calls, 100)
        emit_phase(
            "W1",
            "concurrent",
            rate,
            latencies,
            {"mode": mode},
            storage="memory",
            callers=100,
            n=concurrent_calls,
        )


def main(quick: bool = False) -> None:
    trio.run(partial(run, quick=quick))
    trio.run(partial(run, quick=quick, serialize=False))
