"""The event trace of a simulated cluster, and the error that carries it (test support).

A simulated cluster records what happened, in virtual time: faults injected
and undone, runners starting and dying, shards acquired at which epoch,
persisted requests saved, claimed and answered (or refused by fencing),
volatile executions, and the runtime's own warnings. When a run fails, the
error shows the seed and the end of the trace, so a person can read who
owned which shard at which epoch and which message went where.

Events are stored as ``(time, kind, format, args)`` tuples and formatted only
when read, so recording costs little; the trace keeps the last ``limit``
events (faults are also kept in full, separately).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["InvariantViolation", "SimulationTrace", "TraceEvent"]

DEFAULT_TRACE_LIMIT = 20_000
"""Events a trace keeps by default (the oldest are dropped first)."""

SHOWN_ON_FAILURE = 200
"""Events shown in the text of a failure."""


@attrs.frozen
class TraceEvent:
    """One formatted event of a `SimulationTrace`."""

    time: float
    """Virtual time (``trio.current_time()``) of the event."""
    kind: str
    """``fault``, ``runner``, ``shard``, ``persisted``, ``volatile``,
    ``frame``, ``log`` or ``check``."""
    text: str

    def __str__(self) -> str:
        return f"{self.time:10.3f}  {self.kind:<9} {self.text}"


_Raw = tuple[float, str, str, tuple[object, ...]]


class SimulationTrace:
    """What happened in one simulated cluster, in order.

    Args:
        limit: most events kept (the oldest are dropped first).
    """

    def __init__(self, *, limit: int = DEFAULT_TRACE_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self._events: deque[_Raw] = deque(maxlen=limit)
        self._faults: list[_Raw] = []
        self.recorded = 0
        """Events recorded so far (including those dropped since)."""

    def record(self, kind: str, fmt: str, *args: object) -> None:
        """Record an event now; ``fmt % args`` is its text (formatted later)."""
        event = (trio.current_time(), kind, fmt, args)
        self._events.append(event)
        self.recorded += 1
        if kind == "fault":
            self._faults.append(event)

    @property
    def dropped(self) -> int:
        """Events no longer kept (the trace is bounded)."""
        return self.recorded - len(self._events)

    def events(self, *, kinds: Iterable[str] | None = None) -> list[TraceEvent]:
        """The kept events, oldest first, optionally only of some kinds."""
        wanted = None if kinds is None else frozenset(kinds)
        return [
            _format(raw) for raw in self._events if wanted is None or raw[1] in wanted
        ]

    def faults(self) -> list[TraceEvent]:
        """Every fault event (never dropped)."""
        return [_format(raw) for raw in self._faults]

    def format(self, *, last: int | None = None) -> str:
        """The trace as text, one event per line (the last ``last`` only)."""
        events = self.events()
        if last is not None and len(events) > last:
            skipped = self.dropped + len(events) - last
            events = events[-last:]
        else:
            skipped = self.dropped
        lines = [f"... {skipped} earlier events not shown ..."] if skipped else []
        lines.extend(str(event) for event in events)
        return "\n".join(lines)

    def digest(self) -> str:
        """A hash of every kept event: equal for equal runs."""
        hasher = hashlib.sha256()
        for event in self.events():
            hasher.update(str(event).encode())
            hasher.update(b"\n")
        return hasher.hexdigest()


def _format(raw: _Raw) -> TraceEvent:
    time, kind, fmt, args = raw
    try:
        text = fmt % args if args else fmt
    except (TypeError, ValueError):  # pragma: no cover - a bad format string
        text = f"{fmt} {args!r}"
    return TraceEvent(time, kind, text)


class InvariantViolation(AssertionError):
    """A simulated cluster broke one of its invariants.

    Its text names the invariant, the seed of the run, the faults injected
    and the end of the event trace. (It is an `AssertionError`: a failed
    test, not a failure of the library's caller.)

    Attributes:
        seed: the seed of the simulation (run it again to reproduce).
        trace: the trace of the run.
        time: virtual time at which the violation was detected.
    """

    def __init__(
        self, message: str, *, seed: int, trace: SimulationTrace, time: float
    ) -> None:
        super().__init__(message)
        self.message = message
        self.seed = seed
        self.trace = trace
        self.time = time

    def __str__(self) -> str:
        return (
            f"{self.message}\n(at virtual time {self.time:.3f}; simulation seed"
            f" {self.seed})\n{describe(self.trace, self.seed)}"
        )


def describe(trace: SimulationTrace, seed: int) -> str:
    """The faults and the end of a trace, for the text of a failure."""
    faults = trace.faults()
    lines = [f"--- seed {seed}: {len(faults)} fault event(s) ---"]
    lines.extend(str(event) for event in faults)
    lines.append(f"--- last {SHOWN_ON_FAILURE} trace events ---")
    lines.append(trace.format(last=SHOWN_ON_FAILURE))
    return "\n".join(lines)
