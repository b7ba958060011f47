"""Failover between real runner processes on real PostgreSQL: ``kill -9`` of a
runner under load, and a runner frozen with SIGSTOP then resumed."""

from __future__ import annotations

import pytest
import trio

from .entities import Probe, Record
from .helpers import FAST_LEASES, MultiCluster, log
from .loads import Load, entity_ids, warm_up

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

ENTITIES = entity_ids(150)

KILL_BOUND = 2.5
"""Seconds from ``kill -9`` to the last affected entity answering again,
default configuration (lease 5 s). Half the lease: within it, the takeover
came from the dropped connection, not from the lease lapsing, which is what
this test proves. The sub-second target is measured by benchmark W4
(benchmarks/RESULTS.md), not here: typically 0.1-0.3 s on the shared 2-core
machine, but its tail passed a second twice (1.015 s, 1.044 s) while this
suite ran, which made a 1 s bound fail CI at random."""


async def test_kill_9_under_load_entities_answer_again_before_the_lease_lapses(
    cluster: MultiCluster,
) -> None:
    a, b, c = await cluster.start("a", "b", "c")
    async with cluster.client() as client:
        await warm_up(client, ENTITIES)
        async with Load(client, ENTITIES).running() as load:
            await trio.sleep(1.0)
            owners = load.owners()
            victims = [e for e, owner in owners.items() if owner == b.address]
            assert victims, owners
            assert set(owners.values()) == {a.address, b.address, c.address}
            killed_at = trio.current_time()
            b.kill()
            failover = await load.wait_all_answer(
                victims, after=killed_at, not_from=b.address, seconds=15
            )
            # Everybody else kept answering, and keeps answering.
            await load.wait_all_answer(
                ENTITIES, after=trio.current_time(), not_from=b.address, seconds=10
            )
        log.info(
            "kill -9: %d entities answer again after %.3f s", len(victims), failover
        )
        assert await b.wait_exit() == -9
        assert not load.unexpected, load.unexpected[:5]
        load.check_single_owner()
        survivors = {load.owner(e) for e in victims}
        assert survivors <= {a.address, c.address}
        assert failover <= KILL_BOUND, f"failover took {failover:.3f} s"


STOP_LEASE = float(FAST_LEASES["TRIO_CLUSTER_LEASE_DURATION"])


async def test_frozen_runner_is_replaced_fenced_and_rejoins(
    cluster: MultiCluster,
) -> None:
    a, b = await cluster.start("a", "b", env=FAST_LEASES)
    marker = cluster.log_dir / "handler-started"
    async with cluster.client() as client:
        answers = await warm_up(client, ENTITIES)
        on_b = [e for e, served in answers.items() if served.runner == b.address]
        assert on_b
        probe = client.client(Probe)
        async with Load(client, ENTITIES).running() as load:
            await trio.sleep(0.5)
            # A persisted request whose handler blocks B's whole process:
            # freeze B in the middle of it.
            frozen_request = Record("frozen-1", marker=str(marker), block=0.6)
            result: list[object] = []

            async def call() -> None:
                result.append(await probe(on_b[0]).record(frozen_request))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                with trio.fail_after(10):
                    while not marker.exists():  # noqa: ASYNC110
                        await trio.sleep(0.002)
                frozen_at = trio.current_time()
                b.freeze()
                takeover = await load.wait_all_answer(
                    on_b, after=frozen_at, not_from=b.address, seconds=15
                )
                log.info("SIGSTOP: taken over after %.3f s", takeover)
                # The successor ran the request again and recorded its reply.
                with trio.fail_after(15):
                    while not result:  # noqa: ASYNC110
                        await trio.sleep(0.01)
            [served] = result
            assert served.runner == a.address  # type: ignore[attr-defined]

            resumed_at = trio.current_time()
            b.resume()
            # B's handler finishes; its reply is refused (fencing). B also
            # stops serving the shards whose lease lapsed (in either order:
            # its shard tasks and the reply's write race after SIGCONT).
            with trio.fail_after(10):
                while not (  # noqa: ASYNC110
                    "(fencing)" in (text := b.log_text())
                    and "lease lapsed; stopped serving" in text
                ):
                    await trio.sleep(0.02)
            # B rejoins: it serves shards again (at newer epochs: checked
            # below), and every entity answers.
            with trio.fail_after(20):
                while not (  # noqa: ASYNC110
                    firsts := [
                        first
                        for e in ENTITIES
                        if (
                            first := load.first_success(
                                e, resumed_at, not_from=a.address
                            )
                        )
                    ]
                ):
                    await trio.sleep(0.01)
            log.info("SIGCONT: B serves again after %.3f s", min(firsts) - resumed_at)
            await load.wait_all_answer(ENTITIES, after=trio.current_time(), seconds=10)
        assert not load.unexpected, load.unexpected[:5]
        load.check_single_owner()
        # The recorded reply is the successor's: asking again (same primary
        # key) returns it, and storage holds one request and one final reply.
        assert await probe(on_b[0]).record(Record("frozen-1")) == served
        rows = await cluster.sql(
            "SELECT count(DISTINCT m.request_id), count(r.request_id)"
            " FROM {p}_messages m LEFT JOIN {p}_replies r"
            " ON r.request_id = m.request_id AND r.sequence IS NULL"
            " WHERE m.primary_key = 'frozen-1'"
        )
        assert rows == [(1, 1)]
    assert takeover <= 2 * STOP_LEASE + 1.0, f"takeover took {takeover:.3f} s"
