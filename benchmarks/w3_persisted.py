"""W3: persisted RPC, one runner, PostgreSQL storage with fsync on.

The database is ``TRIO_CLUSTER_BENCH_DSN``, else the local server on
127.0.0.1:5432 (database ``test``). Each run creates its tables under a fresh
table prefix and drops them at the end.

After a warm-up that activates the 1,000 entities (and prepares the
statements on the pool's connections), two phases are measured: sequential
calls, then calls from 50 concurrent callers. ``TRIO_CLUSTER_BENCH_W3_CALLERS``
(comma-separated caller counts, e.g. ``50,200,500``) runs the concurrent
phase once per count instead, in that order, each with 2,000 calls per 50
callers (figures carry ``callers``); later phases run on larger tables. SQL statements per request come
from the driver's own counters (`PostgresStorage.statistics`: every statement
sent on the runner's message connections, ``BEGIN``/``COMMIT`` included; the
lock connection's lease heartbeats are reported apart), read before and after
each phase.

Right after the sequential phase, ``floor_two_commits_*``: the floor of a
persisted call on this machine, measured the same way (sequentially, in the
same run): per request, two single-row ``INSERT`` statements one after the
other, each committed on its own (autocommit: one implicit transaction per
statement, as the storage sends its writes), through the project's driver
with the session settings of the storage's pool, fsync as the server has it.
A persisted call pays at least that: its request is stored before the
handler runs, its reply after. ``sequential_p50_over_floor`` is the ratio of
the two p50s.

Runner CPU per request is this process's CPU time (`time.process_time`)
over a phase divided by its requests, without the database server's: the
runner runs in this process, and the benchmark's own loop costs a few
microseconds per call of it. After each short idle wait this VM runs the
same code up to twice as slowly, so the sequential figure is inflated by
that as much as by the code; ``floor_two_commits_cpu_per_request`` (the
driver alone, the same waits) is what to read it against.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import psycopg
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._driver._driver import PgConnection

from ._common import (
    PersistedCounter,
    bench_dsn,
    concurrent,
    drop_tables,
    emit,
    emit_phase,
    ids,
    progress,
    round_robin,
    sequential,
    summary,
)

CALLERS = 50
ENV_CALLERS = "TRIO_CLUSTER_BENCH_W3_CALLERS"


def _server_settings(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {}
        for name in ("server_version", "fsync", "synchronous_commit"):
            row = conn.execute(f"SHOW {name}").fetchone()
            settings[name] = "?" if row is None else str(row[0])
        return settings


class _Phase:
    """Statement counters and client CPU time over one measured phase."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._storage = storage
        self._start = self._read()

    def _read(self) -> tuple[int, int, int, float]:
        stats = self._storage.statistics()
        return (
            stats.statements,
            stats.round_trips,
            stats.lock_statements,
            time.process_time(),
        )

    def per_request(self, requests: int) -> dict[str, float]:
        end = self._read()
        statements, round_trips, lock, cpu = (
            (after - before) / requests
            for before, after in zip(self._start, end, strict=True)
        )
        return {
            "statements": statements,
            "round_trips": round_trips,
            "lock_statements": lock,
            "cpu_us": cpu * 1e6,
        }


async def run(dsn: str, prefix: str, settings: dict[str, str], *, quick: bool) -> None:
    sequential_calls = 200 if quick else 500
    concurrent_calls = 1000 if quick else 2000
    names = ids()
    storage = PostgresStorage(dsn, table_prefix=prefix)
    extra = {"storage": "postgres", "fsync": settings["fsync"]}
    async with tc.open_runner(entities=[PersistedCounter], storage=storage) as runner:
        await runner.wait_shards_acquired()
        call = round_robin(runner, PersistedCounter, names)

        progress(f"W3 warm-up: activating {len(names)} entities, {CALLERS} callers")
        await concurrent(call, len(names), CALLERS)

        progress(f"W3 sequential: {sequential_calls} calls")
        phase = _Phase(storage)
        rate, latencies = await sequential(call, sequential_calls)
        cost = phase.per_request(sequential_calls)
        emit_phase("W3", "sequential", rate, latencies, n=sequential_calls, **extra)
        emit(
            "W3",
            "sequential_statements_per_request",
            cost["statements"],
            "statements",
            round_trips=round(cost["round_trips"], 3),
            lock_statements=round(cost["lock_statements"], 3),
        )
        emit("W3", "sequential_runner_cpu_per_request", cost["cpu_us"], "us")

        floor = await _measure_floor(dsn, prefix, sequential_calls)
        sequential_p50 = summary(latencies)["p50_us"]
        emit("W3", "sequential_p50_over_floor", sequential_p50 / floor, "ratio")

        for callers in _callers():
            calls = concurrent_calls * max(1, callers // CALLERS)
            await _concurrent_phase(runner, storage, call, calls, callers, extra)


def _callers() -> list[int]:
    """The caller counts of the concurrent phase: ``CALLERS``, or those of
    ``TRIO_CLUSTER_BENCH_W3_CALLERS`` (comma-separated, e.g. ``50,200,500``).

    Raises:
        ValueError: a count is not a positive integer.
    """
    value = os.environ.get(ENV_CALLERS, "").strip()
    if not value:
        return [CALLERS]
    counts = [int(part) for part in value.split(",")]
    if any(count < 1 for count in counts):
        raise ValueError(f"{ENV_CALLERS}: caller counts must be positive: {value}")
    return counts


async def _concurrent_phase(
    runner: tc.Runner,
    storage: PostgresStorage,
    call: Callable[[int], Awaitable[object]],
    calls: int,
    callers: int,
    extra: dict[str, str],
) -> None:
    progress(f"W3 concurrent: {calls} calls, {callers} callers")
    phase = _Phase(storage)
    before = runner.statistics()
    rate, latencies = await concurrent(call, calls, callers)
    cost = phase.per_request(calls)
    after = runner.statistics()
    emit_phase(
        "W3", "concurrent", rate, latencies, {"callers": callers}, n=calls, **extra
    )
    emit(
        "W3",
        "concurrent_statements_per_request",
        cost["statements"],
        "statements",
        callers=callers,
        round_trips=round(cost["round_trips"], 3),
        lock_statements=round(cost["lock_statements"], 3),
        save_batches=after.save_batches - before.save_batches,
        reply_batches=after.reply_batches - before.reply_batches,
        claims=after.storage_claims - before.storage_claims,
    )
    emit(
        "W3",
        "concurrent_runner_cpu_per_request",
        cost["cpu_us"],
        "us",
        callers=callers,
    )


async def _measure_floor(dsn: str, prefix: str, count: int) -> float:
    """Emit the ``floor_two_commits_*`` figures (see the module docstring)
    and return their p50 (µs)."""
    table = f"{prefix}_floor"
    payload = b"x" * 60
    # The session settings of the storage's message pool (`PostgresStorage`).
    settings = {"plan_cache_mode": "force_generic_plan"}
    conn = await PgConnection.connect(
        dsn, application_name="trio_cluster bench floor", settings=settings
    )
    async with conn:
        await conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload bytea NOT NULL)",
            prepare=False,
        )
        insert = f"INSERT INTO {table} (id, payload) VALUES ($1, $2)"

        async def two_commits(i: int) -> None:
            await conn.execute(insert, (2 * i, payload))
            await conn.execute(insert, (2 * i + 1, payload))

        progress(f"W3 floor: {count} pairs of single-row commits")
        await sequential(two_commits, 50)  # prepares the statement
        await conn.execute(f"TRUNCATE {table}", prepare=False)
        cpu = time.process_time()
        rate, latencies = await sequential(two_commits, count)
        cpu = time.process_time() - cpu
    stats = summary(latencies)
    emit("W3", "floor_two_commits_per_s", rate, "pairs/s", n=count)
    emit("W3", "floor_two_commits_p50", stats["p50_us"], "us")
    emit("W3", "floor_two_commits_p99", stats["p99_us"], "us")
    emit("W3", "floor_two_commits_cpu_per_request", cpu / count * 1e6, "us")
    return stats["p50_us"]


def main(quick: bool = False) -> None:
    dsn = bench_dsn()
    settings = _server_settings(dsn)
    progress(
        f"W3 PostgreSQL {settings['server_version']}, fsync={settings['fsync']},"
        f" synchronous_commit={settings['synchronous_commit']}"
    )
    prefix = f"w3_{uuid.uuid4().hex[:12]}"
    try:
        trio.run(partial(run, dsn, prefix, settings, quick=quick))
    finally:
        drop_tables(dsn, prefix)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_floor")
