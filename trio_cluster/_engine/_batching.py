"""Group commit: coalesce concurrent storage writes into batches (Trio driver).

Callers `submit` one item and wait for its result. One flusher task takes
everything pending, writes it with a single batch call, and hands each caller
its own result. While a batch is being written, new items accumulate, so the
batch size grows with the load and the cost per item falls, without ever
adding a timer delay at low load (a lone item is flushed at once).

One item must never fail a batch of others. A batch that
storage *refuses* for the data it carries (`refused`: `StorageRefusedError`,
or the `TypeError`/`ValueError` a backend raises for an argument it checks,
both raised before anything of the batch is stored) is written again in
halves, down to the item at fault, which alone gets the error: a batch of
``n`` with one bad item costs about ``2 log2(n)`` more writes, and only when
it happens. A failure of storage itself (a lost connection) fails the whole
batch, as nobody can tell which item it was.

A submitter that asks for it (``here=True``: a persisted call's request,
and the reply its caller's task records, when that call is the only one
waiting: see `_persisted`) writes its item in its own task when the batcher
is idle (nothing pending, no write in flight) and stays so while the other
runnable tasks run once: a lone item then costs one scheduling pass, not
the flusher's wake-up and the submitter's wake-up by the flusher. Items
submitted during that write wait for it, as they would for the flusher's,
then go as the next batch. Under load a write in a submitter's task would
be a batch of one that the others wait behind, splitting the batches that
group commit makes grow (and once split, closed-loop callers stay in two
groups): so callers ask for it only when alone, and the pass lets a burst
of callers that start together (the first of them alone for an instant)
submit first, for the flusher to write as one batch. A submitter whose
item no burst can join skips the pass (``others_first=False``: the reply of
the only call waiting, whose request was written already; callers that
start meanwhile write requests, not replies, and wait for them first), and
so does the task that wrote the last item itself, with nothing written by
the flusher since: a lone caller calling again (sequentially), not the first
of a burst, which is a task just started or woken with the others.
If the submitter is cancelled during its write, whether the write took effect is unknown: the item goes back in the queue
and the flusher writes it again, for whoever waits for it (``abandoned``,
or a task handed the `Pending`): the callers' writes are idempotent (a
request saved again is a duplicate of itself, a reply recorded again a
duplicate of the first), so the second write reports what the first did.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs
import trio

from .._errors import PersistenceError, StorageRefusedError

__all__ = ["Batcher", "Pending", "refused"]

log = logging.getLogger("trio_cluster.persisted")

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class Pending(Generic[I, O]):
    """One item on its way to storage (see `Batcher.enqueue`)."""

    __slots__ = ("abandoned", "done", "error", "here", "item", "result")

    def __init__(self, item: I, *, here: bool = False) -> None:
        self.item = item
        self.here = here
        """To be written by its submitter's task (`Batcher.wait_written`)."""
        self.done = trio.Event()
        self.result: O | None = None
        self.error: BaseException | None = None
        self.abandoned: Callable[[O], None] | None = None
        """Set by a waiter that gave up (it was cancelled) while the item was
        being written: called with the item's result once it is written, so
        that what was stored is not left without anyone to act on it (see
        `Batcher.submit`)."""


@attrs.define(eq=False)
class Batcher(Generic[I, O]):
    """Batches items for ``flush``, which returns one result per item, in order."""

    _flush: Callable[[Sequence[I]], Awaitable[Sequence[O]]]
    """Writes a batch; must return ``len(items)`` results."""
    _max_batch: int = attrs.field(kw_only=True)
    """Most items per flush."""
    _name: str = attrs.field(kw_only=True)
    """For error messages."""
    _pending: list[Pending[I, O]] = attrs.field(init=False, factory=list)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _closed: bool = attrs.field(init=False, default=False)
    _writing: bool = attrs.field(init=False, default=False)
    """A write is in flight (the flusher's, or a submitter's own)."""
    batches: int = attrs.field(init=False, default=0)
    items: int = attrs.field(init=False, default=0)
    written_here: int = attrs.field(init=False, default=0)
    """Items written by their submitters' tasks (see the module docstring)."""
    _lone_writer: trio.lowlevel.Task | None = attrs.field(init=False, default=None)
    """The task that wrote the last item itself, if the flusher wrote
    nothing since: its next item needs no pass (see the module docstring)."""

    async def submit(
        self,
        item: I,
        *,
        abandoned: Callable[[O], None] | None = None,
        here: bool = False,
    ) -> O:
        """Write ``item`` with the next batch and return its result; with
        ``here``, in the current task if the batcher is idle (see the module
        docstring).

        Raises:
            PersistenceError: the batch failed, or the batcher is closed.
            StorageRefusedError, TypeError, ValueError: storage refused this
                item (see `refused`); the other items of its batch were
                written without it.

        If cancelled while waiting, the item may still be written: its
        result is then given to ``abandoned`` (at once if it was written
        already; else by the flusher task, so it must not block), or dropped.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise PersistenceError(f"{self._name}: the runner is shutting down")
        pending = self.enqueue(item, here=here)
        try:
            await self.wait_written(pending)
        except BaseException:
            if abandoned is not None:
                if not pending.done.is_set():
                    pending.abandoned = abandoned
                elif pending.error is None:
                    abandoned(self.result(pending))
            raise
        return self.result(pending)

    def enqueue(self, item: I, *, here: bool = False) -> Pending[I, O]:
        """Queue ``item`` for the next batch, without waiting: its result is
        `result` once ``done`` is set, whoever waits for it. With ``here``,
        an idle batcher leaves the item to its submitter, whose task must
        then call `wait_written` at once (without a checkpoint in between).

        Raises:
            PersistenceError: the batcher is closed.
        """
        if self._closed:
            raise PersistenceError(f"{self._name}: the runner is shutting down")
        here = here and not self._writing and not self._pending
        pending: Pending[I, O] = Pending(item, here=here)
        self._pending.append(pending)
        if not here:
            self._wake.set()
        return pending

    async def wait_written(
        self, pending: Pending[I, O], *, others_first: bool = True
    ) -> None:
        """Wait until ``pending`` is written (its ``done`` set); an item
        `enqueue` left to its submitter is written here, in this task, after
        one scheduling pass for the tasks runnable now to submit first
        (``others_first``, unless this task wrote the last item itself: see
        the module docstring), or at once.

        Raises:
            nothing but cancellation: the item's outcome is `result`.

        If cancelled while writing here, the item goes back in the queue, to
        be written again by the flusher (see the module docstring); on a
        batcher closed meanwhile it fails with `PersistenceError` instead.
        """
        if pending.here:
            if others_first and trio.lowlevel.current_task() is not self._lone_writer:
                # The first of a burst of callers must not write alone (the
                # flusher leaves the item alone meanwhile).
                await trio.lowlevel.cancel_shielded_checkpoint()
            pending.here = False
            if self._writing or self._pending != [pending]:
                self._wake.set()  # others came: the flusher writes them all
            else:
                await self._write_here(pending)
                return
        await pending.done.wait()

    async def _write_here(self, pending: Pending[I, O]) -> None:
        """Write ``pending``, alone in the queue, in this task (see
        `wait_written`)."""
        self._pending.remove(pending)
        self._writing = True
        try:
            results = await self._flush([pending.item])
        except BaseException as exc:
            if refused(exc) or isinstance(exc, PersistenceError):
                _fail([pending], exc)
                return
            if isinstance(exc, trio.ClosedResourceError):
                _fail([pending], _session_closed(self._name, exc))
                return
            # Cancelled (or a bug): whether it was written is unknown.
            if self._closed:
                _fail([pending], PersistenceError(f"{self._name}: write cancelled"))
            else:
                self._pending.insert(0, pending)
            raise
        finally:
            self._writing = False
            if self._pending:
                self._wake.set()
        if len(results) != 1:  # pragma: no cover - backend contract
            raise PersistenceError(
                f"{self._name}: backend returned {len(results)} results for 1"
            )
        self.batches += 1
        self.items += 1
        self.written_here += 1
        self._lone_writer = trio.lowlevel.current_task()
        pending.result = results[0]
        pending.done.set()

    @staticmethod
    def result(pending: Pending[I, O]) -> O:
        """The result of an item whose ``done`` is set.

        Raises:
            as `submit`.
        """
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    async def run(self) -> None:
        """The flusher task. On cancellation, callers still waiting get
        `PersistenceError`."""
        try:
            while True:
                # An item left to its submitter is its until it decides
                # (`wait_written`: one scheduling pass).
                while not self._pending or self._writing or self._pending[0].here:
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._lone_writer = None  # callers more than one at a time
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._writing = True
                try:
                    await self._write(batch)
                finally:
                    self._writing = False
        finally:
            self._closed = True
            failure = PersistenceError(f"{self._name}: the runner is shutting down")
            _fail(self._pending, failure)
            self._pending.clear()

    async def _write(self, batch: list[Pending[I, O]]) -> None:
        """Write ``batch``; a part of it refused for its data is written
        again in halves, first half first (see the module docstring)."""
        parts = [batch]
        while parts:
            part = parts.pop()
            try:
                results = await self._flush([pending.item for pending in part])
            except BaseException as exc:
                if refused(exc) and len(part) > 1:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
                elif refused(exc) or isinstance(exc, PersistenceError):
                    _fail(part, exc)
                elif isinstance(exc, trio.ClosedResourceError):
                    _fail(part, _session_closed(self._name, exc))
                else:
                    failure = PersistenceError(f"{self._name}: batch write interrupted")
                    failure.__cause__ = exc
                    for unwritten in (part, *parts):
                        _fail(unwritten, failure)
                    raise
                continue
            if len(results) != len(part):  # pragma: no cover - backend contract
                raise PersistenceError(
                    f"{self._name}: backend returned {len(results)} results"
                    f" for {len(part)}"
                )
            self.batches += 1
            self.items += len(part)
            for pending, result in zip(part, results, strict=True):
                pending.result = result
                pending.done.set()
                if pending.abandoned is not None:
                    try:
                        pending.abandoned(result)
                    except Exception:  # one item's follow-up fails no batch
                        log.exception(
                            "%s: acting on an abandoned item failed", self._name
                        )


def refused(exc: BaseException) -> bool:
    """Whether storage refused a write for the data it carries (so writing
    the same items again fails again): `StorageRefusedError`, or the
    `TypeError`/`ValueError` of the storage contract's argument checks.
    Never a failure of storage itself, nor a cancellation."""
    return isinstance(exc, StorageRefusedError | TypeError | ValueError)


def _session_closed(name: str, exc: trio.ClosedResourceError) -> PersistenceError:
    """What a caller gets when the storage session closed under its write
    (the runner is shutting down): a `PersistenceError`, as for any write
    that failed, not the storage's own `trio.ClosedResourceError`."""
    failure = PersistenceError(f"{name}: the storage session is closed")
    failure.__cause__ = exc
    return failure


def _fail(batch: Sequence[Pending[I, O]], error: BaseException) -> None:
    for pending in batch:
        pending.error = error
        pending.done.set()
