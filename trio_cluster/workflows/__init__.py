"""Durable workflows on persisted entities (delivery part).

A workflow is a plain async function whose steps are journaled::

    @workflow(name="order")
    async def order(ctx: WorkflowContext, order: Order) -> Receipt:
        payment = await ctx.step(charge, order, compensate=refund)
        async with ctx.open_nursery() as nursery:  # parallel steps
            for parcel in order.parcels:
                nursery.start_soon(ctx.child, ship_parcel, parcel)
        await ctx.sleep(3 * 86400)
        return await ctx.step(invoice, order, transactional=True)

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
    ChildWorkflowFailedError,
    NonDeterminismError,
    SignalTimeoutError,
    StepFailedError,
    WorkflowFailedError,
    WorkflowUsageError,
)
from ._handle import WorkflowHandle, Workflows
from ._history import WorkflowHistory
from ._metrics import WorkflowMetrics, WorkflowStatistics, workflow_metrics
from ._nursery import StepNursery
from ._records import Entry, Journal, Kind, Status, WorkflowInfo

__all__ = [
    "ChildWorkflowFailedError",
    "Entry",
    "ExecutionNotFoundError",
    "Journal",
    "Kind",
    "NonDeterminismError",
    "SignalTimeoutError",
    "Status",
    "StepFailedError",
    "StepNursery",
    "Workflow",
    "WorkflowAdmin",
    "WorkflowContext",
    "WorkflowExecution",
    "WorkflowFailedError",
    "WorkflowHandle",
    "WorkflowHistory",
    "WorkflowInfo",
    "WorkflowMetrics",
    "WorkflowStatistics",
    "WorkflowUsageError",
    "Workflows",
    "workflow",
    "workflow_metrics",
]
