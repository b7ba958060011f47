"""WF-OPS: listing and counting workflow executions on PostgreSQL at W12's scale.

``EXECUTIONS`` stored executions (journals of ~600 bytes) of two workflows,
90 % waiting, 5 % completed, 4 % failed, 1 % suspended, written straight
into the entity-state table. Same run, each figure the median of ``REPS``:

1. ``count``: `StateStorage.count_states` over every workflow (what each
   ``/metrics`` scrape reads) -> seconds;
2. ``list_suspended``: the first page (100) of the suspended ones
   (``trio-cluster workflows list --status suspended``) -> seconds;
3. ``list_first_page``: the first page of one workflow, any status;

first with the ``(entity_type, label, entity_id)`` index, then after
dropping it (``unindexed_over_indexed`` is the ratio of the medians).

Figures only (JSON lines); never a gate.
"""

from __future__ import annotations

import statistics
import time
import uuid

import psycopg
import trio

from trio_cluster.abc import StateQuery, StateStorage
from trio_cluster.storage import PostgresStorage

from ._common import bench_dsn, drop_tables, emit, progress

REPS = 5
PREFIX = "trio_cluster.workflow."


def _fill(dsn: str, prefix: str, executions: int) -> None:
    table = f"{prefix}_entity_state"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
INSERT INTO {table} (entity_type, entity_id, shard_group, shard_number, epoch,
                     version, payload, saved_at, label)
SELECT CASE WHEN n %% 2 = 0 THEN 'trio_cluster.workflow.orders'
            ELSE 'trio_cluster.workflow.invoices' END,
       'e' || lpad(n::text, 7, '0'), 'default', 1 + n %% 300, 1, 3,
       decode(repeat(md5(n::text), 19), 'hex'), 1.8e9,
       CASE WHEN n %% 100 < 90 THEN 'waiting' WHEN n %% 100 < 95 THEN 'completed'
            WHEN n %% 100 < 99 THEN 'failed' ELSE 'suspended' END
FROM generate_series(1, %s) AS n""",
            [executions],
        )
        conn.execute(f"VACUUM ANALYZE {table}")


def _drop_index(dsn: str, prefix: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {prefix}_entity_state_label")
        conn.execute(f"ANALYZE {prefix}_entity_state")


async def _measure(states: StateStorage, executions: int) -> dict[str, float]:
    every = StateQuery(PREFIX, prefix=True)
    suspended = StateQuery(PREFIX, prefix=True, label="suspended")
    orders = StateQuery(PREFIX + "orders")
    times: dict[str, list[float]] = {
        "count": [],
        "list_suspended": [],
        "list_first_page": [],
    }
    for _ in range(REPS):
        t0 = time.perf_counter()
        counts = await states.count_states(every)
        times["count"].append(time.perf_counter() - t0)
        assert sum(c.count for c in counts) == executions, counts
        t0 = time.perf_counter()
        page = await states.list_states(suspended, limit=100)
        times["list_suspended"].append(time.perf_counter() - t0)
        assert len(page) == 100
        t0 = time.perf_counter()
        page = await states.list_states(orders, limit=100)
        times["list_first_page"].append(time.perf_counter() - t0)
        assert len(page) == 100
    return {name: statistics.median(values) for name, values in times.items()}


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    executions = 10_000 if quick else 100_000
    storage = PostgresStorage(dsn, table_prefix=prefix)
    async with storage.open_session(name="bench", lease_duration=30.0) as session:
        states = session.messages
        assert isinstance(states, StateStorage)
        progress(f"wfops: {executions} executions")
        await trio.to_thread.run_sync(_fill, dsn, prefix, executions)
        indexed = await _measure(states, executions)
        await trio.to_thread.run_sync(_drop_index, dsn, prefix)
        unindexed = await _measure(states, executions)
    for figure, value in indexed.items():
        emit("wfops", figure, value, "s", executions=executions, index=True)
        emit(
            "wfops", figure, unindexed[figure], "s", executions=executions, index=False
        )
        emit(
            "wfops",
            f"{figure}_unindexed_over_indexed",
            unindexed[figure] / value,
            "ratio",
            executions=executions,
        )


def main(*, quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"bench_wfops_{uuid.uuid4().hex[:8]}"
    try:
        trio.run(lambda: run(dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)


if __name__ == "__main__":
    main()
