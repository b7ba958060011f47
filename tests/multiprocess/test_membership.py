"""Runner processes joining and leaving a live cluster on real PostgreSQL:
rebalancing on join, graceful leave (SIGTERM), and a rolling restart under
load with persisted requests."""

from __future__ import annotations

import pytest
import trio

from .helpers import MultiCluster, log
from .loads import Load, PersistedLoad, entity_ids, running_load, wait_owned_by

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

ENTITIES = entity_ids(120)

LEAVE_BOUND = 1.0
"""Seconds from SIGTERM of a runner to the last of its entities answering on
a successor (it drains, releases its shards at once and unregisters).
Measured on the shared 2-core machine: typically 0.2-0.4 s."""


async def test_join_moves_shards_and_graceful_leave_hands_over_at_once(
    cluster: MultiCluster,
) -> None:
    async with running_load(cluster, ENTITIES, "a", "b") as ((a, b), load):
        before = load.owners()
        c = await cluster.spawn("c")
        await c.wait_ready()
        joined_at = trio.current_time()
        # Shards moved to the newcomer; every entity answers.
        await load.wait_all_answer(ENTITIES, after=joined_at, seconds=10)
        with trio.fail_after(10):
            while c.address not in set(load.owners().values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        moved = [e for e, owner in load.owners().items() if owner != before[e]]
        # Mostly to the newcomer (the balance cap may move a few more).
        assert moved
        to_c = [e for e in moved if load.owner(e) == c.address]
        assert len(to_c) * 2 > len(moved), (len(to_c), len(moved))

        status = await cluster.status()
        shards = {r["address"]: r["shards"] for r in status["runners"] if r["live"]}
        assert all(shards[r.address] > 0 for r in (a, b, c)), shards

        leaving_at = trio.current_time()
        log.info("SIGTERM to %s", a.address)
        a.terminate()
        victims = [
            e for e, owner in load.owners(leaving_at).items() if owner == a.address
        ]
        handover = await load.wait_all_answer(
            victims, after=leaving_at, not_from=a.address, seconds=15
        )
        log.info("graceful leave: %d entities moved in %.3f s", len(victims), handover)
        await a.wait_stopped()
        await load.wait_all_answer(
            ENTITIES, after=trio.current_time(), not_from=a.address, seconds=10
        )
    assert not load.unexpected, load.unexpected[:5]
    load.check_single_owner()
    assert handover < LEAVE_BOUND, (
        f"handover took {handover:.3f} s; failed attempts:"
        f" {load.failures_after(leaving_at, victims)}"
    )


async def test_rolling_restart_under_load_loses_nothing_and_replies_once(
    cluster: MultiCluster,
) -> None:
    runners = await cluster.start("a", "b", "c")
    async with cluster.client() as client:
        await wait_owned_by(client, ENTITIES, [r.address for r in runners])
        persisted = PersistedLoad(client, ENTITIES[:40], callers=4)
        async with (
            Load(client, ENTITIES[:60], pause=0.1).running() as load,
            persisted.running(),
        ):
            await trio.sleep(0.5)
            for generation, old in enumerate(list(runners)):
                sent = len(persisted.results)
                old.terminate()
                await old.wait_stopped()
                new = await cluster.spawn(f"{old.name}{generation + 2}")
                await new.wait_ready()
                runners[runners.index(old)] = new
                restarted_at = trio.current_time()
                await load.wait_all_answer(load.ids, after=restarted_at, seconds=15)
                assert len(persisted.results) > sent  # the load went on
            await wait_owned_by(client, ENTITIES, [r.address for r in runners])
        log.info(
            "rolling restart: %d persisted requests, %d retried",
            len(persisted.results),
            persisted.retries,
        )
        assert not load.unexpected, load.unexpected[:5]
        load.check_single_owner()
        await persisted.check_storage(cluster)
