"""Shared pieces of the benchmarks: the Counter entity, timing and output."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

import trio_cluster as tc


@attrs.frozen
class Increment:
    amount: int


class Counter(tc.Entity):
    """The entity of workloads W1-W5: one RPC, state a plain int."""

    type_name = "Counter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc
    async def increment(self, msg: Increment) -> int:
        self.value += msg.amount
        return self.value


class PersistedCounter(tc.Entity):
    """Counter with a persisted RPC (W3)."""

    type_name = "PersistedCounter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc(persisted=True)
    async def increment(self, msg: Increment) -> int:
        self.value += msg.amount
        return self.value


def ids(n: int = 1000) -> list[str]:
    return [f"counter-{i}" for i in range(n)]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(workload: str, figure: str, value: float, unit: str, **extra: Any) -> None:
    record = {
        "workload": workload,
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
    }
    record.update(extra)
    print(json.dumps(record), flush=True)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def sequential(
    call: Callable[[int], Awaitable[object]], count: int
) -> tuple[float, list[float]]:
    """Run ``count`` calls one after another; returns (msg/s, latencies in s)."""
    latencies: list[float] = []
    clock = time.perf_counter
    start = clock()
    for i in range(count):
        t0 = clock()
        await call(i)
        latencies.append(clock() - t0)
    return count / (clock() - start), latencies


async def concurrent(
    call: Callable[[int], Awaitable[object]], count: int, callers: int
) -> tuple[float, list[float]]:
    """``callers`` tasks pull request numbers from a shared counter."""
    import trio

    latencies: list[float] = []
    clock = time.perf_counter
    next_request = 0

    async def caller() -> None:
        nonlocal next_request
        while next_request < count:
            i = next_request
            next_request += 1
            t0 = clock()
            await call(i)
            latencies.append(clock() - t0)

    start = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return count / (clock() - start), latencies


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(latencies, 50) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "mean_us": statistics.fmean(latencies) * 1e6,
    }
