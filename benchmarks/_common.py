"""Shared pieces of the benchmarks: the Counter entity, timing and output, the
PostgreSQL database, and helper processes."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

import trio_cluster as tc
from trio_cluster.testing import ChildProcess

ENV_DSN = "TRIO_CLUSTER_BENCH_DSN"
DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
TABLES = (
    "event_cursors",
    "event_heads",
    "event_log",
    "entity_state",
    "webhook_attempts",
    "webhook_endpoints",
    "dead_letters",
    "replies",
    "messages",
    "shards",
    "runners",
    "schema_version",
)
"""The tables of a PostgreSQL storage, under its table prefix."""
REPO = Path(__file__).resolve().parents[1]
READY_DEADLINE = 60.0
"""Longest wait for a helper process's ``ready`` line (the machine is shared)."""


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


def emit_phase(
    workload: str,
    phase: str,
    rate: float,
    latencies: list[float],
    common: Mapping[str, Any] = {},
    /,
    **rate_extra: Any,
) -> None:
    """Emit ``<phase>_msgs_per_s`` (with ``rate_extra``), ``<phase>_p50`` and
    ``<phase>_p99`` (all three with ``common``)."""
    stats = summary(latencies)
    emit(workload, f"{phase}_msgs_per_s", rate, "msg/s", **common, **rate_extra)
    emit(workload, f"{phase}_p50", stats["p50_us"], "us", **common)
    emit(workload, f"{phase}_p99", stats["p99_us"], "us", **common)


def round_robin(
    runner: tc.Runner, entity: type[Counter | PersistedCounter], names: list[str]
) -> Callable[[int], Awaitable[object]]:
    """``call(i)``: ``increment(1)`` on the ``i``-th id of ``names``, round robin."""
    client = runner.client(entity)
    refs = [client(name) for name in names]
    one = Increment(1)

    async def call(i: int) -> object:
        return await refs[i % len(refs)].increment(one)

    return call


# ----------------------------------------------------------------------
# PostgreSQL and helper processes


def bench_dsn() -> str:
    """``TRIO_CLUSTER_BENCH_DSN``, else the local server's database ``test``."""
    return os.environ.get(ENV_DSN) or DEFAULT_DSN


def drop_tables(dsn: str, prefix: str) -> None:
    """Drop the tables of the storage under ``prefix``, and its machine-id
    sequence (schema version 9)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table} CASCADE")
        conn.execute(f"DROP SEQUENCE IF EXISTS {prefix}_machine_ids")


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a benchmark's child Python
    process: it imports ``trio_cluster`` from where this process did, and
    ``benchmarks`` from `REPO`, whatever its working directory holds
    (``PYTHONSAFEPATH``: not the directory first). Started in a checkout, a
    child would otherwise run the checkout's ``trio_cluster``, not the copy
    of another version put first on ``PYTHONPATH`` for a same-run
    comparison."""
    env = dict(os.environ if env is None else env)
    library = Path(tc.__file__).parent.parent if tc.__file__ else REPO
    paths = (str(library), str(REPO), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env["PYTHONSAFEPATH"] = "1"
    return env


async def start_ready_process(
    command: Sequence[str], nursery: trio.Nursery, *, name: str, **options: Any
) -> tuple[ChildProcess, dict[str, Any]]:
    """Start ``command`` (from the repository, importing what this process
    imports: `child_env`) in ``nursery`` and wait for its ``ready`` event
    line; return the process and that event. ``options`` go to
    `ChildProcess` (``env``, ``stdin``)."""
    options.setdefault("cwd", REPO)
    options["env"] = child_env(options.get("env"))
    child = ChildProcess(command, name=name, **options)
    await nursery.start(child.run)
    return child, await child.wait_event("ready", seconds=READY_DEADLINE)
