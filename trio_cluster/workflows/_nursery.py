"""`StepNursery`: concurrent operations in workflow code (delivery part).

``async with ctx.open_nursery() as n: n.start_soon(fn, *args)`` is a Trio
nursery whose tasks number their operations apart: the nursery is an
operation of the task that opened it, at position ``p``, and the ``i``-th
task started in it (in ``start_soon`` call order) numbers its own
operations ``(*p, i, 0)``, ``(*p, i, 1)``... (see `_replay`). So the
journal positions depend only on the code, never on which step finished
first, and every replay finds each recorded result where it was recorded.

Trio's rules hold: the block waits for its tasks; an exception in a task
(or the block) cancels the others and propagates, in an `ExceptionGroup`;
``n.cancel_scope`` cancels them all. What is Workflow-specific is a task
that cannot go on in this advance (`Yield`): it *parks* (ends quietly) and
the others run on; once all ended or parked, the block raises one `Yield`
for all (`Yield.combine`), so the advance commits what they recorded. When
the block itself yields, it too waits for its tasks first.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from ._records import Entry, Kind
from ._replay import Scope, Yield, enter_scope

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._records import Position
    from ._replay import Replay

__all__ = ["StepNursery", "open_step_nursery"]


class StepNursery:
    """What ``ctx.open_nursery()`` gives (a `trio.Nursery`'s shape)."""

    def __init__(
        self, replay: Replay, nursery: trio.Nursery, position: Position
    ) -> None:
        self._replay = replay
        self._nursery = nursery
        self._position = position
        self._started = 0
        self.parked: list[Yield] = []
        """The stops of the tasks that parked."""

    @property
    def cancel_scope(self) -> trio.CancelScope:
        """The nursery's cancel scope: ``cancel()`` cancels its tasks (and
        the rest of its block), as in Trio."""
        return self._nursery.cancel_scope

    def start_soon(
        self,
        fn: Callable[..., Awaitable[object]],
        *args: object,
        name: object = None,
    ) -> None:
        """Start ``fn(*args)`` as a task of the nursery, with positions of its
        own (the next index of this nursery). ``fn`` runs workflow code: it
        may call any ``ctx`` operation, open nurseries, start children. Its
        return value is ignored (store results where the code reads them,
        e.g. ``results[key] = await ctx.step(...)``).

        Raises:
            RuntimeError: the nursery is closed (as `trio.Nursery.start_soon`).
        """
        scope = Scope(self._replay, (*self._position, self._started), None)
        self._nursery.start_soon(
            self._run, scope, fn, args, name=fn if name is None else name
        )
        self._started += 1

    async def _run(
        self,
        scope: Scope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
    ) -> None:
        enter_scope(scope)
        try:
            await fn(*args)
        except Yield as stop:
            self.parked.append(stop.bare())


@asynccontextmanager
async def open_step_nursery(
    replay: Replay, position: Position, *, new: bool
) -> AsyncIterator[StepNursery]:
    """The nursery of ``ctx.open_nursery()`` at ``position`` (``new``: not
    recorded yet; recorded on entry). See the module docstring.

    Raises:
        Yield: new, and its task ran a step in this advance (commit that
            first); or a task (or the block) yielded.
    """
    if new:
        scope = await replay.begin(position, Kind.NURSERY, Kind.NURSERY.value)
        if scope.ran_step:
            raise Yield(None)  # commit the step before its tasks start
        replay.record(Entry(Kind.NURSERY, Kind.NURSERY.value, position))
    stops: list[Yield] = []
    async with trio.open_nursery() as nursery:
        steps = StepNursery(replay, nursery, position)
        try:
            yield steps
        except Yield as stop:  # the block yields: wait for the tasks first
            stops.append(stop.bare())
    stops += steps.parked
    if stops:
        raise Yield.combine(stops)
