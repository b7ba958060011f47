"""Durable workflows on persisted entities (delivery part).

A workflow is a plain async function whose steps are journaled::

    @workflow(name="order")
    async def order(ctx: WorkflowContext, order: Order) -> Receipt:
        payment = await ctx.step(charge, order, compensate=refund)
        await ctx.sleep(3 * 86400)
        return await ctx.step(ship, order)

    async with tc.open_runner(entities=[order.entity]) as runner:
        receipt = await order.client(runner).execute(Order(...))

See `docs/workflows.md` for what runs at least once and what exactly once,
and for operating them (`WorkflowAdmin`, ``trio-cluster workflows``,
`workflow_metrics`).
"""

from __future__ import annotations

from ._admin import ExecutionNotFoundError, WorkflowAdmin, WorkflowExecution
from ._context import WorkflowContext
from ._definition import Workflow, workflow
from ._errors import (
    NonDeterminismError,
    SignalTimeoutError,
    StepFailedError,
    WorkflowFailedError,
)
from ._handle import WorkflowHandle, Workflows
from ._metrics import WorkflowMetrics, WorkflowStatistics, workflow_metrics
from ._records import Status, WorkflowInfo

__all__ = [
    "ExecutionNotFoundError",
    "NonDeterminismError",
    "SignalTimeoutError",
    "Status",
    "StepFailedError",
    "Workflow",
    "WorkflowAdmin",
    "WorkflowContext",
    "WorkflowExecution",
    "WorkflowFailedError",
    "WorkflowHandle",
    "WorkflowInfo",
    "WorkflowMetrics",
    "WorkflowStatistics",
    "Workflows",
    "workflow",
    "workflow_metrics",
]
