"""W10: webhook deliveries to 100 endpoints on a local HTTP sink (another
process, keep-alive), 10 of which time out.

One runner hosts the webhooks part, on memory storage, then on PostgreSQL
(fsync on);
the sink (`benchmarks.http_sink`) answers 204 at once, and never answers
the paths of the failing endpoints (their attempts time out after
``TIMEOUT`` s, their breakers open, and they are retried on the default
schedule).

0. the ceiling: bare httpx requests to the same sink, a client per
   endpoint -> ``raw_httpx_requests_per_s``;
1. throughput: ``events`` events sent to 100 healthy endpoints by
   ``SENDERS`` tasks -> ``deliveries_per_s`` (successful deliveries / time
   from the first send to the last success);
2. latency, in the same run: ``RATES`` events/s for ``seconds`` s (open
   loop) to the 90 healthy endpoints alone (the 10 failing ones disabled),
   then the same with the 10 failing ones enabled, alternating ``ROUNDS``
   times -> the healthy deliveries' send -> 2xx p50/p99 (from the attempt
   records) of each kind of phase, pooled, and the p99 growth. Attempts
   to the failing endpoints still hanging from a "with" phase go on
   during the next "without" one (which only makes the comparison
   harder to pass).
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import httpx
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage, WebhookStorageProvider
from trio_cluster.storage import MemoryStorage, PostgresStorage
from trio_cluster.webhooks import WebhookClient, WebhookEndpoint, Webhooks

from ._common import (
    bench_dsn,
    drop_tables,
    emit,
    percentile,
    progress,
    start_ready_process,
)

HEALTHY = 90
FAILING = 10
SENDERS = 2
"""Tasks sending events in the throughput phase (each send saves 100
deliveries at once)."""
RATES = {"memory": 3.0, "postgres": 1.0}
"""Events per second of the latency phases (x 90 healthy endpoints), about
half of what each storage delivered in the throughput phase here: latency,
not queueing."""
ROUNDS = 2
PHASES = ("without_failing", "with_failing")
"""The latency phases alternate, ``ROUNDS`` times each, and their
latencies are pooled: the machine's load drifts during a run."""
TIMEOUT = 15.0
"""Seconds an attempt waits for its answer (Svix's, the default)."""


async def _register(
    hooks: WebhookClient,
    port: int,
    names: list[str],
    path: str,
    *,
    enabled: bool = True,
) -> None:
    for name in names:
        await hooks.register(
            WebhookEndpoint(
                name,
                f"http://127.0.0.1:{port}/{path}/{name}",
                timeout=TIMEOUT,
                enabled=enabled,
            )
        )


async def _healthy_latencies(
    hooks: WebhookClient, sent: dict[str, float], endpoints: list[str]
) -> list[float]:
    """Send -> 2xx of every delivery of ``sent`` to ``endpoints``, waiting
    until each has succeeded."""
    latencies = []
    with trio.fail_after(120):
        for message_id, at in sent.items():
            while True:
                records = await hooks.attempts(message_id=message_id, limit=1000)
                done = [
                    r.at + r.latency - at
                    for r in records
                    if r.outcome == "success" and r.endpoint_id in endpoints
                ]
                if len(done) == len(endpoints):
                    latencies += done
                    break
                await trio.sleep(0.05)
    return latencies


async def _open_loop(
    hooks: WebhookClient, runner: tc.Runner, rate: float, seconds: float, tag: str
) -> dict[str, float]:
    """Send ``rate`` events per second for ``seconds``; their send times."""
    sent: dict[str, float] = {}
    interval = 1 / rate
    start = trio.current_time()

    async def one(i: int) -> None:
        at = runner.clock.now()
        result = await hooks.send("bench.tick", {"phase": tag, "i": i})
        sent[result.message_id] = at

    async with trio.open_nursery() as nursery:
        for i in range(round(rate * seconds)):
            await trio.sleep_until(start + i * interval)
            nursery.start_soon(one, i)
    return sent


async def _raw_httpx(port: int, count: int) -> float:
    """Requests/s of bare httpx to the sink, a client per endpoint as the
    part's pools, 100 endpoints one request at a time each: the ceiling."""
    clients = [httpx.AsyncClient() for _ in range(100)]
    start = time.perf_counter()

    async def endpoint(i: int, client: httpx.AsyncClient) -> None:
        for _ in range(count // 100):
            await client.post(f"http://127.0.0.1:{port}/ok/{i}", content=b"{}")

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(clients):
            nursery.start_soon(endpoint, i, client)
    elapsed = time.perf_counter() - start
    for client in clients:
        await client.aclose()
    return count / elapsed


async def run(storage: Storage, label: str, rate: float, *, quick: bool) -> None:
    events = 20 if quick else 100
    seconds = 4.0 if quick else 10.0
    assert isinstance(storage, WebhookStorageProvider)
    part = Webhooks(name="bench")
    healthy = [f"ok{i:02d}" for i in range(HEALTHY)]
    failing = [f"bad{i:02d}" for i in range(FAILING)]
    async with trio.open_nursery() as nursery:
        sink, ready = await start_ready_process(
            [sys.executable, "-m", "benchmarks.http_sink"], nursery, name="http sink"
        )
        port = ready["port"]
        try:
            emit(
                "W10",
                "raw_httpx_requests_per_s",
                await _raw_httpx(port, events * 100),
                "requests/s",
                storage=label,
            )
            async with (
                tc.open_runner(entities=part.entities, storage=storage) as runner,
                part.open(runner, storage) as hooks,
            ):
                await runner.wait_shards_acquired()
                extra = [f"ok{i:02d}" for i in range(HEALTHY, HEALTHY + FAILING)]
                await _register(hooks, port, healthy + extra, "ok")
                progress(f"W10 ({label}): {events} events to 100 healthy endpoints")
                start = time.perf_counter()
                sent: dict[str, float] = {}

                async def sender(k: int) -> None:
                    for i in range(k, events, SENDERS):
                        at = runner.clock.now()
                        result = await hooks.send("bench.tick", {"i": i})
                        sent[result.message_id] = at

                async with trio.open_nursery() as senders:
                    for k in range(SENDERS):
                        senders.start_soon(sender, k)
                await _healthy_latencies(hooks, sent, healthy + extra)
                elapsed = time.perf_counter() - start
                emit(
                    "W10",
                    "deliveries_per_s",
                    events * 100 / elapsed,
                    "deliveries/s",
                    storage=label,
                    deliveries=events * 100,
                )
                for name in extra:
                    await hooks.delete(name)
                await _register(hooks, port, failing, "hang", enabled=False)
                pooled: dict[str, list[float]] = {PHASES[0]: [], PHASES[1]: []}
                for round_ in range(ROUNDS):
                    for phase in PHASES:
                        for name in failing:
                            if phase == "with_failing":
                                await hooks.enable(name)
                            else:
                                await hooks.disable(name)
                        await trio.sleep(1.0)
                        progress(
                            f"W10 ({label}): {rate:g} events/s for {seconds:g} s,"
                            f" {phase} (round {round_ + 1} of {ROUNDS})"
                        )
                        sent = await _open_loop(hooks, runner, rate, seconds, phase)
                        pooled[phase] += await _healthy_latencies(hooks, sent, healthy)
                figures: dict[str, float] = {}
                for phase, latencies in pooled.items():
                    for q in (50, 99):
                        value = percentile(latencies, q) * 1e3
                        figures[f"{phase}_p{q}"] = value
                        emit(
                            "W10",
                            f"healthy_p{q}_{phase}",
                            value,
                            "ms",
                            storage=label,
                            deliveries=len(latencies),
                            rate=rate * HEALTHY,
                        )
                emit(
                    "W10",
                    "healthy_p99_growth",
                    figures["with_failing_p99"] / figures["without_failing_p99"] - 1,
                    "ratio",
                    storage=label,
                )
                stats: Any = hooks.statistics()
                emit(
                    "W10",
                    "attempts_by_outcome",
                    0,
                    "info",
                    storage=label,
                    **stats.attempts,
                )
        finally:
            sink.kill()
            nursery.cancel_scope.cancel()


def main(*, quick: bool = False) -> None:
    trio.run(lambda: run(MemoryStorage(), "memory", RATES["memory"], quick=quick))
    dsn = bench_dsn()
    prefix = f"bw_{uuid.uuid4().hex[:10]}"
    try:
        storage = PostgresStorage(dsn, table_prefix=prefix)
        trio.run(lambda: run(storage, "postgres", RATES["postgres"], quick=quick))
    finally:
        drop_tables(dsn, prefix)
