"""Workflows (`trio_cluster.workflows`) on memory storage, in virtual time:
replay skips recorded steps, steps recorded once, retries, determinism,
durable sleep, signals, sagas."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    Status,
    StepFailedError,
    WorkflowContext,
    workflow,
)

from ..helpers import ORIGIN, config
from .helpers import open_clocked_runner

CALLS: list[str] = []


@attrs.frozen
class Order:
    id: str
    amount: int


@attrs.frozen
class Receipt:
    order: str
    charge: str
    shipped: bool


async def charge(order: Order) -> str:
    CALLS.append(f"charge {order.id}")
    return f"ch-{order.id}"


async def ship(order: Order) -> bool:
    CALLS.append(f"ship {order.id}")
    return True


@workflow(name="simple", retry=tc.RetryPolicy(max_attempts=1))
async def simple(ctx: WorkflowContext, order: Order) -> Receipt:
    charged = await ctx.step(charge, order)
    await ctx.sleep(30 * 86400)  # 30 days
    shipped = await ctx.step(ship, order)
    return Receipt(order.id, charged, shipped)


def slow_ticks() -> tc.ShardingConfig:
    """A config whose periodic work (leases, membership, polls) ticks hourly,
    so that weeks of virtual time take few iterations."""
    return config(
        lease_duration=3 * 86400.0,
        lease_refresh_interval=3600.0,
        membership_poll_interval=3600.0,
        storage_poll_interval=3600.0,
        retention_interval=86400.0,
    )


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.clear()


async def test_a_30_day_workflow_sleeps_with_nothing_in_memory(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([simple.entity], slow_ticks()) as runner:
        flows = simple.client(runner)
        start = trio.current_time()
        handle = await flows.start(Order("o1", 5))
        await trio.sleep(86400)
        info = await handle.poll()
        assert info.status is Status.WAITING
        assert info.waiting_until == ORIGIN + start + 30 * 86400
        assert CALLS == ["charge o1"]
        await trio.sleep(120)  # the poll's activation passivates again
        assert runner.statistics().entities == 0
        receipt = await handle.result()
        assert receipt == Receipt("o1", "ch-o1", True)
        assert trio.current_time() - start == 30 * 86400
        assert CALLS == ["charge o1", "ship o1"]
        info = await handle.poll()
        assert (info.status, info.steps) == (Status.COMPLETED, 3)
        # Starting it again is the same execution: nothing runs again.
        assert await flows.execute(Order("o1", 5)) == receipt
        assert handle.execution_id == flows.execution_id(Order("o1", 5))
        assert CALLS == ["charge o1", "ship o1"]


async def test_a_restarted_runner_skips_recorded_steps(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([simple.entity], slow_ticks(), storage) as runner:
        handle = await simple.client(runner).start(Order("o2", 1), execution_id="o2")
        await trio.sleep(3600)
        assert CALLS == ["charge o2"]
    # Down for 40 days: the timer is due when a runner comes back.
    await trio.sleep(40 * 86400)
    clock = tc.TrioWallClock(origin=ORIGIN + trio.current_time())
    async with tc.open_runner(
        entities=[simple.entity], config=slow_ticks(), storage=storage, clock=clock
    ) as runner:
        handle = simple.client(runner).get("o2")
        assert await handle.result() == Receipt("o2", "ch-o2", True)
        assert CALLS == ["charge o2", "ship o2"]


GATE: list[trio.Event] = []


async def slow_charge(order: Order) -> str:
    CALLS.append(f"slow charge {order.id}")
    await GATE[0].wait()
    return f"ch-{order.id}"


@workflow(name="gated")
async def gated(ctx: WorkflowContext, order: Order) -> str:
    first = await ctx.step(charge, order)
    second = await ctx.step(slow_charge, order)
    return f"{first}+{second}"


async def test_a_step_interrupted_by_a_crash_runs_again_and_is_recorded_once(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    GATE[:] = [trio.Event()]
    async with open_clocked_runner([gated.entity], config(), storage) as runner:
        await gated.client(runner).start(Order("o3", 1), execution_id="o3")
        await trio.sleep(5)
        assert CALLS == ["charge o3", "slow charge o3"]
        runner.abort()  # like kill -9: the step's transaction never commits
    GATE[:] = [trio.Event()]
    GATE[0].set()
    async with open_clocked_runner([gated.entity], config(), storage) as runner:
        handle = gated.client(runner).get("o3")
        assert await handle.result() == "ch-o3+ch-o3"
        assert (await handle.poll()).steps == 2
    # charge ran once (recorded), slow_charge twice (at least once).
    assert CALLS == ["charge o3", "slow charge o3", "slow charge o3"]


FLAKY: list[int] = []


async def flaky(order: Order) -> int:
    FLAKY.append(int(trio.current_time()))
    if len(FLAKY) < 3:
        raise ConnectionError("try again")
    return len(FLAKY)


async def broken(order: Order) -> int:
    raise ValueError(f"no stock for {order.id}")


@workflow(name="retrying")
async def retrying(ctx: WorkflowContext, order: Order) -> str:
    tries = await ctx.step(
        flaky, order, retry=tc.RetryPolicy(max_attempts=5, backoff=tc.Backoff(10, 10))
    )
    try:
        await ctx.step(
            broken,
            order,
            retry=tc.RetryPolicy(max_attempts=5, non_retryable=(ValueError,)),
        )
    except StepFailedError as exc:
        return f"{tries} tries; {exc.step}: {exc.error_type}: {exc.message}"
    return "unreachable"


async def test_step_retries_wait_on_durable_timers(autojump_clock: Any) -> None:
    FLAKY.clear()
    async with open_clocked_runner([retrying.entity]) as runner:
        start = trio.current_time()
        result = await retrying.client(runner).execute(Order("o4", 1))
        assert result == "3 tries; broken: ValueError: no stock for o4"
        assert [t - start for t in FLAKY] == [0, 10, 20]
