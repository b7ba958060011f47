"""W12: suspended workflows and durable timers on PostgreSQL, ours and DBOS
Transact's in the same run.

1. ``suspend``: ``N`` executions (100,000; ``--quick``: 5,000) each
   ``await ctx.sleep(3600)`` on one runner: each is a journal row (status
   ``waiting``) and one pending durable timer (its persisted ``deliver_at``
   wake message); the runner holds one timer per shard for the earliest, and
   the execution's entity passivates once idle (``max_idle``, 30 s).
   ``rss_growth_per_suspended_wf`` = (RSS after - RSS before) / N, both read
   after ``gc.collect()`` and ``malloc_trim(0)``, 1,000 sleepers started
   first and every entity passivated. The runner talks to PostgreSQL
   through the peer's counting wire proxy, run as a separate process (not in
   our RSS): ``idle_statements_per_s`` over 30 s with all asleep.
2. ``wake``: 1,000 executions ``ctx.sleep(2)`` (durable: longer than
   ``in_memory_sleep``), started 50 at a time, each slot free once its
   execution is asleep (as the peer's start call returns once its workflow
   runs); lateness = the step after the sleep ran (wall clock) - the
   wake-up time recorded in the journal. As the peer's, the wake-ups are
   awaited by polling what the steps recorded in this process.
   ``BENCH_W12_SKIP_SUSPEND=1`` runs the wake-up parts only (both sides).
3. ``failover``: 300 executions sleep 12 s on runner A; A is aborted (as a
   ``kill -9``: no lock released) 1 s later and runner B starts on the same
   tables; lateness of those timers as they fire on B, and how long B took
   to own the shards.
4. the peer's ``w12.py`` (``suspend`` and ``wake``), when its venv exists.

Figures only (JSON lines); never a gate.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from typing import Any

import psycopg
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import Status, WorkflowContext, workflow

from ._common import bench_dsn, drop_tables, emit, percentile, progress
from ._peer import peer_dir, run_peer

W = "W12"
WOKE: dict[int, float] = {}


async def mark(key: int) -> int:
    WOKE.setdefault(key, tc.current_runner().clock.now())
    return key


@workflow(name="w12_sleeper")
async def sleeper(ctx: WorkflowContext, seconds: float) -> None:
    await ctx.sleep(seconds)


@workflow(name="w12_waker")
async def waker(ctx: WorkflowContext, arg: tuple[int, float]) -> int:
    key, seconds = arg
    await ctx.sleep(seconds)
    return await ctx.step(mark, key)


# A process that is only a runner, as `trio-cluster run` makes it.
CONFIG = tc.ShardingConfig(shards_per_group=16, freeze_gc_at_start=True)


def rss_after_gc() -> int:
    for _ in range(3):
        gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - no VmRSS


def waiting(dsn: str, prefix: str, entity_type: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {prefix}_entity_state"
            " WHERE entity_type = %s AND label = 'waiting'",
            [entity_type],
        ).fetchone()
    return int(row[0]) if row else 0


async def _start_all(runner: tc.Runner, keys: range, seconds: float) -> None:
    flows = sleeper.client(runner)
    limit = trio.Semaphore(50)

    async def one(key: int) -> None:
        async with limit:
            await flows.start(seconds, execution_id=f"s{key}")

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)


async def _until_waiting(dsn: str, prefix: str, count: int) -> None:
    name = sleeper.entity.type_name
    for _ in range(6000):  # bounded: 10 minutes
        if await trio.to_thread.run_sync(waiting, dsn, prefix, name) >= count:
            return
        await trio.sleep(0.1)
    raise RuntimeError(f"fewer than {count} executions waiting")


async def suspend(dsn: str, prefix: str, n: int, proxy: Any) -> dict[str, float]:
    figures: dict[str, float] = {}
    counted = dsn if proxy is None else f"{dsn} port={proxy.port} sslmode=disable"
    idle_after = float(sleeper.entity.max_idle or 30.0) + 5.0
    async with tc.open_runner(
        entities=[sleeper.entity],
        storage=PostgresStorage(counted, table_prefix=prefix),
        config=CONFIG,
    ) as runner:
        progress("w12 suspend: warm-up (1,000)")
        await _start_all(runner, range(1_000), 3600.0)
        await _until_waiting(dsn, prefix, 1_000)
        await trio.sleep(idle_after)  # every entity passivated
        before = rss_after_gc()
        t0 = time.perf_counter()
        # As the peer's: batches of 1,000, each waited for until all of it
        # is asleep (a start is stored at once; its first advance, which
        # records the sleep, runs after).
        for low in range(1_000, 1_000 + n, 1_000):
            high = min(low + 1_000, 1_000 + n)
            await _start_all(runner, range(low, high), 3600.0)
            await _until_waiting(dsn, prefix, high)
            if high % 10_000 == 0:
                progress(f"w12 suspend: {high - 1_000} asleep")
        figures["suspend_start_rate"] = n / (time.perf_counter() - t0)
        await trio.sleep(idle_after)
        after = rss_after_gc()
        figures["rss_growth_per_suspended_wf"] = (after - before) / n
        figures["rss_before_mib"] = before / 2**20
        figures["rss_after_mib"] = after / 2**20
        if proxy is not None:
            first = proxy.read()
            await trio.sleep(30.0)
            last = proxy.read()
            seconds = last["t"] - first["t"]
            figures["idle_statements_per_s"] = (
                last["counts"]["statements"] - first["counts"]["statements"]
            ) / seconds
            diffs = dict(last["texts"])
            for text, count in first["texts"]:
                diffs[text] = diffs.get(text, 0) - count
            for text, count in sorted(diffs.items(), key=lambda kv: -kv[1])[:8]:
                progress(f"  idle {count / seconds:6.2f}/s  {text}")
    return figures


async def _wake_all(runner: tc.Runner, keys: range, seconds: float) -> list[Any]:
    flows = waker.client(runner)
    limit = trio.Semaphore(50)
    handles: list[Any] = []

    async def one(key: int) -> None:
        async with limit:
            handle = await flows.start((key, seconds), execution_id=f"w{key}")
            handles.append(handle)
            # As the peer's start call, which returns once the workflow
            # runs: the slot is free once the execution is asleep (a start
            # is only stored; its first advance records the sleep).
            for _ in range(2000):  # bounded: ~20 s
                if (await handle.poll()).status is not Status.NOT_STARTED:
                    break
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    return handles


async def _lateness(handles: list[Any]) -> list[float]:
    late = []
    for handle in handles:
        history = await handle.history()
        [until] = [e.until for e in history.journal.entries if e.until is not None]
        key = int(handle.execution_id[1:])
        late.append(WOKE[key] - until)
    return late


async def wake(dsn: str, prefix: str, n: int) -> dict[str, float]:
    WOKE.clear()
    async with tc.open_runner(
        entities=[waker.entity],
        storage=PostgresStorage(dsn, table_prefix=prefix),
        config=CONFIG,
    ) as runner:
        progress(f"w12 wake: {n} x sleep(2)")
        handles = await _wake_all(runner, range(n), 2.0)
        # As the peer's: wait for every wake-up by looking at what the steps
        # recorded in this process (not with 1,000 `result()` calls at once,
        # a burst of work of the benchmark's own while the last sleepers are
        # due: it alone was the p99 before).
        for _ in range(3000):  # bounded: ~150 s
            if len(WOKE) >= n:
                break
            await trio.sleep(0.05)
        late = await _lateness(handles)
    return {
        "wake_lateness_p50": percentile(late, 50) * 1e3,
        "wake_lateness_p99": percentile(late, 99) * 1e3,
        "wake_lateness_max": max(late) * 1e3,
    }


async def failover(dsn: str, prefix: str, n: int) -> dict[str, float]:
    WOKE.clear()
    progress(f"w12 failover: {n} x sleep(12) on runner A, A killed")
    async with tc.open_runner(
        entities=[waker.entity],
        storage=PostgresStorage(dsn, table_prefix=prefix),
        config=CONFIG,
    ) as runner:
        handles = await _wake_all(runner, range(1_000_000, 1_000_000 + n), 12.0)
        ids = [handle.execution_id for handle in handles]
        await trio.sleep(1.0)
        runner.abort()
    killed = time.perf_counter()
    async with tc.open_runner(
        entities=[waker.entity],
        storage=PostgresStorage(dsn, table_prefix=prefix),
        config=CONFIG,
    ) as runner:
        flows = waker.client(runner)
        probe = flows.get(ids[0])
        await probe.poll()  # answered once B owns its shard
        owned = time.perf_counter() - killed
        handles = [flows.get(ident) for ident in ids]
        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(handle.result)
        late = await _lateness(handles)
    return {
        "failover_takeover_s": owned,
        "failover_wake_lateness_p50": percentile(late, 50) * 1e3,
        "failover_wake_lateness_p99": percentile(late, 99) * 1e3,
    }


UNITS = {
    "rss_growth_per_suspended_wf": "bytes",
    "rss_before_mib": "MiB",
    "rss_after_mib": "MiB",
    "suspend_start_rate": "workflows/s",
    "idle_statements_per_s": "statements/s",
    "wake_lateness_p50": "ms",
    "wake_lateness_p99": "ms",
    "wake_lateness_max": "ms",
    "failover_takeover_s": "s",
    "failover_wake_lateness_p50": "ms",
    "failover_wake_lateness_p99": "ms",
}


def _proxy() -> Any:
    folder = peer_dir()
    if folder is None:
        return None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from pgwire_count import ProxyProcess  # type: ignore[import-not-found]

    path = os.path.join(tempfile.gettempdir(), f"w12-proxy-{uuid.uuid4().hex}.json")
    return ProxyProcess(path)


def ours(parts: dict[str, int]) -> dict[str, float]:
    dsn = bench_dsn()
    figures: dict[str, float] = {}
    for part, size in parts.items():
        prefix = f"bench_w12_{uuid.uuid4().hex[:8]}"
        proxy = _proxy() if part == "suspend" else None
        try:
            if part == "suspend":
                run = partial(suspend, dsn, prefix, size, proxy)
            elif part == "wake":
                run = partial(wake, dsn, prefix, size)
            else:
                run = partial(failover, dsn, prefix, size)
            figures.update(trio.run(run))
        finally:
            if proxy is not None:
                proxy.stop()
            drop_tables(dsn, prefix)
    return figures


PEER = {
    "rss_growth_per_suspended_wf": "rss_growth_per_suspended_wf",
    "idle_statements_per_s": "idle_statements_per_s",
    "wake_lateness_p50": "wake_lateness_p50",
    "wake_lateness_p99": "wake_lateness_p99",
}


def peer(n: int, wake_n: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    db = {"BENCH_DB": os.environ.get("BENCH_DB", "bench_dbos_w12")}
    for part, env in (
        ("suspend", {"BENCH_W12_N": str(n)}),
        ("wake", {"BENCH_W12_WAKE_N": str(wake_n)}),
    ):
        progress(f"w12 peer: DBOS Transact, {part}")
        raw = run_peer("w12.py", {"BENCH_W12_PART": part, **env, **db}, seconds=1500)
        for record in raw:
            name = PEER.get(record.get("figure", ""))
            if name is not None and record.get("value") is not None:
                figures[name] = float(record["value"])
    return figures


def main(*, quick: bool = False) -> None:
    n = int(os.environ.get("BENCH_W12_N", 5_000 if quick else 100_000))
    wake_n = 200 if quick else 1_000
    rounds = 1 if quick or os.environ.get("BENCH_W12_RUNS") == "1" else 3
    # BENCH_W12_SKIP_SUSPEND=1: the wake-up parts only (both sides).
    skip_suspend = os.environ.get("BENCH_W12_SKIP_SUSPEND") == "1"
    mine_runs, theirs_runs = [], []
    for round_ in range(rounds):
        # The suspend part once (as the peer's, ~8 min), the others each round.
        parts = {"wake": wake_n, "failover": 300}
        if round_ == 0 and not skip_suspend:
            parts = {"suspend": n, **parts}
        mine = ours(parts)
        mine_runs.append(mine)
        for name, value in mine.items():
            emit(W, name, value, UNITS[name], system="ours", round=round_, n=n)
        # The peer's suspend part takes ~8 min: once, then wake only.
        first = round_ == 0 and not skip_suspend
        theirs = peer(n, wake_n) if first else peer_wake(wake_n)
        theirs_runs.append(theirs)
        for name, value in theirs.items():
            emit(W, name, value, UNITS[name], system="dbos", round=round_)
    for system, runs in (("ours", mine_runs), ("dbos", theirs_runs)):
        names = sorted({name for run in runs for name in run})
        for name in names:
            values = [run[name] for run in runs if name in run]
            emit(
                W,
                name,
                statistics.median(values),
                UNITS[name],
                system=system,
                round="median",
                rounds=len(values),
            )


def peer_wake(wake_n: int) -> dict[str, float]:
    progress("w12 peer: DBOS Transact, wake")
    figures: dict[str, float] = {}
    raw = run_peer(
        "w12.py",
        {
            "BENCH_W12_PART": "wake",
            "BENCH_W12_WAKE_N": str(wake_n),
            "BENCH_DB": os.environ.get("BENCH_DB", "bench_dbos_w12"),
        },
        seconds=600,
    )
    for record in raw:
        name = PEER.get(record.get("figure", ""))
        if name is not None and record.get("value") is not None:
            figures[name] = float(record["value"])
    return figures


if __name__ == "__main__":
    main()
