"""The journal of a workflow execution and its messages (delivery part).

The journal is the durable state of the execution's entity
(`trio_cluster.durable`): it is saved in the transaction of each handler
that changed it, fenced by the shard epoch, and loaded at activation. Its
``entries`` are numbered by position (the *sequence number*): one per
operation of the workflow function, in call order (a step, a recorded
``now``/``random``/``new_id``, a sleep, a signal wait). Values are stored
encoded (msgpack of the runner converter's primitives), so the journal's
own type never depends on the workflow's.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "TERMINAL",
    "Entry",
    "Failure",
    "GetInfo",
    "Interrupt",
    "Journal",
    "Kind",
    "Resume",
    "SignalMessage",
    "Start",
    "Status",
    "Wake",
    "WorkflowInfo",
]


class Status(enum.Enum):
    """Where an execution is."""

    NOT_STARTED = "not_started"
    """Never started (nothing stored under its id)."""
    RUNNING = "running"
    """Its next operation is due now (a step runs, or is about to)."""
    WAITING = "waiting"
    """Waiting, with no task and no timer in memory, for a durable timer (a
    long sleep, a step's retry, a signal's timeout) or a signal."""
    SUSPENDED = "suspended"
    """Stopped by a problem an operator must look at (`WorkflowInfo.problem`:
    a `NonDeterminismError`, a compensation that kept failing); ``resume``
    replays it again with the code deployed then."""
    COMPENSATING = "compensating"
    """It failed or was interrupted; its compensations are running."""
    COMPLETED = "completed"
    """The workflow function returned; ``result`` is its value."""
    FAILED = "failed"
    """The workflow function raised, and it had no compensation to run."""
    COMPENSATED = "compensated"
    """It failed or was interrupted, and all its compensations ran."""


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.COMPENSATED})
"""The statuses an execution never leaves."""


class Kind(enum.Enum):
    """What a journal entry records."""

    STEP = "step"
    NOW = "now"
    RANDOM = "random"
    NEW_ID = "new_id"
    SLEEP = "sleep"
    SIGNAL = "signal"


@attrs.frozen
class Failure:
    """An exception as recorded: its type's name and its message."""

    type: str
    message: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@attrs.frozen
class Entry:
    """One operation of the workflow function, at its sequence number."""

    kind: Kind
    name: str
    """The step's name (a signal's name; the kind's value for the others)."""
    value: bytes | None = None
    """The step's result or signal's payload, encoded; the recorded value
    of ``now``/``random``/``new_id``. None: none (yet)."""
    error: Failure | None = None
    """A step's final failure; a signal wait's timeout."""
    until: float | None = None
    """When a sleep ends, or a signal wait times out (Unix seconds)."""
    attempts: int = 1
    """Attempts a step took."""

    @property
    def resolved(self) -> bool:
        """Whether a signal wait got its payload or timed out (the other
        kinds are recorded resolved)."""
        return self.kind is not Kind.SIGNAL or (
            self.value is not None or self.error is not None
        )


@attrs.frozen
class Journal:
    """The durable state of an execution."""

    status: Status = Status.NOT_STARTED
    arg: bytes | None = None
    """The workflow's argument, encoded."""
    entries: tuple[Entry, ...] = ()
    attempts: int = 0
    """Failed attempts of the operation after the last entry (a step, or a
    compensation), each followed by a durable retry timer."""
    wake: int = 0
    """The token of the one wake message that may advance it (each advance
    makes a new one, so an older timer is ignored)."""
    wake_at: float | None = None
    """When the wake message of ``wake`` is due (None: now, or none)."""
    signals: tuple[tuple[str, bytes], ...] = ()
    """Signals received, by name (the first of each name), encoded."""
    result: bytes | None = None
    error: Failure | None = None
    """Why the workflow function failed (or ``Interrupted``)."""
    problem: str | None = None
    """Why it is suspended."""
    interrupted: str | None = None
    """The reason given to ``interrupt``, once interrupted."""
    compensated: tuple[int, ...] = ()
    """The sequence numbers of the steps whose compensation ran, in the
    order they ran."""

    def signal(self, name: str) -> bytes | None:
        """The payload of the signal ``name``, if it arrived."""
        for key, payload in self.signals:
            if key == name:
                return payload
        return None


@attrs.frozen
class WorkflowInfo:
    """What `WorkflowHandle.poll` answers: a committed snapshot."""

    status: Status
    steps: int
    """Journal entries so far."""
    error: Failure | None = None
    """Why the workflow function failed (FAILED, COMPENSATING, COMPENSATED)."""
    problem: str | None = None
    """Why it is suspended (SUSPENDED)."""
    compensated: tuple[int, ...] = ()
    """Sequence numbers of the steps compensated, in the order they were."""
    waiting_until: float | None = None
    """When its pending durable timer fires (WAITING), Unix seconds."""
    result: bytes | None = attrs.field(default=None, repr=False)
    """The encoded result (COMPLETED); `WorkflowHandle.result` decodes it."""


@attrs.frozen
class Start:
    """Start the execution with this (encoded) argument."""

    arg: bytes


@attrs.frozen
class Wake:
    """A durable timer (or an immediate nudge) advancing the execution."""

    token: int
    at: float | None = None


@attrs.frozen
class SignalMessage:
    """A signal: completes ``wait_signal(name)``."""

    name: str
    payload: bytes


@attrs.frozen
class Interrupt:
    """Stop the execution and run its compensations."""

    reason: str = ""


@attrs.frozen
class Resume:
    """Replay a suspended execution again."""


@attrs.frozen
class GetInfo:
    """The message of the ``watch`` stream."""
