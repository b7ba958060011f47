"""QUEUE: job queue throughput on PostgreSQL (fsync on), the shape of the
peer's ``queue_procrastinate.py`` (``../shared/peer-bench/workflows-dbos``).

1. enqueue ``N`` (10,000) no-op jobs one by one through a client-only
   runner (it serves no shard, so nothing runs yet) -> ``enqueue_jobs_per_s``;
2. open a runner hosting the queue's 50 workers (concurrency 50) and time
   until every job ran -> ``drain_jobs_per_s`` (= N / drain time);
3. with that runner idle, enqueue ``PROBES`` (300) jobs one at a time from
   the client runner -> ``enqueue_to_start_p50``/``p99`` (``enqueue``
   called -> job body entered).

SQL statements per job over 1 and 2 come from the storage's counters
(`PostgresStorage.statistics`, both runners' message connections).
"""

from __future__ import annotations

import time
import uuid

import attrs
import trio

import trio_cluster as tc
from trio_cluster.queues import Queue
from trio_cluster.storage import PostgresStorage

from ._common import bench_dsn, drop_tables, emit, percentile, progress

CONCURRENCY = 50


@attrs.frozen
class Noop:
    n: int


class _Runs:
    def __init__(self) -> None:
        self.count = 0
        self.done = trio.Event()
        self.target = 0
        self.started: dict[int, float] = {}

    async def handle(self, job: Noop) -> None:
        self.started[job.n] = time.perf_counter()
        self.count += 1
        if self.count >= self.target:
            self.done.set()
        await trio.lowlevel.checkpoint()


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    n = 1000 if quick else 10_000
    probes = 50 if quick else 300
    runs = _Runs()
    queue = Queue("noop", runs.handle, Noop, concurrency=CONCURRENCY)
    storage = PostgresStorage(dsn, table_prefix=prefix)
    client_config = tc.ShardingConfig(shard_groups=())
    async with tc.open_runner(storage=storage, config=client_config) as client:
        jobs = queue.client(client)
        progress(f"QUEUE: enqueue {n} no-op jobs")
        before = storage.statistics()
        start = time.perf_counter()
        for i in range(n):
            await jobs.enqueue(Noop(i))
        enqueue_s = time.perf_counter() - start
        emit("QUEUE", "enqueue_jobs_per_s", n / enqueue_s, "jobs/s", n=n)
        runs.target = n
        progress(f"QUEUE: drain with {CONCURRENCY} workers")
        start = time.perf_counter()
        async with tc.open_runner(entities=[queue.worker], storage=storage) as worker:
            await runs.done.wait()
            drain_s = time.perf_counter() - start
            after = storage.statistics()
            emit("QUEUE", "drain_jobs_per_s", n / drain_s, "jobs/s", n=n)
            statements = (after.statements - before.statements) / n
            emit("QUEUE", "statements_per_job", statements, "statements")
            progress(f"QUEUE: {probes} enqueue -> start probes")
            await trio.sleep(1.0)
            latencies = []
            for i in range(probes):
                runs.done = trio.Event()
                runs.target = runs.count + 1
                t0 = time.perf_counter()
                await jobs.enqueue(Noop(n + i))
                await runs.done.wait()
                latencies.append(runs.started[n + i] - t0)
            emit("QUEUE", "enqueue_to_start_p50", percentile(latencies, 50) * 1e3, "ms")
            emit("QUEUE", "enqueue_to_start_p99", percentile(latencies, 99) * 1e3, "ms")
            assert worker is not None


def main(*, quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"bq_{uuid.uuid4().hex[:10]}"
    try:
        trio.run(lambda: run(dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)
