"""Mailbox accounting: FIFO admission under a concurrency limit (sans-IO).

Theory of operation: a mailbox admits jobs in order. A job *runs* when it holds
one of ``concurrency`` permits; otherwise it waits in a FIFO queue. The
*depth* is running + queued jobs; an offer beyond ``capacity`` is refused
unless forced (persisted deliveries are already durable and are never
refused). When a job finishes, its permit passes straight to the next queued
job, so a late arrival can never overtake the queue. A paused mailbox (an
entity waiting to restart after a crash) admits into the queue but starts
nothing until resumed.

The Trio driver subclasses `Mailbox` for its per-entity slot, which is why the
queue is created lazily: idle entities should cost a few hundred bytes.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, Generic, TypeVar

from .._errors import ClusterInternalError

__all__ = ["Admission", "Mailbox"]

J = TypeVar("J")


class Admission(enum.Enum):
    """Outcome of `Mailbox.offer`."""

    RUN = "run"
    """A permit was granted: start the job now."""
    QUEUED = "queued"
    """The job waits in the queue; `Mailbox.release` will hand it a permit."""
    FULL = "full"
    """Refused: the mailbox is at capacity."""


_RUN: Final = Admission.RUN
_QUEUED: Final = Admission.QUEUED
_FULL: Final = Admission.FULL
# NOTE: `offer` runs on every call; a module constant is one dictionary
# lookup, an enum member read through its class a Python-level
# ``__getattr__`` hook of the enum's metaclass (on Python 3.11).


class Mailbox(Generic[J]):
    """FIFO admission of jobs with ``concurrency`` permits and a capacity."""

    __slots__ = ("_queue", "capacity", "concurrency", "paused", "running")

    def __init__(self, capacity: int, concurrency: int) -> None:
        if capacity < 1 or concurrency < 1:
            raise ValueError("capacity and concurrency must be >= 1")
        self.capacity = capacity
        self.concurrency = concurrency
        self.running = 0
        self.paused = False
        self._queue: deque[J] | None = None

    @property
    def queued(self) -> int:
        """Jobs waiting for a permit."""
        return len(self._queue) if self._queue else 0

    @property
    def depth(self) -> int:
        """Jobs running or waiting."""
        return self.running + (len(self._queue) if self._queue else 0)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        return self.running == 0 and not self._queue

    def offer(self, job: J, *, force: bool = False) -> Admission:
        """Admit a job at the back of the queue.

        Args:
            force: admit even beyond capacity.
        """
        if not self.paused and self.running < self.concurrency and not self._queue:
            self.running += 1
            return _RUN
        if not force and self.depth >= self.capacity:
            return _FULL
        if self._queue is None:
            self._queue = deque()
        self._queue.append(job)
        return _QUEUED

    def requeue_front(self, jobs: list[J]) -> None:
        """Put jobs back at the front of the queue, keeping their order (used
        to replay interrupted persisted jobs after a restart). They start when
        permits allow (call `resume` or `release`)."""
        if not jobs:
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.extendleft(reversed(jobs))

    def release(self) -> J | None:
        """A running job finished: return the next job to start, with the
        permit already transferred to it, or None."""
        if self.running < 1:
            raise ClusterInternalError("release() without a running job")
        self.running -= 1
        if not self._queue:  # nothing waits (most calls): `_grant`'s answer
            return None
        return self._grant()

    def remove(self, job: J) -> bool:
        """Withdraw a queued job (its caller gave up). False if it is not queued."""
        if not self._queue:
            return False
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        return True

    def pause(self) -> None:
        """Stop granting permits; running jobs continue."""
        self.paused = True

    def resume(self) -> list[J]:
        """Grant permits again; returns the jobs to start now, in order."""
        self.paused = False
        started: list[J] = []
        while (job := self._grant()) is not None:
            started.append(job)
        return started

    def drain(self) -> list[J]:
        """Remove and return every queued job (shard stop)."""
        if not self._queue:
            return []
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    def _grant(self) -> J | None:
        if self.paused or not self._queue or self.running >= self.concurrency:
            return None
        self.running += 1
        return self._queue.popleft()
