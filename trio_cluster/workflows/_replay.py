"""`Replay`: one advance's view of an execution's journal, by position (delivery part).

Theory of operation. Each time an execution advances, its workflow function
runs again from the start. Every operation it asks for (`Replay.take`) gets
the next *position* of the task asking: ``(n,)`` for the function's own
task, ``(*nursery, i, n)`` for the i-th task started in a step nursery (see
`trio_cluster.workflows._records`). The position is looked up in the
journal: a recorded operation must be of the same kind and name (else
`NonDeterminismError`, kept as the advance's `problem`), and returns its
recorded outcome *without a checkpoint*; one not recorded is new, and
starts with a checkpoint (`Replay.begin`).

That split is what makes a nursery replay the same whatever order its
tasks are scheduled in: a task replays all its recorded operations at
once, whatever its siblings do (a sibling failing cannot cancel it half
way through what the journal holds), and meets cancellation at its first
new operation, as on the run that recorded it.

A task that cannot go on in this advance (its next step must wait for the
previous one's commit, a retry's timer, a long sleep, a signal, a child)
raises `Yield`, a `BaseException` that workflow code does not catch by
accident. In a step nursery it *parks* the task (`_nursery`); at the top it
ends the advance, whose handler commits the journal and schedules the next
advance (now, at a time, or when a message arrives).

In *replay-only* mode (collecting compensations, or `replay_workflow`) a new
operation yields at once: nothing runs for real, nothing is recorded.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import trio

from ._errors import NonDeterminismError, WorkflowUsageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from trio_cluster import ClusterError, RetryPolicy

    from ._children import ChildStart
    from ._records import ChildOutcome, Entry, Journal, Kind, Position, Retry

__all__ = ["Compensation", "Replay", "Scope", "Yield", "describe", "enter_scope"]


class Yield(BaseException):
    """Stop this task's replay here; the advance commits the journal and
    wakes at ``at`` (None: now), or waits for a message with no timer
    (``waiting``)."""

    def __init__(self, at: float | None, *, waiting: bool = False) -> None:
        super().__init__(at, waiting)
        self.at = at
        self.waiting = waiting

    def bare(self) -> Yield:
        """The same stop without its traceback, to keep: the traceback holds
        the frames it went through, whose locals may hold the keeper (a
        reference cycle, left to the garbage collector)."""
        return Yield(self.at, waiting=self.waiting)

    @staticmethod
    def combine(stops: Sequence[Yield]) -> Yield:
        """The one stop of several parked tasks: now if one is due now,
        else the earliest timer, else waiting."""
        if any(stop.at is None and not stop.waiting for stop in stops):
            return Yield(None)
        times = [stop.at for stop in stops if stop.at is not None]
        return Yield(min(times)) if times else Yield(None, waiting=True)


class Compensation:
    """A recorded step's (or child's) compensation, as registered by the replay."""

    __slots__ = (
        "arg",
        "fn",
        "name",
        "position",
        "result",
        "retry",
        "transactional",
    )

    def __init__(
        self,
        position: Position,
        name: str,
        fn: Callable[[Any, Any], Awaitable[None]],
        arg: object,
        result: object,
        retry: RetryPolicy,
        transactional: bool,
    ) -> None:
        self.position, self.name, self.fn = position, name, fn
        self.arg, self.result, self.retry = arg, result, retry
        self.transactional = transactional


class Scope:
    """The operations of one task of the workflow code."""

    __slots__ = ("_task", "cursor", "path", "ran_step", "replay", "steps_run")

    def __init__(
        self, replay: Replay, path: Position, task: trio.lowlevel.Task | None
    ) -> None:
        # Its replay and its task are held weakly: the replay holds its root
        # scope, and a nursery task's context holds its scope. A reference
        # cycle would leave everything the advance used (its tasks too) to
        # the garbage collector, whose full collections scan every object
        # and stall the event loop (durable timers fired late, W12).
        self.replay = weakref.ref(replay)
        self.path = path
        """The position of the nursery and the task's index in it (``()``:
        the function's own task)."""
        self.cursor = 0
        """The number of its next operation."""
        self.ran_step = False
        """Whether it ran a step in this advance (a sleep or a nursery then
        yields first, to commit it)."""
        self.steps_run = 0
        """How many new steps it ran in this advance (the workflow's
        ``steps_per_checkpoint`` bounds them)."""
        self._task = None if task is None else weakref.ref(task)

    @property
    def task(self) -> trio.lowlevel.Task | None:
        """The task whose operations these are (None: not started yet)."""
        return None if self._task is None else self._task()

    @task.setter
    def task(self, task: trio.lowlevel.Task) -> None:
        self._task = weakref.ref(task)


_scope_var: ContextVar[Scope | None] = ContextVar(
    "trio_cluster.workflow_scope", default=None
)


def enter_scope(scope: Scope) -> None:
    """Make ``scope`` the current task's (at the start of a nursery task)."""
    scope.task = trio.lowlevel.current_task()
    _scope_var.set(scope)


def describe(entry: Entry) -> str:
    """How an error message names a recorded operation."""
    return f"{entry.kind.value} {entry.name!r}"


class Replay:
    """An execution's journal as one advance (or a replay-only run) sees it.

    Built in the task that runs the workflow function (its root task).
    """

    def __init__(
        self, execution_id: str, journal: Journal, *, replay_only: bool
    ) -> None:
        self.execution_id = execution_id
        self.journal = journal
        self.replay_only = replay_only
        self.entries: list[Entry] = list(journal.entries)
        """The journal's entries, then those recorded in this advance."""
        self.index: dict[Position, int] = {
            entry.position: i for i, entry in enumerate(self.entries)
        }
        self.recorded = len(self.entries)
        """How many entries the journal held before this advance."""
        self.consumed: set[Position] = set()
        """The positions of recorded entries the code asked for."""
        self.retries: dict[tuple[Position, bool], Retry] = {
            (retry.position, retry.compensation): retry for retry in journal.retries
        }
        self.patches: dict[str, bool] = dict(journal.patches)
        self.outcomes: dict[Position, ChildOutcome] = {
            outcome.position: outcome for outcome in journal.children
        }
        self.compensations: list[Compensation] = []
        """Those of the recorded steps and children the code went past."""
        self.started: list[ChildStart] = []
        """The children started by this advance (sent when it commits)."""
        self.problem: ClusterError | None = None
        """Why the code cannot be replayed (the execution is suspended)."""
        self.stopped_at: tuple[Position, str] | None = None
        """Where a replay-only run first stopped, and the operation."""
        self.root = Scope(self, (), trio.lowlevel.current_task())

    def scope(self) -> Scope:
        """The scope of the calling task.

        Raises:
            WorkflowUsageError: the task is neither the workflow's nor a step
                nursery's (kept as the `problem`).
        """
        scope = _scope_var.get()
        if scope is None or scope.replay() is not self:
            scope = self.root
        if scope.task is not trio.lowlevel.current_task():
            self.problem = WorkflowUsageError(
                f"workflow {self.execution_id!r}: its context was used from a task"
                " it did not start; run concurrent operations in tasks started by"
                " `async with ctx.open_nursery() as n: n.start_soon(...)`"
            )
            raise self.problem
        return scope

    def take(self, kind: Kind, name: str) -> tuple[Position, Entry | None]:
        """The calling task's next position, and the entry recorded there
        (checked to be ``kind``/``name``), or None if there is none.

        Raises:
            NonDeterminismError: the entry is of another kind or name (and
                every later call, once a problem was found).
            WorkflowUsageError: see `scope`.
        """
        scope = self.scope()
        position = (*scope.path, scope.cursor)
        scope.cursor += 1
        i = self.index.get(position)
        entry = None if i is None else self.entries[i]
        if entry is not None and (entry.kind is not kind or entry.name != name):
            found = NonDeterminismError(
                self.execution_id, position, describe(entry), f"{kind.value} {name!r}"
            )
            # The first in position order, whichever task asked first.
            problem = self.problem
            if not isinstance(problem, NonDeterminismError) or (
                problem.position > position
            ):
                self.problem = problem = found
            raise problem
        if self.problem is not None:
            raise self.problem
        if entry is not None:
            self.consumed.add(position)
        return position, entry

    async def begin(self, position: Position, kind: Kind, name: str) -> Scope:
        """Start a new operation: a checkpoint; in replay-only mode, stop.

        Raises:
            Yield: replay-only.
        """
        await trio.lowlevel.checkpoint()
        if self.replay_only:
            self.stop(position, kind, name)
        return self.scope()

    def stop(self, position: Position, kind: Kind, name: str) -> None:
        """Stop a replay-only run at an operation it cannot replay.

        Raises:
            Yield: always.
        """
        if self.stopped_at is None:
            self.stopped_at = (position, f"{kind.value} {name!r}")
        raise Yield(None)

    def record(self, entry: Entry) -> None:
        """Append a new entry."""
        self.index[entry.position] = len(self.entries)
        self.entries.append(entry)

    def update(self, entry: Entry) -> None:
        """Replace the entry at ``entry.position`` (a wait resolved)."""
        self.entries[self.index[entry.position]] = entry

    def unconsumed(self) -> Entry | None:
        """The first recorded entry (by position) the code did not ask for."""
        left = [
            entry
            for entry in self.entries[: self.recorded]
            if entry.position not in self.consumed
        ]
        return min(left, key=lambda entry: entry.position) if left else None
