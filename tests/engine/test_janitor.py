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
