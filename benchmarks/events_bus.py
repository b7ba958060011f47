"""EVENTS: the event bus half of W9 on PostgreSQL (fsync on).

One publisher task per key x 100 keys publish ``N`` events in all (each key
its events numbered 0, 1, ...) to a 16-partition topic through one runner;
one transactional subscriber (16 partition consumers on the same runner)
consumes them. Figures:

* ``published_events_per_s``: N / time until every publication returned;
* ``events_per_statement``: events per group-commit statement (the
  statements counted by the bus, one each);
* ``statements_per_batch``: SQL statements per publish batch on the message
  connections, measured from the storage's counters over a publish-only
  phase (no subscriber running): the target is <= 1;
* ``publish_to_subscriber_p50``/``p99``: publish called -> handler entered;
* ``order_violations``: events of a key seen out of order (a redelivery of
  an earlier event is not one).
"""

from __future__ import annotations

import time
import uuid

import attrs
import trio

import trio_cluster as tc
from trio_cluster.events import Event, EventBus, Subscription, Topic, event_bus
from trio_cluster.storage import PostgresStorage

from ._common import bench_dsn, drop_tables, emit, percentile, progress

KEYS = 100


@attrs.frozen
class Tick:
    key: str
    n: int
    sent: float


class _Seen:
    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.violations = 0
        self.latencies: list[float] = []
        self.count = 0
        self.target = 0
        self.done = trio.Event()

    async def handle(self, event: Event[Tick]) -> None:
        tick = event.value
        last = self.last.get(tick.key, -1)
        if tick.n > last + 1:
            self.violations += 1
        if tick.n > last:
            self.last[tick.key] = tick.n
            self.latencies.append(time.perf_counter() - tick.sent)
            self.count += 1
        if self.count >= self.target:
            self.done.set()
        await trio.lowlevel.checkpoint()


async def _publish_all(bus: EventBus, topic: Topic[Tick], n: int, tag: str) -> float:
    per_key = n // KEYS

    async def publisher(k: int) -> None:
        key = f"{tag}{k}"
        for i in range(per_key):
            await bus.publish(topic, Tick(key, i, time.perf_counter()), key=key)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(KEYS):
            nursery.start_soon(publisher, k)
    return time.perf_counter() - start


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    n = 2000 if quick else 20_000
    topic = Topic("ticks", Tick, partitions=16)
    seen = _Seen()
    sub = Subscription(topic, "w9", seen.handle, start="earliest", transactional=True)
    storage = PostgresStorage(dsn, table_prefix=prefix)
    # Phase 1: publish only (client runner, no consumer), for statements.
    client_config = tc.ShardingConfig(shard_groups=())
    async with tc.open_runner(storage=storage, config=client_config) as client:
        bus = event_bus(client)
        progress(f"EVENTS: publish {n} events, {KEYS} keys, no subscriber")
        before = storage.statistics()
        statements = bus.statements
        elapsed = await _publish_all(bus, topic, n, "a")
        after = storage.statistics()
        batches = bus.statements - statements
        emit("EVENTS", "published_events_per_s", n / elapsed, "events/s", n=n)
        emit("EVENTS", "events_per_statement", n / batches, "events")
        emit(
            "EVENTS",
            "statements_per_batch",
            (after.statements - before.statements) / batches,
            "statements",
        )
    # Phase 2: publish while a transactional subscriber consumes.
    seen.target = n
    async with tc.open_runner(storage=storage, singletons=sub.consumers) as runner:
        await runner.wait_shards_acquired()
        seen.done = trio.Event()
        await seen.done.wait()  # phase 1's events: drained
        seen.latencies.clear()
        seen.count, seen.target = 0, n
        seen.done = trio.Event()
        progress(f"EVENTS: publish {n} more with the subscriber running")
        bus = event_bus(runner)
        elapsed = await _publish_all(bus, topic, n, "b")
        emit(
            "EVENTS", "published_events_per_s_with_subscriber", n / elapsed, "events/s"
        )
        with trio.fail_after(300):
            await seen.done.wait()
        emit(
            "EVENTS",
            "publish_to_subscriber_p50",
            percentile(seen.latencies, 50) * 1e3,
            "ms",
        )
        emit(
            "EVENTS",
            "publish_to_subscriber_p99",
            percentile(seen.latencies, 99) * 1e3,
            "ms",
        )
        emit("EVENTS", "order_violations", seen.violations, "events")
        # Paced: 1,000 events/s, the wake-up latency without a backlog.
        seen.latencies.clear()
        seen.count, seen.target = 0, 500
        seen.done = trio.Event()
        for i in range(500):
            await bus.publish(
                topic,
                Tick(f"c{i % KEYS}", i // KEYS, time.perf_counter()),
                key=f"c{i % KEYS}",
            )
            await trio.sleep(0.001)
        with trio.fail_after(60):
            await seen.done.wait()
        emit(
            "EVENTS",
            "paced_publish_to_subscriber_p50",
            percentile(seen.latencies, 50) * 1e3,
            "ms",
        )
        emit(
            "EVENTS",
            "paced_publish_to_subscriber_p99",
            percentile(seen.latencies, 99) * 1e3,
            "ms",
        )
        emit("EVENTS", "order_violations_total", seen.violations, "events")


def main(*, quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"be_{uuid.uuid4().hex[:10]}"
    try:
        trio.run(lambda: run(dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)
