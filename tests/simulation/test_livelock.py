"""A task that loops without waiting stops virtual time: the simulator
reports it as a livelock (naming the busy task) instead of hanging."""

from __future__ import annotations

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.testing import InvariantViolation, open_simulated_cluster

pytestmark = pytest.mark.simulation


@attrs.frozen
class Spin:
    pass


class Spinner(tc.Entity):
    type_name = "Spinner"

    @tc.rpc
    async def spin(self, msg: Spin) -> None:
        while True:  # a busy loop: a retry with no delay
            await trio.lowlevel.checkpoint()


async def spin_in_a_cluster() -> None:
    async with open_simulated_cluster(
        [Spinner], runners=2, seed=3, livelock_rounds=20_000
    ) as cluster:
        with trio.fail_after(60):  # virtual: it never fires in a livelock
            await cluster.client(Spinner)("s").spin(Spin())


async def test_a_busy_loop_is_reported_as_a_livelock(autojump_clock):
    with pytest.raises(InvariantViolation, match="livelock") as caught:
        await spin_in_a_cluster()
    # It names the busiest task: here the caller's (the handler ran in it).
    assert "test_a_busy_loop_is_reported_as_a_livelock'> (5000 steps)" in str(
        caught.value
    )


async def test_ordinary_runs_are_not_livelocks(autojump_clock):
    async with open_simulated_cluster(
        [Spinner], runners=2, seed=3, livelock_rounds=20_000
    ) as cluster:
        await trio.sleep(30)  # leases, polls and heartbeats come and go
        assert cluster.violation is None
