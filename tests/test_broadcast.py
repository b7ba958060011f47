"""Broadcasts (`trio_cluster._broadcast`): a message to every live runner."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from .helpers import Add
from .memory_cluster import open_cluster


async def test_broadcast_reaches_every_runner_once(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        assert await cluster.runners[2].broadcast("note", Add(7)) == 3
        with trio.fail_after(5):
            while len(cluster.received) < 3:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await trio.sleep(1)
        assert sorted(cluster.received) == [
            (f"127.0.0.1:{port}", 7) for port in (1, 2, 3)
        ]
