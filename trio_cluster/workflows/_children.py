"""Child workflows: starting one from a workflow and waiting for it, durably (delivery part).

``ctx.child(wf, arg)`` is an operation like a step: new, it records the
child's execution id (given, or derived from the parent's id and the call's
position) and the advance's handler sends the child's ``start`` in its
transaction (`ChildStart`), with a `ParentRef` saying where the parent
waits. The parent then waits with no task and no timer. When the child
ends, its last advance sends the parent a ``child_done`` message
(`ChildOutcome`) in its own transaction; the parent records it and
advances, and the wait returns the child's result or raises
`ChildWorkflowFailedError` (now and on every replay).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from .._core._addresses import MAX_ENTITY_ID_LENGTH, check_entity_id
from ._errors import ChildWorkflowFailedError
from ._records import Entry, Failure, Kind, dotted
from ._replay import Compensation, Yield

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._context import WorkflowContext
    from ._definition import Workflow
    from ._records import Position

__all__ = ["ChildStart", "await_child", "child_id"]

A = TypeVar("A")
R = TypeVar("R")


class ChildStart:
    """A child execution an advance started (sent when it commits)."""

    __slots__ = ("arg", "execution_id", "position", "workflow")

    def __init__(
        self,
        workflow: Workflow[Any, Any],
        execution_id: str,
        position: Position,
        arg: bytes,
    ) -> None:
        self.workflow, self.execution_id = workflow, execution_id
        self.position, self.arg = position, arg


def child_id(parent: str, position: Position, given: str | None) -> str:
    """The child's execution id: ``given`` (checked), else
    ``<parent>/<position>`` (a digest if that is too long for an id).

    Raises:
        InvalidIdError: ``given`` is not a valid entity id.
    """
    if given is not None:
        check_entity_id(given)
        return given
    ident = f"{parent}/{dotted(position)}"
    if len(ident) > MAX_ENTITY_ID_LENGTH:
        digest = hashlib.sha256(ident.encode("utf-8", "surrogatepass"))
        ident = f"child-{digest.hexdigest()[:32]}"
    return ident


async def await_child(
    ctx: WorkflowContext,
    workflow: Workflow[A, R],
    arg: A,
    *,
    execution_id: str | None,
    compensate: Callable[[A, R], Awaitable[None]] | None,
) -> R:
    """`WorkflowContext.child` (see there)."""
    replay = ctx.replay
    position, entry = replay.take(Kind.CHILD, workflow.name)
    if entry is None:
        await replay.begin(position, Kind.CHILD, workflow.name)
        ident = child_id(ctx.execution_id, position, execution_id)
        payload = ctx.encode(arg, workflow.arg_type)
        entry = Entry(Kind.CHILD, workflow.name, position, execution_id=ident)
        replay.record(entry)
        replay.started.append(ChildStart(workflow, ident, position, payload))
    elif not entry.resolved and not replay.replay_only:
        await trio.lowlevel.checkpoint()
    if not entry.resolved:
        outcome = replay.outcomes.get(position)
        if outcome is None:
            if replay.replay_only:
                replay.stop(position, Kind.CHILD, workflow.name)
            raise Yield(None, waiting=True)
        if outcome.result is not None:
            entry = attrs.evolve(entry, value=outcome.result)
        else:
            error = outcome.error or Failure("Unknown", "")
            entry = attrs.evolve(entry, error=Failure(outcome.status.value, str(error)))
        replay.update(entry)
    assert entry.execution_id is not None
    if entry.error is not None:
        raise ChildWorkflowFailedError(
            workflow.name, entry.execution_id, entry.error.type, entry.error.message
        )
    assert entry.value is not None
    value: R = ctx.decode(entry.value, workflow.result_type)
    if compensate is not None:
        replay.compensations.append(
            Compensation(
                position,
                f"child {workflow.name}",
                compensate,
                arg,
                value,
                ctx.retry_policy,
                False,
            )
        )
    return value
