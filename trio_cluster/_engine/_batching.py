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

    __slots__ = ("abandoned", "done", "error", "item", "result")

    def __init__(self, item: I) -> None:
        self.item = item
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
    batches: int = attrs.field(init=False, default=0)
    items: int = attrs.field(init=False, default=0)

    async def submit(
        self, item: I, *, abandoned: Callable[[O], None] | None = None
    ) -> O:
        """Write ``item`` with the next batch and return its result.

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
        pending = self.enqueue(item)
        try:
            await pending.done.wait()
        except BaseException:
            if abandoned is not None:
                if not pending.done.is_set():
                    pending.abandoned = abandoned
                elif pending.error is None:
                    abandoned(self.result(pending))
            raise
        return self.result(pending)

    def enqueue(self, item: I) -> Pending[I, O]:
        """Queue ``item`` for the next batch, without waiting: its result is
        `result` once ``done`` is set, whoever waits for it.

        Raises:
            PersistenceError: the batcher is closed.
        """
        if self._closed:
            raise PersistenceError(f"{self._name}: the runner is shutting down")
        pending: Pending[I, O] = Pending(item)
        self._pending.append(pending)
        self._wake.set()
        return pending

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
                if not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write(batch)
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


def _fail(batch: Sequence[Pending[I, O]], error: BaseException) -> None:
    for pending in batch:
        pending.error = error
        pending.done.set()
