"""Runtime records for shards, entities and jobs (Trio driver data).

* `ShardHost`: one locally served shard: its epoch, its lease deadline, the
  nursery its detached tasks run in, the cancel scopes of handlers running in
  callers' tasks, and its entities.
* `Slot`: one entity on this runner: its mailbox (it *is* a `Mailbox`), its
  current incarnation (the user's object, or None), and idle bookkeeping.
* `Job`: one message on its way through a slot.

These are plain ``__slots__`` classes, because an idle entity must cost only a
few hundred bytes of them.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import trio

from .._core._mailbox import Mailbox

if TYPE_CHECKING:
    from .._core._addresses import EntityAddress, ShardId
    from .._entity import Entity
    from .._registry import EntityType, Handler
    from ..serialization._replies import Exit

__all__ = [
    "Job",
    "JobKind",
    "JobState",
    "ShardHost",
    "ShardState",
    "Slot",
    "StopReason",
]


class ShardState(enum.Enum):
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StopReason(enum.Enum):
    """Why a running handler's scope was cancelled by the runtime."""

    SHARD_STOPPED = "shard stopped"
    """The shard was released, its lease lapsed, or the runner shut down."""
    SIBLING_CRASHED = "entity restarted"
    """Another handler of the same entity crashed; the incarnation is gone."""
    INTERRUPTED = "interrupted"
    """The sender of a persisted request asked for it to be interrupted."""


class JobKind(enum.Enum):
    INLINE = "inline"
    """A caller in this process waits and runs the handler in its own task."""
    DETACHED = "detached"
    """Runs in a task of the shard's nursery (discard, persisted, remote)."""
    STREAM = "stream"
    """A stream producer task in the shard's nursery."""


class JobState(enum.Enum):
    QUEUED = "queued"
    GRANTED = "granted"
    """Holds a permit (running, or about to)."""
    BOUNCED = "bounced"
    """Never ran: the shard stopped while it was queued."""
    DONE = "done"


Around = Callable[["Job", Callable[[], Awaitable["Exit"]]], Awaitable["Exit | None"]]
"""Runs a detached job's execution (the callable) inside something, such as a
storage transaction. Returns the outcome for the sink, or None if it already
dealt with it; raises `RetryLater` to run the job again after a backoff."""

Sink = Callable[["Job", "Exit | None"], "Coroutine[Any, Any, None] | None"]
"""Receives the outcome of a detached job; None means it was not run and
must be redelivered (persisted) or rerouted (remote). A synchronous sink is
called in place; an async one runs in a task of its own."""


class Job:
    """One message on its way through an entity's mailbox."""

    __slots__ = (
        "around",
        "deadline",
        "granted",
        "handler",
        "kind",
        "message",
        "next_sequence",
        "payload",
        "request_id",
        "scope",
        "sink",
        "slot",
        "state",
        "stop_reason",
        "stream_channel",
    )

    def __init__(
        self,
        handler: Handler,
        message: Any,
        kind: JobKind,
        *,
        request_id: int | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.handler = handler
        self.message = message
        self.kind = kind
        self.request_id = request_id
        self.sink = sink
        self.state = JobState.QUEUED
        self.granted: trio.Event | None = None
        self.scope: trio.CancelScope | None = None
        self.stop_reason: StopReason | None = None
        self.payload: bytes | None = None
        self.next_sequence = 0
        self.stream_channel: trio.MemorySendChannel[Any] | None = None
        self.slot: Slot | None = None
        self.deadline: float | None = None
        """Trio time after which the handler is cancelled (the remote
        caller's deadline); None: no limit."""
        self.around: Around | None = None
        """Wraps the job's execution (transactional handlers); see `Around`."""

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
        "closing",
        "epoch",
        "idle_event",
        "lease_deadline",
        "nursery",
        "running",
        "scopes",
        "shard_id",
        "slots",
        "state",
    )

    def __init__(self, shard_id: ShardId, epoch: int, lease_deadline: float) -> None:
        self.shard_id = shard_id
        self.epoch = epoch
        self.lease_deadline = lease_deadline
        self.state = ShardState.ACTIVE
        self.nursery: trio.Nursery | None = None
        self.slots: dict[EntityAddress, Slot] = {}
        self.scopes: set[trio.CancelScope] = set()
        """Scopes of handlers running in this shard (inline and detached)."""
        self.running = 0
        """Handlers running now; a graceful stop waits for zero."""
        self.idle_event: trio.Event | None = None
        self.closing = False
        """Its nursery was cancelled (lease deadline, `cancel_all`, or the
        runner's own cancellation) and may close before the state changes:
        it must not be given new tasks."""

    @property
    def active(self) -> bool:
        return self.state is ShardState.ACTIVE and not self.closing

    def start_handler(self, slot: Slot, job: Job) -> trio.CancelScope:
        """Register a handler about to run: a cancel scope the shard can
        cancel, counted until `finish_handler`."""
        scope = trio.CancelScope()
        if job.deadline is not None:
            scope.deadline = job.deadline
        job.scope = scope
        self.scopes.add(scope)
        self.running += 1
        slot.add_running(job)
        return scope

    def finish_handler(self, slot: Slot, job: Job, scope: trio.CancelScope) -> None:
        """Undo `start_handler`; wakes a graceful stop waiting for the last one."""
        self.scopes.discard(scope)
        self.running -= 1
        slot.discard_running(job)
        if self.running == 0 and self.idle_event is not None:
            self.idle_event.set()

    def extend_lease(self, deadline: float) -> None:
        """Move the lease deadline (the shard nursery's deadline) forward."""
        self.lease_deadline = deadline
        if self.nursery is not None:
            self.nursery.cancel_scope.deadline = deadline

    def cancel_all(self) -> None:
        """Cancel every handler and task of this shard now."""
        for scope in list(self.scopes):
            scope.cancel()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
