"""``trio-cluster events lag`` against a real PostgreSQL database."""

from __future__ import annotations

import json
import uuid

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster._cli._main import main
from trio_cluster.events import Event, Subscription, Topic, event_bus
from trio_cluster.storage import PostgresStorage

pytestmark = pytest.mark.postgres


@attrs.frozen
class Ping:
    n: int


def test_events_lag_prints_each_cursor(pg_schema, capsys):
    prefix = f"cli_{uuid.uuid4().hex[:10]}"
    topic = Topic("pings", Ping, partitions=2)
    handled: list[int] = []

    async def handle(event: Event[Ping]) -> None:
        handled.append(event.value.n)
        if event.value.n == 1:
            raise RuntimeError("poison")

    sub = Subscription(
        topic, "pinger", handle, start="earliest", retry=tc.RetryPolicy(max_attempts=1)
    )

    async def scenario() -> None:
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        async with tc.open_runner(storage=storage, singletons=sub.consumers) as r:
            for n in range(3):
                await event_bus(r).publish(topic, Ping(n), key="same")
            with trio.fail_after(60):
                while sum(p.lag for p in await event_bus(r).lag(sub)):  # noqa: ASYNC110
                    await trio.sleep(0.05)
        # Published with no consumer: lag 2 in the key's partition.
        async with tc.open_runner(
            storage=storage, config=tc.ShardingConfig(shard_groups=())
        ) as client:
            for n in range(2):
                await event_bus(client).publish(topic, Ping(10 + n), key="same")

    trio.run(scenario)
    capsys.readouterr()
    assert (
        main(["events", "lag", "--dsn", pg_schema.dsn, "--prefix", prefix, "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["subscription"], r["partition"]) for r in rows] == [
        ("pinger", 0),
        ("pinger", 1),
    ]
    busy = [r for r in rows if r["end"]]
    assert [(r["cursor"], r["end"], r["lag"], r["skipped"]) for r in busy] == [
        (3, 5, 2, 1)
    ]
    assert main(["events", "lag", "--dsn", pg_schema.dsn, "--prefix", prefix]) == 0
    assert "pinger" in capsys.readouterr().out
    assert main(["events", "lag", "--dsn", "not a dsn", "--prefix", "Bad-"]) == 2
