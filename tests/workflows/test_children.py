"""Child workflows (`WorkflowContext.child`) on memory storage, in virtual
time: the child's id recorded, the parent waiting with nothing in memory and
woken by the child's persisted notice, failures as a typed error,
interrupting the parent interrupts (and compensates) its running children."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    ChildWorkflowFailedError,
    Kind,
    Status,
    StepFailedError,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

from ..helpers import ORIGIN, config
from .helpers import open_clocked_runner

LOG: list[str] = []
NO_RETRY = tc.RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


@attrs.frozen
class Parcel:
    id: str
    days: int = 0
    lost: bool = False


class LostError(Exception):
    pass


async def pack(parcel: Parcel) -> str:
    LOG.append(f"pack {parcel.id}")
    return f"box-{parcel.id}"


async def unpack(parcel: Parcel, box: str) -> None:
    LOG.append(f"unpack {box}")


async def deliver(parcel: Parcel) -> str:
    LOG.append(f"deliver {parcel.id}")
    if parcel.lost:
        raise LostError(f"{parcel.id} lost")
    return f"signed-{parcel.id}"


@workflow(name="shipping", retry=NO_RETRY, shard_group="shipping")
async def shipping(ctx: WorkflowContext, parcel: Parcel) -> str:
    await ctx.step(pack, parcel, compensate=unpack)
    await ctx.sleep(parcel.days * 86400)
    return await ctx.step(deliver, parcel)


async def charge(order: str) -> str:
    LOG.append(f"charge {order}")
    return f"ch-{order}"


async def refund(order: str, charge_id: str) -> None:
    LOG.append(f"refund {charge_id}")


async def recall(parcel: Parcel, receipt: str) -> None:
    LOG.append(f"recall {receipt}")


async def confirm(order: str) -> str:
    LOG.append(f"confirm {order}")
    return "confirmed"


@attrs.frozen
class Order:
    id: str
    parcels: list[Parcel]
    then_fail: bool = False


async def fail_now(order: Order) -> None:
    raise LostError("after the children")


@workflow(name="ordering", retry=NO_RETRY)
async def ordering(ctx: WorkflowContext, order: Order) -> list[str]:
    await ctx.step(charge, order.id, compensate=refund)
    receipts: dict[int, str] = {}

    async def ship(index: int, parcel: Parcel) -> None:
        receipts[index] = await ctx.child(shipping, parcel, compensate=recall)

    async with ctx.open_nursery() as nursery:
        for index, parcel in enumerate(order.parcels):
            nursery.start_soon(ship, index, parcel)
    if order.then_fail:
        await ctx.step(fail_now, order)
    await ctx.step(confirm, order.id)
    return [receipts[i] for i in range(len(order.parcels))]


ENTITIES = [ordering.entity, shipping.entity]


GROUPS = ("default", "shipping")
"""The shard groups of the workflows here (shipping's has its own)."""


def slow_ticks(groups: tuple[str, ...] = GROUPS) -> tc.ShardingConfig:
    return config(
        shard_groups=groups,
        lease_duration=3 * 86400.0,
        lease_refresh_interval=3600.0,
        membership_poll_interval=3600.0,
        storage_poll_interval=3600.0,
        retention_interval=86400.0,
    )


async def test_a_parent_waits_for_its_children_with_nothing_in_memory(
    autojump_clock: Any,
) -> None:
    order = Order("o1", [Parcel("p1", days=3), Parcel("p2", days=1)])
    async with open_clocked_runner(ENTITIES, slow_ticks()) as runner:
        start = trio.current_time()
        handle = await ordering.client(runner).start(order, execution_id="o1")
        await trio.sleep(3600)
        info = await handle.poll()
        # Waiting for the children: no timer of its own.
        assert (info.status, info.waiting_until) == (Status.WAITING, None)
        child = shipping.client(runner).get("o1/1.0.0")  # id from its position
        assert (await child.poll()).status is Status.WAITING
        await trio.sleep(600)  # the polls' activations passivate again
        assert runner.statistics().entities == 0
        assert await handle.result() == ["signed-p1", "signed-p2"]
        # Woken by the last child's notice, as soon as it ended.
        assert trio.current_time() - start == 3 * 86400
        history = await handle.history()
    children = [e for e in history.journal.entries if e.kind is Kind.CHILD]
    assert [(e.position, e.execution_id) for e in children] == [
        ((1, 1, 0), "o1/1.1.0"),  # recorded when started, in start order...
        ((1, 0, 0), "o1/1.0.0"),
    ] or [(e.position, e.execution_id) for e in children] == [
        ((1, 0, 0), "o1/1.0.0"),
        ((1, 1, 0), "o1/1.1.0"),
    ]
    assert sorted(e.value for e in children if e.value) == [
        b"\xa9signed-p1",
        b"\xa9signed-p2",
    ]
    assert LOG.count("confirm o1") == 1
    assert sorted(LOG) == sorted(
        ["charge o1", "pack p1", "pack p2", "deliver p1", "deliver p2", "confirm o1"]
    )


@workflow(name="one_child", retry=NO_RETRY)
async def one_child(ctx: WorkflowContext, parcel: Parcel) -> str:
    try:
        return await ctx.child(shipping, parcel, execution_id=f"ship-{parcel.id}")
    except ChildWorkflowFailedError as exc:
        return f"{exc.workflow} {exc.execution_id} {exc.status}: {exc.error}"


async def test_a_failed_child_raises_a_typed_error_in_its_parent(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner(
        [one_child.entity, shipping.entity], slow_ticks()
    ) as runner:
        answer = await one_child.client(runner).execute(Parcel("p3", lost=True))
        assert answer == (
            "shipping ship-p3 compensated: StepFailedError:"
            " step 'deliver' failed: LostError: p3 lost"
        )
        child = shipping.client(runner).get("ship-p3")
        assert (await child.poll()).status is Status.COMPENSATED
        with pytest.raises(WorkflowFailedError):
            await child.result()
    assert LOG == ["pack p3", "deliver p3", "unpack box-p3"]


async def test_interrupting_the_parent_interrupts_its_running_children_first(
    autojump_clock: Any,
) -> None:
    order = Order("o2", [Parcel("fast", days=0), Parcel("slow", days=30)])
    async with open_clocked_runner(ENTITIES, slow_ticks()) as runner:
        handle = await ordering.client(runner).start(order, execution_id="o2")
        await trio.sleep(86400)
        assert "deliver fast" in LOG
        assert "deliver slow" not in LOG
        await handle.interrupt("customer cancelled")
        with pytest.raises(WorkflowFailedError, match="customer cancelled"):
            await handle.result()
        info = await handle.poll()
        assert info.status is Status.COMPENSATED
        slow = shipping.client(runner).get("o2/1.1.0")
        slow_info = await slow.poll()
        assert slow_info.status is Status.COMPENSATED
        assert slow_info.error is not None
        assert "customer cancelled" in slow_info.error.message
    # Newest position first: the slow child (1.1.0: interrupted, and it
    # compensated itself), the fast one (1.0.0: completed, so its
    # compensation ran), then the charge (0).
    assert info.compensated == ((1, 1, 0), (1, 0, 0), (0,))
    undo = [line for line in LOG if line.split()[0] in ("unpack", "recall", "refund")]
    assert undo == ["unpack box-slow", "recall signed-fast", "refund ch-o2"]


async def test_a_parent_failing_after_its_children_compensates_them(
    autojump_clock: Any,
) -> None:
    order = Order("o3", [Parcel("a"), Parcel("b")], then_fail=True)
    async with open_clocked_runner(ENTITIES, slow_ticks()) as runner:
        handle = await ordering.client(runner).start(order, execution_id="o3")
        with pytest.raises(WorkflowFailedError, match="after the children"):
            await handle.result()
        info = await handle.poll()
    assert info.compensated == ((1, 1, 0), (1, 0, 0), (0,))
    undo = [line for line in LOG if line.split()[0] in ("unpack", "recall", "refund")]
    assert undo == ["recall signed-b", "recall signed-a", "refund ch-o3"]


def open_pinned(
    entities: list[type[tc.Entity]], port: int, storage: MemoryStorage
) -> AbstractAsyncContextManager[tc.Runner]:
    """A runner at 127.0.0.1:``port`` hosting only ``entities`` (and their
    shard group)."""
    cfg = slow_ticks((entities[0].shard_group,))
    return tc.open_runner(
        entities=entities,
        config=attrs.evolve(cfg, runner_address=tc.RunnerAddress("127.0.0.1", port)),
        storage=storage,
        clock=tc.TrioWallClock(origin=ORIGIN + trio.current_time()),
    )


async def test_children_run_on_the_runners_that_host_them(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    order = Order("o4", [Parcel("x", days=2)])
    async with (
        open_pinned([ordering.entity], 1, storage) as parents,
        open_pinned([shipping.entity], 2, storage) as children,
    ):
        await ordering.client(children).start(order, execution_id="o4")
        await trio.sleep(86400)
        assert parents.is_local(parents.client(ordering.entity)("o4"))
        assert children.is_local(children.client(shipping.entity)("o4/1.0.0"))
        assert not children.is_local(children.client(ordering.entity)("o4"))
        # The runner of the children stops mid-sleep; a new one takes over.
        children.abort()
    async with (
        open_pinned([ordering.entity], 1, storage) as parents,
        open_pinned([shipping.entity], 3, storage),
    ):
        assert await ordering.client(parents).get("o4").result() == ["signed-x"]
    assert LOG.count("pack x") == 1
    assert LOG.count("deliver x") == 1


@workflow(name="adopting", retry=NO_RETRY)
async def adopting(ctx: WorkflowContext, parcel: Parcel) -> list[str]:
    first = await ctx.child(shipping, parcel, execution_id="shared")
    again = await ctx.child(shipping, parcel, execution_id="shared")
    return [first, again]


async def test_an_existing_execution_is_adopted_as_a_child(autojump_clock: Any) -> None:
    async with open_clocked_runner(
        [adopting.entity, shipping.entity], slow_ticks()
    ) as runner:
        done = await shipping.client(runner).execute(Parcel("s"), execution_id="shared")
        # Started (and ended) before: the parent is told at once, twice.
        answer = await adopting.client(runner).execute(Parcel("s"))
        assert answer == [done, done]
    assert LOG == ["pack s", "deliver s"]


def test_a_child_failure_is_a_workflow_failure() -> None:
    error = ChildWorkflowFailedError("shipping", "c1", "failed", "boom")
    assert isinstance(error, WorkflowFailedError)
    assert (error.workflow, error.execution_id, error.status) == (
        "shipping",
        "c1",
        "failed",
    )
    assert not error.compensated
    assert "child workflow 'shipping' 'c1' failed: boom" in str(error)
    assert not isinstance(error, StepFailedError)
