"""`RunnerStatistics` snapshots (`trio_cluster._operations._statistics`)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc

from ..helpers import Add, Counter, Sleep, config
from ..memory_cluster import Tally, open_cluster


async def test_statistics_snapshot(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        await runner.wait_shards_acquired()
        client = runner.client(Counter)
        for name in "abc":
            await client(name).add(Add(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client("a").sleep, Sleep(5))
            nursery.start_soon(client("a").sleep, Sleep(5))
            await trio.testing.wait_all_tasks_blocked()
            stats = runner.statistics()
        assert stats.shards == 8
        assert stats.shards_assigned == 8
        assert stats.runners == 1
        assert stats.entities == 3
        assert stats.entities_by_type == {"Counter": 3}
        assert stats.running_handlers == 1
        assert stats.queued_messages == 1
        assert stats.max_mailbox_depth == 2
        assert stats.messages_handled == 3
        assert runner.statistics().messages_handled == 5


async def test_statistics_report_the_transport_endpoints_traffic(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        before = first.statistics().transport
        assert before is not None
        entity = cluster.remote_id(first)
        await first.client(Tally)(entity).add(Add(2))
        after = first.statistics().transport
        assert after is not None
        assert after.connections == 1
        assert after.envelopes_sent >= before.envelopes_sent + 1
        assert after.envelopes_received >= before.envelopes_received + 1


async def test_statistics_without_a_transport_report_none(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        assert runner.statistics().transport is None
