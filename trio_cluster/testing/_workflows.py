"""Testing workflows: replay a recorded journal against today's code (test support)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trio_cluster.workflows._replayer import replay_history

if TYPE_CHECKING:
    import cattrs

    from trio_cluster.workflows import Workflow, WorkflowHistory

__all__ = ["replay_workflow"]


async def replay_workflow(
    workflow: Workflow[Any, Any],
    history: WorkflowHistory | bytes,
    *,
    converter: cattrs.Converter | None = None,
) -> None:
    """Replay a recorded execution with ``workflow``'s current code, with
    no runner and no storage: nothing runs for real.

    Get the history from a running cluster with ``await
    handle.history()`` (`trio_cluster.workflows.WorkflowHandle.history`)
    and keep its ``to_bytes()`` as a test fixture; replaying it in a test
    tells, before a deploy, whether executions like it would go on under
    the new code or be suspended with a `NonDeterminismError`.

    It passes when the code asks for every recorded operation, at its
    position (`NonDeterminismError.position`), with the same kind and name,
    and, if the recorded run ended (returned or raised), ends the same way
    with nothing more; where the recorded run was waiting (a sleep, a
    signal, a child, the next step), the replay stops there.

    Args:
        workflow: the workflow definition to replay with (its name must be
            the history's).
        history: a `WorkflowHistory`, or its ``to_bytes()``.
        converter: the runner's converter, if it has hooks for the
            workflow's types (default: `trio_cluster.serialization.make_converter()`).

    Raises:
        NonDeterminismError: the code does not replay the journal; the
            message names the position, what the journal recorded and what
            the code asked for.
        ValueError: the history is of another workflow.
        MalformedMessageError: ``history`` is bytes that are not a history.
    """
    await replay_history(workflow, history, converter=converter)
