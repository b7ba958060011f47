"""The journal of a workflow execution and its messages (delivery part).

The journal is the durable state of the execution's entity
(`trio_cluster.durable`): it is saved in the transaction of each handler
that changed it, fenced by the shard epoch, and loaded at activation. Its
``entries`` hold one record per operation of the workflow function (a step,
a recorded ``now``/``random``/``new_id``, a sleep, a signal wait, a
nursery, a child workflow), in the order they were recorded, each at its
*position*: a tuple of numbers that depends only on the code's structure.
An operation of the function's own task is at ``(n,)``, the n-th of that
task; the ``i``-th task started in the nursery at ``(n,)`` numbers its own
operations ``(n, i, 0)``, ``(n, i, 1)``... So positions never depend on
which concurrent step finished first, and they sort in the order of the
code (a nursery's children in the order they were started). Values are
stored encoded (msgpack of the runner converter's primitives), so the
journal's own type never depends on the workflow's.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "TERMINAL",
    "ChildDone",
    "ChildOutcome",
    "Entry",
    "Failure",
    "GetInfo",
    "GetJournal",
    "Interrupt",
    "Journal",
    "Kind",
    "ParentRef",
    "Position",
    "Resume",
    "Retry",
    "SignalMessage",
    "Start",
    "Status",
    "Wake",
    "WorkflowInfo",
    "dotted",
]

Position = tuple[int, ...]
"""Where an operation is in the code's structure (see the module docstring)."""


def dotted(position: Position) -> str:
    """``(2, 1, 0)`` -> ``"2.1.0"``: how positions are written in messages."""
    return ".".join(map(str, position))


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
    NURSERY = "nursery"
    CHILD = "child"


@attrs.frozen
class Failure:
    """An exception as recorded: its type's name and its message."""

    type: str
    message: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@attrs.frozen
class Entry:
    """One operation of the workflow function, at its position."""

    kind: Kind
    name: str
    """The step's name (a signal's; a child's workflow name; the kind's
    value for the others)."""
    position: tuple[int, ...]
    """Where it is in the code (see the module docstring)."""
    value: bytes | None = None
    """The step's or child's result, or the signal's payload, encoded; the
    recorded value of ``now``/``random``/``new_id``. None: none (yet)."""
    error: Failure | None = None
    """A step's final failure; a signal wait's timeout; how a child ended
    (its status as ``type``) if it did not complete."""
    until: float | None = None
    """When a sleep ends, or a signal wait times out (Unix seconds)."""
    attempts: int = 1
    """Attempts a step took."""
    execution_id: str | None = None
    """A child workflow's execution id."""

    @property
    def resolved(self) -> bool:
        """Whether a signal wait or a child got its outcome (the other kinds
        are recorded resolved)."""
        return self.kind not in (Kind.SIGNAL, Kind.CHILD) or (
            self.value is not None or self.error is not None
        )


@attrs.frozen
class Retry:
    """A step (or a compensation) that failed and will be attempted again."""

    position: tuple[int, ...]
    attempts: int
    """Failed attempts so far."""
    not_before: float
    """When the next attempt may run (Unix seconds)."""
    compensation: bool = False
    """Whether this is the step's compensation (else the step)."""


@attrs.frozen
class ParentRef:
    """The execution that started a child, and where it waits for it."""

    workflow: str
    execution_id: str
    position: tuple[int, ...]
    shard_group: str = "default"
    """The shard group of the parent's workflow."""


@attrs.frozen
class ChildOutcome:
    """How a child execution ended, as told to its parent."""

    position: tuple[int, ...]
    """The parent's operation that started it."""
    execution_id: str
    status: Status
    result: bytes | None = None
    """Its encoded result (COMPLETED)."""
    error: Failure | None = None
    """Why it failed (FAILED, COMPENSATED)."""


@attrs.frozen
class Journal:
    """The durable state of an execution."""

    status: Status = Status.NOT_STARTED
    arg: bytes | None = None
    """The workflow's argument, encoded."""
    entries: tuple[Entry, ...] = ()
    """Its operations, in the order they were recorded."""
    retries: tuple[Retry, ...] = ()
    """Steps and compensations that failed and will be attempted again,
    each on a durable timer."""
    wake: int = 0
    """The token of the one wake message that may advance it (each advance
    makes a new one, so an older timer is ignored)."""
    wake_at: float | None = None
    """When the wake message of ``wake`` is due (None: now, or none)."""
    signals: tuple[tuple[str, bytes], ...] = ()
    """Signals received, by name (the first of each name), encoded."""
    patches: tuple[tuple[str, bool], ...] = ()
    """Each ``patched(change_id)`` decision, made once per execution."""
    children: tuple[ChildOutcome, ...] = ()
    """How the children it started ended (as they told it)."""
    parents: tuple[ParentRef, ...] = ()
    """The executions that started it as their child, told when it ends."""
    result: bytes | None = None
    error: Failure | None = None
    """Why the workflow function failed (or ``Interrupted``)."""
    problem: str | None = None
    """Why it is suspended."""
    interrupted: str | None = None
    """The reason given to ``interrupt``, once interrupted."""
    compensated: tuple[tuple[int, ...], ...] = ()
    """The positions of the steps (and children) compensated, in the order
    they were."""
    stopping: tuple[tuple[int, ...], ...] = ()
    """The positions of the running children it interrupted while
    compensating."""

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
    """Journal entries so far (operations recorded)."""
    error: Failure | None = None
    """Why the workflow function failed (FAILED, COMPENSATING, COMPENSATED)."""
    problem: str | None = None
    """Why it is suspended (SUSPENDED)."""
    compensated: tuple[tuple[int, ...], ...] = ()
    """Positions of the steps (and children) compensated, in the order they
    were."""
    waiting_until: float | None = None
    """When its pending durable timer fires (WAITING), Unix seconds."""
    result: bytes | None = attrs.field(default=None, repr=False)
    """The encoded result (COMPLETED); `WorkflowHandle.result` decodes it."""


@attrs.frozen
class Start:
    """Start the execution with this (encoded) argument."""

    arg: bytes
    parent: ParentRef | None = None
    """The execution starting it as its child (told when it ends)."""


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


@attrs.frozen
class ChildDone:
    """A child execution ended (sent to each of its parents)."""

    outcome: ChildOutcome


@attrs.frozen
class GetJournal:
    """Ask for the committed journal."""
