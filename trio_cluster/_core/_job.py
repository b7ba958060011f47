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
`advance` is on the path of every local call, so it is two lookups in a
nested dict derived from the table, with no allocation, hashing the enum
members by identity.

`StopReason` says why the runtime cancelled a granted job before it
finished: the driver maps it to the caller's outcome.
"""

from __future__ import annotations

import enum
from typing import Final

from .._errors import ClusterInternalError

__all__ = ["TRANSITIONS", "JobEvent", "JobState", "StopReason", "advance"]


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

# NOTE: the hot path looks transitions up by state, then event: a tuple key
# would allocate a tuple on every call.
_NEXT: Final[dict[JobState, dict[JobEvent, JobState]]] = {
    state: {
        event: target
        for (source, event), target in TRANSITIONS.items()
        if source is state
    }
    for state in JobState
}


def advance(state: JobState, event: JobEvent) -> JobState:
    """The state a job in ``state`` moves to on ``event``.

    Raises:
        ClusterInternalError: ``event`` is not allowed in ``state``.
    """
    try:
        return _NEXT[state][event]
    except KeyError:
        raise ClusterInternalError(
            f"a {state.value} job cannot {event.value}"
        ) from None
