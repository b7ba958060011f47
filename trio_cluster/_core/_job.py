"""The lifecycle of a job: one message on its way through a mailbox (sans-IO).

Theory of operation: a job is *queued* when its mailbox admits it and waits
for a permit. The mailbox (`Mailbox.offer`, `Mailbox.release`) decides when
it gets one; this module only names what may happen to the job, and in which
state, as data (the `TRANSITIONS` table), in the style of h11's
``_state.py``::

    QUEUED --GRANT--> GRANTED --FINISH--> DONE
      |  ^               |
      |  '---REQUEUE-----'   (a persisted job is replayed after a restart)
      |--WITHDRAW--> DONE    (its caller gave up, or it was interrupted)
      '--BOUNCE----> BOUNCED (its shard stopped: it never ran)

A granted job holds a permit: it runs, or is about to. FINISH gives the
permit back whatever the outcome; REQUEUE gives it back and puts the job at
the front of the queue again. DONE and BOUNCED are final.

The Trio driver never assigns a state directly: it asks `advance` for the
next one, which refuses an event the table does not allow in the current
state with `ClusterInternalError` (a bug in the driver, not a user error).
Every local call makes two transitions, so the hot path indexes the `Moves`
of an event directly (``GRANT[state]``: one dict lookup derived from the
table, no function call, the enum members hashed by identity); `advance`
is the same lookup for the other paths.

`StopReason` says why the runtime cancelled a granted job before it
finished: the driver maps it to the caller's outcome.
"""

from __future__ import annotations

import enum
from typing import Final

from .._errors import ClusterInternalError

__all__ = [
    "FINISH",
    "GRANT",
    "ON",
    "TRANSITIONS",
    "JobEvent",
    "JobState",
    "Moves",
    "StopReason",
    "advance",
]


class JobState(enum.Enum):
    """Where a job is in its lifecycle."""

    # NOTE: members are singletons, so identity is the right hash; `Enum`'s
    # own ``__hash__`` is Python code, and `advance` hashes on every call.
    __hash__ = object.__hash__

    QUEUED = "queued"
    """Admitted; waits for a permit."""
    GRANTED = "granted"
    """Holds a permit (running, or about to)."""
    BOUNCED = "bounced"
    """Never ran: the shard stopped while it was queued."""
    DONE = "done"
    """Finished, or withdrawn before it ran."""


class JobEvent(enum.Enum):
    """What may happen to a job (the inputs of `advance`)."""

    __hash__ = object.__hash__  # NOTE: see `JobState`

    GRANT = "grant"
    """The mailbox gave it a permit."""
    REQUEUE = "requeue"
    """It gives its permit back and waits again at the front of the queue."""
    FINISH = "finish"
    """It gives its permit back: it ran, or was stopped while granted."""
    WITHDRAW = "withdraw"
    """It left the queue before it ran (caller gone, or interrupted)."""
    BOUNCE = "bounce"
    """Its shard stopped while it was queued."""


class StopReason(enum.Enum):
    """Why a running handler's scope was cancelled by the runtime."""

    SHARD_STOPPED = "shard stopped"
    """The shard was released, its lease lapsed, or the runner shut down."""
    SIBLING_CRASHED = "entity restarted"
    """Another handler of the same entity crashed; the incarnation is gone."""
    INTERRUPTED = "interrupted"
    """The sender of a persisted request asked for it to be interrupted."""


TRANSITIONS: Final[dict[tuple[JobState, JobEvent], JobState]] = {
    (JobState.QUEUED, JobEvent.GRANT): JobState.GRANTED,
    (JobState.QUEUED, JobEvent.WITHDRAW): JobState.DONE,
    (JobState.QUEUED, JobEvent.BOUNCE): JobState.BOUNCED,
    (JobState.GRANTED, JobEvent.FINISH): JobState.DONE,
    (JobState.GRANTED, JobEvent.REQUEUE): JobState.QUEUED,
}
"""Every allowed transition: (state, event) -> next state. Anything else is
refused."""


class Moves(dict[JobState, JobState]):
    """What one event does: the state a job moves to from each state that
    allows it. Indexing it with any other state raises `ClusterInternalError`
    (``__missing__``), so ``job.state = GRANT[job.state]`` is a checked
    transition at the cost of one dict lookup (no function call)."""

    __slots__ = ("event",)

    def __init__(self, event: JobEvent) -> None:
        super().__init__(
            (source, target)
            for (source, on), target in TRANSITIONS.items()
            if on is event
        )
        self.event = event

    def __missing__(self, state: JobState) -> JobState:
        raise ClusterInternalError(f"a {state.value} job cannot {self.event.value}")


ON: Final[dict[JobEvent, Moves]] = {event: Moves(event) for event in JobEvent}
"""The `Moves` of every event."""

GRANT: Final = ON[JobEvent.GRANT]
FINISH: Final = ON[JobEvent.FINISH]
"""The two transitions of every local call, for the hot path."""


def advance(state: JobState, event: JobEvent) -> JobState:
    """The state a job in ``state`` moves to on ``event``.

    Raises:
        ClusterInternalError: ``event`` is not allowed in ``state``.
    """
    return ON[event][state]
