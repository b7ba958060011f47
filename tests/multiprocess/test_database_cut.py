"""A runner process whose database connections are cut (its backends
terminated, again and again, for a while): it stops serving its shards,
the other runner takes them over, and it recovers and rejoins."""

from __future__ import annotations

import time

import psycopg
import pytest
import trio

from .helpers import MultiCluster, log
from .loads import entity_ids, running_load

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

ENTITIES = entity_ids(100)
CUT = 3.0
"""Seconds during which every new connection of the runner is terminated."""


def application_names(address: str) -> list[str]:
    """The ``application_name`` of each connection of the runner at
    ``address`` (see `trio_cluster.storage.PostgresStorage`): the message
    pool, the lock connection and the LISTEN connection."""
    return [
        f"trio_cluster {address}",
        f"trio_cluster lock {address}",
        f"trio_cluster listen {address}",
    ]


def cut_connections(dsn: str, names: list[str], seconds: float) -> int:
    """Terminate the backends with those names every 20 ms for ``seconds``;
    return how many were terminated (runs in a thread)."""
    terminated = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = ANY(%s) AND pid <> pg_backend_pid()",
                [names],
            ).fetchall()
            terminated += sum(1 for (done,) in rows if done)
            time.sleep(0.02)  # noqa: TID251 - in a thread
    return terminated


async def test_runner_cut_from_the_database_hands_over_and_rejoins(
    cluster: MultiCluster,
) -> None:
    async with running_load(cluster, ENTITIES, "a", "b") as ((a, b), load):
        cut_at = trio.current_time()
        on_b = [e for e, owner in load.owners(cut_at).items() if owner == b.address]
        async with trio.open_nursery() as nursery:
            terminated: list[int] = []

            async def cut() -> None:
                terminated.append(
                    await trio.to_thread.run_sync(
                        cut_connections,
                        cluster.dsn,
                        application_names(b.address),
                        CUT,
                    )
                )

            nursery.start_soon(cut)
            # While it is cut off, A serves everything.
            takeover = await load.wait_all_answer(
                on_b, after=cut_at, not_from=b.address, seconds=CUT
            )
        log.info("database cut: taken over after %.3f s", takeover)
        assert terminated[0] >= 3
        assert "the lock session was lost; stopping every shard now" in b.log_text()
        # Then B reconnects, registers again and serves shards again.
        healed_at = trio.current_time()
        with trio.fail_after(20):
            while not any(  # noqa: ASYNC110
                load.first_success(e, healed_at, not_from=a.address) for e in ENTITIES
            ):
                await trio.sleep(0.02)
        rejoined = trio.current_time() - healed_at
        log.info("database cut: B serves again %.3f s after the cut", rejoined)
        await load.wait_all_answer(ENTITIES, after=trio.current_time(), seconds=10)
    assert not load.unexpected, load.unexpected[:5]
    load.check_single_owner()
    assert b.running
    status = await cluster.status()
    live = {r["address"]: r["shards"] for r in status["runners"] if r["live"]}
    assert live.get(b.address, 0) > 0, status["runners"]
