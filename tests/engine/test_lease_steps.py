"""Lease refreshes and the event loop: moving many shards' lease deadlines
is spread over several task steps (`Sharding._extend_leases`)."""

from __future__ import annotations

import trio

import trio_cluster as tc
from trio_cluster._core._addresses import ShardId
from trio_cluster._engine._slots import ShardHost

from ..helpers import Counter, config


class _LeaseSteps(trio.abc.Instrument):
    """How many hosts' lease deadlines each step of the lease loop moved."""

    def __init__(self, hosts: dict[ShardId, ShardHost]) -> None:
        self.hosts = hosts
        self.before: dict[ShardId, float] = {}
        self.moved: list[int] = []

    def _deadlines(self) -> dict[ShardId, float]:
        return {key: host.lease_deadline for key, host in self.hosts.items()}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_lease_loop"):
            self.before = self._deadlines()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_lease_loop"):
            after = self._deadlines()
            moved = sum(1 for key, at in after.items() if self.before.get(key) != at)
            if moved:
                self.moved.append(moved)


async def test_a_refresh_moves_many_leases_over_several_steps(autojump_clock):
    cfg = config(shards_per_group=300, lease_refresh_interval=1.0)
    async with tc.open_runner(entities=[Counter], config=cfg) as runner:
        await runner.wait_shards_acquired()
        hosts = runner._parts.sharding.table.hosts
        assert len(hosts) == 300
        steps = _LeaseSteps(hosts)
        trio.lowlevel.add_instrument(steps)
        try:
            await trio.sleep(2.5)  # two refreshes
        finally:
            trio.lowlevel.remove_instrument(steps)
        # Every host moved at each refresh, at most 32 of them per step.
        assert sum(steps.moved) == 2 * 300
        assert max(steps.moved) <= 32
