"""The runner's wall clock (Trio driver).

Persisted messages carry wall-clock times (``deliver_at``, retention ages)
because they travel between processes. A runner reads wall time from one
`Clock`. The default follows ``trio.current_time()`` from a wall-clock origin
taken when the runner opens, so under ``MockClock`` the wall clock advances
with virtual time, and it never steps backwards within a runner.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import trio

__all__ = ["Clock", "TrioWallClock"]


class Clock(Protocol):
    """A source of wall-clock time."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class TrioWallClock:
    """Wall time that advances with ``trio.current_time()``.

    Args:
        origin: wall time (Unix seconds) at construction; defaults to the real
            wall clock. Pass a fixed value for reproducible simulations.
        skew: seconds added to every reading (to simulate a skewed clock).

    Must be created inside ``trio.run``.
    """

    __slots__ = ("_offset", "skew")

    def __init__(self, *, origin: float | None = None, skew: float = 0.0) -> None:
        start = origin if origin is not None else datetime.now(UTC).timestamp()
        self._offset = start - trio.current_time()
        self.skew = skew

    def now(self) -> float:
        return trio.current_time() + self._offset + self.skew
