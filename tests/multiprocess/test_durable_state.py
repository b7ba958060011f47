"""Durable entity state across ``kill -9`` of real runner processes on real
PostgreSQL: the survivor continues every entity from its last committed
state, never losing an acknowledged change nor applying one twice."""

from __future__ import annotations

import pytest
import trio

import trio_cluster as tc

from .entities import Add, Count, Counted, Ping, Tally
from .helpers import MultiCluster, log
from .loads import RETRIED

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

ENTITIES = [f"tally-{n}" for n in range(40)]


async def add(client: tc.Runner, entity: str, key: str) -> Counted:
    """``Tally.add`` until it is acknowledged (same key: one request)."""
    tally = client.client(Tally)
    while True:
        try:
            return await tally(entity).add(Add(key))
        except RETRIED:
            await trio.sleep(0.05)


async def read(client: tc.Runner, entity: str) -> Counted:
    tally = client.client(Tally)
    while True:
        try:
            return await tally(entity).read(Ping())
        except RETRIED:
            await trio.sleep(0.05)


async def test_durable_state_survives_kill_9_of_its_runner(
    cluster: MultiCluster,
) -> None:
    a, b = await cluster.start("a", "b")
    acked: dict[str, list[Counted]] = {entity: [] for entity in ENTITIES}
    stop = trio.Event()

    async def keep_adding(client: tc.Runner, entity: str) -> None:
        # Sequential per entity: the n-th acknowledged add must see n adds.
        while not stop.is_set():
            n = len(acked[entity])
            acked[entity].append(await add(client, entity, f"{entity}/{n}"))
            await trio.sleep(0.02)

    async with cluster.client() as client:
        with trio.fail_after(120):
            owners = {e: (await read(client, e)).runner for e in ENTITIES}
            victims = [e for e, owner in owners.items() if owner == b.address]
            assert victims, owners
            assert set(owners.values()) == {a.address, b.address}
            async with trio.open_nursery() as nursery:
                for entity in ENTITIES:
                    nursery.start_soon(keep_adding, client, entity)
                await trio.sleep(1.5)
                before = {e: len(acked[e]) for e in victims}
                b.kill()
                killed_at = trio.current_time()
                # Go on until every victim has been served again, twice.
                while any(len(acked[e]) < before[e] + 2 for e in victims):  # noqa: ASYNC110 - the callers' progress, bounded by fail_after
                    await trio.sleep(0.1)
                served_again = trio.current_time() - killed_at
                stop.set()
            assert await b.wait_exit() == -9
            for entity in ENTITIES:
                counts = [c.count.adds for c in acked[entity]]
                # Never a lost commit, never one applied twice.
                assert counts == list(range(1, len(counts) + 1)), (entity, counts)
                final = await read(client, entity)
                assert final.count == Count(len(counts), len(counts)), final
                assert final.runner == a.address
            for entity in victims:
                runners = [c.runner for c in acked[entity]]
                assert runners[: before[entity]] == [b.address] * before[entity]
                assert runners[-1] == a.address
    # Each acknowledged add was saved once: the stored version counts them.
    rows = await cluster.sql("SELECT entity_id, version FROM {p}_entity_state")
    assert dict(rows) == {e: len(acked[e]) for e in ENTITIES}
    log.info(
        "kill -9: %d entities with durable state acknowledged two more adds"
        " each within %.3f s; %d adds acknowledged in all",
        len(victims),
        served_again,
        sum(len(v) for v in acked.values()),
    )
