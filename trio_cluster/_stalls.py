"""Deadlines that do not count the time the event loop stood still (Trio driver).

A runner's liveness operations (lease refreshes, membership polls, shard
acquisitions: the statements of the lock connection) run under short
deadlines, so that a hung server or connection is noticed quickly. A deadline
measured on the clock also expires when the *process* stood still: a long
garbage collection (hundreds of milliseconds with a few million objects
alive), or scheduler rounds of thousands of runnable tasks (a burst of
activations) hold the event loop for longer than the deadline, while the
server answered in a millisecond and its answer waits, unread, in the socket.
The operation is then abandoned although it succeeded, and on the lock
connection an abandoned statement ends the lock session: every shard is lost
(found with 100,000 workflow starts stored at once, W12 in
``benchmarks/RESULTS.md``).

`move_on_after_unstalled` counts only the time during which the loop ran. One
watchdog per Trio run (a system task, started at first use) holds every such
deadline; it naps for at most a fifth of the shortest one, and each wake-up
counts no more than the nap it took, however late it woke. A responsive loop
wakes it on time, so the deadline is the clock's; a stall of any length costs
a deadline at most one nap. A server that does not answer is still found
after the deadline's worth of running time. Entering and leaving the block
costs no task and no scheduling round (a task per block would delay every
lease refresh and shard acquisition by two rounds, which are slow exactly
when the loop is loaded).

Safety never rests on these deadlines: a shard's lease is measured on the
clock, stalls included (the shard nursery's deadline, and the server's
``idle_session_timeout`` on the lock session).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["fail_after_unstalled", "move_on_after_unstalled"]

STEPS = 5
"""Naps of the watchdog per deadline: a stall costs at most 1/STEPS of it."""
_EPSILON = 1e-9
"""Seconds left that count as none (float sums of naps)."""


@contextmanager
def move_on_after_unstalled(seconds: float) -> Iterator[trio.CancelScope]:
    """Like `trio.move_on_after`, but the time the event loop stood still
    does not count (see the module docstring). Yields the block's cancel
    scope (``cancelled_caught`` tells whether the deadline ended it).

    Raises:
        ValueError: ``seconds`` is negative or NaN.

    Cancellation from outside propagates as usual.
    """
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    watchdog = _current_watchdog()
    with trio.CancelScope() as scope:
        watchdog.add(scope, seconds)
        try:
            yield scope
        finally:
            watchdog.remove(scope)


@contextmanager
def fail_after_unstalled(seconds: float) -> Iterator[trio.CancelScope]:
    """Like `trio.fail_after`, with `move_on_after_unstalled`'s deadline.

    Raises:
        trio.TooSlowError: the deadline ended the block.
        ValueError: ``seconds`` is negative or NaN.
    """
    with move_on_after_unstalled(seconds) as scope:
        yield scope
    if scope.cancelled_caught:
        raise trio.TooSlowError


@attrs.define(eq=False)
class _Deadline:
    left: float
    """Seconds of running time left."""
    step: float
    """Longest nap that counts in full."""
    since: float
    """When it was last credited (or added)."""


@attrs.define(eq=False)
class _Watchdog:
    """The deadlines of one Trio run, and the system task that ends them."""

    _deadlines: dict[trio.CancelScope, _Deadline] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self, scope: trio.CancelScope, seconds: float) -> None:
        now = trio.current_time()
        self._deadlines[scope] = _Deadline(seconds, seconds / STEPS, now)
        self._changed.set()  # it may need an earlier wake-up

    def remove(self, scope: trio.CancelScope) -> None:
        self._deadlines.pop(scope, None)

    async def run(self) -> None:
        """Until the run ends: nap, credit the deadlines, end the expired."""
        while True:
            self._changed = trio.Event()
            if not self._deadlines:
                await self._changed.wait()
                continue
            nap = min(min(d.left, d.step) for d in self._deadlines.values())
            started = trio.current_time()
            with trio.move_on_after(nap):
                await self._changed.wait()
            now = trio.current_time()
            for scope, deadline in list(self._deadlines.items()):
                # A late wake-up (the loop stood still) counts only the nap.
                ran = now - max(started, deadline.since)
                deadline.left -= min(ran, nap)
                deadline.since = now
                if deadline.left <= _EPSILON:
                    del self._deadlines[scope]
                    scope.cancel()


_WATCHDOG: trio.lowlevel.RunVar[_Watchdog] = trio.lowlevel.RunVar("_WATCHDOG")


def _current_watchdog() -> _Watchdog:
    """This run's watchdog, its task started at first use."""
    try:
        return _WATCHDOG.get()
    except LookupError:
        watchdog = _Watchdog()
        trio.lowlevel.spawn_system_task(
            watchdog.run, name="trio_cluster stall watchdog"
        )
        _WATCHDOG.set(watchdog)
        return watchdog
