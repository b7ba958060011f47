"""Operating workflows (`WorkflowAdmin`, `workflow_metrics`) on memory storage
in virtual time: executions listed, counted and shown by workflow name and
status, signalled, interrupted and resumed without the workflows' code, and
step attempts timed per runner."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import (
    ExecutionNotFoundError,
    Status,
    WorkflowAdmin,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
    workflow_metrics,
)

from ..helpers import ORIGIN, config, runner_config
from .helpers import open_clocked_runner

LOG: list[str] = []
NO_RETRY = tc.RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()
    FLAKY.clear()


@attrs.frozen
class Order:
    id: str
    amount: int


async def reserve(order: Order) -> str:
    LOG.append(f"reserve {order.id}")
    await trio.sleep(2)  # the step takes 2 s (virtual)
    return f"r-{order.id}"


async def release(order: Order, reservation: str) -> None:
    LOG.append(f"release {reservation}")


async def charge(order: Order) -> str:
    LOG.append(f"charge {order.id}")
    if order.amount > 100:
        raise ValueError("declined")
    return f"c-{order.id}"


async def ship(order: Order) -> str:
    LOG.append(f"ship {order.id}")
    return f"t-{order.id}"


@workflow(name="ops.order", retry=NO_RETRY, idempotency_key=lambda o: o.id)
async def ops_order(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order, compensate=release)
    await ctx.step(charge, order)
    await ctx.wait_signal("confirm", bool, timeout=86400)
    return await ctx.step(ship, order)


FLAKY: list[str] = []


async def book(item: str) -> str:
    return f"b-{item}"


async def unbook(item: str, booking: str) -> None:
    FLAKY.append(f"unbook {booking}")
    if len(FLAKY) == 1:
        raise RuntimeError("the booking service is down")


async def fail(item: str) -> str:
    raise ValueError(f"no {item}")


@workflow(name="ops.flaky", retry=NO_RETRY)
async def ops_flaky(ctx: WorkflowContext, item: str) -> str:
    await ctx.step(book, item, compensate=unbook)
    return await ctx.step(fail, item)


ENTITIES = [ops_order.entity, ops_flaky.entity]


async def _populate(runner: tc.Runner) -> None:
    """o1 waits for its signal, o2 is compensated (declined), o3 completed,
    f1 suspended (its compensation failed)."""
    orders = ops_order.client(runner)
    for order in (Order("o1", 10), Order("o2", 500), Order("o3", 20)):
        await orders.start(order)
    await orders.get("o3").signal("confirm", True)
    assert await orders.get("o3").result() == "t-o3"
    await ops_flaky.client(runner).start("lamp", execution_id="f1")
    await trio.sleep(60)


async def test_executions_are_listed_counted_and_shown_by_name_and_status(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner(ENTITIES, config(), MemoryStorage()) as runner:
        await _populate(runner)
        admin = WorkflowAdmin(runner)
        everything = await admin.list()
        assert [(x.workflow, x.execution_id, x.status) for x in everything] == [
            ("ops.flaky", "f1", Status.SUSPENDED),
            ("ops.order", "o1", Status.WAITING),
            ("ops.order", "o2", Status.COMPENSATED),
            ("ops.order", "o3", Status.COMPLETED),
        ]
        assert await admin.counts() == [
            ("ops.flaky", "suspended", 1),
            ("ops.order", "compensated", 1),
            ("ops.order", "completed", 1),
            ("ops.order", "waiting", 1),
        ]
        waiting = await admin.list(status=Status.WAITING)
        assert [x.execution_id for x in waiting] == ["o1"]
        info = waiting[0].info
        assert info is not None
        assert info.waiting_until is not None
        assert info.waiting_until > ORIGIN
        # Pages, within one workflow and across workflows.
        first = await admin.list(workflow="ops.order", limit=2)
        assert [x.execution_id for x in first] == ["o1", "o2"]
        rest = await admin.list(workflow="ops.order", after=("ops.order", "o2"))
        assert [x.execution_id for x in rest] == ["o3"]
        across = await admin.list(after=("ops.flaky", "f1"), limit=1)
        assert [x.execution_id for x in across] == ["o1"]
        # One execution, its journal decoded.
        shown = await admin.get("ops.order", "o2")
        assert shown is not None
        assert shown.journal is not None
        assert shown.version >= 3
        data = admin.journal_data(shown.journal)
        assert data["arg"] == {"id": "o2", "amount": 500}
        assert [(e["kind"], e["name"]) for e in data["entries"]] == [
            ("step", "reserve"),
            ("step", "charge"),
        ]
        assert data["entries"][0]["value"] == "r-o2"
        assert data["entries"][1]["error"] == {
            "type": "ValueError",
            "message": "declined",
        }
        assert data["compensated"] == [[0]]
        suspended = await admin.get("ops.flaky", "f1")
        assert suspended is not None
        assert suspended.info is not None
        assert suspended.info.problem is not None
        assert "the booking service is down" in suspended.info.problem
        assert await admin.get("ops.order", "nope") is None
        assert await admin.get("ops.other", "o1") is None


async def test_signal_interrupt_and_resume_by_name(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner(ENTITIES, config(), storage) as runner:
        await _populate(runner)
        await ops_order.client(runner).start(Order("o4", 30))
        await trio.sleep(10)
    # A client-only runner, without the workflows' code, sends the messages;
    # a runner that hosts the workflows acts on them.
    async with (
        open_clocked_runner([], runner_config(1, shard_groups=()), storage) as client,
        open_clocked_runner(ENTITIES, runner_config(2), storage) as host,
    ):
        admin = WorkflowAdmin(client)
        await admin.signal("ops.order", "o1", "confirm", True)
        await admin.interrupt("ops.order", "o4", "changed my mind")
        await admin.resume("ops.flaky", "f1")
        orders = ops_order.client(host)
        assert await orders.get("o1").result() == "t-o1"
        with pytest.raises(WorkflowFailedError) as failed:
            await orders.get("o4").result()
        assert failed.value.compensated
        info = await orders.get("o4").poll()
        assert info.status is Status.COMPENSATED
        assert str(info.error) == "Interrupted: changed my mind"
        with pytest.raises(WorkflowFailedError):
            await ops_flaky.client(host).get("f1").result()
        assert FLAKY == ["unbook b-lamp", "unbook b-lamp"]
        assert "release r-o4" in LOG
        # Nothing is sent to an execution that is not stored.
        with pytest.raises(ExecutionNotFoundError, match="'o9'"):
            await admin.signal("ops.order", "o9", "confirm", True)
        with pytest.raises(tc.ConfigError, match="workflow name"):
            await admin.resume("no/such", "o1")
        with pytest.raises(TypeError, match="signal name"):
            await admin.signal("ops.order", "o1", "", True)


async def test_purge_deletes_old_finished_executions_only(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner(ENTITIES, config(), storage) as runner:
        await _populate(runner)  # o2 compensated and o3 completed by now
        await trio.sleep(3600)
        orders = ops_order.client(runner)
        await orders.start(Order("o5", 40))  # completed recently
        await orders.get("o5").signal("confirm", True)
        assert await orders.get("o5").result() == "t-o5"
        admin = WorkflowAdmin(runner)
        # Nothing finished is that old yet; an unknown workflow has none.
        assert await admin.purge(older_than=10 * 3600) == 0
        assert await admin.purge(older_than=0, workflow="ops.other") == 0
        assert await admin.purge(older_than=1800, limit=1) == 1
        assert await admin.purge(older_than=1800) == 1
        assert await admin.purge(older_than=1800) == 0
        left = [(x.execution_id, x.status) for x in await admin.list()]
        assert left == [
            ("f1", Status.SUSPENDED),
            ("o1", Status.WAITING),
            ("o5", Status.COMPLETED),
        ]
    # A purged execution is gone: its id starts a new one. (A second later:
    # a runner registering in the millisecond its predecessor left gets its
    # machine id and the same first request ids.)
    await trio.sleep(1)
    async with open_clocked_runner(ENTITIES, config(), storage) as runner:
        orders = ops_order.client(runner)
        assert (await orders.get("o3").poll()).status is Status.NOT_STARTED
        LOG.clear()
        await orders.start(Order("o3", 20))
        await trio.sleep(10)
        assert LOG == ["reserve o3", "charge o3"]
        with pytest.raises(tc.ConfigError, match="workflow name"):
            await WorkflowAdmin(runner).purge(older_than=0, workflow="no/such")
        for bad, error in (
            ({"older_than": -1}, ValueError),
            ({"older_than": "1d"}, TypeError),
            ({"older_than": 0, "limit": 0}, ValueError),
            ({"older_than": 0, "limit": 1.5}, TypeError),
        ):
            with pytest.raises(error):
                await WorkflowAdmin(runner).purge(**bad)


async def test_messages_are_refused_when_this_runner_places_them_elsewhere(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner(ENTITIES, config(), storage) as runner:
        await ops_order.client(runner).start(Order("o1", 10))
        await trio.sleep(10)
        # Another shards_per_group than the cluster's (8): o1 lands in
        # another shard number, so nothing is sent.
        other = runner_config(1, shards_per_group=5, shard_groups=())
        stored = await WorkflowAdmin(runner).get("ops.order", "o1")
        assert stored is not None
        async with open_clocked_runner([], other, storage) as client:
            placed = client.client(ops_order.entity).address_of("o1").shard
            assert placed != stored.shard
            with pytest.raises(tc.ConfigError, match="shards_per_group"):
                await WorkflowAdmin(client).signal("ops.order", "o1", "confirm", True)
        await trio.sleep(10)
        assert (await ops_order.client(runner).get("o1").poll()).status is (
            Status.WAITING
        )


async def test_step_attempts_are_timed_per_runner_and_counted_by_status(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner(ENTITIES, config(), MemoryStorage()) as runner:
        metrics = workflow_metrics(runner)
        assert workflow_metrics(runner) is metrics
        assert metrics.statistics().step_latency == {}
        await _populate(runner)
        stats = metrics.statistics()
        # o1, o2, o3: reserve (2 s each) and charge; o3: ship; f1: book, fail.
        order = stats.step_latency["ops.order"]
        assert order.count == 7
        assert order.total == pytest.approx(6.0)
        assert dict(order.buckets)[2.5] == 7
        assert dict(order.buckets)[1.0] == 4
        assert stats.step_failures == {"ops.order": 1, "ops.flaky": 1}
        assert stats.step_latency["ops.flaky"].count == 2
        text = await metrics.render()
        assert 'trio_cluster_workflows{status="waiting",workflow="ops.order"} 1' in text
        assert (
            'trio_cluster_workflows{status="suspended",workflow="ops.flaky"} 1' in text
        )
        assert (
            'trio_cluster_workflow_step_seconds_bucket{le="2.5",workflow="ops.order"} 7'
            in text
        )
        assert (
            'trio_cluster_workflow_step_seconds_count{workflow="ops.order"} 7' in text
        )
        assert (
            'trio_cluster_workflow_step_failures_total{workflow="ops.flaky"} 1' in text
        )
        assert "# TYPE trio_cluster_workflows gauge" in text
    with pytest.raises(TypeError):
        workflow_metrics("runner")  # type: ignore[arg-type]
