"""The janitor (`trio_cluster._engine._janitor`): retention of finished
persisted requests."""

from __future__ import annotations

import trio
import trio.testing

from ..helpers import Account, Deposit, config, open_clocked_runner


async def test_janitor_deletes_finished_requests_after_retention(autojump_clock):
    cfg = config(
        retention_age=100.0,
        retention_interval=10.0,
        retention_batch_size=2,
        entity_max_idle=1000.0,  # keep the balance in memory throughout
    )

    async with open_clocked_runner([Account], cfg) as runner:
        ref = runner.client(Account)("zed")
        for i in range(5):
            assert await ref.deposit(Deposit(f"t{i}", 1)) == i + 1
        await trio.sleep(50)
        # Within retention, a duplicate gets the stored reply.
        assert await ref.deposit(Deposit("t0", 1)) == 1
        await trio.sleep(70)
        # Past retention, the request is gone: the same key runs again.
        assert await ref.deposit(Deposit("t0", 1)) == 6


async def test_janitor_deletes_consumed_events_and_very_old_ones(autojump_clock):
    from trio_cluster.abc import CursorAdvance, EventRecord
    from trio_cluster.storage import MemoryStorage

    from ..helpers import clock

    cfg = config(retention_age=100.0, retention_interval=10.0, retention_batch_size=2)
    storage = MemoryStorage()
    async with open_clocked_runner([], cfg, storage) as runner:
        log = runner.event_storage
        now = clock().now()
        await log.publish(
            [EventRecord("t", p, None, b"x", now) for p in (0, 0, 0, 1, 1)]
        )
        await runner.wait_shards_acquired()
        [(shard, epoch)] = list(runner.served_shards().items())[:1]
        # Partition 0: a cursor past offset 1; partition 1: a cursor at 0.
        for partition, offset in ((0, 2), (1, 0)):
            advance = CursorAdvance("s", "t", partition, None, offset, shard, epoch)
            await log.advance_cursor(advance)
        await trio.sleep(150)
        assert [e.offset for e in await log.read("t", 0, offset=0, limit=9)] == [2]
        assert len(await log.read("t", 1, offset=0, limit=9)) == 2
        await trio.sleep(700)  # beyond 7 x retention_age: gone whatever
        assert await log.read("t", 0, offset=0, limit=9) == []
        assert await log.read("t", 1, offset=0, limit=9) == []
