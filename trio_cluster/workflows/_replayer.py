"""Replaying a recorded journal against today's code, without a runner (delivery part).

`replay_history` runs a workflow function in replay-only mode over a
`WorkflowHistory`: every recorded operation must be asked for, at its
position, with its kind and name; nothing new runs. It is what
`trio_cluster.testing.replay_workflow` offers, to check before a deploy
that running executions would replay under the new code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from trio_cluster import ClusterInternalError, Snowflake
from trio_cluster.serialization import make_converter

from ._context import WorkflowContext, Yield
from ._errors import NonDeterminismError
from ._history import WorkflowHistory
from ._replay import describe

if TYPE_CHECKING:
    import cattrs

    from ._definition import Workflow

__all__ = ["replay_history"]


class _Offline:
    """The `Runtime` of a replay-only run: nothing new runs, so there is no
    clock and no id to make."""

    __slots__ = ("converter",)

    def __init__(self, converter: cattrs.Converter) -> None:
        self.converter = converter

    def now(self) -> float:
        raise ClusterInternalError("a replay-only run read the clock")

    def new_id(self) -> Snowflake:
        raise ClusterInternalError("a replay-only run made an id")


async def replay_history(
    workflow: Workflow[Any, Any],
    history: WorkflowHistory | bytes,
    *,
    converter: cattrs.Converter | None = None,
) -> None:
    """Replay ``history`` (or its ``to_bytes``) with ``workflow``'s code.

    It passes when the code asks for every recorded operation, at its
    position, with the same kind and name, and, if the recorded run ended
    (returned, or raised), ends the same way with nothing more; where the
    recorded run was waiting, the replay stops there.

    Args:
        converter: the runner's converter, if it has hooks for the
            workflow's types (default: `make_converter()`).

    Raises:
        NonDeterminismError: the code does not replay the journal (the
            message names the operation's position, what the journal
            recorded and what the code asked for).
        ValueError: ``history`` is of another workflow.
        MalformedMessageError: ``history`` is bytes that are not a history.
        Exception: what decoding the argument raises (cattrs errors).
    """
    await trio.lowlevel.checkpoint()
    if isinstance(history, bytes | bytearray):
        history = WorkflowHistory.from_bytes(bytes(history))
    if history.workflow != workflow.name:
        raise ValueError(
            f"the history is of workflow {history.workflow!r}, not {workflow.name!r}"
        )
    journal = history.journal
    ctx = WorkflowContext(
        history.execution_id,
        journal,
        _Offline(converter if converter is not None else make_converter()),
        retry=workflow.retry,
        in_memory_sleep=workflow.in_memory_sleep,
        replay_only=True,
        step_types=workflow.step_types,
    )
    if journal.arg is None:
        return  # never started: nothing recorded
    arg = ctx.decode(journal.arg, workflow.arg_type)
    ended: str
    try:
        await workflow.fn(ctx, arg)
    except Yield:
        ended = "stopped"
    except Exception as exc:
        ended = f"raised {type(exc).__name__}"
    else:
        ended = "returned"
    replay = ctx.replay
    if replay.problem is not None:
        raise replay.problem
    left = replay.unconsumed()
    if left is not None:
        raise NonDeterminismError(
            history.execution_id, left.position, describe(left), "no operation there"
        )
    if journal.result is not None:
        expected = "the workflow returning"
    elif journal.error is not None and journal.interrupted is None:
        expected = f"the workflow raising {journal.error.type}"
    else:
        return  # it was waiting, or interrupted: stopping anywhere after is fine
    if ended == "stopped":
        assert replay.stopped_at is not None
        position, operation = replay.stopped_at
        raise NonDeterminismError(history.execution_id, position, expected, operation)
    if (ended == "returned") != (journal.result is not None):
        position = (replay.root.cursor,)
        raise NonDeterminismError(
            history.execution_id, position, expected, f"the workflow that {ended}"
        )
