"""Livelock detection for simulated clusters (test support).

On ``MockClock(autojump_threshold=0)`` virtual time moves only when every
task waits. A task that loops without waiting (a busy loop: a retry with no
delay, a wait whose timeout is always zero) therefore stops virtual time,
and the simulation would run forever in real time without failing. Every
deadline of the test is virtual, so none fires.

`LivelockWatch` is a Trio instrument that counts scheduler rounds
(``before_io_wait``, called once per round: cheap) at one virtual instant.
Past ``rounds`` of them it samples which tasks run for a few thousand steps
(a second instrument, ``before_task_step``, added only then), and reports
the busiest ones through ``fail``: the simulation stops with an
`InvariantViolation` that Hypothesis can shrink, instead of hanging.
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["DEFAULT_LIVELOCK_ROUNDS", "LivelockWatch"]

DEFAULT_LIVELOCK_ROUNDS = 1_000_000
"""Scheduler rounds at one virtual instant taken as a livelock: far more
than any burst of work at one instant (a round runs every task that is
ready), reached in seconds of real time by a busy loop."""

_SAMPLED_STEPS = 5_000


class _Sampler(trio.abc.Instrument):
    """Counts the task steps of each task, ``limit`` of them in all."""

    def __init__(self, limit: int, done: Callable[[Counter[str]], None]) -> None:
        self.tasks: Counter[str] = Counter()
        self._left = limit
        self._done = done

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.tasks[task.name] += 1
        self._left -= 1
        if self._left == 0:
            trio.lowlevel.remove_instrument(self)
            self._done(self.tasks)


class LivelockWatch(trio.abc.Instrument):
    """Calls ``fail(text)`` when virtual time stands still for ``rounds``
    scheduler rounds (see the module docstring). Add it with
    ``trio.lowlevel.add_instrument``; it removes itself once it reported."""

    def __init__(self, fail: Callable[[str], None], *, rounds: int) -> None:
        self._fail = fail
        self._limit = rounds
        self._rounds = 0
        self._at: float | None = None
        self._stopped = False

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self._stopped = True
        with suppress(KeyError):
            trio.lowlevel.remove_instrument(self)

    def before_io_wait(self, timeout: float) -> None:
        now = trio.current_time()
        if now != self._at:
            self._at = now
            self._rounds = 0
            return
        self._rounds += 1
        if self._rounds == self._limit:
            trio.lowlevel.remove_instrument(self)
            trio.lowlevel.add_instrument(_Sampler(_SAMPLED_STEPS, self._report))

    def _report(self, tasks: Counter[str]) -> None:
        if self._stopped:
            return
        busiest = ", ".join(f"{name} ({n} steps)" for name, n in tasks.most_common(3))
        self._fail(
            f"livelock: virtual time stood still at {self._at} for"
            f" {self._limit:,} scheduler rounds (a task loops without"
            f" waiting); of the next {_SAMPLED_STEPS:,} task steps: {busiest}"
        )
