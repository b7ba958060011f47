"""Runtime records for shards, entities and jobs (Trio driver data).

* `ShardHost`: one locally served shard: its epoch, its lease deadline, the
  nursery its detached tasks run in, the cancel scopes of handlers running in
  callers' tasks, and its entities.
* `Slot`: one entity on this runner: its mailbox (it *is* a `Mailbox`), its
  current incarnation (the user's object, or None), and idle bookkeeping.
* `Job`: one message on its way through a slot. Its lifecycle (`JobState`)
  is the table of `trio_cluster._core._job`.

`ShardHost` and `Slot` are slotted classes (``__slots__``), because an idle
entity must cost only a few hundred bytes of them; a `Job` lives as long as
its message, and is made cheaply (see its docstring).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .._core._job import JobState, StopReason
from .._core._mailbox import Mailbox

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .._core._addresses import EntityAddress, ShardId
    from .._durable import PendingSave, StateWriter
    from .._entity import Entity
    from .._registry import EntityType, Handler
    from .._storage_abc import StorageTransaction
    from ..serialization._replies import Exit
    from ._listeners import Listeners
    from ._outcomes import Outcome, Requeue

__all__ = [
    "Around",
    "EntityStates",
    "Job",
    "JobKind",
    "ShardHost",
    "ShardState",
    "Sink",
    "Slot",
]


class ShardState(enum.Enum):
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ACTIVE: Final = ShardState.ACTIVE
"""``ShardState.ACTIVE``, read on every call: an enum member read through its
class costs a Python-level ``__getattr__`` hook of the enum's metaclass (on
Python 3.11), a module constant one dictionary lookup."""


class JobKind(enum.Enum):
    INLINE = "inline"
    """A caller in this process waits and runs the handler in its own task."""
    DETACHED = "detached"
    """Runs in a task of the shard's nursery (discard, persisted, remote)."""
    STREAM = "stream"
    """A stream producer task in the shard's nursery."""


_STREAM: Final = JobKind.STREAM


Around = Callable[
    ["Job", Callable[[], Awaitable["Outcome"]]], Awaitable["Outcome | None"]
]
"""Runs a detached job's execution (the callable) inside something, such as a
storage transaction. Returns the outcome for the sink, or None if it already
dealt with it; raises `RetryLater` to run the job again after a backoff."""

Sink = Callable[["Job", "Exit | None"], "Coroutine[Any, Any, None] | None"]
"""Receives the outcome of a detached job; None means it was not run and
must be redelivered (persisted) or rerouted (remote). A synchronous sink is
called in place; an async one runs in a task of its own."""


class EntityStates(Protocol):
    """What a shard's entities need of the keeper of their durable state
    (`._durable_state.StateKeeper`, which documents each method)."""

    async def load(self, slot: Slot, instance: Entity) -> None: ...

    def writing(self, slot: Slot) -> AbstractContextManager[StateWriter]: ...

    async def save_in(
        self, transaction: StorageTransaction, slot: Slot, writer: StateWriter
    ) -> PendingSave | None: ...

    def settle(
        self,
        slot: Slot,
        writer: StateWriter,
        saved: PendingSave | None,
        committed: bool,
    ) -> None: ...


class Job:
    """One message on its way through an entity's mailbox.

    A plain class, not an attrs one: one is made for every call, and its
    ``__init__`` sets only the four fields every job has (and the optional
    ones given); the others read their class-level defaults until set."""

    handler: Handler
    message: Any
    kind: JobKind
    slot: Slot
    """The entity's slot (mailbox) the job was offered to."""
    request_id: int | None = None
    """A persisted request's id; None for volatile messages."""
    sink: Sink | None = None
    """Receives the outcome of a detached job; see `Sink`."""
    stream_channel: trio.MemorySendChannel[Any] | None = None
    """Where a stream job sends its items (kind STREAM only)."""
    around: Around | None = None
    """Wraps the job's execution (transactional handlers); see `Around`."""
    state: JobState = JobState.QUEUED
    """Changed only through `trio_cluster._core._job.advance`."""
    granted: trio.Event | None = None
    """Set when a queued inline job gets its permit (or is bounced)."""
    scope: trio.CancelScope | None = None
    stop_reason: StopReason | None = None
    deadline: float | None = None
    """Trio time after which the handler is cancelled (the remote
    caller's deadline); None: no limit."""
    outcome: Exit | Requeue | None = None
    """How a one-step run ended (see `EntityManager._run_one_step`)."""
    metadata: Mapping[str, str] | None = None
    """The call metadata the handler runs with (None: none). Set after
    construction, and only when there is some: most calls carry none."""
    attempt: int = 1
    """A persisted request's attempt number (`ClaimedRequest.attempts`)."""

    def __init__(
        self,
        handler: Handler,
        message: Any,
        kind: JobKind,
        slot: Slot,
        *,
        request_id: int | None = None,
        sink: Sink | None = None,
        stream_channel: trio.MemorySendChannel[Any] | None = None,
        around: Around | None = None,
    ) -> None:
        self.handler = handler
        self.message = message
        self.kind = kind
        self.slot = slot
        if request_id is not None:
            self.request_id = request_id
        if sink is not None:
            self.sink = sink
        if stream_channel is not None:
            self.stream_channel = stream_channel
        if around is not None:
            self.around = around

    def __repr__(self) -> str:
        return (
            f"<Job {self.handler.what} to {self.slot.address}: {self.state.value}"
            f"{'' if self.request_id is None else f', request {self.request_id}'}>"
        )

    @property
    def persisted(self) -> bool:
        return self.request_id is not None and self.handler.spec.persisted


class Slot(Mailbox[Job]):
    """One entity on this runner: its mailbox and its current incarnation."""

    __slots__ = (
        "address",
        "crashes",
        "entity_type",
        "idle_since",
        "instance",
        "keep_alive",
        "running_jobs",
        "shard",
        "starting",
        "stopping",
    )

    def __init__(
        self, address: EntityAddress, entity_type: EntityType, shard: ShardHost
    ) -> None:
        super().__init__(entity_type.mailbox_capacity, entity_type.concurrency)
        self.address = address
        self.entity_type = entity_type
        self.shard = shard
        self.instance: Entity | None = None
        self.keep_alive = False
        self.crashes = 0
        self.idle_since = 0.0
        self.starting: trio.Event | None = None
        self.stopping = False
        self.running_jobs: set[Job] | None = None

    def add_running(self, job: Job) -> None:
        if self.running_jobs is None:
            self.running_jobs = set()
        self.running_jobs.add(job)

    def discard_running(self, job: Job) -> None:
        if self.running_jobs is not None:
            self.running_jobs.discard(job)


class ShardHost:
    """A shard served by this runner, for as long as it holds the lease."""

    __slots__ = (
        "announced",
        "background",
        "bounced",
        "closing",
        "current_time",
        "done",
        "drain_scope",
        "epoch",
        "forced",
        "idle_event",
        "lease_deadline",
        "listeners",
        "nursery",
        "running",
        "scopes",
        "shard_id",
        "slots",
        "state",
        "states",
        "stop_hooks_done",
    )

    def __init__(
        self,
        shard_id: ShardId,
        epoch: int,
        lease_deadline: float,
        listeners: Listeners,
        background: trio.Nursery,
    ) -> None:
        self.shard_id = shard_id
        self.listeners = listeners
        self.background = background
        """Where work that outlives the shard runs (a finished job's async
        sink, such as recording its reply): the nursery of every shard task,
        so it is open as long as any of them can finish a job."""
        self.current_time = trio.lowlevel.current_clock().current_time
        """``trio.current_time()`` without its two lookups (read on every
        call: the lease check, and when its entity goes idle)."""
        self.announced = False
        """`shard_acquired` was told (so `shard_stopping`/`stopped` are due)."""
        self.done = False
        """Its task ended: nothing new runs here; handlers cancelled in
        callers' tasks may still be unwinding (see `ended`)."""
        self.epoch = epoch
        self.lease_deadline = lease_deadline
        self.state = ShardState.ACTIVE
        self.states: EntityStates | None = None
        """Keeps its entities' durable state (set when it starts serving)."""
        self.nursery: trio.Nursery | None = None
        self.slots: dict[EntityAddress, Slot] = {}
        self.scopes: dict[trio.CancelScope, float | None] = {}
        """Scopes of handlers running in this shard (inline and detached),
        each with its job's own deadline when it runs outside the shard's
        nursery (its scope's deadline is the earlier of that and the lease
        deadline, moved at each extension), None when it runs in a task of
        the shard's nursery, whose deadline is the lease's (its scope keeps
        its own: moving thousands of long-running handlers' deadlines every
        second made garbage for the collector, W6)."""
        self.running = 0
        """Handlers running now; a graceful stop waits for zero."""
        self.idle_event: trio.Event | None = None
        self.forced = False
        """`force_stop` was called: its lease ended here."""
        self.drain_scope: trio.CancelScope | None = None
        """The scope of a graceful stop's wait (and ``on_stop`` hooks), which
        `force_stop` cuts short."""
        self.closing = False
        """Its nursery was cancelled (lease deadline, `cancel_all`, or the
        runner's own cancellation) and may close before the state changes:
        it must not be given new tasks."""
        self.bounced: list[int] = []
        """Persisted requests claimed here that its stop gave back unrun
        (`EntityManager.bounce`): their claim did not make an attempt."""
        self.stop_hooks_done: trio.Event | None = None
        """Set once the hooks of its graceful stop ran (it is released
        after them); None unless it stops gracefully."""

    @property
    def active(self) -> bool:
        return self.state is _ACTIVE and not self.closing

    def may_start(self) -> bool:
        """Whether a job may start here now: the shard is active and its
        lease has not run out (see `leased`)."""
        return (
            self.state is _ACTIVE
            and not self.closing
            and self.current_time() < self.lease_deadline
        )

    def leased(self) -> bool:
        """Whether its lease still runs (serving or draining). After that,
        nothing of this shard may have effects: a thawed process may run a
        task before the lease's own cleanup has stopped the shard."""
        return self.current_time() < self.lease_deadline

    def start_handler(self, slot: Slot, job: Job) -> trio.CancelScope:
        """Register a handler about to run: a cancel scope the shard can
        cancel, counted until `finish_handler`."""
        # NOTE: the lease deadline too, not only the shard nursery's: a
        # handler running in a caller's task must be cancelled by Trio at its
        # first checkpoint after the lease lapsed (a frozen process that
        # thaws), before any cleanup task gets to run.
        # A task of the shard's nursery is cancelled by the nursery's
        # deadline, the lease's, before it runs again.
        own = math.inf if job.deadline is None else job.deadline
        nursery = self.nursery
        in_nursery = (
            nursery is not None
            and trio.lowlevel.current_task().parent_nursery is nursery
        )
        scope = trio.CancelScope(
            deadline=own if in_nursery else min(own, self.lease_deadline)
        )
        if job.stop_reason is StopReason.INTERRUPTED:
            scope.cancel()  # interrupted before it started (`cancel_job`)
        elif self.state is not _ACTIVE and job.kind is _STREAM:
            scope.cancel()  # a stream starting as its shard stops (`end_streams`)
        job.scope = scope
        self.scopes[scope] = None if in_nursery else own
        self.running += 1
        slot.add_running(job)
        if self.listeners.any:
            self.listeners.handler_started(
                slot.address, job.handler.spec.name, self.epoch
            )
        return scope

    def finish_handler(self, slot: Slot, job: Job, scope: trio.CancelScope) -> None:
        """Undo `start_handler`; wakes a graceful stop waiting for the last one."""
        del self.scopes[scope]
        self.running -= 1
        slot.discard_running(job)
        if self.listeners.any:
            self.listeners.handler_finished(
                slot.address, job.handler.spec.name, self.epoch
            )
        if self.running == 0:
            if self.idle_event is not None:
                self.idle_event.set()
            if self.done:
                self._stopped()

    def ended(self) -> None:
        """The shard's task ended (every handler was told to stop): once no
        handler runs any more, listeners hear that the shard stopped."""
        self.done = True
        if self.running == 0:
            self._stopped()

    def _stopped(self) -> None:
        if self.announced:
            self.announced = False
            self.listeners.shard_stopped(self.shard_id, self.epoch)

    def extend_lease(self, deadline: float) -> None:
        """Move the lease deadline (the shard nursery's deadline) forward."""
        self.lease_deadline = deadline
        if self.nursery is not None:
            self.nursery.cancel_scope.deadline = deadline
        for scope, own in self.scopes.items():
            if own is not None:
                scope.deadline = min(own, deadline)

    async def wait_idle(self) -> None:
        """Return once no handler of this shard runs (several tasks may wait).

        Cancellation: raises `trio.Cancelled`; nothing changes."""
        while self.running:
            if self.idle_event is None or self.idle_event.is_set():
                self.idle_event = trio.Event()
            await self.idle_event.wait()
        await trio.lowlevel.checkpoint()

    def end_streams(self) -> None:
        """A graceful stop begins: end the streams running in this shard now
        (their callers get `EntityNotAssignedError` and open them again on
        the next owner), and those that start from here on. A stream often
        runs for as long as its caller reads (a subscription): waiting for
        it would hold the shard, unserved, until the termination timeout.
        Other handlers get that timeout to finish."""
        for slot in self.slots.values():
            for job in slot.running_jobs or ():
                if job.kind is _STREAM and job.scope is not None:
                    job.scope.cancel()

    def force_stop(self) -> None:
        """Stop now, forced (the lock was lost, or the lease ran out; also
        escalates a graceful stop): end the lease here, so that nothing of
        this shard has effects any more, cut a graceful stop's wait and
        ``on_stop`` hooks short, and cancel every handler."""
        self.forced = True
        self.lease_deadline = min(self.lease_deadline, trio.current_time())
        if self.drain_scope is not None:
            self.drain_scope.cancel()
        self.cancel_all()

    def cancel_all(self) -> None:
        """Cancel every handler and task of this shard now."""
        for scope in list(self.scopes):
            scope.cancel()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
