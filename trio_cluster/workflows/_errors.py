"""The errors of workflows (delivery part)."""

from __future__ import annotations

from trio_cluster import ClusterError

__all__ = [
    "ChildWorkflowFailedError",
    "NonDeterminismError",
    "SignalTimeoutError",
    "StepFailedError",
    "WorkflowFailedError",
    "WorkflowUsageError",
]


class NonDeterminismError(ClusterError):
    """On replay, the workflow function asked for an operation other than
    the one its journal recorded at that position (a step of another name
    or kind, a step more or fewer): the code changed under a running
    execution, or it is not deterministic. The execution is *suspended* with
    this error as its problem; its journal is left as it was.

    ``position`` is the operation's position in the code (``(3,)``: the
    function's fourth operation; ``(3, 1, 0)``: the first operation of the
    second task started in the nursery opened by the fourth); the message
    writes it dotted (``operation 3.1.0``)."""

    def __init__(
        self, execution_id: str, position: tuple[int, ...], expected: str, got: str
    ) -> None:
        where = ".".join(map(str, position))
        super().__init__(
            f"workflow {execution_id!r}, operation {where}: the journal recorded"
            f" {expected}, the code asked for {got}"
        )
        self.execution_id = execution_id
        self.position = position
        self.expected = expected
        self.got = got


class WorkflowUsageError(ClusterError, RuntimeError):
    """Workflow code used its context where replay cannot number its
    operations: from a task that is neither the workflow's own nor one
    started by ``ctx.open_nursery()`` (e.g. a plain ``trio.open_nursery``).
    Like a `NonDeterminismError`, it suspends the execution, its journal
    unchanged, until fixed code is deployed and it is resumed."""


class StepFailedError(ClusterError):
    """Raised in the workflow function by a step that failed for good (a
    non-retryable error, or its attempts were exhausted), on its first run
    and on every replay. Uncaught, it fails the workflow (and runs its
    compensations)."""

    def __init__(self, step: str, error_type: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.message = message


class SignalTimeoutError(ClusterError):
    """Raised in the workflow function by ``wait_signal`` when its durable
    timeout passed before the signal arrived."""


class WorkflowFailedError(ClusterError):
    """Raised by `WorkflowHandle.result` for an execution that ended
    failed or compensated."""

    def __init__(
        self, execution_id: str, status: str, error: str, compensated: bool
    ) -> None:
        super().__init__(f"workflow {execution_id!r} {status}: {error}")
        self.execution_id = execution_id
        self.status = status
        self.error = error
        self.compensated = compensated


class ChildWorkflowFailedError(WorkflowFailedError):
    """Raised in a workflow function by ``ctx.child`` when the child
    execution ended failed or compensated (now and on every replay).
    Uncaught, it fails the parent (and runs its compensations)."""

    def __init__(
        self, workflow: str, execution_id: str, status: str, error: str
    ) -> None:
        super().__init__(execution_id, status, error, status == "compensated")
        self.args = (f"child workflow {workflow!r} {execution_id!r} {status}: {error}",)
        self.workflow = workflow
