"""The errors of workflows (delivery part)."""

from __future__ import annotations

from trio_cluster import ClusterError

__all__ = [
    "NonDeterminismError",
    "SignalTimeoutError",
    "StepFailedError",
    "WorkflowFailedError",
]


class NonDeterminismError(ClusterError):
    """On replay, the workflow function asked for an operation other than
    the one its journal recorded at that sequence number (a step of another
    name or kind, a step more or fewer): the code changed under a running
    execution, or it is not deterministic. The execution is *suspended* with
    this error as its problem; its journal is left as it was."""

    def __init__(self, execution_id: str, seq: int, expected: str, got: str) -> None:
        super().__init__(
            f"workflow {execution_id!r}, operation {seq}: the journal recorded"
            f" {expected}, the code asked for {got}"
        )
        self.execution_id = execution_id
        self.seq = seq
        self.expected = expected
        self.got = got


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
